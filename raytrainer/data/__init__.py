"""Data for raytrainer runs: streaming Parquet (exact resume, elastic), Ray Data input, and the samplers that
shard and resume map-style DataLoaders.

``ParquetDataset`` loads on first use: its module imports ``pyarrow.dataset`` (and with it pandas, 0.15 s),
which a run without Parquet input, and every rank process of it, would otherwise pay at start."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from raytrainer.data.ray_data import RayDataLoader
from raytrainer.data.samplers import data_source

if TYPE_CHECKING:
    from raytrainer.data.parquet import ParquetDataset

__all__ = ["ParquetDataset", "RayDataLoader", "data_source"]


def __getattr__(name: str) -> Any:
    if name == "ParquetDataset":
        from raytrainer.data.parquet import ParquetDataset

        return ParquetDataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
