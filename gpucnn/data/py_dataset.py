"""``PyDataset``: a dataset written in Python as a sequence of batches, as ``keras.utils.PyDataset``.

    class Batches(PyDataset):
        def __init__(self, x, y, batch_size, **kwargs):
            super().__init__(**kwargs)                  # workers=, use_multiprocessing=, max_queue_size=
            self.x, self.y, self.batch_size = x, y, batch_size

        def __len__(self):                              # the number of batches
            return math.ceil(len(self.x) / self.batch_size)

        def __getitem__(self, index):                   # batch `index`: (x, y), or (x,) to predict
            s = slice(index * self.batch_size, (index + 1) * self.batch_size)
            return self.x[s], self.y[s]

``fit`` reads batches ``0 .. len - 1`` each epoch (in a shuffled order when ``fit(shuffle=True)``) and
calls ``on_epoch_begin()`` / ``on_epoch_end()`` around each epoch. With ``workers > 1`` that many threads
read batches ahead, at most ``max_queue_size`` of them; ``use_multiprocessing=True`` is accepted and
read with threads as well. A dataset without an end returns None from ``num_batches`` (and needs
``steps_per_epoch``).
"""

import itertools
import warnings

__all__ = ["PyDataset"]

_DEFAULTS = {"workers": 1, "use_multiprocessing": False, "max_queue_size": 10}


def _setting(name, doc):
    """A property for one of the constructor's settings, warning (as Keras) when ``__init__`` was skipped."""
    attribute = "_" + name

    def get(self):
        self._warn_if_super_not_called()
        return getattr(self, attribute)

    def put(self, value):
        setattr(self, attribute, value)

    return property(get, put, doc=doc)


class PyDataset:
    """Base class of datasets that are Python sequences of batches (see the module's docstring)."""

    def __init__(self, workers=1, use_multiprocessing=False, max_queue_size=10):
        self._workers = workers
        self._use_multiprocessing = use_multiprocessing
        self._max_queue_size = max_queue_size

    workers = _setting("workers", "threads reading batches ahead (1: read in the training loop)")
    use_multiprocessing = _setting("use_multiprocessing", "accepted; batches are read with threads")
    max_queue_size = _setting("max_queue_size", "batches read ahead at most")

    def _warn_if_super_not_called(self):
        missing = [name for name in _DEFAULTS if not hasattr(self, "_" + name)]
        if not missing:
            return
        for name in missing:
            setattr(self, "_" + name, _DEFAULTS[name])
        warnings.warn("Your `PyDataset` class should call `super().__init__(**kwargs)` in its constructor. "
                      "`**kwargs` can include `workers`, `use_multiprocessing`, `max_queue_size`. Do not "
                      "pass these arguments to `fit()`, as they will be ignored.", stacklevel=3)

    def __getitem__(self, index):
        """The batch at position ``index``."""
        raise NotImplementedError(f"{type(self).__name__} must define __getitem__(self, index) returning a batch")

    @property
    def num_batches(self):
        """The number of batches, or None for a dataset without an end (``__len__`` by default)."""
        if hasattr(self, "__len__"):
            return len(self)
        raise NotImplementedError(f"{type(self).__name__} must define __len__ (the number of batches), or a "
                                  "num_batches property (None for a dataset without an end)")

    def __iter__(self):
        """Batches 0, 1, ... in order (to the end, or forever when ``num_batches`` is None)."""
        count = self.num_batches
        for index in (range(count) if count is not None else itertools.count()):
            yield self[index]

    def on_epoch_begin(self):
        """Called at the beginning of every epoch."""

    def on_epoch_end(self):
        """Called at the end of every epoch."""
