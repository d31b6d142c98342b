// merge.cu — the merging layers: Add (elementwise sum) and Concatenate (joining along an axis) with its
// backward, the split (gpucnn.engines.cuda_ops.add / concat / split).
//
//   a, b, y are (n,)                      flat float32 buffers of the same shape (any shape, C order)
//   a part of a concatenation along axis k of arrays (d0, ..., dk, ..., dr) is seen as (outer, inner):
//     outer = d0 * ... * d(k-1)           the rows above the axis (the batch included)
//     inner = dk * d(k+1) * ... * dr      one row of the part: its slab of the axis and everything after it
//   whole is (outer, whole_inner)         the concatenation; the part's rows sit at column `offset` of each row
//
// Kernels (version 1 of each; grid-stride over the elements, block THREADS; deterministic, no atomics):
//   add_forward        y = a + b (in place allowed: y may be a or b, so no __restrict__)
//   copy_into_columns  whole[r, offset + c] = part[r, c]   (Concatenate forward, one launch per part)
//   copy_from_columns  part[r, c] = whole[r, offset + c]   (its backward, one launch per part)
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(THREADS)
add_forward(const float* a, const float* b, float* y, long long n) {
    GRID_STRIDE_LOOP(i, n) y[i] = a[i] + b[i];
}

extern "C" __global__ void __launch_bounds__(THREADS)
copy_into_columns(const float* __restrict__ part, float* __restrict__ whole, long long outer, long long inner,
                  long long whole_inner, long long offset) {
    GRID_STRIDE_LOOP(i, outer * inner) {
        const long long r = i / inner, c = i - r * inner;
        whole[r * whole_inner + offset + c] = part[i];
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
copy_from_columns(const float* __restrict__ whole, float* __restrict__ part, long long outer, long long inner,
                  long long whole_inner, long long offset) {
    GRID_STRIDE_LOOP(i, outer * inner) {
        const long long r = i / inner, c = i - r * inner;
        part[i] = whole[r * whole_inner + offset + c];
    }
}
