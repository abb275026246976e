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
