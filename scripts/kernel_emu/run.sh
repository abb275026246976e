#!/usr/bin/env bash
# CPU emulation of kernels/attention_train.cu, for machines without a GPU: every CUDA thread of a
# block runs as a fiber (ucontext) on one OS thread, barriers and warp collectives (shuffles,
# mma.sync m16n8k16, ldmatrix .x4 / .trans, emulated from the PTX ISA's fragment layouts) switch
# fibers, and a barrier that not all threads reach is reported as a deadlock. gen.py rewrites the
# kernel source for the host (the inline-PTX helpers become calls into emu_rt.cpp, the dynamic
# shared memory a buffer of exactly the launcher's size); attention_train_emu.cpp launches the
# forward and backward with the Rust launchers' grids and compares against an f64 reference with
# the tolerances of tests/cuda_attention_train.rs.
#
#     scripts/kernel_emu/run.sh          one shape (seconds)
#     scripts/kernel_emu/run.sh all      every shape (≈ 1 minute)
#     ASAN=1 scripts/kernel_emu/run.sh all   also AddressSanitizer (out-of-bounds global/shared)
#     scripts/kernel_emu/run.sh lora_train [all]   kernels/lora_train.cu instead (lora_train_emu.cpp)
#
# It checks indexing, masking, tiling and synchronisation structure, not the real hardware's
# timing or memory model (fibers switch only at barriers): the GPU tests remain the authority.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
kernels="$here/../../kernels"
out="${TMPDIR:-/tmp}/rft-kernel-emu"
mkdir -p "$out"
name=attention_train inc=at_emu.inc
if [[ "${1:-}" == lora_train ]]; then
    shift
    name=lora_train inc=lt_emu.inc
fi
python3 "$here/gen.py" "$kernels/$name.cu" "$out/$inc"
flags=(-std=c++17 -O2)
if [[ "${ASAN:-0}" == 1 ]]; then
    flags=(-std=c++17 -O1 -g -fsanitize=address -fno-omit-frame-pointer)
    export ASAN_OPTIONS=detect_stack_use_after_return=0
fi
g++ "${flags[@]}" -I "$here/inc" -I "$kernels" -I "$out" -o "$out/${name}_emu" \
    "$here/${name}_emu.cpp" "$here/emu_rt.cpp"
"$out/${name}_emu" "$@"
