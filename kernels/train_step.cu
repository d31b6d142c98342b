// train_step.cu — the kernels of the captured training step that read step-varying values from device memory
// (gpucnn.models.fastpath): batch gather, device shuffling, the step counter and the fused softmax
// cross-entropy with its per-step metric slots. (Dropout and the optimizers read per-step tables too; their
// kernels live with their families, activations.cu and optimizers.cu.)
//
//   x_u8     is (n_total, per_image)   the training images as uint8 (x = x_u8 / 255 exactly), or
//   x_f32    is (n_total, per_image)   the training images as float32 (exactly one of the two is given)
//   onehot   is (n_total, K)           float32 one-hot labels, or
//   labels   is (n_total,)             int32 class labels (exactly one of the two is given)
//   perm     is (n_total,)             int32: this epoch's order of the samples
//   step     is (1,)                   int32: the step of the epoch the step being run is (the device counter)
//   xb       is (rows, per_image)      the batch's images (float32); onehot_b (rows, K) / labels_b (rows,)
//   keys     is (n_total,)             uint64 sort keys whose argsort is the epoch's permutation
//   logits   is (N, K)                 the model's last pre-softmax values; dz (N, K) their gradient
//   loss_steps is (steps,)             float32: the sum over the batch of the per-sample loss, per step
//   correct_steps is (steps,)          int32: how many rows of the batch were classified right, per step
//
// Step-varying values never appear as kernel arguments (they would be frozen into the CUDA graph): the
// kernels read the counter `step` and index the per-epoch tables with it; step_advance, the step's last
// kernel, increments it. The host resets it to 0 and uploads the tables before each epoch.
//
// Kernels (version 1 of each; all used by gpucnn/fastpath.py):
//   permutation_keys          keys[i] = (33 random bits of mix64(seed, i)) << 31 | i: distinct keys, so their
//                             argsort (cupy.argsort, outside the graph) is a uniform-enough permutation that
//                             depends on the seed only. Grid-stride, block THREADS.
//   gather_batch              xb[r] = x[perm[step*batch + r]] (uint8 / 255.0f, an IEEE division: the same
//                             bits as numpy's float32 x / 255), and the label rows likewise.
//                             Grid (blocks over per_image, rows), IMAGE_LOOP / ELEMENT_LOOP; block THREADS.
//   step_advance              step[0] += 1 (grid 1, block 1)
//   softmax_crossentropy_step_{onehot,sparse}
//                             one block of THREADS threads, a thread per row (strided): p = softmax(logits)
//                             exactly as softmax_forward, the loss exactly as crossentropy_forward (renormalise,
//                             clip), dz = (p - y) / N as softmax_crossentropy_backward, the first arg-max of
//                             p against the label as count_correct; then fixed-order block sums of the loss
//                             and the count, written to loss_steps[step] and correct_steps[step]. No atomics.
//                             from_logits (a linear output under a from_logits loss): the loss and dz exactly
//                             as crossentropy_forward / crossentropy_backward with from_logits (no clip), the
//                             first arg-max of the logits as count_correct counts on the model's output.
//                             keep, offset: label smoothing of one-hot labels (1, 0 without), as the loss's
//                             targets y·(1 - s) + s / K; the accuracy counts against the labels as given.
//   sigmoid_binary_crossentropy_step
//                             the same for a sigmoid output under a binary cross-entropy (labels (N, U) float
//                             0/1): the loss, its gradient at the logits and the binary accuracy count;
//                             from_logits: the loss of logits, and the count on the logits (output > 0.5, the
//                             threshold Keras's binary accuracy applies to the model's output). keep, half: label
//                             smoothing as binary_crossentropy_forward takes it (y·(1 - s) + s / 2).
#include "common.cuh"

#ifndef EPSILON
#define EPSILON 1e-7f  // Keras's backend epsilon, as in loss.cu
#endif

// ------------------------------------------------------------------------------------ shuffling
extern "C" __global__ void __launch_bounds__(THREADS)
permutation_keys(unsigned long long* __restrict__ keys, int n_total, unsigned long long seed) {
    GRID_STRIDE_LOOP(i, n_total) {
        const unsigned long long bits = mix64(mix64(seed + 0x9e3779b97f4a7c15ULL) + (unsigned long long)i);
        keys[i] = (bits & 0xffffffff80000000ULL) | (unsigned long long)i;  // i < 2^31: the low 31 bits
    }
}

