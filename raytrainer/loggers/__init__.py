"""Loggers: TensorBoardLogger is the default when tensorboard is installed, else CSVLogger."""
from raytrainer.loggers.base import Logger
from raytrainer.loggers.csv import CSVLogger
from raytrainer.loggers.mlflow import MLFlowLogger
from raytrainer.loggers.tensorboard import TensorBoardLogger
from raytrainer.loggers.wandb import WandbLogger

__all__ = ["CSVLogger", "Logger", "MLFlowLogger", "TensorBoardLogger", "WandbLogger"]
