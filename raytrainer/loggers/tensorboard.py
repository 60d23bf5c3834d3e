"""TensorBoardLogger: event files in ``<save_dir>/<name>/version_N[/<sub_dir>]`` plus ``hparams.yaml``, as
Lightning writes them; the default logger when tensorboard (or tensorboardX) is installed."""
from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import tempfile
import time
from argparse import Namespace
from collections.abc import Mapping
from typing import Any

import torch

from raytrainer.loggers.base import Logger
from raytrainer.loggers.csv import _is_uri, _join, _yaml_safe, add_prefix, claim_version

log = logging.getLogger("raytrainer")

_EVENTS_PREFIX = "events.out.tfevents."
_UPLOAD_EVERY_S = 30.0  # a remote save_dir receives the staged event files at most this often (and at the end)


def tensorboard_available() -> bool:
    """Whether a TensorBoard writer can be imported (``tensorboard`` or ``tensorboardX``), Lightning's test."""
    return any(importlib.util.find_spec(m) is not None for m in ("tensorboard", "tensorboardX"))


def _writer_api() -> tuple[type, Any]:
    """(SummaryWriter, hparams summary function): torch's on tensorboard, else tensorboardX's."""
    if importlib.util.find_spec("tensorboard") is not None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams
        return SummaryWriter, hparams
    from tensorboardX import SummaryWriter  # type: ignore[no-redef]
    from tensorboardX.summary import hparams  # type: ignore[no-redef]
    return SummaryWriter, hparams


def _global_rank() -> int:
    """This process's rank in the running process group (0 when there is none)."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class _NoExperiment:
    """What ``experiment`` is on ranks other than 0: every call does nothing, so only rank 0 writes files."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


