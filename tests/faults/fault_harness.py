"""The fault-injection harness: short real trainings (tests/faults/fault_train.py, in subprocesses), one fault each at
a point chosen by ``random.Random`` from a seed, and the invariants checked after it.

A case is ``KIND:SEED``. The seed picks where the fault lands (a step, a delay after the first step, a delay after
the process started, a disk size, a pause length); every assertion message names the case and the command that
replays it (``pytest tests/faults --fault-seed KIND:SEED``). A bare ``SEED`` (the soak mode draws them) also picks
the kind.

Invariants, after every fault:

* bounded end: the run exits within its bound, with success, the preemption exit code 75 (SIGTERM), the signal that
  killed it (SIGKILL), or an error whose stderr names the cause (the disk full, read-only, storage unreachable);
  no process of the run (Ray's included) outlives it;
* complete checkpoints only: every visible ``*.ckpt`` verifies and loads, holds the step its name says and the tag
  of the run that owns its version; every checkpoint an events log names exists and loads;
* one "last": ``raytrainer status ROOT`` names the newest complete checkpoint (the highest step among those that
  load), the rerun with ``ckpt_path="last"`` resumes from that same file, and after it ``status`` says finished
  with the final step;
* exact resume: the rerun's parameters are bitwise equal to an uninterrupted run's (the README promises it for
  deterministic runs resumed from a checkpoint and for Ray runs of a fixed world size recovered after a rank died);
* two runs started together into one root: each gets its own version, each version holds only its own run's
  checkpoints, and none is missing.
"""
from __future__ import annotations

import contextlib
import ctypes
import glob
import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN = os.path.join(HERE, "fault_train.py")
REPO = os.path.dirname(os.path.dirname(HERE))

# kind -> whether it runs on Ray (2 ranks, each run starts its own local Ray instance)
KINDS = {
    "driver_sigkill": False,
    "driver_sigterm": False,
    "disk_full": False,
    "disk_readonly": False,
    "s3_pause": False,
    "s3_kill": False,
    "concurrent": False,
    "ray_rank_sigkill": True,
    "ray_driver_sigterm": True,
    "ray_driver_sigkill": True,
}
# Cases that show a real invariant violation not fixed yet: "KIND:SEED" or "KIND" -> reason; they run as
# xfail(strict=True), so a fix makes them fail until the entry is removed.
KNOWN_VIOLATIONS: dict[str, str] = {}
# what `make test` runs: every kind once (the in-process signals twice), except the slowest Ray one
DEFAULT_CASES = ["driver_sigkill:1", "driver_sigkill:2", "driver_sigterm:1", "driver_sigterm:2", "disk_full:1",
                 "disk_readonly:1", "s3_pause:1", "s3_kill:1", "concurrent:1", "ray_rank_sigkill:1",
                 "ray_driver_sigterm:1"]
EVERY_N = 4            # ModelCheckpoint(every_n_train_steps=4)
SLEEP_S = 0.03         # per training step, so faults chosen by time land inside training
BOUND_S = {False: 90.0, True: 180.0}  # a run must end within this (in-process, Ray); loaded CI machines are slow
LEFTOVER_GRACE_S = 20.0   # a run's processes must be gone this long after it ended
RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")
RAY_AGENT_GRACE_S = 90.0  # ... except Ray's agents after a killed driver (see Case.wait)
PREEMPTED_EXIT_CODE = 75
_CAUSE = re.compile(r"^\s*([A-Za-z_][\w.]*(Error|Exception|Exhausted|Timeout\w*|Interrupt))(: .+)?$", re.M)


# ----------------------------------------------------------------------------------------------- counts


@dataclass
class Counts:
    cases: int = 0
    runs: int = 0              # training processes started (faulted runs, reruns, references)
    faults: int = 0            # faults that reached a live run
    violations: int = 0        # invariant violations found (xfail-ed known ones included)
    seeds: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (f"fault-injection: {self.cases} cases, {self.runs} training runs, {self.faults} faults injected, "
                f"{self.violations} invariant violations (cases {' '.join(self.seeds)})")


COUNTS = Counts()


