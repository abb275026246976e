//! The f32 training forward and backward of the CPU reference: token sequences → per-token
//! log-probabilities and entropies → gradients of every LoRA A and B (and, optionally, of
//! every base weight for full fine-tuning).
//!
//! This module owns the differentiable forward, saved or recomputed activations, the chunked
//! lm_head + log-softmax + gather, and the backward. It does not own the loss (the loss module
//! hands us dL/dlogp and dL/dentropy per completion token) nor the optimizer.
//!
//! Data flow (N = Σ sequence lengths, rows stacked like `CpuModel::forward`, no padding):
//!
//! ```text
//! tokens ─► embed x [N,D] ─► L × layer ─► x_final [N,D] ─► per chunk of ≤ C scored rows:
//!   layer:  h1 = rmsnorm(x)            [N,D]           hn = rmsnorm(x_final[rows]) [C,D]
//!           q,k,v = lin(h1)            [N,H·hd],[N,KV·hd]   z = hn·lm_headᵀ / T      [C,V]
//!           (q,k = rmsnorm_hd (Qwen3)) then RoPE           logp = z[next] − lse(z)   [C]
//!           attn = causal GQA softmax  [N,H·hd]            entropy = lse − Σ p z     [C]
//!           x += lin_o(attn)
//!           h2 = rmsnorm(x); x += lin_down(silu(lin_gate(h2)) · lin_up(h2))
//! ```
//!
//! Position t of a sequence predicts token t+1; the scored tokens are t+1 ∈ [prompt_len, len).
//! Outputs are concatenated in sequence order (`token_offsets`).
//!
//! Every linear is live LoRA: y = x Wᵀ + b + s · (x̃ Aᵀ) Bᵀ with A \[r,in\], B \[out,r\],
//! s = alpha/r and x̃ = x (or x ⊙ mask/(1−p) with LoRA dropout). With u = x̃ Aᵀ \[n,r\] and the
//! upstream gradient dy \[n,out\], the chain rule (Unsloth's fast_lora derivation) gives
//!
//! ```text
//!   dB [out,r] += s · dyᵀ u                      (u = x̃ Aᵀ, recomputed)
//!   dA [r,in]  += s · (dy B)ᵀ x̃                  (dy B [n,r]: the rank-r side first)
//!   dx [n,in]  += dy W  +  s · (dy B) A  (⊙ mask/(1−p) with dropout)
//!   dW [out,in] += dyᵀ x,  db [out] += Σ_rows dy  (full fine-tuning only)
//! ```
//!
//! Activations are either all saved (`Recompute::None`) or only each layer's input is kept
//! and the layer's forward is rerun during backward (`Recompute::Layer`); the same function
//! computes both, so results are bit-identical. The lm_head never holds more than one chunk
//! of [C, V] logits: its backward recomputes the chunk and writes dlogits in place.

use crate::cpu::model::{attend, CpuModel};
use crate::cpu::ops;
use crate::lora::{LoraPair, LoraWeights};
use crate::model::weights::{LayerWeights, Linear, Proj, Weights};
use rayon::prelude::*;

/// Gradients of an adapter: the same structure as the adapter.
pub type LoraGrads = LoraWeights;

/// One sequence to score: prompt followed by completion, `prompt_len ≥ 1`.
#[derive(Clone, Copy, Debug)]
pub struct Sequence<'a> {
    pub tokens: &'a [u32],
    pub prompt_len: usize,
}

/// What the forward keeps for the backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recompute {
    /// Save every activation the backward needs.
    None,
    /// Save only each layer's input [N, D]; rerun the layer's forward during backward.
    Layer,
}

/// LoRA dropout on the input of A: keep an entry with probability 1−p, scale kept ones by
/// 1/(1−p). The mask is a pure function of (seed, layer, projection, row, column), so the
/// backward (and a recomputed forward) sees exactly the forward's mask.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoraDropout {
    pub p: f32,
    pub seed: u64,
}

#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// logp = log_softmax(logits / temperature).
    pub temperature: f32,
    pub recompute: Recompute,
    /// Rows of the lm_head chunk (≥ 1): at most [chunk_rows, V] logits exist at a time.
    pub chunk_rows: usize,
    /// `None` (the default) in eval and reference passes.
    pub dropout: Option<LoraDropout>,
    /// Also compute gradients of every base weight (full fine-tuning).
    pub full_grads: bool,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            temperature: 1.0,
            recompute: Recompute::None,
            chunk_rows: 64,
            dropout: None,
            full_grads: false,
        }
    }
}

