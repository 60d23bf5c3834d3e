"""In-memory snapshots: the full training state at a step boundary, for recovery in seconds.

DDP keeps the same parameters and optimizer state on every rank, so a surviving rank already holds
the newest model: a snapshot does not copy it every step. At each step boundary a rank records the
small, fast-changing part of the state (loop counters, RNGs, data position, buffers, metrics,
scheduler and callback states) and keeps *references* to its live parameters and optimizer
tensors, with their in-place version counters and an optimizer-step count. When a peer fails, the
survivor hands out that snapshot with the tensors copied then, but only if nothing changed them
since the boundary (no optimizer step, no in-place write); otherwise it hands out its last full copy.

Rank 0 also makes a full copy every ten seconds (or less often when copying is slow) and publishes
it to the Ray object store; the driver fetches it, so a copy lives on the driver's node as well and
the loss of every rank's node never destroys the only copy. Recovery prefers the newest snapshot a
survivor holds, then the driver's copy, then the newest valid durable checkpoint.

Sharded (FSDP) runs hold no full copy anywhere: ``ShardSnapshotter`` has every rank serialize its shards into a
piece at the same steps and send a copy to a holder rank (on another node when the world spans several), so any
single rank or node loss leaves every piece with a survivor (see the section at the end).
"""
from __future__ import annotations

import collections
import math
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from raytrainer.checkpoint.host_copy import LiveRefs
from raytrainer.utilities import log

AUTO_MAX_OVERHEAD = 0.05  # automatic interval: snapshots may cost at most 5% of training time
FULL_COPY_MAX_OVERHEAD = 0.01  # rank 0's published full copies: at most 1% of training time


class _Light(NamedTuple):
    """One step boundary's state: light parts copied, heavy tensors (parameters, optimizer state) live.

    ``refs`` holds the heavy tensors with their version counters and the optimizer-step count at the
    boundary; ``refs.copy(state)`` is the detached CPU copy of the boundary's state, or None once
    training has moved on (an optimizer step ran or a heavy tensor was written in place).
    """

    step: int
    state: dict[str, Any]
    refs: LiveRefs


# This process's newest snapshots (a rank actor): the light one of the last boundary, and the last full copy.
_LIGHT: _Light | None = None
_FULL: tuple[int, dict[str, Any]] | None = None
_LOCK = threading.Lock()


def _candidates() -> tuple[Any, tuple[int, dict[str, Any]] | None]:
    """(the light snapshot if it is newer than the last full copy, else None; the last full copy): the one
    choice ``latest`` and ``latest_step`` both make."""
    with _LOCK:
        light, full = _LIGHT, _FULL
    return (light if light is not None and (full is None or light.step > full[0]) else None), full


def latest() -> tuple[int, dict[str, Any]] | None:
    """This process's newest consistent snapshot as (step, detached CPU state), or None.

    Safe to call from another thread while training is stuck or stopped: the live tensors are only
    used when their version counters show they still hold the boundary's values.
    """
    light, full = _candidates()
    if light is not None:
        state = light.refs.copy(light.state)  # a write that begins during the copy is caught too
        if state is not None:
            return light.step, state
        log.debug("the snapshot of step %d is stale (training moved on before the failure); using the last full "
                  "copy%s", light.step, f" (step {full[0]})" if full else " (none)")
    return full


def latest_step() -> int | None:
    """The step ``latest()`` would return a snapshot of, without copying anything (the driver asks every rank for
    this, then fetches the snapshot itself from one rank only)."""
    light, full = _candidates()
    if light is not None and light.refs.unchanged():
        return light.step
    return None if full is None else full[0]


def _keep_full(light: Any) -> dict[str, Any] | None:
    """A full copy of ``light``'s state, kept as this process's last full copy; None when training moved on."""
    global _FULL
    state = light.refs.copy(light.state)
    if state is not None:
        with _LOCK:
            _FULL = (light.step, state)
    return state


def clear() -> None:
    global _LIGHT, _FULL
    with _LOCK:
        _LIGHT = _FULL = None
        _PIECES.clear()


def _heavy_tensors(session: Any) -> list[torch.Tensor]:
    """The tensors a snapshot keeps by reference: parameters and optimizer state."""
    heavy = [p for p in session.module.parameters()]
    for opt in session.optimizers:
        for per_param in opt.state.values():
            heavy.extend(v for v in per_param.values() if isinstance(v, torch.Tensor))
    return heavy


# Parts of bridge.capture's dict that it builds afresh from counters, RNG draws and cloned accumulators:
# nothing in them is shared with training, so a snapshot keeps them without copying.
_FRESH_KEYS = frozenset({"epoch", "global_step", "pytorch-lightning_version", "loops", "raytrainer",
                         "hyper_parameters", "hparams_name", "hparams_type"})


