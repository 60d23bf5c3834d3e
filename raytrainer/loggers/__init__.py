"""Loggers: CSVLogger is the default."""
from raytrainer.loggers.base import Logger
from raytrainer.loggers.csv import CSVLogger

__all__ = ["CSVLogger", "Logger"]
