// CPU stand-in for cuda_bf16.h and the CUDA built-ins the kernels use (scripts/kernel_emu only:
// kernels/common.cuh includes <cuda_bf16.h>, which resolves here).
//
// Numerics: bf16 conversions, the _rn intrinsics, `/` and sqrtf are IEEE-exact on both sides.
// The math library differs by an ulp or two: CUDA's expf/logf/sincosf/exp/log (no fast-math: the
// accurate versions, ≤ 1–2 ulp) become glibc's (< 1 ulp), and rsqrtf (≤ 2 ulp on the GPU) becomes
// 1/sqrtf. nvcc contracts a·b + c into FMAs where no _rn intrinsic forbids it; g++ here does not
// (-ffp-contract=off): ≤ 1 ulp per contraction, inside every tolerance that is not bit-exact.
#pragma once
#include <cmath>
#include <climits>
#include <cstdint>
#include <cstring>
#include <algorithm>
using std::isfinite;
using std::isnan;

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
// Vector types with the GPU's alignment (UBSan's alignment check in ASAN=1 runs then flags a
// misaligned vector load, which faults on the GPU).
struct alignas(4) __nv_bfloat162 { __nv_bfloat16 x, y; };
struct alignas(8) float2 { float x, y; };
struct alignas(8) uint2 { uint32_t x, y; };
struct alignas(16) uint4 { uint32_t x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
static inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
static inline uint2 make_uint2(uint32_t x, uint32_t y) { return uint2{x, y}; }
// kernels/lora_train.cu
static inline uint4 make_uint4(uint32_t x, uint32_t y, uint32_t z, uint32_t w) { return uint4{x, y, z, w}; }
static inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short v) { return __nv_bfloat16{v}; }
static inline float __low2float(__nv_bfloat162 v) { return __bfloat162float(v.x); }
static inline float __high2float(__nv_bfloat162 v) { return __bfloat162float(v.y); }
static inline float2 __bfloat1622float2(__nv_bfloat162 v) { return float2{__bfloat162float(v.x), __bfloat162float(v.y)}; }

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
// Static shared memory: gen.py turns `__shared__ T x[n];` into `static T x[n];` plus one of these,
// with which the runtime refills x with 0xff bytes before every block (emu_rt.cpp).
struct emu_shared_reg { emu_shared_reg(void* p, size_t bytes); };

// Bit casts and exactly rounded arithmetic.
static inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
static inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
static inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
static inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((uint64_t)a * b) >> 32); }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __fsqrt_rn(float a) { return sqrtf(a); }
static inline float rsqrtf(float a) { return 1.0f / sqrtf(a); }

// Barriers and warp collectives (emu_rt.cpp). A warp barrier's tag must agree across the warp's
// 32 lanes (the same collective with the same argument), else it is reported as divergent.
void emu_block_barrier();
void emu_warp_barrier(unsigned tag = 0);
int emu_syncthreads_or(int pred);
extern unsigned char emu_xchg[32][32][8];  // [warp][lane][bytes]
inline void __syncthreads() { emu_block_barrier(); }
inline int __syncthreads_or(int pred) { return emu_syncthreads_or(pred); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu_warp_barrier(); }
template <class T> T emu_shfl(T v, int arg, bool is_xor) {
    const int lane = threadIdx.x % 32, w = threadIdx.x / 32;
    memcpy(emu_xchg[w][lane], &v, sizeof(T));
    const unsigned tag = 0x10000u | (is_xor ? 0x8000u : 0u) | (is_xor ? (unsigned)arg : 0u);
    emu_warp_barrier(tag);  // __shfl_sync's source lane may differ per lane: only xor offsets must agree
    const int src = is_xor ? (lane ^ arg) : arg;
    T r; memcpy(&r, emu_xchg[w][src & 31], sizeof(T));
    emu_warp_barrier(tag);
    return r;
}
template <class T> T __shfl_xor_sync(unsigned, T v, int off) { return emu_shfl(v, off, true); }
template <class T> T __shfl_sync(unsigned, T v, int src) { return emu_shfl(v, src, false); }
// Atomics: fibers switch only at barriers, so a read-modify-write is atomic as written; the order
// of float atomics (not fixed on the GPU) is the emulator's thread order.
template <class T> T atomicAdd(T* p, T v) { T old = *p; *p = old + v; return old; }
// Blocks run one after another, each to completion, so a memory fence orders nothing further.
inline void __threadfence() {}
// A load through L2 only (another block's writes of this launch): a plain load here.
template <class T> T __ldcg(const T* p) { return *p; }
