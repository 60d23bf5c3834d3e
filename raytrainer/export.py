"""Export a trained module to TorchScript or ONNX, and check that the exported file agrees with it.

`LightningModule.to_torchscript` / `to_onnx` are thin wrappers around `to_torchscript` and
`to_onnx` here, so the functions also work on any plain `torch.nn.Module`.

A module may carry `example_input_array` (a tensor, a tuple of tensors or a dict of tensors); it
is used as the sample input when none is given. The calling convention follows Lightning: a tensor
is passed as `module(x)`, a tuple as `module(*x)`, a dict as `module(**x)`.

Exporting a LightningModule needs two things from its class, because torch.jit.script compiles
every property it is not told to skip, and torch.jit.script/trace read every attribute of the
instance (getattr over dir()) while they inspect it:

* every property that TorchScript must not compile is listed in the class attribute
  `__jit_unused_properties__` (or its getter is decorated with `@torch.jit.unused`);
* a property that raises when the module is detached (`trainer`, for instance) checks
  `self._jit_is_scripting` first: a class attribute `_jit_is_scripting = False`, written without a
  type annotation (under `from __future__ import annotations` TorchScript fails to resolve the
  string "bool"). `to_torchscript` and `to_onnx` set that flag on every submodule that declares it
  while they run, and restore it afterwards.
"""

from __future__ import annotations

import contextlib
import inspect
import linecache
import os
import posixpath
import shutil
import tempfile
import types
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from raytrainer.utilities.console import without_log_messages, without_warnings

__all__ = ["ExportError", "to_torchscript", "to_onnx", "verify_export"]

_TORCHSCRIPT_METHODS = ("script", "trace")
_MAX_ERROR_CHARS = 3000


class ExportError(RuntimeError):
    """The module could not be exported, or the exported file does not reproduce the module."""


# --------------------------------------------------------------------------- sample inputs


def _example_input(module: nn.Module) -> Any:
    """The module's `example_input_array`, or None when it has none (missing attribute or None)."""
    try:
        return getattr(module, "example_input_array", None)
    except Exception:  # a property that raises counts as "no example"
        return None


