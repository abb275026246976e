#!/usr/bin/env bash
# Per-kernel GPU time of the rollout and training benches under Nsight Compute (ncu), on the GPU
# machine after scripts/gpu_pack.sh:  bash scripts/gpu_profile.sh [roll64 roll64lora roll1024 roll15b train05 train05fit]
# Writes $OUT/prof-<name>.csv (one row per kernel launch: name, duration in ns); aggregate with
#     python3 scripts/prof_summary.py prof-*.csv
# Decode steps run eagerly here (RFT_CUDA_GRAPHS=0) so that every kernel is its own launch.
set -uo pipefail
cd "$(dirname "$0")/.."
O=${OUT:-/tmp/rft-gpu-out}; mkdir -p "$O"
[ -x .gpu/bin/rft ] || tar -C .gpu -xJf .gpu/binaries.tar.xz || exit 1
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
prof() { # prof <name> <timeout> <command...>
  local name=$1 to=$2; shift 2
  local s=$(date +%s)
  RFT_CUDA_GRAPHS=0 timeout "$to" "$NCU" --clock-control none --cache-control none --metrics gpu__time_duration.sum \
    --csv --print-units base --log-file "$O/prof-$name.csv" "$@" >"/tmp/prof-$name.out" 2>&1
  echo "-- $name rc=$? $(( $(date +%s) - s )) s $(wc -l <"$O/prof-$name.csv") rows; $(grep -h '^{' "/tmp/prof-$name.out" | cut -c1-300; tail -n 2 "/tmp/prof-$name.out" | cut -c1-300)"
}
R=.gpu/bin/rft
what=${1:-roll64 roll64lora roll1024 roll15b train05}
for w in $what; do
  case $w in
    roll64) prof roll64 ${T1:-50} $R bench rollout --shape qwen2.5-0.5b --prompts 1 --num-generations 64 --prompt-len 128 --new-tokens 6 --json ;;
    roll64lora) prof roll64lora ${T1:-50} $R bench rollout --shape qwen2.5-0.5b --prompts 1 --num-generations 64 --prompt-len 128 --new-tokens 6 --lora-rank 16 --json ;;
    roll1024) prof roll1024 ${T2:-50} $R bench rollout --shape qwen2.5-0.5b --prompts 128 --num-generations 8 --prompt-len 128 --new-tokens 6 --json ;;
    roll15b) prof roll15b ${T1:-50} $R bench rollout --shape qwen2.5-1.5b --prompts 8 --num-generations 8 --prompt-len 128 --new-tokens 6 --json ;;
    train05) prof train05 ${T3:-120} $R bench train --shape qwen2.5-0.5b --sequences 64 --seq-len 384 --lora-rank 16 --steps 1 --json ;;
    # The layout the 10 GiB budget picks (micro-batches of 16, no recompute).
    train05fit) prof train05fit ${T3:-120} $R bench train --shape qwen2.5-0.5b --sequences 64 --seq-len 384 --lora-rank 16 --recompute none --max-train-memory-gib 8.5 --steps 1 --json ;;
  esac
done
