"""CPU inference latency of one trained autoencoder run three ways: eager, TorchScript, onnxruntime.

Why: `to_torchscript` / `to_onnx` exist to serve a model without the training code; this shows what
each costs per call at batch 1 (online serving) and batch 256 (offline scoring).

Model: `LitAutoEncoder(hidden=128, latent=3)` from examples/autoencoder.py (64 -> 128 -> 3 -> 128 ->
64), trained briefly on scikit-learn's digits with a plain Adam loop on the example's reconstruction
loss. Its `forward` returns only the 3-d embedding, so the timed graph is the full reconstruction
`decoder(encoder(x))`, held by a small nn.Module over the trained submodules. When the example file
is absent a local module with the same layers stands in (the output says which ran).

Method: the graph is exported with raytrainer.export (TorchScript by scripting, ONNX with a dynamic
batch axis) and checked with verify_export. Then, per batch size, the three modes are warmed up and
timed `--repeats` times over `--iters` calls each (a tenth of that at batch 256), taking turns
within every repeat; the table shows the median per-call latency and the spread over repeats.
Every engine is pinned to one thread (torch.set_num_threads(1) and set_num_interop_threads(1);
onnxruntime intra_op_num_threads=1, inter_op_num_threads=1, sequential execution) so the numbers
compare engines, not how many cores each grabs. Inputs are prepared before timing (torch tensors
for eager/TorchScript, numpy arrays for onnxruntime), so the timings cover the forward call only;
eager and TorchScript run under torch.inference_mode.

Run: python benchmarks/inference.py [--repeats 7] [--iters 2000] [--threads 1] [--hidden 128]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "autoencoder.py"


class LocalAutoEncoder(nn.Module):
    """Stand-in with the example's layers, used only when examples/autoencoder.py is absent."""

    def __init__(self, hidden: int, latent: int = 3) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, latent))
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, 64))


