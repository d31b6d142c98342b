"""Callbacks with Keras's hook names, and ``History``, which ``fit`` returns; ``EarlyStopping``,
``ModelCheckpoint`` and ``TerminateOnNaN`` behave as Keras's.

A callback may set ``self.model.stop_training = True`` to end training after the current epoch.
"""
import collections.abc
import csv
import inspect
import io
import math
import os
import string
import warnings

import numpy as np

from . import backend, saving, schedules
from .utils import atomic_write, missing


class Callback:
    """Base class: override any of Keras's hooks. ``self.model`` and ``self.params`` are set by fit.

    A callback whose batch hooks may read or change the model sees it exactly as after each step, and gets
    that step's logs; on the GPU's fast path that means waiting for the device every step. A callback that
    can do with less in its batch hooks can set ``batch_hooks_use_model = False`` to let the steps run ahead:
    there its hooks then get the logs of the latest step the fast path has read (it reads about every 50 steps
    and at the epoch's end; ``{}`` before the first read of an epoch)."""

    batch_hooks_use_model = True

    def __init__(self):
        self.model = None
        self.params = {}

    def set_model(self, model):
        self.model = model

    def set_params(self, params):
        self.params = params

    def on_train_begin(self, logs=None): pass
    def on_train_end(self, logs=None): pass
    def on_epoch_begin(self, epoch, logs=None): pass
    def on_epoch_end(self, epoch, logs=None): pass
    def on_batch_begin(self, batch, logs=None): pass
    def on_batch_end(self, batch, logs=None): pass

    def on_train_batch_begin(self, batch, logs=None):  # Keras's older name is called from here, as Keras does
        self.on_batch_begin(batch, logs=logs)

    def on_train_batch_end(self, batch, logs=None):
        self.on_batch_end(batch, logs=logs)

    def on_test_begin(self, logs=None): pass
    def on_test_end(self, logs=None): pass
    def on_test_batch_begin(self, batch, logs=None): pass
    def on_test_batch_end(self, batch, logs=None): pass
    def on_predict_begin(self, logs=None): pass
    def on_predict_end(self, logs=None): pass
    def on_predict_batch_begin(self, batch, logs=None): pass
    def on_predict_batch_end(self, batch, logs=None): pass


class History(Callback):
    """Records each epoch's logs: ``history.history["loss"]``, ``["val_accuracy"]``, ...; ``epoch``."""

    def __init__(self):
        super().__init__()
        self.history = {}
        self.epoch = []

    def on_train_begin(self, logs=None):
        self.history, self.epoch = {}, []

    def on_epoch_end(self, epoch, logs=None):
        self.epoch.append(epoch)
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(value)


class CallbackList:
    """Calls a hook on every callback, in order, always with a ``logs`` dict (``{}`` where there are none yet), as
    Keras does: a hook written ``def on_epoch_begin(self, epoch, logs)`` or that reads ``logs.keys()`` works."""

    def __init__(self, callbacks=None, model=None, params=None, **more_params):
        self.callbacks = as_list(callbacks)
        params = {**(params or {}), **more_params}
        for cb in self.callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"callbacks must be gpucnn.callbacks.Callback instances, got {cb!r}")
            if model is not None:
                cb.set_model(model)
            cb.set_params(params)

    def batch_hooks_use_model(self):
        """Whether any callback has its own train-batch hook (on its class or set on the instance) that
        may read or change the model there."""
        return any(cb.batch_hooks_use_model and any(_own(cb, hook) for hook in (
            "on_train_batch_begin", "on_train_batch_end", "on_batch_begin", "on_batch_end")) for cb in self.callbacks)

    def has_own(self, hook):
        """Whether any callback has its own ``hook`` (not the base class's, which does nothing)."""
        return any(_own(cb, hook) for cb in self.callbacks)

    def __getattr__(self, hook):
        if not hook.startswith("on_"):
            raise AttributeError(hook)

        at = 1 if "epoch" in hook or "batch" in hook else 0  # on_epoch_*(epoch, logs), on_*_batch_*(batch, logs)

        def call(*args, logs=None):
            logs = (args[at] if len(args) > at else None) if logs is None else logs
            logs = {} if logs is None else logs
            for cb in self.callbacks:
                if "batch" in hook:  # as Keras passes them: batch hooks' logs by keyword, the others' by position
                    getattr(cb, hook)(*args[:at], logs=logs)
                else:
                    getattr(cb, hook)(*args[:at], logs)
        return call


