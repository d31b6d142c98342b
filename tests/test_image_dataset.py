"""image_dataset_from_directory on a folder of small images drawn with Pillow (PNG, JPEG, BMP, GIF)."""

import math
import os
import sys
import threading
import warnings

import numpy as np
import pytest

PIL = pytest.importorskip("PIL")
from PIL import Image, ImageDraw  # noqa: E402

from gpucnn.data import ImageDataset, image_dataset_from_directory  # noqa: E402
from gpucnn.data import images as images_module  # noqa: E402

# (class, file name, (width, height)); the extension picks the format
_FILES = [
    ("circles", "c0.png", (40, 30)), ("circles", "c1.jpg", (33, 33)), ("circles", "c2.bmp", (20, 28)),
    ("circles", "c3.gif", (25, 40)), ("circles", "C4.PNG", (31, 17)),
    ("squares", "s0.png", (24, 24)), ("squares", "s1.jpeg", (50, 21)), ("squares", "s2.bmp", (18, 36)),
    ("squares", os.path.join("nested", "s3.png"), (27, 27)),
    ("triangles", "t0.png", (30, 30)), ("triangles", "t1.gif", (44, 22)), ("triangles", "t2.jpg", (29, 35)),
]
_CLASSES = ["circles", "squares", "triangles"]


