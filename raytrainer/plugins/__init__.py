"""Trainer plugins, by Lightning's names: the precision plugins (``Trainer(plugins=[HalfPrecision("bf16-true")])``).

Lightning's other plugin families (CheckpointIO, ClusterEnvironment, LayerSync) are refused with a message: Ray
forms the process group and raytrainer writes checkpoints itself."""
from __future__ import annotations

from raytrainer.core.precision import DoublePrecision, HalfPrecision, MixedPrecision, Precision
from raytrainer.strategies.xla import XLAPrecision

__all__ = ["DoublePrecision", "HalfPrecision", "MixedPrecision", "Precision", "XLAPrecision"]
