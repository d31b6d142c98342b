// activations.cu — the activations and dropout, forward and backward (gpucnn.engines.cuda_ops.activation_*,
// dropout_*).
//
//   x is (n,)            a flat float32 buffer (any shape, C order); y, dy, dx and mask are the same
//   x is (rows, cols)    for softmax, which runs over each row (the last axis); y, dy, dx the same
//   In-place calls (y == x, dx == dy) are allowed, so these pointers are not __restrict__.
//
// Kernels (version 1 of each):
//   relu_forward      y = x < 0 ? 0 : x (a NaN stays a NaN); grid-stride, block THREADS
//   relu_backward     dx = dy * (y > 0 ? 1 : 0) (as ops_numpy: a NaN dy stays a NaN)
//   elementwise_activation_forward   y = f(x) for the activation code act (ACT_SIGMOID ... below) and its
//                     parameter (elu alpha, leaky_relu negative_slope, relu6 max_value); one grid-stride loop per code,
//                     chosen once per launch (a switch outside the loop)
//   elementwise_activation_backward  dx = dy * f'(x), f' read from the output y (y_or_null), or for silu and
//                     gelu from the input x (x_or_null), as numpy_ops.activation_backward
//   softmax_forward   one thread per row: max, sum of exp(x - max) in order, then exp(x - max) / sum.
//                     Rows are short here (classes, channels); a NaN anywhere in a row makes it all NaN.
//   softmax_backward  one thread per row: dx = y * (dy - sum(dy * y))
//   dropout_forward   keep element i when uniform01(seed, i) >= rate: mask = keep ? scale : 0 with
//                     scale = 1 / (1 - rate) computed by the caller in float32, y = x * mask. The random
//                     numbers are a pure function of (seed, i): deterministic, independent of the launch.
//                     seed = seeds[step[0] * slots + slot]: seeds is a (steps, slots) uint64 table (a step's
//                     seed per dropout layer) and step a (1,) int32 device counter, so a captured CUDA graph
//                     draws a new mask at each replay (the host fills the table, the step advances the counter).
//                     first: the element index of x[0] in the whole batch's mask (0, or where the second half of
//                     a batch split in two starts), so a half batch draws its part of the whole batch's mask.
//   dropout_backward  dx = dy * mask
#include "common.cuh"

// Activation codes of the elementwise kernels (cuda_ops reads them; ACT_NONE and ACT_RELU are common.cuh's).
#define ACT_SIGMOID 2
#define ACT_TANH 3
#define ACT_ELU 4          // param: alpha (>= 0)
#define ACT_SELU 5
#define ACT_LEAKY_RELU 6   // param: negative_slope (>= 0)
#define ACT_SOFTPLUS 7
#define ACT_SILU 8         // x sigmoid(x), also called swish
#define ACT_GELU 9         // x Phi(x) = x erfc(-x / sqrt 2) / 2 (Keras's default, exact)
#define ACT_GELU_TANH 10   // 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (approximate=True)
#define ACT_RELU6 11       // min(max(x, 0), param), param: max_value (>= 0); a NaN stays a NaN

#define SELU_ALPHA 1.6732632423543772848170429916717f
#define SELU_SCALE 1.0507009873554804934193349852946f
#define GELU_TANH_C 0.7978845608028654f  // sqrt(2 / pi)
#define GELU_TANH_K 0.044715f
#define INV_SQRT_2 0.7071067811865476f
#define INV_SQRT_2PI 0.3989422804014327f

template <int ACT>
__device__ __forceinline__ float activate(float v, float param) {
    if (ACT == ACT_SIGMOID) return sigmoid(v);
    if (ACT == ACT_TANH) return tanhf(v);
    if (ACT == ACT_ELU) return v > 0.0f ? v : param * expm1f(v);
    if (ACT == ACT_SELU) return SELU_SCALE * (v > 0.0f ? v : SELU_ALPHA * expm1f(v));
    if (ACT == ACT_LEAKY_RELU) return v > 0.0f ? v : param * v;
    if (ACT == ACT_SOFTPLUS) return softplus(v);
    if (ACT == ACT_SILU) return v * sigmoid(v);
    if (ACT == ACT_GELU) return v * (0.5f * erfcf(-v * INV_SQRT_2));
    if (ACT == ACT_RELU6) return v < 0.0f ? 0.0f : (v > param ? param : v);
    // ACT_GELU_TANH
    return 0.5f * v * (1.0f + tanhf(GELU_TANH_C * (v + GELU_TANH_K * v * v * v)));
}

// f'(x) from the output y (ACT_SIGMOID .. ACT_SOFTPLUS) or the input v (ACT_SILU, ACT_GELU, ACT_GELU_TANH).
template <int ACT>
__device__ __forceinline__ float activation_slope(float y, float v, float param) {
    if (ACT == ACT_SIGMOID) return y * (1.0f - y);
    if (ACT == ACT_TANH) return 1.0f - y * y;
    if (ACT == ACT_ELU) return y > 0.0f ? 1.0f : y + param;  // below 0: alpha e^x = y + alpha
    if (ACT == ACT_SELU) return y > 0.0f ? SELU_SCALE : y + SELU_SCALE * SELU_ALPHA;
    if (ACT == ACT_LEAKY_RELU) return y > 0.0f ? 1.0f : param;
    if (ACT == ACT_SOFTPLUS) return -expm1f(-y);  // sigmoid(x) = 1 - e^-y
    if (ACT == ACT_SILU) {
        const float s = sigmoid(v);
        return s * (1.0f + v * (1.0f - s));
    }
    if (ACT == ACT_GELU) return 0.5f * erfcf(-v * INV_SQRT_2) + v * (INV_SQRT_2PI * expf(-0.5f * v * v));
    if (ACT == ACT_RELU6) return (y > 0.0f && y < param) ? 1.0f : 0.0f;
    // ACT_GELU_TANH
    const float t = tanhf(GELU_TANH_C * (v + GELU_TANH_K * v * v * v));
    return 0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * (GELU_TANH_C * (1.0f + 3.0f * GELU_TANH_K * v * v));
}

