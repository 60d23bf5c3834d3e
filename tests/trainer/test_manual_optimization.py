"""Manual optimization: optimizers(), manual_backward, toggling, schedulers, clipping, refusals.

Behaviour that must match Lightning is checked against pytorch_lightning itself (installed as a dev
dependency): the same module body runs under both trainers and what it observed is compared.
"""
from __future__ import annotations

import copy
import importlib.util
import math
import os
import warnings
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import raytrainer
from raytrainer.core.step import LightningOptimizer

# every fit here is a few batches on CPU; a miscounted global_step must fail, not spin on max_steps
pytestmark = pytest.mark.timeout(120)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load_gan_example() -> Any:
    spec = importlib.util.spec_from_file_location("gan_example", os.path.join(ROOT, "examples", "gan.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gan = _load_gan_example()


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """These models are tiny: one intra-op thread is fastest, and avoids spinning on a busy 2-core box.

    Also undoes Trainer(deterministic=True)'s process-wide switch, so other tests see the usual torch.
    """
    n = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def quiet_trainer(tmp_path: Any, **kwargs: Any) -> raytrainer.Trainer:
    """A single-CPU raytrainer Trainer with no progress bar, summary or checkpoints."""
    args = dict(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
                enable_checkpointing=False, logger=False, default_root_dir=str(tmp_path))
    args.update(kwargs)
    return raytrainer.Trainer(**args)


def pl_fit(module: Any, loader: DataLoader, tmp_path: Any, **kwargs: Any) -> Any:
    """Fit ``module`` with pytorch_lightning's own Trainer (the reference behaviour)."""
    pl = pytest.importorskip("pytorch_lightning")
    args = dict(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
                enable_checkpointing=False, logger=False, default_root_dir=str(tmp_path / "pl"))
    args.update(kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = pl.Trainer(**args)
        trainer.fit(module, loader)
    return trainer


def tiny_loader(n: int = 8, batch_size: int = 2, dim: int = 4) -> DataLoader:
    x = torch.linspace(-1, 1, n * dim).view(n, dim)
    return DataLoader(TensorDataset(x), batch_size=batch_size)


def digits_loader(n: int, batch_size: int) -> DataLoader:
    return DataLoader(TensorDataset(gan.digits_tensor()[:n]), batch_size=batch_size, shuffle=True, drop_last=True)


# ------------------------------------------------------------------------------------ module bodies
# Each factory builds the same module on either framework's LightningModule, so raytrainer's answers
# can be compared with Lightning's.

def optimizers_probe(base: type, n_opts: int, record: dict[str, Any]) -> Any:
    """n_opts linear layers, one optimizer each; training_step records what optimizers() returned."""

    class Probe(base):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.layers = nn.ModuleList(nn.Linear(4, 1) for _ in range(n_opts))

        def training_step(self, batch: Any, batch_idx: int) -> None:
            if batch_idx == 0:
                record["wrapped"] = describe(self.optimizers(), base)
                record["raw"] = describe(self.optimizers(use_pl_optimizer=False), base)
                raw = self.optimizers(use_pl_optimizer=False)
                record["raw_is_configured"] = [a is b for a, b in zip(raw if isinstance(raw, list) else [raw],
                                                                        record["configured"])]
                record["schedulers"] = describe_schedulers(self.lr_schedulers())
            (x,) = batch
            opts = self.optimizers()
            for layer, opt in zip(self.layers, opts if isinstance(opts, list) else [opts]):
                opt.zero_grad()
                self.manual_backward(layer(x).pow(2).mean())
                opt.step()

        def configure_optimizers(self) -> Any:
            opts = [torch.optim.SGD(layer.parameters(), lr=0.1) for layer in self.layers]
            record["configured"] = opts
            if n_opts == 1:
                return opts[0]
            scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=1) for o in opts[:2]]
            return opts, scheds

    return Probe()


def describe(x: Any, base: type) -> Any:
    """The shape of what optimizers() returned: list or single, and what kind each element is."""
    wrapper = LightningOptimizer if base is raytrainer.LightningModule else \
        __import__("pytorch_lightning").core.optimizer.LightningOptimizer

    def one(o: Any) -> tuple[str, str]:
        kind = "wrapped" if isinstance(o, wrapper) else "raw" if type(o) is torch.optim.SGD else type(o).__name__
        inner = o.optimizer if isinstance(o, wrapper) else o
        return kind, type(inner).__name__

    if isinstance(x, list):
        return ["list", len(x), [one(o) for o in x]]
    return ["single", one(x)]


def describe_schedulers(x: Any) -> Any:
    if x is None:
        return None
    if isinstance(x, list):
        return ["list", [type(s).__name__ for s in x]]
    return ["single", type(x).__name__]


def toggle_probe(base: type, record: dict[str, Any]) -> Any:
    """Two optimizers sharing a parameter, one frozen parameter and one in no optimizer."""

    class Toggle(base):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.a = nn.Parameter(torch.ones(2))        # optimizer 0 only
            self.b = nn.Parameter(torch.ones(2))        # optimizer 1 only
            self.shared = nn.Parameter(torch.ones(2))   # both optimizers
            self.frozen = nn.Parameter(torch.ones(2), requires_grad=False)  # optimizer 1, frozen by the user
            self.free = nn.Parameter(torch.ones(2))     # no optimizer

        def flags(self) -> dict[str, bool]:
            return {n: p.requires_grad for n, p in self.named_parameters()}

        def training_step(self, batch: Any, batch_idx: int) -> None:
            opt0, opt1 = self.optimizers()
            record["before"] = self.flags()
            self.toggle_optimizer(opt0)
            record["toggled0"] = self.flags()
            self.untoggle_optimizer(opt0)
            record["untoggled0"] = self.flags()
            with self.toggled_optimizer(opt1):
                record["toggled1"] = self.flags()
                opt1.zero_grad()
                self.manual_backward((self.a * self.b * self.shared).sum())
                record["grads"] = {n: p.grad is not None for n, p in self.named_parameters()}
                opt1.step()
            record["after_context"] = self.flags()
            try:
                with self.toggled_optimizer(opt0):
                    raise KeyError("boom")
            except KeyError:
                record["after_exception"] = self.flags()

        def configure_optimizers(self) -> Any:
            return [torch.optim.SGD([self.a, self.shared], lr=0.1),
                    torch.optim.SGD([self.b, self.shared, self.frozen], lr=0.1)]

    return Toggle()


class GanBody:
    """The example's GAN step without the toggles or logging, usable on either framework (a mixin)."""

    def __init__(self, latent_dim: int = 8, hidden: int = 32) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.latent_dim = latent_dim
        self.generator = gan.Generator(latent_dim, hidden)
        self.discriminator = gan.Discriminator(hidden)
        self.steps_seen: list[int] = []

    def training_step(self, batch: Any, batch_idx: int) -> None:
        (real,) = batch
        opt_a, opt_b = self.optimizers(use_pl_optimizer=True)
        self.steps_seen.append(self.global_step)
        fake = self.generator(torch.randn(real.shape[0], self.latent_dim))
        loss_a = nn.functional.softplus(-self.discriminator(fake)).mean()
        opt_a.zero_grad()
        self.manual_backward(loss_a)
        opt_a.step()
        loss_b = nn.functional.softplus(-self.discriminator(real)).mean() + \
            nn.functional.softplus(self.discriminator(fake.detach())).mean()
        opt_b.zero_grad()
        self.manual_backward(loss_b)
        opt_b.step()

    def configure_optimizers(self) -> Any:
        return [torch.optim.Adam(self.generator.parameters(), lr=1e-3),
                torch.optim.Adam(self.discriminator.parameters(), lr=1e-3)]


@pytest.fixture(scope="module")
def lightning_reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run the probes under pytorch_lightning once and return what it observed."""
    pl = pytest.importorskip("pytorch_lightning")
    tmp = tmp_path_factory.mktemp("pl")
    out: dict[str, Any] = {}
    for n in (1, 2, 3):
        rec: dict[str, Any] = {}
        pl_fit(optimizers_probe(pl.LightningModule, n, rec), tiny_loader(), tmp, max_epochs=1, limit_train_batches=1)
        out[f"optimizers_{n}"] = {k: v for k, v in rec.items() if k != "configured"}
    rec = {}
    pl_fit(toggle_probe(pl.LightningModule, rec), tiny_loader(), tmp, max_epochs=1, limit_train_batches=1)
    out["toggle"] = rec
    module = type("PLGan", (GanBody, pl.LightningModule), {})()
    trainer = pl_fit(module, tiny_loader(n=12, dim=64), tmp, max_epochs=2)
    out["gan_epochs"] = (trainer.global_step, module.steps_seen)
    module = type("PLGan", (GanBody, pl.LightningModule), {})()
    trainer = pl_fit(module, tiny_loader(n=12, dim=64), tmp, max_steps=5)
    out["gan_max_steps"] = (trainer.global_step, module.steps_seen)
    module = type("PLGan", (LoggingGan, pl.LightningModule), {})()
    trainer = pl_fit(module, tiny_loader(n=12, dim=64), tmp, max_epochs=2, log_every_n_steps=2,
                     logger=pl.loggers.CSVLogger(str(tmp / "pl_csv")))
    out["csv_rows"] = csv_rows(trainer.log_dir)
    return out


class LoggingGan(GanBody):
    """GanBody that also logs a value per batch, on step and on epoch."""

    def training_step(self, batch: Any, batch_idx: int) -> None:
        super().training_step(batch, batch_idx)
        self.log("seen", float(batch_idx), on_step=True, on_epoch=True)


def csv_rows(log_dir: str) -> list[tuple[str, str, str]]:
    import csv

    with open(os.path.join(log_dir, "metrics.csv")) as f:
        return [(r["step"], r["seen_step"], r["seen_epoch"]) for r in csv.DictReader(f)]


# ---------------------------------------------------------------------------------- GAN example
def gan_reference_loop(model: Any, loader: DataLoader, epochs: int) -> list[tuple[float, float]]:
    """The example's training_step written as a plain PyTorch loop; returns (g_loss, d_loss) per batch."""
    opt_a, opt_b = model.configure_optimizers()
    bce = nn.functional.binary_cross_entropy_with_logits
    h = model.hparams
    losses = []
    for _ in range(epochs):
        for (real,) in loader:
            z = torch.randn(real.shape[0], h.latent_dim)
            fake = model.generator(z)
            loss_a = bce(model.discriminator(fake), torch.ones(real.shape[0], 1))
            opt_a.zero_grad()
            loss_a.backward()
            opt_a.step()
            loss_b = 0.5 * (bce(model.discriminator(real), torch.full((real.shape[0], 1), h.real_label))
                            + bce(model.discriminator(fake.detach()), torch.zeros(real.shape[0], 1)))
            opt_b.zero_grad()
            loss_b.backward()
            opt_b.step()
            losses.append((loss_a.item(), loss_b.item()))
    return losses


def test_gan_example_matches_plain_pytorch_bitwise(tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = gan.DigitsGAN(latent_dim=8, hidden=32)
    reference = copy.deepcopy(model)
    initial = copy.deepcopy(model.state_dict())
    epochs, batch = 2, 32
    loader = digits_loader(320, batch)

    torch.manual_seed(1)
    trainer = quiet_trainer(tmp_path, max_epochs=epochs, deterministic=True, log_every_n_steps=1,
                            logger=raytrainer.loggers.CSVLogger(str(tmp_path)))
    trainer.fit(model, loader)

    torch.manual_seed(1)
    losses = gan_reference_loop(reference, loader, epochs)

    batches = epochs * (320 // batch)
    assert trainer.global_step == 2 * batches
    assert trainer.current_epoch == epochs
    trained, expected = model.state_dict(), reference.state_dict()
    assert trained.keys() == expected.keys()
    for name in expected:
        assert not torch.equal(expected[name], initial[name]), f"{name} did not train"
        assert torch.equal(trained[name], expected[name]), f"{name} differs from the plain PyTorch loop"
    metrics = trainer.callback_metrics
    assert float(metrics["g_loss_step"]) == losses[-1][0]
    assert float(metrics["d_loss_step"]) == losses[-1][1]
    mean_last_epoch = sum(d for _, d in losses[-batches // epochs:]) / (batches // epochs)
    assert float(metrics["d_loss_epoch"]) == pytest.approx(mean_last_epoch, rel=1e-5)
    # both losses reach the logger: the step rows of metrics.csv carry g_loss_step and d_loss_step
    with open(os.path.join(trainer.log_dir, "metrics.csv")) as f:
        header = f.readline()
    assert "g_loss_step" in header and "d_loss_step" in header


def test_gan_resumes_from_a_checkpoint_bitwise(tmp_path: Any) -> None:
    """Both optimizers' states, global_step (2 per batch) and the RNG come back from the checkpoint."""
    torch.manual_seed(0)
    straight = gan.DigitsGAN(latent_dim=8, hidden=32)
    first_half = copy.deepcopy(straight)
    torch.manual_seed(1)
    quiet_trainer(tmp_path / "straight", max_epochs=2).fit(straight, digits_loader(256, 32))

    torch.manual_seed(1)
    trainer = quiet_trainer(tmp_path / "resumed", max_epochs=1, enable_checkpointing=True)
    trainer.fit(first_half, digits_loader(256, 32))
    ckpt = trainer.checkpoint_callback.best_model_path
    assert torch.load(ckpt, weights_only=False)["global_step"] == 16
    assert len(torch.load(ckpt, weights_only=False)["optimizer_states"]) == 2

    torch.manual_seed(0)
    resumed = gan.DigitsGAN(latent_dim=8, hidden=32)
    torch.manual_seed(123)  # the checkpoint's RNG state must win over whatever the process has
    trainer = quiet_trainer(tmp_path / "resumed", max_epochs=2, enable_checkpointing=True)
    trainer.fit(resumed, digits_loader(256, 32), ckpt_path=ckpt)
    assert trainer.global_step == 32
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs after resuming"


def test_gan_example_bf16_mixed_trains_with_finite_losses(tmp_path: Any) -> None:
    dtypes: list[torch.dtype] = []

    class Probe(gan.DigitsGAN):
        def training_step(self, batch: Any, batch_idx: int) -> None:
            dtypes.append(self.generator(self.sample_noise(2)).dtype)
            super().training_step(batch, batch_idx)

    torch.manual_seed(0)
    model = Probe(latent_dim=8, hidden=32)
    before = copy.deepcopy(model.state_dict())
    trainer = quiet_trainer(tmp_path, max_epochs=2, precision="bf16-mixed", logger=None, log_every_n_steps=1)
    trainer.fit(model, digits_loader(256, 32))
    assert set(dtypes) == {torch.bfloat16}, "training_step did not run under bf16 autocast"
    assert trainer.global_step == 2 * 2 * 8
    for key in ("g_loss_step", "d_loss_step", "g_loss_epoch", "d_loss_epoch"):
        assert math.isfinite(float(trainer.callback_metrics[key])), key
    after = model.state_dict()
    for name, p in after.items():
        assert p.dtype == torch.float32 and bool(torch.isfinite(p).all()), name
        assert not torch.equal(p, before[name]), f"{name} did not train"


def test_gan_example_script_writes_png(tmp_path: Any, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):   # seed_everything sets them; restore afterwards
        monkeypatch.delenv(var, raising=False)
    num_threads = torch.get_num_threads()
    try:
        gan.main(["--max_epochs", "1", "--hidden", "16", "--no_progress_bar",
                  "--default_root_dir", str(tmp_path), "--out", str(tmp_path / "grid.png")])
    finally:
        torch.set_num_threads(num_threads)
    out = capsys.readouterr().out
    png = tmp_path / "grid.png"
    assert f"samples: {png}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "optimizer steps (global_step): 56" in out  # 1797 // 64 = 28 batches, 2 steps each


# ------------------------------------------------------------------------- optimizers(), like Lightning
@pytest.mark.parametrize("n_opts", [1, 2, 3])
def test_optimizers_shape_matches_lightning(n_opts: int, tmp_path: Any, lightning_reference: dict) -> None:
    rec: dict[str, Any] = {}
    quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=1).fit(
        optimizers_probe(raytrainer.LightningModule, n_opts, rec), tiny_loader())
    expected = lightning_reference[f"optimizers_{n_opts}"]
    assert rec["wrapped"] == expected["wrapped"]
    assert rec["raw"] == expected["raw"]
    assert rec["schedulers"] == expected["schedulers"]
    # use_pl_optimizer=False hands back the very objects configure_optimizers returned
    assert rec["raw_is_configured"] == [True] * n_opts == expected["raw_is_configured"]
    if n_opts == 1:
        assert rec["wrapped"] == ["single", ("wrapped", "SGD")]
        assert rec["raw"] == ["single", ("raw", "SGD")]
    else:
        assert rec["wrapped"] == ["list", n_opts, [("wrapped", "SGD")] * n_opts]


def test_lightning_optimizer_exposes_the_wrapped_optimizer(tmp_path: Any) -> None:
    seen: dict[str, Any] = {}

    class M(raytrainer.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.layer = nn.Linear(4, 1)

        def training_step(self, batch: Any, batch_idx: int) -> None:
            opt = self.optimizers()
            seen["defaults_lr"] = opt.defaults["lr"]
            seen["param_groups_same"] = opt.param_groups is opt.optimizer.param_groups
            seen["raw_type"] = type(opt.optimizer)

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=0.25)

    quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=1).fit(M(), tiny_loader())
    assert seen == {"defaults_lr": 0.25, "param_groups_same": True, "raw_type": torch.optim.Adam}


# ---------------------------------------------------------------------------------- global_step
def test_global_step_counts_each_optimizer_step_like_lightning(tmp_path: Any, lightning_reference: dict) -> None:
    module = type("RTGan", (GanBody, raytrainer.LightningModule), {})()
    trainer = quiet_trainer(tmp_path, max_epochs=2)
    trainer.fit(module, tiny_loader(n=12, dim=64))
    assert (trainer.global_step, module.steps_seen) == lightning_reference["gan_epochs"]
    assert trainer.global_step == 2 * 2 * 6
    assert module.steps_seen == list(range(0, 24, 2))


def test_max_steps_counts_optimizer_steps_like_lightning(tmp_path: Any, lightning_reference: dict) -> None:
    module = type("RTGan", (GanBody, raytrainer.LightningModule), {})()
    trainer = quiet_trainer(tmp_path, max_steps=5)
    trainer.fit(module, tiny_loader(n=12, dim=64))
    # the check runs after each batch, so the third batch (steps 5 and 6) still completes, as in Lightning
    assert (trainer.global_step, module.steps_seen) == lightning_reference["gan_max_steps"] == (6, [0, 2, 4])


def test_logged_steps_match_lightning(tmp_path: Any, lightning_reference: dict) -> None:
    """Under manual optimization the logger's step counts batches, not optimizer steps, as in Lightning."""
    module = type("RTGan", (LoggingGan, raytrainer.LightningModule), {})()
    trainer = quiet_trainer(tmp_path, max_epochs=2, log_every_n_steps=2,
                            logger=raytrainer.loggers.CSVLogger(str(tmp_path)))
    trainer.fit(module, tiny_loader(n=12, dim=64))
    rows = csv_rows(trainer.log_dir)
    assert rows == lightning_reference["csv_rows"]
    assert [r[0] for r in rows] == ["1", "3", "5", "5", "7", "9", "11", "11"]


# ------------------------------------------------------------------------------------- toggling
def test_toggle_sets_requires_grad_like_lightning(tmp_path: Any, lightning_reference: dict) -> None:
    rec: dict[str, Any] = {}
    quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=1).fit(
        toggle_probe(raytrainer.LightningModule, rec), tiny_loader())
    assert rec == lightning_reference["toggle"]
    everything = {"a": True, "b": True, "shared": True, "frozen": False, "free": True}
    assert rec["before"] == everything
    # optimizer 0 owns a and shared: b (only in optimizer 1) is frozen; the shared one stays trainable;
    # a user-frozen parameter stays frozen; a parameter of no optimizer is left alone
    assert rec["toggled0"] == {"a": True, "b": False, "shared": True, "frozen": False, "free": True}
    assert rec["toggled1"] == {"a": False, "b": True, "shared": True, "frozen": False, "free": True}
    assert rec["untoggled0"] == rec["after_context"] == rec["after_exception"] == everything
    # a took part in the loss but, frozen while optimizer 1 was toggled, got no gradient
    assert rec["grads"] == {"a": False, "b": True, "shared": True, "frozen": False, "free": False}


# ------------------------------------------------------------------------------------- schedulers
def test_user_stepped_schedulers_change_the_lr(tmp_path: Any) -> None:
    lrs: list[tuple[float, float]] = []

    class M(raytrainer.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.g = nn.Linear(4, 1)
            self.d = nn.Linear(4, 1)

        def training_step(self, batch: Any, batch_idx: int) -> None:
            (x,) = batch
            opt_g, opt_d = self.optimizers()
            for layer, opt in ((self.g, opt_g), (self.d, opt_d)):
                opt.zero_grad()
                self.manual_backward(layer(x).pow(2).mean())
                opt.step()
            sched_g, sched_d = self.lr_schedulers()
            sched_g.step()                        # every batch
            if batch_idx == 3:
                sched_d.step()                    # once per epoch, by hand
            lrs.append((opt_g.param_groups[0]["lr"], opt_d.param_groups[0]["lr"]))

        def configure_optimizers(self) -> Any:
            opt_g = torch.optim.SGD(self.g.parameters(), lr=1.0)
            opt_d = torch.optim.SGD(self.d.parameters(), lr=1.0)
            # an 'epoch' interval that the Trainer must NOT step under manual optimization
            return [opt_g, opt_d], [torch.optim.lr_scheduler.StepLR(opt_g, step_size=2, gamma=0.5),
                                    {"scheduler": torch.optim.lr_scheduler.ExponentialLR(opt_d, gamma=0.1),
                                     "interval": "epoch"}]

    trainer = quiet_trainer(tmp_path, max_epochs=2)
    trainer.fit(M(), tiny_loader(n=8, batch_size=2))
    assert [g for g, _ in lrs] == [1.0, 0.5, 0.5, 0.25, 0.25, 0.125, 0.125, 0.0625]
    assert [round(d, 10) for _, d in lrs] == [1.0, 1.0, 1.0, 0.1, 0.1, 0.1, 0.1, 0.01]
    assert trainer.global_step == 16


# ------------------------------------------------------------------------------- step(closure)
def test_step_with_closure_runs_it_then_the_hook(tmp_path: Any) -> None:
    events: list[str] = []
    results: dict[str, Any] = {}

    class M(raytrainer.LightningModule):
        def __init__(self, optimizer: str) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.layer = nn.Linear(4, 1)
            self.kind = optimizer

        def training_step(self, batch: Any, batch_idx: int) -> None:
            (x,) = batch
            opt = self.optimizers()

            def closure() -> torch.Tensor:
                events.append("closure")
                opt.zero_grad()
                loss = self.layer(x).pow(2).mean()
                self.manual_backward(loss)
                return loss

            results["returned"] = opt.step(closure=closure)
            events.append("stepped")

        def on_before_optimizer_step(self, optimizer: Any) -> None:
            events.append("hook:" + ("grads" if self.layer.weight.grad is not None else "no grads"))

        def configure_optimizers(self) -> Any:
            if self.kind == "lbfgs":
                return torch.optim.LBFGS(self.parameters(), lr=0.1, max_iter=3)
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=1)
    model = M("sgd")
    w0 = model.layer.weight.detach().clone()
    trainer.fit(model, tiny_loader())
    assert events == ["closure", "hook:grads", "stepped"]
    assert isinstance(results["returned"], torch.Tensor) and results["returned"].ndim == 0
    assert not torch.equal(model.layer.weight, w0)
    assert trainer.global_step == 1

    events.clear()
    trainer = quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=1)
    trainer.fit(M("lbfgs"), tiny_loader())
    # LBFGS evaluates the closure several times; the hook follows every evaluation, the step counts once
    assert events.count("closure") == 3 and events[-1] == "stepped"
    assert events[:-1] == ["closure", "hook:grads"] * 3
    assert trainer.global_step == 1


def test_step_rejects_a_non_callable_closure(tmp_path: Any) -> None:
    class M(raytrainer.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.layer = nn.Linear(4, 1)

        def training_step(self, batch: Any, batch_idx: int) -> None:
            self.optimizers().step(closure=1.0)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(TypeError, match="callable closure"):
        quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=1).fit(M(), tiny_loader())


# ---------------------------------------------------------------------------------- clipping
class ClipProbe(raytrainer.LightningModule):
    """One big-gradient step, clipped by hand with self.clip_gradients before opt.step()."""

    def __init__(self, clip_val: float, algorithm: str | None) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.layer = nn.Linear(4, 3)
        self.clip_val, self.algorithm = clip_val, algorithm
        self.before: list[torch.Tensor] = []
        self.after: list[torch.Tensor] = []

    def training_step(self, batch: Any, batch_idx: int) -> None:
        (x,) = batch
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(100.0 * self.layer(x).pow(2).sum())
        self.before = [p.grad.clone() for p in self.layer.parameters()]
        self.clip_gradients(opt, gradient_clip_val=self.clip_val, gradient_clip_algorithm=self.algorithm)
        self.after = [p.grad.clone() for p in self.layer.parameters()]
        opt.step()

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _norm(grads: list[torch.Tensor]) -> float:
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


@pytest.mark.parametrize("algorithm", [None, "norm"])
def test_clip_gradients_by_norm(tmp_path: Any, algorithm: str | None) -> None:
    model = ClipProbe(0.5, algorithm)
    quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=1).fit(model, tiny_loader())
    assert _norm(model.before) > 10
    assert _norm(model.after) == pytest.approx(0.5, rel=1e-4)
    scale = _norm(model.after) / _norm(model.before)
    for b, a in zip(model.before, model.after):   # same direction, shrunk
        torch.testing.assert_close(a, b * scale, rtol=1e-4, atol=1e-7)


