#!/usr/bin/env python3
"""The bf16 noise floor of Hugging Face transformers (+ peft) on the fixture models: how far
HF's own bf16 model is from its f32 model. The GPU tests (tests/cuda_engine.rs,
tests/cuda_train.rs) compare rft's bf16 CUDA path with the f32 CPU reference, and derive their
tolerances from these numbers instead of guessing them: an implementation that rounds to bf16
where HF does (weights, every stored activation) should be no further from f32 than a small
multiple of what HF's bf16 path is.

Writes tests/fixtures/models/<name>/bf16_noise.json (overwritten):
  last_logits_max_abs   per engine-test prompt (lengths 1, 15, 16, 17, 37, the token formula of
                        tests/cuda_engine.rs::prompts): max |z_bf16 - z_f32| at the last position
  logits_max_abs        max over those prompts and EVERY position of max |Δz|
  logprob_max_abs       max over those prompts and every position of max over the vocabulary
                        of |Δ log_softmax(z)| (teacher-forced log-probs of any next token)
  lora_grad_rel_l2      max over LoRA tensors (norm ≥ 1% of the largest) of the relative L2
                        distance of the bf16 gradient from the f32 gradient, for a GRPO-shaped
                        loss (rank-4 all-linear adapter, A, B ~ N(0, 0.05²) as the test's
                        LoraWeights::new_random(…, 0.05, 0.05); 9 sequences of prompt 1..9 +
                        completion 1..12 random tokens; loss = Σ adv · logp(completion)/T=0.9
                        averaged over completion tokens)
  lora_grad_cosine      cosine of the flat bf16 and f32 gradients
  full_grad_rel_l2      the same distance for the gradients of every weight of the model (no
                        adapter: full fine-tuning, tests/cuda_train.rs's full-fine-tuning tests),
                        on the same loss and batch; tensors with a norm under 1% of the largest
                        are left out as above (k_proj's bias has no gradient in exact
                        arithmetic: a shift of every key's score by q·b, which the softmax
                        ignores, so both sides hold only rounding noise there)
  full_grad_cosine      cosine of the flat bf16 and f32 full gradients
  adam5_update_rel_l2   the same distance for the adapter's change after 5 AdamW steps (lr 1e-2,
                        weight decay 0.01, torch defaults otherwise) on that loss and batch, as
                        tests/cuda_train.rs's five-step test takes them: Adam divides each
                        element by its own gradient scale, so elements whose gradient is mostly
                        rounding noise move by ±lr either way and the update differs more than
                        the gradient does

bf16 here means model.to(torch.bfloat16) with peft's default f32 adapter weights (as rft keeps
f32 LoRA master weights); f32 means the same fixture weights in f32.

    ~/.cache/rft-fixtures/bin/python scripts/make_bf16_noise.py
"""

import json
import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import peft  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

PAGE = 16  # src/cuda/engine.rs PAGE_SIZE: the engine test's prompt lengths cross page edges
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "models")


def prompts(vocab):
    lens = [1, PAGE - 1, PAGE, PAGE + 1, 37]
    return [[(t * 31 + i * 17 + 3) % vocab for t in range(n)] for i, n in enumerate(lens)]


def load(d, dtype):
    m = AutoModelForCausalLM.from_pretrained(d, dtype=dtype, attn_implementation="eager")
    return m.eval()


def batch(vocab):
    g = torch.Generator().manual_seed(1234)
    seqs = []
    for grp in range(3):
        prompt = torch.randint(0, vocab, (1 + 4 * grp,), generator=g).tolist()
        for _ in range(3):
            n = 1 + int(torch.randint(0, 12, (1,), generator=g))
            seqs.append((prompt, torch.randint(0, vocab, (n,), generator=g).tolist()))
    adv = [0.8, -1.1, 0.3, 0.0, 0.0, 0.0, -0.9, -0.4, 1.3]
    return seqs, adv


def grpo_like_loss(pm, seqs, adv):
    total, ntok = 0.0, 0
    for (prompt, comp), a in zip(seqs, adv):
        ids = torch.tensor([prompt + comp])
        z = pm(input_ids=ids).logits[0].float() / 0.9
        lp = torch.log_softmax(z, -1)
        tgt = torch.tensor(comp)
        pos = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(comp))
        total = total + a * lp[pos, tgt].sum()
        ntok += len(comp)
    return -(total / ntok)


