"""The CUDA engine's loader: finds ``kernels/*.cu``, compiles them through CuPy and launches their kernels.

Everything that touches a kernel goes through here:

  * ``kernel_dir()`` — the folder of the ``.cu`` sources: the package resource ``gpucnn.kernels`` of an
    installed wheel (pyproject.toml maps the top-level ``kernels/`` there), else ``kernels/`` beside the
    ``gpucnn`` package in a source checkout;
  * ``kernel_source(filename)`` — a source as it is compiled: ``kernels/common.cuh`` pasted in place of its
    ``#include "common.cuh"`` line (so CuPy's disk cache, keyed on the source text, sees header changes);
  * ``COMPILE_OPTIONS`` — the NVRTC options of every compile; ``tests/test_kernels_compile.py`` compiles
    each file with ``kernel_source`` and these options, without a GPU;
  * ``signature(name)`` — a kernel's parameters, read from its ``extern "C" __global__`` declaration: the
    one source of truth for the types ``launch`` checks and converts to;
  * ``launch(name, grid, block, args, shared_mem=0)`` — checks every argument against that signature
    (arrays: CuPy, dtype, C-contiguous; scalars: converted to the C type, range-checked; ``None`` only for
    a pointer named ``*_or_null``), checks the launch configuration, launches on the current stream, and
    turns a failure into ``KernelLaunchError`` naming the kernel, grid and block. It never synchronises;
  * ``empty(shape, dtype)`` — device allocation whose out-of-memory error says what to do.

CuPy is imported inside the functions that need it: importing this module never fails without CuPy.
Each source file is compiled once per process (``cupy.RawModule(code=..., options=COMPILE_OPTIONS)``;
CuPy also caches the binary on disk, ``CUPY_CACHE_DIR``).
"""
import importlib.resources
import pathlib
import re

import numpy as np

HEADER = "common.cuh"

# NVRTC options of every compile. IEEE division and square root (no --use_fast_math) so results follow the
# float64 oracle closely. CuPy appends -ftz=true (denormals flush to zero) to every compile it makes, after
# our options, so it cannot be turned off; stating it here makes the CI compile identical to CuPy's.
# The target architecture (-arch) is added by CuPy for the current device, by the CI test for sm_80/sm_90.
COMPILE_OPTIONS = ("-std=c++17", "-ftz=true")


class KernelLaunchError(RuntimeError):
    """A kernel could not be launched: bad configuration or arguments, or the driver refused it."""


class DeviceOutOfMemoryError(MemoryError):
    """The GPU has no room for an array gpucnn needs (usually: the batch is too big)."""


# ===================================================================================== sources
def kernel_dir():
    """The folder holding ``common.cuh`` and the ``.cu`` files (a ``Traversable``: a path, or a resource
    folder inside an installed package)."""
    try:
        folder = importlib.resources.files("gpucnn.kernels")
        if folder.joinpath(HEADER).is_file():
            return folder
    except ModuleNotFoundError:  # a source checkout: there is no gpucnn.kernels package
        pass
    folder = pathlib.Path(__file__).resolve().parents[2] / "kernels"
    if folder.joinpath(HEADER).is_file():
        return folder
    raise FileNotFoundError(
        "gpucnn's CUDA kernel sources were not found: neither the package resource gpucnn.kernels nor "
        f"{folder} holds {HEADER}. Reinstall gpucnn, or run from a complete source checkout.")


def kernel_files():
    """The names of the ``.cu`` files, sorted."""
    return sorted(entry.name for entry in kernel_dir().iterdir() if entry.name.endswith(".cu"))


_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"' + re.escape(HEADER) + r'"[ \t]*$', re.M)


def kernel_source(filename):
    """The text of ``kernels/<filename>`` as it is compiled: the header pasted in place of the line
    ``#include "common.cuh"``, with ``#line`` marks so compiler messages name the right file and line."""
    folder = kernel_dir()
    text = folder.joinpath(filename).read_text(encoding="utf-8")
    header = folder.joinpath(HEADER).read_text(encoding="utf-8")

    def paste(match):
        line = text.count("\n", 0, match.start()) + 1
        return f'#line 1 "{HEADER}"\n{header.rstrip()}\n#line {line + 1} "{filename}"'

    return _INCLUDE.sub(paste, text, count=1)


