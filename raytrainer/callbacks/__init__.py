"""Callbacks shipped with raytrainer."""
from raytrainer.callbacks.callback import Callback
from raytrainer.callbacks.early_stopping import EarlyStopping
from raytrainer.callbacks.lr_monitor import LearningRateMonitor
from raytrainer.callbacks.model_checkpoint import ModelCheckpoint
from raytrainer.callbacks.model_summary import ModelSummary
from raytrainer.callbacks.progress import TQDMProgressBar

__all__ = ["Callback", "EarlyStopping", "LearningRateMonitor", "ModelCheckpoint", "ModelSummary", "TQDMProgressBar"]
