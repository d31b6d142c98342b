"""Keras-style layers, channels-last. Each layer's maths is the engine's op (``backend.ops()``).

A layer knows its configuration, builds its weights once it knows its input shape, and has
``forward(x, training)`` / ``backward(dy)``; a forward keeps what its backward needs. Weight layouts are
Keras's: a Conv2D kernel is ``(kh, kw, in_channels, filters)``, a Dense kernel ``(in, units)``.
"""
import math
import re

import numpy as np

from . import backend
from .engines.numpy_ops import MAX_POOL_TAPS
from .utils import next_name, rng, set_generator_state

ACTIVATIONS = (None, "relu", "softmax", "linear")


# ===================================================================================== helpers
def _pair(value, what):
    """An int or a pair of ints → a pair of positive ints."""
    if isinstance(value, (int, np.integer)):
        value = (int(value), int(value))
    try:
        a, b = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be an int or a pair of ints, got {value!r}") from None
    if a < 1 or b < 1:
        raise ValueError(f"{what} must be positive, got {value!r}")
    return a, b


def _padding_mode(padding):
    mode = str(padding).lower()
    if mode not in ("valid", "same"):
        raise ValueError(f"padding must be 'valid' or 'same', got {padding!r}")
    return mode


def _activation(name):
    if callable(name) and not isinstance(name, str):
        raise ValueError("activations are given by name: 'relu', 'softmax' or None")
    key = None if name is None else str(name).lower()
    if key not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; gpucnn knows 'relu', 'softmax', 'linear' and None")
    return None if key == "linear" else key


