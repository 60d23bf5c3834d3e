"""The rank actor: one Ray actor process per rank, running the driver's function with a RankInfo.

The actor is threaded (several calls may run at once), so the driver can ``poll()`` for messages
or ``ping()`` it while ``run()`` is busy with training. Code running inside ``run()`` reaches the
driver with ``send_to_driver(msg)``.
"""
from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import cloudpickle
import torch

from raytrainer.core import control
from raytrainer.launchers.ray import messages, rendezvous
from raytrainer.strategies.base import RankContext


@dataclass
class RankInfo(RankContext):
    """A RankContext plus where the rank runs and how it joined the process group."""

    run_name: str = ""
    node_id: str = ""
    node_ip: str = ""
    pid: int = 0
    master_addr: str = ""
    master_port: int = 0
    backend: str = "gloo"
    collective_timeout_s: float = 300.0
    gpu_ids: tuple[str, ...] = ()      # the GPUs Ray assigned to this rank
    device_index: int | None = None    # this rank's CUDA device index; None on CPU

    @property
    def device(self) -> torch.device:
        """The device this rank trains on."""
        if self.device_index is None:
            return torch.device("cpu")
        return torch.device("cuda", self.device_index)


@dataclass
class RankOutcome:
    """What ``run()`` hands back: the value, or the error with the rank's own traceback."""

    ok: bool
    value: Any = None
    error: str = ""                 # "ValueError: boom"
    traceback: str = ""             # the traceback text as the rank saw it
    exception: bytes | None = None  # the pickled exception, when it pickles
    messages: list[Any] = field(default_factory=list)  # send_to_driver() calls not yet polled
    seconds: float = 0.0


# Per-process state: one rank actor per process.
_CURRENT: RankInfo | None = None
_WARMING = threading.Lock()  # held by a spare's warm() while it imports what a rank needs


def current_rank() -> RankInfo | None:
    """This process's RankInfo once the group is set up, else None."""
    return _CURRENT


