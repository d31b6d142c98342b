"""The activations, the binary cross-entropy and the from-logits cross-entropy against the float64 oracle,
written once for both engines: ``ActivationLossChecks`` holds the tests, and a ``Test...`` subclass that sets
``engine`` (helpers.Engine) runs them on one engine: tests/test_ops_numpy_activations_losses.py (NumPy) and
tests/test_gpu_activations_losses.py (CUDA, and through it the kernel emulator).

Inputs are drawn in float64, rounded to float32 once, and the same values go to the engine and the oracle.
"""
import numpy as np
import pytest

import helpers
import reference as ref
from helpers import F32, f32, normal

ACTIVATIONS = ["sigmoid", "tanh", "elu", ("elu", 0.5), "selu", "leaky_relu", ("leaky_relu", 0.3), "softplus",
               "silu", "swish", "gelu", ("gelu", True), "relu6", ("relu6", 2.5)]
ACTIVATION_SHAPES = [(1, 10), (7, 3), (2, 5, 5, 8), (3, 700)]  # 2,100 elements: several blocks on the GPU
EXTREMES = [-90.0, -30.0, -17.0, 17.0, 30.0, 90.0]  # where the naive forms overflow or lose the answer
BINARY_SHAPES = [(1, 1), (7, 1), (64, 3), (300, 2)]  # 300 rows: more than a block's threads


def activation_input(shape, seed=26):
    """Normal values times 3, at least 2e-2 from 0 (the kink of the relu-like activations), the first few
    replaced by EXTREMES."""
    x = np.random.default_rng(seed).normal(size=shape) * 3
    x = f32(np.sign(x) * (np.abs(x) + 2e-2))
    flat = x.reshape(-1)
    flat[:len(EXTREMES)] = EXTREMES[:flat.size]
    return x


def binary_case(n, units, from_logits, seed):
    """(p, labels): logits or probabilities away from the clip; hard labels with a row of soft ones."""
    rng = np.random.default_rng([n, units, from_logits, seed])
    p = f32(rng.normal(size=(n, units)) * 4 if from_logits else rng.uniform(0.02, 0.98, size=(n, units)))
    labels = f32(rng.integers(0, 2, size=(n, units)))
    labels[0] = rng.random(units)
    return p, labels


