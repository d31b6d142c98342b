"""gpucnn's kernels against cuDNN (and cuBLAS, and PyTorch's max-pool) on the layers of the seed model.

For each layer and pass, at batch 64, 256 and 1024 (64 and 1024 with GPUCNN_BENCH_QUICK=1):

  conv1 28x28x1->32, conv2 13x13x32->64, conv3 5x5x64->64 (3x3, valid, ReLU)
        forward (conv + bias + ReLU), backward-data, backward-filter (dW and db)
  pool1 26x26x32, pool2 11x11x64 (2x2 max-pooling, stride 2)   forward (with indices), backward
  dense1 576->64 (ReLU), dense2 64->10 (softmax)                 forward, backward-data, backward-weights

What is measured:
  ours   the ``gpucnn.engines.cuda_ops`` function with preallocated ``out=`` buffers (and a reused ``ctx``), on NHWC
         activations and (KH,KW,C,F) weights: gpucnn's own layouts, so no conversion is needed;
  peer   the same computation through PyTorch on the same stream, on the same activation memory shared by
         DLPack (an NHWC array viewed as a channels_last NCHW tensor: no copy). The weights are given to
         PyTorch in its own layout (F,C,KH,KW) channels_last, converted once before timing, as a PyTorch
         model keeps them. Convolutions run in cuDNN with ``cudnn.benchmark = True`` (cuDNN picks its
         fastest algorithm for each shape) and FP32 arithmetic (TF32 off: gpucnn computes in FP32); a
         second cuDNN time is taken with ``cudnn.deterministic = True`` (gpucnn is deterministic).
         cuDNN's forward time is conv + bias + ReLU, the work of our fused kernel; conv + bias alone is
         recorded too. Dense layers are cuBLAS (``torch.addmm`` / ``torch.mm``); max-pooling is PyTorch's
         own CUDA kernel (PyTorch does not call cuDNN for it).

Each case is checked first (ours against PyTorch: relative L2 error, exact for max-pooling), then timed
with CUDA events on queued work (``gpu_timing.time_gpu``: median of groups of back-to-back calls, four
input sets in rotation, random normal data, never zeros). Reports the ratio ours/peer, GFLOP/s (GB/s for
pooling) and the fraction of the device's datasheet peak. Targets, reported and not asserted: ratio <= 1.0
at batch 64 and <= 1.25 at batch 1024.

Writes benchmarks/results/kernels-vs-cudnn.json after every case (a cut-off run keeps what it measured).
"""
import pytest

from bench_utils import QUICK, gpu_info, gpu_skip_reason, torch_cuda_skip_reason, write_result

pytestmark = pytest.mark.gpu

_reason = gpu_skip_reason() or torch_cuda_skip_reason()
if _reason:
    pytest.skip(_reason, allow_module_level=True)

import cupy  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from gpu_timing import same_stream, settings, time_gpu  # noqa: E402
from gpucnn import backend  # noqa: E402
from gpucnn.engines import cuda_ops as ops  # noqa: E402

BATCHES = (64, 1024) if QUICK else (64, 256, 1024)
TARGETS = {64: 1.0, 1024: 1.25}  # ours / peer, at most
SETS = 4
VALID = (0, 0, 0, 0)
ONE = (1, 1)

# name -> geometry. conv: (H, W, C, F); pool: (H, W, C); dense: (IN, UNITS, activation)
CONVS = {"conv1": (28, 28, 1, 32), "conv2": (13, 13, 32, 64), "conv3": (5, 5, 64, 64)}
POOLS = {"pool1": (26, 26, 32), "pool2": (11, 11, 64)}
DENSES = {"dense1": (576, 64, "relu"), "dense2": (64, 10, "softmax")}
CASES = ([(name, p) for name in CONVS for p in ("forward", "backward-data", "backward-filter")]
         + [(name, p) for name in POOLS for p in ("forward", "backward")]
         + [(name, p) for name in DENSES for p in ("forward", "backward-data", "backward-weights")])

_rows = []
_device = {}


def setup_module():
    backend.set_engine("gpu")
    torch.backends.cudnn.enabled = True
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    _device.update(gpu_info())


def teardown_module():
    torch.backends.cudnn.deterministic = False


# ===================================================================================== data
def _normal(shape, scale=1.0, seed=0):
    rs = cupy.random.RandomState(seed)
    return (rs.standard_normal(shape, dtype=cupy.float32) * scale).astype(cupy.float32)


def _t(a):
    """A CuPy array as a PyTorch tensor on the same memory."""
    return torch.from_dlpack(a)


def _nchw(a):
    """An NHWC CuPy array as an NCHW channels_last tensor on the same memory."""
    return _t(a).permute(0, 3, 1, 2)


