"""Shared pieces of the benchmark suite: what machine (and GPU) this is, where results go, and the switches.

Switches (environment variables):
  GPUCNN_BENCH_QUICK=1   fewer repetitions, batches and points (what ``make gpu-check`` runs by default)
  GPUCNN_COMMIT=<id>     the commit to record when ``git`` cannot tell (a copy of the tree without .git)
  GPUCNN_HOME=<dir>      where the MNIST cache is read: <dir>/datasets/mnist.npz (default ~/.gpucnn)
"""
import datetime
import json
import os
import platform
import shutil
import subprocess
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
QUICK = os.environ.get("GPUCNN_BENCH_QUICK", "").strip().lower() not in ("", "0", "no", "false")

# Datasheet peaks (FP32 on the CUDA cores, without sparsity; HBM bandwidth), keyed by a piece of the name
# the driver reports. The first match wins, so the more specific names come first. Not measurements.
_PEAKS = [
    ("H100 PCIe", "PCIe", 51.2, 2.0),
    ("H100 NVL", "NVL (PCIe)", 60.0, 3.9),
    ("H100", "SXM", 66.9, 3.35),          # "NVIDIA H100 80GB HBM3" is the SXM5 board
    ("H200 NVL", "NVL (PCIe)", 60.0, 4.8),
    ("H200", "SXM", 66.9, 4.8),
    ("A100-PCIE", "PCIe", 19.5, 1.94),
    ("A100 80GB PCIe", "PCIe", 19.5, 1.94),
    ("A100", "SXM", 19.5, 2.04),
]
_FP32_LANES_PER_SM = {8: 64, 9: 128, 10: 128, 12: 128}  # by compute-capability major (8.6/8.9: 128)


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def commit():
    """``git describe --always --dirty`` of the checkout, else $GPUCNN_COMMIT, else None."""
    if os.environ.get("GPUCNN_COMMIT"):
        return os.environ["GPUCNN_COMMIT"]
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except Exception:
        return None


def machine_info():
    info = {"date": datetime.date.today().isoformat(), "commit": commit(), "cpu": cpu_name(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__}
    try:
        import torch
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        info["torch"] = None
    return info


def write_result(name, payload, device=False):
    """Write ``benchmarks/results/<name>.json`` with the machine's description beside the numbers
    (and, with ``device=True``, the GPU's: name, driver, CUDA runtime, CuPy, PyTorch, cuDNN)."""
    RESULTS.mkdir(exist_ok=True)
    data = {"machine": machine_info()}
    if device:
        data["device"] = gpu_info()
    data.update(payload)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    return data


def take_turns(configs, rounds, run_one):
    """{name: [the result of each round]} of the configurations ``(name, who, env)``, each run by
    ``run_one(who, env)`` in turn, round after round, so that a slow stretch of a shared machine falls on all."""
    runs = {name: [] for name, _, _ in configs}
    for _ in range(rounds):
        for name, who, env in configs:
            runs[name].append(run_one(who, env))
    return runs


def read_result(name):
    """The dict of ``benchmarks/results/<name>.json``, or None."""
    try:
        return json.loads((RESULTS / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None


# ===================================================================================== the GPU
def gpu_skip_reason():
    """None when gpucnn's CUDA engine is usable, else why not."""
    from gpucnn import backend
    usable, reason = backend.gpu_status()
    return None if usable else f"no usable GPU: {reason}"


def torch_cuda_skip_reason():
    """None when PyTorch with CUDA (and cuDNN) is importable and sees a device, else why not."""
    try:
        import torch
    except ImportError as exc:
        return f"PyTorch is not installed ({exc})"
    if not torch.cuda.is_available():
        return f"PyTorch {torch.__version__} sees no CUDA device"
    if not torch.backends.cudnn.is_available():
        return f"PyTorch {torch.__version__} has no cuDNN"
    return None


def _nvidia_smi(field):
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20).stdout.strip().splitlines()
        return out[0].strip() if out else None
    except Exception:
        return None


def _cuda_version(v):
    """CUDA's integer version (12080) as text ("12.8")."""
    return None if not v else f"{v // 1000}.{v % 1000 // 10}"


def gpu_info():
    """The device and the software stack: name, form factor and datasheet peaks, driver, CUDA runtime,
    CuPy, PyTorch and cuDNN versions. Fields that cannot be read are None."""
    info = {"name": None}
    try:
        import cupy
        rt = cupy.cuda.runtime
        props = rt.getDeviceProperties(0)
        name = props.get("name", b"")
        info.update(name=name.decode() if isinstance(name, bytes) else str(name), cupy=cupy.__version__,
                    compute_capability=f"{props.get('major')}.{props.get('minor')}",
                    multiprocessors=props.get("multiProcessorCount"),
                    memory_gib=round(props.get("totalGlobalMem", 0) / 2**30, 1),
                    l2_mib=round(props.get("l2CacheSize", 0) / 2**20, 1),
                    cuda_driver_api=_cuda_version(rt.driverGetVersion()),
                    cuda_runtime=_cuda_version(rt.runtimeGetVersion()))
        try:  # CUDA 13 dropped clockRate from the properties; the attribute remains
            khz = rt.deviceGetAttribute(rt.cudaDevAttrClockRate, 0)
        except Exception:
            khz = props.get("clockRate", 0)
        info["max_clock_mhz"] = khz // 1000 or None
        lanes = _FP32_LANES_PER_SM.get(props.get("major"))
        if lanes and info["max_clock_mhz"] and info["multiprocessors"]:
            info["fp32_tflops_from_clock"] = round(
                2 * lanes * info["multiprocessors"] * info["max_clock_mhz"] * 1e6 / 1e12, 1)
    except Exception as exc:  # no CuPy, no device: say so and keep going
        info["error"] = f"{type(exc).__name__}: {exc}"
    info["nvidia_smi_name"] = _nvidia_smi("name")
    info["driver"] = _nvidia_smi("driver_version")
    for key, form, tflops, tbs in _PEAKS:
        if key.lower() in (info["nvidia_smi_name"] or info["name"] or "").lower():
            info.update(form_factor=form, peak_fp32_tflops=tflops, peak_hbm_tbs=tbs, peaks_from="datasheet")
            break
    else:
        info.update(form_factor=None, peak_fp32_tflops=info.get("fp32_tflops_from_clock"), peak_hbm_tbs=None,
                    peaks_from="clock" if info.get("fp32_tflops_from_clock") else None)
    try:
        import torch
        info.update(torch=torch.__version__, torch_cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
    except ImportError:
        info.update(torch=None, torch_cuda=None, cudnn=None)
    return info


# ===================================================================================== MNIST
def mnist_cache():
    """Where ``gpucnn.cli.load_mnist()`` reads MNIST from: $GPUCNN_HOME/datasets/mnist.npz (or ~/.gpucnn)."""
    return Path(os.environ.get("GPUCNN_HOME") or "~/.gpucnn").expanduser() / "datasets" / "mnist.npz"


def mnist_skip_reason():
    """None when the MNIST cache is there; else why the benchmark cannot load it (no download attempted:
    the GPU machine has no network, and a download there would only time out)."""
    file = mnist_cache()
    if file.is_file():
        return None
    return (f"no MNIST cache at {file}: copy ~/.gpucnn/datasets/mnist.npz to <dir>/datasets/mnist.npz "
            "and set GPUCNN_HOME=<dir> (benchmarks/README.md)")

