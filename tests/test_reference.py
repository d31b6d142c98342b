"""The oracle checked on its own: backward passes against float64 central differences (test plan row 1),
forward passes and optimizer steps against small hand-computed cases."""
import math

import numpy as np
import pytest

import reference as ref

EPS, ATOL, RTOL = 1e-6, 1e-5, 1e-3  # as torch.autograd.gradcheck


def numeric_grad(f, x):
    """Central differences of the scalar function f at x (float64), one element at a time."""
    x = np.array(x, dtype=np.float64)
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + EPS
        up = f(x)
        x[i] = old - EPS
        down = f(x)
        x[i] = old
        g[i] = (up - down) / (2 * EPS)
    return g


def assert_grad(analytic, f, x):
    numeric = numeric_grad(f, x)
    assert analytic.shape == numeric.shape
    assert np.abs(numeric).max() > 1e-3, "degenerate check: the numeric gradient is zero"
    np.testing.assert_allclose(analytic, numeric, rtol=RTOL, atol=ATOL)


def shuffled_arange(rng, shape, scale=0.25):
    """Distinct values 0.25 apart (no ties in a pooling window), shuffled, centred on zero."""
    size = int(np.prod(shape))
    return (rng.permutation(size) - size / 2).reshape(shape) * scale


def padding_for(kind, h, w, k, s):
    if kind == "valid":
        return (0, 0, 0, 0)
    if kind == "same":
        return ref.same_padding(h, k[0], s[0]) + ref.same_padding(w, k[1], s[1])
    return kind  # an explicit (top, bottom, left, right) tuple


# ===================================================================================== helpers
@pytest.mark.parametrize("size, k, s, expected", [
    (28, 3, 1, (1, 1)), (28, 2, 1, (0, 1)), (28, 4, 1, (1, 2)), (5, 2, 2, (0, 1)), (7, 3, 2, (1, 1)),
    (6, 3, 2, (0, 1)), (5, 5, 1, (2, 2)), (5, 1, 2, (0, 0)), (11, 3, 3, (0, 1)), (4, 2, 2, (0, 0)),
])
def test_same_padding(size, k, s, expected):
    assert ref.same_padding(size, k, s) == expected
    lo, hi = expected
    assert ref._out_len(size, k, s, lo, hi) == math.ceil(size / s)


def test_conv_forward_small_case_by_hand():
    x = np.arange(9.0).reshape(1, 3, 3, 1)  # [[0 1 2] [3 4 5] [6 7 8]]
    w = np.array([[1.0, 2.0], [3.0, 4.0]]).reshape(2, 2, 1, 1)
    y = ref.conv2d_forward(x, w, np.array([0.5]), (1, 1), (0, 0, 0, 0), None)
    assert y.shape == (1, 2, 2, 1)
    np.testing.assert_array_equal(y[0, :, :, 0], [[0 + 2 + 9 + 16 + 0.5, 1 + 4 + 12 + 20 + 0.5],
                                                  [3 + 8 + 18 + 28 + 0.5, 4 + 10 + 21 + 32 + 0.5]])
    # "same" with an even kernel pads one row below and one column right: the last outputs see zeros
    y = ref.conv2d_forward(x, w, None, (1, 1), ref.same_padding(3, 2, 1) * 2, None)
    assert y.shape == (1, 3, 3, 1)
    assert y[0, 2, 2, 0] == 8 * 1
    assert y[0, 0, 2, 0] == 2 * 1 + 5 * 3


def test_pool_forward_small_case_by_hand():
    x = np.array([[3.0, 1.0, 4.0], [1.0, 5.0, 9.0], [2.0, 6.0, 5.0]]).reshape(1, 3, 3, 1)
    y, idx = ref.maxpool2d_forward(x, (2, 2), (2, 2), (0, 0, 0, 0))  # valid drops the odd row/column
    assert y.shape == (1, 1, 1, 1) and y[0, 0, 0, 0] == 5.0 and idx[0, 0, 0, 0] == 3
    y, idx = ref.maxpool2d_forward(x, (2, 2), (2, 2), (0, 1, 0, 1))  # same: padding bottom/right
    np.testing.assert_array_equal(y[0, :, :, 0], [[5.0, 9.0], [6.0, 5.0]])
    np.testing.assert_array_equal(idx[0, :, :, 0], [[3, 2], [1, 0]])
    a = ref.avgpool2d_forward(x, (2, 2), (2, 2), (0, 1, 0, 1))
    np.testing.assert_array_equal(a[0, :, :, 0], [[2.5, 6.5], [4.0, 5.0]])  # padding not counted


def test_maxpool_ties_and_nan_by_hand():
    x = np.array([[2.0, 2.0], [2.0, 2.0]]).reshape(1, 2, 2, 1)
    y, idx = ref.maxpool2d_forward(x, (2, 2), (1, 1), (0, 0, 0, 0))
    assert idx[0, 0, 0, 0] == 0
    np.testing.assert_array_equal(ref.maxpool2d_backward(np.ones((1, 1, 1, 1)), idx, x.shape, (2, 2), (1, 1),
                                                         (0, 0, 0, 0))[0, :, :, 0], [[1, 0], [0, 0]])
    x = np.array([[1.0, 7.0], [np.nan, np.nan]]).reshape(1, 2, 2, 1)
    y, idx = ref.maxpool2d_forward(x, (2, 2), (1, 1), (0, 0, 0, 0))
    assert math.isnan(y[0, 0, 0, 0]) and idx[0, 0, 0, 0] == 2
    x = np.array([[np.nan, 7.0], [1.0, np.nan]]).reshape(1, 2, 2, 1)
    assert ref.maxpool2d_forward(x, (2, 2), (1, 1), (0, 0, 0, 0))[1][0, 0, 0, 0] == 0
    # a window starting in the padding: the padding (-inf) never wins against a real cell
    x = np.full((1, 2, 2, 1), -5.0)
    y, idx = ref.maxpool2d_forward(x, (2, 2), (1, 1), (1, 0, 1, 0))
    assert y[0, 0, 0, 0] == -5.0 and idx[0, 0, 0, 0] == 3


# ===================================================================================== conv2d
CONV_CASES = [  # x shape, kernel (kh, kw), filters, stride, padding
    ((2, 5, 5, 3), (3, 3), 4, (1, 1), "valid"),
    ((2, 5, 5, 3), (3, 3), 2, (1, 1), "same"),
    ((1, 7, 5, 2), (2, 2), 3, (2, 2), "same"),
    ((2, 6, 7, 2), (3, 2), 2, (2, 1), "same"),
    ((1, 5, 5, 1), (5, 5), 2, (1, 1), "same"),
    ((2, 7, 5, 2), (1, 1), 3, (2, 2), "valid"),
    ((1, 6, 6, 2), (4, 4), 2, (2, 2), "same"),
    ((2, 5, 6, 2), (3, 3), 2, (2, 3), (0, 2, 1, 0)),
]


