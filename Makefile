# Two entry points, each setting up .venv on first use (quick when already set up):
#   make demo   - a local two-worker swarm of SmolLM2-135M generating text
#   make test   - the whole test suite
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: setup browser demo test test-quick bench

setup: $(STAMP) browser

$(STAMP): requirements.lock pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps -r requirements.lock
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Debian's headless Chromium and its driver for the page tests (tests/test_api.py); only as root with apt-get,
# and never fatal: without them those tests skip. Quick once installed.
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium and chromium-driver for the browser tests ..."; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) \
	    >/dev/null 2>&1 || echo "could not install chromium; the browser tests will skip"; \
	else echo "no chromium (installing it needs root and apt-get); the browser tests will skip"; fi

demo: $(STAMP)
	$(VENV)/bin/corolla demo $(ARGS)

test: $(STAMP) browser
	$(VENV)/bin/python -m pytest $(ARGS)

test-quick: $(STAMP)
	$(VENV)/bin/python -m pytest -m 'not slow' $(ARGS)
