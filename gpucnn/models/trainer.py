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
from .. import callbacks as callbacks_mod
from ..callbacks import CallbackList, History
from ..data import adapters
from ..progress import Progbar
from . import fastpath, parallel
from .graph import Contexts, StepValues


class TrainingDivergedError(FloatingPointError):
    """The training loss became NaN or infinite."""


def _refuse_ragged(x, what):
    """A ValueError naming the odd one out when ``x`` is a list or tuple of arrays of different shapes (NumPy would
    fail deep inside with "inhomogeneous shape"): the inputs and labels given together as x, or images of two
    sizes."""
    if not isinstance(x, (list, tuple)) or len(x) < 2:
        return
    shapes = [np.shape(item) for item in x]
    if len(set(shapes)) == 1:
        return
    kind = type(x).__name__
    if len(x) == 2 and shapes[0][:1] == shapes[1][:1] and len(shapes[0]) > 1 and len(shapes[1]) <= 2:
        raise ValueError(f"{what} is a {kind} of two arrays, {shapes[0]} and {shapes[1]}, but the model takes one "
                         "input: if they are the inputs and their labels, pass them apart, fit(x, y) (predict takes "
                         "the inputs alone)")
    common = max(set(shapes), key=shapes.count)
    if shapes.count(common) > 1:
        odd = next(k for k, shape in enumerate(shapes) if shape != common)
        which = f"item {odd} has shape {shapes[odd]}, most have {common}"
    else:
        odd = next(k for k, shape in enumerate(shapes) if shape != shapes[0])
        which = f"item 0 has shape {shapes[0]}, item {odd} {shapes[odd]}"
    raise ValueError(f"{what} is a {kind} of {len(x)} arrays of different shapes: {which}. The samples of one input "
                     "must share one shape: resize the odd ones (e.g. utils.load_img(path, target_size=(h, w)))")


