"""keras.ops as gpucnn has it: NumPy's functions with Keras's results (float32 for floats, a Python float in gives
float32 out, ``numpy()`` on the result), and Keras 3 as the oracle where it is installed."""
import numpy as np
import pytest

import gpucnn as keras
from gpucnn import ops

UNARY = ("abs", "ceil", "cos", "exp", "expm1", "floor", "log", "log1p", "negative", "round", "sign", "sin", "sqrt",
         "square", "tan", "tanh")
BINARY = ("add", "divide", "equal", "floor_divide", "greater", "greater_equal", "less", "less_equal", "maximum",
          "minimum", "mod", "multiply", "not_equal", "power", "subtract")
X = np.array([0.25, 1.5, 2.75], np.float32)
Y = np.array([2.0, 0.5, 3.0], np.float32)


@pytest.mark.parametrize("name", UNARY)
def test_unary_functions_are_numpys_in_float32(name):
    got = getattr(ops, name)(X)
    np.testing.assert_array_equal(got.numpy(), getattr(np, name)(X))
    assert got.dtype == np.float32
    scalar = getattr(ops, name)(0.5)  # a Python float: a 0-d float32 array, float() reads it
    assert scalar.dtype == np.float32 and scalar.shape == () and float(scalar) == float(getattr(np, name)(np.float32(0.5)))


@pytest.mark.parametrize("name", BINARY)
def test_binary_functions_are_numpys(name):
    got = getattr(ops, name)(X, Y)
    want = getattr(np, name)(X, Y)
    np.testing.assert_array_equal(got, want)
    assert got.dtype == want.dtype  # float32, or bool for the comparisons
    assert getattr(ops, name)(7, 2) == getattr(np, name)(7, 2)  # integers stay integers


def test_cast_clip_where_cond_and_reductions():
    assert ops.cast(3, "float32").dtype == np.float32 and ops.cast(X, "int32").tolist() == [0, 1, 2]
    np.testing.assert_array_equal(ops.clip(X, 0.5, 2.0), [0.5, 1.5, 2.0])
    np.testing.assert_array_equal(ops.where(X > 1, X, 0.0), [0.0, 1.5, 2.75])
    assert ops.where(X > 1, X, 0.0).dtype == np.float32
    assert ops.cond(ops.less(1, 2), lambda: "yes", lambda: "no") == "yes"
    m = np.arange(6, dtype=np.float32).reshape(2, 3)
    for name in ("mean", "sum", "max", "min", "prod"):
        np.testing.assert_array_equal(getattr(ops, name)(m, axis=1), getattr(np, name)(m, axis=1))
        assert getattr(ops, name)(m, axis=0, keepdims=True).shape == (1, 3)
    assert ops.mean([1, 2, 4]).dtype == np.float32  # (Keras: the mean of integers is a float32)
    with pytest.raises(AttributeError, match="no 'einsum'.* It has: abs, absolute, add"):
        ops.einsum


def test_a_learning_rate_computed_with_ops_in_a_schedule():
    """A schedule of one's own written with keras.ops, as keras.io writes them: its rates are Keras's formula's."""
    class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
        def __call__(self, step):
            step = ops.cast(step, "float32")
            warm = 0.1 * step / 10
            cosine = 0.05 * (1 + ops.cos(np.pi * ops.minimum(step, 100.0) / 100.0))
            return ops.where(step < 10, warm, cosine)

    opt = keras.optimizers.SGD(WarmupCosine())
    rates = [float(np.float32(r)) for r in opt.rates_for(1, 120)]
    assert rates[0] == 0.0 and rates[5] == pytest.approx(0.05) and rates[50] == pytest.approx(0.05 * (1 + np.cos(0.5 * np.pi)))
    assert rates[110] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("name", UNARY + BINARY)
def test_ops_match_keras(name):
    k = pytest.importorskip("keras", reason="Keras 3 is the oracle where it is installed (not a dependency)")
    args = (X,) if name in UNARY else (X, Y)
    want = k.ops.convert_to_numpy(getattr(k.ops, name)(*args))
    got = getattr(ops, name)(*args).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got.dtype == want.dtype
