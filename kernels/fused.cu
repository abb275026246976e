// Fused kernels of the rollout forward (src/cuda/engine.rs::forward). In a decode step each
// layer's small kernels move only a few KB per row, so their fixed cost per launch dominates
// (≈ 2–3 µs each on an H200, measured); these do in one launch what took two or three:
//
//   qkv_rope_append_bf16        the stacked q|k|v GEMM output of a row (+ bias) → RoPE'd q into
//                               its own buffer, RoPE'd k and v into the paged KV cache: what
//                               add_bias_bf16 + rope_fwd_bf16 + kv_cache_append_bf16 compute,
//                               with the same roundings (bias add rounded to bf16, RoPE in f32
//                               rounded once)
//   lora_group_xa_bf16 +        the LoRA of up to 3 projections sharing their input (q, k, v;
//   lora_group_expand_add_bf16  gate, up) in 2 launches, bit-identical to lora_xa_bf16 +
//                               lora_expand_add_bf16 per projection
//   residual_rmsnorm_fwd_bf16   x += y (rounded to bf16), then out = rmsnorm(x) · weight: what
//                               residual_add_bf16 + rmsnorm_fwd_bf16 compute (f32 sum of squares
//                               in another order: 8 columns per thread, then the block)
//
// CPU references: src/cpu/ops.rs (rope_inplace, add_bias), src/cpu/model.rs (residual, rmsnorm,
// the KV cache). Rust launchers: src/cuda/fused.rs.

#include "common.cuh"

// Element offset of (position t, kv head 0) of sequence `seq` in a paged cache laid out as
// (num_pages, page_size, n_kv_heads, hd) with block_table (num_seqs, max_pages) (see
// kernels/attention.cu). The caller has bounded t to [0, max_pages·page_size).
static __device__ __forceinline__ size_t fused_kv_slot(const int* __restrict__ block_table, int seq, int t,
                                                       int page_size, int max_pages, int width) {
    const int page = block_table[(size_t)seq * max_pages + t / page_size];
    return ((size_t)page * page_size + t % page_size) * width;
}

// qkv (rows, qd + 2·kvd) bf16, qd = n_heads·hd, kvd = n_kv_heads·hd: per row q | k | v as the
// GEMM (and LoRA) wrote them, WITHOUT bias. bias (qd + 2·kvd) bf16 or null. For row r at
// position pos[r] of sequence row_seq[r]:
//   q_out[r] = rope(bf16(q + b_q))                              (rows, qd)
//   k_cache[(seq, pos)] = rope(bf16(k + b_k)), v_cache[...] = bf16(v + b_v)
// rope as rope_fwd_bf16 (HF rotate_half; angle = (float)pos · inv_freq[i], sincosf, f32, one
// rounding). A row whose pos is outside [0, max_pages·page_size) writes q only (as
// kv_cache_append_bf16 skips it). inv_freq (hd/2) f32. grid = rows, block = multiple of 32
// striding over the (n_heads + n_kv_heads)·hd/2 rotated pairs, then the kvd values of v.
extern "C" __global__ void qkv_rope_append_bf16(bf16* __restrict__ q_out, bf16* __restrict__ k_cache,
                                                bf16* __restrict__ v_cache, const bf16* __restrict__ qkv,
                                                const bf16* __restrict__ bias, const int* __restrict__ pos,
                                                const float* __restrict__ inv_freq,
                                                const int* __restrict__ block_table,
                                                const int* __restrict__ row_seq, int rows, int n_heads,
                                                int n_kv_heads, int hd, int page_size, int max_pages) {
    const int r = blockIdx.x;
    if (r >= rows) return;
    const int half = hd / 2;
    const int qd = n_heads * hd;
    const int kvd = n_kv_heads * hd;
    const bf16* row = qkv + (size_t)r * (qd + 2 * kvd);
    const int p = pos[r];
    const bool to_cache = p >= 0 && p < page_size * max_pages;
    const size_t dst = to_cache ? fused_kv_slot(block_table, row_seq[r], p, page_size, max_pages, kvd) : 0;
    const float pf = (float)p;
    const int pairs = (n_heads + n_kv_heads) * half;
    for (int j = threadIdx.x; j < pairs; j += blockDim.x) {
        const int head = j / half;
        const int i = j % half;
        const int c0 = head * hd + i;  // column of x_i in the row (q heads, then k heads)
        float a = bf16_to_f32(row[c0]);
        float b = bf16_to_f32(row[c0 + half]);
        if (bias != nullptr) {
            a = bf16_to_f32(f32_to_bf16(a + bf16_to_f32(bias[c0])));
            b = bf16_to_f32(f32_to_bf16(b + bf16_to_f32(bias[c0 + half])));
        }
        float s, c;
        sincosf(pf * inv_freq[i], &s, &c);
        const bf16 lo = f32_to_bf16(a * c - b * s);
        const bf16 hi = f32_to_bf16(b * c + a * s);
        if (head < n_heads) {
            q_out[(size_t)r * qd + c0] = lo;
            q_out[(size_t)r * qd + c0 + half] = hi;
        } else if (to_cache) {
            k_cache[dst + (c0 - qd)] = lo;
            k_cache[dst + (c0 - qd) + half] = hi;
        }
    }
    if (!to_cache) return;
    for (int j = threadIdx.x; j < kvd; j += blockDim.x) {
        float v = bf16_to_f32(row[qd + kvd + j]);
        if (bias != nullptr) v += bf16_to_f32(bias[qd + kvd + j]);
        v_cache[dst + j] = f32_to_bf16(v);
    }
}

