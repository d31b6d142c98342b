"""Image preprocessing and augmentation layers, as Keras 3's: ``Rescaling``, ``RandomFlip``, ``RandomRotation``,
``RandomZoom``, ``RandomTranslation``, ``RandomContrast``. Channels-last images (N, H, W, C).

``Rescaling`` is applied always (training and inference). The ``Random*`` layers act only in training (``fit``,
or a call with ``training=True``); ``predict`` and ``evaluate`` pass images through unchanged, as does a layer
whose factors are all 0. As in Keras 3, a layer called directly on an array without ``training=`` augments
(``data_augmentation(images)`` shows augmented images, as the book does).

Each image gets its own random values, drawn on the host from the layer's own generator when it was given
``seed=`` (saved with the model, so a resumed run draws the same values) or else from ``gpucnn.utils.rng()``
(so ``set_random_seed`` repeats runs bit for bit): ``step_values(n)``, the engine-ready values of n images
(flip flags, transforms, contrast factors). In a training step they come, as Dropout's seeds do, from the
step's tables (``gpucnn.models.graph.StepValues``, filled step by step before the step runs, or before a
whole epoch on the GPU fast path, whose captured step reads its row by the device step counter: the
``step_row`` op); called directly, the layer draws them then. The engine's image ops (``rescale``, ``flip``,
``affine_transform``, ``adjust_contrast``) apply them.
The draws follow Keras 3's layers (keras/src/layers/preprocessing/image_preprocessing), per image n:

  * RandomFlip: flip where u <= 0.5, u ~ U(0, 1); "horizontal_and_vertical" flips both axes or neither;
  * RandomRotation: angle = 2 pi * U(lower, upper) radians (factor 0.1: up to 36 degrees either way), about
    the image centre; positive turns counter-clockwise;
  * RandomZoom: zoom = 1 + U(lower, upper) per axis (> 1 zooms out, < 1 zooms in); without width_factor the
    width takes the height's zoom, so the aspect ratio is kept;
  * RandomTranslation: a shift of height * U(lower, upper) pixels down and width * U(lower, upper) right;
  * RandomContrast: contrast factor U(1 - lower, 1 + upper). As Keras 3 parses it, a single factor f gives
    (lower, upper) = (0, f): contrast only increases, up to 1 + f (Keras's docstring says otherwise; its code
    decides); a pair gives both bounds.

A factor is a number f (the range (-|f|, |f|)) or a pair (lower, upper) (sorted), within Keras's bounds:
rotation and translation [-1, 1], zoom (-1, 1], contrast [0, 1].

The random layers augment a model's inputs: no gradient flows through them (they are the first layers, before
any weights). Asked for one, they raise NotImplementedError. They run on both engines and inside the GPU fast
path's captured step; the NumPy engine's two-process step runs models holding them in one process.
"""
import math

import numpy as np

from .. import backend
from ..utils import plain_number
from .base import Layer, SeededGenerator, _check_image_input
from .tensor import is_symbolic

FILL_MODES = ("reflect", "wrap", "constant", "nearest")  # what Keras's layers take (the op also has "mirror")
INTERPOLATIONS = ("nearest", "bilinear")
FLIP_MODES = ("horizontal", "vertical", "horizontal_and_vertical")


# ===================================================================================== argument checks
def _number(value, what):
    value = plain_number(value)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(value)):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _factor_range(factor, what, low, high, open_low=False):
    """Keras's (lower, upper) of a factor: a number f gives (-|f|, |f|) cut at ``low``, a pair is sorted. Every
    value must lie in [low, high] ((low, high] with ``open_low``)."""
    bounds = f"{'(' if open_low else '['}{low:g}, {high:g}]"
    usage = (f"{what} must be a number or a pair (lower, upper) of numbers in {bounds}, e.g. {what}=0.2 or "
             f"{what}=({max(low, -0.2):g}, 0.2)")
    if isinstance(factor, (tuple, list)):
        if len(factor) != 2:
            raise ValueError(f"{usage}; got {factor!r}")
        values = [_number(v, what) for v in factor]
    elif isinstance(factor, np.ndarray) or isinstance(factor, (str, bytes)) or factor is None:
        raise ValueError(f"{usage}; got {factor!r}")
    else:
        values = [_number(factor, what)]
    for v in values:
        if v > high or v < low or (open_low and v == low):
            raise ValueError(f"{usage}; got {factor!r} ({v:g} is outside {bounds})")
    if len(values) == 2:
        return tuple(sorted(values))
    f = abs(values[0])
    return max(-f, low), f


