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
# shared with the NumPy engine: shape rules, how an activation is named, the host-side transform builders
from .numpy_ops import MAX_POOL_TAPS, adam_step_size, geometry, out_size, weight_decay_factor  # noqa: F401
from .numpy_ops import _bn_rows, _depthwise_geometry, _fold_channels, _padded_shape  # (and their checks)
from .numpy_ops import SHARED_WORK, _work_key  # noqa: F401  (work arrays in a shared ctx)
from .numpy_ops import ACTIVATIONS, activation_needs_input, split_activation  # noqa: F401
from .numpy_ops import (FILL_MODES, INTERPOLATIONS, check_step_row, check_transform_options,  # noqa: F401
                        rotation_transforms, translation_transforms, zoom_transforms)

xp = cupy
DTYPE = np.float32
READS_WAIT = True  # reading a result on the host waits for the device: do it rarely
OUT_BUFFERS = True  # the layers keep out= buffers, so a training step allocates nothing (and can be captured)

_CONV = cuda.kernel_constants("conv2d.cu")
_ACT = cuda.kernel_constants("activations.cu")
_IMAGE = cuda.kernel_constants("image.cu")
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


def _zero(a):
    """``a`` set to zero (a memset: no kernel)."""
    a.fill(0)
    return a


def _finish(y, out):
    if out is None:
        return y
    out[...] = y
    return out


def _fused(activation):
    """The activation code a conv/dense kernel applies itself: relu. The others (checked here) run afterwards,
    as activation_forward on the output (_activate_after)."""
    name, _ = split_activation(activation)
    return _CONV["ACT_RELU"] if name == "relu" else _CONV["ACT_NONE"]


def _activate_after(y, activation):
    """Applies in place the activation a conv/dense kernel did not fuse (all but None and relu)."""
    if activation is not None and activation != "relu":
        activation_forward(y, activation, out=y)


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
    """A device work array kept in ``ctx[key]`` for the next call with the same shape (in a ctx shared by several
    calls, ``SHARED_WORK``, one per shape)."""
    key = _work_key(ctx, key, shape)
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
_ACT_CODES = {"sigmoid": "ACT_SIGMOID", "tanh": "ACT_TANH", "elu": "ACT_ELU", "selu": "ACT_SELU",
              "leaky_relu": "ACT_LEAKY_RELU", "softplus": "ACT_SOFTPLUS", "silu": "ACT_SILU", "gelu": "ACT_GELU",
              "relu6": "ACT_RELU6"}


def _elementwise(name, param):
    """(code, float parameter) of an elementwise activation for kernels/activations.cu."""
    if name == "gelu" and param:
        return _ACT["ACT_GELU_TANH"], 0.0
    return _ACT[_ACT_CODES[name]], float(param or 0.0)


