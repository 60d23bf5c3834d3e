"""The `raytrainer` command, run the way users run it: as a console script in a subprocess.

A real example run (examples/autoencoder.py through `raytrainer fit`) makes the run directory that
`status`, `report` and `export` read; failure, resize and preemption cases add hand-written events
to a copy of it, in the format raytrainer/core/events.py writes.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raytrainer import cli

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(sys.executable).with_name("raytrainer")
# The console script when installed (pip install -e . makes it); the module otherwise.
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "raytrainer.cli"]
FAILURE_RGB = tuple(int(cli._EVENT_STYLE["failure"][1][i:i + 2], 16) for i in (1, 3, 5))


def raytrainer(*args: str, cwd: Path = REPO, timeout: float = 300, env: dict | None = None,
               ) -> subprocess.CompletedProcess:
    """Run `raytrainer ARGS` in a subprocess and return its result (stdout/stderr as text)."""
    return subprocess.run([*COMMAND, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Train examples/autoencoder.py for 2 epochs through `raytrainer fit`; return the run's paths."""
    root = tmp_path_factory.mktemp("autoencoder")
    result = raytrainer("fit", "examples/autoencoder.py", "--", "--max_epochs", "2", "--no_progress_bar",
                        "--ckpt_path", "none", "--default_root_dir", str(root))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = root / "lightning_logs" / "version_0"
    return {"root": root, "run": run, "result": result,
            "checkpoints": sorted((run / "checkpoints").glob("*.ckpt"))}


def _write_events(run: Path, events: list[dict]) -> None:
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))


def _copy_run(trained: dict, dest: Path) -> Path:
    """A copy of the real run directory (as dest/lightning_logs/version_0)."""
    run = dest / "lightning_logs" / "version_0"
    shutil.copytree(trained["run"], run)
    return run


def _failure_events(run: Path, t0: float) -> list[dict]:
    """A 2-rank elastic run: failure, fallback, shrink to 1, restart, grow back, checkpoint, preemption."""
    ckpts = sorted((run / "checkpoints").glob("*.ckpt"))
    command = ["raytrainer", "fit", "examples/autoencoder.py", "--address", "http://127.0.0.1:8265",
               "--num-nodes", "1:2", "--", "--max_epochs", "4", "--ckpt_path", "none"]
    return [
        {"time": t0, "event": "start", "world_size": 2, "step": 0, "epoch": 0, "cause": None, "command": command},
        {"time": t0 + 20, "event": "checkpoint", "world_size": 2, "step": 22, "epoch": 0, "cause": None,
         "path": str(ckpts[0])},
        {"time": t0 + 31, "event": "failure", "world_size": 2, "step": 30, "epoch": 1, "rank": 1,
         "node": "10.0.0.12", "cause": "ActorDiedError: the node running rank 1 was lost"},
        {"time": t0 + 33, "event": "snapshot_fallback", "world_size": 2, "step": 22, "epoch": 1,
         "cause": "no in-memory snapshot survived; loading the checkpoint"},
        {"time": t0 + 40, "event": "resize", "world_size": 1, "step": 22, "epoch": 1, "cause": "1 node of 1:2 left"},
        {"time": t0 + 41, "event": "restart", "world_size": 1, "step": 22, "epoch": 1, "cause": "restart 1 of 3"},
        {"time": t0 + 70, "event": "resize", "world_size": 2, "step": 38, "epoch": 1, "cause": "a node joined"},
        {"time": t0 + 80, "event": "checkpoint", "world_size": 2, "step": 44, "epoch": 1, "cause": None,
         "path": str(ckpts[-1])},
        {"time": t0 + 95, "event": "preemption", "world_size": 2, "step": 50, "epoch": 2, "cause": "SIGTERM",
         "path": str(ckpts[-1])},
    ]


def _png_pixels(path: Path):
    import matplotlib.image

    return (matplotlib.image.imread(str(path))[..., :3] * 255).round().astype(int)


def _count_colour(pixels, rgb: tuple[int, int, int]) -> int:
    return int(((pixels[..., 0] == rgb[0]) & (pixels[..., 1] == rgb[1]) & (pixels[..., 2] == rgb[2])).sum())