def parse_cases(seeds: str | None, soak: int | None) -> list[tuple[str, int]]:
    """The (kind, seed) cases to run: ``seeds`` (``KIND:SEED`` or ``SEED``, comma separated) if given, else ``soak``
    random seeds (base printed), else DEFAULT_CASES."""
    if seeds:
        items = [s.strip() for s in seeds.split(",") if s.strip()]
    elif soak:
        base = random.SystemRandom().randrange(10**6, 10**7)
        print(f"\nfault-injection soak: {soak} seeds from {base} (replay one with --fault-seed SEED)")
        items = [str(base + i) for i in range(soak)]
    else:
        items = DEFAULT_CASES
    cases = []
    for item in items:
        kind, _, seed = item.rpartition(":")
        if not kind:
            kind = sorted(KINDS)[random.Random(int(seed)).randrange(len(KINDS))]
        if kind not in KINDS:
            raise ValueError(f"unknown fault kind {kind!r} in {item!r}; kinds: {', '.join(KINDS)}")
        cases.append((kind, int(seed)))
    return cases


# ----------------------------------------------------------------------------------------------- processes


def _child_env(run_id: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([HERE, REPO] + [p for p in [env.get("PYTHONPATH")] if p])
    env["RAY_ADDRESS"] = "local"        # a private Ray instance, never another program's cluster on this machine
    env["RAYTRAINER_FAULT_RUN"] = run_id  # marks every process of the run, Ray's included (leftover check)
    env.pop("RAYTRAINER_LOG", None)
    env.update(extra or {})
    return env


def run_processes(run_id: str) -> list[int]:
    """Live processes that carry ``RAYTRAINER_FAULT_RUN=run_id`` in their environment."""
    needle = f"RAYTRAINER_FAULT_RUN={run_id}".encode() + b"\0"
    pids = []
    for path in glob.glob("/proc/[0-9]*/environ"):
        try:
            with open(path, "rb") as f:
                if needle in f.read() + b"\0":
                    pid = int(path.split("/")[2])
                    with open(f"/proc/{pid}/stat") as s:
                        if s.read().rsplit(")", 1)[1].split()[0] != "Z":
                            pids.append(pid)
        except (OSError, ValueError):
            continue
    return pids


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def drop_dac_override() -> None:
    """preexec_fn: drop the capabilities that let root ignore file modes (so a read-only directory binds it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2, 3):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP: root's capabilities after exec lose it
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@dataclass
class Run:
    """One training process and what it left."""

    cfg: dict
    proc: subprocess.Popen
    run_id: str
    started: float
    rc: int | None = None
    seconds: float = 0.0
    hung: bool = False
    leftovers: list[int] = field(default_factory=list)

    @property
    def workdir(self) -> str:
        return self.cfg["workdir"]

    def text(self, name: str) -> str:
        with open(os.path.join(self.workdir, name), errors="replace") as f:
            return f.read()

    @property
    def output(self) -> str:
        return self.text("stdout") + self.text("stderr")

    def marker(self, name: str) -> str | None:
        path = os.path.join(self.workdir, name)
        try:
            with open(path) as f:
                return f.read()
        except OSError:
            return None

    def result(self) -> dict | None:
        path = os.path.join(self.workdir, "result.pt")
        return torch.load(path, weights_only=True) if os.path.exists(path) else None

    def cause(self) -> str | None:
        """The error the run's stderr names (the last traceback's exception line), if any."""
        found = list(_CAUSE.finditer(self.text("stderr")))
        return found[-1].group(0).strip() if found else None


class Injection:
    """A fault the harness delivers while a run is alive: ``action(run)`` once the point is reached. ``after`` is
    "spawn" (seconds after the process started), "first-step" (seconds after the first training step ended) or
    None (never: the fault is delivered by the run's own callback or by its environment)."""

    def __init__(self, after: str | None, delay: float, action: Callable[[Run], bool], what: str) -> None:
        self.after, self.delay, self.action, self.what = after, delay, action, what
        self.fired = False
        self.delivered = False

    def due(self, run: Run, now: float) -> bool:
        if self.fired or self.after is None:
            return False
        if self.after == "spawn":
            return now - run.started >= self.delay
        first = run.marker("first-step")
        return first is not None and time.time() - float(first) >= self.delay

    def fire(self, run: Run) -> None:
        self.fired = True
        self.delivered = bool(self.action(run))


# ----------------------------------------------------------------------------------------------- a case


class CaseFailed(AssertionError):
    pass


class Case:
    """One fault-injection case: its rng, its runs, its checks. ``check`` records a violation (and the case fails
    at ``finish``); ``require`` stops at once."""

    def __init__(self, kind: str, seed: int, tmp: str, refs: References) -> None:
        self.kind, self.seed, self.tmp, self.refs = kind, seed, tmp, refs
        self.cleanups: list[Callable[[], None]] = []
        self.rng = random.Random(f"{kind}:{seed}")
        self.ray = KINDS[kind]
        self.violations: list[str] = []
        self.notes: list[str] = []
        self.faults = 0
        self.runs: list[Run] = []
        self._n = 0
        self.env: dict[str, str] = {}  # for the run's processes and status (a moto case's S3 endpoint)
        self.setenv: Callable[[str, str], None] = os.environ.__setitem__  # test_fault passes monkeypatch's

    @property
    def label(self) -> str:
        return f"fault case {self.kind}:{self.seed}"

    def replay(self) -> str:
        return f"replay: .venv/bin/pytest tests/faults --fault-seed {self.kind}:{self.seed}"

    def note(self, text: str) -> None:
        self.notes.append(text)

    def check(self, ok: Any, what: str) -> bool:
        if not ok:
            self.violations.append(what)
        return bool(ok)

    def require(self, ok: Any, what: str) -> None:
        if not self.check(ok, what):
            raise CaseFailed(self.report())

    def report(self) -> str:
        lines = [f"{self.label}: {len(self.violations)} invariant violation(s); {self.replay()}"]
        lines += [f"  VIOLATION {v}" for v in self.violations]
        lines += [f"  note: {n}" for n in self.notes]
        for run in self.runs[-3:]:
            lines.append(f"  run {os.path.basename(run.workdir)} rc={run.rc} {run.seconds:.1f}s; output tail:")
            lines += ["    | " + line for line in run.output.splitlines()[-15:]]
        return "\n".join(lines)

    def finish(self) -> None:
        COUNTS.faults += self.faults
        COUNTS.violations += len(self.violations)
        if self.violations:
            raise CaseFailed(self.report())

    # ------------------------------------------------------------------ running

    def config(self, root: str, **kw: Any) -> dict:
        self._n += 1
        workdir = os.path.join(self.tmp, f"run{self._n}")
        os.makedirs(workdir)
        cfg = dict(root=root, workdir=workdir, tag=f"{self.kind}-{self.seed}", num_processes=2 if self.ray else 1,
                   every_n=EVERY_N, sleep_s=SLEEP_S, max_failures=0)
        cfg.update(kw)
        return cfg

    def start(self, cfg: dict, preexec: Callable[[], None] | None = None) -> Run:
        run_id = uuid.uuid4().hex
        with open(os.path.join(cfg["workdir"], "stdout"), "w") as out, \
                open(os.path.join(cfg["workdir"], "stderr"), "w") as err:
            proc = subprocess.Popen([sys.executable, TRAIN, json.dumps(cfg)], stdout=out, stderr=err, cwd=REPO,
                                    env=_child_env(run_id, self.env), start_new_session=True, preexec_fn=preexec)
        COUNTS.runs += 1
        run = Run(cfg, proc, run_id, time.monotonic())
        self.runs.append(run)
        return run

    def wait(self, run: Run, injection: Injection | None = None, bound: float | None = None) -> Run:
        """Wait for ``run`` to exit, at most its bound, delivering ``injection`` on the way; a run that outlives
        the bound is a violation (killed, with its process group and every process it marked)."""
        bound = bound or BOUND_S[self.ray]
        while True:
            rc = run.proc.poll()
            now = time.monotonic()
            if rc is not None:
                break
            if injection is not None and injection.due(run, now):
                injection.fire(run)
            if now - run.started > bound:
                run.hung = True
                self.check(False, f"run {os.path.basename(run.workdir)} did not end within its bound of {bound:.0f}s "
                                  f"(a hang){' after ' + injection.what if injection and injection.fired else ''}")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(run.proc.pid, signal.SIGKILL)
                rc = run.proc.wait(timeout=30)
                break
            time.sleep(0.02)
        run.rc, run.seconds = rc, time.monotonic() - run.started
        left = self._wait_gone(run, LEFTOVER_GRACE_S)
        if left and all(_cmdline(pid).startswith(RAY_AGENTS) for pid in left):
            # Ray's per-node agents fate-share with their raylet, but a killed driver takes the GCS with it, and an
            # agent first reports the raylet's death to that GCS (retrying until it gives up): allow them longer.
            waited = time.monotonic()
            left = self._wait_gone(run, RAY_AGENT_GRACE_S - LEFTOVER_GRACE_S)
            self.note(f"Ray's agents outlived run {os.path.basename(run.workdir)} by "
                      f"{LEFTOVER_GRACE_S + time.monotonic() - waited:.0f}s")
        if left:
            run.leftovers = left
            cmds = [f"{pid}:{_cmdline(pid)[:60]}" for pid in left]
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            grace = RAY_AGENT_GRACE_S if all(c.split(":", 1)[1].startswith(RAY_AGENTS) for c in cmds) \
                else LEFTOVER_GRACE_S
            self.check(False, f"{len(left)} process(es) of run {os.path.basename(run.workdir)} outlived it by "
                              f"{grace:.0f}s: {cmds}")
        return run

    @staticmethod
    def _wait_gone(run: Run, seconds: float) -> list[int]:
        deadline = time.monotonic() + seconds
        while (left := run_processes(run.run_id)) and time.monotonic() < deadline:
            time.sleep(0.25)
        return left

    def train(self, cfg: dict, injection: Injection | None = None, preexec: Callable[[], None] | None = None) -> Run:
        return self.wait(self.start(cfg, preexec), injection)

    # ------------------------------------------------------------------ checks

    def expect_clean(self, run: Run, what: str) -> dict | None:
        """A run that must succeed: exit 0 and a result."""
        res = run.result()
        self.check(run.rc == 0 and res is not None, f"{what}: expected a clean finish, got exit {run.rc}"
                                                    f"{' (' + str(run.cause()) + ')' if run.cause() else ''}")
        return res

    def expect_named_failure(self, run: Run, words: tuple[str, ...], what: str) -> None:
        """A failed run (not killed by a signal, not preempted) must say why on stderr, naming the fault."""
        cause = run.cause()
        self.check(cause is not None, f"{what}: exit {run.rc} without a named cause on stderr")
        if cause is not None and words:
            self.check(any(w.lower() in run.text("stderr").lower() for w in words),
                       f"{what}: the error does not name the fault (expected one of {words}): {cause}")

    def checkpoints(self, root: str) -> dict[str, list[str]]:
        """version directory -> the checkpoint files (visible names only) in its checkpoints folder."""
        from raytrainer.checkpoint.resolve import version_checkpoint_dirs
        from raytrainer.io import storage

        logs = storage.join(root, "lightning_logs")
        out = {}
        for d in version_checkpoint_dirs(logs):
            out[d.rsplit("/", 1)[0]] = [f for f in storage.listdir(d, missing_ok=True) if f.endswith(".ckpt")]
        return out

    def check_checkpoints(self, root: str, tags: set[str] | None = None) -> dict[str, dict[str, Any]]:
        """Every visible checkpoint loads, holds the step its name says and one tag per version; every checkpoint an
        events log names exists and loads. Returns file -> {step, tag, version}."""
        from raytrainer.checkpoint.resolve import read_checkpoint
        from raytrainer.io import storage

        tags = tags or {self.config_tag}
        found: dict[str, dict[str, Any]] = {}
        for version, files in self.checkpoints(root).items():
            version_tags = set()
            for f in files:
                try:
                    ckpt = read_checkpoint(f, map_location="cpu")
                except Exception as exc:  # noqa: BLE001 - any failure to load is the violation
                    self.check(False, f"visible checkpoint {f} does not load: {type(exc).__name__}: {exc}")
                    continue
                tag = ckpt.get("hyper_parameters", {}).get("tag")
                step = int(ckpt["global_step"])
                found[f] = {"step": step, "tag": tag, "version": version}
                version_tags.add(tag)
                m = re.search(r"step=(\d+)", f.rsplit("/", 1)[1])
                if m:
                    self.check(int(m.group(1)) == step, f"{f} holds step {step}, not the step its name says")
                self.check(tag in tags, f"{f} holds tag {tag!r}, written by no run of this case ({sorted(tags)})")
            self.check(len(version_tags) <= 1, f"{version} mixes checkpoints of several runs: {sorted(version_tags)}")
            events_path = storage.join(version, "events.jsonl")
            if not storage.exists(events_path):
                continue
            try:
                text = storage.read_verified(events_path).decode()
            except Exception:  # noqa: BLE001 - events are plain appends; read raw
                fs, p = storage.resolve(events_path)
                with fs.open_input_stream(p) as stream:
                    text = stream.read().decode(errors="replace")
            for line in text.splitlines():
                with contextlib.suppress(ValueError):
                    ev = json.loads(line)
                    if ev.get("event") != "checkpoint" or not ev.get("path"):
                        continue
                    path = str(ev["path"])
                    if path not in found:
                        self.check(False, f"events log {events_path} names checkpoint {path} (step {ev.get('step')}) "
                                          "which is not a complete file")
                    elif path.endswith("last.ckpt"):
                        self.check(found[path]["step"] >= int(ev["step"]), f"{path} older than its event {ev}")
                    else:
                        self.check(found[path]["step"] == int(ev["step"]), f"{path} holds another step than {ev}")
        return found

    @property
    def config_tag(self) -> str:
        return f"{self.kind}-{self.seed}"

    def status(self, root: str) -> dict | None:
        """``raytrainer status ROOT --json`` (the CLI, in a subprocess); None when ROOT holds no run yet."""
        run_id = uuid.uuid4().hex
        try:
            proc = subprocess.run([sys.executable, "-m", "raytrainer.cli", "status", root, "--json"], cwd=REPO,
                                  env=_child_env(run_id, self.env), capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            self.check(False, f"raytrainer status {root} did not answer within 60s")
            return None
        if proc.returncode != 0:
            no_run = "no such run directory" in proc.stderr or "is not a raytrainer run directory" in proc.stderr
            self.check(no_run, f"raytrainer status {root} failed (exit {proc.returncode}): {proc.stderr[-400:]}")
            return None
        return json.loads(proc.stdout)

    def check_last(self, root: str, found: dict[str, dict[str, Any]]) -> tuple[str | None, dict | None]:
        """status names the newest complete checkpoint (the highest step among those that load); returns it."""
        st = self.status(root)
        picked = st.get("checkpoint") if st else None
        newest = max((v["step"] for v in found.values()), default=None)
        if newest is None:
            self.check(picked is None, f"status picks {picked} but no checkpoint loads")
        else:
            self.check(picked in found, f"status picks {picked}, not a complete checkpoint (newest is step {newest})")
            if picked in found:
                self.check(found[picked]["step"] == newest,
                           f"status picks {picked} at step {found[picked]['step']}, not the newest (step {newest})")
                self.check(st.get("checkpoint_step") == found[picked]["step"],
                           f"status shows step {st.get('checkpoint_step')} for {picked}, which holds "
                           f"{found[picked]['step']}")
        return picked, st

    def resume_and_compare(self, root: str, picked: str | None, ref: torch.Tensor, **kw: Any) -> None:
        """Rerun with ckpt_path="last": it resumes from ``picked`` (what status named), ends cleanly, and its
        parameters equal the uninterrupted run's bitwise; status then says finished at the final step."""
        again = self.train(self.config(root, ckpt_path="last", **kw))
        res = self.expect_clean(again, "the rerun with ckpt_path='last'")
        if res is None:
            return
        self.check(res["ckpt_path"] == picked,
                   f"ckpt_path='last' resumed from {res['ckpt_path']}, but status named {picked}")
        self.compare(res, ref, "the resumed run")
        self.check_final(root)

    def compare(self, res: dict, ref: dict, what: str) -> None:
        self.check(res["global_step"] == ref["global_step"],
                   f"{what} ended at step {res['global_step']}, the uninterrupted run at {ref['global_step']}")
        equal = torch.equal(res["params"], ref["params"])
        diff = (res["params"] - ref["params"]).abs().max().item() if res["params"].shape == ref["params"].shape \
            else "shape"
        self.check(equal, f"{what}: parameters differ from the uninterrupted run's (max |diff| {diff})")

    def check_final(self, root: str) -> None:
        found = self.check_checkpoints(root)
        picked, st = self.check_last(root, found)
        if st is not None:
            self.check(st.get("state") == "finished", f"status after the clean end says {st.get('state')}: "
                                                      f"{st.get('state_detail')}")
            final = 32 // (2 if self.ray else 1)
            self.check(st.get("checkpoint_step") == final,
                       f"status after the clean end names step {st.get('checkpoint_step')}, not {final}")


# ----------------------------------------------------------------------------------------------- references


class References:
    """Uninterrupted runs, one per world size, made once per session: final parameters, how long training took,
    and the disk space the run needed."""

    def __init__(self, tmp: str) -> None:
        self.tmp = tmp
        self._refs: dict[int, dict] = {}

    def get(self, world: int) -> dict:
        if world not in self._refs:
            root = os.path.join(self.tmp, f"ref{world}")
            workdir = os.path.join(self.tmp, f"ref{world}-work")
            os.makedirs(workdir)
            cfg = dict(root=root, workdir=workdir, tag="ref", num_processes=world, every_n=EVERY_N, sleep_s=SLEEP_S)
            with open(os.path.join(workdir, "stdout"), "w") as out, open(os.path.join(workdir, "stderr"), "w") as err:
                proc = subprocess.Popen([sys.executable, TRAIN, json.dumps(cfg)], stdout=out, stderr=err, cwd=REPO,
                                        env=_child_env(uuid.uuid4().hex), start_new_session=True)
                COUNTS.runs += 1
                try:
                    rc = proc.wait(timeout=BOUND_S[world > 1])
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    rc = proc.wait()
            assert rc == 0, f"the uninterrupted reference run failed (exit {rc}):\n" + \
                open(os.path.join(workdir, "stderr")).read()[-3000:]
            res = torch.load(os.path.join(workdir, "result.pt"), weights_only=True)
            first = float(open(os.path.join(workdir, "first-step")).read())
            last = float(open(os.path.join(workdir, "step.rank0")).read().split()[1])
            pages = 0
            ckpt_bytes = 0
            for d, _, files in os.walk(root):
                for f in files:
                    size = os.path.getsize(os.path.join(d, f))
                    pages += -(-size // 4096)
                    if f.endswith(".ckpt"):
                        ckpt_bytes = max(ckpt_bytes, size)
            res.update(train_s=max(last - first, 0.5), disk_bytes=pages * 4096, ckpt_bytes=ckpt_bytes)
            self._refs[world] = res
        return self._refs[world]


# ----------------------------------------------------------------------------------------------- storage faults


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Moto:
    """A moto S3 server in its own process (so it can be paused with SIGSTOP or killed), with one bucket."""

    def __init__(self, tmp: str) -> None:
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
        self.log = open(os.path.join(tmp, "moto.log"), "w")
        self.proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(self.port)], stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.env = {"RAYTRAINER_S3_ENDPOINT": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}
        self.bucket = f"faults-{uuid.uuid4().hex[:10]}"
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        deadline = time.monotonic() + 30
        while True:
            try:
                client.create_bucket(Bucket=self.bucket)
                break
            except Exception:  # noqa: BLE001 - not listening yet
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.2)

    def pause(self, seconds: float) -> None:
        """SIGSTOP the server now and SIGCONT it ``seconds`` later (from a thread)."""
        self.proc.send_signal(signal.SIGSTOP)
        timer = threading.Timer(seconds, lambda: self.proc.poll() is None and self.proc.send_signal(signal.SIGCONT))
        timer.daemon = True
        timer.start()
        self.timer = timer

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(timeout=30)
        self.log.close()


class SmallDisk:
    """A tmpfs of ``size`` bytes mounted at ``path`` (root only), growable; unmounted at close."""

    def __init__(self, path: str, size: int) -> None:
        self.path = path
        os.makedirs(path, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], check=True,
                       capture_output=True, timeout=30)

    def grow(self, size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", self.path], check=True, capture_output=True,
                       timeout=30)

    def close(self) -> None:
        subprocess.run(["umount", "-l", self.path], capture_output=True, timeout=30)


def tmpfs_available(tmp: str) -> bool:
    """Whether this process may mount a tmpfs (root with CAP_SYS_ADMIN, as in a privileged container);
    RAYTRAINER_FAULT_NO_TMPFS=1 says no (to test the RLIMIT_FSIZE fallback)."""
    if os.environ.get("RAYTRAINER_FAULT_NO_TMPFS") or os.geteuid() != 0 or not shutil.which("mount"):
        return False
    probe = os.path.join(tmp, "probe-mount")
    try:
        SmallDisk(probe, 64 * 1024).close()
        return True
    except (subprocess.CalledProcessError, OSError, subprocess.TimeoutExpired):
        return False


def limit_file_size(limit: int) -> Callable[[], None]:
    """preexec_fn: no file may grow past ``limit`` bytes (writes beyond get EFBIG: SIGXFSZ is ignored)."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def set_tree_writable(root: str, writable: bool) -> None:
    """chmod the run's tree read-only (directories r-x, files r--) or back."""
    for d, _, files in os.walk(root):
        os.chmod(d, 0o755 if writable else 0o555)
        for f in files:
            with contextlib.suppress(FileNotFoundError):
                os.chmod(os.path.join(d, f), 0o644 if writable else 0o444)
