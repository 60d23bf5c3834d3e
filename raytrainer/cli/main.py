"""The raytrainer command: train a script here or on a Ray cluster, summarize and plot a run, export a model.

    raytrainer fit SCRIPT.py [--address URL] [--num-nodes MIN:MAX] [--num-processes N] [-- SCRIPT ARGS]
    raytrainer status RUN_DIR_OR_URI [--json]
    raytrainer report RUN_DIR_OR_URI --output report.png
    raytrainer export CKPT --model pkg.module:ClassName --format onnx|torchscript --output FILE [--verify]
    raytrainer consolidate CKPT_DIR OUT.ckpt

A run directory is what a Trainer writes: ``<default_root_dir>/lightning_logs/version_N`` with
``events.jsonl``, ``metrics.csv``, ``hparams.yaml`` and ``checkpoints/``. ``status`` and ``report``
also take the ``default_root_dir`` itself (its newest version is used), and any URI that
``raytrainer.io.storage`` reads (``s3://``, ``gs://``, ``file://``...).

Exit status: 0 on success; 1 when the work failed (a failed job, an export that does not verify);
2 for bad input (a missing or unreadable run directory, a malformed argument). ``fit`` returns the
script's (or the Ray job's) own exit status.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from raytrainer.cli.common import CLIError
from raytrainer.cli.consolidate import cmd_consolidate
from raytrainer.cli.export import cmd_export
from raytrainer.cli.fit import DEFAULT_CONNECT_TIMEOUT_S, DEFAULT_START_TIMEOUT_S, _check_range, _positive_int, cmd_fit
from raytrainer.cli.report import cmd_report
from raytrainer.cli.status import cmd_status

__all__ = ["build_parser", "main"]

_FIT_EXAMPLES = """examples:
  raytrainer fit examples/autoencoder.py -- --max_epochs 5
  raytrainer fit examples/autoencoder.py --num-processes 2 -- --max_epochs 5 --ckpt_path none
  raytrainer fit examples/autoencoder.py --address http://127.0.0.1:8265 --num-nodes 2:4 \\
      -- --default_root_dir s3://my-bucket/runs/autoencoder

Everything after `--` goes to the script unchanged. --num-nodes/--num-processes become the
script's --num_nodes/--num_processes. With --address the working directory is uploaded and the
script runs as a Ray job (a thin layer over `ray job submit`); its logs stream here and its exit
status is returned. The address is the dashboard's: `ray dashboard cluster/aws.yaml` forwards it
to http://127.0.0.1:8265. A token in ~/.ray/auth_token (or RAY_AUTH_TOKEN_PATH) is sent along.
"""

_STATUS_EXAMPLES = """examples:
  raytrainer status runs/autoencoder                        # newest lightning_logs/version_N in it
  raytrainer status runs/autoencoder/lightning_logs/version_3
  raytrainer status s3://my-bucket/runs/autoencoder --json

Prints the state (finished, failed, preempted, running, interrupted), step and epoch, world size
over time, failures, resizes, the newest checkpoint that verifies and the command that resumes.
"""

_REPORT_EXAMPLES = """examples:
  raytrainer report runs/autoencoder --output report.png
  raytrainer report s3://my-bucket/runs/autoencoder/lightning_logs/version_0 --output s3://my-bucket/report.png

Top: every *loss* column of metrics.csv over steps (failures and preemptions as dashed lines).
Bottom: world size over time with failures, resizes, restarts, checkpoints and preemptions marked.
"""

_EXPORT_EXAMPLES = """examples:
  raytrainer export runs/autoencoder/lightning_logs/version_0/checkpoints/last.ckpt \\
      --model examples.autoencoder:LitAutoEncoder --format onnx --output autoencoder.onnx --verify
  raytrainer export last.ckpt --model mypkg.models:LitModel --format torchscript --output model.pt

