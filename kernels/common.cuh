// Helpers shared by every kernel in kernels/*.cu.
//
// build.rs compiles all kernels/*.cu as ONE translation unit (a generated unity file that
// #includes each of them), so this header is seen many times: `#pragma once` keeps it to one
// copy, and everything here is `static`/`inline` or a macro. Kernels themselves are
// `extern "C"` with the dtype in the name (`rmsnorm_fwd_bf16`), so Rust finds them by name.
#pragma once

#include <cuda_bf16.h>
#include <stddef.h>
#include <stdint.h>

// ceil(m / n) for launch-grid arithmetic (positive integers).
#define CEIL_DIV(m, n) (((m) + (n) - 1) / (n))

#define WARP_SIZE 32
#define FULL_MASK 0xffffffffu

typedef __nv_bfloat16 bf16;

// ----------------------------------------------------------------------------
// bf16 <-> f32. Storage is bf16, arithmetic is f32; stores round to nearest even.

__device__ __forceinline__ float bf16_to_f32(bf16 v) { return __bfloat162float(v); }
__device__ __forceinline__ bf16 f32_to_bf16(float v) { return __float2bfloat16_rn(v); }

// Overloads so a kernel template can be written once for float and bf16 storage.
__device__ __forceinline__ float load_f32(const float* p) { return *p; }
__device__ __forceinline__ float load_f32(const bf16* p) { return bf16_to_f32(*p); }
__device__ __forceinline__ void store_f32(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_f32(bf16* p, float v) { *p = f32_to_bf16(v); }

// ----------------------------------------------------------------------------
// Reductions. All lanes of a warp must call warp_*; all threads of the block must call
// block_* (they contain __syncthreads) and blockDim.x must be a multiple of 32 (≤ 1024).

__device__ __forceinline__ float warp_reduce_sum(float v) {
    for (int offset = WARP_SIZE / 2; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(FULL_MASK, v, offset);
    }
    return v;
}

__device__ __forceinline__ float warp_reduce_max(float v) {
    for (int offset = WARP_SIZE / 2; offset > 0; offset >>= 1) {
        v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, offset));
    }
    return v;
}

// Sum of `v` over the whole block; every thread gets the result. Each warp reduces, warp
// leaders park their partial in shared memory, then every warp reduces the partials itself
// (no second broadcast barrier needed). The leading __syncthreads makes back-to-back calls safe.
__device__ __forceinline__ float block_reduce_sum(float v) {
    __shared__ float partial[WARP_SIZE];
    const int lane = threadIdx.x % WARP_SIZE;
    const int warp = threadIdx.x / WARP_SIZE;
    const int num_warps = blockDim.x / WARP_SIZE;
    v = warp_reduce_sum(v);
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < num_warps ? partial[lane] : 0.0f;
    return warp_reduce_sum(v);
}

// Max of `v` over the whole block; every thread gets the result (same scheme as the sum).
__device__ __forceinline__ float block_reduce_max(float v) {
    __shared__ float partial[WARP_SIZE];
    const int lane = threadIdx.x % WARP_SIZE;
    const int warp = threadIdx.x / WARP_SIZE;
    const int num_warps = blockDim.x / WARP_SIZE;
    v = warp_reduce_max(v);
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < num_warps ? partial[lane] : -INFINITY;
    return warp_reduce_max(v);
}

// silu(g) = g · sigmoid(g) as g / (1 + e^{−g}), f32 (SwiGLU: kernels/elementwise.cu, the skinny
// GEMM's fused SwiGLU in kernels/gemm.cu; the same expression everywhere, so the same bits).
__device__ __forceinline__ float silu_f32(float g) { return g / (1.0f + expf(-g)); }

// ----------------------------------------------------------------------------
// 16-byte vector access for the memory-bound kernels: 8 bf16 or 4 f32 per load/store. The
// caller checks vec16_ok (every pointer 16-byte aligned) and that the index is a multiple of the
// vector width, and falls back to scalar code otherwise (an odd row length, a sliced buffer).
// Each lane is converted exactly as the scalar bf16_to_f32 / f32_to_bf16 would.

