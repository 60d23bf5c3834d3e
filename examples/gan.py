"""A small GAN on scikit-learn's digits (8x8 images), trained by raytrainer with manual optimization.

    python examples/gan.py                                   # one CPU, in-process, ~15 s
    python examples/gan.py --precision bf16-mixed            # autocast to bfloat16
    python examples/gan.py --num_processes 2                 # 2 ranks on Ray; no find_unused_parameters
                                                             # needed: each manual_backward arms DDP
                                                             # for the parameters its loss reaches

The generator and the discriminator each have their own optimizer. ``training_step`` switches
automatic optimization off and steps both itself, as in Lightning:

    opt_a, opt_b = self.optimizers(use_pl_optimizer=True)
    loss_a = ...; opt_a.zero_grad(); self.manual_backward(loss_a); opt_a.step()
    loss_b = ...; opt_b.zero_grad(); self.manual_backward(loss_b); opt_b.step()

The Trainer still handles precision, devices, logging and checkpoints. Every optimizer step counts
as one global step, so one batch is two steps. At the end a PNG shows generated digits before and
after training next to real ones, and its path is printed.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import raytrainer as pl  # noqa: E402


def digits_tensor() -> torch.Tensor:
    """All 1797 digits as rows of 64 pixels scaled to [-1, 1] (the generator ends in tanh)."""
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().data, dtype=torch.float32)
    return x / 8.0 - 1.0


class Generator(nn.Module):
    """Noise vector -> 64 pixels in [-1, 1]."""

    def __init__(self, latent_dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(latent_dim, hidden), nn.LeakyReLU(0.2),
            nn.Linear(hidden, hidden), nn.LeakyReLU(0.2),
            nn.Linear(hidden, 64), nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class Discriminator(nn.Module):
    """64 pixels -> one logit: how real the image looks."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, hidden), nn.LeakyReLU(0.2),
            nn.Linear(hidden, hidden), nn.LeakyReLU(0.2),
            nn.Linear(hidden, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DigitsGAN(pl.LightningModule):
    """Generator (optimizer a) and discriminator (optimizer b), stepped by hand in training_step."""

    def __init__(self, latent_dim: int = 16, hidden: int = 128, lr: float = 1e-3,
                 real_label: float = 0.9) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.generator = Generator(latent_dim, hidden)
        self.discriminator = Discriminator(hidden)
        self.example_input_array = torch.zeros(1, latent_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Generated images for noise ``z``: what prediction and export return."""
        return self.generator(z)

    def sample_noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Standard normal noise for ``n`` images, on the module's device."""
        return torch.randn(n, self.hparams.latent_dim, generator=generator).to(self.device)

    def training_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> None:
        (real,) = batch
        opt_a, opt_b = self.optimizers(use_pl_optimizer=True)
        bce = nn.functional.binary_cross_entropy_with_logits
        z = self.sample_noise(real.shape[0])
        real_target = torch.full((real.shape[0], 1), self.hparams.real_label, device=self.device)
        fake_target = torch.zeros(real.shape[0], 1, device=self.device)

        # a: the generator tries to make the discriminator call its images real. Toggling freezes the
        # discriminator's parameters, so this backward computes no gradients for them.
        with self.toggled_optimizer(opt_a):
            fake = self.generator(z)
            loss_a = bce(self.discriminator(fake), torch.ones_like(real_target))
            opt_a.zero_grad()
            self.manual_backward(loss_a)
            opt_a.step()

        # b: the discriminator learns to tell real digits (one-sided label smoothing) from generated ones.
        with self.toggled_optimizer(opt_b):
            loss_b = 0.5 * (bce(self.discriminator(real), real_target)
                            + bce(self.discriminator(fake.detach()), fake_target))
            opt_b.zero_grad()
            self.manual_backward(loss_b)
            opt_b.step()

        self.log("g_loss", loss_a, prog_bar=True, on_step=True, on_epoch=True)
        self.log("d_loss", loss_b, prog_bar=True, on_step=True, on_epoch=True)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        lr = self.hparams.lr
        return [torch.optim.Adam(self.generator.parameters(), lr=lr, betas=(0.5, 0.999)),
                torch.optim.Adam(self.discriminator.parameters(), lr=lr, betas=(0.5, 0.999))]


def save_grid(path: str, panels: list[tuple[str, torch.Tensor]], rows: int = 8) -> str:
    """Write side-by-side grids of 8x8 digits (one panel per (title, images)) to a PNG; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6))
    for ax, (title, images) in zip(axes, panels):
        imgs = images[: rows * rows].detach().float().cpu().clamp(-1, 1).view(-1, 8, 8)
        canvas = torch.full((rows * 9 + 1, rows * 9 + 1), -1.0)
        for i, img in enumerate(imgs):
            r, c = divmod(i, rows)
            canvas[1 + r * 9: 1 + r * 9 + 8, 1 + c * 9: 1 + c * 9 + 8] = img
        ax.imshow(canvas.numpy(), cmap="gray_r", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return os.path.abspath(path)


def _count(value: str) -> str | int:
    return value if ":" in value or "," in value or value in ("auto", "-1") else int(value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max_epochs", type=int, default=60)
    p.add_argument("--max_steps", type=int, default=-1, help="optimizer steps; a batch takes two")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--latent_dim", type=int, default=16)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--devices", type=_count, default="auto")
    p.add_argument("--num_processes", type=_count, default=None)
    p.add_argument("--gpus", type=_count, default=None)
    p.add_argument("--tpu_cores", type=int, default=None)
    p.add_argument("--num_nodes", type=_count, default=1)
    p.add_argument("--strategy", default="auto")
    p.add_argument("--precision", default="32-true")
    p.add_argument("--default_root_dir", default=os.path.join(os.getcwd(), "runs", "gan"))
    p.add_argument("--ckpt_path", default=None, help='resume from a checkpoint path or "last"')
    p.add_argument("--max_failures", type=int, default=0)
    p.add_argument("--deterministic", action="store_true")
    p.add_argument("--no_progress_bar", action="store_true")
    p.add_argument("--num_threads", type=int, default=1,
                   help="torch CPU threads; these layers are too small to gain from more than one")
    p.add_argument("--out", default=None, help="PNG path (default: <default_root_dir>/gan_samples.png)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> pl.Trainer:
    args = parse_args(argv)
    torch.set_num_threads(args.num_threads)
    pl.seed_everything(args.seed, workers=True)
    model = DigitsGAN(latent_dim=args.latent_dim, hidden=args.hidden, lr=args.lr)
    data = digits_tensor()
    loader = DataLoader(TensorDataset(data), batch_size=args.batch_size, shuffle=True, drop_last=True)
    fixed_z = torch.randn(64, args.latent_dim, generator=torch.Generator().manual_seed(1234))
    with torch.no_grad():
        before = model.generator(fixed_z)

    trainer = pl.Trainer(
        max_epochs=args.max_epochs, max_steps=args.max_steps, accelerator=args.accelerator, devices=args.devices,
        num_processes=args.num_processes, gpus=args.gpus, tpu_cores=args.tpu_cores, num_nodes=args.num_nodes,
        strategy=args.strategy, precision=args.precision, default_root_dir=args.default_root_dir,
        max_failures=args.max_failures, deterministic=args.deterministic or None,
        enable_progress_bar=not args.no_progress_bar, log_every_n_steps=10,
    )
    trainer.fit(model, train_dataloaders=loader, ckpt_path=args.ckpt_path)

    model.eval()
    with torch.no_grad():
        after = model.generator(fixed_z.to(model.device))
    real = data[torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:64]]
    path = save_grid(args.out or os.path.join(args.default_root_dir, "gan_samples.png"),
                     [("generated, untrained", before), (f"generated, {trainer.current_epoch} epochs", after),
                      ("real digits", real)])
    metrics = trainer.callback_metrics
    print(f"world size: {trainer.world_size}, epochs: {trainer.current_epoch}, "
          f"optimizer steps (global_step): {trainer.global_step}")
    print(f"last epoch: g_loss {float(metrics.get('g_loss_epoch', float('nan'))):.4f}, "
          f"d_loss {float(metrics.get('d_loss_epoch', float('nan'))):.4f}")
    print(f"logs: {trainer.log_dir} (tensorboard --logdir {os.path.dirname(trainer.log_dir)})")
    print(f"samples: {path}")
    return trainer


if __name__ == "__main__":
    main()
