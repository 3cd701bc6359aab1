# `make demo`: set up a virtual environment and run expand's main job on the embedded SmolLM2.
# `make test`: set up (with the test extras: the PyTorch reference, pytest) and run the whole test suite.
# `make experiments`: rerun the studies whose results are committed under experiments/ (hours on a 2-core
# CPU; experiments/README.md lists each study's and each benchmark's own command and time).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt

STUDIES := experiments.frankenllama.run experiments.ablation.run experiments.parity_floor \
           experiments.healing.sweep experiments.healing.cli_heal experiments.healing.run

.PHONY: demo test setup experiments clean

demo: $(VENV)/.runtime
	$(BIN)/expand demo --force

test: $(VENV)/.test
	$(BIN)/python -m pytest -q -n 2

setup: $(VENV)/.test

experiments: $(VENV)/.test
	for study in $(STUDIES); do $(BIN)/python -m $$study || exit 1; done

$(VENV)/.runtime: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	touch $@

$(VENV)/.test: $(VENV)/.runtime
	$(PIP) -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) expand-demo
