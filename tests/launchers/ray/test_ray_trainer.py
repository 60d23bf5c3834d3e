"""The Trainer on a local Ray instance: real rank actors, real gloo, checked against in-process runs.

Every Trainer here passes ``ray_address="local"`` so raytrainer starts (and sizes) its own private
instance instead of joining a cluster another program started on this machine. The first test
starts it; later tests reuse it, as a user's second ``fit`` would.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
from conftest import alive_rank_actors, assert_only_the_warm_group_left
from torch.utils.data import DataLoader, TensorDataset
from trainer_models import RankProbe, Regression, WithOpenFile, WriteAudit, loader, read_probes, regression_data

import raytrainer as pl
from raytrainer.launchers.ray.group import ACTOR_NAME_PREFIX, RankError

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240),
              pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")]

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]


@pytest.fixture(scope="module", autouse=True)
def no_session_before() -> Iterator[None]:
    """Start the module with no Ray session, so the first Trainer starts its own; end it after."""
    if ray.is_initialized():
        ray.shutdown()
    yield
    if ray.is_initialized():
        ray.shutdown()


def trainer(**kwargs: Any) -> pl.Trainer:
    """A Trainer on a private local Ray instance, quiet unless a test turns things back on."""
    base = dict(ray_address="local", enable_progress_bar=False, enable_model_summary=False, logger=False,
                enable_checkpointing=False, num_sanity_val_steps=0)
    base.update(kwargs)
    return pl.Trainer(**base)


def in_process(**kwargs: Any) -> pl.Trainer:
    """The same settings on one CPU in this process: the reference."""
    base = dict(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False, logger=False,
                enable_checkpointing=False, num_sanity_val_steps=0)
    base.update(kwargs)
    return pl.Trainer(**base)


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        diff = (a[k].float() - b[k].float()).abs().max().item()
        assert diff <= atol, f"{k} differs by {diff}"


def rank_actor_names() -> list[str]:
    """Every raytrainer rank actor this Ray session ever had (alive or dead); none without a session."""
    if not ray.is_initialized():
        return []
    return sorted(a["Name"] for a in ray._private.state.actors().values()
                  if str(a.get("Name", "")).startswith(ACTOR_NAME_PREFIX))


def live_placement_groups() -> list[str]:
    """Names of raytrainer placement groups that still hold resources."""
    table = ray.util.placement_group_table()
    return sorted(pg.get("name", "") for pg in table.values()
                  if str(pg.get("name", "")).startswith(ACTOR_NAME_PREFIX) and pg.get("state") != "REMOVED")


def wait_until(cond: Any, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return bool(cond())


# -- training -------------------------------------------------------------------------------------
def test_two_ranks_at_half_batch_train_like_one_rank(tmp_path):
    """2 ranks x batch 16 (DDP averages gradients) == 1 rank x batch 32, same data order, SGD."""
    data = regression_data(128)
    reference = Regression(hidden=8)
    in_process(max_epochs=2).fit(reference, loader(data, 32))

    model = Regression(hidden=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t = trainer(num_processes=2, max_epochs=2, callbacks=[RankProbe(tmp_path)])
    t.fit(model, loader(data, 16))

    # raytrainer started a private instance sized for the world (at least this machine's cores)
    assert ray.is_initialized() and ray.cluster_resources()["CPU"] == max(os.cpu_count() or 1, 2)
    assert t.world_size == 2 and t.global_step == 2 * 4
    assert_close(model.state_dict(), reference.state_dict(), atol=1e-6)
    assert any((model.state_dict()[k] - before[k]).abs().max() > 1e-3 for k in before)  # it did train
    probes = read_probes(tmp_path, "fit")
    assert [p["rank"] for p in probes] == [0, 1]
    assert probes[0]["pid"] != probes[1]["pid"] != os.getpid()
    assert [p["env"]["RANK"] for p in probes] == ["0", "1"] and probes[0]["env"]["WORLD_SIZE"] == "2"
    assert probes[0]["env"]["MASTER_PORT"] == probes[1]["env"]["MASTER_PORT"]
    for r in (0, 1):  # the driver holds exactly what every rank ended with
        ranked = torch.load(tmp_path / f"params-rank-{r}.pt")
        assert_close(ranked["state_dict"], model.state_dict(), atol=0)
    assert_only_the_warm_group_left()


def test_eight_ranks_on_a_two_core_machine(tmp_path):
    """num_processes=8 runs 8 ranks even though this session's instance was started for 2."""
    n, batch, epochs = 200, 4, 2
    t = trainer(num_processes=8, max_epochs=epochs, callbacks=[RankProbe(tmp_path)])
    t.fit(Regression(), loader(regression_data(n), batch, shuffle=True))

    assert t.world_size == 8
    assert ray.cluster_resources()["CPU"] >= 8  # the instance was regrown (restarted while idle) to fit 8
    assert t.global_step == epochs * math.ceil(n / (8 * batch))
    assert t.current_epoch == epochs
    probes = read_probes(tmp_path, "fit")
    assert [p["rank"] for p in probes] == list(range(8))
    assert {p["world_size"] for p in probes} == {8}
    assert len({p["pid"] for p in probes}) == 8
    steps = {torch.load(tmp_path / f"params-rank-{r}.pt")["global_step"] for r in range(8)}
    assert steps == {t.global_step}  # every rank stepped the same number of times


