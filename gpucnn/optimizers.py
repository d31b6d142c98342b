"""Optimizers with Keras's update rules: RMSprop, SGD (momentum, Nesterov), Adam, AdamW (and any of them with
Keras's decoupled ``weight_decay``).

An optimizer updates one flat float32 parameter buffer from one flat gradient buffer of the same length
(the model keeps every trainable weight as a view into them), so each step is one engine call per rule.
The update reads its rate (the learning rate; Adam's step size) from a per-step table on the engine,
``rates[step[0]]``: one row written before an eager step, or a whole epoch's rows before a captured one
(``rates_for``), so a captured CUDA graph never freezes a rate.

``learning_rate`` is a number, a ``schedules.LearningRateSchedule`` (``keras.optimizers.schedules``: called with
the number of updates made before, 0 for the first, as Keras's ``iterations``) or a function of no arguments,
called for each step's rate (on the GPU fast path, for all of an epoch's steps as the epoch begins);
``optimizer.learning_rate`` is the next update's rate as Keras's float32 variable (live: a reference kept to it reads
the rate set since; ``float()`` gives the number) and takes a new number between epochs or in a
batch callback, applied from the next step (the fast path then runs in lockstep and rewrites its table; not while a
schedule is set: TypeError, as Keras).

A step is all or nothing for Ctrl-C: a ``KeyboardInterrupt`` that arrives during it takes effect right after
it, so the weights, the state buffers and ``iterations`` are never left half-updated.
"""
import inspect
import math
import numbers
import operator
import re
import weakref

import numpy as np

from . import backend, schedules
from .utils import missing, sigint_deferred


MAX_ITERATIONS = 2**62  # (a saved file holds no more either)


class _Variable:
    """One of an optimizer's numbers as Keras gives it out, a variable: a live view that reads the optimizer's current
    value each time it is used (a reference kept across epochs sees the rate a callback set since, as Keras's does),
    computes and compares as that value (``rate * 0.5``, ``rate > 1e-3``, ``steps < 1e3``, ``float(rate)``,
    ``f"{rate:.4f}"``, ``math.floor``), and answers Keras's variable methods ``numpy()`` and ``assign(value)`` (the same
    as setting the optimizer's attribute ``_attribute``). Copied or pickled (a History holding it), it is the plain
    number of that moment; gpucnn's own checks of a number read that too (``utils.plain_number``)."""
    __slots__ = ("_optimizer", "_frozen")
    __hash__ = None  # its value changes
    _attribute = None

    def __init__(self, optimizer, frozen=None):
        self._optimizer, self._frozen = optimizer, frozen  # frozen: a value of one moment (a schedule's rate)

    def _value(self):
        return self._frozen if self._frozen is not None else self._read()

    def _operand(self, other):
        """``other`` as this variable computes with it."""
        return other._value() if isinstance(other, _Variable) else other

    def _plain_number(self):
        return self._plain(self._value())

    def numpy(self):
        return self._value()

    def assign(self, value):
        setattr(self._optimizer, self._attribute, value)

    def __repr__(self):
        return str(self._value())

    __str__ = __repr__

    def __format__(self, spec):
        return format(self._value(), spec) if spec else str(self)

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self._value(), dtype=dtype)

    def __reduce__(self):
        return self._plain, (self._plain_number(),)

    def __bool__(self):
        return bool(self._value())

    def __int__(self):
        return int(self._value())

    def __float__(self):
        return float(self._value())

    def __neg__(self):
        return -self._value()

    def __pos__(self):
        return +self._value()

    def __abs__(self):
        return abs(self._value())

    def __round__(self, digits=None):
        return round(self._plain_number(), digits)

    def __trunc__(self):
        return math.trunc(self._plain_number())

    def __floor__(self):
        return math.floor(self._plain_number())

    def __ceil__(self):
        return math.ceil(self._plain_number())


