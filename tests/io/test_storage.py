"""Tests for raytrainer.io.storage on the real local filesystem and a real (moto) S3 server."""
from __future__ import annotations

import collections
import fractions
import json
import multiprocessing
import os
import pickle
import random
import select
import signal
import subprocess
import sys
import time

import pyarrow.fs as pafs
import pytest
import torch

from raytrainer.io import storage
from raytrainer.io.storage import CheckpointCorruptError


def _ckpt(version: int, n: int = 1000) -> dict:
    """A small Lightning-shaped checkpoint whose content is determined by ``version``."""
    gen = torch.Generator().manual_seed(version)
    return {
        "epoch": version,
        "global_step": 10 * version,
        "state_dict": collections.OrderedDict(
            [("layer.weight", torch.randn(n, generator=gen)), ("layer.bias", torch.full((3,), float(version)))]
        ),
        "optimizer_states": [{"state": {0: {"step": torch.tensor(float(version))}},
                              "param_groups": [{"lr": 0.1, "params": [0]}]}],
        "hyper_parameters": {"name": "demo", "sizes": [1, 2, 3]},
    }


def _assert_same(a, b) -> None:
    """Deep equality for nested checkpoint structures holding tensors."""
    assert type(a) is type(b) or (isinstance(a, dict) and isinstance(b, dict)), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


def _tmp_leftovers(directory) -> list[str]:
    """Temporary files that interrupted writes left in ``directory``."""
    return [n for n in os.listdir(directory) if n.startswith(".") and ".tmp-" in n]


# ------------------------------------------------------------------------------------------
# Local round trip, verification and errors
# ------------------------------------------------------------------------------------------

