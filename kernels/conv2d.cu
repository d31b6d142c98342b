// conv2d.cu — 2-D convolution over channels-last images and its two gradients (gpucnn.ops_cuda.conv2d_*).
//
//   x  is (N, H, W, C)        the layer's input
//   w  is (KH, KW, C, F)      the filters, Keras layout
//   b  is (F,)                the bias (b_or_null: may be null)
//   y  is (N, P, Q, F)        the output; dy (its gradient) has the same layout
//   dx is (N, H, W, C), dw is (KH, KW, C, F), db is (F,)
//   work is (S, KH*KW*C*F + F)  partial sums of dw (then db) over S slices of the N*P*Q output pixels
//
// Geometry: tap (i, j) of output pixel (p, q) reads input row p*sh + i - pad_top and column
// q*sw + j - pad_left; reads outside [0, H) x [0, W) are zero padding. P and Q come from the caller and fix
// the bottom/right padding. The im2col row of tap (i, j), channel c is r = (i*KW + j)*C + c, so w is an
// (R, F) matrix with R = KH*KW*C and dw = im2col(x)^T @ dy.
//
// Kernels (version 1 of each; the library uses all four):
//   conv2d_forward                 direct convolution. A block computes a CONV_TILE_P x CONV_TILE_Q tile of
//                                  output pixels for CONV_TILE_F filters: it stages the input patch under the
//                                  tile (halo included, zeros for padding) in shared memory, `cc` channels at a
//                                  time (common.cuh's stage_input_patch, as in conv_pool.cu); threadIdx.x picks
//                                  the filter (a warp reads 32 consecutive filters of w, coalesced), threadIdx.y
//                                  the output column, and each thread keeps the CONV_TILE_P outputs of its
//                                  column in registers. Bias and relu fused.
//   conv2d_backward_data           gather: one thread per input element sums dy * w over every (tap, filter)
//                                  whose window read that element. No atomics.
//   conv2d_backward_filter         implicit GEMM, first pass: block (row tile, filter tile, slice) multiplies
//                                  the im2col rows of one slice of output pixels by dy, BWF_TILE_M pixels at
//                                  a time through shared memory, and writes its partial dw tile (and, for the
//                                  first row tile, its partial db) to the workspace. No atomics.
//   conv2d_backward_filter_reduce  second pass: dw and db = the sum of the slices, in slice order.
//   Both passes run in a fixed order that depends on the shapes only: the same inputs give the same bits.
#include "common.cuh"

#ifndef CONV_TILE_P
#define CONV_TILE_P 8    // output rows per block; each thread holds all of them in registers
#endif
#ifndef CONV_TILE_Q
#define CONV_TILE_Q 8    // output columns per block = blockDim.y
#endif
#ifndef CONV_TILE_F
#define CONV_TILE_F 32   // filters per block = blockDim.x
#endif
#ifndef BWF_TILE_R
#define BWF_TILE_R 32    // im2col rows (tap, channel) of dw per block
#endif
#ifndef BWF_TILE_F
#define BWF_TILE_F 32    // filters of dw per block = blockDim.x
#endif
#ifndef BWF_ROWS_PER_THREAD
#define BWF_ROWS_PER_THREAD 4  // blockDim.y = BWF_TILE_R / BWF_ROWS_PER_THREAD
#endif
#ifndef BWF_TILE_M
#define BWF_TILE_M 32    // output pixels staged in shared memory per step
#endif

#define CONV_THREADS (CONV_TILE_F * CONV_TILE_Q)
#define BWF_THREADS (BWF_TILE_F * (BWF_TILE_R / BWF_ROWS_PER_THREAD))