def _to_cupy(t):
    return cupy.from_dlpack(t.contiguous())


def _rel_err(got, want):
    got, want = got.astype(cupy.float64), want.astype(cupy.float64)
    if not bool(cupy.isfinite(got).all()):
        return float("inf")
    return float(cupy.linalg.norm(got - want) / max(float(cupy.linalg.norm(want)), 1e-30))


# ===================================================================================== cases
class Case:
    """One (layer, pass, batch): ``ours(i)`` and ``peer(i)`` enqueue the work on input set i; ``check()``
    returns {output: relative error} of ours against the peer; ``flops`` / ``bytes`` size the work."""

    peer_name = "cuDNN"
    flops = None
    bytes = None
    tolerance = 1e-4

    def conv_only(self, i):  # only conv forward has it
        raise NotImplementedError


class ConvCase(Case):
    def __init__(self, name, pss, n):
        h, w, c, f = CONVS[name]
        self.pss, self.p, self.q = pss, h - 2, w - 2
        self.x_shape, self.w_shape = (n, h, w, c), (3, 3, c, f)
        self.x = [_normal(self.x_shape, 1.0, 10 + i) for i in range(SETS)]
        self.w = [_normal(self.w_shape, (9 * c) ** -0.5, 20 + i) for i in range(SETS)]
        self.b = [_normal((f,), 0.1, 30 + i) for i in range(SETS)]
        self.dy = [_normal((n, self.p, self.q, f), 1.0, 40 + i) for i in range(SETS)]
        self.ctx = {}
        # PyTorch's views and its own weight layout (converted once, outside the timing)
        self.xt = [_nchw(a) for a in self.x]
        self.wt = [_t(a).permute(3, 2, 0, 1).contiguous(memory_format=torch.channels_last) for a in self.w]
        self.bt = [_t(a) for a in self.b]
        self.dyt = [_nchw(a) for a in self.dy]
        self.flops = 2 * n * self.p * self.q * f * 9 * c
        if pss == "forward":
            self.y = cupy.empty((n, self.p, self.q, f), cupy.float32)
        elif pss == "backward-data":
            self.dx = cupy.empty(self.x_shape, cupy.float32)
        else:
            self.dw, self.db = cupy.empty(self.w_shape, cupy.float32), cupy.empty((f,), cupy.float32)
            self.tolerance = 5e-4  # sums over N*P*Q terms in different orders

    def ours(self, i):
        if self.pss == "forward":
            return ops.conv2d_forward(self.x[i], self.w[i], self.b[i], ONE, VALID, "relu", self.ctx, out=self.y)
        if self.pss == "backward-data":
            return ops.conv2d_backward_data(self.dy[i], self.w[i], self.x_shape, ONE, VALID, self.ctx, out=self.dx)
        return ops.conv2d_backward_filter(self.dy[i], self.x[i], self.w_shape, ONE, VALID, self.ctx,
                                          out_w=self.dw, out_b=self.db)

    def _backward(self, i, mask):
        bias = [self.w_shape[3]] if mask[2] else None
        return torch.ops.aten.convolution_backward(self.dyt[i], self.xt[i], self.wt[i], bias, [1, 1], [0, 0],
                                                   [1, 1], False, [0, 0], 1, mask)

    def peer(self, i):
        if self.pss == "forward":
            return torch.relu_(F.conv2d(self.xt[i], self.wt[i], self.bt[i]))
        if self.pss == "backward-data":
            return self._backward(i, [True, False, False])[0]
        return self._backward(i, [False, True, True])[1:]

    def conv_only(self, i):
        return F.conv2d(self.xt[i], self.wt[i], self.bt[i])

    def check(self):
        ours, peer = self.ours(0), self.peer(0)
        if self.pss == "forward":
            return {"y": _rel_err(ours, _to_cupy(peer.permute(0, 2, 3, 1)))}
        if self.pss == "backward-data":
            return {"dx": _rel_err(ours, _to_cupy(peer.permute(0, 2, 3, 1)))}
        return {"dw": _rel_err(ours[0], _to_cupy(peer[0].permute(2, 3, 1, 0))),
                "db": _rel_err(ours[1], _to_cupy(peer[1]))}


