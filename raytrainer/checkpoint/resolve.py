"""Finding and loading checkpoint files: "last"/"best"/a path -> a file, a file -> a checkpoint dict or module.

Kept beside the format (which is layout only) and the bridge (which captures and restores a session).
"""
from __future__ import annotations

import argparse
import inspect
import os
from typing import TYPE_CHECKING, Any

import torch

from raytrainer.checkpoint import sharded
from raytrainer.io import storage
from raytrainer.utilities import log

if TYPE_CHECKING:
    from raytrainer.module import LightningModule

CHECKPOINT_EXTENSION = ".ckpt"


def read_checkpoint(path: str, map_location: Any = None, weights_only: bool | None = True) -> dict[str, Any]:
    """Load and verify a checkpoint file; clear errors for missing, damaged and non-checkpoint files.

    ``weights_only`` goes to torch.load; None means torch's default (True). A sharded checkpoint directory is
    verified and consolidated in memory (it must fit)."""
    if sharded.is_sharded_checkpoint(str(path)):
        return sharded.consolidate(str(path), weights_only=weights_only is not False)
    ckpt = storage.load(str(path), map_location=map_location, weights_only=True if weights_only is None
                        else bool(weights_only))
    if "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a Lightning/raytrainer checkpoint: it has no 'state_dict' "
                         f"(top-level keys: {sorted(map(str, ckpt))}).")
    return ckpt


def resolve_ckpt_path(ckpt_path: str, checkpoint_callback: Any, trainer: Any) -> str | None:
    """Turn "last"/"best"/a path into a file, or None for "last" when nothing was saved yet.

    ``checkpoint_callback`` is the run's ModelCheckpoint (or None); ``trainer`` gives the logger and
    default_root_dir where "last" looks without one.
    """
    cb = checkpoint_callback
    if ckpt_path == "best":
        best = getattr(cb, "best_model_path", "") if cb is not None else ""
        if not best:
            raise ValueError('ckpt_path="best" but no best checkpoint is known: run fit with a ModelCheckpoint '
                             "first, or pass a file path.")
        return best
    if ckpt_path == "last":
        path, bad = _newest_for_last(cb, trainer)
        for file, why in bad:
            log.warning("ckpt_path=\"last\": skipping %s, which cannot be used: %s", file, why)
        if path is None:
            log.info('ckpt_path="last": no checkpoint found, starting from scratch.')
        else:
            log.info('ckpt_path="last": resuming from %s', path)
        return path
    if not storage.exists(ckpt_path):
        raise FileNotFoundError(f"ckpt_path={ckpt_path!r} does not exist. Pass an existing checkpoint file, "
                                '"last" (resume from the newest one if any) or "best".')
    return ckpt_path


def _newest_for_last(checkpoint_callback: Any, trainer: Any) -> tuple[str | None, list[tuple[str, str]]]:
    """(the file ckpt_path="last" loads or None, the (file, why) it skips)."""
    cb = checkpoint_callback
    candidates = cb.find_last_candidates(trainer) if cb is not None else last_candidates(trainer, None, False)
    return newest_checkpoint(candidates)


def checkpoint_source(path: str) -> str:
    """A checkpoint's location as events name it (``resumed_from``): absolute for a local path, a URI as given."""
    return path if "://" in path else os.path.abspath(path)


def resume_source(ckpt_path: Any, checkpoint_callback: Any, trainer: Any) -> str | None:
    """The checkpoint a fit given ``ckpt_path`` resumes from, found quietly (no log lines, no errors), or None:
    for the driver of a Ray run when rank 0 was lost before it said which file it loaded."""
    if not isinstance(ckpt_path, str):
        return None  # an in-memory snapshot (a restart), or no resume at all
    if ckpt_path == "last":
        path = _newest_for_last(checkpoint_callback, trainer)[0]
    elif ckpt_path == "best":
        path = getattr(checkpoint_callback, "best_model_path", "") or None
    else:
        path = ckpt_path
    return None if path is None else checkpoint_source(path)


def last_candidates(trainer: Any, dirpath: str | None, dirpath_given: bool,
                    extension: str = CHECKPOINT_EXTENSION) -> list[str]:
    """Checkpoints a rerun may resume from: the given dirpath, else every logger version's checkpoints."""
    dirs = []
    if dirpath_given and dirpath is not None:
        dirs.append(dirpath)
    else:
        lg = trainer.logger
        root = getattr(lg, "root_dir", None) if lg is not None else None
        if root:
            dirs += version_checkpoint_dirs(root)
        else:
            dirs.append(storage.join(trainer.default_root_dir, "checkpoints"))
        if dirpath is not None:
            dirs.append(dirpath)
    files: list[str] = []
    for d in dict.fromkeys(dirs):
        storage.remove_dead_writers_temporaries(d)  # a crashed run's half-written files, resumed into a new version
        files += [f for f in storage.listdir(d, missing_ok=True) if f.endswith(extension)]
        files += sharded.list_sharded(d, extension)
    return files


