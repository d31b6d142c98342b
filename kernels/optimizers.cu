// optimizers.cu — Keras's SGD, RMSprop and Adam updates, in place (gpucnn.engines.cuda_ops.*_update).
//
//   w is (n,)                    the parameters: one flat float32 buffer (all of a model's, or one array's)
//   g is (n,)                    their gradient
//   m, v, mom, avg are (n,)      optimizer state, updated in place (m_or_null, mom_or_null, avg_or_null:
//                                null when the configuration does not use that state)
//
//   rates is (steps,)            float32 per-step rates: the learning rate (SGD, RMSprop) or Adam's step size
//                                alpha = lr*sqrt(1 - beta_2^t)/(1 - beta_1^t), read as rates[step[0]]
//   step is (1,)                 int32 device counter: a captured CUDA graph reads this step's rate at each
//                                replay (the host fills the table, learning-rate schedules included)
//
// Every kernel is elementwise, grid-stride over n, block THREADS: one launch updates the whole buffer.
// Scalars the NumPy engine computes in float32 from Python floats (1 - rho, 1 - beta_1, Adam's step
// size alpha) are computed the same way by gpucnn/engines/cuda_ops.py and passed in.
//
// Kernels (version 1 of each):
//   sgd_update      momentum == 0: w -= lr*g;  else m = momentum*m - lr*g and w += m, or with nesterov
//                   w += momentum*m - lr*g
//   rmsprop_update  v = rho*v + (1 - rho)*g^2;  centered: avg = rho*avg + (1 - rho)*g and
//                   denom = v + epsilon - avg^2, else denom = v + epsilon (epsilon inside the root);
//                   delta = lr*g / sqrt(denom);  momentum > 0: mom = momentum*mom + delta, delta = mom;
//                   w -= delta
//   adam_update     m += (g - m)*(1 - beta_1);  v += (g^2 - v)*(1 - beta_2);
//                   w -= alpha*m / (sqrt(v) + epsilon), alpha = lr*sqrt(1 - beta_2^t) / (1 - beta_1^t)
//                   (common.cuh's adam_update_element)
//   weight_decay    w *= factors[step[0]], factor = 1 - weight_decay*lr of that step (computed on the host in
//                   float32): Keras's decoupled weight decay, applied before the update (AdamW; any optimizer's
//                   weight_decay=)
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(THREADS)
sgd_update(float* __restrict__ w, const float* __restrict__ g, float* __restrict__ m_or_null, long long n,
           const float* __restrict__ rates, const int* __restrict__ step, float momentum, int nesterov) {
    const float lr = rates[step[0]];
    GRID_STRIDE_LOOP(i, n) {
        const float gi = g[i];
        if (momentum == 0.0f) {
            w[i] -= lr * gi;
        } else {
            const float mi = m_or_null[i] * momentum - lr * gi;
            m_or_null[i] = mi;
            w[i] += nesterov ? momentum * mi - lr * gi : mi;
        }
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
rmsprop_update(float* __restrict__ w, const float* __restrict__ g, float* __restrict__ v,
               float* __restrict__ mom_or_null, float* __restrict__ avg_or_null, long long n,
               const float* __restrict__ rates, const int* __restrict__ step, float rho, float one_minus_rho,
               float epsilon, float momentum, int centered) {
    const float lr = rates[step[0]];
    GRID_STRIDE_LOOP(i, n) {
        const float gi = g[i];
        const float vi = v[i] * rho + one_minus_rho * gi * gi;
        v[i] = vi;
        float denom = vi + epsilon;
        if (centered) {
            const float ai = avg_or_null[i] * rho + one_minus_rho * gi;
            avg_or_null[i] = ai;
            denom -= ai * ai;
        }
        float delta = lr * gi / sqrtf(denom);
        if (momentum > 0.0f) {
            delta += mom_or_null[i] * momentum;
            mom_or_null[i] = delta;
        }
        w[i] -= delta;
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
adam_update(float* __restrict__ w, const float* __restrict__ g, float* __restrict__ m, float* __restrict__ v,
            long long n, const float* __restrict__ rates, const int* __restrict__ step, float one_minus_beta_1,
            float one_minus_beta_2, float epsilon) {
    const float alpha = rates[step[0]];
    GRID_STRIDE_LOOP(i, n) adam_update_element(w, g, m, v, i, alpha, one_minus_beta_1, one_minus_beta_2, epsilon);
}

extern "C" __global__ void __launch_bounds__(THREADS)
weight_decay(float* __restrict__ w, long long n, const float* __restrict__ factors, const int* __restrict__ step) {
    const float factor = factors[step[0]];
    GRID_STRIDE_LOOP(i, n) w[i] *= factor;
}
