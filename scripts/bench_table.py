#!/usr/bin/env python3
"""Turns the bench.jsonl of scripts/gpu_check.sh into one Markdown table: per bench step its
device, speed, memory, the layout it ran with, and the issue's target with met / missed.

    python3 scripts/bench_table.py $OUT/bench.jsonl [more.jsonl …]

Rollout rows give generated tokens/s and ms per decode step; training rows the median step time
and the peak device memory measured (`peak_gpu_bytes_measured`: what the process holds after the
steps, weights included). Steps that failed show their exit status. Targets (issues #5 and #6,
one H200): rollout 0.5B × 64 sequences ≥ 60,000 tok/s, 0.5B × 1024 ≥ 150,000, 1.5B × 64 ≥ 30,000;
training 0.5B ≤ 150 ms and ≤ 10 GiB, 1.5B ≤ 400 ms and ≤ 16 GiB, 7B runs.

A second table compares the A/B pairs of gpu_check.sh (a switch or layout against the run it
varies) by time per step, to decide which becomes the default.
"""
import json
import sys

GIB = 1 << 30


def target(rec):
    """(text, met) of the issue target this bench record answers, or None."""
    shape = rec.get("shape", "")
    if "tok_s" in rec:  # rollout
        seqs = rec.get("prompts", 0) * rec.get("num_generations", 0)
        if rec.get("lora_rank", 0):
            return None
        want = {("qwen2.5-0.5b", 64): 60_000, ("qwen2.5-0.5b", 1024): 150_000, ("qwen2.5-1.5b", 64): 30_000}
        w = want.get((shape, seqs))
        return None if w is None else (f"≥ {w:,} tok/s", rec["tok_s"] >= w)
    if "step_ms" in rec:  # training
        if rec.get("full_fine_tuning"):
            return None
        limits = {"qwen2.5-0.5b": (150, 10), "qwen2.5-1.5b": (400, 16)}
        if shape == "qwen2.5-7b":
            return ("runs", True)
        if shape not in limits:
            return None
        ms, gib = limits[shape]
        peak = rec.get("peak_gpu_bytes_measured", 0) / GIB
        return (f"≤ {ms} ms, ≤ {gib} GiB", rec["step_ms"] <= ms and peak <= gib)
    return None


def row(step, rec):
    dev = rec.get("device", "")
    if "tok_s" in rec:
        what = f"rollout {rec['shape']} {rec['prompts']}×{rec['num_generations']}, " \
               f"{rec.get('new_tokens', '?')} new" + (f", LoRA r{rec['lora_rank']}" if rec.get("lora_rank") else "")
        speed = f"{rec['tok_s']:,.0f} tok/s ({rec.get('decode_ms_per_step', 0):.2f} ms/step)"
        layout = rec.get("gemm_policy", "")
    else:
        kind = "full FT" if rec.get("full_fine_tuning") else f"LoRA r{rec.get('lora_rank')}"
        what = f"train {rec['shape']} {rec['sequences']}×{rec['seq_len']}, {kind}"
        speed = f"{rec['step_ms']:.1f} ms ({rec.get('tokens_per_s', 0):,.0f} tok/s)"
        mb = rec.get("micro_batch_size")
        layout = f"recompute {rec.get('recompute')}, kept {rec.get('kept_layers', 0)}" + (
            f", {rec.get('micro_batches', 1)} × {mb} seqs" if mb else "")
    mem = f"{rec.get('peak_gpu_bytes_measured', 0) / GIB:.2f} GiB"
    t = target(rec)
    tgt = "" if t is None else f"{t[0]}: {'**met**' if t[1] else 'missed'}"
    return f"| {step} | {what} | {speed} | {mem} | {layout} | {tgt} | {dev} |"


# (variant step, the step it varies, what the pair decides), as gpu_check.sh names them.
AB_PAIRS = [
    ("roll-05b-64-cublas", "roll-05b-64", "RFT_SKINNY_GEMM: auto (default) vs cuBLAS only, 0.5B"),
    ("roll-15b-64-cublas", "roll-15b-64", "RFT_SKINNY_GEMM: auto (default) vs cuBLAS only, 1.5B"),
    ("train-05b-loraadd", "train-05b", "RFT_TRAIN_LORA_EPILOGUE: store (default) vs add"),
    ("train-05b-splitvocab", "train-05b", "RFT_TRAIN_VOCAB_CHUNK: all (default) vs 32768"),
    ("train-05b-keep6", "train-05b", "layer recompute keeping 6 layers vs none kept"),
    ("train-05b-budget", "train-05b", "0.5B layout: micro-batches without recompute in 8.5 GiB vs layer recompute"),
    ("train-05b-budget-lorablocks", "train-05b-budget", "RFT_TRAIN_LORA_BLOCKS: 264 (default) vs 1056"),
    ("train-05b-norecompute", "train-05b", "0.5B: no recompute, whole batch vs layer recompute"),
    ("train-15b-budget", "train-15b", "1.5B layout: micro-batches without recompute in 12 GiB vs layer recompute"),
]


def seconds_per_unit(rec):
    """Time per unit of work of a bench record: ms per training step, or ms per 1000 tokens."""
    if "step_ms" in rec:
        return rec["step_ms"]
    if rec.get("tok_s"):
        return 1e6 / rec["tok_s"]
    return None


def ab_table(by_step):
    rows = []
    for variant, base, what in AB_PAIRS:
        a, b = by_step.get(base), by_step.get(variant)
        ta = None if a is None else seconds_per_unit(a)
        tb = None if b is None else seconds_per_unit(b)
        if not ta or not tb:
            continue
        r = tb / ta
        verdict = "the variant is faster" if r < 0.98 else "the default is faster" if r > 1.02 else "within 2%"
        rows.append(f"| {what} | {base} | {variant} | {r:.3f} | {verdict} |")
    if rows:
        print()
        print("| A/B | default step | variant step | variant time / default time | verdict |")
        print("| --- | --- | --- | --- | --- |")
        print("\n".join(rows))


def main(paths):
    print("| step | workload | speed | peak memory | layout | target | device |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    by_step = {}
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                step = rec.get("step")
                if "rc" in rec and rec["rc"] != 0:
                    print(f"| {step} | failed: exit {rec['rc']} after {rec.get('secs')} s | | | | | |")
                elif "tok_s" in rec or "step_ms" in rec:
                    print(row(step, rec))
                    by_step[step] = rec
    ab_table(by_step)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
