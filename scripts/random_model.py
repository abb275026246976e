#!/usr/bin/env python3
"""Writes a Hugging Face model directory with random bf16 weights of a real model shape and the
tiny character tokenizer of models/tiny (token ids stay < 16 in prompts; the model's vocabulary
keeps its real size), for end-to-end `rft train` smoke runs at real scale on the GPU machine,
which has torch but no internet. Weights: N(0, 0.02), norms 1, biases 0 (Qwen2 has q/k/v bias).

    python3 scripts/random_model.py OUT_DIR [qwen2.5-0.5b|qwen2.5-1.5b]
"""
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPES = {
    # vocab, hidden, intermediate, layers, heads, kv heads, tied embeddings
    "qwen2.5-0.5b": (151936, 896, 4864, 24, 14, 2, True),
    "qwen2.5-1.5b": (151936, 1536, 8960, 28, 12, 2, True),
    # The 0.5B shape cut to 2 layers: a quick CPU check of the smoke config.
    "qwen2.5-0.5b-2l": (151936, 896, 4864, 2, 14, 2, True),
}


def main() -> None:
    out = Path(sys.argv[1])
    shape = sys.argv[2] if len(sys.argv) > 2 else "qwen2.5-0.5b"
    v, d, i, layers, h, kv, tied = SHAPES[shape]
    hd = d // h
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": v,
        "hidden_size": d,
        "intermediate_size": i,
        "num_hidden_layers": layers,
        "num_attention_heads": h,
        "num_key_value_heads": kv,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": tied,
        "use_sliding_window": False,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "torch_dtype": "bfloat16",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    g = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    t = {"model.embed_tokens.weight": rnd(v, d), "model.norm.weight": torch.ones(d, dtype=torch.bfloat16)}
    if not tied:
        t["lm_head.weight"] = rnd(v, d)
    for l in range(layers):
        p = f"model.layers.{l}"
        t[f"{p}.input_layernorm.weight"] = torch.ones(d, dtype=torch.bfloat16)
        t[f"{p}.post_attention_layernorm.weight"] = torch.ones(d, dtype=torch.bfloat16)
        for name, (o, n_in) in {"q_proj": (h * hd, d), "k_proj": (kv * hd, d), "v_proj": (kv * hd, d),
                                "o_proj": (d, h * hd)}.items():
            t[f"{p}.self_attn.{name}.weight"] = rnd(o, n_in)
            if name != "o_proj":
                t[f"{p}.self_attn.{name}.bias"] = torch.zeros(o, dtype=torch.bfloat16)
        for name, (o, n_in) in {"gate_proj": (i, d), "up_proj": (i, d), "down_proj": (d, i)}.items():
            t[f"{p}.mlp.{name}.weight"] = rnd(o, n_in)
    save_file(t, str(out / "model.safetensors"), metadata={"format": "pt"})
    tiny = Path(__file__).resolve().parent.parent / "models" / "tiny"
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / f, out / f)
    print(f"{shape} random model in {out}")


if __name__ == "__main__":
    main()
