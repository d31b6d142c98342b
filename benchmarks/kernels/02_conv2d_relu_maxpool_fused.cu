// 02_conv2d_relu_maxpool_fused.cu — version 2 (the library's choice, kernels/conv_pool.cu): one kernel does
// the convolution, bias, relu and the 2x2/2 max-pool; a block computes 4x4 pooled outputs (8x8 conv outputs)
// for 32 filters, each thread 8x2 conv outputs in registers; the conv output never reaches memory, and conv
// rows/columns no window reads are skipped. Same summation order as version 1 (bitwise-equal results).
// Compile: nvcc -arch=sm_90 -cubin -I kernels <this file>.
//
//   x is (N, H, W, C), w is (KH, KW, C, F), pooled is (N, P/2, Q/2, F), idx (int8) likewise
#include "../../kernels/conv_pool.cu"