template <int ACT>
__device__ __forceinline__ void activation_forward_loop(const float* x, float* y, long long n, float param) {
    GRID_STRIDE_LOOP(i, n) y[i] = activate<ACT>(x[i], param);
}

template <int ACT>
__device__ __forceinline__ void activation_backward_loop(const float* dy, const float* y, const float* x, float* dx,
                                                         long long n, float param) {
    constexpr bool FROM_INPUT = ACT == ACT_SILU || ACT == ACT_GELU || ACT == ACT_GELU_TANH;
    GRID_STRIDE_LOOP(i, n) {
        dx[i] = dy[i] * activation_slope<ACT>(FROM_INPUT ? 0.0f : y[i], FROM_INPUT ? x[i] : 0.0f, param);
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
relu_forward(const float* x, float* y, long long n) {
    GRID_STRIDE_LOOP(i, n) y[i] = relu(x[i]);
}

extern "C" __global__ void __launch_bounds__(THREADS)
relu_backward(const float* dy, const float* y, float* dx, long long n) {
    GRID_STRIDE_LOOP(i, n) dx[i] = dy[i] * (y[i] > 0.0f ? 1.0f : 0.0f);
}

// One launch applies one activation: the switch picks the loop once, each loop is specialised for its code.
extern "C" __global__ void __launch_bounds__(THREADS)
elementwise_activation_forward(const float* x, float* y, long long n, int act, float param) {
    switch (act) {
        case ACT_SIGMOID: activation_forward_loop<ACT_SIGMOID>(x, y, n, param); break;
        case ACT_TANH: activation_forward_loop<ACT_TANH>(x, y, n, param); break;
        case ACT_ELU: activation_forward_loop<ACT_ELU>(x, y, n, param); break;
        case ACT_SELU: activation_forward_loop<ACT_SELU>(x, y, n, param); break;
        case ACT_LEAKY_RELU: activation_forward_loop<ACT_LEAKY_RELU>(x, y, n, param); break;
        case ACT_SOFTPLUS: activation_forward_loop<ACT_SOFTPLUS>(x, y, n, param); break;
        case ACT_SILU: activation_forward_loop<ACT_SILU>(x, y, n, param); break;
        case ACT_GELU: activation_forward_loop<ACT_GELU>(x, y, n, param); break;
        case ACT_GELU_TANH: activation_forward_loop<ACT_GELU_TANH>(x, y, n, param); break;
        case ACT_RELU6: activation_forward_loop<ACT_RELU6>(x, y, n, param); break;
        default: break;  // cuda_ops passes only the codes above
    }
}

// y_or_null is read for the codes whose slope comes from the output, x_or_null for silu and gelu.
extern "C" __global__ void __launch_bounds__(THREADS)
elementwise_activation_backward(const float* dy, const float* y_or_null, const float* x_or_null, float* dx,
                                long long n, int act, float param) {
    const float* y = y_or_null;
    const float* x = x_or_null;
    switch (act) {
        case ACT_SIGMOID: activation_backward_loop<ACT_SIGMOID>(dy, y, x, dx, n, param); break;
        case ACT_TANH: activation_backward_loop<ACT_TANH>(dy, y, x, dx, n, param); break;
        case ACT_ELU: activation_backward_loop<ACT_ELU>(dy, y, x, dx, n, param); break;
        case ACT_SELU: activation_backward_loop<ACT_SELU>(dy, y, x, dx, n, param); break;
        case ACT_LEAKY_RELU: activation_backward_loop<ACT_LEAKY_RELU>(dy, y, x, dx, n, param); break;
        case ACT_SOFTPLUS: activation_backward_loop<ACT_SOFTPLUS>(dy, y, x, dx, n, param); break;
        case ACT_SILU: activation_backward_loop<ACT_SILU>(dy, y, x, dx, n, param); break;
        case ACT_GELU: activation_backward_loop<ACT_GELU>(dy, y, x, dx, n, param); break;
        case ACT_GELU_TANH: activation_backward_loop<ACT_GELU_TANH>(dy, y, x, dx, n, param); break;
        case ACT_RELU6: activation_backward_loop<ACT_RELU6>(dy, y, x, dx, n, param); break;
        default: break;
    }
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
                const unsigned long long* __restrict__ seeds, const int* __restrict__ step, int slot, int slots,
                long long first) {
    const unsigned long long seed = seeds[(long long)step[0] * slots + slot];
    GRID_STRIDE_LOOP(i, n) {
        const float m = uniform01(seed, (unsigned long long)(first + i)) >= rate ? scale : 0.0f;
        mask[i] = m;
        y[i] = x[i] * m;
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
dropout_backward(const float* dy, const float* mask, float* dx, long long n) {
    GRID_STRIDE_LOOP(i, n) dx[i] = dy[i] * mask[i];
}