def _choice(value, choices, what):
    if value not in choices:
        raise ValueError(f"{what} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def _channels_last(layer, data_format):
    if data_format not in (None, "channels_last"):
        raise ValueError(f"{type(layer).__name__}: gpucnn works channels-last (N, H, W, C) only, got "
                         f"data_format={data_format!r}")


def _config_factor(factor):
    """A factor as the constructor got it, JSON-able (a number or a two-element list)."""
    return [float(v) for v in factor] if isinstance(factor, (tuple, list)) else float(factor)


# ===================================================================================== Rescaling
class Rescaling(Layer):
    """y = x * scale + offset, in training and inference (``Rescaling(1./255)``: pixels from 0-255 to 0-1)."""

    def __init__(self, scale, offset=0.0, **kwargs):
        super().__init__(**kwargs)
        for value, what in ((scale, "scale"), (offset, "offset")):
            if isinstance(value, (np.ndarray, list, tuple)):
                raise ValueError(f"Rescaling {what} must be a number; per-channel {what}s (arrays) are not "
                                 f"supported by gpucnn yet, got {value!r}")
        self.scale = _number(scale, "Rescaling scale")
        self.offset = _number(offset, "Rescaling offset")

    def _check_call_shapes(self, shapes):
        """Called on an array, any shape (no weights, elementwise), as Keras's."""

    def forward(self, x, training, ctx):
        return backend.ops().rescale(x, self.scale, self.offset, out=self.buffer(ctx, "y", x.shape))

    def backward(self, dy, ctx):
        if not ctx.get("need_dx", True):
            return None
        return backend.ops().rescale(dy, self.scale, 0.0, out=self.buffer(ctx, "dx", dy.shape))

    def get_config(self):
        return {**super().get_config(), "scale": self.scale, "offset": self.offset}


# ===================================================================================== random augmentation
class RandomImageLayer(SeededGenerator, Layer):
    """What the random augmentation layers share: the seed and generator, training-only application, the
    identity outside training, no gradient. A subclass implements ``_identity()`` (its factors are all 0),
    ``_draw(generator, n, height, width)`` (the host draws of a batch of n images, a dict), ``_values(draws,
    height, width)`` (from them, the (n, K) array its ops read), ``VALUES`` ((K, dtype)) and ``_apply(x,
    values, ctx)`` (the engine ops, on the (n, K) engine array)."""

    augments_on_host = True  # its values are drawn on the host: the two-process step runs it in one process
    VALUES = (1, np.float32)

    def __init__(self, seed=None, data_format=None, **kwargs):
        super().__init__(**kwargs)
        _channels_last(self, data_format)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
            raise ValueError(f"{type(self).__name__} seed must be None or a non-negative int, got {seed!r}")
        self._seed_generator(None if seed is None else int(seed))

    # ---- computing
    def __call__(self, inputs, training=None):
        """As Keras 3: called on an array without ``training=``, the layer augments (``training=False``: it
        passes the images through). On an array: a batch of images of any size, or one image (height, width,
        channels) without its batch axis, which comes back without it."""
        if not is_symbolic(inputs):
            x = self._as_engine_array(inputs)
            if x.ndim == 3:
                return super().__call__(x[None], training=training)[0]
            inputs = x
        return super().__call__(inputs, training=training)

    def _check_call_shapes(self, shapes):
        """Called on an array, images of any size and channels (no weights), as Keras's."""
        _check_image_input(self, shapes)

    def _build(self, input_shape):
        _check_image_input(self, input_shape)
        return input_shape

    @property
    def draws_randomness(self):
        """A training step draws its values (``StepValues``) unless its factors are all 0."""
        return not self._identity()

    def step_value_spec(self):
        """(K, dtype) of the per-image values ``step_values`` gives."""
        return self.VALUES

    def step_values(self, n, height=None, width=None):
        """The next n images' values, drawn on the host from the layer's generator: an (n, K) array (for
        images of the layer's input size unless ``height``/``width`` say otherwise)."""
        h = self.input_shape[0] if height is None else height
        w = self.input_shape[1] if width is None else width
        width, dtype = self.VALUES
        return np.asarray(self._values(self._draw(self.generator(), n, h, w), h, w), dtype).reshape(n, width)

    def forward(self, x, training, ctx):
        active = training is None or bool(training)  # None: a direct call, Keras's default of True
        ctx["identity"] = not active or self._identity()
        if ctx["identity"]:
            return x
        n, h, w, _ = x.shape
        ops = backend.ops()
        step = ctx.get("step")
        table = None if step is None else step.table(self)
        width, dtype = self.VALUES
        kept = self.buffer(ctx, "values", (n, width), dtype)
        if table is None:  # a direct call: drawn now
            values = self.step_values(n, h, w)
            if kept is not None:
                kept[...] = ops.xp.asarray(values)
                values = kept
        else:  # a training step: this step's row of the table
            values = ops.step_row(table, step.counter, n, out=kept)
        return self._apply(x, values, ctx)

    def backward(self, dy, ctx):
        if not ctx.get("need_dx", True):
            return None
        if ctx.get("identity", True):
            return dy
        raise NotImplementedError(
            f"{type(self).__name__} {self.name!r} has no gradient: random augmentation is for a model's inputs. "
            "Put it before every layer with weights (first in the model, e.g. a data_augmentation Sequential "
            "called on keras.Input), where no gradient flows through it")

    def _identity(self):
        return False

    def _draw(self, generator, n, height, width):
        raise NotImplementedError

    def _values(self, draws, height, width):
        raise NotImplementedError

    def _apply(self, x, values, ctx):
        raise NotImplementedError

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}


