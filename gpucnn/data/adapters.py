"""The one place that turns what ``fit`` / ``evaluate`` / ``predict`` receive into batches.

    adapter = adapt(x, y=None, batch_size=None, steps=None, shuffle=False, what="x")
    for x_batch, y_batch in adapter.batches(epoch):   # x_batch float32 NumPy, y_batch NumPy or None
        ...
    adapter.close()                                   # or: with adapt(...) as adapter:

``x`` may be

- arrays (NumPy, an engine array, anything ``numpy.asarray`` takes) with ``y`` (or None to predict):
  batches of ``batch_size`` (default 32; with ``steps`` and no batch size, ``ceil(n / steps)`` as Keras),
  in a new order each epoch when ``shuffle`` (drawn from ``gpucnn.utils.rng()``). ``adapter.arrays`` is
  then ``(x, y)`` as given (not cast), for a loop that keeps the whole set on the engine;
- a dataset such as ``image_dataset_from_directory``'s, or any other iterable that can be iterated
  again: one pass is one epoch;
- a ``PyDataset`` (or any sequence: ``__len__`` and ``__getitem__``, e.g. a list of ``(x, y)`` tuples):
  batches ``0 .. len - 1``, shuffled each epoch when ``shuffle``, with the dataset's ``on_epoch_begin`` /
  ``on_epoch_end`` called around each epoch and ``workers`` threads reading ahead when it asks for them;
- a generator or other iterator (read once): an epoch runs until it ends, or for ``steps`` batches.

Each item must be a tuple ``(x, y)`` or ``(x,)`` (lists are taken as tuples; datasets and PyDatasets may
also yield ``x`` alone), numeric, x and y of the same length. ``(x, y, sample_weight)`` is refused, as is
``y`` passed beside a dataset, generator or PyDataset. ``batch_size`` and ``shuffle`` are ignored for
what is not arrays (those batch and order themselves; a generator cannot be reordered).

``steps`` (``steps_per_epoch`` / ``validation_steps`` / ``steps``) as Keras 3 uses it: each epoch takes
``steps`` batches, continuing where the previous epoch stopped, and a new pass starts when one ends. When
the data runs out before ``steps`` batches, the epoch ends early with Keras's warning ("Your input ran
out of data; interrupting training. ..."); a finite source then starts a new pass the next epoch, but a
generator is spent: ``adapter.exhausted`` becomes True, and ``fit`` should stop training (Keras's
"interrupting training"). A generator without ``steps`` is one epoch long; a later epoch finds it
exhausted (the warning, no batches). An error the data raises (a generator raising mid-epoch, a failing
``__getitem__``) reaches the caller unchanged, and the next epoch starts a new pass.

The adapter's attributes:

- ``num_batches``: batches per epoch: ``steps`` when given, else the known length, else None;
- ``batch_size``: for arrays, else None; ``arrays``: ``(x, y)`` for arrays, else None;
- ``exhausted``: a generator has run dry (training should stop);
- ``batches(epoch)``: an iterator over one epoch's ``(x_batch float32, y_batch or None)``; it may yield
  nothing (an exhausted generator), which the caller must allow for;
- ``peek()``: the first batch, standardized, without consuming it (to build a model, check labels);
- ``warn_exhausted()``: Keras's warning, once per adapter; ``close()``: stops any background reading.
"""

import collections.abc
import itertools
import math
import warnings

import numpy as np

from .. import backend
from ..utils import rng
from ._prefetch import ordered_map, prefetched
from .images import ImageDataset
from .py_dataset import PyDataset

__all__ = ["OUT_OF_DATA_WARNING", "Adapter", "adapt"]

OUT_OF_DATA_WARNING = ("Your input ran out of data; interrupting training. Make sure that your dataset or "
                       "generator can generate at least `steps_per_epoch * epochs` batches. You may need to "
                       "use the `.repeat()` function when building your dataset.")


