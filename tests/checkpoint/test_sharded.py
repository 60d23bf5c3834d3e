"""Sharded (DCP directory) checkpoints: resharding round trips over real gloo processes, crash safety, manifests,
consolidation, and Lightning's layout both ways."""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from raytrainer.checkpoint import sharded

HERE = os.path.dirname(os.path.abspath(__file__))


def _model(world: int = 1, seed: int = 0) -> nn.Module:
    """The test model, initialised from ``seed``, sharded with FSDP2 over ``world`` ranks (plain when 1)."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 10), nn.Tanh(), nn.Linear(10, 3))
    if world > 1:
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
    return model


def _trained(world: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model sharded with FSDP2 over ``world`` ranks (plain when 1) and Adam after 3 steps on fixed data."""
    model = _model(world)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return model, opt


def _fresh(world: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A differently initialised copy (sharded over ``world``) with Adam state from one step on other data."""
    model = _model(world, seed=123)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    model(torch.ones(2, 6)).sum().backward()
    opt.step()
    return model, opt


def _full(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state, on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))


def _worker(rank: int, world: int, port: int, fn_name: str, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        globals()[fn_name](rank, world, *args)
        dist.barrier()  # no rank tears its gloo group down while another still uses it
    finally:
        dist.destroy_process_group()


def _spawn(world: int, fn_name: str, *args) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(world, port, fn_name, args), nprocs=world, start_method="spawn")


def _save(rank: int, world: int, path: str, ref: str) -> None:
    model, opt = _trained(world)
    sharded.save_sharded(path, model, [opt], {"epoch": 3, "hyper_parameters": {"h": 1}, "writer_world": world})
    msd, osd = _full(model, opt)
    if rank == 0:
        torch.save({"model": msd, "optim": osd}, ref)


def _load(rank: int, world: int, path: str, ref: str) -> None:
    model, opt = _fresh(world)
    meta = sharded.load_sharded(path, model, [opt])
    assert meta["epoch"] == 3 and meta["hyper_parameters"] == {"h": 1}
    msd, osd = _full(model, opt)
    expected = torch.load(ref)
    _assert_equal(msd, expected["model"])
    _assert_equal(osd, expected["optim"])


def _assert_equal(a, b) -> None:
    if isinstance(a, dict):
        assert set(a) == set(b), (sorted(a), sorted(b))
        for k in a:
            _assert_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_equal(x, y)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a.cpu(), b.cpu())
    else:
        assert a == b


@pytest.mark.slow
@pytest.mark.parametrize(("writers", "readers"), [(4, 2), (2, 3), (2, 1)])
def test_resharding_round_trip(tmp_path: Path, writers: int, readers: int) -> None:
    path, ref = str(tmp_path / "epoch=0-step=3.ckpt"), str(tmp_path / "ref.pt")
    _spawn(writers, "_save", path, ref)
    assert sharded.is_sharded_checkpoint(path)
    assert sorted(os.listdir(tmp_path)) == ["epoch=0-step=3.ckpt", "ref.pt"]  # no staging directory left
    sharded.verify_sharded(path)
    if readers == 1:  # one plain process, no process group
        _load(0, 1, path, ref)
    else:
        _spawn(readers, "_load", path, ref)


def _plain_checkpoint(path: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    model, opt = _trained(1)
    sharded.save_sharded(path, model, [opt], {"epoch": 1, "global_step": 3, "hyper_parameters": {}})
    return model, opt


def test_manifest_detects_corrupted_and_missing_shard(tmp_path: Path) -> None:
    path = str(tmp_path / "a.ckpt")
    _plain_checkpoint(path)
    manifest = sharded.read_manifest(path)
    assert {".metadata", "meta.pt"} <= set(manifest["files"]) and any(n.endswith(".distcp") for n in manifest["files"])
    shard = next(p for p in Path(path).iterdir() if p.suffix == ".distcp")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(sharded.ShardedCheckpointError, match="sha256"):
        sharded.load_sharded(path, _fresh(1)[0])
    shard.write_bytes(bytes(data[:-5]))
    with pytest.raises(sharded.ShardedCheckpointError, match="bytes but the manifest"):
        sharded.verify_sharded(path, checksums=False)
    shard.unlink()
    with pytest.raises(sharded.ShardedCheckpointError, match="missing"):
        sharded.consolidate(path)


def test_interrupted_save_leaves_no_directory_and_last_skips_it(tmp_path: Path) -> None:
    from raytrainer.checkpoint.resolve import newest_checkpoint

    good = str(tmp_path / "epoch=0-step=3.ckpt")
    _plain_checkpoint(good)
    model, opt = _trained(1)
    # interrupt a later save after the shards were written, before meta/manifest/rename
    real = sharded._write_manifest

    def crash(path: str) -> None:
        raise KeyboardInterrupt("killed")

    sharded._write_manifest = crash
    try:
        with pytest.raises(KeyboardInterrupt):
            sharded.save_sharded(str(tmp_path / "epoch=1-step=6.ckpt"), model, [opt], {"epoch": 2})
    finally:
        sharded._write_manifest = real
    assert not (tmp_path / "epoch=1-step=6.ckpt").exists()
    assert (tmp_path / ".epoch=1-step=6.ckpt.tmp-sharded").is_dir()
    # a complete-looking directory whose shard is damaged is skipped too
    broken = tmp_path / "epoch=2-step=9.ckpt"
    sharded.save_sharded(str(broken), model, [opt], {"epoch": 3})
    (broken / "meta.pt").write_bytes(b"garbage")
    candidates = [str(p) for p in tmp_path.iterdir() if p.name.endswith(".ckpt")]
    path, skipped = newest_checkpoint(candidates)
    assert path == good
    assert [s[0] for s in skipped] == [str(broken)]
    # the next save of the interrupted name replaces the leftover staging directory
    sharded.save_sharded(str(tmp_path / "epoch=1-step=6.ckpt"), model, [opt], {"epoch": 2})
    assert not (tmp_path / ".epoch=1-step=6.ckpt.tmp-sharded").exists()
    sharded.verify_sharded(str(tmp_path / "epoch=1-step=6.ckpt"))


def test_overwrite_and_remove(tmp_path: Path) -> None:
    path = str(tmp_path / "last.ckpt")
    _plain_checkpoint(path)
    model, opt = _trained(1)
    sharded.save_sharded(path, model, [opt], {"epoch": 7})
    assert sharded.read_meta(path)["epoch"] == 7
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt"]
    sharded.remove_sharded(path)
    assert os.listdir(tmp_path) == []


def test_consolidate_matches_weights_and_optimizer_resumes(tmp_path: Path) -> None:
    path = str(tmp_path / "a.ckpt")
    model, opt = _plain_checkpoint(path)
    ckpt = sharded.consolidate(path)
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == 3
    _assert_equal(ckpt["state_dict"], model.state_dict())
    fresh = _model()
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.05)
    fresh_opt.load_state_dict(ckpt["optimizer_states"][0])  # torch's index-keyed layout
    _assert_equal(fresh_opt.state_dict(), opt.state_dict())


def test_lightning_reads_ours_and_we_read_lightnings(tmp_path: Path) -> None:
    pytest.importorskip("lightning_fabric")
    from lightning_fabric.strategies.fsdp import _distributed_checkpoint_save
    from lightning_fabric.utilities.load import _load_distributed_checkpoint
    from pytorch_lightning.utilities.consolidate_checkpoint import _format_checkpoint

    ours = tmp_path / "ours.ckpt"
    model, opt = _plain_checkpoint(str(ours))
    theirs = _format_checkpoint(_load_distributed_checkpoint(ours))
    _assert_equal(theirs["state_dict"], model.state_dict())
    assert theirs["epoch"] == 1
    # Lightning's FSDPStrategy.save_checkpoint layout: DCP {"model", "optimizer_0"} + meta.pt from rank 0
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    lightning_dir = tmp_path / "lightning.ckpt"
    lightning_dir.mkdir()
    _distributed_checkpoint_save({"model": get_model_state_dict(model),
                                  "optimizer_0": get_optimizer_state_dict(model, opt)}, lightning_dir)
    torch.save({"epoch": 4, "global_step": 9, "hyper_parameters": {}}, lightning_dir / "meta.pt")
    fresh, fresh_opt = _fresh(1)
    meta = sharded.load_sharded(str(lightning_dir), fresh, [fresh_opt])
    assert meta["epoch"] == 4
    _assert_equal(fresh.state_dict(), model.state_dict())
    _assert_equal(fresh_opt.state_dict(), opt.state_dict())
    assert sharded.consolidate(str(lightning_dir))["global_step"] == 9


def test_lightning_consolidate_cli_reads_ours(tmp_path: Path) -> None:
    import subprocess

    pytest.importorskip("pytorch_lightning")
    path = tmp_path / "ours.ckpt"
    model, _ = _plain_checkpoint(str(path))
    out = tmp_path / "out.pt"
    subprocess.run([sys.executable, "-m", "pytorch_lightning.utilities.consolidate_checkpoint", str(path),
                    "--output_file", str(out)], check=True, timeout=120, capture_output=True)
    _assert_equal(torch.load(out)["state_dict"], model.state_dict())


def test_refuses_bad_meta(tmp_path: Path) -> None:
    model, opt = _trained(1)
    with pytest.raises(ValueError, match="must not hold 'state_dict'"):
        sharded.save_sharded(str(tmp_path / "x"), model, [opt], {"state_dict": {}})
    path = str(tmp_path / "w.ckpt")
    sharded.save_sharded(path, model, [], {})
    with pytest.raises(sharded.ShardedCheckpointError, match="optimizer_0"):
        sharded.load_sharded(path, model, [opt])


@pytest.mark.slow
def test_object_store_directories_reshard_verify_and_rotate(s3_server, tmp_path: Path) -> None:
    """On S3 (a local moto server): 2 ranks upload their shards, rank 0 the manifest last; 3 ranks and one plain
    process load it resharded; a missing manifest makes it incomplete, a changed shard is caught, remove deletes."""
    uri = f"{s3_server['uri']}/run/epoch=0-step=3.ckpt"
    ref = str(tmp_path / "ref.pt")
    _spawn(2, "_save", uri, ref)
    assert sharded.is_sharded_checkpoint(uri) and sharded.is_directory(uri)
    assert sharded.list_sharded(f"{s3_server['uri']}/run", ".ckpt") == [uri]
    sharded.verify_sharded(uri)
    assert sharded.read_meta(uri)["writer_world"] == 2
    _spawn(3, "_load", uri, ref)
    _load(0, 1, uri, ref)
    assert sharded.consolidate(uri)["epoch"] == 3
    client, bucket = s3_server["client"], s3_server["bucket"]
    # a shard replaced by bytes of the same size: the size check passes, the checksum on read does not
    key = "run/epoch=0-step=3.ckpt/__1_0.distcp"
    body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    client.put_object(Bucket=bucket, Key=key, Body=bytes(len(body)))
    with pytest.raises(sharded.ShardedCheckpointError, match="does not match its manifest"):
        _load(0, 1, uri, ref)
    client.delete_object(Bucket=bucket, Key="run/epoch=0-step=3.ckpt/" + sharded.MANIFEST_FILE)
    assert not sharded.is_sharded_checkpoint(uri)  # the manifest is written last: without it, incomplete
    sharded.remove_sharded(uri)
    assert not sharded.is_directory(uri)


def test_object_store_async_save_with_a_copy(s3_server) -> None:
    """One process, asynchronous: the call returns after the host copy; wait() publishes it and its copy."""
    model, opt = _trained(1)
    uri, last = f"{s3_server['uri']}/a/epoch=0-step=1.ckpt", f"{s3_server['uri']}/a/last.ckpt"
    pending = sharded.save_sharded(uri, model, [opt], {"epoch": 0}, async_group=None, copies=[last])
    pending.wait(120)
    for target in (uri, last):
        fresh, fresh_opt = _fresh(1)
        sharded.load_sharded(target, fresh, [fresh_opt])
        _assert_equal(_full(fresh, fresh_opt), _full(model, opt))