// ------------------------------------------------------------------------------------ the batch
// grid (ceil(per_image / THREADS) capped, rows capped); rows <= batch; step*batch + rows <= n_total (the host
// plans the graphs so). Label rows are copied by the threads with e < K (one-hot) or e == 0 (sparse).
extern "C" __global__ void __launch_bounds__(THREADS)
gather_batch(const unsigned char* __restrict__ x_u8_or_null, const float* __restrict__ x_f32_or_null,
             const float* __restrict__ onehot_or_null, const int* __restrict__ labels_or_null,
             const int* __restrict__ perm, const int* __restrict__ step, float* __restrict__ xb,
             float* __restrict__ onehot_b_or_null, int* __restrict__ labels_b_or_null,
             int n_total, int batch, int rows, int per_image, int K) {
    const long long base = (long long)step[0] * batch;
    IMAGE_LOOP(r, rows) {
        const long long slot = base + r;
        const int src = slot < n_total ? perm[slot] : 0;  // (never out of range when planned right)
        float* dst = xb + (long long)r * per_image;
        if (x_u8_or_null) {
            const unsigned char* s = x_u8_or_null + (long long)src * per_image;
            ELEMENT_LOOP(e, per_image) dst[e] = (float)s[e] / 255.0f;
        } else {
            const float* s = x_f32_or_null + (long long)src * per_image;
            ELEMENT_LOOP(e, per_image) dst[e] = s[e];
        }
        if (onehot_or_null) {
            ELEMENT_LOOP(e, K) onehot_b_or_null[(long long)r * K + e] = onehot_or_null[(long long)src * K + e];
        } else {
            ELEMENT_LOOP(e, 1) labels_b_or_null[r] = labels_or_null[src];
        }
    }
}

extern "C" __global__ void step_advance(int* __restrict__ step) {
    if (threadIdx.x == 0 && blockIdx.x == 0) step[0] += 1;
}

// ------------------------------------------------------------------------------------ loss
// A one-hot label under label smoothing: y·keep + offset (keep = 1 - s, offset = s / K), rounded after the product and
// after the sum, as the plain path's two array operations round (no fused multiply-add). keep 1, offset 0: y itself.
__device__ __forceinline__ float smoothed(float y, float keep, float offset) {
    return __fadd_rn(__fmul_rn(y, keep), offset);
}

template <bool SPARSE>
__device__ __forceinline__ void softmax_crossentropy_rows(const float* __restrict__ logits,
                                                          const float* __restrict__ onehot,
                                                          const int* __restrict__ labels,
                                                          float* __restrict__ dz,
                                                          float* __restrict__ loss_steps,
                                                          int* __restrict__ correct_steps,
                                                          const int* __restrict__ step, int N, int K,
                                                          int from_logits, float keep, float offset) {
    __shared__ float loss_scratch[THREADS];
    __shared__ long long count_scratch[THREADS];
    float my_loss = 0.0f;
    long long my_correct = 0;
    for (int r = threadIdx.x; r < N; r += blockDim.x) {
        const float* xr = logits + (long long)r * K;
        float* dr = dz + (long long)r * K;
        const int label = SPARSE ? labels[r] : 0;
        const bool bad = SPARSE && (label < 0 || label >= K);
        // softmax, as softmax_forward: first maximum, sum of exp in order, exp / sum
        float top = xr[0];
        for (int k = 1; k < K; ++k)
            if (max_replaces(xr[k], top)) top = xr[k];
        float sum = 0.0f;
        for (int k = 0; k < K; ++k) sum += expf(xr[k] - top);
        if (from_logits) {
            // as crossentropy_forward / crossentropy_backward from logits: -sum y log_softmax(z), and
            // dz = (softmax(z) sum(y) - y) / N; the first arg-max of the logits
            const float log_total = logf(sum);
            float targets = SPARSE ? 1.0f : 0.0f;  // sum(y): one 1 for a class index
            if (!SPARSE)
                for (int k = 0; k < K; ++k) targets += smoothed(onehot[(long long)r * K + k], keep, offset);
            float ce = 0.0f;
            for (int k = 0; k < K; ++k) {
                const float y = SPARSE ? (k == label ? 1.0f : 0.0f) : smoothed(onehot[(long long)r * K + k], keep, offset);
                ce += y * ((xr[k] - top) - log_total);
                dr[k] = bad ? quiet_nan() : (expf((xr[k] - top) - log_total) * targets - y) / (float)N;
            }
            my_loss += bad ? quiet_nan() : -ce;
            my_correct += first_argmax(xr, K) == (SPARSE ? label : first_argmax(onehot + (long long)r * K, K));
            continue;
        }
        // the loss, as crossentropy_forward on p: renormalise, clip, -sum y log q
        float total = 0.0f;
        for (int k = 0; k < K; ++k) total += expf(xr[k] - top) / sum;
        float ce = 0.0f;
        int best = 0;
        float best_p = 0.0f;
        int truth = label;
        float truth_best = 0.0f;
        for (int k = 0; k < K; ++k) {
            const float p = expf(xr[k] - top) / sum;
            const float label_k = SPARSE ? (k == label ? 1.0f : 0.0f) : onehot[(long long)r * K + k];
            const float y = SPARSE ? label_k : smoothed(label_k, keep, offset);
            ce += y * logf(clip_probability(p / total, EPSILON));
            dr[k] = bad ? quiet_nan() : (p - y) / (float)N;
            if (k == 0 || max_replaces(p, best_p)) {
                best = k;
                best_p = p;
            }
            if (!SPARSE && (k == 0 || max_replaces(label_k, truth_best))) {  // the labels as given
                truth = k;
                truth_best = label_k;
            }
        }
        my_loss += bad ? quiet_nan() : -ce;
        my_correct += best == truth;
    }
    const float loss_sum = block_sum(my_loss, loss_scratch);
    const long long correct = block_sum(my_correct, count_scratch);
    if (threadIdx.x == 0) {
        loss_steps[step[0]] = loss_sum;
        correct_steps[step[0]] = (int)correct;
    }
}

