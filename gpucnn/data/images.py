"""``image_dataset_from_directory``: batches of images read from class folders, as Keras 3 gives them.

    main_directory/
        cats/  cat.0.jpg  cat.1.jpg ...
        dogs/  dog.0.jpg  ...

``image_dataset_from_directory(main_directory, image_size=(180, 180), batch_size=32)`` lists the files
as Keras does (classes are the sorted subfolder names; ``.bmp .gif .jpeg .jpg .png`` files, case
insensitive, in every folder below a class folder, in sorted order; shuffled once with
``numpy.random.RandomState(seed)``; a ``validation_split`` takes the last files of that order), prints
``Found N files belonging to K classes.``, and returns an :class:`ImageDataset`: one pass over it is one
epoch of ``(images, labels)`` NumPy batches, images float32 ``(batch, height, width, channels)`` in
0-255 resized with half-pixel-centred bilinear interpolation (as ``tf.image.resize`` and
``keras.ops.image.resize``), labels int32 ``(batch,)`` / float32 ``(batch, 1)`` ("binary") / float32
one-hot ``(batch, classes)`` ("categorical").

Pillow decodes the images (``pip install 'gpucnn[images]'``, or ``pip install -e '.[images]'`` in a
checkout). Decoding runs ahead of the consumer on background threads (``gpucnn.data._prefetch``).
A file that Pillow cannot read is skipped with one warning naming it, never an error in mid-epoch.
"""

import contextlib
import io
import math
import os
import warnings

import numpy as np

from ..utils import eager
from ._prefetch import ordered_map, prefetched

__all__ = ["ALLOWLIST_FORMATS", "ImageDataset", "image_dataset_from_directory", "load_image", "resize"]

ALLOWLIST_FORMATS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")
# Keras's list; the ones gpucnn resizes with are first.
_INTERPOLATIONS = ("bilinear", "nearest", "bicubic", "area", "lanczos3", "lanczos5", "gaussian", "mitchellcubic")
_SUPPORTED_INTERPOLATIONS = ("bilinear", "nearest")
_CHANNELS = {"grayscale": 1, "rgb": 3, "rgba": 4}
_PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
_MAX_NAMED = 10  # files named in one warning


def _default_workers():
    return min(4, os.cpu_count() or 1)


def _pil():
    """Pillow's Image module, or an ImportError that says how to install it."""
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError(
            "reading images needs Pillow, an optional dependency of gpucnn: pip install 'gpucnn[images]' "
            "(in a checkout of gpucnn: pip install -e '.[images]')") from e
    return Image


