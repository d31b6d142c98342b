"""The fast GPU training path: ``fit`` on the CUDA engine with the data on the device and the training step
captured once as a CUDA graph and replayed.

The step is the model's own: the graph's forward (``gpucnn.models.graph``, every layer's ``forward`` with the
engine's ops into kept buffers), the loss, the graph's backward, the optimizer's update — the very code the plain
engines run. This module only changes *how* it is launched. At batch 64 a step of the seed model holds about
16 µs of arithmetic, so launches and host synchronisation decide the time. Here:

  * the whole training set lives on the device, as uint8 when ``x`` is exactly ``uint8 / 255`` (checked
    once on the host), else as float32; labels too (one-hot float32 or int32);
  * each epoch's order is made on the device (``permutation_keys`` + ``cupy.argsort``, from a seed drawn
    from ``gpucnn.utils.rng()`` so ``set_random_seed`` repeats runs), outside the captured step;
  * the step (gather → the graph's forward → fused softmax (or sigmoid) cross-entropy → the graph's backward →
    optimizer → step counter + 1) is captured once per batch size as a CUDA graph (a second graph for a smaller last batch)
    and replayed. It first runs once eagerly, which compiles the kernels and allocates every buffer the layers
    keep (its effect on the weights, the optimizer state and BatchNormalization's moving statistics is undone);
    any allocation during the capture is refused. Values that change from step to step live in device memory: the step counter (reset before each
    epoch), which indexes the epoch's order, the per-step loss/accuracy slots, the dropout seeds, the random
    augmentation layers' per-image values (flip flags, transforms, contrast factors; ``StepValues``) and the
    optimizer's rates (tables filled before each epoch, drawn/computed as the plain path does for a whole
    epoch: an epoch stopped early has drawn its remaining seeds and values all the same);
  * the per-step loss sums and correct counts are copied to pinned host memory about every ``READ_EVERY``
    steps and read when the copy has finished, so the progress bar moves without stalling the GPU; a
    non-finite loss found there raises ``TrainingDivergedError`` (through the trainer's ``_end_batch``). A
    callback with its own train-batch hook runs the steps in lockstep instead: each step finishes, and its hooks
    get that step's running means, before the next one starts.

``unsupported_reason(model)`` says, without CuPy, why a model cannot take this path (None when it can);
``plan(model, batch_size, x, y)`` returns a ``Trainer`` or that reason; ``Trainer.run_epoch`` trains one
epoch. ``GPUCNN_FASTPATH=0`` turns the path off. ``fit`` uses it automatically on the GPU and prints one notice
per model when it falls back to the plain engine. ``evaluate`` and ``predict`` keep the plain path.

Differences from the plain CUDA path, all documented: the shuffled order comes from a different generator
(the same seed still gives the same order); the running loss is summed in float64 on the host from per-step
float32 sums; an optimizer hyper-parameter other than the learning rate changed by a callback is picked up at
the next epoch (the graph is captured again), not in the middle of one; a learning rate given as a function of
no arguments is called for all of an epoch's steps as it begins (a LearningRateSchedule gets each step's count,
so its rates are the plain path's).
"""
import math
import os
import sys
import weakref

import numpy as np

from .. import layers as L
from .. import losses as losses_mod
from .. import metrics as metrics_mod
from ..data.adapters import epoch_order
from .. import optimizers as optimizers_mod
from ..layers import LAYER_CLASSES
from . import capture
from .capture import CaptureAllocationError  # noqa: F401  (raised inside the captured step)
from .graph import Contexts, StepValues

READ_EVERY = 50  # steps between asynchronous copies of the per-step loss and accuracy to the host

_OPTIMIZERS = (optimizers_mod.SGD, optimizers_mod.RMSprop, optimizers_mod.Adam, optimizers_mod.AdamW)
_LOSSES = (losses_mod.CategoricalCrossentropy, losses_mod.SparseCategoricalCrossentropy,
           losses_mod.BinaryCrossentropy)
