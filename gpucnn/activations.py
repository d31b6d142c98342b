"""Keras's activation functions by name: ``keras.activations.relu`` etc. Each can be given as a layer's
``activation=`` (the layer then runs that activation on the engine) or called on an array (the NumPy engine's
result, as a NumPy array). ``get(name)`` returns one; an unknown name lists the known ones."""
import numpy as np

from .engines import numpy_ops
from .utils import missing


class Activation:
    """A named activation function (``activation_name``: what layers and the ops take). Called on an array it
    takes Keras's keyword arguments for that function (``options``: their names and defaults)."""

    def __init__(self, name, **options):
        self.activation_name = self.__name__ = name
        self.options = options

    def __call__(self, x, *args, **options):
        takes = ", ".join(f"{k}={v!r}" for k, v in self.options.items()) or "no other arguments"
        unknown = sorted(set(options) - set(self.options))
        if unknown or len(args) > len(self.options):
            raise TypeError(f"activations.{self.__name__}() got unexpected argument(s) "
                            f"{unknown or list(args)}; it takes x, {takes}")
        given = dict(zip(self.options, args))
        twice = sorted(set(given) & set(options))
        if twice:
            raise TypeError(f"activations.{self.__name__}() got {twice} twice")
        x = np.asarray(x, np.float32)
        options = {**self.options, **given, **options}
        name = self.activation_name
        if name == "linear":
            return x.copy()
        if name == "relu" and options != self.options:
            return _relu(x, **options)
        if name == "softmax" and options["axis"] not in (-1, x.ndim - 1):
            return np.moveaxis(numpy_ops.activation_forward(np.moveaxis(x, options["axis"], -1), "softmax"), -1,
                               options["axis"])
        if name in ("leaky_relu", "elu") and options != self.options:  # any number, as Keras's functions (the
            return numpy_ops._forward(name, next(iter(options.values())), x)  # layers' check asks for >= 0)
        spec = (name, options["approximate"]) if name == "gelu" else name
        return numpy_ops.activation_forward(x, spec)

    def __repr__(self):
        return f"<gpucnn activation {self.activation_name}>"


def _relu(x, negative_slope, max_value, threshold):
    """Keras's relu with its options: x above ``threshold`` (else 0), at most ``max_value``, and
    ``negative_slope`` times (x − threshold) below the threshold (any numbers, as Keras's function takes)."""
    y = np.where(x > threshold, x, np.float32(0)) if threshold else np.maximum(x, np.float32(0))
    if max_value is not None:
        y = np.clip(y, np.float32(0), np.float32(max_value))
    if negative_slope:
        y = y - np.float32(negative_slope) * np.maximum(np.float32(threshold) - x, np.float32(0))
    return y.astype(np.float32)


relu = Activation("relu", negative_slope=0.0, max_value=None, threshold=0.0)
softmax = Activation("softmax", axis=-1)
sigmoid, tanh, selu = Activation("sigmoid"), Activation("tanh"), Activation("selu")
elu, leaky_relu = Activation("elu", alpha=1.0), Activation("leaky_relu", negative_slope=0.2)
softplus, silu, gelu = Activation("softplus"), Activation("silu"), Activation("gelu", approximate=False)
relu6 = Activation("relu6")  # min(max(x, 0), 6)
swish = silu
linear = Activation("linear")  # the identity; as a layer's activation, the same as None

_BY_NAME = {a.activation_name: a for a in (relu, softmax, sigmoid, tanh, elu, selu, leaky_relu, softplus, silu, gelu,
                                           linear, relu6)}
_BY_NAME["swish"] = silu


def get(name):
    """The activation called ``name`` (None: ``linear``, as Keras)."""
    if name is None:
        return linear
    if isinstance(name, Activation):
        return name
    if name not in _BY_NAME:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(sorted(_BY_NAME))}")
    return _BY_NAME[name]


def __getattr__(name):
    raise missing("gpucnn.activations", name, "Keras activation", sorted(_BY_NAME))