def _unreadable_errors(Image):
    """The exceptions by which Pillow says a file is not an image it can read."""
    return (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


# ============================================================================================ resizing
def _source_coords(n_in, n_out):
    """For each output index: the two input indices and the weight of the second (half-pixel centres,
    no antialiasing; positions before the first / after the last input pixel take that pixel)."""
    pos = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    pos = np.clip(pos, 0.0, n_in - 1)
    lo = np.floor(pos).astype(np.intp)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (pos - lo).astype(np.float32)


def resize(image, size, interpolation="bilinear"):
    """``image`` (height, width, channels) resized to ``size`` = (height, width), as float32.

    "bilinear": half-pixel centres and no antialiasing, as ``tf.image.resize`` and Keras's
    ``ops.image.resize``; "nearest": the input pixel whose centre is nearest (ties go down-right, as
    TensorFlow's half-pixel nearest and PyTorch's "nearest-exact").
    """
    image = np.asarray(image)
    (h_in, w_in, channels), (h_out, w_out) = image.shape, size
    if interpolation not in _SUPPORTED_INTERPOLATIONS:
        raise ValueError(f"interpolation={interpolation!r} is not supported; use one of "
                         f"{_SUPPORTED_INTERPOLATIONS}")
    # Rows (height, width * channels): whole-row gathers, then gathers of columns with their channels.
    flat = image.reshape(h_in, w_in * channels)
    lanes = np.arange(channels)
    if interpolation == "nearest":
        rows = np.minimum(np.floor((np.arange(h_out) + 0.5) * (h_in / h_out)).astype(np.intp), h_in - 1)
        cols = np.minimum(np.floor((np.arange(w_out) + 0.5) * (w_in / w_out)).astype(np.intp), w_in - 1)
        picked = np.take(np.take(flat, rows, axis=0), (cols[:, None] * channels + lanes).ravel(), axis=1)
        return picked.reshape(h_out, w_out, channels).astype(np.float32)
    if (h_in, w_in) == (h_out, w_out):
        return image.astype(np.float32)
    y0, y1, wy = _source_coords(h_in, h_out)
    x0, x1, wx = _source_coords(w_in, w_out)
    top = np.take(flat, y0, axis=0).astype(np.float32)
    bottom = np.take(flat, y1, axis=0).astype(np.float32)
    bottom -= top
    bottom *= wy[:, None]
    top += bottom  # (h_out, w_in * channels): the rows interpolated
    left = np.take(top, (x0[:, None] * channels + lanes).ravel(), axis=1)
    right = np.take(top, (x1[:, None] * channels + lanes).ravel(), axis=1)
    right -= left
    right *= np.repeat(wx, channels)[None, :]
    left += right
    return left.reshape(h_out, w_out, channels)


def _crop_or_pad(image, size, crop, pad):
    """Keras's crop_to_aspect_ratio (the largest centred window of the target aspect ratio) and
    pad_to_aspect_ratio (zero bands on both sides, each as wide as the centring offset)."""
    h, w = image.shape[:2]
    th, tw = size
    if crop:
        ch = max(min(h, int(float(w * th) / tw)), 1)
        cw = max(min(w, int(float(h * tw) / th)), 1)
        top, left = int(float(h - ch) / 2), int(float(w - cw) / 2)
        return image[top:top + ch, left:left + cw]
    if pad:
        ph = max(h, int(float(w * th) / tw))
        pw = max(w, int(float(h * tw) / th))
        top, left = int(float(ph - h) / 2), int(float(pw - w) / 2)
        return np.pad(image, ((top, top), (left, left), (0, 0)))
    return image


def load_image(path, image_size, num_channels=3, interpolation="bilinear", crop_to_aspect_ratio=False,
               pad_to_aspect_ratio=False):
    """One image file as float32 (height, width, num_channels) in 0-255 (a GIF's first frame)."""
    Image = _pil()
    with Image.open(path) as img:
        mode = _PIL_MODES[num_channels]
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale (a PNG): to 8 bits as TensorFlow's
            # decoder gives them to Keras, the high byte of each value (Pillow's convert would saturate at 255)
            img = Image.fromarray((np.clip(np.asarray(img, np.int64), 0, 65535) >> 8).astype(np.uint8), "L")
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")  # Pillow's advice for palette images with transparency
        if img.mode != mode:
            img = img.convert(mode)
        pixels = np.asarray(img)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    pixels = _crop_or_pad(pixels, image_size, crop_to_aspect_ratio, pad_to_aspect_ratio)
    return resize(pixels, image_size, interpolation)


# ============================================================================================ one file
_PIL_RESAMPLING = ("nearest", "bilinear", "bicubic", "hamming", "box", "lanczos")


def load_img(path, color_mode="rgb", target_size=None, interpolation="nearest", keep_aspect_ratio=False):
    """Keras's ``keras.utils.load_img``: one image file as a Pillow image in ``color_mode`` ("rgb", "rgba",
    "grayscale": kept as it is when 8, 16 or 32-bit grayscale already, else 8-bit), resized by Pillow to
    ``target_size`` = (height, width) with ``interpolation`` (Pillow's filter of that name) when it differs;
    ``keep_aspect_ratio``: the centred window of the target's aspect ratio is what gets resized."""
    Image = _pil()
    if isinstance(path, io.BytesIO):
        img = Image.open(path)
    elif isinstance(path, (str, bytes, os.PathLike)):
        with open(path, "rb") as f:
            img = Image.open(io.BytesIO(f.read()))
    else:
        raise TypeError(f"load_img: path must be a file path or an io.BytesIO, got {type(path).__name__}")
    wanted = {"grayscale": None, "rgba": "RGBA", "rgb": "RGB"}
    if color_mode not in wanted:
        raise ValueError(f'load_img: color_mode must be "grayscale", "rgb" or "rgba", got {color_mode!r}')
    if color_mode == "grayscale" and img.mode not in ("L", "I;16", "I"):
        img = img.convert("L")
    elif wanted[color_mode] and img.mode != wanted[color_mode]:
        img = img.convert(wanted[color_mode])
    if target_size is None:
        return img
    height, width = (int(v) for v in target_size)
    if img.size == (width, height):
        return img
    if interpolation not in _PIL_RESAMPLING:
        raise ValueError(f"load_img: interpolation {interpolation!r} is not one of {', '.join(_PIL_RESAMPLING)}")
    resample = getattr(Image.Resampling, interpolation.upper())
    box = None
    if keep_aspect_ratio:
        w, h = img.size
        crop_h, crop_w = min(h, (w * height) // width), min(w, (h * width) // height)
        top, left = (h - crop_h) // 2, (w - crop_w) // 2
        box = (left, top, left + crop_w, top + crop_h)
    return img.resize((width, height), resample, box=box)


def img_to_array(img, data_format=None, dtype=None):
    """Keras's ``keras.utils.img_to_array``: a Pillow image as a float32 array (height, width, channels), a
    grayscale one with a channel axis of 1 (channels-last, gpucnn's only layout)."""
    if data_format not in (None, "channels_last"):
        raise ValueError(f"img_to_array: gpucnn's images are channels-last, got data_format={data_format!r}")
    x = np.asarray(img, dtype=np.float32 if dtype is None else dtype)
    if x.ndim == 2:
        x = x[:, :, None]
    if x.ndim != 3:
        raise ValueError(f"img_to_array: an image is (height, width[, channels]), got shape {x.shape}")
    return x


# ============================================================================================ the dataset
class _Methods:
    """The ``tf.data.Dataset`` methods the book's code calls on a dataset, for gpucnn's datasets: ``take``, ``map``,
    ``cache``, ``prefetch``; any other of tf.data's says clearly that gpucnn does not have it."""

    def take(self, count):
        """The first ``count`` batches of a pass (as ``tf.data.Dataset.take``; -1: all of them): iterable, with
        ``len``."""
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < -1:
            raise ValueError(f"take: count must be a non-negative int, or -1 for all, got {count!r}")
        return _Take(self, len(self) if count == -1 else count)

    def map(self, map_func, num_parallel_calls=None, deterministic=None, name=None):
        """Each item through ``map_func`` (called with the item's parts, ``map_func(images, labels)``, as tf.data
        does), one batch at a time as they are read; ``num_parallel_calls`` and ``deterministic`` are accepted and
        change nothing (decoding already runs on threads)."""
        if not callable(map_func):
            raise TypeError(f"map: map_func must be callable, got {type(map_func).__name__}")
        return _Mapped(self, map_func)

    def cache(self, filename=""):
        """The items of the first complete pass, kept in memory and given again by every later pass, in that order
        (as ``tf.data.Dataset.cache()``: no decoding after the first epoch, and no reshuffling). Only in memory:
        a ``filename`` is refused."""
        if filename:
            raise NotImplementedError(f"cache: gpucnn caches in memory only; leave filename out (got {filename!r})")
        return _Cached(self)

    def prefetch(self, buffer_size=None, name=None):
        """The dataset itself: gpucnn's datasets already read ahead of training on background threads."""
        return self

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        raise AttributeError(f"{type(self).__name__} has no {name!r}: gpucnn's datasets have tf.data's take, map, "
                             "cache and prefetch (not its other methods yet); iterate over the dataset for anything "
                             "else")


class ImageDataset(_Methods):
    """Image files and their labels, read in batches; one pass over it is one epoch.

    Attributes as Keras's dataset has them: ``class_names`` (None without labels) and ``file_paths``
    (the files read, in the order listed; files found unreadable are left out). ``len(dataset)`` is the
    number of batches. Each pass reshuffles (when ``shuffle``), from ``seed`` and the pass number, so a
    seeded dataset repeats exactly. Items are ``(images, labels)``, or ``images`` alone without labels.

    ``workers`` threads decode (default: up to 4), ``prefetch`` batches ahead of the consumer.
    """

    def __init__(self, file_paths, labels, class_names, *, label_mode, image_size, num_channels,
                 batch_size, shuffle, seed, interpolation="bilinear", crop_to_aspect_ratio=False,
                 pad_to_aspect_ratio=False, workers=None, prefetch=2):
        self.file_paths = list(file_paths)
        self._labels = None if labels is None else np.asarray(labels)
        self.class_names = class_names
        self.label_mode = label_mode
        self.image_size = tuple(image_size)
        self.num_channels = num_channels
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.interpolation = interpolation
        self.crop_to_aspect_ratio = crop_to_aspect_ratio
        self.pad_to_aspect_ratio = pad_to_aspect_ratio
        self.workers = workers if workers is not None else _default_workers()
        self.prefetch_batches = prefetch
        self._passes = 0

    def __len__(self):
        n = len(self.file_paths)
        return n if self.batch_size is None else math.ceil(n / self.batch_size)

    def __repr__(self):
        return (f"<ImageDataset: {len(self.file_paths)} files, {len(self)} batches of "
                f"{self.batch_size} x {self.image_size + (self.num_channels,)}, classes {self.class_names}>")

    def __iter__(self):
        paths, labels = self.file_paths, self._labels  # this pass's files (a skip replaces the lists)
        order = np.arange(len(paths))
        if self.shuffle:
            order = np.random.default_rng([self.seed, self._passes]).permutation(order)
        self._passes += 1
        return self._read(paths, labels, order)

    # ----------------------------------------------------------------------------------- reading
    def _load(self, path):
        """The image of ``path``, or None when the file cannot be read."""
        try:
            return load_image(path, self.image_size, self.num_channels, self.interpolation,
                              self.crop_to_aspect_ratio, self.pad_to_aspect_ratio)
        except _unreadable_errors(_pil()):
            return None

    def _batches(self, paths, labels, order):
        """(kind, value) items: ("batch", item) full batches (the last may be smaller), and
        ("skipped", path) for each file that could not be read, left out of the batches."""
        size = self.batch_size or 1
        images = np.empty((size,) + self.image_size + (self.num_channels,), np.float32)
        taken = []
        decoded = ordered_map(self._load, [paths[i] for i in order], self.workers)
        try:
            for i, image in zip(order, decoded):
                if image is None:
                    yield "skipped", paths[i]
                    continue
                images[len(taken)] = image
                taken.append(i)
                if len(taken) == size:
                    yield "batch", self._item(images, labels, taken)
                    images = np.empty_like(images)
                    taken = []
            if taken:
                yield "batch", self._item(images[:len(taken)], labels, taken)
        finally:
            decoded.close()  # joins the decoding threads

    def _item(self, images, labels, taken):
        """``images`` with their labels in the dataset's label mode (one image when unbatched)."""
        if labels is not None and self.label_mode is not None:
            labels = labels[np.asarray(taken)]
            if self.label_mode == "binary":
                labels = labels.astype(np.float32).reshape(-1, 1)
            elif self.label_mode == "categorical":
                labels = np.eye(len(self.class_names), dtype=np.float32)[labels]
            else:
                labels = labels.astype(np.int32)
        if self.batch_size is None:
            return eager(images[0] if labels is None else (images[0], labels[0]))
        return eager(images if labels is None else (images, labels))

    def _read(self, paths, labels, order):
        skipped = []
        items = prefetched(lambda: self._batches(paths, labels, order), self.prefetch_batches, "gpucnn-images")
        try:
            for kind, value in items:
                if kind == "batch":
                    yield value
                else:
                    skipped.append(value)
        finally:
            items.close()  # stops and joins the decoding threads now, also when the consumer stopped early
            if skipped:
                self._forget(skipped)

    def _forget(self, skipped):
        """Leave unreadable files out of later passes, with one warning naming them."""
        bad = set(skipped)
        keep = [i for i, p in enumerate(self.file_paths) if p not in bad]
        self.file_paths = [self.file_paths[i] for i in keep]
        if self._labels is not None:
            self._labels = self._labels[np.asarray(keep, dtype=np.intp)]
        _warn_unreadable(sorted(bad))


@contextlib.contextmanager
def _pass_over(dataset):
    """One pass over ``dataset``, closed (its reading stopped, its threads joined) when the block ends, also when the
    consumer stops early."""
    passing = iter(dataset)
    try:
        yield passing
    finally:
        getattr(passing, "close", lambda: None)()


class _Take(_Methods):
    def __init__(self, dataset, count):
        self._dataset, self._count = dataset, int(count)

    def __len__(self):
        return min(self._count, len(self._dataset))

    def __iter__(self):
        with _pass_over(self._dataset) as passing:
            for _, item in zip(range(self._count), passing):
                yield item


class _Mapped(_Methods):
    def __init__(self, dataset, map_func):
        self._dataset, self._func = dataset, map_func

    def __len__(self):
        return len(self._dataset)

    def __iter__(self):
        with _pass_over(self._dataset) as passing:
            for item in passing:
                yield eager(self._func(*item) if isinstance(item, tuple) else self._func(item))


class _Cached(_Methods):
    def __init__(self, dataset):
        self._dataset, self._items = dataset, None

    def __len__(self):
        return len(self._items) if self._items is not None else len(self._dataset)

    def __iter__(self):
        # each pass gives copies: a consumer that changes a batch in place (images /= 255 in a map function, fine
        # on tf.data's immutable tensors) changes neither the cache nor a later epoch's batches
        if self._items is not None:
            for item in self._items:
                yield _copy(item)
            return
        items = []
        with _pass_over(self._dataset) as passing:
            for item in passing:
                items.append(_copy(item))
                yield item
        self._items = items  # a pass that ran to its end: the later passes replay it


def _copy(item):
    """A copy of a dataset item's arrays (an array, or a tuple of them)."""
    if isinstance(item, tuple) and not hasattr(item, "_fields"):
        return tuple(_copy(v) for v in item)
    return eager(item.copy()) if isinstance(item, np.ndarray) else item


def _warn_unreadable(paths):
    shown = ", ".join(paths[:_MAX_NAMED]) + (f" and {len(paths) - _MAX_NAMED} more" if len(paths) > _MAX_NAMED else "")
    warnings.warn(f"Skipping {len(paths)} file(s) that could not be read as images: {shown}",
                  UserWarning, stacklevel=3)


# ============================================================================================ listing files
def _list_class_folder(directory, subdir, follow_links):
    """Keras's listing below ``directory/subdir``: every folder (walked in sorted order), its files with
    an allowed extension in sorted order, as paths ``directory/subdir/<relative path>``."""
    folder = os.path.join(directory, subdir)
    dirname = os.path.basename(folder)
    paths = []
    for root, _, files in sorted(os.walk(folder, followlinks=follow_links), key=lambda walked: walked[0]):
        for name in sorted(files):
            if name.lower().endswith(ALLOWLIST_FORMATS):
                relative = os.path.join(dirname, os.path.relpath(os.path.join(root, name), folder))
                paths.append(os.path.join(directory, relative))
    return paths


def _index_directory(directory, labels, class_names, follow_links):
    """(file paths, labels or None, class names or None), in Keras's order (before shuffling)."""
    if labels == "inferred":
        found = [d for d in sorted(os.listdir(directory))
                 if os.path.isdir(os.path.join(directory, d)) and not d.startswith(".")]
        if class_names is not None:
            if not set(class_names).issubset(found):
                raise ValueError(f"The `class_names` passed did not match the names of the subdirectories of "
                                 f"the target directory. Expected: {found} (or a subset of it), but received: "
                                 f"class_names={class_names}")
            found = list(class_names)
        subdirs = found
    else:
        if class_names is not None:
            raise ValueError("When argument `labels` is specified (or None), argument `class_names` cannot "
                             "be specified (the class names are the sorted labels).")
        subdirs = [""]
    paths, label_list = [], []
    for index, subdir in enumerate(subdirs):
        listed = _list_class_folder(directory, subdir, follow_links)
        paths += listed
        label_list += [index] * len(listed)
    if labels == "inferred":
        return paths, np.asarray(label_list, dtype=np.int32), list(subdirs)
    if labels is None:
        return paths, None, None
    if len(labels) != len(paths):
        raise ValueError(f"Expected the lengths of `labels` to match the number of files in the target "
                         f"directory. len(labels) is {len(labels)} while we found {len(paths)} files in "
                         f"directory {directory}.")
    values = np.asarray(labels)
    if values.dtype.kind not in "iu" or (values.size and values.min() < 0):
        raise ValueError(f"`labels` must be non-negative integers, one per file; got {list(labels)[:5]}...")
    return paths, values.astype(np.int32), [str(v) for v in sorted(set(values.tolist()))]


def _split(paths, labels, validation_split, subset):
    """Keras's split: the last ``int(validation_split * n)`` files are the validation files."""
    if not validation_split:
        return paths, labels
    n_val = int(validation_split * len(paths))
    if n_val == 0:
        raise ValueError(f"validation_split={validation_split} of {len(paths)} files leaves no validation "
                         "files: use a larger split or more files")
    if subset == "training":
        print(f"Using {len(paths) - n_val} files for training.")
        return paths[:-n_val], None if labels is None else labels[:-n_val]
    print(f"Using {n_val} files for validation.")
    return paths[-n_val:], None if labels is None else labels[-n_val:]


def _opens(path):
    """Whether Pillow can open ``path`` as an image (it reads only the file's header)."""
    Image = _pil()
    try:
        with Image.open(path):
            return True
    except _unreadable_errors(Image):
        return False


def _unreadable(paths, workers):
    """The paths Pillow cannot open as an image, checked on ``workers`` threads."""
    checks = ordered_map(_opens, paths, workers)
    try:
        return {path for path, ok in zip(paths, checks) if not ok}
    finally:
        checks.close()


# ============================================================================================ the function
def _check_arguments(labels, label_mode, color_mode, image_size, interpolation, batch_size, validation_split,
                     subset, shuffle, seed, crop_to_aspect_ratio, pad_to_aspect_ratio, data_format):
    if labels not in ("inferred", None) and not isinstance(labels, (list, tuple)):
        raise ValueError("`labels` argument should be a list/tuple of integer labels, of the same size as the "
                         "number of image files in the target directory. If you wish to infer the labels from "
                         'the subdirectory names in the target directory, pass `labels="inferred"`. If you '
                         "wish to get a dataset that only contains images (no labels), pass `labels=None`. "
                         f"Received: labels={labels}")
    if label_mode not in ("int", "categorical", "binary", None):
        raise ValueError('`label_mode` argument must be one of "int", "categorical", "binary", or None. '
                         f"Received: label_mode={label_mode}")
    if color_mode not in _CHANNELS:
        raise ValueError(f'`color_mode` must be one of {{"rgb", "rgba", "grayscale"}}. Received: '
                         f"color_mode={color_mode}")
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        image_size = (image_size, image_size)
    if (not isinstance(image_size, (list, tuple)) or len(image_size) != 2
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0
                       for v in image_size)):
        raise ValueError(f"Invalid `image_size` value. Expected a tuple of 2 positive integers. "
                         f"Received: image_size={image_size}")
    interpolation = str(interpolation).lower()
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"Argument `interpolation` should be one of {_INTERPOLATIONS}. "
                         f"Received: interpolation={interpolation}")
    if interpolation not in _SUPPORTED_INTERPOLATIONS:
        raise ValueError(f"interpolation={interpolation!r} is not supported by gpucnn; use one of "
                         f"{_SUPPORTED_INTERPOLATIONS}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
                                   or batch_size < 1):
        raise ValueError(f"`batch_size` must be a positive integer or None, got {batch_size!r}")
    if validation_split and not 0 < validation_split < 1:
        raise ValueError(f"`validation_split` must be between 0 and 1, received: {validation_split}")
    if (validation_split or subset) and not (validation_split and subset):
        raise ValueError("If `subset` is set, `validation_split` must be set, and inversely.")
    if subset not in ("training", "validation", "both", None):
        raise ValueError(f'`subset` must be either "training", "validation" or "both", received: {subset}')
    if validation_split and shuffle and seed is None:
        raise ValueError("If using `validation_split` and shuffling the data, you must provide a `seed` "
                         "argument, to make sure that there is no overlap between the training and "
                         "validation subset.")
    if crop_to_aspect_ratio and pad_to_aspect_ratio:
        raise ValueError("Only one of `pad_to_aspect_ratio`, `crop_to_aspect_ratio` can be set to `True`.")
    if data_format not in (None, "channels_last"):
        raise ValueError(f"gpucnn's images are channels_last; data_format={data_format!r} is not supported")
    return tuple(int(v) for v in image_size), interpolation


