"""EMULATION harness: gpucnn's CUDA engine run on the CPU (see README.md). For tests only.

Importing this module (directly, or as the pytest plugin ``-p fake_cupy``) installs, IN THIS PROCESS ONLY:

  * a fake ``cupy`` (and ``cupy_backends``) module: arrays are a NumPy subclass ``cupy.ndarray``, so
    host arrays are still told apart from device ones; every device allocation has guard zones on both
    sides and starts poisoned (all bits set: NaN floats, -1 integers);
  * ``gpucnn.engines.cuda_loader.function`` replaced by kernels compiled for the host: each ``kernels/*.cu`` file, as
    ``gpucnn.engines.cuda_loader.kernel_source`` gives it, built with ``g++ -include emu.h`` plus one C wrapper per kernel
    that ``gpucnn.engines.cuda_loader._kernel_table()`` lists. Shared objects are cached by a hash of their source under
    ``$GPUCNN_EMU_CACHE`` (default: ``<system temp>/gpucnn-emu-<uid>``), never in the repository.

Streams and graphs (the fast path, gpucnn/models/fastpath.py): every emulated operation runs at once, in issue
order, so streams, events and asynchronous copies are synchronous; each is checked against the other streams'
work on the same buffers, which a GPU could run at the same time (``_ordered_access``: EmulatedStreamRaceError). ``Stream.begin_capture()`` switches the
stream to recording: kernel launches and the device-side array operations a capture can hold
(``a[...] = b``, ``fill``, ``cupy.copyto``) are recorded, NOT run, and ``end_capture()`` returns a ``Graph``
whose ``launch()`` replays them in order, reading the arrays' memory at replay time. Like a CUDA graph, a
Graph holds its buffers' addresses, not the arrays: replaying it after one of them was freed raises
``EmulatedCaptureError`` (on a GPU, a silent use-after-free). Inside a capture the harness refuses what
CUDA, CuPy or the emulator cannot capture: device allocations (through the installed allocator, as
``cupy.cuda.set_allocator`` hooks do), copies between host and device (``set``, ``get``; CuPy raises "the
current stream is capturing, so H2D/D2H transfers are disallowed"), synchronisation (which, as in CUDA,
invalidates the capture: ``is_capturing`` then raises and ``end_capture`` fails), NumPy computations on
device arrays, and operations on another stream.

As strict as CuPy 14.2, capturing or not (tests/test_kernels_emulated.py checks each rule): ``get(out=)`` and
``set()`` take only NumPy arrays of exactly the array's shape and dtype; ``empty``, ``zeros`` and ``ones``
default to float64, ``full`` to its fill value's dtype; ``numpy.asarray``, ``numpy.array``,
``numpy.asanyarray``, ``numpy.ascontiguousarray`` and ``numpy.asfortranarray`` of a device array raise
TypeError (so do ``numpy.testing``'s assertions on one), while NumPy functions that CuPy implements still take
device arrays; a host array is refused as the value of ``a[...] = ...`` (unless a scalar), as
``cupy.copyto``'s source (unless of one element) and as an operand of arithmetic on device arrays.

After every launch the harness checks the guard zones of each array argument (a write out of bounds) and
the emulator's barrier checks (threads of a block at different ``__syncthreads`` or leaving while others
wait); either raises ``EmulatedKernelError`` naming the kernel. With ``GPUCNN_EMU_REPORT=<path>`` the
pytest plugin writes a JSON report at the end of the session: kernels launched, problems, build errors.
``GPUCNN_EMU_EXCLUDE=<json>`` ({test function name: reason}) drops those tests, and fails the session when
a name matches no test.

Never import this into a process that runs other tests: the fake ``cupy`` replaces the real one there.
"""
import concurrent.futures
import ctypes
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import types
import weakref

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
EMU_H = os.path.join(HERE, "emu.h")
CXXFLAGS = ["-std=c++17", "-O1", "-fPIC", "-shared", "-w"]
GUARD = 4096                     # bytes of poison before and after every device allocation
DEVICE_MEMORY = 4 << 30          # larger allocations raise OutOfMemoryError, as on a small GPU
MAX_DYNAMIC_SHARED = 227 * 1024  # opt-in limit of sm_90 (sm_80: 163 KiB)
DEFAULT_SHARED = 48 * 1024
POISON = 0xFF


class EmulatedKernelError(AssertionError):
    """A kernel did something the emulator flags: a write out of bounds, or a barrier not reached by the
    whole block."""


class EmulatorBuildError(RuntimeError):
    """A kernel file does not compile for the emulator (g++'s log attached)."""


# ===================================================================================== fake cupy
_converting = [0]  # > 0 inside a NumPy function CuPy implements (a device array may be converted there)
_NP_CONVERSIONS = ("asarray", "array", "asanyarray", "ascontiguousarray", "asfortranarray")
_np = {name: getattr(np, name) for name in _NP_CONVERSIONS}  # NumPy's own, for the harness itself


def _is_host(value):
    """A NumPy array that is not a device array."""
    return isinstance(value, np.ndarray) and not isinstance(value, ndarray)