/// Gradients from one backward. `lora` is present when the forward had an adapter;
/// `weights` (same layout as `Weights`, tied embeddings accumulate both uses into `embed`)
/// when `full_grads` was set.
#[derive(Clone, Debug)]
pub struct Grads {
    pub lora: Option<LoraGrads>,
    pub weights: Option<Weights>,
}

/// Row bookkeeping of a batch stacked into N rows.
#[derive(Clone, Debug)]
struct Layout {
    n: usize,
    tokens: Vec<u32>,      // [N]
    row_seq: Vec<usize>,   // [N]
    row_pos: Vec<usize>,   // [N] position within its sequence
    seq_off: Vec<usize>,   // [B+1] first row of each sequence
    scored: Vec<usize>,    // [T] rows whose next token is scored, in output order
    targets: Vec<u32>,     // [T] the token each scored row predicts
    token_off: Vec<usize>, // [B+1] first output index of each sequence
}

impl Layout {
    fn new(seqs: &[Sequence]) -> Layout {
        let mut l = Layout {
            n: 0,
            tokens: vec![],
            row_seq: vec![],
            row_pos: vec![],
            seq_off: vec![0],
            scored: vec![],
            targets: vec![],
            token_off: vec![0],
        };
        for (s, seq) in seqs.iter().enumerate() {
            let len = seq.tokens.len();
            assert!(
                seq.prompt_len >= 1 && seq.prompt_len <= len,
                "sequence {s}: prompt_len {} must be in [1, len = {len}]",
                seq.prompt_len
            );
            for t in 0..len {
                if t + 1 >= seq.prompt_len && t + 1 < len {
                    l.scored.push(l.n + t);
                    l.targets.push(seq.tokens[t + 1]);
                }
                l.row_seq.push(s);
                l.row_pos.push(t);
            }
            l.tokens.extend_from_slice(seq.tokens);
            l.n += len;
            l.seq_off.push(l.n);
            l.token_off.push(l.scored.len());
        }
        l
    }
}

/// Everything one layer's backward needs (the layer input included).
struct LayerActs {
    x_in: Vec<f32>,          // [N, D]
    h1: Vec<f32>,            // [N, D]     rmsnorm(x_in)
    q_lin: Option<Vec<f32>>, // [N, H·hd]  q before q-norm (Qwen3 only)
    k_lin: Option<Vec<f32>>, // [N, KV·hd] k before k-norm (Qwen3 only)
    q: Vec<f32>,             // [N, H·hd]  after norm + RoPE
    k: Vec<f32>,             // [N, KV·hd] after norm + RoPE
    v: Vec<f32>,             // [N, KV·hd]
    attn: Vec<f32>,          // [N, H·hd]  input of o_proj
    x_mid: Vec<f32>,         // [N, D]     after the attention residual
    h2: Vec<f32>,            // [N, D]     rmsnorm(x_mid)
    gate: Vec<f32>,          // [N, I]
    up: Vec<f32>,            // [N, I]
    act: Vec<f32>,           // [N, I]     silu(gate)·up, input of down_proj
}

enum Saved {
    All(Vec<LayerActs>),
    Inputs(Vec<Vec<f32>>), // L × [N, D]
}

/// The result of a training forward: per completion token logp and entropy, plus what the
/// backward needs. Borrows the model and adapter it was computed with.
pub struct TrainForward<'a> {
    /// \[T\] log-probability of each scored token (T = Σ completion lengths).
    pub logp: Vec<f32>,
    /// \[T\] entropy of each scored token's softmax (at the same temperature).
    pub entropy: Vec<f32>,
    /// [B+1] sequence b's tokens are logp[token_offsets\[b\]..token_offsets[b+1]].
    pub token_offsets: Vec<usize>,
    model: &'a CpuModel,
    lora: Option<&'a LoraWeights>,
    opts: TrainOptions,
    layout: Layout,
    saved: Saved,
    x_final: Vec<f32>, // [N, D]
}

