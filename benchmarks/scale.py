"""How raytrainer's multi-rank runs scale with the world size, on a simulated multi-node Ray cluster.

For each world size (default 4, 8, 16 ranks) a ``ray.cluster_utils.Cluster`` is started on this machine: a head
node with no CPUs (only the driver runs there) and one simulated node per ``--ranks-per-node`` ranks (default 2),
each with ``num_cpus`` = ranks per node. A tiny model (Linear(8, 1), batch 1) trains with a 20 ms ``time.sleep`` in
every step, so the ranks' own CPU does not swamp the machine. One fit per size measures (files that the ranks'
``Probe`` callback writes, ``benchmarks/_scale_models.py``; every clock is this host's):

1. group start: from the ``trainer.fit`` call to rank 0's first finished training step (placement, actor
   processes, rendezvous, the ranks' setup and one step). The group's own timings (placement, actors, rendezvous)
   are reported beside it. The fit runs with ``max_failures=1``, so (as for any user) one warm spare rank process
   per node starts after the group formed;
2. driver CPU per 100 steady-state steps: ``time.process_time()`` of the driver (all its threads: the fit, Ray's
   own) between the first and the last step of a 500-step window, read by a background thread when rank 0's mark
   files appear. The window starts once the spares finished importing torch, and never crosses an epoch's end.
   The CPU the benchmark's own counting and watching took is subtracted;
3. traffic per step: the messages ``FitController.on_message`` receives from the ranks (heartbeats, progress
   events, log lines, events, snapshot notices; counted by wrapping it here) and their pickled bytes, and the
   driver's poll round trips to rank 0 (``WorkerGroup._deliver_poll``), per step of the same window;
4. recovery: after the window the last rank SIGKILLs itself (first attempt only, a marker file keeps its
   replacement from doing it again); from the kill to rank 0's next finished step (``recovery.analyse``, the
   2-rank benchmark's measurement);
5. resize (sizes in ``--resize-sizes``, default the smallest and the largest): a second, elastic fit
   (``num_nodes="1:NODES+1"``, ``scale_check_interval_s=1.0``) runs in a background thread; once it trains,
   ``cluster.add_node`` adds a node; from that call to rank 0's first finished step at the grown world size.

6. CPU: the CPU (psutil: user + system) every process of the cluster spent in the group start (to rank 0's first
   step), in the steady-state window and in the recovery, by kind: the driver (its main thread, raytrainer's control
   loop, apart from Ray's threads), the head node's processes, the other nodes' daemons, each rank, the other
   workers (spares). The recovery is also broken down stage by stage (``recovery.breakdown``).

Each metric is fitted with least squares as ``a + b * ranks`` (with R^2), and as a power law (the exponent: 1 is
linear, more is faster than linear), then extrapolated to 1024 ranks on 128 nodes (8 ranks per node) and compared
with the targets: driver CPU per step independent of the world size, group start <= 60 s, recovery <= 10 s. A
second extrapolation models a real cluster from the CPU readings: serial part (driver and head, less the head's
per-second background) + a node's daemons and spares over its 8 cores + the busiest rank + the wall clock the CPU
does not explain here, each part fitted linearly.

All simulated nodes share this machine's cores: N rank processes that import torch on 2 cores take about N times
as long as one, so per-rank start costs measured here are an upper bound for a real cluster, whose nodes start
their ranks in parallel. The Ray instance gets a private temp directory (``RAY_TMPDIR``), so other Ray programs on
this machine neither find nor join it.

    python benchmarks/scale.py [--sizes 4,8,16] [--repeats 1] [--resize-sizes 4,16]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import pickle
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _scale_models and recovery, here and on the ranks

SLEEP_S = 0.02            # each training step sleeps this long
WINDOW = 500              # steady-state steps between the two CPU readings
EPOCH_STEPS = 2000        # batches per rank per epoch (the window never crosses an epoch's end)
STOP_AFTER = 30           # steps trained after the recovery (or resize) before the run stops
MAX_STEPS = 100_000       # a cap only: the Probe stops each run
TARGET_RANKS, TARGET_NODES = 1024, 128
START_TARGET_S, RECOVERY_TARGET_S = 60.0, 10.0
CPU_TARGET_KEYS = ("driver_main_cpu_ms_per_100", "driver_main_cpu_percent", "driver_cpu_ms_per_100",
                   "driver_cpu_percent")
CPU_GROWTH_TOLERANCE = 0.25  # driver CPU per step is "independent of the world size" when b * 1024 <= 25% of a
WAIT_S = 600.0            # bound on every wait for a rank's file
MEDIAN_KEYS = ("start_s", "outside_group_start_s", "driver_cpu_ms_per_100", "driver_cpu_percent",
               "driver_main_cpu_ms_per_100", "driver_main_cpu_percent", "step_ms",
               "messages_per_step", "bytes_per_step", "polls_per_step", "recovery_s", "steps_lost", "spares_warm_s",
               "reform_s")  # a size's row: the median over its runs


# ------------------------------------------------------------------------------------------- traffic counting
class Traffic:
    """Messages (count, pickled bytes, by type) the driver got from the ranks, and its polls of rank 0."""

    def __init__(self) -> None:
        self.messages = 0
        self.bytes = 0
        self.polls = 0
        self.by_type: Counter[str] = Counter()
        self.overhead_cpu = 0.0  # CPU seconds the counting itself took (subtracted from the driver's)
        self.lock = threading.Lock()

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {"messages": self.messages, "bytes": self.bytes, "polls": self.polls,
                    "by_type": dict(self.by_type), "overhead_cpu": self.overhead_cpu}


def _pickled_size(msg: Any) -> int:
    """Bytes ``msg`` pickles to; an ObjectRef (a snapshot's) counts as its id, which is what travels."""
    import ray

    class Sizer(pickle.Pickler):
        def persistent_id(self, obj: Any) -> Any:
            return obj.binary() if isinstance(obj, ray.ObjectRef) else None

    buf = io.BytesIO()
    try:
        Sizer(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(msg)
    except Exception:  # noqa: BLE001 - something unpicklable here still counts as a message
        return 0
    return buf.tell()


@contextlib.contextmanager
def counting(traffic: Traffic) -> Iterator[None]:
    """Wrap ``FitController.on_message`` and ``WorkerGroup._deliver_poll`` (benchmark only) to count into
    ``traffic``; restored on exit."""
    from raytrainer.launchers.ray.controller import FitController
    from raytrainer.launchers.ray.group import WorkerGroup

    on_message, deliver_poll = FitController.on_message, WorkerGroup._deliver_poll

    def counted_message(self: Any, rank: int, msg: Any) -> None:
        start = time.thread_time()
        size = _pickled_size(msg)
        kind = msg.get("type", "?") if isinstance(msg, dict) else type(msg).__name__
        with traffic.lock:
            traffic.messages += 1
            traffic.bytes += size
            traffic.by_type[kind] += 1
            traffic.overhead_cpu += time.thread_time() - start
        on_message(self, rank, msg)

    def counted_poll(self: Any, poll_ref: Any, handler: Any) -> None:
        with traffic.lock:
            traffic.polls += 1
        deliver_poll(self, poll_ref, handler)

    FitController.on_message, WorkerGroup._deliver_poll = counted_message, counted_poll
    try:
        yield
    finally:
        FitController.on_message, WorkerGroup._deliver_poll = on_message, deliver_poll


# ------------------------------------------------------------------------------------------- CPU accounting
class CpuSampler:
    """CPU seconds (user + system) of this driver and of every process its simulated cluster runs (the nodes'
    daemons and the rank and spare actors are all its descendants), read at chosen moments; the reading's own CPU
    is kept apart so it can be taken off the driver's."""

    def __init__(self) -> None:
        self.own_cpu = 0.0  # CPU seconds the readings took (in the reading thread)

    def read(self) -> dict[int, float]:
        import psutil

        start = time.thread_time()
        me = psutil.Process()
        out: dict[int, float] = {}
        for proc in [me, *me.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                out[proc.pid] = t.user + t.system
        self.own_cpu += time.thread_time() - start
        return out


def _daemon_pids(node: Any) -> set[int]:
    """The pids of the processes a Ray node runs for itself (GCS, raylet, monitors)."""
    from raytrainer.launchers.ray.group import node_processes

    return {proc.pid for proc in node_processes(node)}


def account(before: dict[int, float], after: dict[int, float], own_cpu: float, head: set[int], daemons: set[int],
            ranks: set[int]) -> dict[str, float]:
    """Where the CPU between two readings went: the driver (less the readings' own ``own_cpu``), the head node's
    processes (GCS and the rest: the serial part of a cluster), the other nodes' daemons, the ranks (their sum and
    the busiest one) and the other Ray workers (spares, Ray's idle workers)."""
    delta = {pid: cpu - before.get(pid, 0.0) for pid, cpu in after.items()}
    out = {"driver_cpu_s": delta.pop(os.getpid(), 0.0) - own_cpu,
           "head_cpu_s": sum(delta.pop(p, 0.0) for p in head),
           "node_daemons_cpu_s": sum(delta.pop(p, 0.0) for p in daemons)}
    rank_cpu = [delta.pop(p) for p in ranks if p in delta]
    out.update(ranks_cpu_s=sum(rank_cpu), max_rank_cpu_s=max(rank_cpu, default=0.0),
               other_workers_cpu_s=sum(delta.values()))
    out["total_cpu_s"] = sum(v for k, v in out.items() if k not in ("max_rank_cpu_s",))
    return out


def _read_at(sampler: CpuSampler, out: str, marker: str, readings: dict[str, Any], stop: threading.Event) -> bool:
    """(driver thread) Read every process's CPU into ``readings[marker]`` once rank 0's ``marker`` file appears,
    with the sampler's own CPU so far (the polling included); False if it never did."""
    waited = time.thread_time()
    if not _wait_for(lambda: os.path.exists(os.path.join(out, marker)), WAIT_S, stop):
        return False
    sampler.own_cpu += time.thread_time() - waited
    readings[marker] = (sampler.read(), sampler.own_cpu)
    return True


def main_thread_cpu() -> float:
    """CPU seconds of this driver's main thread: the fit's control loop, raytrainer's (the other threads are Ray's
    core worker, gRPC and log threads, and this benchmark's own readers)."""
    import psutil

    main = threading.main_thread().native_id
    return next((t.user_time + t.system_time for t in psutil.Process().threads() if t.id == main), 0.0)


# ------------------------------------------------------------------------------------------- cluster
@contextlib.contextmanager
def simulated_cluster(nodes: int, ranks_per_node: int) -> Iterator[Any]:
    """A head node without CPUs and ``nodes`` nodes of ``ranks_per_node`` CPUs, this driver connected; everything
    (warm rank groups, the connection, every node's processes) is released on exit."""
    import ray
    from ray.cluster_utils import Cluster

    import raytrainer

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        for _ in range(nodes):
            cluster.add_node(num_cpus=ranks_per_node)
        cluster.wait_for_nodes(timeout=120)
        ray.init(address=cluster.address, logging_level="warning")
        yield cluster
    finally:
        with contextlib.suppress(Exception):
            raytrainer.shutdown()
        ray.shutdown()
        for attempt in range(3):  # as the elastic tests: a node may still be going away
            try:
                cluster.shutdown()
                break
            except ValueError:
                if attempt == 2:
                    raise


def settle(max_s: float = 20.0, busy_percent: float = 60.0) -> None:
    """Wait (bounded) until the machine's CPUs are mostly idle: node and worker processes that are still starting
    would slow the next measurement."""
    import psutil

    deadline = time.monotonic() + max_s
    psutil.cpu_percent(None)
    while time.monotonic() < deadline:
        if psutil.cpu_percent(1.0) < busy_percent:
            return


def _wait_for(predicate: Callable[[], Any], timeout_s: float, stop: threading.Event | None = None,
              every_s: float = 0.005) -> Any:
    """``predicate()``'s first true value within ``timeout_s`` (None if none, or once ``stop`` is set)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not (stop is not None and stop.is_set()):
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    return None


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _rows(path: str) -> list[dict[str, Any]]:
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except OSError:
        return []


def _events(root: str) -> list[dict[str, Any]]:
    """Every event of the runs under ``root`` (``events.jsonl``, as tests/launchers/ray/ft_models.events reads)."""
    out: list[dict[str, Any]] = []
    for d, _, files in sorted(os.walk(root)):
        if "events.jsonl" in files:
            out += _rows(os.path.join(d, "events.jsonl"))
    return out


# ------------------------------------------------------------------------------------------- the main run
def _watch(trainer: Any, out: str, nodes: int, traffic: Traffic, box: dict[str, Any], stop: threading.Event,
           sampler: CpuSampler, readings: dict[str, Any]) -> None:
    """(driver thread) The group's start timings once it formed; ``go`` once its spares imported what a rank
    needs; then the driver's CPU (its main thread's apart), the traffic and every process's CPU at rank 0's two
    window marks; then every process's CPU when a rank killed itself and when rank 0 trained again."""
    import ray
    from _scale_models import GO_FILE, MARK_A, MARK_B

    try:
        def formed() -> Any:
            group = trainer.session.worker_group
            ready = group is not None and group.timings and \
                sum(len(s) for s in group._spares.values()) >= nodes * group.spares_per_node
            return group if ready else None

        group = _wait_for(formed, WAIT_S, stop, every_s=0.05)
        if group is None:
            return
        box["timings"] = dict(group.timings)
        box["rank_pids"] = {r.pid for r in group.ranks}
        spares = [a for node in group._spares.values() for a in node]
        t0 = time.time()
        ray.get([a.warm.remote() for a in spares], timeout=300)  # waits for the import the group started
        box["spares_warm_s"] = time.time() - t0
    except Exception as err:  # noqa: BLE001 - the run goes on; the report says what is missing
        box["error"] = f"{type(err).__name__}: {err}"
    finally:
        open(os.path.join(out, GO_FILE), "w").close()
    samples = []
    for mark in (MARK_A, MARK_B):
        at = _wait_for(lambda m=mark: _read_json(os.path.join(out, m)), WAIT_S, stop)
        if at is None:
            return
        samples.append({"mark": at, "cpu": time.process_time(), "own_cpu": time.thread_time(),
                        "main_cpu": main_thread_cpu(), "wall": time.monotonic(), "traffic": traffic.snapshot(),
                        "procs": sampler.read()})
    box["window"] = samples
    from _scale_models import KILLED_FILE, RECOVERED_FILE

    if _read_at(sampler, out, KILLED_FILE, readings, stop):
        _read_at(sampler, out, RECOVERED_FILE, readings, stop)


def run_main(size: int, nodes: int, ranks_per_node: int, root: str, traffic: Traffic, cluster: Any) -> dict[str, Any]:
    """One fit: group start, steady-state driver CPU and traffic, then the kill and the recovery; the CPU every
    process spent in the group start and in the recovery."""
    from _scale_models import STEPS_FILE, Probe, Tiny, loader
    from recovery import analyse

    import raytrainer as pl

    out = tempfile.mkdtemp(prefix=f"main-{size}-", dir=root)
    probe = Probe(out, window=WINDOW, epoch_steps=EPOCH_STEPS, kill=True, stop_after=STOP_AFTER)
    trainer = pl.Trainer(num_nodes=nodes, num_processes=ranks_per_node, accelerator="cpu", max_steps=MAX_STEPS,
                         max_failures=1, default_root_dir=out, enable_progress_bar=True, enable_model_summary=False,
                         logger=False, enable_checkpointing=False, callbacks=[probe])
    box: dict[str, Any] = {}
    stop = threading.Event()
    from _scale_models import FIRST_FILE, KILLED_FILE, RECOVERED_FILE

    sampler, readings = CpuSampler(), {}
    watcher = threading.Thread(target=_watch, args=(trainer, out, nodes, traffic, box, stop, sampler, readings),
                               daemon=True)
    cpu_sampler = threading.Thread(target=_read_at, args=(sampler, out, FIRST_FILE, readings, stop), daemon=True)
    before = (sampler.read(), sampler.own_cpu)
    watcher.start()
    cpu_sampler.start()
    t_fit = time.time()
    try:
        trainer.fit(Tiny(SLEEP_S), loader(EPOCH_STEPS, size))
    finally:
        stop.set()
        watcher.join(timeout=10)
        cpu_sampler.join(timeout=10)
    head = _daemon_pids(cluster.head_node)
    daemons = set().union(*(_daemon_pids(n) for n in cluster.worker_nodes))
    rows = _rows(os.path.join(out, STEPS_FILE))
    timings = box.get("timings", {})
    result: dict[str, Any] = {"start_s": rows[0]["t"] - t_fit, "fit_s": time.time() - t_fit, "timings": timings,
                              "spares_warm_s": box.get("spares_warm_s")}
    if "start_s" in timings:  # the driver's preparation, the ranks' setup and their first step
        result["outside_group_start_s"] = result["start_s"] - timings["start_s"]
    if "error" in box:
        result["watch_error"] = box["error"]
    window = box.get("window")
    if window is not None:
        a, b = window
        steps = b["mark"]["step"] - a["mark"]["step"]
        ta, tb = a["traffic"], b["traffic"]
        cpu = (b["cpu"] - a["cpu"]) - (b["own_cpu"] - a["own_cpu"]) - (tb["overhead_cpu"] - ta["overhead_cpu"])
        types = {k: (tb["by_type"].get(k, 0) - ta["by_type"].get(k, 0)) / steps for k in tb["by_type"]}
        wall = b["wall"] - a["wall"]
        main = b["main_cpu"] - a["main_cpu"]
        result.update(
            window_steps=steps, step_ms=1e3 * (b["mark"]["t"] - a["mark"]["t"]) / steps,
            driver_cpu_ms_per_100=1e5 * cpu / steps, driver_cpu_percent=100 * cpu / wall,
            driver_main_cpu_ms_per_100=1e5 * main / steps, driver_main_cpu_percent=100 * main / wall,
            background_cpu_per_s={k: v / wall for k, v in account(
                a["procs"], b["procs"], 0.0, head, daemons, box.get("rank_pids", set())).items()},
            messages_per_step=(tb["messages"] - ta["messages"]) / steps,
            bytes_per_step=(tb["bytes"] - ta["bytes"]) / steps, polls_per_step=(tb["polls"] - ta["polls"]) / steps,
            messages_by_type_per_step={k: v for k, v in types.items() if v})
    if FIRST_FILE in readings and "rank_pids" in box:  # the spares importing meanwhile count as other workers
        result["start_cpu"] = account(before[0], readings[FIRST_FILE][0], readings[FIRST_FILE][1] - before[1],
                                      head, daemons, box["rank_pids"])
    group = trainer.session.worker_group
    if RECOVERED_FILE in readings and group is not None:
        result["recovery_cpu"] = account(readings[KILLED_FILE][0], readings[RECOVERED_FILE][0],
                                         readings[RECOVERED_FILE][1] - readings[KILLED_FILE][1], head, daemons,
                                         {r.pid for r in group.ranks})
    if os.path.exists(os.path.join(out, "killed")):
        with open(os.path.join(out, "marks.json"), "w") as f:  # the driver's phase marks: the recovery's breakdown
            json.dump(getattr(trainer.last_run, "marks", []), f)
        result.update(analyse(out))
        restarts = [e for e in _events(out) if e["event"] == "restart"]
        result["recovered_by"] = restarts[0].get("cause") if restarts else None
        # a warm spare replaced the dead rank and the survivors were kept; else the whole group was started again
        result["recovery_mode"] = "repair" if "replaced" in (result["recovered_by"] or "") else "restart"
        result["reform_s"] = (group.timings if group is not None else {}).get("reform_s")
    return result


# ------------------------------------------------------------------------------------------- the resize run
def run_resize(size: int, nodes: int, ranks_per_node: int, cluster: Any, root: str) -> dict[str, Any]:
    """An elastic fit over the cluster's nodes; one more node joins while it trains."""
    from _scale_models import STEPS_FILE, Probe, Tiny, loader

    import raytrainer as pl

    out = tempfile.mkdtemp(prefix=f"resize-{size}-", dir=root)
    grow_to = size + ranks_per_node
    trainer = pl.Trainer(num_nodes=f"1:{nodes + 1}", num_processes=ranks_per_node, accelerator="cpu",
                         max_steps=MAX_STEPS, default_root_dir=out, enable_progress_bar=False,
                         enable_model_summary=False, logger=False, enable_checkpointing=False,
                         scale_check_interval_s=1.0, callbacks=[Probe(out, grow_to=grow_to, stop_after=10)])
    box: dict[str, Any] = {}

    def fit() -> None:
        try:
            trainer.fit(Tiny(SLEEP_S), loader(EPOCH_STEPS, grow_to))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            box["error"] = exc

    steps = os.path.join(out, STEPS_FILE)
    thread = threading.Thread(target=fit, daemon=True)
    t_fit = time.time()
    thread.start()
    trained = _wait_for(lambda: len(_rows(steps)) >= 20 or not thread.is_alive(), WAIT_S, every_s=0.2)
    if not trained or not thread.is_alive():
        raise RuntimeError(f"the elastic run did not train at world {size}: {box.get('error')}")
    first = _rows(steps)[0]
    t_add = time.time()
    cluster.add_node(num_cpus=ranks_per_node)  # in the main thread, as Ray needs; returns once the node joined
    t_joined = time.time()
    grown = _wait_for(lambda: next((r for r in _rows(steps) if r["world"] >= grow_to), None), WAIT_S,
                      every_s=0.05)
    thread.join(WAIT_S)
    if grown is None:
        raise RuntimeError(f"the world did not grow from {size} to {grow_to}: {box.get('error')}")
    resize = next((e for e in _events(out) if e["event"] == "resize"), None)
    return {"resize_s": grown["t"] - t_add, "node_join_s": t_joined - t_add,
            "resize_event_s": resize["time"] - t_add if resize else None, "from_world": first["world"],
            "to_world": grown["world"], "elastic_start_s": first["t"] - t_fit}


# ------------------------------------------------------------------------------------------- fits and report
def linear_fit(xs: list[float], ys: list[float]) -> dict[str, float]:
    """Least squares ``y = a + b x``, with R^2 (1.0 for a perfect fit or a constant)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    a = my - b * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    return {"a": a, "b": b, "r2": 1 - ss_res / ss_tot if ss_tot else 1.0}


def analyse_metric(sizes: list[int], values: list[float]) -> dict[str, Any]:
    """The linear fit, the power-law exponent, the value per rank at each size, and the value at 1024 ranks."""
    fit = linear_fit([float(s) for s in sizes], values)
    exponent = None
    if len(sizes) >= 2 and all(v > 0 for v in values):
        exponent = linear_fit([math.log(s) for s in sizes], [math.log(v) for v in values])["b"]
    return {**fit, "exponent": exponent, "per_rank": {str(s): v / s for s, v in zip(sizes, values)},
            "at_target": fit["a"] + fit["b"] * TARGET_RANKS, "sizes": sizes, "values": values}


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def report(per_size: dict[int, dict[str, Any]], ranks_per_node: int, elapsed_s: float, repeats: int) -> None:
    """Print the per-size table, the fits and extrapolation with the targets, and the RESULTS line."""
    sizes = sorted(per_size)
    metrics = {  # name -> (label, unit)
        "start_s": ("group start", "s"),
        "placement_s": ("group start: placement", "s"),
        "actors_s": ("group start: rank actors", "s"),
        "rendezvous_s": ("group start: rendezvous", "s"),
        "outside_group_start_s": ("group start: the rest (driver preparation, ranks' setup, first step)", "s"),
        "driver_cpu_ms_per_100": ("driver CPU per 100 steps", "ms"),
        "driver_cpu_percent": ("driver CPU, share of one core", "%"),
        "driver_main_cpu_ms_per_100": ("driver's main thread (raytrainer's control loop) CPU per 100 steps", "ms"),
        "driver_main_cpu_percent": ("driver's main thread CPU, share of one core", "%"),
        "messages_per_step": ("messages per step", ""),
        "bytes_per_step": ("bytes per step", "B"),
        "recovery_s": ("recovery", "s"),
        "resize_s": ("resize", "s"),
    }
    print(f"\n## Scaling on a simulated cluster ({ranks_per_node} ranks per node, one core per rank reserved; "
          f"{os.cpu_count()} real cores; median of {repeats}; {elapsed_s / 60:.1f} min in all)\n")
    print("| ranks | nodes | group start (s) | placement / actors / rendezvous (s) | driver CPU per 100 steps (ms) "
          "| driver CPU (% of a core) | step (ms) | messages per step | bytes per step | polls per step "
          "| recovery (s) | steps lost | resize (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for s in sizes:
        r = per_size[s]
        resize = f"{_fmt(r.get('resize_s'))} (to {r['to_world']})" if r.get("resize_s") is not None else "-"
        print(f"| {s} | {s // ranks_per_node} | {_fmt(r.get('start_s'))} | {_fmt(r.get('placement_s'))} / "
              f"{_fmt(r.get('actors_s'))} / {_fmt(r.get('rendezvous_s'))} | {_fmt(r.get('driver_cpu_ms_per_100'), 1)} "
              f"| {_fmt(r.get('driver_cpu_percent'), 1)} | {_fmt(r.get('step_ms'), 1)} "
              f"| {_fmt(r.get('messages_per_step'), 3)} | {_fmt(r.get('bytes_per_step'), 1)} "
              f"| {_fmt(r.get('polls_per_step'), 3)} | {_fmt(r.get('recovery_s'))} ({r.get('recovery_mode', '-')}) "
              f"| {_fmt(r.get('steps_lost'), 0)} "
              f"| {resize} |")
    stages = {s: per_size[s]["runs"][0].get("breakdown") for s in sizes}
    labels = list(dict.fromkeys(label for b in stages.values() if b for label in b))
    if labels:
        print("\nWhere each size's recovery went (its first run; seconds from the kill, stage by stage):\n")
        print("| ranks | " + " | ".join(labels) + " |")
        print("|---|" + "---|" * len(labels))
        for s in sizes:
            b = stages[s] or {}
            print(f"| {s} | " + " | ".join(_fmt(b.get(label), 3) for label in labels) + " |")
    fits: dict[str, Any] = {}
    for key in metrics:
        measured = [s for s in sizes if per_size[s].get(key) is not None]
        if len(measured) >= 2:
            fits[key] = analyse_metric(measured, [per_size[s][key] for s in measured])
    print(f"\nmeasured up to {max(sizes)} ranks ({max(sizes) // ranks_per_node} nodes); extrapolated beyond, to "
          f"{TARGET_RANKS} ranks on {TARGET_NODES} nodes ({TARGET_RANKS // TARGET_NODES} ranks per node), with the "
          "linear fit a + b * ranks:\n")
    print("| metric | sizes fitted | a | b (per rank) | R^2 | power-law exponent | per rank, smallest -> largest size "
          f"| at {TARGET_RANKS} ranks |")
    print("|---|---|---|---|---|---|---|---|")
    for key, f in fits.items():
        label, unit = metrics[key]
        per_rank = f["per_rank"]
        lo, hi = per_rank[str(f["sizes"][0])], per_rank[str(f["sizes"][-1])]
        name = f"{label} ({unit})" if unit else label
        print(f"| {name} | {len(f['sizes'])} | {f['a']:.4g} | {f['b']:.4g} | {f['r2']:.3f} | {_fmt(f['exponent'])} "
              f"| {lo:.4g} -> {hi:.4g} | {f['at_target']:.4g} |")
    targets: dict[str, Any] = {}
    for key in CPU_TARGET_KEYS:  # per step, and per second of training (slower steps do not count against it)
        if key in fits:
            f = fits[key]
            growth = f["b"] * TARGET_RANKS / f["a"] if f["a"] > 0 else float("inf")
            targets[key] = {"b_times_1024_over_a": growth, "tolerance": CPU_GROWTH_TOLERANCE,
                            "pass": growth <= CPU_GROWTH_TOLERANCE}
    for key, limit in (("start_s", START_TARGET_S), ("recovery_s", RECOVERY_TARGET_S)):
        if key in fits:
            targets[key] = {"extrapolated_s": fits[key]["at_target"], "limit_s": limit,
                            "pass": fits[key]["at_target"] <= limit}
    models = {key: component_model(per_size, key, ranks_per_node) for key in ("start", "recovery")}
    for key, limit in (("start", START_TARGET_S), ("recovery", RECOVERY_TARGET_S)):
        if models[key] is not None:
            targets[f"{key}_model_s"] = {"extrapolated_s": models[key]["at_target"], "limit_s": limit,
                                         "pass": models[key]["at_target"] <= limit}
    print(f"\nTargets at {TARGET_RANKS} ranks:")
    for key in CPU_TARGET_KEYS:
        if key in targets:
            t = targets[key]
            verdict = "PASS" if t["pass"] else "FAIL"
            print(f"- {metrics[key][0]} independent of world size (b * {TARGET_RANKS} <= {CPU_GROWTH_TOLERANCE:.0%} "
                  f"of a): b * {TARGET_RANKS} / a = {t['b_times_1024_over_a']:.2f} -> {verdict}")
    print("  (the main thread runs raytrainer's control loop: polls, messages, ticks; the driver's other threads are "
          "Ray's core worker, which owns one actor and one running task per rank)")
    for key, label in (("start_s", "group start, this machine's wall clock fitted"),
                       ("start_model_s", "group start, the CPU model"),
                       ("recovery_s", "recovery, this machine's wall clock fitted"),
                       ("recovery_model_s", "recovery, the CPU model")):
        if key in targets:
            t = targets[key]
            print(f"- {label} <= {t['limit_s']:g} s: extrapolated {t['extrapolated_s']:.1f} s -> "
                  f"{'PASS' if t['pass'] else 'FAIL'}")
    print(f"\nNote: every simulated node shares this machine's {os.cpu_count()} cores, so N rank processes importing "
          "torch (and forming the gloo mesh) contend for them: the per-rank start, recovery and resize costs measured "
          "here are an upper bound for a real cluster, whose nodes start their ranks in parallel. Steps are slower "
          "at larger worlds for the same reason, and the driver's per-second costs (polls, heartbeats) then count "
          "over more seconds per step: compare 'driver CPU, share of one core' too.")
    print("RESULTS " + json.dumps({"ranks_per_node": ranks_per_node, "repeats": repeats, "elapsed_s": elapsed_s,
                                   "per_size": {str(s): per_size[s] for s in sizes}, "fits": fits,
                                   "models": models, "targets": targets}, default=str))


# The CPU model: what a real cluster of TARGET_NODES nodes would take, from the CPU each kind of process spent here.
MODEL_PARTS = (  # key -> what it is
    ("serial_s", "serial: the driver's and the head node's (GCS) CPU, less the head's background"),
    ("node_daemons_per_node_s", "per node: its Ray daemons' CPU less their background, and its spares'"),
    ("max_rank_s", "per rank: the busiest rank's CPU"),
    ("waiting_s", "waiting: wall clock beyond what the CPU explains here (wall - all CPU / cores)"),
)


def model_parts(row: dict[str, Any], window: str, nodes: int) -> dict[str, float] | None:
    """One size's CPU model parts for ``window`` ("start" or "recovery"), from its median run's accounting."""
    runs = [r for r in row["runs"] if f"{window}_cpu" in r and r.get(f"{window}_s") is not None]
    if not runs:
        return None
    run = sorted(runs, key=lambda r: r[f"{window}_s"])[len(runs) // 2]
    cpu, wall = run[f"{window}_cpu"], run[f"{window}_s"]
    # The head's and the nodes' daemons work the same every second whatever happens (resource reports, health
    # checks, metrics): their rate in the steady-state window times this window's length is not its work.
    background = run.get("background_cpu_per_s", {})

    def work(key: str) -> float:
        return max(0.0, cpu[key] - background.get(key, 0.0) * wall)

    return {"serial_s": cpu["driver_cpu_s"] + work("head_cpu_s"),
            "node_daemons_per_node_s": (work("node_daemons_cpu_s") + cpu["other_workers_cpu_s"]) / nodes,
            "max_rank_s": cpu["max_rank_cpu_s"],
            "waiting_s": max(0.0, wall - cpu["total_cpu_s"] / (os.cpu_count() or 1)),
            "wall_s": wall, "total_cpu_s": cpu["total_cpu_s"]}


def component_model(per_size: dict[int, dict[str, Any]], window: str, ranks_per_node: int) -> dict[str, Any] | None:
    """Fit each part of the CPU model linearly in the ranks and add them up at TARGET_RANKS ranks on TARGET_NODES
    nodes: serial + per node / (ranks per node) + busiest rank + waiting. A node's daemons share its cores with
    its ranks, and Ray reserves a core per rank, so a node of 8 ranks has at least 8 cores; the ranks of
    different nodes run at once. Prints the table; None without two sizes measured."""
    sizes = sorted(per_size)
    parts = {s: model_parts(per_size[s], window, s // ranks_per_node) for s in sizes}
    sizes = [s for s in sizes if parts[s] is not None]
    if len(sizes) < 2:
        return None
    per_node_target = TARGET_RANKS // TARGET_NODES
    fits = {key: analyse_metric(sizes, [parts[s][key] for s in sizes]) for key, _ in MODEL_PARTS}
    at = {key: max(0.0, f["at_target"]) for key, f in fits.items()}
    total = at["serial_s"] + at["node_daemons_per_node_s"] / per_node_target + at["max_rank_s"] + at["waiting_s"]
    print(f"\n{window}, the CPU model (CPU seconds each kind of process spent in the {window}, read with psutil; "
          f"{os.cpu_count()} cores here):\n")
    print("| ranks | wall (s) | all CPU (s) | " + " | ".join(label for _, label in MODEL_PARTS) + " |")
    print("|---|---|---|" + "---|" * len(MODEL_PARTS))
    for s in sizes:
        p = parts[s]
        print(f"| {s} | {p['wall_s']:.2f} | {p['total_cpu_s']:.2f} | "
              + " | ".join(f"{p[key]:.3f}" for key, _ in MODEL_PARTS) + " |")
    print("| fit a + b * ranks (R^2) | | | " + " | ".join(
        f"{fits[key]['a']:.3g} + {fits[key]['b']:.3g} N ({fits[key]['r2']:.2f})" for key, _ in MODEL_PARTS) + " |")
    print(f"| at {TARGET_RANKS} ranks | | | " + " | ".join(f"{at[key]:.2f}" for key, _ in MODEL_PARTS) + " |")
    print(f"\n{window} at {TARGET_RANKS} ranks on {TARGET_NODES} nodes ({per_node_target} cores each) = serial "
          f"{at['serial_s']:.2f} + per node {at['node_daemons_per_node_s']:.2f} / {per_node_target} + busiest rank "
          f"{at['max_rank_s']:.2f} + waiting {at['waiting_s']:.2f} = {total:.1f} s")
    return {"parts": {str(s): parts[s] for s in sizes}, "fits": fits, "at_parts": at, "at_target": total}


# ------------------------------------------------------------------------------------------- cleanup
def leftover_processes(marker_env: str, value: str) -> list[int]:
    """Processes (this one excluded) whose environment has ``marker_env=value``: what this benchmark's Ray left."""
    import psutil

    pids = []
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == os.getpid():
            continue
        with contextlib.suppress(psutil.Error):
            if proc.environ().get(marker_env) == value:
                pids.append(proc.pid)
    return pids


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="4,8,16", help="world sizes (ranks), comma separated")
    p.add_argument("--ranks-per-node", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="main runs per size (medians are reported)")
    p.add_argument("--resize-sizes", default=None,
                   help="sizes to measure a resize at (default: the smallest and the largest; 'none' for none)")
    args = p.parse_args()
    sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    rpn = args.ranks_per_node
    if any(s % rpn or s < rpn for s in sizes):
        p.error(f"every size must be a multiple of --ranks-per-node ({rpn})")
    if args.resize_sizes is None:
        resize_sizes = {sizes[0], sizes[-1]}
    elif args.resize_sizes.strip().lower() == "none":
        resize_sizes = set()
    else:
        resize_sizes = {int(s) for s in args.resize_sizes.split(",") if s.strip()}

    import logging
    import warnings

    import raytrainer

    warnings.filterwarnings("ignore")
    logging.getLogger("ray").setLevel(logging.ERROR)
    os.environ.pop("RAY_ADDRESS", None)
    # A private Ray temp dir (short: Unix socket paths are limited): the cluster's address file goes there, so other
    # Ray programs on this machine do not join it, and its logs go when the benchmark ends.
    ray_tmp = tempfile.mkdtemp(prefix="rts-", dir="/tmp")
    os.environ["RAY_TMPDIR"] = ray_tmp
    root = tempfile.mkdtemp(prefix="scale-")
    traffic = Traffic()
    per_size: dict[int, dict[str, Any]] = {}
    started = time.time()
    try:
        with counting(traffic):
            for size in sizes:
                nodes = size // rpn
                t_size = time.time()
                with simulated_cluster(nodes, rpn) as cluster:
                    runs = []
                    for i in range(args.repeats):
                        settle()
                        runs.append(run_main(size, nodes, rpn, root, traffic, cluster))
                        print(f"[{size} ranks] run {i + 1}: {json.dumps(runs[-1], default=str)}", flush=True)
                        raytrainer.shutdown()  # the next run starts its own group
                    row: dict[str, Any] = {"runs": runs}
                    row["recovery_mode"] = "/".join(sorted({str(r.get("recovery_mode")) for r in runs}))
                    for key in MEDIAN_KEYS:
                        row[key] = _median(runs, key)
                    for key in ("placement_s", "actors_s", "rendezvous_s"):
                        row[key] = _median([r["timings"] for r in runs], key)
                    if size in resize_sizes:
                        settle()
                        rz = run_resize(size, nodes, rpn, cluster, root)
                        print(f"[{size} ranks] resize: {json.dumps(rz)}", flush=True)
                        row.update(rz)
                    per_size[size] = row
                print(f"[{size} ranks] done in {time.time() - t_size:.0f} s", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        clean = _wait_for(lambda: not leftover_processes("RAY_TMPDIR", ray_tmp), 15.0, every_s=0.5)
        if not clean:
            pids = leftover_processes("RAY_TMPDIR", ray_tmp)
            print(f"stopping {len(pids)} process(es) this benchmark's Ray left: {pids}", flush=True)
            import signal

            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    if per_size:
        report(per_size, rpn, time.time() - started, args.repeats)


if __name__ == "__main__":
    main()