class RankWorker:
    """One rank. ``WorkerGroup`` creates it as a Ray actor and calls these methods in order:
    ``node_info`` -> (rank 0) ``open_rendezvous`` -> ``setup`` -> ``run``... -> ``teardown``."""

    def __init__(self, run_name: str, driver_sys_path: list[str], env: dict[str, str] | None = None,
                 label: str = "") -> None:
        # The driver's forwarded variables (object store credentials, seeds), set before anything reads them.
        os.environ.update(env or {})
        # Let the worker import what the driver can (test modules, scripts next to the driver)
        # without shadowing anything installed: append, and only directories that exist here.
        for path in driver_sys_path:
            if path and path not in sys.path and os.path.isdir(path):
                sys.path.append(path)
        self.run_name = run_name
        self.label = label  # "rank-1": what Ray's relayed log lines of this process start with
        self._master_store = None
        self._info: RankInfo | None = None
        messages.open_buffer()
        # Spot/preemptible VMs send SIGTERM ahead of the kill: turn it into a stop at the next agreed step
        # (Ray runs __init__ on the actor's main thread, the only place a signal handler can be set).
        control.install_sigterm_handler()

    def __repr__(self) -> str:
        # Ray prefixes worker log lines with this (read once, after __init__), so each line names its rank.
        info = getattr(self, "_info", None)
        return f"rank-{info.global_rank}" if info is not None else getattr(self, "label", "") or \
            f"RankWorker({self.run_name})"

    def node_info(self) -> dict[str, Any]:
        """Where this actor landed: node id and IP, pid and the GPUs Ray gave it."""
        import ray

        ctx = ray.get_runtime_context()
        return {
            "node_id": ctx.get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
            "pid": os.getpid(),
            "gpu_ids": tuple(str(g) for g in ray.get_gpu_ids()),
        }

    def ping(self) -> int:
        """Answer while run() is busy; returns the pid."""
        return os.getpid()

    def open_rendezvous(self, host: str, timeout_s: float) -> tuple[str, int]:
        """(rank 0) Open the store every rank will connect to; returns (address, port)."""
        self._master_store = rendezvous.open_master_store(host, timeout_s)
        return host, int(self._master_store.port)

    def setup(self, info: RankInfo, node_gpu_ids: tuple[str, ...]) -> dict[str, Any]:
        """Set the torchrun variables and join the process group; returns seconds and device."""
        global _CURRENT
        start = time.perf_counter()
        if info.gpu_ids and node_gpu_ids and not torch.cuda.is_initialized():
            # Every rank on a node sees all of that node's GPUs (as torchrun does), so NCCL can
            # use peer-to-peer transfers; each rank still trains on its own device.
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(node_gpu_ids)
            info.device_index = list(node_gpu_ids).index(info.gpu_ids[0])
        elif info.gpu_ids:
            info.device_index = 0
        if info.device_index is not None:
            torch.cuda.set_device(info.device_index)
        rdzv = rendezvous.Rendezvous(info.master_addr, info.master_port)
        rendezvous.init_process_group(info, rdzv, info.backend, info.collective_timeout_s,
                                      master_store=self._master_store,
                                      device_id=info.device_index, node_ip=info.node_ip)
        self._info = info
        _CURRENT = info
        return {"seconds": time.perf_counter() - start, "device_index": info.device_index}

    def run(self, payload: bytes) -> RankOutcome:
        """Unpickle (fn, args) and return fn(rank_info, *args), or the error it raised.

        Messages not yet polled ride back with the outcome.
        """
        return self._execute(payload, drain=True)

    def call(self, payload: bytes) -> RankOutcome:
        """Like run(), for a short side call beside a running run(): leaves messages queued."""
        return self._execute(payload, drain=False)

    def _execute(self, payload: bytes, drain: bool) -> RankOutcome:
        start = time.perf_counter()
        with _WARMING:  # a spare still importing in warm(): torch._dynamo and torch._inductor imported from two
            pass        # threads at once fail with a circular ImportError
        fn = args = None
        try:
            if self._info is None:
                raise RuntimeError("run() called before setup(); the worker group did not start")
            if self._info.device_index is not None:
                # The current CUDA device is per thread, and each call may run on another thread.
                torch.cuda.set_device(self._info.device_index)
            fn, args = cloudpickle.loads(payload)
            value = fn(self._info, *args)
            return RankOutcome(ok=True, value=value, messages=messages.drain_messages() if drain else [],
                               seconds=time.perf_counter() - start)
        except (Exception, SystemExit) as err:  # noqa: BLE001 - everything goes back to the driver
            if drain:  # first of all: the peers blocked in a collective with this rank fail now (see below)
                rendezvous.cut_group_connections()
            try:
                pickled = cloudpickle.dumps(err)
            except Exception:  # noqa: BLE001 - an exception that does not pickle still reports
                pickled = None
            failed = RankOutcome(ok=False, error=f"{type(err).__name__}: {err}",
                                 traceback=traceback.format_exc(), exception=pickled,
                                 messages=messages.drain_messages() if drain else [],
                                 seconds=time.perf_counter() - start)
        if drain:
            fn = args = None  # the run's module, trainer and DDP wrapper: nothing here keeps them any more
            # A run that raised leaves the process group at once (its traceback, and with it the run's module, is
            # gone by now), its connections shut down as soon as it raised: the peers still blocked in a collective
            # with this rank get an error then, and so do theirs in turn (a hop round gloo's ring costs an exception's
            # way up, not a garbage collection), instead of waiting for the collective timeout. The driver re-forms
            # the group.
            rendezvous.release_process_group()
        return failed

    def poll(self) -> list[Any]:
        """Messages sent with send_to_driver() since the last poll."""
        return messages.drain_messages()

    def warm(self) -> int:
        """(a spare) Import what a rank runs, so taking over a dead rank costs no import time; returns the pid."""
        import torch

        with _WARMING:  # a run that takes this spare over waits for these imports rather than racing them
            import raytrainer.launchers.ray.rank  # noqa: F401 - rank_entry, snapshots, control
            import raytrainer.strategies.ddp  # noqa: F401

            # the first optimizer a process builds imports torch._dynamo (0.6-1 s of a 1 s recovery on a 2-core
            # machine)
            torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        return os.getpid()

    def leave(self) -> bool | str:
        """Leave the process group (peers blocked in a collective with this rank get an error), keep the rest.

        When the group cannot be closed (a sharded module's device mesh still holds it, so its connections stay open
        and peers would wait for the collective timeout), the process exits just after answering: its connections
        close, and the driver replaces it as a dead rank."""
        released = rendezvous.release_process_group()
        if released is False and rendezvous.SHARDED_MODULE_HOLDS_GROUP:
            self.exit_soon()
            return "exiting"
        return "held" if released is False else released is not None

    def cut_connections(self) -> int:
        """Shut down (not close) this rank's process group connections; how many. A collective the running call is
        blocked in fails now, as when a peer leaves. After a failure the driver asks every rank still in its call at
        once, so the failure reaches them together rather than one hop of gloo's ring (a process wake-up) at a time."""
        return rendezvous.cut_group_connections()

    def exit_soon(self) -> str:
        """End this process just after answering: its process group's connections close with it, which is how peers
        blocked in a collective with it get an error when something (DDP's reducer) still holds the group."""
        threading.Timer(0.2, os._exit, args=(1,)).start()
        return "exiting"

    def teardown(self) -> bool:
        """Leave the process group and close the store; True if a process group was destroyed."""
        global _CURRENT
        destroyed = rendezvous.destroy_process_group()
        self._master_store = None
        self._info = None
        _CURRENT = None
        return destroyed
