"""Filesystem layer: local paths and pyarrow.fs URIs, atomic writes, manifests. Imports nothing of raytrainer."""
