"""configure_optimizers in every Lightning form, scheduler stepping, optimizer hooks; Lightning 2.x is the oracle."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as pl
from raytrainer.core.optimization import ACCEPTED_FORMS, parse_optimizers

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning",
                                        "ignore::RuntimeWarning")


def quiet(**kwargs):
    base = dict(enable_progress_bar=False, enable_model_summary=False, logger=False, enable_checkpointing=False,
                num_sanity_val_steps=0)
    base.update(kwargs)
    return base


def data(n: int = 10, batch_size: int = 2, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=batch_size)


def run(base, configure, trainer_kwargs=None, n=10, val=True, extra=None):
    """Fit a linear model whose configure_optimizers is ``configure(module)``; record lr before each step."""
    lrs: list[tuple[str, int, int, float]] = []

    class Net(base.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            opt = self.trainer.optimizers[0]
            lrs.append(("t", self.current_epoch, batch_idx, round(opt.param_groups[0]["lr"], 8)))
            loss = nn.functional.mse_loss(self.layer(batch[0]), batch[1])
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            # a validation loss that stops improving after epoch 1, so ReduceLROnPlateau reacts
            self.log("val_loss", torch.tensor(1.0 / (1 + min(self.current_epoch, 1))))

        def configure_optimizers(self):
            return configure(self)

    for name, fn in (extra or {}).items():
        setattr(Net, name, fn)
    torch.manual_seed(0)
    model = Net()
    trainer = base.Trainer(**quiet(**(trainer_kwargs or {"max_epochs": 3})))
    trainer.fit(model, data(n), data(4) if val else None)
    final_lr = round(trainer.optimizers[0].param_groups[0]["lr"], 8)
    return lrs, final_lr, trainer.global_step, [p.detach().clone() for p in model.parameters()]


def assert_same(lightning, ours):
    assert ours[0] == lightning[0], "learning rates seen by training_step differ"
    assert ours[1:3] == lightning[1:3]
    for a, b in zip(lightning[3], ours[3]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def sgd(m, lr=0.1):
    return torch.optim.SGD(m.parameters(), lr=lr)


def step_lr(opt, gamma=0.5):
    return torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=gamma)


CONFIGS = {
    "single optimizer": lambda m: sgd(m),
    "list of one optimizer": lambda m: [sgd(m)],
    "tuple of one optimizer": lambda m: (sgd(m),),
    "([opt], [sched])": lambda m: (lambda o: ([o], [step_lr(o)]))(sgd(m)),
    "dict with scheduler object": lambda m: (lambda o: {"optimizer": o, "lr_scheduler": step_lr(o)})(sgd(m)),
    "dict, step interval": lambda m: (lambda o: {"optimizer": o, "lr_scheduler": {
        "scheduler": step_lr(o, 0.9), "interval": "step"}})(sgd(m)),
    "dict, step interval, frequency 3": lambda m: (lambda o: {"optimizer": o, "lr_scheduler": {
        "scheduler": step_lr(o, 0.9), "interval": "step", "frequency": 3}})(sgd(m)),
    "dict, epoch interval, frequency 2": lambda m: (lambda o: {"optimizer": o, "lr_scheduler": {
        "scheduler": step_lr(o), "interval": "epoch", "frequency": 2}})(sgd(m)),
    "list of dicts": lambda m: (lambda o: [{"optimizer": o, "lr_scheduler": step_lr(o)}])(sgd(m)),
    "plateau with monitor": lambda m: (lambda o: {"optimizer": o, "lr_scheduler": {
        "scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0, factor=0.5),
        "monitor": "val_loss"}})(sgd(m)),
    "plateau, monitor at top level": lambda m: (lambda o: {
        "optimizer": o, "monitor": "val_loss",
        "lr_scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0, factor=0.5)})(sgd(m)),
    "plateau on a training metric": lambda m: (lambda o: {"optimizer": o, "lr_scheduler": {
        "scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0, factor=0.5, threshold=10.0),
        "monitor": "train_loss"}})(sgd(m)),
    "adam + onecycle per step": lambda m: (lambda o: {"optimizer": o, "lr_scheduler": {
        "scheduler": torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=15), "interval": "step"}})(
        torch.optim.Adam(m.parameters(), lr=0.01)),
}


@pytest.mark.parametrize("form", list(CONFIGS))
def test_every_configure_optimizers_form_trains_like_lightning(L, form):
    assert_same(run(L, CONFIGS[form]), run(pl, CONFIGS[form]))


@pytest.mark.parametrize("kwargs", [dict(max_epochs=2, accumulate_grad_batches=2),
                                    dict(max_epochs=2, accumulate_grad_batches=3),
                                    dict(max_epochs=3, limit_train_batches=3)])
def test_step_schedulers_with_accumulation_and_limits_match_lightning(L, kwargs):
    form = CONFIGS["dict, step interval, frequency 3"]
    assert_same(run(L, form, kwargs), run(pl, form, kwargs))
    form = CONFIGS["dict, step interval"]
    assert_same(run(L, form, kwargs), run(pl, form, kwargs))


def test_scheduler_lr_after_n_steps_and_epochs():
    _, final_lr, steps, _ = run(pl, CONFIGS["dict, step interval"], {"max_epochs": 2})
    assert steps == 10 and final_lr == pytest.approx(0.1 * 0.9 ** 10)
    _, final_lr, _, _ = run(pl, CONFIGS["([opt], [sched])"], {"max_epochs": 3})
    assert final_lr == pytest.approx(0.1 * 0.5 ** 3)
    _, final_lr, _, _ = run(pl, CONFIGS["dict, epoch interval, frequency 2"], {"max_epochs": 5})
    assert final_lr == pytest.approx(0.1 * 0.5 ** 2)


def test_lr_schedulers_and_optimizers_accessors():
    seen = {}

    def capture(self, batch, batch_idx):
        seen["opt"] = self.optimizers()
        seen["sched"] = self.lr_schedulers()
        return nn.functional.mse_loss(self.layer(batch[0]), batch[1])

    run(pl, CONFIGS["([opt], [sched])"], {"max_epochs": 1}, extra={"training_step": capture})
    assert isinstance(seen["opt"].optimizer, torch.optim.SGD)
    assert isinstance(seen["sched"], torch.optim.lr_scheduler.StepLR)


def test_plateau_strict_false_skips_a_missing_metric(L):
    def form(m):
        o = sgd(m)
        return {"optimizer": o, "lr_scheduler": {
            "scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0), "monitor": "nope",
            "strict": False}}

    assert_same(run(L, form), run(pl, form))


def test_plateau_missing_metric_is_a_clear_error():
    def form(m):
        o = sgd(m)
        return {"optimizer": o, "lr_scheduler": {
            "scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau(o), "monitor": "val_acc"}}

    with pytest.raises(RuntimeError, match=r"ReduceLROnPlateau monitors 'val_acc', which was not logged at epoch "
                                           r"0\. Logged: \[.*'val_loss'.*\]"):
        run(pl, form)


def test_plateau_without_monitor_is_a_clear_error():
    def form(m):
        o = sgd(m)
        return [o], [torch.optim.lr_scheduler.ReduceLROnPlateau(o)]

    with pytest.raises(ValueError, match=r"ReduceLROnPlateau needs a metric to watch.*'monitor': 'val_loss'"):
        run(pl, form)


# --------------------------------------------------------------------------- bad forms
@pytest.mark.parametrize("bad", [
    lambda m: "adam",
    lambda m: 3,
    lambda m: {"optim": sgd(m)},
    lambda m: {"optimizer": sgd(m), "scheduler": None},
    lambda m: [sgd(m), "x"],
    lambda m: ([sgd(m)], ["not a scheduler"]),
], ids=["string", "int", "dict without optimizer", "dict with unknown key", "mixed list", "bad scheduler"])
def test_unrecognised_return_lists_the_accepted_forms(bad):
    with pytest.raises(ValueError) as info:
        run(pl, bad, {"max_epochs": 1})
    assert ACCEPTED_FORMS in str(info.value)
    assert "a list or tuple of optimizers" in str(info.value) and "'interval': 'epoch'|'step'" in str(info.value)


def test_bad_scheduler_config_values():
    def interval(m):
        o = sgd(m)
        return {"optimizer": o, "lr_scheduler": {"scheduler": step_lr(o), "interval": "batch"}}

    with pytest.raises(ValueError, match=r"interval='batch': use 'epoch' or 'step'"):
        run(pl, interval, {"max_epochs": 1})

    def frequency(m):
        o = sgd(m)
        return {"optimizer": o, "lr_scheduler": {"scheduler": step_lr(o), "frequency": 0}}

    with pytest.raises(ValueError, match=r"frequency=0: must be >= 1"):
        run(pl, frequency, {"max_epochs": 1})

    def foreign(m):
        o = sgd(m)
        return {"optimizer": o, "lr_scheduler": step_lr(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1))}

    with pytest.raises(ValueError, match=r"wraps an optimizer that was not returned with it"):
        run(pl, foreign, {"max_epochs": 1})


def test_several_optimizers_with_automatic_optimization_point_to_manual():
    def two(m):
        return [sgd(m), torch.optim.Adam(m.parameters())]

    with pytest.raises(ValueError, match=r"returned 2 optimizers, but automatic optimization supports one\. "
                                         r"Use manual optimization.*self\.automatic_optimization = False"):
        run(pl, two, {"max_epochs": 1})


def test_no_optimizer_with_automatic_optimization():
    with pytest.raises(ValueError, match=r"returned no optimizer.*automatic_optimization = False"):
        run(pl, lambda m: None, {"max_epochs": 1})


def test_configure_optimizers_not_defined():
    class NoOpt(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).sum()

    with pytest.raises(NotImplementedError, match=r"configure_optimizers.*torch\.optim\.Adam"):
        pl.Trainer(**quiet(max_epochs=1)).fit(NoOpt(), data(4))


def test_parse_optimizers_normalises_every_form():
    p = nn.Parameter(torch.zeros(2))
    o1, o2 = torch.optim.SGD([p], lr=1), torch.optim.SGD([p], lr=2)
    s1 = step_lr(o1)
    assert parse_optimizers(o1) == ([o1], [])
    assert parse_optimizers([o1, o2]) == ([o1, o2], [])
    opts, scheds = parse_optimizers(([o1, o2], [{"scheduler": step_lr(o2), "interval": "step", "name": "b"}]))
    assert opts == [o1, o2] and (scheds[0].opt_idx, scheds[0].interval, scheds[0].name) == (1, "step", "b")
    opts, scheds = parse_optimizers({"optimizer": o1, "lr_scheduler": {"scheduler": s1, "frequency": 4}})
    assert scheds[0].scheduler is s1 and scheds[0].frequency == 4 and scheds[0].interval == "epoch"
    assert parse_optimizers(None) == ([], [])


# --------------------------------------------------------------------------- optimizer hooks
def test_optimizer_step_override_for_warmup_matches_lightning(L):
    def warmup_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        scale = min(1.0, (self.trainer.global_step + 1) / 4)
        for group in optimizer.param_groups:
            group["lr"] = 0.1 * scale
        optimizer.step(closure=optimizer_closure)

    results = [run(base, CONFIGS["single optimizer"], {"max_epochs": 2, "accumulate_grad_batches": 2},
                   extra={"optimizer_step": warmup_step}) for base in (L, pl)]
    assert_same(*results)
    # window ends at batches 1, 3 and 4 (the epoch's last): lr set just before each closure runs
    assert [lr for *_, lr in results[1][0][:5]] == [0.1, 0.025, 0.025, 0.05, 0.075]


def test_optimizer_step_override_that_skips_steps(L):
    def every_other(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        if batch_idx % 2 == 0:
            optimizer.step(closure=optimizer_closure)
        else:
            optimizer_closure()  # forward/backward only, no update

    assert_same(*[run(base, CONFIGS["single optimizer"], {"max_epochs": 2},
                      extra={"optimizer_step": every_other}) for base in (L, pl)])


def test_lr_scheduler_step_override_matches_lightning(L):
    class Halve:
        """A non-torch scheduler (like timm's), stepped through lr_scheduler_step."""

        def __init__(self, optimizer):
            self.optimizer = optimizer
            self.n = 0

        def step(self, epoch=None):
            self.n += 1
            for g in self.optimizer.param_groups:
                g["lr"] *= 0.5

        def state_dict(self):
            return {"n": self.n}

        def load_state_dict(self, state):
            self.n = state["n"]

    def custom(self, scheduler, metric):
        scheduler.step(epoch=self.current_epoch)

    def form(m):
        o = sgd(m)
        return {"optimizer": o, "lr_scheduler": {"scheduler": Halve(o), "interval": "step", "frequency": 2}}

    assert_same(*[run(base, form, {"max_epochs": 2}, extra={"lr_scheduler_step": custom}) for base in (L, pl)])


def test_optimizer_zero_grad_override_and_lbfgs_match_lightning(L):
    def set_to_zero(self, epoch, batch_idx, optimizer):
        optimizer.zero_grad(set_to_none=False)

    assert_same(*[run(base, lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
                      {"max_epochs": 2}, extra={"optimizer_zero_grad": set_to_zero}) for base in (L, pl)])
    lbfgs = lambda m: torch.optim.LBFGS(m.parameters(), lr=0.5, max_iter=3)  # noqa: E731
    assert_same(run(L, lbfgs, {"max_epochs": 1}), run(pl, lbfgs, {"max_epochs": 1}))


def test_configure_gradient_clipping_override_matches_lightning(L):
    def clip_after_first_epoch(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if self.current_epoch >= 1:
            self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val,
                                gradient_clip_algorithm=gradient_clip_algorithm)

    assert_same(*[run(base, CONFIGS["single optimizer"], {"max_epochs": 2, "gradient_clip_val": 0.02},
                      extra={"configure_gradient_clipping": clip_after_first_epoch}) for base in (L, pl)])


def test_trainer_rejects_bad_optimization_arguments():
    with pytest.raises(ValueError, match=r"accumulate_grad_batches=0 must be an int >= 1"):
        pl.Trainer(accumulate_grad_batches=0)
    with pytest.raises(ValueError, match=r"gradient_clip_algorithm='l2': use 'norm' or 'value'"):
        pl.Trainer(gradient_clip_algorithm="l2")
    with pytest.raises(ValueError, match=r"gradient_clip_val=-1 must be >= 0"):
        pl.Trainer(gradient_clip_val=-1)


def test_fp16_scaler_skips_a_window_with_no_gradients():
    """16-mixed: a window where every training_step returned None has nothing to unscale or step."""
    from raytrainer.core.precision import MixedPrecision

    precision = MixedPrecision("16-mixed", "cpu")
    precision.scaler = torch.amp.GradScaler("cpu", init_scale=8.0)  # the CUDA code path, run on CPU
    layer = nn.Linear(2, 1)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    before = layer.weight.detach().clone()
    opt.zero_grad(set_to_none=True)
    precision.unscale_gradients(opt)
    assert precision.optimizer_step(opt) is None
    assert torch.equal(layer.weight, before)
    with precision.forward_context():
        loss = layer(torch.ones(1, 2)).float().sum()
    precision.backward(loss)
    precision.unscale_gradients(opt)
    torch.testing.assert_close(layer.weight.grad, torch.ones(1, 2))  # unscaled back from 8x
    precision.optimizer_step(opt)
    torch.testing.assert_close(layer.weight, before - 0.1)
