"""Metrics that ``compile(metrics=[...])`` takes, as Keras names them.

gpucnn computes accuracy, the share of correct predictions, in one of three forms: the arg-max output against a
class index (sparse) or against the arg-max of a one-hot (or multi-hot) row (categorical), or each output
thresholded at 0.5 against a 0/1 label (binary). ``"accuracy"`` and ``"acc"`` pick the form as Keras does, from the
loss and the output's shape (``form``); the others name their form, and compile refuses one the labels cannot
give (``kind``). The logs use the name the user wrote (``history.history["acc"]`` for
``metrics=["acc"]``, as Keras 3); a metric object logs under its ``name``.

``Accuracy()`` as an object is Keras's exact-match accuracy (y_pred == y_true), which gpucnn does not compute: it is
refused with the names to use instead.
"""
import numpy as np

from .utils import eager, missing


class Metric:
    """A metric given as an object: ``name`` is its key in the logs; ``kind`` the loss form it needs."""

    default_name = None
    kind = None  # "sparse", "categorical", "binary"

    def __init__(self, name=None, dtype=None):
        self.name = str(name) if name else self.default_name
        self._hits, self._count = 0.0, 0  # (Keras's state; as update_state counts, or fit and evaluate set it)

    def get_config(self):
        return {"name": self.name}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    # ---- Keras's stateful use, outside fit: update_state over batches, result(), reset_state()
    def reset_state(self):
        self._hits, self._count = 0.0, 0

    def update_state(self, y_true, y_pred, sample_weight=None):
        """Count a batch: ``y_pred`` (N, units) as the model outputs it, ``y_true`` as fit takes the labels."""
        from .ops import convert_to_numpy
        if sample_weight is not None:
            raise NotImplementedError(f"{type(self).__name__}.update_state(sample_weight=...): sample weights are not "
                                      "supported by gpucnn")
        hits = self._hits_of(np.asarray(convert_to_numpy(y_true)), np.asarray(convert_to_numpy(y_pred)))
        self._hits += float(np.sum(hits, dtype=np.float64))
        self._count += int(hits.size)

    def _counted(self, hits, count):
        """The state fit or evaluate leaves in a compiled metric object: its running counts, as Keras's."""
        self._hits, self._count = float(hits), int(count)

    def result(self):
        """The accuracy so far (0 before any batch, as Keras), a 0-d float32 array."""
        return eager(np.asarray(self._hits / self._count if self._count else 0.0, np.float32))


    def __repr__(self):
        return f"<{type(self).__name__} name={self.name!r}>"


class Accuracy(Metric):
    """Keras's exact-match accuracy: refused when compiled (gpucnn does not compute it)."""

    default_name = "accuracy"
    kind = "exact"

    def _hits_of(self, y_true, y_pred):  # (outside fit only: compile refuses it)
        y_true, y_pred = _same_rank(y_true, y_pred)
        return y_true == y_pred


class CategoricalAccuracy(Metric):
    default_name = "categorical_accuracy"
    kind = "categorical"

    def _hits_of(self, y_true, y_pred):
        return np.argmax(y_pred, axis=-1) == np.argmax(y_true, axis=-1)


class SparseCategoricalAccuracy(Metric):
    default_name = "sparse_categorical_accuracy"
    kind = "sparse"

    def _hits_of(self, y_true, y_pred):
        if y_true.ndim == y_pred.ndim:  # labels (N, 1), as Keras takes them
            y_true = y_true[..., 0]
        return np.argmax(y_pred, axis=-1) == y_true


def _same_rank(y_true, y_pred):
    """Keras's squeeze_or_expand_to_same_rank, as its accuracy and binary accuracy take it: a trailing axis of 1
    dropped from the one of one more axis (labels (N, 1) against outputs (N,), or the other way)."""
    if y_true.ndim == y_pred.ndim + 1 and y_true.shape[-1] == 1:
        return y_true[..., 0], y_pred
    if y_pred.ndim == y_true.ndim + 1 and y_pred.shape[-1] == 1:
        return y_true, y_pred[..., 0]
    return y_true, y_pred


class BinaryAccuracy(Metric):
    """Each output thresholded (``threshold``: 0.5, Keras's default, the one gpucnn computes) against its 0/1
    label, as Keras — on a ``from_logits=True`` model the logits are thresholded, as Keras does too."""

    default_name = "binary_accuracy"
    kind = "binary"

    def __init__(self, name=None, dtype=None, threshold=0.5):
        super().__init__(name, dtype)
        if threshold != 0.5:
            raise NotImplementedError(f"BinaryAccuracy(threshold={threshold!r}): gpucnn counts binary accuracy at "
                                      "threshold 0.5 only (Keras's default)")
        self.threshold = 0.5

    def get_config(self):
        return {"name": self.name, "threshold": self.threshold}

    def _hits_of(self, y_true, y_pred):
        y_true, y_pred = _same_rank(y_true, y_pred)
        return (y_pred > self.threshold).astype(np.float32) == y_true  # (Keras's: a soft label never matches)