def window_geometry(size, k, stride, mode):
    """Keras's output length and (lo, hi) padding for a window k at stride over size.

    "valid": floor((size - k) / stride) + 1, no padding. "same": ceil(size / stride), padded so the
    windows cover it; an odd total pad puts the extra row/column at the bottom/right (as Keras/TF).
    """
    if mode == "valid":
        return (size - k) // stride + 1, (0, 0)
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    return out, (total // 2, total - total // 2)


def _initializer(name):
    key = str(name).lower()
    if key not in INITIALIZERS:
        raise ValueError(f"unknown initializer {name!r}; known: {sorted(INITIALIZERS)}")
    return INITIALIZERS[key]


def _fans(shape):
    if len(shape) == 2:
        return shape[0], shape[1]
    receptive = int(np.prod(shape[:-2]))
    return shape[-2] * receptive, shape[-1] * receptive


INITIALIZERS = {
    "glorot_uniform": lambda s: rng().uniform(-1, 1, s) * math.sqrt(6.0 / sum(_fans(s))),
    "glorot_normal": lambda s: rng().normal(0, math.sqrt(2.0 / sum(_fans(s))), s),
    "he_uniform": lambda s: rng().uniform(-1, 1, s) * math.sqrt(6.0 / _fans(s)[0]),
    "he_normal": lambda s: rng().normal(0, math.sqrt(2.0 / _fans(s)[0]), s),
    "zeros": np.zeros,
    "ones": np.ones,
}


# ===================================================================================== base class
class Layer:
    """Base class: name, build, weights (``get_weights``/``set_weights``), forward/backward."""

    def __init__(self, name=None, input_shape=None):
        self.name = name or next_name(_snake(type(self).__name__))
        self.input_shape = None  # per-sample shape, set by build
        self.output_shape = None
        self._declared_input = tuple(input_shape) if input_shape is not None else None
        self.built = False
        self.weights = []  # engine arrays, in Keras's order (kernel, bias)
        self.grads = []  # same shapes; written by backward
        self.weight_names = []

    # ---- building
    def build(self, input_shape):
        """Check the per-sample input shape, compute the output shape and create the weights (once: a
        built layer keeps its weights, and refuses an input of another shape)."""
        shape = tuple(int(d) for d in input_shape)
        if self.built:
            if shape != self.input_shape:
                raise ValueError(f"layer {self.name!r} was built for inputs {self.input_shape} and cannot "
                                 f"take {shape}; create a new layer for the new shape")
            return self.output_shape
        output_shape = self._build(shape)
        self.input_shape, self.output_shape, self.built = shape, output_shape, True
        return output_shape

    def _build(self, input_shape):
        return input_shape

    def _unbuild(self):
        """Forget a build (the model's build failed further down and will be retried)."""
        self.input_shape = self.output_shape = None
        self.weights, self.grads, self.weight_names = [], [], []
        self.built = False

    def _add_weight(self, name, shape, initializer):
        xp = backend.ops().xp
        value = np.asarray(_initializer(initializer)(shape), dtype=np.float32)
        self.weight_names.append(name)
        self.weights.append(xp.asarray(value))
        self.grads.append(xp.zeros(shape, dtype=np.float32))

    @property
    def trainable(self):
        """Every gpucnn layer trains: freezing layers is not supported yet."""
        return True

    @trainable.setter
    def trainable(self, value):
        if not value:
            raise NotImplementedError("freezing layers (trainable=False) is not supported by gpucnn yet")

    def count_params(self):
        return int(sum(int(np.prod(w.shape)) for w in self.weights))

    # ---- weights in and out, in Keras's layouts and order
    def get_weights(self):
        """Copies of the weights as NumPy float32 arrays (kernel first, then bias)."""
        return [np.array(backend.to_numpy(w), dtype=np.float32) for w in self.weights]

    def set_weights(self, weights):
        """Set the weights from arrays of exactly the shapes ``get_weights`` returns."""
        weights = list(weights)
        if len(weights) != len(self.weights):
            raise ValueError(f"layer {self.name!r} has {len(self.weights)} weight arrays "
                             f"({', '.join(self.weight_names) or 'none'}), got {len(weights)}")
        for current, name, new in zip(self.weights, self.weight_names, weights):
            new = np.asarray(new)
            if new.shape != tuple(current.shape):
                raise ValueError(f"layer {self.name!r}: {name} must have shape {tuple(current.shape)}, "
                                 f"got {new.shape}")
            if not np.all(np.isfinite(new)):
                raise ValueError(f"layer {self.name!r}: {name} contains NaN or infinity")
            current[...] = backend.ops().xp.asarray(new.astype(np.float32))  # in place: views stay valid

    # ---- computing
    def __call__(self, x, training=False):
        """Run the layer forward on a batch (builds it first if needed); returns an engine array."""
        x = backend.ops().xp.asarray(x, dtype=np.float32)
        if not self.built:
            self.build(x.shape[1:])
        return self.forward(x, training)

    def forward(self, x, training):
        """Outputs for a batch; keeps what ``backward`` needs."""
        raise NotImplementedError

    def backward(self, dy):
        """The input gradient for output gradient ``dy`` (and the weight gradients into ``grads``).
        The returned array may be a work array of the engine, valid until this layer's next backward."""
        raise NotImplementedError

    def get_config(self):
        return {"name": self.name}

    def __repr__(self):
        return f"<{type(self).__name__} name={self.name!r}>"


def _snake(class_name):
    """Keras's default-name rule: ``MaxPooling2D`` → ``max_pooling2d``, ``Conv2D`` → ``conv2d``."""
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", class_name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


def _check_image_input(layer, input_shape):
    if len(input_shape) != 3:
        raise ValueError(
            f"{type(layer).__name__} {layer.name!r} expects images of shape (height, width, channels), "
            f"got per-sample shape {tuple(input_shape)}"
            + (". Grayscale images need a channel axis: reshape to (height, width, 1)."
               if len(input_shape) == 2 else ""))


# ===================================================================================== layers
class InputLayer(Layer):
    """Declares the per-sample input shape of a Sequential model (``layers.Input(shape=...)``)."""

    def __init__(self, shape, name=None):
        super().__init__(name=name or next_name("input_layer"), input_shape=shape)
        self.shape = tuple(int(d) for d in shape)

    def forward(self, x, training):
        return x

    def backward(self, dy):
        return dy

    def get_config(self):
        return {"name": self.name, "shape": list(self.shape)}


def Input(shape, name=None):
    """``layers.Input(shape=(28, 28, 1))``: the first element of a Sequential model."""
    return InputLayer(shape, name=name)


class Conv2D(Layer):
    """2-D convolution over (N, H, W, C) images, with bias and activation fused."""

    def __init__(self, filters, kernel_size, strides=(1, 1), padding="valid", activation=None,
                 use_bias=True, kernel_initializer="glorot_uniform", bias_initializer="zeros",
                 name=None, input_shape=None):
        super().__init__(name=name, input_shape=input_shape)
        if int(filters) < 1:
            raise ValueError(f"filters must be a positive int, got {filters!r}")
        self.filters = int(filters)
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.strides = _pair(strides, "strides")
        self.padding = _padding_mode(padding)
        self.activation = _activation(activation)
        self.use_bias = bool(use_bias)
        _initializer(kernel_initializer), _initializer(bias_initializer)  # unknown names fail here
        self.kernel_initializer, self.bias_initializer = kernel_initializer, bias_initializer
        self.needs_input_grad = True  # the model turns this off for the first layer
        self.ctx = {}  # what the engine keeps between this layer's forward and backward

    def _build(self, input_shape):
        _check_image_input(self, input_shape)
        h, w, c = input_shape
        kh, kw = self.kernel_size
        if self.padding == "valid" and (kh > h or kw > w):
            raise ValueError(
                f"Conv2D {self.name!r}: its {kh}x{kw} kernel is larger than its {h}x{w} input. "
                "Use padding='same', a smaller kernel_size, or fewer pooling layers before it.")
        p, (top, bottom) = window_geometry(h, kh, self.strides[0], self.padding)
        q, (left, right) = window_geometry(w, kw, self.strides[1], self.padding)
        self.pads = (top, bottom, left, right)
        self._add_weight("kernel", (kh, kw, c, self.filters), self.kernel_initializer)
        if self.use_bias:
            self._add_weight("bias", (self.filters,), self.bias_initializer)
        return (p, q, self.filters)

    def forward(self, x, training):
        self.x = x
        bias = self.weights[1] if self.use_bias else None
        self.y = backend.ops().conv2d_forward(x, self.weights[0], bias, self.strides, self.pads,
                                              self.activation, ctx=self.ctx)
        return self.y

    def backward(self, dy, through_activation=True):
        ops = backend.ops()
        dz = ops.activation_backward(dy, self.y, self.activation) if through_activation else dy
        ops.conv2d_backward_filter(dz, self.x, self.weights[0].shape, self.strides, self.pads,
                                   ctx=self.ctx, out_w=self.grads[0],
                                   out_b=self.grads[1] if self.use_bias else None)
        if not self.needs_input_grad:
            return None
        return ops.conv2d_backward_data(dz, self.weights[0], self.x.shape, self.strides, self.pads,
                                        ctx=self.ctx)

    def get_config(self):
        return {"name": self.name, "filters": self.filters, "kernel_size": list(self.kernel_size),
                "strides": list(self.strides), "padding": self.padding,
                "activation": self.activation, "use_bias": self.use_bias}


class _Pooling2D(Layer):
    def __init__(self, pool_size=(2, 2), strides=None, padding="valid", name=None, input_shape=None):
        super().__init__(name=name, input_shape=input_shape)
        self.pool_size = _pair(pool_size, "pool_size")
        self.strides = self.pool_size if strides is None else _pair(strides, "strides")
        self.padding = _padding_mode(padding)

    def _build(self, input_shape):
        _check_image_input(self, input_shape)
        h, w, c = input_shape
        ph, pw = self.pool_size
        if self.padding == "valid" and (ph > h or pw > w):
            raise ValueError(
                f"{type(self).__name__} {self.name!r}: its {ph}x{pw} window is larger than its {h}x{w} "
                "input. Use a smaller pool_size, padding='same', or fewer layers that shrink the image.")
        p, (top, bottom) = window_geometry(h, ph, self.strides[0], self.padding)
        q, (left, right) = window_geometry(w, pw, self.strides[1], self.padding)
        self.pads = (top, bottom, left, right)
        return (p, q, c)

    def get_config(self):
        return {"name": self.name, "pool_size": list(self.pool_size), "strides": list(self.strides),
                "padding": self.padding}


class MaxPooling2D(_Pooling2D):
    """Max over each window; the gradient goes to the window's first maximum (scan order)."""

    def _build(self, input_shape):
        if self.pool_size[0] * self.pool_size[1] > MAX_POOL_TAPS:
            raise ValueError(f"MaxPooling2D {self.name!r}: pool_size {self.pool_size} has more than {MAX_POOL_TAPS} "
                             "cells, which gpucnn does not support; use a smaller window or stack poolings")
        return super()._build(input_shape)

    def forward(self, x, training):
        self.x_shape = x.shape
        self.y, self.idx = backend.ops().maxpool2d_forward(x, self.pool_size, self.strides, self.pads)
        return self.y

    def backward(self, dy):
        return backend.ops().maxpool2d_backward(dy, self.idx, self.x_shape, self.pool_size,
                                                self.strides, self.pads)


class AveragePooling2D(_Pooling2D):
    """Mean over each window ("same" padding is left out of the mean, as in Keras)."""

    def forward(self, x, training):
        self.x_shape = x.shape
        return backend.ops().avgpool2d_forward(x, self.pool_size, self.strides, self.pads)

    def backward(self, dy):
        return backend.ops().avgpool2d_backward(dy, self.x_shape, self.pool_size, self.strides,
                                                self.pads)


class GlobalAveragePooling2D(Layer):
    """(N, H, W, C) → (N, C): the mean of each channel."""

    def _build(self, input_shape):
        _check_image_input(self, input_shape)
        return (input_shape[2],)

    def forward(self, x, training):
        self.x_shape = x.shape
        return backend.ops().global_avgpool2d_forward(x)

    def backward(self, dy):
        return backend.ops().global_avgpool2d_backward(dy, self.x_shape)


class Flatten(Layer):
    """(N, H, W, C) → (N, H·W·C), channels fastest (Keras's order, so Dense weights carry over)."""

    def _build(self, input_shape):
        return (int(np.prod(input_shape)),)

    def forward(self, x, training):
        self.x_shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dy):
        return dy.reshape(self.x_shape)


