"""ParquetDataset on real Parquet files: sharding, shuffling, exact resume without re-reading, elastic re-splits,
object stores, and Trainer runs that resume bitwise."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import raytrainer as pl
from raytrainer.data import ParquetDataset
from raytrainer.data.parquet import _split


class Counting(ParquetDataset):
    """Counts the rows it reads from the files (the unit of reading is a row group)."""

    rows_read = 0

    def _read_group(self, file, group):
        Counting.rows_read += group.rows
        return super()._read_group(file, group)


def ids(ds) -> list[np.ndarray]:
    return [b["id"].numpy() for b in ds]


@pytest.fixture(scope="module")
def data(tmp_path_factory, parquet_writer):
    where = tmp_path_factory.mktemp("parquet")
    return str(where), parquet_writer(where)


def test_batches_columns_types_and_transform(data):
    path, n = data
    ds = ParquetDataset(path, batch_size=64, columns=["id", "x", "name"])
    batches = list(ds)
    assert len(batches) == len(ds) == -(-n // 64)
    assert set(batches[0]) == {"id", "x", "name"}
    assert batches[0]["x"].shape == (64, 8) and batches[0]["x"].dtype == torch.float32
    assert batches[0]["name"][:2] == ["r0", "r1"]
    assert np.array_equal(np.concatenate(ids(batches)), np.arange(n))  # dataset order without shuffle
    pairs = list(ParquetDataset(path, batch_size=10, transform=lambda b: (b["x"], b["y"])))
    assert torch.allclose(pairs[0][0].sum(1), pairs[0][1])
    assert len(list(DataLoader(ParquetDataset(path, batch_size=100), batch_size=None))) == n // 100


@pytest.mark.parametrize("world, batch, drop_last", [(1, 64, False), (2, 7, False), (3, 64, False), (4, 1, False),
                                                     (3, 64, True), (5, 128, False)])
@pytest.mark.parametrize("shuffle", [False, True])
def test_ranks_split_every_row_once_with_equal_batch_counts(data, world, batch, drop_last, shuffle):
    path, n = data
    parts, counts = [], []
    for rank in range(world):
        ds = ParquetDataset(path, batch_size=batch, shuffle=shuffle, drop_last=drop_last, shuffle_buffer_size=300,
                            columns=["id"])
        ds.bind(rank, world)
        got = ids(ds)
        counts.append((len(got), len(ds)))
        parts += got
    assert len({c for c, _ in counts}) == 1 and all(c == k for c, k in counts), counts
    seen = np.concatenate(parts)
    assert len(seen) == len(set(seen.tolist()))
    assert len(seen) == (n if not drop_last else n // (world * batch) * world * batch)


def test_split_gives_every_rank_the_same_batch_count():
    for rows, world, batch in itertools.product(range(0, 60), range(1, 6), range(1, 9)):
        sizes, batches = _split(rows, world, batch, False)
        assert sum(sizes) == (rows if rows >= world else 0)
        for size in sizes:
            assert batches == 0 or (batches - 1) * batch < size <= batches * batch + 1


def test_shuffle_is_seeded_per_epoch(data):
    path, _ = data

    def order(seed, epoch):
        ds = ParquetDataset(path, batch_size=100, shuffle=True, seed=seed, shuffle_buffer_size=400, columns=["id"])
        ds.set_epoch(epoch)
        return np.concatenate(ids(ds))

    assert np.array_equal(order(0, 1), order(0, 1))
    assert not np.array_equal(order(0, 1), order(0, 2)) and not np.array_equal(order(0, 1), order(1, 1))
    assert sorted(order(0, 1).tolist()) == sorted(order(0, 2).tolist())


@pytest.mark.parametrize("shuffle", [False, True])
def test_resume_continues_the_plan_and_reads_at_most_one_window_before(data, shuffle):
    path, n = data
    kw = dict(batch_size=32, shuffle=shuffle, shuffle_buffer_size=200, columns=["id"])
    full = ParquetDataset(path, **kw)
    full.bind(1, 2)
    full.set_epoch(3)
    whole = ids(full)
    for at in (len(whole) // 10, len(whole) * 9 // 10):
        Counting.rows_read = 0
        ds = Counting(path, **kw)
        ds.bind(1, 2)
        ds.set_epoch(3)
        assert ds.start_at([[2, at, 32]]) == at  # this world's segment: continue at the saved batch
        rest = ids(ds)
        assert len(rest) == len(whole) - at and all(np.array_equal(a, b) for a, b in zip(rest, whole[at:]))
        rows_left = sum(len(b) for b in whole[at:])
        # no more than one row group and one window before the position are read again
        assert Counting.rows_read <= rows_left + 250 + 200 + 250, (at, Counting.rows_read, rows_left)


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("worlds", [(3, 2), (2, 3), (2, 1, 4)])
def test_resized_epoch_trains_every_row_once(data, shuffle, worlds):
    """Each world trains a third of what is left, then the next world takes over the rest of the epoch."""
    path, n = data
    kw = dict(batch_size=16, shuffle=shuffle, shuffle_buffer_size=300, columns=["id"])
    seen, segments = [], []
    for i, world in enumerate(worlds):
        done = None
        for rank in range(world):
            ds = ParquetDataset(path, **kw)
            ds.bind(rank, world)
            ds.set_epoch(2)
            ds.start_at(segments)
            stop = len(ds) // 3 if i < len(worlds) - 1 else len(ds)
            seen += list(itertools.islice(ids(ds), stop))
            done = stop
        segments = ds.segments_at(done)
    got = np.concatenate(seen)
    assert sorted(got.tolist()) == list(range(n))


def test_s3_reads_the_same_rows(s3_server, parquet_writer):
    uri = f"{s3_server['uri']}/table"
    n = parquet_writer(uri, n=600, files=2, row_group=100, filesystem=s3_server["filesystem"])
    ds = ParquetDataset(uri, batch_size=50, shuffle=True, columns=["id", "x"])
    ds.bind(0, 2)
    other = ParquetDataset(uri, batch_size=50, shuffle=True, columns=["id", "x"])
    other.bind(1, 2)
    got = np.concatenate(ids(ds) + ids(other))
    assert sorted(got.tolist()) == list(range(n))


def test_bad_input_is_named(data, tmp_path):
    path, _ = data
    with pytest.raises(ValueError, match=r"\['nope'\] not in the files"):
        len(ParquetDataset(path, columns=["id", "nope"]))
    with pytest.raises(FileNotFoundError, match="no Parquet files|cannot list"):
        len(ParquetDataset(str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="batch_size"):
        ParquetDataset(path, batch_size=0)
    with pytest.raises(ValueError, match="num_workers=2"):
        list(DataLoader(ParquetDataset(path), batch_size=None, num_workers=2))


class Model(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        self.seen: list[int] = []

    def training_step(self, batch, batch_idx):
        self.seen += batch["id"].tolist()
        noise = torch.randn(len(batch["y"]), 1) * 0.01  # uses the RNG: a resume must restore it
        return nn.functional.mse_loss(self.net(batch["x"]) + noise, batch["y"][:, None])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(root, data, wrap=False, **kw):
    pl.seed_everything(0)
    model = Model()
    ds = ParquetDataset(data, batch_size=64, shuffle=True, shuffle_buffer_size=500, columns=["id", "x", "y"])
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=2, deterministic=True, default_root_dir=str(root),
                         enable_progress_bar=False, enable_model_summary=False, logger=False,
                         **{k: v for k, v in kw.items() if k != "ckpt_path"})
    trainer.fit(model, DataLoader(ds, batch_size=None) if wrap else ds, ckpt_path=kw.get("ckpt_path"))
    return trainer, model


@pytest.mark.parametrize("wrap", [False, True], ids=["dataset", "dataloader"])
def test_fit_resumes_mid_epoch_bitwise(data, tmp_path, wrap):
    path, n = data
    _, ref = _fit(tmp_path / "ref", path, wrap)
    assert sorted(ref.seen) == sorted(list(range(n)) * 2)
    batches = -(-n // 64)
    first, _ = _fit(tmp_path / "run", path, wrap, max_steps=batches + batches * 9 // 10)  # 90% into epoch 1
    second, model = _fit(tmp_path / "run", path, wrap, ckpt_path=first.checkpoint_callback.last_model_path)
    assert second.global_step == 2 * batches
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    assert model.seen == ref.seen[len(ref.seen) - len(model.seen):]  # the rows after the position, nothing before


class CountingTensors(torch.utils.data.Dataset):
    """A map-style dataset that counts the samples it loads."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, generator=g)
        self.loads = 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        self.loads += 1
        x = self.x[i]
        return {"id": torch.tensor(i), "x": x, "y": x.sum()}


