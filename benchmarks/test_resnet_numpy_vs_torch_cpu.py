"""A CIFAR-10-sized residual convnet with BatchNormalization on the CPU: gpucnn's NumPy engine vs PyTorch's CPU
build, time per training step, measured in the same run on the same machine. Target: gpucnn's step no slower
than PyTorch's (ratio <= 1.0); the seed model's ratio (test_numpy_vs_torch_cpu.py's last result) is reported
beside it.

    pytest benchmarks/test_resnet_numpy_vs_torch_cpu.py --benchmark-only          (make bench runs it too)

The model, the same in both: 32x32x3 inputs; a stem Conv2D(16, 3) → BatchNormalization → ReLU; three stages
(16, 32, 64 filters) of two residual blocks, each Conv2D(3) → BN → ReLU → Conv2D(3) → BN, added to the block's
input (through a strided 1x1 Conv2D + BN where the stage halves the image and widens it), then ReLU;
GlobalAveragePooling2D → Dense(10, softmax). No convolution before a BN has a bias. SGD with momentum 0.9,
batch 128, PyTorch's BatchNorm2d set to Keras's momentum and epsilon. Random CIFAR-shaped data (nothing is
downloaded; the time of a step does not depend on the values).

As in the seed benchmark, each measurement runs in a fresh process (``python <this file> gpucnn|torch`` prints
its numbers as JSON) and the configurations take turns, round after round; the median step over the rounds is
reported. Each child first checks what it times: the parameter count, and a finite loss.

Writes benchmarks/results/resnet-numpy-vs-torch-cpu.json.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bench_utils import QUICK, read_result, write_result

BATCH = 128
STAGES = (16, 32, 64)
WARMUP_STEPS = 2
STEPS = 4 if QUICK else 10  # timed steps per child
ROUNDS = 1 if QUICK else 3
ROOT = Path(__file__).resolve().parent.parent
# Keras's parameter count of this model (a fact from keras.Model.count_params(), 3 stages of 2 blocks):
# trainable and non-trainable (BatchNormalization's moving statistics) together.
PARAMS_KERAS = 176_378


def _data(steps):
    rng = np.random.default_rng(0)
    x = rng.random((steps * BATCH, 32, 32, 3), dtype=np.float32)
    y = rng.integers(0, 10, steps * BATCH)
    return x, y


# ===================================================================================== the two models
def gpucnn_model():
    import gpucnn as keras
    from gpucnn import layers as L

    def bn_relu(x):
        return L.Activation("relu")(L.BatchNormalization()(x))

    inputs = keras.Input(shape=(32, 32, 3))
    x = bn_relu(L.Conv2D(STAGES[0], 3, padding="same", use_bias=False)(inputs))
    for stage, filters in enumerate(STAGES):
        for block in range(2):
            strides = 2 if stage > 0 and block == 0 else 1
            shortcut = x
            y = bn_relu(L.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False)(x))
            y = L.BatchNormalization()(L.Conv2D(filters, 3, padding="same", use_bias=False)(y))
            if strides != 1:
                shortcut = L.BatchNormalization()(L.Conv2D(filters, 1, strides=2, use_bias=False)(x))
            x = L.Activation("relu")(L.Add()([shortcut, y]))
    outputs = L.Dense(10, activation="softmax")(L.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, outputs)


def torch_model():
    import torch
    nn = torch.nn

    def bn(c):  # Keras's BatchNormalization: moving = 0.99 moving + 0.01 batch, epsilon 1e-3
        return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)

    class Block(nn.Module):
        def __init__(self, c_in, c_out, stride):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), bn(c_out), nn.ReLU(),
                                      nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), bn(c_out))
            self.shortcut = nn.Identity() if stride == 1 else nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), bn(c_out))

        def forward(self, x):
            return torch.relu(self.body(x) + self.shortcut(x))

    blocks, c_in = [nn.Conv2d(3, STAGES[0], 3, 1, 1, bias=False), bn(STAGES[0]), nn.ReLU()], STAGES[0]
    for stage, filters in enumerate(STAGES):
        for block in range(2):
            blocks.append(Block(c_in, filters, 2 if stage > 0 and block == 0 else 1))
            c_in = filters
    blocks += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, 10)]
    return nn.Sequential(*blocks)


# ===================================================================================== one measurement, in a child
def gpucnn_steps():
    from gpucnn import backend, optimizers, utils
    backend.set_engine("cpu")
    utils.set_random_seed(0)
    model = gpucnn_model()
    model.compile(optimizers.SGD(0.01, momentum=0.9), "sparse_categorical_crossentropy")
    x, y = _data(WARMUP_STEPS + STEPS)
    warm = WARMUP_STEPS * BATCH
    model.fit(x[:warm], y[:warm], batch_size=BATCH, verbose=0, shuffle=False)
    start = time.perf_counter()
    history = model.fit(x[warm:], y[warm:], batch_size=BATCH, verbose=0, shuffle=False)
    seconds = time.perf_counter() - start
    return seconds / STEPS, model.count_params(), history.history["loss"][-1]


def torch_steps():
    import torch
    torch.manual_seed(0)
    model = torch_model().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    x, y = _data(WARMUP_STEPS + STEPS)
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).contiguous(memory_format=torch.channels_last)
    yt = torch.from_numpy(y)

    def run(first, count):
        total = 0.0
        for k in range(first, first + count):
            opt.zero_grad()
            loss = loss_fn(model(xt[k * BATCH:(k + 1) * BATCH]), yt[k * BATCH:(k + 1) * BATCH])
            loss.backward()
            opt.step()
            total += loss.item()
        return total / count

    run(0, WARMUP_STEPS)
    start = time.perf_counter()
    loss = run(WARMUP_STEPS, STEPS)
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters()) + sum(b.numel() for name, b in model.named_buffers()
                                                              if not name.endswith("num_batches_tracked"))
    return seconds / STEPS, params, loss


def child(who):
    seconds, params, loss = (gpucnn_steps if who == "gpucnn" else torch_steps)()
    print(json.dumps({"step_seconds": seconds, "params": params, "loss": loss}))


# ===================================================================================== the benchmark
def run_child(who):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, __file__, who], env=env, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"the {who} steps failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_residual_convnet_step(benchmark):
    pytest.importorskip("torch")
    runs = {"torch_cpu": [], "gpucnn_numpy": []}
    who = {"torch_cpu": "torch", "gpucnn_numpy": "gpucnn"}

    def session():
        for _ in range(ROUNDS):  # the configurations take turns
            for name in runs:
                runs[name].append(run_child(who[name]))

    benchmark.pedantic(session, rounds=1, iterations=1)
    results = {}
    for name, runs_of in runs.items():
        seconds = sorted(r["step_seconds"] for r in runs_of)
        last = runs_of[-1]
        # what was timed is this model, training: the parameter count the model has in Keras (the PyTorch
        # count includes its BatchNorm2d running statistics, as Keras's includes its moving statistics)
        assert last["params"] == PARAMS_KERAS, (name, last["params"])
        assert np.isfinite(last["loss"]), (name, last["loss"])
        results[name] = {"step_seconds": round(seconds[len(seconds) // 2], 4),
                         "all_step_seconds": [round(s, 4) for s in seconds], "last_loss": round(last["loss"], 4)}
    ratio = results["gpucnn_numpy"]["step_seconds"] / results["torch_cpu"]["step_seconds"]
    results["gpucnn_numpy"].update(ratio_over_torch=round(ratio, 3), target_met=ratio <= 1.0)
    seed = read_result("numpy-vs-torch-cpu") or {}
    results["seed_model_ratio_over_torch"] = seed.get("gpucnn_numpy", {}).get("ratio_over_torch")
    benchmark.extra_info.update(results)
    write_result("resnet-numpy-vs-torch-cpu", {
        "what": f"one training step (SGD, momentum 0.9) of a CIFAR-10-sized residual convnet with BatchNormalization "
                f"(3 stages of 2 residual blocks, 32x32x3, batch {BATCH}, {PARAMS_KERAS:,} parameters); each "
                f"measurement in its own process, the configurations in turn; median of {ROUNDS} x {STEPS} steps",
        "target": "gpucnn NumPy step <= PyTorch CPU step (ratio_over_torch <= 1)",
        **results})


if __name__ == "__main__":
    child(sys.argv[1])
