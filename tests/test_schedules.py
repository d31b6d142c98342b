"""Learning-rate schedules (gpucnn/schedules.py): Keras 3's formulas by hand, the arguments it refuses, the
rates ``resolve`` refuses, saving; and Keras itself as the oracle where it can be imported (it is not a
dependency: those tests skip without it)."""
import json
import math

import numpy as np
import pytest

from gpucnn import schedules
from gpucnn.schedules import CosineDecay, ExponentialDecay, LearningRateSchedule, PiecewiseConstantDecay


# ===================================================================================== the formulas
def test_exponential_decay_by_hand():
    lr = ExponentialDecay(0.1, decay_steps=10, decay_rate=0.5)
    assert lr(0) == 0.1
    assert lr(10) == pytest.approx(0.05, rel=1e-15)
    assert lr(20) == pytest.approx(0.025, rel=1e-15)
    assert lr(5) == pytest.approx(0.1 * math.sqrt(0.5), rel=1e-15)  # smooth between the decay points
    stairs = ExponentialDecay(0.1, decay_steps=10, decay_rate=0.5, staircase=True)
    assert [stairs(s) for s in (0, 9, 10, 19, 20)] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025], rel=1e-15)


def test_piecewise_constant_boundaries_belong_to_the_interval_below():
    lr = PiecewiseConstantDecay([100, 110], [1.0, 0.5, 0.1])
    assert [lr(s) for s in (0, 100, 101, 110, 111, 10**6)] == [1.0, 1.0, 0.5, 0.5, 0.1, 0.1]
    assert isinstance(lr(np.int64(3)), float)
    assert PiecewiseConstantDecay([], [0.3])(7) == 0.3


def test_cosine_decay_by_hand():
    lr = CosineDecay(0.2, decay_steps=100, alpha=0.1)
    assert lr(0) == pytest.approx(0.2, rel=1e-15)
    assert lr(50) == pytest.approx(0.2 * (0.9 * 0.5 + 0.1), rel=1e-12)  # halfway: the cosine term is 1/2
    assert lr(100) == pytest.approx(0.2 * 0.1, rel=1e-12)  # the end: alpha of the start
    assert lr(1000) == lr(100)  # and it stays there
    assert lr(25) == pytest.approx(0.2 * (0.9 * 0.5 * (1 + math.cos(math.pi / 4)) + 0.1), rel=1e-12)
    assert CosineDecay(0.2, 100)(100) == pytest.approx(0.0, abs=1e-18)  # alpha 0: down to (about) zero


def test_cosine_decay_with_warmup_by_hand():
    # Keras's own example starts the warmup at 0
    lr = CosineDecay(0.0, decay_steps=100, warmup_target=0.1, warmup_steps=10, alpha=0.5)
    assert lr(0) == 0.0
    assert lr(5) == pytest.approx(0.05, rel=1e-15)  # linear warmup
    assert lr(10) == pytest.approx(0.1, rel=1e-15)  # the target, where the decay starts
    assert lr(60) == pytest.approx(0.1 * (0.5 * 0.5 + 0.5), rel=1e-12)  # halfway through the decay
    assert lr(110) == pytest.approx(0.05, rel=1e-12) and lr(10**6) == lr(110)
    no_warmup_steps = CosineDecay(0.3, decay_steps=10, warmup_target=0.2)
    assert no_warmup_steps(0) == pytest.approx(0.2, rel=1e-15)  # the decay starts from the target at once


# ===================================================================================== bad arguments
def test_inverse_time_polynomial_and_restarts_by_hand():
    """Each formula at a few steps, written out (the Keras oracle below checks them against Keras itself)."""
    inv = schedules.InverseTimeDecay(0.1, 10, 0.5)
    assert inv(0) == 0.1 and inv(10) == pytest.approx(0.1 / 1.5) and inv(15) == pytest.approx(0.1 / 1.75)
    assert schedules.InverseTimeDecay(0.1, 10, 0.5, staircase=True)(15) == pytest.approx(0.1 / 1.5)
    poly = schedules.PolynomialDecay(0.1, 10, end_learning_rate=0.01, power=2.0)
    assert poly(0) == 0.1 and poly(5) == pytest.approx(0.09 * 0.25 + 0.01) and poly(10) == poly(99) == 0.01
    cyc = schedules.PolynomialDecay(0.1, 10, end_learning_rate=0.0, cycle=True)
    assert cyc(15) == pytest.approx(0.1 * (1 - 15 / 20)) and cyc(10) == pytest.approx(0.0)
    sgdr = schedules.CosineDecayRestarts(1.0, 10, t_mul=2.0, m_mul=0.5)
    assert sgdr(0) == 1.0 and sgdr(5) == pytest.approx(0.5)  # half-way through the first period of 10
    assert sgdr(10) == pytest.approx(0.5) and sgdr(20) == pytest.approx(0.25)  # restarts at 10 and 10 + 20 = 30
    assert sgdr(30) == pytest.approx(0.25)
    shrinking = schedules.CosineDecayRestarts(1.0, 3, t_mul=0.5)  # periods 3, 1.5, 0.75, ...: 6 steps in all
    assert shrinking(3) == pytest.approx(1.0) and shrinking(4.5) == pytest.approx(1.0)  # restarts at 3 and 4.5
    assert 0 <= shrinking(5) <= 1
    with pytest.raises(ValueError, match=r"t_mul=0.5\): with t_mul < 1 .* together last 6 steps, so step 6 has no rate"):
        shrinking(6)