def _own(cb, name):
    """Whether callback ``cb``'s hook ``name`` is its own (on its class or set on the instance)."""
    hook = getattr(cb, name)
    return getattr(hook, "__func__", hook) is not getattr(Callback, name)


def as_list(callbacks):
    """``callbacks`` (None, one callback, or a list or tuple of them, as Keras takes them) as a new list."""
    if callbacks is None:
        return []
    if isinstance(callbacks, Callback):
        return [callbacks]
    if isinstance(callbacks, CallbackList):
        return list(callbacks.callbacks)
    if not isinstance(callbacks, (list, tuple)):
        raise TypeError(f"callbacks must be a list of gpucnn.callbacks.Callback instances (or one of them), "
                        f"got {callbacks!r}")
    return list(callbacks)


# ===================================================================================== Keras's callbacks
def _direction(monitor, mode, who, metrics=()):
    """"min" or "max" for ``monitor`` under ``mode``; with "auto": "min" for a loss, "max" for an accuracy (by its name,
    or one of ``metrics``, the model's metric names: gpucnn's metrics are accuracies, all higher-is-better, as
    Keras reads each metric's direction); None when neither tells."""
    if mode not in ("auto", "min", "max"):
        raise ValueError(f"{who}: mode must be 'auto', 'min' or 'max', got {mode!r}")
    if mode != "auto":
        return mode
    base = monitor[4:] if monitor.startswith("val_") else monitor
    if base == "loss":
        return "min"
    if base in ("acc", "accuracy") or base in metrics:
        return "max"
    return None


class _Monitoring(Callback):
    """What EarlyStopping, ModelCheckpoint and ReduceLROnPlateau share: whether ``monitor`` should fall or rise. In
    "auto" mode a name that does not tell (a metric's own name, such as "val_sparse_categorical_accuracy") is read
    against the model's metrics when training begins, as Keras does; one still unknown is refused then, before any
    training."""

    def _watch(self, monitor, mode, min_delta=0):
        self.monitor, self._mode, self._delta = monitor, mode, abs(min_delta)
        self._better = None
        direction = _direction(monitor, mode, type(self).__name__)
        if direction is not None:
            self._set_direction(direction)

    def _set_direction(self, direction):
        self._better = (lambda a, b: a < b) if direction == "min" else (lambda a, b: a > b)
        self._sign = -1 if direction == "min" else 1
        self.min_delta = self._sign * self._delta  # an improvement must beat the best by |min_delta|
        self._direction_known()

    def _direction_known(self):
        """What a callback sets once the direction is known (ModelCheckpoint: its worst first best)."""

    def on_train_begin(self, logs=None):
        self._know_direction()

    def _know_direction(self):
        """Read the direction from the model's metrics if the name did not tell (on_train_begin; each epoch's end
        too, for a subclass whose on_train_begin does not call this one's)."""
        if self._better is not None:
            return
        direction = _direction(self.monitor, self._mode, type(self).__name__, getattr(self.model, "metrics", ()))
        if direction is None:
            raise ValueError(f"{type(self).__name__}: cannot tell whether {self.monitor!r} should rise or fall (it is "
                             "not the loss nor one of this model's metrics); pass mode='min' or mode='max'")
        self._set_direction(direction)


