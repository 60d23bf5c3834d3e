"""The raytrainer command: train a script here or on a Ray cluster, summarize and plot a run, export a model.

    raytrainer fit SCRIPT.py [--address URL] [--num-nodes MIN:MAX] [--num-processes N] [-- SCRIPT ARGS]
    raytrainer status RUN_DIR_OR_URI [--json]
    raytrainer report RUN_DIR_OR_URI --output report.png
    raytrainer export CKPT --model pkg.module:ClassName --format onnx|torchscript --output FILE [--verify]

A run directory is what a Trainer writes: ``<default_root_dir>/lightning_logs/version_N`` with
``events.jsonl``, ``metrics.csv``, ``hparams.yaml`` and ``checkpoints/``. ``status`` and ``report``
also take the ``default_root_dir`` itself (its newest version is used), and any URI that
``raytrainer.io.storage`` reads (``s3://``, ``gs://``, ``file://``...).

Exit status: 0 on success; 1 when the work failed (a failed job, an export that does not verify);
2 for bad input (a missing or unreadable run directory, a malformed argument). ``fit`` returns the
script's (or the Ray job's) own exit status.
"""
from __future__ import annotations

import argparse
import csv
import importlib
import importlib.util
import io
import json
import math
import os
import shlex
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

__all__ = ["CLIError", "RunSummary", "Spinner", "build_parser", "draw_report", "format_status", "main",
           "resolve_run_dir", "resume_command", "summarize_run"]

# A run whose newest event, metrics row or checkpoint is younger than this is guessed to be running.
RUNNING_IF_ACTIVE_WITHIN_S = 600.0
# How long `fit --address` waits for the cluster's dashboard to answer, and for the job to start.
DEFAULT_CONNECT_TIMEOUT_S = 120.0
DEFAULT_START_TIMEOUT_S = 600.0
# The environment variable `raytrainer fit` sets to its own command line (a JSON list), so a run can
# record the exact command that started it and `status` can print how to resume.
COMMAND_ENV = "RAYTRAINER_COMMAND"
_FAILED_FINISH_WORDS = ("fail", "error", "exception", "exceeded", "crash", "abort", "gave up")


class CLIError(Exception):
    """A problem the user can fix; ``main`` prints the message and exits with ``code``."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------------------- spinner


class Spinner:
    """Shows that the command is waiting (on a cluster, an upload, a job start) and for how long.

    On a terminal a turning bar with the elapsed seconds is redrawn in place; elsewhere (logs, CI)
    one line is printed when the wait starts and one when it ends, so logs stay readable.
    """

    FRAMES = "|/-\\"

    def __init__(self, message: str, stream: TextIO | None = None, interval_s: float = 0.1) -> None:
        self.message = message
        self.stream = stream if stream is not None else sys.stderr
        self.interval_s = interval_s
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0

    def update(self, message: str) -> None:
        """Change the text shown while still waiting."""
        if message != self.message and not self.tty:
            print(f"... {message}", file=self.stream, flush=True)
        self.message = message

    def _draw(self) -> None:
        i = 0
        while not self._stop.wait(self.interval_s):
            elapsed = time.monotonic() - self._t0
            self.stream.write(f"\r{self.FRAMES[i % len(self.FRAMES)]} {self.message} ({elapsed:.0f}s)\033[K")
            self.stream.flush()
            i += 1

    def __enter__(self) -> "Spinner":
        self._t0 = time.monotonic()
        if self.tty:
            self._thread = threading.Thread(target=self._draw, daemon=True)
            self._thread.start()
        else:
            print(f"... {self.message}", file=self.stream, flush=True)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
        elapsed = time.monotonic() - self._t0
        outcome = "done" if exc_type is None else "stopped"
        if self.tty:
            self.stream.write("\r\033[K")
        print(f"{'ok' if exc_type is None else '!!'} {self.message}: {outcome} after {elapsed:.1f}s",
              file=self.stream, flush=True)


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
    if any(marker in entries for marker in _RUN_MARKERS):
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
    checkpoint_step: int | None
    skipped_checkpoints: list[tuple[str, str]]  # (file, why it was not used)
    resume: list[str] | None                    # the command that resumes the run, when it is known
    metrics: list[dict[str, float]] = field(default_factory=list)
    last_activity: float | None = None          # unix time of the newest event, metrics write or checkpoint

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
    """Rows of the run's metrics.csv with numeric cells only ([] when there is no metrics.csv)."""
    import pyarrow.fs as pafs

    uri = _storage().join(run_dir, "metrics.csv")
    if _file_info(uri).type != pafs.FileType.File:
        return []
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


