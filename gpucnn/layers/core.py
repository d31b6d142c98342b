"""Core layers: ``Input``/``InputLayer``, ``Dense``, ``Activation``, ``Dropout``, ``Flatten``."""
import numpy as np

from .. import backend
from ..utils import next_name, plain_number
from .base import Layer, SeededGenerator, _activation, _positive_int, _shape_tuple
from .tensor import KerasTensor, Node


class InputLayer(Layer):
    """The layer behind ``keras.Input``: it declares the per-sample input shape and passes the batch on."""

    def __init__(self, shape=None, name=None, dtype=None, batch_size=None, batch_shape=None, input_shape=None,
                 sparse=False, ragged=False, optional=False):
        for key, value in (("sparse", sparse), ("ragged", ragged), ("optional", optional)):
            if value:  # (Keras's config holds them, False)
                raise NotImplementedError(f"Input({key}=True) is not supported by gpucnn: it takes dense arrays")
        if shape is None and batch_shape is not None:
            shape = tuple(batch_shape)[1:]
        if shape is None:
            shape = input_shape
        super().__init__(name=name or next_name("input_layer"))
        self.shape = _input_shape(shape)
        self.dtype = "float32" if dtype is None else str(np.dtype(dtype))
        self.input_shape = self.output_shape = self.shape
        self.built = True
        self._declared_input = self.shape
        tensor = KerasTensor(self.shape, self.dtype)
        self._inbound_nodes.append(Node(self, [], [tensor]))

    def forward(self, x, training, ctx):
        return x

    def backward(self, dy, ctx):
        return dy

    def get_config(self):
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


def _input_shape(shape):
    if shape is None:
        raise ValueError("Input needs shape=, the shape of one sample without the batch dimension, "
                         "e.g. keras.Input(shape=(28, 28, 1))")
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
        raise ValueError(f"Input(shape={shape}): shape must be a tuple, e.g. shape=({shape},) for vectors of "
                         f"{shape} values")
    if not isinstance(shape, (tuple, list)):
        raise ValueError(f"Input shape must be a tuple of ints such as (28, 28, 1), got {shape!r}")
    if any(d is None for d in shape):
        raise ValueError(f"Input(shape={tuple(shape)}): gpucnn does not support variable sizes (None) yet; "
                         "give every dimension, e.g. resize images to one size first")
    shape = _shape_tuple(shape, "Input shape")
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"Input shape must hold positive sizes, got {shape}")
    return shape


def Input(shape=None, batch_size=None, dtype=None, name=None, batch_shape=None):
    """``keras.Input(shape=(28, 28, 1))``: a symbolic tensor of shape ``(None, 28, 28, 1)`` to call layers on,
    and the first element of a functional model (or of a ``Sequential`` list)."""
    layer = InputLayer(shape, name=name, dtype=dtype, batch_size=batch_size, batch_shape=batch_shape)
    return layer.output


class Dense(Layer):
    """y = activation(x @ kernel + bias), kernel (in, units). On inputs of more axes, over the last one at every
    position (Keras's rule: (N, ..., in) → (N, ..., units)): the op sees the positions as rows."""

    def __init__(self, units, activation=None, use_bias=True, kernel_initializer="glorot_uniform",
                 bias_initializer="zeros", **kwargs):
        super().__init__(**kwargs)
        self.units = _positive_int(units, "units")
        self._kernel_options(activation, use_bias, kernel_initializer, bias_initializer)

    def _build(self, input_shape):
        if len(input_shape) < 1:
            raise ValueError(f"Dense {self.name!r} needs inputs with a features axis, got per-sample shape "
                             f"{tuple(input_shape)}")
        self._add_weight("kernel", (input_shape[-1], self.units), self.kernel_initializer)
        if self.use_bias:
            self._add_weight("bias", (self.units,), self.bias_initializer)
        return tuple(input_shape[:-1]) + (self.units,)

    def forward(self, x, training, ctx):
        fused, after = self._forward_activation(ctx)
        rows = x.reshape(-1, x.shape[-1])  # (N·positions, in): a view
        z = backend.ops().dense_forward(rows, self.weights[0], self.weights[1] if self.use_bias else None, fused,
                                        out=self.buffer(ctx, "y", (rows.shape[0], self.units)))
        y = self._activate(z, after, ctx)
        ctx["x"], ctx["y"] = rows, y
        return y.reshape(x.shape[:-1] + (self.units,))

    def backward(self, dy, ctx):
        ops, x = backend.ops(), ctx["x"]
        dz = self._activation_grad(dy.reshape(-1, self.units), ctx)
        ops.dense_backward_weights(dz, x, out_w=self.weight_grad(0, ctx), out_b=self.bias_grad(1, self.units, ctx))
        if not ctx.get("need_dx", True):
            return None
        dx = ops.dense_backward_data(dz, self.weights[0], out=self.buffer(ctx, "dx", x.shape))
        return dx.reshape(dy.shape[:-1] + (x.shape[1],))

    def get_config(self):
        return {**super().get_config(), "units": self.units, **self._kernel_config()}