__device__ __forceinline__ bool vec16_ok(const void* p) { return ((uintptr_t)p & 15) == 0; }

__device__ __forceinline__ void load8_bf16(const bf16* p, float (&v)[8]) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const bf16* b = reinterpret_cast<const bf16*>(&raw);
#pragma unroll
    for (int k = 0; k < 8; ++k) v[k] = bf16_to_f32(b[k]);
}

__device__ __forceinline__ void store8_bf16(bf16* p, const float (&v)[8]) {
    uint4 raw;
    bf16* b = reinterpret_cast<bf16*>(&raw);
#pragma unroll
    for (int k = 0; k < 8; ++k) b[k] = f32_to_bf16(v[k]);
    *reinterpret_cast<uint4*>(p) = raw;
}

__device__ __forceinline__ void load4_f32(const float* p, float (&v)[4]) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const float* f = reinterpret_cast<const float*>(&raw);
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] = f[k];
}

__device__ __forceinline__ void store4_f32(float* p, const float (&v)[4]) {
    uint4 raw;
    float* f = reinterpret_cast<float*>(&raw);
#pragma unroll
    for (int k = 0; k < 4; ++k) f[k] = v[k];
    *reinterpret_cast<uint4*>(p) = raw;
}

// v / d for the row index of a flat index: 32-bit division when both fit (the common case; a
// 64-bit division is a long software sequence), else 64-bit. d > 0.
__device__ __forceinline__ size_t div_u64_fast(size_t v, size_t d) {
    return (v >> 32) == 0 && (d >> 32) == 0 ? (size_t)((uint32_t)v / (uint32_t)d) : v / d;
}

// Overloads so a kernel template can use one 16-byte vector of its storage type T: V = 16 /
// sizeof(T) elements (8 bf16 or 4 f32).
__device__ __forceinline__ void load_vec16(const bf16* p, float (&v)[8]) { load8_bf16(p, v); }
__device__ __forceinline__ void load_vec16(const float* p, float (&v)[4]) { load4_f32(p, v); }
__device__ __forceinline__ void store_vec16(bf16* p, const float (&v)[8]) { store8_bf16(p, v); }
__device__ __forceinline__ void store_vec16(float* p, const float (&v)[4]) { store4_f32(p, v); }

// ----------------------------------------------------------------------------
// RoPE on ROPE_ROWS rows per block (rope_fwd_bf16 in elementwise.cu, rope_bwd_bf16 in train.cu):
// the block first computes sincos(pos[r]·inv_freq[i]) once per (row, pair index) into dynamic
// shared memory (2·ROPE_ROWS·hd/2 f32: sin then cos; INVERSE stores −sin), then rotates every
// head of its rows with it, 8 pairs per thread (16-byte loads of x[i..i+8] and x[i+hd/2..]) when
// hd/2 is a multiple of 8 and q, k are 16-byte aligned, else one pair per thread. Per element the
// arithmetic is the one-pair kernel's: (a c − b s, b c + a s), rounded once at the store.
// grid = ceil(rows / ROPE_ROWS), block = ROPE_THREADS.

#define ROPE_ROWS 4
#define ROPE_THREADS 128