class ndarray(np.ndarray):
    """A "device" array: a NumPy array with CuPy's extra methods and CuPy's refusals of implicit copies
    between host and device."""

    def get(self, stream=None, order="C", out=None, blocking=True):
        stream = stream if stream is not None else _current_stream()
        if out is None:
            if self.size == 0:  # (CuPy copies nothing then, and checks nothing)
                return np.ndarray(self.shape, self.dtype)
            _refuse_transfer(stream, "D2H")
            _refuse_in_capture("ndarray.get() (a synchronous copy to the host)")
            _ordered_access("ndarray.get()", stream, ((self, "r"),))
            _host_waits_for(stream)
            return _np["array"](self, copy=True, order=order)
        if not _is_host(out):
            raise TypeError("Only numpy.ndarray can be obtained from cupy.ndarray")
        if self.dtype != out.dtype:
            raise TypeError(f"{out.dtype} array cannot be obtained from {self.dtype} array")
        if self.shape != out.shape:
            raise ValueError(f"Shape mismatch. Expected shape: {self.shape}, actual shape: {out.shape}")
        _refuse_transfer(stream, "D2H")
        if blocking:
            _refuse_in_capture("ndarray.get(out=..., blocking=True) (a synchronous copy to the host)")
        _enqueue("ndarray.get(out=...)", lambda src: np.copyto(out, src.view(np.ndarray)), (self,), stream, "r")
        if blocking:
            _host_waits_for(stream)
        return out

    def set(self, arr, stream=None):
        if not _is_host(arr):
            raise TypeError("Only numpy.ndarray can be set to cupy.ndarray")
        if self.dtype != arr.dtype:
            raise TypeError(f"{arr.dtype} array cannot be set to {self.dtype} array")
        if self.shape != arr.shape:
            raise ValueError(f"Shape mismatch. Old shape: {self.shape}, new shape: {arr.shape}")
        if not (self.flags.c_contiguous or self.flags.f_contiguous):
            raise RuntimeError("Cannot set to non-contiguous array")
        stream = stream if stream is not None else _current_stream()
        _refuse_transfer(stream, "H2D")
        value = _np["array"](arr, copy=True)  # the host array as it is now
        _enqueue("ndarray.set", lambda dst: np.ndarray.__setitem__(dst, Ellipsis, value), (self,), stream, "w")

    def __setitem__(self, key, value):
        """CuPy: basic indexing takes a device array or a scalar (a host array raises, see CuPy gh-2079);
        integer-array and mask indexing copy a host value to the device."""
        advanced = any(isinstance(k, (np.ndarray, list)) for k in (key if isinstance(key, tuple) else (key,)))
        if not (isinstance(value, ndarray) or advanced or _converting[0]) and _np["asarray"](value).shape != ():
            raise ValueError("non-scalar numpy.ndarray cannot be used for fill")
        _enqueue("a copy into a device array", lambda dst, v: np.ndarray.__setitem__(dst, key, v), (self, value),
                 modes="wr")

    def copy(self, order="C"):
        """A device-to-device copy on the current stream: reads this array there (stream order)."""
        if not _converting[0] and not _replaying[0] and _capturing[0] is None:
            _ordered_access("ndarray.copy", _current_stream(), ((self, "r"),))
        return np.ndarray.copy(self, order)

    def astype(self, dtype, *args, **kwargs):
        """As ``copy``: a kernel on the current stream reads this array."""
        if not _converting[0] and not _replaying[0] and _capturing[0] is None:
            _ordered_access("ndarray.astype", _current_stream(), ((self, "r"),))
        return np.ndarray.astype(self, dtype, *args, **kwargs)

    def __getitem__(self, key):
        """An element read here is a NumPy scalar at once (CuPy: a 0-d device array, read when converted): a host
        read of the array on the current stream, for the stream-order check."""
        out = np.ndarray.__getitem__(self, key)
        if not isinstance(out, np.ndarray) and not _converting[0] and not _replaying[0]:
            stream = _current_stream()
            _ordered_access("a read of an element on the host", stream, ((self, "r"),))
            _host_waits_for(stream)
        return out

    def fill(self, value):
        if not (isinstance(value, ndarray) or _converting[0]) and _np["asarray"](value).shape != ():
            raise ValueError("non-scalar numpy.ndarray cannot be used for fill")
        _enqueue("a memset of a device array", lambda dst: np.ndarray.fill(dst, value), (self,), modes="w")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if _capturing[0] is not None and not _replaying[0]:
            raise EmulatedCaptureError(f"numpy.{ufunc.__name__}.{method} on a device array inside a stream "
                                       "capture: CuPy's elementwise kernels are not emulated in captures")
        comparison = ufunc.__name__ in ("greater", "greater_equal", "less", "less_equal", "equal", "not_equal")
        for x in () if _converting[0] else inputs + tuple(kwargs.get("out", ())):
            if _is_host(x) and not (comparison and x.ndim == 0):
                raise TypeError(f"Unsupported type {type(x)} (a host array in numpy.{ufunc.__name__} with device "
                                "arrays: CuPy does not copy it to the device implicitly)")
        if not _converting[0] and not _replaying[0]:
            _ordered_access(f"numpy.{ufunc.__name__}", _current_stream(),
                            [(x, "r") for x in inputs] + [(x, "w") for x in kwargs.get("out", ())])
        base = lambda x: x.view(np.ndarray) if isinstance(x, ndarray) else x  # noqa: E731
        outs = kwargs.get("out")
        if outs:
            kwargs["out"] = tuple(base(o) for o in outs)
        result = getattr(ufunc, method)(*map(base, inputs), **kwargs)
        if outs:
            return outs[0] if len(outs) == 1 else outs
        device = lambda r: r.view(ndarray) if type(r) is np.ndarray else r  # noqa: E731
        return tuple(map(device, result)) if isinstance(result, tuple) else device(result)

    def __array_function__(self, func, types, args, kwargs):
        """NumPy functions on device arrays: CuPy runs its own implementation of each (here NumPy's, inside
        which converting a device array is allowed); ``numpy.copyto`` follows ``cupy.copyto``'s rules."""
        if func is np.copyto:
            return _copyto(*args, **kwargs)
        if _capturing[0] is not None and not _replaying[0] and func not in _CAPTURE_HARMLESS:
            raise EmulatedCaptureError(f"numpy.{func.__name__} on a device array inside a stream capture: "
                                       "not emulated")
        if not _converting[0] and not _replaying[0] and func not in _CAPTURE_HARMLESS:  # (shape etc. read nothing)
            outs = kwargs.get("out")
            _ordered_access(f"numpy.{func.__name__}", _current_stream(),
                            [(item, "r") for arg in args for item in (arg if isinstance(arg, (list, tuple)) else (arg,))]
                            + [(o, "w") for o in (outs if isinstance(outs, tuple) else (outs,))])
        _converting[0] += 1
        try:
            result = super().__array_function__(func, types, args, kwargs)
        finally:
            _converting[0] -= 1
        return result.view(ndarray) if type(result) is np.ndarray else result  # (CuPy returns device arrays)


