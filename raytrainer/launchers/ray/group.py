"""A group of Ray actors, one per rank, joined into one torch process group.

``WorkerGroup`` reserves the resources (a placement group), starts the rank actors, forms the
process group and runs a function on every rank. It knows nothing about training: the launcher
hands it a function and decides what to do when a rank fails. Every wait here is bounded, and a
failing rank comes back as a ``RankError`` that names the rank, its node and its traceback.
"""
from __future__ import annotations

import atexit
import collections
import contextlib
import functools
import io
import logging
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import psutil
import ray
from ray import cloudpickle  # Ray's copy: ObjectRefs inside run()/call() arguments stay resolvable on the ranks
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from raytrainer.launchers.ray import rendezvous
from raytrainer.launchers.ray.worker import RankInfo, RankOutcome, RankWorker
from raytrainer.utilities import env_number
from raytrainer.utilities.console import without_log_messages

log = logging.getLogger(__name__)

MessageHandler = Callable[[int, Any], None]

# After the first failure, wait this long for other ranks' failures so the root cause (a rank
# that died) is reported rather than a peer's "connection closed" that followed from it.
FAILURE_GRACE_S = 0.5
FAILURE_SLICE_S = 0.02  # within the grace, how often the driver looks whether a death is known yet
# After a failure, how long peers may stay blocked in a collective before ranks that cannot close their connections
# (see WorkerGroup.settle) exit to release them.
HELD_GROUP_WAIT_S = 0.3
ACTOR_NAME_PREFIX = "raytrainer-"


class PlacementError(RuntimeError):
    """The cluster could not provide the requested ranks within the placement timeout."""


class RankError(RuntimeError):
    """A rank raised or died; carries the rank, its node and the rank's own traceback."""

    def __init__(self, message: str, rank: int, node_ip: str, node_id: str, traceback: str,
                 died: bool, exception: BaseException | None = None) -> None:
        super().__init__(message)
        self.rank = rank
        self.node_ip = node_ip
        self.node_id = node_id
        self.traceback = traceback
        self.died = died              # the process died (killed, OOM, node lost) vs. raised
        self.exception = exception    # the rank's exception object, when it could be sent back
        self.failed: dict[int, bool] = {rank: died}  # every rank that failed -> whether its process died


class GroupTimeoutError(TimeoutError):
    """The ranks did not finish within the time the caller allowed."""


class WorldTooLargeError(RuntimeError):
    """A local Ray instance would start more rank processes than this machine's available memory holds."""


# What one rank process needs, measured (Ray 2.60, torch 2.13 CPU build, a 2-rank fit of a small MLP): a rank
# actor's own memory (USS, which a new process takes from the available memory) is about 290 MiB, its RSS about
# 445 MiB, as it imports torch and raytrainer. The estimate adds room for the rank's model, optimizer state and
# batches. Ray's own processes (GCS, raylet, dashboard, agents) took about 350 MiB together.
RANK_MEMORY_ENV = "RAYTRAINER_RANK_MEMORY_MB"
DEFAULT_RANK_MEMORY_MB = 512
RAY_OWN_MEMORY_MB = 512


def rank_memory_estimate_mb() -> float:
    """MiB one rank process is expected to need: ``RAYTRAINER_RANK_MEMORY_MB`` if set, else the measured default."""
    return env_number(RANK_MEMORY_ENV, DEFAULT_RANK_MEMORY_MB,
                      f"a memory size: give the MiB one rank process needs (e.g. {RANK_MEMORY_ENV}=1024), or 0 to "
                      "skip the memory check of local Ray runs.")


def check_local_memory(num_ranks: int) -> None:
    """Refuse, before Ray or any actor starts, a local world whose rank processes cannot fit in this machine's
    available memory (``WorldTooLargeError`` with the numbers and what to do instead)."""
    per_rank = rank_memory_estimate_mb()
    if per_rank == 0 or num_ranks <= 0:
        return
    needed = num_ranks * per_rank + RAY_OWN_MEMORY_MB
    available = psutil.virtual_memory().available / 2**20
    if needed <= available:
        return
    source = f"from {RANK_MEMORY_ENV}" if os.environ.get(RANK_MEMORY_ENV, "").strip() else \
        "the measured default: a rank imports torch, about 290 MiB before any training state"
    raise WorldTooLargeError(
        f"refusing to start a local Ray instance for {num_ranks} rank process(es): they need about "
        f"{num_ranks} x {per_rank:g} MiB per rank ({source}) + {RAY_OWN_MEMORY_MB} MiB for Ray's own processes = "
        f"{needed / 1024:.1f} GiB, but this machine has {available / 1024:.1f} GiB of memory available "
        f"({os.cpu_count() or 1} CPU core(s)). Use fewer ranks (num_processes/devices), or run on a Ray cluster "
        "(Trainer(ray_address='HOST:PORT') or `raytrainer fit --address HOST:PORT train.py`). To run it here "
        f"anyway, set {RANK_MEMORY_ENV} to the MiB one rank really needs (0 skips this check).")


# ------------------------------------------------------------------------------------------------
# Ray session
# ------------------------------------------------------------------------------------------------
def ensure_ray(num_cpus_needed: int, num_gpus_needed: int = 0, address: str | None = None,
               num_ranks: int | None = None) -> bool:
    """Make sure this process is connected to Ray; True if this call started a local instance.

    Order: an existing connection; ``address`` or ``RAY_ADDRESS``; a cluster started on this
    machine with ``ray start`` (found without waiting); else a new local instance with at least
    ``num_cpus_needed`` logical CPUs, so 8 ranks run on a 2-core laptop. ``address="local"``
    skips the search and always starts a private instance. Only the caller that got True should
    call ``ray.shutdown()``. A local instance this function started that is too small for a later,
    bigger world is restarted larger while nothing runs on it (as Lightning would just start more
    processes). Before a local instance starts, ``num_ranks`` rank processes (default: one per CPU
    needed) must fit in the available memory (``check_local_memory``); a cluster is not checked.
    """
    global _OWN_LOCAL_GCS
    ranks = int(math.ceil(num_cpus_needed)) if num_ranks is None else num_ranks
    if ray.is_initialized():
        if not _own_instance_too_small(num_cpus_needed):
            return False
        check_local_memory(ranks)  # before the instance that is there goes
        log.debug("restarting the local Ray instance with room for %d ranks", num_cpus_needed)
        ray.shutdown()
        address = "local"
    quiet = dict(log_to_driver=True, configure_logging=True, logging_level=logging.WARNING)
    _plain_worker_prefixes()
    if address == "local":
        address = None
    else:
        address = address or os.environ.get("RAY_ADDRESS") or _running_local_cluster()
    if address is not None:
        log.debug("connecting to the Ray cluster at %s", address)
        ray.init(address=address, **quiet)
        return False
    check_local_memory(ranks)
    num_cpus = max(os.cpu_count() or 1, int(math.ceil(num_cpus_needed)))
    log.debug("starting a local Ray instance with %d logical CPUs", num_cpus)
    # GPUs are detected by Ray; asking for more than exist would only hide the real shortage.
    # "local" so Ray itself never swaps in an address from RAY_ADDRESS or a leftover address file.
    # Ray turns token authentication on for every new local instance and warns that it did: this private instance
    # is ours, so the warning asks nothing of the user (a cluster's own auth messages are left alone).
    with without_log_messages(TOKEN_SETUP_LOGGER, "Token authentication is enabled for this Ray cluster."):
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **quiet)
    if _OWN_LOCAL_GCS is None:  # registered after Ray's own exit hook, so it runs first
        atexit.register(stop_own_local_instance)
    _OWN_LOCAL_GCS = ray.get_runtime_context().gcs_address
    return True