def _operators(cls, binary, comparisons):
    """Give ``cls`` each binary operator of ``binary`` (both ways: ``v * 2`` and ``2 * v``) and each comparison, on
    the value and the other operand as ``_operand`` makes it (Python's operator functions: an int step count with a
    float gives a float, as Keras's variable does)."""
    def define(name, function, reflected):
        def method(self, other):
            other = self._operand(other)
            return function(other, self._value()) if reflected else function(self._value(), other)
        method.__name__ = name
        setattr(cls, name, method)

    for name, function in binary.items():
        define(f"__{name}__", function, False)
        define(f"__r{name}__", function, True)
    for name, function in comparisons.items():
        define(f"__{name}__", function, False)
    return cls


_ARITHMETIC = {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "truediv": operator.truediv,
               "floordiv": operator.floordiv, "mod": operator.mod, "pow": operator.pow, "divmod": divmod}
_BITWISE = {"and": operator.and_, "or": operator.or_, "xor": operator.xor, "lshift": operator.lshift,
            "rshift": operator.rshift}
_COMPARISONS = {"eq": operator.eq, "ne": operator.ne, "lt": operator.lt, "le": operator.le, "gt": operator.gt,
                "ge": operator.ge}


class LearningRate(_Variable):
    """An optimizer's learning rate as ``optimizer.learning_rate`` gives it out: Keras's float32 variable, live (the
    rate of the next update); with a schedule, the rate at the moment it was read (as Keras's, a value then). It
    computes and compares in float32, a number it meets taken as a float32 first (Keras's rule, and NumPy 2's for a
    Python float; NumPy 1 would compare 0.1 in float64 and find the rate 0.1 unequal to it)."""
    _attribute, _plain = "learning_rate", float
    __slots__ = ()
    dtype = property(lambda self: "float32", doc="Keras's variable's dtype, by name (read-only, as Keras's)")
    shape = property(lambda self: (), doc="()")

    def _read(self):
        return np.float32(self._optimizer._current_rate())

    def _operand(self, other):
        other = super()._operand(other)
        if isinstance(other, numbers.Real) and not isinstance(other, bool):  # (NumPy's numbers are Real, not np.bool_)
            return np.float32(other)  # a number (an array, or a complex, keeps NumPy's own promotion: Keras's too)
        return other


class Iterations(_Variable):
    """An optimizer's step count as ``optimizer.iterations`` gives it out: Keras's int64 variable, live; ``numpy()``
    is int64, ``assign(n)`` and ``assign_add(n)`` set it."""
    _attribute, _plain = "iterations", int

    def _read(self):
        return self._optimizer._iterations

    def numpy(self):
        return np.int64(self._value())

    def __index__(self):
        return self._value()

    def __invert__(self):
        return ~self._value()

    def assign_add(self, value):
        self._optimizer.iterations = self._value() + value


_operators(LearningRate, _ARITHMETIC, _COMPARISONS)
_operators(Iterations, {**_ARITHMETIC, **_BITWISE}, _COMPARISONS)


