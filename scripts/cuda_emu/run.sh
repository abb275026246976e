#!/usr/bin/env bash
# Runs the GPU test suites (tests/cuda_*.rs) on the CPU: the Rust CUDA code as it is — engine,
# trainer, launchers, memory plans, CUDA graphs, GEMM tuning — against a stand-in libcuda /
# libcublas (driver.cpp) whose kernels are the real kernels/*.cu in the kernel emulator. For
# machines without a GPU; the GPU run stays the authority on the hardware (timing, memory model,
# the real cuBLAS), this one checks everything else, and much slower.
#
#     scripts/cuda_emu/run.sh                      every tests/cuda_*.rs suite
#     scripts/cuda_emu/run.sh cuda_engine cuda_train   those suites
#     scripts/cuda_emu/run.sh cuda_engine -- greedy    a suite with a test-name filter (and any
#                                                      other libtest arguments after --)
#     ASAN=1 scripts/cuda_emu/run.sh ...           the stand-in built with AddressSanitizer and
#                                                      UBSan (out-of-bounds kernel accesses)
# Needs nvcc (NVCC=...) to build the fatbin the Rust code embeds (the stand-in ignores its code
# but the tests need it present). Environment of the stand-in: RFT_CUDA_EMU_MEM_GIB (device memory,
# default 16), RFT_CUDA_EMU_SMS (SM count, default 132), RFT_CUDA_EMU_TRACE=1 (print each launch).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$here/../.."
suites=()
args=()
while [[ $# -gt 0 ]]; do
    if [[ $1 == -- ]]; then shift; args=("$@"); break; fi
    suites+=("$1"); shift
done
if [[ ${#suites[@]} -eq 0 ]]; then
    for f in "$root"/tests/cuda_*.rs; do suites+=("$(basename "$f" .rs)"); done
fi
lib=$("$here/build.sh" | tail -1)
export RFT_REQUIRE_NVCC=1 RFT_REQUIRE_GPU=1
cd "$root"
tests=()
for s in "${suites[@]}"; do tests+=(--test "$s"); done
# Build the suites (as `cargo test --release` does) and find their executables.
json=$(cargo test --release "${tests[@]}" --no-run --message-format=json-render-diagnostics)
status=0
for s in "${suites[@]}"; do
    bin=$(python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]: print(m["executable"])' "$s" <<< "$json")
    [[ -n "$bin" ]] || { echo "no test executable for $s" >&2; exit 2; }
    echo "== $s (CPU CUDA emulator)"
    start=$SECONDS
    if [[ "${ASAN:-0}" == 1 ]]; then
        LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)" \
            ASAN_OPTIONS=detect_stack_use_after_return=0:detect_leaks=0 LD_LIBRARY_PATH="$lib" \
            "$bin" "${args[@]}" || status=1
    else
        LD_LIBRARY_PATH="$lib" "$bin" "${args[@]}" || status=1
    fi
    echo "   $((SECONDS - start)) s"
done
[[ $status == 0 ]] && echo "CUDA emulator tests: ALL OK" || echo "CUDA emulator tests: FAILED"
exit $status