def stop_own_local_instance(grace_s: float = 0.2) -> None:
    """(at exit) Stop the local Ray instance ensure_ray started, all its processes at once.

    Ray's own exit hook sleeps 0.5 s, then stops the instance's processes one after the other, giving each up to
    1 s to exit (1.3-1.8 s on a 2-core laptop, added to every script's exit). Nothing of ours runs on the
    instance any more at this point (the rank groups were released first), so the driver disconnects, every
    process gets SIGTERM together, and those still running after ``grace_s`` get SIGKILL (as Ray's own
    escalation does, a second later). Any other connection is left to Ray's hook."""
    if not _is_own_local_instance():
        return
    worker = ray._private.worker
    node = worker._global_node
    try:
        procs = node_processes(node)
    except Exception as err:  # noqa: BLE001 - Ray's internals changed: its own hook stops the instance
        log.debug("stopping the local Ray instance the slow way: %s", err)
        return
    # The raylet's own children (its dashboard and runtime-env agents, idle workers) are not in all_processes: killed
    # with the raylet, they outlived it by about a minute, holding the agent's fixed HTTP port, and the next script's
    # ray.init then waited 4 s for that port. They are stopped with the rest.
    children = _descendants([proc.pid for proc in procs])
    worker._global_node = None  # ray.shutdown() then only disconnects this driver
    try:
        ray.shutdown()
        node.destroy_external_storage()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.terminate()
        deadline = time.monotonic() + grace_s
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
        _, alive = psutil.wait_procs(children, timeout=max(0.0, deadline - time.monotonic()))
        for child in alive:
            with contextlib.suppress(psutil.Error):
                child.kill()
        for proc in procs:
            try:
                proc.wait(timeout=1.0)  # reaped; one stuck in the kernel is left behind rather than waited on
            except subprocess.TimeoutExpired:
                log.debug("Ray process %s did not exit after SIGKILL", proc.pid)


def node_processes(node: Any) -> list[subprocess.Popen]:
    """The processes a Ray node (``ray._private.node.Node``) started for itself: GCS, raylet, monitors. Not the
    raylet's own children (its agents, the workers): see ``_descendants``."""
    return [info.process for infos in node.all_processes.values() for info in infos if info.process is not None]


def _descendants(pids: list[int]) -> list[psutil.Process]:
    """Every live descendant of ``pids`` (children, grandchildren, ...), each once."""
    found: dict[int, psutil.Process] = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            found.update((p.pid, p) for p in psutil.Process(pid).children(recursive=True))
    for pid in pids:
        found.pop(pid, None)
    return list(found.values())


_OWN_LOCAL_GCS: str | None = None  # GCS address of the local instance ensure_ray started, if any
TOKEN_SETUP_LOGGER = "ray._private.authentication.authentication_token_setup"


def _plain_worker_prefixes() -> None:
    """Ray colours the ``(rank-1 pid=...)`` prefix of the lines it relays from rank processes: not when this driver
    writes to a file or a pipe, where the codes would be noise (``RAY_COLOR_PREFIX`` set by the user wins)."""
    if "RAY_COLOR_PREFIX" not in os.environ and not all(
            getattr(stream, "isatty", lambda: False)() for stream in (sys.stdout, sys.stderr)):
        os.environ["RAY_COLOR_PREFIX"] = "0"


def _own_instance_too_small(num_cpus_needed: int) -> bool:
    """True when the local instance ensure_ray started has too few CPUs and runs no actors: the caller may shut it
    down and start a bigger one. Instances that others started, or that still run actors (ours or the user's),
    are never touched."""
    try:
        if _OWN_LOCAL_GCS is None or ray.get_runtime_context().gcs_address != _OWN_LOCAL_GCS:
            return False
        if ray.cluster_resources().get("CPU", 0) >= num_cpus_needed:
            return False
        if any(a.get("State") == "ALIVE" for a in ray._private.state.actors().values()):
            log.warning("the local Ray instance has %g CPUs, fewer than the %d ranks need, but actors "
                        "still run on it, so it is not restarted", ray.cluster_resources().get("CPU", 0),
                        num_cpus_needed)
            return False
    except Exception as err:  # noqa: BLE001 - if the state cannot be read, leave the session alone
        log.debug("could not check the local Ray instance's size: %s", err)
        return False
    return True


def _is_own_local_instance() -> bool:
    """Whether this process is connected to the local instance ensure_ray started (not a cluster)."""
    try:
        # (get_runtime_context() would start a new instance when none is connected)
        return _OWN_LOCAL_GCS is not None and ray.is_initialized() and \
            ray.get_runtime_context().gcs_address == _OWN_LOCAL_GCS
    except Exception:  # noqa: BLE001 - not connected
        return False


def _running_local_cluster() -> str | None:
    """The address of a live cluster started with ``ray start`` on this machine, if any.

    Ray records the last ``ray start`` address in a file that outlives the cluster, so it only
    counts when a GCS process with that address is running. Instances that other programs
    started with ``ray.init()`` belong to those programs and are not joined.
    """
    try:
        from ray._private import services, utils

        recorded = utils.read_ray_address(None)
        if not recorded:
            return None
        return recorded if recorded in services.find_gcs_addresses() else None
    except Exception as err:  # noqa: BLE001 - private helpers may move; then we start our own
        log.debug("could not look for a running local Ray cluster: %s", err)
        return None


# ------------------------------------------------------------------------------------------------
# Picklability
# ------------------------------------------------------------------------------------------------
def check_picklable(obj: Any, name: str) -> None:
    """Raise TypeError naming the attribute path (e.g. ``model.log_file``) that cannot be pickled.

    Everything sent to the ranks is pickled with cloudpickle; this finds the culprit before any
    actor starts instead of failing deep inside Ray.
    """
    try:
        cloudpickle.dumps(obj)
    except Exception as err:  # noqa: BLE001 - any pickling failure is reported the same way
        raise _unpicklable_error(obj, name, err) from err


