"""lr_find on Ray, where Lightning runs it: on every DDP rank, with rank 0's losses deciding, and the result on the
driver. The oracle is the same search computed by hand in this process: each step's gradient is the mean of the two
ranks' gradients (DDP), and the losses recorded are rank 0's."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader
from tuner_models import assert_bitwise_equal, lr_module, regression_data, weights

import raytrainer as rt
from raytrainer.callbacks import LearningRateFinder
from raytrainer.callbacks.lr_finder import lr_at
from raytrainer.tuner import Tuner
from raytrainer.utilities.exceptions import MisconfigurationException

QUIET = dict(enable_progress_bar=False, enable_model_summary=False)
BATCH = 8


def _loader() -> DataLoader:
    return DataLoader(regression_data(), batch_size=BATCH)  # not shuffled: rank r reads samples r, r+2, ...


def _trainer(tmp_path, **kwargs) -> rt.Trainer:
    return rt.Trainer(num_processes=2, max_epochs=2, logger=False, enable_checkpointing=False, deterministic=True,
                      default_root_dir=str(tmp_path), **QUIET, **kwargs)


def _by_hand(model, num_training: int, max_lr: float, threshold: float | None, min_lr: float = 1e-8,
             beta: float = 0.98) -> dict[str, list[float]]:
    """The range test of two DDP ranks, computed in one process: (lrs, rank 0's smoothed losses)."""
    model = copy.deepcopy(model)
    data = regression_data()
    x, y = data.tensors
    per_rank = [(x[r::2], y[r::2]) for r in range(2)]
    batches = len(per_rank[0][0]) // BATCH
    opt = torch.optim.SGD(model.parameters(), lr=min_lr, momentum=0.9)
    lrs, losses, avg, best = [], [], 0.0, 0.0
    for k in range(num_training):
        b = k % batches
        lr = lr_at(k, "exponential", min_lr, max_lr, num_training)
        for group in opt.param_groups:
            group["lr"] = lr
        grads, rank0_loss = [], None
        for r, (xs, ys) in enumerate(per_rank):
            model.zero_grad()
            loss = torch.nn.functional.mse_loss(model.net(xs[b * BATCH:(b + 1) * BATCH]),
                                                ys[b * BATCH:(b + 1) * BATCH])
            loss.backward()
            grads.append([p.grad.clone() for p in model.parameters()])
            rank0_loss = loss.item() if r == 0 else rank0_loss
        for p, g0, g1 in zip(model.parameters(), *grads):
            p.grad = (g0 + g1) / 2
        opt.step()
        step = k + 1
        avg = beta * avg + (1 - beta) * rank0_loss
        smoothed = avg / (1 - beta ** (step + 1))
        lrs.append(lr)
        losses.append(smoothed)
        if threshold is not None and step > 1 and smoothed > threshold * best:
            break
        if smoothed < best or step == 1:
            best = smoothed
    return {"lr": lrs, "loss": losses}


def _assert_matches(results, expected) -> None:
    assert results["lr"] == expected["lr"]  # the same schedule, step for step
    assert torch.allclose(torch.tensor(results["loss"]), torch.tensor(expected["loss"]), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_tuner_lr_find_on_ray_ranks(local_ray, tmp_path):
    """Tuner(Trainer(num_processes=2)).lr_find: a Ray run on 2 DDP ranks whose rank-0 losses reach the driver (also
    when the loss diverges and the ranks stop early, at the same step); the module and Trainer are left as they were
    and only the suggestion is set."""
    rt.seed_everything(7)
    model = lr_module(rt.LightningModule)()
    before = copy.deepcopy(model)
    trainer = _trainer(tmp_path)
    result = Tuner(trainer).lr_find(model, _loader(), num_training=20, max_lr=1.0, early_stop_threshold=None)
    _assert_matches(result.results, _by_hand(before, 20, 1.0, None))
    assert model.lr == result.suggestion() is not None
    assert_bitwise_equal(weights(model), weights(before))
    assert trainer.global_step == 0 and trainer.session.worker_group is None
    assert not list(tmp_path.iterdir())  # the trial wrote nothing: no events, logs or checkpoints

    diverging = Tuner(trainer).lr_find(model, _loader(), num_training=40, max_lr=1000.0, update_attr=False)
    expected = _by_hand(before, 40, 1000.0, 4.0)
    assert len(expected["lr"]) < 40  # the oracle diverged: the ranks stopped early together (no hang)
    _assert_matches(diverging.results, expected)


@pytest.mark.slow
def test_learning_rate_finder_in_a_ray_fit(local_ray, tmp_path):
    """The callback searches on every rank inside the fit, rank 0's losses decide, every rank trains on with the
    suggestion, and the driver's callback and module hold it; the fit then equals a fit given that lr by hand."""
    rt.seed_everything(3)
    model = lr_module(rt.LightningModule)()
    before = copy.deepcopy(model)
    finder = LearningRateFinder(num_training_steps=20, max_lr=1.0, early_stop_threshold=None)
    trainer = _trainer(tmp_path, callbacks=[finder])
    trainer.fit(model, _loader())
    _assert_matches(finder.optimal_lr.results, _by_hand(before, 20, 1.0, None))
    assert model.lr == finder.optimal_lr.suggestion() is not None  # set on the driver's module too
    assert trainer.global_step == 32  # 2 epochs of 16 batches per rank, the search's steps not counted

    rt.seed_everything(3)
    plain = lr_module(rt.LightningModule)()
    plain.lr = model.lr
    _trainer(tmp_path / "plain").fit(plain, _loader())
    assert_bitwise_equal(weights(model), weights(plain))


def test_lr_find_refused_for_sharded_ranks_before_any_starts(tmp_path):
    model = lr_module(rt.LightningModule)()
    trainer = rt.Trainer(num_processes=2, strategy="fsdp", default_root_dir=str(tmp_path), logger=False, **QUIET)
    with pytest.raises(MisconfigurationException, match="one process or on DDP ranks"):
        Tuner(trainer).lr_find(model, _loader())
    trainer = rt.Trainer(num_processes=2, strategy="fsdp", default_root_dir=str(tmp_path), logger=False,
                         callbacks=[LearningRateFinder()], **QUIET)
    with pytest.raises(MisconfigurationException, match="LearningRateFinder runs in one process or on DDP ranks"):
        trainer.fit(model, _loader())
    assert trainer.session.worker_group is None and trainer.last_run is None  # no rank was started
