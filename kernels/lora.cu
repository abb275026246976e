// LoRA on top of a base projection, for rollouts (no merge of W + BA):
//
//     y[n, out] += s · (x[n, in] · A[r, in]ᵀ) · B[out, r]ᵀ
//
// in two small kernels, multiplying through the rank-r side first (as Unsloth's fast_lora):
//   lora_xa_bf16:          xa[n, r] (f32 scratch) = x · Aᵀ   (x bf16, A f32; a warp per (4 rows, j))
//   lora_expand_add_bf16:  y += s · xa · Bᵀ                   (y bf16 in place, B f32; a thread
//                                                              per (column, 32 rows))
// y arrives holding x·Wᵀ (+ bias) from cuBLAS; it is rounded to bf16 once more here. LoRA
// weights are f32 (the design's precision rule), so the adapter is read exactly. Both are the
// helpers of common.cuh ("The rollout's LoRA": the arithmetic order, and why row tiles), shared
// with the grouped kernels of kernels/fused.cu.
// CPU reference: CpuModel::linear (src/cpu/model.rs). Launchers: src/cuda/rollout.rs.

#include "common.cuh"

// xa (rows, rank) f32: xa[row, j] = Σ_i x[row, i] · A[j, i] (lora_xa_rows, common.cuh); x (rows,
// in) bf16, A (rank, in) f32. grid = (ceil(rows / LORA_XA_ROWS), ceil(rank / warps)), block =
// warps·32 (≤ 256): warp w of block (t, g) computes j = g·warps + w for rows t·4 .. t·4 + 3,
// reading its slice of A_j once for them.
extern "C" __global__ void __launch_bounds__(256) lora_xa_bf16(float* __restrict__ xa, const bf16* __restrict__ x,
                                                               const float* __restrict__ a, int rows, int in_dim,
                                                               int rank) {
    const int warps = blockDim.x / WARP_SIZE;
    const int j = blockIdx.y * warps + threadIdx.x / WARP_SIZE;
    const int row0 = blockIdx.x * LORA_XA_ROWS;
    if (row0 >= rows || j >= rank) return;  // whole warp
    lora_xa_rows(xa + (size_t)row0 * rank + j, rank, x + (size_t)row0 * in_dim, a + (size_t)j * in_dim, in_dim,
                 min(LORA_XA_ROWS, rows - row0), threadIdx.x % WARP_SIZE);
}

// y (rows, out) bf16 in place: y[row, o] = bf16(y[row, o] + scale · Σ_j xa[row, j] · B[o, j]);
// xa (rows, rank), B (out, rank) f32. lora_expand_tile (common.cuh) with one projection:
// grid = (ceil(out / LORA_EXPAND_THREADS), ceil(rows / LORA_EXPAND_ROWS)), block =
// LORA_EXPAND_THREADS, dynamic shared memory min(rows, 32) · (128 bf16 + rank f32, the latter
// only for rank ≤ LORA_REG_RANK); thread t of block (cx, ry) owns column cx·128 + t for rows
// ry·32 .. ry·32 + 31, its B row read once.
extern "C" __global__ void __launch_bounds__(LORA_EXPAND_THREADS)
    lora_expand_add_bf16(bf16* __restrict__ y, const float* __restrict__ xa, const float* __restrict__ b, float scale,
                         int rows, int out_dim, int rank) {
    LoraGroup3 g = {};
    g.b[0] = b;
    g.out[0] = out_dim;
    g.n = 1;
    lora_expand_tile(y, out_dim, xa, g, scale, rows, rank);
}
