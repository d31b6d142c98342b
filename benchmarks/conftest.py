"""Fixtures of the benchmark suite."""
import pytest


@pytest.fixture(scope="session")
def mnist_train():
    from gpucnn.cli import load_mnist
    (x, y), _ = load_mnist()
    return x, y
