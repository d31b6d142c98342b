// batchnorm.cu — batch normalization over the last axis of channels-last tensors, Keras 3's
// BatchNormalization(axis=-1) (gpucnn.engines.cuda_ops.batchnorm_*).
//
//   x  is (M, C)             the input (N, ..., C) seen as M = N·H·W rows of C channels; y, dy, dx the same
//   mean, inv_std are (C,)   the statistics the output was normalized with: the batch's (training) or the
//                            moving ones (inference: mean = moving_mean, inv_std = 1 / sqrt(moving_var + eps))
//   gamma, beta are (C,)     (gamma_or_null, beta_or_null: null for scale=False / center=False: 1 and 0)
//   moving_mean, moving_var are (C,)   updated in place in training
//   dgamma, dbeta are (C,)
//   work is (S, C) or (S, 2C)  per-slice partial sums over S slices of the M rows (slice s: rows
//                              s·slice_rows .. min((s + 1)·slice_rows, M) - 1)
//
//   y = (x − mean)·(inv_std·gamma) + beta;   var = Σ (x − mean)² / M (biased), two passes over x;
//   backward, x̂ = (x − mean)·inv_std:  dbeta = Σ dy,  dgamma = Σ dy·x̂,
//   dx = gamma·inv_std·(dy − dbeta/M − x̂·dgamma/M) in training, gamma·inv_std·dy in inference.
//
// Every reduction is deterministic, in a fixed order that depends on the shapes only (no atomics): a first
// pass writes one partial sum per (slice, channel) and a second pass adds the slices in order.
//
// Kernels (version 1 of each):
//   batchnorm_partial_sums            first pass of the statistics: block (channel tile, slice), block
//                                     (BN_TILE_C, BN_ROW_LANES); thread (c, lane) sums rows lane, lane +
//                                     BN_ROW_LANES, ... of its slice (of x, or of (x − center)² when
//                                     center_or_null is given), then lane 0 adds the lanes in order
//   batchnorm_mean                    mean = Σ over slices / M
//   batchnorm_variance_update         var = Σ over slices / M, inv_std, and the moving statistics' update
//   batchnorm_inverse_std             inv_std = 1 / sqrt(var + epsilon) of the moving variance (inference)
//   batchnorm_normalize               y, elementwise (grid-stride)
//   batchnorm_backward_partial_sums   first pass of dbeta and dgamma, as batchnorm_partial_sums
//   batchnorm_backward_reduce         dbeta, dgamma = Σ over slices
//   batchnorm_backward_data           dx, elementwise (grid-stride)
//   batchnorm_fold                    a convolution's kernel and bias with an inference-mode normalization of its
//                                     output channels folded in: w' = w·s, b' = (b − moving_mean)·s + beta,
//                                     s = gamma / sqrt(moving_var + epsilon) (grid-stride)
#include "common.cuh"

#ifndef BN_TILE_C
#define BN_TILE_C 32     // channels per block = blockDim.x (a warp reads 32 consecutive channels of a row)
#endif
#ifndef BN_ROW_LANES
#define BN_ROW_LANES 8   // rows in flight per block = blockDim.y
#endif
#define BN_THREADS (BN_TILE_C * BN_ROW_LANES)

// The sum over the block's row lanes of each thread's value v, in lane order; valid in lane 0 (threadIdx.y
// == 0). Every thread of the block must call it.
__device__ __forceinline__ float sum_row_lanes(float v, float (*lanes)[BN_TILE_C]) {
    lanes[threadIdx.y][threadIdx.x] = v;
    __syncthreads();
    float total = 0.0f;
    if (threadIdx.y == 0)
        for (int k = 0; k < BN_ROW_LANES; ++k) total += lanes[k][threadIdx.x];
    __syncthreads();  // lanes may be reused right after
    return total;
}

