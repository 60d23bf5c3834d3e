"""Checkpoint formats and durable storage (see ``format.py`` and ``storage.py``)."""