class TensorBoardLogger(Logger):
    """Lightning's TensorBoardLogger: a SummaryWriter on rank 0 in ``log_dir``; hyper-parameters go to the
    HParams tab and ``hparams.yaml``. A URI ``save_dir`` (s3://, gs://, ...) is written through raytrainer's
    storage layer: events are staged in a local folder and copied there on flush and at the end."""

    LOGGER_JOIN_CHAR = "-"
    NAME_HPARAMS_FILE = "hparams.yaml"
    CLAIMS_VERSIONS = True  # resolving the version creates its directory exclusively (see claim_version)

    def __init__(self, save_dir: str | os.PathLike[str], name: str | None = "lightning_logs",
                 version: int | str | None = None, log_graph: bool = False, default_hp_metric: bool = True,
                 prefix: str = "", sub_dir: str | os.PathLike[str] | None = None, **kwargs: Any) -> None:
        """Arguments as Lightning's; ``kwargs`` go to the SummaryWriter (``max_queue``, ``flush_secs``, ...)."""
        if not tensorboard_available():
            raise ModuleNotFoundError("TensorBoardLogger needs `tensorboard` (or `tensorboardX`): pip install "
                                      "tensorboard, or use CSVLogger.")
        if "log_dir" in kwargs:
            raise TypeError("TensorBoardLogger(log_dir=...) is not an argument: the folder is "
                            "<save_dir>/<name>/<version>[/<sub_dir>]; pass save_dir, name, version or sub_dir.")
        self._save_dir = os.fspath(save_dir)
        if _is_uri(self._save_dir):
            _check_uri(self._save_dir)
        self._name = name or ""
        self._version = version
        self._sub_dir = None if sub_dir is None else os.fspath(sub_dir)
        self._log_graph = log_graph
        self._default_hp_metric = default_hp_metric
        self._prefix = prefix
        self._kwargs = kwargs
        self.hparams: dict[str, Any] = {}
        self._experiment: Any = None
        self._staging: str | None = None        # local folder the writer uses when log_dir is a URI
        self._uploaded_at = 0.0
        self._hparams_file_done = False
        self._purge_step: int | None = None     # set when a restarted run continues this version
        self._resumed = False

    # ------------------------------------------------------------------ where
    @property
    def name(self) -> str:
        return self._name

    @property
    def save_dir(self) -> str:
        return self._save_dir

    @property
    def sub_dir(self) -> str | None:
        return self._sub_dir

    @property
    def root_dir(self) -> str:
        """``<save_dir>/<name>``: the folder holding every version."""
        return _join(self._save_dir, self._name) if self._name else self._save_dir

    @property
    def version(self) -> int | str:
        if self._version is None:
            self._version = claim_version(self.root_dir)
        return self._version

    @property
    def log_dir(self) -> str:
        """``<root_dir>/version_N`` (or the string version), plus ``sub_dir`` when given."""
        v = self.version
        path = _join(self.root_dir, v if isinstance(v, str) else f"version_{v}")
        if self._sub_dir:
            path = _join(path, self._sub_dir)
        if not _is_uri(path):
            path = os.path.expanduser(os.path.expandvars(path))
        return path

    # ------------------------------------------------------------------ the writer
    @property
    def experiment(self) -> Any:
        """The SummaryWriter (rank 0); on other ranks an object whose calls do nothing, as in Lightning."""
        if self._experiment is not None:
            return self._experiment
        if _global_rank() != 0:
            return _NoExperiment()
        writer_cls, _ = _writer_api()
        target = self.log_dir
        if _is_uri(target):
            if self._staging is None:
                self._staging = tempfile.mkdtemp(prefix="raytrainer-tb-")
            local = self._staging
        else:
            os.makedirs(target, exist_ok=True)
            local = target
        kwargs = dict(self._kwargs)
        if self._purge_step is not None:
            kwargs.setdefault("purge_step", self._purge_step)
        self._experiment = writer_cls(log_dir=local, **kwargs)
        return self._experiment

    # ------------------------------------------------------------------ what the Trainer calls
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """One scalar per metric (a dict value becomes add_scalars), then a flush, as Lightning's save() does."""
        for k, v in add_prefix(dict(metrics), self._prefix, self.LOGGER_JOIN_CHAR).items():
            if isinstance(v, torch.Tensor):
                v = v.item()
            if isinstance(v, Mapping):
                self.experiment.add_scalars(k, dict(v), step)
                continue
            try:
                self.experiment.add_scalar(k, v, step)
            except Exception as exc:
                raise ValueError(f"TensorBoardLogger cannot log {k}={v!r} ({type(v).__name__}): log a number, a "
                                 "one-element tensor or a dict of numbers.") from exc
        self.save()

    def log_hyperparams(self, params: Mapping[str, Any] | Namespace, metrics: Any = None,
                        step: int | None = None) -> None:
        """Keep ``params`` for hparams.yaml and write them to the HParams tab with ``metrics`` (by default
        ``hp_metric=-1``, as Lightning). A restarted run that continues this version does not write them again."""
        params = vars(params).copy() if isinstance(params, Namespace) else dict(params or {})
        self.hparams.update(params)
        if _global_rank() != 0 or self._resumed:
            return
        if metrics is None:
            metrics = {"hp_metric": -1} if self._default_hp_metric else None
        elif not isinstance(metrics, Mapping):
            metrics = {"hp_metric": metrics}
        if not metrics:
            return
        self.log_metrics(metrics, step)
        _, hparams_summary = _writer_api()
        summaries = hparams_summary(_sanitize(_flatten(params)), dict(metrics))
        writer = self.experiment._get_file_writer()
        for summary in summaries:
            writer.add_summary(summary, step)

    def log_graph(self, model: torch.nn.Module, input_array: Any = None) -> None:
        """With ``log_graph=True``: trace ``model`` on ``input_array`` (default: ``model.example_input_array``)."""
        if not self._log_graph or self._resumed or _global_rank() != 0:
            return
        if input_array is None:
            input_array = getattr(model, "example_input_array", None)
        if input_array is None:
            log.warning("TensorBoardLogger(log_graph=True) could not log the graph: set model.example_input_array "
                        "(or pass input_array).")
        elif not isinstance(input_array, (torch.Tensor, tuple)):
            log.warning("TensorBoardLogger(log_graph=True) could not log the graph: example_input_array is a %s; "
                        "make it a tensor or a tuple of forward()'s positional arguments.", type(input_array).__name__)
        else:
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            inputs = input_array.to(device) if isinstance(input_array, torch.Tensor) else \
                tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in input_array)
            self.experiment.add_graph(model, inputs)

    def save(self) -> None:
        """Flush the events; write hparams.yaml once the log folder exists and it is not there yet."""
        if self._experiment is None:
            return
        self._experiment.flush()
        self._write_hparams_file()
        if self._staging is not None and time.monotonic() - self._uploaded_at >= _UPLOAD_EVERY_S:
            self._upload()

    def finalize(self, status: str) -> None:
        """Flush and close the writer ("success" also writes hparams.yaml, as Lightning); a later call opens a
        new event file in the same folder."""
        if self._experiment is not None:
            self._experiment.flush()
            self._experiment.close()
            if status == "success":
                self._write_hparams_file()
            if self._staging is not None:  # everything staged is on the URI now: a new writer stages anew
                self._upload()
                shutil.rmtree(self._staging, ignore_errors=True)
                self._staging = None
            self._experiment = None

    def resume_from_step(self, step: int) -> None:
        """Continue this version after a restart from ``step``: events at or after ``step`` written before the
        failure are purged by TensorBoard's readers (the new event file starts with that purge point)."""
        if self._experiment is not None:
            self.finalize("failed")
        self._purge_step = int(step)
        self._resumed = True
        self._after_newest_event_file()

    # ------------------------------------------------------------------ state the driver's copy takes over
    def state_dict(self) -> dict[str, Any]:
        """The version rank 0 wrote and the hyper-parameters it logged."""
        return {"version": self._version, "hparams": dict(self.hparams)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._version = state.get("version", self._version)
        self.hparams = dict(state.get("hparams", self.hparams))

    def __getstate__(self) -> dict[str, Any]:
        _ = self.version  # resolved before shipping, so every process writes the same folder
        state = self.__dict__.copy()
        state["_experiment"] = None  # a writer (threads, open files) stays in the process that opened it
        state["_staging"] = None
        return state

    # ------------------------------------------------------------------ helpers
    def _write_hparams_file(self) -> None:
        if self._hparams_file_done:
            return
        import yaml

        from raytrainer.io import storage

        path = _join(self.log_dir, self.NAME_HPARAMS_FILE)
        if not storage.exists(path):
            text = yaml.safe_dump(_yaml_safe(dict(self.hparams))) if self.hparams else "{}\n"  # sorted, as Lightning
            storage.makedirs(self.log_dir)
            storage.write_bytes_atomic(path, text.encode(), manifest=False)
        self._hparams_file_done = True

    def _upload(self) -> None:
        """Copy the staged event files (and add_scalars' sub-folders) to the URI log_dir."""
        from raytrainer.io import storage

        self._uploaded_at = time.monotonic()
        for folder, _, files in os.walk(self._staging):
            rel = os.path.relpath(folder, self._staging)
            target = self.log_dir if rel == "." else _join(self.log_dir, rel.replace(os.sep, "/"))
            for name in files:
                with open(os.path.join(folder, name), "rb") as f:
                    data = f.read()
                storage.write_bytes_atomic(_join(target, name), data, manifest=False)

    def _after_newest_event_file(self) -> None:
        """Wait (at most ~1 s) until the clock is past the newest event file's timestamp, so the file this run
        opens sorts after it and TensorBoard applies the purge point to the older events."""
        from raytrainer.io import storage

        try:
            names = [os.path.basename(p) for p in storage.listdir(self.log_dir, missing_ok=True)]
        except OSError:
            return
        stamps = [int(m.group(1)) for n in names if (m := re.match(re.escape(_EVENTS_PREFIX) + r"(\d+)", n))]
        if stamps:
            wait = max(stamps) + 1 - time.time()
            if 0 < wait <= 2:
                time.sleep(wait)


def _check_uri(uri: str) -> None:
    """Refuse a save_dir URI that raytrainer's storage layer cannot write, saying which forms work."""
    from raytrainer.io import storage

    try:
        storage.resolve(uri)
    except Exception as exc:
        raise ValueError(f"TensorBoardLogger(save_dir={uri!r}): this location cannot be written ({exc}). Use a "
                         "local path, a file:// URI, or a URI raytrainer's storage writes (s3://, gs://, hdfs:// "
                         "with pyarrow's filesystems).") from exc


def _flatten(params: Mapping[str, Any], parent: str = "") -> dict[str, Any]:
    """Nested dicts and Namespaces as ``outer/inner`` keys (Lightning flattens hparams for the HParams tab)."""
    out: dict[str, Any] = {}
    for k, v in params.items():
        key = f"{parent}/{k}" if parent else str(k)
        if isinstance(v, Namespace):
            v = vars(v)
        if isinstance(v, Mapping):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def _sanitize(params: dict[str, Any]) -> dict[str, Any]:
    """Values the HParams summary accepts (numbers, strings, bools); anything else as its text."""
    out: dict[str, Any] = {}
    for k, v in params.items():
        if (isinstance(v, torch.Tensor) and v.numel() == 1) or (hasattr(v, "item") and getattr(v, "ndim", 1) == 0):
            v = v.item()  # a one-element tensor or a numpy scalar
        out[k] = v if isinstance(v, (bool, int, float, str)) else str(v)
    return out
