// loss.cu — categorical and binary cross-entropy as Keras computes them, their gradients, and the accuracy
// counts (gpucnn.engines.cuda_ops.crossentropy_*, softmax_crossentropy_backward, count_correct,
// binary_crossentropy_*, sigmoid_binary_crossentropy_backward, count_binary_correct).
//
//   p      is (N, K)   predicted probabilities (the model's output), or logits z where from_logits is set
//   onehot is (N, K)   float32 target rows            (the *_onehot kernels)
//   labels is (N,)     int32 class indices in [0, K)  (the *_sparse kernels); a label outside [0, K) gives
//                      a NaN loss and NaN gradients for its row (nothing is raised: the host never waits)
//   loss   is (N,)     per-sample loss; dp is (N, K); count is a single int64
//
// Keras's cross-entropy: each row renormalised, q = p / sum(p), clipped to [EPSILON, 1 - EPSILON]; the
// loss is -sum_k y_k log(q_k). From logits z: -sum_k y_k log_softmax(z)_k, log_softmax(z)_k = z_k - max -
// log(sum_j exp(z_j - max)). Each kernel has a one-hot and a sparse form (one template, two entries).
//
// Binary cross-entropy (Keras's binary_crossentropy), U independent units a row:
//   binary p, labels are (N, U)   labels float32 (0/1, or soft); smoothed on the fly, y = labels * one_minus_s
//                                 + half_s (the host passes 1 - s and s / 2 in float32); total = N * U
//   per-sample loss = mean over the U units of -(y log q + (1 - y) log(1 - q)), q = p clipped; from logits:
//   max(z, 0) - z y + log1p(exp(-|z|)). The mean loss over the batch is the mean of all N * U terms.
//
// Kernels (version 1 of each):
//   crossentropy_forward_{onehot,sparse}           one thread per row, grid-stride; block THREADS
//   softmax_crossentropy_backward_{onehot,sparse}  dp = (p - y) / N, one thread per row
//   crossentropy_backward_{onehot,sparse}          one thread per row: the gradient through the clip (zero
//                                                  where it is active) and the renormalisation, / N; from
//                                                  logits (softmax(z) sum(y) - y) / N
//   count_correct_{onehot,sparse}                  rows whose first maximum (a NaN wins, as numpy.argmax)
//                                                  is the true class (one-hot: the row's first maximum);
//                                                  one block of THREADS threads, a fixed-order sum: grid 1
//   binary_crossentropy_forward                    one thread per row: the U terms summed in order, / U
//   binary_crossentropy_backward                   elementwise, w.r.t. probabilities: (-y / p + (1 - y) /
//                                                  (1 - p)) / total inside the clip, 0 where it is active
//   sigmoid_binary_crossentropy_backward           elementwise, w.r.t. the logits: (sigmoid(z) - y) / total,
//                                                  or (p - y) / total from a sigmoid's output p
//   count_binary_correct                           elements with (p > threshold ? 1 : 0) == label; one
//                                                  block, a fixed-order sum: grid 1
#include "common.cuh"

#ifndef EPSILON
#define EPSILON 1e-7f  // Keras's backend epsilon (ops_numpy.EPSILON; the CI test checks they agree)
#endif

// y_k of row r: 1 or 0 from a sparse label, else the one-hot row's value.
template <bool SPARSE>
__device__ __forceinline__ float target(const float* onehot, int label, long long r, int k, int K) {
    return SPARSE ? (k == label ? 1.0f : 0.0f) : onehot[r * K + k];
}

// Whether row r has a sparse label outside [0, K) (its results are NaN).
template <bool SPARSE>
__device__ __forceinline__ bool bad_label(int label, int K) {
    return SPARSE && (label < 0 || label >= K);
}

// (max, log of sum_j exp(z_j - max)) of a row of logits: log_softmax(z)_k = z_k - max - log_total.
__device__ __forceinline__ void log_softmax_parts(const float* zr, int K, float& top, float& log_total) {
    top = zr[0];
    for (int k = 1; k < K; ++k)
        if (max_replaces(zr[k], top)) top = zr[k];
    float sum = 0.0f;
    for (int k = 0; k < K; ++k) sum += expf(zr[k] - top);
    log_total = logf(sum);
}

