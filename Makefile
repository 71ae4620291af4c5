# `make demo` and `make test` work on a fresh machine: both create .venv and install first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# A second environment with jax[tpu] (libtpu, ~700 MB): the Pallas kernels' real TPU compile
# (tests/test_kernels_compile.py) needs it and cannot share a process with the CPU jax.
TPU_VENV := .venv-tpu
TPU_STAMP := $(TPU_VENV)/.installed

.PHONY: demo test install tpu-env clean browser

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,interop,viz]'
	touch $(STAMP)

install: $(STAMP)

$(TPU_STAMP): pyproject.toml
	$(PYTHON) -m venv $(TPU_VENV)
	$(TPU_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(TPU_VENV)/bin/python -m pip install --quiet "jax[tpu]==0.10.2"
	$(TPU_VENV)/bin/python -m pip install --quiet -e .  # with the runtime deps: the sharded compile plan imports paligemma.fast
	touch $(TPU_STAMP)

tpu-env: $(TPU_STAMP)

# Headless Chromium and its driver from Debian (as root) for the tests that open pages.
browser:
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium chromium-driver)

demo: $(STAMP)
	$(PY) -m paligemma.cli demo

test: $(STAMP) $(TPU_STAMP) browser
	PALIGEMMA_REQUIRE_TPU=1 PALIGEMMA_REQUIRE_CPU_KERNELS=1 PALIGEMMA_REQUIRE_BROWSER=1 $(PY) -m pytest -q -n 2 tests

clean:
	rm -rf $(VENV) $(TPU_VENV) build *.egg-info .pytest_cache .hypothesis