def _checkpoint_candidates(run_dir: str, events: list[dict[str, Any]]) -> list[str]:
    """Checkpoint files in <run>/checkpoints plus every path a checkpoint or preemption event names."""
    storage = _storage()
    try:
        found = storage.listdir(storage.join(run_dir, "checkpoints"), missing_ok=True)
    except (OSError, NotADirectoryError) as exc:
        raise CLIError(f"cannot list the checkpoints of {run_dir}: {exc}") from exc
    for event in events:
        if event.get("event") in ("checkpoint", "preemption") and event.get("path"):
            found.append(str(event["path"]))
    return list(dict.fromkeys(found))


def _step_of_checkpoint(path: str, events: list[dict[str, Any]]) -> int | None:
    """The step a checkpoint was written at: from its event, else from a ``step=N`` in its name."""
    for event in reversed(events):
        if event.get("path") == path and event.get("step") is not None:
            return int(event["step"])
    name = path.rstrip("/").rsplit("/", 1)[-1]
    for part in name.replace(".ckpt", "").split("-"):
        if part.startswith("step=") and part[5:].isdigit():
            return int(part[5:])
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
    """Read a run directory (path or URI) into a RunSummary: events, metrics and the checkpoint to resume from."""
    storage = _storage()
    run_dir = resolve_run_dir(path_or_uri)
    events = _read_events(run_dir)
    metrics = read_metrics(run_dir)

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

    candidates = _checkpoint_candidates(run_dir, events)
    try:
        checkpoint, skipped = storage.newest_valid(candidates)
    except OSError as exc:
        raise CLIError(f"cannot check the checkpoints of {run_dir}: {exc}") from exc
    skipped = [(p, why) for p, why in skipped if why != "does not exist"]  # e.g. removed by save_top_k

    times = [e.get("time") for e in events if e.get("time") is not None]
    times += [t for t in (_mtime(storage.join(run_dir, "metrics.csv")), _mtime(checkpoint) if checkpoint else None)
              if t is not None]
    last_activity = max(times) if times else None
    state, detail = _guess_state(events, last_activity, time.time() if now is None else now)

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
        checkpoint=checkpoint, checkpoint_step=_step_of_checkpoint(checkpoint, events) if checkpoint else None,
        skipped_checkpoints=skipped, resume=resume, metrics=metrics, last_activity=last_activity,
    )


def format_status(s: RunSummary) -> str:
    """The human summary ``raytrainer status`` prints."""
    lines = [f"run         {s.run_dir}", f"state       {s.state}: {s.state_detail}"]
    progress = [f"step {s.step}" if s.step is not None else None, f"epoch {s.epoch}" if s.epoch is not None else None]
    lines.append("progress    " + (", ".join(p for p in progress if p) or "no steps recorded"))
    if s.world_sizes:
        t0 = s.events[0].get("time") or 0.0
        history = " -> ".join(
            f"{w['world_size']} (+{_duration((w['time'] or t0) - t0)}, {w['event']})" for w in s.world_sizes)
        lines.append(f"world size  {history}")
    lines.append(f"failures    {len(s.failures)}" + (f", {s.restarts} restart(s)" if s.restarts else ""))
    for f in s.failures:
        cause = f.get("cause") or "no cause recorded"
        lines.append(f"  - {_clock(f.get('time'))} step {f.get('step')}{_where(f)}: {cause}")
    lines.append(f"resizes     {len(s.resizes)}")
    for r in s.resizes:
        lines.append(f"  - {_clock(r.get('time'))} step {r.get('step')}: {r.get('world_size_before')} -> "
                     f"{r.get('world_size')} ranks ({r.get('cause') or 'no cause recorded'})")
    if s.preemptions:
        lines.append(f"preemptions {len(s.preemptions)}")
        for p in s.preemptions:
            lines.append(f"  - {_clock(p.get('time'))} step {p.get('step')}: {p.get('cause') or 'SIGTERM'}")
    if s.checkpoint:
        at = f" (step {s.checkpoint_step})" if s.checkpoint_step is not None else ""
        lines.append(f"checkpoint  {s.checkpoint}{at}, verified")
    else:
        lines.append("checkpoint  none that verifies: resuming would start from scratch")
    for path, reason in s.skipped_checkpoints:
        lines.append(f"  skipped {path}: {reason}")
    if s.state == "finished":
        lines.append("resume      nothing to resume: the run finished")
    elif s.resume:
        lines.append(f"resume      {shlex.join(s.resume)}")
    else:
        lines.append("resume      rerun the command that started this run with --ckpt_path last "
                     "(Trainer.fit(..., ckpt_path='last')); the run did not record its command")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- report

