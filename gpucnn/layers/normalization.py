"""``BatchNormalization``, Keras 3's, over the last axis (the channels of (N, H, W, C) images, the features of
(N, F) vectors).

    y = (x − mean) / sqrt(var + epsilon) · gamma + beta, per channel

In training (``fit``) the mean and variance are the batch's (the biased variance, over every axis but the
last), and the moving statistics move towards them, in place:
``moving = moving · momentum + batch · (1 − momentum)``. Otherwise (``predict``, ``evaluate``, a call on an
array) the moving statistics are used. A layer with ``trainable = False`` runs in inference mode even in
``fit`` (Keras 3's rule for fine-tuning): its moving statistics stay as they are and its gamma and beta are not
trained. Keras reads ``trainable`` at each call, and so does this layer.

The weights, in Keras's order: gamma (``scale``), beta (``center``), moving_mean, moving_variance — the last two
not trained by the optimizer (``summary`` counts them as non-trainable parameters). The maths is the engine's
``batchnorm_*`` ops (fixed-order reductions on the GPU). In the NumPy engine's two-process step each process holds
half of the batch: the halves exchange their per-channel sums (``StepValues.exchange``), so both normalize with
the whole batch's statistics.
"""
import math
import numbers

from .. import backend, initializers
from ..utils import plain_number
from .base import Layer, _initializer
from .convolutional import Conv2D


def _finite(value, what):
    value = plain_number(value)  # (optimizer.learning_rate: the number it is now)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"BatchNormalization: {what} must be a finite number, got {value!r}")
    return float(value)


def _exchange(ctx):
    """The exchange of per-channel sums with the rest of the batch when this call sees a part of it (the NumPy
    engine's two-process step: ``StepValues.exchange``), else None."""
    step = ctx.get("step")
    return None if step is None else step.exchange


class BatchNormalization(Layer):
    """Normalizes each channel with the batch's statistics in training, the moving ones in inference."""

    def __init__(self, axis=-1, momentum=0.99, epsilon=1e-3, center=True, scale=True, beta_initializer="zeros",
                 gamma_initializer="ones", moving_mean_initializer="zeros", moving_variance_initializer="ones",
                 beta_regularizer=None, gamma_regularizer=None, beta_constraint=None, gamma_constraint=None,
                 synchronized=False, renorm=False, **kwargs):
        super().__init__(**kwargs)
        unsupported = {"beta_regularizer": beta_regularizer, "gamma_regularizer": gamma_regularizer,
                       "beta_constraint": beta_constraint, "gamma_constraint": gamma_constraint,
                       "synchronized": synchronized or None, "renorm": renorm or None}
        given = [f"{k}={v!r}" for k, v in unsupported.items() if v is not None]
        if given:
            raise ValueError(f"BatchNormalization: gpucnn does not support {', '.join(given)} (yet); leave "
                             "them at their defaults")
        if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
            raise ValueError(f"BatchNormalization: axis must be an int (gpucnn supports -1, the last axis), "
                             f"got {axis!r}")
        self.axis = int(axis)
        self.momentum = _finite(momentum, "momentum")
        if not 0 <= self.momentum <= 1:
            raise ValueError(f"BatchNormalization: momentum must be in [0, 1] (the share of the moving statistics "
                             f"kept at each step; Keras: 0.99), got {momentum!r}")
        self.epsilon = _finite(epsilon, "epsilon")
        if not self.epsilon > 0:
            raise ValueError(f"BatchNormalization: epsilon must be > 0 (it keeps a channel of constant values, "
                             f"e.g. a batch of one, from dividing by zero; Keras: 1e-3), got {epsilon!r}")
        self.center, self.scale = bool(center), bool(scale)
        self.initializers = {"gamma": gamma_initializer, "beta": beta_initializer,
                             "moving_mean": moving_mean_initializer, "moving_variance": moving_variance_initializer}
        for name in self.initializers.values():
            _initializer(name)  # unknown names fail here

    def _build(self, input_shape):
        if not input_shape:
            raise ValueError(f"BatchNormalization {self.name!r} needs inputs with a channel axis, got per-sample "
                             f"shape {tuple(input_shape)}")
        if self.axis not in (-1, len(input_shape)):
            raise ValueError(
                f"BatchNormalization {self.name!r}: gpucnn normalizes the last axis only (axis=-1, the channels of "
                f"channels-last images), got axis={self.axis} for inputs of shape {(None,) + tuple(input_shape)}")
        channels = input_shape[-1]
        names = (["gamma"] if self.scale else []) + (["beta"] if self.center else []) + \
            ["moving_mean", "moving_variance"]
        for name in names:
            self._add_weight(name, (channels,), self.initializers[name], trainable=not name.startswith("moving"))
        self._index = {name: i for i, name in enumerate(names)}
        return input_shape

    def _check_weight_values(self, name, value):
        if name == "moving_variance" and value.min(initial=0) < 0:
            raise ValueError(f"layer {self.name!r}: moving_variance must be >= 0 (it is a variance), got "
                             f"{value.min():g}")

    def _weight(self, name):
        i = self._index.get(name)
        return None if i is None else self.weights[i]

    def forward(self, x, training, ctx):
        ops, c = backend.ops(), x.shape[-1]
        batch_stats = bool(training) and self.trainable
        gamma, beta = self._weight("gamma"), self._weight("beta")
        moving_mean, moving_var = self._weight("moving_mean"), self._weight("moving_variance")
        out, out_inv_std = self.buffer(ctx, "y", x.shape), self.buffer(ctx, "inv_std", (c,))
        if batch_stats:
            y, mean, inv_std = ops.batchnorm_forward_training(
                x, gamma, beta, moving_mean, moving_var, self.momentum, self.epsilon, ctx=ctx.setdefault("ops", {}),
                out=out, out_mean=self.buffer(ctx, "mean", (c,)), out_inv_std=out_inv_std,
                exchange=_exchange(ctx))
        else:
            y, inv_std = ops.batchnorm_forward_inference(x, gamma, beta, moving_mean, moving_var, self.epsilon,
                                                         out=out, out_inv_std=out_inv_std)
            mean = moving_mean  # not updated in this mode: backward reads the values forward used
        ctx.update(x=x, mean=mean, inv_std=inv_std, batch_stats=batch_stats)
        return y

    def _grad_out(self, name, ctx):
        """Where the gradient of gamma or beta goes: its gradient array, or a kept scratch buffer when the layer has
        no such weight (the op always writes both)."""
        i = self._index.get(name)
        return self.weight_grad(i, ctx) if i is not None else self.buffer(ctx, ("d", name), (self.input_shape[-1],))

    def backward(self, dy, ctx):
        x = ctx["x"]
        dx, _, _ = backend.ops().batchnorm_backward(
            dy, x, self._weight("gamma"), ctx["mean"], ctx["inv_std"], ctx["batch_stats"],
            ctx=ctx.setdefault("ops", {}), out=self.buffer(ctx, "dx", x.shape),
            out_gamma=self._grad_out("gamma", ctx), out_beta=self._grad_out("beta", ctx),
            exchange=_exchange(ctx) if ctx["batch_stats"] else None)
        return dx if ctx.get("need_dx", True) else None

    def get_config(self):
        return {**super().get_config(), "axis": self.axis, "momentum": self.momentum, "epsilon": self.epsilon,
                "center": self.center, "scale": self.scale,
                **{f"{name}_initializer": initializers.serialize(init) for name, init in self.initializers.items()}}