class EarlyStopping(_Monitoring):
    """Stop training when ``monitor`` has not improved by more than ``min_delta`` for ``patience`` epochs.

    ``baseline``: training also stops if the value does not beat it within ``patience`` epochs.
    ``restore_best_weights``: at the end of training, set the weights of the best epoch back (Keras 3).
    """

    def __init__(self, monitor="val_loss", min_delta=0, patience=0, verbose=0, mode="auto",
                 baseline=None, restore_best_weights=False, start_from_epoch=0):
        super().__init__()
        self.patience, self.verbose = int(patience), verbose
        self.baseline, self.restore_best_weights = baseline, restore_best_weights
        self.start_from_epoch = int(start_from_epoch)
        self._watch(monitor, mode, min_delta)

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self.wait, self.stopped_epoch, self.best_epoch = 0, 0, 0
        self.best, self.best_weights = None, None

    def _improves(self, value, reference):
        return reference is None or self._better(value - self.min_delta, reference)

    def on_epoch_end(self, epoch, logs=None):
        self._know_direction()
        current = (logs or {}).get(self.monitor)
        if current is None:
            warnings.warn(f"EarlyStopping is conditioned on {self.monitor!r}, which is not in the logs; "
                          f"available: {sorted(logs or {})}", stacklevel=2)
            return
        if epoch < self.start_from_epoch:
            return
        if self.restore_best_weights and self.best_weights is None:
            self.best_weights = self.model.get_weights()  # restore something even if nothing improves
        self.wait += 1
        if self._improves(current, self.best):
            self.best, self.best_epoch = current, epoch
            if self.restore_best_weights:
                self.best_weights = self.model.get_weights()
            if self.baseline is None or self._improves(current, self.baseline):
                self.wait = 0
            return
        if self.wait >= self.patience and epoch > 0:
            self.stopped_epoch = epoch
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        if self.stopped_epoch > 0 and self.verbose:
            print(f"Epoch {self.stopped_epoch + 1}: early stopping")
        if self.restore_best_weights and self.best_weights is not None:
            if self.verbose:
                print(f"Restoring model weights from the end of the best epoch: {self.best_epoch + 1}.")
            self.model.set_weights(self.best_weights)


class ModelCheckpoint(_Monitoring):
    """Save the model (``save_weights_only``: its weights) at the end of every epoch.

    ``filepath`` may hold ``{epoch:02d}`` and any log key, e.g. ``"ckpt-{epoch:02d}-{val_loss:.3f}.gpucnn"``.
    ``save_best_only``: write only when ``monitor`` improves on the best value seen so far.
    Files are written atomically (see ``gpucnn.saving``).
    """

    def __init__(self, filepath, monitor="val_loss", verbose=0, save_best_only=False,
                 save_weights_only=False, mode="auto", save_freq="epoch", initial_value_threshold=None):
        super().__init__()
        if save_freq != "epoch":
            raise NotImplementedError(f"ModelCheckpoint(save_freq={save_freq!r}): gpucnn saves at the end of each "
                                      "epoch only (save_freq='epoch', Keras's default)")
        self.filepath, self.verbose = os.fspath(filepath), verbose
        if save_weights_only:
            saving.check_weights_path(self.filepath, "ModelCheckpoint(save_weights_only=True)")
        _formatted_path(self.filepath, 1, {})  # a bad format is refused now, not after an epoch of training
        self.save_best_only, self.save_weights_only, self.save_freq = save_best_only, save_weights_only, save_freq
        self.best = initial_value_threshold  # None: the worst value, once the direction is known
        self._seen_best = initial_value_threshold is not None  # Keras prints "None" before a first best
        self._watch(monitor, mode)

    def _direction_known(self):
        if self.best is None:
            self.best = -self._sign * math.inf

    def on_epoch_end(self, epoch, logs=None):
        self._know_direction()
        logs = logs or {}
        try:
            path = self.filepath.format(epoch=epoch + 1, **logs)
        except KeyError as exc:
            raise KeyError(f"ModelCheckpoint: filepath {self.filepath!r} names {exc}, which is not in the "
                           f"logs; available: ['epoch'] + {sorted(logs)}") from None
        except (ValueError, IndexError, TypeError) as exc:
            raise ValueError(f"ModelCheckpoint: filepath {self.filepath!r} does not format with this epoch's "
                             f"logs ({exc})") from None
        if self.save_best_only:
            current = logs.get(self.monitor)
            if current is None:  # Keras 3 warns and saves, as without save_best_only
                warnings.warn(f"ModelCheckpoint can save the best model only with {self.monitor!r} in the "
                              f"logs (available: {sorted(logs)}); saving this epoch's model", stacklevel=2)
                self._save(path)
                return
            best = f"{self.best:.5f}" if self._seen_best else "None"
            if not self._better(current, self.best):
                if self.verbose:
                    print(f"\nEpoch {epoch + 1}: {self.monitor} did not improve from {best}")
                return
            if self.verbose:
                print(f"\nEpoch {epoch + 1}: {self.monitor} improved from {best} to "
                      f"{current:.5f}, saving model to {path}")
            self.best, self._seen_best = current, True
        elif self.verbose:
            print(f"\nEpoch {epoch + 1}: saving model to {path}")
        self._save(path)

    def _save(self, path):
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        (self.model.save_weights if self.save_weights_only else self.model.save)(path)


