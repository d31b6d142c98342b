// 03_conv2d_relu_maxpool_k3.cu — version 3 (a candidate, NOT yet timed: no GPU in the session that wrote it):
// version 2 specialised at compile time for the seed model's layers: a 3x3 kernel at stride 1, no padding,
// CONV_C input channels (-DCONV_C=1 for conv1, -DCONV_C=32 for conv2), so the tap and channel loops unroll
// and the patch indices become constants. The whole input patch of the tile (10x10xCONV_C floats: 400 B for
// conv1, 12.8 KB for conv2) is staged at once. Same summation order as versions 1 and 2 (taps i, j, then
// channel c, one chunk), so the results should be bitwise equal to them.
// Compile: nvcc -arch=sm_90 -cubin -I kernels -DCONV_C=32 <this file>; launch as version 2 without the
// KH, KW, sh, sw, pad and cc arguments.
//
//   x is (N, H, W, CONV_C), w is (3, 3, CONV_C, F), y is (N, PP, PQ, F), idx (int8) is (N, PP, PQ, F)
#include "common.cuh"

#ifndef CONV_C
#define CONV_C 32
#endif
#define TILE_PP 4                           // pooled rows per block
#define TILE_PQ 4                           // pooled columns per block = blockDim.y
#define TILE_F 32                           // filters per block = blockDim.x
#define PATCH_H (2 * TILE_PP + 2)           // (8 conv rows - 1) + 3
#define PATCH_W (2 * TILE_PQ + 2)
#define V3_THREADS (TILE_F * TILE_PQ)

extern "C" __global__ void __launch_bounds__(V3_THREADS, 1)
conv2d_relu_maxpool_forward_v3(const float* __restrict__ x, const float* __restrict__ w,
                               const float* __restrict__ b_or_null, float* __restrict__ y,
                               signed char* __restrict__ idx, int N, int H, int W, int F, int PP, int PQ,
                               int act) {
    __shared__ float patch[PATCH_H * PATCH_W * CONV_C];
    const int tiles_q = (PQ + TILE_PQ - 1) / TILE_PQ, tiles_p = (PP + TILE_PP - 1) / TILE_PP;
    const int n = blockIdx.x / (tiles_p * tiles_q);
    if (n >= N) return;
    const int tile = blockIdx.x % (tiles_p * tiles_q);
    const int pp0 = (tile / tiles_q) * TILE_PP, pq0 = (tile % tiles_q) * TILE_PQ;
    const int f = blockIdx.y * TILE_F + threadIdx.x, col = threadIdx.y;
    const int tid = threadIdx.y * blockDim.x + threadIdx.x;
    const int row0 = 2 * pp0, col0 = 2 * pq0;
    const long long x_image = (long long)n * H * W * CONV_C;

    for (int e = tid; e < PATCH_H * PATCH_W * CONV_C; e += V3_THREADS) {
        const int c = e % CONV_C, pc = (e / CONV_C) % PATCH_W, pr = e / (CONV_C * PATCH_W);
        const int hh = row0 + pr, ww = col0 + pc;
        patch[e] = (hh < H && ww < W) ? x[x_image + ((long long)hh * W + ww) * CONV_C + c] : 0.0f;
    }
    __syncthreads();
    if (f >= F) return;

    float acc[2 * TILE_PP][2];
#pragma unroll
    for (int k = 0; k < 2 * TILE_PP; ++k) acc[k][0] = acc[k][1] = 0.0f;
#pragma unroll
    for (int i = 0; i < 3; ++i) {
#pragma unroll
        for (int j = 0; j < 3; ++j) {
            const float* wp = w + (i * 3 + j) * CONV_C * F + f;
            const float* pp = patch + (i * PATCH_W + 2 * col + j) * CONV_C;
#pragma unroll 4
            for (int c = 0; c < CONV_C; ++c) {
                const float wv = wp[c * F];
#pragma unroll
                for (int k = 0; k < 2 * TILE_PP; ++k) {
                    acc[k][0] += pp[k * PATCH_W * CONV_C + c] * wv;
                    acc[k][1] += pp[(k * PATCH_W + 1) * CONV_C + c] * wv;
                }
            }
        }
    }

    const int pq = pq0 + col;
    if (pq >= PQ) return;
    const float bias = b_or_null ? b_or_null[f] : 0.0f;
#pragma unroll
    for (int r = 0; r < TILE_PP; ++r) {
        if (pp0 + r < PP) {
            float best = 0.0f;
            int best_tap = 0;
#pragma unroll
            for (int t = 0; t < 4; ++t) {
                const float v = apply_activation(acc[2 * r + t / 2][t % 2] + bias, act);
                if (t == 0 || max_replaces(v, best)) {
                    best = v;
                    best_tap = t;
                }
            }
            const long long o = (((long long)n * PP + pp0 + r) * PQ + pq) * F + f;
            y[o] = best;
            idx[o] = (signed char)best_tap;
        }
    }
}