--model names the LightningModule class the checkpoint was trained with (pkg.module:ClassName,
imported from the current directory or PYTHONPATH; path/to/file.py:ClassName works too). The
module is rebuilt with ClassName.load_from_checkpoint and exported with its example_input_array.
--verify runs the exported file (onnxruntime or torch.jit.load) against the eager model.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `raytrainer` command and its subcommands."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="raytrainer", description=__doc__.split("\n\n")[0], formatter_class=fmt,
                                     epilog="Run `raytrainer COMMAND --help` for each command's options and examples.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    fit = sub.add_parser("fit", help="run a training script here or as a Ray job on a cluster",
                         usage="raytrainer fit SCRIPT [options] [-- SCRIPT ARGS...]",
                         description="Run a training script locally, or on a Ray cluster with --address.",
                         epilog=_FIT_EXAMPLES, formatter_class=fmt)
    fit.add_argument("script", help="the training script, e.g. examples/autoencoder.py")
    fit.add_argument("--address", help="the cluster's dashboard address (http://HOST:8265); omit to run here")
    fit.add_argument("--num-nodes", type=_check_range, metavar="N|MIN:MAX",
                     help="nodes to train on, or an elastic range (passed as --num_nodes)")
    fit.add_argument("--num-processes", type=_positive_int, metavar="N",
                     help="ranks per node on CPU (passed as --num_processes)")
    fit.add_argument("--working-dir", metavar="DIR",
                     help="the folder shipped to the cluster and run in (default: the current directory)")
    fit.add_argument("--timeout", type=float, metavar="SECONDS",
                     help="stop waiting after this long (default: wait for the run to end)")
    fit.add_argument("--connect-timeout", type=float, default=DEFAULT_CONNECT_TIMEOUT_S, metavar="SECONDS",
                     help=f"how long to wait for the cluster to answer (default {DEFAULT_CONNECT_TIMEOUT_S:.0f})")
    fit.add_argument("--start-timeout", type=float, default=DEFAULT_START_TIMEOUT_S, metavar="SECONDS",
                     help=f"how long a submitted job may stay pending (default {DEFAULT_START_TIMEOUT_S:.0f})")
    fit.add_argument("--no-wait", action="store_true", help="with --address: submit, print the job id, return")

    status = sub.add_parser("status", help="summarize a run: state, progress, failures, how to resume",
                            description="Summarize a run from its events log, metrics and checkpoints.",
                            epilog=_STATUS_EXAMPLES, formatter_class=fmt)
    status.add_argument("run", metavar="RUN_DIR_OR_URI", help="a run directory or a default_root_dir (path or URI)")
    status.add_argument("--json", action="store_true", help="print the summary as JSON")

    report = sub.add_parser("report", help="draw loss curves and the world-size timeline of a run as a PNG",
                            description="Draw a run's loss curves and its world-size timeline into one PNG.",
                            epilog=_REPORT_EXAMPLES, formatter_class=fmt)
    report.add_argument("run", metavar="RUN_DIR_OR_URI", help="a run directory or a default_root_dir (path or URI)")
    report.add_argument("--output", "-o", required=True, help="where to write the PNG (path or URI)")

    exp = sub.add_parser("export", help="export a checkpoint to ONNX or TorchScript",
                         description="Export a trained checkpoint to ONNX or TorchScript without writing Python.",
                         epilog=_EXPORT_EXAMPLES, formatter_class=fmt)
    exp.add_argument("checkpoint", metavar="CKPT", help="the checkpoint file (path or URI)")
    exp.add_argument("--model", required=True, metavar="pkg.module:ClassName",
                     help="the LightningModule class the checkpoint was trained with")
    exp.add_argument("--format", required=True, choices=("onnx", "torchscript"))
    exp.add_argument("--output", "-o", required=True, help="the file to write (path or URI)")
    exp.add_argument("--method", choices=("script", "trace"), default="script",
                     help="TorchScript only: torch.jit.script (default) or trace with example_input_array")
    exp.add_argument("--verify", action="store_true", help="run the exported file and compare with the eager model")
    exp.add_argument("--atol", type=float, default=1e-5, help="--verify tolerance, max abs diff (default 1e-5)")

    cons = sub.add_parser("consolidate", help="merge a sharded (FSDP) checkpoint directory into one .ckpt file",
                          description="Verify a sharded checkpoint directory (raytrainer's or Lightning's FSDP "
                          "layout) and write one Lightning-format checkpoint with plain tensors, for "
                          "load_from_checkpoint, trainer.predict and raytrainer export. Needs no GPU; the whole "
                          "model and optimizer state must fit in memory.", formatter_class=fmt)
    cons.add_argument("checkpoint_dir", metavar="CKPT_DIR", help="the sharded checkpoint directory")
    cons.add_argument("output", metavar="OUT.ckpt", help="the file to write (path or URI)")
    cons.add_argument("--force", action="store_true", help="replace OUT.ckpt if it exists")
    cons.add_argument("--trust", action="store_true",
                      help="allow pickled Python objects in meta.pt (only for checkpoints you trust)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `raytrainer` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, script_args = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = build_parser()
    args = parser.parse_args(ours)
    if script_args and args.command != "fit":
        parser.error(f"`--` passes arguments to a training script; `raytrainer {args.command}` takes none")
    try:
        if args.command == "fit":
            return cmd_fit(args, script_args, argv)
        if args.command == "status":
            return cmd_status(args)
        if args.command == "report":
            return cmd_report(args)
        if args.command == "export":
            return cmd_export(args)
        if args.command == "consolidate":
            return cmd_consolidate(args)
    except CLIError as exc:
        print(f"raytrainer {args.command}: error: {exc}", file=sys.stderr)
        return exc.code
    except BrokenPipeError:  # `raytrainer status ... | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    raise AssertionError(f"unhandled command {args.command}")
