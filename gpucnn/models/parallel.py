"""The NumPy engine's training step over two CPU cores: the batch split in two halves, one per process.

Most NumPy work runs on one core (im2col copies, pooling, masks); only OpenBLAS's matrix products use more.
So on a machine with at least two cores, a training step of a large enough batch runs as two half-steps at
once: the model takes the first half in this process, and a *worker process* — a second Python running a
copy of the model — takes the second half, each with a one-thread OpenBLAS (so the two do not fight over
the cores). A second process, not a second thread: two threads of one Python take turns holding its global
interpreter lock between NumPy calls, and the step has hundreds of small ones.

The two processes share one memory-mapped file: the weights (written there before each step: the trained
ones, and those the optimizer leaves alone — frozen layers', BatchNormalization's moving statistics), the
worker's half of the batch, and its gradients (added to the model's before the optimizer runs). A pipe carries the
rest: the model's architecture when it changes, then one message per step each way. The step's random values
(Dropout's seeds, the augmentation layers' per-image values: ``StepValues.draw``) are drawn here for the whole
batch; this process's half reads their first images, and the message gives the worker the rest with its
images' offset in the batch (its rows of each Dropout mask), so both halves see the one-process step's draws.
A BatchNormalization that trains takes the whole batch's statistics: at each one (forward and backward) the two
halves send each other their per-channel sums over the pipe and both merge them in the batch's order
(``StepValues.exchange``; the engine's ``batchnorm_*`` ops do the maths), so both normalize alike.

The result is the full batch's mean-loss gradient, summed in another order than a one-process step: equal up
to float32 rounding, and the same bits from run to run. Used when all of these hold (``split_reason`` says
which does not):
  * the NumPy engine on a POSIX system, at least two usable cores, ``GPUCNN_CPU_THREADS`` not ``1``;
  * a batch of at least ``MIN_BATCH`` samples;
  * NumPy's OpenBLAS found, so its thread count can be set (``blas_threads``);
  * only gpucnn's own model and layer classes: the worker rebuilds the model from its config, by class
    name, so a model with a user's layer class (a subclass of ``Dense``, say) trains in one process, with
    one notice;
  * the worker has not failed in this session. If it fails (it died, could not start, or gave no answer
    within ``STEP_SECONDS``), gpucnn warns once, stops it and trains on in one process; the step that failed
    is computed again there.

The worker starts on the first split step (about half a second: a fresh Python importing NumPy and gpucnn)
and serves every later step of every model in this process; it exits when this process does. It runs in
its own session and ignores Ctrl-C: an interrupt is this process's to handle. An interrupted step (Ctrl-C,
or any error in this process's half) still reads the worker's reply before the exception goes on, so the
next step never reads a stale one; a worker that does not answer then is stopped, and the next split step
starts a fresh one.
"""
import atexit
import contextlib
import ctypes
import functools
import mmap
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from .. import backend
from ..layers import serialize
from ..utils import sigint_deferred

# each half at least 8 samples. Measured here (2 cores): at batch 16 the split step trains the seed model 1.15x and a
# SeparableConv2D model on 64x64 images 1.86x faster than one process; at batch 8 the seed model still gains 1.2x
MIN_BATCH = 16
START_SECONDS = 120  # how long the worker may take to start (importing NumPy on a cold disk can be slow)
# How long the worker may take for its half once this process has done its own: ten times as long, and at
# least STEP_SECONDS (the halves are the same work; a worker slower than that has stalled).
STEP_SECONDS = 30
_blas = {}
_state = {"worker": None, "failed": None, "half_seconds": None, "noticed": set()}
_lock = threading.Lock()  # one split step at a time in this process


@functools.lru_cache(maxsize=None)
def usable_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def openblas_function(name, restype=ctypes.c_int, argtypes=()):
    """Function ``name`` (e.g. "get_num_threads") of the OpenBLAS loaded in this process, under any of the
    names its builds export (NumPy's wheels: scipy_openblas_<name>64_), or None without OpenBLAS."""
    if "libs" not in _blas:
        try:
            with open("/proc/self/maps") as f:
                paths = sorted(set(re.findall(r"(/\S*openblas\S*\.so\S*)", f.read())))
        except OSError:
            paths = []
        _blas["libs"] = []
        for path in paths:
            try:
                _blas["libs"].append(ctypes.CDLL(path))
            except OSError:
                continue
    for lib in _blas["libs"]:
        for pre, suf in (("scipy_openblas_", "64_"), ("scipy_openblas_", ""), ("openblas_", "64_"),
                         ("openblas_", "")):
            if hasattr(lib, pre + name + suf):
                func = getattr(lib, pre + name + suf)
                func.restype, func.argtypes = restype, list(argtypes)
                return func
    return None


