"""The NumPy engine: every op of gpucnn, vectorised, float32.

``ops_cuda.py`` holds the same functions, with the same names, arguments and order, launching the kernels
of ``kernels/*.cu``. Read the two side by side. The naive float64 loops in ``tests/reference.py`` are the
judge of both.

Conventions (both engines):
  * images are channels-last: ``x`` is (N, H, W, C); a conv kernel ``w`` is (KH, KW, C, F) as in Keras;
    a dense kernel is (IN, UNITS);
  * ``padding`` is an explicit ``(top, bottom, left, right)`` tuple (the layers turn Keras's
    "valid"/"same" into it), ``stride`` and ``pool`` are ``(sh, sw)`` / ``(ph, pw)`` tuples;
  * ``activation`` is ``None``, a name or a ``(name, parameter)`` pair (``split_activation``); a conv or
    dense op applies it to its output (the CUDA kernels fuse relu, the others run as a second launch);
  * ``ctx`` is a dict a layer keeps for its whole life and hands to its forward and backward ops: a
    forward op may leave there what its backward needs (the NumPy engine's pooled im2col matrix; Winograd
    tiles, for a batch of one chunk — the backward then assumes the last forward with this ctx had the same
    x) and ops keep their work arrays there between steps. A gradient an op returns may live in ``ctx``: it is valid
    until that layer's next backward;
  * optimizer updates work in place on (flat) parameter and state arrays.
"""
import math

import numpy as np
from numpy.lib.stride_tricks import as_strided

xp = np
DTYPE = np.float32
READS_WAIT = False  # reading a result on the host costs nothing (on the GPU it waits for the device)
OUT_BUFFERS = False  # the layers keep out= buffers for the engines that want them (CUDA: a step allocates nothing)
MAX_POOL_TAPS = 128  # max-pooling's argmax index is int8 (taps 0..127)


# ===================================================================================== helpers
def out_size(size, k, s, pad_lo, pad_hi):
    """Output length of a window of ``k`` at stride ``s`` over ``size`` padded by ``pad_lo + pad_hi``."""
    return (size + pad_lo + pad_hi - k) // s + 1


def _pad(x, padding, value=0.0, ctx=None, what="pad"):
    """x (N, H, W, C) with ``padding`` (top, bottom, left, right) rows and columns of ``value`` around it; with
    ``ctx``, in a work array kept there (``what`` names it), whose border is filled once (only its interior is
    written after)."""
    top, bottom, left, right = padding
    if not (top or bottom or left or right):
        return x
    n, h, w, c = x.shape
    shape = (n, h + top + bottom, w + left + right, c)
    key = _work_key(ctx, (what, tuple(padding), value), shape)
    xpad = None if ctx is None else ctx.get(key)
    if xpad is None or xpad.shape != shape or xpad.dtype != x.dtype:
        xpad = np.full(shape, value, x.dtype)
        if ctx is not None:
            ctx[key] = xpad
    xpad[:, top:top + h, left:left + w] = x
    return xpad


def geometry(x_shape, k, stride, padding):
    """(N, H, W, C, P, Q) of a window op over x_shape (shared with ops_cuda)."""
    n, h, w, c = x_shape
    p = out_size(h, k[0], stride[0], padding[0], padding[1])
    q = out_size(w, k[1], stride[1], padding[2], padding[3])
    return n, h, w, c, p, q


def _windows(xpad, k, stride, p, q):
    """A read-only (N, P, Q, KH, KW, C) view of every window of the padded input (no copy)."""
    n, _, _, c = xpad.shape
    s0, s1, s2, s3 = xpad.strides
    return as_strided(xpad, (n, p, q, k[0], k[1], c),
                      (s0, s1 * stride[0], s2 * stride[1], s1, s2, s3), writeable=False)


def _tap(a, i, j, stride, p, q):
    """The (N, P, Q, C) slice of padded array ``a`` that tap (i, j) of every window reads."""
    return a[:, i:i + stride[0] * (p - 1) + 1:stride[0], j:j + stride[1] * (q - 1) + 1:stride[1], :]


def _crop(a, padding):
    top, bottom, left, right = padding
    return a[:, top:a.shape[1] - bottom, left:a.shape[2] - right, :]


SHARED_WORK = "shared work"  # a ctx holding this key is shared by many calls (inference: every layer of a model)


def _work_key(ctx, key, shape):
    """The key of a work array in ``ctx``: ``key``, or in a ctx shared by several calls (``SHARED_WORK``) the key and
    the shape, so that calls of different shapes keep their own arrays and calls of one shape share one."""
    return (key, tuple(shape)) if ctx is not None and SHARED_WORK in ctx else key


def _kept(ctx, key, shape):
    """The work array ``key`` of this shape in ``ctx``, or None."""
    a = None if ctx is None else ctx.get(_work_key(ctx, key, shape))
    return a if a is not None and a.shape == tuple(shape) else None


def _scratch(ctx, key, shape, zero=False):
    """A float32 work array kept in ``ctx`` from one call to the next. Fresh large arrays cost page
    faults on every step; reused ones do not."""
    key = _work_key(ctx, key, shape)
    a = None if ctx is None else ctx.get(key)
    if a is None or a.shape != shape:
        a = np.empty(shape, DTYPE)
        if ctx is not None:
            ctx[key] = a
    if zero:
        a.fill(0)
    return a


def _column_sums(a):
    """The sum of each column of a 2-D array, as a matrix-vector product (several times faster than
    ``a.sum(axis=0)`` on tall arrays)."""
    return np.ones(a.shape[0], DTYPE) @ np.ascontiguousarray(a)


def _finish(y, out):
    if out is None:
        return y
    out[...] = y
    return out


# ===================================================================================== activations
# An activation is None, a name, or a (name, parameter) pair for the three that take one: ("leaky_relu",
# negative_slope), ("elu", alpha), ("gelu", approximate). A bare name takes Keras's default for the function
# keras.activations.<name> (leaky_relu 0.2, elu 1.0, gelu exact); a layer with another default passes its own
# (LeakyReLU: ("leaky_relu", 0.3)). "swish" is "silu". split_activation reads all three forms.
ACTIVATIONS = ("relu", "softmax", "sigmoid", "tanh", "elu", "selu", "leaky_relu", "softplus", "silu", "swish",
               "gelu", "relu6")
# relu6's parameter is its cap, max_value: Keras's relu6 (6), or ReLU(max_value=...)'s
ACTIVATION_DEFAULTS = {"leaky_relu": 0.2, "elu": 1.0, "gelu": False, "relu6": 6.0}
SELU_ALPHA = 1.6732632423543772848170429916717  # Keras's constants (keras.activations.selu)
SELU_SCALE = 1.0507009873554804934193349852946
_GELU_TANH = (np.sqrt(2 / np.pi), 0.044715)  # gelu(approximate=True): 0.5 x (1 + tanh(c (x + k x^3)))


def split_activation(activation):
    """``(name, parameter)`` of an activation given as None, a name or a ``(name, parameter)`` pair: the
    parameter is the name's default when not given, None for activations without one; "swish" reads as
    "silu". A ValueError names the known activations, or says what is wrong with the parameter."""
    if activation is None:
        return None, None
    if isinstance(activation, tuple) and len(activation) == 2 and isinstance(activation[0], str):
        name, param = activation
        given = True
    elif isinstance(activation, str):
        name, param, given = activation, ACTIVATION_DEFAULTS.get(activation), False
    else:
        raise ValueError(f"an activation is None, a name or a (name, parameter) pair, got {activation!r}")
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(ACTIVATIONS)} (or None)")
    name = "silu" if name == "swish" else name
    if given and name not in ACTIVATION_DEFAULTS:
        raise ValueError(f"activation {name!r} takes no parameter, got {activation!r}")
    if name == "gelu":
        if not isinstance(param, (bool, np.bool_)):
            raise ValueError(f"gelu's parameter is approximate, True or False, got {param!r}")
        return name, bool(param)
    if name in ACTIVATION_DEFAULTS:
        what = {"leaky_relu": "negative_slope", "relu6": "max_value"}.get(name, "alpha")
        if isinstance(param, (bool, np.bool_)) or not isinstance(param, (int, float, np.integer, np.floating)) \
                or not 0 <= param < np.inf:
            raise ValueError(f"{name}'s {what} must be a finite number >= 0, got {param!r}")
        return name, float(param)
    return name, None


def activation_needs_input(activation):
    """Whether activation_backward needs the activation's input ``x`` (silu/swish, gelu): the others take
    their gradient from the output ``y`` alone. A layer with such an activation keeps its pre-activation
    (its conv/dense op run with activation=None, then activation_forward)."""
    return split_activation(activation)[0] in ("silu", "gelu")


def _sigmoid(x):
    """1 / (1 + exp(-x)) without overflow: exp(-|x|) is at most 1."""
    e = np.exp(-np.abs(x))
    r = DTYPE(1) / (DTYPE(1) + e)
    return np.where(x >= 0, r, e * r)


def _erfc(z):
    """erfc in float64, relative error below 1.2e-7 everywhere (a Chebyshev fit of erfc; NumPy has none)."""
    a = np.abs(z)
    t = 1.0 / (1.0 + 0.5 * a)
    poly = 0.17087277
    for c in (-0.82215223, 1.48851587, -1.13520398, 0.27886807, -0.18628806, 0.09678418, 0.37409196,
              1.00002368, -1.26551223):
        poly = c + t * poly
    r = t * np.exp(-a * a + poly)
    return np.where(z >= 0, r, 2.0 - r)


def _normal_cdf(x):
    """Phi(x) = erfc(-x / sqrt(2)) / 2, in float64 (accurate in the lower tail too)."""
    return 0.5 * _erfc(-np.asarray(x, np.float64) / np.sqrt(2.0))


def _gelu_tanh_parts(x):
    """(t, du/dx) of gelu's tanh approximation: t = tanh(u), u = c (x + k x^3)."""
    c, k = DTYPE(_GELU_TANH[0]), DTYPE(_GELU_TANH[1])
    return np.tanh(c * (x + k * x * x * x)), c * (DTYPE(1) + DTYPE(3) * k * x * x)


def _forward(name, param, x):
    """A new float32 array: the elementwise activation ``name`` of x."""
    if name == "sigmoid":
        return _sigmoid(x)
    if name == "tanh":
        return np.tanh(x)
    if name in ("elu", "selu"):
        alpha, scale = (DTYPE(param), None) if name == "elu" else (DTYPE(SELU_ALPHA), DTYPE(SELU_SCALE))
        y = np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0)))
        return y if scale is None else scale * y
    if name == "leaky_relu":
        return np.where(x > 0, x, DTYPE(param) * x)
    if name == "relu6":  # (a NaN stays a NaN, as relu's)
        return np.minimum(np.maximum(x, DTYPE(0)), DTYPE(param))
    if name == "softplus":
        return np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x)))
    if name == "silu":
        return x * _sigmoid(x)
    if param:  # gelu, tanh approximation
        return DTYPE(0.5) * x * (DTYPE(1) + _gelu_tanh_parts(x)[0])
    return (x * _normal_cdf(x)).astype(DTYPE)


def _slope(name, param, y, x):
    """The activation's derivative at each element: from the output y, or (silu, gelu) from the input x."""
    if name == "sigmoid":
        return y * (DTYPE(1) - y)
    if name == "tanh":
        return DTYPE(1) - y * y
    if name == "elu":  # x > 0 exactly where y > 0 (alpha >= 0); below, dy/dx = alpha e^x = y + alpha
        return np.where(y > 0, DTYPE(1), y + DTYPE(param))
    if name == "selu":
        return np.where(y > 0, DTYPE(SELU_SCALE), y + DTYPE(SELU_SCALE * SELU_ALPHA))
    if name == "leaky_relu":
        return np.where(y > 0, DTYPE(1), DTYPE(param))
    if name == "relu6":  # 1 strictly between 0 and the cap
        return ((y > 0) & (y < DTYPE(param))).astype(DTYPE)
    if name == "softplus":  # sigmoid(x) = 1 - exp(-y)
        return -np.expm1(-y)
    if name == "silu":
        s = _sigmoid(x)
        return s * (DTYPE(1) + x * (DTYPE(1) - s))
    if param:  # gelu, tanh approximation
        t, du = _gelu_tanh_parts(x)
        return DTYPE(0.5) * (DTYPE(1) + t) + DTYPE(0.5) * x * (DTYPE(1) - t * t) * du
    x64 = np.asarray(x, np.float64)
    return (_normal_cdf(x64) + x64 * np.exp(-0.5 * x64 * x64) / np.sqrt(2 * np.pi)).astype(DTYPE)


def activation_forward(x, activation, out=None):
    """The activation of ``x`` (softmax over the last axis, the others elementwise); ``activation`` as
    split_activation reads it. ``out`` may be ``x``.
        sigmoid 1 / (1 + e^-x) (no overflow)    tanh                    softplus max(x, 0) + log1p(e^-|x|)
        elu     x > 0 ? x : alpha (e^x - 1)      selu scale * elu(x, alpha) with Keras's constants
        leaky_relu x > 0 ? x : negative_slope x  silu/swish x sigmoid(x)
        relu6   min(max(x, 0), max_value) (6 by default: Keras's relu6; ReLU(max_value=...))
        gelu    x Phi(x) (exact, Keras's default) or 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))"""
    name, param = split_activation(activation)
    if name is None:
        return _finish(x, out)
    if name == "relu":
        return np.maximum(x, 0, out=out if out is not None else None)
    if name == "softmax":
        z = x - x.max(axis=-1, keepdims=True)
        e = np.exp(z, out=z)
        e /= e.sum(axis=-1, keepdims=True)
        return _finish(e, out)
    return _finish(_forward(name, param, x), out)


