"""tests/xla run only in the torch_xla venv (`make test-xla`), on XLA's CPU backend (PJRT_DEVICE=CPU).

torch_xla cannot start multi-device ranks once this process has used an XLA device, so the tests
marked ``xla_launch`` (they fork ranks) run before the in-process ones, whatever order pytest chose.
"""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("PJRT_DEVICE", "CPU")  # before torch_xla starts its runtime
NO_XLA = "torch_xla is not installed here: run these tests with `make test-xla`"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "xla_launch: starts ranks with torch_xla.launch; runs before in-process XLA")
    # xm.rendezvous (our object collectives) calls torch_xla's own deprecated xla_device()
    config.addinivalue_line("filterwarnings", "ignore:Use torch_xla.device instead:DeprecationWarning")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.get_closest_marker("xla_launch") is None)  # stable: keeps file order otherwise


@pytest.fixture
def fresh_runtime() -> None:
    """Fail clearly (instead of in torch_xla) when an earlier test already initialised the XLA runtime here."""
    torch_xla = pytest.importorskip("torch_xla", reason=NO_XLA)
    if torch_xla._XLAC._xla_runtime_is_initialized():
        pytest.fail("the XLA runtime of this pytest process is already initialised, so torch_xla.launch cannot "
                    "start ranks; mark the test @pytest.mark.xla_launch so it runs before in-process XLA tests")