def _split_sample(sample: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Turn a sample into (args, kwargs) the way Lightning calls forward with it."""
    if isinstance(sample, Mapping):
        return (), dict(sample)
    if isinstance(sample, (tuple, list)):
        return tuple(sample), {}
    return (sample,), {}


def _call(module: Callable[..., Any], sample: Any) -> Any:
    """Run `module` on `sample` with Lightning's calling convention."""
    args, kwargs = _split_sample(sample)
    return module(*args, **kwargs)


def _module_device(module: nn.Module) -> torch.device:
    """Where the module's weights live (CPU for a module without any)."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def _host_module(module: nn.Module) -> nn.Module:
    """The module itself, or a CPU copy of a module on an XLA device (TPU): TorchScript and ONNX export
    trace CPU tensors, and moving the trained module itself would replace the parameters its optimizer holds."""
    if _module_device(module).type != "xla":
        return module
    import copy

    memo: dict[int, Any] = {}
    for t in (*module.parameters(), *module.buffers()):
        host = t.detach().cpu()
        memo[id(t)] = nn.Parameter(host, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else host
    return copy.deepcopy(module, memo)


def _to_device(sample: Any, device: torch.device) -> Any:
    """The sample with every tensor moved to `device` (example_input_array is usually made on CPU)."""
    return pytree.tree_map(lambda v: v.to(device) if isinstance(v, torch.Tensor) else v, sample)


def _tensor_leaves(tree: Any) -> list[torch.Tensor]:
    """All tensors in a nested output (tuple/list/dict/tensor), in a fixed order."""
    return [leaf for leaf in pytree.tree_leaves(tree) if isinstance(leaf, torch.Tensor)]


# --------------------------------------------------------------------------- module state


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode and restore each one's own flag afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


_MISSING = object()


@contextlib.contextmanager
def _scripting_flag(module: nn.Module) -> Iterator[None]:
    """Set `_jit_is_scripting = True` on submodules that declare it, so their properties don't raise.

    Both torch.jit.script and torch.jit.trace read every attribute of the module (hasattr/getattr
    over dir()), so a property that raises when no Trainer is attached would stop the export.
    """
    saved = []
    for m in module.modules():
        if hasattr(type(m), "_jit_is_scripting") or "_jit_is_scripting" in m.__dict__:
            saved.append((m, m.__dict__.get("_jit_is_scripting", _MISSING)))
            m.__dict__["_jit_is_scripting"] = True
    try:
        yield
    finally:
        for m, old in saved:
            if old is _MISSING:
                m.__dict__.pop("_jit_is_scripting", None)
            else:
                m.__dict__["_jit_is_scripting"] = old


# --------------------------------------------------------------------------- file locations
# Paths and URIs resolve through raytrainer.io.storage, so exports honour the same S3
# endpoint variables and registered filesystems as checkpoints, and land atomically.


@contextlib.contextmanager
def _writable(path: str | os.PathLike[str]) -> Iterator[str]:
    """Yield a local scratch path to write; afterwards publish it (and siblings) atomically at `path`.

    Siblings matter for ONNX with external_data=True, which writes the weights to `<name>.data`.
    """
    import pyarrow.fs as pafs

    from raytrainer.io import storage

    uri = os.fspath(path)
    fs, target = storage.resolve(uri)
    local_fs = isinstance(fs, pafs.LocalFileSystem)
    directory, name = os.path.split(target) if local_fs else posixpath.split(target)
    names_dir = uri.split("?", 1)[0].endswith(("/", os.sep))
    if not name or names_dir or fs.get_file_info(target).type == pafs.FileType.Directory:
        raise ValueError(f"export path {uri!r} names a directory; give a file name such as 'model.onnx'")
    with tempfile.TemporaryDirectory(prefix="raytrainer-export-") as tmp:
        yield os.path.join(tmp, name)
        produced = sorted(os.listdir(tmp))
        if name not in produced:
            raise ExportError(f"the exporter wrote nothing for {uri!r}")
        if local_fs:
            os.makedirs(directory or ".", exist_ok=True)
        elif fs.type_name not in ("s3", "gcs"):  # object stores have no directories to create
            fs.create_dir(directory, recursive=True)
        join = os.path.join if local_fs else posixpath.join
        for produced_name in produced:
            with open(os.path.join(tmp, produced_name), "rb") as f:
                data = f.read()
            storage.write_bytes_atomic(join(directory, produced_name), data, manifest=False, filesystem=fs)


@contextlib.contextmanager
def _readable(path: str | os.PathLike[str]) -> Iterator[str]:
    """Yield a local path to read; a remote file (with an ONNX .data sidecar) is downloaded first."""
    import pyarrow.fs as pafs

    from raytrainer.io import storage

    uri = os.fspath(path)
    fs, source = storage.resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"no exported file at {uri!r}")
        yield source
        return
    name = posixpath.basename(source)
    with tempfile.TemporaryDirectory(prefix="raytrainer-export-") as tmp:
        for remote, local_name in ((source, name), (source + ".data", name + ".data")):
            if fs.get_file_info(remote).type != pafs.FileType.File:
                if remote == source:
                    raise FileNotFoundError(f"no exported file at {uri!r}")
                continue
            with fs.open_input_file(remote) as src, open(os.path.join(tmp, local_name), "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
        yield os.path.join(tmp, name)


# --------------------------------------------------------------------------- error location


def _clip(text: str) -> str:
    """Keep an embedded error message readable."""
    text = text.strip()
    return text if len(text) <= _MAX_ERROR_CHARS else text[:_MAX_ERROR_CHARS] + "\n... (truncated)"


def _describe(qualname: str, mod: nn.Module) -> str:
    """'encoder.act' (BadAct) or the root's class name."""
    kind = type(mod).__qualname__
    return f"submodule '{qualname}' ({kind})" if qualname else f"the top-level module ({kind})"


def _source_of(mod: nn.Module) -> str:
    """file:line of a module's forward, for error messages."""
    forward = getattr(type(mod), "forward", None)
    code = getattr(forward, "__code__", None)
    return f"{code.co_filename}:{code.co_firstlineno}" if code is not None else "<unknown source>"


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and its causes, deepest cause first (torch often wraps the real error)."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not e for e in seen):
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen[::-1]


def _frames(exc: BaseException) -> Iterator[types.TracebackType]:
    """Traceback entries of the exception chain, deepest cause first, innermost frame first."""
    for e in _chain(exc):
        entries = []
        tb: types.TracebackType | None = e.__traceback__
        while tb is not None:
            entries.append(tb)
            tb = tb.tb_next
        yield from reversed(entries)


def _user_frame(exc: BaseException) -> str | None:
    """The innermost traceback line outside torch and this file: where user code failed."""
    torch_dir = os.path.dirname(torch.__file__) + os.sep
    here = os.path.abspath(__file__)
    for tb in _frames(exc):
        code = tb.tb_frame.f_code
        filename = code.co_filename
        if filename.startswith(("<string>", "<frozen")) or os.path.abspath(filename) == here:
            continue
        if os.path.abspath(filename).startswith(torch_dir):
            continue
        line = linecache.getline(filename, tb.tb_lineno).strip()
        return f'File "{filename}", line {tb.tb_lineno}, in {code.co_name}\n    {line}'
    return None


def _module_in_traceback(exc: BaseException, root: nn.Module) -> tuple[str, nn.Module] | None:
    """The innermost submodule of `root` whose method is on the traceback of the exception chain."""
    names = {id(m): name for name, m in root.named_modules()}
    for tb in _frames(exc):
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names and owner is not root:
            return names[id(owner)], owner
    return None


def _deepest_failing(
    root: nn.Module,
    attempt: Callable[[nn.Module], None],
    candidates: Callable[[nn.Module], bool] = lambda m: True,
) -> tuple[str, nn.Module, BaseException] | None:
    """Depth first: the deepest submodule for which `attempt` raises while all its children pass."""

    def visit(prefix: str, mod: nn.Module) -> tuple[str, nn.Module, BaseException] | None:
        for name, child in mod.named_children():
            qual = f"{prefix}.{name}" if prefix else name
            if isinstance(child, torch.jit.ScriptModule):
                continue
            if not candidates(child):  # e.g. a container whose forward is never called: look inside
                found = visit(qual, child)
                if found is not None:
                    return found
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    attempt(child)
            except Exception as exc:  # noqa: BLE001 - any failure marks the culprit
                return visit(qual, child) or (qual, child, exc)
        return None

    return visit("", root)


def _raising_property(root: nn.Module, exc: BaseException) -> tuple[str, nn.Module, str] | None:
    """(qualified name, module, property) when the error came out of a property getter of the tree."""
    names = {id(m): name for name, m in root.named_modules()}
    for tb in _frames(exc):
        owner = tb.tb_frame.f_locals.get("self")
        prop = tb.tb_frame.f_code.co_name
        if (
            isinstance(owner, nn.Module)
            and id(owner) in names
            and isinstance(getattr(type(owner), prop, None), property)
        ):
            return names[id(owner)], owner, prop
    return None


def _property_error(tool: str, module: nn.Module, exc: BaseException) -> ExportError | None:
    """An ExportError naming the property whose getter raised while `tool` inspected the module."""
    prop = _raising_property(module, exc)
    if prop is None:
        return None
    where, owner, name = prop
    return ExportError(
        f"{tool} read property '{name}' of {_describe(where, owner)} and it raised "
        f"{type(exc).__name__}: {_clip(str(exc))}\n"
        f"{tool} reads the module's properties while it inspects it. List '{name}' in the class "
        f"attribute __jit_unused_properties__ (so TorchScript does not compile it) and have it return "
        f"instead of raising while self._jit_is_scripting is True (raytrainer sets that flag during export)."
    )


def _script_error(module: nn.Module, exc: BaseException) -> ExportError:
    """Name the submodule whose scripting fails (or the top-level module) in an ExportError."""
    prop_error = _property_error("torch.jit.script", module, exc)
    if prop_error is not None:
        return prop_error
    found = _deepest_failing(module, lambda m: torch.jit.script(m))
    if found is None:
        where, culprit, cause = "", module, exc
    else:
        where, culprit, cause = found
    return ExportError(
        f"torch.jit.script failed in {_describe(where, culprit)}, defined at {_source_of(culprit)}.\n"
        f"Make that code TorchScript-compatible, mark the offending method with @torch.jit.unused "
        f"or @torch.jit.ignore, or export with method='trace'.\n"
        f"TorchScript said:\n{_clip(str(cause))}"
    )


def _capture_inputs(module: nn.Module, sample: Any) -> dict[int, tuple[Any, ...]]:
    """Positional inputs each submodule got on its first call during one eager forward."""
    seen: dict[int, tuple[Any, ...]] = {}

    def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if id(mod) not in seen and not kwargs and all(isinstance(a, torch.Tensor) for a in args):
            seen[id(mod)] = tuple(a.detach().clone() for a in args)

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in module.modules() if m is not module]
    try:
        with torch.no_grad():
            _call(module, sample)
    except Exception:  # the eager run failing is reported by the caller's original error
        pass
    finally:
        for h in handles:
            h.remove()
    return seen