def activation_backward(dy, y, activation, out=None, x=None):
    """Gradient through an activation, from its output ``y``; silu/swish and gelu need its input ``x``
    instead (activation_needs_input), a ValueError without it."""
    name, param = split_activation(activation)
    if name is None:
        return _finish(dy, out)
    if name == "relu":
        return np.multiply(dy, y > 0, out=out)
    if name == "softmax":
        return _finish(y * (dy - (dy * y).sum(axis=-1, keepdims=True)), out)
    if name in ("silu", "gelu") and x is None:
        raise ValueError(f"activation_backward: {name}'s gradient needs the activation's input: pass x=")
    if name not in ("silu", "gelu") and y is None:
        raise ValueError(f"activation_backward: {name}'s gradient is read from its output y, got None")
    return np.multiply(dy, _slope(name, param, y, x), out=out)


# ===================================================================================== conv2d
def _pooled_im2col(x, k, stride, padding, p, q, ctx):
    """The im2col matrix of a convolution followed by a 2x2 max-pooling (conv2d_maxpool): rows for the 2·P x 2·Q
    outputs its windows read (P, Q: the pooled size), ordered (window tap di, dj, n, P, Q) — the four outputs of a
    window then sit in four contiguous blocks of the product — each row the window under that output, tap by tap,
    then a last column of ones, the bias's input, so one product gives conv + bias and one gives dw and db; in
    ``ctx`` ("cols"), where a batch of one chunk's backward finds it. (A plain convolution's: _chunk_cols.)"""
    n, c, kk = x.shape[0], x.shape[3], k[0] * k[1] * x.shape[3]
    shape = (4 * n * p * q, kk + 1)
    cols = _kept_cols(ctx, shape)
    if cols is None:  # a kept matrix has its column of ones already
        cols = _scratch(ctx, "cols", shape)
        cols[:, kk] = 1
    xpad = _pad(x, padding, ctx=ctx)
    windows = cols.reshape((2, 2, n, p, q, kk + 1))[..., :kk].reshape((2, 2, n, p, q, k[0], k[1], c))
    step = (stride[0] * 2, stride[1] * 2)  # input rows between the rows of one block
    if c >= 8:  # runs of C contiguous floats: one strided copy of every window is fastest
        s0, s1, s2, s3 = xpad.strides
        np.copyto(windows, as_strided(xpad, windows.shape, (s1 * stride[0], s2 * stride[1], s0, s1 * step[0],
                                                            s2 * step[1], s1, s2, s3), writeable=False))
        return cols
    for di in range(2):  # few channels: one copy per tap is faster
        for dj in range(2):
            for i in range(k[0]):
                for j in range(k[1]):
                    windows[di, dj, :, :, :, i, j, :] = _tap(xpad, di * stride[0] + i, dj * stride[1] + j,
                                                             step, p, q)
    return cols


def _kept_cols(ctx, shape):
    """The pooled im2col matrix the last conv2d_maxpool_forward left in ``ctx``, if it has this shape (else None)."""
    return _kept(ctx, "cols", shape)


# Chunks. A convolution works through the batch a few images at a time: for each chunk its im2col matrix (or its
# Winograd tiles) is made, multiplied and dropped while it is still in the core's cache, instead of a matrix KH·KW
# times the input's size streaming through memory (and kept there for the backward). One core, batch 64, a 3x3
# convolution 'same' over 32x32x16: forward 11.6 ms (Winograd, whole batch) → 5.9 ms (im2col, chunks of ~1 MB);
# backward 21 → 13 ms. The backward makes each chunk's matrix again. Chunks of one size share their work arrays
# (a work dict in ctx). Which of the two a convolution takes: _plain_winograd_applies. The fused conv + max-pool
# (_pooled_chunks), the depthwise convolutions and max-pooling chunk their batches the same way (_image_chunks);
# BatchNormalization chunks its rows (_row_chunks).
CHUNK_BYTES = 1 << 20
WHOLE_BATCH_BYTES = 8 << 20  # conv2d_maxpool: a batch whose work fits in this runs as one chunk


def _sub_work(ctx, key):
    """The work dict ``key`` inside ``ctx`` (None without a ctx), shared by many calls where ``ctx`` is."""
    if ctx is None:
        return None
    sub = ctx.get(key)
    if sub is None:
        sub = ctx[key] = {SHARED_WORK: True} if SHARED_WORK in ctx else {}
    return sub


