# gpucnn — the two commands of the README, plus the benchmark and the GPU-machine check.
#   make train   set up .venv, then train the seed model on MNIST (GPU when usable, else NumPy)
#   make test    set up .venv, then run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: train test bench gpu-check bench-gpu bench-summary clean

# The venv sees the packages of the Python that made it (system site-packages, and a parent venv's through a
# .pth file), so a machine's preinstalled CuPy and PyTorch are used. Offline (a GPU machine without network)
# the install fails and the venv uses the source tree with what the machine already has; no stamp is left
# then, so the next make tries the install again.
PURELIB = import sysconfig; print(sysconfig.get_paths()['purelib'])
PARENT  = import sysconfig; print('import site; ' + '; '.join(f'site.addsitedir({p!r})' for p in \
          dict.fromkeys(sysconfig.get_paths()[k] for k in ('purelib', 'platlib'))))
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PYTHON) -c "$(PARENT)" > "$$($(BIN)/python -c "$(PURELIB)")/zz_gpucnn_parent_site.pth"
	$(BIN)/python -m pip install -q --retries 2 --timeout 30 -e '.[test]' && touch $@ \
	  || { echo "gpucnn setup: the install failed (no network?); using the source tree and the packages"; \
	       echo "already here for this run; the next make tries the install again."; \
	       echo "$(CURDIR)" > "$$($(BIN)/python -c "$(PURELIB)")/_gpucnn_source.pth"; }
	$(BIN)/python -m gpucnn._install_cupy

train: $(STAMP)
	$(BIN)/python -m gpucnn train $(ARGS)

# The tests, then the benchmarks' own tools (a pytest session of their own: each folder has a conftest.py).
test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)
	$(BIN)/python -m pytest -q -p no:cacheprovider benchmarks/test_benchmark_tools.py

# NumPy engine vs PyTorch CPU (installs the CPU build of PyTorch into the venv).
bench: $(STAMP)
	$(BIN)/python -m pip install -q 'torch==2.13.0' || echo "PyTorch not installable here; benchmarking gpucnn alone"
	$(BIN)/python -m pytest benchmarks -q -p no:cacheprovider --benchmark-only $(ARGS)

# The GPU machine's check (CuPy, PyTorch, pytest and pytest-benchmark already there; no network, no venv), one
# command per device session: it prints its plan (at most 570 s), then pre-flight, GPU tests, compute-sanitizer,
# kernel benchmarks; summary in benchmarks/results/gpu-check.json, copied to $OUT when set. ARGS="--session 2"
# for the second session. Exit status 3 when no GPU is usable (after the plan), 1 when a stage failed or was
# cut; benchmarks/README.md has the device calls.
gpu-check:
	PYTHONPATH=. $(PYTHON) benchmarks/gpu_check.py $(ARGS)

# The GPU benchmarks alone, with the system Python (GPU machine); then the summary (any machine).
bench-gpu:
	PYTHONPATH=. $(PYTHON) -m pytest benchmarks -q -p no:cacheprovider --benchmark-only -k "not numpy_vs_torch_cpu" $(ARGS)

bench-summary:
	$(PYTHON) benchmarks/summarize.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
