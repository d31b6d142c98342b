"""Losses as Keras computes them: categorical, sparse categorical and binary cross-entropy (``from_logits`` too).

The maths is the engine's (``crossentropy_*`` and ``binary_crossentropy_*`` in the op modules); a loss here
names it, checks the labels a user passes, and says which output activation it folds into its gradient: a
softmax output under a categorical cross-entropy and a sigmoid output under a binary one train with the
gradient taken straight at the logits (``fused_activation``, ``fused_gradient``), as Keras's TensorFlow backend
does. The loss reported is the clipped one of Keras's conventions (probabilities clipped to [1e-7, 1 − 1e-7], as
the torch and jax backends report it); those backends also differentiate the clip, which gives no gradient at all
to a sample whose probability is clipped (a confidently wrong one) — gpucnn keeps the logits' gradient p − y there.
What ``"accuracy"`` counts under each loss is ``gpucnn.metrics``'s (Keras's rule, by the loss and the output's
shape).
"""
import numpy as np

from .utils import eager, missing


class Loss:
    """Keras's constructor: ``from_logits`` (the model outputs logits: the loss applies the softmax/sigmoid),
    ``label_smoothing`` (binary and categorical cross-entropy), ``reduction`` (only Keras's default, the mean over
    the batch) and ``name`` (accepted; the loss is known by its kind, as ``self.name``)."""
    name = None
    sparse = False
    fused_activation = None  # the output activation whose gradient the loss takes at the logits

    def __init__(self, from_logits=False, label_smoothing=0.0, reduction="sum_over_batch_size", name=None,
                 axis=-1, dtype=None):
        if reduction not in ("sum_over_batch_size", "auto", None):
            raise ValueError(f"{type(self).__name__}: gpucnn reduces the loss as the mean over the batch "
                             f"(reduction='sum_over_batch_size'), got reduction={reduction!r}")
        if axis != -1:
            raise ValueError(f"{type(self).__name__}: gpucnn computes the loss over the last axis only (axis=-1)")
        if not isinstance(from_logits, (bool, np.bool_)):
            raise ValueError(f"{type(self).__name__}: from_logits must be True or False, got {from_logits!r}")
        self.from_logits = bool(from_logits)
        self.label_smoothing = float(label_smoothing)
        if not 0 <= self.label_smoothing <= 1:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"{type(self).__name__}: name must be a string, got {name!r}")
        self.display_name = name or self.name

    def check_labels(self, y, units, what="y"):
        """Validate labels for a model with ``units`` outputs; return them as float32 / int32."""
        y = np.asarray(y)
        if y.dtype.kind not in "biuf":
            raise TypeError(f"{what} must hold numbers, got dtype {y.dtype}")
        if y.dtype.kind == "f" and not np.all(np.isfinite(y)):
            bad = int(np.flatnonzero((~np.isfinite(y.reshape(len(y), -1))).any(axis=1))[0])
            raise ValueError(f"{what} contains NaN or infinity (first at sample {bad})")
        return self._check(y, units, what)

    def __call__(self, y_true, y_pred, sample_weight=None):
        """The mean loss of a batch, as Keras's ``loss_fn(y_true, y_pred)`` (its quickstart's idiom): a 0-d float32
        array (``float()`` or ``.numpy()`` reads it); ``y_pred`` (N, units), the labels as ``fit`` takes them."""
        from .engines import numpy_ops
        from .ops import convert_to_numpy
        if sample_weight is not None:
            raise NotImplementedError(f"{type(self).__name__}(...)(y_true, y_pred, sample_weight=...): sample weights "
                                      "are not supported by gpucnn")
        p = np.asarray(convert_to_numpy(y_pred), np.float32)
        if p.ndim == 1 and isinstance(self, BinaryCrossentropy):
            p = p[:, None]
        if p.ndim != 2:
            raise ValueError(f"{type(self).__name__}: y_pred must be a batch of outputs (N, units), got shape {p.shape}")
        y = self.check_labels(convert_to_numpy(y_true), p.shape[1], "y_true")
        if len(y) != len(p):
            raise ValueError(f"{type(self).__name__}: y_true has {len(y)} samples and y_pred {len(p)}: they must match")
        return eager(np.asarray(np.mean(self.per_sample(numpy_ops, p, y), dtype=np.float64), np.float32))

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def fuses(self, activation):
        """Whether this loss takes its gradient at the logits of an output with ``activation``."""
        return not self.from_logits and activation is not None and activation == self.fused_activation

    def smoothing(self, units):
        """(keep, offset): the targets are labels · keep + offset under ``label_smoothing`` s — Keras's y·(1 - s) +
        s / K for K one-hot classes (``_Categorical``), y·(1 - s) + s / 2 for binary labels; (1, 0) without."""
        s = self.label_smoothing
        return np.float32(1 - s), np.float32(0.5 * s)

    def get_config(self):
        config = {"name": self.name}
        if self.from_logits:
            config["from_logits"] = True
        if self.label_smoothing:
            config["label_smoothing"] = self.label_smoothing
        return config


