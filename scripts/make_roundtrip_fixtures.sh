#!/usr/bin/env bash
# Round-trip fixtures for outputs WRITTEN BY RFT (tests/fixtures/train/rft_roundtrip/), checked
# by peft / transformers. Run from anywhere; works in the repo root. CPU only, no network.
#
#     scripts/make_roundtrip_fixtures.sh [RFT_BINARY]      # default: target/{release,debug}/rft
#
# 1. `rft sft` trains a LoRA adapter (r 4, alpha 8, all-linear, 6 steps, lr 1e-2, seed 7) on
#    rft_roundtrip/sft_data.jsonl over tests/fixtures/models/qwen2 -> rft_roundtrip/adapter/
#    (--model is the RELATIVE path, so adapter_config.json's base_model_name_or_path is
#    "tests/fixtures/models/qwen2", which peft resolves from the repo root).
# 2. make_train_fixtures.py stage 2: peft loads that adapter (PeftModel.from_pretrained, every
#    key checked) and scores items.jsonl -> peft_logprobs.json.
# 3. `rft merge` of the adapter into qwen2 (a temp dir); stage 3: transformers loads it and
#    scores items.jsonl, compared with peft_logprobs.json -> hf_merged.json.
# 4. `rft sft --full` (4 steps, lr 1e-3) on qwen2, and `rft sft --init-random 11` (4 steps,
#    lr 1e-2) on a dir with only qwen2's config + tokenizer files (temp dirs); stage 3 on each
#    -> hf_full.json, hf_init_random.json.
# Merged / full weights are not committed: tests/peft_roundtrip.rs re-creates them with the
# same commands (sft and merge are bit-reproducible) and checks the sha256 recorded by stage 3.
# The exact commands are repeated in tests/peft_roundtrip.rs (keep the two in step).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$HOME/.cache/rft-fixtures/bin/python}
RFT=${1:-}
if [ -z "$RFT" ]; then
  for c in "${CARGO_TARGET_DIR:-target}/release/rft" "${CARGO_TARGET_DIR:-target}/debug/rft"; do
    [ -x "$c" ] && RFT=$c && break
  done
fi
[ -x "$RFT" ] || { echo "build rft first (cargo build --release) or pass its path" >&2; exit 1; }
D=tests/fixtures/train/rft_roundtrip
M=tests/fixtures/models/qwen2
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

rm -rf "$D/adapter"
"$RFT" sft --model $M --data $D/sft_data.jsonl --output $D/adapter \
  --lora-r 4 --lora-alpha 8 --target-modules all-linear --batch-size 2 --epochs 3 --lr 1e-2 --seed 7
"$PY" scripts/make_train_fixtures.py --check-rft-adapter $D/adapter $D/items.jsonl $D/peft_logprobs.json

"$RFT" merge --model $M --adapter $D/adapter --out "$TMP/merged"
"$PY" scripts/make_train_fixtures.py --check-hf-model "$TMP/merged" $D/items.jsonl $D/hf_merged.json \
  --reference $D/peft_logprobs.json

"$RFT" sft --model $M --data $D/sft_data.jsonl --output "$TMP/full" --full \
  --batch-size 2 --max-steps 4 --epochs 2 --lr 1e-3 --seed 7
"$PY" scripts/make_train_fixtures.py --check-hf-model "$TMP/full" $D/items.jsonl $D/hf_full.json

mkdir "$TMP/bare"
for f in config.json generation_config.json tokenizer.json tokenizer_config.json; do
  cp $M/$f "$TMP/bare/"
done
"$RFT" sft --model "$TMP/bare" --data $D/sft_data.jsonl --output "$TMP/scratch" --init-random 11 \
  --batch-size 2 --max-steps 4 --epochs 2 --lr 1e-2 --seed 7
"$PY" scripts/make_train_fixtures.py --check-hf-model "$TMP/scratch" $D/items.jsonl $D/hf_init_random.json

du -sb $D