/// Keep-mask value of LoRA dropout at one input entry: 0 or 1/(1−p). The CUDA kernels
/// (kernels/lora_train.cu `lt_dropout_factor`) compute the same bits.
pub fn dropout_factor(d: &LoraDropout, layer: usize, proj: Proj, row: usize, col: usize) -> f32 {
    // splitmix64 of the entry's coordinates: a counter-based generator, order independent.
    let mut z = d
        .seed
        .wrapping_add((layer as u64) << 56 ^ (proj as u64) << 48 ^ (row as u64) << 24 ^ col as u64)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let u = (z >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
    if u < d.p {
        0.0
    } else {
        1.0 / (1.0 - d.p)
    }
}

/// x̃ [n, in]: x with LoRA dropout applied (a copy of x without it).
fn dropped(x: &[f32], d_in: usize, drop: Option<(&LoraDropout, usize, Proj)>) -> Vec<f32> {
    let mut xd = x.to_vec();
    if let Some((d, l, p)) = drop {
        for (i, v) in xd.iter_mut().enumerate() {
            *v *= dropout_factor(d, l, p, i / d_in, i % d_in);
        }
    }
    xd
}

/// A projection with live LoRA: y [n, out] = x Wᵀ + b + s·(x̃ Aᵀ) Bᵀ. Without dropout this is
/// exactly `CpuModel::linear` (the inference path).
#[allow(clippy::too_many_arguments)]
fn proj_fwd(
    model: &CpuModel,
    lora: Option<&LoraWeights>,
    dropout: Option<&LoraDropout>,
    l: usize,
    p: Proj,
    lin: &Linear,
    x: &[f32],
    n: usize,
) -> Vec<f32> {
    let lo = lora.map(|a| (a, l, p));
    match (dropout, lora.and_then(|a| a.pair(l, p))) {
        (Some(d), Some(pair)) => {
            let lw = lora.unwrap();
            let mut y = model.linear(x, n, lin, None); // [n, out]
            let xd = dropped(x, lin.d_in, Some((d, l, p))); // [n, in]
            let u = ops::matmul_wt(&xd, &pair.a, n, lin.d_in, lw.config.r); // [n, r]
            ops::matmul_wt_acc(
                &u,
                &pair.b,
                n,
                lw.config.r,
                lin.d_out,
                lw.config.scale(),
                1.0,
                &mut y,
            );
            y
        }
        _ => model.linear(x, n, lin, lo),
    }
}

/// Backward of `proj_fwd`. x [n, in], dy [n, out]; accumulates dx [n, in] (+=), the LoRA pair's
/// gradients and, for full fine-tuning, dW and db.
#[allow(clippy::too_many_arguments)]
fn proj_bwd(
    lin: &Linear,
    lora: Option<(&LoraPair, usize, f32)>, // (pair, r, scale)
    drop: Option<(&LoraDropout, usize, Proj)>,
    x: &[f32],
    dy: &[f32],
    n: usize,
    dx: &mut [f32],
    g_pair: Option<&mut LoraPair>,
    g_lin: Option<&mut Linear>,
) {
    let (d_in, d_out) = (lin.d_in, lin.d_out);
    // dx [n, in] += dy [n, out] · W [out, in]
    ops::matmul_acc(dy, &lin.w, n, d_out, d_in, 1.0, 1.0, dx);
    if let Some(g) = g_lin {
        ops::matmul_tn_acc(dy, x, n, d_out, d_in, 1.0, 1.0, &mut g.w); // dW [out, in] += dyᵀ x
        if let Some(gb) = g.b.as_mut() {
            for row in dy.chunks_exact(d_out) {
                for (b, &v) in gb.iter_mut().zip(row) {
                    *b += v;
                }
            }
        }
    }
    if let Some((pair, r, s)) = lora {
        let xd = dropped(x, d_in, drop); // x̃ [n, in]
        let mut dyb = vec![0.0f32; n * r]; // dy B [n, r]
        ops::matmul_acc(dy, &pair.b, n, d_out, r, 1.0, 0.0, &mut dyb);
        if let Some(g) = g_pair {
            let u = ops::matmul_wt(&xd, &pair.a, n, d_in, r); // u = x̃ Aᵀ [n, r]
            ops::matmul_tn_acc(dy, &u, n, d_out, r, s, 1.0, &mut g.b); // dB [out, r] += s dyᵀ u
            ops::matmul_tn_acc(&dyb, &xd, n, r, d_in, s, 1.0, &mut g.a); // dA [r, in] += s (dyB)ᵀ x̃
        }
        match drop {
            None => ops::matmul_acc(&dyb, &pair.a, n, r, d_in, s, 1.0, dx), // dx += s (dyB) A
            Some((d, l, p)) => {
                let mut t = vec![0.0f32; n * d_in]; // s (dyB) A [n, in], then ⊙ mask/(1−p)
                ops::matmul_acc(&dyb, &pair.a, n, r, d_in, s, 0.0, &mut t);
                for (i, (dv, tv)) in dx.iter_mut().zip(&t).enumerate() {
                    *dv += tv * dropout_factor(d, l, p, i / d_in, i % d_in);
                }
            }
        }
    }
}

/// One decoder layer's forward from its input; returns every activation (x_out = the next
/// layer's input is returned separately). The single source of truth for both recompute modes.
fn layer_fwd(
    model: &CpuModel,
    lora: Option<&LoraWeights>,
    dropout: Option<&LoraDropout>,
    lay: &Layout,
    l: usize,
    x_in: Vec<f32>,
) -> (LayerActs, Vec<f32>) {
    let c = &model.config;
    let lw = &model.weights.layers[l];
    let (n, d, hd) = (lay.n, c.hidden_size, c.head_dim);
    let (nh, nkv) = (c.num_attention_heads, c.num_key_value_heads);
    let (qd, kvd) = (nh * hd, nkv * hd);
    let pf = |p: Proj, x: &[f32]| proj_fwd(model, lora, dropout, l, p, lw.proj(p), x, n);

    let h1 = ops::rmsnorm_fwd(&x_in, &lw.input_norm, c.rms_norm_eps, d); // [N, D]
    let mut q = pf(Proj::Q, &h1); // [N, H·hd]
    let mut k = pf(Proj::K, &h1); // [N, KV·hd]
    let v = pf(Proj::V, &h1); // [N, KV·hd]
    let (mut q_lin, mut k_lin) = (None, None);
    if let (Some(qn), Some(kn)) = (&lw.q_norm, &lw.k_norm) {
        let qq = ops::rmsnorm_fwd(&q, qn, c.rms_norm_eps, hd);
        let kk = ops::rmsnorm_fwd(&k, kn, c.rms_norm_eps, hd);
        q_lin = Some(std::mem::replace(&mut q, qq));
        k_lin = Some(std::mem::replace(&mut k, kk));
    }
    for r in 0..n {
        ops::rope_inplace(
            &mut q[r * qd..(r + 1) * qd],
            lay.row_pos[r],
            &model.inv_freq,
            hd,
            false,
        );
        ops::rope_inplace(
            &mut k[r * kvd..(r + 1) * kvd],
            lay.row_pos[r],
            &model.inv_freq,
            hd,
            false,
        );
    }
    // attn [N, H·hd]: each (row, head) over its own sequence's keys [len, KV·hd] up to its position.
    let mut attn = vec![0.0f32; n * qd];
    attn.par_chunks_mut(hd).enumerate().for_each(|(i, out)| {
        let (r, head) = (i / nh, i % nh);
        let s = lay.row_seq[r];
        let (a, b) = (lay.seq_off[s], lay.seq_off[s + 1]);
        let qv = &q[(r * nh + head) * hd..(r * nh + head + 1) * hd];
        attend(
            qv,
            &k[a * kvd..b * kvd],
            &v[a * kvd..b * kvd],
            head / (nh / nkv),
            nkv,
            hd,
            lay.row_pos[r],
            c.sliding_window,
            out,
        );
    });
    let o = pf(Proj::O, &attn); // [N, D]
    let mut x_mid = x_in.clone();
    for (xv, ov) in x_mid.iter_mut().zip(&o) {
        *xv += ov;
    }
    let h2 = ops::rmsnorm_fwd(&x_mid, &lw.post_norm, c.rms_norm_eps, d); // [N, D]
    let gate = pf(Proj::Gate, &h2); // [N, I]
    let up = pf(Proj::Up, &h2); // [N, I]
    let act = ops::swiglu_fwd(&gate, &up); // [N, I]
    let dn = pf(Proj::Down, &act); // [N, D]
    let mut x_out = x_mid.clone();
    for (xv, dv) in x_out.iter_mut().zip(&dn) {
        *xv += dv;
    }
    (
        LayerActs {
            x_in,
            h1,
            q_lin,
            k_lin,
            q,
            k,
            v,
            attn,
            x_mid,
            h2,
            gate,
            up,
            act,
        },
        x_out,
    )
}

/// Attention backward for one sequence and one KV head (its whole query-head group), with
/// probabilities recomputed exactly as `attend` computes them. Returns local
/// (dq [len, group·hd], dk [len, hd], dv [len, hd]).
///   s_j = q·k_j/√hd, P = softmax(s), out = Σ P_j v_j:
///   dv_j += P_j dout;  dS_j = P_j (dout·v_j − Σ_i P_i dout·v_i);
///   dq = Σ dS_j k_j/√hd;  dk_j += dS_j q/√hd.
#[allow(clippy::too_many_arguments)]
fn attend_bwd_group(
    q: &[f32],    // [len, H·hd]
    k: &[f32],    // [len, KV·hd]
    v: &[f32],    // [len, KV·hd]
    dout: &[f32], // [len, H·hd]
    len: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
    g: usize,
    window: Option<usize>,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let group = nh / nkv;
    let (qd, kvd) = (nh * hd, nkv * hd);
    let scale = 1.0 / (hd as f32).sqrt();
    let mut dq = vec![0.0f32; len * group * hd];
    let mut dk = vec![0.0f32; len * hd];
    let mut dv = vec![0.0f32; len * hd];
    for i in 0..len {
        let start = match window {
            Some(w) if i + 1 > w => i + 1 - w,
            _ => 0,
        };
        for gi in 0..group {
            let head = g * group + gi;
            let qv = &q[i * qd + head * hd..i * qd + (head + 1) * hd];
            let dov = &dout[i * qd + head * hd..i * qd + (head + 1) * hd];
            let krow = |t: usize| &k[t * kvd + g * hd..t * kvd + (g + 1) * hd];
            let vrow = |t: usize| &v[t * kvd + g * hd..t * kvd + (g + 1) * hd];
            let mut p: Vec<f32> = (start..=i)
                .map(|t| qv.iter().zip(krow(t)).map(|(a, b)| a * b).sum::<f32>() * scale)
                .collect();
            ops::softmax_inplace(&mut p);
            let dp: Vec<f32> = (start..=i)
                .map(|t| dov.iter().zip(vrow(t)).map(|(a, b)| a * b).sum::<f32>())
                .collect();
            let dot: f32 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
            let dqv = &mut dq[(i * group + gi) * hd..(i * group + gi + 1) * hd];
            for (j, t) in (start..=i).enumerate() {
                let ds = p[j] * (dp[j] - dot) * scale;
                for (x, &kk) in dqv.iter_mut().zip(krow(t)) {
                    *x += ds * kk;
                }
                for (x, &qq) in dk[t * hd..(t + 1) * hd].iter_mut().zip(qv) {
                    *x += ds * qq;
                }
                for (x, &o) in dv[t * hd..(t + 1) * hd].iter_mut().zip(dov) {
                    *x += p[j] * o;
                }
            }
        }
    }
    (dq, dk, dv)
}

/// One layer's backward: dx [N, D] is dL/d(layer output) on entry, dL/d(layer input) on exit.
#[allow(clippy::too_many_arguments)]
fn layer_bwd(
    model: &CpuModel,
    lora: Option<&LoraWeights>,
    dropout: Option<&LoraDropout>,
    lay: &Layout,
    l: usize,
    a: &LayerActs,
    dx: &mut [f32],
    mut g_lora: Option<&mut [Option<LoraPair>; 7]>,
    mut g_w: Option<&mut LayerWeights>,
) {
    let c = &model.config;
    let lw = &model.weights.layers[l];
    let (n, d, hd, im) = (lay.n, c.hidden_size, c.head_dim, c.intermediate_size);
    let (nh, nkv) = (c.num_attention_heads, c.num_key_value_heads);
    let (qd, kvd) = (nh * hd, nkv * hd);
    let eps = c.rms_norm_eps;
    // Backward of projection p of this layer: input x, upstream dy, accumulates into dxp.
    let pb = |g_lora: &mut Option<&mut [Option<LoraPair>; 7]>,
              g_w: &mut Option<&mut LayerWeights>,
              p: Proj,
              x: &[f32],
              dy: &[f32],
              dxp: &mut [f32]| {
        let pair = lora.and_then(|lo| lo.pair(l, p).map(|pr| (pr, lo.config.r, lo.config.scale())));
        let drop = dropout.map(|dd| (dd, l, p));
        let gp = g_lora.as_deref_mut().and_then(|gl| gl[p as usize].as_mut());
        let gl = g_w.as_deref_mut().map(|gw| gw.proj_mut(p));
        proj_bwd(lw.proj(p), pair, drop, x, dy, n, dxp, gp, gl);
    };

    // MLP: x_out = x_mid + down(silu(gate(h2)) · up(h2)).
    let mut dact = vec![0.0f32; n * im]; // [N, I]
    pb(&mut g_lora, &mut g_w, Proj::Down, &a.act, dx, &mut dact);
    let (dgate, dup) = ops::swiglu_bwd(&a.gate, &a.up, &dact); // [N, I] each
    let mut dh2 = vec![0.0f32; n * d]; // [N, D]
    pb(&mut g_lora, &mut g_w, Proj::Gate, &a.h2, &dgate, &mut dh2);
    pb(&mut g_lora, &mut g_w, Proj::Up, &a.h2, &dup, &mut dh2);
    let dpost = g_w.as_deref_mut().map(|gw| &mut gw.post_norm[..]);
    let dxm = ops::rmsnorm_bwd(&a.x_mid, &lw.post_norm, &dh2, eps, d, dpost);
    for (x, v) in dx.iter_mut().zip(&dxm) {
        *x += v; // dx = dL/dx_mid now
    }

    // Attention: x_mid = x_in + o(attn(q, k, v)).
    let mut dattn = vec![0.0f32; n * qd]; // [N, H·hd]
    pb(&mut g_lora, &mut g_w, Proj::O, &a.attn, dx, &mut dattn);
    // Per (sequence, KV head) tasks; each owns its keys' gradients, then scatter.
    let tasks: Vec<(usize, usize)> = (0..lay.seq_off.len() - 1)
        .flat_map(|s| (0..nkv).map(move |g| (s, g)))
        .collect();
    let parts: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = tasks
        .par_iter()
        .map(|&(s, g)| {
            let (r0, r1) = (lay.seq_off[s], lay.seq_off[s + 1]);
            attend_bwd_group(
                &a.q[r0 * qd..r1 * qd],
                &a.k[r0 * kvd..r1 * kvd],
                &a.v[r0 * kvd..r1 * kvd],
                &dattn[r0 * qd..r1 * qd],
                r1 - r0,
                nh,
                nkv,
                hd,
                g,
                c.sliding_window,
            )
        })
        .collect();
    let mut dq = vec![0.0f32; n * qd]; // [N, H·hd]
    let mut dk = vec![0.0f32; n * kvd]; // [N, KV·hd]
    let mut dv = vec![0.0f32; n * kvd]; // [N, KV·hd]
    let group = nh / nkv;
    for (&(s, g), (pq, pk, pv)) in tasks.iter().zip(&parts) {
        let r0 = lay.seq_off[s];
        for i in 0..lay.seq_off[s + 1] - r0 {
            let r = r0 + i;
            let qs = r * qd + g * group * hd;
            dq[qs..qs + group * hd].copy_from_slice(&pq[i * group * hd..(i + 1) * group * hd]);
            dk[r * kvd + g * hd..r * kvd + (g + 1) * hd].copy_from_slice(&pk[i * hd..(i + 1) * hd]);
            dv[r * kvd + g * hd..r * kvd + (g + 1) * hd].copy_from_slice(&pv[i * hd..(i + 1) * hd]);
        }
    }
    // RoPE is a rotation: its backward is the inverse rotation.
    for r in 0..n {
        ops::rope_inplace(
            &mut dq[r * qd..(r + 1) * qd],
            lay.row_pos[r],
            &model.inv_freq,
            hd,
            true,
        );
        ops::rope_inplace(
            &mut dk[r * kvd..(r + 1) * kvd],
            lay.row_pos[r],
            &model.inv_freq,
            hd,
            true,
        );
    }
    if let (Some(qn), Some(kn), Some(ql), Some(kl)) = (&lw.q_norm, &lw.k_norm, &a.q_lin, &a.k_lin) {
        let (gq, gk) = match g_w.as_deref_mut() {
            Some(gw) => (gw.q_norm.as_deref_mut(), gw.k_norm.as_deref_mut()),
            None => (None, None),
        };
        dq = ops::rmsnorm_bwd(ql, qn, &dq, eps, hd, gq);
        dk = ops::rmsnorm_bwd(kl, kn, &dk, eps, hd, gk);
    }
    let mut dh1 = vec![0.0f32; n * d]; // [N, D]
    pb(&mut g_lora, &mut g_w, Proj::Q, &a.h1, &dq, &mut dh1);
    pb(&mut g_lora, &mut g_w, Proj::K, &a.h1, &dk, &mut dh1);
    pb(&mut g_lora, &mut g_w, Proj::V, &a.h1, &dv, &mut dh1);
    let dinput = g_w.map(|gw| &mut gw.input_norm[..]);
    let dxi = ops::rmsnorm_bwd(&a.x_in, &lw.input_norm, &dh1, eps, d, dinput);
    for (x, v) in dx.iter_mut().zip(&dxi) {
        *x += v; // dx = dL/dx_in now
    }
}

/// Final norm + lm_head + log-softmax of one chunk of scored rows.
/// Returns (z [C, V] = logits/T, hn [C, D], sel [C, D] = x_final rows).
fn head_chunk(
    model: &CpuModel,
    x_final: &[f32],
    rows: &[usize],
    temperature: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let c = &model.config;
    let (d, vocab) = (c.hidden_size, c.vocab_size);
    let mut sel = Vec::with_capacity(rows.len() * d); // [C, D]
    for &r in rows {
        sel.extend_from_slice(&x_final[r * d..(r + 1) * d]);
    }
    let hn = ops::rmsnorm_fwd(&sel, &model.weights.final_norm, c.rms_norm_eps, d); // [C, D]
    let mut z = ops::matmul_wt(&hn, model.weights.lm_head(), rows.len(), d, vocab); // [C, V]
    if temperature != 1.0 {
        z.iter_mut().for_each(|v| *v /= temperature);
    }
    (z, hn, sel)
}

fn embed_rows(model: &CpuModel, lay: &Layout) -> Vec<f32> {
    let d = model.config.hidden_size;
    let mut x = vec![0.0f32; lay.n * d]; // [N, D]
    for (r, &tok) in lay.tokens.iter().enumerate() {
        let t = tok as usize;
        x[r * d..(r + 1) * d].copy_from_slice(&model.weights.embed[t * d..(t + 1) * d]);
    }
    x
}

/// (logp [T], entropy [T]) of the scored rows, chunk by chunk.
fn head_fwd(model: &CpuModel, lay: &Layout, x_final: &[f32], opts: &TrainOptions) -> (Vec<f32>, Vec<f32>) {
    assert!(opts.chunk_rows >= 1, "chunk_rows must be ≥ 1");
    let vocab = model.config.vocab_size;
    let mut logp = Vec::with_capacity(lay.scored.len());
    let mut entropy = Vec::with_capacity(lay.scored.len());
    for (ci, rows) in lay.scored.chunks(opts.chunk_rows).enumerate() {
        let (z, _, _) = head_chunk(model, x_final, rows, opts.temperature);
        for (j, zr) in z.chunks_exact(vocab).enumerate() {
            let tok = lay.targets[ci * opts.chunk_rows + j] as usize;
            let (lp, ent) = ops::logprob_and_entropy(zr, tok);
            logp.push(lp);
            entropy.push(ent);
        }
    }
    (logp, entropy)
}

/// Training forward: logp and entropy per completion token, with activations kept for
/// `TrainForward::backward` as `opts.recompute` says.
pub fn forward<'a>(
    model: &'a CpuModel,
    lora: Option<&'a LoraWeights>,
    seqs: &[Sequence],
    opts: &TrainOptions,
) -> TrainForward<'a> {
    let lay = Layout::new(seqs);
    let mut x = embed_rows(model, &lay); // [N, D]
    let mut saved = match opts.recompute {
        Recompute::None => Saved::All(Vec::new()),
        Recompute::Layer => Saved::Inputs(Vec::new()),
    };
    for l in 0..model.config.num_hidden_layers {
        let (acts, x_out) = layer_fwd(model, lora, opts.dropout.as_ref(), &lay, l, x);
        match &mut saved {
            Saved::All(v) => v.push(acts),
            Saved::Inputs(v) => v.push(acts.x_in),
        }
        x = x_out;
    }
    let (logp, entropy) = head_fwd(model, &lay, &x, opts);
    TrainForward {
        logp,
        entropy,
        token_offsets: lay.token_off.clone(),
        model,
        lora,
        opts: opts.clone(),
        layout: lay,
        saved,
        x_final: x,
    }
}

