# Every target creates .venv on first use, so a fresh clone needs only `make demo` or `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

XLA_VENV := .venv-xla
XLA_BIN := $(XLA_VENV)/bin
XLA_STAMP := $(XLA_VENV)/.installed

.PHONY: demo test test-fast test-xla lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch first, so no dependency drags in a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/autoencoder.py --num_processes 2 --max_epochs 5 --ckpt_path none

# The architecture contracts (import-linter, see docs/architecture.md) and ruff, then the tests.
lint: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/ruff check raytrainer tests benchmarks examples

test: lint
	$(BIN)/python -m pytest -q tests --ignore=tests/xla --durations=40

test-fast: lint
	$(BIN)/python -m pytest -q tests --ignore=tests/xla -m "not slow"

# The TPU path, on torch_xla's CPU backend, in its own venv: torch_xla 2.9.0 pins torch==2.9.0, whose
# PyPI build pulls CUDA libraries (about 7 GB in all; 4-6 min to build from nothing).
$(XLA_STAMP): pyproject.toml
	test -x $(XLA_BIN)/python || $(PY) -m venv $(XLA_VENV)
	$(XLA_BIN)/pip install -q --upgrade pip
	$(XLA_BIN)/pip install -q torch==2.9.0 torch_xla==2.9.0
	$(XLA_BIN)/pip install -q -e ".[tpu]" pytest pytest-timeout scikit-learn
	touch $(XLA_STAMP)

test-xla: $(XLA_STAMP)
	PJRT_DEVICE=CPU $(XLA_BIN)/python -m pytest -q tests/xla

bench: $(STAMP)
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) $(XLA_VENV) lightning_logs
