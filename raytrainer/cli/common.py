"""What several raytrainer commands share: the user-facing error, storage access, and reading a run.

``status`` and ``report`` both read a run directory (path or URI) into a RunSummary: its events,
metrics, world-size history, the newest checkpoint that verifies and the command that resumes it. A run
resumed into a new log version is one run: the summary follows it back through the versions it came from.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import shlex
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["RUNNING_IF_ACTIVE_WITHIN_S", "CLIError", "RunSummary", "read_metrics", "resolve_run_dir",
           "resume_command", "summarize_run"]

# A run whose newest event, metrics row or checkpoint is younger than this is guessed to be running.
RUNNING_IF_ACTIVE_WITHIN_S = 600.0
_FAILED_FINISH_WORDS = ("fail", "error", "exception", "exceeded", "crash", "abort", "gave up")


class CLIError(Exception):
    """A problem the user can fix; ``main`` prints the message and exits with ``code``."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


# ----------------------------------------------------------------------------------- run folders


def _storage() -> Any:
    from raytrainer.io import storage

    return storage


def _file_info(uri: str) -> Any:
    """pyarrow FileInfo of a path or URI; errors become CLIError with the reason."""
    storage = _storage()
    try:
        fs, path = storage.resolve(uri)
        return fs.get_file_info(path)
    except PermissionError as exc:
        raise CLIError(f"cannot read {uri}: permission denied ({exc})") from exc
    except (OSError, ValueError) as exc:
        raise CLIError(f"cannot read {uri}: {exc}") from exc


def _children(uri: str) -> dict[str, Any]:
    """Name -> FileInfo of the entries directly inside a directory (path or URI)."""
    import pyarrow.fs as pafs

    storage = _storage()
    try:
        fs, path = storage.resolve(uri)
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=False, recursive=False))
    except PermissionError as exc:
        raise CLIError(f"cannot read {uri}: permission denied ({exc})") from exc
    except (OSError, ValueError) as exc:
        raise CLIError(f"cannot list {uri}: {exc}") from exc
    return {info.base_name: info for info in infos}


_RUN_MARKERS = ("events.jsonl", "metrics.csv", "hparams.yaml", "checkpoints")
_TB_EVENTS = "events.out.tfevents."  # TensorBoardLogger's event files (the default logger)


def _newest_version(uri: str, entries: dict[str, Any]) -> str | None:
    """The ``version_N`` directory with the largest N among ``entries``, if any."""
    import pyarrow.fs as pafs

    versions = []
    for name, info in entries.items():
        if info.type == pafs.FileType.Directory and name.startswith("version_") and name[8:].isdigit():
            versions.append((int(name[8:]), name))
    if not versions:
        return None
    return _storage().join(uri, max(versions)[1])


def resolve_run_dir(path_or_uri: str) -> str:
    """The run directory meant by ``path_or_uri``: itself, or the newest ``version_N`` under it.

    Accepts a run directory (it holds events.jsonl, metrics.csv, hparams.yaml or checkpoints/),
    a ``lightning_logs`` folder, or a Trainer's ``default_root_dir``.
    """
    import pyarrow.fs as pafs

    uri = path_or_uri.rstrip("/") or "/"
    if "://" not in uri:
        uri = os.path.abspath(os.path.expanduser(uri))  # events name checkpoints by absolute path
    info = _file_info(uri)
    if info.type == pafs.FileType.NotFound:
        raise CLIError(f"{path_or_uri}: no such run directory. Give a run directory "
                       "(<default_root_dir>/lightning_logs/version_N) or the default_root_dir itself.")
    if info.type != pafs.FileType.Directory:
        raise CLIError(f"{path_or_uri} is a file, not a run directory. Give the folder that holds "
                       "events.jsonl and metrics.csv (lightning_logs/version_N) or the default_root_dir.")
    entries = _children(uri)
    if any(marker in entries for marker in _RUN_MARKERS) or any(n.startswith(_TB_EVENTS) for n in entries):
        return uri
    newest = _newest_version(uri, entries)
    if newest is None and "lightning_logs" in entries:
        logs = _storage().join(uri, "lightning_logs")
        newest = _newest_version(logs, _children(logs))
    if newest is None:
        raise CLIError(f"{path_or_uri} is not a raytrainer run directory: it has none of "
                       f"{', '.join(_RUN_MARKERS)} and no lightning_logs/version_N inside.")
    return newest


