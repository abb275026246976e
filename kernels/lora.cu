// LoRA on top of a base projection, for rollouts (no merge of W + BA):
//
//     y[n, out] += s · (x[n, in] · A[r, in]ᵀ) · B[out, r]ᵀ
//
// in two small kernels, multiplying through the rank-r side first (as Unsloth's fast_lora):
//   lora_xa_bf16:          xa[n, r] (f32 scratch) = x · Aᵀ   (x bf16, A f32; one warp per (row, j))
//   lora_expand_add_bf16:  y += s · xa · Bᵀ                   (y bf16 in place, B f32)
// y arrives holding x·Wᵀ (+ bias) from cuBLAS; it is rounded to bf16 once more here. LoRA
// weights are f32 (the design's precision rule), so the adapter is read exactly.
// CPU reference: CpuModel::linear (src/cpu/model.rs). Launchers: src/cuda/rollout.rs.

#include "common.cuh"

// xa[row, j] = Σ_i x[row, i] · A[j, i] (warp_dot_bf16_f32, common.cuh). grid = (rows,
// ceil(rank / warps)), block = multiple of 32: warp w of block (row, g) computes j = g·warps + w.
extern "C" __global__ void lora_xa_bf16(float* __restrict__ xa, const bf16* __restrict__ x,
                                        const float* __restrict__ a, int rows, int in_dim, int rank) {
    const int row = blockIdx.x;
    const int warps = blockDim.x / WARP_SIZE;
    const int j = blockIdx.y * warps + threadIdx.x / WARP_SIZE;
    if (row >= rows || j >= rank) return;  // whole warp
    const int lane = threadIdx.x % WARP_SIZE;
    const float acc = warp_dot_bf16_f32(x + (size_t)row * in_dim, a + (size_t)j * in_dim, in_dim, lane);
    if (lane == 0) xa[(size_t)row * rank + j] = acc;
}

// y[row, o] = bf16(y[row, o] + scale · Σ_j xa[row, j] · B[o, j]) (rank_dot_f32, common.cuh).
// grid = (rows, ceil(out/block)), block = any multiple of 32; one thread per output element.
extern "C" __global__ void lora_expand_add_bf16(bf16* __restrict__ y, const float* __restrict__ xa,
                                                const float* __restrict__ b, float scale, int rows,
                                                int out_dim, int rank) {
    const int row = blockIdx.x;
    const int o = blockIdx.y * blockDim.x + threadIdx.x;
    if (row >= rows || o >= out_dim) return;
    const float acc = rank_dot_f32(xa + (size_t)row * rank, b + (size_t)o * rank, rank);
    bf16* yp = y + (size_t)row * out_dim + o;
    *yp = f32_to_bf16(bf16_to_f32(*yp) + scale * acc);
}
