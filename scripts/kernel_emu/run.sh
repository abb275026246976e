#!/usr/bin/env bash
# CPU emulation of the CUDA kernels in kernels/*.cu, for machines without a GPU.
#
# Every CUDA thread of a block runs as a fiber on one OS thread (emu_rt.cpp); barriers, warp
# shuffles, __syncthreads_or, shared-memory atomics, mma.sync m16n8k16 and ldmatrix .x4 / .trans
# (from the PTX ISA's fragment layouts) switch fibers, in a pseudo-random order per round so that
# a missing barrier changes the result. A barrier that not all threads reach (deadlock), a warp
# collective whose lanes sit at different shuffles, and a block barrier after some threads exited
# abort with the block's coordinates; launch configurations are checked (block 32k ≤ 1024, grid
# limits, dynamic shared memory ≤ 48 KiB unless opted in). gen.py rewrites a kernel file for the
# host (dynamic shared memory becomes a buffer of exactly the launcher's size; it and every static
# __shared__ variable are refilled with 0xff bytes, NaN, before each block, so reading a slot the
# block never wrote shows; inline PTX becomes calls into emu_rt.cpp) and refuses constructs the
# emulator does not model. g++ builds it with -fno-strict-aliasing (the kernels pun vector loads
# as CUDA code does, which nvcc compiles as meant and g++ -O2 may not) and -ffp-contract=off. One harness per kernel file, <file>_emu.cpp, launches the kernels exactly as
# the Rust launchers do (src/cuda/kernels.rs, rollout.rs, train_kernels.rs, train.rs,
# attention_train.rs: grid, block, shared memory, argument order and types) and compares with
# references ported from the CPU code (src/cpu, src/sampling.rs, src/loss, src/optim) under the
# tolerances of the matching tests/cuda_*.rs.
#
#     scripts/kernel_emu/run.sh                  every emulated suite, first cases only (seconds)
#     scripts/kernel_emu/run.sh all              every suite, every case
#     scripts/kernel_emu/run.sh sampling train   those suites, every case
#     ASAN=1 scripts/kernel_emu/run.sh all       also AddressSanitizer (out-of-bounds global and
#                                                dynamic shared memory) and UBSan (misaligned
#                                                vector loads, overflow, bad shifts)
# Suites: rmsnorm elementwise attention lora sampling train convert attention_train lora_train
# lm_head_train fused gemm, and
# resources (resources.py: registers and shared memory per block from ptxas against the launch
# sizes, sm_80 and sm_90a; needs nvcc: $NVCC or on PATH, else skipped).
#
# It checks indexing, masking, tiling, synchronisation structure and numerics up to the math
# library and FMA contraction (see inc/cuda_bf16.h), not the hardware's timing, memory model or
# performance: threads switch only at barriers, so a race between barriers is found only when
# the shuffled order makes a reader run before its writer (at random, per round; warps also drift
# apart at random, one sometimes held back to the end of a barrier interval, and attention_train's
# cp.async copies land at issue or only at their wait, at random), and a missing __syncwarp
# between warp-synchronous shared-memory accesses is invisible. The GPU tests remain the authority.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
kernels="${EMU_KERNELS:-$here/../../kernels}"  # EMU_KERNELS: another copy (e.g. a mutated one)
all_suites=(rmsnorm elementwise attention lora sampling train convert attention_train lora_train lm_head_train fused gemm resources)
mode=quick
suites=()
for a in "$@"; do
    case "$a" in
        all) mode=full; suites=("${all_suites[@]}") ;;
        *) mode=full; suites+=("$a") ;;
    esac
done
[[ ${#suites[@]} -eq 0 ]] && suites=("${all_suites[@]:0:${#all_suites[@]}-1}")  # quick: not resources

flags=(-std=c++17 -O2 -ffp-contract=off -fno-strict-aliasing)
tag=opt
if [[ "${ASAN:-0}" == 1 ]]; then
    flags=(-std=c++17 -O1 -g -ffp-contract=off -fno-strict-aliasing -fsanitize=address,undefined -fno-sanitize-recover=all
           -fno-omit-frame-pointer)
    tag=asan
    export ASAN_OPTIONS=detect_stack_use_after_return=0:detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1
fi
out="${TMPDIR:-/tmp}/rft-kernel-emu/$tag"
mkdir -p "$out"

# Build (in parallel, 2 at a time; a binary is rebuilt when any of its inputs is newer).
# A suite's <file>_ref.cu beside this script (a kernel file as it was, the bit-identity oracle of
# its harness) is rewritten too, into <file>_ref.inc.
gen() {
    python3 "$here/gen.py" "$1" "$2.new"
    cmp -s "$2.new" "$2" || mv "$2.new" "$2"
    rm -f "$2.new"
}
build() {
    local s=$1 bin="$out/$1_emu" refs=()
    gen "$kernels/$s.cu" "$out/$s.inc"
    if [[ -f "$here/${s}_ref.cu" ]]; then gen "$here/${s}_ref.cu" "$out/${s}_ref.inc"; refs=("$out/${s}_ref.inc"); fi
    local newest
    newest=$(ls -t "$out/$s.inc" "${refs[@]}" "$here/${s}_emu.cpp" "$here/emu_rt.cpp" "$here/emu.h" "$here/lora_ref.h" "$here/inc/cuda_bf16.h" \
        "$kernels/common.cuh" "$0" | head -1)
    if [[ ! -x "$bin" || "$newest" -nt "$bin" ]]; then
        g++ "${flags[@]}" -I "$here" -I "$here/inc" -I "$out" -o "$bin" \
            "$here/${s}_emu.cpp" "$here/emu_rt.cpp"
    fi
}
pids=()
for s in "${suites[@]}"; do
    [[ $s == resources ]] && continue
    [[ -f "$here/${s}_emu.cpp" ]] || { echo "unknown suite $s (have: ${all_suites[*]})" >&2; exit 2; }
    build "$s" &
    pids+=($!)
    if [[ ${#pids[@]} -ge 2 ]]; then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
done
for p in "${pids[@]}"; do wait "$p"; done

status=0
for s in "${suites[@]}"; do
    start=$SECONDS
    echo "== $s ($mode)"
    if [[ $s == resources ]]; then
        nvcc="${NVCC:-$(command -v nvcc || true)}"
        if [[ -n "$nvcc" ]]; then python3 "$here/resources.py" "$nvcc" "$kernels" || status=1
        else echo "resources: skipped (no nvcc: set NVCC)"; fi
    else
        "$out/${s}_emu" "$mode" || status=1
    fi
    echo "   $((SECONDS - start)) s"
done
[[ $status == 0 ]] && echo "kernel emulator: ALL OK ($SECONDS s)" || echo "kernel emulator: FAILED ($SECONDS s)"
exit $status
