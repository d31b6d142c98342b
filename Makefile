# gpucnn — the two commands of the README, plus the benchmark and the GPU-machine check.
#   make train   set up .venv, then train the seed model on MNIST (GPU when usable, else NumPy)
#   make test    set up .venv, then run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: train test bench gpu-check clean

# The venv sees system site-packages so a machine's preinstalled CuPy is used when there is one.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m gpucnn._install_cupy
	touch $@

train: $(STAMP)
	$(BIN)/gpucnn train $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

# NumPy engine vs PyTorch CPU (installs the CPU build of PyTorch into the venv).
bench: $(STAMP)
	$(BIN)/python -m pip install -q 'torch==2.13.0' || echo "PyTorch not installable here; benchmarking gpucnn alone"
	$(BIN)/python -m pytest benchmarks -q -p no:cacheprovider --benchmark-only $(ARGS)

# On a GPU machine with CuPy, PyTorch, NumPy, pytest and pytest-benchmark already installed (no network):
# GPU tests, compute-sanitizer, benchmarks; summary in benchmarks/results/gpu-check.json.
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