def version_checkpoint_dirs(root: str) -> list[str]:
    """The ``checkpoints`` folder of every version under a logger's root_dir: where "last" looks across versions."""
    from pyarrow import fs as pafs

    fs, path = storage.resolve(root)
    return [storage.join(root, info.base_name, "checkpoints")
            for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
            if info.type == pafs.FileType.Directory]


def newest_checkpoint(candidates: list[str]) -> tuple[str | None, list[tuple[str, str]]]:
    """The newest candidate that verifies, files and sharded directories alike, and the (path, reason) pairs skipped.

    Files are checked as ``storage.newest_valid`` does; a directory must be a complete sharded checkpoint whose
    files match its manifest (a staging directory of an interrupted save is never a candidate)."""
    dirs = [c for c in dict.fromkeys(candidates) if sharded.is_directory(c)]
    files = [c for c in dict.fromkeys(candidates) if c not in dirs]
    if not dirs:
        return storage.newest_valid(files)
    ranked = sorted(((sharded.written_at(d), d) for d in dirs), reverse=True)
    skipped: list[tuple[str, str]] = []
    file, file_skipped = storage.newest_valid(files)
    skipped += file_skipped
    file_time = sharded.written_at(file) if file is not None else -1.0
    for when, d in ranked:
        if file is not None and file_time >= when:
            break
        try:
            sharded.verify_sharded(d)
        except (OSError, ValueError) as exc:
            skipped.append((d, str(exc)))
            continue
        return d, skipped
    return file, skipped


def checkpoint_step(path: str) -> int | None:
    """The ``global_step`` a checkpoint file or sharded directory holds, read from the checkpoint itself (a local
    file is memory-mapped, so its tensors are not read); None when it records none."""
    from pyarrow import fs as pafs

    if sharded.is_directory(path):
        step = sharded.read_meta(path).get("global_step")
    else:
        fs, local = storage.resolve(path)
        if isinstance(fs, pafs.LocalFileSystem):
            step = torch.load(local, map_location="cpu", weights_only=True, mmap=True).get("global_step")
        else:
            step = storage.load(path, map_location="cpu").get("global_step")
    return int(step) if step is not None else None


def load_state_dict_checked(module: torch.nn.Module, state_dict: dict[str, Any], path: str, strict: bool) -> None:
    """module.load_state_dict with the checkpoint's name in the error; warns about mismatches if not strict."""
    try:
        result = module.load_state_dict(state_dict, strict=strict)
    except RuntimeError as exc:
        exc.add_note(f"while loading the state_dict of {path} into {type(module).__name__}; pass strict=False to "
                     "load the matching keys only.")
        raise
    if not strict and (result.missing_keys or result.unexpected_keys):
        log.warning("%s loaded with strict=False: missing keys %s, unexpected keys %s", path,
                    result.missing_keys, result.unexpected_keys)

def read_hparams_file(path: Any) -> dict[str, Any]:
    """Hyper-parameters from a ``.yaml``/``.yml`` file (as CSVLogger's hparams.yaml) or a ``key,value`` ``.csv``."""
    import csv
    import io

    import yaml

    path = str(path)
    suffix = path.rsplit(".", 1)[-1].lower()
    if suffix not in ("yaml", "yml", "csv"):
        raise ValueError(f"hparams_file={path!r}: use a .yaml, .yml or .csv file.")
    if not storage.exists(path):
        raise FileNotFoundError(f"hparams_file={path!r} does not exist.")
    text = storage.read_verified(path).decode("utf-8")
    if suffix == "csv":
        rows = list(csv.DictReader(io.StringIO(text)))
        if rows and set(rows[0]) != {"key", "value"}:
            raise ValueError(f"hparams_file={path!r}: a .csv needs the columns key,value; got {sorted(rows[0])}.")
        return {row["key"]: _csv_value(row["value"]) for row in rows}
    values = yaml.safe_load(text) or {}
    if not isinstance(values, dict):
        raise ValueError(f"hparams_file={path!r} holds a {type(values).__name__}, not a mapping of names to values.")
    return values


