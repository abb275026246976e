// Dtype conversion.
//
// cast_f32_to_bf16: out[i] = bf16(in[i]) (round to nearest even), i < n. Used by the training
// step to hand the f32 dlogits chunk of the log-softmax backward to the bf16 lm_head GEMM
// (cuBLAS needs A and B of one type).

#include "common.cuh"

extern "C" __global__ void cast_f32_to_bf16(bf16* __restrict__ out, const float* __restrict__ in, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        out[i] = f32_to_bf16(in[i]);
    }
}
