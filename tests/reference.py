"""The test oracle: every op of gpucnn written as plain float64 loops.

Slow on purpose and meant to be read: each function follows the definition of its op, one output (or one
window tap) at a time. It shares nothing with ``gpucnn/engines/numpy_ops.py`` except the names and the order of the
arguments (without ``ctx`` and ``out``); the NumPy engine and the CUDA kernels are both checked against it,
and ``tests/test_reference.py`` checks its backward passes by central differences.

Conventions, as in the engines and Keras: images are channels-last (N, H, W, C); a conv kernel is
(KH, KW, C, F); a dense kernel is (IN, UNITS); ``padding`` is ``(top, bottom, left, right)``; ``stride``
and ``pool`` are ``(rows, cols)``. Every function returns new float64 arrays; the optimizer updates return
the updated parameter and state arrays instead of working in place.

The only NumPy "vectorisation" is in the convolution, whose inner sum over input channels is a small
(N, C) @ (C, F) product per output position and kernel tap, so the test grid stays affordable.
"""
import math

import numpy as np

EPSILON = 1e-7  # Keras clips probabilities to [EPSILON, 1 - EPSILON] in the cross-entropy


# ===================================================================================== helpers
def _f64(a):
    """A float64 copy of ``a`` (never a view of the caller's array)."""
    return np.array(a, dtype=np.float64, copy=True)


def same_padding(size, k, s):
    """(lo, hi) padding of Keras/TensorFlow "same" along one axis: the output has ceil(size / s)
    positions and an odd total padding puts the extra cell at the end (bottom / right)."""
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    lo = total // 2
    return lo, total - lo


def _out_len(size, k, s, lo, hi):
    return (size + lo + hi - k) // s + 1


def _cell(o, tap, s, lo, size):
    """Input index read by ``tap`` of the window at output ``o``, or None when it falls in the padding."""
    i = o * s + tap - lo
    return i if 0 <= i < size else None


def _reads(p, q, k, stride, padding, h, wd):
    """(oi, oj, i, j, r, col) for every output (oi, oj) of a P x Q window op and every tap (i, j) of its
    window that reads a real input cell (r, col), not the padding; outputs and taps in scan order."""
    for oi in range(p):
        for oj in range(q):
            for i in range(k[0]):
                r = _cell(oi, i, stride[0], padding[0], h)
                for j in range(k[1]):
                    col = _cell(oj, j, stride[1], padding[2], wd)
                    if r is not None and col is not None:
                        yield oi, oj, i, j, r, col


# ===================================================================================== activations
# An activation: None, a name, or (name, parameter) for leaky_relu (negative_slope, default 0.2), elu (alpha,
# default 1.0) and gelu (approximate, default False), as keras.activations defines them.
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946
_DEFAULTS = {"leaky_relu": 0.2, "elu": 1.0, "gelu": False, "relu6": 6.0}
_ELEMENTWISE = ("sigmoid", "tanh", "elu", "selu", "leaky_relu", "softplus", "silu", "swish", "gelu", "relu6")


def _name_and_parameter(activation):
    if isinstance(activation, tuple):
        return activation
    return activation, _DEFAULTS.get(activation)


def _sigmoid(v):
    return 1.0 / (1.0 + math.exp(-v)) if v >= 0 else math.exp(v) / (1.0 + math.exp(v))


def _phi(v):
    """The standard normal density and distribution function at v: (pdf, cdf)."""
    return math.exp(-v * v / 2) / math.sqrt(2 * math.pi), math.erfc(-v / math.sqrt(2)) / 2


_TANH_C, _TANH_K = math.sqrt(2 / math.pi), 0.044715  # gelu(approximate=True)


def _activate(name, param, v):
    """One element of an elementwise activation, from its definition."""
    if name == "sigmoid":
        return _sigmoid(v)
    if name == "tanh":
        return math.tanh(v)
    if name == "elu":
        return v if v > 0 else param * (math.exp(v) - 1)
    if name == "selu":
        return SELU_SCALE * (v if v > 0 else SELU_ALPHA * (math.exp(v) - 1))
    if name == "leaky_relu":
        return v if v > 0 else param * v
    if name == "relu6":  # min(max(v, 0), max_value)
        return min(max(v, 0.0), param)
    if name == "softplus":  # log(1 + e^v), written so that it does not overflow
        return max(v, 0.0) + math.log1p(math.exp(-abs(v)))
    if name in ("silu", "swish"):
        return v * _sigmoid(v)
    if param:  # gelu, tanh approximation
        return 0.5 * v * (1 + math.tanh(_TANH_C * (v + _TANH_K * v ** 3)))
    return v * _phi(v)[1]


def _derivative(name, param, out, v):
    """d activation / d input at one element: from its output ``out`` where the activation allows it (the
    engines' convention), else from its input ``v``."""
    if name == "sigmoid":
        return out * (1 - out)
    if name == "tanh":
        return 1 - out * out
    if name == "elu":  # below zero out = alpha (e^v - 1), so alpha e^v = out + alpha
        return 1.0 if out > 0 else out + param
    if name == "selu":
        return SELU_SCALE if out > 0 else out + SELU_SCALE * SELU_ALPHA
    if name == "leaky_relu":
        return 1.0 if out > 0 else param
    if name == "relu6":  # 1 strictly between the two flat parts, 0 on them (and at their edges)
        return 1.0 if 0 < out < param else 0.0
    if name == "softplus":  # sigmoid(v) = 1 - e^-out
        return 1 - math.exp(-out)
    if name in ("silu", "swish"):
        s = _sigmoid(v)
        return s + v * s * (1 - s)
    if param:  # gelu, tanh approximation
        t = math.tanh(_TANH_C * (v + _TANH_K * v ** 3))
        return 0.5 * (1 + t) + 0.5 * v * (1 - t * t) * _TANH_C * (1 + 3 * _TANH_K * v * v)
    pdf, cdf = _phi(v)
    return cdf + v * pdf


