"""Choosing the engine: import never fails or prints; auto falls back with one notice; gpu explains."""
import subprocess
import sys

import pytest

from gpucnn import backend


def run(code, **env):
    import os
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_import_is_silent_and_does_not_touch_cupy():
    r = run("import sys, gpucnn; print('cupy' in sys.modules)")
    assert r.returncode == 0 and r.stdout.strip() == "False" and r.stderr == ""


def test_cpu_is_silent():
    r = run("import gpucnn; print(gpucnn.backend.engine())", GPUCNN_DEVICE="cpu")
    assert r.stdout.strip() == "numpy" and r.stderr == ""


@pytest.mark.skipif(backend.gpu_status()[0], reason="a GPU is usable here")
def test_auto_without_gpu_falls_back_with_one_notice():
    r = run("import gpucnn; print(gpucnn.backend.engine()); gpucnn.backend.ops(); "
            "print(gpucnn.backend.engine())", GPUCNN_DEVICE="auto")
    assert r.stdout.split() == ["numpy", "numpy"]
    assert r.stderr.count("no usable GPU") == 1 and "NumPy engine" in r.stderr


@pytest.mark.skipif(backend.gpu_status()[0], reason="a GPU is usable here")
def test_gpu_without_gpu_is_a_clear_error_keeping_the_reason():
    with pytest.raises(backend.GPUUnavailableError, match="GPU engine was requested but is not usable") as e:
        backend._resolve("gpu")
    assert backend.gpu_status()[1] in str(e.value)


def test_cupy_missing_is_reported_not_raised(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy → ImportError
    monkeypatch.setattr(backend, "_gpu_probe", {})
    usable, reason = backend.gpu_status()
    assert not usable and ("ImportError" in reason or "ModuleNotFoundError" in reason)


def test_unknown_choice():
    with pytest.raises(ValueError, match="auto.*gpu.*cpu"):
        backend.set_engine("tpu")
