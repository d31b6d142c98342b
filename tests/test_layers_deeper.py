"""The layers of modern convnets on the NumPy engine: BatchNormalization, DepthwiseConv2D, SeparableConv2D,
GlobalMaxPooling2D, ZeroPadding2D, Reshape and the activation layers (ReLU, LeakyReLU, ELU, Softmax) against the
float64 oracle (tests/reference.py), forward and backward; Keras 3's rules (weights and their order, training vs
inference, freezing, a batch of one, default names, configs); the errors for what they cannot do; and the book's
small Xception-like model (2nd ed., ch. 9), built and trained."""
import numpy as np
import pytest

import gpucnn as keras
import reference as ref
from book_models import xception_like
from gpucnn import backend, layers, models, optimizers, utils

pytestmark = pytest.mark.usefixtures("numpy_engine")

NEW_LAYERS = [
    lambda: layers.BatchNormalization(momentum=0.9, epsilon=1e-2, center=False),
    lambda: layers.DepthwiseConv2D(3, strides=2, padding="same", depth_multiplier=2, activation="relu",
                                   use_bias=False),
    lambda: layers.SeparableConv2D(5, (3, 2), padding="same", depth_multiplier=3, activation="elu"),
    lambda: layers.GlobalMaxPooling2D(),
    lambda: layers.ZeroPadding2D(((1, 2), (0, 3))),
    lambda: layers.Reshape((-1, 2)),
    lambda: layers.ReLU(negative_slope=0.1),
    lambda: layers.LeakyReLU(),
    lambda: layers.ELU(alpha=0.5),
    lambda: layers.Softmax(),
]


def _rng(seed=0):
    return np.random.default_rng(seed)


def _close(got, want, rtol=2e-5):
    want = np.asarray(want)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * max(1.0, float(np.abs(want).max())))


def _run(layer, x, dy_seed=1, training=True):
    """(y, dx, dy) of one forward and backward of a built layer."""
    ctx = {"need_dx": True}
    y = layer.forward(x, training, ctx)
    dy = _rng(dy_seed).standard_normal(y.shape).astype(np.float32)
    return y, layer.backward(dy, ctx), dy


# ===================================================================================== BatchNormalization
@pytest.mark.parametrize("shape", [(6, 5, 4, 3), (7, 5), (1, 3, 2, 4)])
@pytest.mark.parametrize("center, scale", [(True, True), (False, True), (True, False)])
def test_batch_normalization_in_training_matches_the_oracle(shape, center, scale):
    r = _rng(2)
    bn = layers.BatchNormalization(momentum=0.8, epsilon=1e-2, center=center, scale=scale)
    bn.build(shape[1:])
    c = shape[-1]
    names = ["gamma"] * scale + ["beta"] * center + ["moving_mean", "moving_variance"]
    assert bn.weight_names == names and bn._weight_trainable == [True] * (center + scale) + [False, False]
    values = [r.uniform(0.5, 2, c) if n in ("gamma", "moving_variance") else r.standard_normal(c) for n in names]
    bn.set_weights(values)
    given = dict(zip(names, values))
    x = (r.standard_normal(shape) * 3 + 1).astype(np.float32)
    y, dx, dy = _run(bn, x)
    y_ref, mean, inv_std, new_mean, new_var = ref.batchnorm_forward_training(
        x, given.get("gamma"), given.get("beta"), given["moving_mean"], given["moving_variance"], 0.8, 1e-2)
    dx_ref, dgamma, dbeta = ref.batchnorm_backward(dy, x, given.get("gamma"), mean, inv_std, True)
    _close(y, y_ref)
    _close(dx, dx_ref, 1e-4)
    after = dict(zip(names, bn.get_weights()))
    _close(after["moving_mean"], new_mean)
    _close(after["moving_variance"], new_var)
    grads = dict(zip(names, bn.grads))
    if scale:
        _close(grads["gamma"], dgamma, 1e-4)
    if center:
        _close(grads["beta"], dbeta, 1e-4)