def activation_forward(x, activation):
    """relu / softmax over the last axis / identity (None) / the elementwise activations above."""
    x = _f64(x)
    name, param = _name_and_parameter(activation)
    if name is None:
        return x
    y = np.zeros_like(x)
    if name == "relu":
        for i in np.ndindex(x.shape):
            y[i] = x[i] if x[i] > 0 else 0.0
        return y
    if name == "softmax":
        for row in np.ndindex(x.shape[:-1]):
            top = max(x[row])
            e = [math.exp(v - top) for v in x[row]]
            total = math.fsum(e)
            y[row] = [v / total for v in e]
        return y
    if name in _ELEMENTWISE:
        for i in np.ndindex(x.shape):
            y[i] = _activate(name, param, float(x[i]))
        return y
    raise ValueError(f"unknown activation {activation!r}")


def activation_backward(dy, y, activation, x=None):
    """dx from dy and the activation's output y (silu/swish and gelu: from its input x)."""
    dy = _f64(dy)
    name, param = _name_and_parameter(activation)
    if name is None:
        return dy
    dx = np.zeros_like(dy)
    if name in ("silu", "swish", "gelu"):
        x = _f64(x)
        for i in np.ndindex(dy.shape):
            dx[i] = dy[i] * _derivative(name, param, None, float(x[i]))
        return dx
    y = _f64(y)
    if name == "relu":
        for i in np.ndindex(dy.shape):
            dx[i] = dy[i] if y[i] > 0 else 0.0
        return dx
    if name == "softmax":
        k = y.shape[-1]
        for row in np.ndindex(y.shape[:-1]):
            s = y[row]
            # d s_j / d x_i = s_j (delta_ij - s_i)
            for i in range(k):
                dx[row + (i,)] = math.fsum(dy[row + (j,)] * s[j] * ((i == j) - s[i]) for j in range(k))
        return dx
    if name in _ELEMENTWISE:
        for i in np.ndindex(dy.shape):
            dx[i] = dy[i] * _derivative(name, param, float(y[i]), None)
        return dx
    raise ValueError(f"unknown activation {activation!r}")


# ===================================================================================== conv2d
def conv2d_forward(x, w, b, stride, padding, activation):
    """y[n, p, q, f] = act(b[f] + sum over taps (i, j) and channels c of x[n, p*sh+i-top, q*sw+j-left, c]
    * w[i, j, c, f]), the cells that fall in the padding reading zero."""
    x, w = _f64(x), _f64(w)
    n, h, wd, c = x.shape
    kh, kw, wc, f = w.shape
    assert wc == c, (x.shape, w.shape)
    (sh, sw), (top, bottom, left, right) = stride, padding
    p, q = _out_len(h, kh, sh, top, bottom), _out_len(wd, kw, sw, left, right)
    y = np.zeros((n, p, q, f))
    for oi, oj, i, j, r, col in _reads(p, q, (kh, kw), stride, padding, h, wd):
        y[:, oi, oj, :] += x[:, r, col, :] @ w[i, j]
    if b is not None:
        y += _f64(b)
    return activation_forward(y, activation)


def conv2d_backward_data(dy, w, x_shape, stride, padding):
    """dx: every input cell collects dy[n, p, q, f] * w[i, j, c, f] from each (output, tap) that read it."""
    dy, w = _f64(dy), _f64(w)
    n, h, wd, c = x_shape
    kh, kw, _, f = w.shape
    _, p, q, _ = dy.shape
    dx = np.zeros((n, h, wd, c))
    for oi, oj, i, j, r, col in _reads(p, q, (kh, kw), stride, padding, h, wd):
        dx[:, r, col, :] += dy[:, oi, oj, :] @ w[i, j].T
    return dx


def conv2d_backward_filter(dy, x, w_shape, stride, padding):
    """(dw, db): dw[i, j, c, f] = sum over n, p, q of x[n, cell read by tap (i, j), c] * dy[n, p, q, f];
    db[f] = sum of dy[..., f]."""
    dy, x = _f64(dy), _f64(x)
    n, h, wd, c = x.shape
    kh, kw, _, f = w_shape
    _, p, q, _ = dy.shape
    dw = np.zeros(w_shape)
    for oi, oj, i, j, r, col in _reads(p, q, (kh, kw), stride, padding, h, wd):
        dw[i, j] += x[:, r, col, :].T @ dy[:, oi, oj, :]
    db = np.zeros(f)
    for k in range(f):
        db[k] = math.fsum(dy[..., k].ravel())
    return dw, db


# ===================================================================================== pooling
def _window(x, nn, oi, oj, ch, pool, stride, padding):
    """The values of one window in scan order (row-major over the taps); padding cells read -inf."""
    _, h, wd, _ = x.shape
    values = []
    for i in range(pool[0]):
        r = _cell(oi, i, stride[0], padding[0], h)
        for j in range(pool[1]):
            col = _cell(oj, j, stride[1], padding[2], wd)
            values.append(-math.inf if r is None or col is None else x[nn, r, col, ch])
    return values


def _first_max(values):
    """Index of the first NaN if there is one, else of the first maximum."""
    best = 0
    for k in range(1, len(values)):
        if math.isnan(values[best]):
            break
        if math.isnan(values[k]) or values[k] > values[best]:
            best = k
    return best