def _csv_value(text: str) -> Any:
    """A csv cell as the Python value it spells (number, bool, None, list...), else the string itself."""
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def init_kwargs_from_checkpoint(cls: type, ckpt: dict[str, Any], path: str,
                                overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The keyword arguments that rebuild ``cls`` from a checkpoint's hyper-parameters (plus overrides), read under
    ``cls.CHECKPOINT_HYPER_PARAMS_KEY/NAME/TYPE`` (a module's or a datamodule's keys)."""
    values_key = getattr(cls, "CHECKPOINT_HYPER_PARAMS_KEY", "hyper_parameters")
    name_key = getattr(cls, "CHECKPOINT_HYPER_PARAMS_NAME", "hparams_name")
    type_key = getattr(cls, "CHECKPOINT_HYPER_PARAMS_TYPE", "hparams_type")
    hparams = dict(ckpt.get(values_key) or {})
    sig = inspect.signature(cls.__init__)
    params = {n: p for n, p in list(sig.parameters.items())[1:]
              if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    takes_kwargs = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    name = ckpt.get(name_key)
    if name and name != "kwargs" and name in params:
        # save_hyperparameters(config) recorded one dict/Namespace argument: pass it back whole
        value: Any = argparse.Namespace(**hparams) if ckpt.get(type_key) == "Namespace" else hparams
        kwargs = {name: value}
    else:
        kwargs = hparams
    kwargs.update(overrides or {})
    if not takes_kwargs:
        unknown = [k for k in kwargs if k not in params]
        if unknown:
            raise TypeError(f"{path}: hyper_parameters {unknown} are not arguments of {cls.__name__}.__init__"
                            f"{sig}. Is this checkpoint from a different model class? Load it into the class that "
                            "wrote it, or load only the weights: model.load_state_dict(torch.load(path)"
                            "['state_dict']).")
    missing = [n for n, p in params.items() if p.default is p.empty and n not in kwargs]
    if missing:
        raise TypeError(f"{path}: {cls.__name__}.__init__ needs {missing}, which the checkpoint's hyper_parameters "
                        f"({sorted(hparams)}) do not have. Pass them: {cls.__name__}.load_from_checkpoint(path, "
                        + ", ".join(f"{m}=..." for m in missing) + ").")
    return kwargs

def load_module(cls: type[LightningModule], path: str, map_location: Any = None, strict: bool | None = None,
                weights_only: bool | None = True, overrides: dict[str, Any] | None = None,
                hparams_file: Any = None) -> LightningModule:
    """Rebuild ``cls`` from a checkpoint's hyper_parameters (``hparams_file`` replaces them, overrides win) and load
    its state_dict.

    Tensors load onto ``map_location`` (default: CPU). ``weights_only=False`` allows pickled Python
    objects inside the file: use it only for files you trust. ``strict=None`` follows the module's
    ``strict_loading`` (True unless the module sets it False).
    """
    path = str(path)
    ckpt = _read_with_hparams(cls, path, map_location, weights_only, hparams_file)
    kwargs = init_kwargs_from_checkpoint(cls, ckpt, path, overrides)
    model = _construct(cls, kwargs, path)
    if model.__dict__.get("_strict_loading") is not None and strict is not None and strict != model.strict_loading:
        raise ValueError(f"load_from_checkpoint(..., strict={strict!r}) conflicts with {cls.__name__}.strict_loading="
                         f"{model.strict_loading!r}; set the same value for both, or leave strict unset.")
    strict = model.strict_loading if strict is None else strict
    if _user_defines(model, "configure_model"):  # layers it creates must exist before the weights load (Lightning)
        model.configure_model()
    model.on_load_checkpoint(ckpt)
    load_state_dict_checked(model, ckpt["state_dict"], path, strict)
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    return model


def load_datamodule(cls: type, path: str, map_location: Any = None, weights_only: bool | None = True,
                    overrides: dict[str, Any] | None = None, hparams_file: Any = None) -> Any:
    """Rebuild a LightningDataModule class from a checkpoint's ``datamodule_hyper_parameters`` (``hparams_file``
    replaces them, overrides win) and load the datamodule state the checkpoint holds under its class's name."""
    path = str(path)
    ckpt = _read_with_hparams(cls, path, map_location, weights_only, hparams_file)
    datamodule = _construct(cls, init_kwargs_from_checkpoint(cls, ckpt, path, overrides), path)
    if cls.__qualname__ in ckpt:
        datamodule.load_state_dict(ckpt[cls.__qualname__])
    return datamodule


def _read_with_hparams(cls: type, path: str, map_location: Any, weights_only: bool | None,
                       hparams_file: Any) -> dict[str, Any]:
    """The checkpoint at ``path`` (on CPU unless ``map_location``), with ``hparams_file``'s values as ``cls``'s
    hyper-parameters when given."""
    ckpt = read_checkpoint(path, map_location=map_location if map_location is not None else "cpu",
                           weights_only=weights_only)
    if hparams_file is not None:
        ckpt[getattr(cls, "CHECKPOINT_HYPER_PARAMS_KEY", "hyper_parameters")] = read_hparams_file(hparams_file)
    return ckpt


def _user_defines(obj: Any, name: str) -> bool:
    """Whether a class of the user's (not raytrainer's base class) defines ``name``."""
    owner = next((k for k in type(obj).__mro__ if name in k.__dict__), None)
    return owner is not None and not owner.__module__.startswith("raytrainer.")


def _construct(cls: type, kwargs: dict[str, Any], path: str) -> Any:
    """``cls(**kwargs)``, naming the checkpoint when the arguments do not fit."""
    try:
        return cls(**kwargs)
    except TypeError as exc:
        exc.add_note(f"while rebuilding {cls.__name__} from the hyper-parameters of {path}: {sorted(kwargs)}")
        raise