def peft_model(d, dtype):
    torch.manual_seed(0)
    m = load(d, dtype)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    pm = get_peft_model(m, cfg)
    g = torch.Generator().manual_seed(11)
    for n, p in pm.named_parameters():
        if "lora_" in n:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return pm


def lora_grads(d, dtype, seqs, adv):
    pm = peft_model(d, dtype)
    grpo_like_loss(pm, seqs, adv).backward()
    return {n: p.grad.detach().double().flatten() for n, p in pm.named_parameters() if "lora_" in n}


def full_grads(d, dtype, seqs, adv):
    m = load(d, dtype)
    grpo_like_loss(m, seqs, adv).backward()
    return {n: p.grad.detach().double().flatten() for n, p in m.named_parameters() if p.grad is not None}


def adam5_updates(d, dtype, seqs, adv):
    pm = peft_model(d, dtype)
    params = {n: p for n, p in pm.named_parameters() if "lora_" in n}
    start = {n: p.detach().double().clone().flatten() for n, p in params.items()}
    opt = torch.optim.AdamW(list(params.values()), lr=1e-2, weight_decay=0.01)
    for _ in range(5):
        opt.zero_grad()
        grpo_like_loss(pm, seqs, adv).backward()
        opt.step()
    return {n: p.detach().double().flatten() - start[n] for n, p in params.items()}


def rel_l2_max(a, b):
    """max over tensors of a (norm ≥ 1% of the largest) of |b - a| / |a|."""
    max_norm = max(float(v.norm()) for v in a.values())
    return max(float((b[k] - a[k]).norm() / a[k].norm()) for k in a if float(a[k].norm()) >= 0.01 * max_norm)


def cosine(a, b):
    """cosine of the flat vectors of a and b (in a's tensor order)."""
    fa, fb = torch.cat(list(a.values())), torch.cat([b[k] for k in a])
    return float(fa @ fb / (fa.norm() * fb.norm()))


def main():
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    for name in ["llama", "qwen2", "qwen3", "mistral"]:
        d = os.path.join(ROOT, name)
        f32, b16 = load(d, torch.float32), load(d, torch.bfloat16)
        vocab = f32.config.vocab_size
        last, all_z, all_lp = [], 0.0, 0.0
        with torch.no_grad():
            for p in prompts(vocab):
                ids = torch.tensor([p])
                a = f32(ids).logits[0].double()
                b = b16(ids).logits[0].double()
                last.append(float((a[-1] - b[-1]).abs().max()))
                all_z = max(all_z, float((a - b).abs().max()))
                all_lp = max(all_lp, float((torch.log_softmax(a, -1) - torch.log_softmax(b, -1)).abs().max()))
        seqs, adv = batch(vocab)
        ga, gb = lora_grads(d, torch.float32, seqs, adv), lora_grads(d, torch.bfloat16, seqs, adv)
        rel = rel_l2_max(ga, gb)
        ua, ub = adam5_updates(d, torch.float32, seqs, adv), adam5_updates(d, torch.bfloat16, seqs, adv)
        rel_adam = rel_l2_max(ua, ub)
        cos = cosine(ga, gb)
        wa, wb = full_grads(d, torch.float32, seqs, adv), full_grads(d, torch.bfloat16, seqs, adv)
        out = {
            "what": "HF bf16 model vs HF f32 model on the same fixture weights (scripts/make_bf16_noise.py)",
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
            "last_logits_max_abs": last,
            "logits_max_abs": all_z,
            "logprob_max_abs": all_lp,
            "lora_grad_rel_l2": rel,
            "lora_grad_cosine": cos,
            "adam5_update_rel_l2": rel_adam,
            "full_grad_rel_l2": rel_l2_max(wa, wb),
            "full_grad_cosine": cosine(wa, wb),
        }
        with open(os.path.join(d, "bf16_noise.json"), "w") as f:
            json.dump(out, f, indent=1)
            f.write("\n")
        print(name, json.dumps({k: v for k, v in out.items() if k not in ("what", "versions")}))


if __name__ == "__main__":
    main()
