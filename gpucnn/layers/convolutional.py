"""``Conv2D``, and ``ConvPool``: a Conv2D and the 2x2 max-pooling after it trained as one op."""
import numpy as np

from .. import backend
from .base import Layer, _padding_mode, _pair, _positive_int
from .pooling import MaxPooling2D


class Conv2D(Layer):
    """2-D convolution over (N, H, W, C) images, with bias and activation fused."""

    def __init__(self, filters, kernel_size, strides=(1, 1), padding="valid", activation=None, use_bias=True,
                 kernel_initializer="glorot_uniform", bias_initializer="zeros", data_format=None, **kwargs):
        super().__init__(**kwargs)
        if data_format not in (None, "channels_last"):
            raise ValueError(f"Conv2D: gpucnn works channels-last (N, H, W, C) only, got data_format={data_format!r}")
        self.filters = _positive_int(filters, "filters")
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.strides = _pair(strides, "strides")
        self.padding = _padding_mode(padding)
        self._kernel_options(activation, use_bias, kernel_initializer, bias_initializer)

    def _build(self, input_shape):
        p, q, c = self._window_output(input_shape, self.kernel_size, "kernel", "Use padding='same', a smaller "
                                      "kernel_size, or fewer pooling layers before it.")
        self._add_weight("kernel", self.kernel_size + (c, self.filters), self.kernel_initializer)
        if self.use_bias:
            self._add_weight("bias", (self.filters,), self.bias_initializer)
        return (p, q, self.filters)

    def forward(self, x, training, ctx):
        fused, after = self._forward_activation(ctx)
        z = backend.ops().conv2d_forward(x, self.weights[0], self.weights[1] if self.use_bias else None, self.strides,
                                         self.pads, fused, ctx=ctx.setdefault("ops", {}),
                                         out=self.buffer(ctx, "y", (x.shape[0],) + self.output_shape))
        y = self._activate(z, after, ctx)
        ctx["x"], ctx["y"] = x, y
        return y

    def backward(self, dy, ctx):
        ops, x = backend.ops(), ctx["x"]
        dz = self._activation_grad(dy, ctx)
        need_dx = ctx.get("need_dx", True)
        dx, _, _ = ops.conv2d_backward(dz, x, self.weights[0], self.strides, self.pads, ctx=ctx.setdefault("ops", {}),
                                       out=self.buffer(ctx, "dx", x.shape) if need_dx else None,
                                       out_w=self.weight_grad(0, ctx), out_b=self.bias_grad(1, self.filters, ctx),
                                       need_dx=need_dx)
        return dx

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "kernel_size": list(self.kernel_size),
                "strides": list(self.strides), "padding": self.padding, **self._kernel_config()}


def fusable_pool(conv, pool):
    """Whether training runs Conv2D ``conv`` and ``pool``, the layer after it, as one op
    (``ops.conv2d_maxpool_forward``): a MaxPooling2D of 2x2 windows at stride 2, "valid", after a relu or
    linear convolution, both of gpucnn's own classes (a subclass's own forward must run)."""
    return (type(conv) is Conv2D and type(pool) is MaxPooling2D and conv.activation in (None, "relu")
            and pool.pool_size == (2, 2) and pool.strides == (2, 2) and pool.padding == "valid")


class ConvPool:
    """Training's step for a Conv2D and the MaxPooling2D after it (``fusable_pool``): one op forward and one
    backward, through the layers' own weights and gradients and the two call sites' contexts. The convolution's
    full output is never kept."""

    def __init__(self, conv, pool):
        self.conv, self.pool = conv, pool

    def forward(self, x, training, conv_ctx, pool_ctx):
        conv, pool = self.conv, self.pool
        y, idx = backend.ops().conv2d_maxpool_forward(
            x, conv.weights[0], conv.weights[1] if conv.use_bias else None, conv.strides, conv.pads,
            conv.activation, ctx=conv_ctx.setdefault("ops", {}),
            out=pool.buffer(pool_ctx, "y", (x.shape[0],) + pool.output_shape),
            out_idx=pool.buffer(pool_ctx, "idx", (x.shape[0],) + pool.output_shape, np.int8))
        conv_ctx["x"], pool_ctx["y"], pool_ctx["idx"] = x, y, idx
        return y

    def backward(self, dy, conv_ctx, pool_ctx):
        conv = self.conv
        x = conv_ctx["x"]
        return backend.ops().conv2d_maxpool_backward(
            dy, pool_ctx["y"], pool_ctx["idx"], x, conv.weights[0], conv.strides, conv.pads, conv.activation,
            ctx=conv_ctx.setdefault("ops", {}), out_w=conv.weight_grad(0, conv_ctx),
            out_b=conv.bias_grad(1, conv.filters, conv_ctx), need_dx=conv_ctx.get("need_dx", True),
            out=conv.buffer(conv_ctx, "dx", x.shape))