_OFF = ("0", "off", "false", "no")

_noticed = weakref.WeakSet()  # models whose fallback notice was printed


# ===================================================================================== what is supported
def unsupported_reason(model):
    """Why ``model`` (compiled) cannot train on the fast path, or None when it can. Pure Python: needs
    neither CuPy nor a GPU."""
    if not model.built or not model._all_layers():
        return "the model has no layers"
    if not model.trainable_weights:
        return "it has no trainable weights (every layer is frozen: there is nothing to update)"
    if type(model.optimizer) not in _OPTIMIZERS:
        return (f"its optimizer {type(model.optimizer).__name__} is not one the fast path implements "
                f"({', '.join(cls.__name__ for cls in _OPTIMIZERS)})")
    natural = metrics_mod.natural_form(model.loss)
    if model.metrics and model._accuracy_form() != natural:
        return (f"its metrics count {model._accuracy_form()} accuracy under a {model.loss.name} loss, which the "
                f"fast path's step does not count (it counts {natural} accuracy)")
    if type(model.loss) not in _LOSSES:
        return (f"its loss {type(model.loss).__name__} is not one the captured step computes (a cross-entropy of "
                "probabilities or of logits)")
    if len(model.outputs) != 1:
        return f"it has {len(model.outputs)} outputs"
    for layer in model._all_layers():
        if LAYER_CLASSES.get(type(layer).__name__) is not type(layer):
            return (f"layer {layer.name!r} is of the class {type(layer).__name__}, not one of gpucnn's own layers, "
                    "whose steps are known to allocate nothing")
    last = model.outputs[0].node.layer
    wanted = model.loss.fused_activation
    if model.loss.from_logits:  # the step applies the softmax / sigmoid itself: the output must be the logits
        if not (isinstance(last, (L.Dense, L.Activation)) and last.activation in (None, "linear")):
            return (f"its output layer is not a linear Dense or Activation (logits), which the captured step's "
                    f"{wanted} cross-entropy from_logits needs")
    elif not (isinstance(last, (L.Dense, L.Activation)) and last.activation == wanted):
        return (f"its output layer is not a {wanted} (Dense(..., activation='{wanted}') or "
                f"Activation('{wanted}')), which the fused {wanted} cross-entropy of the captured step needs")
    if len(model.outputs[0].sample_shape) != 1:
        return f"its output has per-sample shape {model.outputs[0].sample_shape}, not (classes,)"
    return None


def _refusal(model):
    """Why this model or setting does not take the fast path (None when it does)."""
    from .. import backend

    if backend.engine() != "cuda":
        return "the active engine is not the GPU"
    setting = os.environ.get("GPUCNN_FASTPATH", "1").strip().lower()
    if setting in _OFF:
        return f"turned off by GPUCNN_FASTPATH={setting}"
    return unsupported_reason(model)


def _make(build, what):
    """``build()`` (a trainer), or the reason it does not fit in GPU memory."""
    from ..engines import cuda_loader as cuda

    try:
        return build()
    except cuda.DeviceOutOfMemoryError as exc:
        return f"{what} do not fit in GPU memory ({exc})"


def plan(model, batch_size, x, y):
    """A ``Trainer`` for ``model`` on (x, y) — checked float32 NumPy inputs and labels as ``fit`` has
    them — or a string saying why the fast path is not used."""
    reason = _refusal(model)
    if reason:
        return reason
    if len(x) >= 2**31 - 1 - batch_size:
        return f"{len(x):,} samples are more than the fast path's 32-bit indices cover"
    return _make(lambda: Trainer(model, batch_size, x, y), "the training set and the step's buffers")


def plan_stream(model, batch_size, first_batch):
    """A ``StreamTrainer`` for ``model`` on batches from the host (``first_batch``: the first (x, y), checked), or
    a string saying why the fast path is not used."""
    reason = _refusal(model)
    if reason:
        return reason
    rows = max(int(batch_size), len(first_batch[0]))
    return _make(lambda: StreamTrainer(model, rows, first_batch[0].shape[1:]), "the step's buffers")


