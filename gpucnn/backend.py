"""The one place that decides which engine runs: NumPy or CUDA.

``GPUCNN_DEVICE`` chooses: ``auto`` (default: the GPU when CuPy imports and a device answers, else NumPy
with one short notice), ``gpu`` (the GPU or a clear error keeping CuPy's own reason) or ``cpu`` (NumPy);
``cuda`` and ``numpy``, the names ``engine()`` returns, mean ``gpu`` and ``cpu``.
``set_engine()`` does the same from code. Importing gpucnn never touches CuPy; the decision is made the
first time an engine is needed.

Everything else asks this module for ``ops()`` (the op module of the engine: ``numpy_ops`` or
``ops_cuda``, mirrored function for function) and for ``xp`` (``numpy`` or ``cupy``).
"""
import os
import sys

_CHOICES = ("auto", "gpu", "cpu")
_ALIASES = {"cuda": "gpu", "numpy": "cpu"}  # the engines' names, as engine() returns them
_state = {"engine": None, "ops": None}
_gpu_probe = {}


class GPUUnavailableError(RuntimeError):
    """The GPU engine was asked for but CuPy or a CUDA device is not usable."""


def gpu_status():
    """Return ``(usable, reason)``: whether CuPy imports and a CUDA device answers, and if not, why."""
    if "usable" not in _gpu_probe:
        try:
            import cupy  # noqa: F401  (any failure here is the reason we report)

            count = cupy.cuda.runtime.getDeviceCount()
            if count < 1:
                raise RuntimeError("CuPy found no CUDA device")
            cupy.cuda.Device(0).compute_capability  # touches the driver
            _gpu_probe.update(usable=True, reason=None, error=None)
        except Exception as exc:  # CuPy raises several kinds: ImportError, CUDARuntimeError, ...
            _gpu_probe.update(usable=False, reason=f"{type(exc).__name__}: {exc}", error=exc)
    return _gpu_probe["usable"], _gpu_probe["reason"]


def _resolve(choice):
    choice = (choice or "auto").strip().lower()
    choice = _ALIASES.get(choice, choice)
    if choice not in _CHOICES:
        raise ValueError(f"GPUCNN_DEVICE / engine must be one of 'auto', 'gpu' (or 'cuda'), 'cpu' (or "
                         f"'numpy'); got {choice!r}")
    if choice == "cpu":
        return "numpy"
    usable, reason = gpu_status()
    if usable:
        return "cuda"
    if choice == "gpu":
        raise GPUUnavailableError(
            f"the GPU engine was requested but is not usable ({reason}). On a machine with an NVIDIA "
            "driver, install CuPy for its CUDA version (pip install cupy-cuda12x, or cupy-cuda13x); else "
            "use the NumPy engine (GPUCNN_DEVICE=cpu, or gpucnn train --engine cpu)."
        ) from _gpu_probe.get("error")
    print(f"gpucnn: no usable GPU ({reason.splitlines()[0][:120]}); using the NumPy engine.",
          file=sys.stderr)
    return "numpy"


def set_engine(choice):
    """Choose the engine from code: ``"auto"``, ``"gpu"`` or ``"cpu"`` (as ``GPUCNN_DEVICE``; ``"cuda"`` and
    ``"numpy"`` too). Returns the engine's name, as ``engine()`` does: ``set_engine(engine())`` keeps it.

    Build models after choosing: a model's weights live on the engine that was active when it was built.
    """
    _state["engine"] = _resolve(choice)
    _state["ops"] = None
    return _state["engine"]


def engine():
    """The active engine's name, ``"numpy"`` or ``"cuda"``, deciding it on first use."""
    if _state["engine"] is None:
        _state["engine"] = _resolve(os.environ.get("GPUCNN_DEVICE", "auto"))
    return _state["engine"]


def ops():
    """The op module of the active engine (``gpucnn.engines.numpy_ops`` or ``gpucnn.engines.cuda_ops``)."""
    if _state["ops"] is None:
        if engine() == "cuda":
            from .engines import cuda_ops as module
        else:
            from .engines import numpy_ops as module
        _state["ops"] = module
    return _state["ops"]


def is_engine_array(a):
    """Whether ``a`` is a CuPy array (checked without importing CuPy)."""
    return type(a).__module__.startswith("cupy")


def to_numpy(a):
    """``a`` with its CuPy arrays copied to NumPy arrays: ``a`` itself, or the items of a (nested) list or tuple
    of them, which ``numpy.asarray`` refuses as CuPy does; anything else as it is. A nested list is walked only
    when its first element (or, nested, first leaf) is a device array: Python lists of numbers stay as they are,
    unwalked (rebuilding a large one was 6x slower than NumPy's own conversion)."""
    if is_engine_array(a):
        return a.get()
    if isinstance(a, (list, tuple)) and (any(is_engine_array(v) for v in a) or is_engine_array(_first_leaf(a))):
        return [to_numpy(v) for v in a]
    return a


def _first_leaf(a):
    while isinstance(a, (list, tuple)) and len(a):
        a = a[0]
    return a


def clear_session():
    """Keras's ``keras.backend.clear_session()``: default layer and model names start again
    (``gpucnn.utils.clear_session``)."""
    from .utils import clear_session as clear
    clear()


def __getattr__(name):
    from .utils import missing
    raise missing("gpucnn.backend", name, "part of keras.backend",
                  "clear_session, and gpucnn's engine(), set_engine(), ops(), to_numpy()")