// grid: (N * ceil(P / CONV_TILE_P) * ceil(Q / CONV_TILE_Q), ceil(F / CONV_TILE_F)); block (CONV_TILE_F, CONV_TILE_Q)
// dynamic shared memory: patch_h * patch_w * cc floats, patch_h = (CONV_TILE_P - 1) * sh + KH,
// patch_w = (CONV_TILE_Q - 1) * sw + KW
extern "C" __global__ void __launch_bounds__(CONV_THREADS)
conv2d_forward(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b_or_null,
               float* __restrict__ y, int N, int H, int W, int C, int KH, int KW, int F, int P, int Q,
               int sh, int sw, int pad_top, int pad_left, int act, int cc) {
    extern __shared__ float patch[];  // (patch_h, patch_w, channels of this chunk), zeros where padded

    if (P <= 0 || Q <= 0) return;  // no output (never launched so): no zero tile count to divide by below
    const int tiles_q = (Q + CONV_TILE_Q - 1) / CONV_TILE_Q;
    const int tiles_p = (P + CONV_TILE_P - 1) / CONV_TILE_P;
    const int n = blockIdx.x / (tiles_p * tiles_q);
    if (n >= N) return;  // whole block (only when the grid was padded to at least one block)
    const int tile = blockIdx.x % (tiles_p * tiles_q);
    const int p0 = (tile / tiles_q) * CONV_TILE_P;
    const int q0 = (tile % tiles_q) * CONV_TILE_Q;
    const int f = blockIdx.y * CONV_TILE_F + threadIdx.x;
    const int col = threadIdx.y;  // this thread's output column within the tile

    const int patch_h = (CONV_TILE_P - 1) * sh + KH;
    const int patch_w = (CONV_TILE_Q - 1) * sw + KW;
    const int row0 = p0 * sh - pad_top;   // input row under the patch's first row
    const int col0 = q0 * sw - pad_left;  // input column under the patch's first column
    const int tid = threadIdx.y * blockDim.x + threadIdx.x;
    const float* x_image = x + (long long)n * H * W * C;

    float acc[CONV_TILE_P];
#pragma unroll
    for (int k = 0; k < CONV_TILE_P; ++k) acc[k] = 0.0f;

    for (int c0 = 0; c0 < C; c0 += cc) {
        const int cn = min(cc, C - c0);
        stage_input_patch<CONV_THREADS>(patch, x_image, H, W, C, row0, col0, patch_h, patch_w, c0, cn, tid);
        if (f < F) {
            for (int i = 0; i < KH; ++i) {
                for (int j = 0; j < KW; ++j) {
                    const float* wp = w + ((long long)(i * KW + j) * C + c0) * F + f;
                    const float* pp = patch + (i * patch_w + col * sw + j) * cn;
                    for (int c = 0; c < cn; ++c) {
                        const float wv = wp[(long long)c * F];
#pragma unroll
                        for (int k = 0; k < CONV_TILE_P; ++k)
                            acc[k] += pp[k * sh * patch_w * cn + c] * wv;
                    }
                }
            }
        }
    }

    const int q = q0 + col;
    if (f >= F || q >= Q) return;
    const float bias = b_or_null ? b_or_null[f] : 0.0f;
#pragma unroll
    for (int k = 0; k < CONV_TILE_P; ++k) {
        const int p = p0 + k;
        if (p < P) y[(((long long)n * P + p) * Q + q) * F + f] = apply_activation(acc[k] + bias, act);
    }
}

// grid (elements of one image, images), both grid-stride; block THREADS
extern "C" __global__ void __launch_bounds__(THREADS)
conv2d_backward_data(const float* __restrict__ dy, const float* __restrict__ w, float* __restrict__ dx,
                     int N, int H, int W, int C, int KH, int KW, int F, int P, int Q,
                     int sh, int sw, int pad_top, int pad_left) {
    IMAGE_LOOP(n, N) {
        const float* dy_image = dy + (long long)n * P * Q * F;
        float* dx_image = dx + (long long)n * H * W * C;
        ELEMENT_LOOP(e, H * W * C) {
            const int c = e % C, ww = (e / C) % W, hh = e / (C * W);
            int p_first, p_last, q_first, q_last;
            windows_reading(hh, KH, sh, pad_top, P, p_first, p_last);
            windows_reading(ww, KW, sw, pad_left, Q, q_first, q_last);
            float acc = 0.0f;
            for (int p = p_last; p >= p_first; --p) {      // taps i = hh + pad_top - p*sh, increasing
                const int i = hh + pad_top - p * sh;
                for (int q = q_last; q >= q_first; --q) {
                    const int j = ww + pad_left - q * sw;
                    const float* dyp = dy_image + (long long)(p * Q + q) * F;
                    const float* wp = w + ((long long)(i * KW + j) * C + c) * F;
                    for (int f = 0; f < F; ++f) acc += dyp[f] * wp[f];
                }
            }
            dx_image[e] = acc;
        }
    }
}