class PoolCase(Case):
    peer_name = "PyTorch max-pool (not cuDNN)"
    tolerance = 0.0  # both route each window's gradient to its maximum: exact

    def __init__(self, name, pss, n):
        h, w, c = POOLS[name]
        self.pss, self.x_shape = pss, (n, h, w, c)
        p, q = h // 2, w // 2
        self.x = [_normal(self.x_shape, 1.0, 50 + i) for i in range(SETS)]
        self.dy = [_normal((n, p, q, c), 1.0, 60 + i) for i in range(SETS)]
        self.xt, self.dyt = [_nchw(a) for a in self.x], [_nchw(a) for a in self.dy]
        self.y = cupy.empty((n, p, q, c), cupy.float32)
        self.dx = cupy.empty(self.x_shape, cupy.float32)
        self.idx = [ops.maxpool2d_forward(a, (2, 2), (2, 2), VALID)[1] for a in self.x]
        self.idxt = [self._peer_forward(i)[1] for i in range(SETS)]
        # the least traffic: read x and write y (forward); read dy and write dx (backward); float32
        self.bytes = 4 * (n * h * w * c + n * p * q * c)

    def _peer_forward(self, i):
        return torch.ops.aten.max_pool2d_with_indices(self.xt[i], [2, 2], [2, 2], [0, 0], [1, 1], False)

    def ours(self, i):
        if self.pss == "forward":
            return ops.maxpool2d_forward(self.x[i], (2, 2), (2, 2), VALID, out=self.y)[0]
        return ops.maxpool2d_backward(self.dy[i], self.idx[i], self.x_shape, (2, 2), (2, 2), VALID, out=self.dx)

    def peer(self, i):
        if self.pss == "forward":
            return self._peer_forward(i)[0]
        return torch.ops.aten.max_pool2d_with_indices_backward(self.dyt[i], self.xt[i], [2, 2], [2, 2], [0, 0],
                                                               [1, 1], False, self.idxt[i])

    def check(self):
        name = "y" if self.pss == "forward" else "dx"
        return {name: _rel_err(self.ours(0), _to_cupy(self.peer(0).permute(0, 2, 3, 1)))}


class DenseCase(Case):
    peer_name = "cuBLAS (torch.addmm / torch.mm)"

    def __init__(self, name, pss, n):
        inputs, units, self.activation = DENSES[name]
        self.pss = pss
        self.x = [_normal((n, inputs), 1.0, 70 + i) for i in range(SETS)]
        self.w = [_normal((inputs, units), inputs ** -0.5, 80 + i) for i in range(SETS)]
        self.b = [_normal((units,), 0.1, 90 + i) for i in range(SETS)]
        self.dy = [_normal((n, units), 1.0, 100 + i) for i in range(SETS)]
        self.xt, self.wt, self.bt, self.dyt = ([_t(a) for a in arrays] for arrays in (self.x, self.w, self.b, self.dy))
        self.y = cupy.empty((n, units), cupy.float32)
        self.dx = cupy.empty((n, inputs), cupy.float32)
        self.dw, self.db = cupy.empty((inputs, units), cupy.float32), cupy.empty((units,), cupy.float32)
        self.flops = 2 * n * inputs * units
        if pss == "backward-weights":
            self.tolerance = 5e-4

    def ours(self, i):
        if self.pss == "forward":
            return ops.dense_forward(self.x[i], self.w[i], self.b[i], self.activation, out=self.y)
        if self.pss == "backward-data":
            return ops.dense_backward_data(self.dy[i], self.w[i], out=self.dx)
        return ops.dense_backward_weights(self.dy[i], self.x[i], out_w=self.dw, out_b=self.db)

    def peer(self, i):
        if self.pss == "forward":
            z = torch.addmm(self.bt[i], self.xt[i], self.wt[i])
            return torch.relu_(z) if self.activation == "relu" else torch.softmax(z, 1)
        if self.pss == "backward-data":
            return torch.mm(self.dyt[i], self.wt[i].t())
        return torch.mm(self.xt[i].t(), self.dyt[i]), self.dyt[i].sum(0)

    def check(self):
        ours, peer = self.ours(0), self.peer(0)
        if self.pss == "backward-weights":
            return {"dw": _rel_err(ours[0], _to_cupy(peer[0])), "db": _rel_err(ours[1], _to_cupy(peer[1]))}
        return {"y" if self.pss == "forward" else "dx": _rel_err(ours, _to_cupy(peer))}


def make_case(layer, pss, n):
    kind = ConvCase if layer in CONVS else PoolCase if layer in POOLS else DenseCase
    return kind(layer, pss, n)


# ===================================================================================== report
def _rate(case, ms):
    """(GFLOP/s or None, GB/s or None) of the case at ``ms`` per call."""
    if not ms:
        return None, None
    gflops = case.flops / (ms * 1e-3) / 1e9 if case.flops else None
    gbs = case.bytes / (ms * 1e-3) / 1e9 if case.bytes else None
    return gflops, gbs


