//! Random initialisation of a model's weights, for training from scratch: every matrix
//! (embeddings, projections, lm_head) ~ N(0, std²) as transformers' `_init_weights` does with
//! `initializer_range` (0.02 by default), biases 0, RMSNorm weights 1. The generator is rft's
//! own (splitmix64 + Box–Muller), so values differ from torch's but the statistics match.

use crate::model::config::ModelConfig;
use crate::model::weights::{LayerWeights, Linear, Proj, Weights};
use crate::trainer::state::splitmix;
use std::path::Path;

/// `initializer_range` from a model directory's config.json, or 0.02.
pub fn initializer_range(model_dir: &Path) -> f32 {
    std::fs::read_to_string(model_dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v.get("initializer_range").and_then(|x| x.as_f64()))
        .unwrap_or(0.02) as f32
}

/// Weights of `c`'s shapes: matrices N(0, std²), biases 0, norms 1.
pub fn init_weights(c: &ModelConfig, seed: u64, std: f32) -> Weights {
    let mut counter = splitmix(seed ^ 0x1A17_0000_0000_0001);
    let mut normal = move || {
        // Box–Muller on two uniforms in (0, 1].
        counter = counter.wrapping_add(1);
        let u1 = ((splitmix(counter) >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        counter = counter.wrapping_add(1);
        let u2 = (splitmix(counter) >> 11) as f64 / (1u64 << 53) as f64;
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    };
    let mut mat = |n: usize| (0..n).map(|_| normal() * std).collect::<Vec<f32>>();
    let (v, d, hd) = (c.vocab_size, c.hidden_size, c.head_dim);
    let embed = mat(v * d);
    let mut layers = Vec::with_capacity(c.num_hidden_layers);
    for _ in 0..c.num_hidden_layers {
        let mut lin = |p: Proj| {
            let (d_in, d_out) = p.dims(c);
            Linear {
                w: mat(d_in * d_out),
                b: p.has_bias(c).then(|| vec![0.0; d_out]),
                d_in,
                d_out,
            }
        };
        let (q, k, vv, o) = (lin(Proj::Q), lin(Proj::K), lin(Proj::V), lin(Proj::O));
        let (gate, up, down) = (lin(Proj::Gate), lin(Proj::Up), lin(Proj::Down));
        layers.push(LayerWeights {
            input_norm: vec![1.0; d],
            q,
            k,
            v: vv,
            o,
            q_norm: c.qk_norm.then(|| vec![1.0; hd]),
            k_norm: c.qk_norm.then(|| vec![1.0; hd]),
            post_norm: vec![1.0; d],
            gate,
            up,
            down,
        });
    }
    let lm_head = (!c.tie_word_embeddings).then(|| mat(v * d));
    Weights {
        embed,
        layers,
        final_norm: vec![1.0; d],
        lm_head,
    }
}
