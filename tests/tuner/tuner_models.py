"""Tiny modules for the tuner tests, built on raytrainer's or Lightning's base classes (same code for both)."""
from __future__ import annotations

import os
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset


def regression_data(n: int = 256, seed: int = 0) -> TensorDataset:
    """y = sum(x) + noise: a loss that falls and then diverges as the learning rate grows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, x.sum(1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g))


def lr_module(base: type, hparams: bool = False, attr: str = "lr") -> Any:
    """A small MLP trained with SGD at ``self.<attr>`` (or ``self.hparams.<attr>`` with ``hparams``)."""

    class LRModel(base):
        def __init__(self, value: float = 0.01) -> None:
            super().__init__()
            if hparams:
                self.save_hyperparameters({attr: value})
            else:
                setattr(self, attr, value)
            self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

        def _lr(self) -> float:
            return self.hparams[attr] if hparams else getattr(self, attr)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self) -> Any:
            opt = torch.optim.SGD(self.parameters(), lr=self._lr(), momentum=0.9)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1)}

    return LRModel


def oom_module(base: type, limit: int = 23, batch_size: int | None = 4, n: int = 200, val: bool = False,
               oom_in: str = "training_step") -> Any:
    """A module whose ``oom_in`` step raises torch.OutOfMemoryError (CUDA's message) for batches larger than
    ``limit``: the exception a real out-of-memory raises, at a known size. Its loaders read ``self.batch_size``
    (or the datamodule's, when one is attached)."""

    class OOMModel(base):
        def __init__(self) -> None:
            super().__init__()
            if batch_size is not None:
                self.batch_size = batch_size
            self.net = torch.nn.Linear(4, 1)
            self.seen: list[tuple[str, int]] = []

        def _loader(self) -> DataLoader:
            return DataLoader(regression_data(n), batch_size=self.batch_size)

        def _check(self, fx: str, x: torch.Tensor) -> None:
            self.seen.append((fx, len(x)))
            if fx == oom_in and len(x) > limit:
                raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(x)} rows (test limit "
                                             f"{limit}).")

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            self._check("training_step", x)
            return torch.nn.functional.mse_loss(self.net(x), y)

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self._check("validation_step", batch[0])

        def test_step(self, batch: Any, batch_idx: int) -> None:
            self._check("test_step", batch[0])

        def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            self._check("predict_step", batch[0])
            return self.net(batch[0])

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.05)

    if batch_size is not None:  # else the datamodule's loaders are used
        OOMModel.train_dataloader = OOMModel._loader
        OOMModel.test_dataloader = OOMModel._loader
        OOMModel.predict_dataloader = OOMModel._loader
        if val:
            OOMModel.val_dataloader = OOMModel._loader
    if not val:
        del OOMModel.validation_step
    return OOMModel


def data_module(base: type, batch_size: int = 4, in_hparams: bool = False, n: int = 200) -> Any:
    """A datamodule holding the batch size (as an attribute, or in its hparams)."""

    class DM(base):
        def __init__(self) -> None:
            super().__init__()
            if in_hparams:
                self.save_hyperparameters({"batch_size": batch_size})
            else:
                self.batch_size = batch_size

        def _bs(self) -> int:
            return self.hparams["batch_size"] if in_hparams else self.batch_size

        def train_dataloader(self) -> DataLoader:
            return DataLoader(regression_data(n), batch_size=self._bs())

    return DM


def files_under(root: str) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its size and mtime: what a run wrote."""
    out = {}
    for d, _, names in os.walk(root):
        for name in names:
            p = os.path.join(d, name)
            st = os.stat(p)
            out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns)
    return out


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