# ------------------------------------------------------------------------------------------- fit


@pytest.mark.slow
def test_fit_runs_the_example_locally_and_leaves_a_run(trained: dict) -> None:
    run = trained["run"]
    assert (run / "metrics.csv").read_text().count("\n") > 5
    assert trained["checkpoints"], "the example wrote no checkpoint"
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert events[0]["event"] == "start" and events[-1]["event"] == "finish"
    assert "running" in trained["result"].stderr and "examples/autoencoder.py" in trained["result"].stderr


def test_fit_passes_flags_to_the_script_and_returns_its_exit_status(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text("import json, os, sys\n"
                      "print(json.dumps({'argv': sys.argv[1:], 'cwd': os.getcwd(),"
                      " 'command': os.environ.get('RAYTRAINER_COMMAND')}))\n"
                      "sys.exit(3)\n")
    result = raytrainer("fit", "train.py", "--num-nodes", "2:4", "--num-processes", "2", "--", "--lr", "0.1",
                        cwd=tmp_path, timeout=120)
    assert result.returncode == 3, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["argv"] == ["--num_nodes", "2:4", "--num_processes", "2", "--lr", "0.1"]
    assert Path(seen["cwd"]).resolve() == tmp_path.resolve()
    assert json.loads(seen["command"]) == ["raytrainer", "fit", "train.py", "--num-nodes", "2:4",
                                           "--num-processes", "2", "--", "--lr", "0.1"]

    twice = raytrainer("fit", "train.py", "--num-nodes", "2", "--", "--num_nodes", "3", cwd=tmp_path, timeout=120)
    assert twice.returncode == 2 and "both set the same thing" in twice.stderr
    bad_range = raytrainer("fit", "train.py", "--num-nodes", "4:2", cwd=tmp_path, timeout=120)
    assert bad_range.returncode == 2 and "MIN:MAX" in bad_range.stderr
    missing = raytrainer("fit", "nope.py", cwd=tmp_path, timeout=120)
    assert missing.returncode == 2 and "nope.py does not exist" in missing.stderr


def test_fit_with_an_address_gives_up_on_a_cluster_that_does_not_answer(tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text("print('never runs')\n")
    port = _free_port()  # nothing listens here
    t0 = time.monotonic()
    result = raytrainer("fit", "train.py", "--address", f"127.0.0.1:{port}", "--connect-timeout", "3",
                        cwd=tmp_path, timeout=120)
    assert result.returncode == 1
    assert f"no Ray dashboard answered at http://127.0.0.1:{port} within 3s" in result.stderr
    assert "waiting for the Ray cluster" in result.stderr  # the progress line shown while it waited
    assert time.monotonic() - t0 < 90
    client = raytrainer("fit", "train.py", "--address", "ray://10.0.0.1:10001", cwd=tmp_path, timeout=120)
    assert client.returncode == 2 and "not a Ray Client address" in client.stderr


# ---------------------------------------------------------------------------------------- status


@pytest.mark.slow
def test_status_of_a_finished_run(trained: dict) -> None:
    import torch

    result = raytrainer("status", str(trained["root"]), "--json")  # the default_root_dir: newest version
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    newest = trained["checkpoints"][-1]
    step = torch.load(newest, map_location="cpu", weights_only=False)["global_step"]
    assert summary["run_dir"] == str(trained["run"])
    assert summary["state"] == "finished"
    assert summary["step"] == step and summary["epoch"] == 2
    assert [w["world_size"] for w in summary["world_sizes"]] == [1]
    assert summary["failures"] == [] and summary["resizes"] == []
    assert summary["checkpoint"] == str(newest) and summary["checkpoint_step"] == step

    text = raytrainer("status", str(trained["run"]))
    assert text.returncode == 0, text.stderr
    assert "state       finished" in text.stdout
    assert f"checkpoint  {newest} (step {step}), verified" in text.stdout
    assert "nothing to resume" in text.stdout


@pytest.mark.slow
def test_status_with_failures_resizes_and_a_preemption(trained: dict, tmp_path: Path) -> None:
    run = _copy_run(trained, tmp_path)
    events = _failure_events(run, t0=time.time() - 100)
    _write_events(run, events)
    # The newest checkpoint is damaged: status must fall back to the older one and say why.
    newest = sorted((run / "checkpoints").glob("*.ckpt"))[-1]
    damaged = newest.with_name("epoch=9-step=999.ckpt")
    shutil.copy(newest, damaged)
    shutil.copy(Path(str(newest) + ".manifest.json"), Path(str(damaged) + ".manifest.json"))
    with open(damaged, "r+b") as f:
        f.seek(100)
        f.write(b"\0" * 64)
    os.utime(damaged, (time.time() + 5, time.time() + 5))

    result = raytrainer("status", str(tmp_path), "--json")
    assert result.returncode == 0, result.stderr
    s = json.loads(result.stdout)
    assert s["state"] == "preempted"
    assert (s["step"], s["epoch"]) == (50, 2)
    assert [(w["world_size"], w["event"]) for w in s["world_sizes"]] == [(2, "start"), (1, "resize"), (2, "resize")]
    assert [(f["rank"], f["node"], f["step"]) for f in s["failures"]] == [(1, "10.0.0.12", 30)]
    assert [(r["world_size_before"], r["world_size"]) for r in s["resizes"]] == [(2, 1), (1, 2)]
    assert s["restarts"] == 1 and len(s["preemptions"]) == 1
    assert s["checkpoint"] == str(newest)
    assert [p["path"] for p in s["skipped_checkpoints"]] == [str(damaged)]
    assert s["resume"] == ["raytrainer", "fit", "examples/autoencoder.py", "--address", "http://127.0.0.1:8265",
                           "--num-nodes", "1:2", "--", "--max_epochs", "4", "--ckpt_path", "last"]

    text = raytrainer("status", str(run)).stdout
    assert "state       preempted" in text
    assert "world size  2 (+0s, start) -> 1 (+40s, resize) -> 2 (+70s, resize)" in text
    assert "step 30 (rank 1, node 10.0.0.12): ActorDiedError" in text
    assert "2 -> 1 ranks (1 node of 1:2 left)" in text
    assert f"skipped {damaged}" in text
    assert ("resume      raytrainer fit examples/autoencoder.py --address http://127.0.0.1:8265 --num-nodes 1:2 "
            "-- --max_epochs 4 --ckpt_path last") in text


@pytest.mark.slow
def test_status_guesses_running_interrupted_and_failed(trained: dict, tmp_path: Path) -> None:
    run = _copy_run(trained, tmp_path)
    start = {"event": "start", "world_size": 2, "step": 0, "epoch": 0, "cause": None,
             "argv": ["examples/autoencoder.py", "--ckpt_path=none"]}
    now = time.time()
    _write_events(run, [{**start, "time": now - 30}])
    s = cli.summarize_run(str(run), now=now)
    assert s.state == "running"
    assert s.resume == ["python", "examples/autoencoder.py", "--ckpt_path=last"]
    # Nothing written for an hour and no finish event: the driver is gone.
    s = cli.summarize_run(str(run), now=now + 3600)
    assert s.state == "interrupted" and "no finish event" in s.state_detail
    _write_events(run, [{**start, "time": now - 30},
                        {"time": now - 10, "event": "failure", "world_size": 2, "step": 5, "epoch": 0, "rank": 0,
                         "node": "10.0.0.11", "cause": "RuntimeError: boom"}])
    s = cli.summarize_run(str(run), now=now)
    assert s.state == "failed" and "RuntimeError: boom" in s.state_detail
    _write_events(run, [{**start, "time": now - 30},
                        {"time": now, "event": "finish", "world_size": 2, "step": 5, "epoch": 0,
                         "cause": "max_failures exceeded (3)"}])
    assert cli.summarize_run(str(run), now=now).state == "failed"


def test_status_and_report_refuse_missing_or_unreadable_run_dirs(tmp_path: Path) -> None:
    missing = raytrainer("status", str(tmp_path / "nope"), timeout=120)
    assert missing.returncode == 2
    assert "no such run directory" in missing.stderr and str(tmp_path / "nope") in missing.stderr
    bad = tmp_path / "root" / "lightning_logs" / "version_0"
    bad.mkdir(parents=True)
    (bad / "events.jsonl").write_text('{"time": 1, "event": "start"}\n{"time": 2, "event": \n')
    report = raytrainer("report", str(tmp_path / "root"), "--output", str(tmp_path / "r.png"), timeout=120)
    assert report.returncode == 2
    assert "events.jsonl is not a valid events log" in report.stderr
    assert not (tmp_path / "r.png").exists()

    # The same checks in-process for the other shapes of bad input.
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    for arg, message in ((tmp_path / "empty", "is not a raytrainer run directory"),
                         (tmp_path / "file.txt", "is a file, not a run directory"),
                         ("nosuchscheme://bucket/run", "cannot read nosuchscheme://bucket/run")):
        with pytest.raises(cli.CLIError, match=message) as info:
            cli.summarize_run(str(arg))
        assert info.value.code == 2


# ---------------------------------------------------------------------------------------- report


@pytest.mark.slow
def test_report_draws_losses_and_marks_failures(trained: dict, tmp_path: Path) -> None:
    plain = tmp_path / "plain.png"
    result = raytrainer("report", str(trained["run"]), "--output", str(plain))
    assert result.returncode == 0, result.stderr
    assert "4 loss curve(s)" in result.stdout  # train_loss_step, train_loss_epoch, val_loss, test_loss
    assert plain.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    run = _copy_run(trained, tmp_path / "failing")
    _write_events(run, _failure_events(run, t0=time.time() - 100))
    marked = tmp_path / "reports" / "failing.png"  # parent folders are made
    result = raytrainer("report", str(run), "--output", str(marked))
    assert result.returncode == 0, result.stderr
    assert "9 event(s)" in result.stdout
    pixels, plain_pixels = _png_pixels(marked), _png_pixels(plain)
    assert pixels.shape[0] > 600 and pixels.shape[1] > 900
    # The failure colour appears only where a failure is drawn (marker and dashed line).
    assert _count_colour(pixels, FAILURE_RGB) > 50
    assert _count_colour(plain_pixels, FAILURE_RGB) == 0


# -------------------------------------------------------------------------------------- S3 runs


@pytest.fixture
def s3(tmp_path: Path) -> dict:
    """A moto S3 server on a free local port with one bucket; the env that points s3:// at it."""
    moto_server = pytest.importorskip("moto.server")
    import boto3

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"RAYTRAINER_S3_ENDPOINT": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_REGION": "us-east-1"}
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
    client.create_bucket(Bucket="runs")
    try:
        yield {"env": env, "client": client}
    finally:
        server.stop()


@pytest.mark.slow
def test_status_and_report_read_a_run_on_s3(trained: dict, s3: dict, tmp_path: Path) -> None:
    for path in trained["run"].rglob("*"):
        if path.is_file():
            key = "autoencoder/lightning_logs/version_0/" + str(path.relative_to(trained["run"]))
            s3["client"].upload_file(str(path), "runs", key)
    status = raytrainer("status", "s3://runs/autoencoder", "--json", env=s3["env"])
    assert status.returncode == 0, status.stderr
    summary = json.loads(status.stdout)
    assert summary["run_dir"] == "s3://runs/autoencoder/lightning_logs/version_0"
    assert summary["state"] == "finished"
    name = trained["checkpoints"][-1].name
    assert summary["checkpoint"] == f"s3://runs/autoencoder/lightning_logs/version_0/checkpoints/{name}"

    report = raytrainer("report", "s3://runs/autoencoder", "--output", "s3://runs/report.png", env=s3["env"])
    assert report.returncode == 0, report.stderr
    body = s3["client"].get_object(Bucket="runs", Key="report.png")["Body"].read()
    assert body[:8] == b"\x89PNG\r\n\x1a\n"
    missing = raytrainer("status", "s3://runs/nothing-here", env=s3["env"])
    assert missing.returncode == 2 and "no such run directory" in missing.stderr


# ---------------------------------------------------------------------------------------- export


@pytest.mark.slow
def test_export_a_trained_checkpoint_and_verify_it(trained: dict, tmp_path: Path) -> None:
    ckpt = str(trained["checkpoints"][-1])
    onnx_file = tmp_path / "autoencoder.onnx"
    result = raytrainer("export", ckpt, "--model", "examples.autoencoder:LitAutoEncoder", "--format", "onnx",
                        "--output", str(onnx_file), "--verify")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote {onnx_file}" in result.stdout
    assert "verified with onnxruntime: max abs diff" in result.stdout
    import onnxruntime
    import torch

    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: torch.rand(256, 64).numpy()})[0]
    assert out.shape == (256, 3)  # the batch axis is dynamic; 3 = the example's latent size

    ts_file = tmp_path / "autoencoder.pt"
    result = raytrainer("export", ckpt, "--model", "examples/autoencoder.py:LitAutoEncoder", "--format",
                        "torchscript", "--method", "trace", "--output", str(ts_file), "--verify")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "verified with torch.jit.load" in result.stdout
    assert torch.jit.load(str(ts_file))(torch.rand(5, 64)).shape == (5, 3)


