"""Rewrites kernels/attention_train.cu (or kernels/lora_train.cu) for the CPU emulator (see run.sh):
the inline-PTX helpers (at_mma, at_ldsm_x4, at_ldsm_x4_trans; lt_* in lora_train.cu) become calls
into emu_rt.cpp and the dynamic shared memory declaration a pointer to the emulator's buffer.
Usage: gen.py <in.cu> <out.inc>"""
import sys
src = open(sys.argv[1]).read()
def replace_fn(src, sig, body):
    start = src.index(sig)
    end = src.index("\n}\n", start) + 3
    return src[:start] + body + "\n" + src[end:]
if "lora_train" in sys.argv[1]:
    # kernels/lora_train.cu: the same helpers under the lt_ prefix (emu_rt.cpp's at_*_emu serve both).
    src = replace_fn(src, "static __device__ __forceinline__ void lt_mma(",
        "static inline void lt_mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) { at_mma_emu(d, a, b0, b1); }")
    src = replace_fn(src, "static __device__ __forceinline__ void lt_ldsm_x4(",
        "static inline void lt_ldsm_x4(uint32_t (&r)[4], const bf16* p) { at_ldsm_emu(r, p, false); }")
    src = replace_fn(src, "static __device__ __forceinline__ void lt_ldsm_x4_trans(",
        "static inline void lt_ldsm_x4_trans(uint32_t (&r)[4], const bf16* p) { at_ldsm_emu(r, p, true); }")
    n = src.count("extern __shared__ __align__(16) unsigned char lt_smem[];")
    assert n >= 2, n
    src = src.replace("extern __shared__ __align__(16) unsigned char lt_smem[];", "unsigned char* lt_smem = emu_dyn_smem;")
    assert "asm" not in src
    open(sys.argv[2], "w").write(src)
    sys.exit(0)
src = replace_fn(src, "static __device__ __forceinline__ void at_mma(",
    "static inline void at_mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) { at_mma_emu(d, a, b0, b1); }")
src = replace_fn(src, "static __device__ __forceinline__ void at_ldsm_x4(",
    "static inline void at_ldsm_x4(uint32_t (&r)[4], const bf16* p) { at_ldsm_emu(r, p, false); }")
src = replace_fn(src, "static __device__ __forceinline__ void at_ldsm_x4_trans(",
    "static inline void at_ldsm_x4_trans(uint32_t (&r)[4], const bf16* p) { at_ldsm_emu(r, p, true); }")
n = src.count("extern __shared__ __align__(16) unsigned char at_smem[];")
assert n >= 3, n
src = src.replace("extern __shared__ __align__(16) unsigned char at_smem[];", "unsigned char* at_smem = emu_dyn_smem;")
assert "asm" not in src
open(sys.argv[2], "w").write(src)
