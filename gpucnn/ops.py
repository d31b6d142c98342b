"""``keras.ops``: the few of Keras's array functions that the book's and keras.io's convnet examples call around a
model (adding a batch axis to one image, reading a logit as a probability) and that a learning-rate schedule of
one's own computes with (``ops.exp``, ``ops.cos``, ``ops.minimum``, ``ops.cast``, ``ops.where``, ...), on NumPy
arrays — the results are NumPy arrays with Keras's ``numpy()`` (arrays from the GPU engine are copied to the host
first), float32 where Keras's would be (a Python float in gives float32 out). Anything else of ``keras.ops`` raises
an AttributeError that lists what is here.

    img_array = keras.ops.expand_dims(keras.utils.img_to_array(img), 0)
    score = float(keras.ops.sigmoid(model.predict(img_array)[0][0]))
    return lr * keras.ops.exp(-0.1)          # a LearningRateScheduler's schedule, as Keras's docs write it
"""
import numpy as np

from . import backend
from .activations import sigmoid as _sigmoid, softmax as _softmax
from .utils import eager, missing


def convert_to_numpy(x):
    """``x`` (an array of either engine, a list, a number) as a NumPy array."""
    return np.asarray(backend.to_numpy(x))


def convert_to_tensor(x, dtype=None):
    """``x`` as an array (float32 for floats, as Keras's default), with ``numpy()``."""
    a = convert_to_numpy(x)
    if dtype is None and a.dtype.kind == "f":
        dtype = np.float32
    return eager(np.array(a, dtype=dtype))


def expand_dims(x, axis):
    """``x`` with a new axis of length 1 at ``axis`` (``expand_dims(image, 0)``: a batch of one)."""
    return eager(np.expand_dims(convert_to_numpy(x), axis))


def squeeze(x, axis=None):
    """``x`` without its axes of length 1 (or only ``axis``)."""
    return eager(np.squeeze(convert_to_numpy(x), axis))


def sigmoid(x):
    """1 / (1 + e^-x), elementwise, float32 (a number gives a 0-d array; ``float()`` reads it)."""
    a = convert_to_numpy(x)
    return eager(_sigmoid(np.atleast_1d(a)).reshape(a.shape))


def softmax(x, axis=-1):
    """The softmax of ``x`` over ``axis``, float32."""
    return eager(_softmax(convert_to_numpy(x), axis=axis))


def argmax(x, axis=None):
    """The index of the largest value (over ``axis``; of the flattened array when None)."""
    return eager(np.asarray(np.argmax(convert_to_numpy(x), axis=axis)))


def _float32(a):
    """Keras's dtype rule for these functions here: floats are float32 (its default), other types stay."""
    a = np.asarray(a)
    return a.astype(np.float32) if a.dtype.kind == "f" and a.dtype != np.float32 else a


def _numpy_function(function, name):
    def op(*args):
        return eager(_float32(function(*(_float32(convert_to_numpy(a)) for a in args))))
    op.__name__ = op.__qualname__ = name
    op.__doc__ = f"NumPy's ``{function.__name__}``, elementwise (float32 for floats)."
    return op


_ELEMENTWISE = {name: getattr(np, name) for name in (
    "abs", "absolute", "add", "ceil", "cos", "divide", "equal", "exp", "expm1", "floor", "floor_divide", "greater",
    "greater_equal", "less", "less_equal", "log", "log1p", "logical_and", "logical_not", "logical_or", "maximum",
    "minimum", "mod", "multiply", "negative", "not_equal", "power", "round", "sign", "sin", "sqrt", "square",
    "subtract", "tan", "tanh")}
globals().update({name: _numpy_function(function, name) for name, function in _ELEMENTWISE.items()})


def cast(x, dtype):
    """``x`` as ``dtype`` ("float32", "int32", a NumPy dtype)."""
    return eager(np.asarray(convert_to_numpy(x)).astype(dtype))


def clip(x, x_min, x_max):
    """``x`` limited to [x_min, x_max], elementwise."""
    return eager(_float32(np.clip(_float32(convert_to_numpy(x)), convert_to_numpy(x_min), convert_to_numpy(x_max))))


def where(condition, x1, x2):
    """``x1`` where ``condition`` holds, else ``x2``, elementwise."""
    return eager(_float32(np.where(convert_to_numpy(condition), _float32(convert_to_numpy(x1)),
                                   _float32(convert_to_numpy(x2)))))


def cond(pred, true_fn, false_fn):
    """``true_fn()`` if ``pred`` else ``false_fn()``."""
    return true_fn() if bool(convert_to_numpy(pred)) else false_fn()


def _reduction(function, name):
    def op(x, axis=None, keepdims=False):
        return eager(_float32(function(_float32(convert_to_numpy(x)), axis=axis, keepdims=keepdims)))
    op.__name__ = op.__qualname__ = name
    op.__doc__ = f"NumPy's ``{function.__name__}`` over ``axis`` (all values when None)."
    return op


mean, sum, max, min, prod = (_reduction(f, n) for f, n in ((np.mean, "mean"), (np.sum, "sum"), (np.max, "max"),
                                                              (np.min, "min"), (np.prod, "prod")))

_HERE = tuple(sorted(("argmax", "convert_to_numpy", "convert_to_tensor", "expand_dims", "sigmoid", "softmax",
                      "squeeze", "cast", "clip", "where", "cond", "mean", "sum", "max", "min", "prod",
                      *_ELEMENTWISE)))


def __getattr__(name):
    raise missing("gpucnn.ops", name, "keras.ops function", f"{', '.join(_HERE)} (the few the examples call around "
                  "a model or in a schedule); for anything else use NumPy on keras.ops.convert_to_numpy(x)")
