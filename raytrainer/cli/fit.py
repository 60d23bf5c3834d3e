"""``raytrainer fit``: run a training script here, or as a Ray job on the cluster at --address."""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import threading
import time
from typing import Any, TextIO

from raytrainer.cli.common import CLIError
from raytrainer.utilities.console import debug_enabled, quiet_loggers

__all__ = ["COMMAND_ENV", "DEFAULT_CONNECT_TIMEOUT_S", "DEFAULT_START_TIMEOUT_S", "Spinner", "cmd_fit"]

# How long `fit --address` waits for the cluster's dashboard to answer, and for the job to start.
DEFAULT_CONNECT_TIMEOUT_S = 120.0
DEFAULT_START_TIMEOUT_S = 600.0
# The environment variable `raytrainer fit` sets to its own command line (a JSON list), so a run can
# record the exact command that started it and `status` can print how to resume.
COMMAND_ENV = "RAYTRAINER_COMMAND"


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

    def __enter__(self) -> Spinner:
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


# The first script argument that marks a LightningCLI script: its Trainer flags are --trainer.X, after the subcommand.
_LIGHTNING_CLI_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def _translate_flags(args: argparse.Namespace, script_args: list[str]) -> list[str]:
    """The script's arguments with --num-nodes/--num-processes added as its own flags, refusing the same setting
    twice: ``--num_nodes V`` first for a plain script, ``--trainer.num_nodes V`` last for a LightningCLI one."""
    cli = bool(script_args) and script_args[0] in _LIGHTNING_CLI_SUBCOMMANDS
    extra = []
    for ours, theirs in (("num_nodes", "--num_nodes"), ("num_processes", "--num_processes")):
        theirs = "--trainer." + theirs[2:] if cli else theirs
        value = getattr(args, ours)
        if value is None:
            continue
        if any(a == theirs or a.startswith(theirs + "=") for a in script_args):
            raise CLIError(f"--{ours.replace('_', '-')} and the script argument {theirs} both set the same "
                           "thing; give only one.")
        extra += [theirs, str(value)]
    return script_args + extra if cli else extra + script_args


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
                       "--ckpt_path last", code=1) from None
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
    # A `ray job ...` command we print must work when pasted: with token auth it needs RAY_AUTH_MODE=token too.
    env_prefix = "RAY_AUTH_MODE=token " if token and os.environ.get("RAY_AUTH_MODE") != "token" else ""
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
    with Spinner(f"uploading {working_dir} and submitting `{entrypoint}`"), quiet_loggers(RAY_CLIENT_LOGGERS):
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    print(f"raytrainer fit: submitted job {job_id} to {address}", file=sys.stderr, flush=True)
    follow = f"{env_prefix}ray job logs --follow {job_id} --address {address}"
    stop = f"{env_prefix}ray job stop {job_id} --address {address}"
    if not wait:
        print(f"follow it with: {follow}\nstop it with:   {stop}")
        return 0

    deadline = time.monotonic() + start_timeout_s
    with Spinner(f"waiting for job {job_id} to start on the cluster") as spinner:
        while (status := client.get_job_status(job_id)) == JobStatus.PENDING:
            if time.monotonic() >= deadline:
                raise CLIError(f"job {job_id} did not start within {start_timeout_s:.0f}s (still PENDING: "
                               "the cluster may lack free resources). It stays queued; stop it with "
                               f"`{stop}`.", code=1)
            spinner.update(f"waiting for job {job_id} to start on the cluster ({status})")
            time.sleep(1.0)

    try:
        with quiet_loggers(RAY_CLIENT_LOGGERS):
            _stream_logs(client, job_id, timeout_s, stop)
    except KeyboardInterrupt:
        print(f"\nraytrainer fit: stopped following; the job keeps running.\n  follow: {follow}\n"
              f"  stop:   {stop}", file=sys.stderr)
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


def _stream_logs(client: Any, job_id: str, timeout_s: float | None, stop: str) -> None:
    """Print the job's logs as they arrive until the job ends (or --timeout passes), without the lines Ray's job
    manager adds about its own set-up (``JobLogFilter``)."""
    import asyncio

    lines = JobLogFilter()

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(lines.feed(chunk))
            sys.stdout.flush()
        sys.stdout.write(lines.feed("", end=True))
        sys.stdout.flush()

    async def bounded() -> None:
        await asyncio.wait_for(tail(), timeout=timeout_s)

    try:
        asyncio.run(bounded())
    except TimeoutError as exc:
        raise CLIError(f"job {job_id} ran past --timeout {timeout_s:.0f}s; it keeps running on the cluster "
                       f"(stop it with `{stop}`)", code=1) from exc
    except RuntimeError as exc:  # the log socket closed early: the final status tells the outcome
        print(f"raytrainer fit: log stream ended early ({exc}); reading the job status", file=sys.stderr)


# Ray's client modules that log each step of a job submission at INFO (the package upload, the log socket closing):
# shown only with RAYTRAINER_LOG=debug. Their warnings and errors still show.
RAY_CLIENT_LOGGERS = ("ray._private.runtime_env.packaging", "ray.dashboard.modules.dashboard_sdk",
                      "ray.dashboard.modules.job.sdk")
# Lines Ray's job manager writes into every job's log about its own set-up: "<time>\tINFO job_manager.py:581 --
# Runtime env is setting up." and "Running entrypoint for job <id>: <the entrypoint we submitted>".
_RAY_JOB_SETUP_LINE = re.compile(r"^(\d{4}-\d\d-\d\d [\d:,.]+\s+INFO job_manager\.py:\d+ -- Runtime env is setting up\."
                                 r"|Running entrypoint for job \S+: .*)$")


class JobLogFilter:
    """Splits a job's log stream into lines and leaves out Ray's own set-up lines (all shown with
    ``RAYTRAINER_LOG=debug``); the script's lines pass unchanged, a partial line waits for its end."""

    def __init__(self) -> None:
        self.partial = ""
        self.keep_all = debug_enabled()

    def feed(self, chunk: str, end: bool = False) -> str:
        """The text of ``chunk`` to print now (``end``: the stream is over, so a partial last line goes too)."""
        text = self.partial + chunk
        cut = len(text) if end else text.rfind("\n") + 1
        self.partial = text[cut:]
        return "".join(line for line in text[:cut].splitlines(keepends=True)
                       if self.keep_all or not _RAY_JOB_SETUP_LINE.match(line.rstrip("\r\n")))


def cmd_fit(args: argparse.Namespace, script_args: list[str], argv: list[str]) -> int:
    """`raytrainer fit`: run a training script here, or as a Ray job on the cluster at --address."""
    working_dir = os.path.abspath(args.working_dir or os.getcwd())
    script_rel = _script_in_working_dir(args.script, working_dir)
    args_for_script = _translate_flags(args, script_args)
    command = ["raytrainer", *argv]
    roots = _values_of("--default_root_dir", args_for_script) + _values_of("--trainer.default_root_dir",
                                                                           args_for_script)
    if args.address and not any("://" in a for a in roots):
        print("raytrainer fit: note: no --default_root_dir URI (s3://..., gs://...) in the script's arguments. "
              "On more than one node, checkpoints must go to storage every node reaches, or a restarted "
              "rank will not find them (cluster/README.md).", file=sys.stderr)
    if args.address:
        return _fit_remote(args.address, script_rel, working_dir, args_for_script, command, args.connect_timeout,
                           args.start_timeout, args.timeout, wait=not args.no_wait)
    return _fit_local(script_rel, working_dir, args_for_script, command, args.timeout)
