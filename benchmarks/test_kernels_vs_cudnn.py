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

And BatchNormalization, at the sizes of the residual network of test_resnet_numpy_vs_torch_cpu.py (32x32x16 and
8x8x64): forward in training (the batch's statistics, the moving ones updated), backward (training), forward in
inference, against PyTorch's own batch-norm CUDA kernels (``aten.native_batch_norm`` and its backward, channels_last);
and "conv3x3+bn": a 3x3 "same" convolution followed by an inference-mode normalization, ours folded
(``batchnorm_fold`` then one ``conv2d_forward``, what predict runs) against ours apart (``conv2d_forward`` then
``batchnorm_forward_inference``): whether the fusion pays on this device.

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
# batch normalization: (H, W, C); a convolution and the normalization after it: (H, W, C, F)
NORMS = {"bn_32x32x16": (32, 32, 16), "bn_8x8x64": (8, 8, 64)}
CONV_NORMS = {"conv3x3+bn_32x32x16": (32, 32, 16, 16), "conv3x3+bn_8x8x64": (8, 8, 64, 64)}
CASES = ([(name, p) for name in CONVS for p in ("forward", "backward-data", "backward-filter")]
         + [(name, p) for name in POOLS for p in ("forward", "backward")]
         + [(name, p) for name in DENSES for p in ("forward", "backward-data", "backward-weights")]
         + [(name, p) for name in NORMS for p in ("forward-training", "backward", "forward-inference")]
         + [(name, "inference-folded") for name in CONV_NORMS])

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


class NormCase(Case):
    """BatchNormalization over the channels of (N, H, W, C): ours (cuda_ops.batchnorm_*) against PyTorch's CUDA
    batch-norm kernels on the same memory (channels_last), Keras's momentum 0.99 (PyTorch's 0.01), epsilon 1e-3."""
    peer_name = "PyTorch batch norm (aten.native_batch_norm, CUDA)"

    def __init__(self, name, pss, n):
        h, w, c = NORMS[name]
        self.pss, self.shape = pss, (n, h, w, c)
        self.x = [_normal(self.shape, 2.0, 110 + i) + 0.5 for i in range(SETS)]
        self.dy = [_normal(self.shape, 1.0, 120 + i) for i in range(SETS)]
        self.gamma, self.beta = _normal((c,), 0.2, 130) + 1.0, _normal((c,), 0.5, 131)
        self.moving_mean, self.moving_var = _normal((c,), 0.5, 132), cupy.abs(_normal((c,), 1.0, 133)) + 0.5
        self.inference_mean, self.inference_var = self.moving_mean.copy(), self.moving_var.copy()
        self.xt, self.dyt = [_nchw(a) for a in self.x], [_nchw(a) for a in self.dy]
        self.gammat, self.betat = _t(self.gamma), _t(self.beta)
        self.mmt, self.mvt = _t(self.moving_mean.copy()), _t(self.moving_var.copy())  # PyTorch's own, updated
        self.inference_stats = _t(self.inference_mean), _t(self.inference_var)  # ... and left alone
        self.y, self.dx = cupy.empty(self.shape, cupy.float32), cupy.empty(self.shape, cupy.float32)
        self.mean, self.inv_std = cupy.empty((c,), cupy.float32), cupy.empty((c,), cupy.float32)
        self.dgamma, self.dbeta = cupy.empty((c,), cupy.float32), cupy.empty((c,), cupy.float32)
        self.ctx = {}
        # the saved statistics each backward reads: ours and PyTorch's, of input set i
        self.saved = [ops.batchnorm_forward_training(a, self.gamma, self.beta, self.moving_mean.copy(),
                                                     self.moving_var.copy(), 0.99, 1e-3)[1:] for a in self.x]
        self.savedt = [self._peer_training(i)[1:] for i in range(SETS)]
        elements = n * h * w * c
        # the least traffic, float32: read x, write y (forward); read dy and x, write dx (backward)
        self.bytes = 4 * elements * (3 if pss == "backward" else 2)
        if pss == "backward":
            self.tolerance = 5e-4  # sums over N*H*W terms in different orders

    def _peer_training(self, i):
        return torch.ops.aten.native_batch_norm(self.xt[i], self.gammat, self.betat, self.mmt, self.mvt, True, 0.01,
                                                1e-3)

    def ours(self, i):
        if self.pss == "forward-training":
            return ops.batchnorm_forward_training(self.x[i], self.gamma, self.beta, self.moving_mean, self.moving_var,
                                                  0.99, 1e-3, self.ctx, out=self.y, out_mean=self.mean,
                                                  out_inv_std=self.inv_std)[0]
        if self.pss == "backward":
            mean, inv_std = self.saved[i]
            return ops.batchnorm_backward(self.dy[i], self.x[i], self.gamma, mean, inv_std, True, self.ctx,
                                          out=self.dx, out_gamma=self.dgamma, out_beta=self.dbeta)
        return ops.batchnorm_forward_inference(self.x[i], self.gamma, self.beta, self.inference_mean,
                                               self.inference_var, 1e-3, out=self.y, out_inv_std=self.inv_std)[0]

    def peer(self, i):
        if self.pss == "forward-training":
            return self._peer_training(i)[0]
        if self.pss == "backward":
            mean, inv_std = self.savedt[i]
            return torch.ops.aten.native_batch_norm_backward(self.dyt[i], self.xt[i], self.gammat, self.mmt, self.mvt,
                                                             mean, inv_std, True, 1e-3, [True, True, True])
        return F.batch_norm(self.xt[i], *self.inference_stats, self.gammat, self.betat, False, 0.0, 1e-3)

    def check(self):
        ours, peer = self.ours(0), self.peer(0)
        if self.pss == "backward":
            return {"dx": _rel_err(ours[0], _to_cupy(peer[0].permute(0, 2, 3, 1))),
                    "dgamma": _rel_err(ours[1], _to_cupy(peer[1])), "dbeta": _rel_err(ours[2], _to_cupy(peer[2]))}
        return {"y": _rel_err(ours, _to_cupy(peer.permute(0, 2, 3, 1)))}


class ConvNormCase(Case):
    """A 3x3 "same" convolution (no bias, no activation) and the inference-mode BatchNormalization after it: ours folded
    (batchnorm_fold, then one convolution: what predict and evaluate run) against ours apart (the convolution, then
    batchnorm_forward_inference). A ratio under 1 says the fusion pays here."""
    peer_name = "gpucnn apart (conv2d_forward, then batchnorm_forward_inference)"

    def __init__(self, name, pss, n):
        h, w, c, f = CONV_NORMS[name]
        self.pss = pss
        self.x = [_normal((n, h, w, c), 1.0, 140 + i) for i in range(SETS)]
        self.w = _normal((3, 3, c, f), (9 * c) ** -0.5, 150)
        self.gamma, self.beta = _normal((f,), 0.2, 151) + 1.0, _normal((f,), 0.5, 152)
        self.moving_mean, self.moving_var = _normal((f,), 0.5, 153), cupy.abs(_normal((f,), 1.0, 154)) + 0.5
        self.folded_w, self.folded_b = cupy.empty(self.w.shape, cupy.float32), cupy.empty((f,), cupy.float32)
        self.z, self.y, self.y_apart = (cupy.empty((n, h, w, f), cupy.float32) for _ in range(3))
        self.inv_std = cupy.empty((f,), cupy.float32)
        self.ctx, self.ctx_apart = {}, {}
        self.flops = 2 * n * h * w * f * 9 * c

    def ours(self, i):
        w, b = ops.batchnorm_fold(self.w, None, self.gamma, self.beta, self.moving_mean, self.moving_var, 1e-3,
                                  out_w=self.folded_w, out_b=self.folded_b)
        return ops.conv2d_forward(self.x[i], w, b, ONE, (1, 1, 1, 1), None, self.ctx, out=self.y)

    def peer(self, i):
        z = ops.conv2d_forward(self.x[i], self.w, None, ONE, (1, 1, 1, 1), None, self.ctx_apart, out=self.z)
        return ops.batchnorm_forward_inference(z, self.gamma, self.beta, self.moving_mean, self.moving_var, 1e-3,
                                               out=self.y_apart, out_inv_std=self.inv_std)[0]

    def check(self):
        return {"y": _rel_err(self.ours(0), self.peer(0))}


def make_case(layer, pss, n):
    kind = (ConvCase if layer in CONVS else PoolCase if layer in POOLS else DenseCase if layer in DENSES
            else NormCase if layer in NORMS else ConvNormCase)
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
        "what": "gpucnn.engines.cuda_ops kernels vs cuDNN/cuBLAS/PyTorch through PyTorch, seed-model layers and "
                "the residual network's batch normalization, FP32, GPU time per call (CUDA events over back-to-back "
                "calls, median of groups); conv3x3+bn: ours folded vs ours apart",
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