/// Forward without keeping activations (no backward): (logp \[T\], entropy \[T\]).
pub fn logprobs(
    model: &CpuModel,
    lora: Option<&LoraWeights>,
    seqs: &[Sequence],
    opts: &TrainOptions,
) -> (Vec<f32>, Vec<f32>) {
    let lay = Layout::new(seqs);
    let mut x = embed_rows(model, &lay);
    for l in 0..model.config.num_hidden_layers {
        x = layer_fwd(model, lora, opts.dropout.as_ref(), &lay, l, x).1;
    }
    head_fwd(model, &lay, &x, opts)
}

/// The reference policy's logp: the same model with the adapter switched off (no second copy
/// of the weights), no dropout.
pub fn ref_logp(model: &CpuModel, seqs: &[Sequence], temperature: f32) -> Vec<f32> {
    let opts = TrainOptions {
        temperature,
        ..TrainOptions::default()
    };
    logprobs(model, None, seqs, &opts).0
}

/// Zeros of every base weight's shape (the layout of full fine-tuning gradients).
pub fn zeros_like_weights(w: &Weights) -> Weights {
    let z = |v: &Vec<f32>| vec![0.0f32; v.len()];
    let zl = |lin: &Linear| Linear {
        w: z(&lin.w),
        b: lin.b.as_ref().map(z),
        d_in: lin.d_in,
        d_out: lin.d_out,
    };
    Weights {
        embed: z(&w.embed),
        layers: w
            .layers
            .iter()
            .map(|lw| LayerWeights {
                input_norm: z(&lw.input_norm),
                q: zl(&lw.q),
                k: zl(&lw.k),
                v: zl(&lw.v),
                o: zl(&lw.o),
                q_norm: lw.q_norm.as_ref().map(z),
                k_norm: lw.k_norm.as_ref().map(z),
                post_norm: z(&lw.post_norm),
                gate: zl(&lw.gate),
                up: zl(&lw.up),
                down: zl(&lw.down),
            })
            .collect(),
        final_norm: z(&w.final_norm),
        lm_head: w.lm_head.as_ref().map(z),
    }
}

