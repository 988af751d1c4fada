# `make demo` and `make test` are the whole set-up: the first run creates .venv and installs into it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
OUT    ?= report

# torch/torchvision are pinned to the pair that installs from this machine class's local wheel cache
# (x86_64, Python 3.11) without a multi-GB download, and whose torchvision imports cleanly beside it:
# PyPI's torchvision does not import beside the local CPU-only torch 2.13.0 wheel.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: demo demo-quick test lint format bench clean

$(BIN)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH_PINS)
	$(BIN)/python -m pip install --quiet -e '.[test]' $(TORCH_PINS)
	touch $@

demo: $(BIN)/.installed
	$(BIN)/pvae demo --out $(OUT)

demo-quick: $(BIN)/.installed
	$(BIN)/pvae demo --quick --out $(OUT)

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest

format: $(BIN)/.installed
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/toy_svi.py

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .ruff_cache
