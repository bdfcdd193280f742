# The two newcomer commands: `make demo` (set up + run the main job on the embedded default) and
# `make test` (set up + run the tests). Both create .venv on a fresh machine and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch/torchvision that import together on this kind of machine (a CUDA build that also runs on CPU);
# override on other machines, e.g. `make test TORCH_SPEC="torch torchvision"`.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: install system-deps lint check-defs test demo ui bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip wheel setuptools

$(VENV)/.installed: $(PY) pyproject.toml
	$(PIP) install $(TORCH_SPEC)
	$(PIP) install -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# Debian's Chromium renders the evaluation report in a browser test, and Debian's PostgreSQL backs Dagster and MLflow
# in the deployment test (each skipped, with the reason, if it cannot be installed).
system-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the report browser test"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	    || echo "WARNING: could not install chromium; the browser test will be skipped"; }
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  echo "installing Debian's postgresql for the Postgres deployment test"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) \
	    || echo "WARNING: could not install postgresql; the Postgres deployment test will be skipped"; }

test: install system-deps lint check-defs
	$(PY) -m pytest $(PYTEST_ARGS)

# Dagster's own check that every definition under pipeline/defs loads (the dg project: [tool.dg] in pyproject.toml)
check-defs: install
	VIRTUAL_ENV=$(abspath $(VENV)) $(VENV)/bin/dg check defs

# the rules are [tool.ruff] in pyproject.toml; the formatter's output is the house style (`ruff format .` applies it)
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

demo: install
	$(VENV)/bin/ldm demo

ui: install
	$(VENV)/bin/ldm ui

bench: install
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