def _conv_inputs(x_shape, k, f, stride, padding, activation, seed):
    """x, w, b, padding; for relu, redrawn until every pre-activation is at least 1e-2 from the kink."""
    for attempt in range(200):
        rng = np.random.default_rng(seed + 1000 * attempt)
        x = rng.normal(size=x_shape)
        w = rng.normal(size=k + (x_shape[3], f)) * 0.5
        b = rng.normal(size=f)
        pad = padding_for(padding, x_shape[1], x_shape[2], k, stride)
        z = ref.conv2d_forward(x, w, b, stride, pad, None)
        if activation != "relu" or np.abs(z).min() > 1e-2:
            return x, w, b, pad
    raise AssertionError("no kink-free draw")


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("x_shape, k, f, stride, padding", CONV_CASES)
def test_conv2d_backward_matches_finite_differences(x_shape, k, f, stride, padding, activation):
    x, w, b, pad = _conv_inputs(x_shape, k, f, stride, padding, activation, seed=1)
    y = ref.conv2d_forward(x, w, b, stride, pad, activation)
    g = np.random.default_rng(2).normal(size=y.shape)  # upstream gradient: L = sum(g * y)
    dz = ref.activation_backward(g, y, activation)
    dx = ref.conv2d_backward_data(dz, w, x.shape, stride, pad)
    dw, db = ref.conv2d_backward_filter(dz, x, w.shape, stride, pad)
    assert_grad(dx, lambda v: np.sum(g * ref.conv2d_forward(v, w, b, stride, pad, activation)), x)
    assert_grad(dw, lambda v: np.sum(g * ref.conv2d_forward(x, v, b, stride, pad, activation)), w)
    assert_grad(db, lambda v: np.sum(g * ref.conv2d_forward(x, w, v, stride, pad, activation)), b)
    if activation == "relu":
        assert (y == 0).any() and (y > 0).any()  # the kink is exercised on both sides


# ===================================================================================== pooling
POOL_CASES = [  # x shape, pool, stride, padding
    ((2, 5, 5, 3), (2, 2), (2, 2), "valid"),
    ((2, 5, 5, 2), (2, 2), (2, 2), "same"),
    ((2, 7, 5, 2), (3, 3), (2, 2), "same"),
    ((1, 11, 11, 2), (3, 3), (1, 1), "same"),
    ((2, 7, 5, 1), (3, 3), (3, 3), "valid"),
    ((1, 6, 7, 2), (2, 3), (1, 2), "valid"),
    ((1, 5, 5, 1), (3, 3), (2, 2), (1, 0, 2, 1)),
]


@pytest.mark.parametrize("x_shape, pool, stride, padding", POOL_CASES)
def test_maxpool2d_backward_matches_finite_differences(x_shape, pool, stride, padding):
    rng = np.random.default_rng(3)
    x = shuffled_arange(rng, x_shape)
    pad = padding_for(padding, x_shape[1], x_shape[2], pool, stride)
    y, idx = ref.maxpool2d_forward(x, pool, stride, pad)
    g = rng.normal(size=y.shape)
    dx = ref.maxpool2d_backward(g, idx, x.shape, pool, stride, pad)
    assert_grad(dx, lambda v: np.sum(g * ref.maxpool2d_forward(v, pool, stride, pad)[0]), x)


@pytest.mark.parametrize("x_shape, pool, stride, padding", POOL_CASES)
def test_avgpool2d_backward_matches_finite_differences(x_shape, pool, stride, padding):
    rng = np.random.default_rng(4)
    x = rng.normal(size=x_shape)
    pad = padding_for(padding, x_shape[1], x_shape[2], pool, stride)
    y = ref.avgpool2d_forward(x, pool, stride, pad)
    g = rng.normal(size=y.shape)
    dx = ref.avgpool2d_backward(g, x.shape, pool, stride, pad)
    assert_grad(dx, lambda v: np.sum(g * ref.avgpool2d_forward(v, pool, stride, pad)), x)


@pytest.mark.parametrize("x_shape", [(2, 5, 5, 3), (1, 7, 5, 1), (3, 2, 3, 4)])
def test_global_avgpool2d_backward_matches_finite_differences(x_shape):
    rng = np.random.default_rng(5)
    x = rng.normal(size=x_shape)
    y = ref.global_avgpool2d_forward(x)
    assert y.shape == (x_shape[0], x_shape[3])
    np.testing.assert_allclose(y, x.mean(axis=(1, 2)), rtol=1e-12)
    g = rng.normal(size=y.shape)
    dx = ref.global_avgpool2d_backward(g, x.shape)
    assert_grad(dx, lambda v: np.sum(g * ref.global_avgpool2d_forward(v)), x)


# ===================================================================================== global max-pooling, padding
@pytest.mark.parametrize("x_shape", [(2, 5, 5, 3), (1, 7, 5, 1), (3, 1, 1, 2)])
def test_global_maxpool2d_backward_matches_finite_differences(x_shape):
    rng = np.random.default_rng(40)
    x = shuffled_arange(rng, x_shape)
    y, idx = ref.global_maxpool2d_forward(x)
    np.testing.assert_array_equal(y, x.max(axis=(1, 2)))
    g = rng.normal(size=y.shape)
    dx = ref.global_maxpool2d_backward(g, idx, x.shape)
    assert_grad(dx, lambda v: np.sum(g * ref.global_maxpool2d_forward(v)[0]), x)


def test_global_maxpool2d_ties_and_nan_by_hand():
    x = np.array([[1.0, 3.0, 3.0], [0.0, 3.0, -1.0]]).reshape(1, 2, 3, 1)
    y, idx = ref.global_maxpool2d_forward(x)
    assert y[0, 0] == 3.0 and idx[0, 0] == 1  # the first of three maxima in row-major order
    dx = ref.global_maxpool2d_backward(np.array([[2.0]]), idx, x.shape)
    np.testing.assert_array_equal(dx[0, :, :, 0], [[0, 2, 0], [0, 0, 0]])
    x[0, 1, 0, 0], x[0, 1, 2, 0] = np.nan, np.nan
    y, idx = ref.global_maxpool2d_forward(x)
    assert math.isnan(y[0, 0]) and idx[0, 0] == 3  # the first NaN wins


@pytest.mark.parametrize("padding", [(1, 1, 1, 1), (0, 2, 3, 0), (2, 0, 0, 1)])
def test_zero_padding2d_by_hand_and_backward(padding):
    rng = np.random.default_rng(41)
    x = rng.normal(size=(2, 3, 4, 2))
    top, bottom, left, right = padding
    y = ref.zero_padding2d_forward(x, padding)
    assert y.shape == (2, 3 + top + bottom, 4 + left + right, 2)
    np.testing.assert_array_equal(y[:, top:top + 3, left:left + 4], x)
    assert np.count_nonzero(y) == np.count_nonzero(x) == x.size  # zeros everywhere else
    g = rng.normal(size=y.shape)
    dx = ref.zero_padding2d_backward(g, x.shape, padding)
    assert_grad(dx, lambda v: np.sum(g * ref.zero_padding2d_forward(v, padding)), x)


