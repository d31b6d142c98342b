"""Keras's activation functions by name: ``keras.activations.relu`` etc. Each can be given as a layer's
``activation=`` (the layer then runs that activation on the engine) or called on an array (the NumPy engine's
result, as a NumPy array). ``get(name)`` returns one; an unknown name lists the known ones."""
import numpy as np

from .engines import numpy_ops


class Activation:
    """A named activation function (``activation_name``: what layers and the ops take)."""

    def __init__(self, name):
        self.activation_name = self.__name__ = name

    def __call__(self, x):
        return numpy_ops.activation_forward(np.asarray(x, np.float32), self.activation_name)

    def __repr__(self):
        return f"<gpucnn activation {self.activation_name}>"


relu, softmax, sigmoid, tanh = Activation("relu"), Activation("softmax"), Activation("sigmoid"), Activation("tanh")
elu, selu, leaky_relu, softplus = Activation("elu"), Activation("selu"), Activation("leaky_relu"), Activation("softplus")
silu, gelu = Activation("silu"), Activation("gelu")
swish = silu
linear = None

_BY_NAME = {a.activation_name: a for a in (relu, softmax, sigmoid, tanh, elu, selu, leaky_relu, softplus, silu, gelu)}
_BY_NAME["swish"] = silu


def get(name):
    """The activation called ``name`` ("linear" and None: None)."""
    if name is None or name == "linear":
        return None
    if isinstance(name, Activation):
        return name
    if name not in _BY_NAME:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(sorted(_BY_NAME))}, linear")
    return _BY_NAME[name]
