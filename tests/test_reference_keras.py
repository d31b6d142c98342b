"""The oracle (tests/reference.py) against Keras 3 itself, for the activations, the binary and from-logits
cross-entropies and the image preprocessing ops: Keras is the behavioural reference, the oracle its readable
float64 restatement, and the engines are checked against the oracle.

Skipped where Keras is not importable (it is not a dependency of gpucnn). With ``KERAS_BACKEND`` unset this
file asks for the torch backend, whose image ops are the pure index rules (the NumPy backend's call SciPy).
Keras computes in float32 here: the tolerances are float32's. Gradients are Keras's own, by the torch
backend's autograd (skipped on other backends).
"""
import math
import os

import numpy as np
import pytest

import reference as ref
from checks_image import random_transforms

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
    ("relu6", lambda x: keras.activations.relu6(x)),
    (("relu6", 2.5), lambda x: keras.layers.ReLU(max_value=2.5)(x)),
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


@pytest.mark.parametrize("name, options", [
    ("relu", {"max_value": 6.0}), ("relu", {"threshold": 0.5}), ("relu", {"negative_slope": 0.1}),
    ("relu", {"negative_slope": 0.1, "max_value": 2.0, "threshold": 0.5}), ("leaky_relu", {"negative_slope": 0.3}),
    ("elu", {"alpha": 0.5}), ("gelu", {"approximate": True}), ("softmax", {"axis": 0}), ("linear", {}),
    ("relu", {"threshold": -1.0}), ("relu", {"threshold": -1.0, "max_value": 6.0}), ("leaky_relu", (-0.1,)),
    ("relu", (0.1, 6.0)), ("elu", (2.0,)), ("softmax", (0,))], ids=str)
def test_activation_functions_with_keyword_arguments_are_kerass(name, options):
    """Keras's keyword (and positional) arguments, any values Keras's functions take."""
    import gpucnn
    x = F32(np.concatenate([np.linspace(-12, 12, 97), [-90.0, 90.0]]).reshape(3, 33))
    args, kwargs = (options, {}) if isinstance(options, tuple) else ((), options)
    want = np_(getattr(keras.activations, name)(x, *args, **kwargs))
    np.testing.assert_allclose(getattr(gpucnn.activations, name)(x, *args, **kwargs), want, rtol=2e-6,
                               atol=2e-7 * np.abs(want).max())


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


@pytest.mark.parametrize("from_logits", [False, True])
def test_categorical_label_smoothing_is_kerass(from_logits):
    """gpucnn's CategoricalCrossentropy(label_smoothing=s) compares with smoothed targets; the loss over them is
    Keras's loss with the smoothing."""
    from gpucnn import losses
    rng = np.random.default_rng(4)
    labels = F32(np.eye(5)[rng.integers(0, 5, 7)])
    p = F32(rng.normal(size=(7, 5)) * 2) if from_logits else ref.activation_forward(F32(rng.normal(size=(7, 5))),
                                                                                    "softmax")
    ours = losses.CategoricalCrossentropy(from_logits=from_logits, label_smoothing=0.2)
    targets = ours._targets(ours.check_labels(labels, 5))
    want = keras.losses.CategoricalCrossentropy(from_logits=from_logits, label_smoothing=0.2)(labels, p)
    got = ref.crossentropy_forward(p, targets, False, from_logits).mean()
    np.testing.assert_allclose(got, float(np_(want)), rtol=1e-5)


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
    np.testing.assert_allclose(np_(loss(labels, z, from_logits=True)),
                               ref.crossentropy_forward(z, labels, sparse, True), rtol=1e-5, atol=1e-6)
    grad = keras_grad(lambda v: keras.ops.mean(loss(keras.ops.convert_to_tensor(labels), v, from_logits=True)), z)
    want = ref.crossentropy_backward(z, labels, sparse, from_logits=True)
    np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())


# ===================================================================================== image transforms
def _images(rng, shape=(3, 7, 9, 2)):
    return F32(rng.normal(size=shape) * 50 + 100)