def _image_chunks(ctx, n, image_values):
    """(slice, work dict) for each chunk of the batch's n images; ``image_values``: the work values (float32) one
    image takes. Chunks of one size share a work dict inside ``ctx``."""
    per = max(1, min(n, CHUNK_BYTES // max(1, 4 * image_values)))
    for start in range(0, n, per):
        size = min(per, n - start)
        yield slice(start, start + size), _sub_work(ctx, ("chunk", size))


def conv2d_forward(x, w, b, stride, padding, activation, ctx=None, out=None):
    """y = act(conv(x, w) + b): x (N,H,W,C), w (KH,KW,C,F), b (F,) or None → y (N,P,Q,F), a chunk of images at
    a time: the product of the chunk's im2col matrix with the kernels or, for 3x3 kernels at stride 1 over many
    channels, Winograd's F(3x3, 3x3) (see below)."""
    kh, kw, c, f = w.shape
    n, h, wd, _, p, q = geometry(x.shape, (kh, kw), stride, padding)
    y = _target(out, (n, p, q, f))
    _correlate(x, w, stride, padding, ctx, y)
    if b is not None:
        y += b
    return activation_forward(y, activation, out=y if out is None else out)


def _correlate(x, w, stride, padding, ctx, y):
    """y (N, P, Q, F), C-contiguous = the correlation of x with w, no bias."""
    if _plain_winograd_applies(w.shape, stride):
        _winograd_conv(x, w, padding, ctx, y)
        return
    kh, kw, c, f = w.shape
    n, p, q = y.shape[:3]
    w2 = w.reshape(kh * kw * c, f)
    for part, sub, windows in _windowed_chunks(x, (kh, kw), stride, padding, p, q, ctx):
        np.matmul(_chunk_cols(x, windows, part, sub), w2, out=y[part].reshape(-1, f))


# A plain convolution pads its images a group of chunks at a time, up to PAD_GROUP_BYTES (the whole batch of a
# training step, usually), into one work array whose borders are zeroed once, and copies each chunk's im2col rows
# from one window view of it: padding each chunk apart (often a single image) cost more calls than the copy made.
PAD_GROUP_BYTES = 8 << 20


def _windowed_chunks(x, k, stride, padding, p, q, ctx):
    """(part, work dict, windows) for each chunk of the images of x (_image_chunks): ``windows`` the chunk's
    (images, P, Q, KH, KW, C) view of every window of its padded images, or None where x itself is the im2col matrix
    (1x1 kernel, stride 1, no padding)."""
    n, h, wd, c = x.shape
    chunks = _image_chunks(ctx, n, p * q * k[0] * k[1] * c)
    if tuple(k) == (1, 1) and tuple(stride) == (1, 1) and not any(padding):
        yield from ((part, sub, None) for part, sub in chunks)
        return
    top, bottom, left, right = padding
    image = (h + top + bottom, wd + left + right, c)
    chunks = list(chunks)
    per = chunks[0][0].stop - chunks[0][0].start if chunks else 1
    group = min(n, max(per, PAD_GROUP_BYTES // (4 * math.prod(image)) // per * per))
    # (_pad's work array has its input's shape; this one holds `group` images, and a last, shorter group writes
    # into its first ones)
    key = _work_key(ctx, ("pad_group", tuple(padding)), (group,) + image)
    padded = None if ctx is None else ctx.get(key)
    if padded is None or padded.shape != (group,) + image:
        padded = np.zeros((group,) + image, DTYPE)  # the borders stay zero: only the interiors are written
        if ctx is not None:
            ctx[key] = padded
    first = end = 0
    for part, sub in chunks:
        if part.start >= end:
            first, end = part.start, min(n, part.start + group)
            padded[:end - first, top:top + h, left:left + wd] = x[first:end]
            windows = _windows(padded, k, stride, p, q)
        yield part, sub, windows[part.start - first:part.stop - first]


def _chunk_cols(x, windows, part, ctx):
    """The im2col matrix (rows, KH·KW·C) of the images ``part`` of x: row (n, p, q) holds the window under output
    pixel (p, q) of image n, tap by tap — copied from the chunk's ``windows`` (_windowed_chunks) into a work array in
    ``ctx``, or x's own rows where ``windows`` is None."""
    if windows is None:
        return x[part].reshape(-1, x.shape[3])
    images, p, q, kh, kw, c = windows.shape
    cols = _scratch(ctx, "cols_plain", (images * p * q, kh * kw * c))
    target = cols.reshape(windows.shape)
    if c >= 8:  # runs of C contiguous floats: one strided copy of every window is fastest
        np.copyto(target, windows)
        return cols
    for i in range(kh):  # few channels: one copy per tap is faster
        for j in range(kw):
            target[:, :, :, i, j] = windows[:, :, :, i, j]
    return cols


def conv2d_backward_data(dy, w, x_shape, stride, padding, ctx=None, out=None):
    """dx (N,H,W,C) from dy (N,P,Q,F), a chunk of images at a time. Winograd's from dy's transformed blocks dM.
    Otherwise at stride 1 it is itself a correlation: of dy padded by K − 1 − padding on each side with the
    kernel turned by 180° and its channels and filters swapped — the forward's code runs it. Otherwise (strides,
    or padding over K − 1) each tap's product dy @ w[i, j].T is added back where that tap read."""
    kh, kw, c, f = w.shape
    n, h, wd, _, p, q = geometry(x_shape, (kh, kw), stride, padding)
    dy = dy.reshape(n, p, q, f)
    if _plain_winograd_applies(w.shape, stride):
        return _winograd_backward(dy, None, w, x_shape, padding, ctx, need_dx=True, out=out)
    dx = _dx_target(ctx, x_shape, out)
    full = (kh - 1 - padding[0], kh - 1 - padding[1], kw - 1 - padding[2], kw - 1 - padding[3])
    if tuple(stride) == (1, 1) and min(full) >= 0:
        turned = np.ascontiguousarray(w[::-1, ::-1].transpose(0, 1, 3, 2))
        _correlate(dy, turned, (1, 1), full, _sub_work(ctx, ("work", "dx")), dx)
    else:
        for part, sub in _image_chunks(ctx, n, (h + padding[0] + padding[1]) * (wd + padding[2] + padding[3]) * c):
            chunk_shape = (part.stop - part.start,) + tuple(x_shape[1:])
            np.copyto(dx[part], _backward_data(dy[part], w, chunk_shape, stride, padding, sub))
    return _returned(dx, out)


def _summed(total, part):
    """total + part, the first part itself (no array of zeros to add it to)."""
    if total is None:
        return part
    total += part
    return total


def _dx_target(ctx, x_shape, out):
    """Where an input gradient is written: ``out`` if C-contiguous, else a work array in ``ctx`` (_returned)."""
    return out if out is not None and out.flags.c_contiguous else _scratch(ctx, "dx", x_shape)


def _target(out, shape, dtype=DTYPE):
    """Where an op writes a result whole: ``out`` if it is C-contiguous, else a new array (then _returned)."""
    return out if out is not None and out.flags.c_contiguous else np.empty(shape, dtype)


def _returned(dx, out):
    """dx, copied into ``out`` unless it is ``out`` already."""
    return dx if out is None or out is dx else _finish(dx, out)


def _backward_data(dy, w, x_shape, stride, padding, ctx):
    """conv2d_backward_data's work for a dy (N, P', Q', F) that covers the first P' x Q' outputs only
    (the rest have no gradient); returns a view of a work array in ``ctx``."""
    kh, kw, c, f = w.shape
    n, h, wd, _ = x_shape
    _, p, q, _ = dy.shape
    dy2 = dy.reshape(n * p * q, f)
    part = _scratch(ctx, "dx_tap", (n * p * q, c))
    dxp = _scratch(ctx, "dxp", (n, h + padding[0] + padding[1], wd + padding[2] + padding[3], c),
                   zero=True)
    for i in range(kh):
        for j in range(kw):
            np.matmul(dy2, w[i, j].T, out=part)
            _tap(dxp, i, j, stride, p, q)[...] += part.reshape(n, p, q, c)
    return _crop(dxp, padding)


def conv2d_backward_filter(dy, x, w_shape, stride, padding, ctx=None, out_w=None, out_b=None):
    """(dw (KH,KW,C,F), db (F,)) from dy (N,P,Q,F) and the layer's input x: the sum over chunks of images of
    each chunk's im2col matrix times its dy (or Winograd's, where the forward took it)."""
    kh, kw, c, f = w_shape
    n, h, wd, _, p, q = geometry(x.shape, (kh, kw), stride, padding)
    dy = dy.reshape(n, p, q, f)
    db = _finish(_column_sums(dy.reshape(n * p * q, f)), out_b)
    if _plain_winograd_applies(w_shape, stride):
        dw = np.empty(w_shape, DTYPE) if out_w is None else out_w
        _winograd_backward(dy, x, None, x.shape, padding, ctx, out_w=dw)
        return dw, db
    g = np.zeros((kh * kw * c, f), DTYPE) if n == 0 else None
    for part, sub, windows in _windowed_chunks(x, (kh, kw), stride, padding, p, q, ctx):
        g = _summed(g, _chunk_cols(x, windows, part, sub).T @ dy[part].reshape(-1, f))
    return _finish(g.reshape(w_shape), out_w), db


def conv2d_backward(dy, x, w, stride, padding, ctx=None, out=None, out_w=None, out_b=None, need_dx=True):
    """(dx or None, dw, db) of one convolution call: conv2d_backward_filter and, with ``need_dx``,
    conv2d_backward_data (Winograd's: from one dM for both)."""
    if not _plain_winograd_applies(w.shape, stride):
        dw, db = conv2d_backward_filter(dy, x, w.shape, stride, padding, ctx, out_w, out_b)
        return (conv2d_backward_data(dy, w, x.shape, stride, padding, ctx, out) if need_dx else None), dw, db
    n, h, wd, _, p, q = geometry(x.shape, w.shape[:2], stride, padding)
    f = w.shape[3]
    dy = dy.reshape(n, p, q, f)
    dw = np.empty(w.shape, DTYPE) if out_w is None else out_w
    dx = _winograd_backward(dy, x, w, x.shape, padding, ctx, out_w=dw, need_dx=need_dx, out=out)
    db = _finish(_column_sums(dy.reshape(-1, f)), out_b)
    return dx, dw, db


# ===================================================================================== pooling
def maxpool2d_forward(x, pool, stride, padding, out=None, out_idx=None):
    """(y (N,P,Q,C), idx) — idx (int8, N,P,Q,C) is the scan-order tap of each window's first maximum;
    a NaN in a window wins (the first NaN), as max-pooling in PyTorch and cuDNN does. ``out_idx``: an
    int8 array to write idx into."""
    n, h, wd, c, p, q = geometry(x.shape, pool, stride, padding)
    if pool[0] * pool[1] > MAX_POOL_TAPS:
        raise ValueError(f"max-pooling windows hold at most {MAX_POOL_TAPS} cells (idx is int8), got "
                         f"{pool[0]}x{pool[1]}")
    xpad = _pad(x, padding, value=-np.inf)
    chunks = list(_image_chunks(None, n, _pool_values(x.shape, p, q)))
    if len(chunks) <= 1:
        return _first_max(_pool_taps(xpad, pool, stride, p, q), out, out_idx)
    # a chunk of images at a time: the scan's passes over the taps stay in cache
    y, idx = _target(out, (n, p, q, c)), _target(out_idx, (n, p, q, c), np.int8)
    for part, _ in chunks:
        _first_max(_pool_taps(xpad[part], pool, stride, p, q), y[part], idx[part])
    return _returned(y, out), _returned(idx, out_idx)


def _pool_taps(xpad, pool, stride, p, q):
    """The windows' cells, one (N, P, Q, C) view of the padded input per tap, in scan order."""
    return [_tap(xpad, k // pool[1], k % pool[1], stride, p, q) for k in range(pool[0] * pool[1])]


def _pool_values(x_shape, p, q):
    """The values one image of a pooling op reads and writes (its input, its output and a temporary)."""
    return x_shape[1] * x_shape[2] * x_shape[3] + 2 * p * q * x_shape[3]


def _first_max(taps, out=None, out_idx=None):
    """(y, idx) of windows given as a list of same-shape arrays, one per tap in scan order: y the maximum,
    idx (int8) the tap of the first maximum; a NaN wins (the first NaN)."""
    if len(taps) == 4:  # 2x2 windows: the maximum of each pair, then of the two pairs (fewer passes)
        m01, m23 = np.maximum(taps[0], taps[1]), np.maximum(taps[2], taps[3])
        y = np.maximum(m01, m23, out=out)
        if not np.isnan(y).any():  # (with a NaN, the general scan below)
            # a tie keeps the first of a pair, and the first pair; arithmetic, as np.where is slow on int8
            first = (taps[1] > taps[0]).view(np.int8)
            idx = first.copy() if out_idx is None else _finish(first, out_idx)
            idx += ((taps[3] > taps[2]).view(np.int8) + np.int8(2) - first) * (m23 > m01).view(np.int8)
            return y, idx
    y = taps[0].astype(DTYPE, copy=True) if out is None else _finish(taps[0], out)
    for v in taps[1:]:
        np.maximum(y, v, out=y)  # NaN propagates
    if np.isnan(y).any():
        not_max = lambda v: ~((v == y) | np.isnan(v))  # noqa: E731  the first NaN is "the maximum"
    else:
        not_max = lambda v: v != y  # noqa: E731
    # idx counts the taps passed over before the first maximum: it reaches k only if taps 0..k-1 missed.
    idx = not_max(taps[0]).view(np.int8)
    idx = idx.copy() if out_idx is None else _finish(idx, out_idx)
    for k in range(1, len(taps) - 1):
        idx += not_max(taps[k]) & (idx == k)
    return y, idx


def maxpool2d_backward(dy, idx, x_shape, pool, stride, padding, out=None):
    """dx (N,H,W,C): each window's gradient goes to its first maximum only."""
    n, h, wd, c, p, q = geometry(x_shape, pool, stride, padding)
    dxp = np.zeros((n, h + padding[0] + padding[1], wd + padding[2] + padding[3], c), DTYPE)
    overlapping = stride[0] < pool[0] or stride[1] < pool[1]
    finite = np.isfinite(dy).all()
    for part, _ in _image_chunks(None, n, _pool_values(x_shape, p, q)):  # a chunk of images at a time, in cache
        for k in range(pool[0] * pool[1]):
            dst = _tap(dxp[part], k // pool[1], k % pool[1], stride, p, q)
            share = _share_of_tap(idx[part], k, dy[part], finite)
            if overlapping:
                dst += share
            else:  # each input cell belongs to one window at most
                dst[...] = share
    return _finish(_crop(dxp, padding), out)


def _share_of_tap(idx, k, dy, finite, out=None):
    """The part of each window's gradient ``dy`` that goes to tap ``k``: all of it where idx names k, else
    0. ``finite``: whether dy is all finite (then mask · dy, fast; else a select, as 0 · inf would spread NaN
    off the maximum)."""
    if finite:
        return np.multiply(idx == k, dy, out=out)
    return _finish(np.where(idx == k, dy, 0), out)


def _avg_counts(x_shape, pool, stride, padding):
    """How many real (not padding) inputs each window covers, as (1, P, Q, 1)."""
    _, h, wd, _, p, q = geometry(x_shape, pool, stride, padding)
    ones = _pad(np.ones((1, h, wd, 1), DTYPE), padding)
    return sum(_tap(ones, i, j, stride, p, q) for i in range(pool[0]) for j in range(pool[1]))


def avgpool2d_forward(x, pool, stride, padding, out=None):
    """y (N,P,Q,C): the mean of each window over its real inputs ("same" padding is not counted)."""
    n, h, wd, c, p, q = geometry(x.shape, pool, stride, padding)
    xpad = _pad(x, padding)
    y = np.zeros((n, p, q, c), DTYPE)
    for i in range(pool[0]):
        for j in range(pool[1]):
            y += _tap(xpad, i, j, stride, p, q)
    y /= _avg_counts(x.shape, pool, stride, padding)
    return _finish(y, out)


def avgpool2d_backward(dy, x_shape, pool, stride, padding, out=None):
    """dx (N,H,W,C): each window's gradient shared equally among its real inputs."""
    n, h, wd, c, p, q = geometry(x_shape, pool, stride, padding)
    g = dy / _avg_counts(x_shape, pool, stride, padding)
    dxp = np.zeros((n, h + padding[0] + padding[1], wd + padding[2] + padding[3], c), DTYPE)
    for i in range(pool[0]):
        for j in range(pool[1]):
            _tap(dxp, i, j, stride, p, q)[...] += g
    return _finish(_crop(dxp, padding), out)


def global_avgpool2d_forward(x, out=None):
    """y (N,C): the mean over H and W."""
    return _finish(x.mean(axis=(1, 2), dtype=DTYPE), out)


def global_avgpool2d_backward(dy, x_shape, out=None):
    """dx (N,H,W,C) = dy / (H·W) everywhere."""
    n, h, wd, c = x_shape
    dx = np.broadcast_to((dy / DTYPE(h * wd))[:, None, None, :], x_shape)
    return _finish(np.ascontiguousarray(dx), out)


def global_maxpool2d_forward(x, out=None, out_idx=None):
    """(y (N,C), idx (int32, N,C)): each channel's maximum over H and W; idx is h·W + w of its first maximum
    in row-major scan order (a NaN wins: the first NaN), as maxpool2d_forward's rule."""
    n, h, wd, c = x.shape
    if h * wd == 0:
        raise ValueError(f"global_maxpool2d_forward: an image of {h}x{wd} cells has no maximum")
    flat = x.reshape(n, h * wd, c)
    idx = np.argmax(flat, axis=1)  # the first maximum; NumPy's argmax takes the first NaN as the maximum
    y = np.take_along_axis(flat, idx[:, None, :], axis=1)[:, 0, :]
    return _finish(y, out), _finish(idx.astype(np.int32), out_idx)


def global_maxpool2d_backward(dy, idx, x_shape, out=None):
    """dx (N,H,W,C): each channel's gradient goes to its first maximum only."""
    n, h, wd, c = x_shape
    dx = np.zeros((n, h * wd, c), DTYPE)
    np.put_along_axis(dx, np.asarray(idx, np.int64)[:, None, :], dy[:, None, :], axis=1)
    return _finish(dx.reshape(x_shape), out)


# ===================================================================================== zero padding
def _padded_shape(x_shape, padding, dy_shape, what):
    """The shape of x (N, H, W, C) padded by ``padding``, after checking the padding (and dy, if given)."""
    if len(padding) != 4 or any(int(p) != p or p < 0 for p in padding):
        raise ValueError(f"{what}: padding must be four non-negative ints (top, bottom, left, right), "
                         f"got {tuple(padding)}")
    n, h, wd, c = x_shape
    top, bottom, left, right = padding
    shape = (n, top + h + bottom, left + wd + right, c)
    if dy_shape is not None and tuple(dy_shape) != shape:
        raise ValueError(f"{what}: dy must be {shape} for x {tuple(x_shape)} padded by {tuple(padding)}, "
                         f"got {tuple(dy_shape)}")
    return shape


def zero_padding2d_forward(x, padding, out=None):
    """y (N, top+H+bottom, left+W+right, C): x surrounded by zeros (Keras's ZeroPadding2D)."""
    _padded_shape(x.shape, padding, None, "zero_padding2d_forward")
    if out is None:
        return np.ascontiguousarray(_pad(x, padding))
    top, bottom, left, right = padding
    out.fill(0)
    out[:, top:out.shape[1] - bottom, left:out.shape[2] - right, :] = x
    return out


def zero_padding2d_backward(dy, x_shape, padding, out=None):
    """dx (N,H,W,C): the gradient of the cells that hold x."""
    _padded_shape(x_shape, padding, dy.shape, "zero_padding2d_backward")
    return _finish(np.ascontiguousarray(_crop(dy, padding)), out)


# ===================================================================================== batch normalization
# Over the last axis of x (N, ..., C), as Keras 3's BatchNormalization(axis=-1): each channel's statistics
# over the M = x.size / C values of the other axes, seen here as the rows of an (M, C) matrix. gamma None
# means scale=False (1), beta None center=False (0). The same for both engines:
#   training   mean = Σ x / M, var = Σ (x − mean)² / M (biased, two passes), inv_std = 1 / sqrt(var + epsilon);
#              moving_mean = moving_mean·momentum + mean·(1 − momentum), moving_var likewise with var (in
#              place, Keras's rule); a single row (M = 1) has var 0, so y = beta and dx = 0 (no NaN: Keras too)
#   inference  mean = moving_mean, inv_std = 1 / sqrt(moving_var + epsilon)
#   both       y = (x − mean)·(inv_std·gamma) + beta
# Keras's torch backend takes var as E[x²] − E[x]² (one pass); the two-pass variance here is the same number
# without its cancellation.
def _bn_rows(x, what, training, **vectors):
    """(x as (M, C), M, C) after checking that the per-channel ``vectors`` (None or arrays) are (C,)."""
    if x.ndim < 2 or x.shape[-1] < 1:
        raise ValueError(f"{what}: x must be (N, ..., C) with C >= 1 channels, got {x.shape}")
    c = x.shape[-1]
    for name, v in vectors.items():
        if v is not None and v.shape != (c,):
            raise ValueError(f"{what}: {name} must be ({c},) for x {x.shape}, got {v.shape}")
    m = x.size // c
    if training and m == 0:
        raise ValueError(f"{what}: batch statistics need at least one row, x is {x.shape}")
    return x.reshape(m, c), m, c



def _bn_apply(x2, mean, inv_std, gamma, beta, x_shape, out):
    """y (x_shape, or ``out``) = (x − mean)·(inv_std·gamma) + beta from the rows x2 (M, C), a chunk of rows at a
    time."""
    scale = inv_std if gamma is None else inv_std * gamma
    y = np.empty(x2.shape, DTYPE) if out is None else out.reshape(x2.shape)
    tiled = _tiler(mean, scale, beta)
    for rows, k in _row_chunks(*x2.shape):
        mean_k, scale_k, beta_k = tiled(k)
        part = np.subtract(_wide(x2, rows, k), mean_k, out=_wide(y, rows, k))
        part *= scale_k
        if beta is not None:
            part += beta_k
    return y.reshape(x_shape) if out is None else out


# BatchNormalization's NumPy ops work a chunk of rows at a time (~CHUNK_BYTES: a chunk's temporaries stay in cache)
# and view each chunk's rows of C channels k at a time, as rows of k·C values, with the per-channel vectors tiled k
# times: NumPy broadcasts a vector over long rows much faster than over rows of a few channels (dx's loop over
# 128x32x32x16 on one core: 4.3 ms with rows of 16, 2.8 ms with rows of 256).
WIDE_ROW = 256


def _row_chunks(m, c):
    """(rows, k) for the chunks of M rows of C channels: ``rows`` a slice, k a power of two that divides its length
    (k·C up to WIDE_ROW), the rows that _wide puts in one."""
    per = max(1, CHUNK_BYTES // (4 * c))
    widest = 1 << (max(1, WIDE_ROW // c).bit_length() - 1)
    return [(slice(start, min(start + per, m)), math.gcd(widest, min(start + per, m) - start))
            for start in range(0, m, per)]


def _wide(a, rows, k):
    """The rows ``rows`` of ``a`` (M, C) as (R / k, k·C): k rows in one."""
    return a[rows].reshape(-1, k * a.shape[1])


def _tiler(*vectors):
    """A function of k that gives the (C,) ``vectors`` tiled k times (None stays None), each tiling made once."""
    made = {}

    def tiled(k):
        if k not in made:
            made[k] = [None if v is None else np.tile(v, k) for v in vectors]
        return made[k]
    return tiled


def batchnorm_forward_training(x, gamma, beta, moving_mean, moving_var, momentum, epsilon, ctx=None, out=None,
                               out_mean=None, out_inv_std=None, exchange=None):
    """(y, mean, inv_std) with the batch's statistics (mean, inv_std: (C,), kept for batchnorm_backward);
    moving_mean and moving_var (C,) are updated in place.

    ``exchange``: for x that is one part of the batch (the two-process step's half), a function that takes this
    part's per-channel statistics, a float64 (3, C) array (rows, mean, sum of squared deviations from it), and
    returns every part's, in the batch's order; the parts' statistics are merged into the whole batch's
    (``_merge_moments``), which y and the moving statistics then use.

    BatchNormalization is a few passes over memory: a chunk of rows at a time, x is read twice (its statistics,
    y) and y written once; the temporaries stay in cache."""
    x2, m, c = _bn_rows(x, "batchnorm_forward_training", True, gamma=gamma, beta=beta,
                          moving_mean=moving_mean, moving_var=moving_var)
    chunks = _row_chunks(m, c)
    work = _scratch(ctx, "bn_rows", (chunks[0][0].stop if chunks else 0, c))
    parts = []  # each chunk's statistics, from one read of x: merged as the two-process step merges its halves'
    for rows, k in chunks:
        size = rows.stop - rows.start
        xw = _wide(x2, rows, k)
        chunk_mean = _column_sums(x2[rows]) / DTYPE(size)
        centered = np.subtract(xw, np.tile(chunk_mean, k), out=work[:size].reshape(xw.shape))
        # the float32 mean is off by a rounding error e; the deviations' own mean r (≈ e) puts it right, and
        # Σ(x − m)² − size·r² are the squares about the corrected mean (else the merge's cross term would carry e)
        residual = _column_sums(work[:size]).astype(np.float64) / size
        np.square(centered, out=centered)
        squares = _column_sums(work[:size]).astype(np.float64) - size * residual ** 2
        parts.append(_part_statistics(size, chunk_mean + residual, np.maximum(squares, 0)))
    if exchange is not None:
        parts = exchange(_merged_statistics(parts))
    mean, var = _merge_moments(parts)
    mean = _finish(mean, out_mean)
    inv_std = _finish(DTYPE(1) / np.sqrt(var + DTYPE(epsilon)), out_inv_std)
    moving_mean *= DTYPE(momentum)
    moving_mean += mean * DTYPE(1 - momentum)
    moving_var *= DTYPE(momentum)
    moving_var += var * DTYPE(1 - momentum)
    y = _bn_apply(x2, mean, inv_std, gamma, beta, x.shape, out)
    return y, mean, inv_std


def _part_statistics(rows, first, second):
    """What a part of a batch sends to the others (``exchange``): float64 (3, C), its rows and two per-channel
    statistics."""
    return np.stack([np.full(len(first), float(rows)), first.astype(np.float64), second.astype(np.float64)])


def _merge_moments(parts):
    """(mean, biased variance), float32 (C,), of a batch from its parts' per-channel statistics (float64 (3, C):
    rows, mean, sum of squared deviations from the part's mean), merged in the order given (Chan, Golub and
    LeVeque's pairwise update: no cancellation)."""
    rows, mean, squares = _merged_statistics(parts)
    if not (rows > 0).all():
        raise ValueError("_merge_moments: batch statistics need at least one row in all parts together")
    return mean.astype(DTYPE), (squares / rows).astype(DTYPE)


def _merged_statistics(parts):
    """The float64 (3, C) statistics (rows, mean, squared deviations) of the parts together (_merge_moments)."""
    rows, mean, squares = (np.array(v, np.float64) for v in parts[0])
    for part in parts[1:]:
        n_b, mean_b, squares_b = (np.asarray(v, np.float64) for v in part)
        total = rows + n_b
        delta = mean_b - mean
        with np.errstate(invalid="ignore", divide="ignore"):  # parts of no rows: weights 0 / 0
            mean = np.where(total > 0, mean + delta * (n_b / np.maximum(total, 1)), mean)
            squares = squares + squares_b + delta * delta * (rows * n_b / np.maximum(total, 1))
        rows = total
    return np.stack([rows, mean, squares])


def batchnorm_forward_inference(x, gamma, beta, moving_mean, moving_var, epsilon, out=None, out_inv_std=None):
    """(y, inv_std) with the moving statistics; inv_std (C,) is what batchnorm_backward needs (with
    moving_mean as the mean) when the layer trains in inference mode."""
    x2, m, c = _bn_rows(x, "batchnorm_forward_inference", False, gamma=gamma, beta=beta,
                          moving_mean=moving_mean, moving_var=moving_var)
    inv_std = _finish(DTYPE(1) / np.sqrt(moving_var + DTYPE(epsilon)), out_inv_std)
    return _bn_apply(x2, moving_mean, inv_std, gamma, beta, x.shape, out), inv_std


def batchnorm_backward(dy, x, gamma, mean, inv_std, training, ctx=None, out=None, out_gamma=None, out_beta=None,
                       exchange=None):
    """(dx, dgamma, dbeta) from dy and the forward's x, mean and inv_std, per channel with x̂ = (x − mean)·inv_std:
    dbeta = Σ dy, dgamma = Σ dy·x̂; ``training`` (batch statistics, functions of x):
    dx = gamma·inv_std·(dy − dbeta/M − x̂·dgamma/M); else (moving statistics) dx = gamma·inv_std·dy.

    ``exchange`` (training only; see batchnorm_forward_training): x and dy are one part of the batch; this part's
    float64 (3, C) array (rows, Σ dy, Σ dy·x̂) goes out, every part's comes back, and dx takes the whole batch's
    sums; dgamma and dbeta stay this part's (the parts' weight gradients are added later, as any layer's).

    A chunk of rows at a time (as the forward): x and dy are read twice, dx written once."""
    x2, m, c = _bn_rows(x, "batchnorm_backward", False, gamma=gamma, mean=mean, inv_std=inv_std)
    if dy.shape != x.shape:
        raise ValueError(f"batchnorm_backward: dy {dy.shape} and x {x.shape} differ")
    dy2 = dy.reshape(m, c)
    chunks = _row_chunks(m, c)
    work = _scratch(ctx, "bn_rows", (chunks[0][0].stop if chunks else 0, c))
    sum_dy, sum_dy_xhat = np.zeros(c, DTYPE), np.zeros(c, DTYPE)
    tiled = _tiler(mean, inv_std)
    for rows, k in chunks:
        mean_k, inv_std_k = tiled(k)
        dyw = _wide(dy2, rows, k)
        sum_dy += _column_sums(dy2[rows])
        xhat = np.subtract(_wide(x2, rows, k), mean_k, out=work[:rows.stop - rows.start].reshape(dyw.shape))
        xhat *= inv_std_k
        xhat *= dyw
        sum_dy_xhat += _column_sums(work[:rows.stop - rows.start])
    dbeta = _finish(sum_dy, out_beta)
    dgamma = _finish(sum_dy_xhat, out_gamma)
    scale = inv_std if gamma is None else inv_std * gamma
    dx = np.empty(x2.shape, DTYPE) if out is None else out.reshape(x2.shape)
    if not training:
        scales = _tiler(scale)
        for rows, k in chunks:
            np.multiply(_wide(dy2, rows, k), scales(k)[0], out=_wide(dx, rows, k))
        return (dx.reshape(x.shape) if out is None else out), dgamma, dbeta
    rows_total, sum_dy, sum_dy_xhat = DTYPE(m), dbeta, dgamma
    if exchange is not None:
        parts = exchange(_part_statistics(m, dbeta, dgamma))
        rows_total, sum_dy, sum_dy_xhat = (v.astype(DTYPE) for v in _sum_parts(parts))
    tiled = _tiler(mean, inv_std, sum_dy_xhat / rows_total, sum_dy / rows_total, scale)
    for rows, k in chunks:
        mean_k, inv_std_k, mean_dy_xhat_k, mean_dy_k, scale_k = tiled(k)
        part = np.subtract(_wide(dy2, rows, k), mean_dy_k, out=_wide(dx, rows, k))
        xhat = np.subtract(_wide(x2, rows, k), mean_k, out=work[:rows.stop - rows.start].reshape(part.shape))
        xhat *= inv_std_k
        xhat *= mean_dy_xhat_k
        part -= xhat
        part *= scale_k
    return (dx.reshape(x.shape) if out is None else out), dgamma, dbeta


def _sum_parts(parts):
    """The sum of the parts' float64 arrays, added in the order given."""
    total = np.array(parts[0], np.float64)
    for part in parts[1:]:
        total = total + np.asarray(part, np.float64)
    return total


def batchnorm_fold(w, b, gamma, beta, moving_mean, moving_var, epsilon, out_w=None, out_b=None):
    """(w', b'): a convolution's kernel w (..., F) and bias b (F,) or None with an inference-mode batch normalization
    of its F output channels folded in — conv(x, w') + b' is batchnorm_forward_inference(conv(x, w) + b) up to
    rounding, one convolution instead of a convolution and a pass over its output:
        s = gamma·inv_std, inv_std = 1 / sqrt(moving_var + epsilon);  w' = w·s;  b' = (b − moving_mean)·s + beta.
    """
    f = _fold_channels(w, b, gamma=gamma, beta=beta, moving_mean=moving_mean, moving_var=moving_var)
    scale = DTYPE(1) / np.sqrt(moving_var + DTYPE(epsilon))
    if gamma is not None:
        scale = scale * gamma
    folded_w = np.multiply(w, scale, out=out_w)
    folded_b = np.subtract(np.zeros(f, DTYPE) if b is None else b, moving_mean, out=out_b)
    folded_b *= scale
    if beta is not None:
        folded_b += beta
    return folded_w, folded_b


def _fold_channels(w, b, **vectors):
    """F, the kernel w's output channels (its last axis), after checking that b and the per-channel vectors are
    (F,) (None allowed for b, gamma and beta)."""
    if w.ndim < 1 or w.shape[-1] < 1:
        raise ValueError(f"batchnorm_fold: w must be a kernel (..., F) with F >= 1 output channels, got {w.shape}")
    f = w.shape[-1]
    for name, v in dict(b=b, **vectors).items():
        if v is not None and v.shape != (f,):
            raise ValueError(f"batchnorm_fold: {name} must be ({f},) for a kernel {w.shape}, got {v.shape}")
    return f


# ===================================================================================== depthwise conv2d
# Keras's DepthwiseConv2D: w is (KH, KW, C, DM) and output channel c·DM + m is input channel c convolved with
# w[:, :, c, m] (SeparableConv2D is this, then a 1x1 conv2d). The same padding, stride and activation rules
# as conv2d.
def _depthwise_geometry(x_shape, w_shape, stride, padding, what, b=None, dy=None):
    """(N, H, W, C, DM, P, Q) after checking that x, the kernel w, the bias b (None or (C·DM,)) and the
    output gradient dy (None or (N, P, Q, C·DM)) fit together and that the window fits the padded input."""
    kh, kw, c, dm = w_shape
    n, h, wd, xc, p, q = geometry(x_shape, (kh, kw), stride, padding)
    if xc != c:
        raise ValueError(f"{what}: x has {xc} channels, the depthwise kernel {tuple(w_shape)} expects {c}")
    if p < 1 or q < 1:
        raise ValueError(f"{what}: a {kh}x{kw} window does not fit the {h}x{wd} input padded by "
                         f"{tuple(padding)}")
    if b is not None and b.shape != (c * dm,):
        raise ValueError(f"{what}: the bias must be ({c * dm},) for the kernel {tuple(w_shape)}, got {b.shape}")
    if dy is not None and dy.shape != (n, p, q, c * dm):
        raise ValueError(f"{what}: dy must be {(n, p, q, c * dm)}, got {dy.shape}")
    return n, h, wd, c, dm, p, q


def depthwise_conv2d_forward(x, w, b, stride, padding, activation, ctx=None, out=None):
    """y = act(depthwise(x, w) + b): x (N,H,W,C), w (KH,KW,C,DM), b (C·DM,) or None → y (N,P,Q,C·DM), a chunk of
    images at a time (_image_chunks: each chunk's work stays in cache)."""
    n, h, wd, c, dm, p, q = _depthwise_geometry(x.shape, w.shape, stride, padding, "depthwise_conv2d_forward", b)
    x, w = np.ascontiguousarray(x), np.ascontiguousarray(w)
    y = _target(out, (n, p, q, c * dm))
    by_taps = _tap_rows(w, q) if _depthwise_by_taps_applies(w.shape, stride) else None
    for part, sub in _image_chunks(ctx, n, p * q * c * dm):
        xpad = _pad(x[part], padding, ctx=sub)
        if by_taps is not None:
            _depthwise_by_taps(xpad, by_taps, y[part], sub)
            continue
        # every window as a view (no copy), each output the sum of its window's products, taps in row order: one
        # pass of NumPy's einsum loop instead of a multiply and an add over the whole output per tap (contiguous
        # operands: einsum's loop order, and so the sums' bits, follow the memory layout)
        np.einsum("npqijc,ijcm->npqcm", _windows(xpad, w.shape[:2], stride, p, q), w,
                  out=y[part].reshape(part.stop - part.start, p, q, c, dm))
    if b is not None:
        y += b
    return activation_forward(y, activation, out=y if out is None else out)


# At stride 1 with one filter per channel and few channels, a depthwise correlation runs tap by tap: each tap's
# inputs, a band of image rows, are one long row of Q·C contiguous values (an as_strided view), multiplied by the
# tap's weights tiled Q times and added up in tap order — the same sums as einsum's, bit for bit, but NumPy runs
# long rows of few channels faster than einsum's inner loop over C (one core, 16 images of 176x176x32: forward
# 105 → 78 ms, input gradient 109 → 79 ms; at 64 channels the two are even, at 128 einsum is faster).
DEPTHWISE_TAPS_MAX_CHANNELS = 32
DEPTHWISE_BAND_VALUES = 1 << 16  # a band of rows, about this many output values


def _depthwise_by_taps_applies(w_shape, stride):
    return w_shape[3] == 1 and tuple(stride) == (1, 1) and w_shape[2] <= DEPTHWISE_TAPS_MAX_CHANNELS


def _tap_rows(w, q):
    """(KH, KW, Q·C): each tap's weights of w (KH, KW, C, 1) tiled Q times, for _depthwise_by_taps."""
    return np.tile(w[..., 0], (1, 1, q))


def _depthwise_by_taps(xpad, tiled, y, ctx):
    """y (N, P, Q, C), C-contiguous = the stride-1 depthwise correlation of xpad (N, ≥ P + KH − 1, ≥ Q + KW − 1, C,
    C-contiguous) with the kernel whose tap rows are ``tiled`` (_tap_rows)."""
    n, p, q, c = y.shape
    kh, kw = tiled.shape[:2]
    band = max(1, DEPTHWISE_BAND_VALUES // (q * c))
    product = _scratch(ctx, "depthwise_tap", (min(band, p), q * c))
    row_stride, item = xpad.strides[1], xpad.strides[3]
    for image in range(n):
        rows = y[image].reshape(p, q * c)
        for top in range(0, p, band):
            out = rows[top:top + band]
            size = len(out)
            for i in range(kh):
                for j in range(kw):
                    taps = as_strided(xpad[image, top + i:, j:], (size, q * c), (row_stride, item), writeable=False)
                    if i == 0 and j == 0:
                        np.multiply(taps, tiled[i, j], out=out)
                    else:
                        out += np.multiply(taps, tiled[i, j], out=product[:size])


def depthwise_conv2d_backward_data(dy, w, x_shape, stride, padding, ctx=None, out=None):
    """dx (N,H,W,C) from dy (N,P,Q,C·DM): each tap's dy·w[i, j], summed over the multipliers, added back
    where that tap read; a chunk of images at a time."""
    n, h, wd, c, dm, p, q = _depthwise_geometry(x_shape, w.shape, stride, padding, "depthwise_conv2d_backward_data",
                                                dy=dy)
    kh, kw = w.shape[:2]
    dy = np.ascontiguousarray(dy.reshape(n, p, q, c * dm))
    dx = _target(out, tuple(x_shape))
    flipped = (kh - 1 - padding[0], kh - 1 - padding[1], kw - 1 - padding[2], kw - 1 - padding[3])
    turned = np.ascontiguousarray(w[::-1, ::-1])
    by_taps = _tap_rows(turned, wd) if _depthwise_by_taps_applies(w.shape, stride) else None
    for part, sub in _image_chunks(ctx, n, max(h * wd * c, p * q * c * dm)):
        size = part.stop - part.start
        if tuple(stride) == (1, 1) and min(flipped) >= 0:
            # at stride 1 each input's gradient gathers from a window of dy: a depthwise correlation of dy, padded
            # by the kernel less the forward's padding, with the kernel turned round (one einsum, no scatter)
            dyp = _pad(dy[part], flipped, ctx=sub, what="pad_dy")
            if by_taps is not None:
                _depthwise_by_taps(dyp, by_taps, dx[part], sub)
                continue
            windows = _windows(dyp, (kh, kw), (1, 1), h, wd)
            np.einsum("nhwijcm,ijcm->nhwc", windows.reshape(size, h, wd, kh, kw, c, dm), turned, out=dx[part])
            continue
        dy5 = dy[part].reshape(size, p, q, c, dm)
        dxp = _scratch(sub, "depthwise_dxp", (size, h + padding[0] + padding[1], wd + padding[2] + padding[3], c),
                       zero=True)
        share = _scratch(sub, "depthwise_part", (size, p, q, c))  # each tap's share, into one kept array
        for i in range(kh):
            for j in range(kw):
                if dm == 1:
                    np.multiply(dy5[..., 0], w[i, j, :, 0], out=share)
                else:
                    np.sum(dy5 * w[i, j], axis=-1, out=share)
                _tap(dxp, i, j, stride, p, q)[...] += share
        np.copyto(dx[part], _crop(dxp, padding))
    return _returned(dx, out)


def depthwise_conv2d_backward_filter(dy, x, w_shape, stride, padding, ctx=None, out_w=None, out_b=None):
    """(dw (KH,KW,C,DM), db (C·DM,)) from dy (N,P,Q,C·DM) and the layer's input x: for each tap, the sum
    over the batch and the output pixels of the tap's input times dy, a chunk of images at a time (measured on
    one core over 16 images of 90x90x128: 191 ms in one pass over the batch, 94 ms an image at a time)."""
    n, h, wd, c, dm, p, q = _depthwise_geometry(x.shape, w_shape, stride, padding,
                                                "depthwise_conv2d_backward_filter", dy=dy)
    dy5 = dy.reshape(n, p, q, c, dm)
    dw = np.zeros(w_shape, DTYPE)
    for part, sub in _image_chunks(ctx, n, p * q * c * dm):
        xpad = _pad(x[part], padding, ctx=sub)
        prod = _scratch(sub, "depthwise_prod", dy5[part].shape)  # each tap's products, into one kept array
        for i in range(w_shape[0]):
            for j in range(w_shape[1]):
                tap = _tap(xpad, i, j, stride, p, q)
                if dm == 1:  # 4-D: NumPy's inner loop over the channels, not over an axis of length 1
                    np.multiply(tap, dy5[part][..., 0], out=prod[..., 0])
                else:
                    np.multiply(tap[..., None], dy5[part], out=prod)
                dw[i, j] += _column_sums(prod.reshape(-1, c * dm)).reshape(c, dm)
    return _finish(dw, out_w), _finish(_column_sums(dy.reshape(n * p * q, c * dm)), out_b)


# ===================================================================================== conv2d + max-pool
# Training runs a Conv2D and the MaxPooling2D((2, 2)) after it (strides 2, "valid", the conv's activation
# relu or none) as one op, so the convolution's full output is never written, pooled, masked and read
# back (gpucnn.layers.fusable_pool says which pairs; the CUDA engine fuses them into one kernel).
def conv2d_maxpool_forward(x, w, b, stride, padding, activation, ctx=None, out=None, out_idx=None):
    """(y, idx) = maxpool2d_forward(conv2d_forward(x, w, b, ...), (2, 2), (2, 2), valid), y (N,PP,PQ,F).
    idx is the same wherever y > 0; where a relu output y is 0, idx may name another tap (its gradient is
    0 there either way). Convolution outputs no window reads (an odd last row or column) are skipped.

    Here the four outputs of every pooling window come out as four contiguous blocks (z, (4, N, PP, PQ, F)),
    by one product of an im2col matrix whose rows are grouped by window tap or, for 3x3 kernels at stride 1
    over 8+ channels, by Winograd's F(2x2, 3x3) (``_winograd_outputs``), a chunk of images at a time
    (_pooled_chunks). The pooling runs on them before the activation (relu(max) = max(relu))
    — four times fewer elements to activate."""
    if activation not in (None, "relu"):
        raise ValueError(f"conv2d_maxpool_forward: activation must be None or 'relu', got {activation!r}")
    kh, kw, c, f = w.shape
    n, h, wd, _, p, q = geometry(x.shape, (kh, kw), stride, padding)
    pp, pq = p // 2, q // 2
    winograd = _winograd_applies(w.shape, stride)
    if winograd:
        u = _winograd_kernel(w, 2)
    else:
        w2 = w.reshape(kh * kw * c, f)
        w2 = w2 if b is None else np.vstack([w2, b[None]])

    def taps(part, sub):  # z of a chunk: the four window taps' convolution outputs, (4, size, PP, PQ, F)
        z = _scratch(sub, "z", (4, part.stop - part.start, pp, pq, f))
        if winograd:
            _winograd_outputs(x[part], w, padding, 2, pp, pq, sub, out=z, u=u)
        else:
            cols = _pooled_im2col(x[part], (kh, kw), stride, padding, pp, pq, sub)
            np.matmul(cols if b is not None else cols[:, :-1], w2, out=z.reshape(-1, f))
        return list(z)

    chunks = _pooled_chunks(ctx, n, w.shape, pp, pq, winograd)
    if len(chunks) == 1:
        y, idx = _first_max(taps(*chunks[0]), out, out_idx)
    else:
        y, idx = _target(out, (n, pp, pq, f)), _target(out_idx, (n, pp, pq, f), np.int8)
        for part, sub in chunks:
            _first_max(taps(part, sub), y[part], idx[part])
    if winograd and b is not None:
        y += b  # max(z + b) = max(z) + b: the bias added to the pooled values only
    if activation == "relu":
        np.maximum(y, 0, out=y)
    return (y, idx) if len(chunks) == 1 else (_returned(y, out), _returned(idx, out_idx))


def _pooled_values(w_shape, pp, pq, winograd):
    """The work values (float32) of one image in conv2d_maxpool: its F(2x2, 3x3) tiles or its pooled im2col rows."""
    kh, kw, c, f = w_shape
    return 16 * pp * pq * max(c, f) if winograd else 4 * pp * pq * (kh * kw * c + 1)


def _pooled_chunks(ctx, n, w_shape, pp, pq, winograd):
    """conv2d_maxpool's chunks (_image_chunks): one for a batch whose work fits in WHOLE_BATCH_BYTES (the seed
    model's layers at batch 64: chunked, its step measured ~3 % slower, the backward making the tiles again),
    else ~CHUNK_BYTES each."""
    values = _pooled_values(w_shape, pp, pq, winograd)
    return list(_image_chunks(ctx, n, 0 if 4 * n * values <= WHOLE_BATCH_BYTES else values))


def conv2d_maxpool_backward(dy, y, idx, x, w, stride, padding, activation, ctx=None, out_w=None,
                            out_b=None, need_dx=True, out=None):
    """The backward of conv2d_maxpool_forward from the pooled gradient dy (N,PP,PQ,F), its y and idx:
    the weight gradients go to (out_w, out_b) as conv2d_backward_filter gives them, and the input
    gradient dx (N,H,W,C) is returned when ``need_dx`` (else None). ``ctx``: the forward's. A chunk of images
    at a time: each chunk's im2col matrix or tiles are made again, except in a batch of one chunk, where the
    forward's are still in its work dict (the ctx contract: the last forward with this ctx had this x)."""
    kh, kw, c, f = w.shape
    n, h, wd, _, p, q = geometry(x.shape, (kh, kw), stride, padding)
    pp, pq = p // 2, q // 2
    g = np.multiply(dy, y > 0) if activation == "relu" else dy  # relu_backward of the pooled values
    finite = np.isfinite(g).all()
    winograd = _winograd_applies(w.shape, stride)
    u = _winograd_kernel(w, 2) if winograd and need_dx else None
    gw = np.zeros((16, c, f) if winograd else (kh * kw * c + 1, f), DTYPE) if n == 0 else None
    chunks = _pooled_chunks(ctx, n, w.shape, pp, pq, winograd)
    dx = _dx_target(ctx, x.shape, out) if need_dx and len(chunks) != 1 else None  # one chunk: its work array's
    for part, sub in chunks:
        size = part.stop - part.start
        # the gradient of each window tap's convolution output, in the forward's z (spent once y and idx are made)
        dz = _scratch(sub, "z", (4, size, pp, pq, f))
        for k in range(4):
            _share_of_tap(idx[part], k, g[part], finite, out=dz[k])
        if winograd:
            dm = _winograd_output_grad(dz, 2, sub)
            v = _kept(sub, "wino_v", (16, size * pp * pq, c)) if len(chunks) == 1 else None
            gw = _summed(gw, np.matmul((_winograd_tiles(x[part], padding, 2, pp, pq, sub) if v is None else v)
                                       .transpose(0, 2, 1), dm))
            if need_dx:
                dx = _gathered(dx, part, _winograd_dx(dm, w, (size,) + x.shape[1:], padding, 2, pp, pq, sub, u=u))
            continue
        cols = _kept_cols(sub, (4 * size * pp * pq, kh * kw * c + 1)) if len(chunks) == 1 else None
        cols = _pooled_im2col(x[part], (kh, kw), stride, padding, pp, pq, sub) if cols is None else cols
        gw = _summed(gw, cols.T @ dz.reshape(-1, f))
        if need_dx:
            # the window taps back in image order: (n, 2·PP, 2·PQ, F), the convolution outputs that have gradients
            dz_image = _scratch(sub, "dz_image", (size, pp, 2, pq, 2, f))
            np.copyto(dz_image, dz.reshape(2, 2, size, pp, pq, f).transpose(2, 3, 0, 4, 1, 5))
            dx = _gathered(dx, part, _backward_data(dz_image.reshape(size, 2 * pp, 2 * pq, f), w,
                                                    (size,) + x.shape[1:], stride, padding, sub))
    if winograd:
        _finish((_WINOGRAD[2][1].T @ gw.reshape(16, -1)).reshape(w.shape), out_w)
        if out_b is not None:
            _finish(_column_sums(g.reshape(-1, f)), out_b)
    else:
        _finish(gw[:-1].reshape(w.shape), out_w)
        if out_b is not None:
            _finish(gw[-1], out_b)
    return _returned(dx, out) if need_dx else None


def _gathered(dx, part, chunk_dx):
    """dx with a chunk's input gradient copied into its rows ``part``; with no dx (a batch of one chunk), the chunk's
    own (a view of a work array)."""
    if dx is None:
        return chunk_dx
    np.copyto(dx[part], chunk_dx)
    return dx


# ------------------------------------------------------------- Winograd F(m x m, 3x3)
# A 3x3 convolution at stride 1 gives an m x m block of outputs from an (m + 2) x (m + 2) input tile d.
# Winograd's minimal filtering algorithm gets those m² outputs with (m + 2)² multiplications per (channel,
# filter) pair instead of 9 m²:
#     Y = Aᵀ [ (G g Gᵀ) ⊙ (Bᵀ d B) ] A            (g: the 3x3 kernel of one channel and filter)
# The transforms only add, subtract and scale by constants. Over all tiles and channels, the (m + 2)²
# elementwise products become (m + 2)² matrix products V[e] @ U[e] (V: transformed tiles, (tiles, C); U:
# transformed kernels, (C, F)). Each transform of a block is one small matrix acting on the block flattened
# row by row — a Kronecker product, applied to every tile at once as one matrix product. The backward pass
# is the transpose of each step, in reverse order; the gradients are those of the convolution itself, up to
# float32 rounding.
#
# m = 2 (16 products for 4 outputs, 2.25x fewer than direct) serves the fused convolution + 2x2 max-pool: its
# tiles, at even rows and columns, sit exactly under the pooling windows. m = 3 (25 for 9, 3.24x fewer)
# serves a plain convolution; its tiles reach past the bottom and right edges when 3 does not divide the
# output size (zeros there; those outputs are dropped). Tiles overlap by two rows and columns.
# (F(4x4, 3x3), 36 for 16, would be ~17 % faster on 32x32 maps but rounds worse: one training step of a ReLU
# residual network updated its weights 6x further from float64 than Keras's own float32 step, F(3x3) 30x closer.)
#
# NaN and inf spread over a whole tile (0 · inf in a transform): a non-finite input makes every output of
# each tile over it NaN. Under a 2x2 max-pool these are the same windows the direct convolution makes
# non-finite (possibly NaN instead of ±inf); a plain convolution may get NaN in a few more outputs.
def _toom_cook(bt, g, at):
    """The Kronecker forms (tile (α², α²), kernel (α², 9), out (m², α²)) of F(m, 3)'s matrices, α = m + 2."""
    bt, g, at = (np.array(a, np.float64) for a in (bt, g, at))
    return tuple(np.kron(a, a).astype(DTYPE) for a in (bt, g, at))


_WINOGRAD = {  # m: the Kronecker forms of Bᵀ, G, Aᵀ (F(m, 3) from the points 0, 1, -1, (2,) ∞)
    2: _toom_cook([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
                  [[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]],
                  [[1, 1, 1, 0], [0, 1, -1, -1]]),
    3: _toom_cook([[2, -1, -2, 1, 0], [0, -2, -1, 1, 0], [0, 2, -3, 1, 0], [0, -1, 0, 1, 0], [0, 2, -1, -2, 1]],
                  [[1 / 2, 0, 0], [-1 / 2, -1 / 2, -1 / 2], [-1 / 6, 1 / 6, -1 / 6], [1 / 6, 1 / 3, 2 / 3],
                   [0, 0, 1]],
                  [[1, 1, 1, 1, 0], [0, 1, -1, 2, 0], [0, 1, 1, 4, 1]]),
}
WINOGRAD_MIN_CHANNELS = 8  # conv2d_maxpool: below this the products are too thin to pay for the transforms
# A plain convolution takes F(3x3, 3x3) from 64 input channels: below, the transforms (dense Kronecker products,
# ~5,000 flops per tile and channel over a step) cost more than the products save. Forward + backward, one core,
# chunked, 3x3 'same': 32x32, 16 → 16 channels, batch 64: im2col 19 ms, Winograd 25 ms; 16x16, 32 → 32: 13 / 15;
# 8x8, 64 → 64: 9.5 / 8.9; 16x16, 128 → 128, batch 16: 33 / 30; 8x8, 256 → 256: 39 / 33.
PLAIN_WINOGRAD_MIN_CHANNELS = 64


def _winograd_applies(w_shape, stride):
    return tuple(w_shape[:2]) == (3, 3) and tuple(stride) == (1, 1) and w_shape[2] >= WINOGRAD_MIN_CHANNELS


def _plain_winograd_applies(w_shape, stride):
    """Whether a plain (unpooled) convolution takes F(3x3, 3x3) rather than im2col products, chunk by chunk."""
    return tuple(w_shape[:2]) == (3, 3) and tuple(stride) == (1, 1) and w_shape[2] >= PLAIN_WINOGRAD_MIN_CHANNELS


def _tile_padding(x_shape, padding, m, th, tw):
    """The input padding for TH x TW tiles at stride m: the layer's, plus zeros where tiles reach past it."""
    top, bottom, left, right = padding
    return (top, bottom + max(0, m * th + 2 - (x_shape[1] + top + bottom)),
            left, right + max(0, m * tw + 2 - (x_shape[2] + left + right)))


def _winograd_tiles(x, padding, m, th, tw, ctx):
    """V ((m+2)², N·TH·TW, C): the transformed input tile under each m x m block of outputs, kept in ``ctx``."""
    n, c, a = x.shape[0], x.shape[3], m + 2
    xpad = _pad(x, _tile_padding(x.shape, padding, m, th, tw), ctx=ctx)
    s0, s1, s2, s3 = xpad.strides
    d = _scratch(ctx, "wino_d", (a * a, n * th * tw, c))  # tile element (r, s) of every tile, r and s outermost
    np.copyto(d.reshape(a, a, n, th, tw, c),
              as_strided(xpad, (a, a, n, th, tw, c), (s1, s2, s0, m * s1, m * s2, s3), writeable=False))
    v = _scratch(ctx, "wino_v", d.shape)
    np.matmul(_WINOGRAD[m][0], d.reshape(a * a, -1), out=v.reshape(a * a, -1))
    return v


def _winograd_kernel(w, m):
    """U ((m+2)², C, F): the transformed kernels."""
    c, f = w.shape[2], w.shape[3]
    return (_WINOGRAD[m][1] @ w.reshape(9, c * f)).reshape(-1, c, f)


def _winograd_outputs(x, w, padding, m, th, tw, ctx, out, u=None):
    """The first m·TH x m·TW convolution outputs, no bias, into ``out`` (m², N, TH, TW, F): block i·m + j
    holds output (i, j) of every tile."""
    v = _winograd_tiles(x, padding, m, th, tw, ctx)
    prod = _scratch(ctx, "wino_m", v.shape[:2] + (w.shape[3],))
    np.matmul(v, _winograd_kernel(w, m) if u is None else u, out=prod)
    np.matmul(_WINOGRAD[m][2], prod.reshape(len(prod), -1), out=out.reshape(m * m, -1))


def _winograd_output_grad(dy_blocks, m, ctx):
    """dM ((m+2)², tiles, F) from the gradient of _winograd_outputs' blocks (m², N, TH, TW, F)."""
    f = dy_blocks.shape[-1]
    dm = _scratch(ctx, "wino_m", ((m + 2) ** 2, dy_blocks[0].size // f, f))  # the forward's product is spent
    np.matmul(_WINOGRAD[m][2].T, dy_blocks.reshape(m * m, -1), out=dm.reshape(len(dm), -1))
    return dm


def _winograd_dx(dm, w, x_shape, padding, m, th, tw, ctx, u=None):
    """dx (N, H, W, C) from dM (a view of a work array in ``ctx``)."""
    n, h, wd, c = x_shape
    a = m + 2
    dv = _scratch(ctx, "wino_dv", dm.shape[:2] + (c,))
    np.matmul(dm, (_winograd_kernel(w, m) if u is None else u).transpose(0, 2, 1), out=dv)
    dd = _scratch(ctx, "wino_d", dv.shape)  # the forward's gathered tiles are spent: the array takes dd
    np.matmul(_WINOGRAD[m][0].T, dv.reshape(a * a, -1), out=dd.reshape(a * a, -1))
    top, left = padding[0], padding[2]
    # each tile element back where it was read, tiles overlapping by a − m = 2: along each axis the first m
    # elements of the tiles fill the output's blocks of m (a copy), the last two add to the next block's first
    # two; first along the rows of tiles (for every tile row element at once), then down the columns
    dd = dd.reshape(a, a, n, th, tw, c)
    # (the tiles may end before the padded input does: a pooled convolution's last odd row and column)
    width, height = max(m * tw + m, left + wd), max(m * th + m, top + h)
    rows = _scratch(ctx, "wino_rows", (a, n, th, width, c))
    np.copyto(rows[:, :, :, :m * tw].reshape(a, n, th, tw, m, c), dd[:, :m].transpose(0, 2, 3, 4, 1, 5))
    rows[:, :, :, m * tw:] = 0
    rows[:, :, :, m:m + m * tw].reshape(a, n, th, tw, m, c)[..., :a - m, :] += dd[:, m:].transpose(0, 2, 3, 4, 1, 5)
    dxp = _scratch(ctx, "dxp", (n, height, width, c))
    np.copyto(dxp[:, :m * th].reshape(n, th, m, width, c), rows[:m].transpose(1, 2, 0, 3, 4))
    dxp[:, m * th:] = 0
    dxp[:, m:m + m * th].reshape(n, th, m, width, c)[:, :, :a - m] += rows[m:].transpose(1, 2, 0, 3, 4)
    return dxp[:, top:top + h, left:left + wd, :]


def _untile(blocks, y):
    """Copy the m x m output blocks (m, m, N, TH, TW, F) of _winograd_outputs into the (N, P, Q, F) C-contiguous
    array y, dropping the outputs past P x Q: the whole tiles in one copy, the partial last row and column of tiles
    in three more (each output written once)."""
    m, n, f = blocks.shape[0], blocks.shape[2], blocks.shape[5]
    _, p, q, _ = y.shape
    tiles = blocks.transpose(2, 3, 0, 4, 1, 5)  # (N, TH, m, TW, m, F), a view
    pf, qf = p // m, q // m  # whole tiles
    rp, rq = p - m * pf, q - m * qf  # rows and columns of the partial ones
    np.copyto(y[:, :m * pf, :m * qf].reshape(n, pf, m, qf, m, f), tiles[:, :pf, :, :qf])
    if rp:
        np.copyto(y[:, m * pf:, :m * qf].reshape(n, rp, qf, m, f), tiles[:, pf, :rp, :qf])
    if rq:
        np.copyto(y[:, :m * pf, m * qf:].reshape(n, pf, m, rq, f), tiles[:, :pf, :, qf, :rq])
    if rp and rq:
        np.copyto(y[:, m * pf:, m * qf:], tiles[:, pf, :rp, qf, :rq])


def _tile_counts(p, q, m):
    """(TH, TW): the m x m tiles that cover P x Q outputs."""
    return -(-p // m), -(-q // m)


def _plain_output_grad(dy, ctx):
    """(dM, TH, TW) of a plain convolution's F(3x3, 3x3) from its output gradient dy (N, P, Q, F): dy cut
    into the (9, N, TH, TW, F) blocks of _winograd_outputs (zeros past P x Q), then transformed."""
    n, p, q, f = dy.shape
    th, tw = _tile_counts(p, q, 3)
    dy = _pad(dy, (0, 3 * th - p, 0, 3 * tw - q), ctx=ctx, what="wino_dy_pad")
    blocks = _scratch(ctx, "wino_dy", (3, 3, n, th, tw, f))
    np.copyto(blocks, dy.reshape(n, th, 3, tw, 3, f).transpose(2, 4, 0, 1, 3, 5))
    return _winograd_output_grad(blocks.reshape(9, n, th, tw, f), 3, ctx), th, tw


def _winograd_conv(x, w, padding, ctx, y):
    """y (N, P, Q, F) = the stride-1 3x3 correlation of x with w, no bias, chunk by chunk."""
    n, p, q, f = y.shape
    th, tw = _tile_counts(p, q, 3)
    u = _winograd_kernel(w, 3)
    for part, sub in _image_chunks(ctx, n, 25 * th * tw * max(x.shape[3], f)):
        blocks = _scratch(sub, "wino_y", (9, part.stop - part.start, th, tw, f))
        _winograd_outputs(x[part], w, padding, 3, th, tw, sub, out=blocks, u=u)
        _untile(blocks.reshape((3, 3) + blocks.shape[1:]), y[part])


def _winograd_backward(dy, x, w, x_shape, padding, ctx, out_w=None, need_dx=False, out=None):
    """The gradients of _winograd_conv from dy (N, P, Q, F), chunk by chunk, from each chunk's dM (made once for
    both): dw into ``out_w`` (needs x) and, with ``need_dx``, dx (needs w; into ``out`` if given), returned.
    Each chunk's tiles V are made again from x — cheaper than keeping the whole batch's, which would have left
    the cache — except in a batch of one chunk, where the forward's are still in its work dict (the ctx
    contract: the last forward with this ctx had this x); there dx is the chunk's work array (no copy)."""
    n, p, q, f = dy.shape
    c = x_shape[3]
    th, tw = _tile_counts(p, q, 3)
    du = np.zeros((25, c, f), DTYPE) if out_w is not None and n == 0 else None
    chunks = list(_image_chunks(ctx, n, 25 * th * tw * max(c, f)))
    dx = _dx_target(ctx, x_shape, out) if need_dx and len(chunks) != 1 else None
    for part, sub in chunks:
        dm, _, _ = _plain_output_grad(dy[part], sub)
        if out_w is not None:
            v = _kept(sub, "wino_v", (25, (part.stop - part.start) * th * tw, c)) if len(chunks) == 1 else None
            if v is None:
                v = _winograd_tiles(x[part], padding, 3, th, tw, sub)
            du = _summed(du, np.matmul(v.transpose(0, 2, 1), dm))
        if need_dx:
            chunk_shape = (part.stop - part.start,) + tuple(x_shape[1:])
            dx = _gathered(dx, part, _winograd_dx(dm, w, chunk_shape, padding, 3, th, tw, sub))
    if out_w is not None:
        _finish((_WINOGRAD[3][1].T @ du.reshape(25, -1)).reshape(3, 3, c, f), out_w)
    return _returned(dx, out) if need_dx else None


# ===================================================================================== dense
def dense_forward(x, w, b, activation, out=None):
    """y = act(x @ w + b): x (N,IN), w (IN,UNITS), b (UNITS,) or None."""
    y = x @ w
    if b is not None:
        y += b
    return activation_forward(y, activation, out=y if out is None else out)


def dense_backward_data(dy, w, out=None):
    """dx (N,IN) = dy @ w.T."""
    return _finish(dy @ w.T, out)


def dense_backward_weights(dy, x, out_w=None, out_b=None):
    """(dw (IN,UNITS), db (UNITS,)) = (x.T @ dy, sum of dy over the batch)."""
    return _finish(x.T @ dy, out_w), _finish(_column_sums(dy), out_b)


# ===================================================================================== merging
def add(a, b, out=None):
    """y = a + b (same shapes; ``out`` may be ``a``)."""
    return np.add(a, b, out=out)


def concat(xs, axis, out=None):
    """The arrays ``xs`` joined along ``axis`` (an axis of the whole array, batch included)."""
    return np.concatenate(xs, axis=axis, out=out)


def split(dy, sizes, axis, outs=None):
    """concat's backward: ``dy`` cut along ``axis`` into pieces of ``sizes`` (a list of arrays)."""
    pieces = np.split(dy, np.cumsum(sizes)[:-1], axis=axis)
    if outs is None:
        return pieces
    for out, piece in zip(outs, pieces):
        out[...] = piece
    return outs


# ===================================================================================== dropout
def dropout_forward(x, rate, seeds, step, slot, out=None, out_mask=None, offset=0):
    """(y, mask): keep each element with probability 1 - rate and scale it by 1 / (1 - rate). The mask's seed
    is ``seeds[step[0], slot]``: ``seeds`` a (steps, slots) uint64 table of per-step seeds, ``step`` a (1,)
    int32 counter (engine arrays, so a captured step reads a new seed at every replay). ``offset``: x is
    images ``offset``.. of a whole batch, and its mask is those images' part of the whole batch's mask (the
    two halves of a split step draw the one-process step's mask)."""
    seed = int(seeds.reshape(-1)[int(step[0]) * seeds.shape[-1] + slot])
    offset = int(offset)
    keep = np.random.default_rng(seed).random((offset + x.shape[0],) + x.shape[1:], dtype=DTYPE)[offset:] >= rate
    mask = _finish(keep.astype(DTYPE) / DTYPE(1.0 - rate), out_mask)
    return np.multiply(x, mask, out=out), mask


def dropout_backward(dy, mask, out=None):
    return np.multiply(dy, mask, out=out)


# ===================================================================================== losses
EPSILON = 1e-7  # Keras's backend epsilon: probabilities are clipped to [EPSILON, 1 - EPSILON]


def _onehot(labels, units):
    """One-hot float32 rows from integer labels (N,)."""
    y = np.zeros((labels.shape[0], units), DTYPE)
    y[np.arange(labels.shape[0]), labels] = 1
    return y


def _log_softmax(z):
    """log(softmax(z)) over the last axis: (z - max) - log(sum(exp(z - max)))."""
    shifted = z - z.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def crossentropy_forward(p, labels, sparse, from_logits=False):
    """Per-sample cross-entropy (N,) of probabilities p (N,K), as Keras computes it: rows renormalised
    to sum to 1 and clipped to [1e-7, 1 - 1e-7]. labels: one-hot (N,K) or, when sparse, integers (N,).
    from_logits: p holds logits z, loss = -sum(y * log_softmax(z)) (no clip)."""
    y = _onehot(labels, p.shape[1]) if sparse else labels
    if from_logits:
        return -(y * _log_softmax(p)).sum(axis=-1)
    q = np.clip(p / p.sum(axis=-1, keepdims=True), EPSILON, 1 - EPSILON)
    return -(y * np.log(q)).sum(axis=-1)


def softmax_crossentropy_backward(p, labels, sparse, out=None):
    """Gradient of the mean cross-entropy w.r.t. the logits of a softmax output p: (p - y) / N."""
    y = _onehot(labels, p.shape[1]) if sparse else labels
    return _finish((p - y) / DTYPE(p.shape[0]), out)


def crossentropy_backward(p, labels, sparse, from_logits=False, out=None):
    """Gradient of the mean cross-entropy w.r.t. probabilities p (used when the output layer is not a
    softmax): through the renormalisation and the clip (zero where clipping is active). from_logits: w.r.t.
    the logits p, (softmax(p) * sum(y) - y) / N."""
    y = _onehot(labels, p.shape[1]) if sparse else labels
    if from_logits:
        s = np.exp(_log_softmax(p))
        return _finish(((s * y.sum(axis=-1, keepdims=True) - y) / DTYPE(p.shape[0])).astype(DTYPE), out)
    s = p.sum(axis=-1, keepdims=True)
    q = p / s
    inside = (q >= EPSILON) & (q <= 1 - EPSILON)
    dq = np.where(inside, -y / np.clip(q, EPSILON, 1 - EPSILON), 0)
    dp = (dq - (dq * q).sum(axis=-1, keepdims=True)) / s
    return _finish((dp / DTYPE(p.shape[0])).astype(DTYPE), out)


def count_correct(p, labels, sparse):
    """How many rows of p have their arg-max at the true class (first maximum wins ties)."""
    truth = labels if sparse else labels.argmax(axis=-1)
    return (p.argmax(axis=-1) == truth).sum()  # a NumPy integer: the CUDA engine returns a 0-d array


# Binary cross-entropy, Keras's binary_crossentropy: p and labels are (N, U), U independent sigmoid units;
# labels smoothed towards 0.5, y = labels (1 - s) + s / 2; the per-sample loss is the mean over the units of
#     -(y log q + (1 - y) log(1 - q)),  q = p clipped to [1e-7, 1 - 1e-7]
# or, from logits z, max(z, 0) - z y + log1p(exp(-|z|)) (no clip). The training loss is the mean over the
# batch, so each gradient is d(mean over all N·U terms).
def _binary_targets(p, labels, label_smoothing, what):
    """The smoothed float32 targets, after checking shapes and the smoothing."""
    if p.ndim != 2 or p.shape[1] < 1:
        raise ValueError(f"{what}: predictions must be (N, units) with units >= 1, got {p.shape}")
    y = np.asarray(labels, dtype=DTYPE)
    if y.shape != p.shape:
        raise ValueError(f"{what}: labels {y.shape} must have the predictions' shape {p.shape}")
    if not 0 <= label_smoothing <= 1:
        raise ValueError(f"{what}: label_smoothing must be in [0, 1], got {label_smoothing!r}")
    if label_smoothing:
        y = y * DTYPE(1 - label_smoothing) + DTYPE(0.5 * label_smoothing)
    return y


def binary_crossentropy_forward(p, labels, from_logits, label_smoothing=0.0):
    """Per-sample binary cross-entropy (N,) of probabilities p (N, U), or of logits when from_logits: the
    mean over the U units, as Keras computes it (above)."""
    y = _binary_targets(p, labels, label_smoothing, "binary_crossentropy_forward")
    if from_logits:
        terms = np.maximum(p, 0) - p * y + np.log1p(np.exp(-np.abs(p)))
    else:
        q = np.clip(p, EPSILON, 1 - EPSILON)
        terms = -(y * np.log(q) + (DTYPE(1) - y) * np.log(DTYPE(1) - q))
    return terms.mean(axis=-1)


def binary_crossentropy_backward(p, labels, from_logits, label_smoothing=0.0, out=None):
    """Gradient of the mean binary cross-entropy w.r.t. the model's output: probabilities p through the clip,
    (-y / p + (1 - y) / (1 - p)) / (N·U), zero where the clip is active; logits (from_logits), as
    sigmoid_binary_crossentropy_backward."""
    if from_logits:
        return sigmoid_binary_crossentropy_backward(_sigmoid(p), labels, label_smoothing, out)
    y = _binary_targets(p, labels, label_smoothing, "binary_crossentropy_backward")
    inside = (p >= DTYPE(EPSILON)) & (p <= DTYPE(1 - EPSILON))
    with np.errstate(divide="ignore", invalid="ignore"):  # 1/0 where p is 0 or 1: outside the clip
        g = (-y / p + (DTYPE(1) - y) / (DTYPE(1) - p)) / DTYPE(p.size)
    return _finish(np.where(inside, g, DTYPE(0)), out)


def sigmoid_binary_crossentropy_backward(p, labels, label_smoothing=0.0, out=None):
    """Gradient of the mean binary cross-entropy w.r.t. the logits of a sigmoid output p: (p - y) / (N·U).
    This is the derivative of the logits form, which Keras's TensorFlow backend uses for a sigmoid output;
    where Keras's clip of p is active it differs from differentiating through the clip (that gives zero
    there, and a unit stuck at 0 or 1 could never learn back), as softmax_crossentropy_backward does."""
    y = _binary_targets(p, labels, label_smoothing, "sigmoid_binary_crossentropy_backward")
    return _finish((p - y) / DTYPE(p.size), out)


def count_binary_correct(p, labels, threshold=0.5):
    """How many of the N·U predictions are right, as Keras's binary accuracy counts them: (p > threshold)
    as 1 or 0, equal to the label (a label other than 0 or 1 never matches). Accuracy = count / p.size."""
    y = _binary_targets(p, labels, 0.0, "count_binary_correct")
    return ((p > DTYPE(threshold)).astype(DTYPE) == y).sum()


# ===================================================================================== image transforms
# Preprocessing and augmentation of (N, H, W, C) images, as Keras's Rescaling, RandomFlip, RandomRotation,
# RandomZoom, RandomTranslation and RandomContrast compute them. They run on a model's inputs: none has a
# backward. The per-image random draws are the caller's; these ops apply them.
#
# affine_transform follows keras.ops.image.affine_transform: each image's transform [a0, a1, a2, b0, b1, b2,
# c0, c1] maps an OUTPUT pixel (x = column, y = row; pixel centres at integer coordinates) to the INPUT point
#     x' = (a0 x + a1 y + a2) / k,  y' = (b0 x + b1 y + b2) / k,  k = c0 x + c1 y + 1
# (Keras's non-TensorFlow backends ignore c0 and c1; zero, as every transform built below has them, k = 1).
# The input is sampled there: "nearest" takes the pixel at the rounded coordinates (halves to even);
# "bilinear" weighs the four pixels around it, (1 - fy)(1 - fx), (1 - fy) fx, fy (1 - fx), fy fx, added in
# that order. A pixel index outside [0, size) is read through the fill mode, along each axis on its own:
#     reflect  (d c b a | a b c d | d c b a)   about the edge of the last pixel (half-sample symmetric)
#     mirror   (d c b | a b c d | c b a)       about the centre of the last pixel (whole-sample symmetric)
#     wrap     (a b c d | a b c d | a b c d)
#     nearest  (a a a a | a b c d | d d d d)
#     constant (k k k k | a b c d | k k k k)   every tap outside the image reads fill_value
# An output whose k is 0, or whose coordinates are not finite, is fill_value; coordinates are clamped to
# +-2^24 (beyond, float32 cannot tell neighbouring pixels apart).
INTERPOLATIONS = ("nearest", "bilinear")
FILL_MODES = ("reflect", "mirror", "wrap", "nearest", "constant")
_COORDINATE_LIMIT = 2.0 ** 24


def _images(x, what):
    if x.ndim != 4:
        raise ValueError(f"{what}: images must be (N, H, W, C), got shape {x.shape}")
    return x.shape


def _not_aliased(out, x, what):
    if out is not None and np.may_share_memory(out, x):
        raise ValueError(f"{what}: out must not be x (each output reads other pixels of the input)")


def _per_image(values, n, what, dtype=DTYPE):
    """One value per image as a host (N,) array (from any shape of N values, as Keras's (N, 1, 1, 1)), or None."""
    if values is None:
        return None
    a = np.asarray(values, dtype=dtype)
    if a.size != n:
        raise ValueError(f"{what}: expected one value per image ({n},), got shape {a.shape}")
    return a.reshape(n)


def check_transform_options(interpolation, fill_mode, what="affine_transform"):
    """Checks ``interpolation`` and ``fill_mode``, with an error listing the choices."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"{what}: interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if fill_mode not in FILL_MODES:
        raise ValueError(f"{what}: fill_mode must be one of {FILL_MODES}, got {fill_mode!r}")


def rescale(x, scale, offset, out=None):
    """y = x * scale + offset (Keras's Rescaling, in float32). No backward: it runs on inputs."""
    y = np.multiply(x, DTYPE(scale), out=out, dtype=DTYPE)
    y += DTYPE(offset)
    return y


def step_row(table, step, n, out=None):
    """This step's per-image values of a random layer: the first ``n`` images of row ``step[0]`` of ``table``
    ((rows, N_max, K), any dtype, n <= N_max: a smaller last batch reads the row's first images), as a new
    (n, K) array or in ``out``. ``step`` is the (1,) int32 step counter, an engine array, as for the dropout
    seeds (so a captured step reads a new row at every replay)."""
    check_step_row(table, n, out)
    return _finish(np.array(table[int(step[0]), :n]), out)


def check_step_row(table, n, out):
    """Checks step_row's arguments (both engines)."""
    if table.ndim < 2 or not 0 <= n <= table.shape[1]:
        raise ValueError(f"step_row: table must be (rows, images, ...) with n = {n} <= images, got {table.shape}")
    if out is not None and (out.dtype != table.dtype or out.shape != (n, *table.shape[2:])):
        raise ValueError(f"step_row: out must be {(n, *table.shape[2:])} of {table.dtype}, got {out.shape} of "
                         f"{out.dtype}")


def flip(x, horizontal_flags, vertical_flags, out=None):
    """Each image n reversed left-right where horizontal_flags[n], upside down where vertical_flags[n] (either
    may be None: no flip on that axis); flags are (N,) booleans. Keras's RandomFlip (its
    "horizontal_and_vertical" passes the same flags twice). No backward: it runs on inputs."""
    n = _images(x, "flip")[0]
    _not_aliased(out, x, "flip")
    y = np.array(x, dtype=DTYPE, copy=True)
    for flags, axis in ((horizontal_flags, 2), (vertical_flags, 1)):
        chosen = _per_image(flags, n, "flip", bool)
        if chosen is not None and chosen.any():
            y[chosen] = np.flip(y[chosen], axis=axis)
    return _finish(y, out)


def _transforms(rows):
    """(N, 8) float32 transforms from rows [a0, a1, a2, b0, b1, b2] in float64."""
    rows = np.asarray(rows, np.float64)
    return np.concatenate([rows, np.zeros((rows.shape[0], 2))], axis=1).astype(DTYPE)


def rotation_transforms(angles, height, width):
    """Keras RandomRotation's transforms: each image turned by angles[n] radians (counter-clockwise as
    displayed, for positive angles) about its centre ((width - 1) / 2, (height - 1) / 2). RandomRotation(factor)
    draws angle = 2 pi * uniform(lower, upper)."""
    a = np.asarray(angles, np.float64).reshape(-1)
    cx, cy = 0.5 * (width - 1), 0.5 * (height - 1)
    cos, sin = np.cos(a), np.sin(a)
    return _transforms(np.stack([cos, -sin, cx - cx * cos + cy * sin, sin, cos, cy - cx * sin - cy * cos], 1))


def zoom_transforms(height_zooms, width_zooms, height, width):
    """Keras RandomZoom's transforms: the output samples an area height_zooms[n] x width_zooms[n] times the
    image's about its centre (> 1 zooms out, < 1 in). RandomZoom draws zoom = 1 + uniform(lower, upper)."""
    zy = np.asarray(height_zooms, np.float64).reshape(-1)
    zx = np.asarray(width_zooms, np.float64).reshape(-1)
    zero = np.zeros_like(zx)
    return _transforms(np.stack([zx, zero, 0.5 * (width - 1) * (1 - zx), zero, zy,
                                 0.5 * (height - 1) * (1 - zy)], 1))


def translation_transforms(dx, dy):
    """Keras RandomTranslation's transforms: each image moved right by dx[n] and down by dy[n] pixels.
    RandomTranslation draws dx = width * uniform(lower, upper), dy likewise with the height."""
    tx = np.asarray(dx, np.float64).reshape(-1)
    ty = np.asarray(dy, np.float64).reshape(-1)
    one, zero = np.ones_like(tx), np.zeros_like(tx)
    return _transforms(np.stack([one, zero, -tx, zero, one, -ty], 1))


def _fix_index(i, size, fill_mode):
    """Integer indices i (any) into [0, size) by the fill mode (constant: clamped; the caller masks)."""
    if fill_mode in ("nearest", "constant"):
        return np.clip(i, 0, size - 1)
    if fill_mode == "wrap":
        return i % size
    if fill_mode == "mirror":
        if size == 1:
            return np.zeros_like(i)
        return np.abs((i + size - 1) % (2 * size - 2) - (size - 1))
    return (np.abs((2 * i + 1 + 2 * size) % (4 * size) - 2 * size) - 1) // 2  # reflect


def _sample(flat, img, r, c, h, w, fill_mode, fill_value):
    """x[img, r, c, :] of the images flattened to (N*H*W, C), indices read through the fill mode."""
    v = flat[(img * h + _fix_index(r, h, fill_mode)) * w + _fix_index(c, w, fill_mode)]
    if fill_mode == "constant":
        outside = (r < 0) | (r >= h) | (c < 0) | (c >= w)
        v[outside] = fill_value
    return v


def affine_transform(x, transforms, interpolation="bilinear", fill_mode="reflect", fill_value=0.0, out=None):
    """Each image resampled through its projective transform (N, 8), as keras.ops.image.affine_transform
    (the rules above). The fill_mode default is the Keras layers' "reflect" (the op's is "constant"). out must
    not be x. No backward: it runs on inputs."""
    n, h, w, c = _images(x, "affine_transform")
    check_transform_options(interpolation, fill_mode)
    _not_aliased(out, x, "affine_transform")
    t = np.asarray(transforms, DTYPE)
    if t.shape != (n, 8):
        raise ValueError(f"affine_transform: transforms must be ({n}, 8), one row per image, got {t.shape}")
    fill = DTYPE(fill_value)
    a0, a1, a2, b0, b1, b2, c0, c1 = (t[:, k, None, None] for k in range(8))
    rows = np.arange(h, dtype=DTYPE)[None, :, None]
    cols = np.arange(w, dtype=DTYPE)[None, None, :]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        k = c0 * cols + c1 * rows + DTYPE(1)
        xs = (a0 * cols + a1 * rows + a2) / k
        ys = (b0 * cols + b1 * rows + b2) / k
    bad = (k == 0) | ~np.isfinite(xs) | ~np.isfinite(ys)
    xs = np.clip(np.where(bad, 0, xs), -_COORDINATE_LIMIT, _COORDINATE_LIMIT).astype(DTYPE)
    ys = np.clip(np.where(bad, 0, ys), -_COORDINATE_LIMIT, _COORDINATE_LIMIT).astype(DTYPE)
    flat = np.ascontiguousarray(x, dtype=DTYPE).reshape(n * h * w, c)
    img = np.arange(n)[:, None, None]
    if interpolation == "nearest":
        y = _sample(flat, img, np.rint(ys).astype(np.int64), np.rint(xs).astype(np.int64), h, w, fill_mode, fill)
    else:
        fy, fx = np.floor(ys), np.floor(xs)
        wy1, wx1 = (ys - fy)[..., None], (xs - fx)[..., None]
        wy0, wx0 = DTYPE(1) - wy1, DTYPE(1) - wx1
        r0, c0i = fy.astype(np.int64), fx.astype(np.int64)
        y = (wy0 * wx0) * _sample(flat, img, r0, c0i, h, w, fill_mode, fill)
        y += (wy0 * wx1) * _sample(flat, img, r0, c0i + 1, h, w, fill_mode, fill)
        y += (wy1 * wx0) * _sample(flat, img, r0 + 1, c0i, h, w, fill_mode, fill)
        y += (wy1 * wx1) * _sample(flat, img, r0 + 1, c0i + 1, h, w, fill_mode, fill)
    y = y.reshape(n, h, w, c)
    y[bad] = fill
    return _finish(y, out)


def adjust_contrast(x, factors, value_range=(0, 255), out=None):
    """Keras RandomContrast's adjustment: with m the mean of image n's channel over H and W,
    y = (x - m) * factors[n] + m, then clipped to value_range (None: not clipped). out may be x. No backward:
    it runs on inputs. RandomContrast(factor) draws factors = uniform(1 - lower, 1 + upper)."""
    n = _images(x, "adjust_contrast")[0]
    f = _per_image(factors, n, "adjust_contrast")[:, None, None, None]
    mean = np.asarray(x, DTYPE).mean(axis=(1, 2), keepdims=True, dtype=DTYPE)
    y = (x - mean) * f + mean
    if value_range is not None:
        np.clip(y, DTYPE(value_range[0]), DTYPE(value_range[1]), out=y)
    return _finish(y, out)


# ===================================================================================== optimizers
# Each update reads its rate from a per-step table, ``rates[step[0]]`` (engine arrays): the learning rate, or
# Adam's step size. The host fills the table (one row for an eager step, a whole epoch for a captured one).
def sgd_update(w, g, m, rates, step, momentum, nesterov):
    """Keras SGD, in place: m = momentum·m − lr·g; w += m (Nesterov: w += momentum·m − lr·g)."""
    lr = rates[int(step[0])]
    if momentum == 0:
        w -= lr * g
        return
    m *= DTYPE(momentum)
    m -= lr * g
    if nesterov:
        w += DTYPE(momentum) * m - lr * g
    else:
        w += m


def rmsprop_update(w, g, v, mom, avg, rates, step, rho, epsilon, momentum, centered):
    """Keras RMSprop, in place: v = rho·v + (1 − rho)·g²; w −= lr·g / sqrt(v + epsilon) — epsilon
    inside the square root. centered subtracts avg², the running mean of g, squared; momentum > 0 keeps
    mom = momentum·mom + delta and applies mom."""
    rho, lr, epsilon = DTYPE(rho), rates[int(step[0])], DTYPE(epsilon)
    v *= rho
    v += (1 - rho) * g * g
    denom = v + epsilon
    if centered:
        avg *= rho
        avg += (1 - rho) * g
        denom -= avg * avg
    delta = lr * g / np.sqrt(denom)
    if momentum > 0:
        mom *= DTYPE(momentum)
        mom += delta
        delta = mom
    w -= delta


def adam_update(w, g, m, v, rates, step, beta_1, beta_2, epsilon):
    """Keras Adam, in place: m += (g − m)(1 − β1); v += (g² − v)(1 − β2); w −= alpha · m / (sqrt(v) + epsilon),
    alpha = rates[step[0]] = lr·sqrt(1 − β2^t)/(1 − β1^t) for step t (``adam_step_size``)."""
    alpha = rates[int(step[0])]
    m += (g - m) * DTYPE(1 - beta_1)
    v += (g * g - v) * DTYPE(1 - beta_2)
    w -= alpha * m / (np.sqrt(v) + DTYPE(epsilon))


def weight_decay(w, factors, step):
    """Keras's decoupled weight decay, in place: w *= factors[step[0]] (``weight_decay_factor``)."""
    w *= factors[int(step[0])]


def weight_decay_factor(lr, weight_decay):
    """The factor one step of weight decay multiplies the weights by, in float32 as Keras's torch backend forms
    it: 1 − weight_decay·lr."""
    return DTYPE(DTYPE(1) - DTYPE(DTYPE(weight_decay) * DTYPE(lr)))


def adam_step_size(lr, beta_1, beta_2, t):
    """Adam's step size for step t (1-based) in float32: lr·sqrt(1 − β2^t)/(1 − β1^t)."""
    return DTYPE(lr * np.sqrt(1 - beta_2 ** t) / (1 - beta_1 ** t))
