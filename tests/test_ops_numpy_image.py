"""The NumPy engine's image transforms against the float64 oracle: tests/checks_image.py's tests (shared with
the CUDA engine) plus the host-side transform builders both engines use."""
import math

import numpy as np

import helpers
import reference as ref
from checks_image import ImageChecks
from gpucnn.engines import numpy_ops as ops


class TestNumpyEngine(ImageChecks):
    engine = helpers.numpy_engine()


def test_transform_builders_match_reference():
    angles, zy, zx = [0.3, -2.0, math.pi], [0.5, 1.3, 1.0], [0.7, 1.3, 2.0]
    np.testing.assert_allclose(ops.rotation_transforms(angles, 7, 10), ref.rotation_transforms(angles, 7, 10),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ops.zoom_transforms(zy, zx, 7, 10), ref.zoom_transforms(zy, zx, 7, 10), rtol=1e-6)
    np.testing.assert_allclose(ops.translation_transforms(zx, zy), ref.translation_transforms(zx, zy), rtol=1e-6)
