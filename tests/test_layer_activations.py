"""Every activation as a layer's ``activation=`` (Dense, Conv2D, Activation) against the float64 oracle, forward and
backward, and binary classification end to end (sigmoid + binary cross-entropy) on the NumPy engine."""
import numpy as np
import pytest

import gpucnn as keras
import reference as ref
from gpucnn import layers

pytestmark = pytest.mark.usefixtures("numpy_engine")

ACTIVATIONS = ["relu", "sigmoid", "tanh", "elu", "selu", "softplus", "silu", "swish", "gelu", "leaky_relu",
               ("leaky_relu", 0.3), ("elu", 0.5), "softmax", "linear", "relu6", ("relu6", 0.5)]


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
    with pytest.raises(ValueError, match="unknown activation 'mish'.*known:.*gelu"):
        layers.Dense(2, activation="mish")
    with pytest.raises(ValueError, match="not .*lambda"):
        layers.Dense(2, activation=lambda v: v)


def _relu64(x, negative_slope=0.0, max_value=None, threshold=0.0):
    """Keras's relu options written out in float64: x where x > threshold, else negative_slope·(x − threshold),
    then at most max_value."""
    x = np.asarray(x, np.float64)
    y = np.where(x > threshold, x, negative_slope * (x - threshold))
    return y if max_value is None else np.minimum(y, max_value)


@pytest.mark.parametrize("options", [{}, {"max_value": 6.0}, {"threshold": 0.5}, {"negative_slope": 0.1},
                                     {"negative_slope": 0.1, "max_value": 2.0, "threshold": 0.5}], ids=str)
def test_the_activation_functions_take_kerass_keyword_arguments(options):
    x = np.linspace(-8, 8, 41, dtype=np.float32).reshape(1, 41)
    np.testing.assert_allclose(keras.activations.relu(x, **options), _relu64(x, **options), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(keras.activations.leaky_relu(x, negative_slope=0.3),
                               ref.activation_forward(x, ("leaky_relu", 0.3)), rtol=1e-6)
    np.testing.assert_allclose(keras.activations.elu(x, alpha=0.5), ref.activation_forward(x, ("elu", 0.5)),
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(keras.activations.gelu(x, approximate=True), ref.activation_forward(x, ("gelu", True)),
                               rtol=1e-5, atol=1e-7)
    m = np.arange(12, dtype=np.float32).reshape(3, 4) / 3
    np.testing.assert_allclose(keras.activations.softmax(m, axis=0), np.exp(m) / np.exp(m).sum(0), rtol=1e-6)
    np.testing.assert_array_equal(keras.activations.linear(x), x)
    assert keras.activations.get(None) is keras.activations.get("linear") is keras.activations.linear
    assert layers.Dense(2, activation=keras.activations.linear).activation is None
    with pytest.raises(TypeError, match=r"sigmoid\(\) got unexpected argument\(s\) \['alpha'\]"):
        keras.activations.sigmoid(x, alpha=1)
    with pytest.raises(TypeError, match=r"leaky_relu\(\) got \['negative_slope'\] twice"):
        keras.activations.leaky_relu(x, 0.1, negative_slope=0.2)
    np.testing.assert_allclose(keras.activations.leaky_relu(x, 0.3), keras.activations.leaky_relu(x, negative_slope=0.3))
    with pytest.raises(AttributeError, match="no 'mish'.*It has: elu, gelu"):
        keras.activations.mish


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


def test_binary_accuracy_objects_and_metrics_that_do_not_fit_the_loss():
    """keras.io's from-scratch example: BinaryAccuracy(name="acc") on a logits model thresholds the logits at 0.5
    (as Keras); a metric of another form than the loss, and Keras's exact-match Accuracy(), are refused clearly
    (gpucnn would have logged the loss's form under the metric's name); a refused compile changes nothing."""
    r = np.random.default_rng(2)
    x = r.standard_normal((40, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.float32)
    m = keras.Sequential([keras.Input((4,)), layers.Dense(1)])
    m.compile("adam", keras.losses.BinaryCrossentropy(from_logits=True),
              metrics=[keras.metrics.BinaryAccuracy(name="acc")])
    h = m.fit(x, y, batch_size=8, verbose=0)
    assert list(h.history) == ["acc", "loss"]
    z = m.predict(x, verbose=0)[:, 0]
    assert m.evaluate(x, y, verbose=0, return_dict=True)["acc"] == float(((z > 0.5) == y).mean())
    for metric, match in ((keras.metrics.Accuracy(), "exactly equal"),
                          ("sparse_categorical_accuracy", "needs class indices")):
        with pytest.raises(ValueError, match=match):
            m.compile("sgd", "binary_crossentropy", metrics=[metric])
    assert m.metrics == ["acc"] and m.optimizer.name == "adam"
    three = keras.Sequential([keras.Input((4,)), layers.Dense(3)])
    with pytest.raises(ValueError, match="needs one-hot or 0/1 labels"):
        three.compile("sgd", "sparse_categorical_crossentropy", metrics=["categorical_accuracy"])
    with pytest.raises(NotImplementedError, match="one form of accuracy per model"):
        three.compile("sgd", "binary_crossentropy", metrics=["accuracy", "binary_accuracy"])
    unbuilt = keras.Sequential([layers.Dense(3, activation="sigmoid")])  # no Input: the form is known at fit
    unbuilt.compile("sgd", "binary_crossentropy", metrics=["accuracy", "binary_accuracy"])
    with pytest.raises(NotImplementedError, match="one form of accuracy per model"):
        unbuilt.fit(x, (x[:, :3] > 0).astype(np.float32), verbose=0)
    assert unbuilt.optimizer.iterations == 0
    with pytest.raises(NotImplementedError, match="threshold 0.5 only"):
        keras.metrics.BinaryAccuracy(threshold=0.7)


def test_accuracy_takes_kerass_form_from_the_loss_and_the_outputs_shape():
    """Keras's "accuracy" under a binary cross-entropy with several sigmoid outputs (multi-label) is categorical:
    the arg-max output against the arg-max label (it was counted per output, a different number);
    "binary_accuracy" counts per output, under a categorical cross-entropy's one-hot labels too."""
    r = np.random.default_rng(4)
    x = r.standard_normal((30, 4)).astype(np.float32)
    y = (r.random((30, 3)) < 0.4).astype(np.float32)
    for metric, loss in (("accuracy", "binary_crossentropy"), ("binary_accuracy", "binary_crossentropy"),
                         ("categorical_accuracy", "binary_crossentropy"),
                         ("binary_accuracy", "categorical_crossentropy")):
        keras.utils.set_random_seed(1)
        m = keras.Sequential([keras.Input((4,)), layers.Dense(3, activation="sigmoid" if "binary" in loss
                                                                 else "softmax")])
        m.compile("sgd", loss, metrics=[metric])
        labels = y if loss == "binary_crossentropy" else np.eye(3, dtype=np.float32)[r.integers(0, 3, 30)]
        p = m.predict(x, verbose=0)
        got = m.evaluate(x, labels, batch_size=7, verbose=0)[1]
        if metric == "binary_accuracy":
            want = ((p > 0.5) == (labels > 0.5)).mean()
        else:
            want = (p.argmax(1) == labels.argmax(1)).mean()
        assert got == pytest.approx(float(want)), (metric, loss)

