// dense.cu — the fully connected layer: forward and both gradients (gpucnn.ops_cuda.dense_*).
//
//   x  is (N, IN)        the layer's input; dx has the same layout
//   w  is (IN, UNITS)    the kernel, Keras layout; dw has the same layout
//   b  is (UNITS,)       the bias (b_or_null: may be null); db has the same layout
//   y  is (N, UNITS)     the output; dy has the same layout
//
// The three products are one tiled SGEMM, C (M, NC) = A (M, K) @ B (K, NC), with A and B read directly or
// transposed (a compile-time choice): forward y = x @ w, backward-data dx = dy @ w^T, backward-weights
// dw = x^T @ dy. A block computes a GEMM_TILE x GEMM_TILE tile of C with (GEMM_TILE / 2)^2 threads, two rows
// by two columns each, stepping through K GEMM_TILE at a time with both operand tiles in shared memory.
// Each output is one thread's sum over K in increasing order: deterministic, no split-K, no atomics.
//
// Kernels (version 1 of each):
//   dense_forward           y = act(x @ w + b), bias and relu fused (softmax runs after, in activations.cu)
//   dense_backward_data     dx = dy @ w^T
//   dense_backward_weights  dw = x^T @ dy
//   dense_backward_bias     db[u] = sum over the batch of dy[:, u], in batch order; grid-stride over units
// GEMM grid: (ceil(M / GEMM_TILE), ceil(NC / GEMM_TILE) capped at 65,535, the grid-y limit: the column tiles
// are grid-stride, as dense_backward_data's NC is the layer's input size, which may exceed 65,535 tiles);
// block (GEMM_TILE / 2, GEMM_TILE / 2).
#include "common.cuh"

#ifndef GEMM_TILE
#define GEMM_TILE 32  // C tile edge and K step; a block has (GEMM_TILE / 2)^2 threads
#endif

#define GEMM_THREADS_1D (GEMM_TILE / 2)
#define GEMM_THREADS (GEMM_THREADS_1D * GEMM_THREADS_1D)

// A(m, k) = A_T ? a[k*M + m] : a[m*K + k];  B(k, n) = B_T ? b[n*K + k] : b[k*NC + n]
template <bool A_T, bool B_T>
__device__ __forceinline__ void gemm_tile(const float* __restrict__ a, const float* __restrict__ b,
                                          float* __restrict__ c, int M, int NC, int K,
                                          const float* __restrict__ bias_or_null, int act) {
    __shared__ float as[GEMM_TILE][GEMM_TILE + 1];  // as[k][m]; +1: a column of the tile spans all banks
    __shared__ float bs[GEMM_TILE][GEMM_TILE + 1];  // bs[k][n]

    const int m0 = blockIdx.x * GEMM_TILE;
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int tid = ty * GEMM_THREADS_1D + tx;
    // (the same trip count for the whole block: its __syncthreads() are reached by every thread)
    for (int n0 = blockIdx.y * GEMM_TILE; n0 < NC; n0 += gridDim.y * GEMM_TILE) {
        float acc[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};

        for (int k0 = 0; k0 < K; k0 += GEMM_TILE) {
            __syncthreads();  // the previous step's tiles are no longer read
            // Load both tiles; consecutive threads take consecutive addresses of global memory (coalesced).
            for (int e = tid; e < GEMM_TILE * GEMM_TILE; e += GEMM_THREADS) {
                const int along = e % GEMM_TILE, across = e / GEMM_TILE;
                // A tile: row-major A is contiguous along k, transposed A along m
                const int am = A_T ? along : across, ak = A_T ? across : along;
                const int gm = m0 + am, gk = k0 + ak;
                as[ak][am] = (gm < M && gk < K) ? (A_T ? a[(long long)gk * M + gm] : a[(long long)gm * K + gk]) : 0.0f;
                // B tile: row-major B is contiguous along n, transposed B along k
                const int bn = B_T ? across : along, bk = B_T ? along : across;
                const int gn = n0 + bn, gk2 = k0 + bk;
                bs[bk][bn] = (gn < NC && gk2 < K)
                                 ? (B_T ? b[(long long)gn * K + gk2] : b[(long long)gk2 * NC + gn]) : 0.0f;
            }
            __syncthreads();
    #pragma unroll 8
            for (int k = 0; k < GEMM_TILE; ++k) {
                const float a0 = as[k][ty], a1 = as[k][ty + GEMM_THREADS_1D];
                const float b0 = bs[k][tx], b1 = bs[k][tx + GEMM_THREADS_1D];
                acc[0][0] += a0 * b0;
                acc[0][1] += a0 * b1;
                acc[1][0] += a1 * b0;
                acc[1][1] += a1 * b1;
            }
        }

    #pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int m = m0 + ty + i * GEMM_THREADS_1D;
    #pragma unroll
            for (int j = 0; j < 2; ++j) {
                const int n = n0 + tx + j * GEMM_THREADS_1D;
                if (m < M && n < NC) {
                    const float v = acc[i][j] + (bias_or_null ? bias_or_null[n] : 0.0f);
                    c[(long long)m * NC + n] = apply_activation(v, act);
                }
            }
        }
    }  // column tiles
}

extern "C" __global__ void __launch_bounds__(GEMM_THREADS)
dense_forward(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b_or_null,
              float* __restrict__ y, int N, int IN, int UNITS, int act) {
    gemm_tile<false, false>(x, w, y, N, UNITS, IN, b_or_null, act);
}

extern "C" __global__ void __launch_bounds__(GEMM_THREADS)
dense_backward_data(const float* __restrict__ dy, const float* __restrict__ w, float* __restrict__ dx,
                    int N, int IN, int UNITS) {
    gemm_tile<false, true>(dy, w, dx, N, IN, UNITS, nullptr, ACT_NONE);
}

extern "C" __global__ void __launch_bounds__(GEMM_THREADS)
dense_backward_weights(const float* __restrict__ dy, const float* __restrict__ x, float* __restrict__ dw,
                       int N, int IN, int UNITS) {
    gemm_tile<true, false>(x, dy, dw, IN, UNITS, N, nullptr, ACT_NONE);
}

// grid-stride over the units; block THREADS
extern "C" __global__ void __launch_bounds__(THREADS)
dense_backward_bias(const float* __restrict__ dy, float* __restrict__ db, int N, int UNITS) {
    GRID_STRIDE_LOOP(u, UNITS) {
        float acc = 0.0f;
        for (int n = 0; n < N; ++n) acc += dy[(long long)n * UNITS + u];
        db[u] = acc;
    }
}
