"""``keras.ops``: the few of Keras's array functions that the book's and keras.io's convnet examples call around a
model (adding a batch axis to one image, reading a logit as a probability), on NumPy arrays — the results are
NumPy arrays with Keras's ``numpy()`` (arrays from the GPU engine are copied to the host first). Anything else of
``keras.ops`` raises an AttributeError that lists what is here.

    img_array = keras.ops.expand_dims(keras.utils.img_to_array(img), 0)
    score = float(keras.ops.sigmoid(model.predict(img_array)[0][0]))
"""
import numpy as np

from . import backend
from .activations import sigmoid as _sigmoid, softmax as _softmax
from .utils import eager, missing


def convert_to_numpy(x):
    """``x`` (an array of either engine, a list, a number) as a NumPy array."""
    return np.asarray(backend.to_numpy(x) if backend.is_engine_array(x) else x)


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
    return eager(_sigmoid(np.atleast_1d(convert_to_numpy(x))).reshape(np.shape(x)))


def softmax(x, axis=-1):
    """The softmax of ``x`` over ``axis``, float32."""
    return eager(_softmax(convert_to_numpy(x), axis=axis))


def argmax(x, axis=None):
    """The index of the largest value (over ``axis``; of the flattened array when None)."""
    return eager(np.asarray(np.argmax(convert_to_numpy(x), axis=axis)))


_HERE = ("argmax", "convert_to_numpy", "convert_to_tensor", "expand_dims", "sigmoid", "softmax", "squeeze")


def __getattr__(name):
    raise missing("gpucnn.ops", name, "keras.ops function", f"{', '.join(_HERE)} (the few the examples call around "
                  "a model); for anything else use NumPy on keras.ops.convert_to_numpy(x)")