def adapt(x, y=None, batch_size=None, steps=None, shuffle=False, what="x"):
    """An :class:`Adapter` giving the batches of ``x`` (and ``y``); see the module's docstring.

    ``what`` names the data in error messages ("x", "validation_data", ...).
    """
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, (int, np.integer))
                              or steps < 1):
        raise ValueError(f"steps for {what} must be a positive integer or None, got {steps!r}")
    steps = None if steps is None else int(steps)
    if isinstance(x, collections.abc.Mapping):
        raise TypeError(f"{what} is a dict: gpucnn models take one input array (or a dataset of (x, y) "
                        "batches), not named inputs")
    if is_arrays(x, y):
        return _ArrayAdapter(x, y, batch_size, steps, shuffle, what)
    if isinstance(x, PyDataset) or _is_sequence(x):
        kind = "PyDataset" if isinstance(x, PyDataset) else "sequence of batches"
        adapter = _SequenceAdapter
    elif isinstance(x, collections.abc.Iterator):
        kind, adapter = "generator", _GeneratorAdapter
    elif isinstance(x, collections.abc.Iterable):
        kind, adapter = "dataset", _DatasetAdapter
    else:
        raise TypeError(f"{what} must be NumPy arrays, a dataset (e.g. image_dataset_from_directory's), a "
                        f"generator or iterable of (x, y) batches, or a PyDataset; got {type(x).__name__}")
    if y is not None:
        raise ValueError(f"When providing `{what}` as a {kind}, `y` should not be passed. Instead, the "
                         f"targets should be included as part of the {kind}.")
    return adapter(x, steps, shuffle, what)


def is_arrays(x, y):
    if isinstance(x, np.ndarray) or backend.is_engine_array(x):
        return True
    if isinstance(x, (list, tuple)):  # a list of (x, y) tuples is a sequence of batches; else an array
        return y is not None or not (x and all(isinstance(item, tuple) for item in x))
    return (hasattr(x, "__array__") or hasattr(x, "__array_interface__")) and not isinstance(x, PyDataset)


def _is_sequence(x):
    return (hasattr(x, "__len__") and hasattr(x, "__getitem__") and not isinstance(x, (str, bytes))
            and not isinstance(x, collections.abc.Iterator))


def _numeric(value, label):
    """``value`` as a NumPy array with a batch axis, or a clear error."""
    value = backend.to_numpy(value)
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{label} is not an array ({e})") from None
    if array.dtype.kind not in "biuf":
        raise TypeError(f"{label} must be numeric (floats, or integers / uint8 to be cast), got dtype "
                        f"{array.dtype}")
    if array.ndim == 0:
        raise ValueError(f"{label} is a scalar, not a batch: its first axis must be the batch axis")
    return array


