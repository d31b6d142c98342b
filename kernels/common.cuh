// common.cuh — helpers shared by every kernel file of gpucnn (kernels/*.cu).
//
// gpucnn/cuda.py pastes this header into each .cu source in place of its `#include "common.cuh"` line
// before compiling, so a change here changes every module's source text, and with it CuPy's cache key.
// Each .cu file also compiles on its own with `-I kernels/`.
//
// Contents:
//   THREADS                      threads per block of the 1-D kernels (elementwise and one-thread-per-row)
//   grid-stride loops            64-bit flat element counts (GRID_STRIDE_LOOP) or images x elements of one
//                                image (IMAGE_LOOP, ELEMENT_LOOP), so grids capped below the hardware
//                                limits cover tensors of any size
//   windows_reading()            which pooling/conv windows read a given input (for the gathers)
//   stage_input_patch()          a convolution tile's input patch (halo, zero padding) into shared memory
//                                (conv2d_forward, conv2d_relu_maxpool_forward)
//   maxpool_backward_gather()    max-pooling's gradient at one input element: the sum of dy over the windows
//                                whose idx names it (maxpool2d_backward, maxpool2d_relu_backward)
//   ACT_NONE / ACT_RELU, relu()  the activations fused into conv2d and dense (softmax is a kernel of its own)
//   sigmoid(), softplus()        overflow-free forms (activations.cu, the binary cross-entropy of loss.cu)
//   max_replaces()               the "first maximum wins, a NaN beats everything, the first NaN stays" rule
//                                of max-pooling and arg-max, as in the NumPy engine
//   first_argmax()               the index of a row's first maximum by that rule (count_correct)
//   clip_probability()           Keras's clip of a probability to [epsilon, 1 - epsilon] (the losses)
//   block_sum()                  a fixed-order shared-memory reduction (deterministic), float or long long
//   adam_update_element()        Adam's update of one parameter (optimizers.cu's adam_update)
//   uniform01()                  counter-based random numbers: a pure function of (seed, counter)
#ifndef GPUCNN_COMMON_CUH
#define GPUCNN_COMMON_CUH

#ifndef THREADS
#define THREADS 256
#endif

// ------------------------------------------------------------------------------------ indexing
__device__ __forceinline__ long long global_thread_index() {
    return (long long)blockIdx.x * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ long long global_thread_count() {
    return (long long)gridDim.x * blockDim.x;
}

// for (long long i = first index of this thread; i < n; i += every thread of the grid)
#define GRID_STRIDE_LOOP(i, n) \
    for (long long i = global_thread_index(); i < (long long)(n); i += global_thread_count())

// Kernels that decode an element's coordinates work image by image, so that the divisions stay 32-bit
// (a 64-bit division is a slow subroutine call): grid y strides over the N images (N may exceed the grid-y
// limit of 65,535), grid x over the elements of one image (int: gpucnn/ops_cuda.py checks that the count
// plus gridDim.x * blockDim.x stays below 2^31, so the index cannot overflow).
#define IMAGE_LOOP(n, N) for (int n = blockIdx.y; n < (N); n += gridDim.y)
#define ELEMENT_LOOP(e, count) \
    for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < (count); e += gridDim.x * blockDim.x)

// ------------------------------------------------------------------------------------ window geometry
// Along one axis, window o (o = 0 .. out-1) of size k at stride s reads the inputs o*s - pad .. o*s - pad
// + k - 1. Sets [first, last] to the windows that read input `pos` (first > last when none); tap
// pos + pad - o*s of window o is the one that reads it, so going from last down to first visits the taps
// in increasing order.
__device__ __forceinline__ void windows_reading(int pos, int k, int s, int pad, int out, int& first,
                                                int& last) {
    const int lo = pos + pad - k + 1;  // o*s >= lo
    first = lo <= 0 ? 0 : (lo + s - 1) / s;
    last = min((pos + pad) / s, out - 1);
}

