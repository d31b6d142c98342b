"""The CUDA engine's image transforms (kernels/image.cu: rescale, flip_images, affine_transform,
adjust_contrast) against the float64 oracle: tests/checks_image.py's tests (shared with the NumPy engine),
plus what the CUDA engine promises besides: per-image values on the device, and an augmentation block that a
CUDA graph can capture. The preprocessing layers on this engine: tests/checks_preprocessing.py's tests.

Marked ``gpu`` and skipped as a whole where CuPy or a CUDA device is not usable; tests/test_kernels_emulated.py
runs this file on the kernel emulator.
"""
import numpy as np
import pytest

import helpers
import reference as ref
from checks_image import ImageChecks
from checks_preprocessing import PreprocessingChecks

pytestmark = pytest.mark.gpu
helpers.skip_module_without_gpu()

import cupy  # noqa: E402

from gpucnn.engines import cuda_ops as ops  # noqa: E402


class TestCudaEngine(ImageChecks):
    engine = helpers.cuda_engine()


class TestCudaLayers(PreprocessingChecks):
    """Rescaling and the random augmentation layers on the plain CUDA engine (their draws copied into device
    buffers kept per call site)."""
    engine = "gpu"


ENGINE = TestCudaEngine.engine


def test_per_image_values_must_be_on_the_device():
    x = cupy.zeros((2, 4, 4, 3), np.float32)
    with pytest.raises(TypeError, match="numpy"):
        ops.affine_transform(x, np.zeros((2, 8), np.float32))
    with pytest.raises(TypeError, match="numpy"):
        ops.adjust_contrast(x, np.ones(2, np.float32))


def test_an_augmentation_step_can_be_captured_in_a_cuda_graph():
    """rescale, flip, affine_transform and adjust_contrast into out= buffers, per-image values refilled on
    the device between replays: what an augmentation block inside a captured training step does."""
    rng = np.random.default_rng(40)
    n, h, w, c = 3, 6, 7, 2
    images = cupy.asarray(np.float32(rng.integers(0, 256, size=(n, h, w, c))))
    bufs = {k: cupy.zeros((n, h, w, c), np.float32) for k in ("scaled", "flipped", "moved", "out")}
    flags, transforms, factors = cupy.zeros(n, bool), cupy.zeros((n, 8), np.float32), cupy.zeros(n, np.float32)

    def step():
        ops.rescale(images, 1 / 255, 0.0, out=bufs["scaled"])
        ops.flip(bufs["scaled"], flags, flags, out=bufs["flipped"])
        ops.affine_transform(bufs["flipped"], transforms, "bilinear", "reflect", out=bufs["moved"])
        ops.adjust_contrast(bufs["moved"], factors, (0, 1), out=bufs["out"])

    def draw(seed):
        r = np.random.default_rng(seed)
        flags[...] = cupy.asarray(r.random(n) < 0.5)
        transforms[...] = cupy.asarray(ops.rotation_transforms(r.uniform(-1, 1, n), h, w))
        factors[...] = cupy.asarray(np.float32(r.uniform(0.5, 1.5, n)))

    def expected(seed):
        r = np.random.default_rng(seed)
        f, angles, k = r.random(n) < 0.5, r.uniform(-1, 1, n), np.float32(r.uniform(0.5, 1.5, n))
        x = ref.flip(ref.rescale(ENGINE.host(images), 1 / 255, 0.0), f, f)
        x = ref.affine_transform(x, ops.rotation_transforms(angles, h, w), "bilinear", "reflect")
        return ref.adjust_contrast(x, k, (0, 1))

    stream = cupy.cuda.Stream(non_blocking=True)
    cupy.cuda.Device().synchronize()
    with stream:
        draw(1)
        step()  # warm up: compiles the kernels
        stream.synchronize()
        stream.begin_capture()
        step()
        graph = stream.end_capture()
        for seed in (2, 3):
            draw(seed)
            graph.launch(stream)
            stream.synchronize()
            ENGINE.close(bufs["out"], expected(seed), 1e-4, 1e-5)
