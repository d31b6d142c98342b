"""The fast GPU training path: ``fit`` on the CUDA engine with the data on the device and the training step
captured once as a CUDA graph and replayed.

At batch 64 a step of the seed model holds about 16 µs of arithmetic, so launches and host synchronisation
decide the time. Here:

  * the whole training set lives on the device, as uint8 when ``x`` is exactly ``uint8 / 255`` (checked
    once on the host), else as float32; labels too (one-hot float32 or int32);
  * each epoch's order is made on the device (``permutation_keys`` + ``cupy.argsort``, from a seed drawn
    from ``gpucnn.utils.rng()`` so ``set_random_seed`` repeats runs), outside the captured step;
  * the step (gather → forward → fused softmax cross-entropy → backward → optimizer → step counter + 1) is
    captured once per batch size as a CUDA graph (a second graph for a smaller last batch) and replayed.
    Every buffer is allocated before the capture, and any allocation during the capture is refused.
    Values that change from step to step live in device memory: the step counter (reset before each epoch),
    which indexes the epoch's order, the per-step loss/accuracy slots, the dropout seeds and Adam's step
    sizes (tables uploaded before each epoch, drawn/computed as the plain path does for a whole epoch: an
    epoch stopped early has drawn its remaining dropout seeds all the same);
  * the per-step loss sums and correct counts are copied to pinned host memory about every ``READ_EVERY``
    steps and read when the copy has finished, so the progress bar moves without stalling the GPU; a
    non-finite loss found there raises ``TrainingDivergedError`` (through ``Sequential._end_batch``);
  * Conv2D followed by MaxPooling2D((2, 2)) runs as one kernel (``kernels/conv_pool.cu``, through
    ``ops.conv2d_maxpool_forward`` as in the plain loop), and its backward goes from the pooled gradient to
    the convolution's pre-activation gradient in one gather.

``unsupported_reason(model)`` says, without CuPy, why a model cannot take this path (None when it can);
``plan(model, batch_size, x, y)`` returns a ``Trainer`` or that reason; ``Trainer.run_epoch`` trains one
epoch. ``GPUCNN_FASTPATH=0`` turns the path off. ``Sequential.fit`` uses it automatically on the GPU and
prints one notice per model when it falls back to the plain engine. ``evaluate`` and ``predict`` keep the
plain path.

Differences from the plain CUDA path, all documented: the shuffled order comes from a different generator
(the same seed still gives the same order); the running loss is summed in float64 on the host from per-step
float32 sums; an optimizer hyper-parameter changed by a callback is picked up at the next epoch (the graph
is captured again), not in the middle of one.
"""
import math
import os
import sys
import weakref

import numpy as np

from .. import layers as L
from .. import losses as losses_mod
from .. import optimizers as optimizers_mod
from . import capture
from .capture import CaptureAllocationError  # noqa: F401  (raised inside the captured step)

READ_EVERY = 50  # steps between asynchronous copies of the per-step loss and accuracy to the host

_LAYERS = (L.Conv2D, L.MaxPooling2D, L.AveragePooling2D, L.GlobalAveragePooling2D, L.Flatten, L.Dense,
           L.Dropout, L.Activation)
_OPTIMIZERS = (optimizers_mod.SGD, optimizers_mod.RMSprop, optimizers_mod.Adam)
_LOSSES = (losses_mod.CategoricalCrossentropy, losses_mod.SparseCategoricalCrossentropy)
_OFF = ("0", "off", "false", "no")

_noticed = weakref.WeakSet()  # models whose fallback notice was printed


