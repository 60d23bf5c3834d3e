"""StochasticWeightAveraging, WeightAveraging and EMAWeightAveraging: same weights as Lightning, exact resumes,
and (slow) a Ray run whose killed rank is restored from a snapshot."""
from __future__ import annotations

import glob
import os

import pytest
import torch
from averaging_models import KillAt, Tiny, TinyMixin, loader

import raytrainer as rt
from raytrainer.callbacks import EMAWeightAveraging, StochasticWeightAveraging, WeightAveraging
from raytrainer.utilities.exceptions import MisconfigurationException


def _kw(root, **kw):
    base = dict(max_epochs=4, deterministic=True, default_root_dir=str(root), enable_progress_bar=False,
                enable_model_summary=False, logger=False, enable_checkpointing=False)
    base.update(kw)
    return base


def _state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_same(a: dict, b: dict, exact: bool = True) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def _assert_equal_tree(a, b, where="") -> None:
    """Nested dicts/lists of tensors and plain values, equal bitwise."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_equal_tree(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _fit_both(L, tmp_path, rt_cb, l_cb, bn=False, scheduler=False, val=False):
    """Fit the same tiny model with raytrainer and Lightning; returns both final state_dicts (and the modules)."""
    class LTiny(TinyMixin, L.LightningModule):
        pass

    out = []
    for name, lib, cls, cb in (("rt", rt, Tiny, rt_cb), ("pl", L, LTiny, l_cb)):
        lib.seed_everything(0)
        model = cls(bn=bn, scheduler=scheduler)
        if val:
            model.validation_step = lambda batch, idx, m=model: m.log("v", m(batch[0]).mean())
        trainer = lib.Trainer(callbacks=[cb], **_kw(tmp_path / name))
        trainer.fit(model, loader(), loader(16) if val else None)
        out.append((_state(model), model, cb))
    return out


@pytest.mark.parametrize("strategy,start,bn,scheduler", [("cos", 2, False, False), ("linear", 0.5, True, True)],
                         ids=["cos-int-start", "linear-float-start-bn-steplr"])
def test_swa_matches_lightning(L, tmp_path, strategy, start, bn, scheduler):
    kw = dict(swa_lrs=0.05, swa_epoch_start=start, annealing_epochs=2, annealing_strategy=strategy)
    (ours, model, _), (theirs, _, their_cb) = _fit_both(L, tmp_path, StochasticWeightAveraging(**kw),
                                                        L.callbacks.StochasticWeightAveraging(**kw), bn=bn,
                                                        scheduler=scheduler)
    if not bn:
        _assert_same(ours, theirs)
    else:
        # Lightning recomputes BatchNorm statistics in an extra epoch that ends with one optimizer step on the last
        # real batch's stale gradients; raytrainer runs torch's update_bn and keeps the average itself. So: the
        # parameters equal Lightning's average, the statistics its extra epoch's (same batches, float rounding).
        average = {k: v.detach() for k, v in their_cb._average_model.named_parameters()}
        _assert_same({k: v for k, v in ours.items() if k in average}, average)
        stats = [k for k in ours if "running" in k]
        assert stats
        _assert_same({k: ours[k] for k in stats}, {k: theirs[k] for k in stats}, exact=False)
        assert model.net[0].momentum == 0.1, "the BatchNorm momentum was not put back"
    first = f"net.{1 if bn else 0}.weight"
    assert not torch.equal(ours[first], Tiny(bn=bn).state_dict()[first])


def test_weight_averaging_and_ema_match_lightning(L, tmp_path):
    (ours, _, _), (theirs, _, _) = _fit_both(L, tmp_path, EMAWeightAveraging(decay=0.8, update_starting_at_step=5,
                                                                       update_every_n_steps=2),
                                       L.callbacks.EMAWeightAveraging(decay=0.8, update_starting_at_step=5,
                                                                      update_every_n_steps=2), bn=True, val=True)
    _assert_same(ours, theirs)
    (ours, _, _), (theirs, _, _) = _fit_both(L, tmp_path / "wa", WeightAveraging(), L.callbacks.WeightAveraging())
    _assert_same(ours, theirs)


def _ckpt_fit(root, cb, **kw):
    rt.seed_everything(0)
    model = Tiny(scheduler=True)
    ckpt = rt.ModelCheckpoint(dirpath=str(root / "ckpt"), every_n_train_steps=12, save_top_k=-1,
                              filename="{step}", async_save=False)
    trainer = rt.Trainer(callbacks=[cb, ckpt], **_kw(root, enable_checkpointing=True))
    trainer.fit(model, loader(), **kw)
    return _state(model)


@pytest.mark.parametrize("make", [
    lambda: StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=2, annealing_epochs=3),
    lambda: EMAWeightAveraging(decay=0.7, update_every_n_steps=3),
], ids=["swa", "ema"])
def test_resume_mid_epoch_is_bitwise(tmp_path, make):
    whole = _ckpt_fit(tmp_path / "whole", make())
    mid = str(tmp_path / "whole" / "ckpt" / "step=12.ckpt")  # epoch 1, batch 4: inside the averaging phase
    saved = torch.load(mid, weights_only=True)
    if "StochasticWeightAveraging" in saved["callbacks"]:
        state = saved["callbacks"]["StochasticWeightAveraging"]
        assert state["n_averaged"] == 1 and state["scheduler_state"] is not None
    else:
        assert "current_model_state" in saved and "n_averaged" in saved["averaging_state"]
    resumed = _ckpt_fit(tmp_path / "resumed", make(), ckpt_path=mid)
    _assert_same(resumed, whole)
    last_whole = torch.load(tmp_path / "whole" / "ckpt" / "step=24.ckpt", weights_only=True)
    last_resumed = torch.load(tmp_path / "resumed" / "ckpt" / "step=24.ckpt", weights_only=True)
    _assert_same(last_resumed["state_dict"], last_whole["state_dict"])
    mine = [k for k in last_whole["callbacks"] if "WeightAveraging" in k]
    assert mine
    _assert_equal_tree({k: last_resumed["callbacks"][k] for k in mine}, {k: last_whole["callbacks"][k] for k in mine})
    for key in ("current_model_state", "averaging_state"):
        if key in last_whole:
            _assert_equal_tree(last_resumed[key], last_whole[key])


def test_swa_bad_arguments_are_explained():
    with pytest.raises(MisconfigurationException, match="swa_epoch_start"):
        StochasticWeightAveraging(swa_lrs=0.1, swa_epoch_start=0)
    with pytest.raises(MisconfigurationException, match="positive float"):
        StochasticWeightAveraging(swa_lrs=-1.0)
    with pytest.raises(MisconfigurationException, match="annealing_strategy"):
        StochasticWeightAveraging(swa_lrs=0.1, annealing_strategy="step")
    with pytest.raises(ValueError, match="decay"):
        EMAWeightAveraging(decay=1.5)


# ---------------------------------------------------------------------------------------------- Ray
def _ray_fit(root, kill: bool):
    rt.seed_everything(0)
    model = Tiny(scheduler=True)
    cbs = [StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=2, annealing_epochs=2),
           EMAWeightAveraging(decay=0.8),
           rt.ModelCheckpoint(dirpath=str(root / "ckpt"), save_last=True, async_save=False)]
    if kill:
        cbs.append(KillAt(11, str(root / "marker")))
    trainer = rt.Trainer(callbacks=cbs, **_kw(root, num_processes=2, max_epochs=3, enable_checkpointing=True,
                                              max_failures=2, snapshot_every_n_steps=1))
    trainer.fit(model, loader(n=128))
    return _state(model), torch.load(root / "ckpt" / "last.ckpt", weights_only=True), trainer


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ray_killed_rank_keeps_averages(local_ray, tmp_path):
    ref, ref_ckpt, _ = _ray_fit(tmp_path / "ref", kill=False)
    got, ckpt, trainer = _ray_fit(tmp_path / "ft", kill=True)
    assert os.path.exists(tmp_path / "ft" / "marker"), "the rank was never killed"
    kinds = [p.value for p in trainer.last_run.history]
    assert "recovering" in kinds, kinds
    _assert_same(got, ref)  # EMA's average (on_train_end runs last)
    _assert_same(ckpt["state_dict"], ref_ckpt["state_dict"])  # EMA average in the epoch-end checkpoint
    _assert_same(ckpt["current_model_state"], ref_ckpt["current_model_state"])
    swa, swa_ref = (c["callbacks"]["StochasticWeightAveraging"] for c in (ckpt, ref_ckpt))
    assert swa["n_averaged"] == swa_ref["n_averaged"] == 2
    assert swa["scheduler_state"] == swa_ref["scheduler_state"]
    _assert_same(swa["average_model_state"], swa_ref["average_model_state"])
    assert glob.glob(str(tmp_path / "ft" / "ckpt" / "*.ckpt"))
