# The README's two commands: `make demo` and `make test`. Both create .venv when missing.
# `make services` / `make demo-on-services` / `make services-down`: the same pipeline against
# a Prefect server + worker, an MLflow server, a 2-node Ray cluster and an S3 server on this machine.
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

# Where `make services` keeps its state and the env file it writes (deployments/services.py).
SERVICES_ENV = $${CRUCIBLE_HOME:-.crucible}/services/env

.PHONY: install demo finetune test clean services services-down demo-on-services

$(INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -e ".[dev]"
	@# The browser of tests/services/test_ui.py: Debian's chromium, where this runs as root with apt
	@# (CI); elsewhere that test skips, saying why. Playwright itself never downloads a browser.
	@if command -v chromium >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "chromium not installed (needs root and apt-get): tests/services/test_ui.py will skip"; fi
	@# The code-evaluation sandbox (tasks/eval/sandbox.py): Debian's bubblewrap, the same way.
	@if command -v bwrap >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null; \
	else echo "bubblewrap not installed (needs root and apt-get): the code sandbox falls back to its own namespaces and audit hook"; fi
	touch $(INSTALLED)

install: $(INSTALLED)

demo: install
	$(VENV)/bin/crucible demo-data .crucible/demo-data
	$(VENV)/bin/crucible run configs/demo.yaml

# LoRA SFT + DPO from a checkpoint outside the store: the demo's pretrained model, copied by
# demo-data once `make demo` has made it (configs/finetune.yaml says how to use a downloaded model).
finetune: install
	$(VENV)/bin/crucible demo-data .crucible/demo-data
	$(VENV)/bin/crucible run configs/finetune.yaml

test: install
	$(VENV)/bin/pytest

services: install
	$(PY) -m deployments.services up

services-down:
	$(PY) -m deployments.services down

# The demo as an operator runs it: the full-pipeline deployment (demo config by default),
# triggered through the Prefect API and run by the worker against the services.
demo-on-services: install
	@test -f "$(SERVICES_ENV)" || { echo "no $(SERVICES_ENV): run 'make services' first"; exit 1; }
	$(VENV)/bin/crucible demo-data .crucible/demo-data
	. "$(SERVICES_ENV)" && $(VENV)/bin/prefect deployment run pipeline/full-pipeline --watch

clean:
	rm -rf .crucible