class Dense(Layer):
    """y = activation(x @ kernel + bias), kernel (in, units)."""

    def __init__(self, units, activation=None, use_bias=True, kernel_initializer="glorot_uniform",
                 bias_initializer="zeros", name=None, input_shape=None):
        super().__init__(name=name, input_shape=input_shape)
        if int(units) < 1:
            raise ValueError(f"units must be a positive int, got {units!r}")
        self.units = int(units)
        self.activation = _activation(activation)
        self.use_bias = bool(use_bias)
        _initializer(kernel_initializer), _initializer(bias_initializer)  # unknown names fail here
        self.kernel_initializer, self.bias_initializer = kernel_initializer, bias_initializer
        self.needs_input_grad = True

    def _build(self, input_shape):
        if len(input_shape) != 1:
            raise ValueError(f"Dense {self.name!r} expects flat inputs (features,), got per-sample "
                             f"shape {tuple(input_shape)}; put a Flatten() layer before it")
        self._add_weight("kernel", (input_shape[0], self.units), self.kernel_initializer)
        if self.use_bias:
            self._add_weight("bias", (self.units,), self.bias_initializer)
        return (self.units,)

    def forward(self, x, training):
        self.x = x
        bias = self.weights[1] if self.use_bias else None
        self.y = backend.ops().dense_forward(x, self.weights[0], bias, self.activation)
        return self.y

    def backward(self, dy, through_activation=True):
        ops = backend.ops()
        dz = ops.activation_backward(dy, self.y, self.activation) if through_activation else dy
        ops.dense_backward_weights(dz, self.x, out_w=self.grads[0],
                                   out_b=self.grads[1] if self.use_bias else None)
        if not self.needs_input_grad:
            return None
        return ops.dense_backward_data(dz, self.weights[0])

    def get_config(self):
        return {"name": self.name, "units": self.units, "activation": self.activation,
                "use_bias": self.use_bias}


