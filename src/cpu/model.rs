//! The f32 reference decoder: a batched forward over per-sequence KV caches.
//!
//! One call runs any mix of prefill and decode: each sequence brings its new tokens, they
//! are stacked into one [N, D] row batch for the GEMMs, and each row attends over its own
//! sequence's cache (causal, GQA, optional sliding window). No padding exists anywhere: a
//! row's position is its sequence's cache length plus its index among the new tokens, which
//! is what Hugging Face computes from the attention mask.
//!
//! LoRA pairs, when given, are added live on the projection outputs (h = Wx + b + s·B(Ax)).
//! This module owns the forward only; training (saved activations, backward) is in
//! `cpu::train`.

use crate::cpu::ops;
use crate::lora::LoraWeights;
use crate::model::config::ModelConfig;
use crate::model::weights::{Linear, Proj, Weights};
use rayon::prelude::*;

/// A decoder model in f32 with its RoPE table.
pub struct CpuModel {
    pub config: ModelConfig,
    pub weights: Weights,
    pub inv_freq: Vec<f32>, // [hd/2]
}

/// Keys and values of one sequence for every layer: k, v each [cap, KV·hd] per layer.
#[derive(Clone, Debug)]
pub struct KvCache {
    pub k: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
    pub len: usize,
    kv_dim: usize,
}

impl KvCache {
    pub fn new(c: &ModelConfig) -> KvCache {
        KvCache {
            k: vec![Vec::new(); c.num_hidden_layers],
            v: vec![Vec::new(); c.num_hidden_layers],
            len: 0,
            kv_dim: c.kv_dim(),
        }
    }
    /// Drops positions ≥ `len` (used to roll back or reuse a prefix).
    pub fn truncate(&mut self, len: usize) {
        self.len = len.min(self.len);
        for (k, v) in self.k.iter_mut().zip(self.v.iter_mut()) {
            k.truncate(self.len * self.kv_dim);
            v.truncate(self.len * self.kv_dim);
        }
    }
}

/// Which rows of a forward need logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsFor {
    /// The last new token of each sequence: [S, V].
    LastPerSeq,
    /// Every new token: [N, V].
    All,
}

impl CpuModel {
    pub fn new(config: ModelConfig, weights: Weights) -> CpuModel {
        let inv_freq = config.rope_inv_freq();
        CpuModel {
            config,
            weights,
            inv_freq,
        }
    }

    /// y [n, out] = x [n, in] · Wᵀ + b (+ scale · (x Aᵀ) Bᵀ when a LoRA pair is present).
    pub fn linear(
        &self,
        x: &[f32],
        n: usize,
        lin: &Linear,
        lora: Option<(&LoraWeights, usize, Proj)>,
    ) -> Vec<f32> {
        let mut y = ops::matmul_wt(x, &lin.w, n, lin.d_in, lin.d_out);
        if let Some(b) = &lin.b {
            ops::add_bias(&mut y, b);
        }
        if let Some((lw, layer, proj)) = lora {
            if let Some(pair) = lw.pair(layer, proj) {
                let r = lw.config.r;
                let xa = ops::matmul_wt(x, &pair.a, n, lin.d_in, r); // [n, r]
                ops::matmul_wt_acc(&xa, &pair.b, n, r, lin.d_out, lw.config.scale(), 1.0, &mut y);
            }
        }
        y
    }

