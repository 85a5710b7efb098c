# Two commands do everything on a fresh machine:
#   make demo   create .venv, install, run the whole pipeline offline on a few small shards
#   make test   create .venv, install with dev extras, lint, run the whole test suite
#               (it needs PostgreSQL, RabbitMQ and Chromium: README, Tests; `make test-fast` needs none)
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# torch/torchvision are pinned in pyproject.toml to the releases this workplace keeps on disk.
TAMING := taming-transformers-rom1504==0.0.6

.PHONY: demo test test-fast lint install install-dev ui clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[demo]'
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	# the taming-transformers reference for the parity test, without its pytorch-lightning/omegaconf
	# deps: we import only its Encoder and quantizer modules (they need einops, a dev extra)
	$(BIN)/pip install -q --no-deps $(TAMING)
	touch $(VENV)/.installed $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(BIN)/python -m laion_vq.demo

lint: install-dev
	$(BIN)/ruff check laion_vq laion_vq_tests benchmarks
	$(BIN)/ruff format --check laion_vq laion_vq_tests benchmarks
	$(BIN)/mypy  # mypy.ini: laion_vq and benchmarks

test: install-dev lint
	$(BIN)/python -m pytest -q --durations=15

# the edit-test loop (under 2 minutes on 2 cores): no lint, none of the tests marked `services` (PostgreSQL,
# RabbitMQ, Dagster services, Chromium) or `slow` (laion_vq_tests/conftest.py); `make test` runs them all
test-fast: install-dev
	$(BIN)/python -m pytest -q -m "not services and not slow" --durations=10

# the Dagster UI (dg dev) on DAGSTER_HOME (default: the demo's instance) with that instance's settings file
UI_PORT ?= 3000
ui: install
	DAGSTER_HOME=$${DAGSTER_HOME:-$(CURDIR)/.demo/dagster_home} $(BIN)/python -m laion_vq.ui --port $(UI_PORT)

clean:
	rm -rf $(VENV) .demo .pytest_cache
