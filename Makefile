# `make demo`: set up a virtual environment and run expand's main job on the embedded SmolLM2.
# `make test`: set up (with the test extras: the PyTorch reference, pytest) and run the whole test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: demo test setup clean

demo: $(VENV)/.runtime
	$(BIN)/expand demo --force

test: $(VENV)/.test
	$(BIN)/python -m pytest -q -n 2

setup: $(VENV)/.test

$(VENV)/.runtime: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	touch $@

$(VENV)/.test: $(VENV)/.runtime
	$(PIP) -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) expand-demo
