"""Connecting to an existing cluster: ``ray start --head`` in a subprocess, then the example script
with ``RAY_ADDRESS`` set, exactly as a cluster user runs it.

The head gets its own ``--temp-dir`` and free ports, so it neither collides with nor is found by
other Ray instances on this machine, and it is stopped by ending its own ``ray start --block``
process (never ``ray stop``, which would stop every Ray instance of this user).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[3]
RAY = Path(sys.executable).parent / "ray"


def free_ports(n: int) -> list[int]:
    """n distinct ports the OS calls free right now (held open together so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def processes_using(marker: str) -> list[int]:
    """Pids of live processes whose command line mentions ``marker`` (our head's temp dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().split(")")[-1].split()[0]
        except OSError:
            continue
        if marker in cmd and state != "Z":
            pids.append(int(entry.name))
    return pids


# Ray 2.60 turns token authentication on for ``ray start`` when ~/.ray/auth_token exists, and a
# client given an explicit address (RAY_ADDRESS included) only sends a token when told to. A cluster
# user exports RAY_AUTH_MODE=token (and the token); the test does the same with a token of its own,
# so it neither depends on nor touches ~/.ray/auth_token.
AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


def clean_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0", **AUTH}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    return env


@pytest.fixture
def ray_head() -> Iterator[dict]:
    """A Ray head started with ``ray start --head --block``; yields its address and temp dir."""
    temp_dir = tempfile.mkdtemp(prefix="rtaddr-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    gcs, node_manager, object_manager, client, agent, agent_grpc, metrics, runtime_env = free_ports(8)
    cmd = [str(RAY), "start", "--head", "--block", f"--temp-dir={temp_dir}", f"--port={gcs}",
           f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
           f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
           f"--runtime-env-agent-port={runtime_env}", "--include-dashboard=false", "--num-cpus=2",
           "--disable-usage-stats"]
    log_path = Path(temp_dir) / "ray-start.log"
    log = open(log_path, "w")
    head = subprocess.Popen(cmd, env=clean_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address_file = Path(temp_dir) / "ray_current_cluster"
    try:
        deadline = time.monotonic() + 90
        while not address_file.exists() and head.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if not address_file.exists():
            pytest.fail(f"ray start --head did not come up (exit {head.poll()}):\n{log_path.read_text()[-3000:]}")
        address = address_file.read_text().strip()
        assert address.endswith(f":{gcs}")
        yield {"address": address, "temp_dir": temp_dir, "pid": head.pid}
    finally:
        # Stop exactly this head: ``ray start --block`` shuts down its own processes on SIGTERM.
        if head.poll() is None:
            head.send_signal(signal.SIGTERM)
            try:
                head.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
                head.wait(timeout=10)
        deadline = time.monotonic() + 30
        while processes_using(temp_dir) and time.monotonic() < deadline:
            time.sleep(0.5)
        leftovers = processes_using(temp_dir)
        for pid in leftovers:  # only processes of this head (their command line names its temp dir)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not leftovers, f"processes of the test head outlived it: {leftovers}"


ACTORS_SCRIPT = """
import json, ray
ray.init(address={address!r}, logging_level="error", log_to_driver=False)
actors = ray._private.state.actors().values()
print("ACTORS " + json.dumps(sorted((a["Name"], a["State"]) for a in actors if a.get("Name"))))
"""


def test_example_joins_the_cluster_named_by_ray_address(ray_head, tmp_path):
    root = tmp_path / "run"
    env = {**clean_env(), "RAY_ADDRESS": ray_head["address"], "RAYTRAINER_LOG": "debug"}  # where it went: debug
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "autoencoder.py"), "--num_processes", "2", "--max_epochs", "1",
         "--default_root_dir", str(root), "--ckpt_path", "none", "--no_progress_bar"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "world size: 2, epochs: 1, steps: 11" in proc.stdout  # 1400 images, 2 ranks x batch 64
    assert f"connecting to the Ray cluster at {ray_head['address']}" in out
    assert "starting a local Ray instance" not in out
    ckpt = re.search(r"checkpoint: (\S+)", proc.stdout).group(1)
    assert Path(ckpt).is_file()

    # The ranks ran on the head's cluster, named after the run, and are gone now.
    query = subprocess.run([sys.executable, "-c", ACTORS_SCRIPT.format(address=ray_head["address"])],
                           env=clean_env(), capture_output=True, text=True, timeout=120)
    line = next((ln for ln in query.stdout.splitlines() if ln.startswith("ACTORS ")), None)
    assert line is not None, query.stdout[-2000:] + query.stderr[-2000:]
    actors = json.loads(line[len("ACTORS "):])
    ranks = [(name, state) for name, state in actors if name.startswith("raytrainer-")]
    # fit and then test ran on one group of two ranks on this cluster (test reused fit's warm ranks); both ended
    # with the script
    assert sorted(re.sub(r"^raytrainer-.+-(rank-\d+)$", r"\1", n) for n, _ in ranks) == ["rank-0", "rank-1"], ranks
    assert {s for _, s in ranks} == {"DEAD"}, ranks