ndarray.__module__ = "cupy"
_CAPTURE_HARMLESS = {np.shape, np.ndim, np.size, np.result_type, np.may_share_memory, np.shares_memory}


def _refusing(name):
    """numpy.<name> that raises, as CuPy's ``__array__`` does, when given a device array."""
    original = _np[name]

    @functools.wraps(original)
    def convert(a, *args, **kwargs):
        if isinstance(a, ndarray) and not _converting[0]:
            raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use `.get()` to "
                            f"construct a NumPy array explicitly. (numpy.{name} of a device array)")
        return original(a, *args, **kwargs)
    return convert


_allocations = weakref.WeakValueDictionary()  # address of a guarded buffer -> the uint8 buffer
_allocator = [None]  # cupy.cuda.set_allocator's function, called with the size of each allocation
_pool_bytes = {"used": 0, "peak": 0}  # device bytes of live allocations (not the harness's own copies)


def _release(nbytes):
    _pool_bytes["used"] -= nbytes


def _alloc(shape, dtype=float, internal=False):
    """A guarded, poisoned device array. ``internal``: a copy the harness makes for a launch (not counted, not
    refused: on a GPU that array would already be device memory)."""
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes > DEVICE_MEMORY:
        raise cuda_ns.memory.OutOfMemoryError(f"out of memory allocating {nbytes:,} bytes (emulated device)")
    if _allocator[0] is not None and not internal:
        _allocator[0](nbytes)  # counted by tests that install their own allocator; refused inside captures
    raw = np.full(nbytes + 2 * GUARD, POISON, np.uint8)
    _allocations[raw.ctypes.data] = raw
    _accesses.pop(raw.ctypes.data, None)
    if not internal:
        _pool_bytes["used"] += nbytes
        _pool_bytes["peak"] = max(_pool_bytes["peak"], _pool_bytes["used"])
        weakref.finalize(raw, _release, nbytes)
    return raw[GUARD:GUARD + nbytes].view(dtype).reshape(shape).view(ndarray)


def _device_copy(a, dtype=None, order="C", internal=False):
    _converting[0] += 1  # (the harness's own conversion of a device array)
    try:
        a = _np["asarray"](a, dtype=dtype)
    finally:
        _converting[0] -= 1
    out = _alloc(a.shape, a.dtype, internal)
    if order == "F" and a.ndim > 1:  # the same values in Fortran order: a view of a guarded buffer
        out = out.reshape(a.shape[::-1]).T
    np.ndarray.__setitem__(out, Ellipsis, a)
    if not internal:
        _ordered_access("a copy to the device (cupy.asarray)", _current_stream(), ((out, "w"),))
    return out


def _guarded_root(a):
    """The guarded buffer holding ``a``'s memory, or None."""
    while isinstance(a, np.ndarray) and a.base is not None:
        a = a.base
    if isinstance(a, np.ndarray) and _allocations.get(a.ctypes.data) is a:
        return a
    return None


def _from_numpy(name):
    """cupy.<name> for what the fake does not define: NumPy's, with plain arrays returned as device ones."""
    obj = getattr(np, name)
    if isinstance(obj, (type, np.ufunc)) or not callable(obj):
        return obj

    def call(*args, **kwargs):
        out = obj(*args, **kwargs)
        return out.view(ndarray) if type(out) is np.ndarray else out
    return call


def _module(name, **attrs):
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


def _full(shape, value, dtype=None):
    """cupy.full: the dtype of ``value`` unless given (CuPy: numpy.array(value).dtype)."""
    dtype = value.dtype if dtype is None and isinstance(value, ndarray) else dtype
    return _fill(_alloc(shape, _np["array"](value).dtype if dtype is None else dtype), value)


def _copyto(dst, src, casting="same_kind", where=None):
    """cupy.copyto: a host source must hold one element (CuPy copies no host array implicitly)."""
    if _is_host(src):
        if src.size != 1:
            raise ValueError("non-scalar numpy.ndarray cannot be used for copyto")
        src = src.reshape(())[()]
    if where is not None:
        raise NotImplementedError("cupy.copyto(where=...) is not emulated")
    host = lambda a: a.view(np.ndarray) if isinstance(a, ndarray) else a  # noqa: E731  (no dispatch again)
    _enqueue("cupy.copyto", lambda d, s: np.copyto(host(d), host(s), casting=casting), (dst, src), modes="wr")


cupy = types.ModuleType("cupy")
cupy.__file__ = __file__
cupy.ndarray = ndarray
cupy.empty = _alloc
cupy.asarray = lambda a, dtype=None: (  # a device array of the right dtype is returned as is, as CuPy does
    a if isinstance(a, ndarray) and (dtype is None or a.dtype == dtype) else _device_copy(a, dtype))