// ------------------------------------------------------------------------------------ activations
#define ACT_NONE 0
#define ACT_RELU 1

// max(v, 0) that keeps a NaN a NaN (as numpy.maximum does; fmaxf would turn it into 0)
__device__ __forceinline__ float relu(float v) { return v < 0.0f ? 0.0f : v; }

__device__ __forceinline__ float apply_activation(float v, int act) {
    return act == ACT_RELU ? relu(v) : v;
}

// 1 / (1 + e^-v) without overflow: e^-|v| <= 1, and e^v / (1 + e^v) below zero. A NaN stays a NaN.
__device__ __forceinline__ float sigmoid(float v) {
    const float e = expf(-fabsf(v));
    const float r = 1.0f / (1.0f + e);
    return v >= 0.0f ? r : e * r;
}

// log(1 + e^v) = max(v, 0) + log1p(e^-|v|) without overflow. A NaN stays a NaN (through log1pf).
__device__ __forceinline__ float softplus(float v) {
    return (v > 0.0f ? v : 0.0f) + log1pf(expf(-fabsf(v)));
}

__device__ __forceinline__ float negative_infinity() { return -__int_as_float(0x7f800000); }
__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }

// Whether value v takes the place of the best so far in a scan for the first maximum: a larger value
// does, and a NaN does unless the best is already a NaN (so the first NaN is kept).
__device__ __forceinline__ bool max_replaces(float v, float best) {
    return v > best || (isnan(v) && !isnan(best));
}

// The index of the first maximum of row[0..K) (a NaN wins, the first NaN stays), as numpy.argmax.
__device__ __forceinline__ int first_argmax(const float* row, int K) {
    int best = 0;
    for (int k = 1; k < K; ++k)
        if (max_replaces(row[k], row[best])) best = k;
    return best;
}

// q clipped to [epsilon, 1 - epsilon]; a NaN stays a NaN (as numpy.clip). Callers pass their EPSILON.
__device__ __forceinline__ float clip_probability(float q, float epsilon) {
    return q < epsilon ? epsilon : (q > 1.0f - epsilon ? 1.0f - epsilon : q);
}

// ------------------------------------------------------------------------------------ convolution, pooling
// Stages input channels c0 .. c0 + cn - 1 of the patch_h x patch_w patch whose first cell is input row row0,
// column col0 of x_image (H, W, C) into patch[(pr * patch_w + pc) * cn + c], zeros outside [0, H) x [0, W).
// Every thread of the block (BLOCK_THREADS of them, tid = its flat index) must call it: it waits until the
// previous chunk is no longer read, and again until the patch is complete.
template <int BLOCK_THREADS>
__device__ __forceinline__ void stage_input_patch(float* patch, const float* __restrict__ x_image, int H, int W,
                                                  int C, int row0, int col0, int patch_h, int patch_w, int c0,
                                                  int cn, int tid) {
    __syncthreads();  // the previous chunk is no longer read
    for (int e = tid; e < patch_h * patch_w * cn; e += BLOCK_THREADS) {
        const int c = e % cn;
        const int pc = (e / cn) % patch_w;
        const int pr = e / (cn * patch_w);
        const int hh = row0 + pr, ww = col0 + pc;
        patch[e] = (hh >= 0 && hh < H && ww >= 0 && ww < W)
                       ? x_image[((long long)hh * W + ww) * C + c0 + c] : 0.0f;
    }
    __syncthreads();
}

