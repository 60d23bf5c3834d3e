"""TQDMProgressBar as a user sees it. A fit runs in a subprocess whose output goes to a pseudo-terminal (its bytes
are fed to the pyte terminal emulator, and the screen left is compared with Lightning's) or to a pipe (a log file:
plain lines, no redraws); on Ray the driver draws rank 0's events, with each epoch's exact count."""
from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time

import pytest

pyte = pytest.importorskip("pyte")

COLS, ROWS = 120, 30
EPOCHS, BATCHES = 3, 11  # batches per epoch (per rank on Ray)

# The same fit with raytrainer ("rt") or Lightning ("pl"): 3 epochs of 11 batches (each rank's share on Ray), a
# validation loader, `loss` and `val_loss` on the bar; both frameworks' info logging and warnings off.
FIT = '''
import logging
import sys
import warnings

warnings.filterwarnings("ignore")
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

framework, root, ranks = sys.argv[1], sys.argv[2], int(sys.argv[3])
if framework == "pl":
    import pytorch_lightning as fw
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
else:
    import raytrainer as fw
    logging.getLogger("raytrainer").setLevel(logging.ERROR)


class Net(fw.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


g = torch.Generator().manual_seed(0)
x, val_x = torch.randn(44 * ranks, 4, generator=g), torch.randn(12, 4, generator=g)
train = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)
val = DataLoader(TensorDataset(val_x, val_x.sum(1, keepdim=True)), batch_size=4)
torch.manual_seed(0)
extra = {"num_processes": ranks, "ray_address": "local"} if ranks > 1 else {}
trainer = fw.Trainer(max_epochs=3, logger=fw.loggers.CSVLogger(root), callbacks=[fw.callbacks.TQDMProgressBar()],
                     enable_checkpointing=False, enable_model_summary=False, default_root_dir=root,
                     accelerator="cpu", **extra)
trainer.fit(Net(), train, val)
'''

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_EPOCH = re.compile(r"Epoch (\d+):\s*(\d+)%\|([^|]*)\| (\d+)/(\d+) ")


def _run(tmp_path, framework: str, ranks: int, tty: bool) -> tuple[bytes, bytes]:
    """Run the fit; the bytes a terminal got (stdout and stderr together), or (stdout, stderr) through pipes."""
    script = tmp_path / "fit.py"
    script.write_text(FIT)
    root = tmp_path / f"{framework}{ranks}{'tty' if tty else 'pipe'}"
    args = [sys.executable, str(script), framework, str(root), str(ranks)]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "COLUMNS", "LINES", "TQDM_MINITERS")}
    if not tty:
        proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, timeout=120)
        assert proc.returncode == 0, proc.stderr.decode()[-3000:]
        return proc.stdout, proc.stderr
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLS, 0, 0))
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    out, deadline = bytearray(), time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                try:
                    data = os.read(master, 1 << 16)
                except OSError:  # every writer closed the terminal
                    break
                if not data:
                    break
                out += data
            elif proc.poll() is not None:
                break
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    assert proc.wait(timeout=30) == 0, bytes(out).decode(errors="replace")[-3000:]
    return bytes(out), b""


