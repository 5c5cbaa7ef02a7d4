# The two commands: `make quickstart` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# This machine's pip serves torch 2.14.1 / torchvision 0.29.1 from local disk; elsewhere any recent torch works.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

export RAY_USAGE_STATS_ENABLED ?= 0
export RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS ?= 0

.PHONY: quickstart test install clean

$(BIN)/dartsweep: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch, torchvision" 2>/dev/null || \
		$(BIN)/python -m pip install -q $(TORCH_PINS) || $(BIN)/python -m pip install -q torch torchvision
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/dartsweep

quickstart: install
	$(BIN)/dartsweep sweep up quickstart --storage ./results
	$(BIN)/dartsweep sweep status results/quickstart
	@echo "Next: $(BIN)/dartsweep report results/quickstart  (one page; or analyze: files)"

# Most of the suite waits on Ray, SLURM and subprocesses: two workers, each taking whole files (a file's
# tests share module fixtures: the SLURM cluster, the S3 server, the MLflow server). PYTEST_WORKERS=0: serial.
PYTEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