def test_local_round_trip_writes_manifest_and_lists_only_checkpoints(tmp_path):
    path = str(tmp_path / "epoch=1.ckpt")
    ckpt = _ckpt(1)
    storage.save(ckpt, path)

    _assert_same(storage.load(path), ckpt)
    raw = open(path, "rb").read()
    manifest = json.loads(open(path + storage.MANIFEST_SUFFIX).read())
    assert manifest["size"] == len(raw)
    assert manifest["sha256"] == __import__("hashlib").sha256(raw).hexdigest()
    assert manifest["format_version"] == 1 and "previous" not in manifest
    assert storage.read_verified(path) == raw

    # overwrite: the new content wins and the manifest is clean again
    storage.save(_ckpt(2), path)
    assert storage.load(path)["epoch"] == 2
    assert "previous" not in json.loads(open(path + storage.MANIFEST_SUFFIX).read())

    storage.save(_ckpt(10), str(tmp_path / "epoch=10.ckpt"))
    storage.save(_ckpt(9), str(tmp_path / "epoch=9.ckpt"))
    (tmp_path / ".hidden").write_text("x")
    (tmp_path / ".epoch=3.ckpt.tmp-deadbeef").write_text("partial")
    (tmp_path / "subdir").mkdir()
    assert storage.listdir(str(tmp_path)) == [str(tmp_path / n) for n in
                                              ("epoch=1.ckpt", "epoch=9.ckpt", "epoch=10.ckpt")]
    assert storage.exists(path) and storage.exists(str(tmp_path))

    storage.remove(path)
    assert not storage.exists(path)
    assert not os.path.exists(path + storage.MANIFEST_SUFFIX)
    with pytest.raises(FileNotFoundError, match="epoch=1.ckpt"):
        storage.remove(path)
    storage.remove(path, missing_ok=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        storage.listdir(str(tmp_path / "nope"))
    assert storage.listdir(str(tmp_path / "nope"), missing_ok=True) == []


def test_write_without_manifest_for_log_files(tmp_path):
    path = str(tmp_path / "metrics.csv")
    storage.write_bytes_atomic(path, b"step,loss\n0,1.0\n")
    assert os.path.exists(path + storage.MANIFEST_SUFFIX)
    storage.write_bytes_atomic(path, b"step,loss\n0,1.0\n1,0.5\n", manifest=False)
    assert sorted(os.listdir(tmp_path)) == ["metrics.csv"]  # the stale manifest went too
    assert storage.read_verified(path) == b"step,loss\n0,1.0\n1,0.5\n"


def test_truncated_file_is_reported_with_size(tmp_path):
    path = str(tmp_path / "last.ckpt")
    storage.save(_ckpt(1), path)
    size = os.path.getsize(path)
    os.truncate(path, size // 2)
    with pytest.raises(CheckpointCorruptError, match=r"last\.ckpt.*size is \d+ bytes but the manifest records"):
        storage.read_verified(path)
    with pytest.raises(CheckpointCorruptError, match="last.ckpt"):
        storage.load(path)


def test_flipped_byte_is_reported_with_checksum(tmp_path):
    path = str(tmp_path / "last.ckpt")
    storage.save(_ckpt(1), path)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(CheckpointCorruptError, match=r"last\.ckpt.*sha256 is [0-9a-f]{64} but the manifest records"):
        storage.load(path)


def test_missing_file_and_orphan_manifest(tmp_path):
    path = str(tmp_path / "gone.ckpt")
    with pytest.raises(FileNotFoundError, match=r"gone\.ckpt does not exist$"):
        storage.load(path)
    storage.save(_ckpt(1), path)
    os.unlink(path)
    with pytest.raises(FileNotFoundError, match="write to it was interrupted"):
        storage.read_verified(path)


def test_malformed_manifest_is_reported(tmp_path):
    path = str(tmp_path / "m.ckpt")
    storage.save(_ckpt(1), path)
    open(path + storage.MANIFEST_SUFFIX, "w").write("{not json")
    with pytest.raises(CheckpointCorruptError, match=r"m\.ckpt\.manifest\.json is not valid JSON"):
        storage.read_verified(path)
    # a new save replaces the damaged manifest
    storage.save(_ckpt(2), path)
    assert storage.load(path)["epoch"] == 2


def test_non_checkpoint_files_give_clear_errors(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("this is not a checkpoint\n")
    with pytest.raises(CheckpointCorruptError, match=r"notes\.txt is not a torch checkpoint archive"):
        storage.load(str(text))

    tensor_file = tmp_path / "tensor.pt"
    torch.save(torch.ones(3), tensor_file)
    with pytest.raises(CheckpointCorruptError, match=r"tensor\.pt holds a Tensor, not a checkpoint dict"):
        storage.load(str(tensor_file))

    with pytest.raises(TypeError, match="checkpoint dicts"):
        storage.save([1, 2], str(tmp_path / "list.ckpt"))


def test_weights_only_refusal_names_file_and_escape_hatch(tmp_path):
    path = str(tmp_path / "hp.ckpt")
    storage.save({"hyper_parameters": {"ratio": fractions.Fraction(1, 3)}}, path)
    with pytest.raises(pickle.UnpicklingError, match=r"hp\.ckpt.*weights_only=False"):
        storage.load(path)
    assert storage.load(path, weights_only=False)["hyper_parameters"]["ratio"] == fractions.Fraction(1, 3)


def test_file_from_another_tool_without_manifest_is_accepted(tmp_path):
    path = tmp_path / "lightning.ckpt"
    ckpt = _ckpt(4)
    torch.save(ckpt, path)  # what Lightning does: no manifest
    _assert_same(storage.load(str(path)), ckpt)


def test_bad_targets_are_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="makedirs"):
        storage.save(_ckpt(1), str(tmp_path / "missing_dir" / "a.ckpt"))
    with pytest.raises(ValueError, match="reserved"):
        storage.save(_ckpt(1), str(tmp_path / ("a.ckpt" + storage.MANIFEST_SUFFIX)))
    with pytest.raises(ValueError, match="names a directory"):
        storage.save(_ckpt(1), str(tmp_path) + "/")
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError, match="existing directory"):
        storage.save(_ckpt(1), str(tmp_path / "d"))
    storage.makedirs(str(tmp_path / "x" / "y"))
    storage.save(_ckpt(1), str(tmp_path / "x" / "y" / "a.ckpt"))
    storage.makedirs(str(tmp_path / "x" / "y"))  # existing is fine


# ------------------------------------------------------------------------------------------
# Crashes in the middle of a write
# ------------------------------------------------------------------------------------------

def _save_then_die(path: str, version: int, die_at_replace: int) -> None:
    """Child process: save, but SIGKILL ourselves right before the N-th os.replace of the write."""
    real_replace = os.replace
    calls = [0]

    def replace(src, dst):
        calls[0] += 1
        if calls[0] == die_at_replace:
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)

    os.replace = replace
    storage.save(_ckpt(version), path)
    os._exit(3)  # not reached when the kill point lies inside the write


def _run_crashing_save(path: str, version: int, die_at_replace: int) -> None:
    """Run ``_save_then_die`` in a forked process and check that it really was killed."""
    proc = multiprocessing.get_context("fork").Process(target=_save_then_die, args=(path, version, die_at_replace))
    proc.start()
    proc.join(timeout=60)
    assert proc.exitcode == -signal.SIGKILL, f"child did not die inside the write (exit code {proc.exitcode})"