// grid 1, block THREADS
extern "C" __global__ void __launch_bounds__(THREADS)
softmax_crossentropy_step_onehot(const float* __restrict__ logits, const float* __restrict__ onehot,
                                 float* __restrict__ dz, float* __restrict__ loss_steps,
                                 int* __restrict__ correct_steps, const int* __restrict__ step, int N, int K,
                                 int from_logits, float keep, float offset) {
    softmax_crossentropy_rows<false>(logits, onehot, nullptr, dz, loss_steps, correct_steps, step, N, K, from_logits,
                                     keep, offset);
}

extern "C" __global__ void __launch_bounds__(THREADS)
softmax_crossentropy_step_sparse(const float* __restrict__ logits, const int* __restrict__ labels,
                                 float* __restrict__ dz, float* __restrict__ loss_steps,
                                 int* __restrict__ correct_steps, const int* __restrict__ step, int N, int K,
                                 int from_logits, float keep, float offset) {
    softmax_crossentropy_rows<true>(logits, nullptr, labels, dz, loss_steps, correct_steps, step, N, K, from_logits,
                                    keep, offset);
}

// grid 1, block THREADS: the binary cross-entropy of a sigmoid output, as the plain step computes it: p =
// sigmoid(z) (activations.cu's sigmoid), the loss as binary_crossentropy_forward on p (clip, the U terms in
// order, / U), dz = (p - y) / (N·U) as sigmoid_binary_crossentropy_backward, the correct count as
// count_binary_correct ((p > 0.5) == y); fixed-order block sums into the step's slots. from_logits: the loss of
// the logits z as binary_crossentropy_forward computes it, the count of (z > 0.5) == y.
extern "C" __global__ void __launch_bounds__(THREADS)
sigmoid_binary_crossentropy_step(const float* __restrict__ logits, const float* __restrict__ labels,
                                 float* __restrict__ dz, float* __restrict__ loss_steps,
                                 int* __restrict__ correct_steps, const int* __restrict__ step, int N, int U,
                                 int from_logits, float keep, float half) {
    __shared__ float loss_scratch[THREADS];
    __shared__ long long count_scratch[THREADS];
    float my_loss = 0.0f;
    long long my_correct = 0;
    const float total = (float)N * (float)U;
    for (int r = threadIdx.x; r < N; r += blockDim.x) {
        float row = 0.0f;
        for (int u = 0; u < U; ++u) {
            const long long i = (long long)r * U + u;
            const float z = logits[i];
            const float p = sigmoid(z);
            const float y = labels[i] * keep + half;  // label smoothing, as binary_crossentropy_forward (loss.cu)
            if (from_logits) {
                row += (z > 0.0f ? z : 0.0f) - z * y + log1pf(expf(-fabsf(z)));
            } else {
                const float q = clip_probability(p, EPSILON);
                row += -(y * logf(q) + (1.0f - y) * logf(1.0f - q));
            }
            dz[i] = (p - y) / total;
            my_correct += ((from_logits ? z : p) > 0.5f ? 1.0f : 0.0f) == labels[i];  // the labels as given
        }
        my_loss += row / (float)U;
    }
    const float loss_sum = block_sum(my_loss, loss_scratch);
    const long long correct = block_sum(my_correct, count_scratch);
    if (threadIdx.x == 0) {
        loss_steps[step[0]] = loss_sum;
        correct_steps[step[0]] = (int)correct;
    }
}
