"""``raytrainer status``: summarize a run (state, progress, failures, resizes, how to resume)."""
from __future__ import annotations

import argparse
import json
import os
import shlex

from raytrainer.cli.common import RunSummary, _clock, _duration, _where, summarize_run

__all__ = ["cmd_status", "format_status"]


def format_status(s: RunSummary) -> str:
    """The human summary ``raytrainer status`` prints."""
    lines = [f"run         {s.run_dir}", f"state       {s.state}: {s.state_detail}"]
    if len(s.versions) > 1:
        lines.append(f"versions    {len(s.versions)} log versions of one run, each resumed from the one before:")
        lines += [f"  - {_version_line(v, s.run_dir)}" for v in s.versions]
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


def _version_line(v: dict, run_dir: str) -> str:
    """One log version of a resumed run: its folder, steps, end and the checkpoint it resumed from."""
    root = os.path.dirname(run_dir.rstrip("/"))
    name = os.path.relpath(v["run_dir"], root) if v["run_dir"].startswith(root + "/") else v["run_dir"]
    line = f"{name}: step {v['first_step']} -> {v['last_step']}, {v['state']}"
    source = v.get("resumed_from")
    if source:
        line += f"; resumed from {os.path.relpath(source, root) if source.startswith(root + '/') else source}"
    return line


def cmd_status(args: argparse.Namespace) -> int:
    """`raytrainer status`: print a run's summary, as text or (--json) as JSON."""
    summary = summarize_run(args.run)
    print(json.dumps(summary.to_json(), indent=2, default=str) if args.json else format_status(summary))
    return 0