    /// Runs the new `tokens[s]` of every sequence `s` through the model, appending their keys
    /// and values to `caches[s]`. Returns logits, row-major: [S, V] or [N, V] (see `LogitsFor`).
    pub fn forward(
        &self,
        caches: &mut [&mut KvCache],
        tokens: &[&[u32]],
        lora: Option<&LoraWeights>,
        want: LogitsFor,
    ) -> Vec<f32> {
        let c = &self.config;
        let w = &self.weights;
        let (d, hd) = (c.hidden_size, c.head_dim);
        let (nh, nkv) = (c.num_attention_heads, c.num_key_value_heads);
        assert_eq!(caches.len(), tokens.len());

        // Row bookkeeping: row → (sequence, position).
        let mut row_seq = Vec::new();
        let mut row_pos = Vec::new();
        for (s, t) in tokens.iter().enumerate() {
            for j in 0..t.len() {
                row_seq.push(s);
                row_pos.push(caches[s].len + j);
            }
        }
        let n = row_seq.len();
        if n == 0 {
            return Vec::new();
        }

        // x [N, D]: embedding rows.
        let mut x = vec![0.0f32; n * d];
        let all_tokens: Vec<u32> = tokens.iter().flat_map(|t| t.iter().copied()).collect();
        for (r, &tok) in all_tokens.iter().enumerate() {
            let t = tok as usize;
            x[r * d..(r + 1) * d].copy_from_slice(&w.embed[t * d..(t + 1) * d]);
        }

        for (l, lw) in w.layers.iter().enumerate() {
            let lo = |p: Proj| lora.map(|a| (a, l, p));
            // Attention block.
            let h = ops::rmsnorm_fwd(&x, &lw.input_norm, c.rms_norm_eps, d);
            let mut q = self.linear(&h, n, &lw.q, lo(Proj::Q)); // [N, H·hd]
            let mut k = self.linear(&h, n, &lw.k, lo(Proj::K)); // [N, KV·hd]
            let v = self.linear(&h, n, &lw.v, lo(Proj::V)); // [N, KV·hd]
            if let (Some(qn), Some(kn)) = (&lw.q_norm, &lw.k_norm) {
                q = ops::rmsnorm_fwd(&q, qn, c.rms_norm_eps, hd);
                k = ops::rmsnorm_fwd(&k, kn, c.rms_norm_eps, hd);
            }
            for r in 0..n {
                ops::rope_inplace(
                    &mut q[r * nh * hd..(r + 1) * nh * hd],
                    row_pos[r],
                    &self.inv_freq,
                    hd,
                    false,
                );
                ops::rope_inplace(
                    &mut k[r * nkv * hd..(r + 1) * nkv * hd],
                    row_pos[r],
                    &self.inv_freq,
                    hd,
                    false,
                );
            }
            // Append this layer's new keys/values to each sequence's cache.
            for r in 0..n {
                let cache = &mut caches[row_seq[r]];
                cache.k[l].extend_from_slice(&k[r * nkv * hd..(r + 1) * nkv * hd]);
                cache.v[l].extend_from_slice(&v[r * nkv * hd..(r + 1) * nkv * hd]);
            }
            // attn [N, H·hd]: each (row, head) attends over its sequence's cache up to its position.
            let mut attn = vec![0.0f32; n * nh * hd];
            let caches_ro: Vec<&KvCache> = caches.iter().map(|c| &**c).collect();
            attn.par_chunks_mut(hd).enumerate().for_each(|(i, out)| {
                let (r, head) = (i / nh, i % nh);
                let cache = caches_ro[row_seq[r]];
                let pos = row_pos[r];
                let qv = &q[(r * nh + head) * hd..(r * nh + head + 1) * hd];
                attend(
                    qv,
                    &cache.k[l],
                    &cache.v[l],
                    head / (nh / nkv),
                    nkv,
                    hd,
                    pos,
                    c.sliding_window,
                    out,
                );
            });
            let o = self.linear(&attn, n, &lw.o, lo(Proj::O));
            for (xv, ov) in x.iter_mut().zip(&o) {
                *xv += ov;
            }
            // MLP block.
            let h = ops::rmsnorm_fwd(&x, &lw.post_norm, c.rms_norm_eps, d);
            let g = self.linear(&h, n, &lw.gate, lo(Proj::Gate));
            let u = self.linear(&h, n, &lw.up, lo(Proj::Up));
            let m = ops::swiglu_fwd(&g, &u);
            let dn = self.linear(&m, n, &lw.down, lo(Proj::Down));
            for (xv, dv) in x.iter_mut().zip(&dn) {
                *xv += dv;
            }
        }
        for (s, t) in tokens.iter().enumerate() {
            caches[s].len += t.len();
        }

        // Final norm and lm_head on the rows that need logits.
        let rows: Vec<usize> = match want {
            LogitsFor::All => (0..n).collect(),
            LogitsFor::LastPerSeq => {
                let mut rows = Vec::new();
                let mut end = 0;
                for t in tokens {
                    end += t.len();
                    assert!(
                        !t.is_empty(),
                        "LogitsFor::LastPerSeq needs ≥ 1 new token per sequence"
                    );
                    rows.push(end - 1);
                }
                rows
            }
        };
        let mut sel = Vec::with_capacity(rows.len() * d);
        for &r in &rows {
            sel.extend_from_slice(&x[r * d..(r + 1) * d]);
        }
        let hn = ops::rmsnorm_fwd(&sel, &w.final_norm, c.rms_norm_eps, d);
        ops::matmul_wt(&hn, w.lm_head(), rows.len(), d, c.vocab_size)
    }
}

/// Softmax attention of one query head over positions [start, pos] of a cache.
/// q: \[hd\]; k_cache, v_cache: [T, KV·hd]; out: \[hd\]. Scores are q·k / √hd in f32.
#[allow(clippy::too_many_arguments)]
pub fn attend(
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    kv_head: usize,
    nkv: usize,
    hd: usize,
    pos: usize,
    window: Option<usize>,
    out: &mut [f32],
) {
    let start = match window {
        Some(w) if pos + 1 > w => pos + 1 - w,
        _ => 0,
    };
    let scale = 1.0 / (hd as f32).sqrt();
    let kvd = nkv * hd;
    let mut scores: Vec<f32> = (start..=pos)
        .map(|t| {
            let kv = &k_cache[t * kvd + kv_head * hd..t * kvd + (kv_head + 1) * hd];
            q.iter().zip(kv).map(|(a, b)| a * b).sum::<f32>() * scale
        })
        .collect();
    ops::softmax_inplace(&mut scores);
    out.iter_mut().for_each(|o| *o = 0.0);
    for (i, t) in (start..=pos).enumerate() {
        let vv = &v_cache[t * kvd + kv_head * hd..t * kvd + (kv_head + 1) * hd];
        for (o, &vx) in out.iter_mut().zip(vv) {
            *o += scores[i] * vx;
        }
    }
}
