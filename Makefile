# Two entry points, each setting up .venv on first use (quick when already set up):
#   make demo   - a local two-worker swarm of SmolLM2-135M generating text
#   make test   - the whole test suite
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: setup demo test test-quick bench

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps -r requirements.lock
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/corolla demo $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest $(ARGS)

test-quick: $(STAMP)
	$(VENV)/bin/python -m pytest -m 'not slow' $(ARGS)