class RandomFlip(RandomImageLayer):
    """Flips each image left-right ("horizontal"), upside down ("vertical"), or both at once
    ("horizontal_and_vertical", the default), with probability 1/2, in training."""

    def __init__(self, mode="horizontal_and_vertical", seed=None, **kwargs):
        super().__init__(seed=seed, **kwargs)
        self.mode = _choice(mode, FLIP_MODES, "RandomFlip mode")

    VALUES = (1, np.uint8)

    def _draw(self, generator, n, height, width):
        return {"flips": generator.uniform(0.0, 1.0, n) <= 0.5}

    def _values(self, draws, height, width):
        return draws["flips"]

    def _apply(self, x, values, ctx):
        flags = values.reshape(x.shape[0])
        horizontal = flags if self.mode in ("horizontal", "horizontal_and_vertical") else None
        vertical = flags if self.mode in ("vertical", "horizontal_and_vertical") else None
        return backend.ops().flip(x, horizontal, vertical, out=self.buffer(ctx, "y", x.shape))

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


class _RandomAffine(RandomImageLayer):
    """Rotation, zoom and translation: an affine transform per image, sampled with Keras's fill modes."""

    def __init__(self, fill_mode="reflect", interpolation="bilinear", seed=None, fill_value=0.0, **kwargs):
        super().__init__(seed=seed, **kwargs)
        self.fill_mode = _choice(fill_mode, FILL_MODES, f"{type(self).__name__} fill_mode")
        self.interpolation = _choice(interpolation, INTERPOLATIONS, f"{type(self).__name__} interpolation")
        self.fill_value = _number(fill_value, f"{type(self).__name__} fill_value")

    VALUES = (8, np.float32)

    def _transforms(self, draws, height, width):
        raise NotImplementedError

    def _values(self, draws, height, width):
        return self._transforms(draws, height, width)

    def _apply(self, x, values, ctx):
        ops = backend.ops()
        return ops.affine_transform(x, values, self.interpolation, self.fill_mode, self.fill_value,
                                    out=self.buffer(ctx, "y", x.shape))

    def get_config(self):
        return {**super().get_config(), "fill_mode": self.fill_mode, "interpolation": self.interpolation,
                "fill_value": self.fill_value}


class RandomRotation(_RandomAffine):
    """Turns each image about its centre by 2 pi * U(lower, upper) radians in training: ``factor`` is a
    fraction of a full turn (0.1: up to 36 degrees either way), a number or a (lower, upper) pair in [-1, 1]."""

    def __init__(self, factor, fill_mode="reflect", interpolation="bilinear", seed=None, fill_value=0.0,
                 **kwargs):
        super().__init__(fill_mode, interpolation, seed, fill_value, **kwargs)
        self.factor = _factor_range(factor, "RandomRotation factor", -1.0, 1.0)

    def _identity(self):
        return self.factor == (0.0, 0.0)

    def _draw(self, generator, n, height, width):
        return {"angles": 2 * math.pi * generator.uniform(self.factor[0], self.factor[1], n)}

    def _transforms(self, draws, height, width):
        return backend.ops().rotation_transforms(draws["angles"], height, width)

    def get_config(self):
        return {**super().get_config(), "factor": list(self.factor)}