class Optimizer:
    """What every optimizer shares: the learning rate and its per-step table, the state buffers, the step count,
    and Keras's decoupled ``weight_decay`` (None, or w −= weight_decay·lr·w before each update, every trained
    weight, as Keras decays every variable unless told otherwise)."""
    name = None
    _slots = ()  # names of the per-parameter state buffers
    _config = ()  # constructor arguments reported by get_config

    # Keras's optimizer arguments gpucnn takes at their default value only: any other is refused by name
    _KERAS_DEFAULTS = {"clipnorm": None, "clipvalue": None, "global_clipnorm": None, "use_ema": False,
                       "ema_momentum": 0.99, "ema_overwrite_frequency": None, "loss_scale_factor": None,
                       "gradient_accumulation_steps": None, "name": None}

    def __init__(self, learning_rate, weight_decay=None, **keras_arguments):
        self._check_keras_arguments(keras_arguments)
        self._learning_rate = _learning_rate_argument(learning_rate)
        if weight_decay is not None and (isinstance(weight_decay, bool)
                                         or not _number("weight_decay", weight_decay) >= 0):
            raise ValueError(f"weight_decay must be None or a number >= 0, got {weight_decay!r}")
        self.weight_decay = None if weight_decay is None else float(weight_decay)
        self._excluded_names = ()  # exclude_from_weight_decay's patterns
        self._excluded_arrays = []  # and the weight arrays it was given
        self._owner = None  # the model whose flat buffers this optimizer updates (its layout: _decay_ranges)
        self.reset()

    def _check_keras_arguments(self, given):
        kind = type(self).__name__
        for key, value in given.items():
            if key == "lr":
                raise TypeError(f"{kind}(lr=...) is Keras 2's name: write {kind}(learning_rate={value!r})")
            if key not in self._KERAS_DEFAULTS:
                raise TypeError(f"{kind} got an unexpected keyword argument {key!r}")
            if key == "name":  # a name of the user's (Keras's own differ between versions): taken, and unused
                if value is not None and not isinstance(value, str):
                    raise TypeError(f"{kind}: name must be a string, got {value!r}")
                continue
            if value != self._KERAS_DEFAULTS[key]:
                what = "gradient clipping is" if key.endswith("clipnorm") or key == "clipvalue" else f"{key}={value!r} is"
                raise NotImplementedError(f"{kind}({key}={value!r}): {what} not supported by gpucnn yet; leave "
                                          f"{key} out (Keras's default: {self._KERAS_DEFAULTS[key]!r})")

    # ---- the learning rate: a number, a LearningRateSchedule, or a callable of no arguments (Keras's forms)
    @property
    def learning_rate(self):
        """The rate of the next update as Keras's float32 variable (``LearningRate``: live, ``numpy()``,
        ``assign(value)``); with a schedule or function, its value at ``iterations``."""
        if callable(self._learning_rate):
            return LearningRate(self, frozen=np.float32(self._current_rate()))
        return LearningRate(self)

    def _current_rate(self):
        """The next update's rate (a float32 number, as float)."""
        return schedules.resolve(self._learning_rate, self._iterations)

    @learning_rate.setter
    def learning_rate(self, value):
        """A new rate (between epochs, e.g. from a callback): a number, or a new schedule. A number cannot replace a
        schedule (TypeError, as Keras)."""
        if callable(value):
            self._learning_rate = _learning_rate_argument(value)
            return
        if callable(self._learning_rate):
            raise TypeError(f"this optimizer's learning_rate is a schedule ({self._learning_rate!r}), so it cannot be set "
                            "to a number; create the optimizer with a float learning_rate to set it, or assign a new "
                            "schedule")
        self._learning_rate = schedules.check_rate(value, "the learning rate")

    @property
    def schedule(self):
        """The LearningRateSchedule or function the rates come from, or None when the rate is a number."""
        return self._learning_rate if callable(self._learning_rate) else None

    def held_values(self):
        """How many parameters this optimizer holds a state for: those it lays out, and those set aside (frozen)."""
        parked = sum(int(next(iter(kept.values())).shape[0]) for kept in self.parked.values() if kept)
        return sum(size for _, size in self.laid_out.values()) + parked

    def variable_count(self, trained):
        """How many values Keras counts as this optimizer's variables (``summary``'s "Optimizer params") over
        ``trained`` trained parameters: each state buffer's, the step count, and the learning rate when it is a
        number (a schedule or function is not a variable)."""
        return len(self._slots) * int(trained) + 1 + (0 if callable(self._learning_rate) else 1)

    def reset(self):
        """Forget the state, the step count and what they were laid out over (as a new optimizer)."""
        self.state, self.iterations = None, 0
        self.parked = {}  # the state of weights frozen after training: {(id(layer), index): {name: values}}
        # where each weight's state sits in the state buffers: {(id(layer), index): (offset, size)} over
        # laid_out_total values, as the model that last laid the buffers out placed it (lay_out); the layers it and
        # ``parked`` name are kept alive in _layers, so that their ids stay theirs
        self.laid_out, self.laid_out_total, self._layers = {}, None, {}
        self.known = set()  # the (id(layer), index) weights this optimizer has stepped (or a file said it had)
        self._stepped_by = None  # (a weak reference to) the model it stepped last
        self.stepped_by_name = None  # and that model's name (still there when the model is gone)
        self._stepped_layout = None  # the laid_out dict count_step last recorded

    def lay_out(self, model, layout, total):
        """Record that this optimizer now updates ``model``'s flat buffers of ``total`` values, its state laid out as
        the model's ``layout`` (its _layout: (layer, index, view, grad view, offset) per trained weight)."""
        self._owner = model
        self.laid_out = {(id(layer), i): (lo, view.size) for layer, i, view, _, lo in layout}
        self.laid_out_total = total
        layers = {(id(layer), i): layer for layer, i, *_ in layout}
        layers.update((slot, self._layers[slot]) for slot in set(self.parked) | self.known if slot in self._layers)
        self._layers = layers

    def count_step(self):
        """One update was applied (by apply, or by the captured GPU step): the step count goes on, and every weight
        laid out now has a state of this optimizer's. A layout of no weights (every layer frozen) is no step: Keras
        applies nothing then."""
        if self.laid_out_total == 0:
            return
        self._iterations += 1
        if self._stepped_layout is not self.laid_out:  # (once per layout, not at every step)
            self._stepped_layout = self.laid_out
            self.known.update(self.laid_out)
            self._stepped_by = weakref.ref(self._owner) if self._owner is not None else None
            self.stepped_by_name = None if self._owner is None else self._owner.name

    @property
    def stepped_by(self):
        """The model this optimizer stepped last (None when it has not, or that model is gone)."""
        return None if self._stepped_by is None else self._stepped_by()

    @property
    def iterations(self):
        """The number of steps taken, as Keras's variable reads it: an int with ``numpy()`` and ``assign(n)``."""
        return Iterations(self)

    @iterations.setter
    def iterations(self, value):
        count = None
        if not isinstance(value, (bool, np.bool_, str, bytes, bytearray)):
            try:
                count = operator.index(value)  # an int, exactly (a float could not hold 2**53 + 1)
            except TypeError:
                try:
                    number = float(value)  # 3.0, a 0-d array: whole numbers Keras's assign takes
                    count = int(number) if number.is_integer() else None
                except (TypeError, ValueError, OverflowError):
                    count = None
        if count is None or not 0 <= count < MAX_ITERATIONS:
            raise ValueError(f"iterations must be a whole number from 0 to 2**62 - 1, got {value!r}")
        self._iterations = int(count)

    def park(self, layer, i, values):
        """Keep ``values`` ({state name: array}) aside as the state of weight ``i`` of ``layer``, which does not train
        now (a loaded model's frozen weight): it comes back when the weight trains again."""
        self.parked[(id(layer), i)] = values
        self.known.add((id(layer), i))
        self._layers[(id(layer), i)] = layer

    def knows(self, slots):
        """Whether this optimizer has a state of its own for each (layer, index) of ``slots`` (it has stepped the
        weight, laid out or set aside since) — or has stepped no weight at all yet (a new optimizer, or one whose
        ``iterations`` were set by hand, takes any weights)."""
        if not self.known:
            return True
        return all((id(layer), i) in self.known for layer, i in slots)

    def build(self, n):
        """Allocate zeroed state for ``n`` parameters on the active engine."""
        xp = backend.ops().xp
        self.state = {slot: xp.zeros(n, dtype=np.float32) for slot in self._slots}

    def rates_for(self, first_step, count):
        """The float32 rates of the ``count`` steps from step ``first_step`` (1-based, as ``iterations`` + 1)."""
        return np.array([self._rate(t) for t in range(first_step, first_step + count)], np.float32)

    def _rate(self, t):
        """The float32 rate of step ``t`` (1-based; a schedule counts updates from 0, as Keras's ``iterations``)."""
        return np.float32(schedules.resolve(self._learning_rate, t - 1))

    def decay_factors_for(self, first_step, count):
        """The float32 factors weight decay multiplies the weights by at the ``count`` steps from ``first_step``
        (1 − weight_decay·lr of each step), or None without weight decay."""
        if self.weight_decay is None:
            return None
        ops = backend.ops()
        return np.array([ops.weight_decay_factor(schedules.resolve(self._learning_rate, t - 1), self.weight_decay)
                         for t in range(first_step, first_step + count)], np.float32)

    def apply(self, params, grads):
        """One step over the flat ``params`` from the flat ``grads`` (both engine arrays); a Ctrl-C during
        it is raised once it is complete."""
        xp = backend.ops().xp
        if getattr(self, "_eager", None) is None or not isinstance(self._eager[0], xp.ndarray):
            self._eager = (xp.zeros(1, np.float32), xp.zeros(1, np.int32), xp.zeros(1, np.float32))  # one-row
            # tables (the rate, weight decay's factor) and the counter at 0
        rates, counter, factors = self._eager
        if params.shape[0] == 0:  # every weight frozen: Keras applies nothing and counts no step
            return
        with sigint_deferred():
            if self.state is None:
                self.build(params.shape[0])
            rates[...] = xp.asarray(self.rates_for(self.iterations + 1, 1))
            if self.weight_decay is not None:
                factors[...] = xp.asarray(self.decay_factors_for(self.iterations + 1, 1))
            self.update(params, grads, rates, counter, factors)
            self.count_step()

    def update(self, params, grads, rates, counter, factors=None):
        """The update kernel/op over the flat buffers, reading the rate at ``rates[counter[0]]`` (and, with weight
        decay, first decaying the weights by ``factors[counter[0]]``: one launch per run of decayed weights)."""
        ops = backend.ops()
        if self.weight_decay is not None:
            if factors is None:
                raise ValueError(f"{type(self).__name__}(weight_decay={self.weight_decay}) needs the table of weight "
                                 "decay factors (decay_factors_for)")
            for lo, hi in self._decay_ranges(params.shape[0]):
                ops.weight_decay(params[lo:hi], factors, counter)
        self._update(ops, params, grads, rates, counter)

    def exclude_from_weight_decay(self, var_list=None, var_names=None):
        """Keras's: leave some weights out of weight decay — the weights ``var_list`` (``model.weights``'s variables,
        or the arrays a layer holds now), or every weight whose name (``kernel``, ``bias``, ``gamma``, ``beta``, ...) a pattern of
        ``var_names`` matches (``re.search``), e.g. ``var_names=["bias", "gamma", "beta"]``. Each call replaces
        the previous one, as Keras's."""
        names = list(var_names or ())
        if not all(isinstance(n, str) for n in names):
            raise TypeError(f"exclude_from_weight_decay: var_names must be strings, got {names!r}")
        self._excluded_names = tuple(names)
        self._excluded_arrays = list(var_list or ())
        if self._owner is not None:
            self.anchor_exclusions(self._owner._weight_slots())

    def anchor_exclusions(self, slots):
        """Name each raw array of exclude_from_weight_decay's var_list that is a weight of ``slots`` ((layer, index)
        pairs) by that weight (a Variable), before packing replaces the layer's arrays with views of a flat buffer
        (an array kept by identity would then name nothing)."""
        from .layers.base import weight_of  # (the layers import nothing of the optimizers)
        from .layers.variables import Variable
        where = {id(layer.weights[i]): (layer, i) for layer, i in slots}
        anchored = []
        for a in self._excluded_arrays:
            weight = None if getattr(a, "_layer", None) is not None else where.get(id(a)) or weight_of(a)
            anchored.append(a if weight is None else Variable(*weight))  # (an array of no weight names none)
        self._excluded_arrays = anchored

    def _decay_ranges(self, total):
        """[(lo, hi), ...] of the flat buffer's runs of decayed weights (a run spans the alignment gaps between its
        weights, which hold zeros): the whole buffer unless some weights are excluded."""
        layout = getattr(self._owner, "_layout", None)
        if not (self._excluded_names or self._excluded_arrays) or not layout:
            return [(0, total)]
        key = (total, self._excluded_names, tuple(map(id, self._excluded_arrays)))
        cached = getattr(self, "_ranges", None)  # (steps reuse them: the layout changes on packing only)
        if cached is None or cached[0] is not layout or cached[1] != key:
            self._ranges = cached = (layout, key, self._runs(layout))
        return cached[2]

    def _listed(self, layer, i, view=None):
        """Whether exclude_from_weight_decay's var_list names weight ``i`` of ``layer`` (its array, its flat-buffer
        ``view``, or a Variable of it)."""
        return any(layer.weights[i] is a or (view is not None and view is a) or (
            getattr(a, "_layer", None) is layer and getattr(a, "_index", None) == i) for a in self._excluded_arrays)

    def decay_exclusions(self, slots):
        """What exclude_from_weight_decay was told, for a saved file: {"var_names": patterns, "weights": [[layer
        name, index], ...] of the (layer, index) ``slots`` var_list named}, or None when nothing is excluded."""
        if not (self._excluded_names or self._excluded_arrays):
            return None
        return {"var_names": list(self._excluded_names),
                "weights": [[layer.name, i] for layer, i in slots if self._listed(layer, i)]}

    def _runs(self, layout):
        pattern = re.compile("|".join(self._excluded_names)) if self._excluded_names else None
        ranges, previous_decayed = [], False
        for layer, i, view, _, lo in sorted(layout, key=lambda entry: entry[4]):
            excluded = self._listed(layer, i, view) or (
                pattern is not None and pattern.search(layer.weight_names[i]) is not None)
            if not excluded and previous_decayed:
                ranges[-1] = (ranges[-1][0], lo + view.size)
            elif not excluded:
                ranges.append((lo, lo + view.size))
            previous_decayed = not excluded
        return ranges

    def get_config(self):
        """The constructor's arguments; a schedule as ``schedules.serialize`` gives it (a plain function as itself:
        such an optimizer cannot be saved)."""
        rate = self._learning_rate
        if isinstance(rate, schedules.LearningRateSchedule):
            rate = schedules.serialize(rate)
        return {"name": self.name, "learning_rate": rate, **{k: getattr(self, k) for k in self._config},
                "weight_decay": self.weight_decay}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        """The optimizer ``get_config`` described (a serialized schedule rebuilt; ``custom_objects`` names your own
        schedule classes)."""
        config = {k: v for k, v in config.items() if k != "name"}
        if isinstance(config.get("learning_rate"), dict):
            config["learning_rate"] = schedules.deserialize(config["learning_rate"], custom_objects)
        return cls(**config)


