"""Learning-rate schedules with Keras 3's formulas (``keras.optimizers.schedules``).

A schedule maps the optimizer's step — the number of updates made before this one, 0 for the first, as
Keras's ``optimizer.iterations`` — to that update's learning rate:

    lr = ExponentialDecay(0.1, decay_steps=1000, decay_rate=0.96)
    lr(0) == 0.1;  lr(1000) == 0.096

``resolve(learning_rate, step)`` is what an optimizer calls before each update: it takes a number, a
schedule, or a callable of no arguments (Keras's rule for a callable that is not a schedule) and returns the
rate as a float, refusing a value that is not a finite number >= 0 with an error that names its source.
Zero is a rate: Keras's CosineDecay starts its warmup from 0 in its own example and can end at 0.

Schedules compute in Python floats (double); Keras computes in float32, so rates agree to float32 rounding.
``serialize`` / ``deserialize`` turn a schedule into a JSON-able dict and back (known classes only).
"""
import math
import numbers

import numpy as np

from .utils import missing, plain_number

__all__ = ["LearningRateSchedule", "ExponentialDecay", "PiecewiseConstantDecay", "CosineDecay", "InverseTimeDecay",
           "PolynomialDecay", "CosineDecayRestarts", "resolve", "check_rate", "serialize", "deserialize"]


