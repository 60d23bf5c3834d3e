"""XLALauncher: runs a TPU plan through torch_xla.

One device runs in this process. N devices run under ``torch_xla.launch`` (PJRT starts one process
per chip on a TPU host, or one process with a thread per device on XLA's CPU backend). Every rank
runs the same loops on its own device; rank 0 sends back the trained state and metrics (the Ray
launcher's ``RunResult``) through files, and every rank its share of the predictions. This process
then looks as it would after an in-process run. It never touches the XLA device itself: torch_xla
refuses to launch ranks once the parent has initialised its runtime.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import shutil
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from raytrainer.callbacks.callback import Callback
from raytrainer.checkpoint.host_copy import to_host
from raytrainer.core import control
from raytrainer.launchers.base import RankPayload, RunResult, merge_predictions
from raytrainer.plan import Plan
from raytrainer.strategies.base import RankContext
from raytrainer.strategies.xla import XLAStrategy, check_precision, import_xla
from raytrainer.utilities import rng_states, set_rng_states

HEARTBEAT_FILE = "heartbeat"


class XLALauncher:
    """Runs a plan with ``accelerator="tpu"``: in-process for one device, ``torch_xla.launch`` for more."""

    def __init__(self, plan: Plan, start_method: str | None = None) -> None:
        self.plan = plan
        # fork starts the ranks in well under a second; spawn re-imports torch and torch_xla (5-15 s)
        self.start_method = start_method or os.environ.get("RAYTRAINER_XLA_START_METHOD") or \
            ("fork" if sys.platform.startswith("linux") else "spawn")

    def launch(self, trainer: Any, fn: str, model: Any, kwargs: dict[str, Any]) -> Any:
        check_precision(self.plan.precision)
        if self.plan.world_size == 1:
            strategy = xla_strategy(self.plan)
            index = self.plan.device_ids[0] if self.plan.device_ids else strategy.device_index
            out = trainer.session.run(fn, model, strategy.bind(index, RankContext()), **kwargs)
            return _to_host(out) if fn == "predict" else out  # as Lightning: predictions come back on CPU
        return self._launch_ranks(trainer, fn, model, kwargs)

    def _launch_ranks(self, trainer: Any, fn: str, model: Any, kwargs: dict[str, Any]) -> Any:
        n = self.plan.world_size
        payload = _dumps((RankPayload.of(trainer), model, kwargs), "the trainer's config, callbacks, module and data")
        env = {"CPU_NUM_DEVICES": str(n)} if _pjrt_device() == "CPU" else {}
        with _environ(env):
            results = run_on_devices(_rank_main, (payload, fn, n, rng_states()),
                                     heartbeat_timeout_s=trainer.heartbeat_timeout_s,
                                     start_method=self.start_method)
        if fn == "predict":
            return merge_predictions(results)
        result: RunResult = results[0]
        result.apply(trainer, model)
        return result.output


def xla_strategy(plan: Plan) -> XLAStrategy:
    """The user's XLA strategy object (its settings; on a rank, that rank's copy), else a new XLAStrategy for the
    plan's name. The launcher binds it to the rank's device."""
    template = plan.strategy_object
    if isinstance(template, XLAStrategy):
        return template
    strategy = XLAStrategy(debug=plan.strategy == "xla_debug")
    if template is not None:
        strategy._precision_plugin = template._precision_plugin
    return strategy


# ---------------------------------------------------------------------------------- on each rank
def _rank_main(payload: bytes, fn: str, world_size: int, rng: dict[str, Any], workdir: str) -> Any:
    """One rank: unpack its own copy of the run, train/evaluate on its device, return its share."""
    ctx = _rank_context(world_size)
    rank_payload, model, kwargs = pickle.loads(payload)  # this rank's own copy (ranks may be threads of one process)
    trainer = rank_payload.build()
    set_rng_states(rng)  # every rank starts from the launching process's RNG, as Lightning's ranks share a seed
    control.reset()
    rank0 = ctx.global_rank == 0
    beat = _Heartbeat(os.path.join(workdir, HEARTBEAT_FILE)) if rank0 else None
    if beat is not None:
        trainer.callbacks.append(beat)
    try:
        out = trainer.session.run(fn, model, xla_strategy(trainer.plan).bind(None, ctx), **kwargs)
    finally:
        if beat is not None:
            trainer.callbacks = [cb for cb in trainer.callbacks if cb is not beat]
    if fn == "predict":  # every rank returns its contiguous shard; the launcher concatenates in rank order
        return len(trainer.session.val_dataloaders), _to_host(out)
    if not rank0:
        return None
    return RunResult.from_session(trainer.session, fn, to_host(out), ctx.world_size)


def _rank_context(world_size: int) -> RankContext:
    """This rank's place in the run, from torch_xla's runtime; checks torch_xla started ``world_size`` ranks."""
    _, _, xr = import_xla()
    ctx = RankContext(global_rank=xr.global_ordinal(), local_rank=xr.local_ordinal(), node_rank=0,
                      world_size=xr.world_size(), local_world_size=xr.world_size())
    if ctx.world_size != world_size:
        raise RuntimeError(f"tpu_cores={world_size} asks for {world_size} devices but torch_xla started "
                           f"{ctx.world_size} ranks (one per device it found). Use tpu_cores={ctx.world_size}, "
                           "or tpu_cores=1 to train on one device in this process. (Without a TPU, set "
                           "PJRT_DEVICE=CPU to use XLA's CPU backend, which gets one device per rank.)")
    return ctx


class _Heartbeat(Callback):
    """(rank 0) Touches a file after each batch, at most once a second, so the launcher can tell a hung run."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._last = 0.0
        self.beat()

    def beat(self) -> None:
        now = time.monotonic()
        if now - self._last >= 1.0:
            self._last = now
            with open(self.path, "w") as f:
                f.write(str(time.time()))

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self.beat()

    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self.beat()

    def on_test_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self.beat()

    def on_predict_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self.beat()