@pytest.mark.parametrize("build, match", [
    (lambda: ExponentialDecay(0.1, 0, 0.9), "decay_steps must be > 0"),
    (lambda: ExponentialDecay(0.1, -5, 0.9), "decay_steps must be > 0"),
    (lambda: ExponentialDecay(0.1, 10, -0.5), "decay_rate must be > 0"),
    (lambda: ExponentialDecay(float("nan"), 10, 0.5), "initial_learning_rate must be a finite number"),
    (lambda: ExponentialDecay("0.1", 10, 0.5), "initial_learning_rate must be a finite number"),
    (lambda: PiecewiseConstantDecay([10, 20], [1.0, 0.5]), "one more value than boundaries"),
    (lambda: PiecewiseConstantDecay([20, 10], [1.0, 0.5, 0.1]), "strictly increasing"),
    (lambda: PiecewiseConstantDecay([10, 10], [1.0, 0.5, 0.1]), "strictly increasing"),
    (lambda: PiecewiseConstantDecay([10], [1.0, None]), "each value must be a finite number"),
    (lambda: CosineDecay(0.1, 0), "decay_steps must be > 0"),
    (lambda: CosineDecay(0.1, 100, alpha=1.5), r"alpha .* must be in \[0, 1\]"),
    (lambda: CosineDecay(0.1, 100, warmup_target=0.2, warmup_steps=-1), "warmup_steps must be >= 0"),
    (lambda: CosineDecay(0.1, 100, warmup_target=float("inf"), warmup_steps=5), "warmup_target must be"),
    (lambda: schedules.InverseTimeDecay(0.1, 0, 0.5), "decay_steps must be > 0"),
    (lambda: schedules.PolynomialDecay(0.1, 10, power=-1), "power must be >= 0"),
    (lambda: schedules.CosineDecayRestarts(0.1, 10, t_mul=0), "t_mul must be > 0"),
])
def test_bad_arguments_are_refused_clearly(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize("step", [-1, float("nan"), "3", None, True])
def test_a_bad_step_is_refused(step):
    with pytest.raises(ValueError, match="the step must be a number >= 0"):
        ExponentialDecay(0.1, 10, 0.5)(step)


def test_a_schedule_without_call_or_config_says_what_to_implement():
    class Half(LearningRateSchedule):
        pass

    with pytest.raises(NotImplementedError, match=r"Half must implement __call__\(self, step\)"):
        Half()(3)
    with pytest.raises(NotImplementedError, match="get_config"):
        Half().get_config()


# ===================================================================================== resolve (the optimizers)
class Halving(LearningRateSchedule):
    """A user's schedule, as Keras's documentation writes one."""

    def __init__(self, initial_learning_rate):
        self.initial_learning_rate = initial_learning_rate

    def __call__(self, step):
        return self.initial_learning_rate / (step + 1)

    def get_config(self):
        return {"initial_learning_rate": self.initial_learning_rate}


def test_resolve_numbers_schedules_and_callables():
    assert schedules.resolve(0.01, 5) == float(np.float32(0.01))  # the float32 rate the update uses (Keras's too)
    assert schedules.resolve(np.float32(0.5), 0) == 0.5
    assert schedules.resolve(Halving(0.1), 4) == pytest.approx(0.02)
    assert schedules.resolve(ExponentialDecay(0.1, 10, 0.5), 10) == pytest.approx(0.05)
    assert schedules.resolve(lambda: 0.003, 99) == float(np.float32(0.003))  # a plain callable takes no step (Keras's rule)
    assert schedules.resolve(CosineDecay(0.0, 10, warmup_target=0.1, warmup_steps=5), 0) == 0.0  # zero is a rate


@pytest.mark.parametrize("bad, error, match", [
    (Halving(float("nan")), ValueError, r"Halving\(initial_learning_rate=nan\) gives at step 3 is nan"),
    (Halving(float("inf")), ValueError, "a learning rate must be a finite number >= 0"),
    (Halving(-0.1), ValueError, "is -0.025"),
    (ExponentialDecay(1e300, 1, 1e10), ValueError, "is inf"),  # overflows to inf by step 3
    (lambda: float("nan"), ValueError, r"<lambda>\(\) returns is nan"),
    (lambda: "fast", TypeError, "must be a number"),
    ("0.1", TypeError, "the learning rate must be a number"),
    (True, TypeError, "must be a number"),
])
def test_resolve_refuses_a_rate_that_is_not_a_finite_number_at_least_zero(bad, error, match):
    with pytest.raises(error, match=match):
        schedules.resolve(bad, 3)


# ===================================================================================== saving
@pytest.mark.parametrize("schedule", [
    ExponentialDecay(0.1, 1000, 0.96, staircase=True),
    PiecewiseConstantDecay([100, 200], [0.1, 0.01, 0.001]),
    CosineDecay(0.0, 500, alpha=0.05, warmup_target=0.1, warmup_steps=50),
    schedules.InverseTimeDecay(0.1, 100, 0.5, staircase=True),
    schedules.PolynomialDecay(0.1, 100, 0.01, power=2.0, cycle=True),
    schedules.CosineDecayRestarts(0.1, 50, t_mul=2.0, m_mul=0.8, alpha=0.05),
], ids=lambda s: type(s).__name__)
def test_config_and_serialize_round_trips(schedule):
    again = type(schedule).from_config(schedule.get_config())
    text = json.dumps(schedules.serialize(schedule))
    restored = schedules.deserialize(json.loads(text))
    assert type(restored) is type(schedule) and restored.get_config() == schedule.get_config()
    for step in (0, 1, 49, 50, 99, 100, 101, 250, 10_000):
        assert again(step) == restored(step) == schedule(step)


def test_deserialize_builds_known_classes_only():
    with pytest.raises(ValueError, match="unknown learning rate schedule 'Halving'.*custom_objects"):
        schedules.deserialize(schedules.serialize(Halving(0.1)))
    restored = schedules.deserialize(schedules.serialize(Halving(0.1)), custom_objects={"Halving": Halving})
    assert restored(1) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="class_name"):
        schedules.deserialize({"config": {}})
    with pytest.raises(TypeError, match="LearningRateSchedule"):
        schedules.serialize(0.1)