def _unpicklable_error(obj: Any, name: str, err: Exception) -> TypeError:
    chain = _find_unpicklable(obj, name, err, seen={id(obj)}, depth=0)
    path, leaf, leaf_err = chain[-1]
    lines = [f"{path} cannot be pickled, so it cannot be sent to the Ray workers: it is "
             f"{_describe(leaf)} ({type(leaf_err).__name__}: {leaf_err})."]
    for outer_path, outer, _ in chain[:-1]:
        if isinstance(outer, (types.FunctionType, types.MethodType, functools.partial)):
            lines.append(f"{outer_path} is {_describe(outer)}.")
    lines.append(f"Everything handed to the ranks ({name} included) is pickled: drop the "
                 "attribute before fit(), create it lazily on the rank (e.g. in setup()), or "
                 "leave it out in __getstate__.")
    return TypeError(" ".join(lines))


def _find_unpicklable(obj: Any, path: str, err: Exception, seen: set[int],
                      depth: int) -> list[tuple[str, Any, Exception]]:
    """The chain from obj down to the deepest part that fails to pickle on its own."""
    here = [(path, obj, err)]
    if depth > 40:
        return here
    for label, child in _children(obj):
        if id(child) in seen or _surely_picklable(child):
            continue
        seen.add(id(child))
        try:
            cloudpickle.dumps(child)
        except Exception as child_err:  # noqa: BLE001
            return here + _find_unpicklable(child, path + label, child_err, seen, depth + 1)
    return here


def _surely_picklable(obj: Any) -> bool:
    import torch

    return obj is None or isinstance(obj, (bool, int, float, complex, str, bytes, torch.Tensor))


def _children(obj: Any) -> list[tuple[str, Any]]:
    """Labelled parts of obj as pickling sees them: items, attributes, closures, globals."""
    import torch

    if isinstance(obj, dict):
        return [(f"[{k!r}]", v) for k, v in obj.items()]
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [(f"[{i}]", v) for i, v in enumerate(obj)]
    if isinstance(obj, types.FunctionType):
        code = obj.__code__
        cells = [(f" -> closure variable {n!r}", c.cell_contents)
                 for n, c in zip(code.co_freevars, obj.__closure__ or ()) if _cell_filled(c)]
        globs = [(f" -> global {n!r}", obj.__globals__[n]) for n in code.co_names
                 if n in obj.__globals__ and not isinstance(obj.__globals__[n], types.ModuleType)]
        return cells + globs
    if isinstance(obj, types.MethodType):
        return [(".__self__", obj.__self__), (".__func__", obj.__func__)]
    if isinstance(obj, functools.partial):
        return ([(".func", obj.func)] + [(f".args[{i}]", a) for i, a in enumerate(obj.args)]
                + [(f".keywords[{k!r}]", v) for k, v in obj.keywords.items()])
    try:
        reduced = obj.__reduce_ex__(4)
    except Exception:  # noqa: BLE001 - the object itself refuses: it is the leaf
        return []
    if not isinstance(reduced, tuple) or len(reduced) < 3:
        return []
    args = [(f".<constructor argument {i}>", a) for i, a in enumerate(reduced[1] or ())
            if not isinstance(a, type)]
    state = reduced[2]
    if isinstance(state, tuple) and len(state) == 2:  # (__dict__, __slots__ values)
        items = {**(state[0] or {}), **(state[1] or {})}
    elif isinstance(state, dict):
        items = state
    else:
        return args + ([(".<state>", state)] if state is not None else [])
    out: list[tuple[str, Any]] = list(args)
    for key, value in items.items():
        if isinstance(obj, torch.nn.Module) and key in ("_modules", "_parameters", "_buffers") \
                and isinstance(value, dict):
            out.extend((f".{k}", v) for k, v in value.items())
        else:
            out.append((f".{key}", value))
    return out


def _cell_filled(cell: types.CellType) -> bool:
    try:
        _ = cell.cell_contents
    except ValueError:
        return False
    return True


def _describe(obj: Any) -> str:
    """A short human name for what obj is."""
    if isinstance(obj, io.IOBase):
        name = getattr(obj, "name", None)
        return f"an open file ({name!r})" if name is not None else "an open file"
    if isinstance(obj, types.FunctionType):
        where = f"{obj.__code__.co_filename}:{obj.__code__.co_firstlineno}"
        if obj.__name__ == "<lambda>":
            return f"a lambda defined at {where}"
        return f"the function {obj.__qualname__} defined at {where}"
    if isinstance(obj, types.MethodType):
        return f"the bound method {obj.__qualname__}"
    if isinstance(obj, functools.partial):
        return "a functools.partial"
    if isinstance(obj, (type(threading.Lock()), type(threading.RLock()))):
        return "a thread lock"
    if isinstance(obj, socket.socket):
        return "a socket"
    if isinstance(obj, types.GeneratorType):
        return "a generator"
    cls = type(obj)
    return f"a {cls.__module__}.{cls.__qualname__} object"


# ------------------------------------------------------------------------------------------------
# The group
# ------------------------------------------------------------------------------------------------
_RemoteRankWorker = ray.remote(RankWorker)


