"""The image preprocessing layers (gpucnn/layers/preprocessing.py) on the NumPy engine: the shared checks against
the oracle (tests/checks_preprocessing.py), then what does not depend on the engine: configs, saving and resuming
with seeded layers, clear errors for bad arguments, no gradient through augmentation, and the training paths that
refuse random augmentation (the GPU fast path, the two-process step)."""
import json

import numpy as np
import pytest

import gpucnn as keras
from checks_preprocessing import PreprocessingChecks, images
from gpucnn import layers, models, utils
from gpucnn.layers.preprocessing import RandomImageLayer
from gpucnn.models import fastpath, parallel
from gpucnn.models.graph import StepValues


class TestNumpyEngine(PreprocessingChecks):
    engine = "cpu"


# ===================================================================================== engine-independent
CONFIGURED = [
    lambda: layers.Rescaling(1 / 255, offset=0.5, name="scale"),
    lambda: layers.RandomFlip("vertical", seed=4),
    lambda: layers.RandomRotation((-0.3, 0.1), fill_mode="constant", interpolation="nearest", seed=5,
                                  fill_value=2.5),
    lambda: layers.RandomZoom(0.2),
    lambda: layers.RandomZoom((-0.1, 0.3), [0.2, -0.4], fill_mode="wrap"),
    lambda: layers.RandomTranslation(0.1, (-0.2, 0.05), fill_mode="nearest", seed=0),
    lambda: layers.RandomContrast(0.4, value_range=(0, 1), seed=9),
]


@pytest.mark.parametrize("make", CONFIGURED, ids=lambda f: "")
def test_configs_are_json_and_round_trip(numpy_engine, make):
    layer = make()
    config = json.loads(json.dumps(layer.get_config()))
    again = type(layer)(**config)
    assert again.get_config() == config
    assert layers.LAYER_CLASSES[type(layer).__name__] is type(layer)
    x = images(0, (3, 6, 5, 2)) / np.float32(255)
    if getattr(layer, "seed", None) is not None:  # the same seed: the same draws
        np.testing.assert_array_equal(layer(x, training=True), again(x, training=True))


def test_keras_config_values_are_read_as_keras_writes_them(numpy_engine):
    """What Keras 3 stores: the parsed (lower, upper) factor of rotation and contrast, the factors as given of
    zoom and translation, data_format."""
    assert layers.RandomRotation(0.1).get_config()["factor"] == [-0.1, 0.1]
    assert layers.RandomContrast(0.3).get_config()["factor"] == [0.0, 0.3]  # Keras 3: (0, f)
    zoom = layers.RandomZoom(0.2, data_format="channels_last").get_config()
    assert zoom["height_factor"] == 0.2 and zoom["width_factor"] is None and zoom["fill_mode"] == "reflect"
    assert layers.RandomFlip().get_config()["mode"] == "horizontal_and_vertical"
    assert layers.Rescaling(1 / 255).get_config()["offset"] == 0.0


def book_augmented_model(seed=None, dropout=0.0):
    augmentation = keras.Sequential([layers.RandomFlip("horizontal", seed=seed),
                                     layers.RandomRotation(0.1, seed=None if seed is None else seed + 1),
                                     layers.RandomZoom(0.2, seed=None if seed is None else seed + 2),
                                     layers.RandomContrast(0.2, seed=None if seed is None else seed + 3)],
                                    name="data_augmentation")
    inputs = keras.Input(shape=(10, 10, 3))
    x = layers.Rescaling(1.0 / 255)(augmentation(inputs))
    x = layers.MaxPooling2D(2)(layers.Conv2D(4, 3, activation="relu")(x))
    x = layers.Dropout(dropout)(layers.Flatten()(x))
    model = keras.Model(inputs, layers.Dense(1, activation="sigmoid")(x))
    model.compile("rmsprop", "binary_crossentropy", ["accuracy"])
    return model


def two_class_images(n=24):
    x = images(1, (n, 10, 10, 3))
    y = (np.arange(n) % 2).astype(np.float32)
    x[y == 1, 3:7, 3:7, :] = 255.0
    return x, y