# ------------------------------------------------------------------------------------ run summary


@dataclass
class RunSummary:
    """What ``status`` prints and ``report`` draws, read from a run directory."""

    run_dir: str
    state: str                                  # finished | failed | preempted | running | interrupted | unknown
    state_detail: str
    step: int | None
    epoch: int | None
    events: list[dict[str, Any]]
    world_sizes: list[dict[str, Any]]           # {time, world_size, event}: every change, first one included
    failures: list[dict[str, Any]]
    resizes: list[dict[str, Any]]               # each with world_size_before
    preemptions: list[dict[str, Any]]
    restarts: int
    checkpoint: str | None                      # newest checkpoint that verifies
    checkpoint_step: int | None                 # the global_step the checkpoint file holds
    skipped_checkpoints: list[tuple[str, str]]  # (file, why it was not used)
    resume: list[str] | None                    # the command that resumes the run, when it is known
    metrics: list[dict[str, float]] = field(default_factory=list)
    last_activity: float | None = None          # unix time of the newest event, metrics write or checkpoint
    # the log versions the run went through, oldest first, each resumed from a checkpoint of the one before:
    # {run_dir, resumed_from, first_step, last_step, state, events (how many of RunSummary.events it holds)};
    # one entry for a run that never moved to a new log version
    versions: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The summary as plain JSON (metrics rows left out: they are in metrics.csv)."""
        out = asdict(self)
        out.pop("metrics")
        out["skipped_checkpoints"] = [{"path": p, "reason": r} for p, r in self.skipped_checkpoints]
        return out


def _read_events(run_dir: str) -> list[dict[str, Any]]:
    """The run's events oldest first; [] when it has no events log, CLIError when the log is unreadable."""
    from raytrainer.core.events import read_events

    try:
        events = read_events(run_dir, missing_ok=True)
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise CLIError(f"{_storage().join(run_dir, 'events.jsonl')} is not a valid events log "
                       f"(one JSON object per line): {exc}") from exc
    except OSError as exc:
        raise CLIError(f"cannot read the events log of {run_dir}: {exc}") from exc
    bad = [e for e in events if not isinstance(e, dict) or "event" not in e]
    if bad:
        raise CLIError(f"{_storage().join(run_dir, 'events.jsonl')} has lines that are not events: {bad[0]!r}")
    return sorted(events, key=lambda e: e.get("time") or 0.0)


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def read_metrics(run_dir: str) -> list[dict[str, float]]:
    """Rows of the run's metrics.csv with numeric cells only; without a metrics.csv, the scalars of its
    TensorBoard event files, one row per step ([] when there is neither)."""
    import pyarrow.fs as pafs

    uri = _storage().join(run_dir, "metrics.csv")
    if _file_info(uri).type != pafs.FileType.File:
        return _tensorboard_rows(run_dir)
    fs, path = _storage().resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            text = f.read().decode("utf-8", errors="replace")
    except OSError as exc:
        raise CLIError(f"cannot read {uri}: {exc}") from exc
    rows = []
    for row in csv.DictReader(io.StringIO(text)):
        values = {k: v for k, v in ((k, _number(v)) for k, v in row.items() if k) if v is not None}
        if values:
            rows.append(values)
    return rows