# ===================================================================================== signatures
# C parameter type -> (is a pointer, NumPy dtype). Pointers take a CuPy array of that dtype.
_C_TYPES = {
    "float": np.float32,
    "int": np.int32,
    "long long": np.int64,
    "unsigned long long": np.uint64,
    "signed char": np.int8,
    "unsigned char": np.uint8,
}
_KERNEL = re.compile(
    r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(([^)]*)\)')
_PARAM = re.compile(r"^(?:const\s+)?([a-z ]+?)\s*(\*)?\s*(?:__restrict__\s+)?(\w+)$")


class Param:
    """One kernel parameter: ``name``, ``pointer`` (bool), ``dtype`` (NumPy), ``optional`` (may be null)."""

    __slots__ = ("name", "pointer", "dtype", "optional")

    def __init__(self, name, pointer, dtype):
        self.name, self.pointer, self.dtype = name, pointer, np.dtype(dtype)
        self.optional = pointer and name.endswith("_or_null")

    def __repr__(self):
        return f"{self.dtype.name}{'*' if self.pointer else ''} {self.name}"


def parse_kernels(source):
    """``{kernel name: [Param, ...]}`` for every ``extern "C" __global__`` kernel in ``source``."""
    source = re.sub(r"//[^\n]*", "", source)
    kernels = {}
    for match in _KERNEL.finditer(source):
        name, params = match.group(1), []
        for text in match.group(2).split(","):
            text = " ".join(text.split())
            found = _PARAM.match(text)
            if not found or found.group(1) not in _C_TYPES:
                raise ValueError(f"kernel {name}: cannot read parameter {text!r} (types: {sorted(_C_TYPES)})")
            params.append(Param(found.group(3), bool(found.group(2)), _C_TYPES[found.group(1)]))
        kernels[name] = params
    return kernels


_table = {}  # kernel name -> (filename, [Param, ...])


def _kernel_table():
    if not _table:
        found = {}
        for filename in kernel_files():
            for name, params in parse_kernels(kernel_source(filename)).items():
                if name in found:
                    raise ValueError(f"kernel {name} is defined in both {found[name][0]} and {filename}")
                found[name] = (filename, params)
        _table.update(found)
    return _table


def signature(name):
    """The parameters of kernel ``name`` (a list of ``Param``)."""
    try:
        return _kernel_table()[name][1]
    except KeyError:
        raise KeyError(f"no kernel named {name!r} in {kernel_dir()}") from None


def kernel_constants(filename):
    """``{NAME: int}`` of the ``#define NAME <integer>`` defaults in ``kernels/<filename>`` and the header:
    tile sizes that the launcher needs for its grids."""
    text = kernel_source(filename)
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^#define\s+(\w+)\s+(\d+)\b", text, re.M)}


# ===================================================================================== compiling
_modules = {}    # filename -> cupy.RawModule
_functions = {}  # kernel name -> cupy.RawKernel


def module(filename):
    """The compiled ``cupy.RawModule`` of ``kernels/<filename>`` (compiled once per process)."""
    if filename not in _modules:
        import cupy

        _modules[filename] = cupy.RawModule(code=kernel_source(filename), options=COMPILE_OPTIONS)
    return _modules[filename]


def function(name):
    """The ``cupy.RawKernel`` of kernel ``name``."""
    if name not in _functions:
        signature(name)  # a clear KeyError for an unknown name
        _functions[name] = module(_kernel_table()[name][0]).get_function(name)
    return _functions[name]


# ===================================================================================== launching
_MAX_GRID = (2**31 - 1, 65535, 65535)
_MAX_BLOCK = (1024, 1024, 64)
_DEFAULT_SHARED = 48 * 1024  # dynamic shared memory a launch gets without opting in


def _dims(value):
    dims = tuple(int(v) for v in (value if isinstance(value, (tuple, list)) else (value,)))
    return dims + (1,) * (3 - len(dims)) if 1 <= len(dims) <= 3 else None