def test_strategy_ray_with_one_rank_still_runs_on_an_actor(tmp_path):
    """strategy="ray" with one rank: the driver does not train (useful to run on a remote cluster)."""
    model = Regression()
    t = trainer(strategy="ray", max_epochs=1, callbacks=[RankProbe(tmp_path)])
    t.fit(model, loader(regression_data(32), 8))
    probes = read_probes(tmp_path, "fit")
    assert len(probes) == 1 and probes[0]["rank"] == 0 and probes[0]["world_size"] == 1
    assert probes[0]["pid"] != os.getpid()
    assert t.world_size == 1 and t.global_step == 4
    ranked = torch.load(tmp_path / "params-rank-0.pt")["state_dict"]
    assert_close(ranked, model.state_dict(), atol=0)


def test_driver_sees_metrics_step_epoch_and_checkpoint_and_only_rank0_writes(tmp_path):
    data = regression_data(128)
    root_ref, root = tmp_path / "ref", tmp_path / "ray"
    audit = tmp_path / "audit"
    audit.mkdir()

    reference = Regression(hidden=8)
    ref = in_process(max_epochs=2, logger=True, enable_checkpointing=True, default_root_dir=str(root_ref))
    ref.fit(reference, loader(data, 32), loader(data, 32))

    model = Regression(hidden=8)
    # a CSVLogger: its files go through raytrainer.io.storage, which WriteAudit records per rank
    t = trainer(num_processes=2, max_epochs=2, logger=pl.loggers.CSVLogger(str(root)), enable_checkpointing=True,
                default_root_dir=str(root), callbacks=[WriteAudit(audit)])
    t.fit(model, loader(data, 16), loader(data, 16))

    # step, epoch, world size and weights as the in-process run
    assert (t.global_step, t.current_epoch, t.world_size) == (ref.global_step, ref.current_epoch, 2)
    assert_close(model.state_dict(), reference.state_dict(), atol=1e-6)
    # the same metric names; synced values equal the single-process ones, unsynced ones are rank 0's
    assert t.callback_metrics.keys() == ref.callback_metrics.keys()
    assert t.logged_metrics.keys() == ref.logged_metrics.keys()
    assert abs(float(t.callback_metrics["val_loss"]) - float(ref.callback_metrics["val_loss"])) < 1e-5
    assert float(t.callback_metrics["train_rank"]) == pytest.approx(0.5)   # sync_dist: mean of ranks 0 and 1
    assert float(t.callback_metrics["train_rank_local"]) == 0.0             # no sync_dist: rank 0's own value
    assert float(t.logged_metrics["train_rank"]) == pytest.approx(0.5)
    # validation metrics are reduced before callbacks see them, with or without sync_dist
    assert float(t.callback_metrics["val_rank"]) == pytest.approx(0.5)
    assert float(t.callback_metrics["val_rank_local"]) == pytest.approx(0.5)
    # the checkpoint: where Lightning puts it, named after the last epoch/step, holding the final weights
    best = Path(t.checkpoint_callback.best_model_path)
    assert best == root / "lightning_logs" / "version_0" / "checkpoints" / f"epoch=1-step={t.global_step}.ckpt"
    assert best.is_file()
    ckpt = torch.load(best, weights_only=False)
    assert ckpt["global_step"] == t.global_step
    assert_close(ckpt["state_dict"], model.state_dict(), atol=0)
    assert t.log_dir == str(root / "lightning_logs" / "version_0")
    assert sorted(p.name for p in (root / "lightning_logs").iterdir()) == ["version_0"]
    assert (Path(t.log_dir) / "metrics.csv").is_file() and (Path(t.log_dir) / "hparams.yaml").is_file()
    # single writer: rank 1 wrote nothing; rank 0 wrote the logs and the checkpoint
    rank0 = (audit / "writes-rank-0.txt").read_text().splitlines()
    rank1 = (audit / "writes-rank-1.txt").read_text().splitlines()
    assert rank1 == ["installed"], rank1
    written = " ".join(rank0)
    for name in ("metrics.csv", "hparams.yaml", best.name):
        assert name in written, f"rank 0 did not write {name}: {rank0}"


