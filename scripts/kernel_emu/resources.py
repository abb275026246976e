"""Launch resources of every kernel, the part of a launch the emulator cannot see: compiles
kernels/*.cu as build.rs does (one unit, sm_80 and sm_90a) with ptxas's resource report and checks
  - registers: a block must fit the SM's 64K registers, so regs (allocated in 8s) × the block size
    ≤ 65536, the block size being the kernel's __launch_bounds__ (.maxntid) or else 512, the
    largest block any launcher gives a kernel without bounds (row_block's clamp);
  - shared memory: static + the launcher's largest dynamic size ≤ 48 KiB for kernels that do not
    opt in (DYNAMIC below, from the launchers), ≤ 99 KiB for those that do and whose size DYNAMIC
    lists (attention_train's kernels);
and lists kernels that spill or use a stack frame (a performance note, not a failure).
Usage: resources.py <nvcc> <kernels dir>"""
import glob
import os
import re
import subprocess
import sys
import tempfile

nvcc, kdir = sys.argv[1], os.path.abspath(sys.argv[2])
# Largest dynamic shared memory each launcher passes (bytes): src/cuda/rollout.rs (CUDA-core
# decode: 4 warps × 8 heads × (hd + 2) f32 at hd 256; tensor-core decode: 4 warps × slots (2, 2,
# 1) × 16 k and 16 v rows of HD + 8 bf16, hd128 and hd256 opting in at load; prefill: its
# carve-up at hd 256), src/cuda/train_kernels.rs (rmsnorm_bwd: dim f32, dim limited by
# SMEM_DEFAULT_BYTES − RMS_BWD_STATIC_SMEM_BYTES = 2·32 f32; rope_fwd/bwd: rope_launch's sin and
# cos of ROPE_ROWS = 4 rows × hd/2 f32 at hd 256); src/cuda/rollout.rs lora_expand_cfg (a tile of
# 32 rows: 128 bf16 of y + n·rank f32 of xa per row, n ≤ 3 (1 per projection), rank ≤ 64 staged).
DYNAMIC = {
    "attention_decode_simt_bf16": 4 * 8 * (256 + 2) * 4,
    "attention_decode_hd64_bf16": 4 * 2 * 2 * 16 * (64 + 8) * 2,
    "attention_decode_hd128_bf16": 4 * 2 * 2 * 16 * (128 + 8) * 2,
    "attention_decode_hd256_bf16": 4 * 2 * 16 * (256 + 8) * 2,
    "attention_prefill_bf16": 32 * 8 + (16 * 256 + 32 * (256 + 2) + 32 * 256) * 2,
    "rmsnorm_bwd_bf16": 48 * 1024 - 256,
    "rope_fwd_bf16": 2 * 4 * 128 * 4,
    "rope_bwd_bf16": 2 * 4 * 128 * 4,
    "skinny_gemm_m16_bf16": 4 * (64 + 16) * 72 * 2,  # src/cuda/gemm.rs skinny_smem_bytes(1)
    "skinny_gemm_m16_f32": 4 * (64 + 16) * 72 * 2,
    "lora_expand_add_bf16": 32 * (128 * 2 + 64 * 4),
    "lora_group_expand_add_bf16": 32 * (128 * 2 + 3 * 64 * 4),
    # src/cuda/attention_train.rs fwd/dkdv/dq_smem_bytes (kernels AtCfg::*_SMEM: q tile + 2 stages
    # of k, v; k, v + DKDV_STAGES of q, dout, lse, delta; q, dout + DQ_K/V_STAGES of k, v), opted in.
    "attention_train_fwd_hd64_bf16": (64 + 4 * 64) * 72 * 2,
    "attention_train_fwd_hd128_bf16": (64 + 4 * 64) * 136 * 2,
    "attention_train_fwd_hd256_bf16": (64 + 4 * 32) * 264 * 2,
    "attention_train_bwd_dkdv_hd64_bf16": (128 + 4 * 64) * 72 * 2 + 4 * 64 * 4,
    "attention_train_bwd_dkdv_hd128_bf16": (128 + 4 * 32) * 136 * 2 + 4 * 32 * 4,
    "attention_train_bwd_dkdv_hd256_bf16": (128 + 2 * 16) * 264 * 2 + 2 * 16 * 4,
    "attention_train_bwd_dq_hd64_bf16": (128 + 4 * 64) * 72 * 2,
    "attention_train_bwd_dq_hd128_bf16": (128 + 3 * 64) * 136 * 2,
    "attention_train_bwd_dq_hd256_bf16": (128 + 2 * 32) * 264 * 2,
}
OPT_IN = {"attention_train_fwd", "attention_train_bwd_dkdv", "attention_train_bwd_dq",  # allow_smem ≤ 99 KiB
          "attention_decode_hd128_bf16", "attention_decode_hd256_bf16",  # 68 / 66 KiB, RolloutKernels::load
          "skinny_gemm_m32", "skinny_gemm_m48", "skinny_gemm_m64",  # 54 / 63 / 72 KiB, GemmKernels::load
          "skinny_gemm_swiglu"}  # 54–108 KiB, GemmKernels::load
