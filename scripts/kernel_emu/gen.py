"""Rewrites a kernels/*.cu file (with kernels/common.cuh inlined) for the CPU emulator (see run.sh).
Usage: gen.py <in.cu> <out.inc>

Everything CUDA-specific that plain C++ cannot express is either a macro / function of
inc/cuda_bf16.h (qualifiers, shuffles, barriers, atomics, intrinsics) or rewritten here:
  - `extern __shared__ [__align__(n)] T name[];` (dynamic shared memory) becomes a pointer to the
    launch's buffer, emu_dyn_smem, of exactly the launcher's size;
  - `__shared__ T name[dims];` (static shared memory) becomes a static variable registered with
    the runtime, which fills it with 0xff bytes (NaN, -1) before every block, so a read of a slot
    the block did not write shows up instead of seeing the previous block's value;
  - the inline-PTX helpers of attention_train.cu (at_mma, at_ldsm_x4, at_ldsm_x4_trans, and
    at_cp_async* as the asynchronous copies of emu_rt.cpp's emu_cpa_*) and of
    lora_train.cu (lt_*) and of gemm.cu (sk_*) become calls into emu_rt.cpp; gemm.cu's timing
    spin kernel becomes empty.
Anything left that the emulator does not know (inline asm, cooperative groups, warp votes, __ldg,
other atomics) stops the build here rather than being silently miscompiled."""
import re
import sys

import os

src = open(sys.argv[1]).read()
common = os.path.join(os.path.dirname(os.path.abspath(sys.argv[1])), "common.cuh")
if '#include "common.cuh"' in src:
    src = src.replace('#include "common.cuh"', open(common).read(), 1)


def replace_fn(src, sig, body):
    start = src.index(sig)
    end = src.index("\n}\n", start) + 3
    return src[:start] + body + "\n" + src[end:]