# -- evaluation and prediction -------------------------------------------------------------------
def test_validate_and_test_return_lightning_dicts_reduced_across_ranks():
    data = regression_data(64, seed=1)
    model = Regression(hidden=8)
    ref_val = in_process().validate(model, loader(data, 8), verbose=False)
    ref_test = in_process().test(model, loader(data, 8), verbose=False)

    t = trainer(num_processes=2)
    val = t.validate(model, loader(data, 8), verbose=False)
    test = t.test(model, loader(data, 8), verbose=False)

    assert isinstance(val, list) and len(val) == 1 and isinstance(val[0], dict)
    assert set(val[0]) == set(ref_val[0]) == {"val_loss", "val_rank", "val_rank_local"}
    assert val[0]["val_loss"] == pytest.approx(ref_val[0]["val_loss"], abs=1e-6)  # mean over both halves
    assert val[0]["val_rank"] == pytest.approx(0.5) and val[0]["val_rank_local"] == pytest.approx(0.5)
    assert set(test[0]) == set(ref_test[0]) == {"test_loss", "test_rank"}
    assert test[0]["test_loss"] == pytest.approx(ref_test[0]["test_loss"], abs=1e-6)
    assert test[0]["test_rank"] == pytest.approx(0.5)
    assert float(t.callback_metrics["test_loss"]) == pytest.approx(test[0]["test_loss"])
    assert_only_the_warm_group_left()


@pytest.mark.parametrize("n", [50, 7])
def test_predict_returns_outputs_in_dataset_order(n):
    data = regression_data(n, seed=2)
    model = Regression(hidden=8)
    expected = torch.cat(in_process().predict(model, loader(data, 4)))

    out = trainer(num_processes=2).predict(model, loader(data, 4))

    assert isinstance(out, list) and all(isinstance(b, torch.Tensor) for b in out)
    got = torch.cat(out)
    assert got.shape == expected.shape == (n, 1)
    assert torch.allclose(got, expected, atol=1e-6)


# -- bad input and failures ----------------------------------------------------------------------
def test_unpicklable_module_is_named_before_any_worker_starts(tmp_path):
    before = rank_actor_names()
    model = WithOpenFile(str(tmp_path / "debug.log"))
    t = trainer(num_processes=2)
    start = time.monotonic()
    with pytest.raises(TypeError) as info:
        t.fit(model, loader(regression_data(32), 8))
    text = str(info.value)
    assert "debug_log" in text and "open file" in text and "debug.log" in text
    with pytest.raises(TypeError, match="debug_log"):
        t.validate(model, loader(regression_data(32), 8), verbose=False)
    assert time.monotonic() - start < 10
    assert rank_actor_names() == before  # no rank actor was ever created
    model.debug_log.close()


class LambdaData(pl.LightningDataModule):
    """A datamodule holding a lambda made in a test function: cloudpickle copes, a lock does not."""

    def __init__(self) -> None:
        super().__init__()
        import threading

        lock = threading.Lock()
        self.transform = lambda x: (lock, x)

    def train_dataloader(self) -> DataLoader:
        return loader(regression_data(32), 8)


def test_unpicklable_datamodule_attribute_is_named():
    before = rank_actor_names()
    with pytest.raises(TypeError) as info:
        trainer(num_processes=2).fit(Regression(), datamodule=LambdaData())
    text = str(info.value)
    assert "datamodule" in text and "transform" in text and "lambda" in text and "lock" in text
    assert rank_actor_names() == before


def test_exception_on_rank_one_reaches_the_driver_with_rank_node_and_traceback():
    t = trainer(num_processes=2, max_epochs=1)
    with pytest.raises(RankError) as info:
        t.fit(Regression(fail_on_rank=1, fail_at_batch=2), loader(regression_data(128), 8))
    err = info.value
    text = str(err)
    assert err.rank == 1 and "rank 1" in text
    node_ip = ray.util.get_node_ip_address()
    assert err.node_ip == node_ip and node_ip in text
    assert "deliberate failure in training_step at batch 2" in text
    assert "trainer_models.py" in text and "training_step" in text  # the rank's own traceback
    assert isinstance(err.exception, ValueError)
    # rank 0 was stopped instead of hanging in the gradient all-reduce; nothing is left reserved
    assert wait_until(lambda: alive_rank_actors() == [], 10), alive_rank_actors()
    assert wait_until(lambda: live_placement_groups() == [], 10), live_placement_groups()


