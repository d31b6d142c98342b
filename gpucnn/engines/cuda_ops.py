"""The CUDA engine: every op of gpucnn, launching the hand-written kernels of ``kernels/*.cu``.

The same functions as ``ops_numpy.py``, with the same names, arguments, order and return conventions: read
the two side by side. Each op checks shapes, picks a grid and calls ``gpucnn.engines.cuda_loader.launch``, which checks
every argument against the kernel's C signature. The kernel files say what each kernel computes and how.

Beyond ops_numpy's conventions:
  * arrays are CuPy float32 (sparse labels int32: other integer labels are cast, one-hot labels are cast
    to float32); inputs that are views are made contiguous (a copy), while arrays written in place
    (``out=``, optimizer state) must be C-contiguous already;
  * no op synchronises with the host: results stay on the device (``count_correct`` returns a 0-d int64
    array, ``crossentropy_forward`` an (N,) array);
  * the conv ops recompute instead of keeping im2col; ``ctx["work"]`` keeps the backward-filter workspace
    (and ``ctx["dz"]`` conv2d_maxpool_backward's convolution gradient) for the next call with the same
    shapes, so with ``out=`` buffers and the same ``ctx`` a step allocates nothing in the ops that take them;
  * an output with no elements launches nothing (no kernel ever gets a zero-sized grid); an empty batch
    gives empty outputs and zero weight gradients, reading nothing out of bounds; shapes the kernels' 32-bit
    indices cannot cover (one image of about 2^31 elements) raise ValueError, as does a window that does
    not fit.
"""
import cupy
import numpy as np

from . import cuda_loader as cuda
from .numpy_ops import MAX_POOL_TAPS, geometry, out_size  # noqa: F401  (shape rules shared by both engines)

xp = cupy
DTYPE = np.float32
READS_WAIT = True  # reading a result on the host waits for the device: do it rarely

_CONV = cuda.kernel_constants("conv2d.cu")
_GEMM_TILE = cuda.kernel_constants("dense.cu")["GEMM_TILE"]
_THREADS = _CONV["THREADS"]          # block of the 1-D kernels (kernels/common.cuh)
_MAX_BLOCKS = 65535                  # grid-stride grids: keeps gridDim.x * THREADS below 2^31
_INT_MAX = 2**31 - 1
_PATCH_BYTES = 32 * 1024             # conv2d_forward's shared input patch, at most
_FILTER_TARGET_BLOCKS = 1024         # conv2d_backward_filter: about this many blocks in all ...
_FILTER_MIN_SLICE = 256              # ... with slices of at least this many output pixels


