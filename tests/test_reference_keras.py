"""The oracle (tests/reference.py) against Keras 3 itself, for the activations, the binary and from-logits
cross-entropies: Keras is the behavioural reference, the oracle its readable
float64 restatement, and the engines are checked against the oracle.

Skipped where Keras is not importable (it is not a dependency of gpucnn). With ``KERAS_BACKEND`` unset this
file asks for the torch backend.
Keras computes in float32 here: the tolerances are float32's. Gradients are Keras's own, by the torch
backend's autograd (skipped on other backends).
"""
import math
import os

import numpy as np
import pytest

import reference as ref

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")

F32 = np.float32


def np_(a):
    return np.asarray(keras.ops.convert_to_numpy(a))


def t32(a):
    return keras.ops.convert_to_tensor(np.asarray(a, F32), dtype="float32")


def keras_grad(f, x):
    """The gradient of the scalar Keras expression f(tensor) at the float32 array x, by torch's autograd."""
    if keras.backend.backend() != "torch":
        pytest.skip("Keras's gradients are read through the torch backend's autograd")
    import torch

    v = torch.tensor(np.asarray(x, F32), requires_grad=True)
    f(v).backward()
    return v.grad.numpy()


# ===================================================================================== activations
KERAS_ACTIVATIONS = [  # (our activation, the Keras callable)
    ("sigmoid", lambda x: keras.activations.sigmoid(x)),
    ("tanh", lambda x: keras.activations.tanh(x)),
    ("elu", lambda x: keras.activations.get("elu")(x)),
    (("elu", 0.7), lambda x: keras.layers.ELU(alpha=0.7)(x)),
    ("selu", lambda x: keras.activations.get("selu")(x)),
    ("leaky_relu", lambda x: keras.activations.get("leaky_relu")(x)),
    (("leaky_relu", 0.3), lambda x: keras.layers.LeakyReLU()(x)),  # the layer's default slope
    ("softplus", lambda x: keras.activations.get("softplus")(x)),
    ("silu", lambda x: keras.activations.get("silu")(x)),
    ("swish", lambda x: keras.activations.get("swish")(x)),
    ("gelu", lambda x: keras.activations.get("gelu")(x)),  # Activation("gelu"): exact
    (("gelu", True), lambda x: keras.activations.gelu(x, approximate=True)),
]


@pytest.mark.parametrize("ours, theirs", KERAS_ACTIVATIONS, ids=[str(a[0]) for a in KERAS_ACTIVATIONS])
def test_activations_are_kerass(ours, theirs):
    x = F32(np.concatenate([np.linspace(-12, 12, 97), [-90.0, 90.0]]).reshape(3, 33))
    want = ref.activation_forward(x, ours)
    np.testing.assert_allclose(np_(theirs(x)), want, rtol=2e-6, atol=2e-7 * np.abs(want).max())


# ===================================================================================== losses
@pytest.mark.parametrize("from_logits", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.15])
def test_binary_crossentropy_values_and_gradients_are_kerass(from_logits, smoothing):
    rng = np.random.default_rng(1)
    p = rng.normal(size=(6, 3)) * 4 if from_logits else rng.uniform(0.02, 0.98, size=(6, 3))
    if not from_logits:
        p[0] = [0.0, 1.0, 1e-9]  # the clip
    labels = rng.integers(0, 2, size=(6, 3)).astype(np.float64)
    labels[1] = [0.3, 0.5, 0.9]

    p = F32(p)

    def keras_loss(v):
        return keras.losses.binary_crossentropy(t32(labels), v, from_logits=from_logits, label_smoothing=smoothing)

    want = ref.binary_crossentropy_forward(p, labels, from_logits, smoothing)
    np.testing.assert_allclose(np_(keras_loss(t32(p))), want, rtol=1e-5, atol=1e-6)
    mean = keras.losses.BinaryCrossentropy(from_logits=from_logits, label_smoothing=smoothing)
    np.testing.assert_allclose(float(np_(mean(F32(labels), F32(p)))), want.mean(), rtol=1e-5)
    # the gradient of the mean over the batch (and the units): zero where the clip is active, as ours
    grad = keras_grad(lambda v: keras.ops.mean(keras_loss(v)), p)
    want = ref.binary_crossentropy_backward(p, labels, from_logits, smoothing)
    np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())


def test_sigmoid_output_gradient_is_kerass_inside_the_clip():
    rng = np.random.default_rng(2)
    z = F32(rng.normal(size=(5, 2)) * 3)
    labels = F32(rng.integers(0, 2, size=(5, 2)))
    grad = keras_grad(lambda v: keras.ops.mean(keras.losses.binary_crossentropy(t32(labels),
                                                                               keras.activations.sigmoid(v))), z)
    want = ref.sigmoid_binary_crossentropy_backward(ref.activation_forward(z, "sigmoid"), labels)
    np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())


def test_binary_accuracy_is_kerass():
    rng = np.random.default_rng(3)
    p = F32(rng.random((40, 3)))
    p[0, 0] = 0.5  # not above the threshold
    labels = F32(rng.integers(0, 2, size=(40, 3)))
    for threshold in (0.5, 0.3):
        want = np_(keras.metrics.binary_accuracy(labels, p, threshold=threshold)).mean()
        assert ref.count_binary_correct(p, labels, threshold) / p.size == pytest.approx(float(want), abs=1e-7)


@pytest.mark.parametrize("sparse", [False, True])
def test_crossentropy_from_logits_is_kerass(sparse):
    rng = np.random.default_rng(4)
    z = F32(rng.normal(size=(7, 5)) * 5)
    ints = rng.integers(0, 5, size=7)
    labels = ints if sparse else F32(np.eye(5)[ints])
    loss = keras.losses.sparse_categorical_crossentropy if sparse else keras.losses.categorical_crossentropy
    np.testing.assert_allclose(np_(loss(labels, z, from_logits=True)), ref.crossentropy_forward(z, labels, sparse, True),
                               rtol=1e-5, atol=1e-6)
    grad = keras_grad(lambda v: keras.ops.mean(loss(keras.ops.convert_to_tensor(labels), v, from_logits=True)), z)
    want = ref.crossentropy_backward(z, labels, sparse, from_logits=True)
    np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
