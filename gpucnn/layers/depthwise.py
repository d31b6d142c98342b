"""``DepthwiseConv2D`` and ``SeparableConv2D`` (Xception's depthwise separable convolution), with Keras's weight
layouts.

``DepthwiseConv2D`` convolves each input channel on its own with ``depth_multiplier`` filters: kernel
(kh, kw, in, depth_multiplier), output channel ``c · depth_multiplier + m`` from input channel c, bias
(in · depth_multiplier,). ``SeparableConv2D`` is that depthwise step (no bias, no activation) followed by a 1x1
convolution mixing the channels: depthwise kernel (kh, kw, in, depth_multiplier), pointwise kernel
(1, 1, in · depth_multiplier, filters), bias (filters,), the activation after the pointwise step. The depthwise
part runs on the engine's ``depthwise_conv2d_*`` ops, the pointwise part on ``conv2d_*``.
"""
import numbers

from .. import backend, initializers
from .base import Layer, _initializer, _padding_mode, _pair, _positive_int

_NO_PADDING = (0, 0, 0, 0)


class _DepthwiseWindow(Layer):
    """What both layers share: the window options, the geometry and the depthwise step."""

    def _window_options(self, kernel_size, strides, padding, depth_multiplier, data_format, dilation_rate):
        who = type(self).__name__
        if data_format not in (None, "channels_last"):
            raise ValueError(f"{who}: gpucnn works channels-last (N, H, W, C) only, got data_format={data_format!r}")
        if _pair(dilation_rate, "dilation_rate") != (1, 1):
            raise ValueError(f"{who}: gpucnn does not support dilation_rate={dilation_rate!r} (yet); use (1, 1)")
        if isinstance(depth_multiplier, bool) or not isinstance(depth_multiplier, numbers.Integral):
            raise ValueError(f"{who}: depth_multiplier must be a positive int, got {depth_multiplier!r}")
        self.depth_multiplier = _positive_int(int(depth_multiplier), "depth_multiplier")
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.strides = _pair(strides, "strides")
        self.padding = _padding_mode(padding)

    def _window_geometry(self, input_shape):
        """(P, Q, C) of the depthwise step's output grid and the input's channels; sets ``self.pads``."""
        return self._window_output(input_shape, self.kernel_size, "window", "Use padding='same', a smaller "
                                   "kernel_size, or fewer layers that shrink the image before it.")

    def _depthwise_forward(self, x, bias, activation, ctx, key):
        p, q, _ = self.output_shape
        channels = self.input_shape[2] * self.depth_multiplier
        return backend.ops().depthwise_conv2d_forward(
            x, self.weights[0], bias, self.strides, self.pads, activation, ctx=ctx.setdefault("ops_depthwise", {}),
            out=self.buffer(ctx, key, (x.shape[0], p, q, channels)))

    def _depthwise_backward(self, dz, x, ctx, out_b):
        """The depthwise kernel's gradient (weight 0) and bias gradient (into ``out_b``) from ``dz``, the gradient at
        the depthwise step's output; returns the input gradient, or None when it is not needed."""
        ops, op_ctx = backend.ops(), ctx.setdefault("ops_depthwise", {})
        ops.depthwise_conv2d_backward_filter(dz, x, self.weights[0].shape, self.strides, self.pads, ctx=op_ctx,
                                             out_w=self.weight_grad(0, ctx), out_b=out_b)
        if not ctx.get("need_dx", True):
            return None
        return ops.depthwise_conv2d_backward_data(dz, self.weights[0], x.shape, self.strides, self.pads, ctx=op_ctx,
                                                  out=self.buffer(ctx, "dx", x.shape))

    def _window_config(self):
        return {"kernel_size": list(self.kernel_size), "strides": list(self.strides), "padding": self.padding,
                "depth_multiplier": self.depth_multiplier, **self._kernel_config("depthwise_initializer")}


