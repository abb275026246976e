#!/usr/bin/env bash
# Makes models/tiny — the tiny default model of `rft train` — from scratch with rft itself:
#   scripts/make_tiny_model.sh [OUT_DIR]            (default: models/tiny)
#
# 1. The model's files: config.json (Qwen2 shape: hidden 64, 2 layers, 4 heads / 2 KV heads,
#    SwiGLU 256, tied embeddings; 124,480 parameters) and a 16-token character-level
#    tokenizer (<|endoftext|>, 0-9, + - = space newline), from scripts/tiny_recipe/
#    (designed and prototyped in PyTorch by scripts/tiny_recipe/prototype.py; see RECIPE.md).
# 2. 400 labelled examples of the built-in task ("44+51=" → "95") from the default config's
#    training split (`rft data --split sft`), disjoint from its validation prompts.
# 3. `rft sft --init-random 0`: full training from random weights, batch 32, AdamW 3e-3
#    constant, 400 steps. The result is bit-reproducible on a CPU; it reaches about a third
#    of the validation prompts (29.6%), leaving room for GRPO to show what a checker can teach.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-models/tiny}"
cargo build --release --quiet
rft=target/release/rft
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp scripts/tiny_recipe/config.json scripts/tiny_recipe/tokenizer.json scripts/tiny_recipe/tokenizer_config.json "$work/"
"$rft" data configs/default.toml --split sft --num 400 > "$work/sft.jsonl"
"$rft" sft --model "$work" --data "$work/sft.jsonl" --output "$out" --init-random 0 \
    --epochs 32 --batch-size 32 --max-steps 400 --lr 3e-3 --lr-scheduler constant \
    --max-grad-norm 1 --seed 0 --log-every 100
"$rft" eval configs/default.toml --model "$out"