class SGD(Optimizer):
    name = "sgd"
    _config = ("momentum", "nesterov")

    def __init__(self, learning_rate=0.01, momentum=0.0, nesterov=False, *, weight_decay=None, **keras_arguments):
        super().__init__(learning_rate, weight_decay, **keras_arguments)
        if not 0 <= _number("momentum", momentum) <= 1:
            raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
        self.momentum, self.nesterov = float(momentum), bool(nesterov)
        self._slots = ("momentum",) if self.momentum else ()

    def _update(self, ops, w, g, rates, step):
        ops.sgd_update(w, g, self.state.get("momentum"), rates, step, self.momentum, self.nesterov)


class RMSprop(Optimizer):
    """Keras: v = rho·v + (1 − rho)·g²;  w −= lr·g / sqrt(v + epsilon)  (epsilon inside the root)."""
    name = "rmsprop"
    _config = ("rho", "momentum", "epsilon", "centered")

    def __init__(self, learning_rate=0.001, rho=0.9, momentum=0.0, epsilon=1e-7, centered=False, *,
                 weight_decay=None, **keras_arguments):
        super().__init__(learning_rate, weight_decay, **keras_arguments)
        _check_unit("rho", rho)
        _check_unit("momentum", momentum)
        self.rho, self.momentum = float(rho), float(momentum)
        self.epsilon, self.centered = _epsilon(epsilon), bool(centered)
        self._slots = ("velocity",) + (("momentum",) if self.momentum else ()) + (
            ("average_gradient",) if self.centered else ())

    def _update(self, ops, w, g, rates, step):
        s = self.state
        ops.rmsprop_update(w, g, s["velocity"], s.get("momentum"), s.get("average_gradient"), rates, step,
                           self.rho, self.epsilon, self.momentum, self.centered)


