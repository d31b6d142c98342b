"""Install CuPy into the venv when this machine has an NVIDIA driver and CuPy is missing.

Best effort: on failure (no network, unusual driver) gpucnn simply runs on its NumPy engine.
"""
import shutil
import subprocess
import sys


def main():
    try:
        import cupy  # noqa: F401
        return 0
    except Exception:
        pass
    smi = shutil.which("nvidia-smi")
    if not smi:
        return 0
    try:
        out = subprocess.run([smi], capture_output=True, text=True, timeout=30).stdout
        major = int(out.split("CUDA Version:")[1].split(".")[0])
    except Exception:
        print("gpucnn setup: nvidia-smi did not report a CUDA version; staying on NumPy")
        return 0
    extra = "cuda13" if major >= 13 else "cuda12" if major == 12 else None
    if extra is None:
        print(f"gpucnn setup: CUDA {major} is too old for CuPy; staying on NumPy")
        return 0
    package = {"cuda12": "cupy-cuda12x", "cuda13": "cupy-cuda13x"}[extra]
    print(f"gpucnn setup: NVIDIA driver with CUDA {major} found; installing {package}")
    result = subprocess.run([sys.executable, "-m", "pip", "install", "-q", package])
    if result.returncode:
        print(f"gpucnn setup: could not install {package}; gpucnn will use its NumPy engine")
    return 0


if __name__ == "__main__":
    sys.exit(main())
