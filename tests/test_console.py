"""A quiet console (issue 19): a 2-rank run prints what a single-process Lightning run prints (the model summary once,
the bar, the results) plus one line per event that changes the run; the rest waits behind RAYTRAINER_LOG=debug or is
only in events.jsonl. Also: library chatter filtered where we trigger it (ONNX export, job submission) and the run's
live figures as Ray metrics, read back from Ray's Prometheus endpoint."""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from raytrainer.cli.fit import JobLogFilter
from raytrainer.core.events import EventLog
from raytrainer.launchers.ray import messages
from raytrainer.launchers.ray.console import rank_console, relay
from raytrainer.utilities import log
from raytrainer.utilities.console import LOG_ENV, log_level

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "autoencoder.py"
ESC = "\x1b["


def _env(**extra: str) -> dict[str, str]:
    """This environment without what would change the console under test (a cluster address, a log level)."""
    drop = ("RAY_ADDRESS", LOG_ENV, "RAY_COLOR_PREFIX", "COLUMNS", "TQDM_MINITERS")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "OMP_NUM_THREADS": "1", **extra}


def _summary() -> str:
    """The example's model summary, as a single process prints it."""
    spec = importlib.util.spec_from_file_location("autoencoder_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from raytrainer.callbacks.model_summary import summarize

    return summarize(module.LitAutoEncoder())


def _lines(proc: subprocess.CompletedProcess) -> list[str]:
    return (proc.stdout + proc.stderr).splitlines()


# ---------------------------------------------------------------------------------------------- subprocess runs
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_two_rank_demo_prints_what_one_process_prints_plus_its_events(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--num_processes", "2", "--max_epochs", "2", "--ckpt_path",
                           "none", "--default_root_dir", str(tmp_path / "run")], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=150)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    assert ESC not in text, text
    summary = _summary()
    assert text.count("Total params") == 1 and summary + "\n" in proc.stdout, text  # once, whole, no rank prefix
    assert "Token authentication" not in text and "pid=" not in text and "worker group" not in text, text
    assert "[checkpoint]" not in text, text  # in events.jsonl only
    events = [line for line in _lines(proc) if line.startswith("[raytrainer] [")]
    assert [line.split("]")[1].strip(" [") for line in events] == ["start", "finish"], events
    expected = set(summary.splitlines())
    result = ("world size: 2, epochs: 2, steps: 22", "train loss: ", "checkpoint: ", "logs: ")
    other = [line for line in _lines(proc) if line not in expected and line not in events
             and not re.match(r"(Epoch \d+|Testing DataLoader 0): ", line) and not line.startswith(result)]
    assert other == [], other
    kinds = [json.loads(line)["event"] for line in
             (tmp_path / "run" / "lightning_logs" / "version_0" / "events.jsonl").read_text().splitlines()]
    assert kinds.count("checkpoint") == 4, kinds  # recorded, not printed


RESTART_FROM_LAST = textwrap.dedent('''
    import sys
    sys.path[:0] = [{repo!r}, {examples!r}]
    import raytrainer as pl
    from autoencoder import DigitsDataModule, KillOnce, LitAutoEncoder



    class Hello(pl.Callback):
        """What a rank other than 0 prints reaches the console through Ray, named by its rank."""

        def on_train_start(self, trainer, pl_module):
            if trainer.global_rank == 1 and trainer.global_step == 0:
                print("rank 1 says hi", flush=True)


    pl.seed_everything(0)
    root = {root!r}
    # no snapshots: the restart after the kill resumes from ckpt_path="last", which every rank resolves
    trainer = pl.Trainer(num_processes=2, max_epochs=3, default_root_dir=root, snapshot_every_n_steps=0, max_failures=1,
                         log_every_n_steps=5,
                         callbacks=[pl.ModelCheckpoint(save_last=True), KillOnce(15, root), Hello()])
    trainer.fit(LitAutoEncoder(), datamodule=DigitsDataModule(), ckpt_path="last")
    print("FIT DONE", trainer.global_step)
''')


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_restart_from_last_prints_its_lines_once_and_on_time(tmp_path: Path) -> None:
    """A killed rank, no snapshot: the failure and restart lines once, Ray's note on the dead worker left out, the
    ranks' ckpt_path="last" line once (rank 0's, on the driver, before the results), no second summary; rank 1's
    own print comes through Ray, prefixed by its rank, uncoloured in a pipe."""
    script = tmp_path / "fit.py"
    script.write_text(RESTART_FROM_LAST.format(repo=str(REPO), examples=str(REPO / "examples"),
                                               root=str(tmp_path / "run")))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=150)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    assert "FIT DONE 33" in proc.stdout, text[-3000:]
    assert ESC not in text and "(raylet)" not in text, text
    prefixed = [line for line in _lines(proc) if "pid=" in line]
    assert len(prefixed) == 1 and re.fullmatch(r"\(rank-1 pid=\d+\) rank 1 says hi", prefixed[0]), prefixed
    assert text.count("Total params") == 1, text
    last = [line for line in _lines(proc) if 'ckpt_path="last"' in line]
    assert len(last) == 2 and all(line.startswith('[raytrainer] ckpt_path="last": ') for line in last), last
    assert "no checkpoint found" in last[0], last  # the driver, before the first start
    events = [line.split("]")[1].strip(" [") for line in _lines(proc) if line.startswith("[raytrainer] [")]
    assert events == ["start", "failure", "restart", "finish"], events
    assert proc.stderr.index(last[1]) < proc.stderr.index("[finish]"), proc.stderr  # not after the results