class ActivationLossChecks:
    engine = None  # a helpers.Engine, set by the subclass

    # ================================================================================= activations
    @pytest.mark.parametrize("shape", ACTIVATION_SHAPES, ids=str)
    @pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
    def test_activations_match_reference(self, activation, shape):
        """Forward; backward from the output (or the input, for silu and gelu), also into an out= buffer."""
        eng, ops = self.engine, self.engine.ops
        rng = np.random.default_rng([ord(ch) for ch in str(activation)])
        x, dy = activation_input(shape), normal(rng, shape)
        xd, dyd = eng.dev(x), eng.dev(dy)
        y = ops.activation_forward(xd, activation)
        eng.close(y, ref.activation_forward(x, activation), 1e-5, 1e-7)
        y_host = eng.host(y)
        assert np.isfinite(y_host).all()
        dx_ref = ref.activation_backward(dy, y_host, activation, x=x)
        eng.close(ops.activation_backward(dyd, y, activation, x=xd), dx_ref, 1e-5, 1e-6)
        out = eng.dev(np.zeros(shape, F32))
        assert ops.activation_backward(dyd, y, activation, out=out, x=xd) is out
        eng.close(out, dx_ref, 1e-5, 1e-6)
        np.testing.assert_array_equal(eng.host(xd), x)  # inputs not written to
        np.testing.assert_array_equal(eng.host(dyd), dy)

    @pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
    def test_activations_in_place_nan_and_after_conv_and_dense(self, activation):
        eng, ops = self.engine, self.engine.ops
        x = activation_input((4, 9), seed=27)
        xd = eng.dev(x)
        assert ops.activation_forward(xd, activation, out=xd) is xd
        eng.close(xd, ref.activation_forward(x, activation), 1e-5, 1e-7)
        if not ops.activation_needs_input(activation):
            dy = eng.dev(normal(np.random.default_rng(28), x.shape))
            want = ref.activation_backward(eng.host(dy), eng.host(xd), activation)
            assert ops.activation_backward(dy, xd, activation, out=dy) is dy
            eng.close(dy, want, 1e-5, 1e-6)
        y = eng.host(ops.activation_forward(eng.dev(f32([[1.0, np.nan, -2.0]])), activation))
        assert np.isnan(y[0, 1]) and np.isfinite(y[0, [0, 2]]).all()
        # conv2d_forward and dense_forward apply the activations their kernels do not fuse afterwards
        xc, w, b, s, padding, rng = helpers.conv_case(2, 3, (7, 5), 3, 1, "same", f=5)
        y = ops.conv2d_forward(eng.dev(xc), eng.dev(w), eng.dev(b), s, padding, activation, {})
        eng.close(y, ref.conv2d_forward(xc, w, b, s, padding, activation), 1e-4, 1e-5)
        xd, wd, bd = normal(rng, (7, 12)), normal(rng, (12, 4), 0.5), normal(rng, (4,))
        out = eng.dev(np.zeros((7, 4), F32))
        assert ops.dense_forward(eng.dev(xd), eng.dev(wd), eng.dev(bd), activation, out=out) is out
        eng.close(out, ref.dense_forward(xd, wd, bd, activation), 1e-4, 1e-5)
        # what a layer whose activation needs its input does: the op without activation, then the activation
        z = ops.dense_forward(eng.dev(xd), eng.dev(wd), eng.dev(bd), None)
        a = ops.activation_forward(z, activation)
        dy = normal(rng, (7, 4))
        dz = ops.activation_backward(eng.dev(dy), a, activation, x=z)
        eng.close(dz, ref.activation_backward(dy, eng.host(a), activation, x=eng.host(z)), 1e-5, 1e-6)

    def test_activation_errors_and_names(self):
        ops = self.engine.ops
        x = self.engine.dev(np.zeros((2, 3), F32))
        with pytest.raises(ValueError, match="mish.*known: relu, softmax, sigmoid, tanh, elu, selu, leaky_relu"):
            ops.activation_forward(x, "mish")
        for bad, what in ((("relu", 1.0), "takes no parameter"), (("leaky_relu", -0.1), "negative_slope"),
                          (("elu", float("nan")), "alpha"), (("gelu", 0.5), "approximate"),
                          (("leaky_relu",), "name or a .name, parameter. pair"), (3, "name or a")):
            with pytest.raises(ValueError, match=what):
                ops.activation_forward(x, bad)
        for activation in ("gelu", "silu", "swish", ("gelu", True)):
            assert ops.activation_needs_input(activation)
            with pytest.raises(ValueError, match="needs the activation's input: pass x="):
                ops.activation_backward(x, x, activation)
        for activation in (None, "relu", "softmax", "sigmoid", "tanh", "elu", "selu", "leaky_relu", "softplus"):
            assert not ops.activation_needs_input(activation)
        assert ops.split_activation("swish") == ("silu", None)
        assert ops.split_activation("leaky_relu") == ("leaky_relu", 0.2)
        assert ops.split_activation(("leaky_relu", 0)) == ("leaky_relu", 0.0)
        assert ops.split_activation("elu") == ("elu", 1.0)
        assert ops.split_activation("gelu") == ("gelu", False)
        assert ops.split_activation(None) == (None, None)
        with pytest.raises(ValueError, match="mish"):
            ops.dense_forward(x, self.engine.dev(np.zeros((3, 2), F32)), None, "mish")

    # ================================================================================= losses
    @pytest.mark.parametrize("smoothing", [0.0, 0.2])
    @pytest.mark.parametrize("from_logits", [False, True])
    @pytest.mark.parametrize("n, units", BINARY_SHAPES)
    def test_binary_crossentropy_matches_reference(self, n, units, from_logits, smoothing):
        eng, ops = self.engine, self.engine.ops
        p, labels = binary_case(n, units, from_logits, 1)
        pd, ld = eng.dev(p), eng.dev(labels)
        loss = ops.binary_crossentropy_forward(pd, ld, from_logits, smoothing)
        assert eng.host(loss).shape == (n,)
        eng.close(loss, ref.binary_crossentropy_forward(p, labels, from_logits, smoothing), 1e-5, 1e-6)
        want = ref.binary_crossentropy_backward(p, labels, from_logits, smoothing)
        eng.close(ops.binary_crossentropy_backward(pd, ld, from_logits, smoothing), want, 1e-5, 1e-6)
        out = eng.dev(np.zeros_like(p))
        assert ops.binary_crossentropy_backward(pd, ld, from_logits, smoothing, out=out) is out
        eng.close(out, want, 1e-5, 1e-6)
        if not from_logits:
            want = ref.sigmoid_binary_crossentropy_backward(p, labels, smoothing)
            eng.close(ops.sigmoid_binary_crossentropy_backward(pd, ld, smoothing), want, 1e-5, 1e-7)
            assert ops.sigmoid_binary_crossentropy_backward(pd, ld, smoothing, out=out) is out
            eng.close(out, want, 1e-5, 1e-7)
        np.testing.assert_array_equal(eng.host(pd), p)

    def test_binary_crossentropy_clip_extremes_and_label_dtypes(self):
        eng, ops = self.engine, self.engine.ops
        p = f32([[0.0, 1.0, 1e-9, 1 - 1e-9, 0.5]])  # 1 - 1e-9 rounds to 1 in float32
        labels = f32([[1, 0, 1, 0, 1]])
        eng.close(ops.binary_crossentropy_forward(eng.dev(p), eng.dev(labels), False),
                  ref.binary_crossentropy_forward(p, labels, False), 1e-6, 0)
        dp = eng.host(ops.binary_crossentropy_backward(eng.dev(p), eng.dev(labels), False))
        np.testing.assert_array_equal(dp[0, :4], 0.0)  # the clip is active: no gradient
        assert np.isfinite(dp).all() and dp[0, 4] != 0
        z = f32([[-100.0, 100.0, 0.0, 30.0]])  # logits: no overflow, no log(0)
        zl = f32([[1, 0, 1, 1]])
        eng.close(ops.binary_crossentropy_forward(eng.dev(z), eng.dev(zl), True),
                  ref.binary_crossentropy_forward(z, zl, True), 1e-6, 0)
        eng.close(ops.binary_crossentropy_backward(eng.dev(z), eng.dev(zl), True),
                  ref.binary_crossentropy_backward(z, zl, True), 1e-6, 1e-7)
        ints = np.array([[1, 0, 1, 1]], np.int64)  # integer and boolean labels are cast
        for labels in (ints, ints.astype(bool)):
            eng.close(ops.binary_crossentropy_forward(eng.dev(z), eng.dev(labels), True),
                      ref.binary_crossentropy_forward(z, zl, True), 1e-6, 0)

    def test_count_binary_correct_matches_reference(self):
        eng, ops = self.engine, self.engine.ops
        rng = np.random.default_rng(30)
        p = f32(rng.random((1000, 3)))  # more elements than a block's threads
        p[0] = [0.5, np.nan, 0.3]  # 0.5 is not above 0.5, nor float32 0.3 above 0.3; a NaN is above nothing
        labels = f32(rng.integers(0, 2, size=p.shape))
        labels[1, 0] = 0.7  # a soft label never matches
        for threshold in (0.5, 0.3):
            want = ref.count_binary_correct(p, labels, threshold)
            assert int(ops.count_binary_correct(eng.dev(p), eng.dev(labels), threshold)) == want
            assert 0 < want < p.size
        assert int(ops.count_binary_correct(eng.dev(p[:0]), eng.dev(labels[:0]))) == 0

    def test_binary_crossentropy_errors(self):
        eng, ops = self.engine, self.engine.ops
        p, labels = eng.dev(np.full((3, 2), 0.5, F32)), eng.dev(np.zeros((3, 2), F32))
        with pytest.raises(ValueError, match=r"labels \(3,\) must have the predictions' shape \(3, 2\)"):
            ops.binary_crossentropy_forward(p, eng.dev(np.zeros(3, F32)), False)
        with pytest.raises(ValueError, match=r"\(N, units\)"):
            ops.binary_crossentropy_backward(eng.dev(np.zeros(3, F32)), eng.dev(np.zeros(3, F32)), False)
        with pytest.raises(ValueError, match="label_smoothing must be in"):
            ops.sigmoid_binary_crossentropy_backward(p, labels, label_smoothing=1.5)
        with pytest.raises(ValueError, match="labels"):
            ops.count_binary_correct(p, eng.dev(np.zeros((2, 3), F32)))

    @pytest.mark.parametrize("sparse", [True, False])
    @pytest.mark.parametrize("n, k", [(1, 2), (7, 10), (300, 3)])
    def test_crossentropy_from_logits_matches_reference(self, n, k, sparse):
        eng, ops = self.engine, self.engine.ops
        rng = np.random.default_rng([n, k, sparse, 3])
        z = normal(rng, (n, k), 4)
        z[0, 0] = 1000.0  # a large logit: the log-softmax form does not overflow
        ints = rng.integers(0, k, size=n)
        labels = ints if sparse else f32(np.eye(k)[ints])
        zd, ld = eng.dev(z), eng.dev(labels)
        eng.close(ops.crossentropy_forward(zd, ld, sparse, from_logits=True),
                  ref.crossentropy_forward(z, labels, sparse, from_logits=True), 1e-5, 1e-6)
        want = ref.crossentropy_backward(z, labels, sparse, from_logits=True)
        eng.close(ops.crossentropy_backward(zd, ld, sparse, from_logits=True), want, 1e-5, 1e-6)
        out = eng.dev(np.zeros_like(z))
        assert ops.crossentropy_backward(zd, ld, sparse, True, out=out) is out
        eng.close(out, want, 1e-5, 1e-6)
        if not sparse:  # targets that do not sum to 1
            soft = f32(rng.random((n, k)))
            eng.close(ops.crossentropy_backward(zd, eng.dev(soft), False, from_logits=True),
                      ref.crossentropy_backward(z, soft, False, from_logits=True), 1e-5, 1e-6)

    def test_empty_batches(self):
        eng, ops = self.engine, self.engine.ops
        p = eng.dev(np.zeros((0, 2), F32))
        assert eng.host(ops.binary_crossentropy_forward(p, p, True)).shape == (0,)
        assert eng.host(ops.sigmoid_binary_crossentropy_backward(p, p)).shape == (0, 2)
        assert eng.host(ops.activation_forward(p, "gelu")).shape == (0, 2)
        assert eng.host(ops.activation_backward(p, None, "gelu", x=p)).shape == (0, 2)