template <bool INVERSE>
__device__ __forceinline__ void rope_rows_bf16(bf16* __restrict__ q, bf16* __restrict__ k, const int* __restrict__ pos,
                                               const float* __restrict__ inv_freq, int rows, int n_heads,
                                               int n_kv_heads, int hd) {
    extern __shared__ float rope_sincos[];
    const int half = hd / 2;
    const int row0 = (int)blockIdx.x * ROPE_ROWS;
    if (row0 >= rows) return;  // whole block leaves together
    const int nr = min(ROPE_ROWS, rows - row0);
    float* sn = rope_sincos;
    float* cs = rope_sincos + ROPE_ROWS * half;
    for (int t = threadIdx.x; t < nr * half; t += blockDim.x) {
        const int rr = t / half;
        const int i = t - rr * half;
        float s, c;
        sincosf((float)pos[row0 + rr] * inv_freq[i], &s, &c);
        sn[t] = INVERSE ? -s : s;
        cs[t] = c;
    }
    __syncthreads();
    const int heads = n_heads + n_kv_heads;
    if (half % 8 == 0 && vec16_ok(q) && vec16_ok(k)) {
        const int chunks = half / 8;
        const int items = nr * heads * chunks;
        for (int t = threadIdx.x; t < items; t += blockDim.x) {
            const int rh = t / chunks;
            const int i0 = (t - rh * chunks) * 8;
            const int rr = rh / heads;
            const int head = rh - rr * heads;
            const int r = row0 + rr;
            bf16* x = head < n_heads ? q + ((size_t)r * n_heads + head) * hd
                                     : k + ((size_t)r * n_kv_heads + (head - n_heads)) * hd;
            float a[8], b[8], oa[8], ob[8];
            load8_bf16(x + i0, a);
            load8_bf16(x + i0 + half, b);
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const float s = sn[rr * half + i0 + j];
                const float c = cs[rr * half + i0 + j];
                oa[j] = a[j] * c - b[j] * s;
                ob[j] = b[j] * c + a[j] * s;
            }
            store8_bf16(x + i0, oa);
            store8_bf16(x + i0 + half, ob);
        }
    } else {
        const int items = nr * heads * half;
        for (int t = threadIdx.x; t < items; t += blockDim.x) {
            const int rh = t / half;
            const int i = t - rh * half;
            const int rr = rh / heads;
            const int head = rh - rr * heads;
            const int r = row0 + rr;
            bf16* x = head < n_heads ? q + ((size_t)r * n_heads + head) * hd
                                     : k + ((size_t)r * n_kv_heads + (head - n_heads)) * hd;
            const float s = sn[rr * half + i];
            const float c = cs[rr * half + i];
            const float a = bf16_to_f32(x[i]);
            const float b = bf16_to_f32(x[i + half]);
            x[i] = f32_to_bf16(a * c - b * s);
            x[i + half] = f32_to_bf16(b * c + a * s);
        }
    }
}

// ----------------------------------------------------------------------------
// The rollout's LoRA, y += s · (x Aᵀ) Bᵀ (kernels/lora.cu per projection, kernels/fused.cu for
// projections sharing their input). Both kernels of each pair are the helpers below, so the
// grouped and the per-projection results are bit-identical. The arithmetic per element is that
// of the kernels these replaced (one warp per (row, j), one thread per (row, column); the
// emulator keeps them as its oracle, scripts/kernel_emu/lora_ref.h):
//   xa[r, j] = Σ_i x[r, i]·A[j, i]: lane l adds its elements in index order (8-element vectors
//       l, l + 32, ... when in is a multiple of 8 and x, A_j are 16-byte aligned, else elements
//       l, l + 32, ...) in one f32 accumulator, then warp_reduce_sum's butterfly;
//   y[r, o] = bf16(y[r, o] + scale · Σ_j xa[r, j]·B[o, j]), j ascending in one f32 accumulator.
// What changed is who computes what, so that A and B are read once per tile of rows instead of
// once per row (every row used to re-read all of B, out × rank f32, and of A, rank × in f32,
// from L2). At 64 decode rows of Qwen2.5-0.5B at rank 16, per launch:
//   expand, gate|up: B is 9728 × 16 f32 = 622 KB; 64 × 622 KB = 40 MB before, 2 row tiles ×
//       622 KB = 1.2 MB now (+ xa staged: 32 rows × 16 f32 per block, 0.3 MB; y as before);
//   expand, q|k|v: B 74 KB; 4.7 MB before, 0.15 MB now;
//   xa, q|k|v: A 48 × 896 f32 = 172 KB; 11 MB before, 16 four-row tiles × 172 KB = 2.8 MB now;
//   xa, down_proj: A 16 × 4864 f32 = 311 KB; 20 MB before, 5 MB now.
// x's reads are unchanged (a block's warps, 8 values of j, share its rows through L1); y is read
// and written once, coalesced, as before. Launches: the same 2 per group / projection.