def _trace_error(module: nn.Module, sample: Any, exc: BaseException, **trace_kwargs: Any) -> ExportError:
    """Name the submodule (and source line) where tracing fails in an ExportError."""
    prop_error = _property_error("torch.jit.trace", module, exc)
    if prop_error is not None:
        return prop_error
    line = _user_frame(exc)
    in_tb = _module_in_traceback(exc, module)
    if in_tb is not None:
        where, culprit = in_tb
    else:
        inputs = _capture_inputs(module, sample)
        found = _deepest_failing(
            module,
            lambda m: torch.jit.trace(m, inputs[id(m)], **trace_kwargs),
            candidates=lambda m: id(m) in inputs,
        )
        where, culprit = (found[0], found[1]) if found is not None else ("", module)
    at = f"\nFailing line:\n  {line}" if line else ""
    return ExportError(
        f"torch.jit.trace failed in {_describe(where, culprit)}, defined at {_source_of(culprit)}.{at}\n"
        f"Tracing needs forward to run on tensors with no Python-side state or numpy round trips; "
        f"fix that code or export with method='script'.\n"
        f"torch.jit.trace said: {type(exc).__name__}: {_clip(str(exc))}"
    )


# --------------------------------------------------------------------------- TorchScript


def to_torchscript(
    module: nn.Module,
    file_path: str | os.PathLike[str] | None = None,
    method: str = "script",
    example_inputs: Any = None,
    **kwargs: Any,
) -> torch.jit.ScriptModule:
    """Compile `module` to TorchScript (in eval mode) and optionally save it to a path or URI.

    `method="script"` calls `torch.jit.script(module, **kwargs)` (example_inputs is not used);
    `method="trace"` calls `torch.jit.trace` on `example_inputs` or `module.example_input_array`.
    A dict sample is traced as keyword arguments.
    """
    if method not in _TORCHSCRIPT_METHODS:
        raise ValueError(
            f"to_torchscript got method={method!r}; use one of {', '.join(map(repr, _TORCHSCRIPT_METHODS))}."
        )
    module = _host_module(module)
    sample = example_inputs if example_inputs is not None else _example_input(module)
    if method == "trace" and sample is None:
        raise ValueError(
            "to_torchscript(method='trace') needs an input to trace with: pass example_inputs=... "
            "or set self.example_input_array on the module."
        )
    if method == "trace":
        sample = _to_device(sample, _module_device(module))

    with _eval_mode(module), _scripting_flag(module):
        if method == "script":
            try:
                exported = torch.jit.script(module, **kwargs)
            except Exception as exc:  # noqa: BLE001 - torch raises several unrelated types here
                raise _script_error(module, exc) from exc
        else:
            if isinstance(sample, Mapping):
                trace_args: dict[str, Any] = {"example_kwarg_inputs": dict(sample)}
            else:
                trace_args = {"example_inputs": tuple(sample) if isinstance(sample, list) else sample}
            try:
                exported = torch.jit.trace(module, **trace_args, **kwargs)
            except Exception as exc:  # noqa: BLE001
                raise _trace_error(module, sample, exc, **kwargs) from exc

    if file_path is not None:
        with _writable(file_path) as local:
            torch.jit.save(exported, local)
    return exported


