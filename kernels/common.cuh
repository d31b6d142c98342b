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
//   ACT_NONE / ACT_RELU, relu()  the activations fused into conv2d and dense (softmax is a kernel of its own)
//   max_replaces()               the "first maximum wins, a NaN beats everything, the first NaN stays" rule
//                                of max-pooling and arg-max, as in the NumPy engine
//   block_sum_ll()               a fixed-order shared-memory reduction (deterministic)
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

__device__ __forceinline__ float negative_infinity() { return -__int_as_float(0x7f800000); }
__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }

// Whether value v takes the place of the best so far in a scan for the first maximum: a larger value
// does, and a NaN does unless the best is already a NaN (so the first NaN is kept).
__device__ __forceinline__ bool max_replaces(float v, float best) {
    return v > best || (isnan(v) && !isnan(best));
}

// ------------------------------------------------------------------------------------ reductions
// Sum of one value per thread over the block, in a fixed tree order. scratch holds blockDim.x values;
// blockDim.x must be a power of two. Every thread of the block must call it; all get the sum.
__device__ __forceinline__ long long block_sum_ll(long long v, long long* scratch) {
    const int t = threadIdx.x;
    scratch[t] = v;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half /= 2) {
        if (t < half) scratch[t] += scratch[t + half];
        __syncthreads();
    }
    const long long total = scratch[0];
    __syncthreads();  // scratch may be reused right after
    return total;
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