class Adam(Optimizer):
    name = "adam"
    _slots = ("m", "v")
    _config = ("beta_1", "beta_2", "epsilon")

    _KERAS_DEFAULTS = {**Optimizer._KERAS_DEFAULTS, "amsgrad": False}

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7, *, weight_decay=None,
                 **keras_arguments):
        super().__init__(learning_rate, weight_decay, **keras_arguments)
        _check_unit("beta_1", beta_1)
        _check_unit("beta_2", beta_2)
        self.beta_1, self.beta_2, self.epsilon = float(beta_1), float(beta_2), _epsilon(epsilon)

    def _rate(self, t):
        """Adam's step size for step ``t``: the learning rate of that step with the bias correction."""
        return backend.ops().adam_step_size(schedules.resolve(self._learning_rate, t - 1), self.beta_1, self.beta_2, t)

    def _update(self, ops, w, g, rates, step):
        ops.adam_update(w, g, self.state["m"], self.state["v"], rates, step, self.beta_1, self.beta_2,
                        self.epsilon)


class AdamW(Adam):
    """Keras's AdamW: Adam with decoupled weight decay (``weight_decay``, 0.004 by default): each step first
    w −= weight_decay·lr·w, then Adam's update."""
    name = "adamw"

    def __init__(self, learning_rate=0.001, weight_decay=0.004, beta_1=0.9, beta_2=0.999, epsilon=1e-7,
                 **keras_arguments):
        if weight_decay is None:
            raise ValueError("AdamW: weight_decay must be a number (AdamW is Adam with weight decay); for none, "
                             "use Adam")
        super().__init__(learning_rate, beta_1, beta_2, epsilon, weight_decay=weight_decay, **keras_arguments)


