"""Issue 20: the fault-injection suite. Each case runs short real trainings (tests/faults/fault_train.py), injects one
fault at a point its seed picks, and checks the invariants listed in fault_harness.py. `make test` runs
DEFAULT_CASES (a few minutes); `pytest tests/faults --fault-soak N` (or RAYTRAINER_FAULT_SOAK=N) runs N random
seeds; `--fault-seed KIND:SEED` (or RAYTRAINER_FAULT_SEED) replays one case, as every failure message says."""
from __future__ import annotations

import os
import re
import signal

import pytest
from fault_harness import (
    COUNTS,
    EVERY_N,
    KINDS,
    PREEMPTED_EXIT_CODE,
    Case,
    Injection,
    Moto,
    Run,
    SmallDisk,
    drop_dac_override,
    limit_file_size,
    set_tree_writable,
    tmpfs_available,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

def _signal(sig: int) -> callable:
    def send(run: Run) -> bool:
        if run.proc.poll() is not None:
            return False
        os.kill(run.proc.pid, sig)
        return True
    return send


def _signal_rank(sig: int, rank: int) -> callable:
    def send(run: Run) -> bool:
        pid = run.marker(f"pid.rank{rank}")
        if run.proc.poll() is not None or not pid:
            return False
        try:
            os.kill(int(pid), sig)
        except ProcessLookupError:
            return False
        return True
    return send


def _events(root: str) -> list[dict]:
    import json

    out = []
    for d, _, files in os.walk(root):
        if "events.jsonl" in files:
            with open(os.path.join(d, "events.jsonl")) as f:
                out += [json.loads(line) for line in f if line.strip()]
    return out


def _choose_point(case: Case, sig: int, target: str, steps: int,
                  train_s: float) -> tuple[dict | None, Injection | None]:
    """A step (the run's own callback sends the signal there), a delay after the first step, or a delay after the
    process started (its imports and fit's setup); returns (the run's inject config, the harness's injection)."""
    mode = case.rng.choices(["step", "first-step", "spawn"], weights=[4, 4, 2])[0]
    name = signal.Signals(sig).name
    if mode == "step":
        step = case.rng.randint(1, steps - 1)
        case.note(f"{name} to the {target} at step {step} (from the run's callback)")
        return {"step": step, "sig": sig, "target": target, "rank": 0}, None
    delay = case.rng.uniform(0.0, train_s if mode == "first-step" else (12.0 if case.ray else 3.0))
    case.note(f"{name} to the {target} {delay:.2f}s after {mode}")
    return None, Injection(mode, delay, _signal(sig), f"{name} {delay:.2f}s after {mode}")


def _finished_unharmed(case: Case, run: Run, root: str, ref: dict, why: str) -> None:
    """The fault came too late to matter: the run must equal the uninterrupted one and end as finished."""
    case.note(why)
    res = case.expect_clean(run, "a run that finished")
    if res is not None:
        case.compare(res, ref, "the run")
    case.check_final(root)


def driver_signal(case: Case, sig: int) -> None:
    """SIGKILL or SIGTERM to the driver (the only process of an in-process run), then the rerun with "last"."""
    world = 2 if case.ray else 1
    ref = case.refs.get(world)
    root = os.path.join(case.tmp, "root")
    steps = 32 // world
    inject, injection = _choose_point(case, sig, "driver", steps, ref["train_s"])
    run = case.train(case.config(root, inject=inject), injection)
    delivered = run.marker("signal-sent") is not None if inject else injection.delivered
    case.faults += delivered
    if run.rc == 0:  # the signal came too late to matter (or not at all): the run must be the uninterrupted one
        _finished_unharmed(case, run, root, ref, "the run ended before the signal could matter")
        return
    started = bool(_events(root))
    if sig == signal.SIGKILL:
        case.check(run.rc == -signal.SIGKILL, f"SIGKILLed run: exit {run.rc}, expected -9")
    else:
        ok = run.rc == PREEMPTED_EXIT_CODE or (run.rc == -signal.SIGTERM and not started)
        case.check(ok, f"SIGTERMed run: exit {run.rc}, expected {PREEMPTED_EXIT_CODE} (preempted)"
                       + ("" if started else " or -15 (before fit started)"))
        if run.rc == PREEMPTED_EXIT_CODE:
            case.check("preempt" in run.output.lower(), "exit 75 without a message saying the run was preempted")
    found = case.check_checkpoints(root)
    picked, st = case.check_last(root, found)
    if run.rc == PREEMPTED_EXIT_CODE and st is not None:
        case.check(st.get("state") == "preempted", f"status after a preemption says {st.get('state')}")
    case.resume_and_compare(root, picked, ref)


def ray_rank_sigkill(case: Case) -> None:
    """SIGKILL of one Ray rank: the run recovers (max_failures=1) and ends bitwise equal to an uninterrupted run."""
    ref = case.refs.get(2)
    root = os.path.join(case.tmp, "root")
    rank = case.rng.choice([0, 1])
    if case.rng.random() < 0.5:
        step = case.rng.randint(1, 15)
        case.note(f"SIGKILL to rank {rank} at step {step} (from its callback)")
        inject, injection = {"step": step, "sig": signal.SIGKILL, "target": "self", "rank": rank}, None
    else:
        delay = case.rng.uniform(0.0, ref["train_s"])
        case.note(f"SIGKILL to rank {rank} {delay:.2f}s after the first step")
        inject, injection = None, Injection("first-step", delay, _signal_rank(signal.SIGKILL, rank), "rank SIGKILL")
    run = case.train(case.config(root, inject=inject, max_failures=1), injection)
    delivered = run.marker("signal-sent") is not None if inject else injection.delivered
    case.faults += delivered
    res = case.expect_clean(run, "a Ray run with max_failures=1 after a rank was killed")
    if res is not None:
        case.compare(res, ref, "the recovered run")
    kinds = [e["event"] for e in _events(root)]
    if delivered and run.rc == 0 and "failure" not in kinds:
        case.note("the rank was killed as the run ended: no failure recorded")
    case.check_final(root)


def disk_full(case: Case) -> None:
    """A disk too small for the run (a tmpfs where one can be mounted, else RLIMIT_FSIZE), then the rerun on a disk
    with room."""
    ref = case.refs.get(1)
    pages = ref["disk_bytes"] // 4096
    if tmpfs_available(case.tmp):
        size = case.rng.randint(max(2, pages // 10), pages - 1) * 4096
        case.note(f"a {size} byte tmpfs; the run needs {ref['disk_bytes']}")
        disk = SmallDisk(os.path.join(case.tmp, "disk"), size)
        case.cleanups.append(disk.close)
        root = os.path.join(disk.path, "root")
        run = case.train(case.config(root))
        words = ("No space left on device", "Errno 28")
    else:
        limit = case.rng.randint(4096, ref["ckpt_bytes"] - 1)
        case.note(f"RLIMIT_FSIZE {limit} bytes (no tmpfs here); a checkpoint is {ref['ckpt_bytes']}")
        root = os.path.join(case.tmp, "root")
        run = case.train(case.config(root), preexec=limit_file_size(limit))
        disk = None
        words = ("File too large", "Errno 27")
    case.faults += 1
    case.check(run.rc not in (0, None), f"a run on a disk too small for it exited {run.rc}")
    if run.rc != 0:
        case.expect_named_failure(run, words, "the run on a full disk")
    found = case.check_checkpoints(root)
    picked, _ = case.check_last(root, found)
    if disk is not None:
        disk.grow(256 * 1024 * 1024)
    case.resume_and_compare(root, picked, ref)


def disk_readonly(case: Case) -> None:
    """The run's directory made read-only mid-run (chmod; the run loses root's right to ignore modes), then the
    rerun once it is writable again."""
    preexec = drop_dac_override if os.geteuid() == 0 else None
    ref = case.refs.get(1)
    root = os.path.join(case.tmp, "root")
    delay = case.rng.uniform(0.0, ref["train_s"])
    case.note(f"the run's tree made read-only {delay:.2f}s after the first step")

    def freeze(run: Run) -> bool:
        if run.proc.poll() is not None:
            return False
        set_tree_writable(root, False)
        return True

    injection = Injection("first-step", delay, freeze, "read-only")
    case.cleanups.append(lambda: set_tree_writable(root, True))
    run = case.train(case.config(root), injection, preexec=preexec)
    case.faults += injection.delivered
    found = case.check_checkpoints(root)
    picked, _ = case.check_last(root, found)  # status reads a read-only run
    set_tree_writable(root, True)
    if run.rc == 0:
        _finished_unharmed(case, run, root, ref, "the run ended before it needed to write again")
        return
    case.expect_named_failure(run, ("Permission denied", "Errno 13", "Read-only", "Errno 30"),
                              "the run on a read-only directory")
    case.resume_and_compare(root, picked, ref)


def _with_moto(case: Case) -> Moto:
    moto = Moto(case.tmp)
    case.cleanups.append(moto.close)
    case.env = moto.env
    for name, value in moto.env.items():  # this process reads the bucket too
        case.setenv(name, value)
    return moto


def s3_pause(case: Case) -> None:
    """The S3 server (moto) paused with SIGSTOP for a few seconds mid-run; the run rides it out or fails naming the
    storage, then the rerun."""
    ref = case.refs.get(1)
    moto = _with_moto(case)
    root = f"s3://{moto.bucket}/root"
    delay, pause = case.rng.uniform(0.0, ref["train_s"]), case.rng.uniform(0.5, 6.0)
    case.note(f"S3 server paused for {pause:.2f}s, {delay:.2f}s after the first step")

    def stop(run: Run) -> bool:
        if run.proc.poll() is not None:
            return False
        moto.pause(pause)
        return True

    injection = Injection("first-step", delay, stop, f"S3 paused {pause:.1f}s")
    run = case.train(case.config(root), injection)
    case.faults += injection.delivered
    if injection.delivered:
        moto.timer.join(timeout=30)
    if run.rc != 0:
        case.expect_named_failure(run, ("S3", "AWS", "timed out", "timeout", "connect", "curl"),
                                  "the run whose S3 server was paused")
    found = case.check_checkpoints(root)
    picked, st = case.check_last(root, found)
    if run.rc == 0:
        res = case.expect_clean(run, "the run that rode out the pause")
        if res is not None:
            case.compare(res, ref, "the run")
        case.check_final(root)
    else:
        case.resume_and_compare(root, picked, ref)


def s3_kill(case: Case) -> None:
    """The S3 server killed mid-run (its data is gone with it): the run ends within its bound, naming the storage."""
    ref = case.refs.get(1)
    moto = _with_moto(case)
    root = f"s3://{moto.bucket}/root"
    delay = case.rng.uniform(0.0, ref["train_s"])
    case.note(f"S3 server killed {delay:.2f}s after the first step")

    def kill(run: Run) -> bool:
        if run.proc.poll() is not None:
            return False
        moto.proc.kill()
        return True

    injection = Injection("first-step", delay, kill, "S3 server killed")
    run = case.train(case.config(root), injection)
    case.faults += injection.delivered
    if run.rc == 0:
        case.note("the run ended without needing the server again")
    else:
        case.expect_named_failure(run, ("S3", "AWS", "timed out", "timeout", "connect", "curl"),
                                  "the run whose S3 server was killed")


def concurrent(case: Case) -> None:
    """Two runs started together into one default_root_dir (one of them SIGKILLed at a step, on some seeds): each
    has its own version, no version holds the other's checkpoints, and none is missing."""
    import time

    ref = case.refs.get(1)
    root = os.path.join(case.tmp, "root")
    skew = 0.0 if case.rng.random() < 0.5 else case.rng.uniform(0.0, 0.3)
    kill_step = case.rng.randint(1, 31) if case.rng.random() < 0.5 else None
    case.note(f"two runs {skew:.3f}s apart" + (f"; the second SIGKILLed at step {kill_step}" if kill_step else ""))
    start_at = time.time() + 8.0
    tags = [f"{case.config_tag}-a", f"{case.config_tag}-b"]
    inject = {"step": kill_step, "sig": signal.SIGKILL, "target": "self", "rank": 0} if kill_step else None
    runs = [case.start(case.config(root, tag=tags[0], start_at=start_at)),
            case.start(case.config(root, tag=tags[1], start_at=start_at + skew, inject=inject))]
    for run in runs:
        case.wait(run)
    case.faults += 1 + (runs[1].marker("signal-sent") is not None)
    res = case.expect_clean(runs[0], "the first of two runs")
    if res is not None:
        case.compare(res, ref, "the first of two runs")
    if kill_step is None or runs[1].rc == 0:
        res = case.expect_clean(runs[1], "the second of two runs")
        if res is not None:
            case.compare(res, ref, "the second of two runs")
    else:
        case.check(runs[1].rc == -signal.SIGKILL, f"the SIGKILLed run exited {runs[1].rc}")
    found = case.check_checkpoints(root, tags=set(tags))
    by_tag: dict[str, set[str]] = {}
    for info in found.values():
        by_tag.setdefault(info["tag"], set()).add(info["version"])
    for tag, versions in by_tag.items():
        case.check(len(versions) == 1, f"run {tag} wrote checkpoints into several versions: {sorted(versions)}")
    case.check(len({v for vs in by_tag.values() for v in vs}) == len(by_tag), f"runs share a version: {by_tag}")
    expected = {f"epoch={(s - 1) // 16}-step={s}.ckpt" for s in range(EVERY_N, 33, EVERY_N)} | {"last.ckpt"}
    for tag, run in zip(tags, runs):
        names = {f.rsplit("/", 1)[1] for f, info in found.items() if info["tag"] == tag}
        if run.rc == 0:
            case.check(names == expected, f"run {tag}: checkpoints {sorted(expected - names)} missing, "
                                          f"{sorted(names - expected)} unexpected")
        else:
            steps = sorted(int(m.group(1)) for n in names if (m := re.search(r"step=(\d+)", n)))
            case.check(steps == list(range(EVERY_N, EVERY_N * len(steps) + 1, EVERY_N)),
                       f"run {tag} (killed) lost a checkpoint before its last: steps {steps}")
    starts = [e for e in _events(root) if e["event"] == "start"]
    case.check(len(starts) == 2, f"{len(starts)} start events for two runs")


SCENARIOS = {
    "driver_sigkill": lambda case: driver_signal(case, signal.SIGKILL),
    "driver_sigterm": lambda case: driver_signal(case, signal.SIGTERM),
    "disk_full": disk_full,
    "disk_readonly": disk_readonly,
    "s3_pause": s3_pause,
    "s3_kill": s3_kill,
    "concurrent": concurrent,
    "ray_rank_sigkill": ray_rank_sigkill,
    "ray_driver_sigterm": lambda case: driver_signal(case, signal.SIGTERM),
    "ray_driver_sigkill": lambda case: driver_signal(case, signal.SIGKILL),
}
assert set(SCENARIOS) == set(KINDS)


def test_fault(fault_case, fault_refs, tmp_path, monkeypatch):
    kind, seed = fault_case
    case = Case(kind, seed, str(tmp_path), fault_refs)
    case.setenv = monkeypatch.setenv  # restored after the case
    COUNTS.cases += 1
    COUNTS.seeds.append(f"{kind}:{seed}")
    try:
        SCENARIOS[kind](case)
    finally:
        for cleanup in reversed(case.cleanups):
            cleanup()
        for run in case.runs:  # nothing of a case outlives it, whatever failed
            if run.proc.poll() is None:
                os.killpg(run.proc.pid, signal.SIGKILL)
                run.proc.wait(timeout=30)
    runs = ", ".join(f"exit {r.rc} in {r.seconds:.1f}s" + (f" ({r.cause()})" if r.rc and r.cause() else "")
                     for r in case.runs)
    print(f"\n{case.label}: {'; '.join(case.notes)}; runs: {runs}; {len(case.violations)} violation(s)")
    case.finish()
