"""Fixtures of the benchmark suite, and the summary written after a session that produced GPU results."""
import importlib.util
import sys
import time
from pathlib import Path

import pytest

if importlib.util.find_spec("gpucnn") is None:  # a plain checkout, not installed: use it in place
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

_session_start = time.time()


@pytest.fixture(scope="session")
def mnist_train():
    from bench_utils import mnist_skip_reason
    reason = mnist_skip_reason()  # never a download (a machine without network would wait for pip first)
    if reason:
        pytest.skip(reason)
    from gpucnn.cli import load_mnist
    (x, y), _ = load_mnist()
    return x, y


def pytest_sessionfinish(session, exitstatus):
    """After GPU benchmarks wrote results: latest.json, summary.md and scaling.png (summarize.py)."""
    from bench_utils import RESULTS
    from summarize import GPU_FILES, summarize
    fresh = [name for name in GPU_FILES
             if (RESULTS / f"{name}.json").is_file() and (RESULTS / f"{name}.json").stat().st_mtime >= _session_start]
    if fresh:
        try:
            summarize(RESULTS, quiet=True)
        except Exception as exc:  # the summary must never turn a benchmark run into a failure
            print(f"\nbenchmarks: could not summarise the results: {type(exc).__name__}: {exc}")