def _tensorboard_rows(run_dir: str) -> list[dict[str, float]]:
    """The scalars of the event files in ``run_dir`` as rows ``{"step": s, tag: value, ...}`` by step, read with
    tensorboard's own reader (which applies the purges of restarted runs); [] without event files."""
    import tempfile

    try:
        names = [n for n in _children(run_dir) if n.startswith(_TB_EVENTS)]
    except CLIError:
        return []
    if not names:
        return []
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError as exc:
        raise CLIError(f"{run_dir} holds TensorBoard event files but tensorboard is not installed "
                       "(pip install tensorboard) to read them.") from exc
    storage = _storage()
    with tempfile.TemporaryDirectory(prefix="raytrainer-report-") as tmp:
        local = run_dir
        if "://" in run_dir and not run_dir.startswith("file://"):  # a URI: read copies of the event files
            local = tmp
            for name in names:
                fs, path = storage.resolve(storage.join(run_dir, name))
                with fs.open_input_stream(path) as f, open(os.path.join(tmp, name), "wb") as out:
                    out.write(f.read())
        acc = EventAccumulator(local.removeprefix("file://"), size_guidance={"scalars": 0})
        try:
            acc.Reload()
        except Exception as exc:  # a truncated or foreign file
            raise CLIError(f"cannot read the TensorBoard event files in {run_dir}: {exc}") from exc
        by_step: dict[int, dict[str, float]] = {}
        for tag in acc.Tags().get("scalars", []):
            for event in acc.Scalars(tag):
                if math.isfinite(event.value):
                    by_step.setdefault(event.step, {"step": float(event.step)})[tag] = float(event.value)
    return [by_step[s] for s in sorted(by_step)]


def _checkpoint_candidates(run_dirs: list[str], events: list[dict[str, Any]]) -> list[str]:
    """What ckpt_path="last" chooses among for these run directories: each one's checkpoints (files, and sharded
    directories of FSDP runs), every version's under the same logger root, and every path a checkpoint or
    preemption event names."""
    from raytrainer.checkpoint import sharded
    from raytrainer.checkpoint.resolve import version_checkpoint_dirs

    storage = _storage()
    directories = [storage.join(d, "checkpoints") for d in run_dirs]
    root = _logger_root(run_dirs[-1])
    found: list[str] = []
    try:
        if root is not None:
            directories += version_checkpoint_dirs(root)
        for directory in dict.fromkeys(directories):
            found += storage.listdir(directory, missing_ok=True)
            found += sharded.list_sharded(directory, ".ckpt")
    except (OSError, NotADirectoryError) as exc:
        raise CLIError(f"cannot list the checkpoints of {run_dirs[-1]}: {exc}") from exc
    for event in events:
        if event.get("event") in ("checkpoint", "preemption") and event.get("path"):
            found.append(str(event["path"]))
    return list(dict.fromkeys(found))


def _logger_root(run_dir: str) -> str | None:
    """The logger root_dir a ``version_N`` run directory lies in (where "last" looks in every version), else None."""
    parent, _, name = run_dir.rstrip("/").rpartition("/")
    return parent if parent and name.startswith("version_") and name[8:].isdigit() else None


def _run_dir_of(checkpoint: str) -> str | None:
    """The run directory a checkpoint belongs to: the nearest folder above it with an events log, if any."""
    import pyarrow.fs as pafs

    folder = checkpoint.rstrip("/")
    for _ in range(3):  # <run>/checkpoints/<file>, or a sharded checkpoint's directory
        folder = folder.rpartition("/")[0]
        if not folder or folder.endswith(":/"):
            return None
        try:
            if _file_info(_storage().join(folder, "events.jsonl")).type == pafs.FileType.File:
                return folder
        except CLIError:
            return None
    return None


