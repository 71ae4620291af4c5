# `make demo` and `make test` work on a fresh machine: both create .venv and install first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,interop]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m paligemma.ref.demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
