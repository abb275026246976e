#!/usr/bin/env python3
"""Hugging Face parity fixtures for rft.

What it makes (everything under tests/fixtures/, overwritten on every run):

  tests/fixtures/tokenizer/            a tiny byte-level BPE tokenizer (461 tokens, Qwen2-style pre-tokenizer) trained
                                       here on the English + arithmetic text embedded below,
                                       saved through PreTrainedTokenizerFast (tokenizer.json,
                                       tokenizer_config.json, chat_template.jinja).
  tests/fixtures/models/<name>/        four tiny random models, loadable by transformers:
      llama    LlamaForCausalLM, llama3 rope scaling, OLD config keys (rope_theta,
               rope_scaling, torch_dtype), untied, f32, sharded into 2 safetensors files
      qwen2    Qwen2ForCausalLM (q/k/v biases), tied embeddings, NEW config keys
               (rope_parameters, dtype), bf16 weights, generation_config eos = list of 2,
               chat_template inline in tokenizer_config.json (no chat_template.jinja),
               config sliding_window=4 with use_sliding_window=false (must be ignored)
      qwen3    Qwen3ForCausalLM, head_dim 32 (!= hidden/heads), q_norm/k_norm, f16, untied
      mistral  MistralForCausalLM, sliding_window 8, f32, default rope, old keys
    each with config.json, generation_config.json, weights, tokenizer files and
    expected.json: greedy tokens/logprobs, last-position logits, teacher-forced scores,
    rendered chat templates and tokenizer encode/decode results, all computed from the
    model RE-LOADED from disk in f32 with eager attention (see tests/fixtures/README.md
    for the schema).

How to run (CPU only, no network needed; deterministic, fixed seeds):

    ~/.cache/rft-fixtures/bin/python scripts/make_fixtures.py

Made with torch 2.15, transformers 5.24, tokenizers 0.23, safetensors 0.8.
"""

import hashlib
import json
import os
import random
import shutil
import sys

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import tokenizers  # noqa: E402
import safetensors  # noqa: E402
import transformers  # noqa: E402
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402
import unicodedata  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures")
TOK_DIR = os.path.join(OUT, "tokenizer")
MODELS_DIR = os.path.join(OUT, "models")

torch.set_num_threads(1)  # bit-stable CPU reductions
torch.use_deterministic_algorithms(True)

# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]  # ids 0, 1, 2
VOCAB_SIZE = 480
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CORPUS_TEXT = """\
The quick brown fox jumps over the lazy dog. A small model can still learn to count, to
add and to answer simple questions when it is given a clear reward for being right.

Reinforcement fine-tuning samples several answers for each prompt, grades every answer,
and then moves the weights toward the answers that scored better than their siblings. The
prompts are short, the answers are short, and the grader only checks the final number.

Once upon a time there was a little robot who liked numbers. Every morning the robot
wrote the date, added the hours it had slept, and subtracted the minutes it had wasted.
When the sum was even the robot was happy; when it was odd the robot tried again.

You are a helpful assistant. Think step by step, then give the answer on the last line.
Question: What is the sum of the two numbers? Answer: The answer is 42.
The user asked for help, and the assistant answered with a short and correct reply.

In the garden behind the old house there were seven apple trees, three pear trees and a
long row of tomatoes. The children counted the apples every evening and wrote the totals
on a board by the kitchen door, so that everyone could see how many were left.

Learning is mostly practice. A student who solves ten problems a day will, after a month,
have solved three hundred of them, and most of the mistakes will have been made early on.
Teachers know this, which is why they give homework and check the answers carefully.

The weather today is cold and windy, with rain in the afternoon and clear skies at night.
Tomorrow will be warmer, and the weekend should be sunny, which is good news for the
farmers who are waiting to bring in the harvest before the autumn storms arrive.
"""

SYSTEM_DEFAULT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# The Qwen2.5 instruct chat template (with its tool branches), verbatim in behaviour.
CHAT_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- '" + SYSTEM_DEFAULT + "' }}\n"
    "    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, "
    "\\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n"
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\n" + SYSTEM_DEFAULT + "<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n"
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n"
    "            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}"
)


