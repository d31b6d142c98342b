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
order, so streams, events and asynchronous copies are synchronous. ``Stream.begin_capture()`` switches the
stream to recording: kernel launches and the few array operations a capture can hold (``a[...] = b``,
``fill``, ``cupy.copyto``, ``set``, ``get(out=..., blocking=False)``) are recorded, NOT run, and
``end_capture()`` returns a ``Graph`` whose ``launch()`` replays them in order, reading the arrays' contents
at replay time. Inside a capture the harness refuses what CUDA or the emulator cannot capture: device
allocations (through the installed allocator, as ``cupy.cuda.set_allocator`` hooks do), synchronisation,
synchronous copies to the host, NumPy computations on device arrays, and operations on another stream.

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
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
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
class ndarray(np.ndarray):
    """A "device" array: a NumPy array with cupy's few extra methods."""

    def get(self, stream=None, order="C", out=None, blocking=True):
        if out is None:
            _refuse_in_capture("ndarray.get() (a synchronous copy to the host)")
            return np.array(self, copy=True, order=order)
        if blocking:
            _refuse_in_capture("ndarray.get(out=..., blocking=True) (a synchronous copy to the host)")
        _enqueue("ndarray.get(out=...)", lambda: np.copyto(out, np.asarray(self).reshape(out.shape)), stream)
        return out

    def set(self, arr, stream=None):
        value = np.array(arr, copy=True)  # the host array as it is now
        _enqueue("ndarray.set", lambda: np.ndarray.__setitem__(self, Ellipsis, value), stream)


ndarray.__module__ = "cupy"
_allocations = weakref.WeakValueDictionary()  # address of a guarded buffer -> the uint8 buffer
_allocator = [None]  # cupy.cuda.set_allocator's function, called with the size of each allocation
_pool_bytes = {"used": 0, "peak": 0}  # device bytes of live allocations (not the harness's own copies)


def _release(nbytes):
    _pool_bytes["used"] -= nbytes


def _alloc(shape, dtype=np.float32, internal=False):
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
    if not internal:
        _pool_bytes["used"] += nbytes
        _pool_bytes["peak"] = max(_pool_bytes["peak"], _pool_bytes["used"])
        weakref.finalize(raw, _release, nbytes)
    return raw[GUARD:GUARD + nbytes].view(dtype).reshape(shape).view(ndarray)


def _device_copy(a, dtype=None, order="C", internal=False):
    a = np.asarray(a, dtype=dtype)
    out = _alloc(a.shape, a.dtype, internal)
    if order == "F" and a.ndim > 1:  # the same values in Fortran order: a view of a guarded buffer
        out = out.reshape(a.shape[::-1]).T
    out[...] = a
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


cupy = types.ModuleType("cupy")
cupy.__file__ = __file__
cupy.ndarray = ndarray
cupy.empty = _alloc
cupy.asarray = lambda a, dtype=None: (  # a device array of the right dtype is returned as is, as CuPy does
    a if isinstance(a, ndarray) and (dtype is None or a.dtype == dtype) else _device_copy(a, dtype))
cupy.array = lambda a, dtype=None, copy=True: _device_copy(a, dtype)
cupy.asnumpy = lambda a, stream=None, order="C", out=None, blocking=True: (
    ndarray.get(a, stream, order, out, blocking) if isinstance(a, ndarray) else np.array(a, copy=True))
cupy.arange = lambda *args, **kwargs: _device_copy(np.arange(*args, **kwargs))  # guarded, as all device arrays
cupy.ascontiguousarray = lambda a, dtype=None: (
    a if isinstance(a, ndarray) and a.flags.c_contiguous and (dtype is None or a.dtype == dtype)
    else _device_copy(a, dtype))
cupy.asfortranarray = lambda a, dtype=None: _device_copy(a, dtype, order="F")
cupy.zeros = lambda shape, dtype=np.float32: _fill(_alloc(shape, dtype), 0)
cupy.ones = lambda shape, dtype=np.float32: _fill(_alloc(shape, dtype), 1)
cupy.full = lambda shape, value, dtype=np.float32: _fill(_alloc(shape, dtype), value)
cupy.empty_like = lambda a, dtype=None: _alloc(a.shape, dtype or a.dtype)
cupy.zeros_like = lambda a, dtype=None: _fill(_alloc(a.shape, dtype or a.dtype), 0)
cupy.__getattr__ = _from_numpy  # dtypes, ufuncs, concatenate, ...


def _fill(a, value):
    a[...] = value
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
    """An operation inside a stream capture that CUDA refuses, or that the emulator cannot record."""


_streams = []           # the `with stream:` stack; the current stream is the last one (else the null stream)
_capturing = [None]     # the stream being captured (one at a time here)
_replaying = [0]        # > 0 while a graph replays: its operations run, never recorded