def _resumed_chain(run_dir: str, events: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """(run directory, events) of each log version the run went through, oldest first: a version whose start event
    names the checkpoint it resumed from (``resumed_from``) continues the run that wrote that checkpoint."""
    chain = [(run_dir, events)]
    while True:
        start = next((e for e in chain[0][1] if e["event"] == "start"), None)
        source = start.get("resumed_from") if start is not None else None
        earlier = _run_dir_of(str(source)) if source else None
        if earlier is None or earlier in (d for d, _ in chain):
            return chain
        try:
            chain.insert(0, (earlier, _read_events(earlier)))
        except CLIError as exc:  # an unreadable earlier log does not hide the run that is readable
            from raytrainer.utilities import log

            log.warning("not following the run back into %s: %s", earlier, exc)
            return chain


def _held_step(path: str) -> int | None:
    """The step the checkpoint at ``path`` holds, read from the file itself (an events log records when a save was
    taken, and a run killed mid-write never wrote what an older log claimed); None if it cannot be read."""
    from raytrainer.checkpoint.resolve import checkpoint_step

    try:
        return checkpoint_step(path)
    except Exception as exc:  # noqa: BLE001 - verified just before: replaced or removed by a running writer since
        from raytrainer.utilities import log

        log.warning("could not read the step of checkpoint %s: %s", path, exc)
        return None


def _mtime(uri: str) -> float | None:
    info = _file_info(uri)
    return info.mtime.timestamp() if info.mtime is not None else None


def _finish_failed(event: dict[str, Any]) -> bool:
    cause = str(event.get("cause") or "").lower()
    return event.get("status") == "failed" or any(word in cause for word in _FAILED_FINISH_WORDS)


def _guess_state(events: list[dict[str, Any]], last_activity: float | None, now: float) -> tuple[str, str]:
    """(state, one-line reason) from the newest event; runs without a final event are judged by age."""
    if not events:
        return "unknown", "the run has no events log (events.jsonl), so its state is not recorded"
    last = events[-1]
    kind = last["event"]
    when = _clock(last.get("time"))
    if kind == "finish":
        if _finish_failed(last):
            return "failed", f"finished with an error at {when}: {last.get('cause')}"
        return "finished", f"finished at {when}"
    if kind == "preemption":
        return "preempted", f"preempted at {when} ({last.get('cause') or 'SIGTERM'}); a checkpoint was written"
    if kind == "failure":
        where = _where(last)
        return "failed", f"a rank failed at {when}{where} and no restart followed: {last.get('cause')}"
    age = now - last_activity if last_activity is not None else math.inf
    if age <= RUNNING_IF_ACTIVE_WITHIN_S:
        return "running", f"no finish event yet; last activity {age:.0f}s ago ({kind} at {when})"
    return "interrupted", (f"no finish event and no activity for {_duration(age)} (last: {kind} at {when}): "
                           "the driver stopped without recording why")


def _where(event: dict[str, Any]) -> str:
    parts = []
    if event.get("rank") is not None:
        parts.append(f"rank {event['rank']}")
    if event.get("node"):
        parts.append(f"node {event['node']}")
    return f" ({', '.join(parts)})" if parts else ""


def _clock(t: Any) -> str:
    if t is None:
        return "?"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(t)))


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def resume_command(command: Sequence[str]) -> list[str]:
    """``command`` with the checkpoint argument set to ``last``, so it continues from the newest checkpoint.

    Handles ``--ckpt_path X`` / ``--ckpt_path=X`` (and the ``--ckpt-path`` spelling); adds
    ``--ckpt_path last`` when absent. For a ``raytrainer fit`` command the argument goes after ``--``.
    """
    out = list(command)
    for i, arg in enumerate(out):
        for flag in ("--ckpt_path", "--ckpt-path"):
            if arg == flag and i + 1 < len(out):
                out[i + 1] = "last"
                return out
            if arg.startswith(flag + "="):
                out[i] = f"{flag}=last"
                return out
    if out and os.path.basename(out[0]) == "raytrainer" and "--" not in out:
        out.append("--")
    out += ["--ckpt_path", "last"]
    return out


def _recorded_command(events: list[dict[str, Any]]) -> list[str] | None:
    """The command that started the run, as the newest start event recorded it."""
    for event in reversed(events):
        if event.get("event") != "start":
            continue
        command = event.get("command")
        if isinstance(command, str):
            try:
                command = json.loads(command)
            except ValueError:
                command = shlex.split(command)
        if isinstance(command, list) and command:
            return [str(c) for c in command]
        argv = event.get("argv")
        if isinstance(argv, list) and argv:
            return ["python", *[str(a) for a in argv]]
    return None