def _convert(name, param, value):
    """``value`` as the kernel parameter ``param`` takes it, or a TypeError/ValueError saying why not."""
    where = f"kernel {name}, argument {param.name}"
    if param.pointer:
        if value is None:
            if param.optional:
                return np.uint64(0)  # a null pointer
            raise TypeError(f"{where}: None given, but the kernel needs an array")
        import cupy

        if not isinstance(value, cupy.ndarray):
            kind = f"{type(value).__module__}.{type(value).__name__}"
            raise TypeError(f"{where}: expected a cupy.ndarray of {param.dtype.name}, got a {kind}")
        if value.dtype != param.dtype:
            raise TypeError(f"{where}: expected dtype {param.dtype.name}, got {value.dtype.name}")
        if not value.flags.c_contiguous:
            raise ValueError(f"{where}: the array must be C-contiguous (shape {value.shape}, "
                             f"strides {value.strides})")
        return value
    if isinstance(value, (bool, np.bool_)):
        value = int(value)
    if param.dtype.kind in "iu":
        if not isinstance(value, (int, np.integer)):
            raise TypeError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
        info = np.iinfo(param.dtype)
        if not info.min <= int(value) <= info.max:
            raise ValueError(f"{where}: {value} does not fit the kernel's {param.dtype.name}")
        return param.dtype.type(value)
    if not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
    return param.dtype.type(value)


def launch(name, grid, block, args, shared_mem=0):
    """Launch kernel ``name`` on the current CuPy stream, asynchronously.

    ``grid`` and ``block`` are ints or 1-3 tuples; ``args`` follow the kernel's parameters in order (see
    ``signature``): CuPy arrays for pointers (``None`` only for a parameter named ``*_or_null``), Python or
    NumPy numbers for scalars. Raises TypeError/ValueError for a wrong argument and ``KernelLaunchError``
    for a launch the configuration or the driver refuses, each naming the kernel.
    """
    params = signature(name)
    args = tuple(args)
    if len(args) != len(params):
        raise TypeError(f"kernel {name} takes {len(params)} arguments ({params}), got {len(args)}")
    converted = tuple(_convert(name, param, value) for param, value in zip(params, args))

    grid_dims, block_dims = _dims(grid), _dims(block)
    where = f"kernel {name} (grid {grid}, block {block}, shared_mem {shared_mem})"
    if grid_dims is None or any(not 1 <= g <= m for g, m in zip(grid_dims, _MAX_GRID)):
        raise KernelLaunchError(f"{where}: the grid must have 1-3 sizes within {_MAX_GRID}")
    if block_dims is None or any(not 1 <= b <= m for b, m in zip(block_dims, _MAX_BLOCK)) \
            or block_dims[0] * block_dims[1] * block_dims[2] > 1024:
        raise KernelLaunchError(f"{where}: the block must have 1-3 sizes within {_MAX_BLOCK}, "
                                "at most 1024 threads")
    if shared_mem < 0:
        raise KernelLaunchError(f"{where}: negative shared memory")

    from cupy_backends.cuda.api.driver import CUDADriverError
    from cupy_backends.cuda.api.runtime import CUDARuntimeError

    kernel = function(name)
    try:
        if shared_mem > _DEFAULT_SHARED:
            kernel.max_dynamic_shared_size_bytes = int(shared_mem)
        kernel(grid_dims, block_dims, converted, shared_mem=int(shared_mem))
    except (CUDADriverError, CUDARuntimeError) as exc:
        raise KernelLaunchError(f"{where} failed to launch: {exc}") from exc


# ===================================================================================== memory
def empty(shape, dtype=np.float32):
    """``cupy.empty(shape, dtype)``, with an out-of-memory error that says how much and what to do."""
    import cupy

    try:
        return cupy.empty(shape, dtype)
    except Exception as exc:
        # CuPy's memory pool raises OutOfMemoryError; without the pool (GPUCNN_NO_POOL=1 calls
        # cupy.cuda.set_allocator(None), tests/conftest.py) cudaMalloc's failure comes through untranslated,
        # as CUDARuntimeError cudaErrorMemoryAllocation (status 2).
        if not (isinstance(exc, cupy.cuda.memory.OutOfMemoryError)
                or (type(exc).__name__ == "CUDARuntimeError" and getattr(exc, "status", None) == 2)):
            raise
        size = int(np.prod(shape, dtype=np.float64)) * np.dtype(dtype).itemsize
        raise DeviceOutOfMemoryError(
            f"the GPU ran out of memory allocating an array of shape {tuple(shape)} "
            f"({size / 2**20:,.1f} MiB): {exc}. Try a smaller batch_size (or a smaller model).") from exc