# ===================================================================================== what is supported
def unsupported_reason(model):
    """Why ``model`` (compiled) cannot train on the fast path, or None when it can. Pure Python: needs
    neither CuPy nor a GPU."""
    if not model.layers:
        return "the model has no layers"
    if type(model.optimizer) not in _OPTIMIZERS:
        return (f"its optimizer {type(model.optimizer).__name__} is not one the fast path implements "
                "(SGD, RMSprop, Adam)")
    if type(model.loss) not in _LOSSES:
        return f"its loss {type(model.loss).__name__} is not a categorical cross-entropy"
    for layer in model.layers:
        if type(layer) not in _LAYERS:
            return f"layer {layer.name!r} ({type(layer).__name__}) is not supported by the fast path"
        if isinstance(layer, L.Conv2D) and layer.activation == "softmax":
            return f"layer {layer.name!r}: a Conv2D with a softmax activation is not supported"
    last = model.layers[-1]
    if not (isinstance(last, (L.Dense, L.Activation)) and last.activation == "softmax"):
        return ("its output layer is not a softmax (Dense(..., activation='softmax') or "
                "Activation('softmax')), which the fused softmax cross-entropy needs")
    if last.output_shape is not None and len(last.output_shape) != 1:
        return f"its output has per-sample shape {tuple(last.output_shape)}, not (classes,)"
    return None