@pytest.mark.parametrize("interpolation", ["bilinear", "nearest"])
@pytest.mark.parametrize("fill_mode", ["reflect", "mirror", "wrap", "nearest", "constant"])
def test_affine_transform_is_kerass(interpolation, fill_mode):
    rng = np.random.default_rng([5, len(fill_mode), len(interpolation)])
    x = _images(rng)
    t = random_transforms(rng, 3, 7, 9, interpolation == "nearest")
    got = np_(keras.ops.image.affine_transform(x, t, interpolation=interpolation, fill_mode=fill_mode,
                                               fill_value=-3.0))
    np.testing.assert_allclose(got, ref.affine_transform(x, t, interpolation, fill_mode, -3.0), rtol=1e-4, atol=2e-3)


def _seeded_transformation(layer, x):
    return layer.get_random_transformation(x, training=True, seed=keras.random.SeedGenerator(11))


@pytest.mark.parametrize("fill_mode", ["reflect", "constant"])
def test_random_rotation_zoom_translation_are_their_transforms(fill_mode):
    rng = np.random.default_rng(6)
    x = _images(rng, (4, 8, 11, 3))
    n, h, w = 4, 8, 11
    cases = []
    layer = keras.layers.RandomRotation(0.3, fill_mode=fill_mode, fill_value=-1.0)
    tr = _seeded_transformation(layer, x)
    angles = np.float64(np_(tr["angle"])) * math.pi / 180  # Keras draws degrees: factor * 360
    cases.append((layer, tr, np_(tr["rotation_matrix"]), ref.rotation_transforms(angles, h, w)))
    layer = keras.layers.RandomZoom(0.3, (-0.2, 0.4), fill_mode=fill_mode, fill_value=-1.0)
    tr = _seeded_transformation(layer, x)
    zy, zx = np_(tr["height_zoom"]).ravel(), np_(tr["width_zoom"]).ravel()
    zooms = keras.ops.convert_to_tensor(F32(np.stack([zx, zy], 1)))
    cases.append((layer, tr, np_(layer._get_zoom_matrix(zooms, h, w)), ref.zoom_transforms(zy, zx, h, w)))
    layer = keras.layers.RandomTranslation(0.3, 0.2, fill_mode=fill_mode, fill_value=-1.0)
    tr = _seeded_transformation(layer, x)
    dx, dy = np_(tr["translations"]).T
    cases.append((layer, tr, np_(layer._get_translation_matrix(tr["translations"])),
                  ref.translation_transforms(dx, dy)))
    for layer, transformation, matrix, ours in cases:
        name = type(layer).__name__
        assert ours.shape == (n, 8)
        np.testing.assert_allclose(matrix, ours, rtol=1e-5, atol=1e-5, err_msg=name)
        got = np_(layer.transform_images(t32(x), transformation, training=True))
        np.testing.assert_allclose(got, ref.affine_transform(x, ours, "bilinear", fill_mode, -1.0), rtol=1e-4,
                                   atol=2e-3, err_msg=name)


def test_random_flip_contrast_and_rescaling_are_ours():
    rng = np.random.default_rng(7)
    x = F32(rng.uniform(0, 255, size=(6, 5, 4, 3)))
    for mode in ("horizontal", "vertical", "horizontal_and_vertical"):
        layer = keras.layers.RandomFlip(mode)
        tr = _seeded_transformation(layer, x)
        flags = np_(tr["flips"]).reshape(-1)
        assert 0 < flags.sum() < 6, "the seed should flip some images and not others"
        horizontal = flags if mode != "vertical" else None
        vertical = flags if mode != "horizontal" else None
        np.testing.assert_array_equal(np_(layer.transform_images(t32(x), tr, training=True)),
                                      ref.flip(x, horizontal, vertical))
    layer = keras.layers.RandomContrast(0.5)
    tr = _seeded_transformation(layer, x)
    factors = np_(tr["contrast_factor"]).reshape(-1)
    np.testing.assert_allclose(np_(layer.transform_images(t32(x), tr, training=True)), ref.adjust_contrast(x, factors),
                               rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(np_(keras.layers.Rescaling(1 / 255, offset=-0.5)(x)), ref.rescale(x, 1 / 255, -0.5),
                               rtol=1e-6, atol=1e-7)