class _AnyLogs(dict):
    def __missing__(self, key):
        return 0.5  # a log value stands for any


def _formatted_path(filepath, epoch, logs):
    """ModelCheckpoint's check of its filepath at construction: formatted with ``epoch`` and any log value (0.5)."""
    try:
        return string.Formatter().vformat(filepath, (), _AnyLogs(logs, epoch=epoch))
    except (ValueError, IndexError, TypeError, AttributeError) as exc:
        raise ValueError(f"ModelCheckpoint: filepath {filepath!r} is not a valid format string ({exc}); fields "
                         "look like '{epoch:02d}' or '{val_loss:.4f}' (write '{{' and '}}' for braces)") from None


class TerminateOnNaN(Callback):
    """Stop training as soon as a batch's loss is NaN or infinite."""

    @property
    def batch_hooks_use_model(self):
        """False: this hook reads logs only (a subclass that overrides it is treated as using the model)."""
        hook = getattr(self.on_train_batch_end, "__func__", None)
        return hook is not TerminateOnNaN.on_train_batch_end

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            print(f"Batch {batch}: Invalid loss, terminating training")
            self.model.stop_training = True


# ===================================================================================== learning rate, logging
def _optimizer(model, who):
    """The model's optimizer, whose ``learning_rate`` these callbacks read and set (a float)."""
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or not hasattr(optimizer, "learning_rate"):
        raise ValueError(f"{who} needs a compiled model whose optimizer has a learning_rate; call "
                         "model.compile(optimizer=...) first")
    return optimizer


class LearningRateScheduler(Callback):
    """At the start of every epoch, set the optimizer's learning rate to ``schedule(epoch, lr)`` (epoch from
    0, lr the current rate) or, for a function of one argument, ``schedule(epoch)``. The schedule must return
    a float (as Keras requires), finite and >= 0. Each epoch's logs get ``learning_rate``."""

    def __init__(self, schedule, verbose=0):
        super().__init__()
        if not callable(schedule):
            raise TypeError(f"LearningRateScheduler takes a function schedule(epoch, lr) -> float, got "
                            f"{type(schedule).__name__}")
        self.schedule, self.verbose = schedule, verbose

    def _takes_the_rate(self):
        try:
            inspect.signature(self.schedule).bind(0, 0.0)
            return True
        except TypeError:
            return False
        except ValueError:  # no signature to read (some builtins): Keras's rule, two arguments first
            return True

    def on_epoch_begin(self, epoch, logs=None):
        optimizer = _optimizer(self.model, "LearningRateScheduler")
        if self._takes_the_rate():
            lr = self.schedule(epoch, float(optimizer.learning_rate))
        else:
            lr = self.schedule(epoch)
        lr = backend.to_numpy(lr)  # (a device array's value: CuPy's are not NumPy arrays)
        if isinstance(lr, np.ndarray) and lr.ndim == 0 and lr.dtype.kind == "f":
            lr = lr[()]  # a 0-d array, from keras.ops (Keras's docs: return lr * ops.exp(-0.1))
        if isinstance(lr, bool) or not isinstance(lr, (float, np.floating)):
            raise ValueError(f"LearningRateScheduler: the schedule must return a float, got {type(lr).__name__} "
                             f"{lr!r} for epoch {epoch}")
        optimizer.learning_rate = schedules.check_rate(lr, f"the learning rate the schedule returned for epoch "
                                                           f"{epoch}")
        if self.verbose > 0:
            print(f"\nEpoch {epoch + 1}: LearningRateScheduler setting learning rate to "
                  f"{np.float32(optimizer.learning_rate)!s}.")

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = float(_optimizer(self.model, "LearningRateScheduler").learning_rate)