# --------------------------------------------------------------------------- ONNX


def _batch_dynamic_shapes(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """torch.export dynamic_shapes marking dim 0 of every tensor input as one shared batch dimension.

    Inputs whose dim 0 differs from the first input's get their own dimension each, so an odd input
    does not force a false equality. Outputs follow from the graph.
    """
    leaves = _tensor_leaves((args, kwargs))
    first = next((t.shape[0] for t in leaves if t.dim() > 0), None)
    batch = torch.export.Dim("batch")
    others: dict[int, Any] = {}

    def spec(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            if value.dim() == 0:
                return None
            if value.shape[0] == first:
                return {0: batch}
            size = int(value.shape[0])
            others.setdefault(size, torch.export.Dim(f"dim0_{len(others)}"))
            return {0: others[size]}
        if isinstance(value, (tuple, list)):
            return type(value)(spec(v) for v in value)
        if isinstance(value, dict):
            return {k: spec(v) for k, v in value.items()}
        return None

    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    return {name: spec(value) for name, value in bound.arguments.items()}


def _legacy_names(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], kw: dict[str, Any]) -> None:
    """For the TorchScript-based exporter: name inputs/outputs and make dim 0 of each dynamic."""
    n_in = len(_tensor_leaves((args, kwargs)))
    with torch.no_grad():
        n_out = len(_tensor_leaves(module(*args, **kwargs)))
    kw.setdefault("input_names", ["input"] if n_in == 1 else [f"input_{i}" for i in range(n_in)])
    kw.setdefault("output_names", ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)])
    kw["dynamic_axes"] = {name: {0: "batch"} for name in [*kw["input_names"], *kw["output_names"]]}


