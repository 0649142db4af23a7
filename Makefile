# Two entry points (see README): `make demo` and `make test`. Both create a local virtual environment
# (.venv) and install everything into it first. CPU by default: torch is pinned to the CPU build.
# On a GPU machine install a CUDA build of torch into .venv first (see README) and keep it:
#   make demo TORCH_SPEC=
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(if $(TORCH_SPEC),$(BIN)/pip install -q "$(TORCH_SPEC)" numpy,$(BIN)/pip install -q numpy)
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/craft demo --out out/demo

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/craft sim-bench --json out/sim-bench.json

clean:
	rm -rf out .pytest_cache
