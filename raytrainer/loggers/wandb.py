"""WandbLogger: metrics (against ``trainer/global_step``), config and (optionally) checkpoints in a Weights & Biases
run, with Lightning's arguments; ``offline=True`` (or ``WANDB_MODE=offline``) writes the run to local files only.

On Ray the driver fixes the run id before the logger travels to the ranks, so rank 0 (and any rank 0 that replaces
it after a failure) logs to that one run, and the driver's logger names it afterwards.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import struct
import time
from collections.abc import Iterator
from typing import Any, Literal

from raytrainer.loggers import _run_helpers as helpers
from raytrainer.loggers.base import Logger
from raytrainer.utilities.exceptions import MisconfigurationException

log = logging.getLogger(__name__)

STEP_KEY = "trainer/global_step"  # the x-axis every metric is plotted against, as Lightning defines it
_OFFLINE_MODES = ("offline", "dryrun")


class WandbLogger(Logger):
    """Logs to one W&B run, started on first use (``wandb.init`` with the arguments given here and ``**kwargs``)."""

    def __init__(self, name: str | None = None, save_dir: str | os.PathLike = ".", version: str | None = None,
                 offline: bool = False, dir: str | os.PathLike | None = None, id: str | None = None,
                 anonymous: bool | None = None, project: str | None = None,
                 log_model: Literal["all"] | bool = False, experiment: Any = None, prefix: str = "",
                 checkpoint_name: str | None = None, **kwargs: Any) -> None:
        try:
            import wandb  # noqa: F401
        except ImportError as exc:
            raise ModuleNotFoundError("WandbLogger needs the wandb package: pip install wandb") from exc
        if offline and log_model:
            raise MisconfigurationException(
                f"WandbLogger(log_model={log_model!r}, offline=True): checkpoints cannot be uploaded offline. "
                "Set offline=False to upload them, or log_model=False.")
        if log_model not in (True, False, "all"):
            raise ValueError(f"WandbLogger(log_model={log_model!r}): use False, True (upload checkpoints at the "
                             "end) or 'all' (upload each checkpoint as it is saved)")
        folder = save_dir if save_dir is not None else dir
        # absolute, so ranks on Ray (whose working directory may differ) write under the same folder
        folder = os.path.abspath(os.fspath(folder)) if folder is not None else None
        init: dict[str, Any] = {
            "name": name, "project": project or os.environ.get("WANDB_PROJECT", "lightning_logs"), "dir": folder,
            "id": version or id, "resume": "allow",
        }
        if anonymous:
            init["anonymous"] = "allow"
        init.update(kwargs)
        mode = "offline" if offline else init.get("mode") or os.environ.get("WANDB_MODE")
        if mode:
            # fixed here, on the driver: Ray ranks do not see environment variables set after Ray started
            init["mode"] = "offline" if mode in _OFFLINE_MODES else mode
        self._wandb_init = init
        self._offline = init.get("mode") == "offline"
        self._log_model = log_model
        self._prefix = prefix
        self._checkpoint_name = checkpoint_name
        self._experiment = experiment
        self._id: str | None = init["id"]
        self._uploaded: dict[str, float] = {}
        self._checkpoint_callbacks: dict[int, Any] = {}  # log_model=True: callbacks whose files finalize uploads
        self._floors: dict[str, tuple[int, int]] = {}  # after a restart: metric -> (last step, points there)
        self._shipped = False  # True in a copy unpickled on a rank: it finishes its run at finalize

    # ------------------------------------------------------------------ the run
    @property
    def experiment(self) -> Any:
        """The ``wandb`` Run; the first call starts it (or resumes the run with this logger's id)."""
        if self._experiment is None:
            import wandb

            if wandb.run is not None and wandb.run.id == (self._id or wandb.run.id):
                log.warning("WandbLogger: a wandb run is already in progress in this process; logging to it "
                            "(call wandb.finish() first for a new run)")
                self._experiment = wandb.run
            else:
                if self._shipped:
                    # a Ray rank inherits the driver's WANDB_SERVICE: its runs would live in the driver's wandb
                    # service, and a rank killed mid-run would leave its run id "in use" there, refusing the
                    # restarted rank 0. The rank starts its own service, which dies with it.
                    os.environ.pop("WANDB_SERVICE", None)
                self._experiment = wandb.init(**self._wandb_init)
                if hasattr(self._experiment, "define_metric"):
                    if self._wandb_init.get("sync_tensorboard"):
                        self._experiment.define_metric("*", step_metric="global_step")
                    else:
                        self._experiment.define_metric(STEP_KEY)
                        self._experiment.define_metric("*", step_metric=STEP_KEY, step_sync=True)
            self._id = self._experiment.id
        return self._experiment

    @property
    def name(self) -> str | None:
        """The project name (the run's display name is ``experiment.name``), as Lightning's WandbLogger."""
        return self._wandb_init.get("project")

    @property
    def version(self) -> str | None:
        """The run id: the running run's, else the one given or fixed earlier (no run is started here)."""
        return self._experiment.id if self._experiment is not None else self._id

    @property
    def save_dir(self) -> str | None:
        return self._wandb_init.get("dir")

    @property
    def offline(self) -> bool:
        return self._offline

    # ------------------------------------------------------------------ logging
    def log_hyperparams(self, params: Any) -> None:
        """Into the run's config (nested dicts stay nested; objects become their names or text)."""
        self.experiment.config.update(_json_safe(helpers.as_dict(params)), allow_val_change=True)

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """One history row per call, with ``trainer/global_step``; after a restart, rows the run already holds
        from before the failure are not written twice."""
        metrics = helpers.add_prefix(metrics, self._prefix)
        if step is None or self._wandb_init.get("sync_tensorboard"):
            self.experiment.log(metrics)
            return
        metrics = {k: v for k, v in metrics.items() if not helpers.already_logged(self._floors, k, int(step))}
        if metrics:
            self.experiment.log({**metrics, STEP_KEY: step})

    def resume_from_step(self, step: int) -> None:
        """Continue this run after a restart at ``step``. Offline, the rows written before the failure are read
        from this run's earlier offline folders under ``save_dir`` (on this node); online, the resumed run's
        summary gives the last step. Those rows are not logged again."""
        if self._id is None:
            return
        floors: dict[str, tuple[int, int]] = {}
        if self._offline:
            counts: dict[str, list[int]] = {}
            for row in offline_history(self.save_dir or ".", self._id):
                if STEP_KEY in row:
                    for key in row:
                        if not key.startswith("_") and key != STEP_KEY:
                            counts.setdefault(key, []).append(int(row[STEP_KEY]))
            floors = {k: (max(v), v.count(max(v))) for k, v in counts.items()}
            # wandb names offline folders by the second: a segment started within the same second as the previous
            # one would share its folder and lose its rows
            time.sleep(1.0)
        else:
            summary = self.experiment.summary
            last = summary.get(STEP_KEY)
            if last is not None:
                floors = {k: (int(last), 1) for k in summary.keys() if not k.startswith("_") and k != STEP_KEY}
        self._floors = floors
        log.debug("wandb run %s resumes at step %d; already logged: %s", self._id, step, floors)

    def finalize(self, status: str) -> None:
        """Upload the checkpoints left for the end (log_model=True, on success, as Lightning); a copy that ran on
        a Ray rank also finishes its run there, so the run's files are complete before the process is reused."""
        if self._experiment is None:
            return
        if status == "success":
            for cb in self._checkpoint_callbacks.values():
                self._upload_checkpoints(cb)
        if self._shipped:
            self._experiment.finish(exit_code=0 if status == "success" else 1)
            self._experiment = None

    # ------------------------------------------------------------------ checkpoints
    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        """log_model='all' (or True with save_top_k=-1): upload now; True: remember the callback for finalize."""
        if self._log_model == "all" or (self._log_model is True and checkpoint_callback.save_top_k == -1):
            self._upload_checkpoints(checkpoint_callback)
        elif self._log_model is True:
            self._checkpoint_callbacks[id(checkpoint_callback)] = checkpoint_callback

    def _upload_checkpoints(self, checkpoint_callback: Any) -> None:
        """Each new checkpoint as a version of the ``model-<run id>`` artifact (file ``model.ckpt``), aliased
        ``latest`` and, for the best model, ``best``."""
        import wandb

        for mtime, path, score in helpers.new_checkpoints(checkpoint_callback, self._uploaded):
            if not self._checkpoint_name:
                self._checkpoint_name = f"model-{self.experiment.id}"
            meta = helpers.checkpoint_metadata(checkpoint_callback, path, score)
            artifact = wandb.Artifact(name=self._checkpoint_name, type="model", metadata=meta)
            with helpers.local_file(path) as local:
                artifact.add_file(local, name="model.ckpt", policy="mutable")
                aliases = ["latest", "best"] if path == getattr(checkpoint_callback, "best_model_path", "") \
                    else ["latest"]
                self.experiment.log_artifact(artifact, aliases=aliases)
            self._uploaded[path] = mtime

    # ------------------------------------------------------------------ across processes
    def state_dict(self) -> dict[str, Any]:
        """The run id rank 0 logged to and the checkpoints it uploaded, for the driver's copy."""
        return {"id": self.version, "uploaded": dict(self._uploaded), "checkpoint_name": self._checkpoint_name}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._id = state.get("id") or self._id
        self._wandb_init["id"] = self._id
        self._uploaded.update(state.get("uploaded", {}))
        self._checkpoint_name = state.get("checkpoint_name") or self._checkpoint_name

    def __getstate__(self) -> dict[str, Any]:
        # fix the run id before copies go to ranks: each copy resumes that run (resume="allow") instead of
        # starting its own
        if self._id is None:
            from wandb.sdk.lib.runid import generate_id

            self._id = generate_id()
        state = self.__dict__.copy()
        state["_wandb_init"] = {**self._wandb_init, "id": self._id}
        if self._experiment is not None:
            state["_wandb_init"]["name"] = self._experiment.name
        state["_experiment"] = None  # a live run cannot travel; the copy resumes it by id
        state["_checkpoint_callbacks"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._shipped = True


# ---------------------------------------------------------------------- offline run files
_HEADER = 7            # ":W&B", a 2-byte magic and a version byte
_BLOCK = 32768         # records never straddle a block's 7-byte header
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_records(path: str) -> Iterator[Any]:
    """The protobuf records (``wandb_internal_pb2.Record``) of a ``.wandb`` file an offline run wrote."""
    import zlib

    from wandb.proto import wandb_internal_pb2 as pb

    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a wandb run file (no ':W&B' header)")
    pos, parts = _HEADER, b""
    while pos + 7 <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < 7:
            pos += room  # block padding
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if crc == length == kind == 0:
            break  # zero padding at the end of a file still being written
        chunk = data[pos + 7:pos + 7 + length]
        if len(chunk) < length or zlib.crc32(bytes([kind]) + chunk) & 0xFFFFFFFF != crc:
            break  # a record cut short by a crash: everything before it is good
        pos += 7 + length
        parts = chunk if kind in (_FULL, _FIRST) else parts + chunk
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(parts)
            yield record


def _item_key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def offline_run_files(save_dir: str, run_id: str) -> list[str]:
    """The ``.wandb`` files of every offline segment of run ``run_id`` under ``save_dir``, oldest first."""
    return sorted(glob.glob(os.path.join(save_dir, "wandb", f"offline-run-*-{run_id}", f"run-{run_id}.wandb")))


def offline_history(save_dir: str, run_id: str) -> list[dict[str, Any]]:
    """Every history row (``log`` call) of an offline run, across its restarted segments, as dicts."""
    rows = []
    for path in offline_run_files(save_dir, run_id):
        for record in read_records(path):
            if record.WhichOneof("record_type") == "history":
                rows.append({_item_key(i): json.loads(i.value_json) for i in record.history.item})
    return rows


def offline_config(save_dir: str, run_id: str) -> dict[str, Any]:
    """The config of an offline run (what ``wandb.init(config=...)`` and ``config.update`` recorded)."""
    config: dict[str, Any] = {}
    for path in offline_run_files(save_dir, run_id):
        for record in read_records(path):
            kind = record.WhichOneof("record_type")
            updates = record.run.config.update if kind == "run" else record.config.update if kind == "config" \
                else []
            for item in updates:
                config[_item_key(item)] = json.loads(item.value_json)
    return config


def _json_safe(v: Any) -> Any:
    """Config values wandb can store: callables by name, other objects as text."""
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if callable(v):
        return getattr(v, "__name__", None) or getattr(type(v), "__name__", str(v))
    try:
        json.dumps(v)
        return v
    except (TypeError, ValueError):
        return str(v)