def notice(model, reason):
    """Print, once per model, why ``fit`` uses the plain engine."""
    if model not in _noticed:
        _noticed.add(model)
        print(f"gpucnn: fit uses the plain GPU engine, not the fast path: {reason}.", file=sys.stderr)


def as_uint8(x):
    """``x`` (float32) as uint8 when ``x == uint8 / 255`` exactly, bit for bit (the usual
    ``x.astype("float32") / 255``), else None."""
    if x.size == 0:
        return None
    u = np.rint(x * np.float32(255))
    if not (u.min() >= 0 and u.max() <= 255):  # (also False for NaN)
        return None
    u8 = u.astype(np.uint8)
    back = u8.astype(np.float32) / np.float32(255)
    if not np.array_equal(back.view(np.uint32), np.ascontiguousarray(x, np.float32).view(np.uint32)):
        return None
    return u8


# ===================================================================================== the trainer
class Trainer:
    """Device-resident data, the captured step graphs and the epoch loop of one ``fit`` call."""

    def __init__(self, model, batch_size, x, y, _modules=None):
        # _modules: (cupy, gpucnn.engines.cuda_loader, gpucnn.engines.cuda_ops); tests/test_fastpath.py passes
        # NumPy stand-ins to check the step's wiring on the CPU
        _modules = _modules or _default_modules()
        cupy, cuda, _ = _modules
        self._setup(model, batch_size, x.shape[1:], _modules, n=len(x))
        n = self.n
        with self.stream:  # the data, once, and the epoch's order
            u8 = as_uint8(x)
            self.x_u8 = None if u8 is None else cupy.asarray(u8.reshape(n, -1))
            self.x_f32 = cupy.asarray(x.reshape(n, -1)) if u8 is None else None
            self.y_dev = cupy.asarray(y.astype(np.int32 if self.sparse else np.float32))
            self.perm = cupy.arange(n, dtype=np.int32)
            self.keys = cuda.empty((n,), np.uint64)
            self.stream.synchronize()

    def _setup(self, model, batch_size, input_shape, modules, n=None, rows=None):
        """What every captured step needs: the model, its batch buffers, the counter and the per-step tables
        (``rows`` of them: the epoch's steps, or a window of streamed steps)."""
        cupy, cuda, _ = modules
        self.cupy, self.cuda, self.ops = modules
        model._require_built("fastpath.plan")
        model._adopt_weights()  # fit does this before planning; plan() may be called directly (the tests do)
        self.model = model
        self.n = n
        self.batch = int(batch_size)
        self.steps = math.ceil(n / self.batch) if rows is None else rows
        self._window = self.steps  # the table rows the steps to come read (a streamed trainer's window: fewer)
        self.full_rows = self.batch if n is None else min(self.batch, n)
        self.last_rows = self.full_rows if n is None else n - (self.steps - 1) * self.batch
        self.sparse = model.loss.sparse
        self.binary = isinstance(model.loss, losses_mod.BinaryCrossentropy)  # labels (N, units) float, as one-hot
        self.classes = int(model.outputs[0].sample_shape[-1])
        self.input_shape = tuple(input_shape)
        self.per_image = int(np.prod(self.input_shape))
        self.stream = cupy.cuda.Stream(non_blocking=True)
        opt = model.optimizer
        if opt.state is None:
            opt.build(model._params.shape[0])
        # The weights and optimizer state were written on the default stream, which a non-blocking
        # stream does not wait for: let that work finish before this stream reads them.
        cupy.cuda.Device().synchronize()
        with self.stream:
            # the counter and tables the step reads (StepValues, the optimizer's rates), the metric slots
            self.values = StepValues(model._random_layers(), rows=self.steps, xp=cupy, batch=self.full_rows)
            self.step = self.values.counter
            self.rates = cupy.zeros(self.steps, np.float32)
            self.decay_factors = cupy.zeros(self.steps, np.float32)  # weight decay's factors (filled with the rates)
            self.loss_steps = cupy.zeros(self.steps, np.float32)
            self.correct_steps = cupy.zeros(self.steps, np.int32)
            self._loss_host = _pinned(cupy, self.steps, np.float32)
            self._correct_host = _pinned(cupy, self.steps, np.int32)
            # the batch and the logits' gradient, at the full batch size (the layers keep their own buffers)
            self.xb = cuda.empty((self.full_rows,) + self.input_shape, np.float32)
            self.yb = cuda.empty((self.full_rows,) if self.sparse else (self.full_rows, self.classes),
                                 np.int32 if self.sparse else np.float32)
            self.dlogits = cuda.empty((self.full_rows, self.classes), np.float32)
            self.stream.synchronize()
        self._graphs, self._captured_key = {}, None

    # --------------------------------------------------------------------------------- the step
    def _program(self, rows, contexts):
        """The launches of one step over ``rows`` samples, as a list of callables (run eagerly once, then
        captured): the batch gathered, the model's own forward, loss, backward and update, the counter + 1."""
        ops, launch, model = self.ops, self.cuda.launch, self.model
        T = ops._THREADS
        xb, yb, dz = self.xb[:rows], self.yb[:rows], self.dlogits[:rows]

        def gather():
            launch("gather_batch", (ops._blocks(self.per_image), min(rows, 65535)), T,
                   (self.x_u8, self.x_f32, None if self.sparse else self.y_dev,
                    self.y_dev if self.sparse else None, self.perm, self.step, xb,
                    None if self.sparse else yb, yb if self.sparse else None,
                    self.n, self.batch, rows, self.per_image, self.classes))

        def forward_loss_backward():
            logits = model.graph.forward([xb], True, contexts)[0]  # the output layer leaves the softmax to the loss
            args = (logits, yb, dz, self.loss_steps, self.correct_steps, self.step, rows, self.classes,
                    model.loss.from_logits, *model.loss.smoothing(self.classes))  # (label smoothing's, as the loss's)
            if self.binary:
                launch("sigmoid_binary_crossentropy_step", 1, T, args)
            elif self.sparse:
                launch("softmax_crossentropy_step_sparse", 1, T, args)
            else:
                launch("softmax_crossentropy_step_onehot", 1, T, args)
            model.graph.backward([dz], contexts)

        def update():
            model.optimizer.update(model._params, model._grads, self.rates, self.step, self.decay_factors)

        return [gather, forward_loss_backward, update, lambda: launch("step_advance", 1, 1, (self.step,))]

    # --------------------------------------------------------------------------------- capture
    def _state_arrays(self):
        """What a step updates besides its own buffers: the weights (and the layers' own state, such as moving
        statistics, which are weights that do not train) and the optimizer's state."""
        opt, model = self.model.optimizer, self.model
        trains = model._trains()
        fixed = [layer.weights[i] for layer, i in model._weight_slots() if not trains(layer, i)]  # the arrays
        return [model._params] + [opt.state[k] for k in sorted(opt.state)] + fixed

    def _capture(self, rows):
        """Run the step for ``rows`` once eagerly (compiles the kernels, allocates every buffer the layers keep;
        its effect on the weights and optimizer state is undone), then capture it as a graph. Returns (graph,
        contexts): the contexts hold the buffers the graph reads and writes, so they live as long as it."""
        cupy = self.cupy
        contexts = Contexts(self.model.graph, step=self.values, skip_output_activation=True)
        program = self._program(rows, contexts)
        # What the graphs are captured over may have been written just now on the default stream, which this
        # non-blocking stream does not wait for: the buffers laid out again for a layer a callback froze
        # (``_graph_key``), an optimizer state built, the contexts' buffers. That work finishes first, or the
        # warm-up below could save (and put back) the weights as they were before the copies.
        cupy.cuda.Device().synchronize()
        with self.stream:
            # the eager run reads the counter (keep its slots in range) and writes the weights, the optimizer's
            # state, the layers' own state and a metric slot: all put back as they were
            kept = self._state_arrays() + [self.step, self.loss_steps, self.correct_steps]
            saved = [a.copy() for a in kept]
            self.step.fill(0)
            for run in program:
                run()
            for a, s in zip(kept, saved):
                cupy.copyto(a, s)
            self.stream.synchronize()
            del saved
            with capture.capturing(cupy, self.stream) as captured:  # allocations refused, exception-safe
                for run in program:
                    run()
        return captured.graph, contexts

    def _graph_buffers(self):
        """Every array the step graphs read or write outside their own buffers (kept in their contexts): the
        weights and their gradients, the optimizer's state, the layers' own state, the data, the batch
        buffers, the counter and the per-step tables."""
        model = self.model
        own = (getattr(self, "x_u8", None), getattr(self, "x_f32", None), getattr(self, "y_dev", None),
               getattr(self, "perm", None), self.step, self.values.seeds, *self.values.tables.values(), self.rates,
               self.decay_factors, self.loss_steps,
               self.correct_steps, self.xb, self.yb, self.dlogits)
        layers = [a for layer in model._all_layers() for a in (*layer.weights, *layer.grads)]
        return [*self._state_arrays(), model._grads, *layers, *own]

    def _graph_key(self):
        """What the captured graphs depend on: the very buffers they were captured over (a graph holds raw
        pointers: a recompiled model or a rebuilt optimizer state means new buffers; ``capture.buffer_key``),
        the optimizer's settings other than the learning rate (which the graphs read from the rates table), and
        which layers are trainable (a frozen BatchNormalization runs in inference mode)."""
        model, opt = self.model, self.model.optimizer
        model._sync_trainable()  # a layer frozen or unfrozen by a callback: new buffers, so new graphs
        if opt.state is None:  # rebuilt (the model's buffers were packed again): state for the new buffers
            opt.build(model._params.shape[0])
        config = {k: v for k, v in opt.get_config().items() if k != "learning_rate"}
        config["excluded from weight decay"] = (opt._excluded_names, tuple(id(a) for a in opt._excluded_arrays))
        return (tuple(sorted(config.items())), capture.buffer_key(self._graph_buffers()),
                model._trainable_flags())

    def _ensure_graphs(self):
        key = self._graph_key()
        if self._graphs and key == self._captured_key:
            return
        self._graphs = {}
        for rows in {self.full_rows, self.last_rows}:
            self._graphs[rows] = self._capture(rows)
        self._captured_key = key

    def graph_for(self, step):
        """The captured graph that runs step ``step`` of an epoch."""
        rows = self.last_rows if step == self.steps - 1 else self.full_rows
        return self._graphs[rows][0]

    # --------------------------------------------------------------------------------- epochs
    def begin_epoch(self, shuffle):
        """Outside the graph: the epoch's order, the step counter back to 0, the dropout seeds and the optimizer's
        rates for all its steps (drawn and computed as the plain path does over a whole epoch)."""
        from ..utils import rng

        cupy, opt = self.cupy, self.model.optimizer
        # Between epochs, callbacks (on_train_begin, on_epoch_end/begin) and validation run on the default
        # stream, which the non-blocking training stream does not wait for: a set_weights there (an
        # asynchronous copy kernel) could still be writing the weights when this epoch's steps read them.
        cupy.cuda.Device().synchronize()
        self._ensure_graphs()
        with self.stream:
            if shuffle == "batch":  # the same batches, each one's samples in a new order: drawn as the plain path
                self.perm.set(epoch_order(self.n, self.batch, shuffle).astype(np.int32))
            elif shuffle:
                seed = int(rng().integers(2**63))
                self.cuda.launch("permutation_keys", self.ops._blocks(self.n), self.ops._THREADS,
                                 (self.keys, self.n, seed))
                cupy.copyto(self.perm, cupy.argsort(self.keys).astype(np.int32))
            else:
                self.perm[...] = cupy.arange(self.n, dtype=np.int32)
            self.step.fill(0)
            if self.values.layers:
                self.values.fill([self.full_rows] * (self.steps - 1) + [self.last_rows])
        self._set_rates(0, self.steps)

    def _set_rates(self, row, count):
        """Rows ``row`` .. ``row + count - 1`` of the rates table (and of weight decay's factors): the optimizer's
        rates from its next step on (the host keeps a copy, ``_follow_hooks`` compares with it)."""
        opt = self.model.optimizer
        rates = opt.rates_for(opt.iterations + 1, count)
        factors = opt.decay_factors_for(opt.iterations + 1, count)
        if factors is None:  # no weight decay: factors of 1, so a graph never reads a stale or zero row
            factors = np.ones(count, np.float32)
        if getattr(self, "_host_rates", None) is None or len(self._host_rates) != len(self.rates):
            self._host_rates = np.zeros(len(self.rates), np.float32)
            self._host_factors = np.ones(len(self.rates), np.float32)
        self._host_rates[row:row + count] = rates
        self._host_factors[row:row + count] = factors
        with self.stream:
            self.rates[row:row + count].set(rates)
            self.decay_factors[row:row + count].set(factors)

    def _follow_hooks(self, row):
        """In lockstep, after the batch-begin hooks, what a batch callback changed applies from this step, as on
        the plain path: a learning rate set there (the rates table from row ``row`` on), a layer frozen or
        unfrozen (the model's buffers laid out again, before the graphs are captured over them); then the device
        finishes the default stream's work (the callbacks', the new buffers) before the step runs."""
        opt = self.model.optimizer
        factor = opt.decay_factors_for(opt.iterations + 1, 1)
        if (opt.rates_for(opt.iterations + 1, 1)[0] != self._host_rates[row]
                or (1.0 if factor is None else factor[0]) != self._host_factors[row]):  # the rate or weight_decay
            self._set_rates(row, self._window - row)
        self.model._sync_trainable()
        self.cupy.cuda.Device().synchronize()

    def seen_after(self, step):
        return min((step + 1) * self.batch, self.n)

    def run_epoch(self, epoch, shuffle, cbs, bar):
        """Train one epoch: replay the graphs, calling the batch callbacks and updating the bar; returns the
        epoch's logs. Raises TrainingDivergedError when a read finds a non-finite loss."""
        cupy = self.cupy
        self.begin_epoch(shuffle)
        opt = self.model.optimizer
        logs, pending = {}, None  # pending: (event, last step its copy covers)
        # A batch callback that may use the model must see it as after each step, and anything it changes
        # (on the default stream) must be done before the next step reads it: then every step waits.
        lockstep = cbs.batch_hooks_use_model()
        try:
            for step in range(self.steps):
                cbs.on_train_batch_begin(step)
                if lockstep:
                    self._follow_hooks(step)
                    self._ensure_graphs()  # new graphs if a hook froze or unfroze a layer (new buffers)
                self.graph_for(step).launch(self.stream)
                opt.count_step()
                if step == self.steps - 1:  # the epoch's end: wait for everything, read every slot
                    self._copy_metrics(step)
                    self.stream.synchronize()
                    logs = self._logs(step, epoch)
                elif lockstep:  # the hooks get this step's running means, as on the plain path (Keras passes them)
                    self._copy_metrics(step)
                    self.stream.synchronize()
                    logs = self._logs(step, epoch)
                else:
                    if pending is not None and pending[0].done:
                        logs, pending = self._logs(pending[1], epoch), None
                    if pending is None and step % READ_EVERY == READ_EVERY - 1:
                        self._copy_metrics(step)
                        event = cupy.cuda.Event(disable_timing=True)
                        event.record(self.stream)
                        pending = (event, step)
                if self.model._end_batch(cbs, bar, epoch, step, logs):
                    self.stream.synchronize()  # the steps already launched finish before fit goes on
                    break
        except BaseException:
            # TrainingDivergedError from _end_batch, a callback's error, KeyboardInterrupt: steps are still
            # in flight on the training stream. Let them finish before the caller reads the weights on the
            # default stream (which does not wait for this stream) and before this trainer's buffers and
            # pinned metric slots (an asynchronous copy may still target them) can be freed and reused.
            try:
                self.stream.synchronize()
            except Exception:  # a device error of its own: the original exception says more
                pass
            raise
        return logs

    def _copy_metrics(self, step):
        """Start copying the per-step slots 0..step to pinned host memory (asynchronous)."""
        k = step + 1
        self.loss_steps[:k].get(stream=self.stream, out=self._loss_host[:k], blocking=False)
        self.correct_steps[:k].get(stream=self.stream, out=self._correct_host[:k], blocking=False)

    def _logs(self, step, epoch):
        """The running means through ``step`` from the copied slots (the plain path's rule and error)."""
        seen = self.seen_after(step)
        loss_total = float(np.sum(self._loss_host[:step + 1], dtype=np.float64))
        correct_total = int(np.sum(self._correct_host[:step + 1], dtype=np.int64))
        return self.model._read_logs(loss_total, correct_total, seen)


