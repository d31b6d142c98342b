// image.cu — image preprocessing and augmentation as Keras's Rescaling, RandomFlip, RandomRotation,
// RandomZoom, RandomTranslation and RandomContrast compute them (gpucnn.engines.cuda_ops.rescale, flip,
// affine_transform, adjust_contrast). They run on a model's inputs: there is no backward.
//
//   x is (N, H, W, C)     float32 images, channels last; y is the same shape (y must not be x, except in
//                         rescale and adjust_contrast, which read only the elements they write)
//   transforms is (N, 8)  one projective transform per image, [a0, a1, a2, b0, b1, b2, c0, c1]: output pixel
//                         (column j, row i) reads the input at ((a0 j + a1 i + a2) / k, (b0 j + b1 i + b2) / k),
//                         k = c0 j + c1 i + 1, pixel centres at integer coordinates (keras.ops.image.
//                         affine_transform). k == 0 or a non-finite coordinate gives fill_value; coordinates
//                         are clamped to +-2^24 (float32 cannot tell pixels apart beyond)
//   horizontal_or_null, vertical_or_null are (N,) uint8 flags (non-zero: flip that image on that axis)
//   factors is (N,)       contrast factor of each image
//
// Fill modes (an index outside [0, size), along each axis on its own; Keras's rules):
//   FILL_REFLECT   (d c b a | a b c d | d c b a)  about the edge of the last pixel
//   FILL_MIRROR    (d c b | a b c d | c b a)      about the centre of the last pixel
//   FILL_WRAP      (a b c d | a b c d | a b c d)
//   FILL_NEAREST   (a a a a | a b c d | d d d d)
//   FILL_CONSTANT  every tap outside the image reads fill_value
//
// Kernels (version 1 of each):
//   rescale           y = x * scale + offset; grid-stride over all elements, block THREADS
//   flip_images       a gather: y[n, i, j, c] = x[n, v ? H-1-i : i, h ? W-1-j : j, c]; grid (elements of
//                     one image, images), IMAGE_LOOP / ELEMENT_LOOP
//   affine_transform  one thread per output element, same grid: INTERP_NEAREST reads the pixel at the
//                     coordinates rounded half to even; INTERP_BILINEAR weighs the four around them,
//                     (1-fy)(1-fx), (1-fy)fx, fy(1-fx), fy fx, summed in that order (as Keras does)
//   adjust_contrast   one block per (channel, image): the channel's mean over H x W (each thread sums
//                     its pixels in order, then block_sum: a fixed order), then y = (x - mean) * factor +
//                     mean, clipped to [low, high] when clip is set
//   step_row          the random layers' per-image values of this step: out[i] = table[step[0] * row_bytes +
//                     i] for i < bytes (bytes <= row_bytes; a smaller last batch reads the row's first
//                     images). Byte by byte, so one kernel serves the uint8 flags and the float32 values;
//                     grid-stride, block THREADS. step[0] is read on the device, so a captured step reads
//                     a new row at every replay
#include "common.cuh"

#define INTERP_NEAREST 0
#define INTERP_BILINEAR 1
#define FILL_REFLECT 0
#define FILL_MIRROR 1
#define FILL_WRAP 2
#define FILL_NEAREST 3
#define FILL_CONSTANT 4

#define COORDINATE_LIMIT 16777216.0f  // 2^24

extern "C" __global__ void __launch_bounds__(THREADS)
rescale(const float* x, float* y, long long n, float scale, float offset) {
    GRID_STRIDE_LOOP(i, n) y[i] = x[i] * scale + offset;
}

extern "C" __global__ void __launch_bounds__(THREADS)
step_row(const unsigned char* __restrict__ table, const int* __restrict__ step, unsigned char* __restrict__ out,
         long long row_bytes, long long bytes) {
    const unsigned char* row = table + (long long)step[0] * row_bytes;
    GRID_STRIDE_LOOP(i, bytes) out[i] = row[i];
}

extern "C" __global__ void __launch_bounds__(THREADS)
flip_images(const float* __restrict__ x, const unsigned char* __restrict__ horizontal_or_null,
            const unsigned char* __restrict__ vertical_or_null, float* __restrict__ y, int N, int H, int W, int C) {
    const int per_image = H * W * C;
    IMAGE_LOOP(n, N) {
        const bool across = horizontal_or_null != nullptr && horizontal_or_null[n] != 0;
        const bool down = vertical_or_null != nullptr && vertical_or_null[n] != 0;
        const float* image = x + (long long)n * per_image;
        ELEMENT_LOOP(e, per_image) {
            const int c = e % C;
            const int j = (e / C) % W;
            const int i = e / (C * W);
            y[(long long)n * per_image + e] = image[((down ? H - 1 - i : i) * W + (across ? W - 1 - j : j)) * C + c];
        }
    }
}

