# Two commands do everything (each creates/updates the project-local .venv first):
#   make train            # python train.py model=savi_ift on the bundled digits data
#   make test             # the test suite (what CI runs)
#   make python-versions  # fresh venvs on Python 3.12 and 3.13: install + train debug=fast (results/)
#   make gpu-check        # on a CUDA machine: every model, DDP and the benchmarks, short (benchmarks/gpu_check.py)
# Extra arguments: make train ARGS="model=vae trainer.max_epochs=5", make test PYTEST_ARGS="-m slow",
#   make gpu-check GPU_CHECK_ARGS="--only 'train:*' --jobs 8"

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed-stamp
ARGS ?= model=savi_ift
PYTEST_ARGS ?=
GPU_CHECK_ARGS ?=

.PHONY: venv train eval test test-slow gpu-check bench results-check clean constraints python-versions

# The tested versions: constraints.txt (pyproject.toml holds compatible ranges).
$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install -c constraints.txt -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

train: $(STAMP)
	$(VENV)/bin/python train.py $(ARGS)

eval: $(STAMP)
	$(VENV)/bin/python eval.py $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(VENV)/bin/python -m pytest -m slow $(PYTEST_ARGS)

gpu-check: $(STAMP)
	$(VENV)/bin/python benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

# Lists every result in benchmarks/results whose measured sources changed since it was produced (or that
# has no provenance, or came from uncommitted sources); exits non-zero if any is stale.
results-check: $(STAMP)
	$(VENV)/bin/python -m ift.bench check

# Rewrite constraints.txt from the working .venv (after an upgrade that passed `make test`).
constraints: $(STAMP)
	{ sed -n '/^#/p' constraints.txt; $(VENV)/bin/python -m pip freeze --all --exclude-editable | grep -v ' @ ' | grep -v '^pip=='; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

# Fresh venvs on Python 3.12 and 3.13 (pyenv): install with constraints.txt, train debug=fast.
python-versions:
	scripts/check_python_versions.sh

clean:
	rm -rf $(VENV) outputs logs .pytest_cache