class Reconstruction(nn.Module):
    """decoder(encoder(x)) over an autoencoder's trained submodules: the graph that gets timed."""

    def __init__(self, autoencoder: nn.Module) -> None:
        super().__init__()
        self.encoder = autoencoder.encoder
        self.decoder = autoencoder.decoder
        self.example_input_array = torch.zeros(1, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def load_autoencoder(hidden: int) -> tuple[nn.Module, str]:
    """LitAutoEncoder from examples/autoencoder.py when the file exists, else the local stand-in."""
    if not EXAMPLE.exists():
        return LocalAutoEncoder(hidden), f"LocalAutoEncoder(hidden={hidden}) (examples/autoencoder.py not found)"
    spec = importlib.util.spec_from_file_location("autoencoder_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    model = example.LitAutoEncoder(hidden=hidden, latent=3)
    return model, f"LitAutoEncoder(hidden={hidden}, latent=3) from examples/autoencoder.py"


def train_briefly(model: nn.Module, steps: int) -> float:
    """A few hundred Adam steps of reconstruction on sklearn digits, so the weights are trained ones."""
    from sklearn.datasets import load_digits

    data = torch.tensor(load_digits().data, dtype=torch.float32) / 16.0
    params = [*model.encoder.parameters(), *model.decoder.parameters()]
    opt = torch.optim.Adam(params, lr=1e-3)
    model.train()
    loss = 0.0
    for _ in range(steps):
        batch = data[torch.randint(0, data.shape[0], (64,))]
        step_loss = nn.functional.mse_loss(model.decoder(model.encoder(batch)), batch)
        opt.zero_grad()
        step_loss.backward()
        opt.step()
        loss = step_loss.item()
    model.eval()
    return loss


def time_interleaved(
    fns: dict[str, Callable[[], object]], iters: int, repeats: int, warmup: int
) -> dict[str, list[float]]:
    """Mean seconds per call of each fn over `iters` calls, once per repeat, modes taking turns.

    Taking turns inside each repeat (rather than timing one mode after the other) spreads any
    background load over all modes alike, so their ratio stays meaningful on a shared machine.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    per_call: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            per_call[name].append((time.perf_counter() - start) / iters)
    return per_call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per cell; the median is shown")
    parser.add_argument("--iters", type=int, default=2000, help="calls per repeat at batch 1 (batch 256 uses 1/10)")
    parser.add_argument("--threads", type=int, default=1, help="threads for torch and onnxruntime alike")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--hidden", type=int, default=128, help="hidden width of the autoencoder")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(args.threads)
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # torch 2.13 deprecates torch.jit
    warnings.filterwarnings("ignore", category=FutureWarning)

    import onnxruntime as ort

    sys.path.insert(0, str(REPO))
    from raytrainer.export import to_onnx, to_torchscript, verify_export

    torch.manual_seed(0)  # same initial weights, data order and inputs on every run
    load_before = os.getloadavg()[0]
    autoencoder, source = load_autoencoder(args.hidden)
    final_loss = train_briefly(autoencoder, args.train_steps)
    model = Reconstruction(autoencoder).eval()

    with tempfile.TemporaryDirectory(prefix="rt-bench-") as tmp:
        ts_path, onnx_path = os.path.join(tmp, "ae.pt"), os.path.join(tmp, "ae.onnx")
        to_torchscript(model, ts_path, method="script")
        to_onnx(model, onnx_path)
        check = torch.rand(256, 64)
        diffs = {p: verify_export(p, model, sample=check) for p in (ts_path, onnx_path)}

        scripted = torch.jit.load(ts_path)
        scripted.eval()
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = args.threads
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name

        rows = []
        for batch in (1, 256):
            iters = args.iters if batch == 1 else max(1, args.iters // 10)
            warmup = max(10, iters // 10)
            x = torch.rand(batch, 64)
            x_np = x.numpy().copy()

            def eager() -> object:
                with torch.inference_mode():
                    return model(x)

            def torchscript() -> object:
                with torch.inference_mode():
                    return scripted(x)

            def onnxruntime() -> object:
                return session.run(None, {input_name: x_np})

            fns = {"eager": eager, "torchscript": torchscript, "onnxruntime": onnxruntime}
            timings = time_interleaved(fns, iters, args.repeats, warmup)
            eager_median = statistics.median(timings["eager"])
            for mode, runs in timings.items():
                rows.append((mode, batch, statistics.median(runs), min(runs), max(runs)))
                rows[-1] += (eager_median / rows[-1][2],)

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    print(
        f"model: {source}, timed as decoder(encoder(x)); "
        f"trained {args.train_steps} steps on sklearn digits, final MSE {final_loss:.4f}"
    )
    print(f"verify_export max abs diff at batch 256: torchscript {diffs[ts_path]:.2e}, onnx {diffs[onnx_path]:.2e}")
    print(
        f"torch {torch.__version__}, onnxruntime {ort.__version__}, Python {platform.python_version()}, "
        f"CPU: {cpu} ({os.cpu_count()} logical cores); threads per engine: {args.threads}; "
        f"median of {args.repeats} repeats x {args.iters} calls (batch 1) / "
        f"{max(1, args.iters // 10)} calls (batch 256)"
    )
    print(
        f"1-min load average: {load_before:.1f} before, {os.getloadavg()[0]:.1f} after "
        f"(well above 0 means other processes shared the cores and the timings are noisy)"
    )
    print()
    print(
        "| mode | batch | median latency (ms) | min-max over repeats (ms) "
        "| throughput (samples/s) | speedup vs eager |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for mode, batch, latency, fastest, slowest, speedup in rows:
        print(
            f"| {mode} | {batch} | {latency * 1e3:.4f} | {fastest * 1e3:.4f}-{slowest * 1e3:.4f} "
            f"| {batch / latency:,.0f} | {speedup:.2f}x |"
        )


if __name__ == "__main__":
    main()
