# make demo / make test work on a fresh machine: they create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch; override (e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu") elsewhere.
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
PYTEST_ARGS ?=

.PHONY: install test demo lint format clean

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	@touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m ruff check moa_hub modeling kernels tests benchmarks examples
	HF_TOKEN="" HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false $(PY) -m pytest -q $(PYTEST_ARGS)

demo: install
	HF_TOKEN="" HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false $(PY) examples/demo/run_demo.py

lint: install
	$(PY) -m ruff check moa_hub modeling kernels tests benchmarks examples
	$(PY) -m ruff format --check moa_hub modeling kernels tests benchmarks examples

format: install
	$(PY) -m ruff format moa_hub modeling kernels tests benchmarks examples
	$(PY) -m ruff check --fix moa_hub modeling kernels tests benchmarks examples

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
