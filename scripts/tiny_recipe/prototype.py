#!/usr/bin/env python3
"""Prototype of rft's tiny default model + GRPO recipe (PyTorch, CPU, 1 thread).

Everything here mirrors what rft computes so the recipe transfers:
  * model   = transformers' Qwen2ForCausalLM (RMSNorm, RoPE, GQA, SwiGLU), f32
  * tokens  = character level, WordLevel + per-character Split (see tokenizer.json)
  * task    = "47+38=" -> "85<|endoftext|>"  (both operands 10..99, fixed-width prompt)
  * SFT     = completion-only cross entropy (the prompt tokens are not in the loss), AdamW
  * GRPO    = TRL semantics: B prompts x G samples at temperature T, reward 1/0 from an
              exact checker, advantage (r - mean_g) / (std_g + 1e-4) (std unbiased, as
              torch.std), clipped ratio eps=0.2, beta=0, loss "dapo" (sum over all
              completion tokens of the batch / number of completion tokens), one
              optimisation step per generation batch (so ratio == 1 and the clip is
              inactive; it is still computed), AdamW, grad-norm clip 1.0.

Defaults = the recipe in RECIPE.md (logs of the runs in logs/).
Usage (all seeded; writes into --out):
  prototype.py write           # tokenizer.json, tokenizer_config.json, config.json
  prototype.py base  --seed S  # SFT from scratch -> base model (the default model)
  prototype.py grpo  --seed S  # GRPO from the base model, reports val accuracy curve
  prototype.py compare --seed S  # SFT-10 / SFT-100 (labelled) vs RFT (checker only)
"""
import argparse, json, math, os, random, sys, time

import torch
import torch.nn as nn
import torch.nn.functional as F

torch.set_num_threads(1)
HERE = os.path.dirname(os.path.abspath(__file__))

# ----------------------------------------------------------------------------- vocab
EOS = "<|endoftext|>"
CHARS = list("0123456789") + list("+-=") + [" ", "\n"]
VOCAB = {EOS: 0}
for _c in CHARS:
    VOCAB[_c] = len(VOCAB)
ITOS = {i: s for s, i in VOCAB.items()}
EOS_ID = 0

CONFIG = dict(
    architectures=["Qwen2ForCausalLM"],
    model_type="qwen2",
    vocab_size=len(VOCAB),          # 16
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    hidden_act="silu",
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    attention_dropout=0.0,
    use_sliding_window=False,
    bos_token_id=EOS_ID,
    eos_token_id=EOS_ID,
    pad_token_id=EOS_ID,
    torch_dtype="float32",
)


def encode(s):
    return [VOCAB[c] for c in s]


def decode(ids):
    out = []
    for i in ids:
        if i == EOS_ID:
            break
        out.append(ITOS[i])
    return "".join(out)


def write_tokenizer(out):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, Regex
    tok = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token=EOS))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([EOS])
    tok.save(os.path.join(out, "tokenizer.json"))
    # round trip check
    t2 = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    for s in ["47+38=85" + EOS, "12 - 3\n=9", "99+99=198" + EOS]:
        e = t2.encode(s)
        assert e.ids == encode(s.replace(EOS, "")) + ([EOS_ID] if s.endswith(EOS) else []), (s, e.ids)
        assert t2.decode(e.ids, skip_special_tokens=False) == s, (s, t2.decode(e.ids))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(dict(tokenizer_class="PreTrainedTokenizerFast", eos_token=EOS, pad_token=EOS,
                       bos_token=None, unk_token=EOS, model_max_length=64,
                       added_tokens_decoder={"0": dict(content=EOS, lstrip=False, rstrip=False,
                                                        normalized=False, single_word=False,
                                                        special=True)}), f, indent=2)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(CONFIG, f, indent=2)
    print("wrote tokenizer.json tokenizer_config.json config.json; tokenizer round-trips")


def make_model(seed):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    cfg = Qwen2Config(**{k: v for k, v in CONFIG.items() if k not in ("architectures", "model_type", "torch_dtype")})
    m = Qwen2ForCausalLM(cfg).float()
    return m


# ----------------------------------------------------------------------------- task
LO, HI = 10, 99
PROMPT_LEN = 6          # "ab+cd="
MAX_NEW = 4             # up to 3 answer digits + EOS


def all_pairs():
    return [(a, b) for a in range(LO, HI + 1) for b in range(LO, HI + 1)]


def split_data(data_seed=1234):
    """Fixed split (independent of the run seed): 500 val, 2000 SFT pool, rest RL prompts."""
    p = all_pairs()
    random.Random(data_seed).shuffle(p)
    return dict(val=p[:500], sft=p[500:2500], rl=p[2500:])


def prompt(a, b):
    return f"{a}+{b}="


def answer(a, b):
    return str(a + b)


def reward(a, b, comp_ids):
    """Exact checker: completion must be the digits of a+b followed by EOS."""
    if EOS_ID not in comp_ids:
        return 0.0
    return 1.0 if decode(comp_ids) == answer(a, b) else 0.0