def maxpool2d_forward(x, pool, stride, padding):
    """(y, idx): idx[n, p, q, c] is the scan-order tap (i * pw + j) of the window's first maximum, or of
    its first NaN; y is the value there."""
    x = _f64(x)
    n, h, wd, c = x.shape
    p = _out_len(h, pool[0], stride[0], padding[0], padding[1])
    q = _out_len(wd, pool[1], stride[1], padding[2], padding[3])
    y = np.zeros((n, p, q, c))
    idx = np.zeros((n, p, q, c), dtype=np.int64)
    for cell in np.ndindex(n, p, q, c):
        values = _window(x, *cell, pool, stride, padding)
        k = _first_max(values)
        y[cell], idx[cell] = values[k], k
    return y, idx


def maxpool2d_backward(dy, idx, x_shape, pool, stride, padding):
    """dx: each window's dy goes to the input cell under its tap idx (nothing if that is padding)."""
    dy = _f64(dy)
    _, h, wd, _ = x_shape
    dx = np.zeros(x_shape)
    for nn, oi, oj, ch in np.ndindex(dy.shape):
        i, j = divmod(int(idx[nn, oi, oj, ch]), pool[1])
        r = _cell(oi, i, stride[0], padding[0], h)
        col = _cell(oj, j, stride[1], padding[2], wd)
        if r is not None and col is not None:
            dx[nn, r, col, ch] += dy[nn, oi, oj, ch]
    return dx


def conv2d_maxpool_forward(x, w, b, stride, padding, activation):
    """What ops.conv2d_maxpool_forward means: conv2d_forward, then 2x2 max-pooling at stride 2 ("valid") over
    the convolution outputs its windows read. Returns (y, idx, z), z the convolution's whole output."""
    z = conv2d_forward(x, w, b, stride, padding, activation)
    pp, pq = z.shape[1] // 2, z.shape[2] // 2
    y, idx = maxpool2d_forward(z[:, :2 * pp, :2 * pq], (2, 2), (2, 2), (0, 0, 0, 0))
    return y, idx, z


def conv2d_maxpool_backward(dy, idx, z, x, w, stride, padding, activation):
    """What ops.conv2d_maxpool_backward means, with the window indices ``idx`` given: maxpool2d_backward into
    the outputs the windows read (the others get 0), activation_backward, then the convolution's backward.
    Returns (dx, dw, db)."""
    n, pp, pq, f = dy.shape
    dz = np.zeros(z.shape)
    dz[:, :2 * pp, :2 * pq] = maxpool2d_backward(dy, idx, (n, 2 * pp, 2 * pq, f), (2, 2), (2, 2), (0, 0, 0, 0))
    dz = activation_backward(dz, z, activation)
    dw, db = conv2d_backward_filter(dz, x, w.shape, stride, padding)
    return conv2d_backward_data(dz, w, x.shape, stride, padding), dw, db


def _real_cells(oi, oj, pool, stride, padding, h, wd):
    """The (row, col) input cells of one window that are not padding."""
    cells = []
    for i in range(pool[0]):
        r = _cell(oi, i, stride[0], padding[0], h)
        for j in range(pool[1]):
            col = _cell(oj, j, stride[1], padding[2], wd)
            if r is not None and col is not None:
                cells.append((r, col))
    return cells


def avgpool2d_forward(x, pool, stride, padding):
    """y: the mean of each window over its real cells (padding is not counted)."""
    x = _f64(x)
    n, h, wd, c = x.shape
    p = _out_len(h, pool[0], stride[0], padding[0], padding[1])
    q = _out_len(wd, pool[1], stride[1], padding[2], padding[3])
    y = np.zeros((n, p, q, c))
    for nn, oi, oj, ch in np.ndindex(n, p, q, c):
        cells = _real_cells(oi, oj, pool, stride, padding, h, wd)
        y[nn, oi, oj, ch] = math.fsum(x[nn, r, col, ch] for r, col in cells) / len(cells)
    return y


def avgpool2d_backward(dy, x_shape, pool, stride, padding):
    """dx: each window's dy shared equally among its real cells."""
    dy = _f64(dy)
    _, h, wd, _ = x_shape
    dx = np.zeros(x_shape)
    for nn, oi, oj, ch in np.ndindex(dy.shape):
        cells = _real_cells(oi, oj, pool, stride, padding, h, wd)
        for r, col in cells:
            dx[nn, r, col, ch] += dy[nn, oi, oj, ch] / len(cells)
    return dx


def global_avgpool2d_forward(x):
    """y (N, C): the mean of every channel over H and W."""
    x = _f64(x)
    n, h, wd, c = x.shape
    y = np.zeros((n, c))
    for nn, ch in np.ndindex(n, c):
        y[nn, ch] = math.fsum(x[nn, :, :, ch].ravel()) / (h * wd)
    return y


def global_avgpool2d_backward(dy, x_shape):
    dy = _f64(dy)
    n, h, wd, c = x_shape
    dx = np.zeros(x_shape)
    for nn, r, col, ch in np.ndindex(x_shape):
        dx[nn, r, col, ch] = dy[nn, ch] / (h * wd)
    return dx


# ===================================================================================== global max-pooling
def global_maxpool2d_forward(x):
    """(y (N, C), idx (N, C)): idx[n, c] = row·W + col of the channel's first maximum in row-major scan order
    (of its first NaN, if any); y the value there."""
    x = _f64(x)
    n, h, wd, c = x.shape
    y = np.zeros((n, c))
    idx = np.zeros((n, c), dtype=np.int64)
    for nn, ch in np.ndindex(n, c):
        values = [x[nn, r, col, ch] for r in range(h) for col in range(wd)]
        k = _first_max(values)
        y[nn, ch], idx[nn, ch] = values[k], k
    return y, idx