@functools.lru_cache(maxsize=None)
def _openblas_threads():
    """(get, set) of the thread count of the OpenBLAS NumPy uses, or None when it is not found."""
    get, put = openblas_function("get_num_threads"), openblas_function("set_num_threads", None, [ctypes.c_int])
    return None if get is None or put is None else (get, put)


@contextlib.contextmanager
def blas_threads(n):
    """OpenBLAS on ``n`` threads inside the block, its previous count restored after (process-wide)."""
    funcs = _openblas_threads()
    if funcs is None:
        yield
        return
    get, put = funcs
    before = get()
    put(n)
    try:
        yield
    finally:
        put(before)


def split_reason(model, batch):
    """Why a training step of ``batch`` samples of ``model`` runs in one process (None: it is split)."""
    if backend.engine() != "numpy":
        return "not the NumPy engine"
    if os.environ.get("GPUCNN_CPU_THREADS", "").strip() == "1":
        return "GPUCNN_CPU_THREADS=1"
    if usable_cores() < 2:
        return "one CPU core"
    if batch < MIN_BATCH:
        return f"a batch under {MIN_BATCH} samples"
    reason = _model_reason(model)
    if reason is not None:
        return reason
    if os.name != "posix" or not sys.executable:
        return "the worker process needs a POSIX system and a Python executable"
    if _openblas_threads() is None:
        return "NumPy's OpenBLAS not found (its thread count cannot be set)"
    if _state["failed"] is not None:
        return f"the worker process failed earlier ({_state['failed']})"
    return None


def _model_reason(model):
    """Why ``model`` itself keeps the one-process step (its layers), or None; kept until the model changes
    (its graph, or a compile: ``_version``), as the step asks every time."""
    kept = getattr(model, "_split_reason_kept", None)
    if kept is not None and kept[0] == model._version:
        return kept[1]
    reason = _foreign_class(model)
    model._split_reason_kept = (model._version, reason)
    return reason


def _foreign_class(model):
    """Why the worker cannot rebuild ``model`` exactly (a class of the user's where it would construct
    gpucnn's own of that name), or None. Said once per class in a notice."""
    from ..layers import LAYER_CLASSES

    classes = [type(model)] + [type(layer) for layer in model._all_layers()]
    for cls in classes:
        own = (cls.__module__.startswith("gpucnn.") if cls is type(model)
               else LAYER_CLASSES.get(cls.__name__) is cls)
        if not own:
            reason = (f"the model uses {cls.__module__}.{cls.__qualname__}, a class of its own, which the "
                      "worker process cannot rebuild")
            if cls not in _state["noticed"]:
                _state["noticed"].add(cls)
                warnings.warn(f"gpucnn: {reason}; this model trains in one process", RuntimeWarning,
                              stacklevel=5)
            return reason
    return None


# ===================================================================================== this process's side
def split_step(model, xb, yb):
    """Forward and backward of a batch as two half-steps, this process and the worker at once; the gradients
    end in ``model._grads``. Returns (loss sum, correct count) of the whole batch."""
    n = len(xb)
    h = n // 2
    step = model._step_values()
    values = step.draw([n]) if step.layers else None  # Dropout's seeds, augmentation's values: the whole batch's
    moving = _moving_statistics(model)
    saved = [w.copy() for w in moving]  # what the step updates in place, for a step computed again
    with _lock:
        try:
            worker = _worker()
            shared = worker.prepare(model, xb[h:], yb[h:])
            worker.send(("step", n - h, (n - h) / n, values and step.share(values, h)))
        except Exception as exc:  # noqa: BLE001  (the worker could not take its half: one process goes on)
            _give_up(exc)
            return model._forward_backward(xb, yb, 1.0, values)
        except BaseException:  # interrupted while talking to the worker: what it holds is unknown
            _stop()
            raise
        start = time.perf_counter()
        try:
            with blas_threads(1):
                loss_a, correct_a = model._forward_backward(xb[:h], yb[:h], h / n, values,
                                                            exchange=_Exchange(worker) if moving else None)
        except _WorkerLost as exc:
            return _again_in_one_process(model, xb, yb, values, moving, saved, exc.__cause__)
        except BaseException:
            if moving:  # the worker may be waiting for this half's sums, which will not come
                _stop()
            else:
                _discard_reply(worker)
            raise
        seconds = time.perf_counter() - start
        _state["half_seconds"] = seconds
        try:
            loss_b, correct_b = worker.result(max(STEP_SECONDS, 10 * seconds))
        except Exception as exc:  # noqa: BLE001
            return _again_in_one_process(model, xb, yb, values, moving, saved, exc)
        except BaseException:  # interrupted while waiting: the reply is still to come
            _discard_reply(worker)
            raise
        model._grads += shared["grads"]
    return loss_a + np.float32(loss_b), correct_a + correct_b


