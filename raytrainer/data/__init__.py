"""Data for raytrainer runs: streaming Parquet (exact resume, elastic), Ray Data input, and the samplers that
shard and resume map-style DataLoaders."""
from raytrainer.data.parquet import ParquetDataset
from raytrainer.data.ray_data import RayDataLoader
from raytrainer.data.samplers import data_source

__all__ = ["ParquetDataset", "RayDataLoader", "data_source"]
