# csgguard: the two commands (README) and a few helpers.
#   make demo   set up .venv if needed, then train -> attack -> fit -> screen on scikit-learn's digits
#   make test   set up .venv if needed, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   ?= demo-out

.PHONY: demo test install lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(BIN)/python -m csgguard.demo --out $(DEMO)

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check csgguard attacks detectors tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/speed.py

clean:
	rm -rf $(DEMO) .pytest_cache build *.egg-info
