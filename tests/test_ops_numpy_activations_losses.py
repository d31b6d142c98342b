"""The NumPy engine's activations, binary cross-entropy and from-logits cross-entropy against the float64
oracle: tests/checks_activations_losses.py's tests (shared with the CUDA engine) plus the engine's own."""
import numpy as np

import helpers
from checks_activations_losses import ACTIVATIONS, ActivationLossChecks, activation_input
from gpucnn.engines import numpy_ops as ops


class TestNumpyEngine(ActivationLossChecks):
    engine = helpers.numpy_engine()


def test_activations_raise_no_floating_point_warnings():
    x = activation_input((3, 700))  # +-90: exp overflows in the naive forms
    with np.errstate(over="raise", divide="raise", invalid="raise"):  # (an underflow to 0 is fine)
        for activation in ACTIVATIONS:
            y = ops.activation_forward(x, activation)
            ops.activation_backward(x, y, activation, x=x)