class Adapter:
    """Batches of one source, epoch by epoch (see the module's docstring)."""

    kind = ""
    batch_size = None
    arrays = None
    _bare_ok = True  # whether an item may be x alone rather than a tuple
    _persistent = False  # whether the pass is the source itself (a generator), kept across epochs

    def __init__(self, x, steps, what):
        self.x, self.steps, self.what = x, steps, what
        self.exhausted = False
        self._pass = None
        self._first = None
        self._warned = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------------------ what each kind defines
    def _open_pass(self):
        """A fresh iterator over the raw items of one pass."""
        raise NotImplementedError

    def _epoch_begin(self):
        pass

    def _epoch_end(self):
        pass

    # ------------------------------------------------------------------------------ shared
    def reset(self):
        """What Keras's epoch iterator does as it is reset, before fit's first epoch, before each validation and
        evaluate (not predict): the dataset's ``on_epoch_end`` once, so a PyDataset that reshuffles there has done
        so before its first batch, as in Keras."""
        self._epoch_end()

    restarts = False  # validation data: each epoch from the first batch again (a generator cannot)

    def batches(self, epoch=0):
        """One epoch's ``(x_batch, y_batch)`` pairs (see the module's docstring); ``epoch`` (from 0) is
        named in error messages. With ``restarts`` each epoch starts a new pass (Keras validates on the same
        ``validation_steps`` batches every epoch); otherwise a pass goes on where the last epoch left it."""
        if self.restarts and not self._persistent:
            self._end_pass()
        self._epoch_begin()
        n = 0
        try:
            while self.steps is None or n < self.steps:
                if self.exhausted:
                    self.warn_exhausted()
                    return
                fresh = self._pass is None
                if fresh:
                    self._pass = self._open_pass()
                try:
                    item = next(self._pass)
                except StopIteration:
                    if not self._persistent:
                        self._end_pass()
                    if fresh:
                        raise ValueError(f"{self.what} gave no batches: it is empty") from None
                    if self._persistent:  # a generator is spent
                        self.exhausted = True
                        if self.steps is not None or n == 0:
                            self.warn_exhausted()
                        return
                    if self.steps is None:  # a whole pass was the epoch
                        return
                    if n == 0:  # the last pass ended with the previous epoch
                        continue
                    warnings.warn(OUT_OF_DATA_WARNING, UserWarning, stacklevel=2)
                    return
                except BaseException:
                    if not self._persistent:
                        self._end_pass()  # the next epoch starts a new pass
                    raise
                yield self._standardize(item, n, epoch)
                n += 1
        finally:
            if self.steps is None and not self._persistent:
                self._end_pass()  # a full-pass epoch left early: the next one starts afresh
            self._epoch_end()

    def peek(self):
        """The first batch ``(x, y)``, standardized, without consuming it."""
        if self._first is None:
            self._first = self._peek()
        return self._standardize(self._first, 0)

    def _peek(self):
        items = self._open_pass()
        try:
            return next(items)
        except StopIteration:
            raise ValueError(f"{self.what} gave no batches: it is empty") from None
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    def warn_exhausted(self):
        """Keras's "ran out of data" warning, once per adapter."""
        if not self._warned:
            self._warned = True
            warnings.warn(OUT_OF_DATA_WARNING, UserWarning, stacklevel=3)

    def close(self):
        """Stop reading ahead (background threads end) and drop the current pass."""
        if not self._persistent:
            self._end_pass()

    def _end_pass(self):
        items, self._pass = self._pass, None
        close = getattr(items, "close", None)
        if close is not None:
            close()

    def _standardize(self, item, index, epoch=0):
        """``item`` as ``(x float32, y or None)``, or a clear error naming the batch."""
        label = f"{self.what} batch {index} (epoch {epoch + 1})"
        if isinstance(item, list):
            item = tuple(item)
        if not isinstance(item, tuple):
            if not self._bare_ok:
                raise ValueError(f"{label}: a {self.kind} must yield tuples, either (inputs,) or (inputs, "
                                 f"targets); got a {type(item).__name__}")
            item = (item,)
        if len(item) == 3 and item[2] is not None:
            raise ValueError(f"{label} is (x, y, sample_weight): sample weights are not supported; yield "
                             "(x, y) batches")
        if len(item) not in (1, 2, 3):
            raise ValueError(f"{label} has {len(item)} elements; a batch is (inputs,) or (inputs, targets)")
        x = _numeric(item[0], f"{label} inputs")
        y = None if len(item) == 1 or item[1] is None else _numeric(item[1], f"{label} targets")
        if y is not None and len(y) != len(x):
            raise ValueError(f"{label} has {len(x)} inputs but {len(y)} targets: they must match")
        if len(x) == 0:
            raise ValueError(f"{label} is empty")
        return x.astype(np.float32, copy=False), y


def check_shuffle(shuffle):
    """``fit``'s ``shuffle``: True, False (or what reads as one), or Keras's "batch"; another string is refused."""
    if isinstance(shuffle, str) and shuffle != "batch":
        raise ValueError(f"shuffle must be True, False or 'batch' (the same batches each epoch, each one's samples in "
                         f"a new order), got {shuffle!r}")
    return shuffle if shuffle == "batch" else bool(shuffle)