class StreamTrainer(Trainer):
    """The captured step for batches that come from the host (a dataset, a generator, a PyDataset): each batch is
    copied into the step's input buffers, then the step's graph for that batch size (captured the first time it
    is seen) is replayed. The per-step tables hold a window of ``READ_EVERY`` steps: before each window the host
    puts the counter back to 0 and fills the window's rates; each step's row of the random layers' values is
    drawn as its batch arrives (its size known then), as the plain path draws them; after the window, its
    metric slots are read (one wait per window, as the device-resident path reads every ``READ_EVERY`` steps)."""

    def __init__(self, model, batch_size, input_shape, _modules=None):
        self._setup(model, batch_size, input_shape, _modules or _default_modules(), rows=READ_EVERY)

    def _program(self, rows, contexts):
        return super()._program(rows, contexts)[1:]  # no gather: the host copies each batch in

    def _graph(self, rows, position):
        """The graph for ``rows`` samples (captured now if new; all captured again when what they depend on
        changed), with the counter left at ``position`` of the window."""
        key = self._graph_key()
        if key != self._captured_key:
            self._graphs, self._captured_key = {}, key
        if rows not in self._graphs:
            self._graphs[rows] = self._capture(rows)
        return self._graphs[rows][0]

    def _open_window(self, steps):
        """Before the next ``steps`` steps (at most a window): the counter back to 0, the window's rates. (The
        random layers' values are drawn step by step, as each batch arrives with its size: ``run_epoch``.)"""
        self.cupy.cuda.Device().synchronize()  # writes of callbacks or validation on the default stream first
        with self.stream:
            self.step.fill(0)
        self._window = min(steps, self.steps)  # the rates of these steps only: a schedule may end after them
        self._set_rates(0, self._window)

    def _window_totals(self, rows, totals):
        """The epoch's running totals (loss sum, correct count, samples) with the window's steps so far, read
        from their slots (waiting for those steps)."""
        self._copy_metrics(len(rows) - 1)
        self.stream.synchronize()
        return [totals[0] + float(np.sum(self._loss_host[:len(rows)], dtype=np.float64)),
                totals[1] + int(np.sum(self._correct_host[:len(rows)], dtype=np.int64)), totals[2] + sum(rows)]

    def _close_window(self, rows, totals):
        """Read the window's slots (waiting for its steps) into the epoch's running totals; returns the logs."""
        totals[:] = self._window_totals(rows, totals)
        rows.clear()
        return self.model._read_logs(*totals)

    def _pulled(self, batches):
        """``batches``, each pulled in stream order. Pulling one runs the user's dataset code (a PyDataset's
        ``__getitem__`` and ``on_epoch_end``, a generator), which may use the model on the default stream —
        predict with it, read or set its weights — while the steps launched before still run on the training
        stream, which the default stream does not wait for. So the default stream waits for the steps launched so
        far, and the next steps for what the pull left on the default stream: two event waits, none on the host.
        (A PyDataset with ``workers`` > 1 reads batches ahead on threads of its own: model use there is not
        ordered so.)"""
        cuda, items = self.cupy.cuda, iter(batches)
        null = cuda.Stream.null
        steps_done, pull_done = cuda.Event(disable_timing=True), cuda.Event(disable_timing=True)  # (re-recorded)
        while True:
            null.wait_event(self.stream.record(steps_done))
            try:
                item = next(items)
            except StopIteration:
                self.stream.wait_event(null.record(pull_done))
                return
            self.stream.wait_event(null.record(pull_done))
            yield item

    def run_epoch(self, batches, epoch, cbs, bar):
        """Train on ``batches`` (host (x, y) NumPy batches, checked) as one epoch (of ``bar.target`` steps when
        known); returns its logs."""
        opt, lockstep = self.model.optimizer, cbs.batch_hooks_use_model()
        totals, window, logs = [0.0, 0, 0], [], {}
        try:
            for step, (xb, yb) in enumerate(self._pulled(batches)):
                if step % self.steps == 0:
                    if window:
                        logs = self._close_window(window, totals)
                    left = self.steps if bar.target is None else min(self.steps, bar.target - step)
                    self._open_window(max(left, 1))
                elif step % self.steps >= self._window:  # more batches than the dataset's len() said: this
                    self._set_rates(step % self.steps, 1)  # step's rate now (its table row was not filled)
                    self._window = step % self.steps + 1
                cbs.on_train_batch_begin(step)
                rows = len(xb)
                if rows > self.full_rows:
                    raise ValueError(f"batch {step} has {rows} samples, more than the {self.full_rows} the GPU fast "
                                     "path sized its buffers for (the first batch, or batch_size); give batches of "
                                     "at most that size, or set GPUCNN_FASTPATH=0")
                if lockstep:
                    self._follow_hooks(step % self.steps)
                graph = self._graph(rows, step % self.steps)
                with self.stream:
                    self.xb[:rows].set(np.ascontiguousarray(xb, np.float32))
                    self.yb[:rows].set(np.ascontiguousarray(yb, self.yb.dtype))
                    if self.values.layers:  # this step's seeds and augmentation values, for its rows, as the plain path
                        self.values.load(self.values.draw([rows]), row=step % self.steps)
                graph.launch(self.stream)
                opt.count_step()
                window.append(rows)
                # the hooks get this step's running means, as on the plain path (Keras passes them); steps that
                # run ahead get them at the epoch's last step (known from len()), as the array trainer reads it
                if lockstep or (bar.target is not None and step == bar.target - 1):
                    logs = self.model._read_logs(*self._window_totals(window, totals))
                if self.model._end_batch(cbs, bar, epoch, step, logs):
                    break
            if window:
                logs = self._close_window(window, totals)
        except BaseException:
            try:  # steps in flight finish before the caller reads the weights or frees these buffers
                self.stream.synchronize()
            except Exception:
                pass
            raise
        return logs


def _default_modules():
    import cupy

    from ..engines import cuda_loader as cuda, cuda_ops as ops_cuda

    return cupy, cuda, ops_cuda


def _pinned(cupy, count, dtype):
    """A NumPy array of ``count`` elements in page-locked host memory (asynchronous copies need it)."""
    dtype = np.dtype(dtype)
    memory = cupy.cuda.alloc_pinned_memory(max(1, count) * dtype.itemsize)
    return np.frombuffer(memory, dtype, count)
