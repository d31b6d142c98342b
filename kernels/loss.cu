// loss.cu — categorical cross-entropy as Keras computes it, its gradients, and the accuracy count
// (gpucnn.ops_cuda.crossentropy_*, softmax_crossentropy_backward, count_correct).
//
//   p      is (N, K)   predicted probabilities (the model's output)
//   onehot is (N, K)   float32 target rows            (the *_onehot kernels)
//   labels is (N,)     int32 class indices in [0, K)  (the *_sparse kernels); a label outside [0, K) gives
//                      a NaN loss and NaN gradients for its row (nothing is raised: the host never waits)
//   loss   is (N,)     per-sample loss; dp is (N, K); count is a single int64
//
// Keras's cross-entropy: each row renormalised, q = p / sum(p), clipped to [EPSILON, 1 - EPSILON]; the
// loss is -sum_k y_k log(q_k). Each kernel has a one-hot and a sparse form (one template, two entries).
//
// Kernels (version 1 of each):
//   crossentropy_forward_{onehot,sparse}           one thread per row, grid-stride; block THREADS
//   softmax_crossentropy_backward_{onehot,sparse}  dp = (p - y) / N, one thread per row
//   crossentropy_backward_{onehot,sparse}          one thread per row: the gradient through the clip (zero
//                                                  where it is active) and the renormalisation, / N
//   count_correct_{onehot,sparse}                  rows whose first maximum (a NaN wins, as numpy.argmax)
//                                                  is the true class (one-hot: the row's first maximum);
//                                                  one block of THREADS threads, a fixed-order sum: grid 1
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

template <bool SPARSE>
__device__ __forceinline__ void crossentropy_forward_rows(const float* __restrict__ p,
                                                          const float* __restrict__ onehot,
                                                          const int* __restrict__ labels,
                                                          float* __restrict__ loss, int N, int K) {
    GRID_STRIDE_LOOP(r, N) {
        const float* pr = p + r * K;
        const int label = SPARSE ? labels[r] : 0;
        float total = 0.0f;
        for (int k = 0; k < K; ++k) total += pr[k];
        float sum = 0.0f;
        for (int k = 0; k < K; ++k) {
            sum += target<SPARSE>(onehot, label, r, k, K) * logf(clip_probability(pr[k] / total, EPSILON));
        }
        loss[r] = bad_label<SPARSE>(label, K) ? quiet_nan() : -sum;
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
crossentropy_forward_onehot(const float* __restrict__ p, const float* __restrict__ onehot,
                            float* __restrict__ loss, int N, int K) {
    crossentropy_forward_rows<false>(p, onehot, nullptr, loss, N, K);
}

extern "C" __global__ void __launch_bounds__(THREADS)
crossentropy_forward_sparse(const float* __restrict__ p, const int* __restrict__ labels,
                            float* __restrict__ loss, int N, int K) {
    crossentropy_forward_rows<true>(p, nullptr, labels, loss, N, K);
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

// dq_k = inside_k ? -y_k / q_k : 0 with inside_k = EPSILON <= q_k <= 1 - EPSILON;
// dp_j = (dq_j - sum_k dq_k q_k) / sum(p) / N
template <bool SPARSE>
__device__ __forceinline__ void crossentropy_backward_rows(const float* __restrict__ p,
                                                           const float* __restrict__ onehot,
                                                           const int* __restrict__ labels,
                                                           float* __restrict__ dp, int N, int K) {
    GRID_STRIDE_LOOP(r, N) {
        const float* pr = p + r * K;
        float* dpr = dp + r * K;
        const int label = SPARSE ? labels[r] : 0;
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
}

extern "C" __global__ void __launch_bounds__(THREADS)
crossentropy_backward_onehot(const float* __restrict__ p, const float* __restrict__ onehot,
                             float* __restrict__ dp, int N, int K) {
    crossentropy_backward_rows<false>(p, onehot, nullptr, dp, N, K);
}

extern "C" __global__ void __launch_bounds__(THREADS)
crossentropy_backward_sparse(const float* __restrict__ p, const int* __restrict__ labels,
                             float* __restrict__ dp, int N, int K) {
    crossentropy_backward_rows<true>(p, nullptr, labels, dp, N, K);
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