// grid (ceil(C / BN_TILE_C), S); block (BN_TILE_C, BN_ROW_LANES). work[s, c] = the slice's Σ x[r, c], or
// Σ (x[r, c] − center[c])² when center_or_null is given.
extern "C" __global__ void __launch_bounds__(BN_THREADS)
batchnorm_partial_sums(const float* __restrict__ x, const float* __restrict__ center_or_null,
                       float* __restrict__ work, int M, int C, int slice_rows) {
    __shared__ float lanes[BN_ROW_LANES][BN_TILE_C];
    const int c = blockIdx.x * BN_TILE_C + threadIdx.x;
    const int r_begin = blockIdx.y * slice_rows;
    const int r_end = r_begin + min(M - r_begin, slice_rows);  // (no int overflow near M = 2^31)
    float acc = 0.0f;
    if (c < C) {
        const float center = center_or_null ? center_or_null[c] : 0.0f;
        for (int r = r_begin + threadIdx.y; r < r_end; r += BN_ROW_LANES) {
            const float v = x[(long long)r * C + c];
            if (center_or_null) {
                const float d = v - center;
                acc += d * d;
            } else {
                acc += v;
            }
        }
    }
    const float total = sum_row_lanes(acc, lanes);
    if (threadIdx.y == 0 && c < C) work[(long long)blockIdx.y * C + c] = total;
}

// grid-stride over the C channels; block THREADS. m is M as a float.
extern "C" __global__ void __launch_bounds__(THREADS)
batchnorm_mean(const float* __restrict__ work, float* __restrict__ mean, int S, int C, float m) {
    GRID_STRIDE_LOOP(c, C) {
        float s = 0.0f;
        for (int k = 0; k < S; ++k) s += work[(long long)k * C + c];
        mean[c] = s / m;
    }
}

// grid-stride over the C channels; block THREADS. The slices hold Σ (x − mean)²: var = their sum / m;
// inv_std = 1 / sqrt(var + epsilon); moving = moving·momentum + statistic·(1 − momentum), Keras's rule
// (one_minus_momentum is computed on the host in double, as Keras's Python float).
extern "C" __global__ void __launch_bounds__(THREADS)
batchnorm_variance_update(const float* __restrict__ work, const float* __restrict__ mean,
                          float* __restrict__ inv_std, float* __restrict__ moving_mean,
                          float* __restrict__ moving_var, int S, int C, float m, float momentum,
                          float one_minus_momentum, float epsilon) {
    GRID_STRIDE_LOOP(c, C) {
        float s = 0.0f;
        for (int k = 0; k < S; ++k) s += work[(long long)k * C + c];
        const float var = s / m;
        inv_std[c] = 1.0f / sqrtf(var + epsilon);
        moving_mean[c] = moving_mean[c] * momentum + mean[c] * one_minus_momentum;
        moving_var[c] = moving_var[c] * momentum + var * one_minus_momentum;
    }
}

// grid-stride over the C channels; block THREADS
extern "C" __global__ void __launch_bounds__(THREADS)
batchnorm_inverse_std(const float* __restrict__ var, float* __restrict__ inv_std, int C, float epsilon) {
    GRID_STRIDE_LOOP(c, C) inv_std[c] = 1.0f / sqrtf(var[c] + epsilon);
}

// grid-stride over the M·C elements; block THREADS
extern "C" __global__ void __launch_bounds__(THREADS)
batchnorm_normalize(const float* __restrict__ x, const float* __restrict__ mean, const float* __restrict__ inv_std,
                    const float* __restrict__ gamma_or_null, const float* __restrict__ beta_or_null,
                    float* __restrict__ y, long long total, int C) {
    GRID_STRIDE_LOOP(e, total) {
        const int c = (int)(e % C);
        const float scale = gamma_or_null ? inv_std[c] * gamma_or_null[c] : inv_std[c];
        const float shift = beta_or_null ? beta_or_null[c] : 0.0f;
        y[e] = (x[e] - mean[c]) * scale + shift;
    }
}

