"""Keras 3 as the oracle for the preprocessing layers: the same factors parse to the same ranges, factor 0 is the
identity in both, and given the same draws (our layer's, handed to Keras's ``transform_images``) both produce the
same images: Rescaling and RandomFlip exactly, the resampling layers and RandomContrast within float32 rounding.
Runs only where Keras is installed (a scratch environment: ``pip install keras torch``, ``KERAS_BACKEND=torch``);
Keras is never a dependency of gpucnn."""
import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
keras_ref = pytest.importorskip("keras")

from checks_preprocessing import images  # noqa: E402
from gpucnn import layers, utils  # noqa: E402

pytestmark = pytest.mark.usefixtures("numpy_engine")
N, H, W, C = 5, 7, 9, 3


def numpy(t):
    return np.asarray(keras_ref.ops.convert_to_numpy(t))


def ours(layer, x, seed):
    with utils.generator_in_use(np.random.default_rng(seed)):
        return np.asarray(layer(x, training=True))


def keras_transform(layer, x, transformation):
    return numpy(layer.transform_images(keras_ref.ops.convert_to_tensor(x), transformation, training=True))


@pytest.mark.parametrize("name, args", [
    ("RandomRotation", (0.1,)), ("RandomRotation", ((-0.3, 0.2),)), ("RandomRotation", ((0.4, -0.1),)),
    ("RandomRotation", (-0.25,)), ("RandomContrast", (0.3,)), ("RandomContrast", ((0.2, 0.6),)),
    ("RandomZoom", (0.2,)), ("RandomZoom", ((-0.3, 0.1), 0.5)), ("RandomZoom", (-0.4, (0.2, -0.1))),
    ("RandomTranslation", (0.1, (0.3, -0.2))), ("RandomTranslation", (-0.5, 1.0))])
def test_factors_parse_to_keras_ranges(name, args):
    theirs, mine = getattr(keras_ref.layers, name)(*args), getattr(layers, name)(*args)
    if hasattr(theirs, "height_lower"):
        assert mine.height_range == (theirs.height_lower, theirs.height_upper)
        if theirs.width_factor is not None:
            assert mine.width_range == (theirs.width_lower, theirs.width_upper)
        else:
            assert mine.width_range is None
    else:
        assert mine.factor == tuple(float(v) for v in theirs.factor)
    config = {k: v for k, v in theirs.get_config().items() if k != "dtype"}  # Keras's config builds ours
    assert getattr(layers, name)(**config).get_config() == {**mine.get_config(), "name": config["name"]}


@pytest.mark.parametrize("name, args", [("RandomRotation", (0.0,)), ("RandomZoom", (0.0,)),
                                        ("RandomZoom", (0.0, 0.0)), ("RandomTranslation", (0.0, 0.0))])
def test_factor_zero_is_the_identity_in_keras_and_in_gpucnn(name, args):
    x = images(1, (N, H, W, C))
    np.testing.assert_array_equal(numpy(getattr(keras_ref.layers, name)(*args)(x, training=True)), x)
    np.testing.assert_array_equal(ours(getattr(layers, name)(*args), x, 0), x)


def test_rescaling_equals_keras():
    x = images(2, (N, H, W, C))
    for scale, offset in ((1 / 255, 0.0), (1 / 127.5, -1.0), (3.0, 0.25)):
        np.testing.assert_array_equal(np.asarray(layers.Rescaling(scale, offset)(x)),
                                      numpy(keras_ref.layers.Rescaling(scale, offset)(x)))


@pytest.mark.parametrize("mode", ["horizontal", "vertical", "horizontal_and_vertical"])
def test_random_flip_equals_keras_given_the_same_draws(mode):
    x = images(3, (12, H, W, C))
    flips = np.random.default_rng(4).uniform(0, 1, 12) <= 0.5
    assert 0 < flips.sum() < 12
    want = keras_transform(keras_ref.layers.RandomFlip(mode), x, {"flips": flips.reshape(-1, 1, 1, 1)})
    np.testing.assert_array_equal(ours(layers.RandomFlip(mode), x, 4), want)


def _rotation(layer, g):
    degrees = 360.0 * g.uniform(-0.2, 0.3, N)  # Keras draws degrees: factor * 360
    angle, zeros, ones = (keras_ref.ops.convert_to_tensor(np.float32(v)) for v in (degrees, np.zeros(N), np.ones(N)))
    matrix = layer._compute_affine_matrix(0.5, 0.5, angle, zeros, zeros, ones, zeros, zeros, H, W)
    return {"rotation_matrix": matrix}


def _zoom(layer, g):
    zy = 1 + g.uniform(-0.3, 0.4, N)
    zx = 1 + g.uniform(-0.2, 0.1, N)
    return {"height_zoom": np.float32(zy[:, None]), "width_zoom": np.float32(zx[:, None])}


def _translation(layer, g):
    dy = H * g.uniform(-0.2, 0.3, N)
    dx = W * g.uniform(-0.25, 0.25, N)
    return {"translations": np.float32(np.stack([dx, dy], 1))}


def _contrast(layer, g):
    return {"contrast_factor": np.float32(g.uniform(1 - 0.3, 1 + 0.6, N)).reshape(-1, 1, 1, 1)}


AFFINE = [("RandomRotation", ((-0.2, 0.3),), _rotation), ("RandomZoom", ((-0.3, 0.4), (-0.2, 0.1)), _zoom),
          ("RandomTranslation", ((-0.2, 0.3), 0.25), _translation)]
CASES = [(name, args, draws, {"fill_mode": mode, "fill_value": 3.0}) for name, args, draws in AFFINE
         for mode in ("reflect", "wrap", "nearest", "constant")] + [("RandomContrast", ((0.3, 0.6),), _contrast, {})]


@pytest.mark.parametrize("name, args, transformation, options", CASES,
                         ids=[f"{c[0]}-{c[3].get('fill_mode', '')}" for c in CASES])
def test_random_layers_equal_keras_given_the_same_draws(name, args, transformation, options):
    x = images(5, (N, H, W, C))
    theirs = getattr(keras_ref.layers, name)(*args, **options)
    want = keras_transform(theirs, x, transformation(theirs, np.random.default_rng(6)))
    got = ours(getattr(layers, name)(*args, **options), x, 6)
    assert not np.allclose(want, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * 255)
