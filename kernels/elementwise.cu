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
// One thread per rotated pair; grid = rows, block strides over (n_heads + n_kv_heads)·hd/2.
// sincosf is the accurate version (nvcc without --use_fast_math), ≤ 2 ulp like the CPU's.
extern "C" __global__ void rope_fwd_bf16(bf16* __restrict__ q, bf16* __restrict__ k,
                                         const int* __restrict__ pos, const float* __restrict__ inv_freq,
                                         int rows, int n_heads, int n_kv_heads, int hd) {
    const int r = blockIdx.x;
    if (r >= rows) return;
    const int half = hd / 2;
    const float p = (float)pos[r];
    const int pairs = (n_heads + n_kv_heads) * half;
    for (int j = threadIdx.x; j < pairs; j += blockDim.x) {
        const int head = j / half;
        const int i = j % half;
        bf16* x = head < n_heads ? q + ((size_t)r * n_heads + head) * hd
                                 : k + ((size_t)r * n_kv_heads + (head - n_heads)) * hd;
        float s, c;
        sincosf(p * inv_freq[i], &s, &c);
        const float a = bf16_to_f32(x[i]);
        const float b = bf16_to_f32(x[i + half]);
        x[i] = f32_to_bf16(a * c - b * s);
        x[i + half] = f32_to_bf16(b * c + a * s);
    }
}

static __device__ __forceinline__ float silu_f32(float g) { return g / (1.0f + expf(-g)); }

// out[i] = silu(gate[i]) · up[i] over n elements (any shape). grid-stride; any grid/block.
extern "C" __global__ void swiglu_fwd_bf16(bf16* __restrict__ out, const bf16* __restrict__ gate,
                                           const bf16* __restrict__ up, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        out[i] = f32_to_bf16(silu_f32(bf16_to_f32(gate[i])) * bf16_to_f32(up[i]));
    }
}

// Fused gate‖up layout: gate_up (rows, 2·inter) with gate = columns [0, inter) and up =
// [inter, 2·inter) (one GEMM against the concatenated weights); out (rows, inter).
// grid-stride over rows·inter; any grid/block.
extern "C" __global__ void swiglu_fused_fwd_bf16(bf16* __restrict__ out, const bf16* __restrict__ gate_up,
                                                 int rows, int inter) {
    const size_t n = (size_t)rows * inter;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / inter;
        const size_t c = i % inter;
        const bf16* row = gate_up + r * 2 * inter;
        out[i] = f32_to_bf16(silu_f32(bf16_to_f32(row[c])) * bf16_to_f32(row[inter + c]));
    }
}

// y[r, c] += b[c]: y (rows, dim) in place, b (dim). grid-stride over rows·dim.
extern "C" __global__ void add_bias_bf16(bf16* __restrict__ y, const bf16* __restrict__ b, int rows, int dim) {
    const size_t n = (size_t)rows * dim;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        y[i] = f32_to_bf16(bf16_to_f32(y[i]) + bf16_to_f32(b[i % dim]));
    }
}

// x[i] += y[i] over n elements (the residual stream update). grid-stride.
extern "C" __global__ void residual_add_bf16(bf16* __restrict__ x, const bf16* __restrict__ y, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        x[i] = f32_to_bf16(bf16_to_f32(x[i]) + bf16_to_f32(y[i]));
    }
}