class Activation(Layer):
    """Applies an activation by name ('relu', 'softmax', 'linear')."""

    def __init__(self, activation, name=None, input_shape=None):
        super().__init__(name=name, input_shape=input_shape)
        self.activation = _activation(activation)

    def forward(self, x, training):
        self.y = backend.ops().activation_forward(x, self.activation)
        return self.y

    def backward(self, dy, through_activation=True):
        if not through_activation:
            return dy
        return backend.ops().activation_backward(dy, self.y, self.activation)

    def get_config(self):
        return {"name": self.name, "activation": self.activation}


class Dropout(Layer):
    """While training, zero each input with probability ``rate`` and scale the rest by 1/(1 - rate)."""

    def __init__(self, rate, seed=None, name=None, input_shape=None):
        super().__init__(name=name, input_shape=input_shape)
        if not 0 <= float(rate) < 1:
            raise ValueError(f"Dropout rate must be in [0, 1), got {rate!r}")
        self.rate = float(rate)
        self.seed = seed
        self._seed_rng = None if seed is None else np.random.default_rng(seed)

    def next_seed(self):
        """The seed of the next training step's mask: from gpucnn's generator, or, when the layer was
        given a seed, from its own generator started at that seed (a new mask each step, as Keras)."""
        return int((self._seed_rng or rng()).integers(2**63))

    def random_state(self):
        """The state of the layer's own generator (a JSON-able dict), or None when it has none (no seed: its
        masks come from gpucnn's generator). Saved with the model, so a resumed run draws the same masks."""
        return None if self._seed_rng is None else self._seed_rng.bit_generator.state

    def set_random_state(self, state):
        """Set the layer's own generator to a state ``random_state()`` returned (ValueError if it is not one)."""
        if (state is None) != (self._seed_rng is None):
            raise ValueError(f"Dropout {self.name!r} {'has a seed' if self._seed_rng else 'has no seed'}; the "
                             f"random state {str(state)[:100]} does not fit it")
        if state is not None:
            set_generator_state(self._seed_rng, state)

    def forward(self, x, training):
        if not training or self.rate == 0:
            self.mask = None
            return x
        y, self.mask = backend.ops().dropout_forward(x, self.rate, self.next_seed())
        return y

    def backward(self, dy):
        return dy if self.mask is None else backend.ops().dropout_backward(dy, self.mask)

    def get_config(self):
        return {"name": self.name, "rate": self.rate, "seed": self.seed}