// grid: (ceil(R / BWF_TILE_R), ceil(F / BWF_TILE_F), S); block (BWF_TILE_F, BWF_TILE_R / BWF_ROWS_PER_THREAD).
// M = N*P*Q <= 2^31 - 1 - BWF_TILE_M (gpucnn/ops_cuda.py checks). Slice s covers output pixels
// [s * slice_len, min((s + 1) * slice_len, M)); slice_len is a multiple of BWF_TILE_M. The block writes
// work[s, r*F + f] for its tile, and work[s, R*F + f] when blockIdx.x == 0.
extern "C" __global__ void __launch_bounds__(BWF_THREADS)
conv2d_backward_filter(const float* __restrict__ dy, const float* __restrict__ x, float* __restrict__ work,
                       int N, int H, int W, int C, int KH, int KW, int F, int P, int Q,
                       int sh, int sw, int pad_top, int pad_left, int slice_len) {
    __shared__ float xs[BWF_TILE_M][BWF_TILE_R];  // im2col entries: pixel m, row r
    __shared__ float gs[BWF_TILE_M][BWF_TILE_F];  // dy entries: pixel m, filter f

    const int R = KH * KW * C;
    const int r0 = blockIdx.x * BWF_TILE_R;
    const int f0 = blockIdx.y * BWF_TILE_F;
    const int M = N * P * Q;
    const int m_begin = blockIdx.z * slice_len;
    const int m_end = m_begin + min(M - m_begin, slice_len);  // (no int overflow near M = 2^31)
    const int tid = threadIdx.y * blockDim.x + threadIdx.x;
    const bool sums_bias = blockIdx.x == 0 && threadIdx.y == 0;

    float acc[BWF_ROWS_PER_THREAD];
#pragma unroll
    for (int k = 0; k < BWF_ROWS_PER_THREAD; ++k) acc[k] = 0.0f;
    float bias_acc = 0.0f;

    for (int m0 = m_begin; m0 < m_end; m0 += BWF_TILE_M) {
        __syncthreads();  // the previous step's tiles are no longer read
        for (int e = tid; e < BWF_TILE_M * BWF_TILE_R; e += BWF_THREADS) {
            const int mm = e / BWF_TILE_R, rr = e % BWF_TILE_R;
            const int m = m0 + mm, r = r0 + rr;
            float v = 0.0f;
            if (m < m_end && r < R) {
                const int q = m % Q, p = (m / Q) % P, n = m / (Q * P);
                const int c = r % C, j = (r / C) % KW, i = r / (C * KW);
                const int hh = p * sh + i - pad_top, ww = q * sw + j - pad_left;
                if (hh >= 0 && hh < H && ww >= 0 && ww < W)
                    v = x[(((long long)n * H + hh) * W + ww) * C + c];
            }
            xs[mm][rr] = v;
        }
        for (int e = tid; e < BWF_TILE_M * BWF_TILE_F; e += BWF_THREADS) {
            const int mm = e / BWF_TILE_F, ff = e % BWF_TILE_F;
            const int m = m0 + mm;
            gs[mm][ff] = (m < m_end && f0 + ff < F) ? dy[(long long)m * F + f0 + ff] : 0.0f;
        }
        __syncthreads();
        for (int mm = 0; mm < BWF_TILE_M; ++mm) {
            const float g = gs[mm][threadIdx.x];
#pragma unroll
            for (int k = 0; k < BWF_ROWS_PER_THREAD; ++k)
                acc[k] += xs[mm][threadIdx.y + k * (BWF_TILE_R / BWF_ROWS_PER_THREAD)] * g;
            if (sums_bias) bias_acc += g;
        }
    }

    const int f = f0 + threadIdx.x;
    if (f >= F) return;
    float* slice = work + (long long)blockIdx.z * ((long long)R * F + F);
#pragma unroll
    for (int k = 0; k < BWF_ROWS_PER_THREAD; ++k) {
        const int r = r0 + threadIdx.y + k * (BWF_TILE_R / BWF_ROWS_PER_THREAD);
        if (r < R) slice[(long long)r * F + f] = acc[k];
    }
    if (sums_bias) slice[(long long)R * F + f] = bias_acc;
}

// grid-stride over the R*F + F sums; block THREADS. dw[e] (e < R*F) or db[e - R*F] = sum over s of
// work[s, e], added in slice order.
extern "C" __global__ void __launch_bounds__(THREADS)
conv2d_backward_filter_reduce(const float* __restrict__ work, float* __restrict__ dw, float* __restrict__ db,
                              long long RF, int F, int S) {
    const long long row = RF + F;
    GRID_STRIDE_LOOP(e, row) {
        float s = 0.0f;
        for (int k = 0; k < S; ++k) s += work[k * row + e];
        if (e < RF) dw[e] = s;
        else db[e - RF] = s;
    }
}