# ===================================================================================== batch normalization
BN_CASES = [  # x shape, scale (gamma), center (beta)
    ((2, 3, 4, 3), True, True),
    ((5, 4), True, True),       # Dense outputs (N, C)
    ((1, 3, 3, 2), True, False),  # one image: statistics over its H x W cells
    ((3, 2, 5), False, True),
    ((4, 2, 2, 1), False, False),
]


def _bn_inputs(x_shape, scale, center, seed):
    rng = np.random.default_rng(seed)
    c = x_shape[-1]
    x = rng.normal(size=x_shape) * rng.uniform(0.5, 2.0, size=c) + rng.normal(size=c)
    gamma = rng.uniform(0.5, 1.5, size=c) if scale else None
    beta = rng.normal(size=c) if center else None
    return x, gamma, beta, rng


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("x_shape, scale, center", BN_CASES)
def test_batchnorm_backward_matches_finite_differences(x_shape, scale, center, training):
    """Training: y of x through the batch's statistics; inference: through the moving ones (constants)."""
    x, gamma, beta, rng = _bn_inputs(x_shape, scale, center, 42)
    c = x_shape[-1]
    moving = (rng.normal(size=c), rng.uniform(0.5, 2, size=c))

    def forward(x_, gamma_=gamma, beta_=beta):
        if training:
            return ref.batchnorm_forward_training(x_, gamma_, beta_, *moving, 0.99, 1e-3)[0]
        return ref.batchnorm_forward_inference(x_, gamma_, beta_, *moving, 1e-3)[0]

    if training:
        y, mean, inv_std, _, _ = ref.batchnorm_forward_training(x, gamma, beta, *moving, 0.99, 1e-3)
    else:
        (y, inv_std), mean = ref.batchnorm_forward_inference(x, gamma, beta, *moving, 1e-3), moving[0]
    g = rng.normal(size=y.shape)
    dx, dgamma, dbeta = ref.batchnorm_backward(g, x, gamma, mean, inv_std, training)
    assert_grad(dx, lambda v: np.sum(g * forward(v)), x)
    if scale:
        assert_grad(dgamma, lambda v: np.sum(g * forward(x, v)), gamma)
    if center:
        assert_grad(dbeta, lambda v: np.sum(g * forward(x, gamma, v)), beta)