@contextlib.contextmanager
def _quiet_onnx_exporter() -> Iterator[None]:
    """What torch's dynamo exporter says that concerns torch, not the user, left out while it runs: that torchvision's
    detection ops (nms, roi_align, ...) get no ONNX translation without torchvision (a model that uses them needs
    torchvision installed anyway), and torch.export's own use of a pytree API it deprecated."""
    with without_log_messages("torch.onnx._internal.exporter._registration", "torchvision is not installed"), \
            without_warnings((r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)):
        yield


def to_onnx(
    module: nn.Module,
    file_path: str | os.PathLike[str],
    input_sample: Any = None,
    **kwargs: Any,
) -> None:
    """Export `module` (in eval mode) to an ONNX file at a path or URI, with a dynamic batch axis.

    `input_sample` defaults to `module.example_input_array`. Dim 0 of every input and output is
    dynamic unless `dynamic_axes` or `dynamic_shapes` is given. Other kwargs go to torch.onnx.export.
    """
    module = _host_module(module)
    sample = input_sample if input_sample is not None else _example_input(module)
    if sample is None:
        raise ValueError(
            "to_onnx needs an input sample to export with: pass input_sample=... "
            "or set self.example_input_array on the module."
        )
    args, sample_kwargs = _split_sample(_to_device(sample, _module_device(module)))
    kw = dict(kwargs)
    # Exporter choice: torch 2.13's torch.onnx.export defaults to dynamo=True (the torch.export-based
    # exporter, built on onnxscript); the TorchScript-based one (dynamo=False) is deprecated and
    # warns that it will be removed. We pass dynamo=True explicitly so the behaviour does not move
    # with torch's default, and describe the batch axis with `dynamic_shapes` (torch.export's native
    # form): `dynamic_axes` still works under dynamo but only through a deprecated conversion.
    # A caller who passes dynamo=False gets the legacy exporter with dynamic_axes instead.
    kw.setdefault("dynamo", True)
    if kw["dynamo"]:
        kw.setdefault("verbose", False)  # the dynamo exporter prints progress lines otherwise
        # One self-contained file (weights inside) unless asked otherwise; pass external_data=True
        # for models over protobuf's 2 GB limit (weights then go to <file>.data next to it).
        kw.setdefault("external_data", False)
        if "dynamic_axes" not in kw and "dynamic_shapes" not in kw:
            kw["dynamic_shapes"] = _batch_dynamic_shapes(module, args, sample_kwargs)
    elif "dynamic_axes" not in kw:
        with _eval_mode(module):
            _legacy_names(module, args, sample_kwargs, kw)

    with _eval_mode(module), _scripting_flag(module), _writable(file_path) as local:
        try:
            with warnings.catch_warnings(), _quiet_onnx_exporter():
                # The legacy exporter's deprecation warning is expected when dynamo=False was asked for.
                warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
                # Inputs sharing our one "batch" dim make torch say it keeps just one of the names.
                warnings.filterwarnings("ignore", message=".*axis name: .* will not be used.*")
                torch.onnx.export(module, args, local, kwargs=sample_kwargs or None, **kw)
        except TypeError:
            raise  # a bad keyword for torch.onnx.export: the caller's mistake, shown as torch words it
        except Exception as exc:  # noqa: BLE001
            prop_error = _property_error("torch.onnx.export", module, exc)
            if prop_error is not None:
                raise prop_error from exc
            in_tb = _module_in_traceback(exc, module)
            where, culprit = in_tb if in_tb is not None else ("", module)
            line = _user_frame(exc)
            at = f"\nFailing line:\n  {line}" if line else ""
            raise ExportError(
                f"torch.onnx.export failed in {_describe(where, culprit)}, defined at "
                f"{_source_of(culprit)}.{at}\n"
                f"torch.onnx.export said: {type(exc).__name__}: {_clip(str(exc))}"
            ) from exc


