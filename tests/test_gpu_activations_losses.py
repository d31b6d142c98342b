"""The CUDA engine's activations, binary cross-entropy and from-logits cross-entropy (kernels/activations.cu,
kernels/loss.cu) against the float64 oracle: tests/checks_activations_losses.py's tests (shared with the
NumPy engine), plus the CUDA engine's own promises (device results, host arrays refused).

Marked ``gpu`` and skipped as a whole where CuPy or a CUDA device is not usable; tests/test_kernels_emulated.py
runs this file on the kernel emulator.
"""
import numpy as np
import pytest

import helpers
from checks_activations_losses import ActivationLossChecks

pytestmark = pytest.mark.gpu
helpers.skip_module_without_gpu()

import cupy  # noqa: E402

from gpucnn.engines import cuda_ops as ops  # noqa: E402


class TestCudaEngine(ActivationLossChecks):
    engine = helpers.cuda_engine()


def dev(a):
    return cupy.asarray(a)


def host(a):
    return TestCudaEngine.engine.host(a)


def test_host_arrays_are_refused():
    with pytest.raises(TypeError, match="numpy"):
        ops.activation_forward(np.zeros(4, np.float32), "sigmoid")  # a host array is not moved silently
    with pytest.raises(TypeError, match="numpy"):
        ops.binary_crossentropy_forward(dev(np.zeros((2, 1), np.float32)), np.zeros((2, 1), np.float32), False)
    x = dev(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="differ"):
        ops.activation_backward(x, dev(np.zeros((3, 2), np.float32)), "gelu", x=dev(np.zeros((3, 2), np.float32)))


def test_count_binary_correct_is_a_device_integer():
    got = ops.count_binary_correct(dev(np.full((3, 2), 0.9, np.float32)), dev(np.ones((3, 2), np.float32)))
    assert isinstance(got, cupy.ndarray) and got.shape == () and got.dtype == np.int64 and int(got) == 6


def test_crossentropy_from_logits_out_of_range_sparse_label_is_nan():
    z = dev(np.float32([[0.2, 0.8], [0.6, 0.4]]))
    labels = dev(np.array([1, 2], np.int32))
    assert np.isnan(host(ops.crossentropy_forward(z, labels, True, from_logits=True))).tolist() == [False, True]
    g = host(ops.crossentropy_backward(z, labels, True, from_logits=True))
    assert np.isfinite(g[0]).all() and np.isnan(g[1]).all()