def fusable_bn(conv, bn):
    """Whether inference (``predict``, ``evaluate``) runs Conv2D ``conv`` and ``bn``, the BatchNormalization after it,
    as one convolution with the normalization folded into its kernel and bias (``ConvBN``): a convolution without
    an activation (the normalization must see its raw output), both of gpucnn's own classes (a subclass's own
    forward must run)."""
    return type(conv) is Conv2D and type(bn) is BatchNormalization and conv.activation in (None, "linear")


class ConvBN:
    """Inference's step for a Conv2D and the BatchNormalization after it (``fusable_bn``): in inference the
    normalization is an affine map per channel with the moving statistics, so it folds into the convolution
    (``ops.batchnorm_fold``: w·s, (b − moving_mean)·s + beta, s = gamma / sqrt(moving_var + epsilon)) and the
    convolution's output is never stored and normalized in a second pass. The same numbers up to float32
    rounding; training keeps the two layers (the batch's statistics are not known before the convolution)."""

    def __init__(self, conv, bn):
        self.conv, self.bn = conv, bn

    def forward(self, x, training, conv_ctx, bn_ctx):
        conv, bn = self.conv, self.bn
        ops, kernel = backend.ops(), conv.weights[0]
        w, b = ops.batchnorm_fold(kernel, conv.weights[1] if conv.use_bias else None, bn._weight("gamma"),
                                  bn._weight("beta"), bn._weight("moving_mean"), bn._weight("moving_variance"),
                                  bn.epsilon, out_w=conv.buffer(conv_ctx, "folded_w", kernel.shape),
                                  out_b=conv.buffer(conv_ctx, "folded_b", (conv.filters,)))
        return ops.conv2d_forward(x, w, b, conv.strides, conv.pads, None, ctx=conv_ctx.setdefault("ops", {}),
                                  out=bn.buffer(bn_ctx, "y", (x.shape[0],) + tuple(bn.output_shape)))