class WorkerGroup:
    """One Ray actor per rank, placed node by node, joined into a torch process group.

    ``start()`` reserves and starts everything; ``run(fn, *args)`` calls ``fn(rank_info, *args)``
    on every rank and returns the results by rank; ``shutdown()`` kills the actors and frees the
    reservation. A rank failure shuts the whole group down and raises ``RankError``.
    """

    def __init__(self, run_name: str, num_nodes: int = 1, ranks_per_node: int = 1,
                 cpus_per_rank: float = 1, gpus_per_rank: float = 0,
                 placement_timeout_s: float = 60, collective_timeout_s: float = 300,
                 env: dict[str, str] | None = None, start_timeout_s: float = 120,
                 poll_interval_s: float = 0.2, ray_address: str | None = None,
                 spares_per_node: int = 0, backend: str | None = None) -> None:
        if not isinstance(run_name, str) or not run_name.strip():
            raise ValueError(f"run_name must be a non-empty string, got {run_name!r}")
        for label, value in (("num_nodes", num_nodes), ("ranks_per_node", ranks_per_node)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{label} must be an integer >= 1, got {value!r}")
        if cpus_per_rank < 0 or gpus_per_rank < 0:
            raise ValueError(f"cpus_per_rank and gpus_per_rank must be >= 0, got "
                             f"{cpus_per_rank} and {gpus_per_rank}")
        if cpus_per_rank == 0 and gpus_per_rank == 0:
            raise ValueError("each rank must reserve something: set cpus_per_rank or "
                             "gpus_per_rank above 0")
        for label, value in (("placement_timeout_s", placement_timeout_s),
                             ("collective_timeout_s", collective_timeout_s),
                             ("start_timeout_s", start_timeout_s),
                             ("poll_interval_s", poll_interval_s)):
            if not value > 0:
                raise ValueError(f"{label} must be > 0 seconds, got {value!r}")
        if not isinstance(spares_per_node, int) or isinstance(spares_per_node, bool) or spares_per_node < 0:
            raise ValueError(f"spares_per_node must be an integer >= 0, got {spares_per_node!r}")
        self.run_name = run_name
        # Warm spare actors (process started, torch imported, no resources reserved) that replace a dead rank
        # in well under a second; only on CPU, where a rank needs nothing a 0-resource actor lacks.
        self.spares_per_node = spares_per_node if gpus_per_rank == 0 else 0
        self.num_nodes = num_nodes
        self.ranks_per_node = ranks_per_node
        self.cpus_per_rank = cpus_per_rank
        self.gpus_per_rank = gpus_per_rank
        self.placement_timeout_s = placement_timeout_s
        self.collective_timeout_s = collective_timeout_s
        self.start_timeout_s = start_timeout_s
        self.poll_interval_s = poll_interval_s
        self.env = {str(k): str(v) for k, v in (env or {}).items()}
        self.ray_address = ray_address
        if backend == "nccl" and gpus_per_rank == 0:
            raise ValueError("process_group_backend='nccl' needs GPUs (NCCL runs between CUDA devices); use 'gloo' "
                             "on CPU ranks, or None for the default.")
        self.backend = backend or rendezvous.default_backend(gpus_per_rank > 0)
        self.started_ray = False          # True if start() had to start a local Ray instance
        self.ranks: list[RankInfo] = []   # filled by start(), ordered by global rank
        self.timings: dict[str, float] = {}
        self._actors: list[Any] = []
        self._pg = None
        self._lock = threading.Lock()
        self._bundles: list[int] = []            # placement group bundle index of each rank
        self._spares: dict[str, list[Any]] = {}  # node id -> warm spare actors on that node
        self._spare_count = 0
        self._inflight: dict[int, Any] = {}      # rank -> its run() call still going when another rank failed
        self.not_kept: str | None = None  # why the last settle or reform could not keep the survivors (in words)

    # -- properties ----------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.num_nodes * self.ranks_per_node

    @property
    def started(self) -> bool:
        return bool(self._actors)

    def actor_name(self, rank: int) -> str:
        """The Ray actor name of a rank: ``raytrainer-<run>-rank-<r>``."""
        return f"{self._name_prefix()}-rank-{rank}"

    def _name_prefix(self) -> str:
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", self.run_name.strip()).strip("-") or "run"
        return f"{ACTOR_NAME_PREFIX}{safe}"

    def _rank_resources(self) -> dict[str, float]:
        res = {"CPU": float(self.cpus_per_rank), "GPU": float(self.gpus_per_rank)}
        return {k: v for k, v in res.items() if v > 0}

    # -- start ---------------------------------------------------------------------------------
    def start(self) -> list[RankInfo]:
        """Reserve resources, start the rank actors and form the process group."""
        if self.started:
            return self.ranks
        t0 = time.perf_counter()
        self.started_ray = ensure_ray(math.ceil(self.world_size * self.cpus_per_rank),
                                      math.ceil(self.world_size * self.gpus_per_rank),
                                      self.ray_address, num_ranks=self.world_size + self.spares_per_node)
        t_ray = time.perf_counter()
        self._check_name_free()
        try:
            plan = self._reserve()
            t_pg = time.perf_counter()
            self._start_actors(plan)
            t_actors = time.perf_counter()
            self._form_process_group()
            t_end = time.perf_counter()
        except BaseException:
            self.shutdown(graceful=False)
            raise
        self.timings = {"ray_init_s": t_ray - t0, "placement_s": t_pg - t_ray,
                        "actors_s": t_actors - t_pg, "rendezvous_s": t_end - t_actors,
                        "start_s": t_end - t0}
        log.debug("worker group %s: %d ranks ready in %.2fs", self.run_name, self.world_size, t_end - t0)
        for node_id in dict.fromkeys(r.node_id for r in self.ranks):
            self._add_spares(node_id)
        return self.ranks

    # -- spares and repair ---------------------------------------------------------------------
    def _add_spares(self, node_id: str) -> None:
        """Top up the warm spares on a node; they start in the background (nothing waits for them here)."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        spares = self._spares.setdefault(node_id, [])
        while len(spares) < self.spares_per_node:
            self._spare_count += 1
            try:
                actor = self._new_actor(f"{self._name_prefix()}-spare-{self._spare_count}",
                                        NodeAffinitySchedulingStrategy(node_id, soft=False), reserve=False,
                                        label="spare")
                actor.warm.remote()  # imports what a rank needs while training goes on
            except Exception as err:  # noqa: BLE001 - a run without a spare still recovers, only slower
                log.warning("could not start a spare rank actor on node %s: %s", node_id[:12], err)
                return
            spares.append(actor)

    def settle(self, failed: dict[int, bool], timeout_s: float = 5.0,
               on_message: MessageHandler | None = None, before_exits: Callable[[], None] | None = None) -> bool:
        """After a ``keep_on_failure`` RankError: stop the failed ranks and wait for the others' calls to end.

        Ranks that raised leave the process group, so peers blocked in a collective with them get an
        error instead of waiting for the collective timeout. A rank whose group something still holds (DDP's
        reducer keeps it, and its connections, open) cannot: when peers are still blocked after
        ``HELD_GROUP_WAIT_S``, ``before_exits`` runs (the driver takes the survivors' snapshots) and those ranks
        exit, closing their connections; they are replaced as dead. (With 2 ranks nobody is left blocked, so
        nobody exits.) The ranks still in their call first cut their group's connections, all at once
        (``RankWorker.cut_connections``). True when every surviving rank's call ended within ``timeout_s`` (they can
        then re-form the group); False means the group should be shut down. The messages those calls had not
        handed over yet go to ``on_message``.
        """
        deadline = time.monotonic() + timeout_s
        self.not_kept = None
        for rank in self._inflight:  # all at once: those blocked in the failed collective fail now, not hop by hop
            self._actors[rank].cut_connections.remote()
        alive = [r for r, died in failed.items() if not died]
        held = []
        if alive:
            refs = [self._actors[r].leave.remote() for r in alive]
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
            for rank, ref in zip(alive, refs):
                answer = _quietly(ray.get, ref, timeout=1) if ref in ready else None
                if answer == "exiting":
                    failed[rank] = True  # could not close its connections, so it exits: replaced as dead
                elif answer == "held":
                    held.append(rank)
        inflight, self._inflight = self._inflight, {}
        if inflight:
            done, _ = ray.wait(list(inflight.values()), num_returns=len(inflight),
                               timeout=min(HELD_GROUP_WAIT_S, timeout_s) if held else timeout_s)
            if len(done) < len(inflight) and held:
                if before_exits is not None:
                    before_exits()
                for rank in held:
                    _quietly(ray.get, self._actors[rank].exit_soon.remote(), timeout=1)
                    failed[rank] = True
                log.debug("rank(s) %s exit to release peers %s blocked in a collective", held,
                          sorted(r for r, ref in inflight.items() if ref not in done))
                done, _ = ray.wait(list(inflight.values()), num_returns=len(inflight),
                                   timeout=max(0.0, deadline - time.monotonic()))
            if len(done) < len(inflight):
                self.not_kept = (f"rank(s) {sorted(r for r, ref in inflight.items() if ref not in done)} did not "
                                 f"stop within {timeout_s:g} s of the failure")
                log.debug("%s", self.not_kept)
                return False
            for rank, ref in inflight.items():
                try:
                    outcome = ray.get(ref, timeout=1)
                except (RayActorError, GetTimeoutError, RayError):
                    failed[rank] = True  # died too, after the first failure
                    continue
                _hand_over(outcome, rank, on_message)
        for rank, died in failed.items():
            if died:
                _quietly(ray.kill, self._actors[rank], no_restart=True)
        return True

    def reform(self, dead: list[int], timeout_s: float = 30.0, marks: list[tuple[str, float]] | None = None) -> bool:
        """Replace dead ranks (a warm spare on the same node, else a new actor in the rank's reserved
        bundle), then re-form the process group with the survivors. False if that cannot be done here
        (the node is gone, an actor did not answer): shut the group down and start a new one instead.
        ``marks`` gets (step, time.time()) after the replacements, the teardown and the rendezvous."""
        started = time.perf_counter()
        mark = (lambda what: marks.append((what, time.time()))) if marks is not None else (lambda what: None)
        try:
            alive_nodes = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
            if any(self.ranks[r].node_id not in alive_nodes for r in dead):
                self.not_kept = "the node of a lost rank is gone"  # a new placement must find room elsewhere
                return False
            for rank in dead:
                old = self.ranks[rank]
                actor = self._replacement(old.node_id, rank)
                info = ray.get(actor.node_info.remote(), timeout=timeout_s)
                if info["node_id"] != old.node_id:
                    _quietly(ray.kill, actor, no_restart=True)
                    self.not_kept = f"the replacement of rank {rank} started on another node"
                    return False
                self._actors[rank] = actor
                self.ranks[rank] = replace(old, pid=info["pid"], gpu_ids=tuple(info["gpu_ids"]))
            mark("replaced")
            refs = [a.teardown.remote() for a in self._actors]
            self._gather(refs, timeout_s, "leaving the failed process group")
            mark("left the old group")
            self._form_process_group()
            mark("rendezvous")
        except (RankError, GroupTimeoutError, RayError, GetTimeoutError) as err:
            self.not_kept = f"re-forming the group failed: {str(err).splitlines()[0][:200]}"
            log.debug("could not re-form run %r in place: %s", self.run_name, self.not_kept)
            return False
        for node_id in {self.ranks[r].node_id for r in dead}:
            self._add_spares(node_id)
        self.timings = {"reform_s": time.perf_counter() - started}
        log.debug("worker group %s: rank(s) %s replaced, %d ranks re-formed in %.2fs", self.run_name, dead,
                  self.world_size, self.timings["reform_s"])
        return True

    def _replacement(self, node_id: str, rank: int) -> Any:
        """A warm spare on ``node_id`` if one answers, else a new actor in the rank's reserved bundle."""
        spares = self._spares.get(node_id, [])
        while spares:
            spare = spares.pop(0)
            try:
                ray.get(spare.ping.remote(), timeout=self.start_timeout_s)
                return spare
            except (RayError, GetTimeoutError) as err:
                log.debug("spare actor on node %s is unusable: %s", node_id[:12], err)
                _quietly(ray.kill, spare, no_restart=True)
        self._spare_count += 1
        return self._new_actor(f"{self.actor_name(rank)}-r{self._spare_count}",
                               self._bundle_strategy(self._bundles[rank]), label=f"rank-{rank}")

    def _slow_start_cause(self) -> str:
        """The likely reason the rank actors did not start in time, and what to do about it."""
        if _is_own_local_instance():
            import psutil

            available = psutil.virtual_memory().available / 2**30
            return (f"Likely cause: too many ranks for this machine: {self.world_size} rank process(es), each "
                    f"importing torch, on {os.cpu_count() or 1} CPU core(s) with {available:.1f} GiB of memory "
                    "available now. Use fewer ranks (num_processes/devices), or run on a Ray cluster "
                    "(Trainer(ray_address='HOST:PORT') or `raytrainer fit --address HOST:PORT train.py`).")
        return (f"Likely cause: the Ray cluster has no free resources for {self.world_size} rank process(es) "
                f"({_fmt(self._rank_resources())} each; other jobs may hold them) or its nodes start worker "
                "processes slowly; `ray status` shows what is free. Ask for fewer ranks, or wait for the cluster.")

    def _check_name_free(self) -> None:
        name = self.actor_name(0)
        try:
            ray.get_actor(name)
        except ValueError:
            return  # no live actor by that name
        raise RuntimeError(self._clash_message(name))

    def _clash_message(self, name: str) -> str:
        return (f"a Ray actor or placement group named {name!r} already exists: another worker "
                f"group with run name {self.run_name!r} is still alive in this Ray namespace; "
                "shut it down or use a different run name")

    def _reserve(self) -> list[tuple[int, str | None]]:
        """Create the placement group; returns (bundle index, node id) for each rank in order."""
        per_rank = self._rank_resources()
        if self.num_nodes == 1:
            bundles = [dict(per_rank) for _ in range(self.world_size)]
            strategy = "PACK"
        else:
            bundles = [{k: v * self.ranks_per_node for k, v in per_rank.items()}
                       for _ in range(self.num_nodes)]
            strategy = "STRICT_SPREAD"
        name = self._name_prefix() + "-pg"
        try:
            pg = placement_group(bundles, strategy=strategy, name=name)
        except RayError as err:
            if "already exists" in str(err):
                raise RuntimeError(self._clash_message(name)) from err
            raise
        self._pg = pg
        if not pg.wait(self.placement_timeout_s):
            self._pg = None
            _quietly(remove_placement_group, pg)
            raise PlacementError(self._placement_message(bundles))
        try:
            table = placement_group_table(pg).get("bundles_to_node_id", {})
            bundle_node = {int(k): v for k, v in table.items()}
        except Exception:  # noqa: BLE001 - only used to order ranks; actual nodes are checked
            bundle_node = {}
        if self.num_nodes == 1:
            # Node-major: bundles on the node that holds bundle 0 first, and so on.
            first_seen: dict[Any, int] = {}
            for b in range(len(bundles)):
                first_seen.setdefault(bundle_node.get(b), b)
            order = sorted(range(len(bundles)), key=lambda b: (first_seen[bundle_node.get(b)], b))
            return [(b, bundle_node.get(b)) for b in order]
        return [(b, bundle_node.get(b)) for b in range(self.num_nodes)
                for _ in range(self.ranks_per_node)]

    def _placement_message(self, bundles: list[dict[str, float]]) -> str:
        per_rank = self._rank_resources()
        bundle = bundles[0]
        try:
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            fitting = sum(all(n.get("Resources", {}).get(k, 0) >= v for k, v in bundle.items())
                          for n in nodes)
            total = ray.cluster_resources()
            free = ray.available_resources()
        except Exception as err:  # noqa: BLE001 - still report what was asked for
            return (f"could not place {self.world_size} rank(s) within "
                    f"{self.placement_timeout_s:g}s (and could not read the cluster state: {err})")
        keys = sorted(bundle)
        want = {k: v * len(bundles) for k, v in bundle.items()}
        have = {k: total.get(k, 0.0) for k in keys}
        avail = {k: round(free.get(k, 0.0), 3) for k in keys}
        if self.num_nodes == 1:
            asked = (f"requested: {self.world_size} rank(s) with {_fmt(per_rank)} each, packed on "
                     f"as few nodes as possible (total {_fmt(want)})")
        else:
            asked = (f"requested: {self.num_nodes} distinct nodes, each with {_fmt(bundle)} "
                     f"for {self.ranks_per_node} rank(s) (total {_fmt(want)})")
        return (f"could not place {self.world_size} rank(s) for run {self.run_name!r} within "
                f"{self.placement_timeout_s:g}s.\n  {asked}\n"
                f"  available: {len(nodes)} alive node(s), {fitting} of which can hold "
                f"{_fmt(bundle)}; cluster total {_fmt(have)}, free now {_fmt(avail)}\n"
                "Fix: ask for fewer nodes or devices, lower the CPUs/GPUs per rank, add nodes, "
                "or raise the placement timeout if the cluster is still scaling up.")

    def _new_actor(self, name: str, strategy: Any, reserve: bool = True, label: str = "") -> Any:
        """Start one rank actor process (``reserve=False``: a spare that holds no CPU or GPU); ``label`` (rank-N)
        prefixes the lines Ray relays from it."""
        per_rank = self._rank_resources() if reserve else {}
        # The environment goes to the actor's constructor rather than a Ray runtime_env: a
        # runtime_env forces a fresh worker process set up by the runtime-env agent (about a
        # second more per start) instead of one of Ray's ready idle workers.
        try:
            return _RemoteRankWorker.options(
                name=name, scheduling_strategy=strategy, num_cpus=per_rank.get("CPU", 0),
                num_gpus=per_rank.get("GPU", 0), max_concurrency=8, max_restarts=0,
            ).remote(self.run_name, [p for p in sys.path if p], dict(self.env), label)
        except ValueError as err:
            raise RuntimeError(self._clash_message(name) + f" ({err})") from err

    def _bundle_strategy(self, bundle_index: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(placement_group=self._pg, placement_group_bundle_index=bundle_index,
                                                placement_group_capture_child_tasks=False)

    def _start_actors(self, plan: list[tuple[int, str | None]]) -> None:
        """Start one actor per rank and learn where each one really runs."""
        for rank, (bundle_index, _) in enumerate(plan):
            self._actors.append(self._new_actor(self.actor_name(rank), self._bundle_strategy(bundle_index),
                                                label=f"rank-{rank}"))
        try:
            infos = self._gather([a.node_info.remote() for a in self._actors], self.start_timeout_s,
                                 "starting the rank actors")
        except GroupTimeoutError as err:
            raise GroupTimeoutError(f"{err}\n{self._slow_start_cause()}") from None
        self.ranks = self._assign_ranks(plan, infos)
        self._bundles = [b for b, _ in plan]

    def _assign_ranks(self, plan: list[tuple[int, str | None]],
                      infos: list[dict[str, Any]]) -> list[RankInfo]:
        """Rank layout from the nodes the actors actually run on: node-major, local by bundle."""
        node_ids = [info["node_id"] for info in infos]
        node_order = list(dict.fromkeys(node_ids))  # nodes in order of their first rank
        # Node-major means each node's ranks form one contiguous block.
        blocks = [nid for i, nid in enumerate(node_ids) if i == 0 or node_ids[i - 1] != nid]
        if len(blocks) != len(node_order):
            raise RuntimeError(f"internal error: ranks of run {self.run_name!r} are not grouped by "
                               f"node (nodes by rank: {node_ids}); please report this")
        if self.num_nodes > 1 and len(node_order) != self.num_nodes:
            raise RuntimeError(f"asked for {self.num_nodes} nodes but the ranks landed on "
                               f"{len(node_order)}: {node_order}")
        for rank, ((_, planned), nid) in enumerate(zip(plan, node_ids)):
            if planned is not None and planned != nid:
                log.warning("rank %d runs on node %s, not %s as the placement group said",
                            rank, nid, planned)
        # one pass each (linear in ranks: a 1024-rank layout is built in milliseconds)
        node_rank = {nid: i for i, nid in enumerate(node_order)}
        per_node = collections.Counter(node_ids)
        seen: collections.Counter[str] = collections.Counter()
        ranks = []
        for rank, info in enumerate(infos):
            nid = info["node_id"]
            local_rank, seen[nid] = seen[nid], seen[nid] + 1
            ranks.append(RankInfo(global_rank=rank, local_rank=local_rank,
                                  node_rank=node_rank[nid], world_size=len(infos),
                                  local_world_size=per_node[nid], run_name=self.run_name,
                                  node_id=nid, node_ip=info["node_ip"], pid=info["pid"],
                                  backend=self.backend,
                                  collective_timeout_s=self.collective_timeout_s,
                                  gpu_ids=tuple(info["gpu_ids"])))
        return ranks

    def _form_process_group(self) -> None:
        """Rank 0 opens the store on its node; every rank joins the process group through it."""
        first = self.ranks[0]
        addr, port = self._gather([self._actors[0].open_rendezvous.remote(
            first.node_ip, self.collective_timeout_s)], self.start_timeout_s,
            "opening the rendezvous store on rank 0")[0]
        node_gpus: dict[str, list[str]] = {}
        for r in self.ranks:
            for g in r.gpu_ids:
                if g not in node_gpus.setdefault(r.node_id, []):
                    node_gpus[r.node_id].append(g)
        self.ranks = [replace(r, master_addr=addr, master_port=port) for r in self.ranks]
        refs = [a.setup.remote(r, tuple(sorted(node_gpus.get(r.node_id, []), key=_gpu_key)))
                for a, r in zip(self._actors, self.ranks)]
        done = self._gather(refs, min(self.start_timeout_s, self.collective_timeout_s + 5),
                            "forming the process group")
        self.ranks = [replace(r, device_index=d["device_index"]) for r, d in zip(self.ranks, done)]

    # -- run -----------------------------------------------------------------------------------
    def run(self, fn: Callable[..., Any], *args: Any, timeout_s: float | None = None,
            on_message: MessageHandler | None = None,
            arg_names: Sequence[str] | None = None,
            on_tick: Callable[[], None] | None = None,
            before_shutdown: Callable[[BaseException], None] | None = None,
            keep_on_failure: bool = False) -> list[Any]:
        """Call ``fn(rank_info, *args)`` on every rank at once; results come back by rank.

        Starts the group first if needed (after checking everything pickles). ``on_message(rank,
        msg)`` receives what ranks pass to ``send_to_driver``: rank 0's while it runs, the
        others' when they finish. Any rank failure stops all ranks and raises ``RankError``;
        passing ``timeout_s`` bounds the whole call (``GroupTimeoutError``). ``on_tick()`` runs
        every poll interval on the driver (an exception from it aborts the run);
        ``before_shutdown(err)`` runs on a failure while the surviving actors still answer.
        With ``keep_on_failure`` a ``RankError`` leaves the group up, for ``settle`` and ``reform``.
        """
        payload = self._pickle_call(fn, args, arg_names)
        if not self.started:
            self.start()
        try:
            payload_ref = ray.put(payload)
            refs = [a.run.remote(payload_ref) for a in self._actors]
            outcomes: list[RankOutcome] = self._gather(refs, timeout_s, "running", on_message, on_tick,
                                                       keep=keep_on_failure)
        except BaseException as err:  # a rank failed, time ran out, Ctrl-C, or on_message raised
            if keep_on_failure and isinstance(err, RankError):
                raise  # the caller settles and re-forms the group, or shuts it down
            if before_shutdown is not None and not isinstance(err, KeyboardInterrupt):
                _quietly(before_shutdown, err)
            self.shutdown(graceful=False)
            raise
        if on_message is not None:
            for rank, outcome in enumerate(outcomes):
                for msg in outcome.messages:
                    on_message(rank, msg)
        return [o.value for o in outcomes]

    def _pickle_call(self, fn: Callable[..., Any], args: tuple[Any, ...],
                     arg_names: Sequence[str] | None) -> bytes:
        if not callable(fn):
            raise TypeError(f"run() needs a callable taking (rank_info, *args), got {fn!r}")
        if arg_names is not None and len(arg_names) != len(args):
            raise ValueError(f"arg_names has {len(arg_names)} names for {len(args)} arguments")
        try:
            return cloudpickle.dumps((fn, args))
        except Exception as err:  # noqa: BLE001 - find and name the culprit
            names = list(arg_names) if arg_names is not None else \
                [f"args[{i}]" for i in range(len(args))]
            check_picklable(fn, getattr(fn, "__name__", "fn"))
            for name, arg in zip(names, args):
                check_picklable(arg, name)
            raise TypeError(f"the function and its arguments cannot be pickled together: "
                            f"{type(err).__name__}: {err}") from err

    def call(self, fn: Callable[..., Any], *args: Any, timeout_s: float = 5.0,
             ranks: Sequence[int] | None = None) -> list[Any]:
        """Call ``fn(rank_info, *args)`` on every rank (or on ``ranks``) beside a running ``run()`` (e.g. to ask
        for a snapshot or set a stop flag); by rank, None where a rank raised, died or did not
        answer within ``timeout_s``. Unlike a second ``run()``, it leaves queued messages alone."""
        actors = list(self._actors)
        if not actors:
            return []
        ranks = list(range(len(actors))) if ranks is None else list(ranks)
        payload = ray.put(self._pickle_call(fn, args, None))
        refs = [actors[r].call.remote(payload) for r in ranks]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        out: list[Any] = []
        for rank, ref in zip(ranks, refs):
            value = None
            if ref in ready:
                try:
                    outcome = ray.get(ref, timeout=1)
                    if outcome.ok:
                        value = outcome.value
                    else:
                        log.debug("call on rank %d raised: %s", rank, outcome.error)
                except RayError as err:
                    log.debug("call on rank %d failed: %s", rank, err)
            out.append(value)
        return out

    def ping(self, timeout_s: float = 10) -> list[int]:
        """Each rank's pid; answers while run() is busy."""
        if not self.started:
            raise RuntimeError("the worker group is not started")
        return ray.get([a.ping.remote() for a in self._actors], timeout=timeout_s)

    # -- waiting -------------------------------------------------------------------------------
    def _gather(self, refs: list[Any], timeout_s: float | None, what: str,
                on_message: MessageHandler | None = None,
                on_tick: Callable[[], None] | None = None, keep: bool = False) -> list[Any]:
        """Wait for one call per rank, noticing a failed or dead rank within a poll interval.

        On a failure the calls still running are remembered (``keep``: the caller may re-form the group)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        pending = {ref: rank for rank, ref in enumerate(refs)}
        results: dict[int, Any] = {}
        failures: dict[int, tuple[str, bool]] = {}  # rank -> (text, died)
        poll_ref = None
        while pending:
            waitable = list(pending) + ([poll_ref] if poll_ref is not None else [])
            ready, _ = ray.wait(waitable, num_returns=len(waitable), timeout=self.poll_interval_s)
            if poll_ref is not None and (poll_ref in ready or refs[0] in ready):
                self._deliver_poll(poll_ref, on_message)
                poll_ref = None
            for ref in ready:
                if ref in pending:
                    rank = pending.pop(ref)
                    self._collect(ref, rank, results, failures)
            if failures:
                break
            if on_tick is not None:
                on_tick()
            if deadline is not None and time.monotonic() > deadline:
                slow = sorted(pending.values())
                raise GroupTimeoutError(
                    f"{what} on run {self.run_name!r} did not finish within {timeout_s:g}s; "
                    f"rank(s) {slow} still busy. The group was shut down.")
            if on_message is not None and poll_ref is None and refs[0] in pending:
                poll_ref = self._actors[0].poll.remote()
        if failures:
            if poll_ref is not None:  # the messages rank 0 handed to the poll in flight come first (or are lost)
                self._deliver_poll(poll_ref, on_message)
            # Give the other ranks a moment to report, so a death is blamed, not its echo; once one is known, the
            # echoes still on their way change nothing (the ranks still running are the caller's to settle).
            grace_ends = time.monotonic() + FAILURE_GRACE_S
            while pending and not any(died for _, died in failures.values()) and time.monotonic() < grace_ends:
                more, _ = ray.wait(list(pending), num_returns=len(pending),
                                   timeout=min(FAILURE_SLICE_S, grace_ends - time.monotonic()))
                for ref in more:
                    self._collect(ref, pending.pop(ref), results, failures)
            for rank in sorted(results):  # what the ranks that returned had not handed over yet
                _hand_over(results[rank], rank, on_message)
            self._inflight = {rank: ref for ref, rank in pending.items()}
            raise self._rank_error(failures, results, what, stopped=not keep)
        return [results[r] for r in range(len(refs))]

    def _collect(self, ref: Any, rank: int, results: dict[int, Any],
                 failures: dict[int, tuple[str, bool]]) -> None:
        try:
            value = ray.get(ref, timeout=30)
        except RayTaskError as err:  # the method raised (setup, rendezvous)
            failures[rank] = (str(err), False)
            return
        except (RayActorError, GetTimeoutError, RayError) as err:  # the process is gone
            failures[rank] = (f"{type(err).__name__}: {err}", True)
            return
        if isinstance(value, RankOutcome) and not value.ok:
            failures[rank] = (value.traceback or value.error, False)
            results[rank] = value
            return
        results[rank] = value

    def _deliver_poll(self, poll_ref: Any, on_message: MessageHandler | None) -> None:
        try:
            messages = ray.get(poll_ref, timeout=5)
        except (RayError, GetTimeoutError):
            return  # rank 0's own call reports what happened to it
        if on_message is not None:
            for msg in messages:
                on_message(0, msg)

    def _rank_error(self, failures: dict[int, tuple[str, bool]], results: dict[int, Any],
                    what: str, stopped: bool = True) -> RankError:
        # A rank that died is the likeliest root cause; then one whose error is not the echo of a peer leaving
        # (a rank that raised closes its connections at once, so its peers fail too); then the lowest rank.
        rank = min(failures, key=lambda r: (not failures[r][1], _peer_echo(failures[r][0]), r))
        text, died = failures[rank]
        info = self.ranks[rank] if rank < len(self.ranks) else RankInfo(global_rank=rank)
        where = f"node {info.node_ip or '?'} (node id {info.node_id[:12] or '?'}, pid {info.pid})"
        if died:
            head = f"rank {rank} on {where} died while {what} on run {self.run_name!r}"
        else:
            head = f"rank {rank} on {where} raised while {what} on run {self.run_name!r}"
        others = [f"rank {r} {'died' if d else 'raised'}" for r, (_, d) in sorted(failures.items())
                  if r != rank]
        tail = f"\n(also: {', '.join(others)})" if others else ""
        body = f"\n--- rank {rank} traceback ---\n{text.rstrip()}\n--- end rank {rank} ---"
        original = None
        outcome = results.get(rank)
        if isinstance(outcome, RankOutcome) and outcome.exception is not None:
            try:
                original = cloudpickle.loads(outcome.exception)
            except Exception:  # noqa: BLE001 - e.g. the exception class only exists on the rank
                original = None
        err = RankError(head + ":" + body + tail + ("\nAll ranks were stopped." if stopped else ""), rank=rank,
                        node_ip=info.node_ip, node_id=info.node_id, traceback=text, died=died,
                        exception=original)
        err.failed = {r: d for r, (_, d) in failures.items()}
        return err

    def responsive(self, timeout_s: float = 5.0) -> bool:
        """Whether every rank actor answers a ping within ``timeout_s`` (a group kept idle may have lost one, or
        belong to an ended Ray session)."""
        if not ray.is_initialized() or not self.started:
            return False
        try:
            ray.get([a.ping.remote() for a in self._actors], timeout=timeout_s)
        except Exception as err:  # noqa: BLE001 - any failure means: not usable
            log.debug("worker group %s: not responsive (%s)", self.run_name, err)
            return False
        return True

    # -- shutdown ------------------------------------------------------------------------------
    def shutdown(self, graceful: bool = True, timeout_s: float = 10) -> None:
        """Kill the rank actors and free the reservation; safe to call twice.

        ``graceful`` first asks each rank to leave the process group (bounded by ``timeout_s``);
        without it the ranks are killed at once, e.g. when one may be stuck in a collective.
        """
        with self._lock:
            actors, self._actors = self._actors, []
            spares, self._spares = [a for node in self._spares.values() for a in node], {}
            pg, self._pg = self._pg, None
            self._inflight = {}
        if not ray.is_initialized():
            return
        if actors and graceful:
            refs = [a.teardown.remote() for a in actors]
            ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        actors = actors + spares
        for actor in actors:
            _quietly(ray.kill, actor, no_restart=True)
        if actors:
            # A call on a killed actor fails once Ray marks it dead: wait for that, so the
            # resources are free when this returns (a restart can reuse them).
            pings = []
            for actor in actors:
                try:
                    pings.append(actor.ping.remote())
                except Exception:  # noqa: BLE001
                    pass
            if pings:
                ray.wait(pings, num_returns=len(pings), timeout=timeout_s)
        if pg is not None:
            _quietly(remove_placement_group, pg)
            _wait_removed(pg, timeout_s)

    def __enter__(self) -> WorkerGroup:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown(graceful=exc[0] is None)


def _hand_over(outcome: Any, rank: int, on_message: MessageHandler | None) -> None:
    """Give the messages a rank's returned call carried (``RankOutcome.messages``) to ``on_message``, once."""
    if on_message is not None and isinstance(outcome, RankOutcome):
        messages, outcome.messages = outcome.messages, []
        for msg in messages:
            on_message(rank, msg)


PEER_ECHOES = ("Connection closed by peer", "Connection reset by peer")  # gloo, when a peer left the group


def _peer_echo(text: str) -> bool:
    """A rank's error only says that a peer left the process group (that peer's own failure is the cause)."""
    return any(echo in text for echo in PEER_ECHOES)


def _quietly(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, or None when it raises (logged at debug level)."""
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - cleanup must not mask the real error
        log.debug("%s failed during cleanup: %s", getattr(fn, "__name__", fn), err)
        return None


def _wait_removed(pg: Any, timeout_s: float) -> None:
    """Wait (bounded) until Ray has released a removed placement group's resources."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if placement_group_table(pg).get("state") in ("REMOVED", None):
                return
        except Exception:  # noqa: BLE001 - the table lookup is best effort
            return
        time.sleep(0.02)


def _fmt(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"


def _gpu_key(gpu_id: str) -> tuple[int, str]:
    return (int(gpu_id), "") if gpu_id.isdigit() else (1 << 30, gpu_id)
