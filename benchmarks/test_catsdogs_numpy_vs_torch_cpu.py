"""Training steps of the book's cats-vs-dogs convnet (2nd edition, chapter 8: 180x180x3 images, RandomFlip +
RandomRotation(0.1) + RandomZoom(0.2), Rescaling, Conv2D 32/64/128/256/256 with max-pooling, Dropout(0.5),
Dense(1, sigmoid); 991,041 parameters) at batch 32 with RMSprop on the CPU: gpucnn's NumPy engine vs PyTorch's
CPU build running the same model, in the same run on the same machine. Target: gpucnn's step no slower than
PyTorch's (ratio_over_torch <= 1).

    make bench                      (installs the CPU build of PyTorch when it can)
    pytest benchmarks/test_catsdogs_numpy_vs_torch_cpu.py --benchmark-only

The data is ``STEPS`` batches of random 0-255 images and 0/1 labels (the time of a step does not depend on the
pixels; decoding is benchmarked apart, test_image_decoding.py). gpucnn runs examples/catsdogs.py's model, the
chapter's code, with ``fit`` on arrays; PyTorch the same layers in NCHW, its augmentation drawn per image on the
CPU (a flip, then one ``affine_grid``/``grid_sample`` for rotation and zoom, reflecting at the border) and
``BCEWithLogitsLoss``. Each measurement runs in a fresh process, after one warm-up step, the configurations
taking turns, round after round; the median of ``ROUNDS`` is reported. Without PyTorch gpucnn is measured alone.
When ``OPENBLAS_CORETYPE`` is set, gpucnn is measured with and without it, as in test_numpy_vs_torch_cpu.py.

Writes benchmarks/results/catsdogs-numpy-vs-torch-cpu.json.
"""
import importlib.util
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench_utils import QUICK, take_turns, write_result
from test_numpy_vs_torch_cpu import configurations, openblas_kernels

ROOT = Path(__file__).resolve().parent.parent
SIZE, BATCH = 180, 32
FILTERS = (32, 64, 128, 256, 256)
PARAMS = 991_041  # the book's count
STEPS = 3 if QUICK else 8
ROUNDS = 1 if QUICK else 3


def data():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (STEPS * BATCH, SIZE, SIZE, 3)).astype(np.float32)
    return x, rng.integers(0, 2, STEPS * BATCH).astype(np.float32)


# ===================================================================================== the steps, in a child
def gpucnn_steps():
    sys.path.insert(0, str(ROOT / "examples"))
    import catsdogs
    from gpucnn import backend, utils

    backend.set_engine("cpu")
    utils.set_random_seed(0)
    model = catsdogs.build_model(SIZE, FILTERS)
    x, y = data()
    model.fit(x[:BATCH], y[:BATCH], batch_size=BATCH, verbose=0)  # warm-up: one step
    start = time.perf_counter()
    history = model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
    return time.perf_counter() - start, history.history["loss"][-1], model.count_params()


def torch_steps():
    import torch
    import torch.nn.functional as F
    nn = torch.nn
    torch.manual_seed(0)
    stack, channels = [], 3
    for i, filters in enumerate(FILTERS):
        stack += [nn.Conv2d(channels, filters, 3), nn.ReLU()] + ([nn.MaxPool2d(2)] if i < len(FILTERS) - 1 else [])
        channels = filters
    model = nn.Sequential(*stack, nn.Flatten(), nn.Dropout(0.5), nn.Linear(FILTERS[-1] * 7 * 7, 1))
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-3, alpha=0.9, eps=1e-7)
    loss_fn = nn.BCEWithLogitsLoss()

    def augment(xb):
        n = xb.shape[0]
        xb = torch.where((torch.rand(n) <= 0.5)[:, None, None, None], xb.flip(3), xb)
        angle = (torch.rand(n) * 0.2 - 0.1) * 2 * math.pi
        zoom = 1 + (torch.rand(n) * 0.4 - 0.2)
        cos, sin, zero = torch.cos(angle) * zoom, torch.sin(angle) * zoom, torch.zeros(n)
        theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
        grid = F.affine_grid(theta, list(xb.shape), align_corners=False)
        return F.grid_sample(xb, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def step(xb, yb):
        opt.zero_grad()
        loss = loss_fn(model(augment(xb) / 255).squeeze(1), yb)
        loss.backward()
        opt.step()
        return float(loss)

    x, y = data()
    xt, yt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))), torch.from_numpy(y)
    model.train()
    step(xt[:BATCH], yt[:BATCH])  # warm-up: one step
    start = time.perf_counter()
    losses = [step(xt[i:i + BATCH], yt[i:i + BATCH]) for i in range(0, len(xt), BATCH)]
    return time.perf_counter() - start, losses[-1], sum(p.numel() for p in model.parameters())


STEPS_OF = {"gpucnn": gpucnn_steps, "torch": torch_steps}  # (the seed benchmark's functional variant is not one here)


def child(who):
    if who not in STEPS_OF:
        raise SystemExit(f"unknown configuration {who!r}; this benchmark runs {sorted(STEPS_OF)}")
    seconds, loss, params = STEPS_OF[who]()
    print(json.dumps({"seconds": seconds, "last_loss": loss, "params": params, "openblas": openblas_kernels()}))


# ===================================================================================== the benchmark
def run_child(who, env):
    out = subprocess.run([sys.executable, __file__, who], env=env, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"the {who} steps failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_catsdogs_steps(benchmark):
    have_torch = importlib.util.find_spec("torch") is not None
    configs = [c for c in configurations() if c[1] in STEPS_OF and (have_torch or c[1] != "torch")]
    runs = {}
    benchmark.pedantic(lambda: runs.update(take_turns(configs, ROUNDS, run_child)), rounds=1, iterations=1)
    results = {}
    for name, runs_of in runs.items():
        step_seconds = sorted(r["seconds"] / STEPS for r in runs_of)
        median = step_seconds[len(step_seconds) // 2]
        results[name] = {"step_seconds": round(median, 3), "all_step_seconds": [round(s, 3) for s in step_seconds],
                         "images_per_second": round(BATCH / median, 1), "last_loss": round(runs_of[-1]["last_loss"], 4),
                         "openblas_kernels": runs_of[-1]["openblas"]}
        assert all(r["params"] == PARAMS for r in runs_of), runs_of  # the book's model on both sides
        assert all(math.isfinite(r["last_loss"]) for r in runs_of), runs_of
    if "torch_cpu" in results:
        for name in results:
            if name.startswith("gpucnn"):
                ratio = results[name]["step_seconds"] / results["torch_cpu"]["step_seconds"]
                results[name].update(ratio_over_torch=round(ratio, 3), target_met=ratio <= 1.0)
    benchmark.extra_info.update(results)
    write_result("catsdogs-numpy-vs-torch-cpu", {
        "what": f"{STEPS} training steps of the book's cats-vs-dogs convnet with augmentation, {SIZE}x{SIZE}x3, "
                f"batch {BATCH}, RMSprop, after one warm-up step; each in its own process, the configurations in "
                f"turn; median of {ROUNDS}" + ("" if have_torch else "; PyTorch not installed: gpucnn alone"),
        "target": "gpucnn NumPy step <= PyTorch CPU step (ratio_over_torch <= 1)",
        **results})


if __name__ == "__main__":
    child(sys.argv[1])