@torch.no_grad()
def generate(model, pairs, temperature, gen=None):
    """Plain sampling (temperature 0 -> greedy); prompts are all PROMPT_LEN long.
    Returns LongTensor [N, MAX_NEW]; positions after the first EOS are EOS (pad)."""
    ids = torch.tensor([encode(prompt(a, b)) for a, b in pairs])
    n = ids.shape[0]
    done = torch.zeros(n, dtype=torch.bool)
    out = []
    for _ in range(MAX_NEW):
        logits = model(input_ids=ids).logits[:, -1, :]
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            probs = torch.softmax(logits / temperature, -1)
            nxt = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
        nxt = torch.where(done, torch.full_like(nxt, EOS_ID), nxt)
        out.append(nxt)
        done |= nxt == EOS_ID
        ids = torch.cat([ids, nxt[:, None]], 1)
        if done.all():
            break
    comp = torch.stack(out, 1)
    if comp.shape[1] < MAX_NEW:
        comp = torch.cat([comp, torch.full((n, MAX_NEW - comp.shape[1]), EOS_ID)], 1)
    return comp


@torch.no_grad()
def accuracy(model, pairs):
    model.eval()
    comp = generate(model, pairs, 0.0)
    return sum(reward(a, b, c.tolist()) for (a, b), c in zip(pairs, comp)) / len(pairs)


def completion_mask(comp):
    """1 for completion tokens up to and including the first EOS."""
    is_eos = (comp == EOS_ID).long()
    before = torch.cumsum(is_eos, 1) - is_eos  # number of EOS strictly before
    return (before == 0).float()


def token_logps(model, prompts_ids, comp, temperature=1.0):
    """log p(completion token) under the model, [N, MAX_NEW]."""
    ids = torch.cat([prompts_ids, comp], 1)
    logits = model(input_ids=ids).logits[:, PROMPT_LEN - 1:-1, :] / temperature
    return torch.log_softmax(logits, -1).gather(-1, comp[..., None]).squeeze(-1)


# ----------------------------------------------------------------------------- SFT
def sft(model, pairs, steps, lr, batch, seed, wd=0.0, warmup=0, log_every=0, val=None):
    """Completion-only CE, AdamW(b=0.9,0.999), constant lr after linear warmup,
    grad clip 1.0. Batches are drawn by cycling through shuffled epochs."""
    g = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd, betas=(0.9, 0.999))
    order = []
    hist = []
    for step in range(1, steps + 1):
        model.train()
        bt = []
        while len(bt) < batch:
            if not order:
                order = list(range(len(pairs)))
                g.shuffle(order)
            bt.append(pairs[order.pop()])
        p = torch.tensor([encode(prompt(a, b)) for a, b in bt])
        c = torch.tensor([encode(answer(a, b)) + [EOS_ID] * (MAX_NEW - len(answer(a, b))) for a, b in bt])
        mask = completion_mask(c)
        lp = token_logps(model, p, c)
        loss = -(lp * mask).sum() / mask.sum()
        for pg in opt.param_groups:
            pg["lr"] = lr * min(1.0, step / warmup) if warmup else lr
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if log_every and (step % log_every == 0 or step == steps):
            acc = accuracy(model, val) if val else float("nan")
            hist.append((step, loss.item(), acc))
            print(f"  sft step {step:5d} loss {loss.item():.4f} val_acc {acc:.3f}", flush=True)
    return hist


