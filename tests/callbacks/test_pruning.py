"""ModelPruning against Lightning's: the same masks and weights after every epoch, and the same final module."""
from __future__ import annotations

import pytest
import torch
from averaging_models import Tiny, TinyMixin, loader

import raytrainer as rt
from raytrainer.callbacks import ModelPruning
from raytrainer.utilities.exceptions import MisconfigurationException


class RecordMixin:
    """Keeps a copy of the module's state after each training epoch (after the pruning callback ran)."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, torch.Tensor]] = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.epochs.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


class Record(RecordMixin, rt.Callback):
    pass


def _fit_both(L, tmp_path, make_kwargs, ckpt=False):
    class LTiny(TinyMixin, L.LightningModule):
        pass

    class LRecord(RecordMixin, L.Callback):
        pass

    out = []
    for name, lib, cls, pruning, record in (("rt", rt, Tiny, ModelPruning, Record),
                                            ("pl", L, LTiny, L.callbacks.ModelPruning, LRecord)):
        lib.seed_everything(0)
        model = cls()
        rec = record()
        cbs = [pruning(**make_kwargs()), rec]
        if ckpt:
            cbs.append(lib.callbacks.ModelCheckpoint(dirpath=str(tmp_path / name), save_top_k=-1, filename="{epoch}"))
        trainer = lib.Trainer(callbacks=cbs, max_epochs=3, deterministic=True, default_root_dir=str(tmp_path / name),
                              enable_progress_bar=False, enable_model_summary=False, logger=False,
                              enable_checkpointing=ckpt)
        trainer.fit(model, loader())
        out.append((model, rec.epochs))
    return out


def _sparsity(state: dict[str, torch.Tensor]) -> float:
    masks = [v for k, v in state.items() if k.endswith("_mask")]
    return float(sum((m == 0).sum() for m in masks) / sum(m.numel() for m in masks))


CASES = {
    "global-l1-lottery": lambda: dict(pruning_fn="l1_unstructured", amount=0.3),
    "local-ln-structured-schedule": lambda: dict(
        pruning_fn="ln_structured", pruning_dim=0, pruning_norm=2, use_global_unstructured=False,
        parameter_names=["weight"], amount=lambda epoch: [0.0, 0.25, 0.5][epoch],
        use_lottery_ticket_hypothesis=False, make_pruning_permanent=False),
    "global-random-resample": lambda: dict(pruning_fn="random_unstructured", amount=2,
                                           resample_parameters=True, apply_pruning=lambda epoch: epoch != 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pruning_matches_lightning_every_epoch(L, tmp_path, case):
    (ours, our_epochs), (theirs, their_epochs) = _fit_both(L, tmp_path, CASES[case], ckpt=case == "global-l1-lottery")
    assert len(our_epochs) == len(their_epochs) == 3
    for epoch, (a, b) in enumerate(zip(our_epochs, their_epochs)):
        assert a.keys() == b.keys(), epoch
        for k in a:
            assert torch.equal(a[k], b[k]), (epoch, k)
    sparsities = [_sparsity(s) for s in our_epochs if any(k.endswith("_mask") for k in s)]
    assert sparsities and sparsities == sorted(sparsities) and sparsities[-1] > 0
    final, their_final = ours.state_dict(), theirs.state_dict()
    assert final.keys() == their_final.keys()
    for k in final:
        assert torch.equal(final[k], their_final[k]), k
    if case == "global-l1-lottery":
        # made permanent: plain weights with the pruned entries zero, in the module and in every checkpoint
        assert not any(k.endswith(("_orig", "_mask")) for k in final)
        zeros = sum(int((v == 0).sum()) for v in final.values())
        total = sum(v.numel() for v in final.values())
        assert zeros / total == pytest.approx(1 - 0.7 ** 3, abs=0.02)
        for epoch in range(3):
            mine = torch.load(tmp_path / "rt" / f"epoch={epoch}.ckpt", weights_only=True)["state_dict"]
            lightning = torch.load(tmp_path / "pl" / f"epoch={epoch}.ckpt", weights_only=True)["state_dict"]
            assert mine.keys() == lightning.keys() and all(torch.equal(mine[k], lightning[k]) for k in mine)
    else:
        assert any(k.endswith("_mask") for k in final) == (case != "global-random-resample")


def test_pruning_bad_arguments_are_explained():
    with pytest.raises(MisconfigurationException, match="pruning_dim"):
        ModelPruning("ln_structured", use_global_unstructured=False)
    with pytest.raises(MisconfigurationException, match="unstructured"):
        ModelPruning("ln_structured", pruning_dim=0, pruning_norm=1)
    with pytest.raises(MisconfigurationException, match="pruning_fn"):
        ModelPruning("magnitude")
    with pytest.raises(MisconfigurationException, match="parameter_names"):
        ModelPruning(parameter_names=["gamma"])
    with pytest.raises(MisconfigurationException, match="parameters_to_prune"):
        rt.Trainer(callbacks=[ModelPruning(parameters_to_prune=[(torch.nn.Linear(2, 2), "weight")])],
                   max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False).fit(Tiny(), loader())
