#!/usr/bin/env bash
# Packs everything the GPU machine should run into .gpu/ (via ../shared/gpu/pack.sh) and writes
# .gpu/extra.sh with the GPU-only checks: every GPU test with RFT_REQUIRE_GPU=1 (a skip is a
# failure there), the CUDA generate smoke test, and the rollout benches of the CUDA issue next to
# the Hugging Face peers (../shared/peers/, same machine), the training-step benches, the
# embedded default run on the GPU (200 steps), a real-scale `rft train` smoke run, and the
# 64-sequence bench once more with RFT_CUDA_GRAPHS=0 (eager decode steps) to show what the
# decode graphs save. Then on the GPU machine:
#     bash .gpu/go.sh      (unpacks, then run.sh; SKIP_BENCH=1 skips the criterion benches)
set -euo pipefail
cd "$(dirname "$0")/.."
export NVCC="${NVCC:-$(scripts/install-nvcc.sh | tail -1)}"
RFT_REQUIRE_NVCC=1 ../shared/gpu/pack.sh
# Keep only what needs the GPU (the CPU tests run in CI), so .gpu stays under the carry limit.
find .gpu/test -type f ! -name 'cuda_*' -delete
find .gpu/bench -type f ! -name 'rollout-*' ! -name 'kernels-*' ! -name 'train-*' -delete
# Strip symbols and ship the binaries as one xz archive, unpacked by .gpu/go.sh on the GPU machine
# before run.sh: the carry limit is 64 MiB. The binaries (212 MiB stripped) share most of their
# bytes (every one embeds the kernels' fatbin), so the dictionary must span several of them: with
# xz's default 8 MiB window the archive is 55 MB, with 192 MiB it is 8.5 MB (-T1: a multi-threaded
# xz would cut the stream into blocks, each starting with an empty dictionary).
strip .gpu/bin/* .gpu/test/* .gpu/bench/*
tar -C .gpu -cf - bin test bench | xz -T1 --lzma2=preset=9e,dict=192MiB > .gpu/binaries.tar.xz
size=$(stat -c %s .gpu/binaries.tar.xz)
if [ "$size" -gt $((48 << 20)) ]; then
  echo "gpu_pack.sh: .gpu/binaries.tar.xz is $size bytes, too close to the 64 MiB carry limit" >&2
  exit 1
fi
rm -rf .gpu/bin .gpu/test .gpu/bench
cat > .gpu/go.sh <<'GO'
#!/usr/bin/env bash
# On the GPU machine, from the repo root: unpack the binaries, then run everything.
tar -C .gpu -xJf .gpu/binaries.tar.xz && exec bash .gpu/run.sh
GO
du -sh .gpu
export_line='export RFT_REQUIRE_GPU=1 RUST_BACKTRACE=1'
cat > .gpu/extra.sh <<EXTRA
$export_line
set -x
.gpu/bin/rft generate --model tests/fixtures/models/qwen2 --prompt "12 + 7 =" --device cuda --max-new-tokens 8 --num-samples 2 --seed 1
.gpu/bin/rft generate --model tests/fixtures/models/qwen2 --prompt "12 + 7 =" --device cpu --max-new-tokens 8 --num-samples 2 --seed 1
.gpu/bin/rft bench rollout --shape qwen2.5-0.5b --prompts 1 --num-generations 64 --prompt-len 128 --new-tokens 256 --json
.gpu/bin/rft bench train --shape qwen2.5-0.5b --sequences 64 --seq-len 384 --lora-rank 16 --json
rm -rf /tmp/rft-default-cuda /tmp/rft-q05-run
timeout 240 .gpu/bin/rft train --device cuda --max-steps 200 --output-dir /tmp/rft-default-cuda && cat /tmp/rft-default-cuda/summary.json && tail -n 3 /tmp/rft-default-cuda/metrics.jsonl
python3 scripts/random_model.py /tmp/rft-q05 qwen2.5-0.5b && timeout 180 .gpu/bin/rft train scripts/gpu_smoke_0.5b.toml --output-dir /tmp/rft-q05-run && tail -n 4 /tmp/rft-q05-run/metrics.jsonl
.gpu/bin/rft bench rollout --shape qwen2.5-0.5b --prompts 8 --num-generations 8 --prompt-len 128 --new-tokens 256 --json
RFT_CUDA_GRAPHS=0 .gpu/bin/rft bench rollout --shape qwen2.5-0.5b --prompts 8 --num-generations 8 --prompt-len 128 --new-tokens 256 --json
.gpu/bin/rft bench rollout --shape qwen2.5-0.5b --prompts 128 --num-generations 8 --prompt-len 128 --new-tokens 128 --json
.gpu/bin/rft bench rollout --shape qwen2.5-1.5b --prompts 8 --num-generations 8 --prompt-len 128 --new-tokens 256 --json
.gpu/bin/rft bench train --shape qwen2.5-1.5b --sequences 64 --seq-len 384 --lora-rank 16 --json
.gpu/bin/rft bench train --shape qwen2.5-0.5b --sequences 64 --seq-len 384 --lora-rank 16 --recompute none --json
.gpu/bin/rft bench train --shape qwen2.5-7b --sequences 64 --seq-len 384 --lora-rank 16 --micro-batch-size 16 --steps 1 --json
EXTRA
# run.sh runs the test binaries before extra.sh; make the GPU tests strict there too.
sed -i 's|^export CARGO_MANIFEST_DIR=|export RFT_REQUIRE_GPU=1 CARGO_MANIFEST_DIR=|' .gpu/run.sh
echo "packed: run 'bash .gpu/go.sh' on the GPU machine (carry .gpu)"
