"""Training throughput (images per second) of the seed-model architecture as the work grows, gpucnn against
PyTorch eager (cuDNN, FP32), same device, same process:

  * batch 64 -> 8192 at 28x28 (64, 256, 1024, 4096, 8192 with GPUCNN_BENCH_QUICK=1);
  * image side 28 -> 128 at batch 64 (28, 64, 128 quick), the same layers with input_shape changed (the
    dense layer's input grows with the image).

Data: random images and labels (throughput does not depend on the values; they are not zeros). Each point
trains ``steps`` steps per epoch. gpucnn: ``model.fit`` for 1 and then 3 epochs on a warmed model; the
steady epoch time is the difference over 2, which removes fit's fixed costs (checking x, copying it to
the device). PyTorch: the same loop as test_training_vs_torch (data on the GPU), mean of 2 timed epochs
after a warm-up.

Writes benchmarks/results/scaling.json after every point, and scaling.png (matplotlib, when installed)
at the end, through summarize.py.
"""
import time

import numpy as np
import pytest

from bench_utils import QUICK, gpu_skip_reason, torch_cuda_skip_reason, write_result

pytestmark = pytest.mark.gpu

_reason = gpu_skip_reason()
if _reason:
    pytest.skip(_reason, allow_module_level=True)

import cupy  # noqa: E402

from gpucnn import backend, layers, models, utils  # noqa: E402

BATCHES = (64, 256, 1024, 4096, 8192) if QUICK else (64, 128, 256, 512, 1024, 2048, 4096, 8192)
SIDES = (28, 64, 128) if QUICK else (28, 48, 64, 96, 128)
MIN_IMAGES = 4096 if QUICK else 16384  # per epoch: at least this many 28x28 images (fewer larger ones) ...
MIN_STEPS = 4 if QUICK else 8          # ... and at least this many steps
TORCH_DEVICE = "cuda"

_points = {"batch": {}, "image": {}}


def seed_architecture(side):
    """``gpucnn.cli.seed_model``'s layers for (side, side, 1) images."""
    return models.Sequential([
        layers.Conv2D(32, (3, 3), activation="relu", input_shape=(side, side, 1)),
        layers.MaxPooling2D((2, 2)),
        layers.Conv2D(64, (3, 3), activation="relu"),
        layers.MaxPooling2D((2, 2)),
        layers.Conv2D(64, (3, 3), activation="relu"),
        layers.Flatten(),
        layers.Dense(64, activation="relu"),
        layers.Dense(10, activation="softmax"),
    ])


def _data(side, batch):
    images = MIN_IMAGES * (28 / side) ** 2  # about the same work per epoch at every image size
    steps = max(MIN_STEPS, int(np.ceil(images / batch)))
    rng = np.random.default_rng(side * 100_000 + batch)
    x = rng.random((steps * batch, side, side, 1), dtype=np.float32)
    y = np.eye(10, dtype=np.float32)[rng.integers(0, 10, size=len(x))]
    return x, y, steps


def gpucnn_throughput(side, batch):
    backend.set_engine("gpu")
    utils.set_random_seed(0)
    x, y, steps = _data(side, batch)
    model = seed_architecture(side)
    model.compile("rmsprop", "categorical_crossentropy", ["accuracy"])
    model.fit(x[:batch * 2], y[:batch * 2], batch_size=batch, epochs=1, verbose=0, shuffle=False)  # warm-up
    seconds = []
    for epochs in (1, 3):
        cupy.cuda.Device().synchronize()
        start = time.perf_counter()
        model.fit(x, y, batch_size=batch, epochs=epochs, verbose=0)
        cupy.cuda.Device().synchronize()
        seconds.append(time.perf_counter() - start)
    epoch = (seconds[1] - seconds[0]) / 2
    if epoch <= 0:  # the fixed cost varied more than an epoch lasts: fall back to the whole call
        epoch = seconds[1] / 3
    return {"images_per_s": len(x) / epoch, "step_ms": 1e3 * epoch / steps, "steps": steps,
            "fit_1_epoch_s": round(seconds[0], 4), "fit_3_epochs_s": round(seconds[1], 4)}


def torch_throughput(side, batch):
    reason = torch_cuda_skip_reason()
    if reason:
        pytest.skip(reason)
    import torch

    from torch_peer import TorchTrainer, fp32_settings, to_device
    fp32_settings(torch)
    x, y, steps = _data(side, batch)
    xt, yt = to_device(torch, x, y, TORCH_DEVICE)
    trainer = TorchTrainer(torch, side=side, device=TORCH_DEVICE)
    trainer.train_steps(xt, yt, batch, torch.arange(batch * 2, device=TORCH_DEVICE))  # warm-up, cuDNN autotune
    seconds = [trainer.epoch(xt, yt, batch)[0] for _ in range(2)]
    epoch = sum(seconds) / len(seconds)
    return {"images_per_s": len(x) / epoch, "step_ms": 1e3 * epoch / steps, "steps": steps}


def _write():
    write_result("scaling", {
        "what": "training throughput (images/s) of the seed-model architecture, random data, FP32",
        "quick": QUICK, **_points}, device=True)


def _run(benchmark, axis, key, who, side, batch):
    fn = gpucnn_throughput if who == "gpucnn" else torch_throughput
    try:
        result = benchmark.pedantic(fn, args=(side, batch), rounds=1, iterations=1)
    except (MemoryError, RuntimeError) as exc:  # the device is full at this size: a result too
        if "out of memory" not in str(exc).lower() and not isinstance(exc, MemoryError):
            raise
        _points[axis].setdefault(who, {})[str(key)] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        _write()
        pytest.skip(f"out of memory at side {side}, batch {batch}")
    result["images_per_s"] = round(result["images_per_s"], 1)
    result["step_ms"] = round(result["step_ms"], 4)
    benchmark.extra_info.update(result)
    _points[axis].setdefault(who, {})[str(key)] = result
    _write()


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("who", ("gpucnn", "torch_eager"))
def test_throughput_vs_batch(benchmark, who, batch):
    _run(benchmark, "batch", batch, who, 28, batch)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("who", ("gpucnn", "torch_eager"))
def test_throughput_vs_image_size(benchmark, who, side):
    _run(benchmark, "image", side, who, side, 64)


def teardown_module():
    try:
        import summarize
        summarize.plot_scaling()
    except Exception as exc:  # a plot is a convenience: never fail the benchmark for it
        print(f"no scaling plot: {type(exc).__name__}: {exc}")
