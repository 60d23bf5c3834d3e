"""Callbacks shipped with raytrainer."""
from raytrainer.callbacks.batch_size_finder import BatchSizeFinder
from raytrainer.callbacks.callback import Callback
from raytrainer.callbacks.checkpoint import Checkpoint, OnExceptionCheckpoint
from raytrainer.callbacks.device_stats_monitor import DeviceStatsMonitor
from raytrainer.callbacks.early_stopping import EarlyStopping
from raytrainer.callbacks.finetuning import BackboneFinetuning, BaseFinetuning
from raytrainer.callbacks.gradient_accumulation_scheduler import GradientAccumulationScheduler
from raytrainer.callbacks.lambda_function import LambdaCallback
from raytrainer.callbacks.lr_finder import LearningRateFinder
from raytrainer.callbacks.lr_monitor import LearningRateMonitor
from raytrainer.callbacks.model_checkpoint import ModelCheckpoint
from raytrainer.callbacks.model_summary import ModelSummary
from raytrainer.callbacks.prediction_writer import BasePredictionWriter
from raytrainer.callbacks.progress import ProgressBar, TQDMProgressBar
from raytrainer.callbacks.pruning import ModelPruning
from raytrainer.callbacks.rich_model_summary import RichModelSummary
from raytrainer.callbacks.rich_progress import RichProgressBar, RichProgressBarTheme
from raytrainer.callbacks.spike import SpikeDetection, TrainingSpikeException
from raytrainer.callbacks.stochastic_weight_avg import StochasticWeightAveraging
from raytrainer.callbacks.throughput_monitor import ThroughputMonitor
from raytrainer.callbacks.timer import Timer
from raytrainer.callbacks.weight_averaging import EMAWeightAveraging, WeightAveraging

__all__ = [
    "BackboneFinetuning", "BaseFinetuning", "BasePredictionWriter", "BatchSizeFinder", "Callback", "Checkpoint",
    "DeviceStatsMonitor", "EMAWeightAveraging", "EarlyStopping", "GradientAccumulationScheduler", "LambdaCallback",
    "LearningRateFinder", "LearningRateMonitor", "ModelCheckpoint", "ModelPruning", "ModelSummary",
    "OnExceptionCheckpoint", "ProgressBar", "RichModelSummary", "RichProgressBar", "RichProgressBarTheme",
    "SpikeDetection", "StochasticWeightAveraging", "TQDMProgressBar", "ThroughputMonitor", "Timer",
    "TrainingSpikeException", "WeightAveraging",
]
