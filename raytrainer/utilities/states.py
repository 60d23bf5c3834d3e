"""Where a Trainer is: which entry point runs (fn), which part of it (stage) and how it ended (status).

Lightning's enums with Lightning's values. They are str enums that compare case-insensitively with plain
strings, so ``trainer.state.fn == "fit"`` holds. They live at the bottom layer so callbacks, the module and
the per-rank core can all use them; ``raytrainer.trainer.states`` re-exports them under Lightning's path.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class LightningEnum(str, Enum):  # noqa: UP042 (StrEnum changes str() and format(); Lightning keeps Enum's)
    """A str enum equal to its value, ignoring case (as Lightning's StrEnum)."""

    @classmethod
    def from_str(cls, value: str) -> LightningEnum:
        """The member whose name or value is ``value`` (any case)."""
        for name, member in cls.__members__.items():
            if value.lower() in (name.lower(), member.value.lower()):
                return member
        allowed = [m.value for m in cls]
        raise ValueError(f"{value!r} is not a {cls.__name__}: use one of {allowed}.")

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Enum):
            other = other.value
        return self.value.lower() == str(other).lower()

    def __hash__(self) -> int:
        return hash(self.value.lower())


class TrainerStatus(LightningEnum):
    """How the last call went: created, running, finished or interrupted by an exception."""

    INITIALIZING = "initializing"
    RUNNING = "running"
    FINISHED = "finished"
    INTERRUPTED = "interrupted"

    @property
    def stopped(self) -> bool:
        return self in (TrainerStatus.FINISHED, TrainerStatus.INTERRUPTED)


class TrainerFn(LightningEnum):
    """The user-facing entry point that runs: fit, validate, test or predict."""

    FITTING = "fit"
    VALIDATING = "validate"
    TESTING = "test"
    PREDICTING = "predict"


class RunningStage(LightningEnum):
    """The part of an entry point that runs: fit runs sanity_check, train and validate; the others one each."""

    TRAINING = "train"
    SANITY_CHECKING = "sanity_check"
    VALIDATING = "validate"
    TESTING = "test"
    PREDICTING = "predict"

    @property
    def evaluating(self) -> bool:
        return self in (RunningStage.VALIDATING, RunningStage.TESTING, RunningStage.SANITY_CHECKING)

    @property
    def dataloader_prefix(self) -> str | None:
        if self in (RunningStage.VALIDATING, RunningStage.SANITY_CHECKING):
            return "val"
        return self.value


# The stage an entry point starts in (Lightning: fit trains, with sanity check and validation inside it).
FN_STAGE = {TrainerFn.FITTING: RunningStage.TRAINING, TrainerFn.VALIDATING: RunningStage.VALIDATING,
            TrainerFn.TESTING: RunningStage.TESTING, TrainerFn.PREDICTING: RunningStage.PREDICTING}


@dataclass
class TrainerState:
    """``trainer.state``: the status, entry point and stage of the running (or last) call."""

    status: TrainerStatus = TrainerStatus.INITIALIZING
    fn: TrainerFn | None = None
    stage: RunningStage | None = None

    @property
    def finished(self) -> bool:
        return self.status == TrainerStatus.FINISHED

    @property
    def stopped(self) -> bool:
        return self.status.stopped