def test_clip_gradients_by_value(tmp_path: Any) -> None:
    model = ClipProbe(0.5, "value")
    quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=1).fit(model, tiny_loader())
    assert max(float(g.abs().max()) for g in model.before) > 10
    for b, a in zip(model.before, model.after):
        assert torch.equal(a, b.clamp(-0.5, 0.5))


def test_clip_gradients_bad_algorithm(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="'norm' or 'value'"):
        quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=1).fit(ClipProbe(0.5, "max"), tiny_loader())


# ---------------------------------------------------------------------------------- refusals
def test_gradient_clip_val_is_refused_under_manual_optimization(tmp_path: Any) -> None:
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"gradient_clip_val.*manual optimization.*self\.clip_gradients"):
        quiet_trainer(tmp_path, max_epochs=1, gradient_clip_val=1.0).fit(gan.DigitsGAN(hidden=8),
                                                                         digits_loader(64, 32))
    # 0 means "no clipping", which Lightning accepts with manual optimization
    trainer = quiet_trainer(tmp_path, max_epochs=1, gradient_clip_val=0)
    trainer.fit(gan.DigitsGAN(hidden=8), digits_loader(64, 32))
    assert trainer.global_step == 4


def test_accumulate_grad_batches_is_refused_under_manual_optimization(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match=r"accumulate_grad_batches.*manual optimization"):
        quiet_trainer(tmp_path, max_epochs=1, accumulate_grad_batches=2).fit(gan.DigitsGAN(hidden=8),
                                                                             digits_loader(64, 32))


