"""``raytrainer export``: load a checkpoint into its LightningModule class and write ONNX or TorchScript.

Inside this module ``from raytrainer import export`` is the top-level raytrainer/export.py (the
exporters), not this module: imports in the package are absolute.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

from raytrainer.cli.common import CLIError, _file_info

__all__ = ["cmd_export"]


def _load_class(spec: str) -> type:
    """Import ``pkg.module:ClassName`` (or ``path/to/file.py:ClassName``) and return the class."""
    module_name, sep, class_name = spec.rpartition(":")
    if not sep or not module_name or not class_name:
        raise CLIError(f"--model {spec!r}: expected pkg.module:ClassName (or path/to/file.py:ClassName)")
    try:
        if module_name.endswith(".py") or os.sep in module_name:
            path = os.path.abspath(module_name)
            if not os.path.isfile(path):
                raise CLIError(f"--model {spec}: {module_name} does not exist")
            name = "_raytrainer_model_" + os.path.splitext(os.path.basename(path))[0]
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except CLIError:
        raise
    except Exception as exc:  # noqa: BLE001 - any import-time error is the user's module failing
        raise CLIError(f"--model {spec}: cannot import {module_name} ({type(exc).__name__}: {exc}). Run from the "
                       "folder that contains the package, or set PYTHONPATH.") from exc
    cls = getattr(module, class_name, None)
    if cls is None:
        from raytrainer.module import LightningModule

        found = sorted(n for n, v in vars(module).items()
                       if isinstance(v, type) and issubclass(v, LightningModule) and v is not LightningModule)
        hint = f" LightningModules there: {', '.join(found)}." if found else ""
        raise CLIError(f"--model {spec}: {module_name} has no attribute {class_name}.{hint}")
    return cls


def cmd_export(args: argparse.Namespace) -> int:
    """`raytrainer export`: load a checkpoint into its LightningModule class and write ONNX or TorchScript."""
    import pyarrow.fs as pafs

    from raytrainer import export
    from raytrainer.module import LightningModule

    cls = _load_class(args.model)
    if not (isinstance(cls, type) and issubclass(cls, LightningModule)):
        kind = f"class {cls.__module__}.{cls.__qualname__} (bases: " + \
               ", ".join(f"{b.__module__}.{b.__qualname__}" for b in cls.__mro__[1:-1]) + ")" \
            if isinstance(cls, type) else f"a {type(cls).__name__}, not a class"
        raise CLIError(f"--model {args.model} is {kind}, not a raytrainer.LightningModule. Name the "
                       "LightningModule subclass the checkpoint was trained with.")
    info = _file_info(args.checkpoint)
    if info.type != pafs.FileType.File:
        raise CLIError(f"checkpoint {args.checkpoint} does not exist" if info.type == pafs.FileType.NotFound
                       else f"checkpoint {args.checkpoint} is not a file")
    try:
        model = cls.load_from_checkpoint(args.checkpoint, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - corrupt file, wrong class, missing hparams...
        raise CLIError(f"cannot load {args.checkpoint} into {cls.__qualname__}: {type(exc).__name__}: {exc}",
                       code=1) from exc
    model.eval()
    try:
        if args.format == "onnx":
            export.to_onnx(model, args.output)
        else:
            export.to_torchscript(model, file_path=args.output, method=args.method)
    except (export.ExportError, ValueError) as exc:
        raise CLIError(f"export to {args.format} failed: {exc}", code=1) from exc
    size = _file_info(args.output).size
    print(f"wrote {args.output} ({args.format}, {size / 1024:.1f} KiB) from {args.checkpoint}")
    if args.verify:
        try:
            diff = export.verify_export(args.output, model, atol=args.atol)
        except (export.ExportError, ValueError) as exc:
            print(f"verification FAILED: {exc}", file=sys.stderr)
            return 1
        runtime = "onnxruntime" if args.output.lower().endswith(".onnx") else "torch.jit.load"
        print(f"verified with {runtime}: max abs diff {diff:.3g} vs the eager model (atol {args.atol:g})")
    return 0