class RandomZoom(_RandomAffine):
    """Zooms each image about its centre in training, by 1 + U(lower, upper) along each axis: positive factors
    zoom out (the image shrinks, the border fills), negative ones zoom in. ``height_factor``/``width_factor``:
    a number or a (lower, upper) pair in (-1, 1]; without ``width_factor`` both axes take the height's zoom."""

    def __init__(self, height_factor, width_factor=None, fill_mode="reflect", interpolation="bilinear", seed=None,
                 fill_value=0.0, **kwargs):
        super().__init__(fill_mode, interpolation, seed, fill_value, **kwargs)
        self.height_factor = height_factor
        self.height_range = _factor_range(height_factor, "RandomZoom height_factor", -1.0, 1.0, open_low=True)
        self.width_factor = width_factor
        self.width_range = None if width_factor is None else \
            _factor_range(width_factor, "RandomZoom width_factor", -1.0, 1.0, open_low=True)

    def _identity(self):
        return self.height_range == (0.0, 0.0) and self.width_range in (None, (0.0, 0.0))

    def _draw(self, generator, n, height, width):
        zy = 1.0 + generator.uniform(self.height_range[0], self.height_range[1], n)
        zx = zy if self.width_range is None else 1.0 + generator.uniform(self.width_range[0], self.width_range[1], n)
        return {"height_zooms": zy, "width_zooms": zx}

    def _transforms(self, draws, height, width):
        return backend.ops().zoom_transforms(draws["height_zooms"], draws["width_zooms"], height, width)

    def get_config(self):
        return {**super().get_config(), "height_factor": _config_factor(self.height_factor),
                "width_factor": None if self.width_factor is None else _config_factor(self.width_factor)}


class RandomTranslation(_RandomAffine):
    """Shifts each image in training by height * U(lower, upper) pixels down and width * U(lower, upper) right:
    ``height_factor``/``width_factor`` are fractions of the image's size, numbers or (lower, upper) pairs in
    [-1, 1]."""

    def __init__(self, height_factor, width_factor, fill_mode="reflect", interpolation="bilinear", seed=None,
                 fill_value=0.0, **kwargs):
        super().__init__(fill_mode, interpolation, seed, fill_value, **kwargs)
        self.height_factor, self.width_factor = height_factor, width_factor
        self.height_range = _factor_range(height_factor, "RandomTranslation height_factor", -1.0, 1.0)
        self.width_range = _factor_range(width_factor, "RandomTranslation width_factor", -1.0, 1.0)

    def _identity(self):
        return self.height_range == (0.0, 0.0) and self.width_range == (0.0, 0.0)

    def _draw(self, generator, n, height, width):
        dy = height * generator.uniform(self.height_range[0], self.height_range[1], n)
        dx = width * generator.uniform(self.width_range[0], self.width_range[1], n)
        return {"dy": dy, "dx": dx}

    def _transforms(self, draws, height, width):
        return backend.ops().translation_transforms(draws["dx"], draws["dy"])

    def get_config(self):
        return {**super().get_config(), "height_factor": _config_factor(self.height_factor),
                "width_factor": _config_factor(self.width_factor)}


class RandomContrast(RandomImageLayer):
    """Scales each image's channels about their means by a factor U(1 - lower, 1 + upper) in training, then
    clips to ``value_range``. ``factor``: a number f in [0, 1] (Keras 3 reads it as (0, f): contrast up to
    1 + f) or a (lower, upper) pair in [0, 1]."""

    def __init__(self, factor, seed=None, value_range=(0, 255), **kwargs):
        super().__init__(seed=seed, **kwargs)
        self.factor = _factor_range(factor, "RandomContrast factor", 0.0, 1.0)
        if not isinstance(value_range, (tuple, list)) or len(value_range) != 2:
            raise ValueError(f"RandomContrast value_range must be a pair (low, high) such as (0, 255) or (0, 1), "
                             f"got {value_range!r}")
        low, high = (_number(v, "RandomContrast value_range") for v in value_range)
        if low >= high:
            raise ValueError(f"RandomContrast value_range must have low < high, got {value_range!r}")
        self.value_range = (low, high)

    def _identity(self):
        return self.factor == (0.0, 0.0)

    def _draw(self, generator, n, height, width):
        return {"factors": generator.uniform(1.0 - self.factor[0], 1.0 + self.factor[1], n)}

    def _values(self, draws, height, width):
        return draws["factors"]

    def _apply(self, x, values, ctx):
        return backend.ops().adjust_contrast(x, values, self.value_range, out=self.buffer(ctx, "y", x.shape))

    def get_config(self):
        return {**super().get_config(), "factor": list(self.factor), "value_range": list(self.value_range)}
