"""One epoch of the seed model at batch 64 on the CPU: gpucnn's NumPy engine vs PyTorch's CPU build,
measured in the same run on the same machine. Target: gpucnn's epoch no slower than PyTorch's, whether the
model is written as a Sequential or with the functional API (and the functional one within 2 % of the other).

    make bench                      (installs the CPU build of PyTorch when it can)
    pytest benchmarks/test_numpy_vs_torch_cpu.py --benchmark-only

Each epoch runs in a fresh process (``python benchmarks/test_numpy_vs_torch_cpu.py gpucnn|torch`` prints one
epoch's numbers as JSON), and the configurations take turns, round after round, so that a slow stretch of a
shared machine falls on all of them; the median of ``ROUNDS`` epochs is reported.

NumPy's matrix products run on the OpenBLAS kernels OpenBLAS picks for the CPU when the process starts, unless
the environment variable ``OPENBLAS_CORETYPE`` names others. When it is set, gpucnn is measured both ways:
``gpucnn_numpy`` with the environment as it is, ``gpucnn_numpy_openblas_default`` without that variable (what a
machine without the setting runs). PyTorch's CPU build does not use OpenBLAS (oneDNN and MKL), so it is measured
once. Each result names the kernels its process ran.

Writes benchmarks/results/numpy-vs-torch-cpu.json.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench_utils import take_turns, write_result

BATCH = 64
ROUNDS = 3  # this machine's epoch times vary by ±15 % from run to run: report the median of three
ROOT = Path(__file__).resolve().parent.parent


# ===================================================================================== one epoch, in a child
def _mnist():
    from gpucnn.cli import load_mnist
    (x, y), _ = load_mnist()
    return x, y


def gpucnn_epoch(functional=False):
    from gpucnn import backend, utils
    from gpucnn.examples import seed_model, seed_model_functional
    x, y = _mnist()
    backend.set_engine("cpu")
    utils.set_random_seed(0)
    model = seed_model_functional() if functional else seed_model()
    model.compile("rmsprop", "categorical_crossentropy", ["accuracy"])
    model.fit(x[:BATCH * 4], y[:BATCH * 4], batch_size=BATCH, verbose=0)  # warm-up
    start = time.perf_counter()
    history = model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    return time.perf_counter() - start, history.history["accuracy"][-1]


def torch_epoch():
    import numpy as np
    import torch
    x, y = _mnist()
    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3), nn.ReLU(), nn.Flatten(),
        nn.Linear(576, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-3, alpha=0.9, eps=1e-7)
    loss_fn = nn.CrossEntropyLoss()
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    yt = torch.from_numpy(y.argmax(1))

    def run(n):
        order = torch.randperm(n)
        correct = 0
        for i in range(0, n, BATCH):
            idx = order[i:i + BATCH]
            opt.zero_grad()
            logits = model(xt[idx])
            loss = loss_fn(logits, yt[idx])
            loss.backward()
            opt.step()
            correct += int((logits.argmax(1) == yt[idx]).sum())
        return correct / n

    run(BATCH * 4)  # warm-up
    start = time.perf_counter()
    accuracy = run(len(xt))
    return time.perf_counter() - start, accuracy


def openblas_kernels():
    """The kernel set ("Haswell", "SkylakeX", ...) of the OpenBLAS loaded in this process, or None."""
    import ctypes

    from gpucnn.models.parallel import openblas_function
    corename = openblas_function("get_corename", ctypes.c_char_p)
    return None if corename is None else corename().decode()


def child(who):
    run = {"gpucnn": gpucnn_epoch, "gpucnn_functional": lambda: gpucnn_epoch(functional=True),
           "torch": torch_epoch}[who]
    seconds, accuracy = run()
    print(json.dumps({"epoch_seconds": seconds, "train_accuracy": accuracy, "openblas": openblas_kernels(),
                      "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE")}))


# ===================================================================================== the benchmark
def configurations():
    """(name, who, environment) of each configuration measured here."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    configs = [("torch_cpu", "torch", env), ("gpucnn_numpy", "gpucnn", env),
               ("gpucnn_numpy_functional", "gpucnn_functional", env)]
    if "OPENBLAS_CORETYPE" in env:
        configs.append(("gpucnn_numpy_openblas_default", "gpucnn",
                        {k: v for k, v in env.items() if k != "OPENBLAS_CORETYPE"}))
    return configs


def run_child(who, env):
    out = subprocess.run([sys.executable, __file__, who], env=env, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"the {who} epoch failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_epoch(benchmark, mnist_train):  # mnist_train: the data is cached before the children start
    pytest.importorskip("torch")
    configs = configurations()
    runs = {}
    benchmark.pedantic(lambda: runs.update(take_turns(configs, ROUNDS, run_child)), rounds=1, iterations=1)
    results = {}
    for name, runs_of in runs.items():
        seconds = sorted(r["epoch_seconds"] for r in runs_of)
        results[name] = {"epoch_seconds": round(seconds[len(seconds) // 2], 2),
                         "all_epoch_seconds": [round(s, 2) for s in seconds],
                         "train_accuracy": round(runs_of[-1]["train_accuracy"], 4),
                         "openblas_kernels": runs_of[-1]["openblas"],
                         "OPENBLAS_CORETYPE": runs_of[-1]["OPENBLAS_CORETYPE"]}
        assert results[name]["train_accuracy"] > 0.9  # a real epoch of learning, not an empty loop
    torch_seconds = results["torch_cpu"]["epoch_seconds"]
    for name in results:
        if name.startswith("gpucnn"):
            ratio = results[name]["epoch_seconds"] / torch_seconds
            results[name].update(ratio_over_torch=round(ratio, 3), target_met=ratio <= 1.0)
    functional = results["gpucnn_numpy_functional"]["epoch_seconds"] / results["gpucnn_numpy"]["epoch_seconds"]
    results["functional_over_sequential"] = {"ratio": round(functional, 3), "target_met": functional <= 1.02}
    benchmark.extra_info.update(results)
    write_result("numpy-vs-torch-cpu", {
        "what": f"one epoch of the seed model, 60,000 MNIST images, batch 64, RMSprop; each epoch in its own "
                f"process, the configurations in turn; median of {ROUNDS}",
        "target": "gpucnn NumPy epoch <= PyTorch CPU epoch (ratio_over_torch <= 1), Sequential or functional; the "
                  "functional model at most 2 % slower than the Sequential one",
        **results})


if __name__ == "__main__":
    child(sys.argv[1])
