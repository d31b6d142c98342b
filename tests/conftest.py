"""Shared test setup.

GPUCNN_NO_POOL=1 turns CuPy's memory pools off for the whole run (every array is its own cudaMalloc), so
compute-sanitizer sees each allocation's real bounds: a pool hands out slices of larger blocks, and an
out-of-bounds access inside a block goes unnoticed. ``benchmarks/gpu_check.py`` sets it for its sanitizer
runs.
"""
import os


def pytest_configure(config):
    if os.environ.get("GPUCNN_NO_POOL", "") not in ("", "0"):
        try:
            import cupy
        except ImportError:
            return
        cupy.cuda.set_allocator(None)
        cupy.cuda.set_pinned_memory_allocator(None)