// x (rows, dim) bf16 in place: x = bf16(x + y); out (rows, dim) = x · rsqrt(mean(x²) + eps) ·
// weight (f32 arithmetic on the rounded x, one rounding at the store, as rmsnorm_fwd_bf16).
// y (rows, dim), weight (dim) bf16. One block per row; when dim is a multiple of 8, at most
// 8·1024, and x, y, out, weight are 16-byte aligned, each thread owns one 16-byte vector of 8
// columns and keeps it in registers (one load round trip per row: the decode step has few rows,
// so latency, not bandwidth, is the cost); else threads stride over the columns. The sum of
// squares: each thread's 8 in column order, then block_reduce_sum. grid = rows, block =
// ceil(dim / 8) rounded up to a warp, at most 1024 (the launcher's residual_norm_block).
extern "C" __global__ void residual_rmsnorm_fwd_bf16(bf16* __restrict__ out, bf16* __restrict__ x,
                                                     const bf16* __restrict__ y, const bf16* __restrict__ weight,
                                                     float eps, int rows, int dim) {
    const int r = blockIdx.x;
    if (r >= rows) return;  // whole block
    bf16* xr = x + (size_t)r * dim;
    const bf16* yr = y + (size_t)r * dim;
    bf16* orow = out + (size_t)r * dim;
    const bool vec = dim % 8 == 0 && dim <= 8 * (int)blockDim.x && vec16_ok(xr) && vec16_ok(yr) && vec16_ok(orow) &&
                     vec16_ok(weight);
    if (vec) {
        const int c0 = threadIdx.x * 8;
        float v[8];
        float sum_sq = 0.0f;
        if (c0 < dim) {
            float a[8], b[8];
            load8_bf16(xr + c0, a);
            load8_bf16(yr + c0, b);
#pragma unroll
            for (int k = 0; k < 8; ++k) {
                v[k] = bf16_to_f32(f32_to_bf16(a[k] + b[k]));
                sum_sq += v[k] * v[k];
            }
            store8_bf16(xr + c0, v);
        }
        sum_sq = block_reduce_sum(sum_sq);
        const float inv_rms = rsqrtf(sum_sq / (float)dim + eps);
        if (c0 < dim) {
            float w[8], o[8];
            load8_bf16(weight + c0, w);
#pragma unroll
            for (int k = 0; k < 8; ++k) o[k] = v[k] * inv_rms * w[k];
            store8_bf16(orow + c0, o);
        }
        return;
    }
    float sum_sq = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        const bf16 v = f32_to_bf16(bf16_to_f32(xr[i]) + bf16_to_f32(yr[i]));
        xr[i] = v;
        const float f = bf16_to_f32(v);
        sum_sq += f * f;
    }
    sum_sq = block_reduce_sum(sum_sq);
    const float inv_rms = rsqrtf(sum_sq / (float)dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        orow[i] = f32_to_bf16(bf16_to_f32(xr[i]) * inv_rms * bf16_to_f32(weight[i]));
    }
}