def _screen(raw: bytes) -> list[str]:
    """The lines a COLS x ROWS terminal shows at the end, empty ones dropped (a pty turns \\n into \\r\\n)."""
    screen = pyte.Screen(COLS, ROWS)
    pyte.ByteStream(screen).feed(raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
    return [line.rstrip() for line in screen.display if line.strip()]


def _normalised(line: str) -> str:
    """What differs between two runs of the same fit: times, speed, the bar's width (it fills what the speed
    leaves), the logger version."""
    line = re.sub(r"\d\d:\d\d(:\d\d)?", "T", line)
    line = re.sub(r"(\d+\.\d+|\?)it/s", "Rit/s", line)
    line = re.sub(r"\|[^|]*\|", "|BAR|", line, count=1)
    return re.sub(r"v_num=\w+", "v_num=V", line)


def _drawn_counts(text: str) -> dict[int, list[int]]:
    """Every count drawn for each epoch, in order (redraws split at \\r and \\n, escape sequences dropped)."""
    counts: dict[int, list[int]] = {}
    for piece in re.split(r"[\r\n]", _ANSI.sub("", text)):
        for m in _EPOCH.finditer(piece):
            assert int(m.group(5)) == BATCHES, piece
            counts.setdefault(int(m.group(1)), []).append(int(m.group(4)))
    return counts


def _check_counts(text: str) -> None:
    """Every epoch was drawn, reached exactly N/N and never more; counts only go up within an epoch."""
    counts = _drawn_counts(text)
    assert sorted(counts) == list(range(EPOCHS)), counts
    for epoch, seen in counts.items():
        assert seen[-1] == BATCHES and max(seen) == BATCHES, (epoch, seen)
        assert seen == sorted(seen), (epoch, seen)


def _final_line(line: str) -> None:
    """The last epoch's line: N/N, a full bar, the logger version, the training and validation metrics."""
    m = _EPOCH.search(line)
    assert m and m.group(1) == str(EPOCHS - 1) and m.group(2) == "100", line
    assert (int(m.group(4)), int(m.group(5))) == (BATCHES, BATCHES), line
    assert set(m.group(3)) == {"█"}, line
    assert re.search(r", v_num=\d+, loss=[\d.]+, val_loss=[\d.]+\]$", line), line


def test_terminal_screen_matches_lightning(tmp_path, L):
    """On a terminal the screen left after fit is Lightning's: the last epoch's bar with its metrics stays, the
    validation bar below it is cleared; each epoch's bar reached N/N."""
    ours, _ = _run(tmp_path, "rt", 1, tty=True)
    theirs, _ = _run(tmp_path, "pl", 1, tty=True)
    screen, lightning = _screen(ours), _screen(theirs)
    assert [_normalised(s) for s in screen] == [_normalised(s) for s in lightning], (screen, lightning)
    assert len(screen) == 1, screen
    _final_line(screen[0])
    _check_counts(ours.decode())


def test_log_file_gets_plain_lines(tmp_path):
    """stderr to a pipe (a log file): no redraws; per epoch a line at 25, 50 and 75 % and the epoch's line with
    its metrics; nothing for the sanity check and validation (their metrics are on the epoch's line)."""
    out, err = _run(tmp_path, "rt", 1, tty=False)
    text = err.decode()
    assert out == b"" and "\r" not in text and "\x1b" not in text, text
    lines = text.splitlines()
    assert [(m.group(1), m.group(4)) for m in map(_EPOCH.match, lines)] == \
        [(str(e), str(n)) for e in range(EPOCHS) for n in (3, 6, 9, BATCHES)], lines
    for epoch in range(EPOCHS):
        last = lines[4 * epoch + 3]
        assert re.search(r"\| 11/11 \[\d\d:\d\d<00:00, [\d.]+it/s, v_num=0, loss=[\d.]+, val_loss=[\d.]+\]$",
                         last), last
    _final_line(lines[-1])


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_ray_driver_draws_exact_counts(tmp_path):
    """2 Ray ranks, rank 0's bar drawn by the driver: on a terminal and in a log file every epoch reaches exactly
    N/N (N: batches per rank), never more, never stuck at 0, and the last epoch's line stays."""
    raw, _ = _run(tmp_path, "rt", 2, tty=True)
    _check_counts(raw.decode(errors="replace"))
    bars = [line for line in _screen(raw) if _EPOCH.search(line)]
    assert len(bars) == 1, _screen(raw)
    _final_line(bars[0])
    _, err = _run(tmp_path, "rt", 2, tty=False)
    text = err.decode()
    assert "\r" not in text, text
    _check_counts(text)
    lines = [line for line in text.splitlines() if _EPOCH.match(line)]
    ends = [line for line in lines if " 11/11 " in line]
    assert [_EPOCH.match(line).group(1) for line in ends] == [str(e) for e in range(EPOCHS)], lines
    assert len(lines) <= 4 * EPOCHS, lines
    _final_line(ends[-1])