impl<'a> TrainForward<'a> {
    /// Backward from dL/dlogp \[T\] (and dL/dentropy \[T\] when the loss uses entropy).
    /// Returns LoRA gradients (when the forward had an adapter) and, with `full_grads`, the
    /// gradients of every base weight.
    pub fn backward(&self, dlogp: &[f32], dentropy: Option<&[f32]>) -> Grads {
        let model = self.model;
        let c = &model.config;
        let lay = &self.layout;
        let (n, d, vocab) = (lay.n, c.hidden_size, c.vocab_size);
        let tcount = lay.scored.len();
        assert_eq!(dlogp.len(), tcount, "dlogp: one value per completion token");
        if let Some(de) = dentropy {
            assert_eq!(de.len(), tcount, "dentropy: one value per completion token");
        }
        let mut g_lora = self.lora.map(|l| l.zeros_like());
        let mut g_w = self.opts.full_grads.then(|| zeros_like_weights(&model.weights));
        let temp = self.opts.temperature;

        // Head, chunk by chunk: z = hn·lm_headᵀ/T, p = softmax(z).
        //   d logp/dz_j = δ_{j,tok} − p_j;   d H/dz_j = −p_j (z_j − Σ_i p_i z_i).
        let mut dx = vec![0.0f32; n * d]; // [N, D] dL/dx_final
        let cr = self.opts.chunk_rows;
        for (ci, rows) in lay.scored.chunks(cr).enumerate() {
            let (mut z, hn, sel) = head_chunk(model, &self.x_final, rows, temp); // z [C, V]
            for (j, zr) in z.chunks_exact_mut(vocab).enumerate() {
                let t = ci * cr + j;
                let tok = lay.targets[t] as usize;
                let lse = ops::logsumexp(zr);
                let (gl, ge) = (dlogp[t], dentropy.map_or(0.0, |de| de[t]));
                let ez: f32 = zr.iter().map(|&v| (v - lse).exp() * v).sum(); // Σ p z
                for v in zr.iter_mut() {
                    let p = (*v - lse).exp();
                    *v = (-gl * p - ge * p * (*v - ez)) / temp; // dlogits, in place
                }
                zr[tok] += gl / temp;
            }
            let dlogits = z; // [C, V]
            let cn = rows.len();
            let mut dhn = vec![0.0f32; cn * d]; // [C, D] = dlogits · lm_head
            ops::matmul_acc(
                &dlogits,
                model.weights.lm_head(),
                cn,
                vocab,
                d,
                1.0,
                0.0,
                &mut dhn,
            );
            let mut dfinal = None;
            if let Some(gw) = g_w.as_mut() {
                // d lm_head [V, D] += dlogitsᵀ hn (into embed when tied).
                let gh = match gw.lm_head.as_mut() {
                    Some(h) => h,
                    None => &mut gw.embed,
                };
                ops::matmul_tn_acc(&dlogits, &hn, cn, vocab, d, 1.0, 1.0, gh);
                dfinal = Some(&mut gw.final_norm[..]);
            }
            let dsel = ops::rmsnorm_bwd(&sel, &model.weights.final_norm, &dhn, c.rms_norm_eps, d, dfinal);
            for (j, &r) in rows.iter().enumerate() {
                for (a, b) in dx[r * d..(r + 1) * d].iter_mut().zip(&dsel[j * d..(j + 1) * d]) {
                    *a += b;
                }
            }
        }

        for l in (0..c.num_hidden_layers).rev() {
            let recomputed;
            let acts = match &self.saved {
                Saved::All(v) => &v[l],
                Saved::Inputs(v) => {
                    recomputed =
                        layer_fwd(model, self.lora, self.opts.dropout.as_ref(), lay, l, v[l].clone()).0;
                    &recomputed
                }
            };
            layer_bwd(
                model,
                self.lora,
                self.opts.dropout.as_ref(),
                lay,
                l,
                acts,
                &mut dx,
                g_lora.as_mut().map(|g| &mut g.layers[l]),
                g_w.as_mut().map(|g| &mut g.layers[l]),
            );
        }
        if let Some(gw) = g_w.as_mut() {
            for (r, &tok) in lay.tokens.iter().enumerate() {
                let t = tok as usize;
                for (a, b) in gw.embed[t * d..(t + 1) * d]
                    .iter_mut()
                    .zip(&dx[r * d..(r + 1) * d])
                {
                    *a += b;
                }
            }
        }
        Grads {
            lora: g_lora,
            weights: g_w,
        }
    }
}
