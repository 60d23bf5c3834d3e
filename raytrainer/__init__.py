"""raytrainer: write a LightningModule once, train it on CPU, GPU, TPU or an elastic Ray cluster.

``import raytrainer as pl`` gives the names Lightning users know.
"""
from raytrainer import callbacks, loggers, plugins, profilers, strategies, utilities
from raytrainer.callbacks import (
                                  Callback,
                                  EarlyStopping,
                                  LearningRateMonitor,
                                  ModelCheckpoint,
                                  ModelSummary,
                                  TQDMProgressBar,
)
from raytrainer.datamodule import LightningDataModule
from raytrainer.loggers import CSVLogger, Logger
from raytrainer.module import LightningModule
from raytrainer.plan import Plan
from raytrainer.trainer.trainer import Trainer
from raytrainer.utilities import seed_everything

__version__ = "0.1.0"


def shutdown() -> None:
    """Release the warm Ray worker group a finished call kept for the next one (its rank processes end and its
    resources are free when this returns); it is released anyway after an idle timeout and at interpreter exit."""
    import sys

    if "raytrainer.launchers.ray.pool" in sys.modules:  # no Ray call ran in this process: nothing is kept
        sys.modules["raytrainer.launchers.ray.pool"].shutdown()


__all__ = ["Callback", "CSVLogger", "EarlyStopping", "LearningRateMonitor", "LightningDataModule", "LightningModule",
           "Logger", "ModelCheckpoint", "ModelSummary", "Plan", "TQDMProgressBar", "Trainer", "callbacks", "loggers",
           "plugins", "profilers", "seed_everything", "shutdown", "strategies", "utilities", "__version__"]
