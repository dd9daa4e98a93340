# The README's two commands: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch, installed before the project so that the project's torch range is
# already satisfied and pip never reaches for a multi-GB CUDA build. Where no local CPU wheel
# lies on disk, point TORCH_INDEX at a CPU wheel index (https://download.pytorch.org/whl/cpu).
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
INSTALLED := $(VENV)/.installed

export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install demo test clean

$(INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(INSTALLED)

install: $(INSTALLED)

demo: install
	$(VENV)/bin/crucible demo-data .crucible/demo-data
	$(VENV)/bin/crucible run configs/demo.yaml

test: install
	$(VENV)/bin/pytest

clean:
	rm -rf .crucible