// ----------------------------------------------------------------------------
// LoRA of projections that share their input, at once (q, k, v on h; gate, up on h2): the
// helpers of lora_xa_bf16 and lora_expand_add_bf16 (common.cuh, "The rollout's LoRA"), so the
// result is bit-identical to running those per projection, in 2 launches instead of 2·n.
// g (LoraGroup3, common.cuh): projection p has A_p (rank, in), B_p (out_p, rank) f32 and writes
// columns [col_p, col_p + out_p) of the stacked output.

// xa (rows, n·rank) f32: xa[r, p·rank + j] = Σ_i x[r, i] · A_p[j, i] (lora_xa_rows, as
// lora_xa_bf16). x (rows, in) bf16. grid = (ceil(rows / LORA_XA_ROWS), ceil(n·rank / warps)),
// block = warps·32 (≤ 256): warp w of block (t, q) computes the pair pj = q·warps + w = p·rank + j
// for rows t·4 .. t·4 + 3, reading its slice of A_p's row j once for them.
extern "C" __global__ void __launch_bounds__(256)
    lora_group_xa_bf16(float* __restrict__ xa, const bf16* __restrict__ x, LoraGroup3 g, int rows, int in_dim,
                       int rank) {
    const int warps = blockDim.x / WARP_SIZE;
    const int pj = blockIdx.y * warps + threadIdx.x / WARP_SIZE;
    const int row0 = blockIdx.x * LORA_XA_ROWS;
    if (row0 >= rows || pj >= g.n * rank) return;  // whole warp
    const size_t ldxa = (size_t)g.n * rank;
    const float* aj = lora_pick(g.a, pj / rank) + (size_t)(pj % rank) * in_dim;
    lora_xa_rows(xa + (size_t)row0 * ldxa + pj, ldxa, x + (size_t)row0 * in_dim, aj, in_dim,
                 min(LORA_XA_ROWS, rows - row0), threadIdx.x % WARP_SIZE);
}

// y (rows, ldy) bf16 in place: y[r, col_p + o] = bf16(y + scale · Σ_j xa[r, p·rank + j] ·
// B_p[o, j]) for every p < n and o < out_p (lora_expand_tile, as lora_expand_add_bf16).
// grid = (ceil(Σ out_p / LORA_EXPAND_THREADS), ceil(rows / LORA_EXPAND_ROWS)), block =
// LORA_EXPAND_THREADS, dynamic shared memory min(rows, 32) · (128 bf16 + n·rank f32, the latter
// only for rank ≤ LORA_REG_RANK): thread t of block (cx, ry) owns the (cx·128 + t)-th column of
// the projections' outputs laid end to end, for rows ry·32 .. ry·32 + 31.
extern "C" __global__ void __launch_bounds__(LORA_EXPAND_THREADS)
    lora_group_expand_add_bf16(bf16* __restrict__ y, int ldy, const float* __restrict__ xa, LoraGroup3 g, float scale,
                               int rows, int rank) {
    lora_expand_tile(y, ldy, xa, g, scale, rows, rank);
}
