# Quick start: `make demo` runs the main job (GRPO on the shipped arithmetic checkpoint, CPU),
# `make test` runs the tests. Both create .venv on first use (torch pinned to the CPU build 2.13.0).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PLUGINS := $(wildcard plugins/miles_*)
STAMP := $(VENV)/.miles-installed

.PHONY: setup demo test test-slow lint checkpoint wheels clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(wildcard plugins/*/pyproject.toml)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]' $(foreach p,$(PLUGINS),-e $(p))
	touch $(STAMP)

demo: $(STAMP)
	rm -rf runs/demo
	$(VENV)/bin/miles train --config examples/demo.yaml --run-dir runs/demo --save runs/demo/checkpoints

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check .

checkpoint: $(STAMP)
	$(PY) examples/arith/make_checkpoint.py

# Wheels and sdists of miles-core and every plugin in dist/; install a chosen few by name from there:
# pip install --find-links dist miles-core miles-r3
wheels: $(STAMP)
	rm -rf dist
	for p in . $(PLUGINS); do $(PY) -m build --outdir dist $$p || exit 1; done
	rm -rf *.egg-info plugins/*/*.egg-info  # stale in-tree metadata would shadow the installed entry points

clean:
	rm -rf runs $(VENV)
