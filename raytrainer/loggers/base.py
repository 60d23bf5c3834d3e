"""Logger interface shared by CSVLogger and any user logger."""
from __future__ import annotations

from typing import Any


class Logger:
    """What the Trainer calls on a logger; subclasses implement the writing."""

    @property
    def name(self) -> str:
        return "lightning_logs"

    @property
    def version(self) -> int | str:
        return 0

    @property
    def save_dir(self) -> str | None:
        return None

    @property
    def log_dir(self) -> str | None:
        return None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_hyperparams(self, params: dict[str, Any]) -> None: ...
    def save(self) -> None: ...
    def finalize(self, status: str) -> None: ...

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        """Called on rank 0 after ModelCheckpoint saved, so loggers can upload checkpoints (log_model)."""

    def state_dict(self) -> dict[str, Any]:
        """What a rank's logger hands back to the driver's copy after a run (e.g. the version it wrote)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take over what ``state_dict`` returned on the rank that wrote the logs."""