class _Categorical(Loss):
    fused_activation = "softmax"

    def __init__(self, from_logits=False, label_smoothing=0.0, **kwargs):
        super().__init__(from_logits=from_logits, label_smoothing=label_smoothing, **kwargs)
        if self.label_smoothing and self.sparse:
            raise TypeError("SparseCategoricalCrossentropy takes no label_smoothing (nor does Keras's): one-hot "
                            "encode the labels (gpucnn.utils.to_categorical) and use "
                            "CategoricalCrossentropy(label_smoothing=...)")

    def check_labels(self, y, units, what="y"):
        if units == 1:
            raise ValueError(f"{self.name} needs a model with two output units or more, this one has one: a softmax "
                             "over one unit is always 1, so the loss would be 0 and the accuracy 1 whatever the "
                             "data. For two classes, use Dense(1, activation='sigmoid') with "
                             "loss='binary_crossentropy' (0/1 labels), or Dense(2, activation='softmax') with "
                             f"{self.name}")
        return super().check_labels(y, units, what)

    def smoothing(self, units):
        # s / K divided in float32, as Keras divides by its float32 class count (its TensorFlow and JAX backends
        # round that quotient once; the torch backend multiplies by the reciprocal, which may differ in the last bit)
        return np.float32(1 - self.label_smoothing), np.float32(self.label_smoothing) / np.float32(units)

    def _targets(self, y):
        """The labels the loss compares with: one-hot ``y`` itself, or with ``label_smoothing`` s Keras's
        y·(1 − s) + s / K (an engine array; made at each call, as the labels stay the user's)."""
        if not self.label_smoothing:
            return y
        keep, offset = self.smoothing(y.shape[-1])
        return y * keep + offset

    def per_sample(self, ops, p, y):
        return ops.crossentropy_forward(p, self._targets(y), self.sparse, self.from_logits)

    def gradient(self, ops, p, y):
        return ops.crossentropy_backward(p, self._targets(y), self.sparse, self.from_logits)

    def fused_gradient(self, ops, p, y):
        return ops.softmax_crossentropy_backward(p, self._targets(y), self.sparse)

    @staticmethod
    def predictions(p):
        return p.shape[0]


class CategoricalCrossentropy(_Categorical):
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


class SparseCategoricalCrossentropy(_Categorical):
    """Cross-entropy against integer class labels of shape (N,) (or (N, 1))."""
    name = "sparse_categorical_crossentropy"
    sparse = True

    def __init__(self, from_logits=False, ignore_class=None, **kwargs):
        if ignore_class is not None:  # (Keras's config holds it, None)
            raise NotImplementedError(f"SparseCategoricalCrossentropy(ignore_class={ignore_class!r}) is not supported "
                                      "by gpucnn yet: every label counts")
        super().__init__(from_logits=from_logits, **kwargs)

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


class BinaryCrossentropy(Loss):
    """Binary cross-entropy of independent sigmoid outputs (N, units) against 0/1 labels of the same shape
    ((N,) labels for one unit are taken as (N, 1), as Keras does)."""
    name = "binary_crossentropy"
    fused_activation = "sigmoid"

    def _check(self, y, units, what):
        if y.ndim == 1 and units == 1:
            y = y[:, None]
        if y.ndim != 2 or y.shape[1] != units:
            raise ValueError(f"binary_crossentropy needs {what} of shape (N, {units}) (or (N,) for one output), "
                             f"got shape {y.shape}")
        if y.size and (y.min() < 0 or y.max() > 1):
            raise ValueError(f"binary_crossentropy needs {what} in [0, 1], found values from {y.min()} to "
                             f"{y.max()}")
        return y.astype(np.float32)

    def per_sample(self, ops, p, y):
        return ops.binary_crossentropy_forward(p, y, self.from_logits, self.label_smoothing)

    def gradient(self, ops, p, y):
        return ops.binary_crossentropy_backward(p, y, self.from_logits, self.label_smoothing)

    def fused_gradient(self, ops, p, y):
        return ops.sigmoid_binary_crossentropy_backward(p, y, self.label_smoothing)

    @staticmethod
    def predictions(p):
        return p.size


LOSSES = {cls.name: cls for cls in (CategoricalCrossentropy, SparseCategoricalCrossentropy, BinaryCrossentropy)}


def get(loss):
    """A Loss from a name or an instance."""
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, str) and loss.lower() in LOSSES:
        return LOSSES[loss.lower()]()
    if callable(loss):
        raise ValueError(f"gpucnn takes losses by name or as gpucnn.losses objects, not functions ({loss!r}); "
                         f"use one of {sorted(LOSSES)}")
    raise ValueError(f"unknown loss {loss!r}; gpucnn knows {sorted(LOSSES)}")


def __getattr__(name):
    raise missing("gpucnn.losses", name, "Keras loss", [cls.__name__ for cls in LOSSES.values()])