# ----------------------------------------------------------------------------- LoRA
class LoRALinear(nn.Module):
    """y = W x + b + (alpha/r) * B(A x); A ~ kaiming_uniform(a=sqrt(5)) (PEFT default), B = 0."""

    def __init__(self, base, r, alpha):
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.A = nn.Parameter(torch.empty(r, base.in_features))
        self.B = nn.Parameter(torch.zeros(base.out_features, r))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scale = alpha / r

    def forward(self, x):
        return self.base(x) + (x @ self.A.t() @ self.B.t()) * self.scale


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_lora(model, r, alpha):
    for p in model.parameters():
        p.requires_grad_(False)
    for name, mod in list(model.named_modules()):
        for t in LORA_TARGETS:
            if hasattr(mod, t) and isinstance(getattr(mod, t), nn.Linear):
                setattr(mod, t, LoRALinear(getattr(mod, t), r, alpha))
    return [p for p in model.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------- GRPO
def grpo(model, prompts, val, *, steps, B, G, temperature, lr, loss_type="dapo", lora_r=0,
         eps=0.2, seed=0, eval_every=50, time_budget=None, wd=0.0, sched="const"):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    params = add_lora(model, lora_r, 2 * lora_r) if lora_r else list(model.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd, betas=(0.9, 0.999))
    acc0 = accuracy(model, val)
    curve = [(0, acc0, 0.0)]
    print(f"  grpo step     0 val_acc {acc0:.3f}", flush=True)
    t_train = 0.0
    order = []
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        bt = []
        while len(bt) < B:
            if not order:
                order = list(range(len(prompts)))
                rng.shuffle(order)
            bt.append(prompts[order.pop()])
        rep = [p for p in bt for _ in range(G)]
        model.eval()
        comp = generate(model, rep, temperature, gen)
        r = torch.tensor([reward(a, b, c.tolist()) for (a, b), c in zip(rep, comp)]).view(B, G)
        adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1)
        mask = completion_mask(comp)
        p_ids = torch.tensor([encode(prompt(a, b)) for a, b in rep])
        model.train()
        lp = token_logps(model, p_ids, comp, temperature)
        old = lp.detach()
        ratio = torch.exp(lp - old)
        per_tok = -torch.min(ratio * adv[:, None], torch.clamp(ratio, 1 - eps, 1 + eps) * adv[:, None])
        if loss_type == "dapo":
            loss = (per_tok * mask).sum() / mask.sum()
        else:  # "grpo": mean over each sequence's tokens, then mean over sequences
            loss = ((per_tok * mask).sum(1) / mask.sum(1)).mean()
        if sched == "linear":  # linear decay to 0 over `steps` (TRL/HF "linear", no warmup)
            for pg in opt.param_groups:
                pg["lr"] = lr * (1.0 - (step - 1) / steps)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        t_train += time.perf_counter() - t0
        if step % eval_every == 0 or step == steps:
            acc = accuracy(model, val)
            curve.append((step, acc, t_train))
            print(f"  grpo step {step:5d} reward {r.mean():.3f} val_acc {acc:.3f} "
                  f"train_s {t_train:.1f} ({1000 * t_train / step:.1f} ms/step)", flush=True)
        if time_budget and t_train > time_budget:
            acc = accuracy(model, val)
            curve.append((step, acc, t_train))
            print(f"  time budget hit at step {step}: val_acc {acc:.3f}")
            break
    return curve


# ----------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["write", "base", "grpo", "compare"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(HERE, "out"))
    # base SFT
    ap.add_argument("--sft_n", type=int, default=400)
    ap.add_argument("--sft_steps", type=int, default=400)
    ap.add_argument("--sft_lr", type=float, default=3e-3)
    ap.add_argument("--sft_batch", type=int, default=32)
    ap.add_argument("--sft_log", type=int, default=100)
    # grpo
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--B", type=int, default=16)
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--temp", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--lora", type=int, default=16)
    ap.add_argument("--loss", default="dapo")
    ap.add_argument("--eval_every", type=int, default=100)
    ap.add_argument("--sched", default="linear", choices=["const", "linear"])
    ap.add_argument("--budget", type=float, default=None)
    ap.add_argument("--base_seed", type=int, default=None, help="base model to start from (default: --seed)")
    # compare: continued SFT on N labelled examples (disjoint from the base's SFT set)
    ap.add_argument("--cmp_steps", type=int, default=200)
    ap.add_argument("--cmp_lr", type=float, default=1e-3)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    d = split_data()
    bs = args.seed if args.base_seed is None else args.base_seed
    base_path = os.path.join(args.out, f"base_seed{bs}.pt")

    if args.cmd == "write":
        write_tokenizer(HERE)
        m = make_model(0)
        n = sum(p.numel() for p in m.parameters())
        print(f"params {n} ({4 * n / 1e6:.2f} MB f32)")
        return

    if args.cmd == "base":
        m = make_model(args.seed)
        t0 = time.perf_counter()
        sft(m, d["sft"][:args.sft_n], args.sft_steps, args.sft_lr, args.sft_batch, args.seed,
            log_every=args.sft_log, val=d["val"])
        print(f"base sft time {time.perf_counter() - t0:.1f}s; val_acc {accuracy(m, d['val']):.3f}")
        torch.save(m.state_dict(), base_path)
        return

    def load_base():
        m = make_model(0)
        m.load_state_dict(torch.load(base_path))
        return m

    if args.cmd == "grpo":
        m = load_base()
        grpo(m, d["rl"], d["val"], steps=args.steps, B=args.B, G=args.G, temperature=args.temp,
             lr=args.lr, loss_type=args.loss, lora_r=args.lora, seed=args.seed,
             eval_every=args.eval_every, time_budget=args.budget, sched=args.sched)
        return

    if args.cmd == "compare":
        # labelled examples for the SFT arms: fresh ones, never seen by the base model
        extra = d["sft"][args.sft_n:]
        res = {"base": accuracy(load_base(), d["val"])}
        for n in (10, 100):
            m = load_base()
            sft(m, extra[:n], args.cmp_steps, args.cmp_lr, min(32, n), args.seed)
            res[f"base+SFT{n}"] = accuracy(m, d["val"])
            m = make_model(args.seed)
            sft(m, extra[:n], args.sft_steps, args.sft_lr, min(32, n), args.seed)
            res[f"scratch SFT{n}"] = accuracy(m, d["val"])
        print(json.dumps(res))


if __name__ == "__main__":
    main()
