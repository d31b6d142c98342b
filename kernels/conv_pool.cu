// conv_pool.cu — a convolution with its bias, activation and the 2x2 max-pooling after it fused into one
// kernel, and the matching backward step from the pooled gradient to the convolution's pre-activation
// gradient: training's Conv2D followed by MaxPooling2D((2, 2)), strides 2, "valid" (launched by
// ops_cuda.conv2d_maxpool_forward / conv2d_maxpool_backward; gpucnn.layers.fusable_pool says which pairs).
//
//   x   is (N, H, W, C)        the convolution's input
//   w   is (KH, KW, C, F)      the filters, Keras layout; b_or_null (F,) the bias
//   y   is (N, PP, PQ, F)      the pooled output, PP = P / 2, PQ = Q / 2 (floor) for the conv output P x Q;
//                              PP or PQ may be 0 (nothing is written)
//   idx is (N, PP, PQ, F)      int8: the scan-order tap i*2 + j of each window's first maximum, as
//                              maxpool2d_forward writes it
//   dy  is (N, PP, PQ, F)      the gradient of the pooled output
//   dz  is (N, P, Q, F)        the gradient of the convolution's pre-activation output: what
//                              maxpool2d_backward followed by relu_backward gives
//
// Kernels:
//   conv2d_relu_maxpool_forward  (version 2 of the forward convolution; version 1 is conv2d.cu's
//                                conv2d_forward followed by maxpool2d_forward.) A block computes a
//                                FUSED_TILE_PP x FUSED_TILE_PQ tile of pooled outputs for FUSED_TILE_F filters,
//                                i.e. a (2 FUSED_TILE_PP) x (2 FUSED_TILE_PQ) tile of convolution outputs: it
//                                stages the input patch under it (halo included, zero padding) in shared
//                                memory `cc` channels at a time; threadIdx.x picks the filter (coalesced reads
//                                of w), threadIdx.y the pooled column, and each thread keeps its 2 FUSED_TILE_PP
//                                x 2 convolution outputs in registers, then adds the bias, applies the
//                                activation and pools them (taps in scan order, max_replaces). With the same
//                                8 x 8 convolution tile and `cc` as conv2d_forward, every output is summed in
//                                the same order: the same bits as the unfused pair. Convolution rows and
//                                columns that no window reads (odd P or Q) are not computed at all.
//   maxpool2d_relu_backward      gather, one thread per element of dz: the sum of dy over the windows whose
//                                idx points at it (maxpool2d_backward), times (y > 0) of such a window when
//                                act is ACT_RELU (relu_backward: the pooled value is that element's value).
//                                Any pooling geometry. Grid (elements of one image, images); block THREADS.
#include "common.cuh"

#ifndef FUSED_TILE_PP
#define FUSED_TILE_PP 4   // pooled rows per block; a thread holds 2 * FUSED_TILE_PP x 2 conv outputs
#endif
#ifndef FUSED_TILE_PQ
#define FUSED_TILE_PQ 4   // pooled columns per block = blockDim.y
#endif
#ifndef FUSED_TILE_F
#define FUSED_TILE_F 32   // filters per block = blockDim.x
#endif

#define FUSED_THREADS (FUSED_TILE_F * FUSED_TILE_PQ)
#define FUSED_ROWS (2 * FUSED_TILE_PP)  // convolution rows of the tile

