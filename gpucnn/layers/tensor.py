"""Symbolic tensors and the nodes that connect layers: what ``keras.Input`` returns and calling a layer on it
builds.

A ``KerasTensor`` has a ``shape`` (batch dimension ``None``) and a ``dtype`` but no values. Calling a layer on
symbolic tensors builds the layer (it learns its input shape) and records a ``Node``: the layer, the tensors it
was called on, and the tensors it produced. A model is the graph of nodes between its input and output tensors
(``gpucnn.models.graph``); a layer called twice has two nodes and one set of weights.
"""
import itertools

import numpy as np

_ids = itertools.count()


class KerasTensor:
    """A symbolic tensor: ``shape`` (a tuple starting with ``None``, the batch), ``dtype``, and the node and
    output index that produced it (``node`` is None for nothing yet; an ``Input`` tensor's node is its
    ``InputLayer``'s)."""

    def __init__(self, shape, dtype="float32", node=None, index=0, name=None):
        self.shape = (None,) + tuple(int(d) for d in shape)
        self.dtype = str(np.dtype(dtype))
        self.node, self.index = node, index
        self.id = next(_ids)
        self.name = name or ("keras_tensor" if self.id == 0 else f"keras_tensor_{self.id}")

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def sample_shape(self):
        """The shape of one sample (without the batch dimension)."""
        return self.shape[1:]

    def __repr__(self):
        return f"<KerasTensor shape={self.shape}, dtype={self.dtype}, name={self.name}>"

    def __array__(self, *args, **kwargs):
        raise TypeError(f"{self!r} is symbolic: it has a shape but no values. Build a model with "
                        "keras.Model(inputs, outputs) and call model.predict(x) to compute values.")

    def __bool__(self):
        raise TypeError("a symbolic KerasTensor has no truth value")

    __hash__ = object.__hash__


class Node:
    """One call of ``layer`` on symbolic ``inputs`` (a list of KerasTensors) producing ``outputs``.
    ``single``: the layer was called on one tensor, not a list (its forward takes an array, not a list).
    ``training``: the ``training=`` the call was written with (None: not given); as Keras, it holds when the model
    itself is called without one (``model(x)``: Monte-Carlo dropout), and fit, evaluate and predict override it."""

    _order = itertools.count()

    def __init__(self, layer, inputs, outputs, single=True, training=None):
        self.layer, self.inputs, self.outputs, self.single = layer, list(inputs), list(outputs), single
        self.training = None if training is None else bool(training)
        self.order = next(Node._order)  # creation order: a topological order of every graph built by calls
        for i, t in enumerate(self.outputs):
            t.node, t.index = self, i

    def __repr__(self):
        return (f"<Node {self.layer.name}: {[t.name for t in self.inputs]} -> "
                f"{[t.name for t in self.outputs]}>")


def is_symbolic(value):
    """Whether ``value`` is a KerasTensor or a (nested) list/tuple holding one."""
    if isinstance(value, KerasTensor):
        return True
    if isinstance(value, (list, tuple)):
        return any(is_symbolic(v) for v in value)
    return False