def _target(batch, ratio):
    target = TARGETS.get(batch)
    if target is None or ratio is None:
        return {"target_ratio": target, "met": None, "missed_by_pct": None}
    met = ratio <= target
    return {"target_ratio": target, "met": met, "missed_by_pct": None if met else round(100 * (ratio / target - 1), 1)}


def _r(x, digits=4):
    return None if x is None else round(x, digits)


def _write():
    write_result("kernels-vs-cudnn", {
        "what": "gpucnn.engines.cuda_ops kernels vs cuDNN/cuBLAS/PyTorch through PyTorch, seed-model layers, FP32, "
                "GPU time per call (CUDA events over back-to-back calls, median of groups)",
        "quick": QUICK, "targets": {"ratio_at_batch_64": 1.0, "ratio_at_batch_1024": 1.25},
        "torch_settings": {"cudnn.benchmark": True, "cudnn.allow_tf32": False, "cuda.matmul.allow_tf32": False},
        "rows": _rows}, device=True)


# ===================================================================================== the benchmark
def _errors(case):
    return {k: _r(v, 9) for k, v in case.check().items()}


def _correct(case, errors):
    return all(v <= case.tolerance for v in errors.values())


def _rates(row, case, ours_ms, peer_ms):
    """GFLOP/s (or GB/s for pooling) of both, and ours as a share of the device's datasheet peak."""
    (ours_gflops, ours_gbs), (peer_gflops, peer_gbs) = _rate(case, ours_ms), _rate(case, peer_ms)
    peak_tflops, peak_tbs = _device.get("peak_fp32_tflops"), _device.get("peak_hbm_tbs")
    if case.flops:
        row.update(gflop=_r(case.flops / 1e9, 6), ours_gflops=_r(ours_gflops, 1), cudnn_gflops=_r(peer_gflops, 1),
                   ours_pct_of_fp32_peak=_r(100 * ours_gflops / (1e3 * peak_tflops), 2) if peak_tflops else None)
    if case.bytes:
        row.update(mbytes=_r(case.bytes / 1e6, 3), ours_gbs=_r(ours_gbs, 1), cudnn_gbs=_r(peer_gbs, 1),
                   ours_pct_of_hbm_peak=_r(100 * ours_gbs / (1e3 * peak_tbs), 2) if peak_tbs else None)


def measure(case, row):
    """Check, then time ours and the peer (and, for convolutions, cuDNN deterministic and conv + bias
    alone); fills ``row``. A case that fails its check is not timed."""
    timing = settings(QUICK)
    torch.backends.cudnn.deterministic = False
    row["rel_err"] = _errors(case)
    row["correct"] = _correct(case, row["rel_err"])
    if not row["correct"]:
        return row
    ours = time_gpu(case.ours, SETS, *timing)
    peer = time_gpu(case.peer, SETS, *timing)
    row.update(ours_ms=_r(ours["ms"]), cudnn_ms=_r(peer["ms"]),
               ours_spread_ms=[_r(ours["min_ms"]), _r(ours["max_ms"])],
               cudnn_spread_ms=[_r(peer["min_ms"]), _r(peer["max_ms"])],
               ours_host_us_per_call=ours["host_us_per_call"], cudnn_host_us_per_call=peer["host_us_per_call"],
               groups_waiting_for_host=ours["groups_waiting_for_host"] + peer["groups_waiting_for_host"])
    if isinstance(case, ConvCase):
        if row["pass"] == "forward":
            row["cudnn_conv_bias_only_ms"] = _r(time_gpu(case.conv_only, SETS, *timing)["ms"])
        torch.backends.cudnn.deterministic = True
        row["rel_err_deterministic"] = _errors(case)
        if _correct(case, row["rel_err_deterministic"]):
            det = time_gpu(case.peer, SETS, *timing)
            row["cudnn_deterministic_ms"] = _r(det["ms"])
            row["ratio_vs_deterministic"] = _r(ours["ms"] / det["ms"], 3)
        torch.backends.cudnn.deterministic = False
    ratio = ours["ms"] / peer["ms"]
    row["ratio"] = _r(ratio, 3)
    row.update(_target(row["batch"], ratio))
    _rates(row, case, ours["ms"], peer["ms"])
    return row


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("layer, pss", CASES, ids=[f"{layer}-{p}" for layer, p in CASES])
def test_kernel_vs_peer(benchmark, layer, pss, batch):
    case = make_case(layer, pss, batch)
    row = {"layer": layer, "pass": pss, "batch": batch, "peer": case.peer_name}
    with same_stream(torch):
        benchmark.pedantic(measure, args=(case, row), rounds=1, iterations=1)
    benchmark.extra_info.update(row)
    _rows.append(row)
    _write()
    assert row["correct"], f"{layer} {pss} batch {batch}: ours differs from the peer: {row['rel_err']}"
