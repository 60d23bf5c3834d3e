"""Helpers the run-tracking loggers (MLflow, W&B) share: metric prefixes, flat parameters, and the checkpoints
a ModelCheckpoint holds that were not uploaded yet."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from argparse import Namespace
from collections.abc import Iterator, Mapping
from typing import Any

JOIN_CHAR = "-"  # between a logger's prefix and a metric name, as Lightning joins them


def add_prefix(metrics: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """``{"loss": v}`` -> ``{"<prefix>-loss": v}``; unchanged without a prefix."""
    if not prefix:
        return dict(metrics)
    return {f"{prefix}{JOIN_CHAR}{k}": v for k, v in metrics.items()}


def already_logged(floors: dict[str, tuple[int, int]], key: str, step: int) -> bool:
    """After a restart: is this point one the run got before the failure? ``floors`` maps a metric to the last
    step it reached and how many points it holds there; points before that step are, and at that step as many as
    it already holds (e.g. ``epoch`` is logged several times per step). Consumes those repeats."""
    floor = floors.get(key)
    if floor is None:
        return False
    last, repeats = floor
    if step < last:
        return True
    if step == last and repeats > 0:
        floors[key] = (last, repeats - 1)
        return True
    return False


def as_dict(params: Any) -> dict[str, Any]:
    """Hyper-parameters as a plain dict (a Namespace or any mapping); a clear error for anything else."""
    if params is None:
        return {}
    if isinstance(params, Namespace):
        return vars(params).copy()
    if isinstance(params, Mapping):
        return dict(params)
    raise TypeError(f"log_hyperparams expects a dict or an argparse.Namespace, got {type(params).__name__}")


def flatten(params: Mapping[str, Any], delimiter: str = "/", parent: str = "") -> dict[str, Any]:
    """Nested dicts (and Namespaces) become ``outer/inner`` keys, as Lightning flattens them for flat stores."""
    out: dict[str, Any] = {}
    for k, v in params.items():
        key = f"{parent}{delimiter}{k}" if parent else str(k)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            v = dataclasses.asdict(v)
        elif isinstance(v, Namespace):
            v = vars(v)
        if isinstance(v, Mapping):
            out.update(flatten(v, delimiter, key))
        else:
            out[key] = v
    return out


def _mtime(path: str) -> float | None:
    """Modification time of a local file or a storage URI; None when it is not (yet) a file."""
    if "://" not in path or path.startswith("file://"):
        local = path[len("file://"):] if path.startswith("file://") else path
        return os.path.getmtime(local) if os.path.isfile(local) else None
    from pyarrow import fs as pafs

    from raytrainer.io import storage

    fs, p = storage.resolve(path)
    info = fs.get_file_info(p)
    if info.type != pafs.FileType.File:
        return None
    return info.mtime.timestamp() if info.mtime is not None else 0.0


def new_checkpoints(checkpoint_callback: Any, uploaded: dict[str, float]) -> list[tuple[float, str, Any]]:
    """(mtime, path, score) of the callback's last, best and top-k files that are new or changed since
    ``uploaded`` (path -> mtime at upload), oldest first. Waits for the callback's background writes first."""
    wait = getattr(checkpoint_callback, "wait_for_writes", None)
    if wait is not None:
        wait()  # asynchronous saves: the files must be complete before they are read
    scored: dict[str, Any] = {}
    last = getattr(checkpoint_callback, "last_model_path", "")
    if last:
        scored[last] = getattr(checkpoint_callback, "current_score", None)
    best = getattr(checkpoint_callback, "best_model_path", "")
    if best:
        scored[best] = getattr(checkpoint_callback, "best_model_score", None)
    for path, score in getattr(checkpoint_callback, "best_k_models", {}).items():
        scored[path] = score
    found = []
    for path, score in scored.items():
        mtime = _mtime(path)
        if mtime is not None and (path not in uploaded or uploaded[path] < mtime):
            found.append((mtime, path, score))
    return sorted(found, key=lambda t: (t[0], t[1]))


def checkpoint_metadata(checkpoint_callback: Any, path: str, score: Any) -> dict[str, Any]:
    """What is stored beside an uploaded checkpoint: its score, file name and the callback's settings."""
    if hasattr(score, "item"):
        score = score.item()
    settings = {k: getattr(checkpoint_callback, k) for k in
                ("monitor", "mode", "save_last", "save_top_k", "save_weights_only", "_every_n_train_steps",
                 "_every_n_val_epochs") if hasattr(checkpoint_callback, k)}
    return {"score": score, "original_filename": os.path.basename(path),
            type(checkpoint_callback).__name__: settings}


@contextlib.contextmanager
def local_file(path: str) -> Iterator[str]:
    """A local path holding the file at ``path`` (a copy in a temporary folder when it is a storage URI)."""
    if "://" not in path or path.startswith("file://"):
        yield path[len("file://"):] if path.startswith("file://") else path
        return
    from raytrainer.io import storage

    fs, p = storage.resolve(path)
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, os.path.basename(p))
        with fs.open_input_stream(p) as src, open(local, "wb") as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)
        yield local