def _again_in_one_process(model, xb, yb, values, moving, saved, exc):
    """The worker failed during the step: stop it, say so, and compute the whole step here, from the moving
    statistics the step began with."""
    _give_up(exc)
    for w, before in zip(moving, saved):
        w[...] = before
    return model._forward_backward(xb, yb, 1.0, values)


def _moving_statistics(model):
    """The arrays a training step updates in place (the moving statistics of each BatchNormalization that trains:
    their halves exchange sums), [] when there are none."""
    from ..layers import BatchNormalization

    return [w for layer in model._all_layers() if isinstance(layer, BatchNormalization) and layer.trainable
            for w in layer.weights[-2:]]


class _WorkerLost(Exception):
    """The worker did not take part in an exchange of sums (it failed, stalled or died)."""


EXCHANGE_CHUNK = 4096  # values a message of the exchange carries: 32 KB, far below a socket's buffer


def exchange_chunks(mine, send, receive):
    """The other side's array of the shape of ``mine``, traded piece by piece: each side sends one chunk, then
    receives the other's. Both sides send at once, so a whole large array (a BatchNormalization over 12,544 features
    sends 300 KB) would fill both sockets' buffers and block both sends for ever; one chunk at a time never does."""
    flat = np.ascontiguousarray(mine).reshape(-1)
    parts = []
    for start in range(0, max(flat.size, 1), EXCHANGE_CHUNK):
        send(("sums", flat[start:start + EXCHANGE_CHUNK]))
        parts.append(receive())
    theirs = np.concatenate(parts) if parts else np.zeros(0)
    if theirs.shape != flat.shape:
        raise RuntimeError(f"the other half sent {theirs.size} values where this one has {flat.size}")
    return theirs.reshape(np.shape(mine))


class _Exchange:
    """This process's side of the halves' exchange of per-channel sums (``StepValues.exchange``): its half is the
    batch's first."""

    def __init__(self, worker):
        self.worker = worker

    def __call__(self, mine):
        half = _state["half_seconds"]
        timeout = max(STEP_SECONDS, 10 * (half or 0))
        try:
            theirs = exchange_chunks(mine, self.worker.send, lambda: self.worker._expect("sums", timeout)[1])
        except Exception as exc:  # noqa: BLE001
            raise _WorkerLost() from exc
        return [mine, theirs]


def _discard_reply(worker):
    """Read and drop the reply to the step in flight, so that the next step reads its own; a worker that does
    not answer soon (or a second interrupt meanwhile) is stopped instead: the next split step starts anew."""
    half = _state["half_seconds"]
    try:
        worker.result(5.0 if half is None else 10 * half + 1.0)
    except BaseException:  # noqa: BLE001  (the exception being handled is the one that goes on)
        _stop()