def test_batchnorm_statistics_and_moving_update_by_hand():
    rng = np.random.default_rng(44)
    x = rng.normal(size=(3, 4, 5, 2)) * [1.0, 3.0] + [0.5, -2.0]
    gamma, beta = np.array([2.0, 0.5]), np.array([1.0, -1.0])
    mm, mv = np.array([0.1, 0.2]), np.array([1.5, 0.7])
    y, mean, inv_std, new_mm, new_mv = ref.batchnorm_forward_training(x, gamma, beta, mm, mv, 0.9, 1e-3)
    flat = x.reshape(-1, 2)
    np.testing.assert_allclose(mean, flat.mean(axis=0), rtol=1e-12)
    var = flat.var(axis=0)  # NumPy's default ddof=0: the biased variance, as Keras uses
    np.testing.assert_allclose(inv_std, 1 / np.sqrt(var + 1e-3), rtol=1e-12)  # epsilon inside the root
    np.testing.assert_allclose(new_mm, 0.9 * mm + 0.1 * flat.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(new_mv, 0.9 * mv + 0.1 * var, rtol=1e-12)
    out = y.reshape(-1, 2)
    np.testing.assert_allclose(out.mean(axis=0), beta, atol=1e-12)  # per channel: mean beta ...
    np.testing.assert_allclose(out.std(axis=0), gamma * np.sqrt(var / (var + 1e-3)), rtol=1e-12)  # ... std ~gamma
    y_inf, inv_inf = ref.batchnorm_forward_inference(x, gamma, beta, mm, mv, 1e-3)
    np.testing.assert_allclose(y_inf, (x - mm) / np.sqrt(mv + 1e-3) * gamma + beta, rtol=1e-12)
    np.testing.assert_allclose(inv_inf, 1 / np.sqrt(mv + 1e-3), rtol=1e-12)


@pytest.mark.parametrize("bias, scale, center", [(True, True, True), (False, True, True), (True, False, False)])
def test_batchnorm_fold_is_the_convolution_then_the_normalization(bias, scale, center):
    """conv(x, w') + b' of the folded kernel and bias is the inference-mode normalization of conv(x, w) + b."""
    rng = np.random.default_rng([bias, scale, center])
    x, w = rng.normal(size=(2, 7, 6, 3)), rng.normal(size=(3, 3, 3, 5))
    b = rng.normal(size=5) if bias else None
    gamma = rng.uniform(0.5, 2, 5) if scale else None
    beta = rng.normal(size=5) if center else None
    mm, mv = rng.normal(size=5) * 3, rng.uniform(0.2, 4, 5)
    w2, b2 = ref.batchnorm_fold(w, b, gamma, beta, mm, mv, 1e-3)
    for stride, padding in [((1, 1), (1, 1, 1, 1)), ((2, 1), (0, 0, 0, 0))]:
        want, _ = ref.batchnorm_forward_inference(ref.conv2d_forward(x, w, b, stride, padding, None), gamma, beta, mm,
                                                  mv, 1e-3)
        np.testing.assert_allclose(ref.conv2d_forward(x, w2, b2, stride, padding, None), want, rtol=1e-12,
                                   atol=1e-12)


def test_batchnorm_of_a_single_row_gives_beta_and_no_nan():
    # Keras's behaviour for a batch of one (N, C) in training: variance 0, y = beta, gradient 0 to x
    x, gamma, beta = np.array([[3.0, -1.0]]), np.array([2.0, 0.5]), np.array([0.25, -4.0])
    y, mean, inv_std, new_mm, new_mv = ref.batchnorm_forward_training(x, gamma, beta, np.zeros(2), np.ones(2),
                                                                     0.99, 1e-3)
    np.testing.assert_array_equal(y, beta[None])
    np.testing.assert_allclose(inv_std, 1 / math.sqrt(1e-3), rtol=1e-12)
    np.testing.assert_allclose(new_mv, 0.99 * np.ones(2), rtol=1e-12)
    dx, dgamma, dbeta = ref.batchnorm_backward(np.array([[1.0, 2.0]]), x, gamma, mean, inv_std, True)
    np.testing.assert_array_equal(dx, 0)
    np.testing.assert_array_equal(dgamma, 0)
    np.testing.assert_array_equal(dbeta, [1.0, 2.0])


# ===================================================================================== depthwise conv2d
DEPTHWISE_CASES = [  # x shape, kernel (kh, kw), depth multiplier, stride, padding
    ((2, 5, 5, 3), (3, 3), 1, (1, 1), "valid"),
    ((2, 5, 5, 2), (3, 3), 2, (1, 1), "same"),
    ((1, 7, 5, 2), (2, 2), 3, (2, 2), "same"),
    ((2, 6, 7, 3), (3, 2), 1, (2, 1), "same"),
    ((1, 6, 6, 1), (4, 4), 2, (2, 2), "same"),
    ((2, 5, 6, 2), (3, 3), 2, (2, 3), (0, 2, 1, 0)),
]


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("x_shape, k, dm, stride, padding", DEPTHWISE_CASES)
def test_depthwise_conv2d_backward_matches_finite_differences(x_shape, k, dm, stride, padding, activation):
    c = x_shape[3]
    for attempt in range(200):  # for relu, every pre-activation at least 1e-2 from the kink
        rng = np.random.default_rng(45 + 1000 * attempt)
        x, w, b = rng.normal(size=x_shape), rng.normal(size=k + (c, dm)), rng.normal(size=c * dm)
        pad = padding_for(padding, x_shape[1], x_shape[2], k, stride)
        z = ref.depthwise_conv2d_forward(x, w, b, stride, pad, None)
        if activation != "relu" or np.abs(z).min() > 1e-2:
            break
    y = ref.depthwise_conv2d_forward(x, w, b, stride, pad, activation)
    g = rng.normal(size=y.shape)
    dz = ref.activation_backward(g, y, activation)
    dx = ref.depthwise_conv2d_backward_data(dz, w, x.shape, stride, pad)
    dw, db = ref.depthwise_conv2d_backward_filter(dz, x, w.shape, stride, pad)
    assert_grad(dx, lambda v: np.sum(g * ref.depthwise_conv2d_forward(v, w, b, stride, pad, activation)), x)
    assert_grad(dw, lambda v: np.sum(g * ref.depthwise_conv2d_forward(x, v, b, stride, pad, activation)), w)
    assert_grad(db, lambda v: np.sum(g * ref.depthwise_conv2d_forward(x, w, v, stride, pad, activation)), b)


@pytest.mark.parametrize("x_shape, k, dm, stride, padding", DEPTHWISE_CASES)
def test_depthwise_conv2d_is_a_conv2d_with_a_block_diagonal_kernel(x_shape, k, dm, stride, padding):
    """Input channel c, multiplier m feeds output channel c·DM + m (Keras's order): the convolution whose
    kernel W[i, j, c, c·DM + m] = w[i, j, c, m] and zero elsewhere gives the same outputs and gradients."""
    rng = np.random.default_rng(46)
    c = x_shape[3]
    x, w, b = rng.normal(size=x_shape), rng.normal(size=k + (c, dm)), rng.normal(size=c * dm)
    full = np.zeros(k + (c, c * dm))
    for ch in range(c):
        full[:, :, ch, ch * dm:(ch + 1) * dm] = w[:, :, ch, :]
    pad = padding_for(padding, x_shape[1], x_shape[2], k, stride)
    y = ref.depthwise_conv2d_forward(x, w, b, stride, pad, None)
    np.testing.assert_allclose(y, ref.conv2d_forward(x, full, b, stride, pad, None), rtol=1e-12, atol=1e-12)
    g = rng.normal(size=y.shape)
    np.testing.assert_allclose(ref.depthwise_conv2d_backward_data(g, w, x.shape, stride, pad),
                               ref.conv2d_backward_data(g, full, x.shape, stride, pad), rtol=1e-12, atol=1e-12)
    dw, db = ref.depthwise_conv2d_backward_filter(g, x, w.shape, stride, pad)
    dfull, dbfull = ref.conv2d_backward_filter(g, x, full.shape, stride, pad)
    np.testing.assert_allclose(dw, np.stack([dfull[:, :, ch, ch * dm:(ch + 1) * dm] for ch in range(c)], axis=2),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(db, dbfull, rtol=1e-12)


def test_separable_conv2d_backward_through_both_parts_matches_finite_differences():
    """SeparableConv2D = depthwise (stride, padding, no bias) then a 1x1 conv2d (bias, activation): the two
    backward passes chained give the gradient of the composition."""
    rng = np.random.default_rng(47)
    x, wd, wp, b = (rng.normal(size=(2, 6, 5, 3)), rng.normal(size=(3, 3, 3, 2)), rng.normal(size=(1, 1, 6, 4)),
                    rng.normal(size=4))
    stride, pad = (2, 1), padding_for("same", 6, 5, (3, 3), (2, 1))

    def forward(x_, wd_=wd, wp_=wp):
        mid = ref.depthwise_conv2d_forward(x_, wd_, None, stride, pad, None)
        return ref.conv2d_forward(mid, wp_, b, (1, 1), (0, 0, 0, 0), None)

    mid = ref.depthwise_conv2d_forward(x, wd, None, stride, pad, None)
    g = rng.normal(size=forward(x).shape)
    dwp, _ = ref.conv2d_backward_filter(g, mid, wp.shape, (1, 1), (0, 0, 0, 0))
    dmid = ref.conv2d_backward_data(g, wp, mid.shape, (1, 1), (0, 0, 0, 0))
    dx = ref.depthwise_conv2d_backward_data(dmid, wd, x.shape, stride, pad)
    dwd, _ = ref.depthwise_conv2d_backward_filter(dmid, x, wd.shape, stride, pad)
    assert_grad(dx, lambda v: np.sum(g * forward(v)), x)
    assert_grad(dwd, lambda v: np.sum(g * forward(x, v)), wd)
    assert_grad(dwp, lambda v: np.sum(g * forward(x, wd, v)), wp)


# ===================================================================================== dense, activations
@pytest.mark.parametrize("activation", [None, "relu", "softmax"])
@pytest.mark.parametrize("use_bias", [True, False])
def test_dense_backward_matches_finite_differences(activation, use_bias):
    for attempt in range(200):
        rng = np.random.default_rng(6 + 1000 * attempt)
        x, w = rng.normal(size=(3, 6)), rng.normal(size=(6, 4))
        b = rng.normal(size=4) if use_bias else None
        if activation != "relu" or np.abs(ref.dense_forward(x, w, b, None)).min() > 1e-2:
            break
    y = ref.dense_forward(x, w, b, activation)
    assert y.shape == (3, 4)
    g = rng.normal(size=y.shape)
    dz = ref.activation_backward(g, y, activation)
    dx = ref.dense_backward_data(dz, w)
    dw, db = ref.dense_backward_weights(dz, x)
    assert_grad(dx, lambda v: np.sum(g * ref.dense_forward(v, w, b, activation)), x)
    assert_grad(dw, lambda v: np.sum(g * ref.dense_forward(x, v, b, activation)), w)
    if use_bias:
        assert_grad(db, lambda v: np.sum(g * ref.dense_forward(x, w, v, activation)), b)
    np.testing.assert_allclose(db, dz.sum(axis=0), rtol=1e-12)


def test_dense_forward_matches_matmul():
    rng = np.random.default_rng(7)
    x, w, b = rng.normal(size=(5, 3)), rng.normal(size=(3, 2)), rng.normal(size=2)
    np.testing.assert_allclose(ref.dense_forward(x, w, b, None), x @ w + b, rtol=1e-12)


ACTIVATIONS = ["relu", "softmax", "sigmoid", "tanh", "elu", ("elu", 0.5), "selu", "leaky_relu",
               ("leaky_relu", 0.3), "softplus", "silu", "swish", "gelu", ("gelu", True), "relu6", ("relu6", 2.5)]


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
def test_activation_backward_matches_finite_differences(activation):
    rng = np.random.default_rng(8)
    x = rng.normal(size=(4, 5)) * 3
    x = np.sign(x) * (np.abs(x) + 2e-2)  # |x| > 1e-2: away from the kinks at 0 (relu, elu, selu, leaky_relu)
    y = ref.activation_forward(x, activation)
    g = rng.normal(size=y.shape)
    dx = ref.activation_backward(g, y, activation, x=x)
    assert_grad(dx, lambda v: np.sum(g * ref.activation_forward(v, activation)), x)


def test_elementwise_activation_values_by_hand():
    e = math.e
    cases = {  # activation: (inputs, outputs) from the definitions in keras.activations
        "sigmoid": ([0.0, 2.0, -1000.0, 1000.0], [0.5, 1 / (1 + e ** -2), 0.0, 1.0]),
        "tanh": ([0.0, 1.0], [0.0, (e - 1 / e) / (e + 1 / e)]),
        "elu": ([-1.0, 2.0], [1 / e - 1, 2.0]),
        ("elu", 0.5): ([-1.0, 2.0], [0.5 * (1 / e - 1), 2.0]),
        "selu": ([-1.0, 2.0], [1.0507009873554805 * 1.6732632423543772 * (1 / e - 1), 2 * 1.0507009873554805]),
        "leaky_relu": ([-1.0, 3.0], [-0.2, 3.0]),  # keras.activations.leaky_relu: negative_slope 0.2
        ("leaky_relu", 0.3): ([-1.0, 3.0], [-0.3, 3.0]),  # what the LeakyReLU layer's default gives
        "softplus": ([0.0, 1000.0, -1000.0], [math.log(2), 1000.0, 0.0]),
        "silu": ([1.0, -1000.0], [1 / (1 + 1 / e), 0.0]),
        "swish": ([1.0], [1 / (1 + 1 / e)]),
        "gelu": ([1.0, -1.0], [0.8413447460685429, -0.15865525393145707]),  # x Phi(x)
        ("gelu", True): ([1.0], [0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * 1.044715))]),
    }
    for activation, (x, want) in cases.items():
        np.testing.assert_allclose(ref.activation_forward(np.array([x]), activation)[0], want, rtol=1e-12,
                                   atol=1e-300, err_msg=str(activation))


