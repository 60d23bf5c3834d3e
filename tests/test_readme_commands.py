"""Issue 19 item 3: every shell command in README.md and cluster/README.md runs as written.

The commands are read from the documents' ```bash/```sh/```console blocks (the two at the very top of README.md
included). Each one is either run here, in document order, in a fresh copy of the repository (the test's venv
stands in for the ``.venv`` that ``make`` creates), or listed in SKIPPED with the reason it cannot run here; a
command in neither list fails the test, so a new command is run or knowingly skipped. Only small limits are added
to a command (EXTRA); the command itself is never edited to pass.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = ("README.md", "cluster/README.md")
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}

_CLI = "python examples/lightning_cli.py fit -c examples/lightning_cli.yaml"
# Commands run here, each mapped to what is appended to it: a smaller number of epochs where the script allows it.
RUN = {
    "make demo": "",
    "raytrainer export runs/autoencoder/lightning_logs/version_0/checkpoints/last.ckpt --model "
    "examples/autoencoder.py:LitAutoEncoder --format onnx --output model.onnx --verify": "",
    f"{_CLI} --model.lr 0.01 --data.batch_size 32": " --trainer.max_epochs 1",
    f"{_CLI} --trainer.num_processes 2": " --trainer.max_epochs 1",
    f"{_CLI} --optimizer SGD --optimizer.lr 0.1": " --trainer.max_epochs 1",
    "python examples/lightning_cli.py test -c examples/lightning_cli.yaml --ckpt_path last": "",
    f"{_CLI} --print_config > full.yaml": "",
    "raytrainer fit examples/lightning_cli.py --num-processes 2 -- fit -c examples/lightning_cli.yaml":
        " --trainer.max_epochs 1",
    "ray get-auth-token --generate": "",  # writes the token into this test's own HOME
    "make lint": "",
}
_ON_THE_LOCAL_CLUSTER = "tests/cluster/test_ray_up.py runs it on cluster/local.yaml, the same way"
_NEEDS_THE_CLUSTER = "needs the cluster `ray up` starts and its dashboard tunnel"
SKIPPED = {
    "make test": "the whole test suite, this test included (about 11 minutes); CI runs it",
    "make test-fast": "the test suite without the slow tests, this test's file included; CI runs `make test`",
    "make test-xla": "builds a second venv with torch_xla (about 7 GB downloaded); CI runs it",
    "ray up -y cluster/aws.yaml": "starts EC2 machines: needs an AWS account and credentials; "
                                  f"{_ON_THE_LOCAL_CLUSTER}",
    "ray dashboard cluster/aws.yaml": f"an SSH tunnel to the head of the AWS cluster; {_NEEDS_THE_CLUSTER}",
    "ray down -y cluster/aws.yaml": f"stops the AWS cluster; {_ON_THE_LOCAL_CLUSTER}",
    "raytrainer fit examples/autoencoder.py --address http://127.0.0.1:8265 --num-nodes 2:4 -- --default_root_dir "
    "s3://YOUR-BUCKET/runs/autoencoder": f"{_NEEDS_THE_CLUSTER}, and an S3 bucket; {_ON_THE_LOCAL_CLUSTER}",
    "raytrainer fit examples/parquet_classifier.py --address http://127.0.0.1:8265 --num-nodes 2:4 -- --data "
    "s3://YOUR-BUCKET/data/tabular --default_root_dir s3://YOUR-BUCKET/runs/tabular":
        f"{_NEEDS_THE_CLUSTER}, and an S3 bucket; tests/test_examples.py runs the script on 2 Ray ranks on a local "
        "S3 server",
    "raytrainer status s3://YOUR-BUCKET/runs/autoencoder": "needs the run in your S3 bucket; tests/cli/test_cli.py "
                                                           "runs status and report on a run in a local S3 server",
    "raytrainer report s3://YOUR-BUCKET/runs/autoencoder --output report.png":
        "needs the run in your S3 bucket; tests/cli/test_cli.py runs status and report on a run in a local S3 server",
}


def shell_commands(text: str) -> list[str]:
    """The commands of a Markdown document's shell blocks, in order: continuation lines joined, trailing comments,
    blank lines and console prompts and output left out."""
    commands: list[str] = []
    language: str | None = None
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        fence = re.fullmatch(r"```\s*([\w-]*).*", line)
        if fence:
            language = fence.group(1).lower() if language is None else None
            continue
        if language not in SHELL_LANGUAGES:
            continue
        if language == "console" and not pending:
            if not line.startswith("$ "):
                continue  # output
            line = line[2:]
        line = re.sub(r"(^|\s)#(\s.*)?$", "", line).strip()  # a comment after the command, or a comment line
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        command = " ".join((pending + line).split())
        pending = ""
        if command:
            commands.append(command)
    return commands


def test_shell_commands_parses_blocks_continuations_and_prompts() -> None:
    text = ("```bash\nmake demo   # trains\n# a comment line\n\nraytrainer fit a.py \\\n    -- --x 1\n```\n"
            "```python\nimport raytrainer\n```\n   ```console\n   $ ray up -y c.yaml\n   output line\n   ```\n"
            "```\nplain block\n```\n")
    assert shell_commands(text) == ["make demo", "raytrainer fit a.py -- --x 1", "ray up -y c.yaml"]


def documented() -> list[tuple[str, str]]:
    """(document, command) for every command of the documents, in order."""
    return [(doc, cmd) for doc in DOCUMENTS for cmd in shell_commands((REPO / doc).read_text())]


def test_every_documented_command_is_run_or_knowingly_skipped() -> None:
    found = documented()
    assert any(cmd == "make demo" for _, cmd in found)  # the parser still finds the top of README.md
    unclassified = [f"{doc}: {cmd}" for doc, cmd in found if cmd not in RUN and cmd not in SKIPPED]
    assert not unclassified, ("commands neither run nor skipped with a reason; add each to RUN or SKIPPED in "
                              f"{Path(__file__).name}:\n" + "\n".join(unclassified))
    listed = {cmd for _, cmd in found}
    stale = sorted((set(RUN) | set(SKIPPED)) - listed)
    assert not stale, f"no longer in the documents; remove from {Path(__file__).name}: {stale}"


def _fresh_copy(dest: Path) -> None:
    """The repository's files as a clone with the working tree's edits would have them (no runs, no venv)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


@pytest.mark.slow
def test_the_documented_commands_run_as_written(tmp_path: Path) -> None:
    work, home = tmp_path / "repo", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    _fresh_copy(work)
    (work / ".venv").symlink_to(sys.prefix)  # the venv `make` would create: this test's, already installed
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "HOME": str(home),  # ~/.ray/auth_token and other per-user files stay in the test
           "RAY_ADDRESS": "local",  # a Ray instance of this test's own, not one another process left running
           "MAKEFLAGS": "--old-file=.venv/.installed",  # installed: make never reinstalls the shared venv
           "OMP_NUM_THREADS": "1"}
    env.pop("VIRTUAL_ENV", None)
    ran = []
    for doc, command in documented():
        if command in SKIPPED:
            continue
        started = time.monotonic()
        result = subprocess.run(["bash", "-c", command + RUN[command]], cwd=work, env=env, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, (f"{doc}: `{command}` failed with exit status {result.returncode}:\n"
                                        f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        ran.append((command, round(time.monotonic() - started, 1)))
    print("\n".join(f"{seconds:6.1f} s  {command}" for command, seconds in ran))
    assert (work / "model.onnx").stat().st_size > 0
    assert "trainer:" in (work / "full.yaml").read_text()
    assert (home / ".ray" / "auth_token").stat().st_size > 0