def corpus_lines():
    rng = random.Random(1234)
    lines = [p for p in CORPUS_TEXT.split("\n")]
    for _ in range(150):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op = rng.choice("+-*")
        c = a + b if op == "+" else a - b if op == "-" else a * b
        lines.append(f"{a} {op} {b} = {c}")
    lines.append("12 + 7 = 19")
    lines.append("<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n3 + 4 = 7<|im_end|>")
    return lines


def build_tokenizer():
    tok = Tokenizer(models.BPE())
    # Qwen2-style: NFC, split by the Qwen2/llama3 regex (single digits), then byte-level.
    # (transformers 5's Qwen2Tokenizer hard-codes exactly this pipeline whatever
    # tokenizer.json says, so using it keeps every loader path in agreement.)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines(), trainer=trainer)
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=None,
        bos_token=None,
        additional_special_tokens=[IM_START, IM_END],
        clean_up_tokenization_spaces=False,
        model_max_length=128,
    )
    fast.chat_template = CHAT_TEMPLATE
    if os.path.exists(TOK_DIR):
        shutil.rmtree(TOK_DIR)
    fast.save_pretrained(TOK_DIR)
    return AutoTokenizer.from_pretrained(TOK_DIR)


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------

COMMON = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    max_position_embeddings=128,
    initializer_range=0.2,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    bos_token_id=0,
    pad_token_id=0,
    eos_token_id=2,
)