def test_export_refuses_a_class_that_is_not_a_lightning_module(tmp_path: Path) -> None:
    result = raytrainer("export", str(tmp_path / "any.ckpt"), "--model", "examples.autoencoder:DigitsDataModule",
                        "--format", "onnx", "--output", str(tmp_path / "x.onnx"), timeout=120)
    assert result.returncode == 2
    assert "DigitsDataModule" in result.stderr and "not a raytrainer.LightningModule" in result.stderr
    assert not (tmp_path / "x.onnx").exists()
    for spec, message in (("torch.nn:Linear", "not a raytrainer.LightningModule"),
                          ("examples.autoencoder:Nope", "LightningModules there: LitAutoEncoder"),
                          ("no_such_module:Model", "cannot import no_such_module"),
                          ("examples.autoencoder", "expected pkg.module:ClassName")):
        err = io.StringIO()
        sys_stderr, sys.stderr = sys.stderr, err
        try:
            code = cli.main(["export", "x.ckpt", "--model", spec, "--format", "onnx", "--output", "x.onnx"])
        finally:
            sys.stderr = sys_stderr
        assert code == 2 and message in err.getvalue(), (spec, err.getvalue())


# ------------------------------------------------------------------------------------ help, bits


def test_every_command_has_help_with_examples(capsys: pytest.CaptureFixture) -> None:
    top = raytrainer("--help", timeout=120)
    assert top.returncode == 0 and all(c in top.stdout for c in ("fit", "status", "report", "export"))
    for command in ("fit", "status", "report", "export"):
        with pytest.raises(SystemExit) as info:
            cli.main([command, "--help"])
        assert info.value.code == 0
        text = capsys.readouterr().out
        assert "examples:" in text and f"raytrainer {command}" in text


