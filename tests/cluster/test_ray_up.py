"""`ray up` on cluster/local.yaml, end to end on this machine, the way a user runs it on their own machines.

What happens:

1. openssh-server and rsync are installed with apt when missing.
2. A throwaway SSH key is authorized for the current user, in a private sshd that listens on
   127.0.0.1 only, on a free port (`ray up` has no SSH port setting, so the cluster config reaches
   it through an `ssh_proxy_command` relay).
3. That sshd runs in its own PID namespace (`unshare --pid --mount-proc`). `ray up` and `ray down`
   run `ray stop` on every node, and `ray stop` kills every Ray process it can see; in the namespace
   it sees only this cluster's, so Ray instances of other tests or users on the machine survive.
4. The node is this machine as a fresh cloud image would be: its own HOME (set by the sshd), its own
   Python environment (a venv that reuses the test venv's installed packages read-only, so no wheel
   is downloaded), a fresh Ray auth token. The shipped `setup_commands` install raytrainer into that
   environment from the files `file_mounts` shipped, so the test venv is never modified.
5. `ray up -y` runs on a copy of cluster/local.yaml with only the machine-specific values replaced
   (head_ip 127.0.0.1, the key, free ports, a private Ray temp dir); the shipped file is not edited.
6. `raytrainer fit --address` submits examples/autoencoder.py with 2 ranks as a Ray job; the test
   checks that training finished, a verified checkpoint exists, metrics were logged, the dashboard
   listens on 127.0.0.1 only and refuses clients without the token.
7. `ray down -y`, then no process the cluster started may be left; sshd is stopped by its pid.

Skipped, with the reason, only where apt, sshd or PID namespaces are truly unavailable, and never
in CI (CI=true): there a missing prerequisite fails the test.
"""
from __future__ import annotations

import getpass
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
LOCAL_YAML = REPO / "cluster" / "local.yaml"
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
BIN = Path(sys.executable).parent
RAY = [str(BIN / "ray")] if (BIN / "ray").exists() else [sys.executable, "-m", "ray.scripts.scripts"]
RAYTRAINER = [str(BIN / "raytrainer")] if (BIN / "raytrainer").exists() else [sys.executable, "-m", "raytrainer.cli"]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

RELAY = """\
# ssh ProxyCommand: joins ssh's stdin/stdout to a TCP port (ray up cannot set an SSH port).
import os, socket, sys, threading
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
sock.settimeout(None)
def upstream():
    while data := os.read(0, 65536):
        sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)
threading.Thread(target=upstream, daemon=True).start()
while data := sock.recv(65536):
    os.write(1, data)
"""


def unavailable(reason: str) -> None:
    """Skip outside CI; fail in CI, where this test must run."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: the ray up end-to-end test must run, not skip)")
    pytest.skip(reason)


def run(cmd: list[str], timeout: float, log: Path | None = None, **kwargs) -> subprocess.CompletedProcess:
    """Run a command with a deadline; its output goes to `log` when given (and is returned)."""
    # No Ray address or auth settings leak in from other tests (ray.init() exports RAY_AUTH_MODE).
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("RAY_AUTH_")}
    env.update(kwargs.pop("env", {}))
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, **kwargs)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        pytest.fail(f"`{' '.join(cmd)}` ran past {timeout:.0f}s; output:\n{out[-4000:]}")
    if log is not None:
        log.write_text(result.stdout + result.stderr)
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_packages() -> None:
    """openssh-server and rsync, from apt when missing."""
    if shutil.which("sshd") or Path("/usr/sbin/sshd").exists():
        if shutil.which("rsync") and shutil.which("ssh") and shutil.which("ssh-keygen"):
            return
    if os.geteuid() != 0:
        unavailable("openssh-server/rsync are missing and installing them needs root")
    if not shutil.which("apt-get"):
        unavailable("openssh-server/rsync are missing and this machine has no apt-get")
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    update = run(["apt-get", "update", "-q"], timeout=300, env=env)
    install = run(["apt-get", "install", "-y", "-q", "openssh-server", "rsync"], timeout=600, env=env)
    if install.returncode != 0:
        unavailable(f"apt-get could not install openssh-server and rsync:\n{update.stderr[-1500:]}\n"
                    f"{install.stdout[-1500:]}\n{install.stderr[-1500:]}")


def namespace_of(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def processes_in(namespace: str, exclude: set[int]) -> dict[int, str]:
    """pid -> command line of every live process in a PID namespace (host pids)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in exclude or namespace_of(int(entry)) != namespace:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            with open(f"/proc/{entry}/stat") as f:
                zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            continue
        if not zombie:
            found[int(entry)] = cmdline
    return found


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


