// activations.cu — relu, softmax and dropout, forward and backward (gpucnn.engines.cuda_ops.activation_*,
// dropout_*).
//
//   x is (n,)            a flat float32 buffer (any shape, C order); y, dy, dx and mask are the same
//   x is (rows, cols)    for softmax, which runs over each row (the last axis); y, dy, dx the same
//   In-place calls (y == x, dx == dy) are allowed, so these pointers are not __restrict__.
//
// Kernels (version 1 of each):
//   relu_forward      y = x < 0 ? 0 : x (a NaN stays a NaN); grid-stride, block THREADS
//   relu_backward     dx = dy * (y > 0 ? 1 : 0) (as ops_numpy: a NaN dy stays a NaN)
//   softmax_forward   one thread per row: max, sum of exp(x - max) in order, then exp(x - max) / sum.
//                     Rows are short here (classes, channels); a NaN anywhere in a row makes it all NaN.
//   softmax_backward  one thread per row: dx = y * (dy - sum(dy * y))
//   dropout_forward   keep element i when uniform01(seed, i) >= rate: mask = keep ? scale : 0 with
//                     scale = 1 / (1 - rate) computed by the caller in float32, y = x * mask. The random
//                     numbers are a pure function of (seed, i): deterministic, independent of the launch.
//                     seed = seeds[step[0] * slots + slot]: seeds is a (steps, slots) uint64 table (a step's
//                     seed per dropout layer) and step a (1,) int32 device counter, so a captured CUDA graph
//                     draws a new mask at each replay (the host fills the table, the step advances the counter).
//   dropout_backward  dx = dy * mask
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(THREADS)
relu_forward(const float* x, float* y, long long n) {
    GRID_STRIDE_LOOP(i, n) y[i] = relu(x[i]);
}

extern "C" __global__ void __launch_bounds__(THREADS)
relu_backward(const float* dy, const float* y, float* dx, long long n) {
    GRID_STRIDE_LOOP(i, n) dx[i] = dy[i] * (y[i] > 0.0f ? 1.0f : 0.0f);
}

extern "C" __global__ void __launch_bounds__(THREADS)
softmax_forward(const float* x, float* y, long long rows, int cols) {
    GRID_STRIDE_LOOP(r, rows) {
        const float* xr = x + r * cols;
        float* yr = y + r * cols;
        float top = xr[0];
        for (int k = 1; k < cols; ++k)
            if (max_replaces(xr[k], top)) top = xr[k];
        float sum = 0.0f;
        for (int k = 0; k < cols; ++k) sum += expf(xr[k] - top);
        for (int k = 0; k < cols; ++k) yr[k] = expf(xr[k] - top) / sum;  // reads xr[k] before writing yr[k]
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
softmax_backward(const float* dy, const float* y, float* dx, long long rows, int cols) {
    GRID_STRIDE_LOOP(r, rows) {
        const float* dyr = dy + r * cols;
        const float* yr = y + r * cols;
        float* dxr = dx + r * cols;
        float dot = 0.0f;
        for (int k = 0; k < cols; ++k) dot += dyr[k] * yr[k];
        for (int k = 0; k < cols; ++k) dxr[k] = yr[k] * (dyr[k] - dot);
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
dropout_forward(const float* x, float* y, float* mask, long long n, float rate, float scale,
                const unsigned long long* __restrict__ seeds, const int* __restrict__ step, int slot, int slots) {
    const unsigned long long seed = seeds[(long long)step[0] * slots + slot];
    GRID_STRIDE_LOOP(i, n) {
        const float m = uniform01(seed, (unsigned long long)i) >= rate ? scale : 0.0f;
        mask[i] = m;
        y[i] = x[i] * m;
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
dropout_backward(const float* dy, const float* mask, float* dx, long long n) {
    GRID_STRIDE_LOOP(i, n) dx[i] = dy[i] * mask[i];
}
