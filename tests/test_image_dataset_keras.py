"""image_dataset_from_directory against Keras 3 itself, where Keras is importable (skipped otherwise).

Keras's own function returns a tf.data or grain dataset, so the comparison goes through the pieces it
is built from: its file listing and shuffle (``dataset_utils.index_directory``), its split
(``get_training_or_validation_split``) and its per-image loader (PIL, then ``keras.ops.image.resize``).
Run it with e.g. ``KERAS_BACKEND=torch python -m pytest tests/test_image_dataset_keras.py``.
"""

import os
import warnings

import numpy as np
import pytest

pytest.importorskip("PIL")
keras = pytest.importorskip("keras")
dataset_utils = pytest.importorskip("keras.src.utils.dataset_utils")
image_dataset_utils = pytest.importorskip("keras.src.utils.image_dataset_utils")
if not hasattr(image_dataset_utils, "_load_image_grain"):
    pytest.skip("this Keras has no PIL image loader to compare with", allow_module_level=True)

from PIL import Image, ImageDraw  # noqa: E402

from gpucnn.data import image_dataset_from_directory  # noqa: E402
from gpucnn.data.images import ALLOWLIST_FORMATS  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("keras_shapes")
    rng = np.random.default_rng(11)
    for k, (cls, ext) in enumerate([("cats", ".png"), ("cats", ".jpg"), ("cats", ".bmp"), ("dogs", ".gif"),
                                    ("dogs", ".png"), ("dogs", ".JPEG"), ("dogs", ".png"), ("cats", ".png")]):
        size = (int(rng.integers(12, 60)), int(rng.integers(12, 60)))
        img = Image.new("RGB", size, tuple(int(v) for v in rng.integers(0, 256, 3)))
        ImageDraw.Draw(img).ellipse((2, 3, size[0] - 4, size[1] - 2), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        (root / cls).mkdir(exist_ok=True)
        img.save(root / cls / f"{k}{ext}")
    (root / "cats" / "readme.txt").write_text("no image")
    return root


def _keras_image(path, size, channels, interpolation="bilinear", crop=False):
    tensor = image_dataset_utils._load_image_grain(path, size, channels, interpolation, "channels_last",
                                                   crop_to_aspect_ratio=crop)
    return keras.ops.convert_to_numpy(tensor)


@pytest.mark.parametrize("seed", [1, 42])
def test_same_files_order_labels_and_split(folder, seed):
    paths, labels, names = dataset_utils.index_directory(str(folder), "inferred", formats=ALLOWLIST_FORMATS,
                                                         shuffle=True, seed=seed, verbose=False)
    ours = image_dataset_from_directory(folder, seed=seed, image_size=(8, 8), verbose=False)
    assert ours.class_names == names
    assert ours.file_paths == paths
    for subset in ("training", "validation"):
        want, _ = dataset_utils.get_training_or_validation_split(paths, labels, 0.25, subset)
        got = image_dataset_from_directory(folder, seed=seed, image_size=(8, 8), validation_split=0.25,
                                           subset=subset, verbose=False)
        assert got.file_paths == want


@pytest.mark.parametrize("size, color_mode, channels, interpolation, crop", [
    ((20, 24), "rgb", 3, "bilinear", False),
    ((47, 13), "rgb", 3, "bilinear", False),
    ((16, 16), "grayscale", 1, "bilinear", False),
    ((18, 30), "rgb", 3, "bilinear", True),
    ((10, 10), "rgb", 3, "nearest", False),
])
def test_same_pixels(folder, size, color_mode, channels, interpolation, crop):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = image_dataset_from_directory(folder, image_size=size, color_mode=color_mode, shuffle=False,
                                          interpolation=interpolation, crop_to_aspect_ratio=crop, verbose=False)
    x = np.concatenate([batch for batch, _ in ds])
    for k, path in enumerate(ds.file_paths):
        want = _keras_image(path, size, channels, interpolation, crop)
        np.testing.assert_allclose(x[k], want, atol=2e-3, rtol=1e-5, err_msg=os.path.basename(path))


@pytest.mark.parametrize("kwargs", [{}, {"target_size": (20, 30)}, {"target_size": (20, 30), "keep_aspect_ratio": True},
                                    {"target_size": (17, 11), "interpolation": "bilinear", "color_mode": "grayscale"},
                                    {"color_mode": "rgba"}], ids=str)
def test_load_img_and_img_to_array_are_kerass(tmp_path, kwargs):
    """keras.io's from-scratch example reads one image with load_img and img_to_array: Keras's arrays."""
    import gpucnn

    r = np.random.default_rng(3)
    path = tmp_path / "one.jpg"
    Image.fromarray(r.integers(0, 256, (41, 57, 3), dtype=np.uint8)).save(path)
    want = keras.utils.img_to_array(keras.utils.load_img(path, **kwargs))
    got = gpucnn.utils.img_to_array(gpucnn.utils.load_img(path, **kwargs))
    assert got.dtype == want.dtype == np.float32
    np.testing.assert_array_equal(got, want)
