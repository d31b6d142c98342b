"""Choosing the engine: import never fails or prints; auto falls back with one notice; gpu explains."""
import subprocess
import sys

import numpy as np
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


def test_lists_of_device_arrays_are_read_as_their_values(monkeypatch):
    """predict / fit / keras.ops / a schedule's value given device (CuPy) arrays inside a list: each item is copied
    to the host (NumPy's asarray of a list of CuPy arrays raises, as CuPy refuses implicit conversions). A
    stand-in device array (the emulator's are NumPy subclasses, which NumPy converts anyway)."""
    import gpucnn as keras
    from gpucnn import backend

    class Device:
        __module__ = "cupy._core.core"

        def __init__(self, values):
            self.values = np.asarray(values)

        def get(self):
            return self.values.copy()

        def __array__(self, *args, **kwargs):
            raise TypeError("Implicit conversion to a NumPy array is not allowed")

    rows = np.arange(6, dtype=np.float32).reshape(3, 2)
    assert keras.ops.convert_to_numpy([Device(r) for r in rows]).tolist() == rows.tolist()
    assert keras.ops.sigmoid([Device(r) for r in rows]).shape == (3, 2)
    assert np.asarray(backend.to_numpy([[Device(rows[0])], [Device(rows[1])]])).shape == (2, 1, 2)
    assert backend.to_numpy([[Device(np.float32(1)), 2.0], [3.0, 4.0]]) == [[1.0, 2.0], [3.0, 4.0]]
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, activation="softmax")])
    model.compile("sgd", "sparse_categorical_crossentropy")
    np.testing.assert_allclose(model.predict([Device(r) for r in rows], verbose=0), model.predict(rows, verbose=0))
    model.fit([Device(r) for r in rows], [Device(1), Device(0), Device(1)], epochs=1, verbose=0)
    from gpucnn.callbacks import LearningRateScheduler
    scheduler = LearningRateScheduler(lambda epoch: Device(np.float32(0.25)))
    scheduler.set_model(model)
    scheduler.on_epoch_begin(0)
    assert float(model.optimizer.learning_rate) == 0.25
