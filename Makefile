# Two commands do all the set-up (see README):
#   make run  DATA_DIR=../shared/data   # environment + the main job on the default tracking store
#   make test DATA_DIR=../shared/data   # environment + the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA_DIR ?=
ifneq ($(strip $(DATA_DIR)),)
export FEWSHOT_DATA_DIR := $(abspath $(DATA_DIR))
endif

.PHONY: setup run test lint ui clean-store dashboard mlproject
DASHBOARD_PORT ?= 8080
STORAGE ?=

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

setup: $(BIN)/.installed

run: setup
	$(BIN)/python -m entrypoints.main

test: setup
	$(BIN)/python -m pytest -q tests

lint: setup
	$(BIN)/ruff check .

# MLflow's default store of this folder (mlflow.db, artifacts in mlruns/): where `mlflow run .`,
# `python -m entrypoints.<job>` and `make run` log unless MLFLOW_TRACKING_URI says otherwise
ui: setup
	cd $(CURDIR) && $(BIN)/mlflow ui --host 127.0.0.1 --port 5000

# optuna-dashboard on the study storage (default: the one `hpo` uses; STORAGE=journal:///f.log works too)
dashboard: setup
	$(BIN)/python -m fewshot.hpo.dashboard --port $(DASHBOARD_PORT) $(if $(STORAGE),--storage $(STORAGE))

# MLproject and conda.yaml from the click commands and pyproject.toml (a test fails when they drift)
mlproject: setup
	$(BIN)/python scripts/gen_mlproject.py
