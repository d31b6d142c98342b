"""Keras 3's own layer and initializer configs read by gpucnn's from_config (a config Keras wrote holds its dtype
policy, its newer arguments at their defaults): the layer gpucnn builds computes as Keras's does."""
import numpy as np
import pytest

from gpucnn import initializers, layers, models

POLICY = {"module": "keras", "class_name": "DTypePolicy", "config": {"name": "float32"}, "registered_name": None}


def test_keras_dtype_policies_and_newer_default_arguments_are_read():
    conv = layers.Conv2D.from_config({"filters": 4, "kernel_size": [3, 3], "dtype": POLICY, "quantization_config": None,
                                      "kernel_initializer": {"class_name": "HeNormal", "config": {
                                          "seed": 3, "input_axes": None, "output_axes": None}}})
    assert conv.filters == 4
    with pytest.raises(ValueError, match="float32 only"):
        layers.Dense(2, dtype={**POLICY, "config": {"name": "float16"}})
    with pytest.raises(NotImplementedError, match="input_axes"):
        initializers.HeNormal(input_axes=[0])
    assert initializers.get({"class_name": "GlorotUniform", "config": {"seed": 1, "input_axes": None}}).seed == 1
    assert layers.InputLayer(batch_shape=(None, 4), sparse=False, ragged=False, optional=False).shape == (4,)
    with pytest.raises(NotImplementedError, match="sparse=True"):
        layers.InputLayer(shape=(4,), sparse=True)
    bn = layers.BatchNormalization.from_config({"renorm_clipping": None, "renorm_momentum": 0.99, "momentum": 0.9})
    assert bn.momentum == 0.9


def test_every_keras_layer_config_builds_the_same_layer():
    keras = pytest.importorskip("keras", reason="Keras 3 is the oracle where it is installed (not a dependency)")
    k = keras.layers
    x = np.random.default_rng(0).random((2, 8, 8, 3), dtype=np.float32)
    for made in (k.Dense(3), k.BatchNormalization(), k.SeparableConv2D(4, 3, depth_multiplier=2),
                 k.DepthwiseConv2D(3, padding="same"), k.Conv2D(4, 3, strides=2, padding="same"), k.ZeroPadding2D(1),
                 k.MaxPooling2D(), k.AveragePooling2D(2), k.GlobalAveragePooling2D(), k.GlobalMaxPooling2D(),
                 k.Activation("relu"), k.ReLU(max_value=0.5), k.LeakyReLU(), k.ELU(), k.Softmax(), k.Flatten(),
                 k.Rescaling(0.5, offset=0.1)):
        made.build((None, 8, 8, 3))
        ours = getattr(layers, type(made).__name__).from_config(made.get_config())
        ours.build((8, 8, 3))
        if made.get_weights():
            ours.set_weights(made.get_weights())
        want = keras.ops.convert_to_numpy(made(x))
        np.testing.assert_allclose(np.asarray(ours(x)), want, rtol=1e-5, atol=1e-6, err_msg=type(made).__name__)
    sequential = keras.Sequential([keras.Input((4,)), k.Dense(3, activation="relu"), k.Dense(2)])
    ours = models.model_from_json(sequential.to_json())
    ours.set_weights(sequential.get_weights())
    v = x.reshape(-1)[:8].reshape(2, 4)
    np.testing.assert_allclose(ours.predict(v, verbose=0), keras.ops.convert_to_numpy(sequential(v)), rtol=1e-6)