def plan(model, batch_size, x, y):
    """A ``Trainer`` for ``model`` on (x, y) — checked float32 NumPy inputs and labels as ``fit`` has
    them — or a string saying why the fast path is not used."""
    from .. import backend

    if backend.engine() != "cuda":
        return "the active engine is not the GPU"
    setting = os.environ.get("GPUCNN_FASTPATH", "1").strip().lower()
    if setting in _OFF:
        return f"turned off by GPUCNN_FASTPATH={setting}"
    reason = unsupported_reason(model)
    if reason:
        return reason
    if len(x) >= 2**31 - 1 - batch_size:
        return f"{len(x):,} samples are more than the fast path's 32-bit indices cover"
    from ..engines import cuda_loader as cuda

    try:
        return Trainer(model, batch_size, x, y)
    except cuda.DeviceOutOfMemoryError as exc:
        return f"the training set and the step's buffers do not fit in GPU memory ({exc})"


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
        if _modules is None:
            import cupy

            from ..engines import cuda_loader as cuda, cuda_ops as ops_cuda

            _modules = (cupy, cuda, ops_cuda)
        # (cupy, gpucnn.cuda, gpucnn.engines.cuda_ops); tests/test_fastpath.py passes NumPy stand-ins to check the
        # step's wiring on the CPU
        cupy, cuda, _ = _modules
        self.cupy, self.cuda, self.ops = _modules
        # fit builds the model before planning, but plan() may be called directly (tests/test_fastpath.py
        # does): the flat parameter buffer model._params only exists once the model is built
        model._require_built("fastpath.plan")
        self.model = model
        self.n = n = len(x)
        self.batch = int(batch_size)
        self.steps = math.ceil(n / self.batch)
        self.full_rows = min(self.batch, n)
        self.last_rows = n - (self.steps - 1) * self.batch
        self.sparse = model.loss.sparse
        self.classes = int(model.layers[-1].output_shape[-1])
        self.input_shape = tuple(x.shape[1:])
        self.per_image = int(np.prod(self.input_shape))
        self.stream = cupy.cuda.Stream(non_blocking=True)
        opt = model.optimizer
        if opt.state is None:
            opt.build(model._params.shape[0])
        self.dropouts = [l for l in model.layers if isinstance(l, L.Dropout) and l.rate > 0]
        # The weights and optimizer state were written on the default stream, which a non-blocking
        # stream does not wait for: let that work finish before this stream reads them.
        cupy.cuda.Device().synchronize()

        with self.stream:
            # ---- the data, once
            u8 = as_uint8(x)
            self.x_u8 = None if u8 is None else cupy.asarray(u8.reshape(n, -1))
            self.x_f32 = cupy.asarray(x.reshape(n, -1)) if u8 is None else None
            self.y_dev = cupy.asarray(y.astype(np.int32 if self.sparse else np.float32))
            # ---- step state: the counter, the epoch's order and tables, the metric slots
            self.step = cupy.zeros(1, np.int32)
            self.perm = cupy.arange(n, dtype=np.int32)
            self.keys = cuda.empty((n,), np.uint64)
            self.loss_steps = cupy.zeros(self.steps, np.float32)
            self.correct_steps = cupy.zeros(self.steps, np.int32)
            self.seeds = cupy.zeros(max(1, self.steps * len(self.dropouts)), np.uint64)
            self.alphas = cupy.zeros(self.steps, np.float32)
            self._loss_host = _pinned(cupy, self.steps, np.float32)
            self._correct_host = _pinned(cupy, self.steps, np.int32)
            # ---- the batch and every activation, gradient and workspace, at the full batch size
            self.xb = cuda.empty((self.full_rows,) + self.input_shape, np.float32)
            self.yb = cuda.empty((self.full_rows,) if self.sparse else (self.full_rows, self.classes),
                                 np.int32 if self.sparse else np.float32)
            self._buffers = {}
            self._plan_layers()
            self.stream.synchronize()
        self._graphs, self._graph_key = {}, None

    # --------------------------------------------------------------------------------- buffers
    def _buffer(self, key, shape, dtype=np.float32):
        """A preallocated (full_rows, *shape) array; ``rows`` of it are taken as a view when used."""
        if key not in self._buffers:
            self._buffers[key] = self.cuda.empty((self.full_rows,) + tuple(shape), dtype)
        return self._buffers[key]

    def _plan_layers(self):
        """Group the layers into stages (a Conv2D and the 2x2 max-pool after it make one) and allocate
        their buffers."""
        layers, stages, i = self.model.layers, [], 0
        while i < len(layers):
            layer = layers[i]
            nxt = layers[i + 1] if i + 1 < len(layers) else None
            if L.fusable_pool(layer, nxt):
                stages.append(("conv_pool", layer, nxt))
                i += 2
            else:
                stages.append((type(layer).__name__, layer, None))
                i += 1
        self.stages = stages
        self._buffer(("dlogits",), (self.classes,))  # the gradient of the logits, from the fused loss
        for k, (kind, layer, pool) in enumerate(stages):
            if _is_view(kind, layer, k == len(stages) - 1):
                continue
            out_shape = (pool or layer).output_shape
            self._buffer(("y", k), out_shape)
            self._buffer(("dx", k), layer.input_shape)
            if kind == "conv_pool":
                self._buffer(("idx", k), out_shape, np.int8)
            elif kind in ("Conv2D", "Dense"):
                self._buffer(("dz", k), layer.output_shape)
            elif kind == "MaxPooling2D":
                self._buffer(("idx", k), out_shape, np.int8)
            elif kind == "Dropout":
                self._buffer(("mask", k), out_shape)
            if kind in ("conv_pool", "Conv2D", "Dense") and not layer.use_bias:
                self._buffers[("db", k)] = self.cuda.empty((layer.filters if kind != "Dense" else layer.units,))

    # --------------------------------------------------------------------------------- the step
    def _program(self, rows, ctxs):
        """The launches of one step over ``rows`` samples, as a list of callables (run eagerly once, then
        captured). ``ctxs``: conv workspaces for this batch size."""
        ops, launch = self.ops, self.cuda.launch
        T = ops._THREADS
        buf = lambda key: self._buffers[key][:rows]  # noqa: E731  (a C-contiguous view)
        last = len(self.stages) - 1
        prog, backward = [], []
        xb, yb = self.xb[:rows], self.yb[:rows]

        def gather():
            launch("gather_batch", (ops._blocks(self.per_image), min(rows, 65535)), T,
                   (self.x_u8, self.x_f32, None if self.sparse else self.y_dev,
                    self.y_dev if self.sparse else None, self.perm, self.step, xb,
                    None if self.sparse else yb, yb if self.sparse else None,
                    self.n, self.batch, rows, self.per_image, self.classes))
        prog.append(gather)

        h = xb
        for k, (kind, layer, pool) in enumerate(self.stages):
            if _is_view(kind, layer, k == last):  # Flatten, identities, the softmax the loss applies
                x_shape = h.shape
                h = h.reshape((rows,) + tuple(layer.output_shape))
                backward.append(lambda dy, s=x_shape: dy.reshape(s))
                continue
            y = buf(("y", k))
            fwd, bwd = getattr(self, f"_stage_{kind}")(k, layer, pool, h, y, rows, ctxs, buf, k == last)
            prog.append(fwd)
            backward.append(bwd)
            h = y

        # the fused softmax cross-entropy: loss and accuracy slots of this step, and dz of the logits
        dz, logits = buf(("dlogits",)), h

        def loss():
            args = (logits, yb, dz, self.loss_steps, self.correct_steps, self.step, rows, self.classes)
            if self.sparse:
                launch("softmax_crossentropy_step_sparse", 1, T, args)
            else:
                launch("softmax_crossentropy_step_onehot", 1, T, args)
        prog.append(loss)

        def run_backward():
            dy = dz
            for bwd in reversed(backward):
                if dy is None:
                    break
                dy = bwd(dy)
        prog.append(run_backward)
        prog.append(self._optimizer_launch())
        prog.append(lambda: launch("step_advance", 1, 1, (self.step,)))
        return prog

    def _grads_b(self, k, layer):
        return layer.grads[1] if layer.use_bias else self._buffers[("db", k)]

    def _conv_backward(self, k, layer, x, dz, ctx, rows, buf):
        ops = self.ops
        ops.conv2d_backward_filter(dz, x, layer.weights[0].shape, layer.strides, layer.pads, ctx=ctx,
                                   out_w=layer.grads[0], out_b=self._grads_b(k, layer))
        if not layer.needs_input_grad:
            return None
        return ops.conv2d_backward_data(dz, layer.weights[0], x.shape, layer.strides, layer.pads, ctx=ctx,
                                        out=buf(("dx", k)))

    def _stage_conv_pool(self, k, layer, pool, x, y, rows, ctxs, buf, is_last):
        ops = self.ops
        bias = layer.weights[1] if layer.use_bias else None
        idx = buf(("idx", k))
        ctx = ctxs.setdefault(k, {})  # keeps dz and the backward-filter workspace for this batch size

        def fwd():
            ops.conv2d_maxpool_forward(x, layer.weights[0], bias, layer.strides, layer.pads, layer.activation,
                                       ctx=ctx, out=y, out_idx=idx)

        def bwd(dy):
            return ops.conv2d_maxpool_backward(dy, y, idx, x, layer.weights[0], layer.strides, layer.pads,
                                               layer.activation, ctx=ctx, out_w=layer.grads[0],
                                               out_b=self._grads_b(k, layer), need_dx=layer.needs_input_grad,
                                               out=buf(("dx", k)))
        return fwd, bwd

    def _stage_Conv2D(self, k, layer, pool, x, y, rows, ctxs, buf, is_last):
        ops = self.ops
        bias = layer.weights[1] if layer.use_bias else None
        ctx = ctxs.setdefault(k, {})
        dz_buf = buf(("dz", k))

        def fwd():
            ops.conv2d_forward(x, layer.weights[0], bias, layer.strides, layer.pads, layer.activation, ctx=ctx,
                               out=y)

        def bwd(dy):
            dz = dy if layer.activation is None else ops.activation_backward(dy, y, layer.activation, out=dz_buf)
            return self._conv_backward(k, layer, x, dz, ctx, rows, buf)
        return fwd, bwd

    def _stage_Dense(self, k, layer, pool, x, y, rows, ctxs, buf, is_last):
        ops = self.ops
        bias = layer.weights[1] if layer.use_bias else None
        dz_buf, dx_buf = buf(("dz", k)), buf(("dx", k))
        # the output layer yields logits: the fused loss kernel applies the softmax and its gradient
        act = None if is_last else layer.activation

        def fwd():
            ops.dense_forward(x, layer.weights[0], bias, act, out=y)

        def bwd(dy):
            dz = dy if act is None else ops.activation_backward(dy, y, act, out=dz_buf)
            ops.dense_backward_weights(dz, x, out_w=layer.grads[0], out_b=self._grads_b(k, layer))
            if not layer.needs_input_grad:
                return None
            return ops.dense_backward_data(dz, layer.weights[0], out=dx_buf)
        return fwd, bwd

    def _stage_MaxPooling2D(self, k, layer, pool, x, y, rows, ctxs, buf, is_last):
        ops, idx, dx = self.ops, buf(("idx", k)), buf(("dx", k))

        def fwd():
            ops.maxpool2d_forward(x, layer.pool_size, layer.strides, layer.pads, out=y, out_idx=idx)
        return fwd, lambda dy: ops.maxpool2d_backward(dy, idx, x.shape, layer.pool_size, layer.strides,
                                                      layer.pads, out=dx)

    def _stage_AveragePooling2D(self, k, layer, pool, x, y, rows, ctxs, buf, is_last):
        ops, dx = self.ops, buf(("dx", k))

        def fwd():
            ops.avgpool2d_forward(x, layer.pool_size, layer.strides, layer.pads, out=y)
        return fwd, lambda dy: ops.avgpool2d_backward(dy, x.shape, layer.pool_size, layer.strides,
                                                      layer.pads, out=dx)

    def _stage_GlobalAveragePooling2D(self, k, layer, pool, x, y, rows, ctxs, buf, is_last):
        ops, dx = self.ops, buf(("dx", k))
        return (lambda: ops.global_avgpool2d_forward(x, out=y),
                lambda dy: ops.global_avgpool2d_backward(dy, x.shape, out=dx))

    def _stage_Activation(self, k, layer, pool, x, y, rows, ctxs, buf, is_last):
        ops, dx, act = self.ops, buf(("dx", k)), layer.activation
        return (lambda: ops.activation_forward(x, act, out=y),
                lambda dy: ops.activation_backward(dy, y, act, out=dx))

    def _stage_Dropout(self, k, layer, pool, x, y, rows, ctxs, buf, is_last):
        ops, cuda = self.ops, self.cuda
        mask, dx = buf(("mask", k)), buf(("dx", k))
        slot = self.dropouts.index(layer)
        scale = np.float32(1.0) / np.float32(1.0 - layer.rate)

        def fwd():
            cuda.launch("dropout_forward_scheduled", ops._blocks(x.size), ops._THREADS,
                        (x, y, mask, x.size, np.float32(layer.rate), scale, self.seeds, self.step, slot,
                         len(self.dropouts)))
        return fwd, lambda dy: ops.dropout_backward(dy, mask, out=dx)

    def _optimizer_launch(self):
        ops, cuda, model = self.ops, self.cuda, self.model
        opt, w, g = model.optimizer, model._params, model._grads
        s = opt.state
        if isinstance(opt, optimizers_mod.Adam):
            def update():
                cuda.launch("adam_update_scheduled", ops._blocks(w.size), ops._THREADS,
                            (w, g, s["m"], s["v"], w.size, self.alphas, self.step, np.float32(1 - opt.beta_1),
                             np.float32(1 - opt.beta_2), np.float32(opt.epsilon)))
            return update
        # SGD and RMSprop hold no step-varying values: their launches are captured as they are
        return lambda: opt._update(ops, w, g)

    # --------------------------------------------------------------------------------- capture
    def _state_arrays(self):
        opt = self.model.optimizer
        return [self.model._params] + [opt.state[k] for k in sorted(opt.state)]

    def _capture(self, rows):
        """Run the step for ``rows`` once eagerly (compiles the kernels, fills the conv workspaces; its
        effect on the weights and optimizer state is undone), then capture it as a graph."""
        cupy = self.cupy
        ctxs = {}
        program = self._program(rows, ctxs)
        with self.stream:
            self.step.fill(0)  # the eager run reads the counter: keep its slots in range
            saved = [a.copy() for a in self._state_arrays()]
            for run in program:
                run()
            for a, s in zip(self._state_arrays(), saved):
                cupy.copyto(a, s)
            self.stream.synchronize()
            del saved
            with capture.capturing(cupy, self.stream) as captured:  # allocations refused, exception-safe
                for run in program:
                    run()
        return captured.graph, ctxs

    def _graph_buffers(self):
        """Every buffer the step graphs touch but their own conv workspaces (which they keep)."""
        model, own = self.model, (self.x_u8, self.x_f32, self.y_dev, self.step, self.perm, self.loss_steps,
                                  self.correct_steps, self.seeds, self.alphas, self.xb, self.yb)
        layers = [a for layer in model.layers for a in (*layer.weights, *layer.grads)]
        return [*self._state_arrays(), model._grads, *layers, *own, *self._buffers.values()]

    def _ensure_graphs(self):
        # A graph holds raw pointers: it is replayed only over the very buffers it was captured with
        # (a recompiled model or a rebuilt optimizer state means new buffers), and with the same config.
        key = (self.model.optimizer.get_config(), capture.buffer_key(self._graph_buffers()))
        if self._graphs and key == self._graph_key:
            return
        self._graphs, self._graph_key = {}, None
        for rows in {self.full_rows, self.last_rows}:
            self._graphs[rows] = self._capture(rows)
        self._graph_key = key

    def graph_for(self, step):
        """The captured graph that runs step ``step`` of an epoch."""
        rows = self.last_rows if step == self.steps - 1 else self.full_rows
        return self._graphs[rows][0]

    # --------------------------------------------------------------------------------- epochs
    def begin_epoch(self, shuffle):
        """Outside the graph: the epoch's order, the step counter back to 0, the dropout seeds and Adam's
        step sizes for all its steps (drawn and computed as the plain path does over a whole epoch)."""
        from ..utils import rng

        cupy, opt = self.cupy, self.model.optimizer
        # Between epochs, callbacks (on_train_begin, on_epoch_end/begin) and validation run on the default
        # stream, which the non-blocking training stream does not wait for: a set_weights there (an
        # asynchronous copy kernel) could still be writing the weights when this epoch's steps read them.
        cupy.cuda.Device().synchronize()
        self._ensure_graphs()
        with self.stream:
            if shuffle:
                seed = int(rng().integers(2**63))
                self.cuda.launch("permutation_keys", self.ops._blocks(self.n), self.ops._THREADS,
                                 (self.keys, self.n, seed))
                cupy.copyto(self.perm, cupy.argsort(self.keys).astype(np.int32))
            else:
                self.perm[...] = cupy.arange(self.n, dtype=np.int32)
            self.step.fill(0)
            if self.dropouts:
                table = np.empty((self.steps, len(self.dropouts)), np.uint64)
                for s in range(self.steps):
                    for d, layer in enumerate(self.dropouts):
                        table[s, d] = layer.next_seed()
                self.seeds.set(table.reshape(-1))
            if isinstance(opt, optimizers_mod.Adam):
                t = opt.iterations + 1 + np.arange(self.steps)
                alphas = [np.float32(opt.learning_rate * np.sqrt(1 - opt.beta_2 ** int(i)) /
                                     (1 - opt.beta_1 ** int(i))) for i in t]
                self.alphas.set(np.asarray(alphas, np.float32))

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
                    cupy.cuda.Device().synchronize()
                self.graph_for(step).launch(self.stream)
                opt.iterations += 1
                if step == self.steps - 1:  # the epoch's end: wait for everything, read every slot
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
                if lockstep:
                    self.stream.synchronize()
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


def _is_view(kind, layer, is_last):
    """Whether a stage computes nothing: its output is a reshaped view of its input (Flatten, a linear
    Activation, Dropout(0), or the output Activation('softmax'), which the fused loss kernel applies)."""
    if kind == "Flatten":
        return True
    if kind == "Activation":
        return layer.activation is None or (is_last and layer.activation == "softmax")
    return kind == "Dropout" and layer.rate == 0


def _pinned(cupy, count, dtype):
    """A NumPy array of ``count`` elements in page-locked host memory (asynchronous copies need it)."""
    dtype = np.dtype(dtype)
    memory = cupy.cuda.alloc_pinned_memory(max(1, count) * dtype.itemsize)
    return np.frombuffer(memory, dtype, count)