class _StepCount:
    """Completed optimizer steps (an optimizer step post-hook). The light snapshot's references hold this, not the
    Snapshotter: through its heartbeat the Snapshotter holds the trainer, and with it DDP's process group, whose
    connections then stayed open after a rank raised (its peers stayed blocked in a collective with it)."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        self.n += 1

    def count(self) -> int:
        return self.n


class Snapshotter:
    """Snapshots every ``every_n_steps`` optimizer steps (None: every step while that costs <= 5% of a step)."""

    def __init__(self, every_n_steps: int | None, publish: Callable[[int, dict[str, Any]], None] | None = None,
                 publish_every_s: float = 10.0, heartbeat: Callable[[int, int], None] | None = None,
                 heartbeat_every_s: float = 1.0) -> None:
        if every_n_steps is not None and every_n_steps < 0:
            raise ValueError(f"snapshot_every_n_steps={every_n_steps}: use an int >= 1, 0 for none, or None for "
                             "automatic.")
        self.enabled = every_n_steps != 0
        self.fixed = every_n_steps
        self.every = every_n_steps or 1
        self.publish = publish
        self.publish_every_s = publish_every_s
        self._last_step = -1
        self._last_publish = 0.0  # the first snapshot is published at once
        self._step_clock = 0.0
        self._clock_started = False
        self._step_time = 0.0
        self._step_times: collections.deque[float] = collections.deque(maxlen=15)
        self.cost_s = 0.0
        self._costs: collections.deque[float] = collections.deque(maxlen=15)
        self.full_cost_s = 0.0
        self.taken = 0
        self._publisher: threading.Thread | None = None
        self.heartbeat = heartbeat
        self.heartbeat_every_s = heartbeat_every_s
        self._last_beat = 0.0
        self._steps = _StepCount()
        self._hooked: set[int] = set()
        self._heavy_shape: Any = None
        self._heavy = LiveRefs()

    def since_last_step_s(self) -> float | None:
        """Seconds since the last training step boundary (less the snapshots taken at it); None before the first."""
        return time.perf_counter() - self._step_clock if self._clock_started else None

    def maybe_take(self, session: Any) -> None:
        """Called at each step boundary; snapshots when the interval has passed."""
        step = session.state.global_step
        now = time.perf_counter()
        if self.heartbeat is not None and now - self._last_beat >= self.heartbeat_every_s:
            self._last_beat = now
            self.heartbeat(step, session.state.current_epoch)
        if step != self._last_step:
            # time per optimizer step, median of the last 15 (it only sizes the automatic interval); the clock starts at
            # the first step boundary, so setup and the first step's warm-up do not count
            if self._clock_started:
                dt = now - self._step_clock
                self._step_times.append(dt)  # the median: the slow first steps (lazy set-up) do not linger in it
                self._step_time = statistics.median(self._step_times)
            self._clock_started = True
            self._step_clock = now
        if not self.enabled or step == self._last_step or step % self.every != 0:
            return
        self._snapshot(session)
        cost = time.perf_counter() - now
        self._step_clock += cost  # do not count the snapshot as step time
        if self.taken == 1:
            return  # the first snapshot pays one-time costs (imports, hooks): it would stretch the interval for long
        self._costs.append(cost)
        self.cost_s = statistics.median(self._costs)  # typical cost: a garbage collection now and then is not
        if self.fixed is None:
            proposed = max(1, math.ceil(self.cost_s / (AUTO_MAX_OVERHEAD * self._step_time))) \
                if self._step_time > 0 else self.every
            self.every = self._agree(proposed)

    def _snapshot(self, session: Any) -> None:
        """Take this boundary's snapshot (and, on rank 0, publish a full copy now and then).

        A light snapshot holds the parameters and optimizer state by reference, so it is usable only until the next
        optimizer step: when snapshots are further apart than one step (``every`` > 1, fixed or grown by the
        automatic interval), each one also keeps a full copy, so a failure between two snapshots resumes from the
        last one (at most ``every`` steps lost) rather than from the driver's copy of up to 10 s ago. Its cost counts
        in the automatic interval."""
        snap = self._take_light(session)
        if self.publish is not None:
            self._maybe_publish(snap)
        if self.every > 1 and (_FULL is None or _FULL[0] != snap.step):
            _keep_full(snap)

    def _agree(self, every: int) -> int:
        """The automatic interval to use next (ranks of a sharded run agree on one; here: this rank's own)."""
        return every

    def _take_light(self, session: Any) -> _Light:
        """Record this boundary: light state copied, parameters and optimizer state by reference."""
        global _LIGHT
        from raytrainer.checkpoint.bridge import capture

        for opt in session.optimizers:
            if id(opt) not in self._hooked:  # counts completed optimizer steps, however the step was written
                opt.register_step_post_hook(self._steps)
                self._hooked.add(id(opt))
        # The heavy tensors change identity only when optimizer state appears (first step) or the module changes.
        shape = (id(session.module), tuple(len(o.state) for o in session.optimizers))
        if shape != self._heavy_shape:
            self._heavy_shape = shape
            self._heavy = LiveRefs(_heavy_tensors(session), steps=self._steps.count)
        heavy, memo = self._heavy, {}
        ckpt = capture(session, weights_only=False, check=False)
        state = {k: v if k in _FRESH_KEYS else heavy.keep(v, memo) for k, v in ckpt.items()}
        snap = _Light(session.state.global_step, state, heavy.record())  # versions and step count at the boundary
        with _LOCK:
            _LIGHT = snap
        self._last_step = snap.step
        self.taken += 1
        return snap

    def take(self, session: Any) -> dict[str, Any]:
        """A full, detached copy of the training state now (at a step boundary), kept as the last full copy."""
        snap = self._take_light(session)
        state = _keep_full(snap)
        assert state is not None, "the state changed while the training thread was copying it"
        return state

    def _maybe_publish(self, light: _Light) -> None:
        """(rank 0, at the boundary ``light`` was taken) Every publish interval, a full copy of it goes to the
        driver from a background thread."""
        interval = max(self.publish_every_s, self.full_cost_s / FULL_COPY_MAX_OVERHEAD)
        if time.monotonic() - self._last_publish < interval or \
                (self._publisher is not None and self._publisher.is_alive()):
            return
        started = time.perf_counter()
        state = _keep_full(light)
        if state is None:
            return
        self.full_cost_s = time.perf_counter() - started
        self._last_publish = time.monotonic()
        self._publisher = threading.Thread(target=self._publish, args=(light.step, state), daemon=True,
                                           name="raytrainer-snapshot-publisher")
        self._publisher.start()

    def _publish(self, step: int, state: dict[str, Any]) -> None:
        try:
            assert self.publish is not None
            self.publish(step, state)
        except Exception as exc:  # a lost publication only makes the driver's copy older
            log.warning("snapshot at step %d was not published to the driver: %s", step, exc)


# ------------------------------------------------------------------------------------------------ sharded runs
# Under FSDP each rank holds only its shards, so a snapshot is one piece per rank, and a copy of every piece lives on
# a second rank (its holder, on another node when there is more than one), refreshed at each snapshot. Each rank keeps
# the pieces of the last two snapshot steps, its own and those of the ranks it holds for: the exchange at step S may
# be cut short by a failure, but the one before it finished on every rank (they all went on training), so step S's
# predecessor is always complete among the survivors unless a rank and its holder were both lost.
_PIECES: dict[int, collections.deque[Any]] = {}
PIECE_GENERATIONS = 2
EXCHANGE_TIMEOUT_S = 3.0      # a piece's transfer may take this long, plus its size at EXCHANGE_MIN_RATE
EXCHANGE_MIN_RATE = 100e6     # bytes per second


def holders(nodes: list[str]) -> list[int]:
    """For each rank (by the node it runs on), the rank that keeps a copy of its pieces: the next rank, cyclically,
    on another node that holds no copy yet (else the next on another node); the next rank when all share one node."""
    world = len(nodes)
    out: list[int] = []
    for r in range(world):
        others = [(r + k) % world for k in range(1, world) if nodes[(r + k) % world] != nodes[r]]
        free = [o for o in others if o not in out]
        out.append(free[0] if free else others[0] if others else (r + 1) % world)
    return out


def _keep(piece: Any) -> None:
    with _LOCK:
        kept = _PIECES.setdefault(piece.owner, collections.deque(maxlen=PIECE_GENERATIONS))
        if kept and kept[-1].step == piece.step:
            kept.pop()
        kept.append(piece)


def held_pieces() -> dict[int, list[int]] | None:
    """(sharded runs) The steps of the pieces this rank holds, by owner; None when it holds none."""
    with _LOCK:
        return {owner: [p.step for p in kept] for owner, kept in _PIECES.items()} or None


def pieces_at(wanted: list[int], step: int) -> list[Any]:
    """(sharded runs) The pieces of the owners in ``wanted`` taken at ``step`` that this rank holds."""
    with _LOCK:
        return [p for owner in wanted for p in _PIECES.get(owner, ()) if p.step == step]


def choose_pieces(held: list[dict[int, list[int]] | None], world: int) -> tuple[int, dict[int, list[int]]] | None:
    """The newest step for which the ranks in ``held`` (by rank; None: lost) hold a piece of every owner
    0..world-1, and which rank hands over which owners' pieces; None when no step is complete."""
    steps = sorted({s for h in held if h for kept in h.values() for s in kept}, reverse=True)
    for step in steps:
        assignment: dict[int, list[int]] = {}
        for owner in range(world):
            holder = next((r for r, h in enumerate(held) if h and step in h.get(owner, ())), None)
            if holder is None:
                break
            assignment.setdefault(holder, []).append(owner)
        else:
            return step, assignment
    return None


class ShardSnapshotter(Snapshotter):
    """Snapshots of a sharded (FSDP) run: every rank serializes its own shards (with the loop state) into a piece at
    the same step boundaries, and sends a copy to its holder rank over the process group."""

    def __init__(self, every_n_steps: int | None, strategy: Any,
                 heartbeat: Callable[[int, int], None] | None = None) -> None:
        super().__init__(every_n_steps, heartbeat=heartbeat)
        self.strategy = strategy
        self.holders: list[int] | None = None  # by rank: who keeps its copy (agreed at the first snapshot)

    def _snapshot(self, session: Any) -> None:
        self._own_piece(session)
        self._last_step = session.state.global_step
        self.taken += 1

    def _own_piece(self, session: Any, exchange: bool = True) -> Any:
        from raytrainer.checkpoint.bridge import capture
        from raytrainer.checkpoint.shard_snapshot import make_piece

        state = capture(session, weights_only=False, check=False, gather=False)
        piece = make_piece(state, self.strategy.global_rank, session.state.global_step, session.state.current_epoch)
        _keep(piece)
        if exchange and self.strategy.world_size > 1:
            for theirs in self._exchange(piece):
                _keep(theirs)
        return piece

    def _exchange(self, piece: Any) -> list[Any]:
        """Send ``piece`` to this rank's holder; receive the pieces of the ranks this one holds for."""
        import pickle

        import torch.distributed as dist

        from raytrainer.checkpoint.shard_snapshot import Piece

        rank = self.strategy.global_rank
        if self.holders is None:
            nodes: list[Any] = [None] * self.strategy.world_size
            dist.all_gather_object(nodes, str(getattr(self.strategy.ctx, "node_id", "")))
            self.holders = holders(nodes)
        dst, sources = self.holders[rank], [s for s, h in enumerate(self.holders) if h == rank]
        device = self.strategy._collective_device()
        head = pickle.dumps((piece.owner, piece.step, piece.epoch, piece.index, piece.data))
        sizes = torch.tensor([len(head), piece.flat.numel()], dtype=torch.int64, device=device)
        theirs = [torch.empty(2, dtype=torch.int64, device=device) for _ in sources]
        _p2p(dist, [(sizes, dst)], list(zip(theirs, sources)))
        heads = [torch.empty(int(t[0]), dtype=torch.uint8, device=device) for t in theirs]
        flats = [torch.empty(int(t[1]), dtype=torch.uint8, device=device) for t in theirs]
        # a peer that failed after sending its sizes never sends the rest, and one that failed holding a sharded
        # module cannot close its connections: bound the wait by the size of what comes in
        mine = torch.frombuffer(bytearray(head), dtype=torch.uint8).to(device)
        _p2p(dist, [(mine, dst), (piece.flat.to(device), dst)],
             [(t, src) for src, h, f in zip(sources, heads, flats) for t in (h, f)],
             timeout_s=EXCHANGE_TIMEOUT_S + sum(int(t.sum()) for t in theirs) / EXCHANGE_MIN_RATE)
        received = []
        for h, f in zip(heads, flats):
            owner, step, epoch, index, data = pickle.loads(h.cpu().numpy().tobytes())
            received.append(Piece(owner, step, epoch, data, index, f.cpu()))
        return received

    def _agree(self, every: int) -> int:
        """The largest interval any rank proposes: every rank must snapshot (and exchange) at the same steps."""
        import torch.distributed as dist

        t = torch.tensor([every], dtype=torch.int64, device=self.strategy._collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def take(self, session: Any) -> Any:  # type: ignore[override]
        """This rank's piece now (the ranks stopped at an agreed step to resize); no exchange."""
        return self._own_piece(session, exchange=False)


def _p2p(dist: Any, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]],
         timeout_s: float | None = None) -> None:
    """Post every send and receive at once, then wait for all (each within ``timeout_s`` when given)."""
    from datetime import timedelta

    ops = [dist.P2POp(dist.isend, t, peer) for t, peer in sends] + \
        [dist.P2POp(dist.irecv, t, peer) for t, peer in recvs]
    for work in dist.batch_isend_irecv(ops):
        if timeout_s is None:
            work.wait()
        else:
            work.wait(timedelta(seconds=timeout_s))