def global_maxpool2d_backward(dy, idx, x_shape):
    """dx: each channel's dy goes to the cell idx names."""
    dy = _f64(dy)
    dx = np.zeros(x_shape)
    for nn, ch in np.ndindex(dy.shape):
        r, col = divmod(int(idx[nn, ch]), x_shape[2])
        dx[nn, r, col, ch] += dy[nn, ch]
    return dx


# ===================================================================================== zero padding
def zero_padding2d_forward(x, padding):
    """y (N, top + H + bottom, left + W + right, C): x surrounded by zeros."""
    x = _f64(x)
    n, h, wd, c = x.shape
    top, bottom, left, right = padding
    y = np.zeros((n, top + h + bottom, left + wd + right, c))
    for nn, r, col, ch in np.ndindex(x.shape):
        y[nn, top + r, left + col, ch] = x[nn, r, col, ch]
    return y


def zero_padding2d_backward(dy, x_shape, padding):
    """dx: the gradient of the cells that hold x (the padding's is dropped)."""
    dy = _f64(dy)
    top, _, left, _ = padding
    dx = np.zeros(x_shape)
    for nn, r, col, ch in np.ndindex(x_shape):
        dx[nn, r, col, ch] = dy[nn, top + r, left + col, ch]
    return dx


# ===================================================================================== batch normalization
# Over the last axis of x (N, ..., C), as Keras 3's BatchNormalization(axis=-1): each channel's statistics are
# taken over the M = x.size / C values of every other axis. gamma None means 1 (scale=False), beta None 0
# (center=False).
def _channels(x):
    """x (N, ..., C) as float64 rows (M, C)."""
    x = _f64(x)
    return x.reshape(-1, x.shape[-1])


def _normalize(x2, mean, inv_std, gamma, beta):
    c = x2.shape[1]
    gamma = np.ones(c) if gamma is None else _f64(gamma)
    beta = np.zeros(c) if beta is None else _f64(beta)
    y = np.zeros_like(x2)
    for m, ch in np.ndindex(x2.shape):
        y[m, ch] = (x2[m, ch] - mean[ch]) * inv_std[ch] * gamma[ch] + beta[ch]
    return y


def batchnorm_forward_training(x, gamma, beta, moving_mean, moving_var, momentum, epsilon):
    """(y, mean, inv_std, moving_mean, moving_var) with the batch's statistics, per channel c:
        mean = (1/M) Σ x,   var = (1/M) Σ (x − mean)²  (the biased variance),   inv_std = 1 / sqrt(var + epsilon)
        y = (x − mean) · inv_std · gamma + beta
        moving_mean = moving_mean · momentum + mean · (1 − momentum)   (moving_var likewise with var)."""
    x2 = _channels(x)
    m, c = x2.shape
    mean, var = np.zeros(c), np.zeros(c)
    for ch in range(c):
        mean[ch] = math.fsum(x2[:, ch]) / m
        var[ch] = math.fsum((v - mean[ch]) ** 2 for v in x2[:, ch]) / m
    inv_std = np.array([1 / math.sqrt(v + epsilon) for v in var])
    y = _normalize(x2, mean, inv_std, gamma, beta).reshape(np.shape(x))
    new_mean = _f64(moving_mean) * momentum + mean * (1 - momentum)
    new_var = _f64(moving_var) * momentum + var * (1 - momentum)
    return y, mean, inv_std, new_mean, new_var


def batchnorm_forward_inference(x, gamma, beta, moving_mean, moving_var, epsilon):
    """(y, inv_std): y = (x − moving_mean) · inv_std · gamma + beta, inv_std = 1 / sqrt(moving_var + epsilon)."""
    x2 = _channels(x)
    inv_std = np.array([1 / math.sqrt(v + epsilon) for v in _f64(moving_var)])
    return _normalize(x2, _f64(moving_mean), inv_std, gamma, beta).reshape(np.shape(x)), inv_std


def batchnorm_fold(w, b, gamma, beta, moving_mean, moving_var, epsilon):
    """(w', b'): a convolution's kernel w (..., F) and bias b (F,) or None with an inference-mode batch normalization
    of its F channels folded in, so that conv(x, w') + b' = BN(conv(x, w) + b):
        s = gamma / sqrt(moving_var + epsilon)    (gamma None: 1)
        w' = w · s (over the last axis),   b' = (b − moving_mean) · s + beta    (b, beta None: 0)."""
    f = np.shape(w)[-1]
    one = np.ones(f)
    s = (one if gamma is None else _f64(gamma)) / np.sqrt(_f64(moving_var) + epsilon)
    b64 = np.zeros(f) if b is None else _f64(b)
    return _f64(w) * s, (b64 - _f64(moving_mean)) * s + (np.zeros(f) if beta is None else _f64(beta))


