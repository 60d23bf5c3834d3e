"""Launchers: how the ranks of a run are started (in this process, on XLA devices, or on Ray)."""
