"""Batch normalization (training and inference, forward and backward) and its folding into a convolution against
the float64 oracle, written once for both engines: ``BatchNormChecks`` holds the tests, and a ``Test...`` subclass
that sets ``engine`` (helpers.Engine) and its tolerances runs them on one engine: tests/test_ops_numpy.py (NumPy)
and tests/test_gpu_normalization_depthwise.py (CUDA, and through it the kernel emulator). What one engine alone
promises (NumPy: batches split into parts that exchange their sums; CUDA: bitwise reproducibility, device arrays,
contiguity) stays in that engine's file.

Inputs are drawn in float64, rounded to float32 once (helpers.bn_case, helpers.fold_case), and the same values go to
the engine and the oracle. dx is checked with ten times the atol: it is dy less its channel mean and its part along
x̂, which cancel.
"""
import numpy as np
import pytest

import reference as ref
from helpers import BN_GRID, F32, FOLD_CASES, bn_case, fold_case, normal

# the test plan's grid, and 70 and 33 channels (partial channel tiles on the GPU), 300 rows of 33
BN_SHAPES = BN_GRID + [(2, 5, 5, 70), (300, 33)]


def bn_id(shape):
    return "x".join(map(str, shape))


class BatchNormChecks:
    engine = None  # a helpers.Engine, set by the subclass
    rtol = atol_scale = None  # the engine's tolerances, set by the subclass

    def close(self, got, want, atol_scale=None):
        self.engine.close(got, want, self.rtol, self.atol_scale if atol_scale is None else atol_scale)

    def empty(self, *shape):
        return self.engine.dev(np.empty(shape, F32))

    def check(self, shape, scale=True, center=True):
        """Both modes, forward and backward, against the oracle; the moving statistics updated in place; the inputs
        left as they were."""
        eng, ops = self.engine, self.engine.ops
        x, gamma, beta, mm, mv, rng = bn_case(shape, scale, center)
        xd, gd, bd, mmd, mvd = (None if a is None else eng.dev(a) for a in (x, gamma, beta, mm, mv))
        ctx = {}
        y, mean, inv_std = ops.batchnorm_forward_training(xd, gd, bd, mmd, mvd, 0.99, 1e-3, ctx)
        y_ref, mean_ref, inv_ref, mm_ref, mv_ref = ref.batchnorm_forward_training(x, gamma, beta, mm, mv, 0.99, 1e-3)
        assert y.shape == x.shape
        for got, want in ((y, y_ref), (mean, mean_ref), (inv_std, inv_ref), (mmd, mm_ref), (mvd, mv_ref)):
            self.close(got, want)
        dy = normal(rng, shape)
        dyd = eng.dev(dy)
        dx, dgamma, dbeta = ops.batchnorm_backward(dyd, xd, gd, mean, inv_std, True, ctx)
        dx_ref, dgamma_ref, dbeta_ref = ref.batchnorm_backward(dy, x, gamma, mean_ref, inv_ref, True)
        self.close(dx, dx_ref, 10 * self.atol_scale)
        self.close(dgamma, dgamma_ref)
        self.close(dbeta, dbeta_ref)

        y, inv_std = ops.batchnorm_forward_inference(xd, gd, bd, eng.dev(mm), eng.dev(mv), 1e-3)
        y_ref, inv_ref = ref.batchnorm_forward_inference(x, gamma, beta, mm, mv, 1e-3)
        self.close(y, y_ref)
        self.close(inv_std, inv_ref)
        for got, want in zip(ops.batchnorm_backward(dyd, xd, gd, eng.dev(mm), inv_std, False, ctx),
                             ref.batchnorm_backward(dy, x, gamma, mm, inv_ref, False)):
            self.close(got, want)
        np.testing.assert_array_equal(eng.host(xd), x)  # inputs not written to
        np.testing.assert_array_equal(eng.host(dyd), dy)

    @pytest.mark.parametrize("shape", BN_SHAPES, ids=map(bn_id, BN_SHAPES))
    def test_batchnorm_matches_reference(self, shape):
        self.check(shape)

    @pytest.mark.parametrize("scale, center", [(False, True), (True, False), (False, False)])
    def test_batchnorm_without_scale_or_center(self, scale, center):
        self.check((2, 7, 5, 3), scale, center)
        self.check((7, 8), scale, center)

    def test_batchnorm_out_buffers_and_a_kept_ctx(self):
        eng, ops = self.engine, self.engine.ops
        ctx = {}
        for shape in [(2, 5, 5, 3), (7, 28, 28, 3), (2, 5, 5, 3)]:  # the work arrays in ctx follow the batch size
            x, gamma, beta, mm, mv, rng = bn_case(shape)
            y_ref, mean_ref, inv_ref, _, _ = ref.batchnorm_forward_training(x, gamma, beta, mm, mv, 0.9, 1e-3)
            out, out_mean, out_inv = self.empty(*shape), self.empty(3), self.empty(3)
            got = ops.batchnorm_forward_training(eng.dev(x), eng.dev(gamma), eng.dev(beta), eng.dev(mm), eng.dev(mv),
                                                 0.9, 1e-3, ctx, out=out, out_mean=out_mean, out_inv_std=out_inv)
            assert got[0] is out and got[1] is out_mean and got[2] is out_inv
            self.close(out, y_ref)
            dy = normal(rng, shape)
            bufs = self.empty(*shape), self.empty(3), self.empty(3)
            got = ops.batchnorm_backward(eng.dev(dy), eng.dev(x), eng.dev(gamma), out_mean, out_inv, True, ctx, *bufs)
            for g, b, want, atol in zip(got, bufs, ref.batchnorm_backward(dy, x, gamma, mean_ref, inv_ref, True),
                                        (10 * self.atol_scale, self.atol_scale, self.atol_scale)):
                assert g is b
                self.close(b, want, atol)

    def test_batchnorm_of_a_single_row_gives_beta_and_no_nan(self):
        """Keras's behaviour for a batch of one (N, C) in training: variance 0, y = beta, no gradient to x."""
        eng, ops = self.engine, self.engine.ops
        x, gamma, beta, mm, mv, _ = bn_case((1, 5))
        mmd, mvd = eng.dev(mm), eng.dev(mv)
        y, mean, inv_std = ops.batchnorm_forward_training(eng.dev(x), eng.dev(gamma), eng.dev(beta), mmd, mvd, 0.99,
                                                          1e-3)
        np.testing.assert_array_equal(eng.host(y), beta[None])
        np.testing.assert_array_equal(eng.host(mean), x[0])
        dx, dgamma, _ = ops.batchnorm_backward(eng.dev(np.ones((1, 5), F32)), eng.dev(x), eng.dev(gamma), mean,
                                               inv_std, True)
        np.testing.assert_array_equal(eng.host(dx), 0)
        np.testing.assert_array_equal(eng.host(dgamma), 0)
        assert np.isfinite(eng.host(mmd)).all() and np.isfinite(eng.host(mvd)).all()

    def test_batchnorm_bad_inputs(self):
        eng, ops = self.engine, self.engine.ops
        x, gamma, beta, mm, mv = (eng.dev(a) for a in bn_case((2, 3, 3, 4))[:5])
        with pytest.raises(ValueError, match="gamma must be"):
            ops.batchnorm_forward_training(x, gamma[:3], beta, mm, mv, 0.99, 1e-3)
        with pytest.raises(ValueError, match="moving_var must be"):
            ops.batchnorm_forward_inference(x, gamma, beta, mm, mv[:2], 1e-3)
        with pytest.raises(ValueError, match="at least one row"):
            ops.batchnorm_forward_training(self.empty(0, 4), gamma, beta, mm, mv, 0.99, 1e-3)
        with pytest.raises(ValueError, match="C >= 1"):
            ops.batchnorm_forward_inference(self.empty(4), gamma, beta, mm, mv, 1e-3)
        with pytest.raises(ValueError, match="dy"):
            ops.batchnorm_backward(self.empty(2, 3, 3, 3), x, gamma, mm, mv, True)
        y, _ = ops.batchnorm_forward_inference(self.empty(0, 4), gamma, beta, mm, mv, 1e-3)  # an empty batch
        assert y.shape == (0, 4)

    # ------------------------------------------------------------------------------- folded into a convolution
    @pytest.mark.parametrize("w_shape, bias, scale, center", FOLD_CASES)
    def test_batchnorm_fold_matches_reference(self, w_shape, bias, scale, center):
        eng, ops = self.engine, self.engine.ops
        args = fold_case(w_shape, bias, scale, center)
        dargs = [None if a is None else eng.dev(a) for a in args]
        w2, b2 = ops.batchnorm_fold(*dargs, 1e-3)
        w_ref, b_ref = ref.batchnorm_fold(*args, 1e-3)
        assert w2.shape == w_shape and w2.dtype == F32 and b2.dtype == F32
        self.close(w2, w_ref)
        self.close(b2, b_ref)
        bufs = self.empty(*w_shape), self.empty(w_shape[-1])
        got = ops.batchnorm_fold(*dargs, 1e-3, *bufs)
        assert got[0] is bufs[0] and got[1] is bufs[1]
        np.testing.assert_array_equal(eng.host(bufs[0]), eng.host(w2))
        np.testing.assert_array_equal(eng.host(bufs[1]), eng.host(b2))
        for a, d in zip(args, dargs):  # inputs not written to
            if a is not None:
                np.testing.assert_array_equal(eng.host(d), a)

    def test_batchnorm_fold_bad_shapes(self):
        eng, ops = self.engine, self.engine.ops
        w, b, gamma, beta, mm, mv = (eng.dev(a) for a in fold_case((3, 3, 2, 4), True, True, True))
        with pytest.raises(ValueError, match="b must be"):
            ops.batchnorm_fold(w, b[:3], gamma, beta, mm, mv, 1e-3)
        with pytest.raises(ValueError, match="moving_var must be"):
            ops.batchnorm_fold(w, b, gamma, beta, mm, mv[:2], 1e-3)
        with pytest.raises(ValueError, match="F >= 1"):
            ops.batchnorm_fold(self.empty(3, 0), None, None, None, mm[:0], mv[:0], 1e-3)