def test_resume_command() -> None:
    assert cli.resume_command(["python", "train.py", "--ckpt_path", "none", "--lr", "1"]) == \
        ["python", "train.py", "--ckpt_path", "last", "--lr", "1"]
    assert cli.resume_command(["python", "train.py", "--ckpt-path=x.ckpt"]) == \
        ["python", "train.py", "--ckpt-path=last"]
    assert cli.resume_command(["python", "train.py"]) == ["python", "train.py", "--ckpt_path", "last"]
    assert cli.resume_command(["raytrainer", "fit", "t.py"]) == ["raytrainer", "fit", "t.py", "--", "--ckpt_path",
                                                                 "last"]


def test_spinner_shows_progress_on_a_terminal_and_one_line_per_wait_elsewhere() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Terminal()
    with cli.Spinner("waiting for the cluster", stream=tty, interval_s=0.01):
        time.sleep(0.2)
    frames = tty.getvalue()
    assert frames.count("\r") > 3 and "waiting for the cluster (0s)" in frames
    assert frames.rstrip().endswith("s") and "ok waiting for the cluster: done after" in frames

    log = io.StringIO()
    with pytest.raises(RuntimeError):
        with cli.Spinner("uploading", stream=log):
            raise RuntimeError("x")
    assert log.getvalue().splitlines()[0] == "... uploading"
    assert log.getvalue().splitlines()[-1].startswith("!! uploading: stopped after")