def batchnorm_backward(dy, x, gamma, mean, inv_std, training):
    """(dx, dgamma, dbeta) of y = x̂ · gamma + beta, x̂ = (x − mean) · inv_std, per channel over the M rows:
        dbeta = Σ dy,   dgamma = Σ dy · x̂
        training (mean and inv_std are the batch's, functions of x):
            dx = gamma · inv_std · (dy − dbeta / M − x̂ · dgamma / M)
        else (the moving statistics, constants): dx = gamma · inv_std · dy."""
    dy2, x2 = _channels(dy), _channels(x)
    m, c = x2.shape
    gamma = np.ones(c) if gamma is None else _f64(gamma)
    xhat = np.zeros_like(x2)
    for r, ch in np.ndindex(x2.shape):
        xhat[r, ch] = (x2[r, ch] - mean[ch]) * inv_std[ch]
    dbeta = np.array([math.fsum(dy2[:, ch]) for ch in range(c)])
    dgamma = np.array([math.fsum(dy2[:, ch] * xhat[:, ch]) for ch in range(c)])
    dx = np.zeros_like(x2)
    for r, ch in np.ndindex(x2.shape):
        g = dy2[r, ch] - (dbeta[ch] / m + xhat[r, ch] * dgamma[ch] / m if training else 0.0)
        dx[r, ch] = gamma[ch] * inv_std[ch] * g
    return dx.reshape(np.shape(x)), dgamma, dbeta


# ===================================================================================== depthwise conv2d
# Keras's DepthwiseConv2D: w is (KH, KW, C, DM); input channel c, multiplier m gives output channel c·DM + m.
def depthwise_conv2d_forward(x, w, b, stride, padding, activation):
    """y[n, p, q, c·DM + m] = act(b[c·DM + m] + sum over taps (i, j) of x[n, p*sh+i-top, q*sw+j-left, c]
    * w[i, j, c, m]), the cells in the padding reading zero."""
    x, w = _f64(x), _f64(w)
    n, h, wd, c = x.shape
    kh, kw, wc, dm = w.shape
    assert wc == c, (x.shape, w.shape)
    (sh, sw), (top, bottom, left, right) = stride, padding
    p, q = _out_len(h, kh, sh, top, bottom), _out_len(wd, kw, sw, left, right)
    y = np.zeros((n, p, q, c, dm))
    for oi, oj, i, j, r, col in _reads(p, q, (kh, kw), stride, padding, h, wd):
        y[:, oi, oj] += x[:, r, col, :, None] * w[i, j]
    y = y.reshape(n, p, q, c * dm)
    if b is not None:
        y += _f64(b)
    return activation_forward(y, activation)


def depthwise_conv2d_backward_data(dy, w, x_shape, stride, padding):
    """dx[n, h, w, c]: the sum of dy[n, p, q, c·DM + m] * w[i, j, c, m] over the (output, tap) pairs that read
    the cell and the multipliers m."""
    dy, w = _f64(dy), _f64(w)
    n, h, wd, c = x_shape
    kh, kw, _, dm = w.shape
    _, p, q, _ = dy.shape
    dy = dy.reshape(n, p, q, c, dm)
    dx = np.zeros(x_shape)
    for oi, oj, i, j, r, col in _reads(p, q, (kh, kw), stride, padding, h, wd):
        dx[:, r, col, :] += (dy[:, oi, oj] * w[i, j]).sum(axis=-1)
    return dx


def depthwise_conv2d_backward_filter(dy, x, w_shape, stride, padding):
    """(dw, db): dw[i, j, c, m] = sum over n, p, q of x[n, cell read by tap (i, j), c] * dy[n, p, q, c·DM + m];
    db[k] = sum of dy[..., k]."""
    dy, x = _f64(dy), _f64(x)
    n, h, wd, c = x.shape
    kh, kw, _, dm = w_shape
    _, p, q, k = dy.shape
    dy5 = dy.reshape(n, p, q, c, dm)
    dw = np.zeros(w_shape)
    for oi, oj, i, j, r, col in _reads(p, q, (kh, kw), stride, padding, h, wd):
        dw[i, j] += (x[:, r, col, :, None] * dy5[:, oi, oj]).sum(axis=0)
    db = np.array([math.fsum(dy[..., kk].ravel()) for kk in range(k)])
    return dw, db


# ===================================================================================== dense
def dense_forward(x, w, b, activation):
    """y[n, u] = act(sum_i x[n, i] * w[i, u] + b[u])."""
    x, w = _f64(x), _f64(w)
    n, units = x.shape[0], w.shape[1]
    y = np.zeros((n, units))
    for nn, u in np.ndindex(n, units):
        y[nn, u] = math.fsum(x[nn, i] * w[i, u] for i in range(w.shape[0]))
        if b is not None:
            y[nn, u] += float(b[u])
    return activation_forward(y, activation)


def dense_backward_data(dy, w):
    """dx[n, i] = sum_u dy[n, u] * w[i, u]."""
    dy, w = _f64(dy), _f64(w)
    dx = np.zeros((dy.shape[0], w.shape[0]))
    for nn, i in np.ndindex(dx.shape):
        dx[nn, i] = math.fsum(dy[nn, u] * w[i, u] for u in range(w.shape[1]))
    return dx


def dense_backward_weights(dy, x):
    """(dw, db): dw[i, u] = sum_n x[n, i] * dy[n, u]; db[u] = sum_n dy[n, u]."""
    dy, x = _f64(dy), _f64(x)
    dw = np.zeros((x.shape[1], dy.shape[1]))
    for i, u in np.ndindex(dw.shape):
        dw[i, u] = math.fsum(x[nn, i] * dy[nn, u] for nn in range(x.shape[0]))
    db = np.array([math.fsum(dy[:, u]) for u in range(dy.shape[1])])
    return dw, db


# ===================================================================================== merging
def add(a, b):
    """a + b, element by element."""
    a, b = _f64(a), _f64(b)
    y = np.zeros(a.shape)
    for i in np.ndindex(a.shape):
        y[i] = a[i] + b[i]
    return y