LIMIT = 48 * 1024
OPT_IN_LIMIT = 99 * 1024  # the most every sm_80+ GPU lets a block opt in to (checked where DYNAMIC knows the size)

cccl = os.path.join(os.path.dirname(os.path.dirname(nvcc)), "include", "cccl")
with tempfile.TemporaryDirectory() as tmp:
    unity = os.path.join(tmp, "unity.cu")
    with open(unity, "w") as f:
        for src in sorted(glob.glob(os.path.join(kdir, "*.cu"))):
            f.write('#include "%s"\n' % src)
    base = [nvcc, "-O3", "-std=c++17", "-I" + kdir] + (["-isystem", cccl] if os.path.isdir(cccl) else [])
    ptx = subprocess.run(base + ["--ptx", "-arch=compute_80", "-o", os.path.join(tmp, "u.ptx"), unity],
                         capture_output=True, text=True)
    if ptx.returncode:
        sys.exit(ptx.stderr)
    bounds = {m.group(1): int(m.group(2)) * int(m.group(3)) * int(m.group(4))
              for m in re.finditer(r"\.entry (\w+)\([^{]*?\.maxntid (\d+), (\d+), (\d+)", open(os.path.join(tmp, "u.ptx")).read())}
    bad = 0
    for arch in ["sm_80", "sm_90a"]:
        r = subprocess.run(base + ["--cubin", "-gencode=arch=compute_%s,code=%s" % (arch[3:], arch), "--resource-usage",
                                   "-o", os.path.join(tmp, "u.cubin"), unity], capture_output=True, text=True)
        if r.returncode:
            sys.exit(r.stderr)
        kernel, notes = None, []
        for line in (r.stdout + r.stderr).splitlines():
            m = re.search(r"Compiling entry function '(\w+)'", line)
            if m:
                kernel, stack = m.group(1), None
                continue
            m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores", line)
            if m:
                stack = (int(m.group(1)), int(m.group(2)))
            m = re.search(r"Used (\d+) registers", line)
            if not (m and kernel):
                continue
            regs = int(m.group(1))
            sm = re.search(r"(\d+) bytes smem", line)
            smem = int(sm.group(1)) if sm else 0
            threads = bounds.get(kernel, 512)
            need = (regs + 7) // 8 * 8 * ((threads + 31) // 32 * 32)
            if need > 65536:
                print("  FAIL %s %s: %d registers × %d threads > 65536" % (arch, kernel, regs, threads))
                bad += 1
            limit = OPT_IN_LIMIT if any(kernel.startswith(p) for p in OPT_IN) else LIMIT
            if (limit == LIMIT or kernel in DYNAMIC) and smem + DYNAMIC.get(kernel, 0) > limit:
                print("  FAIL %s %s: %d static + %d dynamic bytes of shared memory > %d" % (arch, kernel, smem, DYNAMIC.get(kernel, 0), limit))
                bad += 1
            if stack and (stack[0] or stack[1]):
                notes.append("%s (%d B stack, %d B spilled)" % (kernel, stack[0], stack[1]))
            kernel = None
        if notes:
            print("  note %s: local memory in %s" % (arch, ", ".join(notes)))
    print("resources: FAILED" if bad else "resources: ALL OK")
    sys.exit(1 if bad else 0)