def _learning_rate_argument(value):
    """A constructor's learning_rate, checked: a positive finite number, a LearningRateSchedule, or a callable of no
    arguments (Keras's forms)."""
    if isinstance(value, schedules.LearningRateSchedule):
        return value
    if callable(value):
        try:
            inspect.signature(value).bind()
        except TypeError:
            raise TypeError(
                f"learning_rate {value!r} is a function that takes arguments: a function learning rate is called with "
                "none (Keras's rule). For a rate that depends on the step, subclass "
                "keras.optimizers.schedules.LearningRateSchedule (its __call__(step) gets the step) or use "
                "ExponentialDecay, PiecewiseConstantDecay or CosineDecay") from None
        except ValueError:  # no signature to read (some builtins)
            pass
        return value
    rate = _number("learning_rate", value)
    if not rate >= 0:
        raise ValueError(f"learning_rate must be a number >= 0, got {value!r}")
    return schedules.check_rate(rate, "learning_rate")  # kept as Keras keeps it: a float32


def _number(name, value):
    """``value`` as a finite float, or a ValueError naming ``name``."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        number = math.nan
    if isinstance(value, (str, bytes)) or not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return number


def _check_unit(name, value):
    if not 0 <= _number(name, value) < 1:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


def _epsilon(value):
    epsilon = _number("epsilon", value)
    if epsilon < 0:
        raise ValueError(f"epsilon must be a small non-negative number (Keras: 1e-7), got {value!r}")
    return epsilon


OPTIMIZERS = {cls.name: cls for cls in (SGD, RMSprop, Adam, AdamW)}


def get(optimizer):
    """An Optimizer from a name (Keras's defaults) or an instance."""
    if isinstance(optimizer, Optimizer):
        return optimizer
    if isinstance(optimizer, str) and optimizer.lower() in OPTIMIZERS:
        return OPTIMIZERS[optimizer.lower()]()
    raise ValueError(f"unknown optimizer {optimizer!r}; gpucnn knows {sorted(OPTIMIZERS)} "
                     "(as names, or objects such as gpucnn.optimizers.RMSprop(learning_rate=1e-4))")


def __getattr__(name):
    raise missing("gpucnn.optimizers", name, "Keras optimizer", sorted(cls.__name__ for cls in OPTIMIZERS.values())
                  + ["the schedules in gpucnn.optimizers.schedules"])