// Up to 3 projections sharing their input; projection p has A_p (rank, in) and B_p (out_p,
// rank) f32 and writes columns [col_p, col_p + out_p) of the stacked output (rows, ldy).
struct LoraGroup3 {
    const float* a[3];
    const float* b[3];
    int col[3];
    int out[3];
    int n;
};

// Rows per warp of the xa kernels. A warp's per-(row, j) sum is a fixed lane-strided chain over
// all of in, so a warp's work grows with its rows: 4 rows cut A's traffic 4× and still leave
// rows·n·rank/4 warps (256 for down_proj at 64 rows; 32-row tiles would leave 32).
#define LORA_XA_ROWS 4
// The expand kernels: columns (threads) and rows per block, and the largest rank whose B row a
// thread keeps in registers (xa's tile then sits in shared memory; above it, both are read from
// global memory per row, as before).
#define LORA_EXPAND_THREADS 128
#define LORA_EXPAND_ROWS 32
#define LORA_REG_RANK 64

// xa[k·ldxa] = Σ_i x[k·in + i]·a[i] for the nr ≤ LORA_XA_ROWS rows k of a tile (x, xa: its
// first row), by one warp (every lane calls it). Each lane loads its slice of A_j once per tile
// and applies it to every row of the tile (one accumulator per row, each in the order above),
// then one butterfly per row; lane 0 stores. in % 8 == 0 makes every row of x as aligned as the
// first, so the vector test per tile is the per-row test of the order above.
static __device__ __forceinline__ void lora_xa_rows(float* __restrict__ xa, size_t ldxa, const bf16* __restrict__ x,
                                                    const float* __restrict__ a, int in_dim, int nr, int lane) {
    float acc[LORA_XA_ROWS];
#pragma unroll
    for (int k = 0; k < LORA_XA_ROWS; ++k) acc[k] = 0.0f;
    if (in_dim % 8 == 0 && vec16_ok(x) && vec16_ok(a)) {
#pragma unroll 2
        for (int v = lane; v < in_dim / 8; v += WARP_SIZE) {
            float a0[4], a1[4];
            load4_f32(a + (size_t)v * 8, a0);
            load4_f32(a + (size_t)v * 8 + 4, a1);
#pragma unroll
            for (int k = 0; k < LORA_XA_ROWS; ++k) {
                if (k < nr) {
                    float xv[8];
                    load8_bf16(x + (size_t)k * in_dim + (size_t)v * 8, xv);
#pragma unroll
                    for (int e = 0; e < 4; ++e) acc[k] += xv[e] * a0[e];
#pragma unroll
                    for (int e = 0; e < 4; ++e) acc[k] += xv[4 + e] * a1[e];
                }
            }
        }
    } else {
        for (int i = lane; i < in_dim; i += WARP_SIZE) {
            const float ai = a[i];
#pragma unroll
            for (int k = 0; k < LORA_XA_ROWS; ++k)
                if (k < nr) acc[k] += bf16_to_f32(x[(size_t)k * in_dim + i]) * ai;
        }
    }
#pragma unroll
    for (int k = 0; k < LORA_XA_ROWS; ++k) {
        if (k < nr) {
            const float s = warp_reduce_sum(acc[k]);  // nr is uniform over the warp
            if (lane == 0) xa[(size_t)k * ldxa] = s;
        }
    }
}

// Σ_j u[j]·b[j] for j = 0 .. rank-1 in order, f32, by one thread (16-byte loads, all in flight,
// when rank is a multiple of 4 and both rows are 16-byte aligned; the same sum either way).
__device__ __forceinline__ float rank_dot_f32(const float* __restrict__ u, const float* __restrict__ b, int rank) {
    float acc = 0.0f;
    if (rank % 4 == 0 && vec16_ok(u) && vec16_ok(b)) {
#pragma unroll 4
        for (int j = 0; j < rank; j += 4) {
            float uv[4], bv[4];
            load4_f32(u + j, uv);
            load4_f32(b + j, bv);
#pragma unroll
            for (int k = 0; k < 4; ++k) acc += uv[k] * bv[k];
        }
        return acc;
    }
    for (int j = 0; j < rank; ++j) acc += u[j] * b[j];
    return acc;
}

