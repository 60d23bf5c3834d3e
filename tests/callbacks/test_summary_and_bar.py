"""ModelSummary(max_depth, **summarize_kwargs) and TQDMProgressBar(refresh_rate, process_position, leave), with
Lightning's argument order and meanings."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as rt
from raytrainer.callbacks import ModelSummary, TQDMProgressBar
from raytrainer.callbacks.model_summary import summary_rows


class Nested(rt.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        self.head = torch.nn.Linear(2, 1)

    def forward(self, x):
        return self.head(self.encoder(x))

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.mse_loss(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(12, 4), torch.randn(12, 1)), batch_size=4)


def test_max_depth_levels_and_lightning_names(L):
    model = Nested()
    assert [r[0] for r in summary_rows(model, 1)] == ["encoder", "head"]
    every = [r[0] for r in summary_rows(model, -1)]
    assert every == ["encoder", "encoder.0", "encoder.1", "encoder.2", "head"]
    # the same layer names and parameter counts as Lightning's summary at each depth
    from pytorch_lightning.utilities.model_summary import ModelSummary as LSummary

    class LitNested(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
            self.head = torch.nn.Linear(2, 1)

    lit = LitNested()
    for depth in (1, 2, -1):
        theirs = LSummary(lit, max_depth=depth)
        assert [(n, c) for n, _, c in summary_rows(model, depth)] == list(zip(theirs.layer_names,
                                                                             theirs.param_nums))
    with pytest.raises(ValueError, match="max_depth='2'"):
        ModelSummary(max_depth="2")


def test_summary_prints_every_level_and_keeps_summarize_kwargs(tmp_path, capsys):
    cb = ModelSummary(max_depth=-1, header_style="bold")
    assert cb._summarize_kwargs == {"header_style": "bold"}
    rt.Trainer(max_epochs=1, callbacks=[cb], enable_progress_bar=False, logger=False, enable_checkpointing=False,
               default_root_dir=str(tmp_path)).fit(Nested(), _loader())
    out = capsys.readouterr().out
    assert "encoder.2" in out and "Total params" in out


def test_tqdm_arguments_in_lightnings_order_and_process_position(tmp_path):
    bar = TQDMProgressBar(5, 2, True)  # Lightning's positional order: refresh_rate, process_position, leave
    assert (bar.refresh_rate, bar.process_position, bar.leave) == (5, 2, True)
    with pytest.raises(ValueError, match="process_position=-1"):
        TQDMProgressBar(process_position=-1)
    seen = []

    class Look(rt.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(abs(trainer.progress_bar_callback._bar.pos))

    rt.Trainer(max_epochs=1, callbacks=[TQDMProgressBar(process_position=2), Look()], logger=False,
               enable_checkpointing=False, enable_model_summary=False,
               default_root_dir=str(tmp_path)).fit(Nested(), _loader())
    assert seen == [4, 4, 4]  # the main bar of program 2 is drawn on line 2 * 2
