"""``raytrainer report``: draw a run's loss curves and its world-size timeline into one PNG."""
from __future__ import annotations

import argparse
import io
import itertools
import os

from raytrainer.cli.common import CLIError, RunSummary, _storage, summarize_run

__all__ = ["cmd_report", "draw_report"]

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


_RESUMED_COLOUR = "#708090"  # where a run resumed into a new log version, and the time it was stopped before


def _version_name(v: dict) -> str:
    return os.path.basename(v["run_dir"].rstrip("/"))


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
    if len(s.versions) > 1:
        title += f"; one run over {' -> '.join(_version_name(v) for v in s.versions)}"
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
            ax_loss.axvline(event["step"], color=_EVENT_STYLE[event["event"]][1], linestyle="--", linewidth=1,
                            zorder=3)
    for v in s.versions[1:]:  # where each resumed log version took over (under a preemption's line at that step)
        if v["first_step"] is not None:
            ax_loss.axvline(v["first_step"], color=_RESUMED_COLOUR, linestyle=":", linewidth=1, zorder=1)
            ax_loss.annotate(_version_name(v), (v["first_step"], 1), xycoords=("data", "axes fraction"),
                             xytext=(3, -12), textcoords="offset points", fontsize=7, color=_RESUMED_COLOUR)
    if loss_columns:
        ax_loss.legend(loc="upper right", fontsize=8)
    else:
        ax_loss.text(0.5, 0.5, "no loss columns in metrics.csv", ha="center", va="center", transform=ax_loss.transAxes)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("training and validation loss (dashed: failures and preemptions"
                      + ("; dotted: resumed into a new log version)" if len(s.versions) > 1 else ")"), fontsize=10)
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
        starts = list(itertools.accumulate(v["events"] for v in s.versions[:-1]))  # where later versions begin
        starts = [i for i in starts if 0 < i < len(s.events)]
        line_x, line_size = [], []
        for i, (x, size) in enumerate(zip(xs, sizes)):
            if i in starts:  # no ranks between one log version's end and the next one's start
                line_x.append(xs[i - 1])
                line_size.append(0)
            line_x.append(x)
            line_size.append(size)
        ax_ws.step(line_x, line_size, where="post", color="#555555", linewidth=2, label="world size", zorder=1)
        for i, e in enumerate(s.events):  # shade each recovery: from a failure to the next (re)start
            if e["event"] == "failure":
                back = next((x for x, later in zip(xs[i + 1:], s.events[i + 1:])
                             if later["event"] in ("restart", "start", "resize", "finish")), xs[-1])
                ax_ws.axvspan(xs[i], back, color=_EVENT_STYLE["failure"][1], alpha=0.08, zorder=0,
                              label=None if "recovering" in seen_spans else "recovering")
                seen_spans.add("recovering")
        for i in starts:  # a gap between log versions: nothing ran
            ax_ws.axvspan(xs[i - 1], xs[i], color=_RESUMED_COLOUR, alpha=0.12, zorder=0,
                          label=None if "stopped" in seen_spans else "stopped (until resumed)")
            seen_spans.add("stopped")
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



def cmd_report(args: argparse.Namespace) -> int:
    """`raytrainer report`: summarize a run and draw it into the PNG at --output."""
    summary = summarize_run(args.run)
    curves = draw_report(summary, args.output)
    versions = f" ({len(summary.versions)} log versions of one run)" if len(summary.versions) > 1 else ""
    print(f"wrote {args.output}: {curves} loss curve(s) and {len(summary.events)} event(s) of "
          f"{summary.run_dir}{versions}")
    return 0
