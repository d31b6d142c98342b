"""Metrics that ``compile(metrics=[...])`` takes, as Keras names them.

gpucnn computes accuracy: the share of samples whose arg-max output is the true class. ``"accuracy"`` and
``"acc"`` pick the categorical or the sparse form from the loss (Keras does the same from the labels), and the
logs use the name the user wrote (``history.history["acc"]`` for ``metrics=["acc"]``, as Keras 3).
The objects ``Accuracy``, ``CategoricalAccuracy`` and ``SparseCategoricalAccuracy`` log under their ``name``.
"""


class Metric:
    """A metric given as an object: ``name`` is its key in the logs."""

    default_name = None

    def __init__(self, name=None, dtype=None):
        self.name = str(name) if name else self.default_name

    def get_config(self):
        return {"name": self.name}

    def __repr__(self):
        return f"<{type(self).__name__} name={self.name!r}>"


class Accuracy(Metric):
    default_name = "accuracy"


class CategoricalAccuracy(Metric):
    default_name = "categorical_accuracy"


class SparseCategoricalAccuracy(Metric):
    default_name = "sparse_categorical_accuracy"


_NAMES = ("accuracy", "acc", "categorical_accuracy", "sparse_categorical_accuracy")


def get(metric):
    """The log name of a metric given by name or object (the metrics gpucnn computes: accuracy)."""
    if isinstance(metric, Metric):
        return metric.name
    if isinstance(metric, str) and metric in _NAMES:
        return metric
    raise ValueError(f"unknown metric {metric!r}; gpucnn computes accuracy: give 'accuracy' (or 'acc'), "
                     "'categorical_accuracy', 'sparse_categorical_accuracy' or gpucnn.metrics.Accuracy()")


def __getattr__(name):
    if name.startswith("_"):
        raise AttributeError(name)
    raise AttributeError(f"gpucnn.metrics has no {name!r}: gpucnn does not have that Keras metric (yet). It has: "
                         "Accuracy, CategoricalAccuracy, SparseCategoricalAccuracy (and the names "
                         f"{', '.join(_NAMES)})")