class Sshd:
    """A private sshd on 127.0.0.1:PORT in its own PID namespace, accepting one throwaway key."""

    def __init__(self, work: Path, home: Path) -> None:
        self.work, self.home = work, home
        self.port = free_port()
        ssh_dir = work / "ssh"
        ssh_dir.mkdir(mode=0o700)
        self.key = ssh_dir / "client_key"
        for key in (ssh_dir / "host_key", self.key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=30)
        shutil.copy(str(self.key) + ".pub", ssh_dir / "authorized_keys")
        self.config = ssh_dir / "sshd_config"
        self.config.write_text("\n".join([
            "ListenAddress 127.0.0.1",
            f"Port {self.port}",
            f"HostKey {ssh_dir / 'host_key'}",
            f"PidFile {ssh_dir / 'sshd.pid'}",
            f"AuthorizedKeysFile {ssh_dir / 'authorized_keys'}",
            f"AllowUsers {getpass.getuser()}",
            "PermitRootLogin prohibit-password",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",  # the key files live under /tmp
            "X11Forwarding no",
            "PrintMotd no",
            "MaxStartups 100",
            f"SetEnv HOME={home}",  # the node's home: file mounts, bootstrap files and auth token go here
        ]) + "\n")
        self.relay = work / "relay.py"
        self.relay.write_text(RELAY)
        self.proxy_command = f"{sys.executable} {self.relay} 127.0.0.1 {self.port}"
        self.log = work / "sshd.log"
        self.proc: subprocess.Popen | None = None
        self.namespace: str | None = None
        self.pid: int | None = None  # sshd's host pid (pid 1 inside its namespace)

    def start(self) -> None:
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        check = run([sshd, "-t", "-f", str(self.config)], timeout=30)
        if check.returncode != 0:
            unavailable(f"sshd rejects its configuration: {check.stderr.strip()}")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", sshd, "-D", "-e", "-f",
                 str(self.config)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"sshd exited with {self.proc.returncode}:\n{self.log.read_text()}")
            kids = children(self.proc.pid)
            if kids and self.pid is None:
                self.pid = kids[0]
                self.namespace = namespace_of(self.pid)
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                time.sleep(0.2)
        else:
            raise AssertionError(f"sshd did not listen on 127.0.0.1:{self.port} within 30s:\n{self.log.read_text()}")
        assert self.namespace and self.namespace != namespace_of(os.getpid()), "sshd is not in its own namespace"
        login = self.ssh("echo $HOME; command -v python3 ray")
        assert login.returncode == 0, f"ssh login failed:\n{login.stderr}\n{self.log.read_text()}"
        assert login.stdout.split()[0] == str(self.home), login.stdout

    def ssh(self, command: str) -> subprocess.CompletedProcess:
        """Run a command on the node through a login shell, as ray up does."""
        return run(["ssh", "-i", str(self.key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                    "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", f"ProxyCommand={self.proxy_command}",
                    f"{getpass.getuser()}@127.0.0.1", f"bash --login -c {json.dumps(command)}"], timeout=60)

    def stop(self) -> None:
        """Stop sshd by its pid; the kernel then ends anything left in its namespace."""
        if self.proc is None:
            return
        if self.pid is not None and self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # --kill-child: sshd dies with unshare
            self.proc.wait(timeout=30)


def make_node_environment(work: Path) -> tuple[Path, Path]:
    """The node's HOME and Python: a venv that sees the test venv's packages (read-only) plus a `ray` command."""
    home = work / "home"
    home.mkdir()
    image = work / "image"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(image)], check=True, timeout=120)
    purelib = Path(subprocess.run([str(image / "bin" / "python"), "-c",
                                   "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True, timeout=60).stdout.strip())
    ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    # A .pth line adds the directory without running its .pth files, so the test venv's editable
    # raytrainer stays out of the node: the node gets the raytrainer its setup_commands install.
    (purelib / "zz_preinstalled_packages.pth").write_text("".join(f"{p}\n" for p in ours))
    ray_command = image / "bin" / "ray"
    ray_command.write_text(f"#!{image / 'bin' / 'python'}\nimport sys\nfrom ray.scripts.scripts import main\n"
                           "sys.exit(main())\n")
    ray_command.chmod(0o755)
    (home / ".profile").write_text(f'export PATH="{image / "bin"}:$PATH"\n')
    (home / ".bashrc").write_text("")
    return home, image


def cluster_config(sshd: Sshd, work: Path, token: Path) -> tuple[dict, int]:
    """cluster/local.yaml with this machine's values filled in; returns it and the dashboard port."""
    config = yaml.safe_load(LOCAL_YAML.read_text())
    config["cluster_name"] = f"raytrainer-e2e-{uuid.uuid4().hex[:8]}"
    config["provider"].update(head_ip="127.0.0.1", worker_ips=[])
    config["min_workers"] = config["max_workers"] = 0
    config["auth"] = {"ssh_user": getpass.getuser(), "ssh_private_key": str(sshd.key),
                      "ssh_proxy_command": sshd.proxy_command}
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token", "local.yaml ships no auth token"
    config["file_mounts"]["~/.ray/auth_token"] = str(token)  # this test's token, not the user's
    dashboard = free_port()
    ports = {"--port": free_port(), "--dashboard-port": dashboard}
    extra = (f" --temp-dir={work / 'ray'}" + "".join(
        f" --{flag}={free_port()}" for flag in (
            "ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
            "runtime-env-agent-port", "metrics-export-port", "node-manager-port", "object-manager-port")))
    commands = []
    for command in config["head_start_ray_commands"]:
        if "ray start" in command:
            for flag, port in ports.items():
                command, n = re.subn(rf"{flag}=\d+", f"{flag}={port}", command)
                assert n == 1, f"local.yaml's ray start has no {flag}=N to point at a free port: {command}"
            command += extra
        commands.append(command)
    config["head_start_ray_commands"] = commands
    return config, dashboard


def dashboard_listeners(port: int) -> list[str]:
    """Local addresses with a TCP socket listening on `port` (from /proc/net/tcp and tcp6)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:  # 0A = LISTEN
                    found.append(socket.inet_ntoa(bytes.fromhex(address)[::-1]) if len(address) == 8 else address)
    return found


@pytest.fixture
def node() -> Iterator[dict]:
    """This machine prepared as a node reachable over SSH; cleaned up whatever the test does."""
    if sys.platform != "linux":
        unavailable("the ray up end-to-end test needs Linux (sshd, PID namespaces)")
    ensure_packages()
    if os.geteuid() != 0:
        unavailable("the ray up end-to-end test needs root for a PID namespace (unshare --pid)")
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, text=True,
                           timeout=30)
    if probe.returncode != 0:
        unavailable(f"PID namespaces are not available here (unshare: {probe.stderr.strip()})")
    work = Path(tempfile.mkdtemp(prefix="rte2e-", dir="/tmp"))  # short: Ray's socket paths live under it
    home, image = make_node_environment(work)
    sshd = Sshd(work, home)
    token = work / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    tmp = Path(tempfile.gettempdir())
    info = {"work": work, "home": home, "image": image, "sshd": sshd, "token": token, "cluster_file": None}
    try:
        sshd.start()
        yield info
    finally:
        if info["cluster_file"] is not None and not info.get("down"):
            run([*RAY, "down", "-y", str(info["cluster_file"])], timeout=300, cwd=REPO)
        sshd.stop()
        name = info.get("cluster_name")
        if name:  # what `ray up` leaves on the machine that ran it, for this cluster only
            for leftover in (tmp / "ray").glob(f"cluster-{name}.*"):  # the local provider's node state
                leftover.unlink(missing_ok=True)
            for cached in tmp.glob("ray-config-*"):  # ray up's cache of the prepared config
                if cached.is_file() and name in cached.read_text(errors="replace"):
                    cached.unlink(missing_ok=True)
            user, cluster = (hashlib.sha256(v.encode()).hexdigest()[:10] for v in (getpass.getuser(), name))
            shutil.rmtree(tmp / f"ray_ssh_{user}" / cluster, ignore_errors=True)  # ssh control sockets
        shutil.rmtree(work, ignore_errors=True)


def test_ray_up_local_cluster_trains_the_example(node: dict) -> None:
    sshd: Sshd = node["sshd"]
    work: Path = node["work"]
    config, dashboard = cluster_config(sshd, work, node["token"])
    cluster_file = work / "cluster.yaml"
    cluster_file.write_text(yaml.safe_dump(config, sort_keys=False))
    node["cluster_file"], node["cluster_name"] = cluster_file, config["cluster_name"]
    # The login check's session process ("sshd: root@notty") can outlive its client by a moment under load.
    deadline = time.monotonic() + 15
    while processes_in(sshd.namespace, {sshd.pid}) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_in(sshd.namespace, {sshd.pid}) == {}, "the namespace must start empty"

    # 1. Bring the cluster up, exactly as a user would, from the repository root.
    up = run([*RAY, "up", "-y", "--no-config-cache", "--disable-usage-stats", str(cluster_file)], timeout=900,
             cwd=REPO, log=work / "ray_up.log")
    assert up.returncode == 0, f"ray up failed:\n{(up.stdout + up.stderr)[-6000:]}"
    started = processes_in(sshd.namespace, {sshd.pid})
    assert any("raylet" in c for c in started.values()) and any("gcs_server" in c for c in started.values()), started
    # The setup_commands installed the shipped checkout into the node's own environment.
    installed = sshd.ssh("python3 -c 'import raytrainer; print(raytrainer.__version__, raytrainer.__file__)'")
    version, location = installed.stdout.split()[-2:]
    import raytrainer

    assert version == raytrainer.__version__
    assert location == str(node["home"] / "raytrainer" / "raytrainer" / "__init__.py")

    # 2. The dashboard listens on localhost only and refuses requests without the cluster's token.
    assert set(dashboard_listeners(dashboard)) == {"127.0.0.1"}
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"http://127.0.0.1:{dashboard}/api/jobs/", timeout=10)
    assert refused.value.code == 401
    wrong = work / "wrong_token"
    wrong.write_text(secrets.token_hex(32))
    denied = run([*RAYTRAINER, "fit", "examples/autoencoder.py", "--address", f"http://127.0.0.1:{dashboard}",
                  "--connect-timeout", "30"], timeout=120, cwd=REPO,
                 env={"RAY_AUTH_TOKEN_PATH": str(wrong), "RAY_AUTH_MODE": "token"})
    assert denied.returncode == 1 and "refused this client's token" in denied.stderr, denied.stderr

    # 3. Train the example with 2 ranks as a Ray job on the cluster, through `raytrainer fit`.
    root = work / "runs" / "autoencoder"
    fit = run([*RAYTRAINER, "fit", "examples/autoencoder.py", "--address", f"http://127.0.0.1:{dashboard}",
               "--num-processes", "2", "--connect-timeout", "120", "--timeout", "900", "--",
               "--max_epochs", "2", "--no_progress_bar", "--ckpt_path", "none", "--default_root_dir", str(root)],
              timeout=1200, cwd=REPO, log=work / "fit.log", env={"RAY_AUTH_TOKEN_PATH": str(node["token"])})
    assert fit.returncode == 0, f"the job failed:\n{(fit.stdout + fit.stderr)[-6000:]}"
    assert "world size: 2, epochs: 2" in fit.stdout
    assert "SUCCEEDED" in fit.stderr

    # 3b. `--no-wait` prints commands that work as printed (token auth needs RAY_AUTH_MODE=token as well).
    queued = run([*RAYTRAINER, "fit", "examples/autoencoder.py", "--address", f"http://127.0.0.1:{dashboard}",
                  "--no-wait", "--connect-timeout", "120", "--", "--max_epochs", "500", "--no_progress_bar",
                  "--ckpt_path", "none", "--default_root_dir", str(work / "runs" / "queued")],
                 timeout=300, cwd=REPO, env={"RAY_AUTH_TOKEN_PATH": str(node["token"])})
    assert queued.returncode == 0, queued.stderr
    stop_cmd = next(line for line in queued.stdout.splitlines() if line.startswith("stop it with:")).split(":", 1)[1]
    assert stop_cmd.strip().startswith("RAY_AUTH_MODE=token ray job stop "), stop_cmd
    stopped = run(["bash", "-c", stop_cmd.strip()], timeout=300, cwd=REPO,
                  env={"RAY_AUTH_TOKEN_PATH": str(node["token"]), "PATH": f"{BIN}:{os.environ['PATH']}"})
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr

    # 4. Training finished, a checkpoint verifies, metrics were logged.
    status = run([*RAYTRAINER, "status", str(root), "--json"], timeout=300)
    assert status.returncode == 0, status.stderr
    summary = json.loads(status.stdout)
    assert summary["state"] == "finished", summary["state_detail"]
    assert [w["world_size"] for w in summary["world_sizes"]] == [2]
    assert summary["checkpoint"] and Path(summary["checkpoint"]).is_file()
    metrics = (Path(summary["run_dir"]) / "metrics.csv").read_text().splitlines()
    assert "train_loss_step" in metrics[0] and "val_loss" in metrics[0] and len(metrics) > 5

    # 5. Tear down: nothing the cluster started may survive `ray down`.
    down = run([*RAY, "down", "-y", str(cluster_file)], timeout=300, cwd=REPO, log=work / "ray_down.log")
    node["down"] = True
    assert down.returncode == 0, f"ray down failed:\n{(down.stdout + down.stderr)[-4000:]}"
    deadline = time.monotonic() + 60
    while (left := {pid: cmd for pid, cmd in processes_in(sshd.namespace, {sshd.pid}).items()
                    if pid in started and not cmd.startswith("sshd")}) and time.monotonic() < deadline:
        time.sleep(1)
    assert left == {}, f"processes started by ray up survived ray down: {left}"
    sshd.stop()
    assert sshd.proc.returncode is not None and namespace_of(sshd.pid) is None