// grid (ceil(C / BN_TILE_C), S); block (BN_TILE_C, BN_ROW_LANES). work[s, c] = the slice's Σ dy[r, c],
// work[s, C + c] = its Σ dy[r, c]·x̂[r, c].
extern "C" __global__ void __launch_bounds__(BN_THREADS)
batchnorm_backward_partial_sums(const float* __restrict__ dy, const float* __restrict__ x,
                                const float* __restrict__ mean, const float* __restrict__ inv_std,
                                float* __restrict__ work, int M, int C, int slice_rows) {
    __shared__ float lanes[BN_ROW_LANES][BN_TILE_C];
    const int c = blockIdx.x * BN_TILE_C + threadIdx.x;
    const int r_begin = blockIdx.y * slice_rows;
    const int r_end = r_begin + min(M - r_begin, slice_rows);
    float acc_dy = 0.0f, acc_dy_xhat = 0.0f;
    if (c < C) {
        const float mu = mean[c], is = inv_std[c];
        for (int r = r_begin + threadIdx.y; r < r_end; r += BN_ROW_LANES) {
            const long long e = (long long)r * C + c;
            acc_dy += dy[e];
            acc_dy_xhat += dy[e] * ((x[e] - mu) * is);
        }
    }
    const float sum_dy = sum_row_lanes(acc_dy, lanes);
    const float sum_dy_xhat = sum_row_lanes(acc_dy_xhat, lanes);
    if (threadIdx.y == 0 && c < C) {
        float* slice = work + (long long)blockIdx.y * 2 * C;
        slice[c] = sum_dy;
        slice[C + c] = sum_dy_xhat;
    }
}

// grid-stride over the C channels; block THREADS. dbeta, dgamma = the sums of the S slices, in order.
extern "C" __global__ void __launch_bounds__(THREADS)
batchnorm_backward_reduce(const float* __restrict__ work, float* __restrict__ dgamma, float* __restrict__ dbeta,
                          int S, int C) {
    GRID_STRIDE_LOOP(c, C) {
        float sum_dy = 0.0f, sum_dy_xhat = 0.0f;
        for (int k = 0; k < S; ++k) {
            sum_dy += work[(long long)k * 2 * C + c];
            sum_dy_xhat += work[(long long)k * 2 * C + C + c];
        }
        dbeta[c] = sum_dy;
        dgamma[c] = sum_dy_xhat;
    }
}

// grid-stride over the M·C elements; block THREADS. training: 1 when mean and inv_std were the batch's.
extern "C" __global__ void __launch_bounds__(THREADS)
batchnorm_backward_data(const float* __restrict__ dy, const float* __restrict__ x, const float* __restrict__ mean,
                        const float* __restrict__ inv_std, const float* __restrict__ gamma_or_null,
                        const float* __restrict__ dgamma, const float* __restrict__ dbeta, float* __restrict__ dx,
                        long long total, int C, float m, int training) {
    GRID_STRIDE_LOOP(e, total) {
        const int c = (int)(e % C);
        const float scale = gamma_or_null ? inv_std[c] * gamma_or_null[c] : inv_std[c];
        float g = dy[e];
        if (training) {
            const float xhat = (x[e] - mean[c]) * inv_std[c];
            g = (g - dbeta[c] / m) - xhat * (dgamma[c] / m);
        }
        dx[e] = g * scale;
    }
}

// grid-stride over the W + F elements of w' (W = KH·KW·C·F, channel-last) and b'; block THREADS. The scale is
// batchnorm_inverse_std's inv_std times gamma, as batchnorm_normalize applies it.
extern "C" __global__ void __launch_bounds__(THREADS)
batchnorm_fold(const float* __restrict__ w, const float* __restrict__ b_or_null,
               const float* __restrict__ gamma_or_null, const float* __restrict__ beta_or_null,
               const float* __restrict__ moving_mean, const float* __restrict__ moving_var,
               float* __restrict__ folded_w, float* __restrict__ folded_b, long long W, int F, float epsilon) {
    GRID_STRIDE_LOOP(e, W + F) {
        const int c = (int)(e < W ? e % F : e - W);
        const float inv_std = 1.0f / sqrtf(moving_var[c] + epsilon);
        const float scale = gamma_or_null ? inv_std * gamma_or_null[c] : inv_std;
        if (e < W) {
            folded_w[e] = w[e] * scale;
        } else {
            const float shift = beta_or_null ? beta_or_null[c] : 0.0f;
            folded_b[c] = ((b_or_null ? b_or_null[c] : 0.0f) - moving_mean[c]) * scale + shift;
        }
    }
}