@pytest.mark.parametrize("workers, persistent", [(0, False), (1, False), (1, True)])
def test_map_style_resume_skips_at_the_sampler(tmp_path, workers, persistent):
    n, batch = 640, 16

    def fit(root, **kw):
        pl.seed_everything(0)
        model, data = Model(), CountingTensors(n)
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=2, deterministic=True,
                             default_root_dir=str(root), enable_progress_bar=False, enable_model_summary=False,
                             logger=False, **{k: v for k, v in kw.items() if k != "ckpt_path"})
        trainer.fit(model, DataLoader(data, batch_size=batch, shuffle=True, num_workers=workers,
                                      persistent_workers=persistent), ckpt_path=kw.get("ckpt_path"))
        return trainer, model, data

    _, ref, _ = fit(tmp_path / "ref")
    per_epoch = n // batch
    first, _, _ = fit(tmp_path / "run", max_steps=per_epoch + 36)  # 90% into epoch 1
    second, model, data = fit(tmp_path / "run", ckpt_path=first.checkpoint_callback.last_model_path)
    assert model.seen == ref.seen[len(ref.seen) - len(model.seen):]
    if workers == 0:  # loads happen in this process: only the 4 batches left are loaded
        assert data.loads == 4 * batch
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)


def test_resume_with_other_data_or_order_is_refused(data, tmp_path):
    path, n = data
    first, _ = _fit(tmp_path / "run", path, max_steps=10)
    pl.seed_everything(0)
    other = ParquetDataset(path, batch_size=64, shuffle=True, seed=1, shuffle_buffer_size=500,
                           columns=["id", "x", "y"])
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=2, default_root_dir=str(tmp_path / "run"),
                         enable_progress_bar=False, enable_model_summary=False, logger=False)
    with pytest.raises(ValueError, match="other data: its ParquetDataset had fingerprint"):
        trainer.fit(Model(), other, ckpt_path=first.checkpoint_callback.last_model_path)