# ---------------------------------------------------------------------------------------- consolidate


@pytest.mark.slow
def test_consolidate_a_sharded_checkpoint_for_load_and_export(trained: dict, tmp_path: Path) -> None:
    import torch

    from raytrainer.checkpoint import sharded
    from raytrainer.cli.export import _load_class

    cls = _load_class(str(REPO / "examples" / "autoencoder.py") + ":LitAutoEncoder")
    source = torch.load(trained["checkpoints"][-1], weights_only=True)
    model = cls.load_from_checkpoint(trained["checkpoints"][-1])
    opt = torch.optim.Adam(model.parameters())
    opt.load_state_dict(source["optimizer_states"][0])
    meta = {k: v for k, v in source.items() if k not in ("state_dict", "optimizer_states")}
    ckpt_dir = tmp_path / "epoch=1-step=2.ckpt"
    sharded.save_sharded(str(ckpt_dir), model, [opt], meta)

    out = tmp_path / "consolidated.ckpt"
    result = raytrainer("consolidate", str(ckpt_dir), str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote {out}" in result.stdout and "1 optimizer state(s)" in result.stdout
    loaded = cls.load_from_checkpoint(str(out))
    assert loaded.hparams == model.hparams
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    consolidated = torch.load(out, weights_only=True)
    assert consolidated["loops"] == source["loops"] and consolidated["epoch"] == source["epoch"]
    assert torch.equal(consolidated["optimizer_states"][0]["state"][0]["exp_avg"],
                       source["optimizer_states"][0]["state"][0]["exp_avg"])
    # the directory itself also loads (consolidated in memory)
    assert torch.equal(cls.load_from_checkpoint(str(ckpt_dir)).encoder[0].weight, model.encoder[0].weight)

    ts_file = tmp_path / "autoencoder.pt"
    result = raytrainer("export", str(out), "--model", "examples/autoencoder.py:LitAutoEncoder", "--format",
                        "torchscript", "--method", "trace", "--output", str(ts_file), "--verify")
    assert result.returncode == 0, result.stderr[-3000:]

    again = raytrainer("consolidate", str(ckpt_dir), str(out))
    assert again.returncode == 2 and "--force" in again.stderr
    missing = raytrainer("consolidate", str(tmp_path / "nope"), str(tmp_path / "x.ckpt"))
    assert missing.returncode == 2 and "not a directory" in missing.stderr


def test_status_picks_a_sharded_checkpoint_directory_as_last_does(trained: dict, tmp_path: Path) -> None:
    """An FSDP run's checkpoints are directories: status shows the newest complete one (the one
    ckpt_path="last" resumes from), and skips a damaged one, saying why."""
    import torch

    from raytrainer.checkpoint import sharded
    from raytrainer.checkpoint.resolve import resolve_ckpt_path

    run = _copy_run(trained, tmp_path)
    newest = str(run / "checkpoints" / "epoch=5-step=99.ckpt")
    sharded.save_sharded(newest, torch.nn.Linear(4, 2), [], {"epoch": 5, "global_step": 99})
    os.utime(newest, (time.time() + 5, time.time() + 5))
    s = json.loads(raytrainer("status", str(tmp_path), "--json").stdout)
    assert s["checkpoint"] == newest and s["checkpoint_step"] == 99

    import raytrainer as pl

    finder = pl.Trainer(default_root_dir=str(tmp_path), enable_progress_bar=False)
    assert resolve_ckpt_path("last", finder.checkpoint_callback, finder) == newest  # status and "last" agree

    shard = next(p for p in Path(newest).iterdir() if p.suffix == ".distcp")
    shard.write_bytes(shard.read_bytes()[:-8])
    s = json.loads(raytrainer("status", str(tmp_path), "--json").stdout)
    assert s["checkpoint"] != newest and s["checkpoint"].endswith(".ckpt")
    assert newest in [p["path"] for p in s["skipped_checkpoints"]]