def randomize(model, seed):
    """std-0.2 weights; RMSNorm weights 1 + 0.2*randn; every bias 0.2*randn."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * noise)
            else:  # matrices, embeddings and biases alike
                p.copy_(0.2 * noise)
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def read_json(path):
    with open(path) as f:
        return json.load(f)


def edit_json(path, fn):
    with open(path) as f:
        d = json.load(f)
    d = fn(d)
    with open(path, "w") as f:
        json.dump(d, f, indent=2, sort_keys=True)
        f.write("\n")


def to_old_keys(d, rope_scaling):
    """transformers 5 writes rope_parameters{rope_theta,rope_type,..} and dtype; rewrite
    to the transformers-4 form: top-level rope_theta, rope_scaling (or none), torch_dtype."""
    rp = d.pop("rope_parameters")
    d["rope_theta"] = rp["rope_theta"]
    if rope_scaling is not None:
        d["rope_scaling"] = rope_scaling
    d["torch_dtype"] = d.pop("dtype")
    return d


def make_model_dirs(tok):
    vocab = len(tok)
    specs = {}

    # --- llama: llama3 rope, old keys, untied, f32, 2 shards ---------------------------
    llama_scaling = {
        "rope_type": "llama3",
        "factor": 4.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    cfg = LlamaConfig(
        **COMMON,
        vocab_size=vocab,
        tie_word_embeddings=False,
        rope_parameters={"rope_theta": 500000.0, **llama_scaling},
    )
    specs["llama"] = dict(
        cls=LlamaForCausalLM, cfg=cfg, save_dtype=torch.float32, seed=11,
        shard="300KB", edit=lambda d: to_old_keys(d, llama_scaling),
        gen=dict(eos_token_id=2),
    )

    # --- qwen2: biases, tied, new keys, bf16; gen eos list -----------------------------
    cfg = Qwen2Config(
        **COMMON,
        vocab_size=vocab,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        use_sliding_window=False,
        max_window_layers=2,
    )

    def qwen2_edit(d):
        # Like real Qwen2.5 configs: a sliding_window value that must be ignored because
        # use_sliding_window is false.
        d["sliding_window"] = 4
        assert d["use_sliding_window"] is False
        return d

    specs["qwen2"] = dict(
        cls=Qwen2ForCausalLM, cfg=cfg, save_dtype=torch.bfloat16, seed=22, edit=qwen2_edit,
        gen=dict(eos_token_id=[2, 0], do_sample=True, temperature=0.7, top_p=0.8, top_k=20,
                 repetition_penalty=1.05),
        inline_template=True,
    )

    # --- qwen3: head_dim 32, q/k norm, f16, untied ---------------------------------------
    cfg = Qwen3Config(
        **COMMON,
        vocab_size=vocab,
        head_dim=32,
        tie_word_embeddings=False,
        attention_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        use_sliding_window=False,
        max_window_layers=2,
    )
    specs["qwen3"] = dict(cls=Qwen3ForCausalLM, cfg=cfg, save_dtype=torch.float16, seed=33,
                          gen=dict(eos_token_id=2))

    # --- mistral: sliding window 8, f32, default rope, old keys ------------------------
    cfg = MistralConfig(
        **COMMON,
        vocab_size=vocab,
        sliding_window=8,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    specs["mistral"] = dict(cls=MistralForCausalLM, cfg=cfg, save_dtype=torch.float32, seed=44,
                            edit=lambda d: to_old_keys(d, None), gen=dict(eos_token_id=2))
    return specs


def save_model(name, spec, tok):
    d = os.path.join(MODELS_DIR, name)
    if os.path.exists(d):
        shutil.rmtree(d)
    torch.manual_seed(spec["seed"])
    cfg = spec["cfg"]
    cfg._attn_implementation = "eager"
    model = spec["cls"](cfg).eval()
    randomize(model, spec["seed"])
    model = model.to(spec["save_dtype"])
    kw = {}
    if "shard" in spec:
        kw["max_shard_size"] = spec["shard"]
    model.generation_config = GenerationConfig(bos_token_id=0, pad_token_id=0, **spec["gen"])
    model.save_pretrained(d, **kw)
    tok.save_pretrained(d)
    cfgp = os.path.join(d, "config.json")
    if "edit" in spec:
        edit_json(cfgp, spec["edit"])
    else:
        edit_json(cfgp, lambda x: x)
    if spec.get("inline_template"):
        jp = os.path.join(d, "chat_template.jinja")
        if os.path.exists(jp):
            with open(jp) as f:
                tmpl = f.read()
            os.remove(jp)
        else:
            tmpl = CHAT_TEMPLATE

        def put(x):
            # transformers-4 style tokenizer_config.json (as shipped with Qwen2.5): template
            # inline, added_tokens_decoder, additional_special_tokens, Qwen2Tokenizer.
            added = read_json(os.path.join(d, "tokenizer.json"))["added_tokens"]
            return {
                "add_bos_token": False,
                "add_prefix_space": False,
                "added_tokens_decoder": {
                    str(a["id"]): {k: a[k] for k in ("content", "lstrip", "normalized", "rstrip",
                                                     "single_word", "special")}
                    for a in added
                },
                "additional_special_tokens": [IM_START, IM_END],
                "bos_token": None,
                "chat_template": tmpl,
                "clean_up_tokenization_spaces": False,
                "eos_token": IM_END,
                "errors": "replace",
                "model_max_length": 128,
                "pad_token": ENDOFTEXT,
                "split_special_tokens": False,
                "tokenizer_class": "Qwen2Tokenizer",
                "unk_token": None,
            }

        edit_json(os.path.join(d, "tokenizer_config.json"), put)
    return d


# --------------------------------------------------------------------------------------
# Expectations
# --------------------------------------------------------------------------------------

N_GEN = 16
MIN_MARGIN = 0.02

# Prompts 0 and 1 are token prefixes (of these lengths) of the sentences below, decoded to
# text; a prefix is used only if its text re-encodes to the same ids and its greedy run
# clears MIN_MARGIN. Prompt 2 is random ids. mistral's prompt 1 is >= 20 tokens so the
# sliding window of 8 matters.
PROMPT_LENS = {"default": (5, 11), "mistral": (5, 24)}
PROMPT_SOURCES = [
    "What is 12 + 7? The answer is 19, because twelve and seven make nineteen.",
    "The quick brown fox jumps over the lazy dog, and the little robot counts the jumps.",
    "Once upon a time there was a little robot who liked numbers and wrote them down.",
    "Question: What is the sum of 5 and 9? Answer: The answer is 14.",
    "Every morning the robot wrote the date, added the hours it had slept, and smiled.",
    "Think step by step, then give the answer on the last line of the reply.",
    "When the sum was even the robot was happy; when it was odd the robot tried again.",
    "The user asked for help, and the assistant answered with a short and correct reply.",
    "A small model can still learn to count, to add and to answer simple questions.",
    "23 + 45 = 68 and 17 * 3 = 51 and 90 - 12 = 78 and 8 + 8 = 16",
    "In the garden there were seven apple trees and the children counted the apples.",
    "The weather today is cold and windy, with rain in the afternoon and clear skies.",
    "A student who solves ten problems a day will have solved three hundred in a month.",
    "Teachers give homework and check the answers carefully, one problem at a time.",
]

CHATS = [
    [{"role": "system", "content": "You are a calculator."},
     {"role": "user", "content": "What is 12 + 7?"}],
    [{"role": "user", "content": "Tell me a story about a robot."}],
    [{"role": "system", "content": "Answer briefly."},
     {"role": "user", "content": "2 + 2 = ?"},
     {"role": "assistant", "content": "4"},
     {"role": "user", "content": "And 3 * 3?"}],
]

ENCODE_TEXTS = [
    "The quick brown fox: 12 + 7 = 19, and 100 - 1 = 99.",
    "  leading spaces,\ttabs and\nnew lines  ",
    "caf\u00e9 na\u00efve \u2013 \u65e5\u672c \U0001f600!",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "NFC: cafe\u0301 vs caf\u00e9 (decoded text is the NFC form)",
]


def fl(x):
    """Exact f32 value as a JSON number (repr of the float64 holding it)."""
    return [float(v) for v in x.tolist()] if isinstance(x, torch.Tensor) else float(x)


@torch.no_grad()
def logits_of(model, ids):
    out = model(input_ids=torch.tensor([ids]), use_cache=False)
    return out.logits[0].float()  # [T, V]


@torch.no_grad()
def greedy(model, prompt):
    seq = list(prompt)
    toks, lps, margins = [], [], []
    for _ in range(N_GEN):
        row = logits_of(model, seq)[-1]
        top2 = torch.topk(row, 2)
        t = int(top2.indices[0])
        margins.append(float(top2.values[0] - top2.values[1]))
        lps.append(float(torch.log_softmax(row.double(), -1)[t].float()))
        toks.append(t)
        seq.append(t)
    return toks, lps, min(margins)


@torch.no_grad()
def score(model, prompt, completion):
    ids = list(prompt) + list(completion)
    lg = logits_of(model, ids)
    lsm = torch.log_softmax(lg.double(), -1)
    P = len(prompt)
    return [float(lsm[P - 1 + i, t].float()) for i, t in enumerate(completion)]


def pick_prompt(model, tok, length, skip=()):
    cands = [tok(src)["input_ids"][off:off + length] for off in (0, 3, 6) for src in PROMPT_SOURCES]
    for ids in cands:
        text = tok.decode(ids)
        if len(ids) != length or tok(text)["input_ids"] != ids or text in skip:
            continue
        g = greedy(model, ids)
        if g[2] > MIN_MARGIN:
            return ids, text, g
        print(f"   (prompt of {length} tokens rejected: min margin {g[2]:.4f})")
    raise SystemExit(f"no candidate prompt of length {length} clears min margin")


def pick_random_prompt(model, vocab, seed, length=2):
    rng = random.Random(seed)
    for _ in range(100):
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        g = greedy(model, ids)
        if g[2] > MIN_MARGIN:
            return ids, None, g
    raise SystemExit("no random prompt clears min margin")


def expectations(name, d, spec, tok_disk):
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert type(model) is spec["cls"], type(model)
    tok = AutoTokenizer.from_pretrained(d)
    vocab = model.config.vocab_size
    assert vocab == len(tok)

    prompts, greedy_toks, greedy_lps, margins, last_logits = [], [], [], [], []
    chosen = [
        pick_prompt(model, tok, PROMPT_LENS.get(name, PROMPT_LENS["default"])[0]),
        pick_prompt(model, tok, PROMPT_LENS.get(name, PROMPT_LENS["default"])[1]),
        pick_random_prompt(model, vocab, spec["seed"]),
    ]
    for ids, text, (toks, lps, m) in chosen:
        prompts.append({"ids": ids, "text": text})
        greedy_toks.append(toks)
        greedy_lps.append(lps)
        margins.append(m)
        last_logits.append(fl(logits_of(model, ids)[-1]))
    if name == "mistral":
        assert len(prompts[1]["ids"]) >= 20, len(prompts[1]["ids"])

    # score: prompt 0 + a fixed random (non-greedy) completion of 10 tokens
    rng = random.Random(spec["seed"] * 7 + 1)
    completion = [rng.randrange(3, vocab) for _ in range(10)]
    assert completion != greedy_toks[0][:10]
    sc = {"prompt": prompts[0]["ids"], "completion": completion,
          "logprobs": score(model, prompts[0]["ids"], completion)}

    chats = []
    for msgs in CHATS:
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
        if not isinstance(ids, list):
            ids = ids["input_ids"]
        ids = list(ids)
        assert ids == tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        chats.append({"messages": msgs, "add_generation_prompt": True, "text": text, "ids": ids})

    enc = []
    for text in ENCODE_TEXTS:
        ids = tok(text)["input_ids"]
        dec = tok.decode(ids)
        enc.append({"text": text, "ids": ids, "decoded": dec})

    cfg_json = read_json(os.path.join(d, "config.json"))
    gen_json = read_json(os.path.join(d, "generation_config.json"))
    exp = {
        "model": name,
        "architecture": type(model).__name__,
        "generated_by": "scripts/make_fixtures.py",
        "versions": {"torch": torch.__version__.split("+")[0], "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__, "safetensors": safetensors.__version__},
        "vocab_size": vocab,
        "eos_token_ids": sorted(set(_as_list(cfg_json["eos_token_id"]) + _as_list(gen_json["eos_token_id"]))),
        "prompts": prompts,
        "n_generate": N_GEN,
        "greedy": greedy_toks,
        "greedy_logprobs": greedy_lps,
        "min_margin": margins,
        "last_logits": last_logits,
        "score": sc,
        "chat": chats,
        "encode": enc,
    }
    self_check(model, tok, exp)
    with open(os.path.join(d, "expected.json"), "w") as f:
        json.dump(exp, f, indent=1, ensure_ascii=False)
        f.write("\n")
    return model, exp


def _as_list(x):
    return list(x) if isinstance(x, list) else [x]


@torch.no_grad()
def self_check(model, tok, exp):
    for i, p in enumerate(exp["prompts"]):
        ll = torch.tensor(exp["last_logits"][i], dtype=torch.float64)
        lsm = torch.log_softmax(ll, -1)
        t0 = exp["greedy"][i][0]
        assert int(ll.argmax()) == t0
        assert abs(float(lsm[t0]) - exp["greedy_logprobs"][i][0]) < 1e-6
        # teacher forcing the greedy continuation reproduces the greedy logprobs
        tf = score(model, p["ids"], exp["greedy"][i])
        assert max(abs(a - b) for a, b in zip(tf, exp["greedy_logprobs"][i])) < 1e-5
        # and incremental decoding with HF's KV cache agrees on the tokens
        out = model(input_ids=torch.tensor([p["ids"]]), use_cache=True)
        kv, toks = getattr(out, "cache", None) or out.past_key_values, []
        for _ in range(N_GEN):
            t = int(out.logits[0, -1].argmax())
            toks.append(t)
            out = model(input_ids=torch.tensor([[t]]), cache=kv, use_cache=True)
            kv = getattr(out, "cache", None) or out.past_key_values
        assert toks == exp["greedy"][i], (toks, exp["greedy"][i])
        if p["text"] is not None:
            assert tok(p["text"])["input_ids"] == p["ids"]
    sc = exp["score"]
    assert sc["prompt"] == exp["prompts"][0]["ids"]
    lsm0 = torch.log_softmax(torch.tensor(exp["last_logits"][0], dtype=torch.float64), -1)
    d0 = abs(float(lsm0[sc["completion"][0]]) - sc["logprobs"][0])
    assert d0 < 1e-5, d0
    for e in exp["encode"]:
        assert e["decoded"] == unicodedata.normalize("NFC", e["text"]), e


# --------------------------------------------------------------------------------------
# Extra checks on the config variants
# --------------------------------------------------------------------------------------

@torch.no_grad()
def check_variants(name, d, spec, model_disk, exp):
    cfg = read_json(os.path.join(d, "config.json"))
    # In-memory twin built from the same (new-style) config and the disk weights, to show
    # that the on-disk (possibly old-style) config is read the same way.
    twin = spec["cls"](spec["cfg"]).eval()
    twin.load_state_dict(model_disk.state_dict())
    ids = exp["prompts"][1]["ids"]
    a, b = logits_of(model_disk, ids), logits_of(twin, ids)
    assert torch.equal(a, b), (name, (a - b).abs().max())
    rot_d = model_disk.model.rotary_emb
    rot_t = twin.model.rotary_emb
    assert torch.equal(rot_d.inv_freq, rot_t.inv_freq)
    if name == "llama":
        assert "rope_parameters" not in cfg and cfg["rope_scaling"]["rope_type"] == "llama3"
        hd = 16
        default = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        changed = (rot_d.inv_freq != default).tolist()
        assert changed[0] is False and any(changed), changed  # high freq kept, others scaled
        print("   llama3 inv_freq:", [f"{v:.6g}" for v in rot_d.inv_freq.tolist()],
              "default:", [f"{v:.6g}" for v in default.tolist()])
    if name == "mistral":
        # the sliding window changes the long prompt's logits
        from copy import deepcopy
        c2 = deepcopy(spec["cfg"])
        c2.sliding_window = None
        full = spec["cls"](c2).eval()
        full.load_state_dict(model_disk.state_dict())
        diff = (logits_of(full, ids) - a).abs().max()
        print(f"   mistral: |logits(window 8) - logits(no window)| max = {float(diff):.4g}")
        assert diff > 1e-2
    if name == "qwen2":
        assert cfg["sliding_window"] == 4 and cfg["use_sliding_window"] is False
        assert model_disk.lm_head.weight.data_ptr() == model_disk.model.embed_tokens.weight.data_ptr()
        tc = read_json(os.path.join(d, "tokenizer_config.json"))
        assert "chat_template" in tc and not os.path.exists(os.path.join(d, "chat_template.jinja"))


def main():
    os.makedirs(OUT, exist_ok=True)
    tok = build_tokenizer()
    print(f"tokenizer: {len(tok)} tokens, eos={tok.eos_token}({tok.eos_token_id}) "
          f"pad={tok.pad_token}({tok.pad_token_id})")
    for t in ENCODE_TEXTS + CORPUS_TEXT.split("\n"):
        assert tok.decode(tok(t)["input_ids"]) == unicodedata.normalize("NFC", t), t
    specs = make_model_dirs(tok)
    exps = {}
    for name, spec in specs.items():
        d = save_model(name, spec, tok)
        model, exp = expectations(name, d, spec, tok)
        check_variants(name, d, spec, model, exp)
        size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
        print(f"{name}: {sorted(os.listdir(d))} {size / 1e6:.2f} MB; prompt lens "
              f"{[len(p['ids']) for p in exp['prompts']]}; min_margin "
              f"{[round(m, 4) for m in exp['min_margin']]}; eos {exp['eos_token_ids']}")
        assert size < 2e6
        exps[name] = exp
    # every model dir's tokenizer (incl. qwen2's transformers-4 style config) behaves the same
    for name, exp in exps.items():
        assert exp["chat"] == exps["llama"]["chat"] and exp["encode"] == exps["llama"]["encode"], name
    h = hashlib.sha256()
    for dp, _, fs in sorted(os.walk(OUT)):
        for f in sorted(fs):
            h.update(f.encode())
            with open(os.path.join(dp, f), "rb") as fh:
                h.update(fh.read())
    print("fixtures sha256:", h.hexdigest())


if __name__ == "__main__":
    sys.exit(main())