_EVENT_STYLE = {  # event -> (marker, colour, label); colours kept apart from the loss curves' palette
    "failure": ("X", "#c00000", "failure"),
    "resize": ("D", "#ff8c00", "resize"),
    "restart": ("o", "#0050c0", "restart"),
    "snapshot_fallback": ("s", "#8b4513", "snapshot fallback"),
    "checkpoint": ("|", "#00a000", "checkpoint"),
    "preemption": ("v", "#8000c0", "preemption"),
    "start": (">", "#444444", "start"),
    "finish": ("*", "#000000", "finish"),
}


def draw_report(s: RunSummary, output: str) -> int:
    """Draw loss curves over steps and, under them, world size over time with events marked; write a PNG.

    Returns the number of loss curves drawn.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_loss, ax_ws) = plt.subplots(2, 1, figsize=(10, 7.5), gridspec_kw={"height_ratios": [3, 2]})
    shown = s.run_dir
    if "://" not in shown and not os.path.relpath(shown).startswith(os.pardir):
        shown = os.path.relpath(shown)  # the run as the user named it from here
    title = f"{shown}\n{s.state}" + (f", step {s.step}" if s.step is not None else "") + \
            (f", epoch {s.epoch}" if s.epoch is not None else "")
    fig.suptitle(title, fontsize=10)

    loss_columns = sorted({k for row in s.metrics for k in row if "loss" in k.lower()})
    curves = 0
    for column in loss_columns:
        points = [(row["step"], row[column]) for row in s.metrics if column in row and "step" in row]
        if not points:
            continue
        curves += 1
        xs, ys = zip(*points)
        per_step = column.endswith("_step")
        ax_loss.plot(xs, ys, label=column, linewidth=0.9 if per_step else 1.8, alpha=0.55 if per_step else 1.0,
                     marker=None if per_step or len(xs) > 60 else "o", markersize=4)
    for event in s.failures + s.preemptions:
        if event.get("step") is not None:
            ax_loss.axvline(event["step"], color=_EVENT_STYLE[event["event"]][1], linestyle="--", linewidth=1)
    if loss_columns:
        ax_loss.legend(loc="upper right", fontsize=8)
    else:
        ax_loss.text(0.5, 0.5, "no loss columns in metrics.csv", ha="center", va="center", transform=ax_loss.transAxes)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("training and validation loss (dashed: failures and preemptions)", fontsize=10)
    ax_loss.grid(alpha=0.3)

    if s.events:
        t0 = s.events[0].get("time") or 0.0
        span = max((e.get("time") or t0) - t0 for e in s.events)
        unit, scale = ("s", 1.0) if span < 120 else ("min", 60.0) if span < 7200 else ("h", 3600.0)
        xs = [((e.get("time") or t0) - t0) / scale for e in s.events]
        sizes, current, seen_spans = [], None, set()
        for e in s.events:
            current = e.get("world_size", current)
            sizes.append(current if current is not None else 0)
        ax_ws.step(xs, sizes, where="post", color="#555555", linewidth=2, label="world size", zorder=1)
        for i, e in enumerate(s.events):  # shade each recovery: from a failure to the next (re)start
            if e["event"] == "failure":
                back = next((x for x, later in zip(xs[i + 1:], s.events[i + 1:])
                             if later["event"] in ("restart", "start", "resize", "finish")), xs[-1])
                ax_ws.axvspan(xs[i], back, color=_EVENT_STYLE["failure"][1], alpha=0.08, zorder=0,
                              label=None if "recovering" in seen_spans else "recovering")
                seen_spans.add("recovering")
        seen: set[str] = set()
        for x, size, e in zip(xs, sizes, s.events):
            marker, colour, label = _EVENT_STYLE.get(e["event"], ("o", "grey", e["event"]))
            ax_ws.scatter([x], [size], marker=marker, color=colour, s=140 if marker == "|" else 70, zorder=3,
                          label=None if label in seen else label, linewidths=2 if marker == "|" else 1)
            seen.add(label)
            if e["event"] in ("failure", "resize", "preemption"):
                text = f"step {e.get('step')}" + (f"\nrank {e['rank']}" if e.get("rank") is not None else "")
                ax_ws.annotate(text, (x, size), textcoords="offset points", xytext=(6, 8), fontsize=7, color=colour)
        ax_ws.set_xlabel(f"time since start ({unit})")
        ax_ws.set_ylim(0, max(sizes + [1]) + 1)
        ax_ws.margins(x=0.07)
        ax_ws.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), fontsize=8, ncol=8, frameon=False)
    else:
        ax_ws.text(0.5, 0.5, "no events log (events.jsonl)", ha="center", va="center", transform=ax_ws.transAxes)
    ax_ws.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax_ws.set_ylabel("world size (ranks)")
    ax_ws.set_title("world size over time, with failures, resizes, checkpoints and preemptions", fontsize=10)
    ax_ws.grid(alpha=0.3)

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    storage = _storage()
    try:
        if "://" not in output:
            os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        storage.write_bytes_atomic(output, buf.getvalue(), manifest=False)
    except (OSError, ValueError) as exc:
        raise CLIError(f"cannot write the report to {output}: {exc}", code=1) from exc
    return curves


# ------------------------------------------------------------------------------------------ fit


def _translate_flags(args: argparse.Namespace, script_args: list[str]) -> list[str]:
    """The script's own arguments for --num-nodes/--num-processes, refusing the same setting twice."""
    extra = []
    for ours, theirs in (("num_nodes", "--num_nodes"), ("num_processes", "--num_processes")):
        value = getattr(args, ours)
        if value is None:
            continue
        if any(a == theirs or a.startswith(theirs + "=") for a in script_args):
            raise CLIError(f"--{ours.replace('_', '-')} and the script argument {theirs} both set the same "
                           "thing; give only one.")
        extra += [theirs, str(value)]
    return extra


