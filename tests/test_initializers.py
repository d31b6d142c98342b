"""keras.initializers as Keras defines them: the variance-scaling family (truncated normals at two standard deviations,
widened to keep the variance), the plain ones, names in snake_case and CamelCase, objects with seeds, and layer
configs that keep them (a model rebuilt from its config used to fall back to the defaults)."""
import numpy as np
import pytest

import gpucnn as keras
from gpucnn import initializers, layers, models

pytestmark = pytest.mark.usefixtures("numpy_engine")


@pytest.mark.parametrize("name, scale, fan, normal", [
    ("he_normal", 2.0, "in", True), ("glorot_normal", 1.0, "avg", True), ("lecun_normal", 1.0, "in", True),
    ("he_uniform", 2.0, "in", False), ("glorot_uniform", 1.0, "avg", False), ("lecun_uniform", 1.0, "in", False)])
def test_the_variance_scaling_family_keeps_the_variance_and_truncates_at_two_deviations(name, scale, fan, normal):
    keras.utils.set_random_seed(0)
    shape = (3, 3, 64, 256)  # fan in 576, fan out 2304
    n = 576 if fan == "in" else (576 + 2304) / 2
    w = initializers.get(name)(shape)
    assert w.dtype == np.float32 and w.shape == shape
    np.testing.assert_allclose(w.var(), scale / n, rtol=0.02)
    if normal:  # truncated at 2 standard deviations of the widened normal
        assert np.abs(w).max() <= 2 * np.sqrt(scale / n) / 0.87962566103423978
        assert 0.02 < (np.abs(w) > 2 * np.sqrt(scale / n)).mean() < 0.05  # (an untruncated normal: 4.6 %)
    else:
        assert np.abs(w).max() <= np.sqrt(3 * scale / n)


def test_names_objects_seeds_and_configs():
    assert type(initializers.get("HeNormal")) is initializers.HeNormal
    assert type(initializers.get("random_normal")) is initializers.RandomNormal
    seeded = initializers.HeNormal(seed=3)
    np.testing.assert_array_equal(seeded((4, 5)), seeded((4, 5)))  # a seed gives the same values at every call
    np.testing.assert_array_equal(initializers.Constant(0.1)((2, 2)), np.full((2, 2), 0.1, np.float32))
    t = initializers.TruncatedNormal(mean=1.0, stddev=0.5, seed=0)((10000,))
    assert np.abs(t - 1).max() <= 1.0 and abs(t.mean() - 1) < 0.02
    u = initializers.RandomUniform(-0.2, 0.3, seed=1)((1000,))
    assert u.min() >= -0.2 and u.max() < 0.3
    again = initializers.get(initializers.serialize(initializers.RandomNormal(stddev=0.2, seed=4)))
    assert again.get_config() == {"mean": 0.0, "stddev": 0.2, "seed": 4}
    with pytest.raises(ValueError, match="unknown initializer 'orthogonal'.*known:.*he_normal"):
        layers.Dense(2, kernel_initializer="orthogonal")
    with pytest.raises(AttributeError, match="gpucnn.initializers has no 'Orthogonal'.*It has:.*HeNormal"):
        keras.initializers.Orthogonal


def test_a_model_rebuilt_from_its_config_keeps_its_initializers():
    """Dense and Conv2D configs now hold their initializers (names, or objects as their configs), as Keras's: a model
    rebuilt from its config starts as the original was told to (it fell back to glorot_uniform and zeros)."""
    inp = keras.Input(shape=(6, 6, 2))
    x = layers.Conv2D(3, 3, kernel_initializer=initializers.Constant(0.5), bias_initializer="ones")(inp)
    out = layers.Dense(3, kernel_initializer="zeros", bias_initializer="ones")(layers.Flatten()(x))
    m = models.Model(inp, out)
    again = models.Model.from_config(m.get_config())
    for a, b in zip(again.get_weights(), m.get_weights()):
        np.testing.assert_array_equal(a, b)
    conv = layers.Conv2D(4, 3, kernel_initializer="he_normal", activation=None)
    config = conv.get_config()
    assert config["kernel_initializer"] == "he_normal" and config["activation"] == "linear"
    assert layers.Conv2D.from_config(config).get_config() == config
    assert layers.Dense.from_config(layers.Dense(5, activation="relu").get_config()).units == 5


