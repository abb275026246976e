// Elementwise and row-gather kernels of the decoder forward: token embedding, RoPE, SwiGLU,
// bias and residual adds. bf16 storage, f32 arithmetic, one rounding at each store.
//
// CPU references: src/cpu/ops.rs (rope_inplace, swiglu_fwd, add_bias) and the embedding copy in
// src/cpu/model.rs. Rust launchers: src/cuda/rollout.rs.

#include "common.cuh"

// ----------------------------------------------------------------------------
// CUDA kernels

// out[r, :] = table[ids[r], :].  table: (vocab, dim); ids: (rows) u32; out: (rows, dim).
// An id >= vocab (a bug upstream: the launcher cannot see device ids) writes a zero row.
// grid = rows, block = multiple of 32.
extern "C" __global__ void embedding_fwd_bf16(bf16* __restrict__ out, const bf16* __restrict__ table,
                                              const uint32_t* __restrict__ ids, int rows, int dim,
                                              int vocab) {
    const int r = blockIdx.x;
    if (r >= rows) return;
    const uint32_t id = ids[r];
    bf16* dst = out + (size_t)r * dim;
    if (id >= (uint32_t)vocab) {
        for (int i = threadIdx.x; i < dim; i += blockDim.x) dst[i] = f32_to_bf16(0.0f);
        return;
    }
    const bf16* src = table + (size_t)id * dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) dst[i] = src[i];
}

// RoPE (HF rotate_half layout), in place on q (rows, n_heads, hd) and k (rows, n_kv_heads, hd):
//   angle_i = (float)pos[r] * inv_freq[i]           (f32, as src/cpu/ops.rs::rope_inplace)
//   (x_i, x_{i+hd/2}) <- (x_i cos - x_{i+hd/2} sin, x_{i+hd/2} cos + x_i sin),  i < hd/2
// pos: (rows) i32; inv_freq: (hd/2) f32 from ModelConfig::rope_inv_freq (default or llama3).
// rope_rows_bf16 (common.cuh): sincos once per (row, i) in shared memory, reused by every head;
// 8 pairs per thread with 16-byte accesses when hd % 16 == 0 and q, k are 16-byte aligned.
// grid = ceil(rows / ROPE_ROWS), block = ROPE_THREADS, dynamic shared memory 2·ROPE_ROWS·(hd/2)
// f32. sincosf is the accurate version (nvcc without --use_fast_math), ≤ 2 ulp like the CPU's.
extern "C" __global__ void rope_fwd_bf16(bf16* __restrict__ q, bf16* __restrict__ k,
                                         const int* __restrict__ pos, const float* __restrict__ inv_freq,
                                         int rows, int n_heads, int n_kv_heads, int hd) {
    rope_rows_bf16<false>(q, k, pos, inv_freq, rows, n_heads, n_kv_heads, hd);
}


// The grid-stride kernels below take 8 elements per thread per step (16-byte loads and stores)
// when every pointer is 16-byte aligned (and, for the row-structured ones, the
// row length a multiple of 8), then finish the n % 8 tail one element at a time; otherwise
// they run the scalar loop over all elements. Each element's arithmetic is the same in both
// paths, so the result does not depend on the path. Launchers: ceil(n/8) threads' worth of
// blocks of 256 (capped at 65535 blocks; the loops stride past the cap).

// out[i] = silu(gate[i]) · up[i] over n elements (any shape). grid-stride; any grid/block.
extern "C" __global__ void swiglu_fwd_bf16(bf16* __restrict__ out, const bf16* __restrict__ gate,
                                           const bf16* __restrict__ up, size_t n) {
    const size_t tid = (size_t)blockIdx.x * blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
    size_t done = 0;
    if (vec16_ok(out) && vec16_ok(gate) && vec16_ok(up)) {
        const size_t nv = n / 8;
        for (size_t v = tid; v < nv; v += stride) {
            float g[8], u[8];
            load8_bf16(gate + 8 * v, g);
            load8_bf16(up + 8 * v, u);
#pragma unroll
            for (int j = 0; j < 8; ++j) g[j] = silu_f32(g[j]) * u[j];
            store8_bf16(out + 8 * v, g);
        }
        done = nv * 8;
    }
    for (size_t i = done + tid; i < n; i += stride) {
        out[i] = f32_to_bf16(silu_f32(bf16_to_f32(gate[i])) * bf16_to_f32(up[i]));
    }
}

