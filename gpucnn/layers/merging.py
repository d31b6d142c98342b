"""Merging layers: ``Add`` (residual connections) and ``Concatenate`` (Inception-style branches). Each takes a
list of tensors of one batch and returns one; its backward returns one gradient per input."""
from .. import backend
from .base import Layer


class Add(Layer):
    """The elementwise sum of two or more tensors of the same shape."""

    multi_input = True

    def _build(self, input_shapes):
        if len(input_shapes) < 2:
            raise ValueError(f"Add {self.name!r} needs at least 2 inputs, got {len(input_shapes)}")
        if any(s != input_shapes[0] for s in input_shapes):
            raise ValueError(f"Add {self.name!r}: every input must have the same shape, got "
                             f"{', '.join(str((None,) + s) for s in input_shapes)}")
        return input_shapes[0]

    def forward(self, xs, training, ctx):
        ops = backend.ops()
        y = ops.add(xs[0], xs[1], out=self.buffer(ctx, "y", xs[0].shape))
        for x in xs[2:]:
            y = ops.add(y, x, out=y)
        return y

    def backward(self, dy, ctx):
        return [dy] * len(self.input_shape)  # each input gets the whole gradient (nothing writes to it)


class Concatenate(Layer):
    """Joins tensors along ``axis`` (default -1, the channels); the other dimensions must match."""

    multi_input = True

    def __init__(self, axis=-1, **kwargs):
        super().__init__(**kwargs)
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise ValueError(f"Concatenate axis must be an int, got {axis!r}")
        self.axis = axis

    def _batch_axis(self, rank):
        """The axis in the full (batch, ...) array, checked: never the batch axis."""
        axis = self.axis + rank if self.axis < 0 else self.axis
        if not 1 <= axis < rank:
            raise ValueError(f"Concatenate {self.name!r}: axis={self.axis} is not a non-batch axis of inputs with "
                             f"{rank} dimensions (batch included); use 1..{rank - 1} or -1..-{rank - 1}")
        return axis

    def _build(self, input_shapes):
        if len(input_shapes) < 2:
            raise ValueError(f"Concatenate {self.name!r} needs at least 2 inputs, got {len(input_shapes)}")
        rank = len(input_shapes[0]) + 1
        if any(len(s) + 1 != rank for s in input_shapes):
            raise ValueError(f"Concatenate {self.name!r}: inputs of different ranks "
                             f"{', '.join(str((None,) + s) for s in input_shapes)}")
        axis = self._batch_axis(rank) - 1
        for s in input_shapes:
            if s[:axis] + s[axis + 1:] != input_shapes[0][:axis] + input_shapes[0][axis + 1:]:
                raise ValueError(f"Concatenate {self.name!r} along axis {self.axis}: the inputs must match in every "
                                 f"other dimension, got {', '.join(str((None,) + s) for s in input_shapes)}")
        out = list(input_shapes[0])
        out[axis] = sum(s[axis] for s in input_shapes)
        self.sizes = [s[axis] for s in input_shapes]
        return tuple(out)

    def forward(self, xs, training, ctx):
        axis = self._batch_axis(xs[0].ndim)
        return backend.ops().concat(xs, axis, out=self.buffer(ctx, "y", (xs[0].shape[0],) + self.output_shape))

    def backward(self, dy, ctx):
        axis = self._batch_axis(dy.ndim)
        outs = None
        if backend.ops().OUT_BUFFERS:
            outs = [self.buffer(ctx, ("dx", i), (dy.shape[0],) + s) for i, s in enumerate(self.input_shape)]
        return backend.ops().split(dy, self.sizes, axis, outs=outs)

    def get_config(self):
        return {**super().get_config(), "axis": self.axis}


def add(inputs, **kwargs):
    """``Add(**kwargs)(inputs)``: Keras's functional form, ``layers.add([x, residual])``."""
    return Add(**kwargs)(inputs)


def concatenate(inputs, axis=-1, **kwargs):
    """``Concatenate(axis, **kwargs)(inputs)``: Keras's functional form."""
    return Concatenate(axis=axis, **kwargs)(inputs)