def test_activation_forward_values():
    x = np.array([[-1.0, 0.0, 2.0], [1000.0, 1000.0, 1000.0 - math.log(2.0)]])
    np.testing.assert_array_equal(ref.activation_forward(x, "relu"),
                                  [[0, 0, 2], [1000, 1000, 1000 - math.log(2)]])
    s = ref.activation_forward(x, "softmax")  # no overflow with large logits
    np.testing.assert_allclose(s[1], [0.4, 0.4, 0.2], rtol=1e-12)
    np.testing.assert_allclose(s.sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(ref.activation_forward(x, None), x)
    with pytest.raises(ValueError):
        ref.activation_forward(x, "mish")


# ===================================================================================== merging
@pytest.mark.parametrize("shapes, axis", [([(2, 3, 4, 2), (2, 3, 4, 5)], 3), ([(2, 3, 1), (2, 2, 1), (2, 4, 1)], 1),
                                          ([(3, 2, 2, 1), (3, 2, 2, 1)], 2)])
def test_concat_and_split_are_each_others_gradient(shapes, axis):
    """d/dxᵢ Σ concat(xs) · c = the slab of c over xᵢ = split(c)ᵢ, by finite differences."""
    rng = np.random.default_rng(3)
    xs = [rng.normal(size=s) for s in shapes]
    y = ref.concat(xs, axis)
    c = rng.normal(size=y.shape)
    grads = ref.split(c, [s[axis] for s in shapes], axis)
    for i in range(len(xs)):
        def f(xi, i=i):
            return float((ref.concat(xs[:i] + [xi] + xs[i + 1:], axis) * c).sum())
        assert_grad(grads[i], f, xs[i])
    np.testing.assert_array_equal(ref.concat(grads, axis), c)


def test_add_and_concat_by_hand():
    a, b = np.array([[1.0, 2.0]]), np.array([[10.0, 20.0]])
    np.testing.assert_array_equal(ref.add(a, b), [[11.0, 22.0]])
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(2, 3)), rng.normal(size=(2, 3))
    c = rng.normal(size=(2, 3))
    assert_grad(c, lambda x: float((ref.add(x, b) * c).sum()), a)  # each input gets the whole gradient
    np.testing.assert_array_equal(ref.concat([a[:, :1], a[:, 1:]], 1), a)
    np.testing.assert_array_equal(ref.concat([a, b], 0)[2:], b)


# ===================================================================================== losses
def _labels(rng, n, k, sparse):
    ints = rng.integers(0, k, size=n)
    return ints if sparse else np.eye(k)[ints]


def mean_ce_of_softmax(z, labels, sparse):
    return ref.crossentropy_forward(ref.activation_forward(z, "softmax"), labels, sparse).mean()


@pytest.mark.parametrize("sparse", [True, False])
def test_softmax_crossentropy_backward_is_gradient_of_mean_loss_wrt_logits(sparse):
    rng = np.random.default_rng(9)
    z = rng.normal(size=(5, 4))
    labels = _labels(rng, 5, 4, sparse)
    p = ref.activation_forward(z, "softmax")
    dz = ref.softmax_crossentropy_backward(p, labels, sparse)
    assert_grad(dz, lambda v: mean_ce_of_softmax(v, labels, sparse), z)


def test_softmax_crossentropy_backward_with_soft_targets():
    rng = np.random.default_rng(10)
    z = rng.normal(size=(3, 4))
    t = rng.random((3, 4))
    t /= t.sum(axis=1, keepdims=True)
    dz = ref.softmax_crossentropy_backward(ref.activation_forward(z, "softmax"), t, False)
    assert_grad(dz, lambda v: mean_ce_of_softmax(v, t, False), z)


@pytest.mark.parametrize("sparse", [True, False])
def test_crossentropy_backward_is_gradient_of_mean_loss_wrt_probabilities(sparse):
    rng = np.random.default_rng(11)
    p = rng.uniform(0.05, 1.0, size=(5, 4))  # rows not normalised: the renormalisation is exercised
    labels = _labels(rng, 5, 4, sparse)
    dp = ref.crossentropy_backward(p, labels, sparse)
    assert_grad(dp, lambda v: ref.crossentropy_forward(v, labels, sparse).mean(), p)


