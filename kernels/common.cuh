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
// LoRA dot products (kernels/lora.cu, kernels/fused.cu: the per-projection and the grouped
// kernels share them, so their results are bit-identical).

// Σ_i x[i]·a[i] over n by one warp, f32: lane l adds its elements in index order (8-element
// vectors l, l + 32, ... when n is a multiple of 8 and both rows are 16-byte aligned, else
// elements l, l + 32, ...), then a butterfly reduction; every lane gets the sum. The loads of
// several vectors are in flight at once (unrolled), the additions stay in order.
__device__ __forceinline__ float warp_dot_bf16_f32(const bf16* __restrict__ x, const float* __restrict__ a, int n,
                                                   int lane) {
    float acc = 0.0f;
    if (n % 8 == 0 && vec16_ok(x) && vec16_ok(a)) {
#pragma unroll 4
        for (int v = lane; v < n / 8; v += WARP_SIZE) {
            float xv[8], a0[4], a1[4];
            load8_bf16(x + (size_t)v * 8, xv);
            load4_f32(a + (size_t)v * 8, a0);
            load4_f32(a + (size_t)v * 8 + 4, a1);
#pragma unroll
            for (int k = 0; k < 4; ++k) acc += xv[k] * a0[k];
#pragma unroll
            for (int k = 0; k < 4; ++k) acc += xv[4 + k] * a1[k];
        }
    } else {
        for (int i = lane; i < n; i += WARP_SIZE) acc += bf16_to_f32(x[i]) * a[i];
    }
    return warp_reduce_sum(acc);
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
