"""The image preprocessing layers (gpucnn/layers/preprocessing.py) on an engine: each layer's output against the
float64 oracle given the values it drew, Keras's meaning of the factors, the identity outside training and with
factor 0, and seeded repeatability. Written once for both engines: ``PreprocessingChecks`` holds the tests, a
``Test...`` subclass that sets ``engine`` ("cpu" or "gpu") runs them: tests/test_preprocessing_layers.py (NumPy)
and tests/test_gpu_image.py (CUDA, and through it the kernel emulator).

A layer's draws come from a generator the test hands it (``utils.generator_in_use``); the test draws the same
values from a twin generator by Keras's rules (the module docstring of gpucnn/layers/preprocessing.py), builds the
transforms with the oracle's builders and compares. Nearest sampling is compared exactly on draws whose
coordinates keep away from half-integers (checks_image.away_from_halves); bilinear with float32's tolerance.
"""
import math

import numpy as np
import pytest

import reference as ref
from checks_image import away_from_halves
from gpucnn import backend, layers, models, utils

AFFINE_FILL_MODES = ["reflect", "wrap", "nearest", "constant"]  # the four Keras's layers take
N, H, W, C = 6, 7, 9, 3


def images(seed=0, shape=(N, H, W, C)):
    return np.random.default_rng(seed).uniform(0, 255, shape).astype(np.float32)


def first_seed(accept, seeds=range(200)):
    """The first seed whose twin generator's draws pass ``accept(generator)``."""
    for seed in seeds:
        if accept(np.random.default_rng(seed)):
            return seed
    raise AssertionError("no seed gives usable draws")


# Each affine layer and the transforms Keras builds from its draws, drawn in Keras's order (height before width)
def _rotations(g):
    return ref.rotation_transforms(2 * math.pi * g.uniform(-0.2, 0.3, N), H, W)  # a fraction of a full turn


def _zooms(g):
    z = 1 + g.uniform(-0.3, 0.4, N)  # no width_factor: the width takes the height's zoom
    return ref.zoom_transforms(z, z, H, W)


def _zooms_both(g):
    zy = 1 + g.uniform(-0.2, 0.2, N)
    return ref.zoom_transforms(zy, 1 + g.uniform(-0.5, 0.1, N), H, W)


def _translations(g):
    dy = H * g.uniform(-0.2, 0.3, N)  # fractions of the height and the width
    return ref.translation_transforms(W * g.uniform(-0.25, 0.25, N), dy)


AFFINE_CASES = {
    "rotation": (lambda **kw: layers.RandomRotation((-0.2, 0.3), **kw), _rotations),
    "zoom": (lambda **kw: layers.RandomZoom((0.4, -0.3), **kw), _zooms),  # a pair in either order: sorted
    "zoom_both": (lambda **kw: layers.RandomZoom(0.2, (-0.5, 0.1), **kw), _zooms_both),
    "translation": (lambda **kw: layers.RandomTranslation((-0.2, 0.3), 0.25, **kw), _translations),
}


