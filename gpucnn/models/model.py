"""``Sequential``: a stack of layers with Keras's ``summary``, ``compile``, ``fit``, ``evaluate``,
``predict`` and weights in Keras's order.

All weights live in one flat float32 buffer on the active engine (each layer's kernel and bias are views
into it), and all gradients in another, so an optimizer step is one engine call.
"""
import math
import sys

import numpy as np

from .. import backend, losses as losses_mod, optimizers as optimizers_mod
from . import parallel
from ..callbacks import CallbackList, History
from ..layers import ConvPool, InputLayer, Layer, MaxPooling2D, fusable_pool
from ..progress import Progbar
from ..utils import next_name, rng

_ALIGN = 64  # each weight starts on a 256-byte boundary of the flat buffer


class TrainingDivergedError(FloatingPointError):
    """The training loss became NaN or infinite."""


class Sequential:
    """A linear stack of layers: ``Sequential([Conv2D(...), MaxPooling2D(), ...])`` or ``.add()``."""

    READ_EVERY = 50  # GPU engine: steps between reads of the running loss (each read waits for the GPU)

    def __init__(self, layers=None, name=None):
        self.name = name or next_name("sequential")
        self.layers = []
        self._input_shape = None
        self.built = False
        self.optimizer = self.loss = None
        self.metrics = []
        self.stop_training = False
        self.history = None
        for layer in layers or []:
            self.add(layer)

    # ================================================================================= building
    def add(self, layer):
        """Append a layer (built at once when the model's input shape is known, as in Keras)."""
        if not isinstance(layer, Layer):
            raise TypeError(f"Sequential.add takes a gpucnn layer, got {layer!r}")
        if isinstance(layer, InputLayer):
            if self.layers or self._input_shape is not None:
                raise ValueError("an Input must be the first element of a Sequential model")
            self._input_shape = layer.shape
            return self
        if any(l.name == layer.name for l in self.layers):
            raise ValueError(f"the model already has a layer named {layer.name!r}; layer names must be "
                             "unique (pass name=... to tell them apart)")
        if not self.layers and self._input_shape is None and layer._declared_input is not None:
            self._input_shape = layer._declared_input
        self.layers.append(layer)
        self.built = False  # weights are packed again on next use
        if self._input_shape is not None and not layer.built:
            previous = self.layers[-2].output_shape if len(self.layers) > 1 else self._input_shape
            layer.build(previous)
        return self

    def build(self, input_shape=None):
        """Build every layer. ``input_shape`` is Keras's: it starts with the batch dimension, e.g.
        ``(None, 28, 28, 1)``; without it, the shape given to the first layer is used."""
        requested = None
        if input_shape is not None:
            requested = tuple(input_shape)
            if len(requested) < 2:
                raise ValueError(f"build() takes a shape with the batch dimension first, e.g. (None, 28, "
                                 f"28, 1); got {requested}")
            requested = tuple(int(d) for d in requested[1:])
        if self.built:
            if requested is not None and requested != tuple(self._input_shape):
                raise ValueError(f"the model is built for inputs {tuple(self._input_shape)}, not {requested}; "
                                 "build a new model for another input shape")
            return
        previous_shape = self._input_shape
        if requested is not None:
            self._input_shape = requested
        if self._input_shape is None:
            raise ValueError("the model does not know its input shape yet: give the first layer "
                             "input_shape=(28, 28, 1), start with layers.Input(shape=...), or call fit()")
        if not self.layers:
            raise ValueError("the model has no layers")
        shape = tuple(int(d) for d in self._input_shape)
        fresh = [layer for layer in self.layers if not layer.built]
        try:
            for layer in self.layers:
                shape = layer.build(shape)
        except Exception:
            for layer in fresh:  # a later call with a corrected shape starts clean
                layer._unbuild()
            self._input_shape = previous_shape
            raise
        trainable = [l for l in self.layers if l.weights]
        for layer in self.layers:  # the first layer with weights needs no input gradient
            if hasattr(layer, "needs_input_grad"):
                layer.needs_input_grad = layer is not (trainable[0] if trainable else None)
        self._pack_weights()
        if self.optimizer is not None:
            self.optimizer.reset()  # new buffers: the optimizer starts again
        self.built = True

    def _pack_weights(self, params=None, grads=None):
        """Move every weight and gradient into one flat buffer each (new ones, or the float32 arrays
        ``params`` and ``grads`` of the right size); layers keep views into them."""
        xp = backend.ops().xp
        sizes = [int(np.prod(w.shape)) for l in self.layers for w in l.weights]
        offsets = np.cumsum([0] + [-(-s // _ALIGN) * _ALIGN for s in sizes])
        self._params = xp.zeros(int(offsets[-1]), dtype=np.float32) if params is None else params
        self._grads = xp.zeros(int(offsets[-1]), dtype=np.float32) if grads is None else grads
        k = 0
        for layer in self.layers:
            for i, w in enumerate(layer.weights):
                lo, hi = int(offsets[k]), int(offsets[k]) + sizes[k]
                self._params[lo:hi] = w.reshape(-1)
                layer.weights[i] = self._params[lo:hi].reshape(w.shape)
                layer.grads[i] = self._grads[lo:hi].reshape(w.shape)
                k += 1

    def _require_built(self, what):
        if not self.built:
            if self._input_shape is None:
                raise ValueError(f"{what}: the model has not been built yet. Give the first layer "
                                 "input_shape=..., call model.build((None, 28, 28, 1)) with your shape, or fit it first.")
            self.build()

    @property
    def input_shape(self):
        return None if self._input_shape is None else (None,) + tuple(self._input_shape)

    @property
    def output_shape(self):
        self._require_built("output_shape")
        return (None,) + tuple(self.layers[-1].output_shape)

    def get_layer(self, name=None, index=None):
        if index is not None:
            return self.layers[index]
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise ValueError(f"no layer named {name!r}; layers: {[l.name for l in self.layers]}")

    # ================================================================================= weights
    def count_params(self):
        self._require_built("count_params")
        return sum(layer.count_params() for layer in self.layers)

    def get_weights(self):
        """Every layer's weights, in order, as NumPy arrays (Keras's order and layouts)."""
        self._require_built("get_weights")
        return [w for layer in self.layers for w in layer.get_weights()]

    def set_weights(self, weights):
        """Set all weights from a list like ``get_weights()`` returns (e.g. a Keras model's)."""
        self._require_built("set_weights")
        weights = list(weights)
        expected = sum(len(layer.weights) for layer in self.layers)
        if len(weights) != expected:
            raise ValueError(f"the model has {expected} weight arrays, got {len(weights)}")
        i = 0
        for layer in self.layers:
            n = len(layer.weights)
            layer.set_weights(weights[i:i + n])
            i += n

    # ================================================================================= summary
    def summary(self, print_fn=None):
        """Print Keras's summary table: layer (type), output shape, parameter count, totals."""
        self._require_built("summary")
        print_fn = print_fn or print
        widths = (33, 24, 15)

        def row(cells, left="│", mid="│", right="│"):
            a, b, c = cells
            return (f"{left} {a:<{widths[0] - 2}} {mid} {b:<{widths[1] - 2}} {mid} "
                    f"{c:>{widths[2] - 2}} {right}")

        def rule(left, mid, right, ch):
            return left + mid.join(ch * w for w in widths) + right

        lines = [f'Model: "{self.name}"', rule("┏", "┳", "┓", "━"),
                 row(("Layer (type)", "Output Shape", "Param #"), "┃", "┃", "┃"),
                 rule("┡", "╇", "┩", "━")]
        for i, layer in enumerate(self.layers):
            shape = "(None, " + ", ".join(str(d) for d in layer.output_shape) + ")"
            lines.append(row((f"{layer.name} ({type(layer).__name__})", shape,
                              f"{layer.count_params():,}")))
            if i < len(self.layers) - 1:
                lines.append(rule("├", "┼", "┤", "─"))
        lines.append(rule("└", "┴", "┘", "─"))
        total = self.count_params()
        trainable = sum(l.count_params() for l in self.layers if l.trainable)
        for label, n in (("Total", total), ("Trainable", trainable), ("Non-trainable", total - trainable)):
            lines.append(f" {label} params: {n:,} ({_readable_size(n * 4)})")
        for line in lines:
            print_fn(line)

    # ================================================================================= compile
    def compile(self, optimizer="rmsprop", loss=None, metrics=None):
        """Choose the optimizer (name or object), the loss and the metrics (``["accuracy"]``)."""
        self.optimizer = optimizers_mod.get(optimizer)
        if loss is None:
            raise ValueError("compile() needs a loss, e.g. loss='categorical_crossentropy'")
        self.loss = losses_mod.get(loss)
        metrics = [metrics] if isinstance(metrics, str) else list(metrics or [])
        for m in metrics:
            if m not in ("accuracy", "acc"):
                raise ValueError(f"unknown metric {m!r}; gpucnn knows 'accuracy'")
        self.metrics = ["accuracy"] if metrics else []

    def _require_compiled(self, what):
        if self.optimizer is None or self.loss is None:
            raise RuntimeError(f"you must compile the model before calling {what}(): "
                               "model.compile(optimizer='rmsprop', loss='categorical_crossentropy', "
                               "metrics=['accuracy'])")

    # ================================================================================= data checks
    def _check_x(self, x, what="x"):
        """Validate inputs and return them as a float32 NumPy array (building the model if needed)."""
        if backend.is_engine_array(x):
            x = backend.to_numpy(x)
        x = np.asarray(x)
        if x.dtype.kind not in "biuf":
            raise TypeError(f"{what} must be a numeric array (float32, or integers/uint8 to be cast), "
                            f"got dtype {x.dtype}")
        if x.ndim == 0 or x.shape[0] == 0:
            raise ValueError(f"{what} is empty (shape {x.shape}): there are no samples")
        if not self.built:
            if self._input_shape is None:  # the first data fixes the input shape, once it builds
                try:
                    self._input_shape = x.shape[1:]
                    self.build()
                except Exception:
                    self._input_shape = None
                    raise
            self.build()
        expected = tuple(self._input_shape)
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
        return self.loss.check_labels(y, self.layers[-1].output_shape[-1], what)

    # ================================================================================= the step
    def _forward(self, x, training):
        for step in (self._training_steps() if training else self.layers):
            x = step.forward(x, training)
        return x

    def _training_steps(self):
        """The layers as a training step runs them: a Conv2D and the 2x2 max-pooling after it as one
        ``ConvPool`` (layers.fusable_pool), every other layer alone."""
        key = tuple(map(id, self.layers))
        if getattr(self, "_steps_key", None) != key:
            steps, i = [], 0
            while i < len(self.layers):
                nxt = self.layers[i + 1] if i + 1 < len(self.layers) else None
                if fusable_pool(self.layers[i], nxt):
                    steps.append(ConvPool(self.layers[i], nxt))
                    i += 2
                else:
                    steps.append(self.layers[i])
                    i += 1
            self._steps, self._steps_key = steps, key
        return self._steps

    def _fused_softmax(self):
        last = self.layers[-1]
        return getattr(last, "activation", None) == "softmax"

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
        (gpucnn/models/parallel.py). ``scale`` multiplies the loss gradient: a half's share of its batch."""
        if scale is None and parallel.split_reason(self, len(xb)) is None:
            return parallel.split_step(self, xb, yb)
        ops = backend.ops()
        sparse = self.loss.sparse
        p = self._forward(xb, training=True)
        loss_sum = ops.crossentropy_forward(p, yb, sparse).sum()
        correct = ops.count_correct(p, yb, sparse)
        fused = self._fused_softmax()  # softmax + cross-entropy: the gradient w.r.t. the logits directly
        dy = (ops.softmax_crossentropy_backward if fused else ops.crossentropy_backward)(p, yb, sparse)
        if scale is not None:
            dy *= np.float32(scale)
        self._backward(dy, through_last_activation=not fused)
        return loss_sum, correct

    def _backward(self, dy, through_last_activation=True):
        """Backward through the training steps, last to first, leaving the weight gradients in ``_grads``."""
        ops = backend.ops()
        through = through_last_activation
        steps = self._training_steps()
        for j in reversed(range(len(steps))):
            step = steps[j]
            if isinstance(step, MaxPooling2D) and j and getattr(steps[j - 1], "activation", 0) == "relu":
                # ReLU then max-pooling: each pooled gradient goes to a window's maximum, where the ReLU's
                # output is the pooled value, so the ReLU mask is applied to the smaller pooled gradient.
                dy = step.backward(ops.activation_backward(dy, step.y, "relu"))
                through = False
                continue
            dy = step.backward(dy, through) if hasattr(step, "activation") else step.backward(dy)
            through = True
            if dy is None:  # the first layer with weights computes no input gradient
                break

    # ================================================================================= fit
    def fit(self, x=None, y=None, batch_size=32, epochs=1, verbose=1, callbacks=None,
            validation_split=0.0, validation_data=None, shuffle=True, initial_epoch=0):
        """Train; returns a ``History`` whose ``.history`` has ``loss``, ``accuracy``, ``val_*``."""
        self._require_compiled("fit")
        batch_size = _positive_int(batch_size, "batch_size")
        if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 0:
            raise ValueError(f"epochs must be a non-negative int, got {epochs!r}")
        x = self._check_x(x)
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
            if len(validation_data) != 2:
                raise ValueError("validation_data must be a tuple (x_val, y_val)")
            xv = self._check_x(validation_data[0], "validation_data[0]")
            validation_data = (xv, self._check_y(validation_data[1], len(xv), "validation_data[1]"))

        xp = backend.ops().xp
        trainer = None
        if backend.engine() == "cuda":  # the fast path (gpucnn/models/fastpath.py): a CUDA graph per step
            from . import fastpath
            trainer = fastpath.plan(self, batch_size, x, y)
            if isinstance(trainer, str):
                fastpath.notice(self, trainer)
                trainer = None
        # the whole set goes to the engine once (the fast path's trainer holds its own device copy)
        x_dev, y_dev = (x, y) if trainer is not None else (xp.asarray(x), xp.asarray(y))
        history = History()
        params = {"verbose": verbose, "epochs": epochs, "steps": math.ceil(len(x) / batch_size)}
        cbs = CallbackList(list(callbacks or []) + [history], self, params)
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
        if self.metrics:
            logs["accuracy"] = int(correct_total) / seen
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
            y = self._check_y(y, len(x))
        cbs = callbacks if isinstance(callbacks, CallbackList) else CallbackList(callbacks, self, {})
        cbs.on_test_begin()
        ops = backend.ops()
        x_dev, y_dev = ops.xp.asarray(x), ops.xp.asarray(y)
        steps = math.ceil(len(x) / batch_size)
        bar = Progbar(steps, verbose)
        loss_total, correct_total = 0.0, 0
        for step in range(steps):
            cbs.on_test_batch_begin(step)
            sl = slice(step * batch_size, (step + 1) * batch_size)
            p = self._forward(x_dev[sl], training=False)
            loss_total = loss_total + ops.crossentropy_forward(p, y_dev[sl], self.loss.sparse).sum()
            correct_total = correct_total + ops.count_correct(p, y_dev[sl], self.loss.sparse)
            cbs.on_test_batch_end(step, {})
            bar.update(step + 1, {})
        logs = {"loss": float(loss_total) / len(x)}
        if self.metrics:
            logs["accuracy"] = int(correct_total) / len(x)
        cbs.on_test_end(logs)
        bar.finish(logs)
        if return_dict:
            return logs
        return [logs["loss"], logs["accuracy"]] if self.metrics else logs["loss"]

    def predict(self, x, batch_size=32, verbose=1, callbacks=None):
        """The model's outputs for ``x`` as a NumPy array (N, ...)."""
        batch_size = _positive_int(batch_size, "batch_size")
        x = self._check_x(x)
        cbs = CallbackList(callbacks, self, {})
        cbs.on_predict_begin()
        xp = backend.ops().xp
        x_dev = xp.asarray(x)
        steps = math.ceil(len(x) / batch_size)
        bar = Progbar(steps, verbose)
        outs = []
        for step in range(steps):
            cbs.on_predict_batch_begin(step)
            outs.append(self._forward(x_dev[step * batch_size:(step + 1) * batch_size], training=False))
            cbs.on_predict_batch_end(step, {})
            bar.update(step + 1, {})
        cbs.on_predict_end()
        bar.finish({})
        return backend.to_numpy(xp.concatenate(outs))

    def layer_outputs(self, x, layers=None):
        """The output of every layer (or of the named ones) for inputs ``x``, as NumPy arrays in a dict
        keyed by layer name, in model order: the feature maps a convnet computes."""
        x = self._check_x(x)
        names = [l.name for l in self.layers] if layers is None else list(layers)
        unknown = [n for n in names if n not in {l.name for l in self.layers}]
        if unknown:
            raise ValueError(f"no layer named {unknown[0]!r}; layers: {[l.name for l in self.layers]}")
        out, h = {}, backend.ops().xp.asarray(x)
        for layer in self.layers:
            h = layer.forward(h, training=False)
            if layer.name in names:
                out[layer.name] = backend.to_numpy(h).copy()
        return out

    # ================================================================================= saving
    def save(self, path):
        """Save architecture, weights and optimizer state to one file (see ``gpucnn.saving``)."""
        from ..saving import save_model
        save_model(self, path)

    def save_weights(self, path):
        """Save the weights alone (an ``.npz`` of float32 arrays, Keras's order)."""
        from ..saving import save_weights
        save_weights(self, path)

    def load_weights(self, path):
        """Load weights saved by ``save_weights`` (or ``save``) into this model."""
        from ..saving import load_weights
        load_weights(self, path)

    def __call__(self, x, training=False):
        """Forward pass on an engine array (no checks, no batching)."""
        self._require_built("__call__")
        return self._forward(backend.ops().xp.asarray(x, dtype=np.float32), training)

    def get_config(self):
        return {"name": self.name, "input_shape": list(self._input_shape or []),
                "layers": [{"class_name": type(l).__name__, "config": l.get_config()}
                           for l in self.layers]}


def load_model(path):
    """Rebuild a model saved by ``model.save(path)``: architecture, weights, optimizer state."""
    from ..saving import load_model as _load
    return _load(path)


def _positive_int(value, what):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return int(value)


def _readable_size(nbytes):
    size = float(nbytes)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024:
            return f"{size:.2f} {unit}"
        size /= 1024
    return f"{size:.2f} PB"
