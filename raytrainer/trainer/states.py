"""Lightning's ``trainer.states`` module: the enums of ``trainer.state`` (defined in raytrainer.utilities.states,
where callbacks and the per-rank core can import them too)."""
from raytrainer.utilities.states import RunningStage, TrainerFn, TrainerState, TrainerStatus

__all__ = ["RunningStage", "TrainerFn", "TrainerState", "TrainerStatus"]