// a mod m in [0, m) for m > 0 (C's % keeps the sign of a)
__device__ __forceinline__ int floor_mod(int a, int m) {
    const int r = a % m;
    return r < 0 ? r + m : r;
}

// Index i brought into [0, size) by the fill mode (FILL_CONSTANT clamps: the caller reads fill_value for an
// index outside). Reflect and mirror are Keras's triangle waves: mirror has period 2 (size - 1), reflect
// is the mirror of the half-pixel grid (2 i + 1 over 2 size + 1), halved.
__device__ __forceinline__ int fill_index(int i, int size, int fill_mode) {
    if (i >= 0 && i < size) return i;
    if (fill_mode == FILL_WRAP) return floor_mod(i, size);
    if (fill_mode == FILL_MIRROR) {
        if (size == 1) return 0;
        return abs(floor_mod(i + size - 1, 2 * size - 2) - (size - 1));
    }
    if (fill_mode == FILL_REFLECT) return (abs(floor_mod(2 * i + 1 + 2 * size, 4 * size) - 2 * size) - 1) / 2;
    return i < 0 ? 0 : size - 1;  // FILL_NEAREST, FILL_CONSTANT
}

// x[row, col, c] of one image (H, W, C), the indices read through the fill mode.
__device__ __forceinline__ float sample(const float* __restrict__ image, int row, int col, int c, int H, int W,
                                        int C, int fill_mode, float fill_value) {
    if (fill_mode == FILL_CONSTANT && (row < 0 || row >= H || col < 0 || col >= W)) return fill_value;
    return image[((long long)fill_index(row, H, fill_mode) * W + fill_index(col, W, fill_mode)) * C + c];
}

extern "C" __global__ void __launch_bounds__(THREADS)
affine_transform(const float* __restrict__ x, const float* __restrict__ transforms, float* __restrict__ y, int N,
                 int H, int W, int C, int interpolation, int fill_mode, float fill_value) {
    const int per_image = H * W * C;
    IMAGE_LOOP(n, N) {
        const float* t = transforms + 8LL * n;
        const float* image = x + (long long)n * per_image;
        ELEMENT_LOOP(e, per_image) {
            const int c = e % C;
            const float col = (float)((e / C) % W);
            const float row = (float)(e / (C * W));
            const float k = t[6] * col + t[7] * row + 1.0f;
            float xs = (t[0] * col + t[1] * row + t[2]) / k;
            float ys = (t[3] * col + t[4] * row + t[5]) / k;
            float value = fill_value;
            if (k != 0.0f && isfinite(xs) && isfinite(ys)) {
                xs = fminf(fmaxf(xs, -COORDINATE_LIMIT), COORDINATE_LIMIT);
                ys = fminf(fmaxf(ys, -COORDINATE_LIMIT), COORDINATE_LIMIT);
                if (interpolation == INTERP_NEAREST) {
                    value = sample(image, (int)rintf(ys), (int)rintf(xs), c, H, W, C, fill_mode, fill_value);
                } else {
                    const float fy = floorf(ys), fx = floorf(xs);
                    const float wy1 = ys - fy, wx1 = xs - fx;
                    const float wy0 = 1.0f - wy1, wx0 = 1.0f - wx1;
                    const int r0 = (int)fy, c0 = (int)fx;
                    value = (wy0 * wx0) * sample(image, r0, c0, c, H, W, C, fill_mode, fill_value);
                    value += (wy0 * wx1) * sample(image, r0, c0 + 1, c, H, W, C, fill_mode, fill_value);
                    value += (wy1 * wx0) * sample(image, r0 + 1, c0, c, H, W, C, fill_mode, fill_value);
                    value += (wy1 * wx1) * sample(image, r0 + 1, c0 + 1, c, H, W, C, fill_mode, fill_value);
                }
            }
            y[(long long)n * per_image + e] = value;
        }
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
adjust_contrast(const float* x, const float* __restrict__ factors, float* y, int N, int HW, int C, int clip,
                float low, float high) {
    __shared__ float scratch[THREADS];
    IMAGE_LOOP(n, N) {
        for (int c = blockIdx.x; c < C; c += gridDim.x) {
            const float* xc = x + (long long)n * HW * C + c;
            float* yc = y + (long long)n * HW * C + c;
            float mine = 0.0f;
            for (int e = threadIdx.x; e < HW; e += blockDim.x) mine += xc[(long long)e * C];
            const float mean = block_sum(mine, scratch) / (float)HW;  // every thread has read its pixels
            const float f = factors[n];
            for (int e = threadIdx.x; e < HW; e += blockDim.x) {
                float v = (xc[(long long)e * C] - mean) * f + mean;
                if (clip) v = v < low ? low : (v > high ? high : v);  // a NaN stays a NaN, as numpy.clip
                yc[(long long)e * C] = v;
            }
        }
    }
}