CTRL_C_DRIVER = textwrap.dedent("""
    import faulthandler, json, signal, sys, time
    sys.path[:0] = [{here!r}, {repo!r}]
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test asks for stacks if this hangs
    # As in a terminal: Ctrl-C raises KeyboardInterrupt (whatever this process inherited from pytest)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {{signal.SIGINT}})
    import ray
    import raytrainer as pl
    from trainer_models import Regression, RankProbe, loader, regression_data
    from conftest import alive_rank_actors

    t = pl.Trainer(num_processes=2, max_epochs=1000, ray_address="local", enable_progress_bar=False,
                   enable_model_summary=False, logger=False, enable_checkpointing=False,
                   callbacks=[RankProbe({out!r})])
    try:
        t.fit(Regression(step_sleep_s=0.05), loader(regression_data(64), 8))
        print("FIT RETURNED")
    except KeyboardInterrupt:
        # still connected: what does this Ray session hold for the run?
        time.sleep(0.5)
        pgs = [pg for pg in ray.util.placement_group_table().values() if pg.get("state") != "REMOVED"]
        print("LEFT " + json.dumps({{"actors": alive_rank_actors(), "pgs": [pg.get("name") for pg in pgs]}}),
              flush=True)
        sys.exit(130)
""")


def _signal_masks(pid: int) -> str:
    """Each thread's blocked/ignored/caught/pending signal masks, from /proc (for a hang report)."""
    lines = []
    for task in sorted(os.listdir(f"/proc/{pid}/task")):
        try:
            status = open(f"/proc/{pid}/task/{task}/status").read().splitlines()
        except OSError:
            continue
        names = ("Name", "SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt")
        fields = [line for line in status if line.startswith(names)]
        lines.append(f"thread {task}: " + " ".join(f.replace("\t", "") for f in fields))
    return "\n".join(lines)


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_ctrl_c_stops_every_rank_and_releases_the_placement_group(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(CTRL_C_DRIVER.format(here=str(HERE), repo=str(REPO), out=str(tmp_path)))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        markers = [tmp_path / "training-rank-0", tmp_path / "training-rank-1"]
        started = wait_until(lambda: all(m.exists() for m in markers) or proc.poll() is not None, 150)
        assert started and proc.poll() is None, f"training never started:\n{proc.stdout.read()[-4000:]}"
        pids = [int(m.read_text()) for m in markers]
        assert all(_pid_alive(p) for p in pids)
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGUSR1)  # every thread's stack, to see where it hangs
            time.sleep(3)
            masks = _signal_masks(proc.pid)
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate(timeout=30)
            pytest.fail(f"the driver did not exit within 90 s of Ctrl-C:\n{masks}\n{out[-8000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert proc.returncode == 130, out[-4000:]
    left = json.loads(next(line for line in out.splitlines() if line.startswith("LEFT "))[5:])
    assert left == {"actors": [], "pgs": []}, left
    # the rank processes are gone (not merely idle)
    assert wait_until(lambda: not any(_pid_alive(p) for p in pids), 15), [p for p in pids if _pid_alive(p)]


# -- manual optimization -------------------------------------------------------------------------
def test_gan_with_manual_optimization_trains_on_two_ranks(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "examples"))  # the ranks get the driver's path and import gan too
    from gan import DigitsGAN, digits_tensor

    torch.manual_seed(0)
    model = DigitsGAN(latent_dim=8, hidden=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = DataLoader(TensorDataset(digits_tensor()[:256]), batch_size=32, shuffle=True, drop_last=True)
    t = trainer(num_processes=2, max_epochs=2, callbacks=[RankProbe(tmp_path)])
    t.fit(model, data)

    batches_per_rank = 256 // 2 // 32
    assert t.global_step == 2 * 2 * batches_per_rank  # two optimizer steps per batch
    g, d = float(t.callback_metrics["g_loss_epoch"]), float(t.callback_metrics["d_loss_epoch"])
    assert math.isfinite(g) and math.isfinite(d)
    ranks = [torch.load(tmp_path / f"params-rank-{r}.pt")["state_dict"] for r in (0, 1)]
    # ranks saw different data: equal weights mean both backward passes were all-reduced
    assert_close(ranks[0], ranks[1], atol=0)
    assert_close(model.state_dict(), ranks[0], atol=0)
    for prefix in ("generator.", "discriminator."):
        assert any((model.state_dict()[k] - before[k]).abs().max() > 1e-4 for k in before if k.startswith(prefix))