// __launch_bounds__(FUSED_THREADS, 1): without the minimum-blocks hint NVRTC 13's ptxas caps the registers for
// occupancy and spills the 16 accumulators on sm_80; with it, about 100 registers and no spills.
// grid: (N * ceil(PP / FUSED_TILE_PP) * ceil(PQ / FUSED_TILE_PQ), ceil(F / FUSED_TILE_F));
// block (FUSED_TILE_F, FUSED_TILE_PQ); dynamic shared memory: patch_h * patch_w * cc floats with
// patch_h = (2 FUSED_TILE_PP - 1) * sh + KH, patch_w = (2 FUSED_TILE_PQ - 1) * sw + KW.
extern "C" __global__ void __launch_bounds__(FUSED_THREADS, 1)
conv2d_relu_maxpool_forward(const float* __restrict__ x, const float* __restrict__ w,
                            const float* __restrict__ b_or_null, float* __restrict__ y,
                            signed char* __restrict__ idx, int N, int H, int W, int C, int KH, int KW, int F,
                            int PP, int PQ, int sh, int sw, int pad_top, int pad_left, int act, int cc) {
    extern __shared__ float patch[];  // (patch_h, patch_w, channels of this chunk), zeros where padded

    // No pooled output (a 1-row or 1-column convolution output; the launcher launches nothing then): the
    // whole block leaves before the tile count below, which would be zero and divide.
    if (PP <= 0 || PQ <= 0) return;
    const int tiles_q = (PQ + FUSED_TILE_PQ - 1) / FUSED_TILE_PQ;
    const int tiles_p = (PP + FUSED_TILE_PP - 1) / FUSED_TILE_PP;
    const int n = blockIdx.x / (tiles_p * tiles_q);
    if (n >= N) return;  // whole block
    const int tile = blockIdx.x % (tiles_p * tiles_q);
    const int pp0 = (tile / tiles_q) * FUSED_TILE_PP;
    const int pq0 = (tile % tiles_q) * FUSED_TILE_PQ;
    const int f = blockIdx.y * FUSED_TILE_F + threadIdx.x;
    const int col = threadIdx.y;  // this thread's pooled column within the tile

    const int patch_h = (FUSED_ROWS - 1) * sh + KH;
    const int patch_w = (2 * FUSED_TILE_PQ - 1) * sw + KW;
    const int row0 = 2 * pp0 * sh - pad_top;   // input row under the patch's first row
    const int col0 = 2 * pq0 * sw - pad_left;  // input column under the patch's first column
    const int tid = threadIdx.y * blockDim.x + threadIdx.x;
    const float* x_image = x + (long long)n * H * W * C;

    float acc[FUSED_ROWS][2];
#pragma unroll
    for (int k = 0; k < FUSED_ROWS; ++k) acc[k][0] = acc[k][1] = 0.0f;

    for (int c0 = 0; c0 < C; c0 += cc) {
        const int cn = min(cc, C - c0);
        stage_input_patch<FUSED_THREADS>(patch, x_image, H, W, C, row0, col0, patch_h, patch_w, c0, cn, tid);
        if (f < F) {
            for (int i = 0; i < KH; ++i) {
                for (int j = 0; j < KW; ++j) {
                    const float* wp = w + ((long long)(i * KW + j) * C + c0) * F + f;
                    const float* pp = patch + (i * patch_w + 2 * col * sw + j) * cn;
                    for (int c = 0; c < cn; ++c) {
                        const float wv = wp[(long long)c * F];
#pragma unroll
                        for (int k = 0; k < FUSED_ROWS; ++k) {
                            acc[k][0] += pp[k * sh * patch_w * cn + c] * wv;
                            acc[k][1] += pp[(k * sh * patch_w + sw) * cn + c] * wv;
                        }
                    }
                }
            }
        }
    }

    const int pq = pq0 + col;
    if (f >= F || pq >= PQ) return;
    const float bias = b_or_null ? b_or_null[f] : 0.0f;
#pragma unroll
    for (int r = 0; r < FUSED_TILE_PP; ++r) {
        const int ppo = pp0 + r;
        if (ppo < PP) {
            float best = 0.0f;
            int best_tap = 0;
#pragma unroll
            for (int i = 0; i < 2; ++i) {
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                    const float v = apply_activation(acc[2 * r + i][j] + bias, act);
                    if ((i == 0 && j == 0) || max_replaces(v, best)) {
                        best = v;
                        best_tap = i * 2 + j;
                    }
                }
            }
            const long long o = (((long long)n * PP + ppo) * PQ + pq) * F + f;
            y[o] = best;
            idx[o] = (signed char)best_tap;
        }
    }
}

// grid (elements of one image, images), both grid-stride; block THREADS. Here C is the channel count of
// dz and dy (the convolution's filters), H x W the convolution's output, P x Q the pooled output.
extern "C" __global__ void __launch_bounds__(THREADS)
maxpool2d_relu_backward(const float* __restrict__ dy, const signed char* __restrict__ idx,
                        const float* __restrict__ y, float* __restrict__ dz,
                        int N, int H, int W, int C, int P, int Q, int PH, int PW, int sh, int sw,
                        int pad_top, int pad_left, int act) {
    IMAGE_LOOP(n, N) {
        const long long out_image = (long long)n * P * Q * C;
        float* dz_image = dz + (long long)n * H * W * C;
        ELEMENT_LOOP(e, H * W * C) {
            const int c = e % C, ww = (e / C) % W, hh = e / (C * W);
            float gate = 0.0f;  // relu_backward's factor: whether this element's output (a window it won) is > 0
            // the same gather as maxpool2d_backward (its loops kept rolled: unrolled, they spill here)
            const float acc = maxpool_backward_gather<true>(dy + out_image, idx + out_image, y + out_image, hh, ww,
                                                            c, C, P, Q, PH, PW, sh, sw, pad_top, pad_left, gate);
            dz_image[e] = acc * (act == ACT_RELU ? gate : 1.0f);
        }
    }
}
