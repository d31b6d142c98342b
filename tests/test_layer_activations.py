"""Every activation as a layer's ``activation=`` (Dense, Conv2D, Activation) against the float64 oracle, forward and
backward, and binary classification end to end (sigmoid + binary cross-entropy) on the NumPy engine."""
import numpy as np
import pytest

import gpucnn as keras
import reference as ref
from gpucnn import layers

pytestmark = pytest.mark.usefixtures("numpy_engine")

ACTIVATIONS = ["relu", "sigmoid", "tanh", "elu", "selu", "softplus", "silu", "swish", "gelu", "leaky_relu",
               ("leaky_relu", 0.3), ("elu", 0.5), "softmax", "linear"]


def _chain_reference(x, w, b, activation, dy):
    """(y, dx, dw, db) of a Dense by the oracle: z = x·w + b, y = act(z), and the chain rule back."""
    act = None if activation == "linear" else ("silu" if activation == "swish" else activation)
    z = ref.dense_forward(x, w, b, None)
    y = ref.activation_forward(z, act)
    dz = ref.activation_backward(dy, y, act, x=z)
    return y, ref.dense_backward_data(dz, w), *ref.dense_backward_weights(dz, x)


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
def test_dense_with_each_activation_matches_the_oracle(activation):
    r = np.random.default_rng(0)
    x = r.standard_normal((5, 7)).astype(np.float32)
    dense = layers.Dense(4, activation=activation)
    dense.build((7,))
    dense.set_weights([r.standard_normal((7, 4)), r.standard_normal(4)])
    w, b = dense.get_weights()
    dy = r.standard_normal((5, 4)).astype(np.float32)
    ctx = {"need_dx": True}
    y = dense.forward(x, True, ctx)
    dx = dense.backward(dy, ctx)
    y_ref, dx_ref, dw_ref, db_ref = _chain_reference(x, w, b, activation if not isinstance(activation, list)
                                                     else tuple(activation), dy)
    for got, want in ((y, y_ref), (dx, dx_ref), (dense.grads[0], dw_ref), (dense.grads[1], db_ref)):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * max(1.0, float(np.abs(want).max())))
    assert layers.Dense.from_config(dense.get_config()).activation == dense.activation if hasattr(
        layers.Dense, "from_config") else True


@pytest.mark.parametrize("activation", ["gelu", "sigmoid", "tanh"])
def test_conv2d_and_the_activation_layer_match_the_oracle(activation):
    r = np.random.default_rng(1)
    x = r.standard_normal((2, 6, 6, 3)).astype(np.float32)
    conv = layers.Conv2D(4, 3, activation=activation)
    conv.build((6, 6, 3))
    w, b = conv.get_weights()
    ctx = {"need_dx": True}
    y = conv.forward(x, True, ctx)
    np.testing.assert_allclose(y, ref.conv2d_forward(x, w, b, (1, 1), (0, 0, 0, 0), activation), rtol=2e-5,
                               atol=2e-5)
    dy = r.standard_normal(y.shape).astype(np.float32)
    z = ref.conv2d_forward(x, w, b, (1, 1), (0, 0, 0, 0), None)
    dz = ref.activation_backward(dy, ref.activation_forward(z, activation), activation, x=z)
    np.testing.assert_allclose(conv.backward(dy, ctx), ref.conv2d_backward_data(dz, w, x.shape, (1, 1), (0, 0, 0, 0)),
                               rtol=1e-4, atol=1e-4)
    act = layers.Activation(activation)
    ctx = {}
    np.testing.assert_allclose(act.forward(x, True, ctx), ref.activation_forward(x, activation), rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(act.backward(dy[:, :6, :6, :3] if False else np.ones_like(x), ctx),
                               ref.activation_backward(np.ones_like(x), ref.activation_forward(x, activation),
                                                       activation, x=x), rtol=2e-5, atol=2e-6)


def test_activations_by_function_and_unknown_names():
    assert layers.Dense(2, activation=keras.activations.relu).activation == "relu"
    assert layers.Dense(2, activation=keras.activations.get("swish")).activation == "silu"
    np.testing.assert_allclose(keras.activations.sigmoid(np.zeros(3)), 0.5)
    with pytest.raises(ValueError, match="unknown activation 'relu6'.*known:.*gelu"):
        layers.Dense(2, activation="relu6")
    with pytest.raises(ValueError, match="not .*lambda"):
        layers.Dense(2, activation=lambda v: v)


def test_binary_classification_trains_with_binary_accuracy():
    """A sigmoid output and binary cross-entropy: the book's cats-vs-dogs head on separable data."""
    r = np.random.default_rng(2)
    x = r.standard_normal((128, 4)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.float32)
    m = keras.Sequential([keras.Input((4,)), layers.Dense(8, activation="tanh"), layers.Dense(1, activation="sigmoid")])
    m.compile(optimizer=keras.optimizers.RMSprop(0.01), loss="binary_crossentropy", metrics=["accuracy"])
    h = m.fit(x, y, batch_size=16, epochs=12, verbose=0)
    assert h.history["accuracy"][-1] > 0.9 and h.history["loss"][-1] < h.history["loss"][0]
    p = m.predict(x, verbose=0)
    assert p.shape == (128, 1) and ((p > 0) & (p < 1)).all()
    loss, acc = m.evaluate(x, y, verbose=0)
    np.testing.assert_allclose(acc, float(((p[:, 0] > 0.5) == y).mean()))
    want = ref.binary_crossentropy_forward(p, y[:, None], False).mean()
    np.testing.assert_allclose(loss, want, rtol=1e-4)
    logits = keras.Sequential([keras.Input((4,)), layers.Dense(1)])
    logits.compile(optimizer=keras.optimizers.RMSprop(0.01), loss=keras.losses.BinaryCrossentropy(from_logits=True),
                   metrics=["acc"])
    assert logits.fit(x, y, batch_size=16, epochs=8, verbose=0).history["acc"][-1] > 0.85
