"""Keras's activation layers: ``ReLU``, ``LeakyReLU``, ``ELU``, ``Softmax``. Each is an ``Activation`` layer with
Keras's arguments and defaults (``LeakyReLU``'s negative slope is 0.3, where the function
``keras.activations.leaky_relu`` takes 0.2). The other activations (gelu, selu, silu/swish, softplus, sigmoid,
tanh) have no layer of their own in Keras: ``Activation("gelu")``."""
import numbers
import warnings

from ..utils import plain_number
from .base import Layer
from .core import Activation


def _non_negative(value, what, who):
    value = plain_number(value)  # (optimizer.learning_rate: the number it is now)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < float("inf"):
        raise ValueError(f"{who}: {what} must be a finite number >= 0, got {value!r}")
    return float(value)


class _ActivationLayer(Activation):
    """An Activation whose constructor takes the activation's own arguments (and whose config gives them)."""

    def _arguments(self):
        return {}

    def get_config(self):
        return {**Layer.get_config(self), **self._arguments()}


class ReLU(_ActivationLayer):
    """max(x, 0); with ``max_value``, at most that (``ReLU(6.0)``: MobileNet's relu6); with ``negative_slope`` > 0,
    ``negative_slope · x`` below zero (a leaky ReLU). gpucnn supports Keras's ``threshold=0.0`` only, and a cap or a
    negative slope, not both."""

    def __init__(self, max_value=None, negative_slope=0.0, threshold=0.0, **kwargs):
        self.negative_slope = _non_negative(negative_slope, "negative_slope", "ReLU")
        self.max_value = None if max_value is None else _non_negative(max_value, "max_value", "ReLU")
        if _non_negative(threshold, "threshold", "ReLU") != 0 or (self.max_value is not None and self.negative_slope):
            raise ValueError(f"ReLU: gpucnn supports threshold=0.0 only, and max_value or negative_slope, not both (got "
                             f"max_value={max_value!r}, negative_slope={negative_slope!r}, threshold={threshold!r})")
        if self.max_value is not None:
            activation = ("relu6", self.max_value)
        else:
            activation = "relu" if self.negative_slope == 0 else ("leaky_relu", self.negative_slope)
        super().__init__(activation, **kwargs)

    def _arguments(self):
        return {"max_value": self.max_value, "negative_slope": self.negative_slope, "threshold": 0.0}


class LeakyReLU(_ActivationLayer):
    """x above zero, ``negative_slope · x`` below (Keras's default slope 0.3; ``alpha`` is its old name)."""

    def __init__(self, negative_slope=0.3, **kwargs):
        if "alpha" in kwargs:
            negative_slope = kwargs.pop("alpha")
            warnings.warn("LeakyReLU: the argument alpha is deprecated (as in Keras); use negative_slope",
                          DeprecationWarning, stacklevel=2)
        self.negative_slope = _non_negative(negative_slope, "negative_slope", "LeakyReLU")
        super().__init__(("leaky_relu", self.negative_slope), **kwargs)

    def _arguments(self):
        return {"negative_slope": self.negative_slope}


class ELU(_ActivationLayer):
    """x above zero, ``alpha · (exp(x) − 1)`` below."""

    def __init__(self, alpha=1.0, **kwargs):
        self.alpha = _non_negative(alpha, "alpha", "ELU")
        super().__init__(("elu", self.alpha), **kwargs)

    def _arguments(self):
        return {"alpha": self.alpha}


class Softmax(_ActivationLayer):
    """The softmax over the last axis (``axis=-1``, the only axis gpucnn supports)."""

    def __init__(self, axis=-1, **kwargs):
        if axis != -1 or isinstance(axis, bool):
            raise ValueError(f"Softmax: gpucnn takes the softmax over the last axis only (axis=-1), got axis={axis!r}")
        super().__init__("softmax", **kwargs)

    def _arguments(self):
        return {"axis": -1}
