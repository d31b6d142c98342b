"""The image transforms (rescale, flip, affine_transform, adjust_contrast) against the float64 oracle, written
once for both engines: ``ImageChecks`` holds the tests, and a ``Test...`` subclass that sets ``engine``
(helpers.Engine) runs them on one engine: tests/test_ops_numpy_image.py (NumPy) and tests/test_gpu_image.py
(CUDA, and through it the kernel emulator).

Transforms are rotations, scalings and shifts that send many outputs outside the image (every fill mode is
read). Nearest sampling is compared exactly, on transforms redrawn until no coordinate is near a half-integer
(where rounding may go either way between float32 and float64); bilinear sampling with float32's tolerance.
"""
import math

import numpy as np
import pytest

import reference as ref
from helpers import F32, f32, normal

IMAGE_SHAPES = [(1, 5, 5, 1), (2, 7, 9, 3), (3, 6, 4, 2), (2, 1, 6, 2), (2, 5, 1, 3)]
FILL_MODES = ["reflect", "mirror", "wrap", "nearest", "constant"]


def image_id(shape):
    return "x".join(map(str, shape))


def away_from_halves(t, h, w, gap=1e-3):
    """Whether no coordinate the (N, 8) affine transforms read over an h x w output is within ``gap`` of a
    half-integer."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    for a0, a1, a2, b0, b1, b2, _, _ in np.float64(t):
        for c in (a0 * cols + a1 * rows + a2, b0 * cols + b1 * rows + b2):
            if (np.abs(c - np.floor(c) - 0.5) < gap).any():
                return False
    return True


def random_transforms(rng, n, h, w, nearest):
    """Rotations about the centre, scaled by 0.6-1.4 and moved by up to 4 pixels, as float32 (N, 8); for
    nearest sampling, redrawn until away_from_halves."""
    for _ in range(200):
        t = ref.rotation_transforms(rng.uniform(-math.pi, math.pi, n), h, w)
        t[:, [0, 1, 3, 4]] *= rng.uniform(0.6, 1.4, (n, 1))
        t[:, [2, 5]] += rng.uniform(-4, 4, (n, 2))
        t = f32(t)
        if not nearest or away_from_halves(t, h, w):
            return t
    raise AssertionError("no transform away from half-integer coordinates")


class ImageChecks:
    engine = None  # a helpers.Engine, set by the subclass

    @pytest.mark.parametrize("fill_mode", FILL_MODES)
    @pytest.mark.parametrize("interpolation", ["bilinear", "nearest"])
    @pytest.mark.parametrize("shape", IMAGE_SHAPES, ids=image_id)
    def test_affine_transform_matches_reference(self, shape, interpolation, fill_mode):
        eng, ops = self.engine, self.engine.ops
        rng = np.random.default_rng([sum(shape), len(interpolation), len(fill_mode)])
        x = normal(rng, shape)
        t = random_transforms(rng, shape[0], shape[1], shape[2], interpolation == "nearest")
        xd, td = eng.dev(x), eng.dev(t)
        y = ops.affine_transform(xd, td, interpolation, fill_mode, -2.5)
        want = ref.affine_transform(x, t, interpolation, fill_mode, -2.5)
        if interpolation == "nearest":
            eng.exact(y, want)  # copies of input pixels or the fill value
        else:
            eng.close(y, want, 1e-4, 1e-5)
        out = eng.dev(np.zeros(shape, F32))
        assert ops.affine_transform(xd, td, interpolation, fill_mode, -2.5, out=out) is out
        np.testing.assert_array_equal(eng.host(out), eng.host(y))
        np.testing.assert_array_equal(eng.host(xd), x)

    def test_affine_transform_of_built_transforms_and_degenerate_points(self):
        """The shared transform builders' output; then k = 0, NaN, far-away and projective points."""
        eng, ops = self.engine, self.engine.ops
        x = normal(np.random.default_rng(31), (4, 6, 5, 2))
        h, w = 6, 5
        built = [ops.rotation_transforms([0.3, -2.0, math.pi, 0.0], h, w),
                 ops.zoom_transforms([0.5, 1.3, 1.0, 2.0], [0.7, 1.3, 1.0, 0.4], h, w),
                 ops.translation_transforms([1.5, -2.0, 0.0, 40.0], [0.25, 3.0, -1.0, 0.0])]
        for t in built:
            assert t.dtype == F32 and t.shape == (4, 8)
            eng.close(ops.affine_transform(eng.dev(x), eng.dev(t), "bilinear", "reflect"),
                      ref.affine_transform(x, t, "bilinear", "reflect"), 1e-4, 1e-5)
        t = f32([[1, 0, 0, 0, 1, 0, -0.25, 0],     # k = 0 at column 4
                 [np.nan, 0, 0, 0, 1, 0, 0, 0],    # not finite
                 [1, 0, -1e30, 0, 1, 1e30, 0, 0],  # clamped to -2^24 and 2^24
                 [1, 0, 0, 0, 1, 0, 0.5, 0.25]])   # projective (coordinates: small fractions, exact)
        for fill_mode in ("wrap", "reflect", "constant"):
            for interpolation in ("bilinear", "nearest"):
                y = ops.affine_transform(eng.dev(x), eng.dev(t), interpolation, fill_mode, 9.0)
                eng.close(y, ref.affine_transform(x, t, interpolation, fill_mode, 9.0), 1e-4, 1e-5)
        identity = eng.dev(ops.translation_transforms([0.0] * 4, [0.0] * 4))
        for interpolation in ("bilinear", "nearest"):
            eng.exact(ops.affine_transform(eng.dev(x), identity, interpolation), x)

    @pytest.mark.parametrize("shape", IMAGE_SHAPES, ids=image_id)
    def test_flip_matches_reference(self, shape):
        eng, ops = self.engine, self.engine.ops
        x = normal(np.random.default_rng(sum(shape)), shape)
        n = shape[0]
        patterns = [(None, None), (np.ones(n, bool), None), (None, np.ones(n, bool)),
                    (np.arange(n) % 2 == 0, np.arange(n) % 3 == 0), (np.arange(n) % 2, np.full(n, 3))]  # numbers
        for horizontal, vertical in patterns:
            y = ops.flip(eng.dev(x), None if horizontal is None else eng.dev(horizontal),
                         None if vertical is None else eng.dev(vertical))
            eng.exact(y, ref.flip(x, horizontal, vertical))

    @pytest.mark.parametrize("dtype,width", [(np.uint8, 1), (np.float32, 1), (np.float32, 8)])
    def test_step_row_matches_reference(self, dtype, width):
        """The random layers' values of a step: row step[0] of a (rows, images, K) table, its first n images
        (a smaller last batch), into a new array or out=; any row, including the last."""
        eng, ops = self.engine, self.engine.ops
        rng = np.random.default_rng(width)
        rows, images = 4, 5
        table = rng.integers(0, 250, size=(rows, images, width)).astype(dtype)
        if dtype == np.float32:
            table += rng.random(table.shape, dtype=np.float32)
        for step in range(rows):
            counter = eng.dev(np.array([step], np.int32))
            for n in (images, 2, 1):
                want = ref.step_row(table, step, n)
                got = eng.host(ops.step_row(eng.dev(table), counter, n))
                assert got.dtype == dtype and got.shape == (n, width)
                np.testing.assert_array_equal(got, want)
                out = eng.dev(np.full((n, width), 7, dtype))
                assert ops.step_row(eng.dev(table), counter, n, out=out) is out
                np.testing.assert_array_equal(eng.host(out), want)

    def test_step_row_refuses_what_does_not_fit(self):
        eng, ops = self.engine, self.engine.ops
        table, counter = eng.dev(np.zeros((3, 4, 2), np.float32)), eng.dev(np.zeros(1, np.int32))
        with pytest.raises(ValueError, match="n = 5 <= images"):
            ops.step_row(table, counter, 5)
        for out in (np.zeros((2, 3), np.float32), np.zeros((2, 2), np.uint8), np.zeros((3, 2), np.float32)):
            with pytest.raises(ValueError, match=r"out must be \(2, 2\) of float32"):
                ops.step_row(table, counter, 2, out=eng.dev(out))

    @pytest.mark.parametrize("shape", IMAGE_SHAPES, ids=image_id)
    def test_rescale_and_contrast_match_reference(self, shape):
        eng, ops = self.engine, self.engine.ops
        rng = np.random.default_rng(sum(shape) + 1)
        pixels = rng.integers(0, 256, size=shape)
        for x in (f32(pixels), pixels.astype(np.uint8)):  # uint8 input is cast, as Keras casts
            eng.close(ops.rescale(eng.dev(x), 1 / 255, -0.5), ref.rescale(pixels, 1 / 255, -0.5), 1e-6, 1e-7)
        x = f32(pixels) + normal(rng, shape)
        factors = f32(rng.uniform(0.2, 1.8, (shape[0], 1, 1, 1)))  # Keras's shape; (N,) works as well
        for value_range in ((0, 255), None, (50.0, 200.0)):
            eng.close(ops.adjust_contrast(eng.dev(x), eng.dev(factors), value_range),
                      ref.adjust_contrast(x, factors.ravel(), value_range), 1e-5, 1e-6)
        xd = eng.dev(x)
        assert ops.adjust_contrast(xd, eng.dev(factors.ravel()), out=xd) is xd  # in place
        eng.close(xd, ref.adjust_contrast(x, factors.ravel()), 1e-5, 1e-6)

    def test_image_errors(self):
        eng, ops = self.engine, self.engine.ops
        x = eng.dev(np.zeros((2, 4, 4, 3), F32))
        t = eng.dev(np.zeros((2, 8), F32))
        with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
            ops.affine_transform(eng.dev(np.zeros((4, 4, 3), F32)), t)
        with pytest.raises(ValueError, match=r"transforms must be \(2, 8\)"):
            ops.affine_transform(x, eng.dev(np.zeros((2, 6), F32)))
        with pytest.raises(ValueError, match="fill_mode must be one of"):
            ops.affine_transform(x, t, fill_mode="edge")
        with pytest.raises(ValueError, match="interpolation must be one of"):
            ops.affine_transform(x, t, interpolation="bicubic")
        with pytest.raises(ValueError, match="out must not be x"):
            ops.affine_transform(x, t, out=x)
        with pytest.raises(ValueError, match="out must not be x"):
            ops.flip(x, eng.dev(np.ones(2, bool)), None, out=x)
        with pytest.raises(ValueError, match=r"one value per image \(2"):
            ops.flip(x, eng.dev(np.ones(3, bool)), None)
        with pytest.raises(ValueError, match=r"one value per image \(2"):
            ops.adjust_contrast(x, eng.dev(np.ones(1, F32)))

    def test_empty_batches(self):
        eng, ops = self.engine, self.engine.ops
        x = eng.dev(np.zeros((0, 4, 5, 3), F32))
        assert eng.host(ops.affine_transform(x, eng.dev(np.zeros((0, 8), F32)))).shape == (0, 4, 5, 3)
        assert eng.host(ops.flip(x, eng.dev(np.zeros(0, bool)), None)).shape == (0, 4, 5, 3)
        assert eng.host(ops.adjust_contrast(x, eng.dev(np.zeros(0, F32)))).shape == (0, 4, 5, 3)
        assert eng.host(ops.rescale(x, 2.0, 1.0)).shape == (0, 4, 5, 3)
