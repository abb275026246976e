// CPU stand-in for cuda_bf16.h and the CUDA built-ins the kernels use (scripts/kernel_emu only:
// kernels/common.cuh includes <cuda_bf16.h>, which resolves here).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
struct __nv_bfloat16 { uint16_t x; };
static inline float __bfloat162float(__nv_bfloat16 v) { uint32_t u = (uint32_t)v.x << 16; float f; memcpy(&f, &u, 4); return f; }
static inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    __nv_bfloat16 r;
    if ((u & 0x7fffffffu) > 0x7f800000u) { r.x = (uint16_t)((u >> 16) | 0x40); return r; }
    u += 0x7fffu + ((u >> 16) & 1u);
    r.x = (uint16_t)(u >> 16);
    return r;
}
static inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 v) { return v.x; }
struct uint2 { uint32_t x, y; };
static inline uint2 make_uint2(uint32_t x, uint32_t y) { return uint2{x, y}; }
// kernels/lora_train.cu
struct alignas(16) uint4 { uint32_t x, y, z, w; };
static inline uint4 make_uint4(uint32_t x, uint32_t y, uint32_t z, uint32_t w) { return uint4{x, y, z, w}; }
static inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short v) { return __nv_bfloat16{v}; }
struct emu_dim3 { unsigned x = 1, y = 1, z = 1; };
extern emu_dim3 threadIdx, blockIdx, blockDim, gridDim;
static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }
#define __device__
#define __global__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static
void emu_block_barrier();
void emu_warp_barrier();
extern unsigned char emu_xchg[32][32][8];  // [warp][lane][bytes]
inline void __syncthreads() { emu_block_barrier(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu_warp_barrier(); }
template <class T> T emu_shfl(T v, int arg, bool is_xor) {
    const int lane = threadIdx.x % 32, w = threadIdx.x / 32;
    memcpy(emu_xchg[w][lane], &v, sizeof(T));
    emu_warp_barrier();
    const int src = is_xor ? (lane ^ arg) : arg;
    T r; memcpy(&r, emu_xchg[w][src], sizeof(T));
    emu_warp_barrier();
    return r;
}
template <class T> T __shfl_xor_sync(unsigned, T v, int off) { return emu_shfl(v, off, true); }
template <class T> T __shfl_sync(unsigned, T v, int src) { return emu_shfl(v, src, false); }