@pytest.mark.parametrize("seed", [None, 40])
def test_saving_and_resuming_with_augmentation_repeats_training_bit_for_bit(numpy_engine, tmp_path, seed):
    """A run stopped after two epochs, saved, loaded in another session and continued equals a run of four:
    the seeded layers' own generators (or gpucnn's) are saved with the model."""
    x, y = two_class_images()

    def fresh():
        utils.clear_session()
        utils.set_random_seed(7)
        return book_augmented_model(seed, dropout=0.25)

    straight = fresh()
    straight.fit(x, y, batch_size=8, epochs=4, verbose=0)
    first = fresh()
    first.fit(x, y, batch_size=8, epochs=2, verbose=0)
    first.save(tmp_path / "ckpt.keras")
    utils.set_random_seed(999)
    book_augmented_model(seed)  # another session's state
    resumed = models.load_model(tmp_path / "ckpt.keras")
    resumed.fit(x, y, batch_size=8, epochs=4, verbose=0, initial_epoch=2)
    for a, b in zip(resumed.get_weights(), straight.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert [layer.get_config() for layer in resumed._all_layers()] == \
        [layer.get_config() for layer in straight._all_layers()]
    if seed is not None:  # the generators themselves came back
        def states(model):
            return {layer.name: layer.random_state() for layer in model._all_layers()
                    if isinstance(layer, RandomImageLayer)}
        assert states(resumed) == states(straight) and all(s is not None for s in states(resumed).values())


def test_a_saved_random_state_must_fit_the_layer(numpy_engine):
    seeded, unseeded = layers.RandomFlip(seed=1), layers.RandomFlip()
    with pytest.raises(ValueError, match="has no seed"):
        unseeded.set_random_state(seeded.random_state())
    with pytest.raises(ValueError, match="has a seed"):
        seeded.set_random_state(None)
    with pytest.raises(ValueError, match="random-generator state"):
        seeded.set_random_state({"bit_generator": "MT19937", "state": {}})


BAD_ARGUMENTS = [
    (lambda: layers.RandomRotation(1.5), r"RandomRotation factor .*\[-1, 1\].*1\.5"),
    (lambda: layers.RandomRotation((0.1,)), "pair"),
    (lambda: layers.RandomRotation((0.1, 0.2, 0.3)), "pair"),
    (lambda: layers.RandomRotation("0.1"), "number or a pair"),
    (lambda: layers.RandomRotation(True), "finite number"),
    (lambda: layers.RandomRotation(float("nan")), "finite number"),
    (lambda: layers.RandomRotation(None), "number or a pair"),
    (lambda: layers.RandomRotation((-2, 0.5)), r"-2 is outside \[-1, 1\]"),
    (lambda: layers.RandomRotation(0.1, fill_mode="mirror"), "fill_mode must be one of 'reflect', 'wrap'"),
    (lambda: layers.RandomRotation(0.1, interpolation="bicubic"), "interpolation must be one of"),
    (lambda: layers.RandomRotation(0.1, fill_value="black"), "fill_value must be a finite number"),
    (lambda: layers.RandomZoom(-1.0), r"height_factor .*\(-1, 1\]"),
    (lambda: layers.RandomZoom(0.1, (0.2, -1)), r"width_factor .*\(-1, 1\]"),
    (lambda: layers.RandomZoom(1.2), "outside"),
    (lambda: layers.RandomTranslation(0.1), "missing 1 required positional argument: 'width_factor'"),
    (lambda: layers.RandomTranslation(0.1, 1.01), r"width_factor .*\[-1, 1\]"),
    (lambda: layers.RandomContrast(-0.1), r"RandomContrast factor .*\[0, 1\]"),
    (lambda: layers.RandomContrast(1.5), r"\[0, 1\]"),
    (lambda: layers.RandomContrast(0.2, value_range=(255, 0)), "low < high"),
    (lambda: layers.RandomContrast(0.2, value_range=255), "pair"),
    (lambda: layers.RandomFlip("diagonal"), "mode must be one of 'horizontal', 'vertical'"),
    (lambda: layers.RandomFlip(seed=-1), "non-negative int"),
    (lambda: layers.RandomFlip(seed=1.5), "non-negative int"),
    (lambda: layers.RandomFlip(data_format="channels_first"), "channels-last"),
    (lambda: layers.Rescaling([1 / 255, 1 / 127, 1 / 64]), "per-channel"),
    (lambda: layers.Rescaling("1/255"), "finite number"),
    (lambda: layers.Rescaling(1 / 255, offset=float("inf")), "finite number"),
]


@pytest.mark.parametrize("make, message", BAD_ARGUMENTS, ids=[m for _, m in BAD_ARGUMENTS])
def test_bad_arguments_get_clear_errors(numpy_engine, make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()


def test_augmentation_takes_images_only(numpy_engine):
    inputs = keras.Input(shape=(12,))
    with pytest.raises(ValueError, match=r"RandomFlip .*expects images of shape \(height, width, channels\)"):
        layers.RandomFlip()(inputs)
    assert layers.Rescaling(2.0)(inputs).shape == (None, 12)  # any shape


def test_no_gradient_flows_through_random_augmentation(numpy_engine):
    """Behind a layer with weights, training would need the gradient through the augmentation: a clear error
    naming the layer; as the first layers (the book's use) none is asked for."""
    inputs = keras.Input(shape=(8, 8, 3))
    x = layers.Conv2D(2, 3)(inputs)
    x = layers.RandomRotation(0.2, name="turn")(x)
    model = keras.Model(inputs, layers.Dense(1, activation="sigmoid")(layers.Flatten()(x)))
    model.compile("rmsprop", "binary_crossentropy")
    x, y = images(0, (4, 8, 8, 3)), np.float32([0, 1, 0, 1])
    with pytest.raises(NotImplementedError, match="RandomRotation 'turn' has no gradient.*first in the model"):
        model.fit(x, y, verbose=0)
    turn = model.get_layer("turn")
    dy = np.ones((2, 6, 6, 2), np.float32)
    ctx = {"need_dx": True}
    turn.forward(dy, False, ctx)
    assert turn.backward(dy, ctx) is dy  # outside training it is the identity, and so is its gradient
    assert turn.backward(dy, {"need_dx": False}) is None
    front = book_augmented_model()  # augmentation first: trains
    front.fit(*two_class_images(8), batch_size=4, verbose=0)


def test_rescaling_passes_gradients_when_asked(numpy_engine):
    """A Rescaling between layers with weights: the model trains and its gradient matches a model that scales the
    weights instead (conv(x) * s = conv with s-scaled kernel and bias)."""
    utils.set_random_seed(3)
    inputs = keras.Input(shape=(6, 6, 2))
    conv = layers.Conv2D(3, 3)
    dense = layers.Dense(1, activation="sigmoid")
    model = keras.Model(inputs, dense(layers.Flatten()(layers.Rescaling(0.5)(conv(inputs)))))
    model.compile("sgd", "binary_crossentropy")
    plain_conv, plain_dense = layers.Conv2D(3, 3), layers.Dense(1, activation="sigmoid")
    inputs2 = keras.Input(shape=(6, 6, 2))
    plain = keras.Model(inputs2, plain_dense(layers.Flatten()(plain_conv(inputs2))))
    plain.compile("sgd", "binary_crossentropy")
    kernel, bias = conv.get_weights()
    plain_conv.set_weights([kernel * 0.5, bias * 0.5])
    plain_dense.set_weights(dense.get_weights())
    x, y = images(2, (4, 6, 6, 2)) / np.float32(255), np.float32([0, 1, 1, 0])
    model.fit(x, y, batch_size=4, verbose=0, shuffle=False)
    plain.fit(x, y, batch_size=4, verbose=0, shuffle=False)
    # SGD: the conv's step in the rescaled model is 0.5 x the plain one's, which sees 0.5 x the kernel
    np.testing.assert_allclose(conv.get_weights()[0] * 0.5 - kernel * 0.5,
                               (plain_conv.get_weights()[0] - kernel * 0.5) * 0.25, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(dense.get_weights()[0], plain_dense.get_weights()[0], rtol=1e-5, atol=1e-7)


def _softmax_model(*front):
    inputs = keras.Input(shape=(8, 8, 3))
    x = inputs
    for layer in front:
        x = layer(x)
    model = keras.Model(inputs, layers.Dense(3, activation="softmax")(layers.Flatten()(x)))
    model.compile("rmsprop", "categorical_crossentropy")
    return model


def test_the_gpu_fast_path_takes_random_augmentation_and_rescaling(numpy_engine):
    """Their per-image values come from the step's tables (StepValues), which the captured step reads by
    the device step counter; the emulated test of the fast path trains such a model."""
    assert fastpath.unsupported_reason(_softmax_model(layers.RandomFlip(name="flip"), layers.Rescaling(0.1))) is None
    nested = keras.Sequential([layers.RandomZoom(0.1), layers.RandomContrast(0.2)], name="data_augmentation")
    assert fastpath.unsupported_reason(_softmax_model(nested)) is None
    assert fastpath.unsupported_reason(_softmax_model(layers.Rescaling(1 / 255))) is None


def test_step_values_are_drawn_step_by_step_and_layer_by_layer(numpy_engine):
    """What a training step's augmentation reads (StepValues.fill): for each step in turn, each random layer
    in the graph's order draws from its generator: a Dropout seed, or an augmentation layer's values for
    that step's images. Rows past the filled steps and images past a smaller batch stay zero."""
    def pieces():
        flip, contrast = layers.RandomFlip(seed=1), layers.RandomContrast(0.5, seed=2)
        _softmax_model(flip, contrast)  # builds them for 8 x 8 x 3 images
        return flip, layers.Dropout(0.5, seed=3), contrast

    flip, drop, contrast = pieces()
    twin_flip, twin_drop, twin_contrast = pieces()
    values = StepValues([flip, drop, contrast], rows=4, batch=5)
    assert values.table(drop) is None and values.table(flip).dtype == np.uint8
    assert values.table(contrast).shape == (4, 5, 1)
    values.fill([5, 5, 2])
    for r, n in enumerate([5, 5, 2]):
        np.testing.assert_array_equal(values.table(flip)[r, :n], twin_flip.step_values(n))
        assert values.seeds[r, values.slot(drop)] == twin_drop.next_seed()
        np.testing.assert_array_equal(values.table(contrast)[r, :n], twin_contrast.step_values(n))
    assert not values.table(contrast)[2, 2:].any() and not values.table(contrast)[3].any()
    assert not values.seeds[3].any()
    eager = StepValues([flip], xp=np)  # an eager step's: one row, sized to its batch
    eager.fill([3])
    assert eager.table(flip).shape == (1, 3, 1)
    np.testing.assert_array_equal(eager.table(flip)[0], twin_flip.step_values(3))
    with pytest.raises(ValueError, match="2 steps do not fit 1 rows"):
        eager.fill([3, 3])


def test_a_training_step_applies_the_values_its_step_drew(numpy_engine):
    """In a step the layer reads its row of the step's table (not a fresh draw): the images flipped by the
    flags its twin (same seed) draws, and the layer's generator advanced by exactly that draw."""
    flip, twin = layers.RandomFlip(seed=7), layers.RandomFlip(seed=7)
    _softmax_model(flip), _softmax_model(twin)
    images = np.random.default_rng(0).random((4, 8, 8, 3), dtype=np.float32)
    step = StepValues([flip], xp=np)
    step.fill([4])
    flags = twin.step_values(4).reshape(4).astype(bool)
    assert flags.any() and not flags.all()  # both cases
    want = np.where(flags[:, None, None, None], images[:, ::-1, ::-1], images)
    np.testing.assert_array_equal(flip.forward(images, True, {"step": step}), want)
    np.testing.assert_array_equal(flip.step_values(4), twin.step_values(4))  # no draw in forward


def test_the_two_process_numpy_step_takes_random_augmentation(numpy_engine):
    """Their values are drawn for the whole batch before it is split (tests/test_parallel.py checks the
    split step against the one-process step)."""
    for front in (layers.RandomContrast(0.2), layers.Rescaling(1 / 255)):
        assert "augmentation" not in str(parallel.split_reason(_softmax_model(front), 64))


def test_a_model_with_a_data_augmentation_block_saves_and_loads(numpy_engine, tmp_path):
    model = book_augmented_model(seed=3)
    model.save(tmp_path / "m.keras")
    loaded = models.load_model(tmp_path / "m.keras")
    assert loaded.get_config() == model.get_config()
    block = loaded.get_layer("data_augmentation")
    assert [type(layer).__name__ for layer in block.layers] == ["RandomFlip", "RandomRotation", "RandomZoom",
                                                                "RandomContrast"]
    x = images(5, (3, 10, 10, 3))
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


@pytest.mark.parametrize("make", [lambda: layers.RandomFlip(seed=4), lambda: layers.RandomRotation(0.2, seed=4),
                                  lambda: layers.RandomZoom(0.3, seed=4), lambda: layers.RandomContrast(0.5, seed=4),
                                  lambda: layers.RandomTranslation(0.2, 0.2, seed=4),
                                  lambda: layers.Rescaling(1 / 255)], ids=lambda f: type(f()).__name__)
def test_one_image_without_a_batch_axis_and_other_sizes_as_keras(make):
    """The book's chapter 8 augments one image, ``layer(image)`` (height, width, channels): it comes back as one
    augmented image, the same as the batch of one under the same seed; and a layer called on one size takes
    another later (no weights), as Keras's (both were refused)."""
    r = np.random.default_rng(1)
    image = r.uniform(0, 255, (12, 10, 3)).astype(np.float32)
    one = make()(image)
    batch = make()(image[None])
    assert one.shape == image.shape
    np.testing.assert_array_equal(one, batch[0])
    layer = make()
    layer(r.uniform(0, 255, (2, 12, 10, 3)).astype(np.float32))
    other = layer(r.uniform(0, 255, (3, 9, 14, 1)).astype(np.float32))
    assert other.shape == (3, 9, 14, 1) and np.isfinite(other).all()