# ---------------------------------------------------------------------------- starting the ranks
def run_on_devices(fn: Callable[..., Any], args: Sequence[Any] = (), *, heartbeat_timeout_s: float | None = None,
                   start_method: str = "fork") -> list[Any]:
    """Call ``fn(*args, workdir)`` on every XLA device via ``torch_xla.launch``; return the results in rank order.

    ``fn`` must be a module-level function and ``args`` picklable. Each rank's return value comes back
    through a file in ``workdir`` (torch_xla.launch drops return values). An exception in a rank is
    re-raised here with the rank and its traceback added as a note. With ``heartbeat_timeout_s``, the
    ranks are stopped when ``workdir/heartbeat`` (see ``_Heartbeat``) is not touched for that long.
    """
    torch_xla, _, _ = import_xla()
    if torch_xla._XLAC._xla_runtime_is_initialized():
        raise RuntimeError(
            "torch_xla's runtime is already initialised in this process (something used an XLA device here, "
            "e.g. a tpu_cores=1 run), and torch_xla cannot start multi-device ranks after that. Start the "
            "tpu_cores=N run in a fresh process, before anything touches the XLA device.")
    if start_method not in ("fork", "spawn", "forkserver"):
        raise ValueError(f"start_method={start_method!r}: use 'fork', 'spawn' or 'forkserver'.")
    if heartbeat_timeout_s is not None and heartbeat_timeout_s <= 0:
        raise ValueError(f"heartbeat_timeout_s must be > 0 seconds, got {heartbeat_timeout_s}")
    workdir = tempfile.mkdtemp(prefix="raytrainer-xla-")
    before = set(multiprocessing.active_children())
    stop = threading.Event()
    timed_out: list[str] = []
    watchdog = None
    if heartbeat_timeout_s is not None:
        watchdog = threading.Thread(target=_watch, args=(workdir, heartbeat_timeout_s, before, stop, timed_out),
                                    name="raytrainer-xla-watchdog", daemon=True)
        watchdog.start()
    try:
        try:
            torch_xla.launch(_guarded, args=(fn, tuple(args), workdir), start_method=start_method)
        except BaseException as exc:
            raise _rank_failure(exc, workdir, timed_out) from exc
        finally:
            stop.set()
            if watchdog is not None:
                watchdog.join(10)
        files = sorted((f for f in os.listdir(workdir) if f.startswith("result-rank")),
                       key=lambda f: int(f[len("result-rank"):-len(".pkl")]))
        results = []
        for name in files:
            with open(os.path.join(workdir, name), "rb") as f:
                results.append(pickle.load(f))
        return results
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _guarded(index: int, fn: Callable[..., Any], args: tuple[Any, ...], workdir: str) -> None:
    """Runs on each rank: call fn, write its result (or the error with this rank's traceback) to workdir."""
    import torch_xla.runtime as xr

    rank = xr.global_ordinal()
    try:
        result = fn(*args, workdir)
        data = _dumps(result, f"rank {rank}'s result")
    except BaseException as exc:
        with open(os.path.join(workdir, f"error-rank{rank}.txt"), "w") as f:
            f.write(f"{type(exc).__name__}\n{''.join(traceback.format_exception(exc))}")
        raise
    tmp = os.path.join(workdir, f".result-rank{rank}.pkl")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, os.path.join(workdir, f"result-rank{rank}.pkl"))


