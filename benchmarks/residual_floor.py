"""A floor under the NumPy engine's residual-convnet step (test_resnet_numpy_vs_torch_cpu.py's model): the CPU
time of its convolutions' matrix products alone, in im2col form on one OpenBLAS thread, against the CPU time of
PyTorch's whole step (all its threads) in the same run. Not a test and not a target: it says how close to
PyTorch any NumPy implementation of that step can get, whatever else it does.

    python benchmarks/residual_floor.py          (needs PyTorch's CPU build for the peer; a minute)

Each convolution's three products (forward: im2col rows x kernel; backward: the kernel's gradient and, except
for the stem, the input's) are timed at their own shapes, best of three, with NumPy's matrix product.
"""
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import test_resnet_numpy_vs_torch_cpu as resnet  # noqa: E402  (the model: BATCH, STAGES, torch_model, _data)
from gpucnn.models.parallel import blas_threads  # noqa: E402


def convolutions():
    """(output size, kernel size, input channels, filters, whether the input's gradient is needed) of each of the
    model's convolutions, as test_resnet_numpy_vs_torch_cpu builds them."""
    convs, c_in, size = [(32, 3, 3, resnet.STAGES[0], False)], resnet.STAGES[0], 32
    for stage, filters in enumerate(resnet.STAGES):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            size //= stride
            convs += [(size, 3, c_in, filters, True), (size, 3, filters, filters, True)]
            if stride != 1:
                convs.append((size, 1, c_in, filters, True))
            c_in = filters
    return convs


def best_of(a, b, repeats=3):
    out = np.empty((a.shape[0], b.shape[1]), np.float32)
    np.matmul(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return best


def products_seconds():
    rng = np.random.default_rng(0)
    total = flops = 0.0
    with blas_threads(1):
        for size, k, c_in, filters, input_gradient in convolutions():
            m, depth = resnet.BATCH * size * size, k * k * c_in
            cols = rng.random((m, depth), dtype=np.float32)
            kernel = rng.random((depth, filters), dtype=np.float32)
            dy = rng.random((m, filters), dtype=np.float32)
            seconds = best_of(cols, kernel) + best_of(np.ascontiguousarray(cols.T), dy)
            if input_gradient:
                seconds += best_of(dy, np.ascontiguousarray(kernel.T))
            done = 2 * m * depth * filters * (3 if input_gradient else 2)
            print(f"  {size:2d}x{size:<2d} {k}x{k} {c_in:2d} -> {filters:2d}: {seconds * 1e3:6.1f} ms, "
                  f"{done / seconds / 1e9:4.0f} GFLOP/s")
            total, flops = total + seconds, flops + done
    return total, flops


def torch_step_seconds(steps=10):
    """(wall, CPU) seconds of one PyTorch training step, as the benchmark's peer trains."""
    import torch
    torch.manual_seed(0)
    model = resnet.torch_model().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    x, y = resnet._data(steps + 2)
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).contiguous(memory_format=torch.channels_last)
    yt = torch.from_numpy(y)
    b = resnet.BATCH

    def step(k):
        opt.zero_grad()
        loss_fn(model(xt[k * b:(k + 1) * b]), yt[k * b:(k + 1) * b]).backward()
        opt.step()
    for k in range(2):
        step(k)
    wall, cpu = time.perf_counter(), time.process_time()
    for k in range(2, steps + 2):
        step(k)
    return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps, torch.get_num_threads()


def main():
    print("the residual step's convolution products, one thread:")
    seconds, flops = products_seconds()
    print(f"products alone: {seconds * 1e3:.0f} ms of CPU time for {flops / 1e9:.2f} GFLOP "
          f"({flops / seconds / 1e9:.0f} GFLOP/s)")
    try:
        wall, cpu, threads = torch_step_seconds()
    except ImportError:
        print("PyTorch is not installed: no peer")
        return
    print(f"PyTorch's whole step ({threads} threads): {wall * 1e3:.0f} ms, {cpu * 1e3:.0f} ms of CPU time; "
          f"the products alone are {seconds / cpu:.2f}x that CPU time")


if __name__ == "__main__":
    main()