// Projection of column c of g's outputs laid end to end (g.n when past them); c becomes the
// column within it. g's arrays are only indexed by constants (unrolled loops, lora_pick): a
// variable index into a kernel parameter makes the compiler copy the struct to local memory.
static __device__ __forceinline__ int lora_proj(const LoraGroup3& g, int& c) {
    int p = 0;
#pragma unroll
    for (int q = 0; q < 3; ++q) {
        if (p == q && q < g.n && c >= g.out[q]) {
            c -= g.out[q];
            p = q + 1;
        }
    }
    return p;
}

// v[p] for p < 3 by selects (see lora_proj).
template <class T>
static __device__ __forceinline__ T lora_pick(const T (&v)[3], int p) {
    return p == 0 ? v[0] : p == 1 ? v[1] : v[2];
}

// One thread's column over the nr rows of a tile, rank ≤ R: its B row b (rank f32) is loaded
// once into registers; row rr's xa is xs[rr·ldu ..] (shared memory) and its y value ys[rr·lds]
// (shared memory, staged by this thread); the result goes to y[rr·ldy]. VEC: rank % 4 == 0
// (16-byte shared-memory loads of xa; B's too when b is 16-byte aligned). Per row, the
// accumulation is rank_dot_f32's.
template <int R, bool VEC>
static __device__ __forceinline__ void lora_expand_rows(bf16* __restrict__ y, size_t ldy, const bf16* ys, int lds,
                                                        const float* xs, int ldu, const float* __restrict__ b,
                                                        float scale, int nr, int rank) {
    float bo[R];
    if (VEC && vec16_ok(b)) {
#pragma unroll
        for (int c = 0; c < R; c += 4) {
            float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            if (c < rank) load4_f32(b + c, v);
#pragma unroll
            for (int k = 0; k < 4; ++k) bo[c + k] = v[k];
        }
    } else {
#pragma unroll
        for (int j = 0; j < R; ++j) bo[j] = j < rank ? b[j] : 0.0f;
    }
#pragma unroll 4
    for (int rr = 0; rr < nr; ++rr) {
        const float* u = xs + (size_t)rr * ldu;
        float acc = 0.0f;
        if (VEC) {
#pragma unroll
            for (int c = 0; c < R; c += 4) {
                if (c < rank) {
                    float uv[4];
                    load4_f32(u + c, uv);
#pragma unroll
                    for (int k = 0; k < 4; ++k) acc += uv[k] * bo[c + k];
                }
            }
        } else {
#pragma unroll
            for (int j = 0; j < R; ++j)
                if (j < rank) acc += u[j] * bo[j];
        }
        y[(size_t)rr * ldy] = f32_to_bf16(bf16_to_f32(ys[rr * lds]) + scale * acc);
    }
}

