#!/usr/bin/env bash
# One bounded GPU session, on the GPU machine from the repo root after scripts/gpu_pack.sh:
#     bash scripts/gpu_check.sh [tests|benches|all]      (default all)
# Unpacks .gpu/binaries.tar.xz, runs every GPU test binary in parallel (each under a timeout,
# RFT_REQUIRE_GPU=1 so a skip fails), one memcheck pass of the kernel tests under
# compute-sanitizer alongside, then the `rft bench` runs of issues #5/#6 one after another, each
# under its own timeout, most important first. Everything lands in $OUT (logs.tgz, bench.jsonl,
# summary.txt), and a short summary is printed, so that a run cut off by its limit still
# reports what it finished.
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
O=${OUT:-/tmp/rft-gpu-out}
mkdir -p "$O" /tmp/rft-logs
L=/tmp/rft-logs
tar -C .gpu -xJf .gpu/binaries.tar.xz || exit 1
export CARGO_MANIFEST_DIR=$PWD RFT_REQUIRE_GPU=1 RUST_BACKTRACE=1
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
S=$O/summary.txt
pack() { tar -C /tmp -czf "$O/logs.tgz" rft-logs 2>/dev/null; }
trap pack EXIT
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee "$S"
t0=$(date +%s)

if [ "$what" != benches ]; then
  san=""
  if command -v compute-sanitizer >/dev/null && [ -z "${NO_SANITIZER:-}" ]; then
    for t in .gpu/test/cuda_kernels-* .gpu/test/cuda_lora_train-* .gpu/test/cuda_attention_train-* \
             .gpu/test/cuda_fused-* .gpu/test/cuda_rollout_kernels-* .gpu/test/cuda_train_kernels-* \
             .gpu/test/cuda_gemm-*; do
      n=$(basename "$t" | sed 's/-[0-9a-f]*$//')
      ( timeout "${SAN_TIMEOUT:-120}" compute-sanitizer --tool memcheck --print-limit 20 \
          --error-exitcode 9 "$t" --test-threads 2 >"$L/san-$n.log" 2>&1
        echo "sanitizer $n rc=$?" >>"$L/san-rc" ) &
      san="$san $!"
    done
  fi
  pids=""
  for t in .gpu/test/cuda_*; do
    n=$(basename "$t" | sed 's/-[0-9a-f]*$//')
    ( timeout "${TEST_TIMEOUT:-150}" "$t" --test-threads 4 >"$L/test-$n.log" 2>&1
      echo "test $n rc=$?" >>"$L/test-rc" ) &
    pids="$pids $!"
  done
  wait $pids
  [ -n "$san" ] && wait $san
  {
    echo "== tests ($(( $(date +%s) - t0 )) s)"
    sort "$L/test-rc"
    for f in "$L"/test-*.log; do
      echo "-- $(basename "$f"): $(grep -h '^test result' "$f" | tail -1)"
      grep -hE '^test .* FAILED$|panicked at|^thread .* panicked' "$f" | head -8
      grep -hA3 'panicked at' "$f" | grep -vE 'panicked at|^--$|note: run with' | head -12
    done
  } | tee -a "$S"
  if [ -n "$san" ]; then
    { echo "== sanitizer"; sort "$L/san-rc"; grep -h -m5 -B1 -A6 '=========.*\(Invalid\|Error\|error\)' "$L"/san-*.log | head -60; } | tee -a "$S"
  fi
  pack
fi