template <bool SPARSE>
__device__ __forceinline__ void crossentropy_forward_rows(const float* __restrict__ p,
                                                          const float* __restrict__ onehot,
                                                          const int* __restrict__ labels,
                                                          float* __restrict__ loss, int N, int K,
                                                          int from_logits) {
    GRID_STRIDE_LOOP(r, N) {
        const float* pr = p + r * K;
        const int label = SPARSE ? labels[r] : 0;
        float sum = 0.0f;
        if (from_logits) {
            float top, log_total;
            log_softmax_parts(pr, K, top, log_total);
            for (int k = 0; k < K; ++k) sum += target<SPARSE>(onehot, label, r, k, K) * ((pr[k] - top) - log_total);
        } else {
            float total = 0.0f;
            for (int k = 0; k < K; ++k) total += pr[k];
            for (int k = 0; k < K; ++k) {
                sum += target<SPARSE>(onehot, label, r, k, K) * logf(clip_probability(pr[k] / total, EPSILON));
            }
        }
        loss[r] = bad_label<SPARSE>(label, K) ? quiet_nan() : -sum;
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
crossentropy_forward_onehot(const float* __restrict__ p, const float* __restrict__ onehot,
                            float* __restrict__ loss, int N, int K, int from_logits) {
    crossentropy_forward_rows<false>(p, onehot, nullptr, loss, N, K, from_logits);
}

extern "C" __global__ void __launch_bounds__(THREADS)
crossentropy_forward_sparse(const float* __restrict__ p, const int* __restrict__ labels,
                            float* __restrict__ loss, int N, int K, int from_logits) {
    crossentropy_forward_rows<true>(p, nullptr, labels, loss, N, K, from_logits);
}

template <bool SPARSE>
__device__ __forceinline__ void softmax_crossentropy_backward_rows(const float* __restrict__ p,
                                                                   const float* __restrict__ onehot,
                                                                   const int* __restrict__ labels,
                                                                   float* __restrict__ dp, int N, int K) {
    GRID_STRIDE_LOOP(r, N) {
        const int label = SPARSE ? labels[r] : 0;
        const bool bad = bad_label<SPARSE>(label, K);
        for (int k = 0; k < K; ++k) {
            const float g = (p[r * K + k] - target<SPARSE>(onehot, label, r, k, K)) / (float)N;
            dp[r * K + k] = bad ? quiet_nan() : g;
        }
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
softmax_crossentropy_backward_onehot(const float* __restrict__ p, const float* __restrict__ onehot,
                                     float* __restrict__ dp, int N, int K) {
    softmax_crossentropy_backward_rows<false>(p, onehot, nullptr, dp, N, K);
}

extern "C" __global__ void __launch_bounds__(THREADS)
softmax_crossentropy_backward_sparse(const float* __restrict__ p, const int* __restrict__ labels,
                                     float* __restrict__ dp, int N, int K) {
    softmax_crossentropy_backward_rows<true>(p, nullptr, labels, dp, N, K);
}

// From logits: dz_j = (softmax(z)_j sum_k y_k - y_j) / N.
template <bool SPARSE>
__device__ __forceinline__ void crossentropy_logits_backward_row(const float* __restrict__ zr,
                                                                 const float* __restrict__ onehot, int label,
                                                                 float* __restrict__ dzr, long long r, int N, int K) {
    float top, log_total;
    log_softmax_parts(zr, K, top, log_total);
    float targets = 0.0f;
    for (int k = 0; k < K; ++k) targets += target<SPARSE>(onehot, label, r, k, K);
    const bool bad = bad_label<SPARSE>(label, K);
    for (int k = 0; k < K; ++k) {
        const float s = expf((zr[k] - top) - log_total);
        const float g = (s * targets - target<SPARSE>(onehot, label, r, k, K)) / (float)N;
        dzr[k] = bad ? quiet_nan() : g;
    }
}

// dq_k = inside_k ? -y_k / q_k : 0 with inside_k = EPSILON <= q_k <= 1 - EPSILON;
// dp_j = (dq_j - sum_k dq_k q_k) / sum(p) / N
template <bool SPARSE>
__device__ __forceinline__ void crossentropy_probabilities_backward_row(const float* __restrict__ pr,
                                                                        const float* __restrict__ onehot, int label,
                                                                        float* __restrict__ dpr, long long r, int N,
                                                                        int K) {
    float total = 0.0f;
    for (int k = 0; k < K; ++k) total += pr[k];
    float dot = 0.0f;  // sum_k dq_k q_k
    for (int k = 0; k < K; ++k) {
        const float q = pr[k] / total;
        const bool inside = q >= EPSILON && q <= 1.0f - EPSILON;
        const float dq = inside ? -target<SPARSE>(onehot, label, r, k, K) / q : 0.0f;
        dot += dq * q;
    }
    const bool bad = bad_label<SPARSE>(label, K);
    for (int k = 0; k < K; ++k) {
        const float q = pr[k] / total;
        const bool inside = q >= EPSILON && q <= 1.0f - EPSILON;
        const float dq = inside ? -target<SPARSE>(onehot, label, r, k, K) / q : 0.0f;
        dpr[k] = bad ? quiet_nan() : (dq - dot) / total / (float)N;
    }
}

template <bool SPARSE>
__device__ __forceinline__ void crossentropy_backward_rows(const float* __restrict__ p,
                                                           const float* __restrict__ onehot,
                                                           const int* __restrict__ labels,
                                                           float* __restrict__ dp, int N, int K,
                                                           int from_logits) {
    if (from_logits) {
        GRID_STRIDE_LOOP(r, N) {
            crossentropy_logits_backward_row<SPARSE>(p + r * K, onehot, SPARSE ? labels[r] : 0, dp + r * K, r, N, K);
        }
    } else {
        GRID_STRIDE_LOOP(r, N) {
            crossentropy_probabilities_backward_row<SPARSE>(p + r * K, onehot, SPARSE ? labels[r] : 0, dp + r * K, r,
                                                            N, K);
        }
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
crossentropy_backward_onehot(const float* __restrict__ p, const float* __restrict__ onehot,
                             float* __restrict__ dp, int N, int K, int from_logits) {
    crossentropy_backward_rows<false>(p, onehot, nullptr, dp, N, K, from_logits);
}

extern "C" __global__ void __launch_bounds__(THREADS)
crossentropy_backward_sparse(const float* __restrict__ p, const int* __restrict__ labels,
                             float* __restrict__ dp, int N, int K, int from_logits) {
    crossentropy_backward_rows<true>(p, nullptr, labels, dp, N, K, from_logits);
}

template <bool SPARSE>
__device__ __forceinline__ void count_correct_rows(const float* __restrict__ p, const float* __restrict__ onehot,
                                                   const int* __restrict__ labels,
                                                   long long* __restrict__ count, int N, int K) {
    __shared__ long long scratch[THREADS];
    long long mine = 0;
    for (int r = threadIdx.x; r < N; r += blockDim.x) {
        const int truth = SPARSE ? labels[r] : first_argmax(onehot + (long long)r * K, K);
        mine += first_argmax(p + (long long)r * K, K) == truth;
    }
    const long long total = block_sum(mine, scratch);
    if (threadIdx.x == 0) count[0] = total;
}

extern "C" __global__ void __launch_bounds__(THREADS)
count_correct_onehot(const float* __restrict__ p, const float* __restrict__ onehot,
                     long long* __restrict__ count, int N, int K) {
    count_correct_rows<false>(p, onehot, nullptr, count, N, K);
}

extern "C" __global__ void __launch_bounds__(THREADS)
count_correct_sparse(const float* __restrict__ p, const int* __restrict__ labels,
                     long long* __restrict__ count, int N, int K) {
    count_correct_rows<true>(p, nullptr, labels, count, N, K);
}

// ------------------------------------------------------------------------------------ binary cross-entropy
extern "C" __global__ void __launch_bounds__(THREADS)
binary_crossentropy_forward(const float* __restrict__ p, const float* __restrict__ labels,
                            float* __restrict__ loss, int N, int U, int from_logits, float one_minus_s,
                            float half_s) {
    GRID_STRIDE_LOOP(r, N) {
        const float* pr = p + r * U;
        const float* lr = labels + r * U;
        float sum = 0.0f;
        for (int u = 0; u < U; ++u) {
            const float y = lr[u] * one_minus_s + half_s;
            if (from_logits) {
                const float z = pr[u];
                sum += (z > 0.0f ? z : 0.0f) - z * y + log1pf(expf(-fabsf(z)));
            } else {
                const float q = clip_probability(pr[u], EPSILON);
                sum += -(y * logf(q) + (1.0f - y) * logf(1.0f - q));
            }
        }
        loss[r] = sum / (float)U;
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
binary_crossentropy_backward(const float* __restrict__ p, const float* __restrict__ labels, float* __restrict__ dp,
                             long long n, float one_minus_s, float half_s, float total) {
    GRID_STRIDE_LOOP(i, n) {
        const float v = p[i];
        const float y = labels[i] * one_minus_s + half_s;
        const bool inside = v >= EPSILON && v <= 1.0f - EPSILON;
        dp[i] = inside ? (-y / v + (1.0f - y) / (1.0f - v)) / total : 0.0f;
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
sigmoid_binary_crossentropy_backward(const float* __restrict__ x, const float* __restrict__ labels,
                                     float* __restrict__ dz, long long n, int from_logits, float one_minus_s,
                                     float half_s, float total) {
    GRID_STRIDE_LOOP(i, n) {
        const float p = from_logits ? sigmoid(x[i]) : x[i];
        dz[i] = (p - (labels[i] * one_minus_s + half_s)) / total;
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
count_binary_correct(const float* __restrict__ p, const float* __restrict__ labels, long long* __restrict__ count,
                     long long n, float threshold) {
    __shared__ long long scratch[THREADS];
    long long mine = 0;
    for (long long i = threadIdx.x; i < n; i += blockDim.x) mine += labels[i] == (p[i] > threshold ? 1.0f : 0.0f);
    const long long total = block_sum(mine, scratch);
    if (threadIdx.x == 0) count[0] = total;
}
