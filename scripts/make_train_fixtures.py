#!/usr/bin/env python3
"""Training-core parity fixtures for rft (GRPO loss + LoRA gradients, PEFT adapter round trip).

Two stages. Both run on the CPU, need no network, and use the tiny models made by
scripts/make_fixtures.py (tests/fixtures/models/<name>/), loaded from disk with
dtype=torch.float32 and attn_implementation="eager".

Stage 1 (default) -- make the fixtures, overwriting tests/fixtures/train/:

    ~/.cache/rft-fixtures/bin/python scripts/make_train_fixtures.py

  tests/fixtures/train/<case>/            one GRPO case each (see tests/fixtures/train/README.md):
      adapter_config.json                 a PEFT LoRA adapter (r=4, alpha=8, all 7 projections,
      adapter_model.safetensors           non-zero random lora_A AND lora_B, f32), saved by
                                          peft's save_pretrained
      expected.json                       batch, options, old_logp, advantages, logp, ref_logp, loss
      grads.safetensors                   d loss / d (every lora_A / lora_B), f32, PEFT key names
  tests/fixtures/train/peft_roundtrip/    a peft-saved adapter on qwen2, items.jsonl (2 items) and
                                          expected_logprobs.json (per-token logprobs computed by peft)

  Everything is computed with autograd in float64 (base model and adapter cast to f64 after
  loading the f32 adapter from disk), so the fixtures are an exact oracle for an f32
  implementation. Before writing, the script checks its own loss code: the analytic
  d loss / d logp of every aggregation equals autograd for every token, and central finite
  differences of the loss w.r.t. a few LoRA entries equal the autograd LoRA gradients.

Stage 2 -- check an adapter SAVED BY RFT (direction rft -> peft):

    ~/.cache/rft-fixtures/bin/python scripts/make_train_fixtures.py \\
        --check-rft-adapter ADAPTER_DIR ITEMS_JSONL OUT_JSON

  Loads ADAPTER_DIR with peft.PeftModel.from_pretrained on the base model named by its
  adapter_config.json `base_model_name_or_path` (a path relative to the repo root, e.g.
  "tests/fixtures/models/qwen2"), checks that every tensor in adapter_model.safetensors was
  loaded into the model (no missing / unexpected keys, values equal), then writes OUT_JSON in
  the same schema as peft_roundtrip/expected_logprobs.json: the per-token logprobs of each
  {"prompt_ids": [..], "completion_ids": [..]} line of ITEMS_JSONL under base+adapter.

Stage 3 -- check an HF model directory WRITTEN BY RFT (`rft merge`, `rft sft --full`):

    ~/.cache/rft-fixtures/bin/python scripts/make_train_fixtures.py \\
        --check-hf-model MODEL_DIR ITEMS_JSONL OUT_JSON [--reference STAGE2_JSON]

  Loads MODEL_DIR with AutoModelForCausalLM.from_pretrained(dtype=float32) and asserts that
  nothing was missing, unexpected or mismatched and that the model holds exactly the tensors of
  model.safetensors; writes OUT_JSON (stage 2's schema + the sha256 of model.safetensors).
  With --reference, records and asserts (< 1e-4) the max |diff| to the reference's logprobs.
  scripts/make_roundtrip_fixtures.sh runs stages 2 and 3 on rft's outputs
  (tests/fixtures/train/rft_roundtrip/); stage 1 leaves that directory alone.

Made with torch 2.15, transformers 5.24, peft 0.21, safetensors 0.8.
"""

import argparse
import hashlib
import json
import os
import shutil
import sys

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import peft  # noqa: E402
import safetensors  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "train")

torch.set_num_threads(1)  # bit-stable CPU reductions
torch.use_deterministic_algorithms(True)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_STD = 0.1
VERSIONS = {
    "torch": torch.__version__.split("+")[0],
    "transformers": transformers.__version__,
    "peft": peft.__version__,
    "safetensors": safetensors.__version__,
}