// Max-pooling's gradient at input element (hh, ww, c): the sum of dy over the windows whose idx (the
// scan-order tap i*PW + j of each window's first maximum) points at it, taps in increasing scan order as
// ops_numpy adds them. dy, idx and y are one image's (P, Q, C) pooled arrays. GATED: also sets `gate` to
// whether such a window's pooled value y is > 0 (they all hold this element's value), else leaves it.
// The loops stay rolled: unrolled, they spill in maxpool2d_relu_backward under NVRTC 13's ptxas (and their
// trip counts are ceil(PH / sh) and ceil(PW / sw) at most: 1 for the usual 2x2 pooling at stride 2).
template <bool GATED>
__device__ __forceinline__ float maxpool_backward_gather(const float* __restrict__ dy,
                                                         const signed char* __restrict__ idx,
                                                         const float* __restrict__ y, int hh, int ww, int c,
                                                         int C, int P, int Q, int PH, int PW, int sh, int sw,
                                                         int pad_top, int pad_left, float& gate) {
    int p_first, p_last, q_first, q_last;
    windows_reading(hh, PH, sh, pad_top, P, p_first, p_last);
    windows_reading(ww, PW, sw, pad_left, Q, q_first, q_last);
    float acc = 0.0f;
#pragma unroll 1
    for (int p = p_last; p >= p_first; --p) {  // taps i = hh + pad_top - p*sh, increasing
        const int i = hh + pad_top - p * sh;
#pragma unroll 1
        for (int q = q_last; q >= q_first; --q) {
            const int j = ww + pad_left - q * sw;
            const long long o = ((long long)p * Q + q) * C + c;
            if (idx[o] == i * PW + j) {
                acc += dy[o];
                if (GATED) gate = y[o] > 0.0f ? 1.0f : 0.0f;
            }
        }
    }
    return acc;
}

// ------------------------------------------------------------------------------------ reductions
// Sum of one value per thread over the block, in a fixed tree order (T: float or long long). scratch holds
// blockDim.x values; blockDim.x must be a power of two. Every thread of the block must call it; all get the
// sum.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
    const int t = threadIdx.x;
    scratch[t] = v;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half /= 2) {
        if (t < half) scratch[t] += scratch[t + half];
        __syncthreads();
    }
    const T total = scratch[0];
    __syncthreads();  // scratch may be reused right after
    return total;
}

// ------------------------------------------------------------------------------------ optimizers
// Adam's update of parameter i, as Keras computes it: m += (g - m)*(1 - beta_1); v += (g^2 - v)*(1 - beta_2);
// w -= alpha*m / (sqrt(v) + epsilon), alpha = lr*sqrt(1 - beta_2^t) / (1 - beta_1^t).
__device__ __forceinline__ void adam_update_element(float* __restrict__ w, const float* __restrict__ g,
                                                    float* __restrict__ m, float* __restrict__ v, long long i,
                                                    float alpha, float one_minus_beta_1, float one_minus_beta_2,
                                                    float epsilon) {
    const float gi = g[i];
    const float mi = m[i] + (gi - m[i]) * one_minus_beta_1;
    const float vi = v[i] + (gi * gi - v[i]) * one_minus_beta_2;
    m[i] = mi;
    v[i] = vi;
    w[i] -= alpha * mi / (sqrtf(vi) + epsilon);
}

// ------------------------------------------------------------------------------------ random numbers
// A 64-bit bijective mixer (multiply-xorshift rounds): neighbouring inputs give unrelated outputs.
__device__ __forceinline__ unsigned long long mix64(unsigned long long z) {
    z ^= z >> 30;
    z *= 0xbf58476d1ce4e5b9ULL;
    z ^= z >> 27;
    z *= 0x94d049bb133111ebULL;
    z ^= z >> 31;
    return z;
}

// A uniform float in [0, 1) with 24 random bits, a pure function of (seed, counter): the same seed gives
// the same numbers whatever the launch configuration.
__device__ __forceinline__ float uniform01(unsigned long long seed, unsigned long long counter) {
    const unsigned long long bits = mix64(mix64(seed + 0x9e3779b97f4a7c15ULL) + counter);
    return (float)(bits >> 40) * (1.0f / 16777216.0f);
}

#endif  // GPUCNN_COMMON_CUH
