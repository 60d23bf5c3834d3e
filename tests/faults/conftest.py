"""The fault-injection suite's options (--fault-soak N, --fault-seed KIND:SEED,...), its cases and its summary line."""
from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from fault_harness import COUNTS, KNOWN_VIOLATIONS, References, parse_cases


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fault injection (tests/faults)")
    group.addoption("--fault-soak", type=int, default=None,
                    help="run N random fault seeds instead of the default cases (env RAYTRAINER_FAULT_SOAK)")
    group.addoption("--fault-seed", default=None,
                    help="replay cases: comma-separated KIND:SEED or SEED (env RAYTRAINER_FAULT_SEED)")


def _option(config: pytest.Config, name: str, env: str) -> str | None:
    try:
        value = config.getoption(name)
    except ValueError:  # options of a conftest below the rootdir exist only when it is named on the command line
        value = None
    return value if value not in (None, "") else os.environ.get(env) or None


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "fault_case" not in metafunc.fixturenames:
        return
    soak = _option(metafunc.config, "--fault-soak", "RAYTRAINER_FAULT_SOAK")
    cases = parse_cases(_option(metafunc.config, "--fault-seed", "RAYTRAINER_FAULT_SEED"),
                        int(soak) if soak else None)
    params = []
    for kind, seed in cases:
        known = KNOWN_VIOLATIONS.get(f"{kind}:{seed}") or KNOWN_VIOLATIONS.get(kind)
        marks = [pytest.mark.xfail(strict=True, reason=known)] if known else []
        params.append(pytest.param((kind, seed), id=f"{kind}:{seed}", marks=marks))
    metafunc.parametrize("fault_case", params)


@pytest.fixture(scope="session")
def fault_refs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[References]:
    yield References(str(tmp_path_factory.mktemp("fault-refs")))


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if COUNTS.cases:
        terminalreporter.write_line(COUNTS.line())