def _draw(kind, size, seed):
    rng = np.random.default_rng(seed)
    background = tuple(int(v) for v in rng.integers(0, 256, 3))
    colour = tuple(int(v) for v in rng.integers(0, 256, 3))
    img = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(img)
    w, h = size
    box = (w // 5, h // 5, w - w // 5, h - h // 5)
    if kind == "circles":
        draw.ellipse(box, fill=colour)
    elif kind == "squares":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(w // 2, h // 6), (w // 6, h - h // 6), (w - w // 6, h - h // 6)], fill=colour)
    return img


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Three class folders of images, a text file, a corrupt .jpg, a hidden folder and an RGBA PNG."""
    root = tmp_path_factory.mktemp("shapes")
    for seed, (cls, name, size) in enumerate(_FILES):
        path = root / cls / name
        path.parent.mkdir(parents=True, exist_ok=True)
        _draw(cls, size, seed).save(path)
    (root / "circles" / "notes.txt").write_text("not an image")
    (root / "squares" / "broken.jpg").write_bytes(b"this is not a JPEG at all" * 10)
    (root / ".hidden").mkdir()
    _draw("circles", (10, 10), 99).save(root / ".hidden" / "x.png")
    return root


@pytest.fixture(scope="module")
def rgba_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("rgba")
    rng = np.random.default_rng(5)
    for cls in ("a", "b"):
        (root / cls).mkdir()
        for i in range(2):
            pixels = rng.integers(0, 256, (12, 10, 4)).astype(np.uint8)
            Image.fromarray(pixels, "RGBA").save(root / cls / f"{i}.png")
    return root


def _all(dataset):
    xs, ys = zip(*dataset)
    return np.concatenate(xs), np.concatenate(ys)


def _quiet(*args, **kwargs):
    """The dataset, with the expected warning about broken.jpg swallowed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return image_dataset_from_directory(*args, **kwargs)


def _naive_bilinear(image, out_h, out_w):
    """Half-pixel-centred bilinear resize, one output pixel at a time in float64 (the oracle)."""
    h, w, c = image.shape
    out = np.zeros((out_h, out_w, c))
    for i in range(out_h):
        sy = min(max((i + 0.5) * h / out_h - 0.5, 0.0), h - 1)
        y0 = int(math.floor(sy))
        y1, fy = min(y0 + 1, h - 1), sy - y0
        for j in range(out_w):
            sx = min(max((j + 0.5) * w / out_w - 0.5, 0.0), w - 1)
            x0 = int(math.floor(sx))
            x1, fx = min(x0 + 1, w - 1), sx - x0
            top = image[y0, x0] * (1 - fx) + image[y0, x1] * fx
            bottom = image[y1, x0] * (1 - fx) + image[y1, x1] * fx
            out[i, j] = top * (1 - fy) + bottom * fy
    return out


# ------------------------------------------------------------------------------------------ listing
def test_classes_files_and_the_found_line(folder, capsys):
    with pytest.warns(UserWarning, match=r"Skipping 1 file\(s\) that could not be read as images: .*broken\.jpg"):
        ds = image_dataset_from_directory(folder, image_size=(16, 16), shuffle=False, batch_size=5)
    assert capsys.readouterr().out == "Found 13 files belonging to 3 classes.\n"  # broken.jpg is counted
    assert ds.class_names == _CLASSES
    want = sorted((str(folder / cls / name) for cls, name, _ in _FILES),
                  key=lambda p: (_CLASSES.index(os.path.relpath(p, folder).split(os.sep)[0]),
                                 os.path.dirname(p), os.path.basename(p)))
    assert ds.file_paths == want
    assert len(ds) == math.ceil(12 / 5)


def test_labels_follow_the_folders_and_batches_have_keras_shapes(folder):
    ds = _quiet(folder, image_size=(16, 20), shuffle=False, batch_size=5)
    shapes = [(x.shape, y.shape, x.dtype, y.dtype) for x, y in ds]
    assert shapes == [((5, 16, 20, 3), (5,), np.float32, np.int32)] * 2 + [((2, 16, 20, 3), (2,), np.float32,
                                                                             np.int32)]
    x, y = _all(ds)
    folders = [os.path.relpath(p, folder).split(os.sep)[0] for p in ds.file_paths]
    np.testing.assert_array_equal(y, [_CLASSES.index(f) for f in folders])
    assert 0 <= x.min() and x.max() <= 255 and x.max() > 100


def test_pixels_are_the_bilinear_resize_of_the_decoded_file(folder):
    ds = _quiet(folder, image_size=(13, 21), shuffle=False, batch_size=32)
    x, _ = _all(ds)
    for k, path in enumerate(ds.file_paths):
        pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
        np.testing.assert_allclose(x[k], _naive_bilinear(pixels, 13, 21), atol=1e-3, err_msg=path)


def test_nearest_crop_and_pad(folder):
    path = str(folder / "circles" / "c0.png")  # 40 wide, 30 high
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    near = images_module.load_image(path, (10, 8), 3, "nearest")
    rows = [int((i + 0.5) * 30 / 10) for i in range(10)]
    cols = [int((j + 0.5) * 40 / 8) for j in range(8)]
    np.testing.assert_array_equal(near, pixels[rows][:, cols])
    crop = images_module.load_image(path, (15, 15), 3, crop_to_aspect_ratio=True)  # the centred 30x30
    np.testing.assert_allclose(crop, _naive_bilinear(pixels[:, 5:35].astype(np.float64), 15, 15), atol=1e-3)
    pad = images_module.load_image(path, (20, 20), 3, pad_to_aspect_ratio=True)  # 5 zero rows above, below
    padded = np.concatenate([np.zeros((5, 40, 3)), pixels, np.zeros((5, 40, 3))])
    np.testing.assert_allclose(pad, _naive_bilinear(padded, 20, 20), atol=1e-3)


@pytest.mark.parametrize("mode, width", [("int", None), ("categorical", 3), ("binary", 1), (None, None)])
def test_label_modes(folder, mode, width):
    names = ["circles", "squares"] if mode == "binary" else None
    ds = _quiet(folder, image_size=(8, 8), shuffle=False, label_mode=mode, class_names=names, batch_size=4)
    items = list(ds)
    if mode is None:
        assert ds.class_names is None
        assert all(isinstance(item, np.ndarray) and item.shape[1:] == (8, 8, 3) for item in items)
        assert sum(len(item) for item in items) == 13  # labels=None: every image below, .hidden/ too (Keras)
        return
    x, y = _all(ds)
    ints = np.array([ds.class_names.index(os.path.relpath(p, folder).split(os.sep)[0]) for p in ds.file_paths])
    if mode == "int":
        np.testing.assert_array_equal(y, ints)
    elif mode == "categorical":
        assert y.dtype == np.float32 and y.shape == (12, width)
        np.testing.assert_array_equal(y, np.eye(3)[ints])
    else:
        assert ds.class_names == ["circles", "squares"] and len(x) == 9
        assert y.dtype == np.float32 and y.shape == (9, 1)
        np.testing.assert_array_equal(y[:, 0], ints)


def test_binary_needs_two_classes(folder):
    with pytest.raises(ValueError, match="exactly 2 class_names"):
        _quiet(folder, label_mode="binary")


def test_grayscale_and_rgba(folder, rgba_folder):
    gray = _quiet(folder, image_size=(9, 7), color_mode="grayscale", shuffle=False)
    x, _ = _all(gray)
    assert x.shape == (12, 9, 7, 1)
    first = np.asarray(Image.open(gray.file_paths[0]).convert("L"), dtype=np.float64)[:, :, None]
    np.testing.assert_allclose(x[0], _naive_bilinear(first, 9, 7), atol=1e-3)
    rgba = image_dataset_from_directory(rgba_folder, image_size=(12, 10), color_mode="rgba", shuffle=False)
    x, y = _all(rgba)
    assert x.shape == (4, 12, 10, 4)
    np.testing.assert_array_equal(x[0], np.asarray(Image.open(rgba.file_paths[0]), dtype=np.float32))
    np.testing.assert_array_equal(y, [0, 0, 1, 1])


@pytest.mark.parametrize("color_mode", ["grayscale", "rgb"])
def test_a_16_bit_grayscale_png_keeps_its_levels(tmp_path, color_mode):
    """A 16-bit PNG comes out as TensorFlow's decoder gives it to Keras, 8 bits per value (value // 256): 256 levels
    over the ramp (Pillow's conversion saturated every value above 255, 99.6 % of them)."""
    ramp = (np.arange(64 * 64, dtype=np.uint32) * 16).reshape(64, 64).astype(np.uint16)  # 0 .. 65520
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        Image.fromarray(ramp).save(tmp_path / name / "ramp.png")
    assert Image.open(tmp_path / "a" / "ramp.png").mode.startswith("I")
    ds = image_dataset_from_directory(tmp_path, image_size=(64, 64), color_mode=color_mode, shuffle=False,
                                      interpolation="nearest")
    x, _ = _all(ds)
    want = (ramp >> 8).astype(np.float32)[:, :, None]
    np.testing.assert_array_equal(x[0], np.repeat(want, x.shape[-1], axis=-1))


def test_unbatched_gives_single_images(rgba_folder):
    ds = image_dataset_from_directory(rgba_folder, image_size=(6, 6), batch_size=None, shuffle=False)
    items = list(ds)
    assert len(ds) == len(items) == 4
    assert items[0][0].shape == (6, 6, 3) and items[3][1] == 1


# ------------------------------------------------------------------------------------------ order and split
def test_shuffle_is_seeded_repeatable_and_reshuffles_each_pass(folder):
    def orders(seed):
        ds = _quiet(folder, image_size=(4, 4), seed=seed, batch_size=3)
        return [np.concatenate([y for _, y in ds]).tolist() for _ in range(3)], ds.file_paths

    first, paths = orders(7)
    again, paths_again = orders(7)
    assert first == again and paths == paths_again
    assert first[0] != first[1] or first[1] != first[2]  # a new pass, a new order
    assert sorted(first[0]) == sorted(first[1])  # the same images
    other, other_paths = orders(8)
    assert other_paths != paths
    rng = np.random.RandomState(7)  # Keras shuffles the sorted list once, with RandomState(seed)
    listed = _quiet(folder, image_size=(4, 4), shuffle=False).file_paths + [str(folder / "squares" / "broken.jpg")]
    listed.sort(key=lambda p: (_CLASSES.index(os.path.relpath(p, folder).split(os.sep)[0]), os.path.dirname(p),
                               os.path.basename(p)))
    rng.shuffle(listed)
    assert paths == [p for p in listed if not p.endswith("broken.jpg")]


def test_validation_split_subsets_and_both(folder, capsys):
    kw = dict(image_size=(4, 4), validation_split=0.25, seed=3)
    train = _quiet(folder, subset="training", **kw)
    val = _quiet(folder, subset="validation", **kw)
    out = capsys.readouterr().out
    assert "Using 10 files for training." in out and "Using 3 files for validation." in out
    assert set(train.file_paths).isdisjoint(val.file_paths)
    assert len(train.file_paths) + len(val.file_paths) == 12  # 13 listed, broken.jpg left out of one
    both_train, both_val = _quiet(folder, subset="both", **kw)
    assert both_train.file_paths == train.file_paths and both_val.file_paths == val.file_paths
    assert both_val.shuffle is False and both_train.shuffle is True
    assert both_train.class_names == both_val.class_names == _CLASSES
    y_first = np.concatenate([y for _, y in both_val])
    y_second = np.concatenate([y for _, y in both_val])
    np.testing.assert_array_equal(y_first, y_second)  # the validation set is not reshuffled
    with pytest.raises(ValueError, match="you must provide a `seed`"):
        image_dataset_from_directory(folder, validation_split=0.2, subset="training")
    with pytest.raises(ValueError, match="`validation_split` must be set"):
        image_dataset_from_directory(folder, subset="training", seed=1)
    with pytest.raises(ValueError, match="leaves no validation files"):
        _quiet(folder, validation_split=0.01, subset="validation", seed=1)


# ------------------------------------------------------------------------------------------ bad files
def test_a_file_that_fails_mid_decoding_is_skipped_with_one_warning(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            _draw("squares", (20, 20), i).save(tmp_path / cls / f"{i}.jpg", quality=90)
    noise = np.random.default_rng(0).integers(0, 256, (96, 96, 3)).astype(np.uint8)
    Image.fromarray(noise).save(tmp_path / "b" / "1.jpg", quality=95)  # a few KB: its header is a small part
    good = (tmp_path / "b" / "1.jpg").read_bytes()
    (tmp_path / "b" / "1.jpg").write_bytes(good[: len(good) // 2])  # the header reads, the pixels do not
    ds = image_dataset_from_directory(tmp_path, image_size=(8, 8), batch_size=2, shuffle=False)
    assert len(ds.file_paths) == 6  # the header check lets it through
    with pytest.warns(UserWarning) as caught:
        batches = [y for _, y in ds]
    assert [str(w.message) for w in caught] == [f"Skipping 1 file(s) that could not be read as images: "
                                                f"{tmp_path / 'b' / '1.jpg'}"]
    assert [len(y) for y in batches] == [2, 2, 1]  # only the last batch is short
    assert str(tmp_path / "b" / "1.jpg") not in ds.file_paths and len(ds) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sum(len(y) for _, y in ds) == 5  # the next pass: no warning, the file is left out


# ------------------------------------------------------------------------------------------ errors
def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        image_dataset_from_directory(tmp_path / "missing")
    with pytest.raises(ValueError, match="No class subfolders"):
        image_dataset_from_directory(tmp_path)
    (tmp_path / "cats").mkdir()
    _draw("circles", (8, 8), 0).save(tmp_path / "cats" / "0.png")
    with pytest.raises(ValueError, match="Only one class"):
        image_dataset_from_directory(tmp_path)
    (tmp_path / "dogs").mkdir()
    (tmp_path / "cats" / "0.png").unlink()
    with pytest.raises(ValueError, match="No images found"):
        image_dataset_from_directory(tmp_path)


@pytest.mark.parametrize("kwargs, message", [
    (dict(label_mode="sparse"), "`label_mode` argument must be one of"),
    (dict(color_mode="cmyk"), "`color_mode` must be one of"),
    (dict(image_size=(10,)), "Invalid `image_size`"),
    (dict(interpolation="cubic"), "should be one of"),
    (dict(interpolation="bicubic"), "not supported by gpucnn"),
    (dict(batch_size=0), "positive integer"),
    (dict(crop_to_aspect_ratio=True, pad_to_aspect_ratio=True), "Only one of"),
    (dict(class_names=["circles", "dogs"]), "did not match"),
    (dict(labels=[0, 1]), "Expected the lengths of `labels`"),
    (dict(data_format="channels_first"), "channels_last"),
])
def test_argument_errors(folder, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _quiet(folder, **kwargs)


def test_without_pillow_the_error_names_the_extra(folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)  # `from PIL import Image` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install -e '\.\[images\]'"):
        image_dataset_from_directory(folder)


# ------------------------------------------------------------------------------------------ the background thread
def _reader_threads():
    return [t for t in threading.enumerate() if t.name.startswith("gpucnn-")]


def test_stopping_early_leaves_no_thread(folder):
    ds = _quiet(folder, image_size=(8, 8), batch_size=2, seed=1)
    ds.workers = 2
    for _ in ds:
        assert _reader_threads()  # decoding runs on background threads
        break
    assert _reader_threads() == []
    assert len(list(ds.take(2))) == 2 and len(ds.take(2)) == 2
    assert _reader_threads() == []


def test_an_error_while_decoding_reaches_the_consumer(folder, monkeypatch):
    ds = _quiet(folder, image_size=(8, 8), batch_size=2, shuffle=False)

    def broken(path, *args):
        if path.endswith("c2.bmp"):
            raise RuntimeError("disk on fire")
        return np.zeros((8, 8, 3), np.float32)

    monkeypatch.setattr(images_module, "load_image", broken)
    got = []
    with pytest.raises(RuntimeError, match="disk on fire"):
        for x, _ in ds:
            got.append(len(x))
    assert got == [2]  # c0, c1, then c2 fails
    assert _reader_threads() == []


def test_dataset_is_an_image_dataset(folder):
    ds = _quiet(folder, image_size=(8, 8))
    assert isinstance(ds, ImageDataset) and "12 files" in repr(ds)


def test_explicit_labels_and_follow_links(rgba_folder, tmp_path):
    ds = image_dataset_from_directory(rgba_folder, labels=[1, 0, 1, 0], image_size=(4, 4), shuffle=False,
                                      verbose=False)
    assert ds.class_names == ["0", "1"]
    np.testing.assert_array_equal(np.concatenate([y for _, y in ds]), [1, 0, 1, 0])  # sorted path order
    for cls in ("a", "b"):
        (tmp_path / "root" / cls).mkdir(parents=True)
        _draw("squares", (6, 6), 0).save(tmp_path / "root" / cls / "own.png")
    (tmp_path / "root" / "a" / "linked").symlink_to(rgba_folder / "a", target_is_directory=True)
    assert len(image_dataset_from_directory(tmp_path / "root", verbose=False).file_paths) == 2
    followed = image_dataset_from_directory(tmp_path / "root", follow_links=True, verbose=False)
    assert len(followed.file_paths) == 4


def test_batches_and_eager_calls_have_numpy_as_keras_tensors_do(folder):
    """The book plots ``images[0].numpy()`` and ``augmented_images[0].numpy()``: a dataset's batches and what a layer
    or model called on data returns have Keras's ``numpy()``, giving a plain NumPy array of the same values."""
    from gpucnn import layers, models
    images, labels = next(iter(_quiet(folder, image_size=(8, 8), batch_size=4, seed=1)))
    for plain, values in ((images[0].numpy(), images[0]), (labels.numpy(), labels)):  # (a label alone is a number)
        assert type(plain) is np.ndarray and np.array_equal(plain, np.asarray(values))
    flipped = layers.RandomFlip(seed=3)(images, training=True)
    assert flipped[0].numpy().shape == (8, 8, 3)
    m = models.Sequential([layers.Input((8, 8, 3)), layers.Flatten(), layers.Dense(2)])
    out = m(images)
    assert type(out.numpy()) is np.ndarray and np.array_equal(out.numpy(), m.predict(images, verbose=0))


def test_take_map_cache_and_prefetch_as_tf_data_has_them(folder):
    """map calls its function with each batch's parts; cache replays its first complete pass (no new decoding, no
    reshuffling); prefetch is the dataset (gpucnn reads ahead anyway); the chain trains; tf.data's other methods
    say gpucnn does not have them."""
    from gpucnn import layers, models
    ds = _quiet(folder, image_size=(8, 8), batch_size=3, seed=4)
    mapped = ds.map(lambda x, y: (x * 2.0, y), num_parallel_calls=4)
    assert len(mapped) == len(ds)
    for (x1, y1), (x2, y2) in zip(_quiet(folder, image_size=(8, 8), batch_size=3, seed=4), mapped):
        np.testing.assert_array_equal(x2, x1 * 2.0)
        np.testing.assert_array_equal(y2, y1)
    cached = _quiet(folder, image_size=(8, 8), batch_size=3, seed=4).cache()
    first = [y.tolist() for _, y in cached]
    assert [y.tolist() for _, y in cached] == first  # replayed, not reshuffled
    assert [y.tolist() for _, y in _quiet(folder, image_size=(8, 8), batch_size=3, seed=4)] == first
    assert ds.prefetch(2) is ds and ds.prefetch(buffer_size=-1) is ds
    assert len(ds.take(1)) == 1 and len(ds.map(lambda x, y: (x, y)).take(2)) == 2
    m = models.Sequential([layers.Input((8, 8, 3)), layers.Rescaling(1 / 255), layers.Flatten(),
                           layers.Dense(3, activation="softmax")])
    m.compile("rmsprop", "sparse_categorical_crossentropy", ["accuracy"])
    history = m.fit(ds.map(lambda x, y: (x, y)).cache().prefetch(1), epochs=2, verbose=0)
    assert len(history.history["loss"]) == 2
    with pytest.raises(AttributeError, match="has no 'unbatch': gpucnn's datasets have tf.data's take, map, cache "
                                             "and prefetch"):
        ds.unbatch()
    with pytest.raises(NotImplementedError, match="in memory only"):
        ds.cache("/tmp/file")
    with pytest.raises(TypeError, match="must be callable"):
        ds.map(3)


def test_an_eager_array_prints_as_the_numpy_array_it_is():
    from gpucnn.utils import eager
    a = eager(np.arange(3, dtype=np.float32))
    assert repr(a) == repr(np.arange(3, dtype=np.float32)) and str(a) == "[0. 1. 2.]"
    assert type((a * 2)[1:].numpy()) is np.ndarray


def test_a_device_array_comes_back_to_the_host_as_an_eager_array():
    """On the GPU a layer or model called on data computes CuPy arrays, which refuse ``numpy()``, ``np.asarray``
    and Matplotlib: ``eager`` copies them to the host. A stand-in device array (the emulator's are NumPy
    subclasses, which would pass without the copy)."""
    from gpucnn.utils import EagerArray, eager

    class Device:
        __module__ = "cupy._core.core"

        def __init__(self, values):
            self.values = values

        def get(self):
            return self.values.copy()

        def __array__(self, *args, **kwargs):
            raise TypeError("Implicit conversion to a NumPy array is not allowed")

    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    out, pair = eager(Device(values)), eager([Device(values), (Device(values[0]),)])
    assert type(out) is EagerArray and np.array_equal(np.asarray(out), values)
    assert type(pair[0]) is EagerArray and type(pair[1][0]) is EagerArray
    assert out.numpy().tolist() == values.tolist()


def test_reductions_of_an_eager_array_are_numpys_scalars_and_namedtuples_keep_their_fields():
    import collections

    from gpucnn.utils import eager
    a = eager(np.arange(6, dtype=np.float32).reshape(2, 3))
    for value in (a.max(), a.sum(), np.mean(a)):
        assert np.isscalar(value) and hash(value) is not None and round(float(value), 2) == float(value)
    assert type(a.sum(axis=0)).__name__ == "EagerArray"
    pair = collections.namedtuple("Pair", "x y")
    both = eager(pair(np.zeros(2), np.ones(2)))
    assert type(both) is pair and both.y.numpy().tolist() == [1.0, 1.0]


def test_a_cached_dataset_is_not_changed_by_its_consumers(folder):
    """tf.data's tensors are immutable, so `images /= 255` in a map function rebinds a name; on NumPy batches it
    writes in place: each pass of a cache gives copies, so no epoch sees another's changes."""
    def scale(images, labels):
        images /= 255.0
        return images, labels

    ds = _quiet(folder, image_size=(8, 8), batch_size=3, seed=4).cache().map(scale)
    maxima = [max(float(x.max()) for x, _ in ds) for _ in range(3)]
    assert maxima[0] <= 1.0 and maxima[0] > 0.2 and maxima == [maxima[0]] * 3
    assert len(_quiet(folder, image_size=(8, 8), batch_size=3).take(-1)) == len(
        _quiet(folder, image_size=(8, 8), batch_size=3))  # -1: all, as tf.data


def test_the_from_scratch_examples_last_cell_one_image_to_a_score(tmp_path):
    """keras.io's image classification from scratch ends: load_img, img_to_array, keras.ops.expand_dims, predict,
    keras.ops.sigmoid of the logit. Pillow's own decode and resize, a batch of one, 1 / (1 + e^-z)."""
    import gpucnn as keras
    from gpucnn import layers

    r = np.random.default_rng(5)
    path = tmp_path / "cat.png"
    Image.fromarray(r.integers(0, 256, (30, 25, 3), dtype=np.uint8)).save(path)
    img = keras.utils.load_img(path, target_size=(12, 10))
    assert img.size == (10, 12) and img.mode == "RGB"
    arr = keras.utils.img_to_array(img)
    np.testing.assert_array_equal(arr, np.asarray(Image.open(path).resize((10, 12), Image.Resampling.NEAREST),
                                                  np.float32))
    batch = keras.ops.expand_dims(arr, 0)
    assert batch.shape == (1, 12, 10, 3) and batch.numpy().shape == (1, 12, 10, 3)
    model = keras.Sequential([keras.Input((12, 10, 3)), layers.Rescaling(1 / 255), layers.Flatten(), layers.Dense(1)])
    logit = model.predict(batch, verbose=0)[0][0]
    score = float(keras.ops.sigmoid(logit))
    assert score == pytest.approx(1 / (1 + np.exp(-np.float64(logit))), rel=1e-6)
    gray = keras.utils.img_to_array(keras.utils.load_img(path, color_mode="grayscale"))
    assert gray.shape == (30, 25, 1)
    np.testing.assert_allclose(keras.ops.softmax(np.array([[1.0, 2.0], [3.0, 5.0]]), axis=0),
                               np.exp([[1, 2], [3, 5]]) / np.exp([[1, 2], [3, 5]]).sum(0), rtol=1e-6)
    assert int(keras.ops.argmax(np.array([0.1, 0.7, 0.2]))) == 1
    assert keras.ops.convert_to_numpy(keras.ops.squeeze(batch, 0)).shape == (12, 10, 3)
    with pytest.raises(ValueError, match="color_mode must be"):
        keras.utils.load_img(path, color_mode="cmyk")
    with pytest.raises(ValueError, match="interpolation 'cubic' is not one of"):
        keras.utils.load_img(path, target_size=(5, 5), interpolation="cubic")