# --------------------------------------------------------------------------------------
# True float64 forward
# --------------------------------------------------------------------------------------
# transformers' llama/qwen2 code computes RMSNorm, the eager attention softmax and the RoPE
# cos/sin in float32 whatever the model dtype. For an exact float64 oracle (and finite
# differences that agree with autograd to ~1e-9) those three are patched to keep float64
# when their input is float64; float32 inputs take the original code path unchanged.


def _patch_f64():
    import torch.nn as nn
    from transformers.models.llama import modeling_llama as ml
    from transformers.models.qwen2 import modeling_qwen2 as mq

    def rms_forward(orig):
        def f(self, hidden_states):
            if hidden_states.dtype != torch.float64:
                return orig(self, hidden_states)
            variance = hidden_states.pow(2).mean(-1, keepdim=True)
            return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))
        return f

    def rope_forward(orig):
        def f(self, x, position_ids):
            if x.dtype != torch.float64:
                return orig(self, x, position_ids)
            freqs = position_ids[..., None].to(torch.float64) * self.inv_freq.to(torch.float64)
            emb = torch.cat((freqs, freqs), dim=-1)
            return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
        return f

    def eager(orig):
        def f(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
            if query.dtype != torch.float64:
                return orig(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
            k = ml.repeat_kv(key, module.num_key_value_groups)
            v = ml.repeat_kv(value, module.num_key_value_groups)
            w = torch.matmul(query, k.transpose(2, 3)) * scaling
            if attention_mask is not None:
                w = w + attention_mask
            w = nn.functional.softmax(w, dim=-1)
            out = torch.matmul(w, v).transpose(1, 2).contiguous()
            return out, w
        return f

    for mod, pre in ((ml, "Llama"), (mq, "Qwen2")):
        norm = getattr(mod, pre + "RMSNorm")
        norm.forward = rms_forward(norm.forward)
        rope = getattr(mod, pre + "RotaryEmbedding")
        rope.forward = rope_forward(rope.forward)
        mod.eager_attention_forward = eager(mod.eager_attention_forward)


_patch_f64()


# --------------------------------------------------------------------------------------
# Models and adapters
# --------------------------------------------------------------------------------------


def model_rel(name):
    return f"tests/fixtures/models/{name}"


def load_base(rel):
    """The HF model from disk, f32, eager attention (as scripts/make_fixtures.py)."""
    m = AutoModelForCausalLM.from_pretrained(
        os.path.join(ROOT, rel), dtype=torch.float32, attn_implementation="eager"
    )
    return m.eval()


def make_adapter(model_name, out_dir, seed, use_rslora=False):
    """get_peft_model + fixed random non-zero A and B (std 0.1, f32), save_pretrained."""
    rel = model_rel(model_name)
    base = load_base(rel)
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=list(TARGETS),
        lora_dropout=0.0,
        bias="none",
        use_rslora=use_rslora,
        task_type="CAUSAL_LM",
    )
    pm = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for name, p in sorted(pm.named_parameters(), key=lambda kv: kv[0]):
            if "lora_A" in name or "lora_B" in name:
                p.copy_(LORA_STD * torch.randn(p.shape, generator=g, dtype=torch.float32))
                n += 1
    assert n == 2 * len(TARGETS) * base.config.num_hidden_layers, n
    os.makedirs(out_dir, exist_ok=True)
    pm.save_pretrained(out_dir)

    # base_model_name_or_path: a path relative to the repo root (peft writes whatever
    # name_or_path the base was loaded from, here an absolute path).
    cp = os.path.join(out_dir, "adapter_config.json")
    with open(cp) as f:
        c = json.load(f)
    c["base_model_name_or_path"] = rel
    c["target_modules"] = sorted(c["target_modules"])  # peft keeps a set: order varies per run
    with open(cp, "w") as f:
        json.dump(c, f, indent=2, sort_keys=True)
        f.write("\n")
    sd = load_file(os.path.join(out_dir, "adapter_model.safetensors"))
    want = {
        f"base_model.model.model.layers.{l}.{'self_attn' if t in ('q_proj', 'k_proj', 'v_proj', 'o_proj') else 'mlp'}"
        f".{t}.lora_{w}.weight"
        for l in range(base.config.num_hidden_layers) for t in TARGETS for w in "AB"
    }
    assert set(sd) == want, sorted(set(sd) ^ want)
    assert all(v.dtype == torch.float32 for v in sd.values())
    for p in ("README.md",):  # peft writes a model card; not needed
        if os.path.exists(os.path.join(out_dir, p)):
            os.remove(os.path.join(out_dir, p))
    return rel


def load_peft(adapter_dir, dtype, trainable=False):
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        rel = json.load(f)["base_model_name_or_path"]
    base = load_base(rel)
    pm = PeftModel.from_pretrained(base, adapter_dir, is_trainable=trainable)
    pm = pm.to(dtype).eval()
    # Every tensor of the file is in the model, and nothing else (no silent partial load).
    file_sd = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    model_sd = get_peft_model_state_dict(pm)
    assert set(file_sd) == set(model_sd), sorted(set(file_sd) ^ set(model_sd))
    for k, v in file_sd.items():
        assert torch.equal(v.to(dtype), model_sd[k].to(dtype)), k
    return pm, rel


def lora_params(pm):
    """name -> parameter, names in PEFT file form (adapter name 'default' dropped)."""
    out = {}
    for name, p in pm.named_parameters():
        if "lora_A" in name or "lora_B" in name:
            key = name.replace(".default.weight", ".weight")
            out[key] = p
    return out


# --------------------------------------------------------------------------------------
# Log-probabilities, advantages, loss
# --------------------------------------------------------------------------------------


def seq_logp(model, prompt, completion):
    """Per-token log p(completion[i] | prompt + completion[:i]); temperature 1; batch 1,
    no padding, positions 0..T-1."""
    ids = torch.tensor([list(prompt) + list(completion)])
    logits = model(input_ids=ids, use_cache=False).logits[0]
    lsm = torch.log_softmax(logits, dim=-1)
    P = len(prompt)
    idx = torch.arange(P - 1, P - 1 + len(completion))
    return lsm[idx, torch.tensor(completion)]


def advantages(rewards, G, scale_rewards):
    """TRL GRPO: group-major rewards; A = r - mean_group; 'group' scaling divides by
    (unbiased torch.std over the group + 1e-4)."""
    r = torch.tensor(rewards, dtype=torch.float64).view(-1, G)
    mean = r.mean(dim=1, keepdim=True)
    a = r - mean
    if scale_rewards == "group":
        std = r.std(dim=1, keepdim=True)  # unbiased (N-1)
        a = a / (std + 1e-4)
    elif scale_rewards == "none":
        pass
    else:
        raise ValueError(scale_rewards)
    return a.reshape(-1)


def per_token_losses(logp, old, ref, A, o):
    """Lists of 1-D tensors (one per sequence) -> list of per-token loss tensors."""
    out = []
    for lp, ol, rf, a in zip(logp, old, ref, A):
        ratio = torch.exp(lp - ol)
        l1 = ratio * a
        l2 = torch.clamp(ratio, 1 - o["epsilon"], 1 + o["epsilon_high"]) * a
        pt = -torch.min(l1, l2)
        if o["beta"] != 0.0:
            if o["kl_estimator"] == "k3":
                kl = torch.exp(rf - lp) - (rf - lp) - 1
            elif o["kl_estimator"] == "k1":
                kl = lp - rf
            else:
                raise ValueError(o["kl_estimator"])
            pt = pt + o["beta"] * kl
        out.append(pt)
    return out


def token_weights(lengths, o):
    """The weight of each token of each sequence in the aggregated loss."""
    N = len(lengths)
    if o["loss_type"] == "grpo":
        return [[1.0 / (N * L)] * L for L in lengths]
    if o["loss_type"] == "dapo":
        T = sum(lengths)
        return [[1.0 / T] * L for L in lengths]
    if o["loss_type"] == "dr_grpo":
        return [[1.0 / (N * o["max_completion_length"])] * L for L in lengths]
    raise ValueError(o["loss_type"])


def aggregate(pt, o):
    lengths = [len(x) for x in pt]
    N = len(pt)
    if o["loss_type"] == "grpo":
        return torch.stack([x.sum() / len(x) for x in pt]).sum() / N
    if o["loss_type"] == "dapo":
        return torch.cat(pt).sum() / sum(lengths)
    if o["loss_type"] == "dr_grpo":
        return torch.cat(pt).sum() / (N * o["max_completion_length"])
    raise ValueError(o["loss_type"])


def loss_fn(logp, old, ref, A, o):
    return aggregate(per_token_losses(logp, old, ref, A, o), o)


def analytic_dloss_dlogp(logp, old, ref, A, o):
    """d loss / d logp[i][t] by hand (the formula rft implements)."""
    W = token_weights([len(x) for x in logp], o)
    out = []
    for lp, ol, rf, a, w in zip(logp, old, ref, A, W):
        row = []
        for t in range(len(lp)):
            r = float(torch.exp(lp[t] - ol[t]))
            a_ = float(a)
            rc = min(max(r, 1 - o["epsilon"]), 1 + o["epsilon_high"])
            # -min(r a, clamp(r) a): the unclipped branch carries the gradient -a r when it
            # is the smaller (or equal: inside the clip range both branches are r a)
            g = -a_ * r if r * a_ <= rc * a_ else 0.0
            if o["beta"] != 0.0:
                d = float(rf[t] - lp[t])
                g += o["beta"] * ((1.0 - float(torch.exp(torch.tensor(d, dtype=torch.float64))))
                                  if o["kl_estimator"] == "k3" else 1.0)
            row.append(g * w[t])
        out.append(row)
    return out


# --------------------------------------------------------------------------------------
# The batch
# --------------------------------------------------------------------------------------

G = 3
PROMPTS = {  # 2 prompts (lengths 4 and 6, ids in [3, 461))
    "p0": None, "p1": None,
}
PROMPT_LENS = [4, 6]
COMPLETION_LENS = [2, 9, 5, 7, 3, 6]  # group-major: seqs 0-2 share prompt 0, 3-5 prompt 1
REWARDS = [1.0, 0.0, 0.5, 0.0, 0.0, 0.0]  # second group: zero std on purpose
# old_logp = logp + PERT[k % 5] over the batch's tokens in order (k counts across
# sequences): ratio = exp(-PERT) = 0.741 (below 1 - 0.2), 1.350 (above 1 + 0.28),
# 1, 0.905, 1.105 -- never near a clip boundary, so the loss is differentiable.
PERT = [0.3, -0.3, 0.0, 0.1, -0.1]


def make_batch(vocab, seed=2024):
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return [int(x) for x in torch.randint(3, vocab, (n,), generator=g)]

    prompts = [ids(n) for n in PROMPT_LENS]
    seqs = []
    for i, L in enumerate(COMPLETION_LENS):
        seqs.append({"prompt_ids": prompts[i // G], "completion_ids": ids(L)})
    return seqs


def perturbation(lengths):
    out, k = [], 0
    for L in lengths:
        out.append([PERT[(k + t) % len(PERT)] for t in range(L)])
        k += L
    return out


# --------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------

BASE_OPTS = dict(epsilon=0.2, epsilon_high=0.28, beta=0.04, kl_estimator="k3",
                 max_completion_length=16, scale_rewards="group", num_iterations=2,
                 temperature=1.0)

CASES = [
    # name, model, adapter seed, use_rslora, option overrides
    ("qwen2_grpo_k3", "qwen2", 101, False, dict(loss_type="grpo")),
    ("qwen2_dapo_k3", "qwen2", 101, False, dict(loss_type="dapo")),
    ("llama_grpo_k3", "llama", 202, False, dict(loss_type="grpo")),
    ("llama_drgrpo_k1", "llama", 202, False, dict(loss_type="dr_grpo", kl_estimator="k1")),
    ("qwen2_rslora_dapo_k3", "qwen2", 303, True, dict(loss_type="dapo")),
    ("qwen2_dapo_onpolicy_beta0", "qwen2", 101, False,
     dict(loss_type="dapo", beta=0.0, num_iterations=1)),
]


def fl(t):
    return [float(v) for v in t.tolist()]


def make_case(name, model_name, seed, rslora, over):
    d = os.path.join(OUT, name)
    os.makedirs(d)
    o = dict(BASE_OPTS, **over)
    rel = make_adapter(model_name, d, seed, rslora)
    pm, _ = load_peft(d, torch.float64, trainable=True)
    params = lora_params(pm)
    assert len(params) == 28 and all(p.requires_grad for p in params.values())
    n_trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert len(n_trainable) == 28, n_trainable

    seqs = make_batch(pm.config.vocab_size)
    lengths = [len(s["completion_ids"]) for s in seqs]
    A = advantages(REWARDS, G, o["scale_rewards"])
    assert torch.all(A[3:] == 0.0)

    logp = [seq_logp(pm, s["prompt_ids"], s["completion_ids"]) for s in seqs]
    with torch.no_grad(), pm.disable_adapter():
        ref = [seq_logp(pm, s["prompt_ids"], s["completion_ids"]) for s in seqs]
    if o["num_iterations"] == 1:
        old = [lp.detach().clone() for lp in logp]
    else:
        old = [lp.detach() + torch.tensor(p, dtype=torch.float64)
               for lp, p in zip(logp, perturbation(lengths))]
    for lp, rf in zip(logp, ref):
        assert (lp.detach() - rf).abs().max() > 1e-2  # the adapter matters

    # clip bookkeeping (what a Rust test may also check)
    clipped = []
    for lp, ol, a in zip(logp, old, A):
        r = torch.exp(lp.detach() - ol)
        hi = (r > 1 + o["epsilon_high"]) & (a > 0)
        lo = (r < 1 - o["epsilon"]) & (a < 0)
        clipped.append([bool(x) for x in (hi | lo)])
        near = torch.minimum((r - (1 - o["epsilon"])).abs(), (r - (1 + o["epsilon_high"])).abs())
        assert near.min() > 0.02, "a ratio sits on a clip boundary"
    if o["num_iterations"] != 1:
        assert any(clipped[0]) and any(clipped[1]), "both clip sides must be exercised"

    # ---- analytic d loss / d logp == autograd (every token) -------------------------
    leaf = [lp.detach().clone().requires_grad_(True) for lp in logp]
    lval = loss_fn(leaf, old, ref, A, o)
    auto = torch.autograd.grad(lval, leaf)
    ana = analytic_dloss_dlogp([x.detach() for x in leaf], old, ref, A, o)
    for ga, gb in zip(auto, ana):
        assert torch.allclose(ga, torch.tensor(gb, dtype=torch.float64), rtol=1e-12, atol=1e-15), (ga, gb)

    # ---- the loss and the LoRA gradients ----------------------------------------------
    pt = per_token_losses(logp, old, ref, A, o)
    loss = aggregate(pt, o)
    names = sorted(params)
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    grads = dict(zip(names, grads))
    assert all(g.abs().max() > 0 for g in grads.values()), "a LoRA gradient is all zero"

    # ---- finite differences on a few LoRA entries -------------------------------------
    def loss_now():
        with torch.no_grad():
            lp = [seq_logp(pm, s["prompt_ids"], s["completion_ids"]) for s in seqs]
            return float(loss_fn(lp, old, ref, A, o))

    probe = [n for n in names if n.endswith("layers.0.self_attn.q_proj.lora_A.weight")
             or n.endswith("layers.1.mlp.down_proj.lora_B.weight")
             or n.endswith("layers.0.self_attn.v_proj.lora_B.weight")]
    assert len(probe) == 3
    h = 1e-5
    for n in probe:
        p = params[n]
        flat_idx = int(torch.argmax(grads[n].abs()))
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat_idx), p.shape))
        with torch.no_grad():
            v0 = p[idx].item()
            p[idx] = v0 + h
            lp_ = loss_now()
            p[idx] = v0 - h
            lm_ = loss_now()
            p[idx] = v0
        fd = (lp_ - lm_) / (2 * h)
        ag = float(grads[n][idx])
        assert abs(fd - ag) <= 1e-7 * max(1.0, abs(ag)) + 1e-9, (n, idx, fd, ag)
    assert abs(loss_now() - float(loss.detach())) < 1e-15

    # ---- write -------------------------------------------------------------------------
    save_file({n: g.to(torch.float32).contiguous() for n, g in grads.items()},
              os.path.join(d, "grads.safetensors"), metadata={"format": "pt"})
    exp = {
        "case": name,
        "generated_by": "scripts/make_train_fixtures.py",
        "versions": VERSIONS,
        "dtype": "float64",
        "model": rel,
        "adapter": {"dir": f"tests/fixtures/train/{name}", "r": 4, "lora_alpha": 8,
                    "use_rslora": rslora, "scale": 8 / (4 ** 0.5) if rslora else 8 / 4,
                    "target_modules": TARGETS, "init_std": LORA_STD, "seed": seed},
        "options": {
            "loss_type": o["loss_type"],
            "epsilon": o["epsilon"],
            "epsilon_high": o["epsilon_high"],
            "beta": o["beta"],
            "kl_estimator": o["kl_estimator"],
            "max_completion_length": o["max_completion_length"],
            "scale_rewards": o["scale_rewards"],
            "num_iterations": o["num_iterations"],
            "temperature": o["temperature"],
        },
        "batch": {
            "num_generations": G,
            "rewards": REWARDS,
            "sequences": seqs,
        },
        "old_logp": [fl(x) for x in old],
        "advantages": fl(A),
        "logp": [fl(x.detach()) for x in logp],
        "ref_logp": [fl(x) for x in ref],
        "clipped": clipped,
        "per_token_loss": [fl(x.detach()) for x in pt],
        "dloss_dlogp": [fl(x) for x in auto],
        "loss": float(loss.detach()),
        "grads": {
            "file": "grads.safetensors",
            "dtype": "float32",
            "norm": float(torch.sqrt(sum((g ** 2).sum() for g in grads.values()))),
            "max_abs": float(max(g.abs().max() for g in grads.values())),
        },
    }
    with open(os.path.join(d, "expected.json"), "w") as f:
        json.dump(exp, f, indent=1)
        f.write("\n")
    print(f"  {name}: loss {float(loss.detach()):.10f}  |grad| {exp['grads']['norm']:.6e}")


# --------------------------------------------------------------------------------------
# PEFT round trip
# --------------------------------------------------------------------------------------

ROUNDTRIP_ITEMS = [  # fixed (prompt_ids, completion_ids); ids in [3, 461)
    {"prompt_ids": [57, 210, 33, 400, 18], "completion_ids": [91, 300, 12, 7, 455, 260, 88, 3]},
    {"prompt_ids": [120, 5, 77], "completion_ids": [402, 19, 230, 64, 101]},
]


def logprobs_doc(adapter_dir, items, rel):
    pm64, _ = load_peft(adapter_dir, torch.float64)
    pm32, _ = load_peft(adapter_dir, torch.float32)
    out = []
    with torch.no_grad():
        for it in items:
            lp64 = seq_logp(pm64, it["prompt_ids"], it["completion_ids"])
            lg32 = pm32(input_ids=torch.tensor([it["prompt_ids"] + it["completion_ids"]]),
                        use_cache=False).logits[0]
            lsm = torch.log_softmax(lg32.double(), -1)  # f32 logits, f64 log_softmax
            P = len(it["prompt_ids"])
            lp32 = [float(lsm[P - 1 + i, t].float()) for i, t in enumerate(it["completion_ids"])]
            out.append({"prompt_ids": it["prompt_ids"], "completion_ids": it["completion_ids"],
                        "logprobs": fl(lp64), "logprobs_f32": lp32})
            assert max(abs(a - b) for a, b in zip(fl(lp64), lp32)) < 1e-4
    return {
        "generated_by": "scripts/make_train_fixtures.py",
        "versions": VERSIONS,
        "model": rel,
        "adapter": (os.path.relpath(os.path.abspath(adapter_dir), ROOT)
                    if os.path.abspath(adapter_dir).startswith(ROOT + os.sep)
                    else os.path.abspath(adapter_dir)),
        "dtype": "float64 (logprobs); float32 model, float64 log_softmax (logprobs_f32)",
        "items": out,
    }


def make_roundtrip():
    d = os.path.join(OUT, "peft_roundtrip")
    os.makedirs(d)
    rel = make_adapter("qwen2", d, 404)
    with open(os.path.join(d, "items.jsonl"), "w") as f:
        for it in ROUNDTRIP_ITEMS:
            f.write(json.dumps(it) + "\n")
    doc = logprobs_doc(d, ROUNDTRIP_ITEMS, rel)
    # the adapter changes the scores noticeably (so a test that ignores it fails)
    base = load_base(rel).double()
    with torch.no_grad():
        for it, e in zip(ROUNDTRIP_ITEMS, doc["items"]):
            b = seq_logp(base, it["prompt_ids"], it["completion_ids"])
            assert (b - torch.tensor(e["logprobs"], dtype=torch.float64)).abs().max() > 0.05
    with open(os.path.join(d, "expected_logprobs.json"), "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print("  peft_roundtrip: ok")


def check_rft_adapter(adapter_dir, items_path, out_path):
    adapter_dir = os.path.abspath(adapter_dir)
    with open(items_path) as f:
        items = [json.loads(line) for line in f if line.strip()]
    for it in items:
        assert set(it) >= {"prompt_ids", "completion_ids"}, it
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        rel = json.load(f)["base_model_name_or_path"]
    doc = logprobs_doc(adapter_dir, items, rel)
    doc["generated_by"] = "scripts/make_train_fixtures.py --check-rft-adapter"
    with open(out_path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"wrote {out_path} ({len(items)} items)")


def check_hf_model(model_dir, items_path, out_path, reference=None):
    """Stage 3: an HF model directory written by rft (`rft merge`, `rft sft --full`) loads in
    transformers with every tensor of its model.safetensors used and nothing missing; writes
    the per-token logprobs of ITEMS (same schema as stage 2) plus the file's sha256. With a
    reference (a stage-2 JSON), also the max |diff| to its logprobs (asserted < 1e-4)."""
    model_dir = os.path.abspath(model_dir)
    with open(items_path) as f:
        items = [json.loads(line) for line in f if line.strip()]
    loaded = {}
    for dtype in (torch.float64, torch.float32):
        m, info = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
        )
        bad = {k: v for k, v in info.items() if v}
        assert not bad, f"transformers did not load {model_dir} cleanly: {bad}"
        assert m.dtype == torch.float32
        loaded[dtype] = m.to(dtype).eval()
    # Every tensor of the file is what the model holds (tied lm_head: the embedding).
    wpath = os.path.join(model_dir, "model.safetensors")
    file_sd = load_file(wpath)
    msd = loaded[torch.float32].state_dict()
    assert set(file_sd) <= set(msd), sorted(set(file_sd) - set(msd))
    for k, v in file_sd.items():
        assert v.dtype == torch.float32 and torch.equal(v, msd[k]), k
    for k in set(msd) - set(file_sd):
        assert k == "lm_head.weight" and loaded[torch.float32].config.tie_word_embeddings, k
        assert torch.equal(msd[k], file_sd["model.embed_tokens.weight"])
    out = []
    with torch.no_grad():
        for it in items:
            lp64 = seq_logp(loaded[torch.float64], it["prompt_ids"], it["completion_ids"])
            lg32 = loaded[torch.float32](
                input_ids=torch.tensor([it["prompt_ids"] + it["completion_ids"]]), use_cache=False
            ).logits[0]
            lsm = torch.log_softmax(lg32.double(), -1)
            P = len(it["prompt_ids"])
            lp32 = [float(lsm[P - 1 + i, t].float()) for i, t in enumerate(it["completion_ids"])]
            assert max(abs(a - b) for a, b in zip(fl(lp64), lp32)) < 1e-4
            out.append({"prompt_ids": it["prompt_ids"], "completion_ids": it["completion_ids"],
                        "logprobs": fl(lp64), "logprobs_f32": lp32})
    with open(wpath, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    doc = {
        "generated_by": "scripts/make_train_fixtures.py --check-hf-model",
        "versions": VERSIONS,
        "model_safetensors_sha256": digest,
        "num_tensors": len(file_sd),
        "dtype": "float64 (logprobs); float32 model, float64 log_softmax (logprobs_f32)",
        "items": out,
    }
    if reference:
        with open(reference) as f:
            ref = json.load(f)
        assert [(r["prompt_ids"], r["completion_ids"]) for r in ref["items"]] == \
            [(o["prompt_ids"], o["completion_ids"]) for o in out]
        diff = {}
        for key in ("logprobs", "logprobs_f32"):
            diff[key] = max(abs(a - b) for r, o in zip(ref["items"], out)
                            for a, b in zip(r[key], o[key]))
        doc["reference"] = {"file": os.path.relpath(os.path.abspath(reference), ROOT),
                            "max_abs_diff": diff}
        assert max(diff.values()) < 1e-4, diff
    with open(out_path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"wrote {out_path} ({len(items)} items, sha256 {digest[:12]}..."
          + (f", max |diff| to reference {doc['reference']['max_abs_diff']}" if reference else "")
          + ")")


def tree_digest(d):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(d)):
        if os.path.relpath(root, d).split(os.sep)[0] == "rft_roundtrip":
            continue  # made by scripts/make_roundtrip_fixtures.sh, not by stage 1
        for fn in sorted(files):
            p = os.path.join(root, fn)
            h.update(os.path.relpath(p, d).encode())
            with open(p, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check-rft-adapter", nargs=3, metavar=("DIR", "ITEMS", "OUT"))
    ap.add_argument("--check-hf-model", nargs=3, metavar=("DIR", "ITEMS", "OUT"))
    ap.add_argument("--reference", metavar="JSON", help="with --check-hf-model: compare with")
    args = ap.parse_args()
    if args.check_hf_model:
        dir_, items, out = (os.path.abspath(x) for x in args.check_hf_model)
        ref = os.path.abspath(args.reference) if args.reference else None
        os.chdir(ROOT)
        check_hf_model(dir_, items, out, ref)
        return
    if args.check_rft_adapter:
        dir_, items, out = (os.path.abspath(x) for x in args.check_rft_adapter)
        os.chdir(ROOT)  # base_model_name_or_path is relative to the repo root
        check_rft_adapter(dir_, items, out)
        return
    os.chdir(ROOT)
    if os.path.exists(OUT):
        for e in os.listdir(OUT):  # keep README.md and rft_roundtrip/ (made by rft, see
            p = os.path.join(OUT, e)  # scripts/make_roundtrip_fixtures.sh)
            if os.path.isdir(p) and e != "rft_roundtrip":
                shutil.rmtree(p)
    os.makedirs(OUT, exist_ok=True)
    for c in CASES:
        make_case(*c)
    make_roundtrip()
    for e in sorted(os.listdir(OUT)):
        p = os.path.join(OUT, e)
        if os.path.isdir(p):
            size = sum(os.path.getsize(os.path.join(p, f)) for f in os.listdir(p))
            assert size < 300_000, (e, size)
    print("sha256 of tests/fixtures/train/:", tree_digest(OUT))


if __name__ == "__main__":
    sys.exit(main())
