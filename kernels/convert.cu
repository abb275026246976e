// Dtype conversion.
//
// cast_f32_to_bf16: out[i] = bf16(in[i]) (round to nearest even), i < n. Used by the training
// step to hand the f32 dlogits chunk of the log-softmax backward to the bf16 lm_head GEMM
// (cuBLAS needs A and B of one type). Grid-stride over vectors of 8 elements (two 16-byte loads,
// one 16-byte store) when in and out are 16-byte aligned, then the n % 8 tail one at a time;
// scalar otherwise. Launcher (src/cuda/train.rs): ceil(n/8) threads' worth of 256-thread blocks,
// capped at 65535 blocks; any grid/block is correct.

#include "common.cuh"

extern "C" __global__ void cast_f32_to_bf16(bf16* __restrict__ out, const float* __restrict__ in, size_t n) {
    const size_t tid = (size_t)blockIdx.x * blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
    size_t done = 0;
    if (vec16_ok(out) && vec16_ok(in)) {
        const size_t nv = n / 8;
        for (size_t v = tid; v < nv; v += stride) {
            float a[4], b[4], o[8];
            load4_f32(in + 8 * v, a);
            load4_f32(in + 8 * v + 4, b);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                o[j] = a[j];
                o[j + 4] = b[j];
            }
            store8_bf16(out + 8 * v, o);
        }
        done = nv * 8;
    }
    for (size_t i = done + tid; i < n; i += stride) {
        out[i] = f32_to_bf16(in[i]);
    }
}
