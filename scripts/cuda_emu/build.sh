#!/usr/bin/env bash
# Builds the CPU stand-in for libcuda + libcublas (driver.cpp) with every kernel of kernels/*.cu
# compiled in through the kernel emulator (../kernel_emu), and prints the directory to put first
# on LD_LIBRARY_PATH. See run.sh.
#     scripts/cuda_emu/build.sh          → $TMPDIR/rft-cuda-emu/opt/lib
#     ASAN=1 scripts/cuda_emu/build.sh   → …/asan/lib (AddressSanitizer + UBSan; the test binary
#                                          then needs LD_PRELOAD of libasan, run.sh does that)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
emu="$here/../kernel_emu"
kernels="${EMU_KERNELS:-$here/../../kernels}"
flags=(-std=c++17 -O2 -fPIC -ffp-contract=off -fno-strict-aliasing)
tag=opt
if [[ "${ASAN:-0}" == 1 ]]; then
    flags=(-std=c++17 -O1 -g -fPIC -ffp-contract=off -fno-strict-aliasing -fsanitize=address,undefined
           -fno-sanitize-recover=all -fno-omit-frame-pointer)
    tag=asan
fi
out="${TMPDIR:-/tmp}/rft-cuda-emu/$tag"
mkdir -p "$out/obj" "$out/lib"

objs=()
compile() {  # compile <src> <obj> <deps...>: rebuilt when any input is newer
    local src=$1 obj=$2; shift 2
    local newest; newest=$(ls -t "$src" "$@" | head -1)
    if [[ ! -f "$obj" || "$newest" -nt "$obj" ]]; then
        g++ "${flags[@]}" -I "$emu" -I "$emu/inc" -I "$here" -I "$out/obj" -c "$src" -o "$obj"
    fi
}
pids=()
for cu in "$kernels"/*.cu; do
    name=$(basename "$cu" .cu)
    inc="$out/obj/$name.inc"
    python3 "$emu/gen.py" "$cu" "$inc.new"
    cmp -s "$inc.new" "$inc" || mv "$inc.new" "$inc"
    rm -f "$inc.new"
    # One translation unit per kernel file: the rewritten kernels and a registration of each
    # `extern "C"` kernel (names from the preprocessed file, so macro-made kernels count too: kernel_names.py).
    tu="$out/obj/${name}_reg.cpp"
    {
        echo "#include \"emu.h\""
        echo "#include \"kreg.h\""
        echo "#include \"$name.inc\""
        g++ -std=c++17 -x c++ -E -I "$emu" -I "$emu/inc" -include "$emu/emu.h" "$inc" 2>/dev/null \
            | python3 "$here/kernel_names.py" "$name.inc" | sed -E 's/.*/EMU_REGISTER(&)/'
    } > "$tu.new"
    cmp -s "$tu.new" "$tu" || mv "$tu.new" "$tu"
    rm -f "$tu.new"
    compile "$tu" "$out/obj/$name.o" "$inc" "$here/kreg.h" "$emu/emu.h" "$emu/inc/cuda_bf16.h" &
    pids+=($!)
    objs+=("$out/obj/$name.o")
    if [[ ${#pids[@]} -ge 2 ]]; then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
done
compile "$emu/emu_rt.cpp" "$out/obj/emu_rt.o" "$emu/emu.h" "$emu/inc/cuda_bf16.h" &
pids+=($!)
compile "$here/driver.cpp" "$out/obj/driver.o" "$here/kreg.h" "$emu/emu.h" "$emu/inc/cuda_bf16.h" &
pids+=($!)
for p in "${pids[@]}"; do wait "$p"; done
objs+=("$out/obj/emu_rt.o" "$out/obj/driver.o")

lib="$out/lib/librft_cuda_emu.so"
newest=$(ls -t "${objs[@]}" | head -1)
if [[ ! -f "$lib" || "$newest" -nt "$lib" ]]; then
    g++ "${flags[@]}" -shared -Wl,-soname,librft_cuda_emu.so -o "$lib" "${objs[@]}"
fi
# The names cudarc dlopens (cuda-13000: libcuda.so, libcublas.so; see cudarc's
# get_lib_name_candidates).
for n in libcuda.so libcuda.so.1 libcublas.so libcublas.so.13; do ln -sf librft_cuda_emu.so "$out/lib/$n"; done
echo "$out/lib"
