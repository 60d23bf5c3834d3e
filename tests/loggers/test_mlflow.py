"""MLFlowLogger on a local file: store and on a real `mlflow server` (127.0.0.1), read back with MlflowClient;
in-process, against pytorch_lightning's MLFlowLogger, and on 2 Ray ranks with rank 0 SIGKILLed mid-run."""
from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import pytest
import torch
import yaml
from signal_at import SignalAt
from tracking_models import Tracked, events, lightning_twin, loader

import raytrainer as pl
from raytrainer.callbacks import ModelCheckpoint
from raytrainer.loggers.mlflow import MLFlowLogger

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

QUIET = dict(enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=2, deterministic=True)
SERVER_START_TIMEOUT_S = 300  # the first start migrates the sqlite schema; slow on 2 busy cores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 (sqlite backend, artifacts in a temporary folder); killed at the end."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "mlflow")
    cmd = [exe, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{root / 'store.db'}", "--artifacts-destination", str(root / "art")]
    logf = open(root / "server.log", "wb")
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}: {(root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer within {SERVER_START_TIMEOUT_S}s: "
                            f"{(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        # the server's own session: its uvicorn and job-runner children go with it
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)
        logf.close()


def histories(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every metric of the run: [(step, value)] in logged order."""
    run = client.get_run(run_id)
    def points(key: str) -> list:
        return sorted(client.get_metric_history(run_id, key), key=lambda m: (m.timestamp, m.step))

    return {k: [(m.step, m.value) for m in points(k)] for k in run.data.metrics}


def test_file_store_matches_lightning(tmp_path, monkeypatch, L):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # Lightning's default file: store needs it on mlflow>=3
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    opt = {"name": "sgd", "momentum": 0.9}
    pl.seed_everything(0)
    ours = MLFlowLogger(experiment_name="cmp", save_dir=str(tmp_path / "ours"), prefix="p")
    trainer = pl.Trainer(max_epochs=2, logger=ours, default_root_dir=str(tmp_path / "r"), **QUIET)
    trainer.fit(Tracked(opt=opt), loader(), loader(16))

    L.seed_everything(0)
    theirs = L.loggers.MLFlowLogger(experiment_name="cmp", save_dir=str(tmp_path / "theirs"), prefix="p")
    L.Trainer(max_epochs=2, logger=theirs, default_root_dir=str(tmp_path / "l"), **QUIET).fit(
        lightning_twin(L)(opt=opt), loader(), loader(16))

    client, lclient = MlflowClient(ours.tracking_uri), MlflowClient(theirs._tracking_uri)
    assert ours.save_dir == str(tmp_path / "ours") and ours.name == ours.experiment_id
    assert trainer.logger.version == ours.run_id and len(ours.version) == 32
    run, lrun = client.get_run(ours.version), lclient.get_run(theirs.version)
    assert run.info.status == lrun.info.status == "FINISHED"
    assert run.data.params == lrun.data.params == {"lr": "0.05", "hidden": "8", "opt/name": "sgd",
                                                   "opt/momentum": "0.9"}
    got, want = histories(client, ours.version), histories(lclient, theirs.version)
    assert sorted(got) == sorted(want) == ["p-epoch", "p-train_loss_epoch", "p-train_loss_step", "p-val_loss"]
    for key in want:
        assert [s for s, _ in got[key]] == [s for s, _ in want[key]], key
        assert [v for _, v in got[key]] == pytest.approx([v for _, v in want[key]], rel=1e-5), key
    assert [s for s, _ in got["p-train_loss_step"]] == [1, 3, 5, 7, 9, 11, 13, 15]


@pytest.mark.parametrize("log_model", ["all", True])
def test_server_uploads_checkpoints(mlflow_server, tmp_path, log_model):
    lg = MLFlowLogger(experiment_name=f"upload-{log_model}", tracking_uri=mlflow_server, run_name="r1",
                      tags={"team": "x"}, log_model=log_model)
    assert lg.save_dir is None
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), monitor="val_loss", save_top_k=2, save_last=True)
    trainer = pl.Trainer(max_epochs=3, logger=lg, callbacks=[ckpt], default_root_dir=str(tmp_path), **QUIET)
    trainer.fit(Tracked(), loader(), loader(16))
    client = MlflowClient(mlflow_server)
    run = client.get_run(lg.version)
    assert run.info.status == "FINISHED" and run.info.run_name == "r1" and run.data.tags["team"] == "x"
    assert run.info.experiment_id == lg.name
    folders = {a.path for a in client.list_artifacts(lg.version)}
    kept = {os.path.splitext(os.path.basename(p))[0] for p in [*ckpt.best_k_models, ckpt.last_model_path]}
    saved = {os.path.splitext(os.path.basename(p))[0] for _, p in trainer.session.saved_checkpoints}
    if log_model is True:  # once, at the end: only what the callback still holds
        assert folders == kept
    else:  # every save as it happened: the rotated-out ones too
        assert folders == saved and kept <= saved
    best = os.path.splitext(os.path.basename(ckpt.best_model_path))[0]
    files = {a.path for a in client.list_artifacts(lg.version, best)}
    assert files == {f"{best}/{best}.ckpt", f"{best}/metadata.yaml", f"{best}/aliases.txt"}
    local = client.download_artifacts(lg.version, best, str(tmp_path / "dl"))
    meta = yaml.safe_load(open(os.path.join(local, "metadata.yaml")))
    assert meta["original_filename"] == f"{best}.ckpt"
    assert meta["score"] == pytest.approx(float(ckpt.best_model_score))
    assert meta["ModelCheckpoint"]["monitor"] == "val_loss" and meta["ModelCheckpoint"]["save_top_k"] == 2
    assert open(os.path.join(local, "aliases.txt")).read() == "['latest', 'best']"
    state = torch.load(os.path.join(local, f"{best}.ckpt"), weights_only=False)
    assert state["global_step"] == torch.load(ckpt.best_model_path, weights_only=False)["global_step"]


class _FailsAt(Tracked):
    def training_step(self, batch, batch_idx):
        if self.global_step == 5:
            raise RuntimeError("boom at step 5")
        return super().training_step(batch, batch_idx)


def test_failed_fit_marks_run_failed_and_bad_input_is_clear(mlflow_server, tmp_path):
    lg = MLFlowLogger(experiment_name="fails", tracking_uri=mlflow_server)
    with pytest.raises(RuntimeError, match="boom at step 5"):
        pl.Trainer(max_epochs=2, logger=lg, default_root_dir=str(tmp_path), **QUIET).fit(_FailsAt(), loader())
    client = MlflowClient(mlflow_server)
    assert client.get_run(lg.version).info.status == "FAILED"
    assert [s for s, _ in histories(client, lg.version)["train_loss_step"]] == [1, 3]
    with pytest.raises(ValueError, match="log_model"):
        MLFlowLogger(log_model="sometimes")
    with pytest.raises(TypeError, match="dict or an argparse.Namespace"):
        lg.log_hyperparams([1, 2])


def test_resume_from_step_never_logs_a_step_twice(mlflow_server):
    first = MLFlowLogger(experiment_name="resume", tracking_uri=mlflow_server)
    for step in range(6):
        first.log_metrics({"loss": float(step), "epoch": 0.0}, step)
    first.log_metrics({"epoch": 0.0}, 5)  # a second point at the last step (Lightning logs epoch with each dict)
    # a replacement rank 0: a copy of the logger (same run), resumed from step 3's snapshot
    again = pickle.loads(pickle.dumps(first))
    again.resume_from_step(3)
    for step in range(3, 8):
        again.log_metrics({"loss": step + 0.5, "epoch": 0.0}, step)
        if step == 5:
            again.log_metrics({"epoch": 0.0}, 5)
    got = histories(MlflowClient(mlflow_server), first.version)
    assert got["loss"] == [(s, float(s)) for s in range(6)] + [(6, 6.5), (7, 7.5)]
    assert [s for s, _ in got["epoch"]] == [0, 1, 2, 3, 4, 5, 5, 6, 7]
    again.finalize("success")
    assert MlflowClient(mlflow_server).get_run(first.version).info.status == "FINISHED"


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ray_run_killed_rank0_keeps_one_run_with_monotonic_steps(mlflow_server, local_ray, tmp_path):
    pl.seed_everything(0)
    ref = MLFlowLogger(experiment_name="ray-ref", tracking_uri=mlflow_server)
    # in-process with batches twice as big: the same steps as 2 ranks that split each epoch
    pl.Trainer(max_epochs=2, logger=ref, default_root_dir=str(tmp_path / "ref"), **QUIET).fit(
        Tracked(), loader(batch_size=16), loader(16))

    pl.seed_everything(0)
    lg = MLFlowLogger(experiment_name="ray-ft", tracking_uri=mlflow_server)
    # rank 0 logs train_loss_step at step 5, dies at step 7 and comes back from the step-4 snapshot: step 5 is
    # trained and logged again, and must not appear twice
    trainer = pl.Trainer(max_epochs=2, logger=lg, num_processes=2, max_failures=2, snapshot_every_n_steps=4,
                         default_root_dir=str(tmp_path / "ft"),
                         callbacks=[SignalAt(7, str(tmp_path / "marker"), rank=0)],
                         **QUIET)
    trainer.fit(Tracked(), loader(), loader(16))
    ev = events(str(tmp_path / "ft"))
    restart = next(e for e in ev if e["event"] == "restart")
    assert any(e["event"] == "failure" for e in ev) and restart["step"] < 5, ev
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([lg.name])
    assert [r.info.run_id for r in runs] == [trainer.logger.version], "the restart must log to the same run"
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.params == {"lr": "0.05", "hidden": "8", "opt": "None"}
    got, want = histories(client, lg.version), histories(client, ref.version)
    assert sorted(got) == sorted(want)
    for key, points in got.items():
        steps = [s for s, _ in points]
        assert steps == sorted(steps), f"{key} went back: {steps}"
        assert steps == [s for s, _ in want[key]], (key, steps)
    assert len(set(s for s, _ in got["train_loss_step"])) == len(got["train_loss_step"]) > 0
