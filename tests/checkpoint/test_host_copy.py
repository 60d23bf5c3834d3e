"""Tests for raytrainer.checkpoint.host_copy: host copies, tied views, live references and their version checks."""
from __future__ import annotations

import collections
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from torch import nn

from raytrainer.checkpoint.host_copy import HostCopy, LiveRefs, to_host, view_key


class _Tied(nn.Module):
    """An embedding and an output layer that share one weight (as language models tie them)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.out = nn.Linear(4, 10, bias=False)
        self.out.weight = self.embed.weight
        self.register_buffer("count", torch.zeros((), dtype=torch.long))


class _DataSGD(torch.optim.Optimizer):
    """An old-style optimizer that writes through ``.data``, which does not bump version counters."""

    def __init__(self, params) -> None:
        super().__init__(params, {"lr": 0.1})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data.add_(p.grad, alpha=-group["lr"])


def _counted(opt: torch.optim.Optimizer) -> list[int]:
    """A one-element list holding the number of completed ``opt.step()`` calls (a real post-step hook)."""
    steps = [0]
    opt.register_step_post_hook(lambda *_: steps.__setitem__(0, steps[0] + 1))
    return steps


# ------------------------------------------------------------------------------------------
# view_key
# ------------------------------------------------------------------------------------------

def test_view_key_identifies_the_memory_a_tensor_views():
    model = _Tied()
    sd = model.state_dict()
    w = model.embed.weight
    assert view_key(w) == view_key(model.out.weight) == view_key(sd["embed.weight"]) == view_key(w.detach())
    assert view_key(sd["embed.weight"]) == view_key(sd["out.weight"])
    # other views of the same memory are other tensors: a row, a transpose, another dtype, a copy
    assert len({view_key(w), view_key(w[0]), view_key(w.t()), view_key(w.view(torch.int32)),
                view_key(w.clone())}) == 5
    # no addressable memory: told apart by object
    a, b = torch.empty(0), torch.empty(0)
    assert view_key(a) == ("id", id(a)) and view_key(a) != view_key(b)
    sparse = torch.eye(3).to_sparse()
    assert view_key(sparse) == ("id", id(sparse))


# ------------------------------------------------------------------------------------------
# to_host
# ------------------------------------------------------------------------------------------

def test_to_host_copies_and_keeps_structure():
    model = torch.nn.Linear(3, 2)
    sd = model.state_dict()
    Pair = collections.namedtuple("Pair", "a b")
    rng = np.arange(4)
    obj = {"state_dict": sd, "tied": [sd["weight"], sd["weight"]], "pair": Pair(torch.zeros(2), 1),
           "size": torch.Size([2, 3]), "np": rng, "plain": ("x", 1)}
    copy = to_host(obj)

    assert type(copy["state_dict"]) is collections.OrderedDict
    assert copy["state_dict"]._metadata == sd._metadata
    assert copy["tied"][0] is copy["tied"][1]
    assert isinstance(copy["pair"], Pair) and copy["pair"].b == 1
    assert copy["size"] == torch.Size([2, 3]) and copy["plain"] is obj["plain"]
    assert type(copy["size"]) is torch.Size

    with torch.no_grad():
        model.weight.add_(1.0)
        sd["bias"].zero_()
    rng[0] = 99
    obj["pair"].a.add_(5)
    assert not torch.equal(copy["state_dict"]["weight"], model.weight)
    assert torch.equal(copy["state_dict"]["weight"] + 1.0, model.weight)
    assert copy["state_dict"]["bias"].abs().sum() > 0
    assert copy["np"][0] == 0 and torch.equal(copy["pair"].a, torch.zeros(2))
    assert not copy["state_dict"]["weight"].requires_grad


def test_to_host_copies_tied_weights_once_and_keeps_them_tied():
    model = _Tied()
    params = dict(model.named_parameters(remove_duplicate=False))
    obj = {"state_dict": model.state_dict(), "params": params,
           "opt": torch.optim.SGD(model.parameters(), lr=0.1).state_dict()}
    memo: dict = {}
    copy = to_host(obj, memo)
    sd = copy["state_dict"]
    assert sd["embed.weight"] is sd["out.weight"]  # one tensor, as in the model
    assert copy["params"]["embed.weight"] is copy["params"]["out.weight"] is sd["embed.weight"]
    assert sd["embed.weight"].data_ptr() != model.embed.weight.data_ptr()
    assert len(memo) == 2  # the tied weight and the buffer: each copied once
    # a second call with the same memo reuses those copies (tied across calls)
    again = to_host({"w": model.out.weight.detach()}, memo)
    assert again["w"] is sd["embed.weight"] and len(memo) == 2
    # other views of the same memory are copied as themselves
    rows = to_host({"w": model.embed.weight, "row": model.embed.weight[3]})
    assert torch.equal(rows["row"], rows["w"][3]) and rows["row"].shape == (4,)


def test_to_host_is_independent_of_later_in_place_writes():
    model = nn.Linear(4, 4)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "opt": opt.state_dict()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    exp_avg = opt.state[model.weight]["exp_avg"].clone()
    copy = to_host(state)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()  # in-place writes to the parameters and to the Adam state
    with torch.no_grad():
        model.bias.fill_(7.0)
    for k, v in before.items():
        assert torch.equal(copy["model"][k], v), k
    assert torch.equal(copy["opt"]["state"][0]["exp_avg"], exp_avg)
    assert not torch.equal(copy["opt"]["state"][0]["exp_avg"], opt.state[model.weight]["exp_avg"])
    assert copy["opt"]["param_groups"][0]["lr"] == 0.1


def test_to_host_keeps_dtypes_shapes_and_values():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    obj = {
        "bf16": base.to(torch.bfloat16),
        "f16": base.half(),
        "int64": torch.arange(5),
        "int32": torch.arange(5, dtype=torch.int32),
        "uint8": torch.arange(200, 205, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "complex": torch.tensor([1 + 2j, 3 - 1j]),
        "scalar": torch.tensor(3.5, dtype=torch.bfloat16),
        "empty": torch.empty(0, 3),
        "transposed": base.t(),
        "strided": base[:, ::2],
        "sparse": torch.eye(3).to_sparse(),
    }
    copy = to_host(obj)
    for k, v in obj.items():
        assert copy[k].dtype == v.dtype and copy[k].shape == v.shape and copy[k].device.type == "cpu", k
        assert copy[k] is not v, k
        if v.is_sparse:
            assert torch.equal(copy[k].to_dense(), v.to_dense())
        else:
            assert torch.equal(copy[k], v), k
    obj["bf16"].add_(1)
    obj["int64"].mul_(3)
    assert torch.equal(copy["bf16"], base.to(torch.bfloat16)) and torch.equal(copy["int64"], torch.arange(5))


def test_to_host_preserves_nested_structure_and_leaves():
    class Box:  # an arbitrary object: shared, not copied
        pass

    box = Box()
    Point = collections.namedtuple("Point", "x y")
    tags = {"a", "b"}
    obj = collections.OrderedDict(
        nested=[{"t": (torch.ones(2), [torch.zeros(1), 5, "s", None])}, (1, 2.5, b"raw")],
        point=Point(torch.ones(1), 3), box=box, tags=tags, frozen=frozenset({1}), dtype=torch.float16,
        device=torch.device("cpu"), text="hi", number=3, nothing=None)
    copy = to_host(obj)
    assert type(copy) is collections.OrderedDict and list(copy) == list(obj)
    t, rest = copy["nested"][0]["t"]
    assert isinstance(copy["nested"][0]["t"], tuple) and torch.equal(t, torch.ones(2))
    assert torch.equal(rest[0], torch.zeros(1)) and rest[1:] == [5, "s", None]
    assert copy["nested"][1] is obj["nested"][1]  # a tuple of plain values is immutable: kept
    assert copy["nested"] is not obj["nested"] and copy["nested"][0] is not obj["nested"][0]
    assert isinstance(copy["point"], Point) and copy["point"].y == 3
    assert copy["point"].x is not obj["point"].x
    assert copy["box"] is box and copy["frozen"] is obj["frozen"]
    assert copy["tags"] == tags and copy["tags"] is not tags  # sets are mutable: copied
    assert copy["dtype"] is torch.float16 and copy["device"] == torch.device("cpu")
    assert (copy["text"], copy["number"], copy["nothing"]) == ("hi", 3, None)


# ------------------------------------------------------------------------------------------
# LiveRefs
# ------------------------------------------------------------------------------------------

def test_live_refs_see_in_place_writes_and_optimizer_steps():
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    refs = LiveRefs(model.parameters(), ["weight", "bias"])
    assert refs.changed() == [] and refs.unchanged() and len(refs) == 2
    with torch.no_grad():
        model.bias.add_(1.0)
    assert refs.changed() == ["bias"] and not refs.unchanged()

    refs = refs.record()  # a new boundary: the write above is part of it
    assert refs.changed() == []
    model(torch.randn(4, 3)).sum().backward()
    opt.step()  # torch's optimizers write in place, which bumps the version counters
    assert refs.changed() == ["weight", "bias"]

    # optimizer state tensors are watched the same way (momentum buffers now exist)
    bufs = [opt.state[p]["momentum_buffer"] for p in model.parameters()]
    refs = LiveRefs(bufs)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    assert refs.changed() == ["tensor 0", "tensor 1"]


def test_live_refs_catch_data_writes_through_the_step_count():
    model = nn.Linear(3, 2)
    opt = _DataSGD(model.parameters())
    steps = _counted(opt)
    plain = LiveRefs(model.parameters())
    counted = LiveRefs(model.parameters(), steps=lambda: steps[0])
    model(torch.randn(4, 3)).sum().backward()
    opt.step()  # p.data.add_: version counters do not move ...
    assert plain.changed() == [] and plain.unchanged()
    assert counted.changed() == ["1 optimizer step(s)"] and not counted.unchanged()  # ... the step count does
    assert counted.copy({"w": model.weight}) is None
    assert counted.record().changed() == []


def test_live_refs_and_data_assignment():
    model = nn.Linear(3, 2)
    state = model.state_dict()  # detached views of the parameters' memory, as dump_checkpoint holds them
    boundary = {k: v.clone() for k, v in state.items()}
    refs = LiveRefs(model.parameters())
    model.weight.data = torch.full((2, 3), 9.0)  # moves the parameter to new memory, no version change
    assert refs.unchanged()
    copy = refs.copy(state)  # the structure still views the boundary's memory: the copy is the boundary's
    assert copy is not None and all(torch.equal(copy[k], v) for k, v in boundary.items())
    with torch.no_grad():
        model.weight.add_(1.0)  # the version counter stays with the parameter: this write is seen
    assert not refs.unchanged() and refs.copy(state) is None


def test_live_refs_keep_shares_live_tensors_and_copies_the_rest():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    heavy = list(model.parameters()) + [v for s in opt.state.values() for v in s.values()]
    refs = LiveRefs(heavy)
    rng = torch.get_rng_state()
    ckpt = {"state_dict": model.state_dict(), "opt": opt.state_dict(), "rng": [rng, rng], "tags": {"x"},
            "meta": {"epoch": 1, "name": "run"}}
    assert ckpt["state_dict"]["0.weight"] in refs and ckpt["state_dict"]["1.running_mean"] not in refs
    kept = refs.keep(ckpt)
    sd = kept["state_dict"]
    assert sd["0.weight"] is ckpt["state_dict"]["0.weight"]  # live, by reference
    assert kept["opt"]["state"][0]["exp_avg"] is opt.state[model[0].weight]["exp_avg"]
    for name in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):  # buffers: cloned now
        assert sd[name].data_ptr() != ckpt["state_dict"][name].data_ptr() and torch.equal(sd[name],
                                                                                         ckpt["state_dict"][name])
    assert kept["rng"][0] is kept["rng"][1] and kept["rng"][0] is not rng  # tied light tensors: one clone
    assert kept["tags"] == {"x"} and kept["tags"] is not ckpt["tags"]
    assert kept is not ckpt and kept["meta"] == ckpt["meta"] and kept["meta"] is not ckpt["meta"]

    boundary = {k: v.clone() for k, v in model.state_dict().items()}
    refs = refs.record()
    with torch.no_grad():
        model[1].running_mean.add_(5.0)  # a light tensor changes: the kept clone does not
    copy = refs.copy(kept)
    assert copy is not None and all(torch.equal(copy["state_dict"][k], v) for k, v in boundary.items())
    assert copy["state_dict"]["0.weight"] is not sd["0.weight"]
    model(torch.randn(5, 3)).sum().backward()
    opt.step()  # training moved on: the kept state no longer holds the boundary's values
    assert refs.copy(kept) is None


def test_live_refs_copy_catches_a_write_during_the_copy():
    w = torch.zeros(3)

    class WritesWhenCopied(dict):  # copying this container changes w, as a racing optimizer step would
        def __copy__(self):
            w.add_(1.0)
            return WritesWhenCopied(self)

    refs = LiveRefs([w])
    assert refs.copy({"w": w}) is not None
    assert refs.copy(WritesWhenCopied(w=w)) is None  # unchanged before the copy, changed after it


def test_live_refs_pickle_without_their_index():
    import pickle

    w = torch.ones(3)
    refs = LiveRefs([w], ["w"])
    assert w in refs  # builds the index (object ids, memory addresses)
    other = pickle.loads(pickle.dumps(refs))
    assert other._ids is None and other._keys is None  # meaningless after unpickling: rebuilt when needed
    assert other._tensors[0] in other and w not in other
    kept = other.keep({"w": other._tensors[0], "x": w})
    assert kept["w"] is other._tensors[0] and kept["x"] is not w


def test_live_refs_rejects_mismatched_names():
    with pytest.raises(ValueError, match="2 names for 1 tensors"):
        LiveRefs([torch.zeros(1)], ["a", "b"])


# ------------------------------------------------------------------------------------------
# HostCopy
# ------------------------------------------------------------------------------------------

def test_host_copy_copies_the_rest_now_and_the_deferred_tensors_at_finish():
    model = _Tied()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model.out(model.embed(torch.tensor([1, 2]))).sum().backward()
    opt.step()
    deferred = {view_key(p) for p in model.parameters()} | {view_key(v) for v in opt.state[model.embed.weight].values()}
    ckpt = {"state_dict": model.state_dict(), "opt": opt.state_dict(), "step": 1}
    host = HostCopy(ckpt, defer=deferred, name="checkpoint")
    result = host.result
    assert result["state_dict"]["embed.weight"] is result["state_dict"]["out.weight"]  # tied: one buffer
    assert len(host.pool) == 4 and len(host.pending) == 4  # weight, exp_avg, exp_avg_sq, step
    count = model.count.clone()
    with torch.no_grad():
        model.count.add_(1)  # not deferred: already copied
    assert torch.equal(result["state_dict"]["count"], count)

    expected = {k: v.clone() for k, v in model.state_dict().items()}
    changed = host.finish()
    assert changed == [] and len(host.pending) == 0  # live references dropped
    assert torch.equal(result["state_dict"]["embed.weight"], expected["embed.weight"])
    assert torch.equal(result["opt"]["state"][0]["exp_avg"], opt.state[model.embed.weight]["exp_avg"])
    assert result["step"] == 1

    # the next copy reuses the buffers of the previous one
    again = HostCopy({"state_dict": model.state_dict()}, defer=deferred, pool=host.pool)
    assert again.result["state_dict"]["embed.weight"] is result["state_dict"]["embed.weight"]
    assert again.finish() == []


def test_host_copy_names_tensors_written_before_finish():
    model = nn.Sequential(nn.Linear(2, 2))
    deferred = {view_key(p) for p in model.parameters()}
    host = HostCopy({"state_dict": model.state_dict()}, defer=deferred, name="checkpoint")
    with torch.no_grad():
        model[0].weight.mul_(2.0)
    assert host.finish() == ["checkpoint['state_dict']['0.weight']"]


def test_host_copy_does_not_defer_tensors_that_require_grad():
    model = nn.Linear(2, 2)
    before = model.weight.detach().clone()
    host = HostCopy({"w": model.weight}, defer={view_key(model.weight)})
    assert len(host.pending) == 0 and host.pool == {}
    with torch.no_grad():
        model.weight.add_(1.0)
    assert torch.equal(host.result["w"], before) and not host.result["w"].requires_grad
    assert host.finish() == []


def test_host_copy_finishes_on_another_thread():
    weight = torch.arange(100_000, dtype=torch.float32)
    host = HostCopy({"w": weight, "also": weight}, defer={view_key(weight)})
    out: list = []
    thread = threading.Thread(target=lambda: out.append(host.finish()))
    thread.start()
    thread.join(60)
    assert out == [[]] and host.result["w"] is host.result["also"]
    assert torch.equal(host.result["w"], weight) and host.result["w"].data_ptr() != weight.data_ptr()


def test_host_copy_imports_nothing_of_raytrainer():
    script = ("import importlib, sys, types\n"
              "pkg = types.ModuleType('raytrainer'); pkg.__path__ = ['raytrainer']; sys.modules['raytrainer'] = pkg\n"
              "importlib.import_module('raytrainer.checkpoint.host_copy')\n"
              "print(sorted(m for m in sys.modules if m.startswith('raytrainer')))\n")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0] == "['raytrainer', 'raytrainer.checkpoint', 'raytrainer.checkpoint.host_copy']"


# ------------------------------------------------------------------------------------------
# CUDA
# ------------------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_go_to_host_tied_and_pinned_when_deferred():
    weight = torch.arange(1000, dtype=torch.bfloat16, device="cuda")
    state = {"w": weight, "tied": weight, "step": torch.tensor(3, device="cuda")}
    copy = to_host(state)
    assert copy["w"].device.type == "cpu" and copy["w"] is copy["tied"] and copy["w"].dtype == torch.bfloat16
    assert copy["step"].item() == 3

    weight.mul_(2)  # queued on the GPU before the HostCopy: the deferred copy must see it
    host = HostCopy(state, defer={view_key(weight)})
    assert host.result["w"].is_pinned() and host.result["w"] is host.result["tied"]
    assert host.finish() == []
    assert torch.equal(host.result["w"], (torch.arange(1000, device="cuda", dtype=torch.bfloat16) * 2).cpu())
    assert torch.equal(copy["w"], torch.arange(1000, dtype=torch.bfloat16))
    refs = LiveRefs([weight])
    weight.add_(1)
    assert refs.changed() == ["tensor 0"]