# --------------------------------------------------------------------------- verification


def _run_onnx(path: str, sample: Any) -> list[torch.Tensor]:
    """Run an .onnx file in onnxruntime on CPU and return its outputs as tensors."""
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    args, kwargs = _split_sample(sample)
    if kwargs and not args and set(names) <= set(kwargs):
        feed_tensors = [kwargs[n] for n in names]
    else:
        feed_tensors = _tensor_leaves((args, kwargs))
    if len(feed_tensors) != len(names):
        raise ExportError(
            f"the ONNX model takes {len(names)} inputs {names} but the sample has {len(feed_tensors)} tensors"
        )
    feed = {n: t.detach().cpu().numpy() for n, t in zip(names, feed_tensors)}
    return [torch.from_numpy(o) for o in session.run(None, feed)]


def verify_export(
    path: str | os.PathLike[str],
    module: nn.Module,
    sample: Any = None,
    atol: float = 1e-5,
) -> float:
    """Run the exported file and the eager module on one sample; return the max abs difference.

    `.onnx` files run in onnxruntime (CPUExecutionProvider), anything else via torch.jit.load.
    Raises ExportError when the difference exceeds `atol`, so a broken export cannot pass silently.
    """
    sample = sample if sample is not None else _example_input(module)
    if sample is None:
        raise ValueError(
            "verify_export needs an input to compare on: pass sample=... or set self.example_input_array."
        )
    with _eval_mode(module), torch.no_grad():
        eager_out = _call(module, _to_device(sample, _module_device(module)))
        expected = [t.detach().cpu() for t in _tensor_leaves(eager_out)]
        sample = _to_device(sample, torch.device("cpu"))  # the exported file runs on CPU here
        with _readable(path) as local:
            if local.lower().endswith(".onnx"):
                got = _run_onnx(local, sample)
            else:
                loaded = torch.jit.load(local, map_location="cpu")
                loaded.eval()
                got = [t.detach().cpu() for t in _tensor_leaves(_call(loaded, sample))]

    if len(got) != len(expected):
        raise ExportError(f"{os.fspath(path)} returned {len(got)} outputs, the module returns {len(expected)}")
    diff = 0.0
    for i, (a, b) in enumerate(zip(got, expected)):
        if tuple(a.shape) != tuple(b.shape):
            raise ExportError(
                f"output {i} of {os.fspath(path)} has shape {tuple(a.shape)}, the module gives {tuple(b.shape)}"
            )
        if a.numel():
            d = (a.to(torch.float64) - b.to(torch.float64)).abs().max().item()
            if d != d or d > diff:  # a NaN sticks: max() would drop it
                diff = d
    if not diff <= atol:  # also catches NaN
        raise ExportError(
            f"{os.fspath(path)} differs from the module: max abs diff {diff:.3g} > atol {atol:.3g}"
        )
    return diff