class DepthwiseConv2D(_DepthwiseWindow):
    """Each input channel convolved with its own ``depth_multiplier`` filters; bias and activation fused."""

    def __init__(self, kernel_size, strides=(1, 1), padding="valid", depth_multiplier=1, data_format=None,
                 dilation_rate=(1, 1), activation=None, use_bias=True, depthwise_initializer="glorot_uniform",
                 bias_initializer="zeros", **kwargs):
        super().__init__(**kwargs)
        self._window_options(kernel_size, strides, padding, depth_multiplier, data_format, dilation_rate)
        self._kernel_options(activation, use_bias, depthwise_initializer, bias_initializer)

    def _build(self, input_shape):
        p, q, c = self._window_geometry(input_shape)
        self._add_weight("kernel", self.kernel_size + (c, self.depth_multiplier), self.kernel_initializer)
        if self.use_bias:
            self._add_weight("bias", (c * self.depth_multiplier,), self.bias_initializer)
        return (p, q, c * self.depth_multiplier)

    def forward(self, x, training, ctx):
        fused, after = self._forward_activation(ctx)
        z = self._depthwise_forward(x, self.weights[1] if self.use_bias else None, fused, ctx, "y")
        y = self._activate(z, after, ctx)
        ctx["x"], ctx["y"] = x, y
        return y

    def backward(self, dy, ctx):
        dz = self._activation_grad(dy, ctx)
        return self._depthwise_backward(dz, ctx["x"], ctx, self.bias_grad(1, self.output_shape[2], ctx))

    def get_config(self):
        return {**super().get_config(), **self._window_config()}


class SeparableConv2D(_DepthwiseWindow):
    """A depthwise convolution (no bias) then a 1x1 convolution to ``filters`` channels, with bias and activation."""

    def __init__(self, filters, kernel_size, strides=(1, 1), padding="valid", data_format=None, dilation_rate=(1, 1),
                 depth_multiplier=1, activation=None, use_bias=True, depthwise_initializer="glorot_uniform",
                 pointwise_initializer="glorot_uniform", bias_initializer="zeros", **kwargs):
        super().__init__(**kwargs)
        self.filters = _positive_int(filters, "filters")
        self._window_options(kernel_size, strides, padding, depth_multiplier, data_format, dilation_rate)
        self._kernel_options(activation, use_bias, depthwise_initializer, bias_initializer)
        _initializer(pointwise_initializer)
        self.pointwise_initializer = pointwise_initializer

    def _build(self, input_shape):
        p, q, c = self._window_geometry(input_shape)
        middle = c * self.depth_multiplier
        self._add_weight("depthwise_kernel", self.kernel_size + (c, self.depth_multiplier), self.kernel_initializer)
        self._add_weight("pointwise_kernel", (1, 1, middle, self.filters), self.pointwise_initializer)
        if self.use_bias:
            self._add_weight("bias", (self.filters,), self.bias_initializer)
        return (p, q, self.filters)

    def forward(self, x, training, ctx):
        middle = self._depthwise_forward(x, None, None, ctx, "middle")
        fused, after = self._forward_activation(ctx)
        z = backend.ops().conv2d_forward(middle, self.weights[1], self.weights[2] if self.use_bias else None, (1, 1),
                                         _NO_PADDING, fused, ctx=ctx.setdefault("ops_pointwise", {}),
                                         out=self.buffer(ctx, "y", (x.shape[0],) + self.output_shape))
        y = self._activate(z, after, ctx)
        ctx["x"], ctx["middle"], ctx["y"] = x, middle, y
        return y

    def backward(self, dy, ctx):
        ops, middle = backend.ops(), ctx["middle"]
        dz = self._activation_grad(dy, ctx)
        op_ctx = ctx.setdefault("ops_pointwise", {})
        ops.conv2d_backward_filter(dz, middle, self.weights[1].shape, (1, 1), _NO_PADDING, ctx=op_ctx,
                                   out_w=self.weight_grad(1, ctx), out_b=self.bias_grad(2, self.filters, ctx))
        d_middle = ops.conv2d_backward_data(dz, self.weights[1], middle.shape, (1, 1), _NO_PADDING, ctx=op_ctx,
                                            out=self.buffer(ctx, "d_middle", middle.shape))
        return self._depthwise_backward(d_middle, ctx["x"], ctx,
                                        self.buffer(ctx, "db_depthwise", (middle.shape[-1],)))

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, **self._window_config(),
                "pointwise_initializer": initializers.serialize(self.pointwise_initializer)}