def _values_of(flag: str, argv: list[str]) -> list[str]:
    """Every value given for ``flag`` in an argument list (``--flag V`` or ``--flag=V``)."""
    values = [a.split("=", 1)[1] for a in argv if a.startswith(flag + "=")]
    return values + [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def _check_range(value: str) -> str:
    """argparse type for --num-nodes: N or MIN:MAX with 1 <= MIN <= MAX."""
    parts = value.split(":")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        nums = []
    if len(parts) not in (1, 2) or len(nums) != len(parts) or nums[0] < 1 or nums[-1] < nums[0]:
        raise argparse.ArgumentTypeError(f"expected N or MIN:MAX with 1 <= MIN <= MAX, got {value!r}")
    return value


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def _script_in_working_dir(script: str, working_dir: str) -> str:
    """The script's path relative to the working directory (what runs on the cluster)."""
    script_abs = os.path.abspath(script)
    if not os.path.isfile(script_abs):
        raise CLIError(f"script {script} does not exist")
    wd = os.path.abspath(working_dir)
    if not os.path.isdir(wd):
        raise CLIError(f"--working-dir {working_dir} is not a directory")
    rel = os.path.relpath(script_abs, wd)
    if rel.startswith(os.pardir + os.sep):
        raise CLIError(f"script {script} is outside the working directory {wd}; it would not be shipped "
                       "to the cluster. Pass --working-dir with a folder that contains it.")
    return rel


def _fit_local(script_rel: str, working_dir: str, args_for_script: list[str], command: list[str],
               timeout_s: float | None) -> int:
    """Run the script with this Python in a child process; its exit status is ours."""
    import subprocess

    env = {**os.environ, COMMAND_ENV: json.dumps(command)}
    cmd = [sys.executable, script_rel, *args_for_script]
    print(f"raytrainer fit: running {shlex.join(cmd)} in {working_dir}", file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, cwd=working_dir, env=env)
    try:
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM: a raytrainer script writes a checkpoint and stops cleanly
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise CLIError(f"the script ran past --timeout {timeout_s:.0f}s and was stopped; resume it with "
                       "--ckpt_path last", code=1)
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(timeout=60)
        return 130
    return code if code >= 0 else 128 - code


def _token() -> str | None:
    """The Ray auth token this client would present, from the places Ray reads it (in Ray's order)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    for path in (os.environ.get("RAY_AUTH_TOKEN_PATH"), os.path.join(os.path.expanduser("~"), ".ray", "auth_token")):
        if path and os.path.isfile(path):
            with open(path) as f:
                return f.read().strip() or None
    return None


def _normalize_address(address: str) -> str:
    if address.startswith("ray://"):
        raise CLIError(f"--address {address}: give the dashboard's HTTP address (http://HOST:8265, the Ray Jobs "
                       "API), not a Ray Client address. `ray dashboard cluster/aws.yaml` forwards it to "
                       "http://127.0.0.1:8265.")
    if "://" not in address:
        address = "http://" + address
    return address.rstrip("/")


def _wait_for_dashboard(address: str, token: str | None, timeout_s: float) -> str:
    """Poll the cluster's /api/version until it answers; returns the cluster's Ray version."""
    import requests

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    deadline = time.monotonic() + timeout_s
    last_error = "no answer"
    with Spinner(f"waiting for the Ray cluster at {address}"):
        while True:
            try:
                r = requests.get(f"{address}/api/version", headers=headers, timeout=5)
            except requests.RequestException as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            else:
                if r.status_code in (401, 403):
                    raise CLIError(
                        f"the cluster at {address} refused this client's token (HTTP {r.status_code}): it runs "
                        "with token authentication. Copy its token (`ray get-auth-token` on the head) to "
                        "~/.ray/auth_token or point RAY_AUTH_TOKEN_PATH at it.", code=1)
                if r.ok:
                    return str(r.json().get("ray_version", "?"))
                last_error = f"HTTP {r.status_code}: {r.text[:200]}"
            if time.monotonic() >= deadline:
                raise CLIError(
                    f"no Ray dashboard answered at {address} within {timeout_s:.0f}s ({last_error}). Is the "
                    "cluster up (`ray up cluster/aws.yaml`) and its dashboard forwarded (`ray dashboard "
                    "cluster/aws.yaml`)?", code=1)
            time.sleep(1.0)


def _fit_remote(address: str, script_rel: str, working_dir: str, args_for_script: list[str], command: list[str],
                connect_timeout_s: float, start_timeout_s: float, timeout_s: float | None, wait: bool) -> int:
    """Submit the script as a Ray job, stream its logs, and return its exit status."""
    address = _normalize_address(address)
    token = _token()
    if token and "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"  # before Ray is imported: its HTTP client then sends the token
    version = _wait_for_dashboard(address, token, connect_timeout_s)
    import ray
    from ray.job_submission import JobStatus, JobSubmissionClient

    if version != ray.__version__:
        print(f"raytrainer fit: warning: the cluster runs Ray {version}, this machine Ray {ray.__version__}",
              file=sys.stderr)
    client = JobSubmissionClient(address)
    entrypoint = shlex.join(["python", script_rel, *args_for_script])
    runtime_env = {"working_dir": working_dir, "env_vars": {COMMAND_ENV: json.dumps(command)}}
    with Spinner(f"uploading {working_dir} and submitting `{entrypoint}`"):
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    print(f"raytrainer fit: submitted job {job_id} to {address}", file=sys.stderr, flush=True)
    follow = f"ray job logs --follow {job_id} --address {address}"
    if not wait:
        print(f"follow it with: {follow}\nstop it with:   ray job stop {job_id} --address {address}")
        return 0

    deadline = time.monotonic() + start_timeout_s
    with Spinner(f"waiting for job {job_id} to start on the cluster") as spinner:
        while (status := client.get_job_status(job_id)) == JobStatus.PENDING:
            if time.monotonic() >= deadline:
                raise CLIError(f"job {job_id} did not start within {start_timeout_s:.0f}s (still PENDING: "
                               "the cluster may lack free resources). It stays queued; stop it with "
                               f"`ray job stop {job_id} --address {address}`.", code=1)
            spinner.update(f"waiting for job {job_id} to start on the cluster ({status})")
            time.sleep(1.0)

    try:
        _stream_logs(client, job_id, timeout_s)
    except KeyboardInterrupt:
        print(f"\nraytrainer fit: stopped following; the job keeps running.\n  follow: {follow}\n"
              f"  stop:   ray job stop {job_id} --address {address}", file=sys.stderr)
        return 130

    end = time.monotonic() + 60.0  # the log stream closes as the job ends; its final status follows
    while not (info := client.get_job_info(job_id)).status.is_terminal():
        if time.monotonic() >= end:
            raise CLIError(f"job {job_id} stopped sending logs but is still {info.status}; follow it with "
                           f"`{follow}`", code=1)
        time.sleep(1.0)
    print(f"raytrainer fit: job {job_id} {info.status}" + (f": {info.message}" if info.message else ""),
          file=sys.stderr, flush=True)
    if info.status == JobStatus.SUCCEEDED:
        return 0
    code = getattr(info, "driver_exit_code", None)
    return code if isinstance(code, int) and code > 0 else 1


def _stream_logs(client: Any, job_id: str, timeout_s: float | None) -> None:
    """Print the job's logs as they arrive until the job ends (or --timeout passes)."""
    import asyncio

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    async def bounded() -> None:
        await asyncio.wait_for(tail(), timeout=timeout_s)

    try:
        asyncio.run(bounded())
    except asyncio.TimeoutError as exc:
        raise CLIError(f"job {job_id} ran past --timeout {timeout_s:.0f}s; it keeps running on the cluster "
                       f"(stop it with `ray job stop {job_id}`)", code=1) from exc
    except RuntimeError as exc:  # the log socket closed early: the final status tells the outcome
        print(f"raytrainer fit: log stream ended early ({exc}); reading the job status", file=sys.stderr)


def cmd_fit(args: argparse.Namespace, script_args: list[str], argv: list[str]) -> int:
    """`raytrainer fit`: run a training script here, or as a Ray job on the cluster at --address."""
    working_dir = os.path.abspath(args.working_dir or os.getcwd())
    script_rel = _script_in_working_dir(args.script, working_dir)
    args_for_script = _translate_flags(args, script_args) + script_args
    command = ["raytrainer", *argv]
    if args.address and not any("://" in a for a in _values_of("--default_root_dir", args_for_script)):
        print("raytrainer fit: note: no --default_root_dir URI (s3://..., gs://...) in the script's arguments. "
              "On more than one node, checkpoints must go to storage every node reaches, or a restarted "
              "rank will not find them (cluster/README.md).", file=sys.stderr)
    if args.address:
        return _fit_remote(args.address, script_rel, working_dir, args_for_script, command, args.connect_timeout,
                           args.start_timeout, args.timeout, wait=not args.no_wait)
    return _fit_local(script_rel, working_dir, args_for_script, command, args.timeout)


# ---------------------------------------------------------------------------------------- export


def _load_class(spec: str) -> type:
    """Import ``pkg.module:ClassName`` (or ``path/to/file.py:ClassName``) and return the class."""
    module_name, sep, class_name = spec.rpartition(":")
    if not sep or not module_name or not class_name:
        raise CLIError(f"--model {spec!r}: expected pkg.module:ClassName (or path/to/file.py:ClassName)")
    try:
        if module_name.endswith(".py") or os.sep in module_name:
            path = os.path.abspath(module_name)
            if not os.path.isfile(path):
                raise CLIError(f"--model {spec}: {module_name} does not exist")
            name = "_raytrainer_model_" + os.path.splitext(os.path.basename(path))[0]
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except CLIError:
        raise
    except Exception as exc:  # noqa: BLE001 - any import-time error is the user's module failing
        raise CLIError(f"--model {spec}: cannot import {module_name} ({type(exc).__name__}: {exc}). Run from the "
                       "folder that contains the package, or set PYTHONPATH.") from exc
    cls = getattr(module, class_name, None)
    if cls is None:
        from raytrainer.module import LightningModule

        found = sorted(n for n, v in vars(module).items()
                       if isinstance(v, type) and issubclass(v, LightningModule) and v is not LightningModule)
        hint = f" LightningModules there: {', '.join(found)}." if found else ""
        raise CLIError(f"--model {spec}: {module_name} has no attribute {class_name}.{hint}")
    return cls


def cmd_export(args: argparse.Namespace) -> int:
    """`raytrainer export`: load a checkpoint into its LightningModule class and write ONNX or TorchScript."""
    import pyarrow.fs as pafs

    from raytrainer import export
    from raytrainer.module import LightningModule

    cls = _load_class(args.model)
    if not (isinstance(cls, type) and issubclass(cls, LightningModule)):
        kind = f"class {cls.__module__}.{cls.__qualname__} (bases: " + \
               ", ".join(f"{b.__module__}.{b.__qualname__}" for b in cls.__mro__[1:-1]) + ")" \
            if isinstance(cls, type) else f"a {type(cls).__name__}, not a class"
        raise CLIError(f"--model {args.model} is {kind}, not a raytrainer.LightningModule. Name the "
                       "LightningModule subclass the checkpoint was trained with.")
    info = _file_info(args.checkpoint)
    if info.type != pafs.FileType.File:
        raise CLIError(f"checkpoint {args.checkpoint} does not exist" if info.type == pafs.FileType.NotFound
                       else f"checkpoint {args.checkpoint} is not a file")
    try:
        model = cls.load_from_checkpoint(args.checkpoint, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - corrupt file, wrong class, missing hparams...
        raise CLIError(f"cannot load {args.checkpoint} into {cls.__qualname__}: {type(exc).__name__}: {exc}",
                       code=1) from exc
    model.eval()
    try:
        if args.format == "onnx":
            export.to_onnx(model, args.output)
        else:
            export.to_torchscript(model, file_path=args.output, method=args.method)
    except (export.ExportError, ValueError) as exc:
        raise CLIError(f"export to {args.format} failed: {exc}", code=1) from exc
    size = _file_info(args.output).size
    print(f"wrote {args.output} ({args.format}, {size / 1024:.1f} KiB) from {args.checkpoint}")
    if args.verify:
        try:
            diff = export.verify_export(args.output, model, atol=args.atol)
        except (export.ExportError, ValueError) as exc:
            print(f"verification FAILED: {exc}", file=sys.stderr)
            return 1
        runtime = "onnxruntime" if args.output.lower().endswith(".onnx") else "torch.jit.load"
        print(f"verified with {runtime}: max abs diff {diff:.3g} vs the eager model (atol {args.atol:g})")
    return 0


# ------------------------------------------------------------------------------------------- main

_FIT_EXAMPLES = """examples:
  raytrainer fit examples/autoencoder.py -- --max_epochs 5
  raytrainer fit examples/autoencoder.py --num-processes 2 -- --max_epochs 5 --ckpt_path none
  raytrainer fit examples/autoencoder.py --address http://127.0.0.1:8265 --num-nodes 2:4 \\
      -- --default_root_dir s3://my-bucket/runs/autoencoder

Everything after `--` goes to the script unchanged. --num-nodes/--num-processes become the
script's --num_nodes/--num_processes. With --address the working directory is uploaded and the
script runs as a Ray job (a thin layer over `ray job submit`); its logs stream here and its exit
status is returned. The address is the dashboard's: `ray dashboard cluster/aws.yaml` forwards it
to http://127.0.0.1:8265. A token in ~/.ray/auth_token (or RAY_AUTH_TOKEN_PATH) is sent along.
"""

_STATUS_EXAMPLES = """examples:
  raytrainer status runs/autoencoder                        # newest lightning_logs/version_N in it
  raytrainer status runs/autoencoder/lightning_logs/version_3
  raytrainer status s3://my-bucket/runs/autoencoder --json

Prints the state (finished, failed, preempted, running, interrupted), step and epoch, world size
over time, failures, resizes, the newest checkpoint that verifies and the command that resumes.
"""

_REPORT_EXAMPLES = """examples:
  raytrainer report runs/autoencoder --output report.png
  raytrainer report s3://my-bucket/runs/autoencoder/lightning_logs/version_0 --output s3://my-bucket/report.png

Top: every *loss* column of metrics.csv over steps (failures and preemptions as dashed lines).
Bottom: world size over time with failures, resizes, restarts, checkpoints and preemptions marked.
"""

_EXPORT_EXAMPLES = """examples:
  raytrainer export runs/autoencoder/lightning_logs/version_0/checkpoints/last.ckpt \\
      --model examples.autoencoder:LitAutoEncoder --format onnx --output autoencoder.onnx --verify
  raytrainer export last.ckpt --model mypkg.models:LitModel --format torchscript --output model.pt

--model names the LightningModule class the checkpoint was trained with (pkg.module:ClassName,
imported from the current directory or PYTHONPATH; path/to/file.py:ClassName works too). The
module is rebuilt with ClassName.load_from_checkpoint and exported with its example_input_array.
--verify runs the exported file (onnxruntime or torch.jit.load) against the eager model.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `raytrainer` command and its subcommands."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="raytrainer", description=__doc__.split("\n\n")[0], formatter_class=fmt,
                                     epilog="Run `raytrainer COMMAND --help` for each command's options and examples.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    fit = sub.add_parser("fit", help="run a training script here or as a Ray job on a cluster",
                         usage="raytrainer fit SCRIPT [options] [-- SCRIPT ARGS...]",
                         description="Run a training script locally, or on a Ray cluster with --address.",
                         epilog=_FIT_EXAMPLES, formatter_class=fmt)
    fit.add_argument("script", help="the training script, e.g. examples/autoencoder.py")
    fit.add_argument("--address", help="the cluster's dashboard address (http://HOST:8265); omit to run here")
    fit.add_argument("--num-nodes", type=_check_range, metavar="N|MIN:MAX",
                     help="nodes to train on, or an elastic range (passed as --num_nodes)")
    fit.add_argument("--num-processes", type=_positive_int, metavar="N",
                     help="ranks per node on CPU (passed as --num_processes)")
    fit.add_argument("--working-dir", metavar="DIR",
                     help="the folder shipped to the cluster and run in (default: the current directory)")
    fit.add_argument("--timeout", type=float, metavar="SECONDS",
                     help="stop waiting after this long (default: wait for the run to end)")
    fit.add_argument("--connect-timeout", type=float, default=DEFAULT_CONNECT_TIMEOUT_S, metavar="SECONDS",
                     help=f"how long to wait for the cluster to answer (default {DEFAULT_CONNECT_TIMEOUT_S:.0f})")
    fit.add_argument("--start-timeout", type=float, default=DEFAULT_START_TIMEOUT_S, metavar="SECONDS",
                     help=f"how long a submitted job may stay pending (default {DEFAULT_START_TIMEOUT_S:.0f})")
    fit.add_argument("--no-wait", action="store_true", help="with --address: submit, print the job id, return")

    status = sub.add_parser("status", help="summarize a run: state, progress, failures, how to resume",
                            description="Summarize a run from its events log, metrics and checkpoints.",
                            epilog=_STATUS_EXAMPLES, formatter_class=fmt)
    status.add_argument("run", metavar="RUN_DIR_OR_URI", help="a run directory or a default_root_dir (path or URI)")
    status.add_argument("--json", action="store_true", help="print the summary as JSON")

    report = sub.add_parser("report", help="draw loss curves and the world-size timeline of a run as a PNG",
                            description="Draw a run's loss curves and its world-size timeline into one PNG.",
                            epilog=_REPORT_EXAMPLES, formatter_class=fmt)
    report.add_argument("run", metavar="RUN_DIR_OR_URI", help="a run directory or a default_root_dir (path or URI)")
    report.add_argument("--output", "-o", required=True, help="where to write the PNG (path or URI)")

    exp = sub.add_parser("export", help="export a checkpoint to ONNX or TorchScript",
                         description="Export a trained checkpoint to ONNX or TorchScript without writing Python.",
                         epilog=_EXPORT_EXAMPLES, formatter_class=fmt)
    exp.add_argument("checkpoint", metavar="CKPT", help="the checkpoint file (path or URI)")
    exp.add_argument("--model", required=True, metavar="pkg.module:ClassName",
                     help="the LightningModule class the checkpoint was trained with")
    exp.add_argument("--format", required=True, choices=("onnx", "torchscript"))
    exp.add_argument("--output", "-o", required=True, help="the file to write (path or URI)")
    exp.add_argument("--method", choices=("script", "trace"), default="script",
                     help="TorchScript only: torch.jit.script (default) or trace with example_input_array")
    exp.add_argument("--verify", action="store_true", help="run the exported file and compare with the eager model")
    exp.add_argument("--atol", type=float, default=1e-5, help="--verify tolerance, max abs diff (default 1e-5)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `raytrainer` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, script_args = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = build_parser()
    args = parser.parse_args(ours)
    if script_args and args.command != "fit":
        parser.error(f"`--` passes arguments to a training script; `raytrainer {args.command}` takes none")
    try:
        if args.command == "fit":
            return cmd_fit(args, script_args, argv)
        if args.command == "status":
            summary = summarize_run(args.run)
            print(json.dumps(summary.to_json(), indent=2, default=str) if args.json else format_status(summary))
            return 0
        if args.command == "report":
            summary = summarize_run(args.run)
            curves = draw_report(summary, args.output)
            print(f"wrote {args.output}: {curves} loss curve(s) and {len(summary.events)} event(s) of "
                  f"{summary.run_dir}")
            return 0
        if args.command == "export":
            return cmd_export(args)
    except CLIError as exc:
        print(f"raytrainer {args.command}: error: {exc}", file=sys.stderr)
        return exc.code
    except BrokenPipeError:  # `raytrainer status ... | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
