// depthwise_conv2d.cu — depthwise 2-D convolution over channels-last images and its two gradients, Keras's
// DepthwiseConv2D (and the first half of SeparableConv2D) (gpucnn.engines.cuda_ops.depthwise_conv2d_*).
//
//   x  is (N, H, W, C)        the layer's input
//   w  is (KH, KW, C, DM)     the depthwise kernels, Keras layout: w[i, j, c, m]; DM the depth multiplier
//   b  is (K,)                the bias, K = C·DM (b_or_null: may be null)
//   y  is (N, P, Q, K)        the output; output channel k = c·DM + m is input channel c = k / DM convolved
//                             with w[:, :, c, m], m = k % DM (Keras's order); dy has the same layout
//   dx is (N, H, W, C), dw is (KH, KW, C, DM), db is (K,)
//   work is (S, KH·KW·K + K)  partial sums of dw (then db) over S slices of the N·P·Q output pixels: the
//                             layout of conv2d.cu's workspace with F = K filters, so its reduce serves both
//
// Geometry as conv2d.cu: tap (i, j) of output pixel (p, q) reads input row p*sh + i - pad_top and column
// q*sw + j - pad_left, zero outside [0, H) x [0, W). Since w[i, j, c, m] sits at (i*KW + j)*K + k, a tap's
// kernels are a contiguous row of K values, as are a pixel's outputs.
//
// Kernels (version 1 of each; the library uses all three):
//   depthwise_conv2d_forward          one thread per output element: its KH·KW taps in scan order, bias and
//                                     relu fused; grid (elements of one image, images), both grid-stride
//   depthwise_conv2d_backward_data    gather: one thread per input element sums dy·w over the windows that
//                                     read it (taps in increasing order) and the DM multipliers. No atomics.
//   depthwise_conv2d_backward_filter  first pass: thread (tap·K + k, slice) sums x·dy over the output pixels
//                                     of its slice, in order (the threads with tap = KH·KW sum db); the second
//                                     pass is conv2d.cu's conv2d_backward_filter_reduce (slices in order).
//   Both passes run in a fixed order that depends on the shapes only: the same inputs give the same bits.
#include "common.cuh"

// grid (elements of one image, images), both grid-stride; block THREADS
extern "C" __global__ void __launch_bounds__(THREADS)
depthwise_conv2d_forward(const float* __restrict__ x, const float* __restrict__ w,
                         const float* __restrict__ b_or_null, float* __restrict__ y, int N, int H, int W, int C,
                         int KH, int KW, int DM, int P, int Q, int sh, int sw, int pad_top, int pad_left, int act) {
    const int K = C * DM;
    IMAGE_LOOP(n, N) {
        const float* x_image = x + (long long)n * H * W * C;
        float* y_image = y + (long long)n * P * Q * K;
        ELEMENT_LOOP(e, P * Q * K) {
            const int k = e % K, q = (e / K) % Q, p = e / (K * Q);
            const int c = k / DM;
            float acc = 0.0f;
            for (int i = 0; i < KH; ++i) {
                const int hh = p * sh + i - pad_top;
                if (hh < 0 || hh >= H) continue;
                for (int j = 0; j < KW; ++j) {
                    const int ww = q * sw + j - pad_left;
                    if (ww < 0 || ww >= W) continue;
                    acc += x_image[((long long)hh * W + ww) * C + c] * w[(long long)(i * KW + j) * K + k];
                }
            }
            y_image[e] = apply_activation(acc + (b_or_null ? b_or_null[k] : 0.0f), act);
        }
    }
}

// grid (elements of one image, images), both grid-stride; block THREADS
extern "C" __global__ void __launch_bounds__(THREADS)
depthwise_conv2d_backward_data(const float* __restrict__ dy, const float* __restrict__ w, float* __restrict__ dx,
                               int N, int H, int W, int C, int KH, int KW, int DM, int P, int Q,
                               int sh, int sw, int pad_top, int pad_left) {
    const int K = C * DM;
    IMAGE_LOOP(n, N) {
        const float* dy_image = dy + (long long)n * P * Q * K;
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
                    const float* dyp = dy_image + (long long)(p * Q + q) * K + c * DM;
                    const float* wp = w + (long long)(i * KW + j) * K + c * DM;
                    for (int m = 0; m < DM; ++m) acc += dyp[m] * wp[m];
                }
            }
            dx_image[e] = acc;
        }
    }
}

// grid (ceil((KH·KW + 1)·K / THREADS), S); block THREADS. Slice s covers output pixels [s·slice_len,
// min((s + 1)·slice_len, N·P·Q)); thread t = tap·K + k writes work[s, t]: for a tap < KH·KW the slice's
// Σ x[n, hh, ww, k / DM]·dy[n, p, q, k] over the pixels whose tap reads a real cell, for tap = KH·KW (db)
// its Σ dy[n, p, q, k].
extern "C" __global__ void __launch_bounds__(THREADS)
depthwise_conv2d_backward_filter(const float* __restrict__ dy, const float* __restrict__ x, float* __restrict__ work,
                                 int N, int H, int W, int C, int KH, int KW, int DM, int P, int Q,
                                 int sh, int sw, int pad_top, int pad_left, int slice_len) {
    const int K = C * DM;
    const int row = (KH * KW + 1) * K;  // one slice's sums
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= row) return;
    const int tap = t / K, k = t % K, c = k / DM;
    const int i = tap / KW, j = tap % KW;  // (tap == KH·KW: the bias)
    const bool bias = tap == KH * KW;
    const int M = N * P * Q;
    const int m_begin = blockIdx.y * slice_len;
    const int m_end = m_begin + min(M - m_begin, slice_len);
    // the slice's first pixel (n, p, q), then stepped along without divisions
    int q = m_begin % Q, p = (m_begin / Q) % P, n = m_begin / (P * Q);
    float acc = 0.0f;
    for (int m = m_begin; m < m_end; ++m) {
        const float g = dy[(long long)m * K + k];
        if (bias) {
            acc += g;
        } else {
            const int hh = p * sh + i - pad_top, ww = q * sw + j - pad_left;
            if (hh >= 0 && hh < H && ww >= 0 && ww < W) acc += x[(((long long)n * H + hh) * W + ww) * C + c] * g;
        }
        if (++q == Q) {
            q = 0;
            if (++p == P) {
                p = 0;
                ++n;
            }
        }
    }
    work[(long long)blockIdx.y * row + t] = acc;
}