def test_manual_backward_under_automatic_optimization_errors(tmp_path: Any) -> None:
    class Auto(raytrainer.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(4, 1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = self.layer(batch[0]).sum()
            self.manual_backward(loss)
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(RuntimeError, match=r"automatic_optimization = False"):
        quiet_trainer(tmp_path, max_epochs=1).fit(Auto(), tiny_loader())


def test_several_optimizers_need_manual_optimization(tmp_path: Any) -> None:
    class Two(GanBody, raytrainer.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = True

    with pytest.raises(ValueError, match=r"automatic_optimization = False"):
        quiet_trainer(tmp_path, max_epochs=1).fit(Two(), tiny_loader(dim=64))


def test_optimizers_outside_a_run_errors() -> None:
    with pytest.raises(RuntimeError, match="Trainer"):
        gan.DigitsGAN(hidden=8).optimizers()


def test_optimizers_when_configure_optimizers_returned_none(tmp_path: Any) -> None:
    class NoOpt(raytrainer.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.layer = nn.Linear(4, 1)

        def training_step(self, batch: Any, batch_idx: int) -> None:
            self.optimizers()

        def configure_optimizers(self) -> None:
            return None

    with pytest.raises(RuntimeError, match="configure_optimizers returned None"):
        quiet_trainer(tmp_path, max_epochs=1).fit(NoOpt(), tiny_loader())


# ---------------------------------------------------------------------------------- loss scaling
class ScalerProbe(raytrainer.LightningModule):
    """Records gradients after manual_backward (scaled) and in on_before_optimizer_step (unscaled)."""

    def __init__(self, clip_val: float | None) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.layer = nn.Linear(4, 3)
        self.clip_val = clip_val
        self.seen: dict[str, torch.Tensor] = {}

    def setup(self, stage: str) -> None:
        # 16-mixed needs CUDA; a real GradScaler enabled on CPU drives the same code path here.
        self.trainer.precision_plugin.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        (x,) = batch
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(self.layer(x).float().pow(2).mean())
        self.seen["after_backward"] = self.layer.weight.grad.clone()
        if self.clip_val is not None:
            self.clip_gradients(opt, gradient_clip_val=self.clip_val, gradient_clip_algorithm="norm")
        self.seen["weight_before"] = self.layer.weight.detach().clone()
        opt.step()

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        self.seen["in_hook"] = self.layer.weight.grad.clone()

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.5)


def test_loss_scaling_unscales_before_the_hook_and_the_step(tmp_path: Any) -> None:
    model = ScalerProbe(clip_val=None)
    trainer = quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=1, precision="bf16-mixed")
    trainer.fit(model, tiny_loader())
    seen = model.seen
    assert float(seen["after_backward"].abs().max()) > 0
    assert torch.equal(seen["after_backward"], seen["in_hook"] * 1024.0)     # scaled by 1024, then unscaled
    torch.testing.assert_close(model.layer.weight.detach(), seen["weight_before"] - 0.5 * seen["in_hook"])
    assert trainer.global_step == 1


def test_clip_gradients_with_loss_scaling_clips_real_gradients_once(tmp_path: Any) -> None:
    model = ScalerProbe(clip_val=1e-3)
    quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=1, precision="bf16-mixed").fit(model, tiny_loader())
    grads = [p.grad for p in model.layer.parameters()]
    assert _norm([model.seen["after_backward"] / 1024.0]) > 1e-2
    # clipped to 1e-3 in real units, not unscaled a second time in step()
    assert _norm(grads) == pytest.approx(1e-3, rel=1e-3)
    torch.testing.assert_close(model.layer.weight.detach(), model.seen["weight_before"] - 0.5 * model.seen["in_hook"])