def _row_shape(a):
    """(rows, cols) of the softmax kernels: rows over the last axis."""
    cols = a.shape[-1] if a.ndim else 1
    return (a.size // cols if cols else 0), cols


def activation_forward(x, activation, out=None):
    """The activation of ``x`` (softmax over the last axis, the others elementwise; numpy_ops lists their
    formulas); ``activation`` as split_activation reads it. ``out`` may be ``x``."""
    name, param = split_activation(activation)
    if name is None:
        return _finish(x, out)
    x = _c(x)
    y = _out(out, x.shape)
    if y.size == 0:  # nothing to compute: no launch (a zero-sized grid is no launch at all)
        return y
    if name == "relu":
        cuda.launch("relu_forward", _blocks(x.size), _THREADS, (x, y, x.size))
    elif name == "softmax":
        rows, cols = _row_shape(x)
        cuda.launch("softmax_forward", _blocks(rows), _THREADS, (x, y, rows, cols))
    else:
        code, value = _elementwise(name, param)
        cuda.launch("elementwise_activation_forward", _blocks(x.size), _THREADS, (x, y, x.size, code, value))
    return y


def activation_backward(dy, y, activation, out=None, x=None):
    """Gradient through an activation, from its output ``y``; silu/swish and gelu need its input ``x``
    instead (activation_needs_input), a ValueError without it."""
    name, param = split_activation(activation)
    if name is None:
        return _finish(dy, out)
    from_input = name in ("silu", "gelu")
    given = x if from_input else y
    if given is None:
        raise ValueError(f"activation_backward: {name}'s gradient needs the activation's "
                         + ("input: pass x=" if from_input else "output y, got None"))
    dy, given = _c(dy), _c(given)
    if dy.shape != given.shape:
        raise ValueError(f"activation_backward: dy {dy.shape} and {'x' if from_input else 'y'} {given.shape} "
                         "differ")
    dx = _out(out, dy.shape)
    if dx.size == 0:
        return dx
    if name == "relu":
        cuda.launch("relu_backward", _blocks(dy.size), _THREADS, (dy, given, dx, dy.size))
    elif name == "softmax":
        rows, cols = _row_shape(dy)
        cuda.launch("softmax_backward", _blocks(rows), _THREADS, (dy, given, dx, rows, cols))
    else:
        code, value = _elementwise(name, param)
        y_or_null, x_or_null = (None, given) if from_input else (given, None)
        cuda.launch("elementwise_activation_backward", _blocks(dy.size), _THREADS,
                    (dy, y_or_null, x_or_null, dx, dy.size, code, value))
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
    _activate_after(y, activation)
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


def conv2d_backward(dy, x, w, stride, padding, ctx=None, out=None, out_w=None, out_b=None, need_dx=True):
    """(dx or None, dw, db) of one convolution call: conv2d_backward_filter and, with ``need_dx``,
    conv2d_backward_data."""
    dw, db = conv2d_backward_filter(dy, x, w.shape, stride, padding, ctx, out_w, out_b)
    return (conv2d_backward_data(dy, w, x.shape, stride, padding, ctx, out) if need_dx else None), dw, db


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


def global_maxpool2d_forward(x, out=None, out_idx=None):
    """(y (N,C), idx (int32, N,C)): each channel's maximum over H and W; idx is h·W + w of its first maximum
    in row-major scan order (a NaN wins: the first NaN), as maxpool2d_forward's rule."""
    n, h, wd, c = x.shape
    if h * wd == 0:
        raise ValueError(f"global_maxpool2d_forward: an image of {h}x{wd} cells has no maximum")
    x = _c(x)
    y = _out(out, (n, c))
    idx = _out(out_idx, (n, c), np.int32, name="out_idx")
    _, images = _image_grid(h * wd * c, n)  # checks the image size
    cuda.launch("global_maxpool2d_forward", (_blocks(c), images), _THREADS, (x, y, idx, n, h * wd, c))
    return y, idx


def global_maxpool2d_backward(dy, idx, x_shape, out=None):
    """dx (N,H,W,C): each channel's gradient goes to its first maximum only (a gather)."""
    n, h, wd, c = x_shape
    if dy.shape != (n, c) or idx.shape != (n, c):
        raise ValueError(f"global_maxpool2d_backward: dy {dy.shape} and idx {idx.shape} must be {(n, c)}")
    dy, idx = _c(dy), _c(idx)
    dx = _out(out, (n, h, wd, c))
    if dx.size == 0:
        return dx
    cuda.launch("global_maxpool2d_backward", _image_grid(h * wd * c, n), _THREADS, (dy, idx, dx, n, h * wd, c))
    return dx


# ===================================================================================== zero padding
def zero_padding2d_forward(x, padding, out=None):
    """y (N, top+H+bottom, left+W+right, C): x surrounded by zeros (Keras's ZeroPadding2D)."""
    n, p, q, c = _padded_shape(x.shape, padding, None, "zero_padding2d_forward")
    _, h, wd, _ = x.shape
    x = _c(x)
    y = _out(out, (n, p, q, c))
    if y.size == 0:
        return y
    cuda.launch("zero_padding2d_forward", _image_grid(p * q * c, n), _THREADS,
                (x, y, n, h, wd, c, p, q, padding[0], padding[2]))
    return y


def zero_padding2d_backward(dy, x_shape, padding, out=None):
    """dx (N,H,W,C): the gradient of the cells that hold x."""
    n, p, q, c = _padded_shape(x_shape, padding, dy.shape, "zero_padding2d_backward")
    _, h, wd, _ = x_shape
    dy = _c(dy)
    dx = _out(out, x_shape)
    _image_grid(p * q * c, n)  # checks dy's image size
    if dx.size == 0:
        return dx
    cuda.launch("zero_padding2d_backward", _image_grid(h * wd * c, n), _THREADS,
                (dy, dx, n, h, wd, c, p, q, padding[0], padding[2]))
    return dx


# ===================================================================================== batch normalization
# ops_numpy says what each op computes (Keras 3's BatchNormalization over the last axis); kernels/batchnorm.cu
# how: every sum over the M rows is a fixed-order two-pass reduction (per-slice partial sums, then the slices
# in order), with the slices of conv2d_backward_filter's rule, so results are the same bits on every run.
_BN = cuda.kernel_constants("batchnorm.cu")
_BN_BLOCK = (_BN["BN_TILE_C"], _BN["BN_ROW_LANES"])


def _bn_launch_shape(x2, what):
    """(grid, slices, rows per slice) of the first-pass kernels over x2 (M, C)."""
    m, c = x2.shape
    if m > _INT_MAX - _CONV["BWF_TILE_M"]:
        raise ValueError(f"{what}: {m:,} rows are too many for one call (at most about 2^31); use a smaller batch")
    tiles = _cdiv(c, _BN["BN_TILE_C"])
    slices, rows = _filter_slices(m, tiles)
    return (tiles, slices), slices, rows


def _vector(v):
    return None if v is None else _c(v)


def _whole_batch(exchange, what):
    if exchange is not None:
        raise ValueError(f"{what}: exchange= (x as one part of a batch split over processes) is the NumPy engine's; "
                         "on the GPU the whole batch is one array")


def batchnorm_forward_training(x, gamma, beta, moving_mean, moving_var, momentum, epsilon, ctx=None, out=None,
                               out_mean=None, out_inv_std=None, exchange=None):
    """(y, mean, inv_std) with the batch's statistics (mean, inv_std: (C,), kept for batchnorm_backward);
    moving_mean and moving_var (C,) are updated in place (C-contiguous float32 device arrays). The partial
    sums' workspace is kept in ``ctx["bn_work"]``. ``exchange`` (a part of the batch) is the NumPy engine's
    two-process step only."""
    _whole_batch(exchange, "batchnorm_forward_training")
    x2, m, c = _bn_rows(x, "batchnorm_forward_training", True, gamma=gamma, beta=beta, moving_mean=moving_mean,
                        moving_var=moving_var)
    x2, gamma, beta = _c(x2), _vector(gamma), _vector(beta)
    grid, slices, rows = _bn_launch_shape(x2, "batchnorm_forward_training")
    y = _out(out, x.shape)
    mean = _out(out_mean, (c,), name="out_mean")
    inv_std = _out(out_inv_std, (c,), name="out_inv_std")
    work = _work(ctx, "bn_work", (slices, c))
    if y.size == 0:
        return y, mean, inv_std  # (no channels: nothing to normalise)
    cuda.launch("batchnorm_partial_sums", grid, _BN_BLOCK, (x2, None, work, m, c, rows))
    cuda.launch("batchnorm_mean", _blocks(c), _THREADS, (work, mean, slices, c, DTYPE(m)))
    cuda.launch("batchnorm_partial_sums", grid, _BN_BLOCK, (x2, mean, work, m, c, rows))
    cuda.launch("batchnorm_variance_update", _blocks(c), _THREADS,
                (work, mean, inv_std, moving_mean, moving_var, slices, c, DTYPE(m), DTYPE(momentum),
                 DTYPE(1 - momentum), DTYPE(epsilon)))
    cuda.launch("batchnorm_normalize", _blocks(x2.size), _THREADS, (x2, mean, inv_std, gamma, beta, y, x2.size, c))
    return y, mean, inv_std


def batchnorm_forward_inference(x, gamma, beta, moving_mean, moving_var, epsilon, out=None, out_inv_std=None):
    """(y, inv_std) with the moving statistics; inv_std (C,) is what batchnorm_backward needs (with
    moving_mean as the mean) when the layer trains in inference mode."""
    x2, m, c = _bn_rows(x, "batchnorm_forward_inference", False, gamma=gamma, beta=beta, moving_mean=moving_mean,
                        moving_var=moving_var)
    x2, gamma, beta = _c(x2), _vector(gamma), _vector(beta)
    y = _out(out, x.shape)
    inv_std = _out(out_inv_std, (c,), name="out_inv_std")
    if y.size == 0:
        return y, inv_std
    cuda.launch("batchnorm_inverse_std", _blocks(c), _THREADS, (_c(moving_var), inv_std, c, DTYPE(epsilon)))
    cuda.launch("batchnorm_normalize", _blocks(x2.size), _THREADS,
                (x2, _c(moving_mean), inv_std, gamma, beta, y, x2.size, c))
    return y, inv_std


def batchnorm_backward(dy, x, gamma, mean, inv_std, training, ctx=None, out=None, out_gamma=None, out_beta=None,
                       exchange=None):
    """(dx, dgamma, dbeta) from dy and the forward's x, mean and inv_std, per channel with x̂ = (x − mean)·inv_std:
    dbeta = Σ dy, dgamma = Σ dy·x̂; ``training`` (batch statistics, functions of x):
    dx = gamma·inv_std·(dy − dbeta/M − x̂·dgamma/M); else (moving statistics) dx = gamma·inv_std·dy. The
    partial sums' workspace is kept in ``ctx["bn_work_backward"]``."""
    _whole_batch(exchange, "batchnorm_backward")
    x2, m, c = _bn_rows(x, "batchnorm_backward", False, gamma=gamma, mean=mean, inv_std=inv_std)
    if dy.shape != x.shape:
        raise ValueError(f"batchnorm_backward: dy {dy.shape} and x {x.shape} differ")
    dy, x2, gamma, mean, inv_std = _c(dy), _c(x2), _vector(gamma), _c(mean), _c(inv_std)
    grid, slices, rows = _bn_launch_shape(x2, "batchnorm_backward")
    dx = _out(out, x.shape)
    dgamma = _out(out_gamma, (c,), name="out_gamma")
    dbeta = _out(out_beta, (c,), name="out_beta")
    work = _work(ctx, "bn_work_backward", (slices, 2 * c))
    cuda.launch("batchnorm_backward_partial_sums", grid, _BN_BLOCK, (dy, x2, mean, inv_std, work, m, c, rows))
    cuda.launch("batchnorm_backward_reduce", _blocks(c), _THREADS, (work, dgamma, dbeta, slices, c))
    cuda.launch("batchnorm_backward_data", _blocks(x2.size), _THREADS,
                (dy, x2, mean, inv_std, gamma, dgamma, dbeta, dx, x2.size, c, DTYPE(m), int(bool(training))))
    return dx, dgamma, dbeta


def batchnorm_fold(w, b, gamma, beta, moving_mean, moving_var, epsilon, out_w=None, out_b=None):
    """(w', b'): a convolution's kernel w (..., F) and bias b (F,) or None with an inference-mode batch normalization
    of its F output channels folded in (conv(x, w') + b' = BN(conv(x, w) + b) up to rounding):
    s = gamma / sqrt(moving_var + epsilon), w' = w·s, b' = (b − moving_mean)·s + beta. One kernel launch."""
    f = _fold_channels(w, b, gamma=gamma, beta=beta, moving_mean=moving_mean, moving_var=moving_var)
    w, b, gamma, beta = _c(w), _vector(b), _vector(gamma), _vector(beta)
    folded_w = _out(out_w, w.shape, name="out_w")
    folded_b = _out(out_b, (f,), name="out_b")
    cuda.launch("batchnorm_fold", _blocks(w.size + f), _THREADS,
                (w, b, gamma, beta, _c(moving_mean), _c(moving_var), folded_w, folded_b, w.size, f, DTYPE(epsilon)))
    return folded_w, folded_b


# ===================================================================================== depthwise conv2d
# Keras's DepthwiseConv2D (kernels/depthwise_conv2d.cu): output channel c·DM + m is input channel c convolved
# with w[:, :, c, m].
def depthwise_conv2d_forward(x, w, b, stride, padding, activation, ctx=None, out=None):
    """y = act(depthwise(x, w) + b): x (N,H,W,C), w (KH,KW,C,DM), b (C·DM,) or None → y (N,P,Q,C·DM)."""
    n, h, wd, c, dm, p, q = _depthwise_geometry(x.shape, w.shape, stride, padding, "depthwise_conv2d_forward", b)
    act = _fused(activation)
    x, w, b = _c(x), _c(w), _vector(b)
    y = _out(out, (n, p, q, c * dm))
    _image_grid(h * wd * c, n)  # checks the input image's size
    if y.size == 0:
        return y
    cuda.launch("depthwise_conv2d_forward", _image_grid(p * q * c * dm, n), _THREADS,
                (x, w, b, y, n, h, wd, c, w.shape[0], w.shape[1], dm, p, q, stride[0], stride[1], padding[0],
                 padding[2], act))
    if activation == "softmax":
        activation_forward(y, "softmax", out=y)
    return y


def depthwise_conv2d_backward_data(dy, w, x_shape, stride, padding, ctx=None, out=None):
    """dx (N,H,W,C) from dy (N,P,Q,C·DM): each input element gathers the taps and multipliers that read it."""
    n, h, wd, c, dm, p, q = _depthwise_geometry(x_shape, w.shape, stride, padding, "depthwise_conv2d_backward_data",
                                                dy=dy)
    dy, w = _c(dy), _c(w)
    dx = _out(out, x_shape)
    _image_grid(p * q * c * dm, n)  # checks dy's image size
    if dx.size == 0:
        return dx
    cuda.launch("depthwise_conv2d_backward_data", _image_grid(h * wd * c, n), _THREADS,
                (dy, w, dx, n, h, wd, c, w.shape[0], w.shape[1], dm, p, q, stride[0], stride[1], padding[0],
                 padding[2]))
    return dx


def depthwise_conv2d_backward_filter(dy, x, w_shape, stride, padding, ctx=None, out_w=None, out_b=None):
    """(dw (KH,KW,C,DM), db (C·DM,)) from dy (N,P,Q,C·DM) and the layer's input x: per-slice partial sums into
    a workspace (kept in ``ctx["depthwise_work"]``), then conv2d's fixed-order sum of the slices."""
    n, h, wd, c, dm, p, q = _depthwise_geometry(x.shape, w_shape, stride, padding,
                                                "depthwise_conv2d_backward_filter", dy=dy)
    kh, kw, k = w_shape[0], w_shape[1], c * dm
    if n * p * q > _INT_MAX - _CONV["BWF_TILE_M"]:
        raise ValueError(f"depthwise_conv2d_backward_filter: {n * p * q:,} output pixels are too many for one "
                         "call (at most about 2^31); use a smaller batch")
    dy, x = _c(dy), _c(x)
    row = (kh * kw + 1) * k  # one slice's partial sums: dw, then db
    slices, slice_len = _filter_slices(n * p * q, _cdiv(row, _THREADS))
    work = _work(ctx, "depthwise_work", (slices, row))
    dw = _out(out_w, w_shape, name="out_w")
    db = _out(out_b, (k,), name="out_b")
    cuda.launch("depthwise_conv2d_backward_filter", (_cdiv(row, _THREADS), slices), _THREADS,
                (dy, x, work, n, h, wd, c, kh, kw, dm, p, q, stride[0], stride[1], padding[0], padding[2], slice_len))
    cuda.launch("conv2d_backward_filter_reduce", _blocks(row), _THREADS, (work, dw, db, kh * kw * k, k, slices))
    return dw, db


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
    _activate_after(y, activation)
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


# ===================================================================================== merging
def add(a, b, out=None):
    """y = a + b (same shapes; ``out`` may be ``a``)."""
    if a.shape != b.shape:
        raise ValueError(f"add: shapes {a.shape} and {b.shape} differ")
    a, b = _c(a), _c(b)
    y = _out(out, a.shape)
    if y.size:
        cuda.launch("add_forward", _blocks(y.size), _THREADS, (a, b, y, y.size))
    return y


def _columns(shape, axis):
    """(outer, inner) of an array seen as rows of everything from ``axis`` on."""
    outer = int(np.prod(shape[:axis], dtype=np.int64))
    return outer, int(np.prod(shape[axis:], dtype=np.int64))


def concat(xs, axis, out=None):
    """The arrays ``xs`` joined along ``axis`` (an axis of the whole array, batch included)."""
    first = xs[0].shape
    if not 0 <= axis < len(first) or any(x.ndim != len(first) or x.shape[:axis] + x.shape[axis + 1:]
                                         != first[:axis] + first[axis + 1:] for x in xs):
        raise ValueError(f"concat: arrays {[x.shape for x in xs]} do not join along axis {axis}")
    shape = first[:axis] + (sum(x.shape[axis] for x in xs),) + first[axis + 1:]
    y = _out(out, shape)
    outer, whole = _columns(shape, axis)
    offset = 0
    for x in xs:
        x = _c(x)
        inner = _columns(x.shape, axis)[1]
        if x.size:
            cuda.launch("copy_into_columns", _blocks(x.size), _THREADS, (x, y, outer, inner, whole, offset))
        offset += inner
    return y


def split(dy, sizes, axis, outs=None):
    """concat's backward: ``dy`` cut along ``axis`` into pieces of ``sizes`` (a list of arrays)."""
    if not 0 <= axis < dy.ndim or sum(sizes) != dy.shape[axis]:
        raise ValueError(f"split: sizes {list(sizes)} do not add up to axis {axis} of {dy.shape}")
    dy = _c(dy)
    outer, whole = _columns(dy.shape, axis)
    pieces, offset = [], 0
    for i, size in enumerate(sizes):
        shape = dy.shape[:axis] + (size,) + dy.shape[axis + 1:]
        part = _out(None if outs is None else outs[i], shape, name=f"outs[{i}]")
        inner = _columns(shape, axis)[1]
        if part.size:
            cuda.launch("copy_from_columns", _blocks(part.size), _THREADS, (dy, part, outer, inner, whole, offset))
        pieces.append(part)
        offset += inner
    return pieces


# ===================================================================================== dropout
def dropout_forward(x, rate, seeds, step, slot, out=None, out_mask=None, offset=0):
    """(y, mask): keep each element with probability 1 - rate and scale it by 1 / (1 - rate). The mask's seed
    is ``seeds[step[0], slot]``: ``seeds`` a (steps, slots) uint64 table of per-step seeds, ``step`` a (1,)
    int32 counter (device arrays, so a captured step reads a new seed at every replay). The random numbers
    come from a counter-based hash of (seed, element index): deterministic for a given seed (a different
    stream from the NumPy engine's). ``offset``: x's first image is image ``offset`` of the whole batch
    whose mask this is part of (numpy_ops states it)."""
    if seeds.ndim != 2 or not 0 <= slot < seeds.shape[1] or step.shape != (1,):
        raise ValueError(f"dropout_forward: seeds must be (steps, slots) with slot {slot} < slots, and step (1,); "
                         f"got {seeds.shape} and {step.shape}")
    x = _c(x)
    y = _out(out, x.shape)
    mask = _out(out_mask, x.shape, name="out_mask")
    if y.size == 0:
        return y, mask
    scale = DTYPE(1.0) / DTYPE(1.0 - rate)
    cuda.launch("dropout_forward", _blocks(x.size), _THREADS,
                (x, y, mask, x.size, DTYPE(rate), scale, seeds, step, int(slot), seeds.shape[1],
                 int(offset) * (x.size // max(1, x.shape[0]))))
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


def crossentropy_forward(p, labels, sparse, from_logits=False):
    """Per-sample cross-entropy (N,) of probabilities p (N,K), as Keras computes it: rows renormalised
    to sum to 1 and clipped to [1e-7, 1 - 1e-7]. labels: one-hot (N,K) or, when sparse, integers (N,).
    from_logits: p holds logits z, loss = -sum(y * log_softmax(z)) (no clip).
    A sparse label outside [0, K) gives a NaN loss (nothing is checked on the host)."""
    n, k = _rows(p, "crossentropy_forward")
    p = _c(p)
    loss = cuda.empty((n,), DTYPE)
    labels = _labels(labels, p, sparse)
    if n == 0:
        return loss
    cuda.launch(_loss_kernel("crossentropy_forward", sparse), _blocks(n), _THREADS,
                (p, labels, loss, n, k, bool(from_logits)))
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


def crossentropy_backward(p, labels, sparse, from_logits=False, out=None):
    """Gradient of the mean cross-entropy w.r.t. probabilities p (used when the output layer is not a
    softmax): through the renormalisation and the clip (zero where clipping is active). from_logits: w.r.t.
    the logits p, (softmax(p) * sum(y) - y) / N."""
    n, k = _rows(p, "crossentropy_backward")
    p = _c(p)
    dp = _out(out, (n, k))
    labels = _labels(labels, p, sparse)
    if n == 0:
        return dp
    cuda.launch(_loss_kernel("crossentropy_backward", sparse), _blocks(n), _THREADS,
                (p, labels, dp, n, k, bool(from_logits)))
    return dp


def count_correct(p, labels, sparse):
    """How many rows of p have their arg-max at the true class (first maximum wins ties), as a 0-d int64
    device array (reading it is the caller's choice of when to wait for the GPU)."""
    n, k = _rows(p, "count_correct")
    p = _c(p)
    count = cuda.empty((), np.int64)
    cuda.launch(_loss_kernel("count_correct", sparse), 1, _THREADS, (p, _labels(labels, p, sparse), count, n, k))
    return count


def _binary(p, labels, label_smoothing, what):
    """(p, float32 labels, 1 - s, s / 2) of the binary cross-entropy kernels, after checking them."""
    if p.ndim != 2 or p.shape[1] < 1:
        raise ValueError(f"{what}: predictions must be (N, units) with units >= 1, got {p.shape}")
    if not 0 <= label_smoothing <= 1:
        raise ValueError(f"{what}: label_smoothing must be in [0, 1], got {label_smoothing!r}")
    labels = labels if labels.dtype == DTYPE else labels.astype(DTYPE)
    if labels.shape != p.shape:
        raise ValueError(f"{what}: labels {labels.shape} must have the predictions' shape {p.shape}")
    return _c(p), _c(labels), DTYPE(1 - label_smoothing), DTYPE(0.5 * label_smoothing)


def binary_crossentropy_forward(p, labels, from_logits, label_smoothing=0.0):
    """Per-sample binary cross-entropy (N,) of probabilities p (N, U), or of logits when from_logits: the
    mean over the U units, as Keras computes it (numpy_ops gives the formulas)."""
    p, labels, keep, half = _binary(p, labels, label_smoothing, "binary_crossentropy_forward")
    n, units = p.shape
    loss = cuda.empty((n,), DTYPE)
    if n == 0:
        return loss
    cuda.launch("binary_crossentropy_forward", _blocks(n), _THREADS,
                (p, labels, loss, n, units, bool(from_logits), keep, half))
    return loss


def binary_crossentropy_backward(p, labels, from_logits, label_smoothing=0.0, out=None):
    """Gradient of the mean binary cross-entropy w.r.t. the model's output: probabilities p through the clip,
    (-y / p + (1 - y) / (1 - p)) / (N·U), zero where the clip is active; logits (from_logits), as
    sigmoid_binary_crossentropy_backward."""
    p, labels, keep, half = _binary(p, labels, label_smoothing, "binary_crossentropy_backward")
    dp = _out(out, p.shape)
    if dp.size == 0:
        return dp
    if from_logits:
        cuda.launch("sigmoid_binary_crossentropy_backward", _blocks(p.size), _THREADS,
                    (p, labels, dp, p.size, 1, keep, half, DTYPE(p.size)))
    else:
        cuda.launch("binary_crossentropy_backward", _blocks(p.size), _THREADS,
                    (p, labels, dp, p.size, keep, half, DTYPE(p.size)))
    return dp


def sigmoid_binary_crossentropy_backward(p, labels, label_smoothing=0.0, out=None):
    """Gradient of the mean binary cross-entropy w.r.t. the logits of a sigmoid output p: (p - y) / (N·U),
    the logits form (numpy_ops says why, and where it differs from differentiating through Keras's clip)."""
    p, labels, keep, half = _binary(p, labels, label_smoothing, "sigmoid_binary_crossentropy_backward")
    dz = _out(out, p.shape)
    if dz.size == 0:
        return dz
    cuda.launch("sigmoid_binary_crossentropy_backward", _blocks(p.size), _THREADS,
                (p, labels, dz, p.size, 0, keep, half, DTYPE(p.size)))
    return dz


def count_binary_correct(p, labels, threshold=0.5):
    """How many of the N·U predictions are right, as Keras's binary accuracy counts them ((p > threshold)
    equal to the label), as a 0-d int64 device array."""
    p, labels, _, _ = _binary(p, labels, 0.0, "count_binary_correct")
    count = cuda.empty((), np.int64)
    if p.size == 0:
        return _zero(count)
    cuda.launch("count_binary_correct", 1, _THREADS, (p, labels, count, p.size, DTYPE(threshold)))
    return count


# ===================================================================================== image transforms
# Keras's image preprocessing and augmentation (numpy_ops states the rules); kernels/image.cu. No backward:
# these run on a model's inputs. Per-image values (flags, transforms, factors) are device arrays, so a
# captured step can refill them between replays.
def _images(x, what):
    if x.ndim != 4:
        raise ValueError(f"{what}: images must be (N, H, W, C), got shape {x.shape}")
    _image_grid(int(np.prod(x.shape[1:])), x.shape[0])  # checks the image size
    return x.shape


def _not_aliased(out, x, what):
    if out is not None and cupy.may_share_memory(out, x):
        raise ValueError(f"{what}: out must not be x (each output reads other pixels of the input)")


def _per_image(values, n, what, dtype=DTYPE):
    """One value per image as a contiguous device (N,) array (from any shape of N values, as Keras's
    (N, 1, 1, 1)), or None; flags (dtype uint8: non-zero is set) from booleans (a view) or other numbers."""
    if values is None:
        return None
    if dtype == np.uint8 and values.dtype != np.uint8:
        values = values.view(np.uint8) if values.dtype == np.bool_ else (values != 0).view(np.uint8)
    elif values.dtype != dtype:
        values = values.astype(dtype)
    if values.size != n:
        raise ValueError(f"{what}: expected one value per image ({n},), got shape {values.shape}")
    return _c(values.reshape(n))


def rescale(x, scale, offset, out=None):
    """y = x * scale + offset (Keras's Rescaling, in float32; other input dtypes are cast). No backward."""
    x = _c(x if x.dtype == DTYPE else x.astype(DTYPE))
    y = _out(out, x.shape)
    if y.size == 0:
        return y
    cuda.launch("rescale", _blocks(x.size), _THREADS, (x, y, x.size, DTYPE(scale), DTYPE(offset)))
    return y


def step_row(table, step, n, out=None):
    """This step's per-image values of a random layer (numpy_ops states the rules): ``table`` (rows, N_max,
    K) a device array, ``step`` the (1,) int32 device counter. No allocation when ``out`` is given (the
    captured step's case)."""
    if step.shape != (1,) or step.dtype != np.int32:
        raise ValueError(f"step_row: step must be the (1,) int32 counter, got {step.shape} {step.dtype}")
    check_step_row(table, n, out)
    table = _c(table)
    out = _out(out, (n, *table.shape[2:]), table.dtype)
    if out.size:
        row_bytes = int(np.prod(table.shape[1:])) * table.dtype.itemsize
        cuda.launch("step_row", _blocks(out.nbytes), _THREADS,
                    (table.view(np.uint8), step, out.view(np.uint8), row_bytes, out.nbytes))
    return out


def flip(x, horizontal_flags, vertical_flags, out=None):
    """Each image n reversed left-right where horizontal_flags[n], upside down where vertical_flags[n]
    ((N,) device booleans, or None: no flip on that axis). out must not be x. No backward."""
    n, h, w, c = _images(x, "flip")
    _not_aliased(out, x, "flip")
    horizontal = _per_image(horizontal_flags, n, "flip", np.uint8)
    vertical = _per_image(vertical_flags, n, "flip", np.uint8)
    x = _c(x)
    y = _out(out, x.shape)
    if y.size == 0:
        return y
    cuda.launch("flip_images", _image_grid(h * w * c, n), _THREADS, (x, horizontal, vertical, y, n, h, w, c))
    return y


def affine_transform(x, transforms, interpolation="bilinear", fill_mode="reflect", fill_value=0.0, out=None):
    """Each image resampled through its projective transform ((N, 8) device array), as
    keras.ops.image.affine_transform (numpy_ops states the rules). out must not be x. No backward."""
    n, h, w, c = _images(x, "affine_transform")
    check_transform_options(interpolation, fill_mode)
    _not_aliased(out, x, "affine_transform")
    if transforms.shape != (n, 8):
        raise ValueError(f"affine_transform: transforms must be ({n}, 8), one row per image, got "
                         f"{transforms.shape}")
    transforms = _c(transforms if transforms.dtype == DTYPE else transforms.astype(DTYPE))
    x = _c(x)
    y = _out(out, x.shape)
    if y.size == 0:
        return y
    cuda.launch("affine_transform", _image_grid(h * w * c, n), _THREADS,
                (x, transforms, y, n, h, w, c, _IMAGE["INTERP_" + interpolation.upper()],
                 _IMAGE["FILL_" + fill_mode.upper()], DTYPE(fill_value)))
    return y


def adjust_contrast(x, factors, value_range=(0, 255), out=None):
    """Keras RandomContrast's adjustment, y = (x - m) * factors[n] + m with m the mean of image n's channel,
    clipped to value_range (None: not clipped); factors an (N,) device array. out may be x. No backward."""
    n, h, w, c = _images(x, "adjust_contrast")
    factors = _per_image(factors, n, "adjust_contrast")
    x = _c(x)
    y = _out(out, x.shape)
    low, high = (0.0, 0.0) if value_range is None else value_range
    grid = (max(1, min(c, _MAX_BLOCKS)), _image_grid(h * w * c, n)[1])  # (channels, images), both strided
    if y.size == 0:
        return y
    cuda.launch("adjust_contrast", grid, _THREADS,
                (x, factors, y, n, h * w, c, value_range is not None, DTYPE(low), DTYPE(high)))
    return y


# ===================================================================================== optimizers
def _state(what, w, *arrays):
    """Checks that the gradient and state arrays have as many elements as w."""
    for a in arrays:
        if a is not None and a.size != w.size:
            raise ValueError(f"{what}: arrays of {w.size} and {a.size} elements")


def _rates(rates, step, what):
    if rates.dtype != DTYPE or rates.ndim != 1 or step.shape != (1,):
        raise ValueError(f"{what}: rates must be a float32 (steps,) table and step a (1,) counter, got "
                         f"{rates.dtype} {rates.shape} and {step.shape}")


def sgd_update(w, g, m, rates, step, momentum, nesterov):
    """Keras SGD, in place: m = momentum·m − lr·g; w += m (Nesterov: w += momentum·m − lr·g)."""
    _state("sgd_update", w, g, m)
    _rates(rates, step, "sgd_update")
    if momentum != 0 and m is None:
        raise ValueError("sgd_update: momentum needs the state array m")
    if w.size == 0:
        return
    cuda.launch("sgd_update", _blocks(w.size), _THREADS,
                (w, _c(g), m, w.size, rates, step, DTYPE(momentum), int(bool(nesterov))))


def rmsprop_update(w, g, v, mom, avg, rates, step, rho, epsilon, momentum, centered):
    """Keras RMSprop, in place: v = rho·v + (1 − rho)·g²; w −= lr·g / sqrt(v + epsilon) — epsilon
    inside the square root. centered subtracts avg², the running mean of g, squared; momentum > 0 keeps
    mom = momentum·mom + delta and applies mom."""
    _state("rmsprop_update", w, g, v, mom, avg)
    _rates(rates, step, "rmsprop_update")
    if (momentum > 0 and mom is None) or (centered and avg is None):
        raise ValueError("rmsprop_update: momentum needs mom, centered needs avg")
    if w.size == 0:
        return
    rho = DTYPE(rho)
    cuda.launch("rmsprop_update", _blocks(w.size), _THREADS,
                (w, _c(g), v, mom if momentum > 0 else None, avg if centered else None, w.size, rates, step,
                 rho, DTYPE(1) - rho, DTYPE(epsilon), DTYPE(momentum), int(bool(centered))))


def adam_update(w, g, m, v, rates, step, beta_1, beta_2, epsilon):
    """Keras Adam, in place: m += (g − m)(1 − β1); v += (g² − v)(1 − β2); w −= alpha · m / (sqrt(v) + epsilon),
    alpha = rates[step[0]] = lr·sqrt(1 − β2^t)/(1 − β1^t) for step t (``adam_step_size``)."""
    _state("adam_update", w, g, m, v)
    _rates(rates, step, "adam_update")
    if w.size == 0:
        return
    cuda.launch("adam_update", _blocks(w.size), _THREADS,
                (w, _c(g), m, v, w.size, rates, step, DTYPE(1 - beta_1), DTYPE(1 - beta_2), DTYPE(epsilon)))


def weight_decay(w, factors, step):
    """Keras's decoupled weight decay, in place: w *= factors[step[0]] (factor = 1 − weight_decay·lr of the step,
    ``weight_decay_factor``)."""
    _rates(factors, step, "weight_decay")
    if w.size == 0:
        return
    cuda.launch("weight_decay", _blocks(w.size), _THREADS, (w, w.size, factors, step))