def summarize_run(path_or_uri: str, now: float | None = None) -> RunSummary:
    """Read a run directory (path or URI) into a RunSummary: events, metrics and the checkpoint to resume from, over
    every log version the run resumed through (oldest first)."""
    storage = _storage()
    run_dir = resolve_run_dir(path_or_uri)
    chain = _resumed_chain(run_dir, _read_events(run_dir))
    events, metrics = [], []
    for i, (directory, version_events) in enumerate(chain):
        events += version_events
        rows = read_metrics(directory)
        if i + 1 < len(chain):  # what this version logged past the step the next one resumed at was trained again
            resumed_at = _first_step(chain[i + 1][1])
            rows = [r for r in rows if resumed_at is None or r.get("step", -math.inf) <= resumed_at]
        metrics += rows
    now = time.time() if now is None else now

    world_sizes: list[dict[str, Any]] = []
    resizes, failures, preemptions = [], [], []
    restarts = 0
    for event in events:
        size = event.get("world_size")
        before = world_sizes[-1]["world_size"] if world_sizes else None
        if size is not None and size != before:
            world_sizes.append({"time": event.get("time"), "world_size": size, "event": event["event"]})
        kind = event["event"]
        if kind == "failure":
            failures.append(event)
        elif kind == "resize":
            resizes.append({**event, "world_size_before": before})
        elif kind == "preemption":
            preemptions.append(event)
        elif kind == "restart":
            restarts += 1

    candidates = _checkpoint_candidates([d for d, _ in chain], events)
    from raytrainer.checkpoint.resolve import newest_checkpoint

    try:
        checkpoint, skipped = newest_checkpoint(candidates)  # the one ckpt_path="last" resumes from
    except OSError as exc:
        raise CLIError(f"cannot check the checkpoints of {run_dir}: {exc}") from exc
    skipped = [(p, why) for p, why in skipped if why != "does not exist"]  # e.g. removed by save_top_k

    times = [e.get("time") for e in events if e.get("time") is not None]
    times += [t for t in (_mtime(storage.join(run_dir, "metrics.csv")), _mtime(checkpoint) if checkpoint else None)
              if t is not None]
    last_activity = max(times) if times else None
    state, detail = _guess_state(events, last_activity, now)

    step = epoch = None
    if events:
        step, epoch = events[-1].get("step"), events[-1].get("epoch")
    if metrics and state in ("running", "interrupted", "unknown"):
        last_row = metrics[-1]  # while running, metrics.csv is newer than the last event
        if "step" in last_row and (step is None or last_row["step"] > step):
            step = int(last_row["step"])
            epoch = int(last_row["epoch"]) if "epoch" in last_row else epoch

    recorded = _recorded_command(events)
    resume = resume_command(recorded) if recorded else None
    return RunSummary(
        run_dir=run_dir, state=state, state_detail=detail, step=step, epoch=epoch, events=events,
        world_sizes=world_sizes, failures=failures, resizes=resizes, preemptions=preemptions, restarts=restarts,
        checkpoint=checkpoint, checkpoint_step=_held_step(checkpoint) if checkpoint else None,
        skipped_checkpoints=skipped, resume=resume, metrics=metrics, last_activity=last_activity,
        versions=[_version(d, e, (state if i == len(chain) - 1 else _guess_state(e, None, now)[0]))
                  for i, (d, e) in enumerate(chain)],
    )


def _first_step(events: list[dict[str, Any]]) -> int | None:
    """The step a log version started at (its start event's: where a resumed version took over)."""
    start = next((e for e in events if e["event"] == "start"), events[0] if events else None)
    return start.get("step") if start is not None else None


def _version(run_dir: str, events: list[dict[str, Any]], state: str) -> dict[str, Any]:
    """One entry of RunSummary.versions."""
    start = next((e for e in events if e["event"] == "start"), None)
    return {"run_dir": run_dir, "resumed_from": start.get("resumed_from") if start is not None else None,
            "first_step": _first_step(events), "last_step": events[-1].get("step") if events else None,
            "state": state, "events": len(events)}
