"""``keras.initializers``: how a layer's weights start, given by name (``kernel_initializer="he_normal"``, Keras's
snake_case or CamelCase names) or as objects (``keras.initializers.HeNormal(seed=1)``, ``Constant(0.1)``).

The variance-scaling ones follow Keras: a normal distribution is truncated at two standard deviations and widened
by 1/0.8796 (the standard deviation of a standard normal truncated there) so the weights keep the variance
``scale / n`` (n: the fan in, or the mean of the fans in and out); a uniform one spans ±sqrt(3 · scale / n).
Unseeded initializers draw from gpucnn's generator (``keras.utils.set_random_seed``); a seeded one gives the same
values at every call, as Keras's do.
"""
import math

import numpy as np

from .utils import missing, rng

_TRUNCATED_STDDEV = 0.87962566103423978  # of a standard normal truncated to [-2, 2]


def _fans(shape):
    """(fan in, fan out) of a weight's shape: (in, out) for a matrix; a kernel's receptive field times its input
    and output channels."""
    if len(shape) < 1:
        return 1, 1
    if len(shape) == 1:
        return shape[0], shape[0]
    if len(shape) == 2:
        return shape[0], shape[1]
    receptive = int(np.prod(shape[:-2]))
    return shape[-2] * receptive, shape[-1] * receptive


class Initializer:
    """Base class: ``initializer(shape)`` gives a float32 array; ``get_config`` its arguments."""

    def __call__(self, shape, dtype=None):
        shape = tuple(int(d) for d in shape)
        if getattr(self, "seed", None) is not None or not hasattr(self, "seed"):
            charge = getattr(rng(), "charge", None)  # (loading a file: its weight budget, before any allocation;
            if charge is not None:                   # draws from gpucnn's generator are counted by it)
                charge(shape)
        return np.asarray(self._draw(shape), np.float32)

    def _generator(self):
        seed = getattr(self, "seed", None)
        return rng() if seed is None else np.random.default_rng(seed)

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class Zeros(Initializer):
    def _draw(self, shape):
        return np.zeros(shape)


class Ones(Initializer):
    def _draw(self, shape):
        return np.ones(shape)


class Constant(Initializer):
    def __init__(self, value=0.0):
        self.value = float(value)

    def _draw(self, shape):
        return np.full(shape, self.value)

    def get_config(self):
        return {"value": self.value}


class RandomNormal(Initializer):
    def __init__(self, mean=0.0, stddev=0.05, seed=None):
        self.mean, self.stddev, self.seed = float(mean), float(stddev), seed

    def _draw(self, shape):
        return self._generator().normal(self.mean, self.stddev, shape)

    def get_config(self):
        return {"mean": self.mean, "stddev": self.stddev, "seed": self.seed}


class TruncatedNormal(RandomNormal):
    """A normal distribution with the values beyond two standard deviations drawn again."""

    def _draw(self, shape):
        return self.mean + _truncated(self._generator(), self.stddev, shape)


class RandomUniform(Initializer):
    def __init__(self, minval=-0.05, maxval=0.05, seed=None):
        self.minval, self.maxval, self.seed = float(minval), float(maxval), seed

    def _draw(self, shape):
        return self._generator().uniform(self.minval, self.maxval, shape)

    def get_config(self):
        return {"minval": self.minval, "maxval": self.maxval, "seed": self.seed}


def _truncated(generator, stddev, shape):
    values = generator.normal(0.0, stddev, shape)
    outside = np.abs(values) > 2 * stddev
    while outside.any():
        values[outside] = generator.normal(0.0, stddev, int(outside.sum()))
        outside = np.abs(values) > 2 * stddev
    return values


