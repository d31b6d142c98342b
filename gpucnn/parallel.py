"""The NumPy engine's training step over two CPU cores: the batch split in two halves, one per thread.

Most NumPy work runs on one core (im2col copies, pooling, masks); only OpenBLAS's matrix products use more.
So on a machine with at least two cores, a training step of a large enough batch runs as two half-steps at
once: the model's own layers take the first half in the calling thread, a *replica* of them takes the second
half in a worker thread, each with a one-thread OpenBLAS (so the two threads do not fight over the cores).
The replica shares the model's weight arrays (read only during the step) and has its own layer state, work
arrays and gradient buffer; its gradients are added to the model's before the optimizer runs.

The result is the full batch's mean-loss gradient, summed in another order than a one-thread step: equal up
to float32 rounding, and the same bits from run to run. Used when all of these hold (``split_reason`` says
which does not):
  * the NumPy engine, at least two usable cores, ``GPUCNN_CPU_THREADS`` not ``1``;
  * a batch of at least ``MIN_BATCH`` samples;
  * NumPy's OpenBLAS found, so its thread count can be set (``blas_threads``);
  * only layers without per-step random state (no Dropout with a non-zero rate).
"""
import contextlib
import contextvars
import copy
import ctypes
import functools
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import backend

MIN_BATCH = 32  # each half at least 16 samples: below that the threads' overhead outweighs the gain
_blas = {}
_lock = threading.Lock()
_pool = []


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
    """Why a training step of ``batch`` samples of ``model`` runs on one thread (None: it is split)."""
    from .layers import Dropout

    if backend.engine() != "numpy":
        return "not the NumPy engine"
    if os.environ.get("GPUCNN_CPU_THREADS", "").strip() == "1":
        return "GPUCNN_CPU_THREADS=1"
    if usable_cores() < 2:
        return "one CPU core"
    if batch < MIN_BATCH:
        return f"a batch under {MIN_BATCH} samples"
    if any(isinstance(layer, Dropout) and layer.rate > 0 for layer in model.layers):
        return "Dropout draws a new mask each step"
    if _openblas_threads() is None:
        return "NumPy's OpenBLAS not found (its thread count cannot be set)"
    return None


def _replica(model):
    """A shallow copy of ``model`` whose layers share its weights but keep their own state, work arrays
    and gradients (kept on the model until its layers or buffers change)."""
    key = (tuple(map(id, model.layers)), id(model._params), id(model._grads))
    cached = getattr(model, "_split_replica", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    replica = copy.copy(model)
    replica._grads = np.zeros_like(model._grads)
    replica._steps_key = replica._split_replica = None
    replica.layers = []
    base = model._grads.__array_interface__["data"][0]
    for layer in model.layers:
        twin = copy.copy(layer)  # the same weight list; the state below its own
        twin.ctx = {}
        twin.grads = []
        for g in layer.grads:
            offset = (g.__array_interface__["data"][0] - base) // g.itemsize
            twin.grads.append(replica._grads[offset:offset + g.size].reshape(g.shape))
        replica.layers.append(twin)
    model._split_replica = (key, replica)
    return replica


def split_step(model, xb, yb):
    """Forward and backward of a batch as two half-steps on two threads; the gradients end in
    ``model._grads``. Returns (loss sum, correct count) of the whole batch."""
    n = len(xb)
    h = n // 2
    replica = _replica(model)
    with _lock:
        if not _pool:
            _pool.append(ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpucnn-half-step"))
    context = contextvars.copy_context()  # NumPy's errstate, as the caller has it
    with blas_threads(1):
        future = _pool[0].submit(context.run, replica._forward_backward, xb[h:], yb[h:], (n - h) / n)
        try:
            loss_a, correct_a = model._forward_backward(xb[:h], yb[:h], h / n)
        finally:
            second = future.exception()  # the worker has finished with the shared weights either way
        if second is not None:
            raise second
        loss_b, correct_b = future.result()
    model._grads += replica._grads
    return loss_a + loss_b, correct_a + correct_b
