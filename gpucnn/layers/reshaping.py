"""Reshaping layers: ``ZeroPadding2D`` (zeros around images) and ``Reshape`` (a new per-sample shape)."""
import numbers

import numpy as np

from .. import backend
from .base import Layer, _check_image_input


def _padding_pair(value, what):
    """An int or a pair of non-negative ints → a pair."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (value, value)
    try:
        pair = tuple(value)
    except TypeError:
        pair = ()
    if len(pair) != 2 or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0
                                 for v in pair):
        raise ValueError(f"ZeroPadding2D: {what} must be a non-negative int or a pair of them, got {value!r}")
    return int(pair[0]), int(pair[1])


class ZeroPadding2D(Layer):
    """Zeros around each image: ``padding`` is an int (every side), a pair ``(symmetric_height, symmetric_width)``,
    or ``((top, bottom), (left, right))``, as Keras takes it."""

    def __init__(self, padding=(1, 1), data_format=None, **kwargs):
        super().__init__(**kwargs)
        if data_format not in (None, "channels_last"):
            raise ValueError(f"ZeroPadding2D: gpucnn works channels-last only, got data_format={data_format!r}")
        if isinstance(padding, numbers.Integral) and not isinstance(padding, bool):
            padding = (padding, padding)
        if not isinstance(padding, (tuple, list)) or len(padding) != 2:
            raise ValueError("ZeroPadding2D: padding must be an int, a pair of ints (symmetric_height, "
                             f"symmetric_width) or a pair of pairs ((top, bottom), (left, right)), got {padding!r}")
        self.padding = (_padding_pair(padding[0], "the height padding"), _padding_pair(padding[1], "the width padding"))

    @property
    def pads(self):
        """(top, bottom, left, right), as the ops take it."""
        (top, bottom), (left, right) = self.padding
        return top, bottom, left, right

    def _build(self, input_shape):
        _check_image_input(self, input_shape)
        h, w, c = input_shape
        top, bottom, left, right = self.pads
        return (top + h + bottom, left + w + right, c)

    def forward(self, x, training, ctx):
        ctx["x_shape"] = x.shape
        return backend.ops().zero_padding2d_forward(x, self.pads,
                                                    out=self.buffer(ctx, "y", (x.shape[0],) + self.output_shape))

    def backward(self, dy, ctx):
        return backend.ops().zero_padding2d_backward(dy, ctx["x_shape"], self.pads,
                                                     out=self.buffer(ctx, "dx", ctx["x_shape"]))

    def get_config(self):
        return {**super().get_config(), "padding": [list(p) for p in self.padding]}


class Reshape(Layer):
    """Gives each sample the shape ``target_shape`` (the same number of values; one dimension may be -1, worked
    out from the others). The values keep their order (C order, as Keras)."""

    def __init__(self, target_shape, **kwargs):
        super().__init__(**kwargs)
        try:
            target = tuple(target_shape)
        except TypeError:
            target = None
        if not target or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and (d > 0 or d == -1)
                                 for d in target) or list(target).count(-1) > 1:
            raise ValueError(f"Reshape: target_shape must be a tuple of positive ints, one of which may be -1 (the "
                             f"batch dimension left out), got {target_shape!r}")
        self.target_shape = tuple(int(d) for d in target)

    def _build(self, input_shape):
        size = int(np.prod(input_shape))
        known = int(np.prod([d for d in self.target_shape if d != -1]))
        if -1 in self.target_shape:
            if size % known:
                raise ValueError(f"Reshape {self.name!r}: inputs of shape {(None,) + tuple(input_shape)} ({size} values "
                                 f"a sample) cannot fill target_shape {self.target_shape}: {size} is not a multiple of "
                                 f"{known}")
            return tuple(size // known if d == -1 else d for d in self.target_shape)
        if known != size:
            raise ValueError(f"Reshape {self.name!r}: inputs of shape {(None,) + tuple(input_shape)} have {size} values "
                             f"a sample, target_shape {self.target_shape} holds {known}; the sizes must match")
        return self.target_shape

    def forward(self, x, training, ctx):
        return x.reshape((x.shape[0],) + self.output_shape)

    def backward(self, dy, ctx):
        return dy.reshape((dy.shape[0],) + self.input_shape)

    def get_config(self):
        return {**super().get_config(), "target_shape": list(self.target_shape)}