// The expand kernels' body: y (rows, ldy) bf16 in place, y[r, col_p + o] = bf16(y + scale ·
// Σ_j xa[r, p·rank + j] · B_p[o, j]) for p < g.n, o < out_p; xa (rows, n·rank) f32.
// grid = (ceil(Σ out_p / blockDim), ceil(rows / LORA_EXPAND_ROWS)), block = LORA_EXPAND_THREADS:
// thread t of block (cx, ry) owns column cx·blockDim + t of the outputs laid end to end
// (consecutive threads, consecutive columns of y: coalesced) for rows ry·32 .. ry·32 + 31.
// Dynamic shared memory, tile = min(rows, LORA_EXPAND_ROWS): the tile's y, tile·blockDim bf16
// (each thread stages its own column, every load in flight at once), then for rank ≤
// LORA_REG_RANK the tile's xa for the projections the block's columns touch, ≤ tile·n·rank f32.
static __device__ __forceinline__ void lora_expand_tile(bf16* __restrict__ y, int ldy, const float* __restrict__ xa,
                                                        const LoraGroup3& g, float scale, int rows, int rank) {
    extern __shared__ float lora_smem[];
    const int row0 = blockIdx.y * LORA_EXPAND_ROWS;
    const int c0 = blockIdx.x * blockDim.x;
    int total = 0;
#pragma unroll
    for (int q = 0; q < 3; ++q) total += q < g.n ? g.out[q] : 0;
    if (row0 >= rows || c0 >= total) return;  // whole block
    const int tile = min(rows, LORA_EXPAND_ROWS);
    const int nr = min(LORA_EXPAND_ROWS, rows - row0);
    const size_t ldxa = (size_t)g.n * rank;
    int o = c0 + threadIdx.x;
    const int p = lora_proj(g, o);
    const bool live = p < g.n;
    bf16* yc = live ? y + (size_t)row0 * ldy + lora_pick(g.col, p) + o : nullptr;
    const float* bp = live ? lora_pick(g.b, p) + (size_t)o * rank : nullptr;
    bf16* ys = reinterpret_cast<bf16*>(lora_smem) + threadIdx.x;  // row rr at ys[rr·blockDim]
    const int lds = blockDim.x;
    if (live) {
#pragma unroll
        for (int rr = 0; rr < LORA_EXPAND_ROWS; ++rr)
            if (rr < nr) ys[rr * lds] = yc[(size_t)rr * ldy];
    }
    if (rank > LORA_REG_RANK) {  // uniform: no barrier below
        if (!live) return;
        const float* u = xa + (size_t)row0 * ldxa + (size_t)p * rank;
        for (int rr = 0; rr < nr; ++rr) {
            const float acc = rank_dot_f32(u + rr * ldxa, bp, rank);
            yc[(size_t)rr * ldy] = f32_to_bf16(bf16_to_f32(ys[rr * lds]) + scale * acc);
        }
        return;
    }
    int lo = c0, hi = min(c0 + lds, total) - 1;
    const int p_lo = lora_proj(g, lo);
    const int p_hi = lora_proj(g, hi);
    const int w = (p_hi - p_lo + 1) * rank;  // xa columns the block needs, per row
    float* xs = lora_smem + tile * lds / 2;  // after the y tile (tile·blockDim·2 bytes, 16-aligned)
    const float* src = xa + (size_t)row0 * ldxa + (size_t)p_lo * rank;
    for (int t = threadIdx.x; t < nr * w; t += lds) {
        const int rr = t / w;
        xs[t] = src[(size_t)rr * ldxa + (t - rr * w)];
    }
    __syncthreads();
    if (!live) return;
    const float* u = xs + (p - p_lo) * rank;
    if (rank % 4 == 0) {
        if (rank <= 8) lora_expand_rows<8, true>(yc, ldy, ys, lds, u, w, bp, scale, nr, rank);
        else if (rank <= 16) lora_expand_rows<16, true>(yc, ldy, ys, lds, u, w, bp, scale, nr, rank);
        else if (rank <= 32) lora_expand_rows<32, true>(yc, ldy, ys, lds, u, w, bp, scale, nr, rank);
        else lora_expand_rows<64, true>(yc, ldy, ys, lds, u, w, bp, scale, nr, rank);
    } else {
        if (rank <= 8) lora_expand_rows<8, false>(yc, ldy, ys, lds, u, w, bp, scale, nr, rank);
        else if (rank <= 16) lora_expand_rows<16, false>(yc, ldy, ys, lds, u, w, bp, scale, nr, rank);
        else if (rank <= 32) lora_expand_rows<32, false>(yc, ldy, ys, lds, u, w, bp, scale, nr, rank);
        else lora_expand_rows<64, false>(yc, ldy, ys, lds, u, w, bp, scale, nr, rank);
    }
}