def _watch(workdir: str, timeout_s: float, before: set[Any], stop: threading.Event, timed_out: list[str]) -> None:
    """Stop the ranks when rank 0's heartbeat file is older than ``timeout_s`` (or never came)."""
    start = time.time()
    path = os.path.join(workdir, HEARTBEAT_FILE)
    while not stop.wait(1.0):
        try:
            last = os.path.getmtime(path)
        except OSError:
            last = start
        if time.time() - last > timeout_s:
            timed_out.append(f"no progress from XLA rank 0 for {timeout_s:.0f} s (stuck in a collective, a "
                             "compilation or a step); the ranks were stopped. Raise Trainer(heartbeat_timeout_s=...) "
                             "if steps or compilations legitimately take longer.")
            _stop_children(before)
            return


def _stop_children(before: set[Any]) -> None:
    """Terminate the rank processes this launch started (never other children of this process)."""
    started = [p for p in multiprocessing.active_children() if p not in before]
    for p in started:
        p.terminate()
    deadline = time.monotonic() + 10
    for p in started:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()


def _rank_failure(exc: BaseException, workdir: str, timed_out: list[str]) -> BaseException:
    """The error to raise in the launching process for a failed launch."""
    if timed_out:
        return TimeoutError(timed_out[0])
    errors = sorted(f for f in os.listdir(workdir) if f.startswith("error-rank"))
    if errors:
        name = errors[0]
        rank = int(name[len("error-rank"):-len(".txt")])
        with open(os.path.join(workdir, name)) as f:
            type_name, _, remote_tb = f.read().partition("\n")
        if type(exc).__name__ == type_name:  # torch_xla re-raised the rank's own exception: keep its type
            exc.add_note(f"raised on XLA rank {rank}; its traceback there:\n{remote_tb}")
            return exc
        return RuntimeError(f"XLA rank {rank} failed:\n{remote_tb}")
    if isinstance(exc, BrokenProcessPool):
        return RuntimeError("an XLA rank process died without a Python error (killed, out of memory, or aborted "
                            "by XLA, e.g. a collective that timed out); its output above says more.")
    return exc


# --------------------------------------------------------------------------------------- helpers
def _dumps(obj: Any, what: str) -> bytes:
    """Pickle with cloudpickle when available (lambdas, classes defined in scripts), else pickle."""
    try:
        import cloudpickle as pickler
    except ImportError:
        pickler = pickle  # type: ignore[assignment]
    try:
        return pickler.dumps(obj)
    except Exception as exc:
        raise TypeError(f"{what} cannot be pickled for the XLA ranks: {type(exc).__name__}: {exc}. Keep "
                        "unpicklable objects (open files, locks, clients) out of the module and datamodule "
                        "attributes, or create them in setup().") from exc


def _to_host(obj: Any) -> Any:
    """Predictions and other outputs on CPU (``host_copy.to_host`` copies every tensor in nested containers)."""
    from raytrainer.checkpoint.host_copy import to_host

    if obj is None:
        return None
    import torch_xla

    torch_xla.sync()
    return to_host(obj)


def _pjrt_device() -> str:
    return os.environ.get("PJRT_DEVICE", "").upper()


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the rank processes started inside the block, then restore them."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


__all__ = ["XLALauncher", "run_on_devices"]
