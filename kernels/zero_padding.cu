// zero_padding.cu — zero padding of channels-last images and its gradient, Keras's ZeroPadding2D
// (gpucnn.engines.cuda_ops.zero_padding2d_*).
//
//   x  is (N, H, W, C)        the layer's input; dx has the same layout
//   y  is (N, P, Q, C)        the padded output, P = pad_top + H + pad_bottom, Q = pad_left + W + pad_right;
//                             dy has the same layout
//
// Kernels (version 1 of each): one thread per element written, grid (elements of one image, images), both
// grid-stride; block THREADS. Copies only: the results are exact.
//   zero_padding2d_forward    y[n, p, q, c] = x[n, p - pad_top, q - pad_left, c], 0 outside x
//   zero_padding2d_backward   gather: dx[n, h, w, c] = dy[n, h + pad_top, w + pad_left, c]
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(THREADS)
zero_padding2d_forward(const float* __restrict__ x, float* __restrict__ y, int N, int H, int W, int C, int P, int Q,
                       int pad_top, int pad_left) {
    IMAGE_LOOP(n, N) {
        const float* x_image = x + (long long)n * H * W * C;
        float* y_image = y + (long long)n * P * Q * C;
        ELEMENT_LOOP(e, P * Q * C) {
            const int c = e % C, q = (e / C) % Q, p = e / (C * Q);
            const int hh = p - pad_top, ww = q - pad_left;
            y_image[e] = (hh >= 0 && hh < H && ww >= 0 && ww < W) ? x_image[((long long)hh * W + ww) * C + c] : 0.0f;
        }
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
zero_padding2d_backward(const float* __restrict__ dy, float* __restrict__ dx, int N, int H, int W, int C, int P,
                        int Q, int pad_top, int pad_left) {
    IMAGE_LOOP(n, N) {
        const float* dy_image = dy + (long long)n * P * Q * C;
        float* dx_image = dx + (long long)n * H * W * C;
        ELEMENT_LOOP(e, H * W * C) {
            const int c = e % C, ww = (e / C) % W, hh = e / (C * W);
            dx_image[e] = dy_image[((long long)(hh + pad_top) * Q + ww + pad_left) * C + c];
        }
    }
}
