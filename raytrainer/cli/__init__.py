"""The ``raytrainer`` console command: ``main`` (raytrainer/cli/main.py) parses and dispatches.

One module per command (fit, status, report, export); common.py holds what several share.
"""
from raytrainer.cli.common import CLIError, RunSummary, resolve_run_dir, resume_command, summarize_run
from raytrainer.cli.fit import Spinner
from raytrainer.cli.lightning_cli import LightningCLI, SaveConfigCallback
from raytrainer.cli.main import build_parser, main
from raytrainer.cli.report import _EVENT_STYLE, draw_report  # noqa: F401 - tests read the report's colours
from raytrainer.cli.status import format_status

__all__ = ["CLIError", "LightningCLI", "RunSummary", "SaveConfigCallback", "Spinner", "build_parser", "draw_report",
           "format_status", "main", "resolve_run_dir", "resume_command", "summarize_run"]