_KINDS = {"accuracy": None, "acc": None, "categorical_accuracy": "categorical",
          "sparse_categorical_accuracy": "sparse", "binary_accuracy": "binary"}
_NAMES = tuple(_KINDS)


def get(metric):
    """The log name of a metric given by name or object (the metrics gpucnn computes: accuracy)."""
    if isinstance(metric, Accuracy) and type(metric) is Accuracy:
        raise ValueError("keras.metrics.Accuracy() counts predictions exactly equal to the labels (Keras), which "
                         "gpucnn does not compute; for a classifier give metrics=['accuracy'] (the right form for "
                         "the loss), or SparseCategoricalAccuracy(), CategoricalAccuracy() or BinaryAccuracy()")
    if isinstance(metric, Metric) and type(metric) in (CategoricalAccuracy, SparseCategoricalAccuracy, BinaryAccuracy):
        return metric.name
    if isinstance(metric, Metric):  # a class of the user's: fit would log gpucnn's accuracy under its name
        raise ValueError(f"compile(metrics=[{type(metric).__name__}(...)]): fit computes gpucnn's own accuracies only "
                         "(it does not run a metric class's update_state); give 'accuracy' or one of "
                         "CategoricalAccuracy(), SparseCategoricalAccuracy(), BinaryAccuracy(), and compute your "
                         "metric from model.predict(...) after fit (its update_state / result work there)")
    if isinstance(metric, str) and metric in _NAMES:
        return metric
    raise ValueError(f"unknown metric {metric!r}; gpucnn computes accuracy: give 'accuracy' (or 'acc'), "
                     "'categorical_accuracy', 'sparse_categorical_accuracy', 'binary_accuracy', or the objects "
                     "CategoricalAccuracy(), SparseCategoricalAccuracy(), BinaryAccuracy()")


def kind(metric, loss):
    """The form of accuracy ``metric`` counts ("binary", "categorical", "sparse", or None: "accuracy", whose form
    comes from the loss and the output's shape, ``form``), refusing one that cannot be read from ``loss``'s labels
    (a sparse accuracy without class indices, a categorical or binary one with them)."""
    wanted = metric.kind if isinstance(metric, Metric) else _KINDS[metric]
    labels = natural_form(loss)
    if wanted is not None and (wanted == "sparse") != (labels == "sparse"):
        name = metric.name if isinstance(metric, Metric) else metric
        needs = "class indices (sparse_categorical_crossentropy)" if wanted == "sparse" else \
            "one-hot or 0/1 labels (categorical or binary cross-entropy)"
        raise ValueError(f"metric {name!r} needs {needs}; this model's loss is {loss.name}: give "
                         "metrics=['accuracy'], which takes the form that fits the loss")
    return wanted


def form(kinds, loss, units):
    """The one form of accuracy a model with these metric ``kinds`` (``kind``'s answers), ``loss`` and ``units``
    outputs counts. "accuracy" is Keras's choice by shape: binary for one sigmoid unit, categorical (arg-max) for
    more, sparse or categorical from the labels otherwise. Two different forms at once are not supported."""
    natural = natural_form(loss)
    auto = "categorical" if natural == "binary" and units > 1 else natural
    forms = {auto if k is None else k for k in kinds}
    if len(forms) > 1:
        raise NotImplementedError(f"these metrics count accuracy in {len(forms)} forms ({', '.join(sorted(forms))}); "
                                  "gpucnn counts one form of accuracy per model: keep one of them")
    return forms.pop() if forms else natural


def natural_form(loss):
    return "binary" if loss.name == "binary_crossentropy" else ("sparse" if loss.sparse else "categorical")


def serialize(metric):
    """A metric as a saved file holds it: its name, or an object's class and config."""
    return metric if isinstance(metric, str) else {"class_name": type(metric).__name__, "config": metric.get_config()}


def deserialize(config):
    """The metric ``serialize`` wrote (ValueError for anything else)."""
    if isinstance(config, str):
        return config
    classes = {cls.__name__: cls for cls in (CategoricalAccuracy, SparseCategoricalAccuracy, BinaryAccuracy)}
    if not (isinstance(config, dict) and config.get("class_name") in classes and isinstance(config.get("config"), dict)
            and set(config["config"]) <= {"name", "threshold"}):
        raise ValueError(f"unknown metric {config!r}")
    return classes[config["class_name"]](**config["config"])


def __getattr__(name):
    raise missing("gpucnn.metrics", name, "Keras metric", "BinaryAccuracy, CategoricalAccuracy, "
                  f"SparseCategoricalAccuracy (and the names {', '.join(_NAMES)})")