# ===================================================================================== Keras as the oracle
STEPS = [0, 1, 7, 99, 100, 101, 149, 150, 151, 999, 1000, 1001, 5000]
KERAS_CASES = [
    ("ExponentialDecay", dict(initial_learning_rate=0.1, decay_steps=100, decay_rate=0.96)),
    ("ExponentialDecay", dict(initial_learning_rate=0.05, decay_steps=150, decay_rate=0.5, staircase=True)),
    ("PiecewiseConstantDecay", dict(boundaries=[100, 1000], values=[0.1, 0.01, 0.001])),
    ("CosineDecay", dict(initial_learning_rate=0.1, decay_steps=1000)),
    ("CosineDecay", dict(initial_learning_rate=0.1, decay_steps=1000, alpha=0.2)),
    ("CosineDecay", dict(initial_learning_rate=0.0, decay_steps=850, warmup_target=0.1, warmup_steps=150)),
    ("CosineDecay", dict(initial_learning_rate=0.01, decay_steps=500, alpha=0.1, warmup_target=0.2,
                         warmup_steps=100)),
    ("InverseTimeDecay", dict(initial_learning_rate=0.1, decay_steps=100, decay_rate=0.5)),
    ("InverseTimeDecay", dict(initial_learning_rate=0.1, decay_steps=150, decay_rate=2.0, staircase=True)),
    ("PolynomialDecay", dict(initial_learning_rate=0.1, decay_steps=1000)),
    ("PolynomialDecay", dict(initial_learning_rate=0.1, decay_steps=150, end_learning_rate=0.01, power=2.0,
                             cycle=True)),
    ("PolynomialDecay", dict(initial_learning_rate=0.1, decay_steps=100, end_learning_rate=0.02, power=0.5)),
    ("CosineDecayRestarts", dict(initial_learning_rate=0.1, first_decay_steps=100)),
    ("CosineDecayRestarts", dict(initial_learning_rate=0.1, first_decay_steps=150, t_mul=1.0, m_mul=0.5, alpha=0.1)),
    ("CosineDecayRestarts", dict(initial_learning_rate=0.1, first_decay_steps=100, t_mul=3.0, m_mul=0.9)),
]


@pytest.mark.parametrize("name, kwargs", KERAS_CASES)
def test_rates_match_keras(name, kwargs):
    keras = pytest.importorskip("keras", reason="Keras 3 is the oracle where it is installed (not a dependency)")
    theirs = getattr(keras.optimizers.schedules, name)(**kwargs)
    ours = getattr(schedules, name)(**kwargs)
    peak = max(ours(step) for step in STEPS)
    for step in STEPS:
        want = float(keras.ops.convert_to_numpy(theirs(step)))
        # Keras computes in float32: a few float32 roundings of the rate, and of the peak rate near zero
        assert ours(step) == pytest.approx(want, rel=2e-6, abs=2e-7 * peak), (name, kwargs, step)
