"""The CUDA kernels checked without a GPU: every ``kernels/*.cu`` file compiled with NVRTC for sm_80 and
sm_90, exactly as gpucnn/engines/cuda_loader.py compiles it (``kernel_source`` and ``COMPILE_OPTIONS``), then ptxas'
report read: no spills and no local memory in any kernel. Also checked statically: the launcher's view of
the kernels (signatures, launched names, constants) and that ops_cuda.py mirrors ops_numpy.py.

The NVRTC tests skip, with the reason, where ``cuda-bindings`` / ``nvidia-cuda-nvrtc`` are not installed.
``PYTHONPATH=. python tests/test_kernels_compile.py`` prints the register and spill table.
"""
import ast
import functools
import inspect
import pathlib
import re
import subprocess
import sys

import pytest

from conftest import skip_kernel_check
from gpucnn.engines import cuda_loader as cuda, numpy_ops as ops_numpy

ARCHS = ("sm_80", "sm_90")
ROOT = pathlib.Path(__file__).resolve().parent.parent
FILES = cuda.kernel_files()


def _nvrtc():
    """The NVRTC bindings, or a skip saying why they cannot be used."""
    try:
        from cuda.bindings import nvrtc

        err, _, _ = nvrtc.nvrtcVersion()  # loads libnvrtc
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise RuntimeError(f"nvrtcVersion returned {err}")
    except Exception as exc:  # ImportError, or the library failing to load (its type varies by version)
        skip_kernel_check(f"NVRTC is not usable ({type(exc).__name__}: {exc}); "
                    "pip install cuda-bindings nvidia-cuda-nvrtc")
    return nvrtc


@functools.lru_cache(maxsize=None)
def compile_file(filename, arch, inline_header=True):
    """(ok, log, cubin bytes) of one kernel file compiled to a cubin for ``arch``: by default as the library
    compiles it; with ``inline_header=False`` the raw file with ``-I kernels/`` instead."""
    nvrtc = _nvrtc()
    options = cuda.COMPILE_OPTIONS + (f"--gpu-architecture={arch}", "--ptxas-options=-v")
    if inline_header:
        source = cuda.kernel_source(filename)
    else:
        folder = pathlib.Path(str(cuda.kernel_dir().joinpath(cuda.HEADER))).parent  # a real folder
        source = (folder / filename).read_text(encoding="utf-8")
        options += (f"-I{folder}",)
    err, prog = nvrtc.nvrtcCreateProgram(source.encode(), filename.encode(), 0, [], [])
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS, err
    try:
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(options), [o.encode() for o in options])
        _, size = nvrtc.nvrtcGetProgramLogSize(prog)
        log = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, log)
        cubin = b""
        if err == nvrtc.nvrtcResult.NVRTC_SUCCESS:
            _, size = nvrtc.nvrtcGetCUBINSize(prog)
            cubin = b" " * size
            nvrtc.nvrtcGetCUBIN(prog, cubin)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    return err == nvrtc.nvrtcResult.NVRTC_SUCCESS, log.decode(errors="replace").rstrip("\x00 \n"), cubin


_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(\w+)'(.*?)(?=Compiling entry function|\Z)", re.S)


def ptxas_report(log):
    """``{kernel: {"registers", "stack", "spill_stores", "spill_loads"}}`` from a ``ptxas -v`` log."""
    report = {}
    for name, _, block in _ENTRY.findall(log):
        frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", block)
        regs = re.search(r"Used (\d+) registers", block)
        assert frame and regs, f"unexpected ptxas report for {name}:\n{block}"
        report[name] = {"registers": int(regs.group(1)), "stack": int(frame.group(1)),
                        "spill_stores": int(frame.group(2)), "spill_loads": int(frame.group(3))}
    return report


def _problems(log):
    """Log lines other than ptxas' informational report: warnings and errors."""
    return [line for line in log.splitlines()
            if line.strip() and not line.startswith("ptxas info") and not line.startswith("ptxas         .")]


# ===================================================================================== compiling
def test_there_are_kernel_files():
    assert {"activations.cu", "conv2d.cu", "dense.cu", "loss.cu", "optimizers.cu", "pool2d.cu", "train_step.cu",
            "conv_pool.cu", "batchnorm.cu", "depthwise_conv2d.cu", "zero_padding.cu"} <= set(FILES)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("filename", FILES)
def test_kernel_file_compiles_without_warnings(filename, arch):
    ok, log, cubin = compile_file(filename, arch)
    assert ok, f"NVRTC failed on {filename} for {arch}:\n{log}"
    assert cubin, f"no cubin for {filename}"
    assert not _problems(log), f"NVRTC warnings for {filename} ({arch}):\n{log}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("filename", FILES)
