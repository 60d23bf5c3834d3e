"""Warm worker groups (raytrainer/launchers/ray/pool.py): a finished call's rank processes serve the next call of
the same shape, run it as fresh processes would (bitwise), and are released on failure, on another shape, by
``raytrainer.shutdown()`` and after the idle timeout."""
from __future__ import annotations

import time
from typing import Any

import pytest
import torch
from conftest import alive_rank_actors
from trainer_models import Boom, RankProbe, Regression, loader, read_probes, regression_data

import raytrainer as pl
from raytrainer.launchers.ray import pool

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _trainer(**kwargs: Any) -> pl.Trainer:
    base = dict(num_processes=2, max_epochs=2, enable_progress_bar=False, enable_model_summary=False, logger=False,
                enable_checkpointing=False, num_sanity_val_steps=0, deterministic=True)
    base.update(kwargs)
    return pl.Trainer(**base)


def _fit(seed: int = 0, **kwargs: Any) -> tuple[pl.Trainer, Regression]:
    pl.seed_everything(seed)
    model = Regression(hidden=8)
    trainer = _trainer(**kwargs)
    trainer.fit(model, loader(regression_data(128), 16))
    return trainer, model


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_consecutive_calls_share_one_group_and_match_fresh_processes(local_ray, tmp_path):
    pl.shutdown()
    fresh_trainer, fresh = _fit()
    group = pool.held()
    assert group is not None and len(alive_rank_actors()) == 2  # kept warm after a clean fit
    probe = RankProbe(tmp_path)
    # validate, test and predict of the same Trainer, then a new Trainer's fit, all on the same rank processes
    out = fresh_trainer.validate(fresh, loader(regression_data(32), 8), verbose=False)
    assert fresh_trainer.session.worker_group is group and out[0]["val_loss"] >= 0
    fresh_trainer.test(fresh, loader(regression_data(32), 8), verbose=False)
    preds = fresh_trainer.predict(fresh, loader(regression_data(32), 8))
    assert fresh_trainer.session.worker_group is group and sum(len(p) for p in preds) == 32
    warm_trainer, warm = _fit(callbacks=[probe])
    assert warm_trainer.session.worker_group is group
    pids = sorted(p["pid"] for p in read_probes(tmp_path, "fit"))
    assert pids == sorted(r.pid for r in group.ranks)
    assert _same(warm, fresh)  # bitwise, as the deterministic run on new processes
    # a second warm run that is not deterministic leaves the next deterministic one unaffected
    _fit(seed=1, deterministic=False)
    again_trainer, again = _fit()
    assert again_trainer.session.worker_group is group and _same(again, fresh)


def test_a_failed_call_does_not_leak_into_the_next(local_ray):
    pl.shutdown()
    _, reference = _fit()
    kept = pool.held()
    pl.seed_everything(0)
    trainer = _trainer()
    with pytest.raises(Exception, match="boom at step 3"):
        trainer.fit(Boom(hidden=8), loader(regression_data(128), 16))
    assert trainer.session.worker_group is kept  # the failed call ran on the warm group ...
    assert pool.held() is None and not kept.started  # ... which is not kept after it
    assert alive_rank_actors() == []
    after_trainer, after = _fit()
    assert after_trainer.session.worker_group is not kept and _same(after, reference)


def test_another_shape_shutdown_and_idle_timeout_release_the_group(local_ray, monkeypatch):
    pl.shutdown()
    _fit()
    two = pool.held()
    _fit(num_processes=3)  # another world size: the idle 2-rank group goes first
    three = pool.held()
    assert three is not two and not two.started and len(alive_rank_actors()) == 3
    pl.shutdown()
    assert pool.held() is None and alive_rank_actors() == []
    monkeypatch.setenv("RAYTRAINER_WARM_IDLE_S", "1")
    _fit()
    assert pool.held() is not None
    deadline = time.monotonic() + 20
    while (pool.held() is not None or alive_rank_actors()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pool.held() is None and alive_rank_actors() == []
    monkeypatch.setenv("RAYTRAINER_WARM_IDLE_S", "0")  # 0: nothing is kept
    _fit()
    assert pool.held() is None and alive_rank_actors() == []
    monkeypatch.setenv("RAYTRAINER_WARM_IDLE_S", "soon")
    with pytest.raises(ValueError, match="RAYTRAINER_WARM_IDLE_S='soon'"):
        _fit()
