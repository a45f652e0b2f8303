# make demo: set up (if needed) and distil the bundled Fashion-MNIST teacher into a one-step student (~5 min, CPU).
# make test: set up (if needed) and run the test suite (about 19 min on 2 CPU cores).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint clean

$(BIN)/stepdistill: setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: on the project machines 2.13.0 is a CPU build on local disk; an unpinned resolve may pull CUDA.
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(BIN)/stepdistill

# The demo starts fresh each time (a rerun of `stepdistill train` on the same folder would resume and train longer).
demo: setup
	rm -rf runs/demo_fashion_vsd_1step
	$(BIN)/stepdistill train configs/fashion/vsd_1step.yaml --outdir runs/demo_fashion_vsd_1step

test: setup
	$(BIN)/python -m pytest -q tests

lint: setup
	$(BIN)/ruff check stepdistill tests scripts

clean:
	rm -rf runs/demo_fashion_vsd_1step