PTX_HELPERS = {
    "static __device__ __forceinline__ void at_mma(":
        "static inline void at_mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) { at_mma_emu(d, a, b0, b1); }",
    "static __device__ __forceinline__ void at_ldsm_x4(":
        "static inline void at_ldsm_x4(uint32_t (&r)[4], const bf16* p) { at_ldsm_emu(r, p, false); }",
    "static __device__ __forceinline__ void at_ldsm_x4_trans(":
        "static inline void at_ldsm_x4_trans(uint32_t (&r)[4], const bf16* p) { at_ldsm_emu(r, p, true); }",
    # kernels/attention_train.cu's cp.async: asynchronous in the emulator (emu_rt.cpp emu_cpa_*).
    "static __device__ __forceinline__ void at_cp_async16(":
        "static inline void at_cp_async16(bf16* smem, const bf16* gmem, int src_bytes) { emu_cpa_issue(smem, gmem, 16, src_bytes); }",
    "static __device__ __forceinline__ void at_cp_async8(":
        "static inline void at_cp_async8(bf16* smem, const bf16* gmem, int src_bytes) { emu_cpa_issue(smem, gmem, 8, src_bytes); }",
    # kernels/attention.cu's tensor-core decode: mma with rows 8..15 of A zero, ldmatrix, and
    # cp.async as a synchronous copy (threads switch only at barriers, so waiting is a no-op).
    "static __device__ __forceinline__ void dec_mma(":
        "static inline void dec_mma(float& d0, float& d1, uint32_t a0, uint32_t a2, uint32_t b0, uint32_t b1) {"
        " float d[4] = {d0, d1, 0.0f, 0.0f}; const uint32_t a[4] = {a0, 0u, a2, 0u}; at_mma_emu(d, a, b0, b1);"
        " d0 = d[0]; d1 = d[1]; }",
    "static __device__ __forceinline__ void dec_ldsm_x4(":
        "static inline void dec_ldsm_x4(uint32_t (&r)[4], const bf16* p) { at_ldsm_emu(r, p, false); }",
    "static __device__ __forceinline__ void dec_ldsm_x4_trans(":
        "static inline void dec_ldsm_x4_trans(uint32_t (&r)[4], const bf16* p) { at_ldsm_emu(r, p, true); }",
    "static __device__ __forceinline__ void dec_cp_async16(":
        "static inline void dec_cp_async16(bf16* smem, const bf16* gmem, int src_bytes) { emu_cp_async16(smem, gmem, src_bytes); }",
    # kernels/lora_train.cu: the same helpers under the lt_ prefix.
    "static __device__ __forceinline__ void lt_mma(":
        "static inline void lt_mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) { at_mma_emu(d, a, b0, b1); }",
    "static __device__ __forceinline__ void lt_ldsm_x4(":
        "static inline void lt_ldsm_x4(uint32_t (&r)[4], const bf16* p) { at_ldsm_emu(r, p, false); }",
    "static __device__ __forceinline__ void lt_ldsm_x4_trans(":
        "static inline void lt_ldsm_x4_trans(uint32_t (&r)[4], const bf16* p) { at_ldsm_emu(r, p, true); }",
    # kernels/gemm.cu: the same helpers under the sk_ prefix, its cp.async asynchronous as
    # attention_train.cu's (emu_cpa_*).
    "static __device__ __forceinline__ void sk_mma(":
        "static inline void sk_mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) { at_mma_emu(d, a, b0, b1); }",
    "static __device__ __forceinline__ void sk_ldsm_x4(":
        "static inline void sk_ldsm_x4(uint32_t (&r)[4], const bf16* p) { at_ldsm_emu(r, p, false); }",
    "static __device__ __forceinline__ void sk_cp_async16(":
        "static inline void sk_cp_async16(bf16* smem, const bf16* gmem, int src_bytes) { emu_cpa_issue(smem, gmem, 16, src_bytes); }",
    "extern \"C\" __global__ void gemm_tune_spin(":
        "extern \"C\" void gemm_tune_spin(long long) {}",
}
ONE_LINE = {
    "static __device__ __forceinline__ void at_cp_async_commit()": "static inline void at_cp_async_commit() { emu_cpa_commit(); }",
    "static __device__ __forceinline__ void at_cp_async_wait_all()": "static inline void at_cp_async_wait_all() { emu_cpa_wait(0); }",
    "static __device__ __forceinline__ void dec_cp_async_commit()": "static inline void dec_cp_async_commit() {}",
    "static __device__ __forceinline__ void dec_cp_async_wait()": "static inline void dec_cp_async_wait() {}",
    "static __device__ __forceinline__ void sk_cp_async_commit()": "static inline void sk_cp_async_commit() { emu_cpa_commit(); }",
    "template <int N> static __device__ __forceinline__ void sk_cp_async_wait()":
        "template <int N> static inline void sk_cp_async_wait() { emu_cpa_wait(N); }",
}
for sig, body in ONE_LINE.items():
    if sig in src:
        start = src.index(sig)
        end = src.index("\n", start)
        src = src[:start] + body + src[end:]
for sig, body in PTX_HELPERS.items():
    if sig in src:
        src = replace_fn(src, sig, body)

src = re.sub(r"extern __shared__ (?:__align__\(\d+\) )?([\w ]+) (\w+)\[\];",
             r"\1* \2 = reinterpret_cast<\1*>(emu_dyn_smem);", src)
src = re.sub(r"__shared__ ((?:__align__\(\d+\) )?[\w: ]+?) (\w+)((?:\[[^\]]+\])*);",
             r"static \1 \2\3; static emu_shared_reg \2_emu_reg(&\2, sizeof \2);", src)

code = re.sub(r"//[^\n]*", "", src)  # comments may mention anything
for word in ["__shared__", "asm", "cooperative_groups", "__ballot_sync", "__any_sync", "__all_sync", "__activemask",
             "__ldg", "atomicCAS", "atomicExch", "atomicMax", "atomicMin", "atomicSub",
             "__expf", "__logf", "__fdividef", "__sinf", "__cosf", "__saturatef", "__match_any_sync"]:
    if re.search(r"\b%s\b" % word, code):
        sys.exit("gen.py: %s uses %s, which the emulator does not model yet (inc/cuda_bf16.h)" % (sys.argv[1], word))
open(sys.argv[2], "w").write(src)