class PreprocessingChecks:
    engine = None  # "cpu" or "gpu", set by the subclass

    @pytest.fixture(autouse=True)
    def _on_engine(self):
        backend.set_engine(self.engine)
        assert backend.engine() == {"cpu": "numpy", "gpu": "cuda"}[self.engine]
        utils.clear_session()
        utils.set_random_seed(1)
        yield
        backend.set_engine("cpu")

    @staticmethod
    def call(layer, x, training=True, seed=None):
        """The layer's output (host) for the images ``x``, its draws from ``default_rng(seed)`` when given; checks
        that the input is left as it was."""
        xd = backend.ops().xp.asarray(x)
        if seed is None:
            y = layer(xd) if training is None else layer(xd, training=training)
        else:
            with utils.generator_in_use(np.random.default_rng(seed)):
                y = layer(xd, training=training)
        np.testing.assert_array_equal(backend.to_numpy(xd), x)
        y = np.asarray(backend.to_numpy(y))
        assert y.dtype == np.float32 and y.shape == x.shape
        return y

    @staticmethod
    def close(got, want):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))

    # ================================================================================= Rescaling
    def test_rescaling_matches_the_oracle_in_training_and_inference_and_its_backward_scales(self):
        x = images(1)
        layer = layers.Rescaling(1.0 / 127.5, offset=-1.0)
        for training in (True, False):
            np.testing.assert_allclose(self.call(layer, x, training), ref.rescale(x, 1.0 / 127.5, -1.0), rtol=1e-6,
                                       atol=1e-6)
        dy = np.random.default_rng(2).standard_normal(x.shape).astype(np.float32)
        xp, ctx = backend.ops().xp, {"need_dx": True}
        layer.forward(xp.asarray(x), True, ctx)
        np.testing.assert_allclose(backend.to_numpy(layer.backward(xp.asarray(dy), ctx)),
                                   ref.rescale(dy, 1.0 / 127.5, 0.0), rtol=1e-6, atol=1e-7)
        assert layer.backward(xp.asarray(dy), {"need_dx": False}) is None

    # ================================================================================= each layer against the oracle
    @pytest.mark.parametrize("mode", ["horizontal", "vertical", "horizontal_and_vertical"])
    def test_random_flip_flips_the_images_its_draws_choose(self, mode):
        n = 40
        x = images(2, (n, 3, 4, 2))
        # draws on both sides of Keras's threshold (flip where u <= 0.5), close to it
        seed = first_seed(lambda g: (lambda u: ((u > 0.49) & (u <= 0.5)).any() and ((u > 0.5) & (u < 0.51)).any())(
            g.uniform(0, 1, n)))
        flags = np.random.default_rng(seed).uniform(0, 1, n) <= 0.5
        want = ref.flip(x, flags if "horizontal" in mode else None, flags if "vertical" in mode else None)
        np.testing.assert_array_equal(self.call(layers.RandomFlip(mode), x, seed=seed), np.float32(want))

    @pytest.mark.parametrize("fill_mode", AFFINE_FILL_MODES)
    @pytest.mark.parametrize("interpolation", ["bilinear", "nearest"])
    @pytest.mark.parametrize("kind", sorted(AFFINE_CASES))
    def test_affine_layers_sample_the_transforms_their_draws_make(self, kind, interpolation, fill_mode):
        """RandomRotation, RandomZoom (one factor, then both) and RandomTranslation: the output is the oracle's
        resampling through the transform Keras builds from the same draws."""
        x = images(3)
        make, transforms = AFFINE_CASES[kind]
        layer = make(fill_mode=fill_mode, interpolation=interpolation, fill_value=-7.0)
        seed = first_seed(lambda g: interpolation == "bilinear" or away_from_halves(transforms(g), H, W))
        want = ref.affine_transform(x, transforms(np.random.default_rng(seed)), interpolation, fill_mode, -7.0)
        got = self.call(layer, x, seed=seed)
        if interpolation == "nearest":
            np.testing.assert_array_equal(got, np.float32(want))
        else:
            self.close(got, want)

    @pytest.mark.parametrize("factor, value_range, low, high", [(0.5, (0, 255), 1.0, 1.5),
                                                                ((0.3, 0.8), (0, 255), 0.7, 1.8),
                                                                ((0.9, 0.2), (40, 200), 0.8, 1.9)])
    def test_random_contrast_scales_about_each_channel_mean_by_its_draws(self, factor, value_range, low, high):
        """Keras 3's reading of the factor: f is (0, f), a pair is (lower, upper) sorted; the contrast factor is
        U(1 - lower, 1 + upper); the result is clipped to value_range."""
        x = images(4)
        seed = 5
        factors = np.float32(np.random.default_rng(seed).uniform(low, high, N))
        got = self.call(layers.RandomContrast(factor, value_range=value_range), x, seed=seed)
        self.close(got, ref.adjust_contrast(x, factors, value_range))
        assert got.min() >= value_range[0] and got.max() <= value_range[1]

    # ================================================================================= what the factors mean
    def test_a_quarter_turn_is_counter_clockwise(self):
        x = images(5, (2, 6, 6, 2))
        for interpolation in ("nearest", "bilinear"):
            got = self.call(layers.RandomRotation((0.25, 0.25), interpolation=interpolation), x)
            np.testing.assert_allclose(got, np.rot90(x, 1, axes=(1, 2)), rtol=0, atol=1e-3)

    def test_translation_factors_are_fractions_of_the_height_and_width(self):
        x = images(6, (2, 8, 12, 1))
        down = self.call(layers.RandomTranslation((0.25, 0.25), 0.0, fill_mode="constant", fill_value=-1), x)
        np.testing.assert_array_equal(down[:, 2:], x[:, :-2])  # 8 * 0.25 = 2 rows down
        np.testing.assert_array_equal(down[:, :2], -1)
        left = self.call(layers.RandomTranslation(0.0, (-0.25, -0.25), fill_mode="wrap"), x)
        np.testing.assert_array_equal(left, np.roll(x, -3, axis=2))  # 12 * 0.25 = 3 columns left

    def test_negative_zoom_factors_zoom_in_and_positive_zoom_out(self):
        x = images(7, (2, 9, 9, 2))
        zoom_in = self.call(layers.RandomZoom((-0.5, -0.5)), x)  # zoom 0.5: the centre magnified twice
        np.testing.assert_array_equal(zoom_in[:, ::2, ::2], x[:, 2:7, 2:7])
        zoom_out = self.call(layers.RandomZoom((1.0, 1.0), fill_mode="constant"), x)  # zoom 2: half the size
        np.testing.assert_array_equal(zoom_out[:, 2:7, 2:7], x[:, ::2, ::2])
        np.testing.assert_array_equal(zoom_out[:, 0], 0)
        wide = self.call(layers.RandomZoom(0.0, (-0.5, -0.5)), x)  # the width only
        np.testing.assert_array_equal(wide[:, :, ::2], x[:, :, 2:7])

    # ================================================================================= identity
    def augmenters(self):
        return [layers.RandomFlip(), layers.RandomRotation(0.3), layers.RandomZoom(0.3, 0.2),
                layers.RandomTranslation(0.2, 0.2), layers.RandomContrast(0.5)]

    def test_outside_training_every_augmentation_is_the_identity(self):
        x = images(8)
        for layer in self.augmenters():
            np.testing.assert_array_equal(self.call(layer, x, training=False), x)
            assert not np.array_equal(self.call(layer, x, training=True, seed=3), x), layer
            assert not np.array_equal(self.call(layer, x, training=None), x), layer  # Keras: a direct call augments

    @pytest.mark.parametrize("make", [lambda: layers.RandomRotation(0.0), lambda: layers.RandomRotation((0, -0.0)),
                                      lambda: layers.RandomZoom(0.0), lambda: layers.RandomZoom(0, (0.0, 0.0)),
                                      lambda: layers.RandomTranslation(0, 0.0), lambda: layers.RandomContrast(0.0)],
                             ids=["rotation", "rotation_pair", "zoom", "zoom_both", "translation", "contrast"])
    def test_factor_zero_is_the_exact_identity_in_training(self, make):
        x = images(9)
        x[0, 0, 0, 0] = 300.0  # outside RandomContrast's value range: not clipped either
        np.testing.assert_array_equal(self.call(make(), x, training=True), x)

    def test_predict_and_evaluate_of_a_model_pass_images_through(self):
        """A model with a data_augmentation block predicts and evaluates as the same model without it."""
        x = images(10, (4, 8, 8, 3))
        y = np.float32([0, 1, 1, 0])
        block = models.Sequential(self.augmenters(), name="data_augmentation")
        head = [layers.Rescaling(1 / 255), layers.Flatten(), layers.Dense(1, activation="sigmoid")]

        def model(augment):
            inputs = layers.Input(shape=(8, 8, 3))
            h = block(inputs) if augment else inputs
            for layer in head:
                h = layer(h)
            m = models.Model(inputs, h)
            m.compile("rmsprop", "binary_crossentropy")
            return m

        with_block, without = model(True), model(False)
        np.testing.assert_array_equal(with_block.predict(x, verbose=0), without.predict(x, verbose=0))
        assert with_block.evaluate(x, y, verbose=0) == without.evaluate(x, y, verbose=0)
        xd = backend.ops().xp.asarray(x)
        np.testing.assert_array_equal(backend.to_numpy(block(xd, training=False)), x)
        assert not np.array_equal(backend.to_numpy(block(xd)), x)  # as Keras: a direct call augments

    # ================================================================================= seeds
    def test_seeded_layers_repeat_and_draw_anew_each_call(self):
        x = images(11)
        for make in (lambda: layers.RandomRotation(0.2, seed=3), lambda: layers.RandomFlip(seed=3),
                     lambda: layers.RandomContrast((0.4, 0.4), seed=3)):
            a, b = make(), make()
            utils.set_random_seed(1)
            first = self.call(a, x)
            utils.set_random_seed(2)  # a seeded layer draws from its own generator only
            np.testing.assert_array_equal(self.call(b, x), first)
            assert not np.array_equal(self.call(a, x), first)  # the next step: new draws
            c = make()
            c.set_random_state(a.random_state())
            np.testing.assert_array_equal(self.call(c, x), self.call(a, x))

    def test_set_random_seed_repeats_a_training_run_bit_for_bit(self):
        x = images(12, (16, 8, 8, 3))
        y = (x.mean(axis=(1, 2, 3)) > 127.5).astype(np.float32)

        def run():
            utils.set_random_seed(5)
            utils.clear_session()
            model = models.Sequential([layers.Input(shape=(8, 8, 3)), *self.augmenters(), layers.Rescaling(1 / 255),
                                       layers.Conv2D(4, 3, activation="relu"), layers.Flatten(),
                                       layers.Dense(1, activation="sigmoid")])
            model.compile("rmsprop", "binary_crossentropy", ["accuracy"])
            history = model.fit(x, y, batch_size=8, epochs=2, verbose=0)
            return model.get_weights(), history.history["loss"]

        (w1, loss1), (w2, loss2) = run(), run()
        assert loss1 == loss2
        for a, b in zip(w1, w2):
            np.testing.assert_array_equal(a, b)