class _Worker:
    """The worker process, the pipe to it and the file both map."""

    def __init__(self):
        ours, theirs = socket.socketpair()
        # Ctrl-C is ignored from the first line on; its own session keeps a terminal's Ctrl-C away as well
        code = ("import signal; signal.signal(signal.SIGINT, signal.SIG_IGN); import sys; "
                "sys.path.insert(0, sys.argv[1]); from gpucnn.models.parallel_worker import serve; "
                "serve(int(sys.argv[2]))")
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", GPUCNN_DEVICE="cpu")
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", code, str(Path(__file__).resolve().parents[2]), str(theirs.fileno())],
                pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            theirs.close()
        self.pid = os.getpid()  # the process that started it (a fork of this one must start its own)
        self.conn = Connection(ours.detach())
        self.key = self.shared = None
        try:
            self._expect("ready", START_SECONDS)
        except BaseException:
            self.close()
            raise

    def prepare(self, model, xh, yh):
        """Make the worker hold ``model`` and the file hold this step's weights and half batch; returns the
        file's arrays."""
        capacity = len(xh) if self.shared is None else max(len(xh), len(self.shared["x"]))
        # the model as compiled (graph, trainable weights, loss: model._version), its buffers, the data's shapes
        key = (id(model), model._version, id(model._params), model._params.shape, xh.shape[1:], yh.shape[1:],
               yh.dtype.str, model._trainable_flags())  # (a BatchNormalization's
        # trainable, read at each call, decides whether it exchanges: both sides must agree)
        if key != self.key or len(xh) > len(self.shared["x"]):
            self._setup(model, key, capacity, xh, yh)
        shared = self.shared
        shared["params"][...] = model._params
        start = 0
        for layer, i in _fixed_slots(model):
            w = layer.weights[i]
            shared["fixed"][start:start + w.size] = w.reshape(-1)
            start += w.size
        shared["x"][:len(xh)] = xh
        shared["y"][:len(yh)] = yh
        return shared

    def _setup(self, model, key, capacity, xh, yh):
        fixed = sum(int(layer.weights[i].size) for layer, i in _fixed_slots(model))
        arrays = [("params", model._params.shape, "<f4"), ("grads", model._params.shape, "<f4"),
                  ("fixed", (fixed,), "<f4"), ("x", (capacity,) + xh.shape[1:], "<f4"), ("y", (capacity,) + yh.shape[1:], yh.dtype.str)]
        layout, offset = [], 0
        for name, shape, dtype in arrays:
            layout.append((name, offset, shape, dtype))
            offset += -(-int(np.prod(shape)) * np.dtype(dtype).itemsize // 64) * 64
        folder = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None  # memory, not disk, where there is one
        fd, path = tempfile.mkstemp(prefix="gpucnn-step-", dir=folder)
        try:
            os.ftruncate(fd, max(offset, 1))
            mapped = mmap.mmap(fd, max(offset, 1))
            self.key = None
            self.send(("setup", serialize(model), {**model.loss.get_config(), "metrics": model._metric_configs}, path,
                       layout))
            self._expect("ok", START_SECONDS)
        finally:
            os.close(fd)
            os.unlink(path)  # both processes have it mapped; nothing is left behind
        self.shared, self.key = _arrays(mapped, layout), key  # the arrays keep the mapping open

    def result(self, timeout):
        reply = self._expect("done", timeout)
        return reply[1], reply[2]

    def send(self, message):
        with sigint_deferred():  # a message is sent whole or not at all
            self.conn.send(message)

    def _expect(self, what, timeout):
        if not self.conn.poll(timeout):  # Ctrl-C can interrupt the wait ...
            raise RuntimeError(f"it gave no answer within {timeout:.3g} s")
        with sigint_deferred():  # ... but not the reading of a reply that has come
            reply = self.conn.recv()  # EOFError when the worker has died
        if reply[0] == "error":
            raise RuntimeError(f"the worker failed:\n{reply[1]}")
        if reply[0] != what:
            raise RuntimeError(f"the worker answered {reply[0]!r}, expected {what!r}")
        return reply

    def close(self):
        with contextlib.suppress(OSError):
            self.conn.close()  # the worker reads the end of the pipe and exits
        try:
            self.process.wait(timeout=1)
        except subprocess.TimeoutExpired:  # busy with a step, or stalled: it has nothing left to do
            self.process.kill()
            self.process.wait()


def _worker():
    worker = _state["worker"]
    if worker is not None and worker.pid != os.getpid():  # a fork of the process that started it
        _state["worker"] = worker = None
    if worker is None:
        worker = _state["worker"] = _Worker()
    return worker


def _stop():
    worker, _state["worker"] = _state["worker"], None
    if worker is not None and worker.pid == os.getpid():
        worker.close()


def _give_up(exc):
    """The worker failed: say so once, stop it, and train on in one process."""
    _stop()
    reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
    _state["failed"] = reason
    warnings.warn(f"gpucnn: the second training process failed ({reason}); training goes on in one process "
                  "(set GPUCNN_CPU_THREADS=1 to ask for that from the start)", RuntimeWarning, stacklevel=3)


atexit.register(_stop)


def _fixed_slots(model):
    """(layer, index) of the weights the optimizer does not update (a frozen layer's, BatchNormalization's moving
    statistics), in the model's order: the file carries their values to the worker, whose copy of the model
    starts from its config alone."""
    trains = model._trains()
    return [(layer, i) for layer, i in model._weight_slots() if not trains(layer, i)]


def _arrays(mapped, layout):
    return {name: np.ndarray(shape, np.dtype(dtype), buffer=mapped, offset=offset)
            for name, offset, shape, dtype in layout}