class Activation(Layer):
    """Applies an activation by name ('relu', 'softmax', 'sigmoid', 'tanh', 'gelu', ... or 'linear')."""

    def __init__(self, activation, **kwargs):
        super().__init__(**kwargs)
        self.activation = _activation(activation)

    def forward(self, x, training, ctx):
        if ctx.get("skip_activation") or self.activation is None:
            ctx["y"] = x
            return x
        y = backend.ops().activation_forward(x, self.activation, out=self.buffer(ctx, "y", x.shape))
        ctx["x"], ctx["y"] = x, y
        return y

    def backward(self, dy, ctx):
        if ctx.get("skip_activation") or self.activation is None:
            return dy
        return backend.ops().activation_backward(dy, ctx["y"], self.activation,
                                                 out=self.buffer(ctx, "dx", dy.shape), x=ctx["x"])

    def get_config(self):
        return {**super().get_config(), "activation": self.activation}


class Dropout(SeededGenerator, Layer):
    """While training, zero each input with probability ``rate`` and scale the rest by 1/(1 - rate).

    Each training step draws one seed per Dropout layer (``next_seed``); the step hands the layer a table of
    seeds and a step counter (``ctx["step"]``), both engine arrays, so the same code runs eagerly and inside a
    captured CUDA graph (where the table holds a whole epoch's seeds and the counter advances on the device)."""

    def __init__(self, rate, seed=None, noise_shape=None, **kwargs):
        super().__init__(**kwargs)
        if noise_shape is not None:
            raise ValueError("Dropout(noise_shape=...) is not supported by gpucnn yet")
        rate = plain_number(rate)
        if isinstance(rate, bool) or not isinstance(rate, (int, float, np.integer, np.floating)) \
                or not 0 <= float(rate) < 1:
            raise ValueError(f"Dropout rate must be a number in [0, 1), got {rate!r}")
        self.rate = float(rate)
        self._seed_generator(seed)

    def next_seed(self):
        """The seed of the next training step's mask: from gpucnn's generator, or, when the layer was
        given a seed, from its own generator started at that seed (a new mask each step, as Keras)."""
        return int(self.generator().integers(2**63))

    @property
    def draws_randomness(self):
        return self.rate > 0

    def forward(self, x, training, ctx):
        if not training or self.rate == 0:
            ctx["mask"] = None
            return x
        ops = backend.ops()
        step = ctx.get("step")
        if step is None:  # an eager call outside a training step: a one-step table of its own
            seeds, counter, slot = ops.xp.asarray([[self.next_seed()]], np.uint64), ops.xp.zeros(1, np.int32), 0
        else:
            seeds, counter, slot = step.seeds, step.counter, step.slot(self)
        y, mask = ops.dropout_forward(x, self.rate, seeds, counter, slot, out=self.buffer(ctx, "y", x.shape),
                                      out_mask=self.buffer(ctx, "mask", x.shape),
                                      offset=0 if step is None else step.offset)
        ctx["mask"] = mask
        return y

    def backward(self, dy, ctx):
        if ctx.get("mask") is None:
            return dy
        return backend.ops().dropout_backward(dy, ctx["mask"], out=self.buffer(ctx, "dx", dy.shape))

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}


class Flatten(Layer):
    """(N, H, W, C) → (N, H·W·C), channels fastest (Keras's order, so Dense weights carry over)."""

    def _build(self, input_shape):
        return (int(np.prod(input_shape)),)

    def forward(self, x, training, ctx):
        return x.reshape(x.shape[0], -1)

    def backward(self, dy, ctx):
        return dy.reshape((dy.shape[0],) + tuple(self.input_shape))
