#!/usr/bin/env bash
# The seed's comparison on the tiny setup: what does a checker alone (RFT) buy, against
# supervised fine-tuning on 10 or 100 labelled examples? Every arm starts from models/tiny
# (29.6% greedy validation accuracy) and trains the same LoRA (r 16, alpha 32, all-linear).
#   RFT:      `rft train` (the embedded default: 800 GRPO steps, unlabelled prompts, exact checker)
#   SFT-N:    `rft sft` on N labelled examples from the training split that the base model never
#             saw (rows 401..), 200 steps of batch 10, lr in {3e-4, 1e-3, 3e-3}: the best is kept.
# Prints one line per arm with the validation accuracy (500 held-out prompts, greedy).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
R=target/release/rft
w=$(mktemp -d)
trap 'rm -rf "$w"' EXIT
"$R" data configs/default.toml --split train --num 500 | tail -n 100 > "$w/lab100.jsonl"
head -n 10 "$w/lab100.jsonl" > "$w/lab10.jsonl"
acc() { python3 -c 'import json,sys; print("%.1f%%" % (100*json.loads(sys.stdin.read())["accuracy"]))'; }
echo "base (models/tiny): $("$R" eval configs/default.toml | acc)"
for n in 10 100; do
  best=""
  for lr in 3e-4 1e-3 3e-3; do
    "$R" sft --model models/tiny --data "$w/lab$n.jsonl" --output "$w/sft_${n}_$lr" --lora-r 16 --lora-alpha 32 \
        --epochs $((2000 / n)) --batch-size 10 --max-steps 200 --lr $lr --lr-scheduler linear --seed 0 \
        --log-every 1000 > /dev/null
    a=$("$R" eval configs/default.toml --adapter "$w/sft_${n}_$lr" | acc)
    echo "  SFT-$n lr $lr: $a"
  done
done
"$R" train --output-dir "$w/rft" --quiet 2>&1 | grep "validation accuracy"