class Trainer:
    """The Keras training API of a model (mixed into ``Model``)."""

    READ_EVERY = 50  # GPU engine: steps between reads of the running loss (each read waits for the GPU)

    # ================================================================================= compile
    def compile(self, optimizer="rmsprop", loss=None, metrics=None, loss_weights=None, weighted_metrics=None,
                run_eagerly=False, steps_per_execution=1, jit_compile="auto", auto_scale_loss=True):
        """Choose the optimizer (name or object), the loss and the metrics (``["accuracy"]``). Which weights train
        (``layer.trainable``) is read here and again before each step (``_sync_trainable``). Compiling again with the
        same optimizer object keeps its state and step count (Keras's optimizer keeps its variables); a new one
        starts afresh. Keras's ``run_eagerly``, ``jit_compile`` and ``auto_scale_loss`` are accepted and change
        nothing (gpucnn runs its own step: the NumPy engine, or the GPU's captured graph); ``loss_weights``,
        ``weighted_metrics`` and a ``steps_per_execution`` other than 1 are not supported. (``metrics`` comes third,
        as gpucnn has always taken it; Keras's third is loss_weights, which gpucnn does not take.)"""
        if loss_weights is not None or weighted_metrics is not None:
            raise NotImplementedError("compile(loss_weights=..., weighted_metrics=...) is not supported by gpucnn: "
                                      "it trains models with one output and no sample weights")
        if steps_per_execution != 1:
            raise NotImplementedError(f"compile(steps_per_execution={steps_per_execution!r}) is not supported by "
                                      "gpucnn (its GPU step is already one captured graph); leave it at 1")
        optimizer = optimizers_mod.get(optimizer)
        if self.built:
            optimizer.anchor_exclusions(self._weight_slots())  # (refused before the model changes)
        if loss is None:
            raise ValueError("compile() needs a loss, e.g. loss='categorical_crossentropy'")
        loss = self._one_loss(loss)
        loss = losses_mod.get(loss)
        metrics = [metrics] if isinstance(metrics, (str, metrics_mod.Metric)) else list(metrics or [])
        names = [metrics_mod.get(m) for m in metrics]
        kinds = [metrics_mod.kind(m, loss) for m in metrics]
        if self.built:
            metrics_mod.form(kinds, loss, self._output_units())
        # (all checked: a refused compile leaves the model as it was)
        self.optimizer, self.loss, self.metrics = optimizer, loss, list(dict.fromkeys(names))  # metrics: log names
        self._metric_configs = [metrics_mod.serialize(m) for m in metrics]  # what a saved file holds
        self._metric_kinds = kinds
        self._metric_objects = [m for m in metrics if isinstance(m, metrics_mod.Metric)]  # (their state follows fit's)
        if self.built:
            self._pack_weights()  # the optimizer's state comes along (a new one has none), as Keras keeps it
        self._contexts_cache.clear()
        self._version += 1

    @property
    def metrics_names(self):
        """The names of what ``evaluate`` returns, in its order: "loss", then the metrics (Keras 2's meaning; Keras 3
        answers ['loss', 'compile_metrics'] once trained)."""
        return ["loss"] + list(self.metrics) if self.loss is not None else []

    def _ready_to_train(self):
        """Before fit or train_on_batch trains: the optimizer, refused if it has no state for a weight this model trains
        (_refuse_unknown_weights: before the buffers are laid out again), then the weights back in this model's
        buffers (another model of the same layers may have trained them) and the optimizer updating them. One compiled
        or trained with another model too comes over with its state for this model's weights, as Keras's optimizer
        keeps a state per variable."""
        self._refuse_unknown_weights(self.optimizer)
        self._adopt_weights()
        if self.optimizer._owner is not self:
            self._pack_weights()

    def _refuse_unknown_weights(self, optimizer):
        """A ValueError when ``optimizer`` has trained and holds no state for a weight this model trains now (a layer
        unfrozen or added since, or another model's): Keras refuses such an optimizer too ("Unknown variable"), and a
        state of zeros beside the others' step count would train that weight as no optimizer does."""
        unknown = self._weights_unknown_to(optimizer)
        if unknown:
            layer, i = unknown[0]
            kind = type(optimizer).__name__
            last, name = optimizer.stepped_by, optimizer.stepped_by_name
            if name is None:  # (a loaded optimizer: it stepped the model it was saved with, now its owner)
                last = optimizer._owner
                name = last.name
            trained = ("this model" if last is self else f"another model named {name!r}" if name == self.name
                       else f"model {name!r}")
            raise ValueError(
                f"this {kind} has trained {trained} ({optimizer.iterations} steps) and holds no state for "
                f"{len(unknown)} of the weights model {self.name!r} trains now (the first: {layer.weight_names[i]} of "
                f"layer {layer.name!r}: a layer unfrozen or added since, or another model's); Keras refuses it too. "
                f"Compile with a new optimizer, e.g. compile(optimizer={optimizer.name!r}) or "
                f"optimizers.{kind}(...) (keras.io's fine-tuning recompiles with a new one after unfreezing)")

    def _require_compiled(self, what):
        if self.optimizer is None or self.loss is None:
            raise RuntimeError(f"you must compile the model before calling {what}(): "
                               "model.compile(optimizer='rmsprop', loss='categorical_crossentropy', "
                               "metrics=['accuracy'])")

    # ================================================================================= data checks
    def _check_x(self, x, what="x"):
        """Validate inputs and return them as a float32 NumPy array (building the model if needed)."""
        if isinstance(x, (list, tuple)) and len(x) == 1 and (isinstance(x[0], np.ndarray)
                                                              or backend.is_engine_array(x[0])):
            x = x[0]  # a one-input model takes [x] as Keras does (a list of one row stays one sample)
        x = backend.to_numpy(x)  # (a device array, or a list of them)
        _refuse_ragged(x, what)
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
        if y is None:
            raise ValueError(f"{what} is missing: training and evaluating need the labels beside the inputs, e.g. "
                             "fit(x, y), or a dataset of (x, y) batches")
        y = np.asarray(backend.to_numpy(y))
        if y.ndim == 0 or y.shape[0] != n:
            raise ValueError(f"{what} has {y.shape[0] if y.ndim else 0} samples but x has {n}: "
                             "they must match")
        units = self.output_shape[-1]
        if units == 1 and getattr(self.outputs[0].node.layer, "activation", None) == "softmax":
            raise ValueError("the model's output is a softmax over one unit, which is always 1 whatever the input: "
                             "for two classes use Dense(1, activation='sigmoid') (with binary_crossentropy), or "
                             "Dense(2, activation='softmax') (with a categorical cross-entropy)")
        return self.loss.check_labels(y, units, what)

    def _one_loss(self, loss):
        """Keras's per-output forms for a model of one output — a list or tuple of one loss, a dict of one, keyed by
        the output layer's name — as that loss; a model of several outputs (which gpucnn does not train) or more
        losses than outputs refused."""
        if not isinstance(loss, (list, tuple, dict)):
            return loss
        outputs = len(self.outputs) if self.built else 1
        if outputs != 1:
            raise NotImplementedError(f"compile(loss={loss!r}): a model of {outputs} outputs takes a loss per output in "
                                      "Keras; gpucnn does not train such models (predict works): train a model of one "
                                      "output")
        if len(loss) != 1:
            raise ValueError(f"compile(loss={loss!r}): the model has one output, so one loss (got {len(loss)})")
        if isinstance(loss, dict):
            name = self.outputs[0].node.layer.name if self.built else None
            key = next(iter(loss))
            if name is not None and key != name:
                raise ValueError(f"compile(loss={loss!r}): the dict's key must be the output layer's name {name!r}")
            return loss[key]
        return loss[0]

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
            cache[key] = Contexts(self.graph, step=step, shared_work=not training,
                                  skip_output_activation=training and self._fused_activation() is not None)
        return cache[key]

    def _step_values(self):
        if getattr(self, "_eager_step", None) is None or not isinstance(self._eager_step.counter,
                                                                         backend.ops().xp.ndarray):
            self._eager_step = StepValues(self._random_layers())
        return self._eager_step

    def _random_layers(self):
        return [layer for layer in self._all_layers() if getattr(layer, "draws_randomness", False)]

    def _fused_activation(self):
        """The output activation whose gradient the loss takes at the logits (a softmax under a categorical
        cross-entropy, a sigmoid under a binary one), or None: then the output layer runs it in training."""
        last = self.outputs[0].node.layer
        if isinstance(last, Trainer):
            return None
        activation = getattr(last, "activation", None)
        return activation if self.loss.fuses(activation) else None

    def _train_step(self, xb, yb):
        """Forward, loss, backward, update. Returns engine scalars (loss sum, correct count)."""
        ops = backend.ops()
        self._sync_trainable()  # a callback may have frozen or unfrozen a layer since the last step
        loss_sum, correct = self._forward_backward(xb, yb)
        if not ops.READS_WAIT and not np.isfinite(loss_sum):
            return loss_sum, correct  # fit stops before this step's update is applied
        self.optimizer.apply(self._params, self._grads)
        return loss_sum, correct

    def _forward_backward(self, xb, yb, scale=None, values=None, exchange=None):
        """Forward, loss and backward of a batch, its weight gradients left in ``_grads``; returns (loss sum,
        correct count). On NumPy with two or more cores the batch runs as two halves in two processes
        (``parallel``). ``scale`` multiplies the loss gradient: a half's share of its batch; ``values``: the
        random layers' values drawn for the whole batch (``StepValues.draw``/``share``), else drawn here;
        ``exchange``: a half's exchange of per-channel sums with the other half (``StepValues.exchange``)."""
        if scale is None and parallel.split_reason(self, len(xb)) is None:
            return parallel.split_step(self, xb, yb)
        ops = backend.ops()
        contexts = self._contexts(len(xb), True)
        if contexts.step.layers:
            if values is None:
                contexts.step.fill([len(xb)])
            else:
                contexts.step.load(values)
        contexts.step.exchange = exchange
        try:
            loss, fused = self.loss, self._fused_activation()
            out = self.graph.forward([xb], True, contexts)[0]
            p = ops.activation_forward(out, fused) if fused else out  # the loss's softmax / sigmoid of the logits
            loss_sum = loss.per_sample(ops, p, yb).sum()
            correct = self._count_correct(ops, p, yb)
            dy = loss.fused_gradient(ops, p, yb) if fused else loss.gradient(ops, p, yb)
            if scale is not None:
                dy *= np.float32(scale)
            self.graph.backward([dy], contexts)
        finally:
            contexts.step.exchange = None
        return loss_sum, correct

    def _predict_batch(self, xb):
        return self.graph.forward([xb], False, self._contexts(len(xb), False))

    # ================================================================================= fit
    def fit(self, x=None, y=None, batch_size=None, epochs=1, verbose="auto", callbacks=None, validation_split=0.0,
            validation_data=None, shuffle=True, class_weight=None, sample_weight=None, initial_epoch=0,
            steps_per_epoch=None, validation_steps=None, validation_batch_size=None, validation_freq=1):
        """Train; returns a ``History`` whose ``.history`` has ``loss``, the metrics and ``val_*``.

        ``x``: arrays with labels ``y`` (kept whole on the engine, shuffled each epoch), or a dataset
        (``image_dataset_from_directory``'s), a generator or iterable of ``(x, y)`` batches, or a ``PyDataset``
        (``gpucnn.data.adapt``); ``steps_per_epoch`` and ``validation_steps`` as Keras uses them."""
        self._require_compiled("fit")
        if class_weight is not None or sample_weight is not None:
            raise NotImplementedError("fit(class_weight=..., sample_weight=...) is not supported by gpucnn yet")
        if validation_freq != 1:
            raise NotImplementedError("fit(validation_freq=...) is not supported by gpucnn yet; validation runs "
                                      "after every epoch")
        verbose = _verbose(verbose)
        shuffle = adapters.check_shuffle(shuffle)
        given_batch, batch_size = _batch_size(batch_size)
        if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 0:
            raise ValueError(f"epochs must be a non-negative int, got {epochs!r}")
        callbacks = _callback_list(callbacks)
        arrays = adapters.is_arrays(x, y)
        if arrays:
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
        # arrays with steps_per_epoch go through an adapter (Keras's batch size there: ceil(N / steps) unless given)
        train = None if steps_per_epoch is None and arrays else \
            adapters.adapt(x, y, given_batch, steps_per_epoch, shuffle, "x")
        if train is not None and given_batch is None:
            batch_size = getattr(train, "batch_size", None) or batch_size
        try:
            if not arrays:
                if validation_split:
                    raise ValueError("validation_split is only supported for arrays: give the validation set as "
                                     "validation_data (e.g. image_dataset_from_directory(..., subset='validation'))")
                first = train.peek()
                if first is None:
                    raise ValueError("x yields no batches: there is nothing to train on")
                self._check_x(first[0])
                self._require_one_output("fit")
                if first[1] is None:
                    raise ValueError("the batches of x hold no labels: fit needs (x, y) batches")
            # (None: evaluate's 32 for arrays, or Keras's ceil(N / validation_steps) when steps are given)
            validation_batch_size = given_batch if validation_batch_size is None else _positive_int(
                validation_batch_size, "validation_batch_size")
            validation = self._validation_source(validation_data, validation_batch_size, validation_steps)
            if isinstance(validation, adapters.Adapter):
                validation.restarts = True  # the same validation batches each epoch, as Keras
            return self._fit(x, y, train, batch_size, epochs, verbose, callbacks, validation, shuffle,
                             initial_epoch, validation_batch_size)
        finally:
            if train is not None:
                train.close()

    def _validation_source(self, validation_data, batch_size, steps):
        """Validation data as evaluate takes it: checked arrays (x, y), an adapter, or None."""
        if validation_data is None:
            return None
        if isinstance(validation_data, (tuple, list)) and len(validation_data) < 2:
            pair = validation_data and isinstance(validation_data[0], (tuple, list)) and len(validation_data[0]) == 2
            raise ValueError(f"validation_data must be a tuple (x_val, y_val) or a dataset of (x, y) batches; got a "
                             f"{type(validation_data).__name__} of {len(validation_data)}: "
                             + ("give the pair itself, validation_data=(x_val, y_val)" if pair else "give the labels too"))
        if isinstance(validation_data, (tuple, list)) and adapters.is_arrays(*validation_data[:2]):
            if len(validation_data) == 3 and validation_data[2] is not None:
                raise NotImplementedError("validation_data=(x_val, y_val, sample_weight): sample weights are not "
                                          "supported by gpucnn")
            if len(validation_data) not in (2, 3):
                raise ValueError("validation_data must be a tuple (x_val, y_val) or a dataset")
            xv = self._check_x(validation_data[0], "validation_data[0]")
            yv = self._check_y(validation_data[1], len(xv), "validation_data[1]")
            if steps is not None:  # arrays read validation_steps batches (Keras's batch size: ceil(N / steps))
                return adapters.adapt(xv, yv, batch_size, steps, False, "validation_data")
            return xv, yv
        if isinstance(validation_data, tuple) and len(validation_data) == 2 and validation_data[1] is not None \
                and not adapters.is_arrays(*validation_data):
            raise ValueError("validation_data must be a tuple (x_val, y_val) of arrays, or a dataset of (x, y) "
                             "batches")
        return adapters.adapt(validation_data, None, batch_size, steps, False, "validation_data")

    def _fit(self, x, y, train, batch_size, epochs, verbose, callbacks, validation, shuffle, initial_epoch,
             validation_batch_size):
        self._ready_to_train()
        self._accuracy_form()  # metrics of two forms: refused here (a model built by its first data), not mid-step
        xp = backend.ops().xp
        trainer = None
        if backend.engine() == "cuda":  # the fast path: the step captured as a CUDA graph
            if train is None:
                trainer = fastpath.plan(self, batch_size, x, y)
            else:
                first = next(self._checked_batches(train, None, on_engine=False))
                trainer = fastpath.plan_stream(self, train.batch_size or len(first[0]), first)
            if isinstance(trainer, str):
                fastpath.notice(self, trainer)
                trainer = None
        if train is None:
            # the whole set goes to the engine once (the fast path's trainer holds its own device copy)
            x_dev, y_dev = (x, y) if trainer is not None else (xp.asarray(x), xp.asarray(y))
            steps = math.ceil(len(x) / batch_size)
        else:
            steps = train.num_batches
        history = History()
        params = {"verbose": verbose, "epochs": epochs, "steps": steps}
        cbs = CallbackList(callbacks + [history], self, params)
        self.stop_training = False
        self.history = history
        self._last_logs = {}
        if train is not None:
            train.reset()  # (before on_train_begin, as Keras)
        cbs.on_train_begin()
        with np.errstate(over="ignore", invalid="ignore"):  # divergence is reported by _end_batch
            for epoch in range(initial_epoch, epochs):
                if train is not None and train.exhausted:
                    train.warn_exhausted()
                    break
                cbs.on_epoch_begin(epoch)
                if verbose and epochs > 1:
                    print(f"Epoch {epoch + 1}/{epochs}")
                    sys.stdout.flush()
                bar = Progbar(steps, verbose)
                if trainer is not None and train is not None:  # the fast path, batches copied in from the host
                    logs = trainer.run_epoch(self._checked_batches(train, epoch, on_engine=False), epoch, cbs, bar)
                elif trainer is not None:  # the fast path: its own device order, graphs and metric reads
                    logs = trainer.run_epoch(epoch, shuffle, cbs, bar)
                elif train is None:
                    order = adapters.epoch_order(len(x_dev), batch_size, shuffle)
                    order_dev = xp.asarray(order)
                    batches = ((x_dev[idx], y_dev[idx]) for idx in
                               (order_dev[k * batch_size:(k + 1) * batch_size] for k in range(steps)))
                    logs = self._train_epoch(batches, cbs, bar, epoch)
                else:
                    logs = self._train_epoch(self._checked_batches(train, epoch), cbs, bar, epoch)
                logs = dict(logs)
                if not (self.stop_training and not math.isfinite(logs.get("loss", 0.0))):
                    # (a callback that stopped a run on a NaN loss, TerminateOnNaN, ends fit quietly, as Keras's)
                    self._check_weights_finite(f"after epoch {epoch + 1}")
                if validation is not None:
                    val = self.evaluate(validation, batch_size=validation_batch_size, verbose=0, return_dict=True,
                                        callbacks=cbs, _checked=True)
                    logs.update({f"val_{k}": v for k, v in val.items()})
                before = set(logs)
                cbs.on_epoch_end(epoch, logs)
                # the epoch's line comes after the callbacks (Keras's progress bar is the last of them), with what
                # they logged (ReduceLROnPlateau's learning_rate) at its end
                bar.finish(logs, added=[k for k in logs if k not in before])
                self._last_logs = logs
                if self.stop_training:
                    break
        cbs.on_train_end(self._last_logs)
        return history

    def _checked_batches(self, source, epoch, labels=True, on_engine=True):
        """The batches of an adapter, each checked as fit checks arrays: engine arrays (or NumPy arrays, not
        ``on_engine``). ``epoch`` None: the first batch only, not consumed (``peek``)."""
        xp = backend.ops().xp if on_engine else np
        batches = [source.peek()] if epoch is None else source.batches(epoch)
        for k, (xb, yb) in enumerate(batches):
            xb = self._check_x(xb, f"batch {k} of x")
            if not labels:
                yield xp.asarray(xb), None
                continue
            if yb is None:
                raise ValueError(f"batch {k} of x holds no labels: (x, y) batches are needed here")
            yield xp.asarray(xb), xp.asarray(self._check_y(yb, len(xb), f"the labels of batch {k}"))

    def _train_epoch(self, batches, cbs, bar, epoch):
        """One epoch of the plain loop over (x, y) engine batches; returns its logs."""
        # The NumPy engine reads its loss every step; on the GPU a read waits for the device, so the
        # running loss is read (and checked for divergence) only every READ_EVERY steps, unless a callback's own
        # batch hooks want each step's logs (as Keras passes them).
        read_every = self.READ_EVERY if backend.ops().READS_WAIT and not cbs.batch_hooks_use_model() else 1
        loss_total, correct_total, seen, logs, step = 0.0, 0, 0, {}, -1
        for step, (xb, yb) in enumerate(batches):
            cbs.on_train_batch_begin(step)
            loss_sum, correct = self._train_step(xb, yb)
            seen += len(xb)
            loss_total = loss_total + loss_sum
            correct_total = correct_total + correct
            last = bar.target is not None and step == bar.target - 1
            if step % read_every == read_every - 1 or last:
                logs = self._read_logs(loss_total, correct_total, seen)
            if self._end_batch(cbs, bar, epoch, step, logs):
                return logs
        if seen and (step % read_every != read_every - 1):
            logs = self._read_logs(loss_total, correct_total, seen)
        return logs

    def _read_logs(self, loss_total, correct_total, seen):
        """Running means of the epoch so far (engine scalars are read here)."""
        logs = {"loss": float(loss_total) / seen}
        for name in self.metrics:
            logs[name] = int(correct_total) / (seen * self._accuracy_units())
        for metric in getattr(self, "_metric_objects", ()):  # Keras's compiled objects hold the counts read last
            metric._counted(int(correct_total), seen * self._accuracy_units())
        return dict(sorted(logs.items()))  # by name, as Keras 3 orders its logs (and so history's keys)

    def _output_units(self):
        return int(np.prod(self.outputs[0].sample_shape))

    def _accuracy_form(self):
        """The form of accuracy the metrics count ("binary", "categorical" or "sparse"; ``metrics.form``)."""
        return metrics_mod.form(getattr(self, "_metric_kinds", []), self.loss, self._output_units())

    def _count_correct(self, ops, p, y):
        """Correct predictions in a batch, in the metrics' form of accuracy (an engine scalar)."""
        form = self._accuracy_form()
        if form == "binary":
            return ops.count_binary_correct(p, y, 0.5)
        return ops.count_correct(p, y, form == "sparse")

    def _accuracy_units(self):
        """Predictions per sample that accuracy counts: every output for binary accuracy, else one."""
        return self._output_units() if self._accuracy_form() == "binary" else 1

    def _end_batch(self, cbs, bar, epoch, step, logs):
        """Batch-end rules shared by the plain loop and the GPU fast path: callbacks, progress, then stop
        when a callback asked (e.g. TerminateOnNaN), else raise TrainingDivergedError on a non-finite
        loss. Returns whether the epoch must end now."""
        cbs.on_train_batch_end(step, logs)
        bar.update(step + 1, logs)
        if self.stop_training:
            return True
        self._check_finite(logs, f"at epoch {epoch + 1}, step {step + 1}")
        return False

    def _check_finite(self, logs, where):
        """TrainingDivergedError when the logs' loss is NaN or infinite."""
        loss = logs.get("loss", 0.0)
        if not math.isfinite(loss):
            raise self._diverged(f"the loss became {loss} {where}")

    def _diverged(self, what):
        return TrainingDivergedError(
            f"training diverged: {what}. Lower the learning rate (now {self.optimizer.learning_rate:g}), check the "
            "inputs are scaled (e.g. divided by 255), and rebuild the model: its weights are no longer usable.")

    def _check_weights_finite(self, where):
        """TrainingDivergedError when a weight is no longer finite: the loss can stay finite while one overflows (a
        BatchNormalization's moving variance over inputs of 1e20: its batch statistics normalize them, its moving
        ones, used by predict, become infinite)."""
        xp = backend.ops().xp
        for layer in self._all_layers():
            for name, w in zip(layer.weight_names, layer.weights):
                if not bool(xp.isfinite(w).all()):
                    raise self._diverged(f"the {name} of layer {layer.name!r} is no longer finite {where}")

    # ================================================================================= evaluate, predict
    def evaluate(self, x=None, y=None, batch_size=None, verbose="auto", sample_weight=None, steps=None,
                 callbacks=None, return_dict=False, _checked=False):
        """``[loss, metrics...]`` over the data (the loss alone when compiled without metrics); ``x`` as fit
        takes it (arrays with ``y``, or a dataset of (x, y) batches, with ``steps``). Keras's arguments, in its
        order; ``sample_weight`` is refused (as by fit)."""
        if sample_weight is not None:
            raise NotImplementedError("evaluate(sample_weight=...) is not supported by gpucnn yet")
        self._require_compiled("evaluate")
        verbose = _verbose(verbose)
        given_batch, batch_size = _batch_size(batch_size)
        ops = backend.ops()
        source = None
        if isinstance(x, adapters.Adapter) or not (steps is None and adapters.is_arrays(x, y)):
            source = x if isinstance(x, adapters.Adapter) else adapters.adapt(x, y, given_batch, steps, False, "x")
            source.reset()
            total = source.num_batches
            batches = self._checked_batches(source, 0)
        else:
            if isinstance(x, tuple) and _checked:
                x, y = x
            if not _checked:
                x = self._check_x(x)
                self._require_one_output("evaluate")
                y = self._check_y(y, len(x))
            x_dev, y_dev = ops.xp.asarray(x), ops.xp.asarray(y)
            total = math.ceil(len(x) / batch_size)
            batches = ((x_dev[k * batch_size:(k + 1) * batch_size], y_dev[k * batch_size:(k + 1) * batch_size])
                       for k in range(total))
        self._accuracy_form()  # (as in fit)
        cbs = callbacks if isinstance(callbacks, CallbackList) else CallbackList(
            _callback_list(callbacks), self, {"verbose": verbose, "epochs": 1, "steps": total})
        cbs.on_test_begin()
        bar = Progbar(total, verbose)
        loss_total, correct_total, seen = 0.0, 0, 0
        running = cbs.has_own("on_test_batch_end")  # Keras's running logs, read only for a hook that takes them
        try:
            for step, (xb, yb) in enumerate(batches):
                cbs.on_test_batch_begin(step)
                p = self._predict_batch(xb)[0]
                loss_total = loss_total + self.loss.per_sample(ops, p, yb).sum()
                correct_total = correct_total + self._count_correct(ops, p, yb)
                seen += len(xb)
                cbs.on_test_batch_end(step, self._read_logs(loss_total, correct_total, seen) if running else {})
                bar.update(step + 1, {})
        finally:
            if source is not None and source is not x:
                source.close()
        if not seen:
            if source is not None and source.exhausted:
                raise ValueError(f"evaluate: {source.what} has run out of batches (a generator can be read only once, "
                                 "and validation reads the same batches every epoch): give arrays, a PyDataset or a "
                                 "dataset that can be read again, or an endless generator with validation_steps")
            raise ValueError("evaluate: the data yields no samples")
        logs = self._read_logs(loss_total, correct_total, seen)
        cbs.on_test_end(logs)
        bar.finish(logs)
        return self._results(logs, return_dict)

    def _results(self, logs, return_dict):
        """What evaluate and the *_on_batch methods return, as Keras: the logs, or the loss alone (no metrics), or
        ``[loss, metrics...]``."""
        if return_dict:
            return logs
        return [logs["loss"]] + [logs[name] for name in self.metrics] if self.metrics else logs["loss"]

    # ================================================================================= one batch
    def train_on_batch(self, x, y=None, sample_weight=None, class_weight=None, return_dict=False):
        """One training step on the batch (x, y), as Keras 3: returns that batch's loss (and metrics, as evaluate
        returns them). A loss that becomes NaN or infinite raises TrainingDivergedError, as in fit."""
        self._require_compiled("train_on_batch")
        if sample_weight is not None or class_weight is not None:
            raise NotImplementedError("train_on_batch(sample_weight=..., class_weight=...) is not supported by gpucnn")
        x = self._check_x(x)
        self._require_one_output("train_on_batch")
        y = self._check_y(y, len(x))
        self._ready_to_train()
        xp = backend.ops().xp
        with np.errstate(over="ignore", invalid="ignore"):
            loss_sum, correct = self._train_step(xp.asarray(x), xp.asarray(y))
            logs = self._read_logs(loss_sum, correct, len(x))
        self._check_finite(logs, "in train_on_batch")
        return self._results(logs, return_dict)

    def test_on_batch(self, x, y=None, sample_weight=None, return_dict=False):
        """The loss (and metrics) of the batch (x, y) in inference, as ``evaluate`` over that one batch."""
        if sample_weight is not None:
            raise NotImplementedError("test_on_batch(sample_weight=...) is not supported by gpucnn")
        self._require_compiled("test_on_batch")
        return self.evaluate(x, y, batch_size=max(1, len(x)), verbose=0, return_dict=return_dict)

    def predict_on_batch(self, x):
        """The outputs for the batch ``x``, as ``predict`` over that one batch."""
        return self.predict(x, batch_size=max(1, len(x)), verbose=0)

    def predict(self, x, batch_size=None, verbose="auto", steps=None, callbacks=None):
        """The model's outputs for ``x`` (arrays, or a dataset / generator of batches, with ``steps``) as a
        NumPy array (N, ...), or a list of them for several outputs."""
        verbose = _verbose(verbose)
        given_batch, batch_size = _batch_size(batch_size)
        xp = backend.ops().xp
        source = None
        if not (steps is None and adapters.is_arrays(x, None)):
            source = adapters.adapt(x, None, given_batch, steps, False, "x")
            total = source.num_batches
            batches = (xb for xb, _ in self._checked_batches(source, 0, labels=False))
        else:
            x_dev = xp.asarray(self._check_x(x))
            total = math.ceil(len(x_dev) / batch_size)
            batches = (x_dev[k * batch_size:(k + 1) * batch_size] for k in range(total))
        cbs = CallbackList(_callback_list(callbacks), self, {"verbose": verbose, "epochs": 1, "steps": total})
        cbs.on_predict_begin()
        bar = Progbar(total, verbose)
        outs = [[] for _ in self.outputs]
        try:
            for step, xb in enumerate(batches):
                cbs.on_predict_batch_begin(step)
                for i, out in enumerate(self._predict_batch(xb)):
                    outs[i].append(backend.to_numpy(out).copy())
                batch_outs = [o[-1] for o in outs]
                cbs.on_predict_batch_end(step, {"outputs": batch_outs[0] if len(batch_outs) == 1 else batch_outs})
                bar.update(step + 1, {})
        finally:
            if source is not None:
                source.close()
        cbs.on_predict_end()
        bar.finish({})
        if not outs[0]:
            raise ValueError("predict: the data yields no samples")
        results = [np.concatenate(o) for o in outs]
        return results[0] if len(results) == 1 else results


def _verbose(verbose):
    if verbose == "auto":
        return 1
    if isinstance(verbose, bool) or verbose not in (0, 1, 2):
        raise ValueError(f"verbose must be 0, 1, 2 or 'auto', got {verbose!r}")
    return int(verbose)


def _callback_list(callbacks):
    """Keras's forms (None, one callback, a list or tuple) as a list of callbacks, each checked."""
    callbacks = callbacks_mod.as_list(callbacks)
    for cb in callbacks:
        if not isinstance(cb, callbacks_mod.Callback):
            raise TypeError(f"callbacks must hold gpucnn.callbacks.Callback objects, got {type(cb).__name__}")
    return callbacks


def _batch_size(batch_size):
    """(the batch size given, or None; the one arrays use: it, or Keras's default 32). An adapter told None picks
    Keras's own (ceil(N / steps) for arrays read in ``steps`` batches)."""
    given = None if batch_size is None else _positive_int(batch_size, "batch_size")
    return given, 32 if given is None else given


def _positive_int(value, what):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return int(value)
