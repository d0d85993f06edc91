# Quickstart targets. Each installs what it needs into .venv at the tested versions of constraints.txt (torch first:
# the CPU build on this disk; an unconstrained torch would pull a CUDA build of several GB).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export MNKPIPE_DATA ?= $(abspath ../shared/data/omniglot)
RUNS ?= runs

.PHONY: install test demo bench clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch
	$(BIN)/pip install -q -c constraints.txt -e '.[test,s3]'
	touch $@

install: $(BIN)/.installed

# ruff first (120 columns, pyproject.toml); pytest exits 5 when it collected no test: that must fail, not pass.
test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

demo: install
	$(BIN)/mnkpipe gram --n 8 --depth 10
	$(BIN)/mnkpipe compute-kernel --config configs/smoke.toml --store $(RUNS)/smoke.zarr
	$(BIN)/mnkpipe status $(RUNS)/smoke.zarr
	$(BIN)/mnkpipe verify $(RUNS)/smoke.zarr
	$(BIN)/mnkpipe evaluate --store $(RUNS)/smoke.zarr --config configs/omniglot-5w1s-cpu.toml \
		--labels onehot,embedding --train-tasks 1,2,4 --seeds 2 --no-progress
	$(BIN)/mnkpipe baselines --store $(RUNS)/smoke.zarr --config configs/omniglot-5w1s-cpu.toml \
		--train-tasks 1,2,4 --meta-steps 10 --no-progress
	$(BIN)/mnkpipe report --store $(RUNS)/smoke.zarr

bench: install
	$(BIN)/python bench/cntk_cpu.py

clean:
	rm -rf $(RUNS) .pytest_cache
