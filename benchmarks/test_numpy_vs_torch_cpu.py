"""One epoch of the seed model at batch 64 on the CPU: gpucnn's NumPy engine vs PyTorch's CPU build,
measured in the same run on the same machine. Target: gpucnn's epoch no slower than PyTorch's.

    make bench                      (installs the CPU build of PyTorch when it can)
    pytest benchmarks/test_numpy_vs_torch_cpu.py --benchmark-only

Writes benchmarks/results/numpy-vs-torch-cpu.json.
"""
import time

import numpy as np
import pytest

from bench_utils import write_result

BATCH = 64
_epochs = {}


def gpucnn_epoch(x, y):
    from gpucnn import backend, utils
    from gpucnn.cli import seed_model
    backend.set_engine("cpu")
    utils.set_random_seed(0)
    model = seed_model()
    model.compile("rmsprop", "categorical_crossentropy", ["accuracy"])
    model.fit(x[:BATCH * 4], y[:BATCH * 4], batch_size=BATCH, verbose=0)  # warm-up
    start = time.perf_counter()
    history = model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    return time.perf_counter() - start, history.history["accuracy"][-1]


def torch_epoch(x, y):
    torch = pytest.importorskip("torch")
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


ROUNDS = 3  # this machine's epoch times vary by ±15 % from run to run: report the median of three


@pytest.mark.parametrize("who", ["torch_cpu", "gpucnn_numpy"])
def test_epoch(benchmark, mnist_train, who):
    x, y = mnist_train
    fn = gpucnn_epoch if who == "gpucnn_numpy" else torch_epoch
    runs = []
    benchmark.pedantic(lambda: runs.append(fn(x, y)), rounds=ROUNDS, iterations=1)
    seconds = sorted(r[0] for r in runs)
    accuracy = runs[-1][1]
    median = seconds[len(seconds) // 2]
    benchmark.extra_info.update(epoch_seconds=median, all_epoch_seconds=seconds, train_accuracy=accuracy)
    _epochs[who] = {"epoch_seconds": round(median, 2), "all_epoch_seconds": [round(s, 2) for s in seconds],
                    "train_accuracy": round(accuracy, 4)}
    assert accuracy > 0.9  # a real epoch of learning, not an empty loop
    if who == "gpucnn_numpy":
        ratio = (median / _epochs["torch_cpu"]["epoch_seconds"]) if "torch_cpu" in _epochs else None
        write_result("numpy-vs-torch-cpu", {
            "what": f"one epoch of the seed model, 60,000 MNIST images, batch 64, RMSprop; median of {ROUNDS}",
            "target": "gpucnn NumPy epoch <= PyTorch CPU epoch (ratio <= 1)",
            **_epochs, "ratio_gpucnn_over_torch": None if ratio is None else round(ratio, 3),
            "target_met": None if ratio is None else ratio <= 1.0})
