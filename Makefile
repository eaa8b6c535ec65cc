# Set-up, the main job, tests and lint, run the same way by everyone (and CI: .ci/run).
#   make run [WORKDIR=runs/x] [ARGS="--config.train.num_steps=500"] [RESUME=1]
#   make test [PYTEST_ARGS="-k corpus"]    make lint    make clean

PYTHON ?= $(shell command -v python3.11 >/dev/null 2>&1 && echo python3.11 || echo python3)
VENV ?= .venv
VENV_PYTHON := $(VENV)/bin/python
# Stamp of the last `pip install`; it is redone only when pyproject.toml is newer.
INSTALLED := $(VENV)/.installed

CONFIG ?= experiments/shakespeare_char.py
WORKDIR ?= runs/shakespeare_char
ARGS ?=
RESUME ?= 0
PYTEST_ARGS ?=

.PHONY: venv run test lint format clean

venv: $(INSTALLED)

$(VENV_PYTHON):
	$(PYTHON) -m venv $(VENV)
	$(VENV_PYTHON) -m pip install --upgrade pip

$(INSTALLED): pyproject.toml | $(VENV_PYTHON)
	$(VENV_PYTHON) -m pip install -e ".[dev]"
	touch $@

# The main job starts fresh: an existing workdir would resume from its last checkpoint,
# which for a finished run means stopping at once. RESUME=1 keeps it.
run: $(INSTALLED)
	@test -n "$(strip $(WORKDIR))" || { echo "WORKDIR is empty" >&2; exit 2; }
ifneq ($(RESUME),1)
	rm -rf -- "$(WORKDIR)"
endif
	$(VENV_PYTHON) -m train --config $(CONFIG) --workdir "$(WORKDIR)" $(ARGS)

# Tests that need several (fake) devices set XLA_FLAGS in their own subprocess.
test: $(INSTALLED)
	JAX_PLATFORMS=cpu $(VENV_PYTHON) -m pytest -q -n 2 --dist loadfile $(PYTEST_ARGS)

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(INSTALLED)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Caches and build outputs; the venv and runs/ stay (rm -rf .venv for a fresh set-up).
clean:
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
	rm -rf .pytest_cache .ruff_cache build *.egg-info .ipynb_checkpoints notebooks/.ipynb_checkpoints
