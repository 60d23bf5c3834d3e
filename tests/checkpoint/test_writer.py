"""Tests for raytrainer.checkpoint.writer: background checkpoint writes onto the real local filesystem."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from raytrainer.checkpoint.host_copy import to_host
from raytrainer.checkpoint.writer import AsyncCheckpointWriter
from raytrainer.io import storage


def test_async_writer_writes_staged_snapshots(tmp_path):
    weights = torch.zeros(10_000)
    with AsyncCheckpointWriter(max_pending=2) as writer:
        for step in range(5):
            weights.fill_(float(step))
            writer.submit({"step": step, "weights": weights}, str(tmp_path / f"step={step}.ckpt"))
            weights.add_(1000.0)  # training goes on right after submit
        writer.wait(timeout=60)
        assert writer.pending == 0
    for step in range(5):
        ckpt = storage.load(str(tmp_path / f"step={step}.ckpt"))
        assert ckpt["step"] == step and bool((ckpt["weights"] == step).all())
    with pytest.raises(RuntimeError, match="closed"):
        writer.submit({"step": 9}, str(tmp_path / "late.ckpt"))


def test_async_writer_surfaces_background_errors(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where a directory should be")
    bad = str(blocker / "step=1.ckpt")
    writer = AsyncCheckpointWriter()
    writer.submit({"step": 1, "w": torch.ones(3)}, bad)
    with pytest.raises(NotADirectoryError) as info:
        writer.wait(timeout=60)
    assert any(bad in note for note in info.value.__notes__)

    # the error was reported once; the writer keeps working
    good = str(tmp_path / "step=2.ckpt")
    writer.submit({"step": 2}, good)
    writer.wait(timeout=60)
    assert storage.load(good) == {"step": 2}

    # an error that nobody waited for is raised by the next submit
    writer.submit({"step": 3}, bad)
    deadline = time.monotonic() + 60
    while writer.pending and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(NotADirectoryError):
        writer.submit({"step": 4}, good)
    writer.close(timeout=60)


_EXIT_WITHOUT_CLOSE = r"""
import sys, torch
from raytrainer.checkpoint.writer import AsyncCheckpointWriter
writer = AsyncCheckpointWriter()
writer.submit({"version": 7, "weights": torch.arange(2_000_000)}, sys.argv[1])
# no wait() or close(): the interpreter must still finish the write before it exits
"""


def test_async_writer_finishes_queued_write_at_interpreter_exit(tmp_path):
    path = str(tmp_path / "exit.ckpt")
    done = subprocess.run([sys.executable, "-c", _EXIT_WITHOUT_CLOSE, path], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    ckpt = storage.load(path)
    assert ckpt["version"] == 7 and torch.equal(ckpt["weights"], torch.arange(2_000_000))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_to_host_and_async_writer_with_cuda_tensors(tmp_path):
    weight = torch.arange(1000, dtype=torch.float32, device="cuda")
    state = {"w": weight, "tied": weight, "step": torch.tensor(3, device="cuda")}
    staged = to_host(state)
    assert staged["w"].device.type == "cpu" and staged["w"] is staged["tied"]
    with AsyncCheckpointWriter() as writer:
        writer.submit(state, str(tmp_path / "cuda.ckpt"))
        weight.mul_(-1)  # training changes the GPU tensor right after submit
    loaded = storage.load(str(tmp_path / "cuda.ckpt"), map_location="cpu")
    assert torch.equal(loaded["w"], torch.arange(1000, dtype=torch.float32))
    assert torch.equal(staged["w"], torch.arange(1000, dtype=torch.float32))