def epoch_order(n, batch_size, shuffle):
    """The order of n samples for one epoch (drawn from ``gpucnn.utils.rng()``): a new one (``shuffle`` True), the
    samples' own (False), or Keras's "batch": the same batches of ``batch_size`` each epoch, each one's samples in a
    new order."""
    if shuffle != "batch":
        return rng().permutation(n) if shuffle else np.arange(n)
    order = np.arange(n)
    for start in range(0, n, batch_size):
        rng().shuffle(order[start:start + batch_size])
    return order


class _ArrayAdapter(Adapter):
    kind = "arrays"

    def __init__(self, x, y, batch_size, steps, shuffle, what):
        super().__init__(x, steps, what)
        x = _numeric(x, what)
        if y is not None:
            y = _numeric(y, f"targets of {what}")
            if len(y) != len(x):
                raise ValueError(f"{what} has {len(x)} samples but its targets have {len(y)}: they must match")
        if len(x) == 0:
            raise ValueError(f"{what} is empty (shape {x.shape}): there are no samples")
        if batch_size is None:
            batch_size = math.ceil(len(x) / steps) if steps else 32
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.batch_size = int(batch_size)
        self.arrays = (x, y)
        self.shuffle = shuffle
        self.num_batches = steps or math.ceil(len(x) / self.batch_size)

    def _open_pass(self):
        x, y = self.arrays
        order = epoch_order(len(x), self.batch_size, self.shuffle)
        for start in range(0, len(x), self.batch_size):
            index = order[start:start + self.batch_size]
            yield (x[index],) if y is None else (x[index], y[index])

    def _peek(self):
        x, y = self.arrays
        return (x[:self.batch_size],) if y is None else (x[:self.batch_size], y[:self.batch_size])


class _SequenceAdapter(Adapter):
    kind = "PyDataset"

    def __init__(self, x, steps, shuffle, what):
        super().__init__(x, steps, what)
        self.length = x.num_batches if isinstance(x, PyDataset) else len(x)
        if self.length is not None and self.length < 1:
            raise ValueError(f"{what} has no batches (its length is {self.length})")
        self.num_batches = steps or self.length
        self.shuffle = shuffle
        self.workers = max(int(getattr(x, "workers", 1) or 1), 1)
        self.depth = max(int(getattr(x, "max_queue_size", 10) or 10), 1)

    def _open_pass(self):
        if self.length is None:
            order = itertools.count()
        else:
            order = rng().permutation(self.length).tolist() if self.shuffle else range(self.length)
        if self.workers <= 1:
            return (self.x[i] for i in order)
        return prefetched(lambda: ordered_map(self.x.__getitem__, order, self.workers, self.depth),
                          self.depth, "gpucnn-pydataset")

    def _peek(self):
        return self.x[0]

    def _epoch_begin(self):
        getattr(self.x, "on_epoch_begin", lambda: None)()

    def _epoch_end(self):
        getattr(self.x, "on_epoch_end", lambda: None)()


class _DatasetAdapter(Adapter):
    kind = "dataset"

    def __init__(self, x, steps, shuffle, what):
        super().__init__(x, steps, what)
        if isinstance(x, ImageDataset) and x.batch_size is None:
            raise ValueError(f"{what} yields single images (made with batch_size=None); give "
                             "image_dataset_from_directory a batch_size to train or predict on it")
        self.num_batches = steps or (len(x) if hasattr(x, "__len__") else None)

    def _open_pass(self):
        return iter(self.x)


class _GeneratorAdapter(Adapter):
    kind = "generator"
    _bare_ok = False
    _persistent = True

    def __init__(self, x, steps, shuffle, what):
        super().__init__(x, steps, what)
        self.num_batches = steps

    def _open_pass(self):
        return self.x  # opened once: a peek() has already put its first item back in front

    def _peek(self):
        try:
            first = next(self.x)
        except StopIteration:
            raise ValueError(f"{self.what} gave no batches: it is empty") from None
        self._pass = itertools.chain([first], self.x)  # the first epoch starts with it
        return first