class ReduceLROnPlateau(_Monitoring):
    """Multiply the learning rate by ``factor`` when ``monitor`` has not improved by more than ``min_delta``
    for ``patience`` epochs, never below ``min_lr``; then wait ``cooldown`` epochs before counting again.
    Each epoch's logs get ``learning_rate`` (the rate that epoch trained with)."""

    def __init__(self, monitor="val_loss", factor=0.1, patience=10, verbose=0, mode="auto", min_delta=1e-4,
                 cooldown=0, min_lr=0.0):
        super().__init__()
        if not 0 <= factor < 1:
            raise ValueError(f"ReduceLROnPlateau: factor must be in [0, 1) (the rate is multiplied by it), got "
                             f"{factor!r}")
        if not (math.isfinite(min_lr) and min_lr >= 0):
            raise ValueError(f"ReduceLROnPlateau: min_lr must be a finite number >= 0, got {min_lr!r}")
        self.factor, self.patience, self.verbose = float(factor), int(patience), verbose
        self.cooldown, self.min_lr = int(cooldown), float(min_lr)
        self._watch(monitor, mode, min_delta)
        self.best, self.wait, self.cooldown_counter = None, 0, 0

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self.best, self.wait, self.cooldown_counter = None, 0, 0

    def in_cooldown(self):
        return self.cooldown_counter > 0

    def on_epoch_end(self, epoch, logs=None):
        self._know_direction()
        logs = logs if logs is not None else {}
        optimizer = _optimizer(self.model, "ReduceLROnPlateau")
        logs["learning_rate"] = float(optimizer.learning_rate)
        current = logs.get(self.monitor)
        if current is None:
            warnings.warn(f"ReduceLROnPlateau is conditioned on {self.monitor!r}, which is not in the logs; "
                          f"available: {sorted(logs)}", stacklevel=2)
            return
        if self.in_cooldown():
            self.cooldown_counter -= 1
            self.wait = 0
        if self.best is None or self._better(current - self.min_delta, self.best):
            self.best, self.wait = current, 0
        elif not self.in_cooldown():
            self.wait += 1
            if self.wait >= self.patience and self._reduce(optimizer, epoch):
                self.cooldown_counter, self.wait = self.cooldown, 0

    def _reduce(self, optimizer, epoch):
        """Lower the rate unless it is at min_lr already (compared in float32, as Keras); whether it did."""
        old = float(optimizer.learning_rate)
        if not old > np.float32(self.min_lr):
            return False
        optimizer.learning_rate = max(old * self.factor, self.min_lr)
        if self.verbose > 0:
            print(f"\nEpoch {epoch + 1}: ReduceLROnPlateau reducing learning rate to "
                  f"{np.float32(optimizer.learning_rate)!s}.")
        return True


class CSVLogger(Callback):
    """Write each epoch's logs as a row of a CSV file: ``epoch`` (from 0), then the log keys in sorted order
    (with their ``val_`` twins even when there is no validation: "NA" there), as Keras does. ``append``: add
    to an existing file instead of starting it again; its columns are kept, and a run that logs a key the file has
    no column for adds the column (the earlier rows get "NA" there) rather than writing values under another
    column's name."""

    def __init__(self, filename, separator=",", append=False):
        super().__init__()
        self.filename, self.sep, self.append = os.fspath(filename), separator, append
        self.csv_file = self.writer = self.keys = None
        self.append_header = True
        self._header = None  # the columns of the file appended to
        self._fields = None  # the columns written: epoch and the keys, or the file's

    def on_train_begin(self, logs=None):
        self.append_header, self._header = True, None
        if self.append and os.path.exists(self.filename):
            with open(self.filename, encoding="utf-8", newline="") as f:
                rows = list(csv.reader(f, delimiter=self.sep))
            self._header = rows[0] if rows and rows[0] else None
            self.append_header = self._header is None
            longer = next((k for k, row in enumerate(rows[1:], start=2) if self._header and len(row) > len(
                self._header)), None)
            if longer is not None:
                raise ValueError(f"CSVLogger(append=True): line {longer} of {self.filename} holds more values than its "
                                 f"header has columns ({len(self._header)}), so which value is which cannot be told "
                                 "(runs that logged other keys wrote it). Log to another file, or pass append=False "
                                 "to start this one again")
        if self.csv_file is not None and not self.csv_file.closed:
            self.csv_file.close()
        self.csv_file = open(self.filename, "a" if self.append else "w", newline="", encoding="utf-8")
        self.writer = self.keys = None

    @staticmethod
    def _cell(value):
        if isinstance(value, str):
            return value
        if isinstance(value, collections.abc.Iterable) and not (isinstance(value, np.ndarray) and value.ndim == 0):
            return f'"[{", ".join(map(str, value))}]"'
        return value

    def _dialect(self):
        return type("CSVLoggerDialect", (csv.excel,), {"delimiter": self.sep})

    def _widen(self, fields):
        """Write the file again with the columns ``fields`` (its own first, then new ones; "NA" in its rows there)."""
        self.csv_file.close()
        with open(self.filename, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter=self.sep))
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=fields, restval="NA", dialect=self._dialect())
        writer.writeheader()
        writer.writerows(rows)
        with atomic_write(self.filename) as f:
            f.write(text.getvalue().encode("utf-8"))
        self.csv_file = open(self.filename, "a", newline="", encoding="utf-8")

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self.keys is None:
            keys = sorted(logs)
            if keys and not any(key.startswith("val_") for key in keys):
                keys += [f"val_{key}" for key in keys]
            self._fields = ["epoch"] + keys
            if self._header is not None:  # the file's columns, in its order; any new one after them
                new = [key for key in self._fields if key not in self._header]
                self._fields = self._header + new
                if new:
                    self._widen(self._fields)
            self.keys = [key for key in self._fields if key != "epoch"]
        if self.writer is None:
            self.writer = csv.DictWriter(self.csv_file, fieldnames=self._fields, dialect=self._dialect())
            if self.append_header:
                self.writer.writeheader()
        row = {"epoch": epoch}
        row.update((key, self._cell(logs.get(key, "NA"))) for key in self.keys)
        self.writer.writerow(row)
        self.csv_file.flush()

    def on_train_end(self, logs=None):
        if self.csv_file is not None and not self.csv_file.closed:
            self.csv_file.close()
        self.writer = None