def test_no_spills_and_no_local_memory(filename, arch):
    ok, log, _ = compile_file(filename, arch)
    assert ok, log
    report = ptxas_report(log)
    kernels = cuda.parse_kernels(cuda.kernel_source(filename))
    assert set(report) == set(kernels), "ptxas and the launcher see different kernels"
    for name, r in report.items():
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"{name} ({arch}) spills: {r}"
        assert r["stack"] == 0, f"{name} ({arch}) uses local memory: {r}"
        assert r["registers"] <= 255, r


def test_ptxas_report_is_read():
    log = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'a' for 'sm_90'
ptxas info    : Function properties for a
ptxas         .     16 bytes stack frame, 24 bytes spill stores, 56 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers, 16 bytes cumulative stack size
ptxas info    : Compiling entry function 'b' for 'sm_90'
ptxas info    : Function properties for b
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 60 registers, used 1 barriers, 8192 bytes smem"""
    assert ptxas_report(log) == {
        "a": {"registers": 32, "stack": 16, "spill_stores": 24, "spill_loads": 56},
        "b": {"registers": 60, "stack": 0, "spill_stores": 0, "spill_loads": 0}}
    assert not _problems(log)
    assert _problems(log + "\nkernel.cu(3): warning #177-D: variable x was declared but never referenced")


@pytest.mark.parametrize("filename", FILES)
def test_each_file_compiles_on_its_own_with_the_include_path(filename):
    ok, log, _ = compile_file(filename, "sm_90", inline_header=False)
    assert ok, f"{filename} does not compile with -I kernels/:\n{log}"
    assert not _problems(log), log


# ===================================================================================== sources and launcher
def test_kernel_source_pastes_the_header_once():
    for filename in FILES:
        raw = cuda.kernel_dir().joinpath(filename).read_text(encoding="utf-8")
        assert raw.count('#include "common.cuh"') == 1, filename
        source = cuda.kernel_source(filename)
        assert not re.search(r"^\s*#\s*include", source, re.M)  # nothing left for NVRTC to look up
        assert source.count("#define GPUCNN_COMMON_CUH") == 1
        assert "#line" in source and filename in source


def test_each_file_opens_with_what_it_computes():
    for filename in FILES:
        raw = cuda.kernel_dir().joinpath(filename).read_text(encoding="utf-8")
        assert raw.startswith(f"// {filename} — "), filename
        assert re.search(r"^//\s+\w+\s+is \(", raw, re.M), f"{filename}: no '// x is (...)' layout line"
        for name in cuda.parse_kernels(raw):
            family = name.rsplit("_", 1)[0]  # loss.cu lists "crossentropy_forward_{onehot,sparse}"
            listed = re.search(rf"^//\s+({name}\b|{family}_\{{)", raw, re.M)
            assert listed, f"{filename}: kernel {name} is not listed in the header comment"


def test_no_atomics_anywhere():
    # determinism by construction: gathers and fixed-order reductions only
    for filename in FILES + [cuda.HEADER]:
        text = cuda.kernel_dir().joinpath(filename).read_text(encoding="utf-8")
        assert "atomic" not in re.sub(r"//[^\n]*", "", text), filename


def test_signatures_are_unique_and_typed():
    table = cuda._kernel_table()
    assert len(table) >= 20
    for name, (filename, params) in table.items():
        assert params, name
        assert all(p.dtype.kind in "fiu" for p in params), (name, params)


def test_epsilon_agrees_with_the_numpy_engine():
    loss = cuda.kernel_dir().joinpath("loss.cu").read_text(encoding="utf-8")
    value = re.search(r"#define EPSILON ([0-9.e+-]+)f", loss).group(1)
    assert float(value) == ops_numpy.EPSILON


def _launched_kernels(module="engines/cuda_ops.py"):
    """Kernel names that gpucnn/<module> passes to cuda.launch (directly, or through _loss_kernel): calls of
    ``cuda.launch``, ``self.cuda.launch`` or a local alias named ``launch`` (not a CUDA graph's launch)."""
    tree = ast.parse((ROOT / "gpucnn" / module).read_text(encoding="utf-8"))
    names = set()

    def is_kernel_launch(func):
        if isinstance(func, ast.Name):
            return func.id == "launch"
        if not (isinstance(func, ast.Attribute) and func.attr == "launch"):
            return False
        owner = func.value
        return getattr(owner, "id", None) == "cuda" or getattr(owner, "attr", None) == "cuda"

    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args and is_kernel_launch(node.func):
            first = node.args[0]
            if isinstance(first, ast.Constant):
                names.add(first.value)
            elif isinstance(first, ast.Call) and getattr(first.func, "id", "") == "_loss_kernel":
                names |= {f"{first.args[0].value}_sparse", f"{first.args[0].value}_onehot"}
            else:
                raise AssertionError(f"cannot read the kernel name at line {node.lineno}")
    return names


def test_every_kernel_is_launched_and_only_existing_ones():
    # ops_cuda.py launches the engine's kernels (conv_pool.cu's too: ops.conv2d_maxpool_*); gpucnn/models/fastpath.py
    # those of train_step.cu, which only the captured training step uses
    by_ops, by_fastpath = _launched_kernels(), _launched_kernels("models/fastpath.py")
    assert by_ops | by_fastpath == set(cuda._kernel_table())
    step_files = {"train_step.cu"}
    assert {n for n, (f, _) in cuda._kernel_table().items() if f in step_files} == by_fastpath - by_ops


def test_scalar_arguments_are_converted_and_range_checked():
    params = {p.name: p for p in cuda.signature("conv2d_backward_filter_reduce")}
    assert cuda._convert("k", params["RF"], 2**40).dtype.name == "int64"
    assert cuda._convert("k", params["F"], True) == 1
    with pytest.raises(ValueError, match="F.*int32"):
        cuda._convert("k", params["F"], 2**31)
    with pytest.raises(TypeError, match="integer"):
        cuda._convert("k", params["S"], 1.5)
    rate = {p.name: p for p in cuda.signature("dropout_forward")}
    assert cuda._convert("k", rate["rate"], 0.25).dtype.name == "float32"
    seed = {p.name: p for p in cuda.signature("permutation_keys")}["seed"]
    assert cuda._convert("k", seed, 2**64 - 1).dtype.name == "uint64"
    with pytest.raises(TypeError, match="None"):
        cuda._convert("k", rate["x"], None)
    assert cuda._convert("k", {p.name: p for p in cuda.signature("dense_forward")}["b_or_null"], None) == 0


def test_importing_the_loader_needs_no_cupy():
    code = ("import sys; sys.modules['cupy'] = None; import gpucnn.engines.cuda_loader as c; "
            "print(len(c.kernel_files()), c.COMPILE_OPTIONS)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


# ===================================================================================== the two engines mirror
def _functions_by_ast(path):
    """[(name, parameters)] of the public functions defined in a module, in order, and the names it
    imports from ops_numpy."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    defined, imported = [], set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            a = node.args
            params = [(x.arg, "positional") for x in a.posonlyargs + a.args]
            params += [(x.arg, "keyword") for x in a.kwonlyargs]
            defaults = [ast.unparse(d) for d in a.defaults] + [ast.unparse(d) for d in a.kw_defaults if d]
            defined.append((node.name, params, defaults, a.vararg is None and a.kwarg is None))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").endswith("numpy_ops"):
            imported |= {alias.name for alias in node.names}
    return defined, imported


def test_ops_cuda_mirrors_ops_numpy():
    numpy_funcs, _ = _functions_by_ast(ROOT / "gpucnn" / "engines" / "numpy_ops.py")
    cuda_funcs, shared = _functions_by_ast(ROOT / "gpucnn" / "engines" / "cuda_ops.py")
    expected = [f for f in numpy_funcs if f[0] not in shared]
    assert [f[0] for f in cuda_funcs] == [f[0] for f in expected]  # same names, same order
    for got, want in zip(cuda_funcs, expected):
        assert got == want, f"{got[0]}: parameters differ"
    tree = ast.parse((ROOT / "gpucnn" / "engines" / "cuda_ops.py").read_text(encoding="utf-8"))
    assigned = {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
                if isinstance(t, ast.Name)}
    assert {"xp", "DTYPE", "EPSILON"} <= assigned


def test_ops_cuda_signatures_at_runtime():
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed: checked through ast above")
    del cupy
    from gpucnn.engines import cuda_ops as ops_cuda

    def public(module):
        return [n for n, f in vars(module).items()
                if inspect.isfunction(f) and not n.startswith("_") and f.__module__ == module.__name__]

    shared = [n for n in public(ops_numpy) if getattr(ops_cuda, n, None) is getattr(ops_numpy, n)]
    assert public(ops_cuda) == [n for n in public(ops_numpy) if n not in shared]
    for name in public(ops_cuda):
        assert inspect.signature(getattr(ops_cuda, name)) == inspect.signature(getattr(ops_numpy, name)), name
    assert ops_cuda.EPSILON == ops_numpy.EPSILON and ops_cuda.DTYPE is ops_numpy.DTYPE


if __name__ == "__main__":
    print(f"{'kernel':38} {'arch':6} {'regs':>4} {'stack':>5} {'spill st':>8} {'spill ld':>8}")
    for filename in FILES:
        for arch in ARCHS:
            ok, log, _ = compile_file(filename, arch)
            if not ok:
                print(f"{filename} ({arch}) FAILED:\n{log}")
                continue
            for name, r in sorted(ptxas_report(log).items()):
                print(f"{name:38} {arch:6} {r['registers']:4} {r['stack']:5} {r['spill_stores']:8} "
                      f"{r['spill_loads']:8}")
