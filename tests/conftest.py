"""Shared test setup.

GPUCNN_NO_POOL=1 turns CuPy's memory pools off for the whole run (every array is its own cudaMalloc), so
compute-sanitizer sees each allocation's real bounds: a pool hands out slices of larger blocks, and an
out-of-bounds access inside a block goes unnoticed. ``benchmarks/gpu_check.py`` sets it for its sanitizer
runs.

GPUCNN_REQUIRE_KERNEL_CHECKS=1 (set by .ci/run) turns the skips of the kernel checks that need no GPU — the
NVRTC compile, the register/spill check, the CPU emulator — into failures, so CI cannot go green having
checked no kernel.
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


@pytest.fixture
def numpy_engine():
    """The NumPy engine, Keras's default names from the start and a fixed seed (Keras-workflow tests)."""
    from gpucnn import backend, utils
    backend.set_engine("cpu")
    utils.clear_session()
    utils.set_random_seed(1)