class LambdaCallback(Callback):
    """A callback made of plain functions, called as Keras calls them: ``on_epoch_begin(epoch, logs)``,
    ``on_epoch_end(epoch, logs)``, ``on_train_begin(logs)``, ``on_train_end(logs)``,
    ``on_train_batch_begin(batch, logs)``, ``on_train_batch_end(batch, logs)``; any other hook of Callback by
    its name (e.g. ``on_test_end=f``), and Keras 2's ``on_batch_begin`` / ``on_batch_end`` for the train-batch
    hooks."""

    _ALIASES = {"on_batch_begin": "on_train_batch_begin", "on_batch_end": "on_train_batch_end"}

    def __init__(self, on_epoch_begin=None, on_epoch_end=None, on_train_begin=None, on_train_end=None,
                 on_train_batch_begin=None, on_train_batch_end=None, **kwargs):
        super().__init__()
        hooks = dict(on_epoch_begin=on_epoch_begin, on_epoch_end=on_epoch_end, on_train_begin=on_train_begin,
                     on_train_end=on_train_end, on_train_batch_begin=on_train_batch_begin,
                     on_train_batch_end=on_train_batch_end)
        known = sorted(name for name in vars(Callback) if name.startswith("on_"))
        for name, function in kwargs.items():
            hook = self._ALIASES.get(name, name)
            if hook not in known:
                raise TypeError(f"LambdaCallback: unknown hook {name!r}; the hooks are {known}")
            hooks[hook] = function
        for name, function in hooks.items():
            if function is None:
                continue
            if not callable(function):
                raise TypeError(f"LambdaCallback: {name} must be a function, got {type(function).__name__}")
            setattr(self, name, _with_logs(function, takes_index="epoch" in name or "batch" in name,
                                           by_keyword="batch" in name))


def _with_logs(function, takes_index, by_keyword):
    """A hook that calls ``function(index, logs)`` or ``function(logs)``, logs passed as Keras passes them: by
    keyword to a batch hook (``lambda batch, **kw: ...`` works), by position to the others (fit may call a hook
    without logs: they are None then)."""
    if by_keyword:
        def hook(index, logs=None):
            return function(index, logs=logs)
    elif takes_index:
        def hook(index, logs=None):
            return function(index, logs)
    else:
        def hook(logs=None):
            return function(logs)
    return hook


def __getattr__(name):
    raise missing("gpucnn.callbacks", name, "Keras callback",
                  sorted(k for k, v in globals().items() if isinstance(v, type) and issubclass(v, Callback)))
