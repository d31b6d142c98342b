"""Losses: categorical and sparse categorical cross-entropy, as Keras computes them.

The maths is the engine's (``crossentropy_forward`` and its gradients in ``ops_*.py``); this module names
the losses, checks the labels a user passes, and picks the fused softmax gradient when it applies.
"""
import numpy as np


class Loss:
    """Keras's constructor: ``from_logits`` (only False for now), ``reduction`` (only Keras's default, the
    mean over the batch) and ``name`` (accepted; the loss is known by its kind, as ``self.name``)."""
    name = None
    sparse = False

    def __init__(self, from_logits=False, reduction="sum_over_batch_size", name=None):
        if from_logits:
            raise ValueError(f"{type(self).__name__}(from_logits=True) is not supported by gpucnn yet: end "
                             "the model with a softmax (e.g. Dense(10, activation='softmax')) and leave "
                             "from_logits=False")
        if reduction not in ("sum_over_batch_size", "auto"):
            raise ValueError(f"{type(self).__name__}: reduction={reduction!r} is not supported; gpucnn's "
                             "losses are the mean over the batch (reduction='sum_over_batch_size')")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"{type(self).__name__}: name must be a string, got {name!r}")

    def check_labels(self, y, units, what="y"):
        """Validate labels for a model with ``units`` outputs; return them as float32 / int32."""
        y = np.asarray(y)
        if y.dtype.kind not in "biuf":
            raise TypeError(f"{what} must hold numbers, got dtype {y.dtype}")
        if y.dtype.kind == "f" and not np.all(np.isfinite(y)):
            bad = int(np.flatnonzero((~np.isfinite(y.reshape(len(y), -1))).any(axis=1))[0])
            raise ValueError(f"{what} contains NaN or infinity (first at sample {bad})")
        return self._check(y, units, what)

    def get_config(self):
        return {"name": self.name}


class CategoricalCrossentropy(Loss):
    """Cross-entropy against one-hot labels of shape (N, classes)."""
    name = "categorical_crossentropy"

    def _check(self, y, units, what):
        if y.ndim != 2 or y.shape[1] != units:
            hint = (" Integer labels: one-hot encode them with gpucnn.utils.to_categorical(y), or "
                    "compile with loss='sparse_categorical_crossentropy'." if y.ndim == 1 else "")
            raise ValueError(f"categorical_crossentropy needs one-hot {what} of shape (N, {units}) for "
                             f"this model's {units} outputs, got shape {y.shape}.{hint}")
        if y.size and (y.min() < 0 or y.max() > 1):
            raise ValueError(f"one-hot {what} must lie in [0, 1], found values from {y.min()} to {y.max()}")
        return y.astype(np.float32)


class SparseCategoricalCrossentropy(Loss):
    """Cross-entropy against integer class labels of shape (N,) (or (N, 1))."""
    name = "sparse_categorical_crossentropy"
    sparse = True

    def _check(self, y, units, what):
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim != 1:
            hint = (" These look one-hot: use loss='categorical_crossentropy'."
                    if y.ndim == 2 and y.shape[1] == units else "")
            raise ValueError(f"sparse_categorical_crossentropy needs integer {what} of shape (N,), "
                             f"got shape {y.shape}.{hint}")
        if y.dtype.kind == "f" and np.any(y != np.round(y)):
            raise ValueError(f"sparse_categorical_crossentropy needs integer class labels; {what} has "
                             "non-integral values")
        bad = np.flatnonzero((y < 0) | (y >= units))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"label {y[i].item()!r} at index {i} of {what} is out of range: this model has "
                             f"{units} outputs, so labels must be in 0..{units - 1}")
        return y.astype(np.int32)


LOSSES = {cls.name: cls for cls in (CategoricalCrossentropy, SparseCategoricalCrossentropy)}


def get(loss):
    """A Loss from a name or an instance."""
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, str) and loss.lower() in LOSSES:
        return LOSSES[loss.lower()]()
    raise ValueError(f"unknown loss {loss!r}; gpucnn knows {sorted(LOSSES)}")
