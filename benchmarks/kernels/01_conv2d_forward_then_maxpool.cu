// 01_conv2d_forward_then_maxpool.cu — version 1 (the baseline): the library's unfused pair, conv2d_forward
// (kernels/conv2d.cu: 8x8 output tile x 32 filters a block, bias + relu fused) then maxpool2d_forward
// (kernels/pool2d.cu: one thread per pooled element). Two launches; the conv output (N, P, Q, F) makes a
// round trip through memory (L2 at batch 64). Compile: nvcc -arch=sm_90 -cubin -I kernels <this file>.
//
//   x is (N, H, W, C), w is (KH, KW, C, F), y (conv) is (N, P, Q, F), pooled is (N, P/2, Q/2, F)
#include "../../kernels/conv2d.cu"
#include "../../kernels/pool2d.cu"