# os.replace calls of an overwrite: 1 manifest (listing the old content), 2 data, 3 final manifest.
@pytest.mark.parametrize("die_at, expected, window_manifest", [
    (1, 1, False),  # before anything became visible: old data, old manifest
    (2, 1, True),   # manifest lists old and new content, data still old
    (3, 2, True),   # data new, manifest still lists both
])
def test_crash_while_overwriting_leaves_a_verifiable_checkpoint(tmp_path, die_at, expected, window_manifest):
    path = str(tmp_path / "last.ckpt")
    storage.save(_ckpt(1), path)
    _run_crashing_save(path, 2, die_at)

    manifest = json.loads(open(path + storage.MANIFEST_SUFFIX).read())
    assert ("previous" in manifest) == window_manifest
    _assert_same(storage.load(path), _ckpt(expected))
    assert _tmp_leftovers(tmp_path), "the crash should have left a temporary file behind"

    storage.save(_ckpt(3), path)  # the next write works and sweeps the leftovers
    _assert_same(storage.load(path), _ckpt(3))
    assert _tmp_leftovers(tmp_path) == []
    assert "previous" not in json.loads(open(path + storage.MANIFEST_SUFFIX).read())


@pytest.mark.parametrize("die_at, message", [(1, r"does not exist$"), (2, "write to it was interrupted")])
def test_crash_during_first_write_leaves_no_checkpoint(tmp_path, die_at, message):
    path = str(tmp_path / "first.ckpt")
    _run_crashing_save(path, 1, die_at)
    with pytest.raises(FileNotFoundError, match=message):
        storage.load(path)
    assert storage.listdir(str(tmp_path)) == []


_BIG_SAVER = r"""
import sys, time, torch
from raytrainer.io import storage
path = sys.argv[1]
write = storage.write_bytes_atomic

def traced_write(uri, data, **kwargs):  # report when the byte-writing phase starts and how long it took
    print(f"writing {version}", flush=True)
    start = time.monotonic()
    write(uri, data, **kwargs)
    print(f"saved {version} {time.monotonic() - start:.3f}", flush=True)

storage.write_bytes_atomic = traced_write
weights = torch.empty(50_000_000)  # 200 MB of float32
version = 0
while True:
    weights.fill_(float(version))
    storage.save({"version": version, "weights": weights}, path)
    version += 1
"""


