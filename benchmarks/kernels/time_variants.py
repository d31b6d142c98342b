"""Check and time the numbered conv + relu + max-pool kernels on the seed model's shapes (needs a GPU).

    python benchmarks/kernels/time_variants.py

Each version is checked against the NumPy engine (conv2d_forward + maxpool2d_forward), then timed with CUDA
events on one stream: 20 warm-up launches, then the median of 200, rotating over 4 input sets.
"""
import pathlib
import statistics

import cupy
import numpy as np

from gpucnn.engines import cuda_loader as cuda, cuda_ops as ops_cuda, numpy_ops as ops_numpy

HERE = pathlib.Path(__file__).resolve().parent
KERNELS = HERE.parent.parent / "kernels"
SHAPES = {"conv1": (64, 28, 28, 1, 32), "conv2": (64, 13, 13, 32, 64)}


def module(filename, defines=()):
    source = (HERE / filename).read_text().replace('#include "../../kernels/', '#include "')
    options = cuda.COMPILE_OPTIONS + tuple(f"-D{d}" for d in defines) + (f"-I{KERNELS}",)
    return cupy.RawModule(code=source, options=options)


def time_it(fn, inputs, repeats=200):
    for k in range(20):
        fn(*inputs[k % len(inputs)])
    start, stop, times = cupy.cuda.Event(), cupy.cuda.Event(), []
    for k in range(repeats):
        start.record()
        fn(*inputs[k % len(inputs)])
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop) * 1e3)
    return statistics.median(times)


def main():
    rng = np.random.default_rng(0)
    for name, (n, h, wd, c, f) in SHAPES.items():
        p, q = h - 2, wd - 2
        pp, pq = p // 2, q // 2
        sets = [(rng.random((n, h, wd, c), np.float32), rng.normal(0, 0.3, (3, 3, c, f)).astype(np.float32),
                 rng.normal(0, 0.1, f).astype(np.float32)) for _ in range(4)]
        want = ops_numpy.maxpool2d_forward(ops_numpy.conv2d_forward(*sets[0], (1, 1), (0, 0, 0, 0), "relu"),
                                           (2, 2), (2, 2), (0, 0, 0, 0))[0]
        dev = [tuple(cupy.asarray(a) for a in s) for s in sets]
        y, idx = cupy.empty((n, pp, pq, f), np.float32), cupy.empty((n, pp, pq, f), np.int8)
        conv_out = cupy.empty((n, p, q, f), np.float32)

        def v1(x, w, b):
            ops_cuda.conv2d_forward(x, w, b, (1, 1), (0, 0, 0, 0), "relu", out=conv_out)
            ops_cuda.maxpool2d_forward(conv_out, (2, 2), (2, 2), (0, 0, 0, 0), out=y, out_idx=idx)

        patch = (7 + 3) * (7 + 3) * 4
        cc = min(c, ops_cuda._PATCH_BYTES // patch)
        k2 = module("02_conv2d_relu_maxpool_fused.cu").get_function("conv2d_relu_maxpool_forward")
        grid = (n * -(-pp // 4) * -(-pq // 4), -(-f // 32))

        def v2(x, w, b):
            k2(grid, (32, 4), (x, w, b, y, idx, np.int32(n), np.int32(h), np.int32(wd), np.int32(c), np.int32(3),
                               np.int32(3), np.int32(f), np.int32(pp), np.int32(pq), np.int32(1), np.int32(1),
                               np.int32(0), np.int32(0), np.int32(1), np.int32(cc)), shared_mem=patch * cc)

        k3 = module("03_conv2d_relu_maxpool_k3.cu", (f"CONV_C={c}",)).get_function("conv2d_relu_maxpool_forward_v3")

        def v3(x, w, b):
            k3(grid, (32, 4), (x, w, b, y, idx, np.int32(n), np.int32(h), np.int32(wd), np.int32(f), np.int32(pp),
                               np.int32(pq), np.int32(1)))

        flops = 2 * n * p * q * f * 9 * c
        for label, fn in (("01 unfused", v1), ("02 fused", v2), ("03 fused k3", v3)):
            y.fill(np.nan)
            fn(*dev[0])
            np.testing.assert_allclose(y.get(), want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
            us = time_it(fn, dev)
            print(f"{name} {label:12} {us:8.2f} us  {flops / us / 1e3:8.1f} GFLOP/s")


if __name__ == "__main__":
    main()