def test_batch_normalization_in_inference_uses_the_moving_statistics_and_leaves_them():
    r = _rng(3)
    bn = layers.BatchNormalization()
    bn.build((4, 4, 3))
    gamma, beta, mean, var = r.uniform(0.5, 2, 3), r.standard_normal(3), r.standard_normal(3), r.uniform(0.5, 2, 3)
    bn.set_weights([gamma, beta, mean, var])
    x = r.standard_normal((5, 4, 4, 3)).astype(np.float32)
    y, dx, dy = _run(bn, x, training=False)
    y_ref, inv_std = ref.batchnorm_forward_inference(x, gamma, beta, mean, var, 1e-3)
    _close(y, y_ref)
    _close(dx, ref.batchnorm_backward(dy, x, gamma, mean, inv_std, False)[0], 1e-4)
    _close(bn(x), y_ref)  # a call on an array: inference
    for got, want in zip(bn.get_weights(), [gamma, beta, mean, var]):
        np.testing.assert_array_equal(got, np.float32(want))


def test_a_frozen_batch_normalization_runs_in_inference_mode_in_fit_and_stays_bit_identical():
    """Keras 3's fine-tuning rule: trainable = False makes the layer use its moving statistics in training too;
    neither they nor gamma and beta change, while the layers around it train."""
    r = _rng(4)
    inputs = keras.Input((6, 6, 2))
    x = layers.Conv2D(3, 3)(inputs)
    bn = layers.BatchNormalization()
    x = bn(x)
    outputs = layers.Dense(3, activation="softmax")(layers.Flatten()(x))
    model = keras.Model(inputs, outputs)
    bn.set_weights([r.uniform(0.5, 2, 3), r.standard_normal(3), r.standard_normal(3), r.uniform(0.5, 2, 3)])
    before = bn.get_weights()
    conv_before = model.layers[1].get_weights()
    bn.trainable = False
    model.compile(optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    assert len(bn.trainable_weights) == 0 and len(bn.non_trainable_weights) == 4
    seen = []
    forward = bn.forward
    bn.forward = lambda xb, training, ctx: (seen.append(training), forward(xb, training, ctx))[1]
    data = r.standard_normal((12, 6, 6, 2)).astype(np.float32)
    model.fit(data, r.integers(0, 3, 12), batch_size=4, epochs=2, verbose=0)
    assert seen and all(seen)  # called in training...
    for got, want in zip(bn.get_weights(), before):  # ...in inference mode
        np.testing.assert_array_equal(got, want)
    assert not np.array_equal(model.layers[1].get_weights()[0], conv_before[0])  # the rest trained
    xin = model.layers[1](data[:4])
    ctx = {}
    np.testing.assert_array_equal(bn.forward(xin, True, ctx), bn.forward(xin, False, {}))


def conv_bn_model(bias=True, scale=True, center=True, strides=1):
    """Conv2D → BatchNormalization (→ ReLU) twice, with moving statistics and gamma/beta away from their starts; the
    second convolution's output is also read by an Add (so it runs apart from its BatchNormalization)."""
    utils.set_random_seed(21)
    inputs = layers.Input(shape=(9, 9, 3))
    a = layers.Conv2D(6, 3, strides=strides, padding="same", use_bias=bias, name="conv_a")(inputs)
    x = layers.ReLU()(layers.BatchNormalization(scale=scale, center=center, name="bn_a")(a))
    b = layers.Conv2D(6, 3, padding="same", name="conv_b")(x)
    x = layers.Add()([b, layers.BatchNormalization(name="bn_b")(b)])
    m = models.Model(inputs, layers.Dense(3, activation="softmax")(layers.GlobalAveragePooling2D()(x)))
    r = _rng(22)
    for name in ("bn_a", "bn_b"):
        bn = m.get_layer(name)
        bn.set_weights([r.uniform(0.5, 2, w.shape) if i == len(bn.weights) - 1 else r.standard_normal(w.shape) * 2
                        for i, w in enumerate(bn.get_weights())])
    m.compile("rmsprop", "sparse_categorical_crossentropy", ["accuracy"])
    return m


def unfused_predict(m, x):
    """The model's inference with every layer run apart: its graph planned with no Conv2D-BatchNormalization fusion."""
    from gpucnn.models import graph as graph_module
    saved, m.graph._plans = m.graph._plans, {}
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(graph_module, "fusable_bn", lambda conv, bn: False)
            return m.predict(x, verbose=0)
    finally:
        m.graph._plans = saved


@pytest.mark.parametrize("bias, scale, center, strides", [(True, True, True, 1), (False, False, True, 2),
                                                          (True, True, False, 1)])
def test_inference_folds_a_batch_normalization_into_the_convolution_before_it(bias, scale, center, strides):
    """In predict and evaluate, a Conv2D without activation whose output only a BatchNormalization reads runs as one
    convolution with the normalization folded in: the same predictions as the layers run apart and as the float64
    oracle's chain, up to float32 rounding; training keeps them apart (the batch's statistics)."""
    m = conv_bn_model(bias, scale, center, strides)
    steps = [tuple(n.layer.name for n in step) for step in m.graph.steps(False)]
    assert ("conv_a", "bn_a") in steps and ("conv_b",) in steps and ("bn_b",) in steps
    assert all(len(step) == 1 for step in m.graph.steps(True))
    x = _rng(5).standard_normal((4, 9, 9, 3)).astype(np.float32)
    got = m.predict(x, verbose=0)
    np.testing.assert_allclose(got, unfused_predict(m, x), rtol=1e-5, atol=1e-7)
    conv, bn = m.get_layer("conv_a"), m.get_layer("bn_a")
    weights = conv.get_weights()
    gamma_beta = bn.get_weights()[:-2]
    gamma = gamma_beta[0] if scale else None
    beta = gamma_beta[-1] if center else None
    pads = conv.pads
    z = ref.conv2d_forward(x, weights[0], weights[1] if bias else None, conv.strides, pads, None)
    want, _ = ref.batchnorm_forward_inference(z, gamma, beta, *bn.get_weights()[-2:], 1e-3)
    layer_out = models.Model(m.inputs, bn.output).predict(x, verbose=0)  # conv_a's output is an output: apart
    _close(layer_out, want, 1e-5)
    assert ("conv_a", "bn_a") not in [tuple(n.layer.name for n in step)
                                      for step in models.Model(m.inputs, [conv.output, bn.output]).graph.steps(False)]
    y = np.arange(4) % 3
    want_loss = m.loss.per_sample(backend.ops(), unfused_predict(m, x), y).mean()
    np.testing.assert_allclose(m.evaluate(x, y, verbose=0)[0], float(want_loss), rtol=1e-5)


def test_a_convolution_with_an_activation_keeps_its_batch_normalization_apart():
    utils.set_random_seed(3)
    inputs = layers.Input(shape=(6, 6, 2))
    x = layers.BatchNormalization(name="bn")(layers.Conv2D(3, 3, activation="relu", name="conv")(inputs))
    m = models.Model(inputs, layers.Flatten()(x))
    assert [tuple(n.layer.name for n in step) for step in m.graph.steps(False)][:2] == [("conv",), ("bn",)]


def test_batch_normalization_on_a_batch_of_one_gives_beta_without_nan():
    """One row per channel (a batch of one vector): the variance is 0, so x̂ = 0, y = beta and dx = 0, as Keras."""
    bn = layers.BatchNormalization()
    bn.build((4,))
    beta = np.array([0.5, -1.0, 2.0, 0.0], np.float32)
    bn.set_weights([np.full(4, 3.0), beta, np.zeros(4), np.ones(4)])
    x = np.array([[1.0, -2.0, 30.0, 4.0]], np.float32)
    y, dx, _ = _run(bn, x)
    np.testing.assert_array_equal(y, beta[None])
    np.testing.assert_array_equal(dx, 0)
    mean, var = bn.get_weights()[2:]
    _close(mean, 0.01 * x[0])
    _close(var, np.full(4, 0.99))
    assert np.all(np.isfinite(bn.grads[0])) and np.all(np.isfinite(bn.grads[1]))


@pytest.mark.parametrize("kwargs, match", [
    ({"axis": 1}, "last axis only"),
    ({"axis": "channels"}, "axis must be an int"),
    ({"epsilon": 0}, "epsilon must be > 0"),
    ({"momentum": 1.5}, r"momentum must be in \[0, 1\]"),
    ({"momentum": float("nan")}, "momentum must be a finite number"),
    ({"gamma_initializer": "lecun"}, "unknown initializer"),
    ({"renorm": True}, "renorm=True"),
    ({"beta_regularizer": "l2"}, "beta_regularizer='l2'"),
])
def test_batch_normalization_refuses_what_it_cannot_do(kwargs, match):
    with pytest.raises(ValueError, match=match):
        layers.BatchNormalization(**kwargs).build((5, 5, 3))


def test_batch_normalization_counts_as_non_trainable_in_the_summary():
    model = keras.Sequential([layers.Input((4, 4, 3)), layers.Conv2D(8, 3), layers.BatchNormalization()])
    lines = []
    model.summary(print_fn=lines.append)
    assert " Total params: 256 (1.00 KB)" in lines  # conv 224 + 4 x 8
    assert " Trainable params: 240 (960.00 B)" in lines
    assert " Non-trainable params: 16 (64.00 B)" in lines
    assert len(model.trainable_weights) == 4 and len(model.non_trainable_weights) == 2


# ===================================================================================== depthwise and separable
@pytest.mark.parametrize("n, hw, c, k, s, pad, dm", [
    (2, (7, 5), 3, 3, 1, "same", 1), (3, (6, 6), 2, 2, 2, "valid", 3), (1, (5, 5), 4, 5, 1, "valid", 2),
    (2, (8, 7), 1, 3, 2, "same", 2)])
def test_depthwise_conv2d_matches_the_oracle(n, hw, c, k, s, pad, dm):
    r = _rng(5)
    layer = layers.DepthwiseConv2D(k, strides=s, padding=pad, depth_multiplier=dm, activation="tanh")
    layer.build(hw + (c,))
    assert [w.shape for w in layer.get_weights()] == [(k, k, c, dm), (c * dm,)]
    layer.set_weights([r.standard_normal((k, k, c, dm)), r.standard_normal(c * dm)])
    w, b = layer.get_weights()
    x = r.standard_normal((n,) + hw + (c,)).astype(np.float32)
    y, dx, dy = _run(layer, x)
    pads = layer.pads
    y_ref = ref.depthwise_conv2d_forward(x, w, b, (s, s), pads, "tanh")
    dz = ref.activation_backward(dy, y_ref, "tanh")
    _close(y, y_ref)
    _close(dx, ref.depthwise_conv2d_backward_data(dz, w, x.shape, (s, s), pads), 1e-4)
    dw, db = ref.depthwise_conv2d_backward_filter(dz, x, w.shape, (s, s), pads)
    _close(layer.grads[0], dw, 1e-4)
    _close(layer.grads[1], db, 1e-4)


@pytest.mark.parametrize("n, hw, c, filters, k, s, pad, dm, bias", [
    (2, (7, 5), 3, 4, 3, 1, "same", 1, True), (3, (6, 6), 2, 5, 2, 2, "valid", 2, False),
    (1, (9, 9), 4, 3, 3, 2, "same", 3, True)])
def test_separable_conv2d_is_a_depthwise_then_a_pointwise_convolution(n, hw, c, filters, k, s, pad, dm, bias):
    r = _rng(6)
    layer = layers.SeparableConv2D(filters, k, strides=s, padding=pad, depth_multiplier=dm, use_bias=bias,
                                   activation="relu")
    layer.build(hw + (c,))
    shapes = [(k, k, c, dm), (1, 1, c * dm, filters)] + [(filters,)] * bias
    assert [w.shape for w in layer.get_weights()] == shapes
    assert layer.weight_names == ["depthwise_kernel", "pointwise_kernel"] + ["bias"] * bias
    layer.set_weights([r.standard_normal(sh) for sh in shapes])
    weights = layer.get_weights()
    x = r.standard_normal((n,) + hw + (c,)).astype(np.float32)
    y, dx, dy = _run(layer, x)
    strides, pads, none = (s, s), layer.pads, (0, 0, 0, 0)
    middle = ref.depthwise_conv2d_forward(x, weights[0], None, strides, pads, None)
    y_ref = ref.conv2d_forward(middle, weights[1], weights[2] if bias else None, (1, 1), none, "relu")
    dz = ref.activation_backward(dy, y_ref, "relu")
    d_middle = ref.conv2d_backward_data(dz, weights[1], middle.shape, (1, 1), none)
    dw_point, db = ref.conv2d_backward_filter(dz, middle, weights[1].shape, (1, 1), none)
    dw_depth, _ = ref.depthwise_conv2d_backward_filter(d_middle, x, weights[0].shape, strides, pads)
    _close(y, y_ref)
    _close(dx, ref.depthwise_conv2d_backward_data(d_middle, weights[0], x.shape, strides, pads), 1e-4)
    for got, want in zip(layer.grads, [dw_depth, dw_point] + [db] * bias):
        _close(got, want, 1e-4)


@pytest.mark.parametrize("make", [lambda: layers.SeparableConv2D(4, 5), lambda: layers.DepthwiseConv2D((2, 6))])
def test_a_window_larger_than_its_input_is_refused(make):
    with pytest.raises(ValueError, match="window is larger than its 4x4 input"):
        keras.Sequential([layers.Input((4, 4, 3)), make()])
    keras.Sequential([layers.Input((4, 4, 3)), type(make())(**{**make().get_config(), "name": None,
                                                                "padding": "same"})])  # "same" fits


@pytest.mark.parametrize("make, match", [
    (lambda: layers.SeparableConv2D(4, 3, dilation_rate=2), "dilation_rate"),
    (lambda: layers.DepthwiseConv2D(3, depth_multiplier=0), "depth_multiplier must be a positive int"),
    (lambda: layers.DepthwiseConv2D(3, data_format="channels_first"), "channels-last"),
    (lambda: layers.SeparableConv2D(0, 3), "filters must be a positive int"),
])
def test_depthwise_and_separable_refuse_what_they_cannot_do(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ===================================================================================== pooling, padding, reshape
def test_global_max_pooling_matches_the_oracle():
    r = _rng(7)
    x = r.permutation(2 * 5 * 4 * 3).reshape(2, 5, 4, 3).astype(np.float32)  # no ties
    layer = layers.GlobalMaxPooling2D()
    layer.build(x.shape[1:])
    y, dx, dy = _run(layer, x)
    y_ref, idx = ref.global_maxpool2d_forward(x)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(dx, ref.global_maxpool2d_backward(dy, idx, x.shape))
    assert layers.GlobalMaxPool2D is layers.GlobalMaxPooling2D and layers.GlobalAvgPool2D is layers.GlobalAveragePooling2D


@pytest.mark.parametrize("padding, pads", [(2, (2, 2, 2, 2)), ((1, 3), (1, 1, 3, 3)), (((0, 2), (3, 1)), (0, 2, 3, 1)),
                                           ([[1, 0], [0, 0]], (1, 0, 0, 0))])
def test_zero_padding_takes_keras_forms(padding, pads):
    x = _rng(8).standard_normal((2, 3, 4, 2)).astype(np.float32)
    layer = layers.ZeroPadding2D(padding)
    assert layer.build(x.shape[1:]) == (3 + pads[0] + pads[1], 4 + pads[2] + pads[3], 2)
    y, dx, dy = _run(layer, x)
    np.testing.assert_array_equal(y, ref.zero_padding2d_forward(x, pads))
    np.testing.assert_array_equal(dx, ref.zero_padding2d_backward(dy, x.shape, pads))
    assert layers.ZeroPadding2D().padding == ((1, 1), (1, 1))  # Keras's default


@pytest.mark.parametrize("padding", [-1, (1, 2, 3), ((1, 2), (3,)), 1.5, ((1, -1), (0, 0))])
def test_zero_padding_refuses_other_forms(padding):
    with pytest.raises(ValueError, match="ZeroPadding2D"):
        layers.ZeroPadding2D(padding)


def test_reshape_keeps_the_values_in_order_and_works_out_minus_one():
    x = np.arange(2 * 12, dtype=np.float32).reshape(2, 2, 3, 2)
    layer = layers.Reshape((-1, 4))
    assert layer.build((2, 3, 2)) == (3, 4)
    y, dx, dy = _run(layer, x)
    np.testing.assert_array_equal(y, x.reshape(2, 3, 4))
    np.testing.assert_array_equal(dx, dy.reshape(x.shape))
    with pytest.raises(ValueError, match="12 values a sample, target_shape \\(5, 2\\) holds 10"):
        layers.Reshape((5, 2)).build((2, 3, 2))
    with pytest.raises(ValueError, match="not a multiple of 5"):
        layers.Reshape((-1, 5)).build((2, 3, 2))
    for bad in ((-1, -1), (0, 3), "12", ()):
        with pytest.raises(ValueError, match="target_shape must be"):
            layers.Reshape(bad)


# ===================================================================================== activation layers
@pytest.mark.parametrize("make, activation", [
    (lambda: layers.ReLU(), "relu"), (lambda: layers.ReLU(negative_slope=0.1), ("leaky_relu", 0.1)),
    (lambda: layers.LeakyReLU(), ("leaky_relu", 0.3)), (lambda: layers.LeakyReLU(negative_slope=0.05),
                                                        ("leaky_relu", 0.05)),
    (lambda: layers.ELU(), ("elu", 1.0)), (lambda: layers.ELU(alpha=0.4), ("elu", 0.4)),
    (lambda: layers.Softmax(), "softmax"), (lambda: layers.ReLU(6.0), ("relu6", 6.0)),
    (lambda: layers.ReLU(max_value=0.7), ("relu6", 0.7)), (lambda: layers.Activation("relu6"), "relu6")])
def test_activation_layers_match_the_oracle(make, activation):
    x = _rng(9).standard_normal((3, 4, 5)).astype(np.float32)
    x[np.abs(x) < 1e-2] = 0.5  # away from the kink
    layer = make()
    layer.build(x.shape[1:])
    y, dx, dy = _run(layer, x)
    y_ref = ref.activation_forward(x, activation)
    _close(y, y_ref)
    _close(dx, ref.activation_backward(dy, y_ref, activation), 1e-5)


def test_activation_layers_take_keras_arguments_and_refuse_the_rest():
    assert layers.LeakyReLU().negative_slope == 0.3  # Keras's layer default (the function's is 0.2)
    with pytest.warns(DeprecationWarning, match="alpha"):
        assert layers.LeakyReLU(alpha=0.2).negative_slope == 0.2
    assert layers.ReLU(6.0).get_config()["max_value"] == 6.0
    for make, match in ((lambda: layers.ReLU(max_value=6.0, negative_slope=0.1), "not both"),
                        (lambda: layers.ReLU(threshold=0.5), "threshold=0.0 only"),
                        (lambda: layers.ReLU(max_value=-1.0), "max_value must be a finite number >= 0"),
                        (lambda: layers.ReLU(negative_slope=-1), "negative_slope must be a finite number >= 0"),
                        (lambda: layers.LeakyReLU(None), "negative_slope"),
                        (lambda: layers.ELU(alpha=-1.0), "alpha must be"),
                        (lambda: layers.Softmax(axis=1), "last axis only")):
        with pytest.raises(ValueError, match=match):
            make()


def test_a_softmax_layer_as_output_is_folded_into_the_cross_entropy():
    r = _rng(10)
    model = keras.Sequential([layers.Input((6,)), layers.Dense(4), layers.Softmax()])
    model.compile("sgd", "sparse_categorical_crossentropy")
    assert model._fused_activation() == "softmax"
    x, y = r.standard_normal((8, 6)).astype(np.float32), r.integers(0, 4, 8)
    p = model.predict(x, verbose=0)
    _close(p.sum(axis=1), np.ones(8))
    loss = model.evaluate(x, y, verbose=0)
    _close(loss, -np.mean(np.log(p[np.arange(8), y])), 1e-5)


# ===================================================================================== names and configs
def test_default_names_are_keras_names():
    keras.utils.clear_session()
    names = [make().name for make in NEW_LAYERS]
    assert names == ["batch_normalization", "depthwise_conv2d", "separable_conv2d", "global_max_pooling2d",
                     "zero_padding2d", "reshape", "re_lu", "leaky_re_lu", "elu", "softmax"]


@pytest.mark.parametrize("make", NEW_LAYERS)
def test_configs_round_trip(make):
    layer = make()
    config = layer.get_config()
    import json
    again = type(layer)(**json.loads(json.dumps(config)))
    assert again.get_config() == config
    assert type(layer).__name__ in layers.LAYER_CLASSES


def test_a_model_of_every_new_layer_saves_and_loads(tmp_path):
    r = _rng(11)
    inputs = keras.Input((7, 7, 3))
    x = layers.ZeroPadding2D(((1, 0), (0, 1)))(inputs)
    x = layers.DepthwiseConv2D(3, depth_multiplier=2)(x)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU()(x)
    x = layers.SeparableConv2D(4, 3, padding="same", use_bias=False)(x)
    x = layers.ELU()(x)
    x = layers.GlobalMaxPooling2D()(x)
    x = layers.Reshape((2, 2))(x)
    x = layers.Reshape((4,))(x)
    x = layers.LeakyReLU()(layers.Dense(5)(x))
    outputs = layers.Softmax()(layers.Dense(3)(x))
    model = keras.Model(inputs, outputs)
    model.compile("adam", "sparse_categorical_crossentropy")
    data, labels = r.standard_normal((10, 7, 7, 3)).astype(np.float32), r.integers(0, 3, 10)
    model.fit(data, labels, batch_size=5, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = models.load_model(tmp_path / "m.keras")
    assert [type(layer).__name__ for layer in loaded.layers] == [type(layer).__name__ for layer in model.layers]
    for got, want in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(loaded.predict(data, verbose=0), model.predict(data, verbose=0))
    # training goes on from the saved optimizer state: the same step as the original model's
    for m in (loaded, model):
        m.fit(data, labels, batch_size=5, verbose=0, shuffle=False)
    for got, want in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


# ===================================================================================== the book's Xception-like model
def test_the_xception_like_model_has_keras_parameter_counts():
    # Keras 3.15's summary of this model (facts written down from Keras, not from gpucnn): 721,857 parameters,
    # 718,849 trainable, 3,008 non-trainable (the moving statistics of its 10 BatchNormalization layers).
    model = xception_like(keras)
    lines = []
    model.summary(print_fn=lines.append)
    assert " Total params: 721,857 (2.75 MB)" in lines
    assert " Trainable params: 718,849 (2.74 MB)" in lines
    assert " Non-trainable params: 3,008 (11.75 KB)" in lines
    assert model.output_shape == (None, 1)
    assert [layer.output.shape for layer in model.layers if isinstance(layer, layers.Add)] == [
        (None, 88, 88, 32), (None, 44, 44, 64), (None, 22, 22, 128), (None, 11, 11, 256), (None, 6, 6, 512)]


def test_the_xception_like_model_trains_on_generated_data():
    """Small images of a bright or a dark square: the loss falls in a few epochs, the moving statistics move."""
    r = _rng(12)
    keras.utils.set_random_seed(3)
    model = xception_like(keras, shape=(16, 16, 3), sizes=(8, 16))
    n = 64
    labels = r.integers(0, 2, n).astype(np.float32)
    x = r.normal(0, 0.3, (n, 16, 16, 3)).astype(np.float32)
    x[:, 4:12, 4:12, :] += np.where(labels, 1.0, -1.0)[:, None, None, None]
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
    bn = [layer for layer in model.layers if isinstance(layer, layers.BatchNormalization)]
    before = [layer.get_weights()[2].copy() for layer in bn]
    history = model.fit(x, labels, batch_size=16, epochs=6, verbose=0)
    loss = history.history["loss"]
    assert loss[-1] < 0.8 * loss[0], loss
    assert all(not np.array_equal(layer.get_weights()[2], b) for layer, b in zip(bn, before))
    p = model.predict(x, verbose=0)
    assert p.shape == (n, 1) and np.all(np.isfinite(p))


@pytest.mark.parametrize("shape", [(7,), (3, 7), (2, 3, 7)])
@pytest.mark.parametrize("activation", [None, "relu", "softmax", "gelu"])
def test_dense_applies_over_the_last_axis_of_any_input(shape, activation):
    """Keras's Dense on (N, ..., in): each position's features through the kernel — the float64 oracle on the rows,
    forward, input gradient and weight gradients."""
    x = _rng(3).standard_normal((4,) + shape).astype(np.float32)
    layer = layers.Dense(5, activation=activation)
    assert layer.build(shape) == shape[:-1] + (5,)
    w, b = layer.get_weights()
    y, dx, dy = _run(layer, x)
    rows, drows = x.reshape(-1, 7), dy.reshape(-1, 5)
    z = ref.dense_forward(rows, w, b, None)
    y_ref = ref.activation_forward(z, activation)
    dz = ref.activation_backward(drows, y_ref, activation, x=z)
    assert y.shape == (4,) + shape[:-1] + (5,) and dx.shape == x.shape
    _close(y.reshape(-1, 5), y_ref)
    _close(dx.reshape(-1, 7), ref.dense_backward_data(dz, w), 1e-4)
    dw, db = ref.dense_backward_weights(dz, rows)
    _close(layer.grads[0], dw, 1e-4)
    _close(layer.grads[1], db, 1e-4)


@pytest.mark.parametrize("cls", [layers.GlobalAveragePooling2D, layers.GlobalMaxPooling2D])
def test_global_pooling_keeps_its_axes_when_asked(cls):
    """keepdims=True: (N, 1, 1, C), the same values and input gradient as without (Keras's squeeze-and-excitation
    blocks multiply the image by it); its config keeps it."""
    x = _rng(5).standard_normal((3, 4, 5, 6)).astype(np.float32)
    flat, kept = cls(), cls(keepdims=True)
    assert flat.build((4, 5, 6)) == (6,) and kept.build((4, 5, 6)) == (1, 1, 6)
    y, dx, dy = _run(flat, x)
    ctx = {"need_dx": True}
    y_kept = kept.forward(x, True, ctx)
    np.testing.assert_array_equal(y_kept, y.reshape(3, 1, 1, 6))
    np.testing.assert_array_equal(kept.backward(dy.reshape(3, 1, 1, 6), ctx), dx)
    assert cls.from_config(kept.get_config()).keepdims