def concat(xs, axis):
    """The arrays joined along ``axis``: element (..., k, ...) of the result is element k - (sizes before) of the
    array whose slab holds k."""
    xs = [_f64(x) for x in xs]
    shape = list(xs[0].shape)
    shape[axis] = sum(x.shape[axis] for x in xs)
    y = np.zeros(shape)
    for i in np.ndindex(*shape):
        k = i[axis]
        for x in xs:
            if k < x.shape[axis]:
                y[i] = x[i[:axis] + (k,) + i[axis + 1:]]
                break
            k -= x.shape[axis]
    return y


def split(dy, sizes, axis):
    """concat's backward: the gradient of each part is its slab of ``dy``."""
    dy = _f64(dy)
    parts, start = [], 0
    for size in sizes:
        shape = list(dy.shape)
        shape[axis] = size
        part = np.zeros(shape)
        for i in np.ndindex(*shape):
            part[i] = dy[i[:axis] + (start + i[axis],) + i[axis + 1:]]
        parts.append(part)
        start += size
    return parts


# ===================================================================================== dropout
def dropout_backward(dy, mask):
    dy, mask = _f64(dy), _f64(mask)
    dx = np.zeros_like(dy)
    for i in np.ndindex(dy.shape):
        dx[i] = dy[i] * mask[i]
    return dx


# ===================================================================================== losses
def _targets(labels, k, sparse):
    """(N, K) float64 target rows: one-hot rows built from integer labels when sparse."""
    if not sparse:
        return _f64(labels)
    labels = np.asarray(labels)
    y = np.zeros((labels.shape[0], k))
    for nn in range(labels.shape[0]):
        y[nn, int(labels[nn])] = 1.0
    return y


def _log_softmax_row(z):
    top = max(z)
    log_total = math.log(math.fsum(math.exp(v - top) for v in z))
    return [v - top - log_total for v in z]


def crossentropy_forward(p, labels, sparse, from_logits=False):
    """Per-sample loss (N,): -sum_k y_k log(clip(p_k / sum(p), EPSILON, 1 - EPSILON)); from logits,
    -sum_k y_k log softmax(p)_k (no clip)."""
    p = _f64(p)
    y = _targets(labels, p.shape[1], sparse)
    loss = np.zeros(p.shape[0])
    for nn in range(p.shape[0]):
        if from_logits:
            logq = _log_softmax_row(p[nn])
        else:
            total = math.fsum(p[nn])
            logq = [math.log(min(max(p[nn, k] / total, EPSILON), 1 - EPSILON)) for k in range(p.shape[1])]
        loss[nn] = math.fsum(-y[nn, k] * logq[k] for k in range(p.shape[1]))
    return loss


def softmax_crossentropy_backward(p, labels, sparse):
    """d mean_n CE(softmax(z)) / dz for target rows that sum to 1, from p = softmax(z): (p - y) / N."""
    p = _f64(p)
    y = _targets(labels, p.shape[1], sparse)
    n = p.shape[0]
    dz = np.zeros_like(p)
    for nn, k in np.ndindex(p.shape):
        dz[nn, k] = (p[nn, k] - y[nn, k]) / n
    return dz


def crossentropy_backward(p, labels, sparse, from_logits=False):
    """d mean_n CE(p) / dp through the renormalisation q = p / sum(p) and the clip (a clipped q_k passes
    no gradient): dp_j = 1/N sum_k dL/dq_k * (delta_jk - q_k) / sum(p). From logits z = p:
    dz_j = 1/N sum_k -y_k (delta_jk - softmax_j)."""
    p = _f64(p)
    y = _targets(labels, p.shape[1], sparse)
    n, kk = p.shape
    dp = np.zeros_like(p)
    for nn in range(n):
        if from_logits:
            s = [math.exp(v) for v in _log_softmax_row(p[nn])]
            for j in range(kk):
                dp[nn, j] = math.fsum(-y[nn, k] * ((j == k) - s[j]) for k in range(kk)) / n
            continue
        total = math.fsum(p[nn])
        q = [p[nn, k] / total for k in range(kk)]
        dq = [-y[nn, k] / q[k] if EPSILON <= q[k] <= 1 - EPSILON else 0.0 for k in range(kk)]
        for j in range(kk):
            dp[nn, j] = math.fsum(dq[k] * ((j == k) - q[k]) / total for k in range(kk)) / n
    return dp


def count_correct(p, labels, sparse):
    """Rows whose first maximum is at the true class (the first maximum of a one-hot row)."""
    p = _f64(p)

    def first_argmax(row):
        best = 0
        for k in range(1, len(row)):
            if row[k] > row[best]:
                best = k
        return best

    correct = 0
    for nn in range(p.shape[0]):
        truth = int(labels[nn]) if sparse else first_argmax(_f64(labels[nn]))
        correct += first_argmax(p[nn]) == truth
    return int(correct)


# Binary cross-entropy (Keras's binary_crossentropy) over (N, U) predictions: targets smoothed to
# y (1 - s) + s / 2; per-sample loss = mean over the U units of -(y log q + (1 - y) log(1 - q)) with q = p
# clipped, or from logits z: -(y log sigmoid(z) + (1 - y) log(1 - sigmoid(z))). The clip bounds are the
# float32 values Keras clips float32 predictions to: 1e-7 and 1 - 1e-7 rounded to float32 (0.99999988).
BINARY_CLIP = (float(np.float32(EPSILON)), float(np.float32(1 - EPSILON)))


def _smoothed(labels, label_smoothing):
    return _f64(labels) * (1 - label_smoothing) + 0.5 * label_smoothing


def _log_sigmoid(v):
    """log(sigmoid(v)) = -log(1 + e^-v), without overflow."""
    return -(max(-v, 0.0) + math.log1p(math.exp(-abs(v))))


