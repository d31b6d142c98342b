"""Read the pickles some published data sets come as, without ever running code from them.

A pickle can name any importable callable and have it called; :class:`NumpyOnlyUnpickler` resolves
only the three names a numpy array needs (both spellings of numpy's module), so dicts, lists, numbers,
strings and numpy arrays load, and anything else (``os.system``, ``builtins.exec``, ...) is refused
before it is even imported.
"""

import pickle

import numpy as np

try:  # numpy >= 2 moved numpy.core to numpy._core
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy < 2
    from numpy.core.multiarray import _reconstruct

__all__ = ["NumpyOnlyUnpickler"]

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler whose only globals are numpy's array constructors."""

    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: only numpy arrays, lists, dicts, numbers and "
                "strings are accepted") from None