def _read_line(proc: subprocess.Popen, timeout: float) -> list[str]:
    """One stdout line of ``proc`` split into words, failing the test after ``timeout`` seconds."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no output from the saving process within {timeout}s"
    return proc.stdout.readline().decode().split()


@pytest.mark.slow
def test_sigkill_during_large_save_keeps_previous_checkpoint(tmp_path):
    path = str(tmp_path / "big.ckpt")
    proc = subprocess.Popen([sys.executable, "-c", _BIG_SAVER, path], stdout=subprocess.PIPE, bufsize=0)
    try:
        assert _read_line(proc, 120) == ["writing", "0"]
        saved = _read_line(proc, 60)
        assert saved[:2] == ["saved", "0"], saved
        assert _read_line(proc, 60) == ["writing", "1"]
        kill_after = random.uniform(0.0, float(saved[2]))  # inside the second write's byte-writing phase
        time.sleep(kill_after)
    finally:
        proc.send_signal(signal.SIGKILL)
        rest = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode == -signal.SIGKILL
    completed = "saved 1" in rest

    ckpt = storage.load(path)
    assert ckpt["version"] in ((1,) if completed else (0, 1)), \
        f"killed {kill_after:.3f}s into a {saved[2]}s write; loaded version {ckpt['version']}"
    assert bool((ckpt["weights"] == float(ckpt["version"])).all()), "checkpoint content is a mix of two saves"
    del ckpt

    storage.save({"version": -1}, path)
    assert storage.load(path) == {"version": -1}
    assert _tmp_leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------
# Choosing the newest valid checkpoint
# ------------------------------------------------------------------------------------------

def _set_mtime(path, t: float) -> None:
    """Give ``path`` a modification time, so 'newest' does not depend on clock resolution."""
    os.utime(path, (t, t))


def test_newest_valid_skips_corrupt_and_missing_files(tmp_path):
    paths = [str(tmp_path / f"step={i}.ckpt") for i in (1, 2, 3)]
    for i, p in enumerate(paths, start=1):
        storage.save(_ckpt(i), p)
        _set_mtime(p, 1_000_000 + i)
    os.truncate(paths[2], 100)  # newest is damaged
    garbage = tmp_path / "step=4.ckpt"  # newer still, no manifest, not a checkpoint
    garbage.write_bytes(b"PK\x03\x04 definitely not complete")
    _set_mtime(garbage, 1_000_010)
    missing = str(tmp_path / "step=5.ckpt")

    best, skipped = storage.newest_valid(paths + [str(garbage), missing])
    assert best == paths[1]
    reasons = dict(skipped)
    assert set(reasons) == {paths[2], str(garbage), missing}
    assert "size is 100 bytes" in reasons[paths[2]]
    assert "not a torch checkpoint archive" in reasons[str(garbage)]
    assert reasons[missing] == "does not exist"
    _assert_same(storage.load(best), _ckpt(2))

    assert storage.newest_valid([paths[2], missing]) == (None, [(missing, "does not exist"),
                                                               (paths[2], reasons[paths[2]])])


def test_newest_valid_accepts_foreign_files_and_breaks_ties_by_natural_name(tmp_path):
    a, b = tmp_path / "step=9.ckpt", tmp_path / "step=10.ckpt"
    storage.save(_ckpt(9), str(a))
    torch.save(_ckpt(10), b)  # written by another tool
    for p in (a, b):
        _set_mtime(p, 2_000_000)
    assert storage.newest_valid([str(a), str(b)]) == (str(b), [])

    # a torch archive without manifest whose tensor bytes were damaged fails the zip CRC check
    data = bytearray(b.read_bytes())
    data[data.find(b"data/0") + 200] ^= 0xFF
    b.write_bytes(bytes(data))
    best, skipped = storage.newest_valid([str(a), str(b)])
    assert best == str(a)
    assert skipped[0][0] == str(b) and "torch" in skipped[0][1]


# ------------------------------------------------------------------------------------------
# Paths, URIs and filesystems
# ------------------------------------------------------------------------------------------

def test_join_and_resolve(tmp_path, monkeypatch):
    assert storage.join("/a/b", "c", "d.ckpt") == "/a/b/c/d.ckpt"
    assert storage.join("s3://bkt", "run", "x.ckpt") == "s3://bkt/run/x.ckpt"
    assert storage.join("s3://bkt/run/", "x.ckpt") == "s3://bkt/run/x.ckpt"
    assert (storage.join("s3://bkt/run?endpoint_override=h:1&scheme=http", "x.ckpt")
            == "s3://bkt/run/x.ckpt?endpoint_override=h:1&scheme=http")
    with pytest.raises(ValueError, match="relative"):
        storage.join("s3://bkt/run", "/abs")

    monkeypatch.chdir(tmp_path)
    fs, path = storage.resolve("rel/x.ckpt")
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "rel" / "x.ckpt")
    fs, path = storage.resolve(f"file://{tmp_path}/y.ckpt")
    assert isinstance(fs, pafs.LocalFileSystem) and path == f"{tmp_path}/y.ckpt"
    fs, path = storage.resolve("s3://bkt/run/x.ckpt", filesystem=pafs.LocalFileSystem())
    assert path == "bkt/run/x.ckpt"
    with pytest.raises(ValueError, match="non-empty"):
        storage.resolve("")


def test_registered_filesystem_uses_temp_file_and_move(tmp_path):
    """A non-local, non-object-store filesystem goes through the generic stage-then-move path."""
    subtree = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    storage.register_filesystem("s3://virtual-bucket/", subtree)
    try:
        fs, path = storage.resolve("s3://virtual-bucket/run/a.ckpt")
        assert fs is subtree and path == "virtual-bucket/run/a.ckpt"
        storage.makedirs("s3://virtual-bucket/run")
        storage.save(_ckpt(1), "s3://virtual-bucket/run/a.ckpt")
        storage.save(_ckpt(2), "s3://virtual-bucket/run/a.ckpt")
        _assert_same(storage.load("s3://virtual-bucket/run/a.ckpt"), _ckpt(2))
        on_disk = tmp_path / "virtual-bucket" / "run"
        assert sorted(os.listdir(on_disk)) == ["a.ckpt", "a.ckpt.manifest.json"]
        assert storage.listdir("s3://virtual-bucket/run") == ["s3://virtual-bucket/run/a.ckpt"]
    finally:
        storage.unregister_filesystem("s3://virtual-bucket/")


# ------------------------------------------------------------------------------------------
# S3 (moto server)
# ------------------------------------------------------------------------------------------

def test_s3_round_trip_manifest_listdir_and_corruption(s3_server):
    base = storage.join(s3_server["uri"], "run", "checkpoints")
    fs, path = storage.resolve(base)
    assert isinstance(fs, pafs.S3FileSystem) and path == f"{s3_server['bucket']}/run/checkpoints"
    storage.makedirs(base)

    uri = storage.join(base, "epoch=0-step=10.ckpt")
    storage.save(_ckpt(1), uri)
    storage.save(_ckpt(2), storage.join(base, "epoch=1-step=20.ckpt"))
    storage.save(_ckpt(3), uri)  # overwrite exercises the "previous content" manifest
    _assert_same(storage.load(uri), _ckpt(3))

    client, bucket = s3_server["client"], s3_server["bucket"]
    key = "run/checkpoints/epoch=0-step=10.ckpt"
    body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    manifest = json.loads(client.get_object(Bucket=bucket, Key=key + storage.MANIFEST_SUFFIX)["Body"].read())
    assert manifest["size"] == len(body) and "previous" not in manifest

    assert storage.listdir(base) == [storage.join(base, "epoch=0-step=10.ckpt"),
                                     storage.join(base, "epoch=1-step=20.ckpt")]
    assert storage.exists(uri) and not storage.exists(storage.join(base, "nope.ckpt"))

    flipped = bytearray(body)
    flipped[len(flipped) // 2] ^= 0x01
    client.put_object(Bucket=bucket, Key=key, Body=bytes(flipped))
    with pytest.raises(CheckpointCorruptError, match=r"epoch=0-step=10\.ckpt.*sha256"):
        storage.load(uri)
    client.put_object(Bucket=bucket, Key=key, Body=body[:-10])
    with pytest.raises(CheckpointCorruptError, match="size is"):
        storage.read_verified(uri)

    best, skipped = storage.newest_valid(storage.listdir(base))
    assert best == storage.join(base, "epoch=1-step=20.ckpt")
    assert all(bad == uri and "size is" in reason for bad, reason in skipped)  # skipped unless mtimes tie

    storage.remove(uri)
    listed = client.list_objects_v2(Bucket=bucket, Prefix="run/checkpoints/")
    assert sorted(o["Key"] for o in listed["Contents"]) == ["run/checkpoints/", "run/checkpoints/epoch=1-step=20.ckpt",
                                                            "run/checkpoints/epoch=1-step=20.ckpt.manifest.json"]


def test_s3_explicit_filesystem(s3_server):
    fs = s3_server["filesystem"]
    uri = f"s3://{s3_server['bucket']}/explicit/last.ckpt"
    storage.save(_ckpt(5), uri, filesystem=fs)
    _assert_same(storage.load(uri, filesystem=fs), _ckpt(5))
    assert storage.listdir(f"s3://{s3_server['bucket']}/explicit", filesystem=fs) == [uri]


def test_s3_endpoint_from_standard_aws_variable(s3_server, monkeypatch):
    monkeypatch.delenv("RAYTRAINER_S3_ENDPOINT")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server["endpoint"])
    uri = f"s3://{s3_server['bucket']}/aws-env/last.ckpt"
    storage.save(_ckpt(6), uri)
    _assert_same(storage.load(uri), _ckpt(6))
    monkeypatch.setenv("RAYTRAINER_S3_ENDPOINT", "ftp://nowhere")
    with pytest.raises(ValueError, match="must look like 'http://host:port'"):
        storage.resolve(uri)


def test_register_filesystem_rejects_bad_input():
    with pytest.raises(ValueError, match="URI prefix"):
        storage.register_filesystem("/local/path", pafs.LocalFileSystem())
    with pytest.raises(TypeError, match="pyarrow.fs.FileSystem"):
        storage.register_filesystem("s3://", object())
    with pytest.raises(ValueError, match="cannot map abfs://"):
        storage.register_filesystem("abfs://container/", pafs.LocalFileSystem())


def test_a_flipped_bit_in_a_checkpoint_without_manifest_is_caught(tmp_path):
    """A .ckpt copied without its manifest (or written by another tool): one flipped bit in a weight is caught by
    the zip members' CRC on every load path, instead of loading a wrong weight."""
    from raytrainer.checkpoint.resolve import read_checkpoint

    weight = torch.full((256,), -0.177)
    path = tmp_path / "copied.ckpt"
    torch.save({"state_dict": {"w": weight}, "global_step": 3}, path)  # torch.save: no manifest
    assert storage.load(str(path))["global_step"] == 3
    raw = bytearray(path.read_bytes())
    at = raw.find(weight.numpy().tobytes()[:64])
    assert at > 0
    raw[at + 130] ^= 0x40  # one bit of one float
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointCorruptError, match="CRC mismatch"):
        storage.load(str(path))
    with pytest.raises(CheckpointCorruptError, match="copied.ckpt"):
        read_checkpoint(str(path))