def test_kerass_layer_arguments_at_their_defaults_are_taken_and_others_refused_by_name():
    """dilation_rate=1, groups=1, the regularizers and constraints as None, data_format="channels_last",
    input_dim: accepted (they crashed as unexpected keywords); other values say gpucnn does not support them."""
    conv = layers.Conv2D(8, 3, dilation_rate=1, groups=1, kernel_regularizer=None, bias_regularizer=None,
                         activity_regularizer=None, kernel_constraint=None, bias_constraint=None,
                         data_format="channels_last")
    assert conv.filters == 8
    assert layers.Dense(3, input_dim=5, lora_rank=None).build((5,)) == (3,)
    assert layers.Flatten(data_format="channels_last") is not None
    for make, match in ((lambda: layers.Conv2D(8, 3, dilation_rate=2), r"dilation_rate=\(2, 2\)"),
                        (lambda: layers.Dense(8, kernel_regularizer="l2"), "kernel_regularizer='l2'.*regularization"),
                        (lambda: layers.Conv2D(8, 3, groups=2), "groups=2"),
                        (lambda: layers.Flatten(data_format="channels_first"), "data_format='channels_first'")):
        with pytest.raises(ValueError, match="gpucnn does not support " + match):
            make()
    with pytest.raises(TypeError, match="unexpected keyword argument.*'kernal_size'"):
        layers.Conv2D(8, 3, kernal_size=3)
    dense = layers.Dense(3)  # Keras's guides build a layer with the batch dimension first, as Keras takes it
    dense.build((None, 4))
    assert [w.shape for w in dense.get_weights()] == [(4, 3), (3,)] and dense.input_shape == (4,)
    conv = layers.Conv2D(2, 3)
    conv.build((None, 8, 8, 3))
    assert conv.get_weights()[0].shape == (3, 3, 3, 2)
    with pytest.raises(ValueError, match=r"does not support variable sizes \(None\)"):
        keras.Input(shape=(None, 4))  # (a per-sample shape: no unknown dimensions)
    with pytest.raises(ValueError, match="not built yet"):
        layers.Dense(3).count_params()


def test_a_layers_weights_by_their_keras_names():
    """layer.kernel, layer.bias, layer.gamma, ...: the weight's current values with Keras's numpy()."""
    dense = layers.Dense(3)
    dense.build((4,))
    assert dense.kernel.shape == (4, 3) and dense.kernel.numpy().shape == (4, 3)
    np.testing.assert_array_equal(dense.bias.numpy(), np.zeros(3, np.float32))
    dense.set_weights([np.ones((4, 3), np.float32), np.full(3, 2.0, np.float32)])
    assert float(dense.kernel.sum()) == 12.0 and float(dense.bias[0]) == 2.0
    bn = layers.BatchNormalization()
    bn.build((5,))
    np.testing.assert_array_equal(bn.moving_variance.numpy(), np.ones(5, np.float32))
    with pytest.raises(AttributeError, match="'Dense' object has no attribute 'gamma'"):
        dense.gamma


def test_variables_follow_the_layer_through_training_and_assign_reaches_it():
    """model.weights, layer.kernel and trainable_weights are Keras's variables: a reference taken before fit reads
    the trained values after it (the arrays it held went stale when fit gathered the weights into its buffer), and
    writing through it reaches the model; name, path, numpy() and assign as Keras's."""
    m = models.Sequential([keras.Input((3,)), layers.Dense(2, activation="softmax", name="d")])
    kernel, first, trainable = m.layers[0].kernel, m.weights[0], m.trainable_weights[0]
    assert (first.name, first.path, trainable.trainable) == ("kernel", "sequential/d/kernel", True)
    m.compile("sgd", "sparse_categorical_crossentropy")
    x = np.random.default_rng(0).random((8, 3)).astype(np.float32)
    m.fit(x, np.arange(8) % 2, epochs=2, verbose=0)
    for ref in (kernel, first, trainable):
        np.testing.assert_array_equal(np.asarray(ref), m.get_weights()[0])
    kernel[...] = 0
    assert np.abs(m.get_weights()[0]).max() == 0
    first.assign(np.ones((3, 2)))
    m.compile("adam", "sparse_categorical_crossentropy")  # new buffers again
    m.fit(x, np.arange(8) % 2, verbose=0)
    np.testing.assert_array_equal(kernel.numpy(), m.get_weights()[0])
    assert float(kernel.numpy()[0, 0]) != 1.0 and (kernel * 2).shape == (3, 2) and len(m.variables) == 2


def test_variables_compare_by_the_weight_they_name_and_change_it_in_place():
    """A Variable is its layer's slot: `in`, `index` and `==` between lists find it (fresh objects each time);
    `v -= 1` and ufuncs with out=v change the model's weight; **, abs, // work as on arrays."""
    m = models.Sequential([keras.Input((4,)), layers.Dense(3), layers.Dense(1)])
    dense = m.layers[0]
    assert dense.kernel in m.trainable_weights and m.weights == m.weights and m.weights.index(dense.bias) == 1
    assert dense.kernel != dense.bias and len({dense.kernel, m.weights[0]}) == 1
    w = m.trainable_weights[0]
    before = np.asarray(w).copy()
    w -= 1.0
    np.testing.assert_array_equal(m.get_weights()[0], before - 1)
    np.add(w, 1, out=w)
    np.testing.assert_allclose(m.get_weights()[0], before, rtol=1e-6, atol=1e-6)
    now = np.asarray(w).copy()
    np.testing.assert_array_equal(w ** 2, now ** 2)
    np.testing.assert_array_equal(abs(w), np.abs(now))
    assert initializers.get("HE_NORMAL").get_config() == {"seed": None}