def binary_crossentropy_forward(p, labels, from_logits, label_smoothing=0.0):
    p, y = _f64(p), _smoothed(labels, label_smoothing)
    n, units = p.shape
    loss = np.zeros(n)
    for nn in range(n):
        terms = []
        for u in range(units):
            v, t = p[nn, u], y[nn, u]
            if from_logits:
                terms.append(-(t * _log_sigmoid(v) + (1 - t) * _log_sigmoid(-v)))
            else:
                q = min(max(v, BINARY_CLIP[0]), BINARY_CLIP[1])
                terms.append(-(t * math.log(q) + (1 - t) * math.log(1 - q)))
        loss[nn] = math.fsum(terms) / units
    return loss


def binary_crossentropy_backward(p, labels, from_logits, label_smoothing=0.0):
    """d mean(all N·U terms) / d p: (-y / p + (1 - y) / (1 - p)) / (N·U) inside the clip, 0 where it is active;
    from logits: (sigmoid(z) - y) / (N·U)."""
    p, y = _f64(p), _smoothed(labels, label_smoothing)
    dp = np.zeros_like(p)
    for i in np.ndindex(p.shape):
        v, t = p[i], y[i]
        if from_logits:
            dp[i] = (_sigmoid(v) - t) / p.size
        elif BINARY_CLIP[0] <= v <= BINARY_CLIP[1]:
            dp[i] = (-t / v + (1 - t) / (1 - v)) / p.size
    return dp


def sigmoid_binary_crossentropy_backward(p, labels, label_smoothing=0.0):
    """d mean(all N·U terms) / dz for p = sigmoid(z), the logits form: (p - y) / (N·U)."""
    p, y = _f64(p), _smoothed(labels, label_smoothing)
    dz = np.zeros_like(p)
    for i in np.ndindex(p.shape):
        dz[i] = (p[i] - y[i]) / p.size
    return dz


def count_binary_correct(p, labels, threshold=0.5):
    """Predictions (p > threshold: 1, else 0) equal to their label (Keras's binary accuracy, counted). Keras
    compares float32 predictions with the threshold rounded to float32 (0.3 is 0.30000001)."""
    p, y, threshold = _f64(p), _f64(labels), float(np.float32(threshold))
    return int(sum((1.0 if p[i] > threshold else 0.0) == y[i] for i in np.ndindex(p.shape)))


# ===================================================================================== image transforms
# Keras's image preprocessing, one output element at a time. A transform [a0, a1, a2, b0, b1, b2, c0, c1] maps
# output pixel (x = column, y = row) to input point ((a0 x + a1 y + a2) / k, (b0 x + b1 y + b2) / k),
# k = c0 x + c1 y + 1; pixel centres are at integer coordinates. An index outside the image is brought back
# by the fill mode (reflect: d c b a | a b c d, mirror: d c b | a b c d, wrap, nearest), or reads
# fill_value (constant). k = 0 or a non-finite coordinate gives fill_value; coordinates are clamped to
# +-2^24 first (as the engines do).
def rescale(x, scale, offset):
    x = _f64(x)
    y = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        y[i] = x[i] * scale + offset
    return y


def flip(x, horizontal_flags, vertical_flags):
    x = _f64(x)
    n, h, w, _ = x.shape
    y = np.zeros_like(x)
    for nn, r, col, ch in np.ndindex(x.shape):
        rr = h - 1 - r if vertical_flags is not None and vertical_flags[nn] else r
        cc = w - 1 - col if horizontal_flags is not None and horizontal_flags[nn] else col
        y[nn, r, col, ch] = x[nn, rr, cc, ch]
    return y


def step_row(table, step, n):
    """Element by element: out[i, k] = table[step, i, k] for the first n images."""
    table = np.asarray(table)
    out = np.zeros((n, *table.shape[2:]), table.dtype)
    for index in np.ndindex(out.shape):
        out[index] = table[(step, *index)]
    return out


def rotation_transforms(angles, height, width):
    """[cos, -sin, cx - cx cos + cy sin, sin, cos, cy - cx sin - cy cos, 0, 0] about the centre
    cx = (width - 1) / 2, cy = (height - 1) / 2 (Keras's _compute_affine_matrix with a rotation only)."""
    cx, cy = (width - 1) / 2, (height - 1) / 2
    rows = []
    for a in angles:
        c, s = math.cos(a), math.sin(a)
        rows.append([c, -s, cx - cx * c + cy * s, s, c, cy - cx * s - cy * c, 0.0, 0.0])
    return np.array(rows).reshape(-1, 8)


def zoom_transforms(height_zooms, width_zooms, height, width):
    """[zx, 0, (width - 1)/2 (1 - zx), 0, zy, (height - 1)/2 (1 - zy), 0, 0] (Keras's _get_zoom_matrix)."""
    rows = [[zx, 0.0, (width - 1) / 2 * (1 - zx), 0.0, zy, (height - 1) / 2 * (1 - zy), 0.0, 0.0]
            for zy, zx in zip(height_zooms, width_zooms)]
    return np.array(rows).reshape(-1, 8)


def translation_transforms(dx, dy):
    """[1, 0, -dx, 0, 1, -dy, 0, 0] (Keras's _get_translation_matrix)."""
    return np.array([[1.0, 0.0, -tx, 0.0, 1.0, -ty, 0.0, 0.0] for tx, ty in zip(dx, dy)]).reshape(-1, 8)