def fusable_pool(conv, pool):
    """Whether training runs Conv2D ``conv`` and ``pool``, the layer after it, as one op
    (``ops.conv2d_maxpool_forward``): a MaxPooling2D of 2x2 windows at stride 2, "valid", after a relu or
    linear convolution."""
    return (isinstance(conv, Conv2D) and type(pool) is MaxPooling2D and conv.activation in (None, "relu")
            and pool.pool_size == (2, 2) and pool.strides == (2, 2) and pool.padding == "valid")


class ConvPool:
    """Training's step for a Conv2D and the MaxPooling2D after it (``fusable_pool``): one op forward and one
    backward, through the layers' own weights, gradients and state. The convolution's full output is not
    kept (``conv.y`` is None); the pool keeps its output and window indices as it does alone."""

    def __init__(self, conv, pool):
        self.conv, self.pool = conv, pool

    def forward(self, x, training):
        conv, pool = self.conv, self.pool
        conv.x, conv.y = x, None
        pool.x_shape = (x.shape[0],) + conv.output_shape
        bias = conv.weights[1] if conv.use_bias else None
        pool.y, pool.idx = backend.ops().conv2d_maxpool_forward(x, conv.weights[0], bias, conv.strides,
                                                                conv.pads, conv.activation, ctx=conv.ctx)
        return pool.y

    def backward(self, dy):
        conv, pool = self.conv, self.pool
        return backend.ops().conv2d_maxpool_backward(
            dy, pool.y, pool.idx, conv.x, conv.weights[0], conv.strides, conv.pads, conv.activation,
            ctx=conv.ctx, out_w=conv.grads[0], out_b=conv.grads[1] if conv.use_bias else None,
            need_dx=conv.needs_input_grad)


# Layer classes by name: what a saved model may name (nothing else is ever constructed from a file).
LAYER_CLASSES = {cls.__name__: cls for cls in (
    InputLayer, Conv2D, MaxPooling2D, AveragePooling2D, GlobalAveragePooling2D, Flatten, Dense,
    Activation, Dropout)}
