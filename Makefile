# Clinic edge AI appliance.  Quick start on a fresh machine: `make run`, `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEBS := dcmtk orthanc orthanc-dicomweb chromium
PYTEST_ARGS ?=

.PHONY: setup debs run test bench clean

setup: $(STAMP) debs

# Debian packages: install only what is missing (idempotent, no network when all present).
debs:
	@missing=""; \
	command -v storescu >/dev/null && command -v dcmsend >/dev/null || missing="$$missing dcmtk"; \
	command -v Orthanc >/dev/null || missing="$$missing orthanc"; \
	ls /usr/share/orthanc/plugins/libOrthancDicomWeb.so >/dev/null 2>&1 || missing="$$missing orthanc-dicomweb"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# PyTorch is for training and benchmark baselines only, never an appliance dependency.
$(BENCH_STAMP): $(STAMP) requirements-train.txt
	$(PY) -m pip install -q -r requirements-train.txt
	touch $(BENCH_STAMP)

run: setup
	$(VENV)/bin/appliance serve

# Type check first (settings: [tool.mypy] in pyproject.toml): a type error fails the target.
test: setup
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

bench: setup $(BENCH_STAMP)
	set -e; for script in scripts/bench_*.py; do echo "== $$script"; $(PY) $$script; done

clean:
	rm -rf $(VENV) build *.egg-info