def fill_index(i, size, fill_mode):
    """Input index i brought into [0, size) by the fill mode, or None (constant, outside)."""
    if 0 <= i < size:
        return i
    if fill_mode == "constant":
        return None
    if fill_mode == "nearest":
        return min(max(i, 0), size - 1)
    if fill_mode == "wrap":
        return i % size
    if fill_mode == "mirror":  # period 2 (size - 1): 0 1 2 3 2 1 0 1 ...
        if size == 1:
            return 0
        i %= 2 * (size - 1)
        return i if i < size else 2 * (size - 1) - i
    i %= 2 * size  # reflect, period 2 size: 0 1 2 3 3 2 1 0 0 1 ...
    return i if i < size else 2 * size - 1 - i


def affine_transform(x, transforms, interpolation="bilinear", fill_mode="reflect", fill_value=0.0):
    x, t = _f64(x), _f64(transforms)
    n, h, w, c = x.shape
    y = np.zeros_like(x)
    limit = 2.0 ** 24

    def read(nn, r, col, ch):
        rr, cc = fill_index(r, h, fill_mode), fill_index(col, w, fill_mode)
        return fill_value if rr is None or cc is None else x[nn, rr, cc, ch]

    for nn, r, col, ch in np.ndindex(x.shape):
        a0, a1, a2, b0, b1, b2, c0, c1 = t[nn]
        k = c0 * col + c1 * r + 1
        if k == 0:
            y[nn, r, col, ch] = fill_value
            continue
        xs, ys = (a0 * col + a1 * r + a2) / k, (b0 * col + b1 * r + b2) / k
        if not (math.isfinite(xs) and math.isfinite(ys)):
            y[nn, r, col, ch] = fill_value
            continue
        xs, ys = min(max(xs, -limit), limit), min(max(ys, -limit), limit)
        if interpolation == "nearest":  # round() takes halves to even, as the engines and Keras do
            y[nn, r, col, ch] = read(nn, round(ys), round(xs), ch)
            continue
        r0, c0i = math.floor(ys), math.floor(xs)
        fy, fx = ys - r0, xs - c0i
        y[nn, r, col, ch] = ((1 - fy) * (1 - fx) * read(nn, r0, c0i, ch) + (1 - fy) * fx * read(nn, r0, c0i + 1, ch)
                             + fy * (1 - fx) * read(nn, r0 + 1, c0i, ch) + fy * fx * read(nn, r0 + 1, c0i + 1, ch))
    return y


def adjust_contrast(x, factors, value_range=(0, 255)):
    """(x - m) * factor + m per image and channel, m the channel's mean over the image; then clipped."""
    x = _f64(x)
    n, h, w, c = x.shape
    y = np.zeros_like(x)
    for nn, ch in np.ndindex(n, c):
        m = math.fsum(x[nn, :, :, ch].ravel()) / (h * w)
        for r, col in np.ndindex(h, w):
            v = (x[nn, r, col, ch] - m) * factors[nn] + m
            if value_range is not None:
                v = min(max(v, value_range[0]), value_range[1])
            y[nn, r, col, ch] = v
    return y


# ===================================================================================== optimizers
def sgd_update(w, g, m, lr, momentum, nesterov):
    """Keras SGD → (w, m). Without momentum w -= lr·g (m unchanged); with it m = momentum·m − lr·g and
    w += m, or with Nesterov w += momentum·m − lr·g."""
    w, g = _f64(w), _f64(g)
    m = None if m is None else _f64(m)
    if momentum == 0:
        return w - lr * g, m
    m = momentum * m - lr * g
    if nesterov:
        return w + momentum * m - lr * g, m
    return w + m, m


def rmsprop_update(w, g, v, mom, avg, lr, rho, epsilon, momentum, centered):
    """Keras RMSprop → (w, v, mom, avg):
        v = rho·v + (1 − rho)·g²
        centered: avg = rho·avg + (1 − rho)·g and denominator = sqrt(v − avg² + epsilon),
        else denominator = sqrt(v + epsilon)  — epsilon inside the root
        step = lr·g / denominator
        momentum > 0: mom = momentum·mom + step and w −= mom, else w −= step.
    State arrays that the configuration does not use are passed through."""
    w, g, v = _f64(w), _f64(g), _f64(v)
    mom = None if mom is None else _f64(mom)
    avg = None if avg is None else _f64(avg)
    v = rho * v + (1 - rho) * g * g
    if centered:
        avg = rho * avg + (1 - rho) * g
        denom = np.sqrt(v - avg * avg + epsilon)
    else:
        denom = np.sqrt(v + epsilon)
    step = lr * g / denom
    if momentum > 0:
        mom = momentum * mom + step
        step = mom
    return w - step, v, mom, avg


def weight_decay(w, lr, weight_decay):
    """Keras's decoupled weight decay, before the update: w − weight_decay·lr·w."""
    return _f64(w) * (1 - weight_decay * lr)


def adam_update(w, g, m, v, lr, beta_1, beta_2, epsilon, t):
    """Keras Adam step t (1-based) → (w, m, v):
        m = β1·m + (1 − β1)·g;  v = β2·v + (1 − β2)·g²
        w −= lr · sqrt(1 − β2^t) / (1 − β1^t) · m / (sqrt(v) + epsilon)  (Keras's "epsilon hat")."""
    w, g, m, v = _f64(w), _f64(g), _f64(m), _f64(v)
    m = beta_1 * m + (1 - beta_1) * g
    v = beta_2 * v + (1 - beta_2) * g * g
    alpha = lr * math.sqrt(1 - beta_2 ** t) / (1 - beta_1 ** t)
    return w - alpha * m / (np.sqrt(v) + epsilon), m, v