// Fused gate‖up layout: gate_up (rows, 2·inter) with gate = columns [0, inter) and up =
// [inter, 2·inter) (one GEMM against the concatenated weights); out (rows, inter).
// grid-stride over rows·inter (vectors of 8 when inter % 8 == 0); any grid/block.
extern "C" __global__ void swiglu_fused_fwd_bf16(bf16* __restrict__ out, const bf16* __restrict__ gate_up,
                                                 int rows, int inter) {
    const size_t n = (size_t)rows * inter;
    const size_t tid = (size_t)blockIdx.x * blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
    if (inter % 8 == 0 && vec16_ok(out) && vec16_ok(gate_up)) {
        const size_t per_row = (size_t)(inter / 8), nv = n / 8;
        for (size_t v = tid; v < nv; v += stride) {
            const size_t r = div_u64_fast(v, per_row);
            const size_t c = (v - r * per_row) * 8;
            const bf16* row = gate_up + r * 2 * inter;
            float g[8], u[8];
            load8_bf16(row + c, g);
            load8_bf16(row + inter + c, u);
#pragma unroll
            for (int j = 0; j < 8; ++j) g[j] = silu_f32(g[j]) * u[j];
            store8_bf16(out + 8 * v, g);
        }
        return;
    }
    for (size_t i = tid; i < n; i += stride) {
        const size_t r = i / inter;
        const size_t c = i % inter;
        const bf16* row = gate_up + r * 2 * inter;
        out[i] = f32_to_bf16(silu_f32(bf16_to_f32(row[c])) * bf16_to_f32(row[inter + c]));
    }
}

// y[r, c] += b[c]: y (rows, dim) in place, b (dim). grid-stride over rows·dim (vectors of 8
// when dim % 8 == 0).
extern "C" __global__ void add_bias_bf16(bf16* __restrict__ y, const bf16* __restrict__ b, int rows, int dim) {
    const size_t n = (size_t)rows * dim;
    const size_t tid = (size_t)blockIdx.x * blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
    if (dim % 8 == 0 && vec16_ok(y) && vec16_ok(b)) {
        const size_t per_row = (size_t)(dim / 8), nv = n / 8;
        for (size_t v = tid; v < nv; v += stride) {
            float a[8], c[8];
            load8_bf16(y + 8 * v, a);
            load8_bf16(b + (v - div_u64_fast(v, per_row) * per_row) * 8, c);
#pragma unroll
            for (int j = 0; j < 8; ++j) a[j] = a[j] + c[j];
            store8_bf16(y + 8 * v, a);
        }
        return;
    }
    for (size_t i = tid; i < n; i += stride) {
        y[i] = f32_to_bf16(bf16_to_f32(y[i]) + bf16_to_f32(b[i % dim]));
    }
}

// x[i] += y[i] over n elements (the residual stream update). grid-stride.
extern "C" __global__ void residual_add_bf16(bf16* __restrict__ x, const bf16* __restrict__ y, size_t n) {
    const size_t tid = (size_t)blockIdx.x * blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
    size_t done = 0;
    if (vec16_ok(x) && vec16_ok(y)) {
        const size_t nv = n / 8;
        for (size_t v = tid; v < nv; v += stride) {
            float a[8], c[8];
            load8_bf16(x + 8 * v, a);
            load8_bf16(y + 8 * v, c);
#pragma unroll
            for (int j = 0; j < 8; ++j) a[j] = a[j] + c[j];
            store8_bf16(x + 8 * v, a);
        }
        done = nv * 8;
    }
    for (size_t i = done + tid; i < n; i += stride) {
        x[i] = f32_to_bf16(bf16_to_f32(x[i]) + bf16_to_f32(y[i]));
    }
}
