// pool2d.cu — max, average and global-average pooling over channels-last images, and their gradients
// (gpucnn.ops_cuda.*pool2d_*).
//
//   x   is (N, H, W, C)      the layer's input; dx has the same layout
//   y   is (N, P, Q, C)      the pooled output; dy has the same layout
//   idx is (N, P, Q, C)      int8: the scan-order tap i*PW + j of the window's first maximum (or first NaN)
//   global pooling: y and dy are (N, C); global max-pooling's idx is (N, C) int32, the cell h*W + w of the
//   channel's first maximum (or first NaN) in row-major scan order
//
// Geometry: tap (i, j) of window (p, q) reads input row p*sh + i - pad_top and column q*sw + j - pad_left;
// cells outside the input are padding (-inf for max, not counted for average). Windows of PH x PW.
//
// Kernels (version 1 of each): every one runs one thread per element it writes, grid (elements of one
// image, images), both grid-stride; block THREADS. Each sums in the NumPy engine's order (taps in scan
// order), so max-pooling, its gradient and the average pools agree with ops_numpy bit for bit.
//   maxpool2d_forward          y and idx: scans the window's taps in order; replaces the best when
//                              `v > best || (isnan(v) && !isnan(best))` (a padding cell reads -inf)
//   maxpool2d_backward         gather: dx sums dy over the windows whose idx points at this cell (common.cuh's
//                              maxpool_backward_gather, which conv_pool.cu's maxpool2d_relu_backward shares)
//   avgpool2d_forward          y = (sum of the window's real cells) / (their count)
//   avgpool2d_backward         gather: dx sums dy / count over the windows that cover this cell
//   global_avgpool2d_forward   y[n, c] = (sum over H and W) / (H*W); grid (C-blocks, images)
//   global_avgpool2d_backward  dx[n, h, w, c] = dy[n, c] / (H*W)
//   global_maxpool2d_forward   y and idx: thread (n, c) scans the H*W cells in order with max_replaces
//   global_maxpool2d_backward  dx[n, h, w, c] = dy[n, c] where idx[n, c] names the cell, else 0
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(THREADS)
maxpool2d_forward(const float* __restrict__ x, float* __restrict__ y, signed char* __restrict__ idx,
                  int N, int H, int W, int C, int P, int Q, int PH, int PW, int sh, int sw,
                  int pad_top, int pad_left) {
    IMAGE_LOOP(n, N) {
        const float* x_image = x + (long long)n * H * W * C;
        const long long out_image = (long long)n * P * Q * C;
        ELEMENT_LOOP(e, P * Q * C) {
            const int c = e % C, q = (e / C) % Q, p = e / (C * Q);
            const int row0 = p * sh - pad_top, col0 = q * sw - pad_left;
            float best = negative_infinity();
            int best_tap = 0;
            for (int i = 0; i < PH; ++i) {
                for (int j = 0; j < PW; ++j) {
                    const int hh = row0 + i, ww = col0 + j;
                    const float v = (hh >= 0 && hh < H && ww >= 0 && ww < W)
                                        ? x_image[((long long)hh * W + ww) * C + c] : negative_infinity();
                    if ((i == 0 && j == 0) || max_replaces(v, best)) {
                        best = v;
                        best_tap = i * PW + j;
                    }
                }
            }
            y[out_image + e] = best;
            idx[out_image + e] = (signed char)best_tap;
        }
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
maxpool2d_backward(const float* __restrict__ dy, const signed char* __restrict__ idx, float* __restrict__ dx,
                   int N, int H, int W, int C, int P, int Q, int PH, int PW, int sh, int sw,
                   int pad_top, int pad_left) {
    IMAGE_LOOP(n, N) {
        const long long out_image = (long long)n * P * Q * C;
        float* dx_image = dx + (long long)n * H * W * C;
        ELEMENT_LOOP(e, H * W * C) {
            const int c = e % C, ww = (e / C) % W, hh = e / (C * W);
            float unused;
            dx_image[e] = maxpool_backward_gather<false>(dy + out_image, idx + out_image, nullptr, hh, ww, c, C, P,
                                                         Q, PH, PW, sh, sw, pad_top, pad_left, unused);
        }
    }
}

// How many cells of window (p, q) are inside the input (padding is not counted).
__device__ __forceinline__ int real_cells(int p, int q, int H, int W, int PH, int PW, int sh, int sw,
                                          int pad_top, int pad_left) {
    const int r0 = p * sh - pad_top, c0 = q * sw - pad_left;
    const int rows = min(r0 + PH, H) - max(r0, 0), cols = min(c0 + PW, W) - max(c0, 0);
    return max(rows, 0) * max(cols, 0);
}

extern "C" __global__ void __launch_bounds__(THREADS)
avgpool2d_forward(const float* __restrict__ x, float* __restrict__ y,
                  int N, int H, int W, int C, int P, int Q, int PH, int PW, int sh, int sw,
                  int pad_top, int pad_left) {
    IMAGE_LOOP(n, N) {
        const float* x_image = x + (long long)n * H * W * C;
        float* y_image = y + (long long)n * P * Q * C;
        ELEMENT_LOOP(e, P * Q * C) {
            const int c = e % C, q = (e / C) % Q, p = e / (C * Q);
            const int row0 = p * sh - pad_top, col0 = q * sw - pad_left;
            float acc = 0.0f;
            for (int i = 0; i < PH; ++i) {
                for (int j = 0; j < PW; ++j) {
                    const int hh = row0 + i, ww = col0 + j;
                    if (hh >= 0 && hh < H && ww >= 0 && ww < W) acc += x_image[((long long)hh * W + ww) * C + c];
                }
            }
            y_image[e] = acc / (float)real_cells(p, q, H, W, PH, PW, sh, sw, pad_top, pad_left);
        }
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
avgpool2d_backward(const float* __restrict__ dy, float* __restrict__ dx,
                   int N, int H, int W, int C, int P, int Q, int PH, int PW, int sh, int sw,
                   int pad_top, int pad_left) {
    IMAGE_LOOP(n, N) {
        const float* dy_image = dy + (long long)n * P * Q * C;
        float* dx_image = dx + (long long)n * H * W * C;
        ELEMENT_LOOP(e, H * W * C) {
            const int c = e % C, ww = (e / C) % W, hh = e / (C * W);
            int p_first, p_last, q_first, q_last;
            windows_reading(hh, PH, sh, pad_top, P, p_first, p_last);
            windows_reading(ww, PW, sw, pad_left, Q, q_first, q_last);
            float acc = 0.0f;
            for (int p = p_last; p >= p_first; --p) {  // taps in increasing scan order
                for (int q = q_last; q >= q_first; --q) {
                    const float count = (float)real_cells(p, q, H, W, PH, PW, sh, sw, pad_top, pad_left);
                    acc += dy_image[((long long)p * Q + q) * C + c] / count;
                }
            }
            dx_image[e] = acc;
        }
    }
}

// grid (ceil(C / THREADS) capped, images): thread (n, c) sums its channel over the H*W cells in order
// (consecutive threads read consecutive channels: coalesced). hw is H*W as a float.
extern "C" __global__ void __launch_bounds__(THREADS)
global_avgpool2d_forward(const float* __restrict__ x, float* __restrict__ y, int N, int HW, int C, float hw) {
    IMAGE_LOOP(n, N) {
        const float* x_image = x + (long long)n * HW * C;
        ELEMENT_LOOP(c, C) {
            float acc = 0.0f;
            for (int s = 0; s < HW; ++s) acc += x_image[(long long)s * C + c];
            y[(long long)n * C + c] = acc / hw;
        }
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
global_avgpool2d_backward(const float* __restrict__ dy, float* __restrict__ dx, int N, int HW, int C,
                          float hw) {
    IMAGE_LOOP(n, N) {
        float* dx_image = dx + (long long)n * HW * C;
        ELEMENT_LOOP(e, HW * C) dx_image[e] = dy[(long long)n * C + e % C] / hw;
    }
}

// grid (ceil(C / THREADS) capped, images); block THREADS. Thread (n, c) scans its channel's HW cells in
// row-major order: the first maximum wins, a NaN beats everything and the first NaN stays (max_replaces).
extern "C" __global__ void __launch_bounds__(THREADS)
global_maxpool2d_forward(const float* __restrict__ x, float* __restrict__ y, int* __restrict__ idx, int N, int HW,
                         int C) {
    IMAGE_LOOP(n, N) {
        const float* x_image = x + (long long)n * HW * C;
        ELEMENT_LOOP(c, C) {
            float best = x_image[c];
            int best_cell = 0;
            for (int s = 1; s < HW; ++s) {
                const float v = x_image[(long long)s * C + c];
                if (max_replaces(v, best)) {
                    best = v;
                    best_cell = s;
                }
            }
            y[(long long)n * C + c] = best;
            idx[(long long)n * C + c] = best_cell;
        }
    }
}

// grid (elements of one image, images), both grid-stride; block THREADS
extern "C" __global__ void __launch_bounds__(THREADS)
global_maxpool2d_backward(const float* __restrict__ dy, const int* __restrict__ idx, float* __restrict__ dx, int N,
                          int HW, int C) {
    IMAGE_LOOP(n, N) {
        float* dx_image = dx + (long long)n * HW * C;
        ELEMENT_LOOP(e, HW * C) {
            const long long o = (long long)n * C + e % C;
            dx_image[e] = idx[o] == e / C ? dy[o] : 0.0f;
        }
    }
}