cupy.array = lambda a, dtype=None, copy=True: _device_copy(a, dtype)
cupy.asnumpy = lambda a, stream=None, order="C", out=None, blocking=True: (
    ndarray.get(a, stream, order, out, blocking) if isinstance(a, ndarray) else _np["array"](a, copy=True))
cupy.arange = lambda *args, **kwargs: _device_copy(np.arange(*args, **kwargs))  # guarded, as all device arrays
cupy.ascontiguousarray = lambda a, dtype=None: (
    a if isinstance(a, ndarray) and a.flags.c_contiguous and (dtype is None or a.dtype == dtype)
    else _device_copy(a, dtype))
cupy.asfortranarray = lambda a, dtype=None: _device_copy(a, dtype, order="F")
cupy.zeros = lambda shape, dtype=float: _fill(_alloc(shape, dtype), 0)
cupy.ones = lambda shape, dtype=float: _fill(_alloc(shape, dtype), 1)
cupy.full = _full
cupy.copyto = _copyto
cupy.empty_like = lambda a, dtype=None: _alloc(a.shape, dtype or a.dtype)
cupy.zeros_like = lambda a, dtype=None: _fill(_alloc(a.shape, dtype or a.dtype), 0)
cupy.__getattr__ = _from_numpy  # dtypes, ufuncs, concatenate, ...


def _fill(a, value):
    a.fill(value)
    return a


class CUDADriverError(RuntimeError):
    pass


class CUDARuntimeError(RuntimeError):
    pass


class OutOfMemoryError(MemoryError):
    pass


class _Device:
    def __init__(self, index=0):
        self.id, self.compute_capability = index, "90"

    def synchronize(self):
        _refuse_in_capture("Device.synchronize()")
        for stream in list(_all_streams):
            _host_waits_for(stream)


class _MemoryPool:
    """Counts the bytes of live device arrays: ``used_bytes``; ``total_bytes`` is their peak (a pool keeps
    the blocks it got)."""

    def malloc(self, size):
        return None

    def used_bytes(self):
        return _pool_bytes["used"]

    def total_bytes(self):
        return _pool_bytes["peak"]

    def free_bytes(self):
        return _pool_bytes["peak"] - _pool_bytes["used"]

    def free_all_blocks(self, stream=None):
        _pool_bytes["peak"] = _pool_bytes["used"]


_pool = _MemoryPool()
cupy.get_default_memory_pool = lambda: _pool


def _set_allocator(fn=None):
    _allocator[0] = None if fn is None or fn == _pool.malloc else fn


def _get_allocator():
    return _allocator[0] or _pool.malloc


# ===================================================================================== streams, graphs
class EmulatedCaptureError(RuntimeError):
    """An operation inside a stream capture that CUDA or CuPy refuses, or that the emulator cannot record; or
    a graph replayed over a buffer freed since its capture."""


_threads = threading.local()  # .streams: this thread's `with stream:` stack (CuPy's current stream is per thread)


def _stack():
    """This thread's ``with stream:`` stack; the current stream is its last one (else the null stream)."""
    if not hasattr(_threads, "streams"):
        _threads.streams = []
    return _threads.streams



_all_streams = weakref.WeakSet()
_capturing = [None]     # the stream being captured (one at a time here)
_replaying = [0]        # > 0 while a graph replays: its operations run, never recorded


class Stream:
    """A CUDA stream. Work runs as it is issued (the emulator is synchronous), except while the stream is
    capturing: then it is recorded for the Graph that ``end_capture`` returns."""

    def __init__(self, null=False, non_blocking=False, ptr=0):
        self.is_null, self.non_blocking = bool(null), bool(non_blocking)
        self._nodes = None         # the recorded operations while capturing
        self._invalidated = False  # an error CUDA returns inside a capture invalidates it
        self._issued = 0           # operations issued on this stream so far (stream order: _ordered_access)
        self._completed = 0        # ... of which the host knows that they have finished
        self._waits = {}           # {other stream: its operations this stream's next ones wait for}
        _all_streams.add(self)

    def __repr__(self):
        return ("the null (legacy default) stream" if self.is_null else
                f"{'a non-blocking' if self.non_blocking else 'a blocking'} stream (#{id(self) % 100000})")

    def __enter__(self):
        _stack().append(self)
        return self

    def __exit__(self, *exc):
        _stack().pop()
        return False

    def use(self):
        _stack()[:] = [self]
        return self

    @property
    def done(self):
        _host_waits_for(self)  # (true here: the host now knows this stream's work has finished)
        return True

    def synchronize(self):
        _refuse_in_capture("Stream.synchronize()")
        _host_waits_for(self)

    def record(self, event=None):
        event = event if event is not None else Event()
        event.record(self)
        return event

    def wait_event(self, event):
        if event._stream is not None:
            _merge_waits(self._waits, {**event._waits, event._stream: event._index})

    def is_capturing(self):
        if self._nodes is not None and self._invalidated:  # CuPy 14 raises for an invalidated capture
            raise RuntimeError("the stream was capturing, but an error has invalidated the capture sequence")
        return self._nodes is not None

    def begin_capture(self, mode=None):
        if self.is_null:
            raise RuntimeError("cannot capture on the default (legacy) stream")
        if self._nodes is not None:
            raise CUDARuntimeError("cudaErrorIllegalState: the stream is already capturing")
        if _capturing[0] is not None:
            raise EmulatedCaptureError("two captures at once are not emulated")
        self._nodes, self._invalidated = [], False
        _capturing[0] = self
        _install_capture_hooks()

    def end_capture(self):
        """Ends capture mode in every case (as cudaStreamEndCapture does); raises for an invalidated one."""
        if self._nodes is None:
            raise CUDARuntimeError("cudaErrorIllegalState: end_capture on a stream that is not capturing")
        nodes, self._nodes, invalidated = self._nodes, None, self._invalidated
        _capturing[0] = None
        _remove_capture_hooks()
        if invalidated:
            raise CUDARuntimeError("cudaErrorStreamCaptureInvalidated: operation failed due to a previous error "
                                   "during capture")
        return Graph(nodes)