def image_dataset_from_directory(directory, labels="inferred", label_mode="int", class_names=None,
                                 color_mode="rgb", batch_size=32, image_size=(256, 256), shuffle=True,
                                 seed=None, validation_split=None, subset=None, interpolation="bilinear",
                                 follow_links=False, crop_to_aspect_ratio=False, pad_to_aspect_ratio=False,
                                 data_format=None, verbose=True):
    """An :class:`ImageDataset` of the images below ``directory`` (two with ``subset="both"``:
    training and validation), with Keras 3's arguments and meaning.

    - ``labels``: "inferred" (one subfolder per class), None (images alone), or a list of integer labels,
      one per file in sorted path order.
    - ``label_mode``: "int" (int32 (batch,)), "categorical" (float32 one-hot), "binary" (float32
      (batch, 1); exactly two classes), or None (images alone).
    - ``class_names``: the subfolders to use, in this order (default: all, sorted).
    - ``color_mode``: "rgb", "grayscale" (1 channel) or "rgba".
    - ``batch_size``: images per batch; None gives single images.
    - ``image_size``: (height, width) every image is resized to; ``interpolation`` "bilinear" or "nearest";
      ``crop_to_aspect_ratio`` / ``pad_to_aspect_ratio`` keep the aspect ratio (crop or zero-pad first).
    - ``shuffle``, ``seed``: the file order is shuffled once with the seed (a random one when None), and
      each pass reshuffles; ``validation_split`` with ``subset`` "training", "validation" or "both" takes
      the last fraction of the shuffled files as validation (a seed is then required, as in Keras).
    - ``follow_links``: walk into symlinked folders. ``verbose``: print the "Found ..." line.
    """
    image_size, interpolation = _check_arguments(
        labels, label_mode, color_mode, image_size, interpolation, batch_size, validation_split, subset,
        shuffle, seed, crop_to_aspect_ratio, pad_to_aspect_ratio, data_format)
    _pil()  # fail now, with the install hint, rather than in the first batch
    if labels is None or label_mode is None:
        labels = label_mode = None
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"image_dataset_from_directory: {directory!r} is not a directory")
    if seed is None:
        seed = np.random.randint(1e6)

    paths, label_values, names = _index_directory(directory, labels, class_names, follow_links)
    if verbose:
        print(f"Found {len(paths)} files." if label_values is None else
              f"Found {len(paths)} files belonging to {len(names)} classes.")
    if labels == "inferred" and not names:
        raise ValueError(f"No class subfolders in {directory}: labels='inferred' reads one subfolder per "
                         f"class (e.g. {os.path.join(directory, 'cats')}, {os.path.join(directory, 'dogs')}); "
                         "for images without labels pass labels=None")
    if not paths:
        raise ValueError(f"No images found in directory {directory}. Allowed formats: {ALLOWLIST_FORMATS}")
    if labels == "inferred" and len(names) == 1:
        raise ValueError(f"Only one class ({names[0]!r}) in {directory}: a classifier needs at least two class "
                         "subfolders; for images without labels pass labels=None")
    if label_mode == "binary" and len(names) != 2:
        raise ValueError(f'When passing `label_mode="binary"`, there must be exactly 2 class_names. '
                         f"Received: class_names={names}")
    if label_mode == "categorical" and label_values.max() >= len(names):
        raise ValueError(f"label_mode='categorical' needs labels 0..{len(names) - 1} (one per class); "
                         f"got {int(label_values.max())}")
    if shuffle:
        np.random.RandomState(seed).shuffle(paths)
        if label_values is not None:
            np.random.RandomState(seed).shuffle(label_values)

    bad = _unreadable(paths, _default_workers())
    if bad:
        _warn_unreadable([p for p in paths if p in bad])
    common = dict(label_mode=label_mode, image_size=image_size, num_channels=_CHANNELS[color_mode],
                  batch_size=batch_size, seed=seed, interpolation=interpolation,
                  crop_to_aspect_ratio=crop_to_aspect_ratio, pad_to_aspect_ratio=pad_to_aspect_ratio)

    def make(which, shuffled):
        subset_paths, subset_labels = _split(paths, label_values, validation_split, which)
        keep = [i for i, p in enumerate(subset_paths) if p not in bad]
        if not keep:
            raise ValueError(f"No {which + ' ' if which else ''}images found in directory {directory}. "
                             f"Allowed formats: {ALLOWLIST_FORMATS}")
        return ImageDataset([subset_paths[i] for i in keep],
                            None if subset_labels is None else subset_labels[keep], names,
                            shuffle=shuffled, **common)

    if subset == "both":
        return make("training", shuffle), make("validation", False)
    return make(subset, shuffle)