def test_crossentropy_values_by_hand():
    p = np.array([[0.2, 0.3, 0.5], [1.0, 1.0, 2.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    labels = np.array([2, 2, 0, 1])
    got = ref.crossentropy_forward(p, labels, True)
    np.testing.assert_allclose(got, [-math.log(0.5), -math.log(0.5), -math.log(1e-7), -math.log(1 - 1e-7)],
                               rtol=1e-12)
    np.testing.assert_allclose(ref.crossentropy_forward(p, np.eye(3)[labels], False), got, rtol=1e-12)


def test_crossentropy_backward_is_zero_where_the_true_class_is_clipped():
    p = np.array([[1e-12, 0.5, 0.5], [0.2, 0.3, 0.5]])
    dp = ref.crossentropy_backward(p, np.array([0, 1]), True)
    np.testing.assert_array_equal(dp[0], 0.0)
    assert np.abs(dp[1]).min() > 0


@pytest.mark.parametrize("sparse", [True, False])
def test_crossentropy_from_logits_is_the_loss_of_the_softmax_and_its_gradient(sparse):
    rng = np.random.default_rng(12)
    z = rng.normal(size=(5, 4)) * 3
    labels = _labels(rng, 5, 4, sparse)
    np.testing.assert_allclose(ref.crossentropy_forward(z, labels, sparse, from_logits=True),
                               ref.crossentropy_forward(ref.activation_forward(z, "softmax"), labels, sparse),
                               rtol=1e-10)  # no probability here is near the clip
    dz = ref.crossentropy_backward(z, labels, sparse, from_logits=True)
    assert_grad(dz, lambda v: ref.crossentropy_forward(v, labels, sparse, from_logits=True).mean(), z)
    np.testing.assert_allclose(dz, ref.softmax_crossentropy_backward(ref.activation_forward(z, "softmax"), labels,
                                                                     sparse), rtol=1e-10, atol=1e-15)


def test_crossentropy_from_logits_with_targets_that_do_not_sum_to_one():
    rng = np.random.default_rng(13)
    z, t = rng.normal(size=(3, 4)), rng.random((3, 4))
    dz = ref.crossentropy_backward(z, t, False, from_logits=True)
    assert_grad(dz, lambda v: ref.crossentropy_forward(v, t, False, from_logits=True).mean(), z)
    big = np.array([[1000.0, 0.0, -1000.0]])  # no overflow: the log-softmax form
    np.testing.assert_allclose(ref.crossentropy_forward(big, np.array([2]), True, from_logits=True), [2000.0])


def test_count_correct_by_hand():
    p = np.array([[0.1, 0.7, 0.2], [0.5, 0.5, 0.0], [0.3, 0.3, 0.4], [0.2, 0.4, 0.4]])
    assert ref.count_correct(p, np.array([1, 0, 0, 1]), True) == 3  # ties: the first maximum counts
    assert ref.count_correct(p, np.array([1, 1, 2, 2]), True) == 2
    assert ref.count_correct(p, np.eye(3)[[1, 1, 2, 1]], False) == 3
    assert isinstance(ref.count_correct(p, np.array([1, 0, 0, 1]), True), int)


# ------------------------------------------------------------------------------------- binary cross-entropy
@pytest.mark.parametrize("from_logits", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_binary_crossentropy_backward_is_gradient_of_mean_loss(from_logits, smoothing):
    rng = np.random.default_rng(14)
    p = rng.normal(size=(4, 3)) * 3 if from_logits else rng.uniform(0.05, 0.95, size=(4, 3))
    labels = rng.integers(0, 2, size=(4, 3)).astype(float)
    labels[0] = rng.random(3)  # soft labels too
    dp = ref.binary_crossentropy_backward(p, labels, from_logits, smoothing)
    assert_grad(dp, lambda v: ref.binary_crossentropy_forward(v, labels, from_logits, smoothing).mean(), p)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_sigmoid_binary_crossentropy_backward_is_gradient_wrt_the_logits(smoothing):
    rng = np.random.default_rng(15)
    z = rng.normal(size=(5, 2)) * 3  # |z| < 16: no sigmoid output reaches the clip
    labels = rng.integers(0, 2, size=(5, 2)).astype(float)
    dz = ref.sigmoid_binary_crossentropy_backward(ref.activation_forward(z, "sigmoid"), labels, smoothing)
    assert_grad(dz, lambda v: ref.binary_crossentropy_forward(ref.activation_forward(v, "sigmoid"), labels, False,
                                                              smoothing).mean(), z)
    np.testing.assert_allclose(ref.binary_crossentropy_backward(z, labels, True, smoothing), dz, rtol=1e-12)
    np.testing.assert_allclose(ref.binary_crossentropy_forward(z, labels, True, smoothing),
                               ref.binary_crossentropy_forward(ref.activation_forward(z, "sigmoid"), labels, False,
                                                               smoothing), rtol=1e-9)


def test_binary_crossentropy_values_by_hand():
    # keras.losses.binary_crossentropy's documented example
    np.testing.assert_allclose(ref.binary_crossentropy_forward(np.array([[0.6, 0.4], [0.4, 0.6]]),
                                                               np.array([[0, 1], [0, 0]]), False),
                               [0.916, 0.714], atol=5e-4)
    # the clip: float32's 1e-7 and 1 - 1e-7 (= 1 - 2^-23 + ...: 0.99999988), as Keras clips float32 outputs
    low, high = float(np.float32(1e-7)), float(np.float32(1 - 1e-7))
    got = ref.binary_crossentropy_forward(np.array([[0.0], [1.0], [1.0]]), np.array([[1], [0], [1]]), False)
    np.testing.assert_allclose(got, [-math.log(low), -math.log(1 - high), -math.log(high)], rtol=1e-12)
    np.testing.assert_array_equal(ref.binary_crossentropy_backward(np.array([[0.0, 1.0]]), np.array([[1, 0]]),
                                                                   False), [[0.0, 0.0]])
    # logits: log 2 at 0, no overflow far out; smoothing 0.2 turns the targets into 0.1 and 0.9
    got = ref.binary_crossentropy_forward(np.array([[0.0, 1000.0, -1000.0]]), np.array([[1, 1, 1]]), True)
    np.testing.assert_allclose(got, [(math.log(2) + 0 + 1000) / 3], rtol=1e-12)
    got = ref.binary_crossentropy_forward(np.array([[0.25]]), np.array([[1]]), False, label_smoothing=0.2)
    np.testing.assert_allclose(got, [-(0.9 * math.log(0.25) + 0.1 * math.log(0.75))], rtol=1e-12)


def test_count_binary_correct_by_hand():
    p = np.array([[0.9, 0.5], [0.2, 0.51]])
    assert ref.count_binary_correct(p, np.array([[1, 0], [0, 1]])) == 4  # 0.5 is not > 0.5: predicted 0
    assert ref.count_binary_correct(p, np.array([[1, 1], [1, 1]])) == 2
    assert ref.count_binary_correct(p, np.array([[1, 1], [1, 1]]), threshold=0.1) == 4
    assert ref.count_binary_correct(p, np.array([[0.7, 0], [0, 1]])) == 3  # a soft label never matches


def test_dropout_backward():
    dy = np.arange(6.0).reshape(2, 3)
    mask = np.array([[2.0, 0.0, 2.0], [0.0, 0.0, 2.0]])
    np.testing.assert_array_equal(ref.dropout_backward(dy, mask), [[0, 0, 4], [0, 0, 10]])


# ===================================================================================== image transforms
def _row_image(values):
    """A (1, 1, W, 1) image holding one row of values."""
    return np.array(values, dtype=float).reshape(1, 1, -1, 1)


@pytest.mark.parametrize("fill_mode, expected", [
    # the input a b c d (0 1 2 3) read at indices -5 .. 8, Keras's documented rules
    ("reflect", [3, 3, 2, 1, 0, 0, 1, 2, 3, 3, 2, 1, 0, 0]),   # d c b a | a b c d | d c b a
    ("mirror", [1, 2, 3, 2, 1, 0, 1, 2, 3, 2, 1, 0, 1, 2]),    # d c b | a b c d | c b a
    ("wrap", [3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0]),      # a b c d | a b c d | a b c d
    ("nearest", [0, 0, 0, 0, 0, 0, 1, 2, 3, 3, 3, 3, 3, 3]),   # a a a a | a b c d | d d d d
])
def test_fill_modes_by_hand(fill_mode, expected):
    assert [ref.fill_index(i, 4, fill_mode) for i in range(-5, 9)] == expected
    assert ref.fill_index(-1, 4, "constant") is None and ref.fill_index(4, 4, "constant") is None
    assert ref.fill_index(3, 1, fill_mode) == 0 and ref.fill_index(-2, 1, fill_mode) == 0  # a one-pixel axis


@pytest.mark.parametrize("interpolation", ["bilinear", "nearest"])
@pytest.mark.parametrize("fill_mode", ["reflect", "mirror", "wrap", "nearest", "constant"])
def test_affine_identity_and_integer_shifts_by_hand(interpolation, fill_mode):
    x = _row_image([10, 20, 30, 40])
    identity = ref.translation_transforms([0.0], [0.0])
    np.testing.assert_array_equal(ref.affine_transform(x, identity, interpolation, fill_mode), x)
    # moved right by 2: output column j reads input column j - 2; the first two come from the fill mode
    left = {"reflect": [20, 10], "mirror": [30, 20], "wrap": [30, 40], "nearest": [10, 10], "constant": [-1, -1]}
    got = ref.affine_transform(x, ref.translation_transforms([2.0], [0.0]), interpolation, fill_mode, -1.0)
    np.testing.assert_array_equal(got.ravel(), left[fill_mode] + [10, 20])
    # moved down by one row of a one-row image: every output row reads row -1
    down = ref.affine_transform(x, ref.translation_transforms([0.0], [1.0]), interpolation, fill_mode, -1.0)
    np.testing.assert_array_equal(down.ravel(), [-1] * 4 if fill_mode == "constant" else [10, 20, 30, 40])


def test_bilinear_weights_and_nearest_rounding_by_hand():
    x = _row_image([10, 20, 30, 40])
    half = ref.translation_transforms([0.5], [0.0])  # output column j reads input column j - 0.5
    np.testing.assert_allclose(ref.affine_transform(x, half, "bilinear", "nearest").ravel(), [10, 15, 25, 35])
    # constant: each of the two taps outside reads fill_value on its own
    np.testing.assert_allclose(ref.affine_transform(x, half, "bilinear", "constant", 100.0).ravel(),
                               [55, 15, 25, 35])
    # nearest rounds halves to even: -0.5 -> 0, 0.5 -> 0, 1.5 -> 2, 2.5 -> 2
    np.testing.assert_array_equal(ref.affine_transform(x, half, "nearest", "constant", 100.0).ravel(),
                                  [10, 10, 30, 30])
    quarter = ref.translation_transforms([0.0], [-0.25])  # rows read 0.25 below: the 2-row image's blend
    x2 = np.array([[0.0, 4.0], [8.0, 12.0]]).reshape(1, 2, 2, 1)
    np.testing.assert_allclose(ref.affine_transform(x2, quarter, "bilinear", "constant", 0.0)[0, :, :, 0],
                               [[2.0, 6.0], [6.0, 9.0]])  # row 1 reads 1.25: 0.75 * row 1 + 0.25 * fill 0


def test_rotation_zoom_translation_transforms_by_hand():
    x = np.arange(2 * 3 * 3 * 2, dtype=float).reshape(2, 3, 3, 2)
    half_turn = ref.rotation_transforms([math.pi, -math.pi], 3, 3)
    np.testing.assert_allclose(ref.affine_transform(x, half_turn, "bilinear", "constant"), x[:, ::-1, ::-1],
                               atol=1e-12)
    # a quarter turn counter-clockwise as displayed (row 0 at the top): the right column becomes the top row
    quarter = ref.affine_transform(x, ref.rotation_transforms([math.pi / 2] * 2, 3, 3), "nearest", "constant")
    np.testing.assert_array_equal(quarter, np.rot90(x, 1, axes=(1, 2)))
    np.testing.assert_array_equal(quarter[0, 0, :, 0], x[0, :, 2, 0])
    # zoom 0.5 about the centre of 5 rows: rows read 1, 1.5, 2, 2.5, 3
    col = np.array([0.0, 10.0, 20.0, 30.0, 40.0]).reshape(1, 5, 1, 1)
    zoomed = ref.affine_transform(col, ref.zoom_transforms([0.5], [1.0], 5, 1), "bilinear", "constant")
    np.testing.assert_allclose(zoomed.ravel(), [10, 15, 20, 25, 30])
    np.testing.assert_array_equal(ref.zoom_transforms([2.0], [0.5], 5, 3), [[0.5, 0, 0.5, 0, 2.0, -2.0, 0, 0]])
    np.testing.assert_array_equal(ref.translation_transforms([2.0], [-1.0]), [[1, 0, -2.0, 0, 1, 1.0, 0, 0]])


def test_projective_transform_and_degenerate_points_by_hand():
    x = _row_image([10, 20, 30, 40])
    # c0 = 1: column j reads (j + 0) / (j + 1): 0, 0.5, 2/3, 3/4
    t = np.array([[1.0, 0, 0, 0, 1, 0, 1.0, 0]])
    np.testing.assert_allclose(ref.affine_transform(x, t, "bilinear", "nearest").ravel(),
                               [10, 15, 10 + 20 / 3, 17.5])
    # k = 0 at column 1 (c0 = -1), and a non-finite transform: fill_value, whatever the mode
    t = np.array([[1.0, 0, 0, 0, 1, 0, -1.0, 0]])
    assert ref.affine_transform(x, t, "bilinear", "reflect", 7.0)[0, 0, 1, 0] == 7.0
    t = np.array([[np.nan, 0, 0, 0, 1, 0, 0, 0]])
    np.testing.assert_array_equal(ref.affine_transform(x, t, "nearest", "wrap", 7.0).ravel(), [7.0] * 4)


def test_flip_rescale_contrast_by_hand():
    x = np.arange(2 * 2 * 3 * 1, dtype=float).reshape(2, 2, 3, 1)
    got = ref.flip(x, [True, False], [False, True])
    np.testing.assert_array_equal(got[0], x[0, :, ::-1])
    np.testing.assert_array_equal(got[1], x[1, ::-1, :])
    np.testing.assert_array_equal(ref.flip(x, None, None), x)
    np.testing.assert_allclose(ref.rescale(np.array([0.0, 255.0, 51.0]), 1 / 255, -0.5), [-0.5, 0.5, -0.3])
    img = np.array([[10.0, 20.0], [30.0, 40.0]]).reshape(1, 2, 2, 1)  # mean 25
    np.testing.assert_allclose(ref.adjust_contrast(img, [2.0]).ravel(), [0.0, 15.0, 35.0, 55.0])  # -5 clipped
    np.testing.assert_allclose(ref.adjust_contrast(img, [2.0], None).ravel(), [-5.0, 15.0, 35.0, 55.0])
    np.testing.assert_allclose(ref.adjust_contrast(img, [0.0]).ravel(), [25.0] * 4)
    np.testing.assert_allclose(ref.adjust_contrast(img, [1.0], (15.0, 35.0)).ravel(), [15.0, 20.0, 30.0, 35.0])


# ===================================================================================== optimizers
def test_sgd_steps_by_hand():
    w, m = np.array([1.0, -2.0]), np.zeros(2)
    g = np.array([0.5, 0.25])
    w1, m1 = ref.sgd_update(w, g, m, 0.1, 0.0, False)
    np.testing.assert_allclose(w1, [1.0 - 0.05, -2.0 - 0.025], rtol=1e-15)
    np.testing.assert_array_equal(m1, 0.0)
    # momentum 0.9, two steps with the same gradient, scalar arithmetic on element 0
    mm, ww = 0.0, 1.0
    wa, ma = w, m
    for _ in range(2):
        mm = 0.9 * mm - 0.1 * 0.5
        ww = ww + mm
        wa, ma = ref.sgd_update(wa, g, ma, 0.1, 0.9, False)
        assert wa[0] == pytest.approx(ww, rel=1e-15) and ma[0] == pytest.approx(mm, rel=1e-15)
    mm, ww = 0.0, 1.0
    wa, ma = w, m
    for _ in range(2):
        mm = 0.9 * mm - 0.1 * 0.5
        ww = ww + 0.9 * mm - 0.1 * 0.5
        wa, ma = ref.sgd_update(wa, g, ma, 0.1, 0.9, True)
        assert wa[0] == pytest.approx(ww, rel=1e-15) and ma[0] == pytest.approx(mm, rel=1e-15)
    assert ww != pytest.approx(1.0 - 0.05 - 0.095, rel=1e-6)  # Nesterov differs from plain momentum


def test_rmsprop_keras_documented_example():
    # Keras's docstring: var 10, loss var**2 / 2 (gradient = var), lr 0.1, one step → 9.683772
    w, v, _, _ = ref.rmsprop_update(np.array([10.0]), np.array([10.0]), np.zeros(1), None, None,
                                    0.1, 0.9, 1e-7, 0.0, False)
    assert w[0] == pytest.approx(9.683772, abs=1e-6)
    assert v[0] == pytest.approx(10.0, rel=1e-15)


def test_rmsprop_steps_by_hand_with_epsilon_inside_the_root():
    lr, rho, eps = 0.01, 0.9, 1e-7
    g = 1e-4  # g² (1e-8) is comparable to epsilon: inside or outside the root differ by ~10x here
    w, v = np.array([1.0]), np.zeros(1)
    ww, vv = 1.0, 0.0
    for _ in range(3):
        vv = rho * vv + (1 - rho) * g * g
        outside = ww - lr * g / (math.sqrt(vv) + eps)
        ww = ww - lr * g / math.sqrt(vv + eps)
        w, v, _, _ = ref.rmsprop_update(w, np.array([g]), v, None, None, lr, rho, eps, 0.0, False)
        assert v[0] == pytest.approx(vv, rel=1e-14)
        assert w[0] == pytest.approx(ww, rel=1e-14)
        assert abs(w[0] - outside) > 1e-3  # the PyTorch-style placement would be far off


def test_rmsprop_centered_and_momentum_by_hand():
    lr, rho, eps, mu = 0.01, 0.9, 1e-7, 0.5
    grads = [0.3, -0.2, 0.5]
    w, v, mom, avg = np.array([1.0]), np.zeros(1), np.zeros(1), np.zeros(1)
    ww, vv, mm, aa = 1.0, 0.0, 0.0, 0.0
    for gg in grads:
        vv = rho * vv + (1 - rho) * gg * gg
        aa = rho * aa + (1 - rho) * gg
        mm = mu * mm + lr * gg / math.sqrt(vv - aa * aa + eps)
        ww = ww - mm
        w, v, mom, avg = ref.rmsprop_update(w, np.array([gg]), v, mom, avg, lr, rho, eps, mu, True)
        for got, want in ((w, ww), (v, vv), (mom, mm), (avg, aa)):
            assert got[0] == pytest.approx(want, rel=1e-14)


def test_adam_steps_by_hand():
    lr, b1, b2, eps = 0.001, 0.9, 0.999, 1e-7
    grads = [0.5, -0.1, 0.2, 0.2]
    w, m, v = np.array([0.3]), np.zeros(1), np.zeros(1)
    ww, mm, vv = 0.3, 0.0, 0.0
    for t, gg in enumerate(grads, start=1):
        mm = b1 * mm + (1 - b1) * gg
        vv = b2 * vv + (1 - b2) * gg * gg
        ww = ww - lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) * mm / (math.sqrt(vv) + eps)
        w, m, v = ref.adam_update(w, np.array([gg]), m, v, lr, b1, b2, eps, t)
        for got, want in ((w, ww), (m, mm), (v, vv)):
            assert got[0] == pytest.approx(want, rel=1e-14)
    # step 1 moves every weight by about lr, whatever the gradient's size
    w1, _, _ = ref.adam_update(np.zeros(3), np.array([0.05, 1.0, -50.0]), np.zeros(3), np.zeros(3),
                               lr, b1, b2, eps, 1)
    np.testing.assert_allclose(w1, [-lr, -lr, lr], rtol=1e-3)


def test_adam_epsilon_is_keras_epsilon_hat():
    # Keras adds epsilon to sqrt(v), not to sqrt(v / (1 - b2^t)) as Algorithm 1 of the paper does
    lr, b1, b2, eps, g = 0.1, 0.9, 0.999, 0.1, 0.01
    w, _, _ = ref.adam_update(np.zeros(1), np.array([g]), np.zeros(1), np.zeros(1), lr, b1, b2, eps, 1)
    m, v = (1 - b1) * g, (1 - b2) * g * g
    keras = -lr * math.sqrt(1 - b2) / (1 - b1) * m / (math.sqrt(v) + eps)
    paper = -lr * (m / (1 - b1)) / (math.sqrt(v / (1 - b2)) + eps)
    assert w[0] == pytest.approx(keras, rel=1e-14)
    assert abs(keras - paper) > 1e-3