def _number(value, what, who):
    """``value`` as a float, if it is a finite real number (not a bool)."""
    value = plain_number(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{who}: {what} must be a finite number, got {value!r}")
    return float(value)


def _decay_start(initial_learning_rate, decay_steps, who):
    """(initial_learning_rate as a float, decay_steps as given) after checking them: a finite rate, and
    decay_steps > 0."""
    if _number(decay_steps, "decay_steps", who) <= 0:
        raise ValueError(f"{who}: decay_steps must be > 0, got {decay_steps!r}")
    return _number(initial_learning_rate, "initial_learning_rate", who), decay_steps


def _step(step, who):
    """A step count as a float: a real number >= 0 (an int, as a rule)."""
    step = plain_number(step)
    if isinstance(step, bool) or not isinstance(step, numbers.Real) or not step >= 0 or not math.isfinite(step):
        raise ValueError(f"{who}: the step must be a number >= 0 (the optimizer's update count), got {step!r}")
    return float(step)


class LearningRateSchedule:
    """Base class of the schedules: a subclass implements ``__call__(step)`` (the rate of update ``step``,
    0-based) and, to be saved with a model, ``get_config()`` (the arguments that rebuild it)."""

    def __call__(self, step):
        raise NotImplementedError(f"learning rate schedule {type(self).__name__} must implement __call__(self, step)")

    def __setattr__(self, name, value):
        # an optimizer's live variable given as an argument (CosineDecay(opt.learning_rate, ...)) is kept as the
        # number it is now, so the schedule does not change under the optimizer
        if isinstance(value, (list, tuple)) and any(plain_number(v) is not v for v in value):
            value = type(value)(plain_number(v) for v in value)
        super().__setattr__(name, plain_number(value))

    def get_config(self):
        raise NotImplementedError(f"learning rate schedule {type(self).__name__} must implement get_config() to "
                                  "be saved")

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        try:
            args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        except NotImplementedError:
            args = "..."
        return f"{type(self).__name__}({args})"


class ExponentialDecay(LearningRateSchedule):
    """``initial_learning_rate · decay_rate ** (step / decay_steps)``; with ``staircase`` the exponent is
    ``floor(step / decay_steps)``, so the rate drops every ``decay_steps`` updates."""

    def __init__(self, initial_learning_rate, decay_steps, decay_rate, staircase=False, name="ExponentialDecay"):
        who = "ExponentialDecay"
        self.initial_learning_rate, self.decay_steps = _decay_start(initial_learning_rate, decay_steps, who)
        self.decay_rate = decay_rate
        if _number(decay_rate, "decay_rate", who) <= 0:
            raise ValueError(f"{who}: decay_rate must be > 0 (the factor the rate is multiplied by every "
                             f"decay_steps updates), got {decay_rate!r}")
        self.staircase, self.name = bool(staircase), name

    def __call__(self, step):
        p = _step(step, "ExponentialDecay") / self.decay_steps
        if self.staircase:
            p = math.floor(p)
        return self.initial_learning_rate * float(self.decay_rate) ** p

    def get_config(self):
        return {"initial_learning_rate": self.initial_learning_rate, "decay_steps": self.decay_steps,
                "decay_rate": self.decay_rate, "staircase": self.staircase, "name": self.name}


class PiecewiseConstantDecay(LearningRateSchedule):
    """``values[0]`` while step <= boundaries[0], ``values[i]`` while boundaries[i-1] < step <= boundaries[i],
    and ``values[-1]`` once step > boundaries[-1]; boundaries strictly increasing, one more value than
    boundaries."""

    def __init__(self, boundaries, values, name="PiecewiseConstant"):
        who = "PiecewiseConstantDecay"
        boundaries, values = list(boundaries), list(values)
        if len(boundaries) != len(values) - 1:
            raise ValueError(f"{who}: there must be one more value than boundaries, got boundaries={boundaries} "
                             f"({len(boundaries)}) and values={values} ({len(values)})")
        numeric = [_number(b, "each boundary", who) for b in boundaries]
        if any(later <= earlier for earlier, later in zip(numeric, numeric[1:])):
            raise ValueError(f"{who}: boundaries must be strictly increasing, got {boundaries}")
        for v in values:
            _number(v, "each value", who)
        self.boundaries, self.values, self.name = boundaries, values, name

    def __call__(self, step):
        step = _step(step, "PiecewiseConstantDecay")
        for boundary, value in zip(self.boundaries, self.values):
            if step <= boundary:
                return float(value)
        return float(self.values[-1])

    def get_config(self):
        return {"boundaries": self.boundaries, "values": self.values, "name": self.name}


class CosineDecay(LearningRateSchedule):
    """Cosine decay with an optional linear warmup, as Keras 3.

    Without ``warmup_target``: ``initial_learning_rate · d(min(step, decay_steps))``, where
    ``d(s) = (1 − alpha) · 0.5 · (1 + cos(π · s / decay_steps)) + alpha``.
    With it: for step < warmup_steps the rate goes linearly from ``initial_learning_rate`` (step 0) towards
    ``warmup_target`` (reached at step warmup_steps); then ``warmup_target · d(min(step, warmup_steps +
    decay_steps) − warmup_steps)``. ``alpha`` is the final rate as a fraction of the decay's start."""

    def __init__(self, initial_learning_rate, decay_steps, alpha=0.0, name="CosineDecay", warmup_target=None,
                 warmup_steps=0):
        who = "CosineDecay"
        self.initial_learning_rate, self.decay_steps = _decay_start(initial_learning_rate, decay_steps, who)
        self.alpha = alpha
        if not 0 <= _number(alpha, "alpha", who) <= 1:
            raise ValueError(f"{who}: alpha (the final rate as a fraction of the decay's start) must be in "
                             f"[0, 1], got {alpha!r}")
        self.warmup_target = warmup_target
        if warmup_target is not None:
            _number(warmup_target, "warmup_target", who)
        self.warmup_steps = warmup_steps
        if _number(warmup_steps, "warmup_steps", who) < 0:
            raise ValueError(f"{who}: warmup_steps must be >= 0, got {warmup_steps!r}")
        self.name = name

    def _decayed(self, step, start):
        fraction = step / self.decay_steps
        cosine = 0.5 * (1.0 + math.cos(math.pi * fraction))
        return start * ((1 - self.alpha) * cosine + self.alpha)

    def __call__(self, step):
        step = _step(step, "CosineDecay")
        if self.warmup_target is None:
            return self._decayed(min(step, self.decay_steps), self.initial_learning_rate)
        step = min(step, self.decay_steps + self.warmup_steps)
        if step < self.warmup_steps:
            delta = self.warmup_target - self.initial_learning_rate
            return delta * (step / self.warmup_steps) + self.initial_learning_rate
        return self._decayed(step - self.warmup_steps, float(self.warmup_target))

    def get_config(self):
        return {"initial_learning_rate": self.initial_learning_rate, "decay_steps": self.decay_steps,
                "alpha": self.alpha, "name": self.name, "warmup_target": self.warmup_target,
                "warmup_steps": self.warmup_steps}


class InverseTimeDecay(LearningRateSchedule):
    """``initial_learning_rate / (1 + decay_rate · step / decay_steps)``; with ``staircase`` the quotient is
    ``floor(step / decay_steps)``."""

    def __init__(self, initial_learning_rate, decay_steps, decay_rate, staircase=False, name="InverseTimeDecay"):
        who = "InverseTimeDecay"
        self.initial_learning_rate, self.decay_steps = _decay_start(initial_learning_rate, decay_steps, who)
        self.decay_rate = decay_rate
        if _number(decay_rate, "decay_rate", who) < 0:
            raise ValueError(f"{who}: decay_rate must be >= 0, got {decay_rate!r}")
        self.staircase, self.name = bool(staircase), name

    def __call__(self, step):
        p = _step(step, "InverseTimeDecay") / self.decay_steps
        if self.staircase:
            p = math.floor(p)
        return self.initial_learning_rate / (1.0 + float(self.decay_rate) * p)

    def get_config(self):
        return {"initial_learning_rate": self.initial_learning_rate, "decay_steps": self.decay_steps,
                "decay_rate": self.decay_rate, "staircase": self.staircase, "name": self.name}


class PolynomialDecay(LearningRateSchedule):
    """From ``initial_learning_rate`` to ``end_learning_rate`` over ``decay_steps`` updates:
    ``(initial − end) · (1 − s / decay_steps) ** power + end`` with s = min(step, decay_steps), then ``end``. With
    ``cycle`` the decay starts again: the span is decay_steps times ceil(step / decay_steps) (1 at step 0)."""

    def __init__(self, initial_learning_rate, decay_steps, end_learning_rate=0.0001, power=1.0, cycle=False,
                 name="PolynomialDecay"):
        who = "PolynomialDecay"
        self.initial_learning_rate, self.decay_steps = _decay_start(initial_learning_rate, decay_steps, who)
        self.end_learning_rate = end_learning_rate
        _number(end_learning_rate, "end_learning_rate", who)
        self.power = power
        if _number(power, "power", who) < 0:
            raise ValueError(f"{who}: power must be >= 0, got {power!r}")
        self.cycle, self.name = bool(cycle), name

    def __call__(self, step):
        step = _step(step, "PolynomialDecay")
        span = float(self.decay_steps)
        if self.cycle:
            span *= 1.0 if step == 0 else math.ceil(step / self.decay_steps)
        else:
            step = min(step, span)
        end = float(self.end_learning_rate)
        return (self.initial_learning_rate - end) * (1.0 - step / span) ** float(self.power) + end

    def get_config(self):
        return {"initial_learning_rate": self.initial_learning_rate, "decay_steps": self.decay_steps,
                "end_learning_rate": self.end_learning_rate, "power": self.power, "cycle": self.cycle,
                "name": self.name}


class CosineDecayRestarts(LearningRateSchedule):
    """Cosine decay with warm restarts (SGDR), as Keras: the first period lasts ``first_decay_steps`` updates, each
    next one ``t_mul`` times longer and restarting at ``m_mul`` times the previous start; within a period the
    rate is ``start · ((1 − alpha) · 0.5 · (1 + cos(π · f)) + alpha)``, f the fraction of the period done."""

    def __init__(self, initial_learning_rate, first_decay_steps, t_mul=2.0, m_mul=1.0, alpha=0.0,
                 name="SGDRDecay"):
        who = "CosineDecayRestarts"
        self.initial_learning_rate, self.first_decay_steps = _decay_start(initial_learning_rate,
                                                                          first_decay_steps, who)
        if _number(t_mul, "t_mul", who) <= 0 or _number(m_mul, "m_mul", who) < 0:
            raise ValueError(f"{who}: t_mul must be > 0 and m_mul >= 0, got t_mul={t_mul!r}, m_mul={m_mul!r}")
        self.t_mul, self.m_mul, self.alpha, self.name = t_mul, m_mul, alpha, name
        _number(alpha, "alpha", who)

    def __call__(self, step):
        fraction = _step(step, "CosineDecayRestarts") / self.first_decay_steps
        t_mul = float(self.t_mul)
        if t_mul == 1.0:
            restart = math.floor(fraction)
            fraction -= restart
        else:  # periods of 1, t, t², ... first periods: restart i begins at (1 − t^i) / (1 − t)
            if fraction * (1.0 - t_mul) >= 1.0:  # t < 1: the periods, shorter and shorter, end at 1 / (1 − t)
                raise ValueError(
                    f"CosineDecayRestarts(first_decay_steps={self.first_decay_steps!r}, t_mul={self.t_mul!r}): with "
                    f"t_mul < 1 each period is shorter than the one before and all of them together last "
                    f"{self.first_decay_steps / (1.0 - t_mul):g} steps, so step {step} has no rate (Keras's is NaN "
                    "there). Use t_mul >= 1, or train fewer steps.")
            restart = math.floor(math.log(1.0 - fraction * (1.0 - t_mul)) / math.log(t_mul))
            fraction = (fraction - (1.0 - t_mul ** restart) / (1.0 - t_mul)) / t_mul ** restart
        cosine = 0.5 * float(self.m_mul) ** restart * (1.0 + math.cos(math.pi * fraction))
        return self.initial_learning_rate * ((1 - float(self.alpha)) * cosine + float(self.alpha))

    def get_config(self):
        return {"initial_learning_rate": self.initial_learning_rate, "first_decay_steps": self.first_decay_steps,
                "t_mul": self.t_mul, "m_mul": self.m_mul, "alpha": self.alpha, "name": self.name}


# ===================================================================================== for the optimizers
def check_rate(value, source):
    """``value`` if it is a usable learning rate (a number >= 0, finite in float32), as the float of its float32
    value (what the update uses; Keras keeps its rate as a float32 variable, so a callback comparing the rate sees
    the same number in both), else a clear error naming ``source`` (what produced it)."""
    if isinstance(value, (bool, str, bytes)):
        raise TypeError(f"{source} must be a number, got {value!r}")
    try:
        rate = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{source} must be a number, got {type(value).__name__} {value!r}") from None
    with np.errstate(over="ignore"):
        single = float(np.float32(rate))
    if not math.isfinite(single) or rate < 0:
        raise ValueError(f"{source} is {rate}: a learning rate must be a finite number >= 0 (in float32: below "
                         "3.4e38). Check the schedule's arguments (or the function that computes the rate).")
    return single


def resolve(learning_rate, step):
    """The learning rate of update ``step`` (0-based) as a float, from a number, a LearningRateSchedule
    (called with the step) or any other callable (called with no arguments, as Keras does)."""
    if isinstance(learning_rate, LearningRateSchedule):
        return check_rate(learning_rate(step), f"the learning rate that {learning_rate!r} gives at step {step}")
    if callable(learning_rate):
        name = getattr(learning_rate, "__name__", type(learning_rate).__name__)
        return check_rate(learning_rate(), f"the learning rate that {name}() returns")
    return check_rate(learning_rate, "the learning rate")


SCHEDULES = {cls.__name__: cls for cls in (ExponentialDecay, PiecewiseConstantDecay, CosineDecay, InverseTimeDecay,
                                           PolynomialDecay, CosineDecayRestarts)}


def serialize(schedule):
    """``{"class_name": ..., "config": ...}`` of a schedule (JSON-able when its config is)."""
    if not isinstance(schedule, LearningRateSchedule):
        raise TypeError(f"serialize takes a LearningRateSchedule, got {type(schedule).__name__}")
    return {"class_name": type(schedule).__name__, "config": schedule.get_config()}


def deserialize(config, custom_objects=None):
    """The schedule ``serialize`` described; ``custom_objects`` maps the names of your own schedule classes to
    them. Only these classes are ever built."""
    known = dict(SCHEDULES, **(custom_objects or {}))
    if not isinstance(config, dict) or "class_name" not in config:
        raise ValueError(f"deserialize takes the dict serialize gives ({{'class_name': ..., 'config': ...}}), "
                         f"got {config!r}")
    cls = known.get(config["class_name"])
    if cls is None:
        raise ValueError(f"unknown learning rate schedule {config['class_name']!r}; known: {sorted(known)} "
                         "(pass your own classes as custom_objects={'Name': Name})")
    return cls.from_config(dict(config.get("config", {})))


def __getattr__(name):
    raise missing("gpucnn.optimizers.schedules", name, "Keras schedule",
                  sorted(k for k, v in globals().items() if isinstance(v, type) and issubclass(v, LearningRateSchedule)
                         and v is not LearningRateSchedule) + ["your own subclasses of LearningRateSchedule"])
