"""``compile``, ``fit``, ``evaluate``, ``predict``: the training loop and its one step, shared by every model.

The step (``_forward_backward`` then the optimizer) is written once: the graph's forward, the loss, the graph's
backward into the weight gradients, one optimizer launch over the flat parameter buffer. The NumPy engine runs
it as it is (or as two half-batches in two processes, ``parallel``), the CUDA engine runs it eagerly, and the GPU
fast path (``fastpath``) captures the same graph forward and backward as a CUDA graph.
"""
import math
import sys

import numpy as np

from .. import backend, losses as losses_mod, metrics as metrics_mod, optimizers as optimizers_mod
from ..callbacks import CallbackList, History
from ..progress import Progbar
from ..utils import rng
from . import fastpath, parallel
from .graph import Contexts, StepValues


class TrainingDivergedError(FloatingPointError):
    """The training loss became NaN or infinite."""


class Trainer:
    """The Keras training API of a model (mixed into ``Model``)."""

    READ_EVERY = 50  # GPU engine: steps between reads of the running loss (each read waits for the GPU)

    # ================================================================================= compile
    def compile(self, optimizer="rmsprop", loss=None, metrics=None):
        """Choose the optimizer (name or object), the loss and the metrics (``["accuracy"]``). Which weights train
        (``layer.trainable``) is fixed here, as in Keras."""
        self.optimizer = optimizers_mod.get(optimizer)
        if loss is None:
            raise ValueError("compile() needs a loss, e.g. loss='categorical_crossentropy'")
        self.loss = losses_mod.get(loss)
        metrics = [metrics] if isinstance(metrics, (str, metrics_mod.Metric)) else list(metrics or [])
        self.metrics = list(dict.fromkeys(metrics_mod.get(m) for m in metrics))  # the log names
        if self.built:
            self._pack_weights()
        self._contexts_cache.clear()

    def _require_compiled(self, what):
        if self.optimizer is None or self.loss is None:
            raise RuntimeError(f"you must compile the model before calling {what}(): "
                               "model.compile(optimizer='rmsprop', loss='categorical_crossentropy', "
                               "metrics=['accuracy'])")

    # ================================================================================= data checks
    def _check_x(self, x, what="x"):
        """Validate inputs and return them as a float32 NumPy array (building the model if needed)."""
        if isinstance(x, (list, tuple)) and len(x) == 1 and not np.isscalar(x[0]):
            x = x[0]  # a one-input model takes [x] as Keras does
        if backend.is_engine_array(x):
            x = backend.to_numpy(x)
        x = np.asarray(x)
        if x.dtype.kind not in "biuf":
            raise TypeError(f"{what} must be a numeric array (float32, or integers/uint8 to be cast), "
                            f"got dtype {x.dtype}")
        if x.ndim == 0 or x.shape[0] == 0:
            raise ValueError(f"{what} is empty (shape {x.shape}): there are no samples")
        self._build_for_data(x.shape[1:])
        expected = tuple(self.input_shape[1:])
        if x.shape[1:] != expected:
            msg = (f"{what} has shape {x.shape}, but the model expects (N, "
                   f"{', '.join(map(str, expected))}) (input_shape={expected})")
            if x.shape == expected:
                msg += f". For one sample, add the batch axis: {what}[None]"
            elif x.shape[1:] + (1,) == expected:
                msg += (f". Your images lack the channel axis: add it with "
                        f"{what} = {what}.reshape(({x.shape[0]}, {', '.join(map(str, expected))})) "
                        f"or {what}[..., None]")
            raise ValueError(msg)
        if x.dtype != np.float32:
            x = x.astype(np.float32)
        if not (np.isfinite(x.min()) and np.isfinite(x.max())):  # NaN makes both NaN; ±inf shows in one
            bad = int(np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))[0])
            raise ValueError(f"{what} contains NaN or infinity (first at sample {bad}); clean or "
                             "impute the data before training")
        return x

    def _check_y(self, y, n, what="y"):
        if backend.is_engine_array(y):
            y = backend.to_numpy(y)
        y = np.asarray(y)
        if y.ndim == 0 or y.shape[0] != n:
            raise ValueError(f"{what} has {y.shape[0] if y.ndim else 0} samples but x has {n}: "
                             "they must match")
        return self.loss.check_labels(y, self.output_shape[-1], what)

    def _require_one_output(self, what):
        if len(self.outputs) != 1:
            raise NotImplementedError(f"{what}() on a model with {len(self.outputs)} outputs is not supported by "
                                      "gpucnn yet (predict() works); train a model with one output")

    # ================================================================================= the step
    def _contexts(self, rows, training):
        """The graph's node contexts for batches of ``rows`` (kept for a few batch sizes: their work arrays)."""
        key = (rows, training)
        cache = self._contexts_cache
        if key not in cache:
            if len(cache) >= 4:
                cache.pop(next(iter(cache)))
            step = self._step_values() if training else None
            cache[key] = Contexts(self.graph, step=step, skip_output_activation=training and self._fused_softmax())
        return cache[key]

    def _step_values(self):
        if getattr(self, "_eager_step", None) is None or not isinstance(self._eager_step.counter,
                                                                         backend.ops().xp.ndarray):
            self._eager_step = StepValues(self._random_layers())
        return self._eager_step

    def _random_layers(self):
        return [layer for layer in self._all_layers() if getattr(layer, "draws_randomness", False)]

    def _fused_softmax(self):
        """Whether the loss takes the logits of the output layer's softmax (its gradient goes to them directly)."""
        last = self.outputs[0].node.layer
        return getattr(last, "activation", None) == "softmax" and not isinstance(last, Trainer)

    def _train_step(self, xb, yb):
        """Forward, loss, backward, update. Returns engine scalars (loss sum, correct count)."""
        ops = backend.ops()
        loss_sum, correct = self._forward_backward(xb, yb)
        if not ops.READS_WAIT and not np.isfinite(loss_sum):
            return loss_sum, correct  # fit stops before this step's update is applied
        self.optimizer.apply(self._params, self._grads)
        return loss_sum, correct

    def _forward_backward(self, xb, yb, scale=None):
        """Forward, loss and backward of a batch, its weight gradients left in ``_grads``; returns (loss sum,
        correct count). On NumPy with two or more cores the batch runs as two halves in two processes
        (``parallel``). ``scale`` multiplies the loss gradient: a half's share of its batch."""
        if scale is None and parallel.split_reason(self, len(xb)) is None:
            return parallel.split_step(self, xb, yb)
        ops = backend.ops()
        contexts = self._contexts(len(xb), True)
        if contexts.step.layers:
            contexts.step.seeds[...] = ops.xp.asarray(contexts.step.draw())
        sparse, fused = self.loss.sparse, self._fused_softmax()
        out = self.graph.forward([xb], True, contexts)[0]
        p = ops.activation_forward(out, "softmax") if fused else out  # the loss's softmax of the logits
        loss_sum = ops.crossentropy_forward(p, yb, sparse).sum()
        correct = ops.count_correct(p, yb, sparse)
        dy = (ops.softmax_crossentropy_backward if fused else ops.crossentropy_backward)(p, yb, sparse)
        if scale is not None:
            dy *= np.float32(scale)
        self.graph.backward([dy], contexts)
        return loss_sum, correct

    def _predict_batch(self, xb):
        return self.graph.forward([xb], False, self._contexts(len(xb), False))

    # ================================================================================= fit
    def fit(self, x=None, y=None, batch_size=32, epochs=1, verbose=1, callbacks=None,
            validation_split=0.0, validation_data=None, shuffle=True, initial_epoch=0):
        """Train; returns a ``History`` whose ``.history`` has ``loss``, ``accuracy``, ``val_*``."""
        self._require_compiled("fit")
        batch_size = _positive_int(batch_size, "batch_size")
        if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 0:
            raise ValueError(f"epochs must be a non-negative int, got {epochs!r}")
        callbacks = _callback_list(callbacks)
        x = self._check_x(x)
        self._require_one_output("fit")
        y = self._check_y(y, len(x))
        if validation_data is None and validation_split:
            if not 0 < validation_split < 1:
                raise ValueError(f"validation_split must be in (0, 1), got {validation_split}")
            split = int(math.floor(len(x) * (1 - validation_split)))
            if split == 0 or split == len(x):
                raise ValueError(f"validation_split={validation_split} leaves no training or no "
                                 f"validation samples out of {len(x)}")
            x, y, validation_data = x[:split], y[:split], (x[split:], y[split:])
        elif validation_data is not None:
            if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
                raise ValueError("validation_data must be a tuple (x_val, y_val)")
            xv = self._check_x(validation_data[0], "validation_data[0]")
            validation_data = (xv, self._check_y(validation_data[1], len(xv), "validation_data[1]"))

        self._adopt_weights()
        xp = backend.ops().xp
        trainer = None
        if backend.engine() == "cuda":  # the fast path: the step captured as a CUDA graph
            trainer = fastpath.plan(self, batch_size, x, y)
            if isinstance(trainer, str):
                fastpath.notice(self, trainer)
                trainer = None
        # the whole set goes to the engine once (the fast path's trainer holds its own device copy)
        x_dev, y_dev = (x, y) if trainer is not None else (xp.asarray(x), xp.asarray(y))
        history = History()
        params = {"verbose": verbose, "epochs": epochs, "steps": math.ceil(len(x) / batch_size)}
        cbs = CallbackList(callbacks + [history], self, params)
        self.stop_training = False
        self.history = history
        cbs.on_train_begin()
        with np.errstate(over="ignore", invalid="ignore"):  # divergence is reported by _end_batch
            self._epochs(x_dev, y_dev, batch_size, epochs, initial_epoch, shuffle, verbose,
                         validation_data, cbs, trainer)
        cbs.on_train_end(self._last_logs)
        return history

    def _epochs(self, x_dev, y_dev, batch_size, epochs, initial_epoch, shuffle, verbose,
                validation_data, cbs, trainer=None):
        xp = backend.ops().xp
        n = len(x_dev)
        steps = math.ceil(n / batch_size)
        # The NumPy engine reads its loss every step; on the GPU a read waits for the device, so the
        # running loss is read (and checked for divergence) only every READ_EVERY steps.
        read_every = self.READ_EVERY if backend.ops().READS_WAIT else 1
        self._last_logs = {}
        for epoch in range(initial_epoch, epochs):
            cbs.on_epoch_begin(epoch)
            if verbose and epochs > 1:
                print(f"Epoch {epoch + 1}/{epochs}")
                sys.stdout.flush()
            bar = Progbar(steps, verbose)
            if trainer is not None:  # the fast path: its own device order, graphs and metric reads
                logs = trainer.run_epoch(epoch, shuffle, cbs, bar)
            else:
                order = rng().permutation(n) if shuffle else np.arange(n)
                order_dev = xp.asarray(order)
                loss_total, correct_total, seen, logs = 0.0, 0, 0, {}
                for step in range(steps):
                    cbs.on_train_batch_begin(step)
                    idx = order_dev[step * batch_size:(step + 1) * batch_size]
                    loss_sum, correct = self._train_step(x_dev[idx], y_dev[idx])
                    seen += len(idx)
                    loss_total = loss_total + loss_sum
                    correct_total = correct_total + correct
                    if step % read_every == read_every - 1 or step == steps - 1:
                        logs = self._read_logs(loss_total, correct_total, seen)
                    if self._end_batch(cbs, bar, epoch, step, logs):
                        break
            logs = dict(logs)
            if validation_data is not None:
                val = self.evaluate(*validation_data, batch_size=batch_size, verbose=0,
                                    return_dict=True, callbacks=cbs, _checked=True)
                logs.update({f"val_{k}": v for k, v in val.items()})
            bar.finish(logs)
            cbs.on_epoch_end(epoch, logs)
            self._last_logs = logs
            if self.stop_training:
                break

    def _read_logs(self, loss_total, correct_total, seen):
        """Running means of the epoch so far (engine scalars are read here)."""
        logs = {"loss": float(loss_total) / seen}
        for name in self.metrics:
            logs[name] = int(correct_total) / seen
        return logs

    def _end_batch(self, cbs, bar, epoch, step, logs):
        """Batch-end rules shared by the plain loop and the GPU fast path: callbacks, progress, then stop
        when a callback asked (e.g. TerminateOnNaN), else raise TrainingDivergedError on a non-finite
        loss. Returns whether the epoch must end now."""
        cbs.on_train_batch_end(step, logs)
        bar.update(step + 1, logs)
        if self.stop_training:
            return True
        loss = logs.get("loss", 0.0)
        if not math.isfinite(loss):
            raise TrainingDivergedError(
                f"training diverged: the loss became {loss} at epoch {epoch + 1}, step {step + 1}. "
                f"Lower the learning rate (now {self.optimizer.learning_rate:g}), check the inputs are "
                "scaled (e.g. divided by 255), and rebuild the model: its weights are no longer usable.")
        return False

    # ================================================================================= evaluate, predict
    def evaluate(self, x=None, y=None, batch_size=32, verbose=1, return_dict=False, callbacks=None,
                 _checked=False):
        """``[loss, accuracy]`` over the data (the loss alone when compiled without metrics)."""
        self._require_compiled("evaluate")
        batch_size = _positive_int(batch_size, "batch_size")
        if not _checked:
            x = self._check_x(x)
            self._require_one_output("evaluate")
            y = self._check_y(y, len(x))
        cbs = callbacks if isinstance(callbacks, CallbackList) else CallbackList(_callback_list(callbacks), self, {})
        cbs.on_test_begin()
        ops = backend.ops()
        x_dev, y_dev = ops.xp.asarray(x), ops.xp.asarray(y)
        steps = math.ceil(len(x) / batch_size)
        bar = Progbar(steps, verbose)
        loss_total, correct_total = 0.0, 0
        for step in range(steps):
            cbs.on_test_batch_begin(step)
            sl = slice(step * batch_size, (step + 1) * batch_size)
            p = self._predict_batch(x_dev[sl])[0]
            loss_total = loss_total + ops.crossentropy_forward(p, y_dev[sl], self.loss.sparse).sum()
            correct_total = correct_total + ops.count_correct(p, y_dev[sl], self.loss.sparse)
            cbs.on_test_batch_end(step, {})
            bar.update(step + 1, {})
        logs = {"loss": float(loss_total) / len(x)}
        for name in self.metrics:
            logs[name] = int(correct_total) / len(x)
        cbs.on_test_end(logs)
        bar.finish(logs)
        if return_dict:
            return logs
        return [logs["loss"]] + [logs[name] for name in self.metrics] if self.metrics else logs["loss"]

    def predict(self, x, batch_size=32, verbose=1, callbacks=None):
        """The model's outputs for ``x`` as a NumPy array (N, ...), or a list of them for several outputs."""
        batch_size = _positive_int(batch_size, "batch_size")
        x = self._check_x(x)
        cbs = CallbackList(_callback_list(callbacks), self, {})
        cbs.on_predict_begin()
        xp = backend.ops().xp
        x_dev = xp.asarray(x)
        steps = math.ceil(len(x) / batch_size)
        bar = Progbar(steps, verbose)
        outs = [[] for _ in self.outputs]
        for step in range(steps):
            cbs.on_predict_batch_begin(step)
            for i, out in enumerate(self._predict_batch(x_dev[step * batch_size:(step + 1) * batch_size])):
                outs[i].append(backend.to_numpy(out).copy())
            cbs.on_predict_batch_end(step, {})
            bar.update(step + 1, {})
        cbs.on_predict_end()
        bar.finish({})
        results = [np.concatenate(o) for o in outs]
        return results[0] if len(results) == 1 else results


def _callback_list(callbacks):
    from ..callbacks import Callback
    if callbacks is None:
        return []
    if isinstance(callbacks, Callback):
        raise TypeError(f"callbacks must be a list of callbacks, got one {type(callbacks).__name__}: write "
                        f"callbacks=[{type(callbacks).__name__}(...)]")
    if isinstance(callbacks, CallbackList):
        return list(callbacks.callbacks)
    try:
        callbacks = list(callbacks)
    except TypeError:
        raise TypeError(f"callbacks must be a list of callbacks, got {type(callbacks).__name__}") from None
    for cb in callbacks:
        if not isinstance(cb, Callback):
            raise TypeError(f"callbacks must hold gpucnn.callbacks.Callback objects, got {type(cb).__name__}")
    return callbacks


def _positive_int(value, what):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return int(value)