class VarianceScaling(Initializer):
    """Weights of variance ``scale / n``, n the fan in, the fan out or their mean (``mode``), from a truncated
    normal (Keras's default), a plain normal, or a uniform distribution."""

    def __init__(self, scale=1.0, mode="fan_in", distribution="truncated_normal", seed=None, input_axes=None,
                 output_axes=None):
        _default_axes(type(self).__name__, input_axes, output_axes)
        if not scale > 0 or mode not in ("fan_in", "fan_out", "fan_avg") or distribution not in (
                "truncated_normal", "untruncated_normal", "normal", "uniform"):
            raise ValueError(f"VarianceScaling: scale must be > 0, mode fan_in, fan_out or fan_avg, distribution "
                             f"truncated_normal, untruncated_normal or uniform; got {scale!r}, {mode!r}, "
                             f"{distribution!r}")
        self.scale, self.mode, self.seed = float(scale), mode, seed
        self.distribution = "untruncated_normal" if distribution == "normal" else distribution

    def _draw(self, shape):
        generator = self._generator()  # the draw first, then the scale (a file's budget refuses a huge shape here)
        if self.distribution == "uniform":  # (drawn on [-1, 1) then scaled: the values gpucnn always drew)
            unit = generator.uniform(-1, 1, shape)
        else:
            unit = generator.normal(0.0, 1.0, shape) if self.distribution == "untruncated_normal" else \
                _truncated(generator, 1.0, shape)
        fan_in, fan_out = _fans(shape)
        # variance = scale / n, n the fan (fan_avg: (in + out) / 2), written as scale·k / m so that the uniform
        # limits are gpucnn's earlier sqrt(6 / (in + out)) and sqrt(6 / in) to the last bit
        k, m = {"fan_in": (1, fan_in), "fan_out": (1, fan_out), "fan_avg": (2, fan_in + fan_out)}[self.mode]
        m = max(m, k)  # (n >= 1, as Keras's max(1, n))
        if self.distribution == "uniform":
            return unit * math.sqrt(3.0 * self.scale * k / m)
        deviation = math.sqrt(self.scale * k / m)
        return unit * (deviation if self.distribution == "untruncated_normal" else deviation / _TRUNCATED_STDDEV)

    def get_config(self):
        return {"scale": self.scale, "mode": self.mode, "distribution": self.distribution, "seed": self.seed}


def _default_axes(kind, input_axes, output_axes):
    """Keras 3's newer VarianceScaling arguments (which axes are the fans), taken at their default, None: a Keras
    config holds them."""
    if input_axes is not None or output_axes is not None:
        raise NotImplementedError(f"{kind}(input_axes={input_axes!r}, output_axes={output_axes!r}): gpucnn reads the "
                                  "fans from the kernel's shape as Keras's default does; leave them None")


def _scaling(name, scale, mode, distribution):
    def __init__(self, seed=None, input_axes=None, output_axes=None):
        VarianceScaling.__init__(self, scale, mode, distribution, seed, input_axes, output_axes)

    def get_config(self):
        return {"seed": self.seed}
    return type(name, (VarianceScaling,), {"__init__": __init__, "get_config": get_config,
                                           "__doc__": f"VarianceScaling({scale}, {mode!r}, {distribution!r})."})


GlorotUniform = _scaling("GlorotUniform", 1.0, "fan_avg", "uniform")
GlorotNormal = _scaling("GlorotNormal", 1.0, "fan_avg", "truncated_normal")
HeUniform = _scaling("HeUniform", 2.0, "fan_in", "uniform")
HeNormal = _scaling("HeNormal", 2.0, "fan_in", "truncated_normal")
LecunUniform = _scaling("LecunUniform", 1.0, "fan_in", "uniform")
LecunNormal = _scaling("LecunNormal", 1.0, "fan_in", "truncated_normal")

_CLASSES = {cls.__name__: cls for cls in (
    Zeros, Ones, Constant, RandomNormal, TruncatedNormal, RandomUniform, VarianceScaling, GlorotUniform,
    GlorotNormal, HeUniform, HeNormal, LecunUniform, LecunNormal)}
_NAMES = {"zeros": Zeros, "ones": Ones, "constant": Constant, "random_normal": RandomNormal,
          "truncated_normal": TruncatedNormal, "random_uniform": RandomUniform, "variance_scaling": VarianceScaling,
          "glorot_uniform": GlorotUniform, "glorot_normal": GlorotNormal, "he_uniform": HeUniform,
          "he_normal": HeNormal, "lecun_uniform": LecunUniform, "lecun_normal": LecunNormal}


def get(identifier):
    """An Initializer from a name (``"he_normal"`` or ``"HeNormal"``), an Initializer, or a config dict
    ``{"class_name", "config"}`` (as ``serialize`` writes and Keras's configs hold)."""
    if isinstance(identifier, Initializer):
        return identifier
    if isinstance(identifier, str):
        cls = _NAMES.get(identifier) or _CLASSES.get(identifier) or _NAMES.get(identifier.lower())
        if cls is None:
            raise ValueError(f"unknown initializer {identifier!r}; known: {', '.join(sorted(_NAMES))} (or their "
                             "CamelCase class names, or gpucnn.initializers objects)")
        return cls()
    if isinstance(identifier, dict) and identifier.get("class_name") in _CLASSES:
        return _CLASSES[identifier["class_name"]].from_config(dict(identifier.get("config") or {}))
    raise ValueError(f"an initializer is a name (e.g. 'he_normal'), a gpucnn.initializers object or its config, "
                     f"got {identifier!r}")


def serialize(identifier):
    """What a layer's config holds for an initializer: a name as given, an object as ``{"class_name", "config"}``."""
    if isinstance(identifier, Initializer):
        return {"class_name": type(identifier).__name__, "config": identifier.get_config()}
    return identifier


def __getattr__(name):
    raise missing("gpucnn.initializers", name, "Keras initializer", sorted(_CLASSES))
