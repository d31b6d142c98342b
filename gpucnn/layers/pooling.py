"""Pooling layers: ``MaxPooling2D``, ``AveragePooling2D``, ``GlobalAveragePooling2D``, ``GlobalMaxPooling2D``."""
import numpy as np

from .. import backend
from ..engines.numpy_ops import MAX_POOL_TAPS
from .base import Layer, _check_image_input, _padding_mode, _pair


class _Pooling2D(Layer):
    def __init__(self, pool_size=(2, 2), strides=None, padding="valid", data_format=None, **kwargs):
        super().__init__(**kwargs)
        if data_format not in (None, "channels_last"):
            raise ValueError(f"{type(self).__name__}: gpucnn works channels-last only, got data_format={data_format!r}")
        self.pool_size = _pair(pool_size, "pool_size")
        self.strides = self.pool_size if strides is None else _pair(strides, "strides")
        self.padding = _padding_mode(padding)

    def _build(self, input_shape):
        return self._window_output(input_shape, self.pool_size, "window", "Use a smaller pool_size, padding='same', "
                                   "or fewer layers that shrink the image.")

    def get_config(self):
        return {**super().get_config(), "pool_size": list(self.pool_size), "strides": list(self.strides),
                "padding": self.padding}


class MaxPooling2D(_Pooling2D):
    """Max over each window; the gradient goes to the window's first maximum (scan order)."""

    def _build(self, input_shape):
        if self.pool_size[0] * self.pool_size[1] > MAX_POOL_TAPS:
            raise ValueError(f"MaxPooling2D {self.name!r}: pool_size {self.pool_size} has more than {MAX_POOL_TAPS} "
                             "cells, which gpucnn does not support; use a smaller window or stack poolings")
        return super()._build(input_shape)

    def forward(self, x, training, ctx):
        shape = (x.shape[0],) + self.output_shape
        y, idx = backend.ops().maxpool2d_forward(x, self.pool_size, self.strides, self.pads,
                                                 out=self.buffer(ctx, "y", shape),
                                                 out_idx=self.buffer(ctx, "idx", shape, np.int8))
        ctx["x_shape"], ctx["y"], ctx["idx"] = x.shape, y, idx
        return y

    def backward(self, dy, ctx):
        return backend.ops().maxpool2d_backward(dy, ctx["idx"], ctx["x_shape"], self.pool_size, self.strides,
                                                self.pads, out=self.buffer(ctx, "dx", ctx["x_shape"]))


class AveragePooling2D(_Pooling2D):
    """Mean over each window ("same" padding is left out of the mean, as in Keras)."""

    def forward(self, x, training, ctx):
        ctx["x_shape"] = x.shape
        return backend.ops().avgpool2d_forward(x, self.pool_size, self.strides, self.pads,
                                               out=self.buffer(ctx, "y", (x.shape[0],) + self.output_shape))

    def backward(self, dy, ctx):
        return backend.ops().avgpool2d_backward(dy, ctx["x_shape"], self.pool_size, self.strides, self.pads,
                                                out=self.buffer(ctx, "dx", ctx["x_shape"]))


class _GlobalPooling2D(Layer):
    """(N, H, W, C) → (N, C), one value per channel; ``keepdims=True``: (N, 1, 1, C), as Keras's (the op's (N, C)
    result seen with two axes of 1)."""

    def __init__(self, data_format=None, keepdims=False, **kwargs):
        super().__init__(**kwargs)
        if data_format not in (None, "channels_last"):
            raise ValueError(f"{type(self).__name__}: gpucnn supports channels_last only, got {data_format!r}")
        self.keepdims = bool(keepdims)

    def _build(self, input_shape):
        _check_image_input(self, input_shape)
        return (1, 1, input_shape[2]) if self.keepdims else (input_shape[2],)

    def forward(self, x, training, ctx):
        y = self._pool(x, ctx)
        return y.reshape(y.shape[0], 1, 1, y.shape[1]) if self.keepdims else y

    def backward(self, dy, ctx):
        return self._unpool(dy.reshape(dy.shape[0], dy.shape[-1]), ctx)

    def get_config(self):
        return {**super().get_config(), "keepdims": self.keepdims}


class GlobalAveragePooling2D(_GlobalPooling2D):
    """(N, H, W, C) → (N, C): the mean of each channel."""

    def _pool(self, x, ctx):
        ctx["x_shape"] = x.shape
        return backend.ops().global_avgpool2d_forward(x, out=self.buffer(ctx, "y", (x.shape[0], x.shape[3])))

    def _unpool(self, dy, ctx):
        return backend.ops().global_avgpool2d_backward(dy, ctx["x_shape"],
                                                       out=self.buffer(ctx, "dx", ctx["x_shape"]))


class GlobalMaxPooling2D(_GlobalPooling2D):
    """(N, H, W, C) → (N, C): the maximum of each channel; the gradient goes to its first maximum (scan order)."""

    def _pool(self, x, ctx):
        shape = (x.shape[0], x.shape[3])
        y, idx = backend.ops().global_maxpool2d_forward(x, out=self.buffer(ctx, "y", shape),
                                                        out_idx=self.buffer(ctx, "idx", shape, np.int32))
        ctx["x_shape"], ctx["idx"] = x.shape, idx
        return y

    def _unpool(self, dy, ctx):
        return backend.ops().global_maxpool2d_backward(dy, ctx["idx"], ctx["x_shape"],
                                                       out=self.buffer(ctx, "dx", ctx["x_shape"]))