# ===================================================================================== helpers
def _cdiv(a, b):
    return -(-a // b)


def _blocks(count):
    """Blocks of a grid-stride kernel over ``count`` items."""
    return max(1, min(_cdiv(count, _THREADS), _MAX_BLOCKS))


def _image_grid(per_image, images):
    """Grid of the IMAGE_LOOP / ELEMENT_LOOP kernels: (elements of one image, images), both grid-stride.
    Their 32-bit element index must not overflow when it steps past the end of an image."""
    limit = _INT_MAX - _MAX_BLOCKS * _THREADS
    if per_image > limit:
        raise ValueError(f"one image of {per_image:,} elements is too large for the CUDA kernels "
                         f"(at most {limit:,})")
    return _blocks(per_image), max(1, min(images, 65535))


def _c(a):
    """``a`` as a C-contiguous array (a copy only when it is a view); non-CuPy values are left for
    ``cuda.launch`` to reject."""
    if isinstance(a, cupy.ndarray) and not a.flags.c_contiguous:
        return cupy.ascontiguousarray(a)
    return a


def _out(out, shape, dtype=DTYPE, name="out"):
    """A new device array, or the caller's ``out`` after checking that it fits."""
    shape = tuple(int(s) for s in shape)
    if out is None:
        return cuda.empty(shape, dtype)
    if not isinstance(out, cupy.ndarray) or out.shape != shape or out.dtype != dtype \
            or not out.flags.c_contiguous:
        raise ValueError(f"{name} must be a C-contiguous cupy {np.dtype(dtype).name} array of shape {shape}, "
                         f"got {type(out).__name__} {getattr(out, 'shape', '')} {getattr(out, 'dtype', '')}")
    return out


def _finish(y, out):
    if out is None:
        return y
    out[...] = y
    return out


def _fused(activation):
    """The activation code a conv/dense kernel applies itself (softmax runs afterwards)."""
    if activation == "relu":
        return _CONV["ACT_RELU"]
    if activation is None or activation == "softmax":
        return _CONV["ACT_NONE"]
    raise ValueError(f"unknown activation {activation!r}")


def _window_geometry(x_shape, k, stride, padding, what):
    n, h, wd, c, p, q = geometry(x_shape, k, stride, padding)
    if p < 1 or q < 1:
        raise ValueError(f"{what}: a {k[0]}x{k[1]} window does not fit the {h}x{wd} input padded by "
                         f"{tuple(padding)}")
    return n, h, wd, c, p, q


def _patch_channels(rows, cols, kh, kw, c, stride, what):
    """(bytes a channel, channels a chunk) of a forward convolution kernel's shared input patch under a tile
    of ``rows`` x ``cols`` outputs: as many channels as fit in _PATCH_BYTES, at least one."""
    patch = ((rows - 1) * stride[0] + kh) * ((cols - 1) * stride[1] + kw) * 4
    cc = min(c, _PATCH_BYTES // patch)
    if cc < 1:
        raise ValueError(f"{what}: a {kh}x{kw} kernel at stride {tuple(stride)} needs an input patch of "
                         f"{patch:,} bytes a channel, more than the kernel's {_PATCH_BYTES:,}")
    return patch, cc


def _work(ctx, key, shape, dtype=DTYPE):
    """A device work array kept in ``ctx[key]`` for the next call with the same shape."""
    a = ctx.get(key) if ctx is not None else None
    if a is None or a.shape != tuple(shape):
        a = cuda.empty(shape, dtype)
        if ctx is not None:
            ctx[key] = a
    return a


def _labels(labels, p, sparse):
    """Sparse labels as contiguous int32 (N,); one-hot labels as contiguous float32 (N, K)."""
    if sparse:
        labels = labels if labels.dtype == np.int32 else labels.astype(np.int32)
        if labels.shape != p.shape[:1]:
            raise ValueError(f"sparse labels must be ({p.shape[0]},), got {labels.shape}")
    else:
        labels = labels if labels.dtype == DTYPE else labels.astype(DTYPE)
        if labels.shape != p.shape:
            raise ValueError(f"one-hot labels must be {p.shape}, got {labels.shape}")
    return _c(labels)


def _rows(p, what):
    if p.ndim != 2 or p.shape[1] < 1:
        raise ValueError(f"{what}: probabilities must be (N, K) with K >= 1, got {p.shape}")
    return p.shape


# ===================================================================================== activations
def activation_forward(x, activation, out=None):
    """relu / softmax (over the last axis) / None of ``x``."""
    if activation is None:
        return _finish(x, out)
    if activation not in ("relu", "softmax"):
        raise ValueError(f"unknown activation {activation!r}")
    x = _c(x)
    y = _out(out, x.shape)
    if y.size == 0:  # nothing to compute: no launch (a zero-sized grid is no launch at all)
        return y
    if activation == "relu":
        cuda.launch("relu_forward", _blocks(x.size), _THREADS, (x, y, x.size))
    else:
        cols = x.shape[-1] if x.ndim else 1
        rows = x.size // cols if cols else 0
        cuda.launch("softmax_forward", _blocks(rows), _THREADS, (x, y, rows, cols))
    return y


def activation_backward(dy, y, activation, out=None):
    """Gradient through an activation, from its output ``y``."""
    if activation is None:
        return _finish(dy, out)
    if activation not in ("relu", "softmax"):
        raise ValueError(f"unknown activation {activation!r}")
    dy, y = _c(dy), _c(y)
    if dy.shape != y.shape:
        raise ValueError(f"activation_backward: dy {dy.shape} and y {y.shape} differ")
    dx = _out(out, dy.shape)
    if dx.size == 0:
        return dx
    if activation == "relu":
        cuda.launch("relu_backward", _blocks(dy.size), _THREADS, (dy, y, dx, dy.size))
    else:
        cols = dy.shape[-1] if dy.ndim else 1
        rows = dy.size // cols if cols else 0
        cuda.launch("softmax_backward", _blocks(rows), _THREADS, (dy, y, dx, rows, cols))
    return dx


# ===================================================================================== conv2d
def conv2d_forward(x, w, b, stride, padding, activation, ctx=None, out=None):
    """y = act(conv(x, w) + b): x (N,H,W,C), w (KH,KW,C,F), b (F,) or None → y (N,P,Q,F)."""
    kh, kw, c, f = w.shape
    n, h, wd, xc, p, q = _window_geometry(x.shape, (kh, kw), stride, padding, "conv2d_forward")
    if xc != c:
        raise ValueError(f"conv2d_forward: x has {xc} channels, the kernel {w.shape} expects {c}")
    act = _fused(activation)
    x, w, b = _c(x), _c(w), (None if b is None else _c(b))
    y = _out(out, (n, p, q, f))
    tp, tq, tf = _CONV["CONV_TILE_P"], _CONV["CONV_TILE_Q"], _CONV["CONV_TILE_F"]
    patch, cc = _patch_channels(tp, tq, kh, kw, c, stride, "conv2d_forward")
    _image_grid(h * wd * c, n)  # checks the image size
    if y.size == 0:
        return y
    grid = (max(1, n * _cdiv(p, tp) * _cdiv(q, tq)), _cdiv(f, tf))
    cuda.launch("conv2d_forward", grid, (tf, tq),
                (x, w, b, y, n, h, wd, c, kh, kw, f, p, q, stride[0], stride[1], padding[0], padding[2],
                 act, cc), shared_mem=patch * cc)
    if activation == "softmax":
        activation_forward(y, "softmax", out=y)
    return y


def conv2d_backward_data(dy, w, x_shape, stride, padding, ctx=None, out=None):
    """dx (N,H,W,C) from dy (N,P,Q,F): each input element gathers the taps that read it."""
    kh, kw, c, f = w.shape
    n, h, wd, _, p, q = _window_geometry(x_shape, (kh, kw), stride, padding, "conv2d_backward_data")
    if dy.shape != (n, p, q, f):
        raise ValueError(f"conv2d_backward_data: dy must be {(n, p, q, f)}, got {dy.shape}")
    dy, w = _c(dy), _c(w)
    dx = _out(out, (n, h, wd, c))
    if dx.size == 0:
        return dx
    cuda.launch("conv2d_backward_data", _image_grid(h * wd * c, n), _THREADS,
                (dy, w, dx, n, h, wd, c, kh, kw, f, p, q, stride[0], stride[1], padding[0], padding[2]))
    return dx


def _filter_slices(pixels, blocks_per_slice):
    """(slices, pixels per slice) of conv2d_backward_filter's first pass: enough slices for about
    _FILTER_TARGET_BLOCKS blocks, none under _FILTER_MIN_SLICE pixels. A function of the shapes only, so
    the summation order, and the result, are the same on every run."""
    tile = _CONV["BWF_TILE_M"]
    pixels = max(pixels, 1)
    want = max(1, min(_cdiv(pixels, _FILTER_MIN_SLICE), _cdiv(_FILTER_TARGET_BLOCKS, blocks_per_slice), 65535))
    slice_len = _cdiv(_cdiv(pixels, want), tile) * tile
    return _cdiv(pixels, slice_len), slice_len


def conv2d_backward_filter(dy, x, w_shape, stride, padding, ctx=None, out_w=None, out_b=None):
    """(dw (KH,KW,C,F), db (F,)) from dy (N,P,Q,F) and the layer's input x: per-slice partial sums into a
    workspace (kept in ``ctx["work"]``), then a fixed-order sum of the slices."""
    kh, kw, c, f = w_shape
    n, h, wd, xc, p, q = _window_geometry(x.shape, (kh, kw), stride, padding, "conv2d_backward_filter")
    if xc != c or dy.shape != (n, p, q, f):
        raise ValueError(f"conv2d_backward_filter: x {x.shape} and dy {dy.shape} do not fit a kernel "
                         f"{tuple(w_shape)}")
    if n * p * q > _INT_MAX - _CONV["BWF_TILE_M"]:
        raise ValueError(f"conv2d_backward_filter: {n * p * q:,} output pixels are too many for one call "
                         "(at most about 2^31); use a smaller batch")
    dy, x = _c(dy), _c(x)
    dw = _out(out_w, w_shape, name="out_w")
    db = _out(out_b, (f,), name="out_b")
    if f == 0:  # dw and db empty
        return dw, db
    rows = kh * kw * c
    # (no input channels: dw is empty, db still the sum of dy; one row tile computes it)
    row_tiles, f_tiles = max(1, _cdiv(rows, _CONV["BWF_TILE_R"])), _cdiv(f, _CONV["BWF_TILE_F"])
    slices, slice_len = _filter_slices(n * p * q, row_tiles * f_tiles)
    work_shape = (slices, rows * f + f)
    work = _work(ctx, "work", work_shape)
    cuda.launch("conv2d_backward_filter", (row_tiles, f_tiles, slices),
                (_CONV["BWF_TILE_F"], _CONV["BWF_TILE_R"] // _CONV["BWF_ROWS_PER_THREAD"]),
                (dy, x, work, n, h, wd, c, kh, kw, f, p, q, stride[0], stride[1], padding[0], padding[2],
                 slice_len))
    cuda.launch("conv2d_backward_filter_reduce", _blocks(rows * f + f), _THREADS,
                (work, dw, db, rows * f, f, slices))
    return dw, db


# ===================================================================================== pooling
def _pool_args(x_shape, pool, stride, padding, what):
    n, h, wd, c, p, q = _window_geometry(x_shape, pool, stride, padding, what)
    return (n, h, wd, c, p, q), (n, h, wd, c, p, q, pool[0], pool[1], stride[0], stride[1], padding[0],
                                 padding[2])


def maxpool2d_forward(x, pool, stride, padding, out=None, out_idx=None):
    """(y (N,P,Q,C), idx) — idx (int8, N,P,Q,C) is the scan-order tap of each window's first maximum;
    a NaN in a window wins (the first NaN), as max-pooling in PyTorch and cuDNN does. ``out_idx``: an
    int8 array to write idx into (then nothing is allocated)."""
    if pool[0] * pool[1] > MAX_POOL_TAPS:
        raise ValueError(f"maxpool2d_forward: a {pool[0]}x{pool[1]} window has more taps than the int8 "
                         f"index holds ({MAX_POOL_TAPS})")
    (n, h, wd, c, p, q), dims = _pool_args(x.shape, pool, stride, padding, "maxpool2d_forward")
    x = _c(x)
    y = _out(out, (n, p, q, c))
    idx = _out(out_idx, (n, p, q, c), np.int8, name="out_idx")
    if y.size == 0:
        return y, idx
    cuda.launch("maxpool2d_forward", _image_grid(p * q * c, n), _THREADS, (x, y, idx) + dims)
    return y, idx


def maxpool2d_backward(dy, idx, x_shape, pool, stride, padding, out=None):
    """dx (N,H,W,C): each window's gradient goes to its first maximum only (a gather over windows)."""
    (n, h, wd, c, p, q), dims = _pool_args(x_shape, pool, stride, padding, "maxpool2d_backward")
    if dy.shape != (n, p, q, c) or idx.shape != dy.shape:
        raise ValueError(f"maxpool2d_backward: dy {dy.shape} and idx {idx.shape} must be {(n, p, q, c)}")
    dy, idx = _c(dy), _c(idx)
    dx = _out(out, (n, h, wd, c))
    if dx.size == 0:
        return dx
    cuda.launch("maxpool2d_backward", _image_grid(h * wd * c, n), _THREADS, (dy, idx, dx) + dims)
    return dx


def avgpool2d_forward(x, pool, stride, padding, out=None):
    """y (N,P,Q,C): the mean of each window over its real inputs ("same" padding is not counted)."""
    (n, h, wd, c, p, q), dims = _pool_args(x.shape, pool, stride, padding, "avgpool2d_forward")
    x = _c(x)
    y = _out(out, (n, p, q, c))
    if y.size == 0:
        return y
    cuda.launch("avgpool2d_forward", _image_grid(p * q * c, n), _THREADS, (x, y) + dims)
    return y


def avgpool2d_backward(dy, x_shape, pool, stride, padding, out=None):
    """dx (N,H,W,C): each window's gradient shared equally among its real inputs."""
    (n, h, wd, c, p, q), dims = _pool_args(x_shape, pool, stride, padding, "avgpool2d_backward")
    if dy.shape != (n, p, q, c):
        raise ValueError(f"avgpool2d_backward: dy must be {(n, p, q, c)}, got {dy.shape}")
    dy = _c(dy)
    dx = _out(out, (n, h, wd, c))
    if dx.size == 0:
        return dx
    cuda.launch("avgpool2d_backward", _image_grid(h * wd * c, n), _THREADS, (dy, dx) + dims)
    return dx


def global_avgpool2d_forward(x, out=None):
    """y (N,C): the mean over H and W."""
    n, h, wd, c = x.shape
    x = _c(x)
    y = _out(out, (n, c))
    _, images = _image_grid(h * wd * c, n)  # checks the image size
    if y.size == 0:
        return y
    cuda.launch("global_avgpool2d_forward", (_blocks(c), images), _THREADS,
                (x, y, n, h * wd, c, DTYPE(h * wd)))
    return y


def global_avgpool2d_backward(dy, x_shape, out=None):
    """dx (N,H,W,C) = dy / (H·W) everywhere."""
    n, h, wd, c = x_shape
    if dy.shape != (n, c):
        raise ValueError(f"global_avgpool2d_backward: dy must be {(n, c)}, got {dy.shape}")
    dy = _c(dy)
    dx = _out(out, (n, h, wd, c))
    if dx.size == 0:
        return dx
    cuda.launch("global_avgpool2d_backward", _image_grid(h * wd * c, n), _THREADS,
                (dy, dx, n, h * wd, c, DTYPE(h * wd)))
    return dx


# ===================================================================================== conv2d + max-pool
_FUSED = cuda.kernel_constants("conv_pool.cu")


def conv2d_maxpool_forward(x, w, b, stride, padding, activation, ctx=None, out=None, out_idx=None):
    """(y, idx) = maxpool2d_forward(conv2d_forward(x, w, b, ...), (2, 2), (2, 2), valid) in one kernel
    (kernels/conv_pool.cu, the same bits as the pair); y (N,PP,PQ,F), idx int8."""
    if activation not in (None, "relu"):
        raise ValueError(f"conv2d_maxpool_forward: activation must be None or 'relu', got {activation!r}")
    kh, kw, c, f = w.shape
    n, h, wd, xc, p, q = _window_geometry(x.shape, (kh, kw), stride, padding, "conv2d_maxpool_forward")
    if xc != c:
        raise ValueError(f"conv2d_maxpool_forward: x has {xc} channels, the kernel {w.shape} expects {c}")
    pp, pq = p // 2, q // 2
    tpp, tpq, tf = _FUSED["FUSED_TILE_PP"], _FUSED["FUSED_TILE_PQ"], _FUSED["FUSED_TILE_F"]
    patch, cc = _patch_channels(2 * tpp, 2 * tpq, kh, kw, c, stride, "conv2d_maxpool_forward")
    _image_grid(h * wd * c, n)  # checks the image size
    x, w, b = _c(x), _c(w), (None if b is None else _c(b))
    y = _out(out, (n, pp, pq, f))
    idx = _out(out_idx, (n, pp, pq, f), np.int8, name="out_idx")
    if y.size == 0:  # (also a 1-row or 1-column convolution output: nothing to pool)
        return y, idx
    tiles = n * _cdiv(pp, tpp) * _cdiv(pq, tpq)
    cuda.launch("conv2d_relu_maxpool_forward", (max(1, tiles), _cdiv(f, tf)), (tf, tpq),
                (x, w, b, y, idx, n, h, wd, c, kh, kw, f, pp, pq, stride[0], stride[1], padding[0], padding[2],
                 _fused(activation), cc), shared_mem=patch * cc)
    return y, idx


def conv2d_maxpool_backward(dy, y, idx, x, w, stride, padding, activation, ctx=None, out_w=None,
                            out_b=None, need_dx=True, out=None):
    """The backward of conv2d_maxpool_forward from the pooled gradient dy: maxpool2d_relu_backward
    (kernels/conv_pool.cu) gives the convolution's output gradient dz (kept in ``ctx["dz"]``), then
    conv2d_backward_filter and, when ``need_dx``, conv2d_backward_data (returned; else None)."""
    if activation not in (None, "relu"):
        raise ValueError(f"conv2d_maxpool_backward: activation must be None or 'relu', got {activation!r}")
    kh, kw, c, f = w.shape
    n, h, wd, _, p, q = _window_geometry(x.shape, (kh, kw), stride, padding, "conv2d_maxpool_backward")
    pp, pq = p // 2, q // 2
    if dy.shape != (n, pp, pq, f) or y.shape != dy.shape or idx.shape != dy.shape:
        raise ValueError(f"conv2d_maxpool_backward: dy {dy.shape}, y {y.shape} and idx {idx.shape} must be "
                         f"{(n, pp, pq, f)}")
    dz = _work(ctx, "dz", (n, p, q, f))
    dy, y, idx = _c(dy), _c(y), _c(idx)
    if dz.size:
        cuda.launch("maxpool2d_relu_backward", _image_grid(p * q * f, n), _THREADS,
                    (dy, idx, y, dz, n, p, q, f, pp, pq, 2, 2, 2, 2, 0, 0, _fused(activation)))
    conv2d_backward_filter(dz, x, w.shape, stride, padding, ctx=ctx, out_w=out_w, out_b=out_b)
    if not need_dx:
        return None
    return conv2d_backward_data(dz, w, x.shape, stride, padding, ctx=ctx, out=out)


# ===================================================================================== dense
def _gemm_grid(m, cols):
    """(row tiles, column tiles capped at the grid-y limit: the kernels loop over the rest)."""
    return max(1, _cdiv(m, _GEMM_TILE)), max(1, min(_cdiv(cols, _GEMM_TILE), 65535))


_GEMM_BLOCK = (_GEMM_TILE // 2, _GEMM_TILE // 2)


def dense_forward(x, w, b, activation, out=None):
    """y = act(x @ w + b): x (N,IN), w (IN,UNITS), b (UNITS,) or None."""
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"dense_forward: x {x.shape} and w {w.shape} do not multiply")
    act = _fused(activation)
    x, w, b = _c(x), _c(w), (None if b is None else _c(b))
    n, units = x.shape[0], w.shape[1]
    y = _out(out, (n, units))
    if y.size == 0:
        return y
    cuda.launch("dense_forward", _gemm_grid(n, units), _GEMM_BLOCK, (x, w, b, y, n, w.shape[0], units, act))
    if activation == "softmax":
        activation_forward(y, "softmax", out=y)
    return y


def dense_backward_data(dy, w, out=None):
    """dx (N,IN) = dy @ w.T."""
    if dy.ndim != 2 or w.ndim != 2 or dy.shape[1] != w.shape[1]:
        raise ValueError(f"dense_backward_data: dy {dy.shape} and w {w.shape} do not fit")
    dy, w = _c(dy), _c(w)
    n, (inputs, units) = dy.shape[0], w.shape
    dx = _out(out, (n, inputs))
    if dx.size == 0:
        return dx
    cuda.launch("dense_backward_data", _gemm_grid(n, inputs), _GEMM_BLOCK, (dy, w, dx, n, inputs, units))
    return dx


def dense_backward_weights(dy, x, out_w=None, out_b=None):
    """(dw (IN,UNITS), db (UNITS,)) = (x.T @ dy, sum of dy over the batch)."""
    if dy.ndim != 2 or x.ndim != 2 or dy.shape[0] != x.shape[0]:
        raise ValueError(f"dense_backward_weights: dy {dy.shape} and x {x.shape} do not fit")
    dy, x = _c(dy), _c(x)
    (n, units), inputs = dy.shape, x.shape[1]
    dw = _out(out_w, (inputs, units), name="out_w")
    db = _out(out_b, (units,), name="out_b")
    if dw.size:
        cuda.launch("dense_backward_weights", _gemm_grid(inputs, units), _GEMM_BLOCK, (dy, x, dw, n, inputs, units))
    if db.size:
        cuda.launch("dense_backward_bias", _blocks(units), _THREADS, (dy, db, n, units))
    return dw, db


# ===================================================================================== dropout
def dropout_forward(x, rate, seed, out=None):
    """(y, mask): keep each element with probability 1 - rate and scale it by 1 / (1 - rate). The random
    numbers come from a counter-based hash of (seed, element index): deterministic for a given seed (a
    different stream from the NumPy engine's)."""
    if seed is None:
        seed = int(np.random.default_rng().integers(2**63))
    if int(seed) < 0:
        raise ValueError(f"dropout_forward: the seed must be non-negative, got {seed}")
    x = _c(x)
    y = _out(out, x.shape)
    mask = cuda.empty(x.shape, DTYPE)
    if y.size == 0:
        return y, mask
    scale = DTYPE(1.0) / DTYPE(1.0 - rate)
    cuda.launch("dropout_forward", _blocks(x.size), _THREADS,
                (x, y, mask, x.size, DTYPE(rate), scale, int(seed) % 2**64))
    return y, mask


def dropout_backward(dy, mask, out=None):
    if dy.shape != mask.shape:
        raise ValueError(f"dropout_backward: dy {dy.shape} and mask {mask.shape} differ")
    dy, mask = _c(dy), _c(mask)
    dx = _out(out, dy.shape)
    if dx.size == 0:
        return dx
    cuda.launch("dropout_backward", _blocks(dy.size), _THREADS, (dy, mask, dx, dy.size))
    return dx


# ===================================================================================== losses
EPSILON = 1e-7  # Keras's backend epsilon; kernels/loss.cu defines the same (the CI test checks)


def _loss_kernel(name, sparse):
    return f"{name}_{'sparse' if sparse else 'onehot'}"


def crossentropy_forward(p, labels, sparse):
    """Per-sample cross-entropy (N,) of probabilities p (N,K), as Keras computes it: rows renormalised
    to sum to 1 and clipped to [1e-7, 1 - 1e-7]. labels: one-hot (N,K) or, when sparse, integers (N,).
    A sparse label outside [0, K) gives a NaN loss (nothing is checked on the host)."""
    n, k = _rows(p, "crossentropy_forward")
    p = _c(p)
    loss = cuda.empty((n,), DTYPE)
    labels = _labels(labels, p, sparse)
    if n == 0:
        return loss
    cuda.launch(_loss_kernel("crossentropy_forward", sparse), _blocks(n), _THREADS,
                (p, labels, loss, n, k))
    return loss


def softmax_crossentropy_backward(p, labels, sparse, out=None):
    """Gradient of the mean cross-entropy w.r.t. the logits of a softmax output p: (p - y) / N."""
    n, k = _rows(p, "softmax_crossentropy_backward")
    p = _c(p)
    dp = _out(out, (n, k))
    labels = _labels(labels, p, sparse)
    if n == 0:
        return dp
    cuda.launch(_loss_kernel("softmax_crossentropy_backward", sparse), _blocks(n), _THREADS, (p, labels, dp, n, k))
    return dp


def crossentropy_backward(p, labels, sparse, out=None):
    """Gradient of the mean cross-entropy w.r.t. probabilities p (used when the output layer is not a
    softmax): through the renormalisation and the clip (zero where clipping is active)."""
    n, k = _rows(p, "crossentropy_backward")
    p = _c(p)
    dp = _out(out, (n, k))
    labels = _labels(labels, p, sparse)
    if n == 0:
        return dp
    cuda.launch(_loss_kernel("crossentropy_backward", sparse), _blocks(n), _THREADS, (p, labels, dp, n, k))
    return dp


def count_correct(p, labels, sparse):
    """How many rows of p have their arg-max at the true class (first maximum wins ties), as a 0-d int64
    device array (reading it is the caller's choice of when to wait for the GPU)."""
    n, k = _rows(p, "count_correct")
    p = _c(p)
    count = cuda.empty((), np.int64)
    cuda.launch(_loss_kernel("count_correct", sparse), 1, _THREADS, (p, _labels(labels, p, sparse), count, n, k))
    return count


# ===================================================================================== optimizers
def _state(what, w, *arrays):
    """Checks that the gradient and state arrays have as many elements as w."""
    for a in arrays:
        if a is not None and a.size != w.size:
            raise ValueError(f"{what}: arrays of {w.size} and {a.size} elements")


def sgd_update(w, g, m, lr, momentum, nesterov):
    """Keras SGD, in place: m = momentum·m − lr·g; w += m (Nesterov: w += momentum·m − lr·g)."""
    _state("sgd_update", w, g, m)
    if momentum != 0 and m is None:
        raise ValueError("sgd_update: momentum needs the state array m")
    if w.size == 0:
        return
    cuda.launch("sgd_update", _blocks(w.size), _THREADS,
                (w, _c(g), m, w.size, DTYPE(lr), DTYPE(momentum), int(bool(nesterov))))


def rmsprop_update(w, g, v, mom, avg, lr, rho, epsilon, momentum, centered):
    """Keras RMSprop, in place: v = rho·v + (1 − rho)·g²; w −= lr·g / sqrt(v + epsilon) — epsilon
    inside the square root. centered subtracts avg², the running mean of g, squared; momentum > 0 keeps
    mom = momentum·mom + step and applies mom."""
    _state("rmsprop_update", w, g, v, mom, avg)
    if (momentum > 0 and mom is None) or (centered and avg is None):
        raise ValueError("rmsprop_update: momentum needs mom, centered needs avg")
    if w.size == 0:
        return
    rho = DTYPE(rho)
    cuda.launch("rmsprop_update", _blocks(w.size), _THREADS,
                (w, _c(g), v, mom if momentum > 0 else None, avg if centered else None, w.size, DTYPE(lr),
                 rho, DTYPE(1) - rho, DTYPE(epsilon), DTYPE(momentum), int(bool(centered))))


def adam_update(w, g, m, v, lr, beta_1, beta_2, epsilon, t):
    """Keras Adam step t (1-based), in place: m += (g − m)(1 − β1); v += (g² − v)(1 − β2);
    w −= lr·sqrt(1 − β2^t)/(1 − β1^t) · m / (sqrt(v) + epsilon)."""
    _state("adam_update", w, g, m, v)
    if w.size == 0:
        return
    alpha = DTYPE(lr * np.sqrt(1 - beta_2 ** t) / (1 - beta_1 ** t))
    cuda.launch("adam_update", _blocks(w.size), _THREADS,
                (w, _c(g), m, v, w.size, alpha, DTYPE(1 - beta_1), DTYPE(1 - beta_2), DTYPE(epsilon)))