_null_stream = Stream(null=True)
Stream.null = _null_stream


def _current_stream():
    stack = _stack()
    return stack[-1] if stack else _null_stream


class _Buffer:
    """What a graph node keeps of a device array: its buffer's address (a weak reference to the guarded
    allocation) and its layout, as a CUDA graph keeps a raw pointer."""

    __slots__ = ("root", "offset", "shape", "strides", "dtype")

    def __init__(self, a, root):
        self.root, self.offset = weakref.ref(root), a.ctypes.data - root.ctypes.data
        self.shape, self.strides, self.dtype = a.shape, a.strides, a.dtype

    def resolve(self, what):
        root = self.root()
        if root is None:
            raise EmulatedCaptureError(
                f"graph replay: {what} uses a device buffer ({self.dtype.name} {self.shape}) freed after the "
                "capture. A CUDA graph keeps raw pointers, not arrays: on a GPU this replay would read and write "
                "freed memory. Keep every buffer a graph touches alive while it is replayed, or capture again.")
        return np.ndarray(self.shape, self.dtype, buffer=root, offset=self.offset,
                          strides=self.strides).view(ndarray)


class _Value:
    """A graph node's argument that is not a guarded device buffer (a scalar, None, a flag)."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def resolve(self, what):
        return self.value


def _node_argument(value):
    root = _guarded_root(value) if isinstance(value, ndarray) else None
    if root is not None:
        return _Buffer(value, root)
    return _Value(_np["array"](value, copy=True) if _is_host(value) else value)  # host values: as they are now


class Graph:
    """What a capture recorded; ``launch`` replays it in order (synchronously, like everything here)."""

    def __init__(self, nodes):
        self._nodes = tuple(nodes)

    def __len__(self):
        return len(self._nodes)

    def upload(self, stream=None):
        pass

    def launch(self, stream=None):
        if _capturing[0] is not None:
            raise EmulatedCaptureError("Graph.launch while a stream is being captured is not emulated")
        stream = stream if stream is not None else _current_stream()
        _replaying[0] += 1
        try:
            for what, run, arguments, modes in self._nodes:
                values = [a.resolve(what) for a in arguments]
                _ordered_access(f"{what} (in a graph)", stream, zip(values, modes))
                run(*values)
        finally:
            _replaying[0] -= 1

    def operations(self):
        """What each recorded node is (for tests of the harness)."""
        return [node[0] for node in self._nodes]


class Event:
    """A CUDA event: everything before it has finished already (the emulator is synchronous)."""

    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self.recorded = False
        self._stream, self._index, self._waits = None, 0, {}

    def record(self, stream=None):
        self.recorded = True
        stream = stream if stream is not None else _current_stream()
        self._stream, self._index, self._waits = stream, stream._issued, dict(stream._waits)

    @property
    def done(self):
        self._reached()
        return True

    def synchronize(self):
        _refuse_in_capture("Event.synchronize()")
        self._reached()

    def _reached(self):
        if self._stream is not None:
            self._stream._completed = max(self._stream._completed, self._index)


def _enqueue(what, run, arguments=(), stream=None, modes=None):
    """``run(*arguments)`` now, or recorded as ``what`` when ``stream`` (default: the current one) is
    capturing: the node keeps the device arrays among ``arguments`` as buffer addresses only. ``modes``: for
    each argument, "r" (read), "w" (written) or None (neither), for the stream-order check."""
    modes = tuple(modes) if modes is not None else (None,) * len(arguments)
    capture = _capturing[0]
    stream = stream if stream is not None else _current_stream()
    if capture is None or _replaying[0]:
        if not _replaying[0]:  # (a replaying graph checks each node as it runs it: Graph.launch)
            _ordered_access(what, stream, zip(arguments, modes))
        run(*arguments)
        return
    if stream is not capture:
        raise EmulatedCaptureError(f"{what} on another stream while a stream is being captured (CUDA would run it "
                                   "outside the graph; the emulator refuses it)")
    if capture._invalidated:
        raise CUDARuntimeError(f"{what}: cudaErrorStreamCaptureInvalidated (an earlier error invalidated the "
                               "capture)")
    capture._nodes.append((what, run, tuple(_node_argument(a) for a in arguments), modes))


class EmulatedStreamRaceError(AssertionError):
    """Two operations on different streams use one device buffer, at least one of them writing it, and nothing
    orders them (a synchronisation the host waited for, an event one stream waits for, or the legacy null
    stream's implicit order with blocking streams): on a GPU they may overlap, or run in either order."""


# Stream order. The emulator runs every operation as it is issued, so two streams' work can never overlap here;
# on a GPU it can. Each operation is checked as it is issued: for each guarded buffer it reads ("r") or writes
# ("w"), the last write (and, for a write, the last reads) on *another* stream must be ordered before it —
# finished as far as the host knows (Stream/Device/Event.synchronize, a blocking get(), ``done``), or waited for
# by this stream (``wait_event`` on an event recorded after it), or implicitly ordered (the legacy null stream
# and blocking streams wait for each other; a non-blocking stream for nothing). Buffers are whole allocations:
# two views of one buffer count as the same memory.
_accesses = {}  # address of a guarded buffer -> {"w": (stream, index, what) or None, "r": {stream: (index, what)}}


def _merge_waits(waits, more):
    for stream, index in more.items():
        if index > waits.get(stream, 0):
            waits[stream] = index


def _host_waits_for(stream):
    """The host has seen every operation issued on ``stream`` so far finish."""
    stream._completed = stream._issued


def _ordered_before(stream, index, reader):
    """Whether operation ``index`` of ``stream`` is ordered before what ``reader`` issues next."""
    return stream is reader or stream._completed >= index or reader._waits.get(stream, 0) >= index


def _ordered_access(what, stream, accesses):
    """Check, then record, ``what`` issued on ``stream``, accessing ``(array, "r" | "w" | None)`` pairs."""
    if stream.is_null:  # the legacy null stream waits for the blocking streams' work, and they for its
        _merge_waits(stream._waits, {s: s._issued for s in list(_all_streams) if not s.is_null and not s.non_blocking})
    elif not stream.non_blocking:
        _merge_waits(stream._waits, {_null_stream: _null_stream._issued})
    stream._issued += 1
    index = stream._issued
    for array, mode in accesses:
        if mode is None or not isinstance(array, ndarray):
            continue
        root = _guarded_root(array)
        if root is None:
            continue
        record = _accesses.setdefault(root.ctypes.data, {"w": None, "r": {}})
        others = [("wrote", *record["w"])] if record["w"] is not None else []
        if mode == "w":
            others += [("read", s, i, w) for s, (i, w) in record["r"].items()]
        for did, other, other_index, other_what in others:
            if not _ordered_before(other, other_index, stream):
                PROBLEMS.append((what, "stream order"))
                raise EmulatedStreamRaceError(
                    f"{what} on {stream!r} {'writes' if mode == 'w' else 'reads'} a device buffer "
                    f"({root.nbytes - 2 * GUARD:,} bytes) that {other_what} on {other!r} {did}, and nothing orders "
                    "the two: on a GPU they may overlap. Synchronize (the device, that stream, or an event recorded "
                    "after it) or make this stream wait for such an event first.")
        if mode == "w":
            record["w"], record["r"] = (stream, index, what), {}
        else:
            record["r"][stream] = (index, what)


def _host_read(name):
    """``float(a)``, ``a.item()``, ...: CuPy copies the value to the host on the current stream and waits."""
    method = getattr(np.ndarray, name)

    def read(self, *args):
        if not _converting[0]:
            stream = _current_stream()
            _ordered_access(f"ndarray.{name}", stream, ((self, "r"),))
            _host_waits_for(stream)
        return method(self, *args)
    read.__name__ = name
    return read


_HOST_READS = {name: _host_read(name) for name in ("__int__", "__float__", "__bool__", "item", "tolist")}
for _name, _read in _HOST_READS.items():
    setattr(ndarray, _name, _read)


def _pointer_modes(name, params, source):
    """For each parameter of kernel ``name`` (defined in ``source``): "r" for a ``const`` pointer, "w" for another
    pointer (read and written, as far as the emulator knows), None for a scalar."""
    found = re.search(r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?' + name +
                      r"\s*\(([^)]*)\)", re.sub(r"//[^\n]*", "", source))
    texts = [" ".join(t.split()) for t in found.group(1).split(",")] if found else [""] * len(params)
    return tuple(None if not p.pointer else "r" if t.startswith("const ") else "w" for p, t in zip(params, texts))


def _refuse_in_capture(what):
    """A synchronisation: CUDA refuses it while a stream captures, and the error invalidates the capture."""
    capture = _capturing[0]
    if capture is not None and not _replaying[0]:
        capture._invalidated = True
        raise EmulatedCaptureError(f"{what} inside a stream capture: cudaErrorStreamCaptureUnsupported (CUDA "
                                   "refuses a synchronisation, and the capture is invalidated)")


def _refuse_transfer(stream, direction):
    """CuPy's check before a copy between host and device (the capture stays valid: CUDA is not called)."""
    if stream is _capturing[0] and not _replaying[0]:
        raise EmulatedCaptureError(f"the current stream is capturing, so {direction} transfers are disallowed")


def _capture_finalize(self, obj):
    if self.base is None and not _replaying[0]:  # NumPy made a new device array: an allocation
        if _allocator[0] is not None:
            _allocator[0](self.nbytes)
        raise EmulatedCaptureError("a new device array made by NumPy (copy, astype, arithmetic) inside a stream "
                                   "capture: not emulated")


def _capture_read(name):
    def read(self, *args):
        raise EmulatedCaptureError(f"ndarray.{name} (a synchronous read on the host) inside a stream capture")
    return read


_CAPTURE_HOOKS = {"__array_finalize__": _capture_finalize,
                  **{name: _capture_read(name) for name in ("__int__", "__float__", "__bool__", "item", "tolist")}}


def _install_capture_hooks():
    for name, hook in _CAPTURE_HOOKS.items():
        setattr(ndarray, name, hook)


def _remove_capture_hooks():
    for name in _CAPTURE_HOOKS:
        if name in _HOST_READS:
            setattr(ndarray, name, _HOST_READS[name])
        elif name in ndarray.__dict__:
            delattr(ndarray, name)


cuda_ns = _module("cupy.cuda", Device=_Device, set_allocator=_set_allocator, get_allocator=_get_allocator,
                  Stream=Stream, Event=Event, Graph=Graph, get_current_stream=_current_stream,
                  alloc_pinned_memory=lambda nbytes: bytearray(max(1, int(nbytes))),
                  graph=_module("cupy.cuda.graph", Graph=Graph),
                  set_pinned_memory_allocator=lambda fn=None: None,
                  memory=types.SimpleNamespace(OutOfMemoryError=OutOfMemoryError),
                  runtime=types.SimpleNamespace(getDeviceCount=lambda: 1, CUDARuntimeError=CUDARuntimeError))
cupy.cuda = cuda_ns

_FAKE_MODULES = {
    "cupy": cupy,
    "cupy.cuda": cuda_ns,
    "cupy_backends": _module("cupy_backends"),
    "cupy_backends.cuda": _module("cupy_backends.cuda"),
    "cupy_backends.cuda.api": _module("cupy_backends.cuda.api"),
    "cupy_backends.cuda.api.driver": _module("cupy_backends.cuda.api.driver", CUDADriverError=CUDADriverError),
    "cupy_backends.cuda.api.runtime": _module("cupy_backends.cuda.api.runtime",
                                              CUDARuntimeError=CUDARuntimeError),
}
if any(k in sys.modules and sys.modules[k] is not v for k, v in _FAKE_MODULES.items()):
    raise RuntimeError("fake_cupy must be imported before cupy (and in a process of its own)")
sys.modules.update(_FAKE_MODULES)
for _name in _NP_CONVERSIONS:  # numpy.asarray(device array) raises, as with CuPy
    setattr(np, _name, _refusing(_name))

from gpucnn.engines import cuda_loader as cuda  # noqa: E402  (after the fake cupy is in place)

# ===================================================================================== building
def _c_type(dtype):
    """(C spelling, ctypes type) of a kernel parameter type, from the launcher's own table."""
    spelling = {np.dtype(v): k for k, v in cuda._C_TYPES.items()}[np.dtype(dtype)]
    return spelling, np.ctypeslib.as_ctypes_type(dtype)


_SHARED = re.compile(r"(?<![\w])__shared__\s+([A-Za-z_][\w ]*?)\s+(\w+)\s*((?:\[[^\]]+\])+)\s*;")
_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+([A-Za-z_][\w ]*?)\s+(\w+)\s*\[\s*\]\s*;")
_BOUNDS = re.compile(r'extern\s+"C"\s+__global__\s+void\s+__launch_bounds__\s*\(([^()]*?)(?:,[^()]*)?\)\s*(\w+)\s*\(')


def cache_dir():
    path = os.environ.get("GPUCNN_EMU_CACHE") or os.path.join(tempfile.gettempdir(),
                                                              f"gpucnn-emu-{os.getuid()}")
    os.makedirs(path, exist_ok=True)
    return path


def host_source(src):
    """CUDA source text as the emulator compiles it: shared arrays rewritten, a launcher per kernel."""
    kernels = cuda.parse_kernels(src)
    src = _EXTERN_SHARED.sub(r"\1* const \2 = reinterpret_cast<\1*>(emu::dynamic_shared);", src)
    src = _SHARED.sub(r"static \1 \2\3; EMU_SHARED(\2);", src)
    bounds = dict((name, expr) for expr, name in _BOUNDS.findall(src))
    wrappers = []
    for name, params in kernels.items():
        decl = "".join(f", {_c_type(p.dtype)[0]}{'*' if p.pointer else ''} a{i}" for i, p in enumerate(params))
        call = ", ".join(f"a{i}" for i in range(len(params)))
        limit = f"if (bx * by * bz > (unsigned)({bounds[name]})) return 1; " if name in bounds else ""
        wrappers.append(
            f'extern "C" int emu_launch_{name}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, '
            f'unsigned bz, unsigned long long shared{decl}) {{ {limit}'
            f'emu::run(dim3{{gx, gy, gz}}, dim3{{bx, by, bz}}, shared, [=] {{ {name}({call}); }}); return 0; }}')
    return src + "\n// ---- emulator launchers\n" + "\n".join(wrappers) + "\n"


def build_source(filename, src):
    """Path of the shared object of CUDA source ``src`` (named ``filename``), compiled unless cached."""
    text = host_source(src)
    with open(EMU_H, encoding="utf-8") as f:
        key = hashlib.sha256("\0".join([text, f.read(), " ".join(CXXFLAGS)]).encode()).hexdigest()[:16]
    so = os.path.join(cache_dir(), f"{filename}.{key}.so")
    if os.path.exists(so):
        return so
    fd, tmp = tempfile.mkstemp(suffix=".cpp", dir=cache_dir())
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    try:
        done = subprocess.run(["g++", *CXXFLAGS, "-include", EMU_H, tmp, "-o", tmp[:-4] + ".so"],
                              capture_output=True, text=True)
        if done.returncode:
            raise EmulatorBuildError(f"{filename} does not compile for the emulator:\n{done.stderr[-4000:]}")
        os.replace(tmp[:-4] + ".so", so)  # atomic: concurrent runs share the cache
        for stale in os.listdir(cache_dir()):  # builds of earlier versions of this file
            if stale.startswith(filename + ".") and stale.endswith(".so") and stale != os.path.basename(so):
                try:
                    os.remove(os.path.join(cache_dir(), stale))
                except OSError:  # another run's, already gone
                    pass
    finally:
        for leftover in (tmp, tmp[:-4] + ".so"):
            if os.path.exists(leftover):
                os.remove(leftover)
    return so


_libraries = {}     # filename -> ctypes.CDLL or EmulatorBuildError
LAUNCHED = {}       # kernel name -> launch count
PROBLEMS = []       # (kernel, message)


def build_all():
    """Compiles every kernel file (in parallel); a file that fails is remembered and raised on use."""
    if shutil.which("g++") is None:
        raise EmulatorBuildError("g++ was not found")
    files = [f for f in cuda.kernel_files() if f not in _libraries]
    with concurrent.futures.ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
        futures = {f: pool.submit(lambda f=f: build_source(f, cuda.kernel_source(f))) for f in files}
    for f, future in futures.items():
        try:
            _libraries[f] = ctypes.CDLL(future.result())
        except Exception as exc:  # g++ errors, and sources the launcher itself cannot read
            _libraries[f] = exc if isinstance(exc, EmulatorBuildError) else EmulatorBuildError(
                f"{f}: {type(exc).__name__}: {exc}")
    return {f: str(v) for f, v in _libraries.items() if isinstance(v, Exception)}


def _library(filename):
    if filename not in _libraries:
        build_all()
    lib = _libraries[filename]
    if isinstance(lib, Exception):
        raise lib
    return lib


def problems(lib):
    return lib.emu_problems(), lib.emu_first_problem().decode()


class EmulatedKernel:
    """Stands in for a ``cupy.RawKernel``: ``kernel(grid, block, args, shared_mem=0)``."""

    def __init__(self, name, params, lib, source=""):
        self.name, self.params, self.lib = name, params, lib
        self.fn = getattr(self.lib, f"emu_launch_{name}")
        self.fn.argtypes = [ctypes.c_uint] * 6 + [ctypes.c_ulonglong] + [
            ctypes.c_void_p if p.pointer else _c_type(p.dtype)[1] for p in self.params]
        self.fn.restype = ctypes.c_int
        self.lib.emu_problems.restype = ctypes.c_long
        self.lib.emu_first_problem.restype = ctypes.c_char_p
        self.max_dynamic_shared_size_bytes = DEFAULT_SHARED
        self.modes = _pointer_modes(name, params, source)

    def __call__(self, grid, block, args, shared_mem=0):
        """Launch on the current stream: now, or recorded when it is capturing (checked as it is issued)."""
        where = f"kernel {self.name} (grid {grid}, block {block})"
        if shared_mem > min(self.max_dynamic_shared_size_bytes, MAX_DYNAMIC_SHARED):
            raise CUDADriverError(f"{where}: CUDA_ERROR_INVALID_VALUE: {shared_mem} bytes of dynamic shared "
                                  "memory (emulated limit)")
        grid, block, args = tuple(grid), tuple(block), tuple(args)
        _enqueue(f"kernel {self.name}", lambda *a: self._run(where, grid, block, a, shared_mem), args,
                 modes=self.modes)

    def _run(self, where, grid, block, args, shared_mem):
        LAUNCHED[self.name] = LAUNCHED.get(self.name, 0) + 1
        cargs, copies, roots = [], [], []
        for p, a in zip(self.params, args):
            if not p.pointer:
                cargs.append(a.item() if isinstance(a, np.generic) else a)
            elif isinstance(a, np.uint64):  # the null pointer of an `_or_null` parameter
                cargs.append(None)
            else:
                root = _guarded_root(a)
                if root is None:  # memory NumPy allocated (astype, copy, ...): run on a guarded copy
                    copies.append((a, _device_copy(a, internal=True)))
                    a, root = copies[-1][1], _guarded_root(copies[-1][1])
                roots.append(root)
                cargs.append(a.ctypes.data)
        before = problems(self.lib)[0]
        if self.fn(*grid, *block, shared_mem, *cargs):
            raise CUDADriverError(f"{where}: CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES: more threads than the "
                                  "kernel's __launch_bounds__")
        for original, copy in copies:
            np.ndarray.__setitem__(original, Ellipsis, copy)
        count, first = problems(self.lib)
        if count != before:
            PROBLEMS.append((self.name, first))
            raise EmulatedKernelError(f"{where}: {first}")
        for root in roots:
            if (root[:GUARD] != POISON).any() or (root[-GUARD:] != POISON).any():
                root[:GUARD] = root[-GUARD:] = POISON  # reported once
                PROBLEMS.append((self.name, "wrote outside an array"))
                raise EmulatedKernelError(f"{where} wrote outside an array argument (a guard zone changed)")


_kernels = {}


def _function(name):
    if name not in _kernels:
        cuda.signature(name)  # a KeyError for an unknown kernel, as the real loader gives
        filename, params = cuda._kernel_table()[name]
        _kernels[name] = EmulatedKernel(name, params, _library(filename), cuda.kernel_source(filename))
    return _kernels[name]


cuda.function = _function


OUTCOMES = {}  # "passed" / "failed" / "skipped" -> test ids


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        OUTCOMES.setdefault(report.outcome, []).append(report.nodeid)


def summary():
    try:
        kernels = sorted(cuda._kernel_table())
    except Exception as exc:  # reported; the tests that launch kernels fail on it too
        kernels = [f"unreadable kernel table: {exc}"]
    launched = {name: n for name, n in LAUNCHED.items() if name in kernels}  # not the self-test's kernels
    return {"kernels": kernels, "launched": launched, "outcomes": OUTCOMES, "problems": PROBLEMS,
            "build_errors": {f: str(e) for f, e in _libraries.items() if isinstance(e, Exception)}}


# ===================================================================================== pytest plugin
def pytest_configure(config):
    build_all()


def pytest_collection_modifyitems(session, config, items):
    """Drops the test functions named in GPUCNN_EMU_EXCLUDE ({name: reason}); a name that matches nothing
    fails the session (a stale list)."""
    excluded = json.loads(os.environ.get("GPUCNN_EMU_EXCLUDE") or "{}")
    drop = [item for item in items if getattr(item, "originalname", item.name) in excluded]
    stale = set(excluded) - {getattr(item, "originalname", item.name) for item in drop}
    if stale:
        raise RuntimeError(f"emulated run: no test named {sorted(stale)} to exclude (renamed in tests/test_gpu.py?)")
    dropped = {id(item) for item in drop}
    items[:] = [item for item in items if id(item) not in dropped]
    config.hook.pytest_deselected(items=drop)


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("GPUCNN_EMU_REPORT")
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(dict(summary(), exitstatus=int(exitstatus)), f, indent=1)