METRICS_RUN = textwrap.dedent('''
    import json, sys, time
    sys.path[:0] = [{repo!r}, {examples!r}]
    import ray
    import raytrainer as pl
    from autoencoder import DigitsDataModule, KillOnce, LitAutoEncoder


    class Slow(pl.Callback):
        """Steps of 0.2 s, so the figures are read while the run goes on."""

        def on_train_batch_end(self, *args, **kwargs):
            time.sleep(0.2)


    ray.init(address="local", num_cpus=4, include_dashboard=False, _metrics_export_port={port}, logging_level="error")
    pl.seed_everything(0)
    root = {root!r}
    trainer = pl.Trainer(num_processes=2, max_epochs=3, default_root_dir=root, max_failures=1,
                         enable_progress_bar=False, callbacks=[KillOnce(15, root), Slow()])
    print("RUN " + json.dumps({{"run": trainer.session.run_name}}), flush=True)
    trainer.fit(LitAutoEncoder(), datamodule=DigitsDataModule())
    print("DONE " + json.dumps({{"step": trainer.global_step, "epoch": trainer.current_epoch}}), flush=True)
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int, run: str) -> dict[str, dict[str, float]]:
    """ray_raytrainer_* series of ``run`` on Ray's Prometheus endpoint: {name: {metric tag or "": value}}."""
    import urllib.request

    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return {}  # the agent is not up yet, or already gone
    found: dict[str, dict[str, float]] = {}
    for m in re.finditer(r"^(ray_raytrainer_\w+)\{(.*)\} (\S+)$", text, re.M):
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2)))
        if labels.get("run") == run:
            found.setdefault(m.group(1), {})[labels.get("metric", "")] = float(m.group(3))
    return found


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_live_figures_reach_rays_prometheus_endpoint(tmp_path: Path) -> None:
    """While a 2-rank fit runs (rank 1 killed once), the driver's ray.util.metrics figures, tagged with the run, are
    on Ray's Prometheus endpoint (read as Prometheus does) and move: step, epoch, loss, steps/s, world size, the
    failure count and the seconds since the last checkpoint."""
    import threading

    port = _free_port()
    script = tmp_path / "fit.py"
    script.write_text(METRICS_RUN.format(repo=str(REPO), examples=str(REPO / "examples"), root=str(tmp_path / "run"),
                                         port=port))
    proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env=_env(RAY_metrics_report_interval_ms="500"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    scrapes: list[dict[str, dict[str, float]]] = []
    try:
        deadline = time.monotonic() + 150
        while proc.poll() is None and time.monotonic() < deadline:
            run = next((json.loads(line[4:]) for line in list(output) if line.startswith("RUN ")), None)
            if run is not None:
                scrapes.append(_scrape(port, run["run"]))
            time.sleep(0.3)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
        reader.join(timeout=10)
    text = "".join(output)
    done = next((json.loads(line[5:]) for line in output if line.startswith("DONE ")), None)
    assert proc.returncode == 0 and done == {"step": 33, "epoch": 3}, text[-4000:]

    def seen(name: str, tag: str = "") -> list[float]:
        return [s[name][tag] for s in scrapes if tag in s.get(name, {})]

    steps = seen("ray_raytrainer_step")
    assert len(set(steps)) >= 3 and 15 < max(steps) <= 33, steps  # read while it moved
    assert 0 in seen("ray_raytrainer_epoch") and 2 in seen("ray_raytrainer_epoch"), seen("ray_raytrainer_epoch")
    assert set(seen("ray_raytrainer_world_size")) == {2.0}
    failures = seen("ray_raytrainer_failures_total")
    assert failures and failures[-1] == 1.0, failures  # rank 1 was killed once
    losses = seen("ray_raytrainer_loss", "train_loss_step")
    assert len(set(losses)) >= 2 and all(0 < x < 1 for x in losses), losses
    assert any(0 < x < 20 for x in seen("ray_raytrainer_steps_per_second")), seen("ray_raytrainer_steps_per_second")
    since = seen("ray_raytrainer_seconds_since_checkpoint")
    assert since and all(0 <= x < 60 for x in since), since


EXPORT = textwrap.dedent('''
    import sys
    sys.path[:0] = [{repo!r}, {examples!r}]
    from autoencoder import LitAutoEncoder
    from raytrainer.export import to_onnx
    to_onnx(LitAutoEncoder(), {path!r})
    print("EXPORTED")
''')


@pytest.mark.slow
def test_onnx_export_says_nothing_about_torchs_internals(tmp_path: Path) -> None:
    """torch's dynamo exporter logs 'torchvision is not installed' four times and torch.export warns about its own
    pytree API; neither concerns the user. With RAYTRAINER_LOG=debug both are there again."""
    script = tmp_path / "export.py"
    script.write_text(EXPORT.format(repo=str(REPO), examples=str(REPO / "examples"), path=str(tmp_path / "m.onnx")))
    quiet = subprocess.run([sys.executable, str(script)], env=_env(), capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 0 and quiet.stdout == "EXPORTED\n", quiet.stderr[-3000:]
    assert quiet.stderr == "", quiet.stderr
    loud = subprocess.run([sys.executable, str(script)], env=_env(RAYTRAINER_LOG="debug"), capture_output=True,
                          text=True, timeout=120)
    assert loud.returncode == 0 and "torchvision is not installed" in loud.stderr and "LeafSpec" in loud.stderr


# -------------------------------------------------------------------------------- `raytrainer fit --address` (job)
AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


@pytest.fixture
def dashboard(tmp_path: Path) -> Iterator[str]:
    """A Ray head with its dashboard (the Jobs API), started with ``ray start --head --block`` in its own temp dir
    and stopped by ending that process; yields the dashboard's address."""
    temp_dir = tempfile.mkdtemp(prefix="rtjob-", dir="/tmp")  # Ray's socket paths must stay short
    socks = [socket.socket() for _ in range(9)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    gcs, node, objects, client, agent, agent_grpc, metrics, runtime_env, http = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    ray = Path(sys.executable).parent / "ray"
    cmd = [str(ray), "start", "--head", "--block", f"--temp-dir={temp_dir}", f"--port={gcs}",
           f"--node-manager-port={node}", f"--object-manager-port={objects}", f"--ray-client-server-port={client}",
           f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}", "--include-dashboard=true",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={http}", "--num-cpus=1", "--disable-usage-stats"]
    head = subprocess.Popen(cmd, env=_env(**AUTH), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not (Path(temp_dir) / "ray_current_cluster").exists() and head.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        if not (Path(temp_dir) / "ray_current_cluster").exists():
            pytest.fail(f"ray start --head did not come up (exit code {head.poll()})")
        yield f"http://127.0.0.1:{http}"
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops its own processes
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=10)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_fit_address_prints_the_job_not_rays_submission_chatter(dashboard: str, tmp_path: Path) -> None:
    (tmp_path / "hello.py").write_text('print("hello from the job")\n')
    proc = subprocess.run([str(Path(sys.executable).parent / "raytrainer"), "fit", "hello.py", "--address", dashboard],
                          cwd=tmp_path, env=_env(**AUTH), capture_output=True, text=True, timeout=180)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    assert "hello from the job" in proc.stdout and "SUCCEEDED" in proc.stderr, text
    for chatter in ("Uploading package", "Creating a file package", "Runtime env is setting up", "WebSocket closed",
                    "Running entrypoint", " INFO "):
        assert chatter not in text, text


# ----------------------------------------------------------------------------------------------------- in-process
@pytest.fixture
def rank_buffer(monkeypatch: pytest.MonkeyPatch) -> messages._MessageBuffer:
    """This process acting as a rank actor for one test: send_to_driver() fills a buffer of its own."""
    buffer = messages._MessageBuffer()
    monkeypatch.setattr(messages, "_BUFFER", buffer)
    return buffer


@pytest.fixture
def records(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """What the ``raytrainer`` logger emits (it does not propagate to the root logger caplog listens on)."""
    log.addHandler(caplog.handler)
    try:
        yield caplog
    finally:
        log.removeHandler(caplog.handler)


def test_rank_zero_prints_and_logs_on_the_drivers_console(rank_buffer, capsys, records, monkeypatch) -> None:
    monkeypatch.delenv(LOG_ENV, raising=False)
    stdout, handlers = sys.stdout, list(log.handlers)
    with rank_console(True, {"stdout": False, "stderr": False}):
        print("  | Name | Type")
        print("no newline yet", end="")
        assert not sys.stdout.isatty()
        sys.stderr.write("UserWarning: from rank 0\n")
        log.info('ckpt_path="last": resuming from x.ckpt')
        log.debug("machinery")
    assert sys.stdout is stdout and log.handlers == handlers  # a warm rank's next call starts clean
    assert capsys.readouterr() == ("", "") and records.records == []  # nothing printed on the rank itself
    sent = rank_buffer.drain()
    assert all(relay(msg) for msg in sent) and not relay({"type": "heartbeat"})
    assert capsys.readouterr() == ("  | Name | Type\nno newline yet", "UserWarning: from rank 0\n")
    assert [(r.levelno, r.getMessage()) for r in records.records] == \
        [(logging.INFO, 'ckpt_path="last": resuming from x.ckpt')]


def test_other_ranks_log_warnings_only_unless_debug(rank_buffer, records, monkeypatch) -> None:
    monkeypatch.delenv(LOG_ENV, raising=False)
    with rank_console(False):
        log.info("resuming (said by every rank)")
        log.warning("this rank's disk is full")
    assert [r.getMessage() for r in records.records] == ["this rank's disk is full"] and rank_buffer.drain() == []
    monkeypatch.setenv(LOG_ENV, "debug")
    with rank_console(False):
        log.info("resuming (said by every rank)")
    assert records.records[-1].getMessage() == "resuming (said by every rank)"


def test_raytrainer_log_sets_the_level(monkeypatch) -> None:
    for value, level in (("debug", logging.DEBUG), ("WARNING", logging.WARNING), ("", logging.INFO),
                         ("loud", logging.INFO)):
        monkeypatch.setenv(LOG_ENV, value)
        assert log_level() == level


def test_events_print_what_changes_the_run_and_keep_the_rest_in_the_file(tmp_path, records) -> None:
    events = EventLog(str(tmp_path))
    with records.at_level(logging.DEBUG, logger="raytrainer"):
        for kind in ("start", "checkpoint", "snapshot_fallback", "failure", "restart", "finish"):
            events.emit(kind, world_size=2, step=3)
    levels = {r.getMessage().split("]")[0][1:]: r.levelno for r in records.records}
    assert levels == {"start": logging.INFO, "checkpoint": logging.DEBUG, "snapshot_fallback": logging.DEBUG,
                      "failure": logging.INFO, "restart": logging.INFO, "finish": logging.INFO}
    assert len((tmp_path / "events.jsonl").read_text().splitlines()) == 6


def test_job_logs_lose_rays_setup_lines_only(monkeypatch) -> None:
    monkeypatch.delenv(LOG_ENV, raising=False)
    chunks = ["2026-12-02 21:04:57,545\tINFO job_manager.py:581 -- Runtime env is setting up.\nRunning entry",
              "point for job raysubmit_X: python train.py\nEpoch 0: 50%|", "█████     | 5/10\n", "last line"]
    lines = JobLogFilter()
    shown = "".join(lines.feed(c) for c in chunks) + lines.feed("", end=True)
    assert shown == "Epoch 0: 50%|█████     | 5/10\nlast line"
    monkeypatch.setenv(LOG_ENV, "debug")
    everything = JobLogFilter()
    assert "".join(everything.feed(c) for c in chunks) + everything.feed("", end=True) == "".join(chunks)