class Stream:
    """A CUDA stream. Work runs as it is issued (the emulator is synchronous), except while the stream is
    capturing: then it is recorded for the Graph that ``end_capture`` returns."""

    def __init__(self, null=False, non_blocking=False, ptr=0):
        self.is_null, self.non_blocking = bool(null), bool(non_blocking)
        self._nodes = None  # the recorded operations while capturing

    def __enter__(self):
        _streams.append(self)
        return self

    def __exit__(self, *exc):
        _streams.pop()
        return False

    def use(self):
        _streams[:] = [self]
        return self

    @property
    def done(self):
        return True

    def synchronize(self):
        if _capturing[0] is not None:  # cudaErrorStreamCaptureUnsupported (and it invalidates the capture)
            raise EmulatedCaptureError("Stream.synchronize() while a stream is being captured")

    def record(self, event=None):
        event = event if event is not None else Event()
        event.record(self)
        return event

    def wait_event(self, event):
        pass

    def is_capturing(self):
        return self._nodes is not None

    def begin_capture(self, mode=None):
        if self.is_null:
            raise CUDARuntimeError("cudaErrorStreamCaptureUnsupported: the null stream cannot be captured")
        if self._nodes is not None:
            raise CUDARuntimeError("cudaErrorIllegalState: the stream is already capturing")
        if _capturing[0] is not None:
            raise EmulatedCaptureError("two captures at once are not emulated")
        self._nodes = []
        _capturing[0] = self
        _install_capture_hooks()

    def end_capture(self):
        if self._nodes is None:
            raise CUDARuntimeError("cudaErrorIllegalState: end_capture on a stream that is not capturing")
        nodes, self._nodes = self._nodes, None
        _capturing[0] = None
        _remove_capture_hooks()
        return Graph(nodes)


_null_stream = Stream(null=True)
Stream.null = _null_stream


def _current_stream():
    return _streams[-1] if _streams else _null_stream


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
        _replaying[0] += 1
        try:
            for _, run in self._nodes:
                run()
        finally:
            _replaying[0] -= 1

    def operations(self):
        """What each recorded node is (for tests of the harness)."""
        return [what for what, _ in self._nodes]


class Event:
    """A CUDA event: everything before it has finished already (the emulator is synchronous)."""

    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self.recorded = False

    def record(self, stream=None):
        self.recorded = True

    @property
    def done(self):
        return True

    def synchronize(self):
        _refuse_in_capture("Event.synchronize()")


def _enqueue(what, run, stream=None):
    """Run ``run`` now, or record it as ``what`` when ``stream`` (default: the current one) is capturing."""
    capture = _capturing[0]
    if capture is None or _replaying[0]:
        run()
        return
    stream = stream if stream is not None else _current_stream()
    if stream is not capture:
        raise EmulatedCaptureError(f"{what} on another stream while a stream is being captured (CUDA would run it "
                                   "outside the graph; the emulator refuses it)")
    capture._nodes.append((what, run))


def _refuse_in_capture(what):
    if _capturing[0] is not None and not _replaying[0]:
        raise EmulatedCaptureError(f"{what} inside a stream capture: CUDA refuses it (a synchronisation)")


def _snapshot(value):
    """A value to write later: a device array is read when the node runs; anything else is copied now."""
    return value if isinstance(value, ndarray) else np.array(value, copy=True)


def _capture_setitem(self, key, value):
    value = _snapshot(value)
    _enqueue("a copy into a device array", lambda: np.ndarray.__setitem__(self, key, value))


def _capture_fill(self, value):
    _enqueue("a memset of a device array", lambda: np.ndarray.fill(self, value))


def _capture_ufunc(self, ufunc, method, *inputs, **kwargs):
    raise EmulatedCaptureError(f"numpy.{ufunc.__name__}.{method} on a device array inside a stream capture: "
                               "CuPy's elementwise kernels are not emulated in captures")


_CAPTURE_HARMLESS = {np.shape, np.ndim, np.size, np.result_type, np.may_share_memory, np.shares_memory}


def _capture_function(self, func, types, args, kwargs):
    if func is np.copyto:
        dst, src, rest = args[0], _snapshot(args[1]), args[2:]
        _enqueue("cupy.copyto", lambda: np.copyto._implementation(dst, src, *rest, **kwargs))
        return None
    if func in _CAPTURE_HARMLESS:
        return func._implementation(*args, **kwargs)
    raise EmulatedCaptureError(f"numpy.{func.__name__} on a device array inside a stream capture: not emulated")


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


_CAPTURE_HOOKS = {"__setitem__": _capture_setitem, "fill": _capture_fill, "__array_ufunc__": _capture_ufunc,
                  "__array_function__": _capture_function, "__array_finalize__": _capture_finalize,
                  **{name: _capture_read(name) for name in ("__int__", "__float__", "__bool__", "item", "tolist")}}


def _install_capture_hooks():
    for name, hook in _CAPTURE_HOOKS.items():
        setattr(ndarray, name, hook)


def _remove_capture_hooks():
    for name in _CAPTURE_HOOKS:
        if name in ndarray.__dict__:
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

    def __init__(self, name, params, lib):
        self.name, self.params, self.lib = name, params, lib
        self.fn = getattr(self.lib, f"emu_launch_{name}")
        self.fn.argtypes = [ctypes.c_uint] * 6 + [ctypes.c_ulonglong] + [
            ctypes.c_void_p if p.pointer else _c_type(p.dtype)[1] for p in self.params]
        self.fn.restype = ctypes.c_int
        self.lib.emu_problems.restype = ctypes.c_long
        self.lib.emu_first_problem.restype = ctypes.c_char_p
        self.max_dynamic_shared_size_bytes = DEFAULT_SHARED

    def __call__(self, grid, block, args, shared_mem=0):
        """Launch on the current stream: now, or recorded when it is capturing (checked as it is issued)."""
        where = f"kernel {self.name} (grid {grid}, block {block})"
        if shared_mem > min(self.max_dynamic_shared_size_bytes, MAX_DYNAMIC_SHARED):
            raise CUDADriverError(f"{where}: CUDA_ERROR_INVALID_VALUE: {shared_mem} bytes of dynamic shared "
                                  "memory (emulated limit)")
        grid, block, args = tuple(grid), tuple(block), tuple(args)
        _enqueue(f"kernel {self.name}", lambda: self._run(where, grid, block, args, shared_mem))

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
            original[...] = copy
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
        _kernels[name] = EmulatedKernel(name, params, _library(filename))
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
