"""Lightning's tuner: the learning-rate range test and the batch-size search."""
from raytrainer.callbacks.lr_finder import LRFinderResult
from raytrainer.tuner.tuning import Tuner

__all__ = ["LRFinderResult", "Tuner"]
