"""``Variable``: a layer's weight as Keras's variables read — what ``layer.kernel``, ``model.weights``,
``model.trainable_weights`` and friends give.

A layer's weights are arrays that training moves: the model gathers its trainable weights into one flat buffer when
it trains (``Model._pack_weights``) and again when which layers train changes, and each weight becomes a view into
it. A Variable names the weight (its layer and index), not one array, so it always reads and writes the layer's
current values: a reference taken before ``fit`` sees the trained weights after it, and ``assign`` reaches the
model. It converts to a NumPy array wherever one is expected (``np.asarray(v)``, ufuncs, ``v * 2``, indexing).
"""
import numpy as np

from .. import backend


class Variable:
    """Weight ``index`` of ``layer``: ``name`` ("kernel", "bias", ...), ``path`` ("dense/kernel"), ``trainable``,
    ``shape``, ``dtype``; ``numpy()``, ``assign``, ``assign_add``, ``assign_sub``; NumPy interoperability."""

    __slots__ = ("_layer", "_index")

    def __init__(self, layer, index):
        self._layer, self._index = layer, index

    @property
    def value(self):
        """The layer's current array of this weight (an engine array)."""
        return self._layer.weights[self._index]

    @property
    def name(self):
        return self._layer.weight_names[self._index]

    @property
    def path(self):
        """Keras's: the layer's name and the weight's, after the name of the Sequential model that built the layer
        (``sequential/dense/kernel``; a functional model's layers are built outside it: ``dense/kernel``)."""
        return f"{getattr(self._layer, '_path_prefix', '')}{self._layer.name}/{self.name}"

    @property
    def trainable(self):
        return bool(self._layer.trainable and self._layer._weight_trainable[self._index])

    @property
    def shape(self):
        return tuple(self.value.shape)

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def size(self):
        return int(np.prod(self.shape))

    @property
    def dtype(self):
        return "float32"

    def numpy(self):
        """The values as a NumPy array (a copy)."""
        return np.array(backend.to_numpy(self.value), dtype=np.float32)

    def assign(self, value):
        self.value[...] = backend.ops().xp.asarray(np.asarray(value, dtype=np.float32))
        return self

    def assign_add(self, delta):
        return self.assign(self.numpy() + np.asarray(delta, np.float32))

    def assign_sub(self, delta):
        return self.assign(self.numpy() - np.asarray(delta, np.float32))

    def __array__(self, dtype=None, copy=None):
        return np.asarray(backend.to_numpy(self.value), dtype=dtype)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        inputs = [np.asarray(v) if isinstance(v, Variable) else v for v in inputs]
        out = kwargs.get("out")
        if out is not None:  # out=variable: the result computed, then assigned to the layer's weight
            targets = out if isinstance(out, tuple) else (out,)
            if any(isinstance(t, Variable) for t in targets):
                kwargs["out"] = tuple(None if isinstance(t, Variable) else t for t in targets)
                if all(t is None for t in kwargs["out"]):
                    del kwargs["out"]
                result = getattr(ufunc, method)(*inputs, **kwargs)
                results = result if isinstance(result, tuple) else (result,)
                for t, r in zip(targets, results):
                    if isinstance(t, Variable):
                        t.assign(r)
                return out
        return getattr(ufunc, method)(*inputs, **kwargs)

    def __getitem__(self, key):
        return np.asarray(self)[key]

    def __setitem__(self, key, value):
        self.value[key] = value

    def __len__(self):
        return self.shape[0]

    def __iter__(self):
        return iter(np.asarray(self))

    def copy(self):
        return self.numpy()

    def __getattr__(self, name):  # the rest of an array's reading methods: v.sum(), v.mean(), v.T, v.reshape(...)
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(np.asarray(self), name)

    def __repr__(self):
        return f"<Variable path={self.path}, shape={self.shape}, dtype=float32, value={np.asarray(self)!r}>"

    def _op(self, other, op):
        return op(np.asarray(self), np.asarray(other) if isinstance(other, Variable) else other)

    def __add__(self, other): return self._op(other, np.add)
    def __radd__(self, other): return np.add(other, np.asarray(self))
    def __sub__(self, other): return self._op(other, np.subtract)
    def __rsub__(self, other): return np.subtract(other, np.asarray(self))
    def __mul__(self, other): return self._op(other, np.multiply)
    def __rmul__(self, other): return np.multiply(other, np.asarray(self))
    def __truediv__(self, other): return self._op(other, np.true_divide)
    def __rtruediv__(self, other): return np.true_divide(other, np.asarray(self))
    def __neg__(self): return -np.asarray(self)
    def __pos__(self): return +np.asarray(self)
    def __abs__(self): return np.abs(np.asarray(self))
    def __pow__(self, other): return self._op(other, np.power)
    def __rpow__(self, other): return np.power(other, np.asarray(self))
    def __floordiv__(self, other): return self._op(other, np.floor_divide)
    def __mod__(self, other): return self._op(other, np.mod)
    def __matmul__(self, other): return self._op(other, np.matmul)
    def __rmatmul__(self, other): return np.matmul(other, np.asarray(self))
    def __lt__(self, other): return self._op(other, np.less)
    def __le__(self, other): return self._op(other, np.less_equal)
    def __gt__(self, other): return self._op(other, np.greater)
    def __ge__(self, other): return self._op(other, np.greater_equal)

    # in place: the layer's weight changes (``v -= 1`` as on Keras's variables)
    def __iadd__(self, other): return self.assign(self._op(other, np.add))
    def __isub__(self, other): return self.assign(self._op(other, np.subtract))
    def __imul__(self, other): return self.assign(self._op(other, np.multiply))
    def __itruediv__(self, other): return self.assign(self._op(other, np.true_divide))

    # the same weight is the same variable (``in``, ``index``, ``==`` between lists): a Variable names a slot
    def __eq__(self, other):
        if isinstance(other, Variable):
            return self._layer is other._layer and self._index == other._index
        return NotImplemented

    def __ne__(self, other):
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    def __hash__(self):
        return hash((id(self._layer), self._index))