if [ "$what" != tests ]; then
  B=$O/bench.jsonl
  R=.gpu/bin/rft
  step() { # step <timeout> <name> <command...>
    local to=$1 name=$2; shift 2
    local s=$(date +%s)
    timeout "$to" "$@" >"$L/bench-$name.out" 2>"$L/bench-$name.err"
    local rc=$?
    echo "{\"step\":\"$name\",\"rc\":$rc,\"secs\":$(( $(date +%s) - s ))}" >>"$B"
    grep -h '^{' "$L/bench-$name.out" | sed "s/^{/{\"step\":\"$name\",/" >>"$B"
    echo "-- $name rc=$rc $(( $(date +%s) - s )) s: $(tail -c 600 "$L/bench-$name.out" | tr '\n' ' ')" | tee -a "$S"
    [ $rc = 0 ] || tail -n 6 "$L/bench-$name.err" | tee -a "$S"
    pack
  }
  echo "== benches" | tee -a "$S"
  step 60 gen-cuda $R generate --model tests/fixtures/models/qwen2 --prompt "12 + 7 =" --device cuda --max-new-tokens 8 --num-samples 2 --seed 1
  step 60 gen-cpu $R generate --model tests/fixtures/models/qwen2 --prompt "12 + 7 =" --device cpu --max-new-tokens 8 --num-samples 2 --seed 1
  step 90 roll-05b-64 $R bench rollout --shape qwen2.5-0.5b --prompts 1 --num-generations 64 --prompt-len 128 --new-tokens 256 --json
  step 60 roll-05b-64-cublas env RFT_SKINNY_GEMM=0 $R bench rollout --shape qwen2.5-0.5b --prompts 1 --num-generations 64 --prompt-len 128 --new-tokens 256 --json
  step 60 roll-05b-64-lora16 $R bench rollout --shape qwen2.5-0.5b --prompts 1 --num-generations 64 --prompt-len 128 --new-tokens 256 --lora-rank 16 --json
  step 90 train-05b $R bench train --shape qwen2.5-0.5b --sequences 64 --seq-len 384 --lora-rank 16 --json
  step 90 train-05b-keep6 $R bench train --shape qwen2.5-0.5b --sequences 64 --seq-len 384 --lora-rank 16 --keep-layers 6 --json
  step 90 train-05b-splitvocab env RFT_TRAIN_VOCAB_CHUNK=32768 $R bench train --shape qwen2.5-0.5b --sequences 64 --seq-len 384 --lora-rank 16 --json
  # No recompute within the memory target by micro-batching (activations 1/4 or 1/8 of the batch's):
  # the memory budget picks the largest micro-batch that fits (16 by the plan: 6.2 GiB + weights).
  step 90 train-05b-loraadd env RFT_TRAIN_LORA_EPILOGUE=add $R bench train --shape qwen2.5-0.5b --sequences 64 --seq-len 384 --lora-rank 16 --json
  step 90 train-05b-budget $R bench train --shape qwen2.5-0.5b --sequences 64 --seq-len 384 --lora-rank 16 --recompute none --max-train-memory-gib 8.5 --json
  # More blocks in flight for the fused LoRA kernels (column splits; bit-identical results).
  step 90 train-05b-budget-lorablocks env RFT_TRAIN_LORA_BLOCKS=1056 $R bench train --shape qwen2.5-0.5b --sequences 64 --seq-len 384 --lora-rank 16 --recompute none --max-train-memory-gib 8.5 --json
  step 90 train-05b-mb8-norecompute $R bench train --shape qwen2.5-0.5b --sequences 64 --seq-len 384 --lora-rank 16 --micro-batch-size 8 --recompute none --json
  step 90 train-05b-full $R bench train --shape qwen2.5-0.5b --sequences 64 --seq-len 384 --full-fine-tuning --json
  step 90 roll-05b-1024 $R bench rollout --shape qwen2.5-0.5b --prompts 128 --num-generations 8 --prompt-len 128 --new-tokens 128 --json
  step 90 roll-15b-64 $R bench rollout --shape qwen2.5-1.5b --prompts 8 --num-generations 8 --prompt-len 128 --new-tokens 256 --json
  step 60 roll-15b-64-cublas env RFT_SKINNY_GEMM=0 $R bench rollout --shape qwen2.5-1.5b --prompts 8 --num-generations 8 --prompt-len 128 --new-tokens 256 --json
  step 90 train-15b $R bench train --shape qwen2.5-1.5b --sequences 64 --seq-len 384 --lora-rank 16 --json
  step 90 train-15b-budget $R bench train --shape qwen2.5-1.5b --sequences 64 --seq-len 384 --lora-rank 16 --recompute none --max-train-memory-gib 12 --json
  # rft train refuses a fresh run into a directory that holds one: a rerun starts clean.
  rm -rf /tmp/rft-default-cuda /tmp/rft-default-cuda-800 /tmp/rft-q05-run
  step 150 default-train $R train --device cuda --max-steps 200 --output-dir /tmp/rft-default-cuda
  tail -n 2 /tmp/rft-default-cuda/metrics.jsonl 2>/dev/null | cut -c1-400 | tee -a "$S"
  step 60 default-train-800 $R train --device cuda --output-dir /tmp/rft-default-cuda-800
  grep -h '"kind":"eval"' /tmp/rft-default-cuda-800/metrics.jsonl 2>/dev/null | tail -n 1 | cut -c1-300 | tee -a "$S"
  step 120 smoke-05b bash -c "python3 scripts/random_model.py /tmp/rft-q05 qwen2.5-0.5b >/dev/null && $R train scripts/gpu_smoke_0.5b.toml --output-dir /tmp/rft-q05-run && tail -n 3 /tmp/rft-q05-run/metrics.jsonl"
  step 120 train-7b $R bench train --shape qwen2.5-7b --sequences 64 --seq-len 384 --lora-rank 16 --micro-batch-size 16 --steps 1 --json
  step 60 roll-05b-64-eager env RFT_CUDA_GRAPHS=0 $R bench rollout --shape qwen2.5-0.5b --prompts 8 --num-generations 8 --prompt-len 128 --new-tokens 256 --json
  step 60 train-05b-norecompute $R bench train --shape qwen2.5-0.5b --sequences 64 --seq-len 384 --lora-rank 16 --recompute none --json
  python3 scripts/bench_table.py "$B" | tee -a "$S" "$O/bench-table.md" || true
  pack
fi
echo "done in $(( $(date +%s) - t0 )) s" | tee -a "$S"
