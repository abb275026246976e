//! The CPU training forward/backward (`rft::cpu::train`) against independent oracles:
//! - logp/entropy against the KV-cache inference path (`CpuModel::forward`, `LogitsFor::All`);
//! - gradients against central finite differences of the forward itself;
//! - recompute modes and lm_head chunk sizes against each other.
//!
//! Tiny hand-built configs cover every family feature: Llama (attention + MLP biases, llama3
//! RoPE scaling), Qwen2 (qkv bias, tied embeddings), Qwen3 (q/k norm, head_dim ≠ D/H), Mistral
//! (sliding window shorter than the sequences). All use GQA (4 query heads, 2 KV heads).

use rft::cpu::model::{CpuModel, KvCache, LogitsFor};
use rft::cpu::ops;
use rft::cpu::train::{self, Grads, LoraDropout, Recompute, Sequence, TrainOptions};
use rft::lora::{LoraConfig, LoraWeights};
use rft::model::config::{Arch, ModelConfig, RopeScaling};
use rft::model::weights::{Proj, Weights};

fn tiny(arch: Arch) -> ModelConfig {
    let mut c = ModelConfig {
        arch,
        vocab_size: 61,
        hidden_size: 32,
        intermediate_size: 40,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 8,
        rms_norm_eps: 1e-6,
        rope_theta: 10000.0,
        rope_scaling: RopeScaling::Default,
        max_position_embeddings: 256,
        tie_word_embeddings: false,
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
        qk_norm: false,
        sliding_window: None,
        torch_dtype: None,
        bos_token_id: None,
        eos_token_ids: vec![],
        hidden_act: "silu".into(),
    };
    match arch {
        Arch::Llama => {
            c.qkv_bias = true;
            c.o_bias = true;
            c.mlp_bias = true;
            // old_ctx 16: wavelengths 6.3 (blended), 63, 628, 6283 (divided by factor).
            c.rope_scaling = RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 16.0,
            };
        }
        Arch::Qwen2 => {
            c.qkv_bias = true;
            c.tie_word_embeddings = true;
        }
        Arch::Qwen3 => {
            c.qk_norm = true;
            c.head_dim = 12; // H·hd = 48 ≠ D = 32
        }
        Arch::Mistral => c.sliding_window = Some(5),
    }
    c
}

const ARCHS: [Arch; 4] = [Arch::Llama, Arch::Qwen2, Arch::Qwen3, Arch::Mistral];

fn lora_cfg() -> LoraConfig {
    LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        use_rslora: false,
        target_modules: Proj::ALL.to_vec(),
    }
}

fn setup(arch: Arch, seed: u64) -> (CpuModel, LoraWeights) {
    let c = tiny(arch);
    let w = Weights::random(&c, seed, 0.2);
    let lora = LoraWeights::new_random(lora_cfg(), &c, seed + 100, 0.1, 0.1);
    (CpuModel::new(c, w), lora)
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

/// Token sequences with (len, prompt_len); the Mistral window (5) is shorter than all of them.
fn batch(vocab: usize, seed: u64, shape: &[(usize, usize)]) -> Vec<(Vec<u32>, usize)> {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    shape
        .iter()
        .map(|&(len, p)| ((0..len).map(|_| (rng.next() % vocab as u64) as u32).collect(), p))
        .collect()
}

fn seqs(b: &[(Vec<u32>, usize)]) -> Vec<Sequence<'_>> {
    b.iter()
        .map(|(t, p)| Sequence {
            tokens: t,
            prompt_len: *p,
        })
        .collect()
}

const SHAPE: [(usize, usize); 3] = [(9, 3), (13, 6), (7, 1)];

/// logp and entropy through the KV-cache inference path (all rows at once).
fn inference_logp(
    m: &CpuModel,
    lora: Option<&LoraWeights>,
    b: &[(Vec<u32>, usize)],
    temp: f32,
) -> (Vec<f32>, Vec<f32>) {
    let v = m.config.vocab_size;
    let mut caches: Vec<KvCache> = b.iter().map(|_| KvCache::new(&m.config)).collect();
    let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
    let toks: Vec<&[u32]> = b.iter().map(|(t, _)| t.as_slice()).collect();
    let logits = m.forward(&mut refs, &toks, lora, LogitsFor::All); // [N, V]
    let (mut lp, mut ent) = (vec![], vec![]);
    let mut row = 0;
    for (t, p) in b {
        for i in 0..t.len() {
            if i + 1 >= *p && i + 1 < t.len() {
                let z: Vec<f32> = logits[(row + i) * v..(row + i + 1) * v]
                    .iter()
                    .map(|x| x / temp)
                    .collect();
                let (a, e) = ops::logprob_and_entropy(&z, t[i + 1] as usize);
                lp.push(a);
                ent.push(e);
            }
        }
        row += t.len();
    }
    (lp, ent)
}

/// max |a − b|, NaN when any difference is NaN (`f32::max` skips NaN, so a NaN log-prob or
/// gradient would otherwise pass every `d <= TOL` check).
fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, |m, d| if d.is_nan() || d > m { d } else { m })
}

#[test]
fn forward_matches_inference_every_family() {
    for arch in ARCHS {
        let (m, lora) = setup(arch, 1);
        let b = batch(m.config.vocab_size, 7, &SHAPE);
        for temp in [1.0f32, 0.7] {
            for lo in [Some(&lora), None] {
                let opts = TrainOptions {
                    temperature: temp,
                    ..Default::default()
                };
                let f = train::forward(&m, lo, &seqs(&b), &opts);
                let (lp, ent) = inference_logp(&m, lo, &b, temp);
                assert_eq!(f.token_offsets, vec![0, 6, 13, 19]);
                assert_eq!(f.logp.len(), 19);
                let (dl, de) = (max_abs_diff(&f.logp, &lp), max_abs_diff(&f.entropy, &ent));
                // Same ops in the same order except the GEMM row count: f32 noise only.
                assert!(
                    dl <= 1e-5 && de <= 1e-5,
                    "{arch:?} T={temp} lora={}: logp diff {dl}, entropy diff {de}",
                    lo.is_some()
                );
                if lo.is_none() {
                    assert_eq!(
                        train::ref_logp(&m, &seqs(&b), temp),
                        f.logp,
                        "ref_logp = adapter-off forward"
                    );
                } else {
                    let (lp0, _) = train::logprobs(&m, None, &seqs(&b), &opts);
                    assert!(max_abs_diff(&lp0, &f.logp) > 1e-3, "the adapter must change logp");
                }
            }
        }
    }
}

fn flat_grads(g: &Grads) -> Vec<f32> {
    let mut out = vec![];
    if let Some(l) = &g.lora {
        for layer in &l.layers {
            for p in layer.iter().flatten() {
                out.extend_from_slice(&p.a);
                out.extend_from_slice(&p.b);
            }
        }
    }
    if let Some(w) = &g.weights {
        out.extend_from_slice(&w.embed);
        out.extend_from_slice(&w.final_norm);
        out.extend_from_slice(w.lm_head.as_deref().unwrap_or(&[]));
        for lw in &w.layers {
            out.extend_from_slice(&lw.input_norm);
            out.extend_from_slice(&lw.post_norm);
            out.extend_from_slice(lw.q_norm.as_deref().unwrap_or(&[]));
            out.extend_from_slice(lw.k_norm.as_deref().unwrap_or(&[]));
            for p in Proj::ALL {
                out.extend_from_slice(&lw.proj(p).w);
                out.extend_from_slice(lw.proj(p).b.as_deref().unwrap_or(&[]));
            }
        }
    }
    out
}

fn coeffs(t: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut rng = Rng(seed | 1);
    (
        (0..t).map(|_| rng.uniform()).collect(),
        (0..t).map(|_| 0.5 * rng.uniform()).collect(),
    )
}

#[test]
fn recompute_and_chunking_do_not_change_results() {
    for arch in ARCHS {
        let (m, lora) = setup(arch, 2);
        let b = batch(m.config.vocab_size, 8, &SHAPE);
        let drop = Some(LoraDropout { p: 0.3, seed: 5 });
        for dropout in [None, drop] {
            let base = TrainOptions {
                temperature: 0.9,
                dropout,
                full_grads: true,
                ..Default::default()
            };
            let f0 = train::forward(&m, Some(&lora), &seqs(&b), &base);
            let (c, e) = coeffs(f0.logp.len(), 3);
            let g0 = flat_grads(&f0.backward(&c, Some(&e)));
            // Recompute::Layer reruns the very same layer function: bit-identical.
            let o = TrainOptions {
                recompute: Recompute::Layer,
                ..base.clone()
            };
            let f1 = train::forward(&m, Some(&lora), &seqs(&b), &o);
            assert_eq!(f0.logp, f1.logp, "{arch:?}: recompute changed logp");
            assert_eq!(f0.entropy, f1.entropy);
            assert_eq!(
                g0,
                flat_grads(&f1.backward(&c, Some(&e))),
                "{arch:?}: recompute changed grads"
            );
            // Chunk size only changes the row count of the lm_head GEMM: rows are independent.
            // logp / entropy come out bit-identical here; 1e-6 (a few ulps of these O(1)
            // values) leaves room for a GEMM that blocks rows differently. The gradients of
            // lm_head / the embedding sum over rows chunk by chunk, a regrouped f32 sum of 19
            // rows: measured ≤ 1.3e-7 relative to the largest entry, so 1e-5 of it.
            for chunk in [1usize, 7, 64] {
                let o = TrainOptions {
                    chunk_rows: chunk,
                    ..base.clone()
                };
                let f = train::forward(&m, Some(&lora), &seqs(&b), &o);
                assert!(max_abs_diff(&f.logp, &f0.logp) <= 1e-6, "{arch:?} chunk {chunk}");
                assert!(
                    max_abs_diff(&f.entropy, &f0.entropy) <= 1e-6,
                    "{arch:?} chunk {chunk}"
                );
                let g = flat_grads(&f.backward(&c, Some(&e)));
                let scale = g0.iter().map(|x| x.abs()).fold(0.0, f32::max);
                assert!(
                    max_abs_diff(&g, &g0) <= 1e-5 * scale,
                    "{arch:?} chunk {chunk}: grads differ"
                );
            }
        }
    }
}

/// A tensor of the model or adapter, by kind.
#[derive(Clone, Copy, Debug)]
enum Param {
    LoraA(usize, Proj),
    LoraB(usize, Proj),
    Embed,
    FinalNorm,
    LmHead,
    InNorm(usize),
    PostNorm(usize),
    QNorm(usize),
    KNorm(usize),
    W(usize, Proj),
    Bias(usize, Proj),
}

fn param_mut<'a>(m: &'a mut CpuModel, lo: &'a mut LoraWeights, p: Param) -> &'a mut Vec<f32> {
    let w = &mut m.weights;
    match p {
        Param::LoraA(l, pr) => &mut lo.layers[l][pr as usize].as_mut().unwrap().a,
        Param::LoraB(l, pr) => &mut lo.layers[l][pr as usize].as_mut().unwrap().b,
        Param::Embed => &mut w.embed,
        Param::FinalNorm => &mut w.final_norm,
        Param::LmHead => w.lm_head.as_mut().unwrap(),
        Param::InNorm(l) => &mut w.layers[l].input_norm,
        Param::PostNorm(l) => &mut w.layers[l].post_norm,
        Param::QNorm(l) => w.layers[l].q_norm.as_mut().unwrap(),
        Param::KNorm(l) => w.layers[l].k_norm.as_mut().unwrap(),
        Param::W(l, pr) => &mut w.layers[l].proj_mut(pr).w,
        Param::Bias(l, pr) => w.layers[l].proj_mut(pr).b.as_mut().unwrap(),
    }
}

fn grad_of(g: &Grads, p: Param) -> Vec<f32> {
    let lo = g.lora.as_ref();
    let w = g.weights.as_ref();
    match p {
        Param::LoraA(l, pr) => lo.unwrap().layers[l][pr as usize].as_ref().unwrap().a.clone(),
        Param::LoraB(l, pr) => lo.unwrap().layers[l][pr as usize].as_ref().unwrap().b.clone(),
        Param::Embed => w.unwrap().embed.clone(),
        Param::FinalNorm => w.unwrap().final_norm.clone(),
        Param::LmHead => w.unwrap().lm_head.clone().unwrap(),
        Param::InNorm(l) => w.unwrap().layers[l].input_norm.clone(),
        Param::PostNorm(l) => w.unwrap().layers[l].post_norm.clone(),
        Param::QNorm(l) => w.unwrap().layers[l].q_norm.clone().unwrap(),
        Param::KNorm(l) => w.unwrap().layers[l].k_norm.clone().unwrap(),
        Param::W(l, pr) => w.unwrap().layers[l].proj(pr).w.clone(),
        Param::Bias(l, pr) => w.unwrap().layers[l].proj(pr).b.clone().unwrap(),
    }
}

/// Every LoRA tensor, or every base tensor kind present in the config.
fn params(c: &ModelConfig, lora: bool) -> Vec<Param> {
    let mut v = vec![];
    for l in 0..c.num_hidden_layers {
        for p in Proj::ALL {
            if lora {
                v.push(Param::LoraA(l, p));
                v.push(Param::LoraB(l, p));
            } else {
                v.push(Param::W(l, p));
                let has_bias = match p {
                    Proj::Q | Proj::K | Proj::V => c.qkv_bias,
                    Proj::O => c.o_bias,
                    _ => c.mlp_bias,
                };
                if has_bias {
                    v.push(Param::Bias(l, p));
                }
            }
        }
        if !lora {
            v.extend([Param::InNorm(l), Param::PostNorm(l)]);
            if c.qk_norm {
                v.extend([Param::QNorm(l), Param::KNorm(l)]);
            }
        }
    }
    if !lora {
        v.extend([Param::Embed, Param::FinalNorm]);
        if !c.tie_word_embeddings {
            v.push(Param::LmHead);
        }
    }
    v
}

/// L = Σ c_t logp_t + Σ e_t H_t, summed in f64 from the f32 forward.
fn loss(
    m: &CpuModel,
    lo: &LoraWeights,
    b: &[(Vec<u32>, usize)],
    o: &TrainOptions,
    c: &[f32],
    e: &[f32],
) -> f64 {
    let (lp, ent) = train::logprobs(m, Some(lo), &seqs(b), o);
    lp.iter().zip(c).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>()
        + ent.iter().zip(e).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>()
}

/// Central differences in f32 (the forward is f32; the loss is accumulated in f64).
///
/// Step and tolerance: weights have std 0.2 (LoRA 0.1) and norms ≈ 1, and the loss is O(1)
/// per token over 19 tokens, so f32 rounding in L is ~1e-6 absolute; with h = 1e-2 (Δ = 2h)
/// that is ~1e-4 in the estimate, while the truncation error h²·L'''/6 is ~1e-5 for O(1)
/// third derivatives. Entries checked one by one are the 3 largest |g| of each tensor (never
/// tiny), plus one directional derivative along a random ±1 direction over the whole tensor
/// (every entry contributes). Each must agree within 3e-2·(|value| + 1e-2·max|g|) + 2e-4:
/// a 10% error in one large entry or a flipped sign fails it (see
/// `grad_check_catches_wrong_gradients`), f32 noise does not. `RFT_GRADCHECK_VERBOSE=1`
/// prints every comparison above 30% of its tolerance.
#[allow(clippy::too_many_arguments)]
fn check(
    m: &CpuModel,
    lo: &LoraWeights,
    b: &[(Vec<u32>, usize)],
    o: &TrainOptions,
    c: &[f32],
    e: &[f32],
    p: Param,
    g: &[f32],
    report: &mut Vec<String>,
) -> f64 {
    let h = 1e-2f32;
    let (mut m2, mut lo2) = (CpuModel::new(m.config.clone(), m.weights.clone()), lo.clone());
    let gmax = g.iter().map(|x| x.abs()).fold(0.0f32, f32::max) as f64;
    let tol = |v: f64| 3e-2 * (v.abs() + 1e-2 * gmax) + 2e-4;
    let mut worst = 0.0f64;
    // The 3 largest entries, one by one.
    let mut idx: Vec<usize> = (0..g.len()).collect();
    // total_cmp puts NaN entries first, so they are among the ones checked.
    idx.sort_by(|&i, &j| g[j].abs().total_cmp(&g[i].abs()));
    for &i in idx.iter().take(3) {
        let orig = param_mut(&mut m2, &mut lo2, p)[i];
        param_mut(&mut m2, &mut lo2, p)[i] = orig + h;
        let lp = loss(&m2, &lo2, b, o, c, e);
        param_mut(&mut m2, &mut lo2, p)[i] = orig - h;
        let lm = loss(&m2, &lo2, b, o, c, e);
        param_mut(&mut m2, &mut lo2, p)[i] = orig;
        let fd = (lp - lm) / (2.0 * h as f64);
        let an = g[i] as f64;
        worst = worst.max((fd - an).abs() / tol(an));
        if std::env::var("RFT_GRADCHECK_VERBOSE").is_ok() && (fd - an).abs() / tol(an) > 0.3 {
            eprintln!(
                "  {p:?}[{i}] an {an:.5e} fd {fd:.5e} ratio {:.2}",
                (fd - an).abs() / tol(an)
            );
        }
        // A NaN gradient or loss is reported too (NaN > tol is false).
        if (fd - an).is_nan() || (fd - an).abs() > tol(an) {
            report.push(format!(
                "{p:?}[{i}]: analytic {an:.6e}, finite difference {fd:.6e}"
            ));
        }
    }
    // Directional derivative along a random sign vector. Every entry moves at once, so the
    // step's norm, not each entry's, must stay small (truncation error grows with the norm):
    // ‖step‖₂ ≤ 0.02 (5.6e-4 per entry for a 32×40 matrix). Measured on Mistral's layer-0
    // LoRA A of q: the error falls as step² (16%, 4%, 1%, 0.2% for norms 0.11, 0.057, 0.028,
    // 0.014), and f32 noise takes over below ~0.007.
    let mut rng = Rng(0xD1CE ^ g.len() as u64);
    let dir: Vec<f32> = (0..g.len())
        .map(|_| if rng.next() & 1 == 0 { 1.0 } else { -1.0 })
        .collect();
    let orig = param_mut(&mut m2, &mut lo2, p).clone();
    let hs = h.min(0.02 / (g.len() as f32).sqrt());
    *param_mut(&mut m2, &mut lo2, p) = orig.iter().zip(&dir).map(|(w, d)| w + hs * d).collect();
    let lp = loss(&m2, &lo2, b, o, c, e);
    *param_mut(&mut m2, &mut lo2, p) = orig.iter().zip(&dir).map(|(w, d)| w - hs * d).collect();
    let lm = loss(&m2, &lo2, b, o, c, e);
    let fd = (lp - lm) / (2.0 * hs as f64);
    let an: f64 = g.iter().zip(&dir).map(|(a, d)| *a as f64 * *d as f64).sum();
    let tol_d = 3e-2 * (an.abs() + 1e-2 * gmax) + 2e-4 * (h / hs) as f64; // f32 noise / step
    worst = worst.max((fd - an).abs() / tol_d);
    if std::env::var("RFT_GRADCHECK_VERBOSE").is_ok() && (fd - an).abs() / tol_d > 0.3 {
        eprintln!(
            "  {p:?} dir an {an:.5e} fd {fd:.5e} ratio {:.2}",
            (fd - an).abs() / tol_d
        );
    }
    if (fd - an).is_nan() || (fd - an).abs() > tol_d {
        report.push(format!(
            "{p:?} along ±1: analytic {an:.6e}, finite difference {fd:.6e}"
        ));
    }
    worst
}

fn grad_check(arch: Arch, full: bool, dropout: Option<LoraDropout>) {
    let (m, lora) = setup(arch, 3);
    let b = batch(m.config.vocab_size, 9, &SHAPE);
    let o = TrainOptions {
        temperature: 0.7,
        dropout,
        full_grads: full,
        ..Default::default()
    };
    let f = train::forward(&m, Some(&lora), &seqs(&b), &o);
    let (c, e) = coeffs(f.logp.len(), 11);
    let g = f.backward(&c, Some(&e));
    let mut report = vec![];
    let mut worst = 0.0f64;
    for p in params(&m.config, !full) {
        let gp = grad_of(&g, p);
        assert!(
            gp.iter().any(|x| x.abs() > 1e-4),
            "{arch:?} {p:?}: gradient is (almost) all zero"
        );
        worst = worst.max(check(&m, &lora, &b, &o, &c, &e, p, &gp, &mut report));
    }
    eprintln!(
        "{arch:?} full={full} dropout={}: worst |fd-an|/tol = {worst:.3}",
        dropout.is_some()
    );
    assert!(
        report.is_empty(),
        "{arch:?}: gradient mismatches:\n{}",
        report.join("\n")
    );
}

#[test]
fn lora_grads_match_finite_differences() {
    for arch in ARCHS {
        grad_check(arch, false, None);
    }
}

#[test]
fn lora_grads_with_dropout_match_finite_differences() {
    grad_check(Arch::Qwen3, false, Some(LoraDropout { p: 0.25, seed: 17 }));
}

#[test]
fn full_grads_match_finite_differences() {
    for arch in ARCHS {
        grad_check(arch, true, None);
    }
}

/// The checker itself can fail: a gradient 10% off in its largest entry, with its sign
/// flipped, or with a NaN entry, is reported.
#[test]
fn grad_check_catches_wrong_gradients() {
    let (m, lora) = setup(Arch::Llama, 3);
    let b = batch(m.config.vocab_size, 9, &SHAPE);
    let o = TrainOptions {
        temperature: 0.7,
        full_grads: true,
        ..Default::default()
    };
    let f = train::forward(&m, Some(&lora), &seqs(&b), &o);
    let (c, e) = coeffs(f.logp.len(), 11);
    let g = f.backward(&c, Some(&e));
    for p in [
        Param::LoraA(0, Proj::V),
        Param::LoraB(1, Proj::Down),
        Param::W(0, Proj::Q),
        Param::InNorm(1),
    ] {
        let good = grad_of(&g, p);
        let mut report = vec![];
        check(&m, &lora, &b, &o, &c, &e, p, &good, &mut report);
        assert!(report.is_empty(), "{report:?}");
        let mut bad = good.clone();
        let i = (0..bad.len())
            .max_by(|&i, &j| bad[i].abs().partial_cmp(&bad[j].abs()).unwrap())
            .unwrap();
        bad[i] *= 1.1;
        check(&m, &lora, &b, &o, &c, &e, p, &bad, &mut report);
        assert!(
            !report.is_empty(),
            "{p:?}: a 10% error in the largest entry went unnoticed"
        );
        let neg: Vec<f32> = good.iter().map(|x| -x).collect();
        let mut report = vec![];
        check(&m, &lora, &b, &o, &c, &e, p, &neg, &mut report);
        assert!(!report.is_empty(), "{p:?}: a sign flip went unnoticed");
        // A NaN entry (anywhere, here the last) is reported, not skipped by a comparison.
        let mut nan = good.clone();
        *nan.last_mut().unwrap() = f32::NAN;
        let mut report = vec![];
        check(&m, &lora, &b, &o, &c, &e, p, &nan, &mut report);
        assert!(!report.is_empty(), "{p:?}: a NaN gradient went unnoticed");
    }
}

/// Timing of forward + backward, 8 sequences × 48 tokens (32 completion each) on a tiny model;
/// at this larger shape too, layer recompute gives bit-identical log-probs and gradients.
#[test]
fn timing_tiny_batch() {
    let mut c = tiny(Arch::Qwen2);
    c.vocab_size = 512;
    c.hidden_size = 64;
    c.intermediate_size = 128;
    c.head_dim = 16;
    let m = CpuModel::new(c.clone(), Weights::random(&c, 4, 0.1));
    let lora = LoraWeights::new_random(lora_cfg(), &c, 5, 0.05, 0.05);
    let b = batch(c.vocab_size, 12, &[(48, 16); 8]);
    let mut results = vec![];
    for recompute in [Recompute::None, Recompute::Layer] {
        let o = TrainOptions {
            recompute,
            ..Default::default()
        };
        let t0 = std::time::Instant::now();
        let f = train::forward(&m, Some(&lora), &seqs(&b), &o);
        let t1 = t0.elapsed();
        let dl: Vec<f32> = f.logp.iter().map(|_| 1.0 / f.logp.len() as f32).collect();
        let logp = f.logp.clone();
        let g = f.backward(&dl, None);
        let t2 = t0.elapsed();
        eprintln!(
            "{recompute:?}: forward {:.1} ms, forward+backward {:.1} ms (8×48 tokens, D=64, L=2, V=512)",
            t1.as_secs_f64() * 1e3,
            t2.as_secs_f64() * 1e3
        );
        assert_eq!(logp.len(), 8 * 32);
        results.push((logp, flat_grads(&g)));
    }
    let grads = &results[0].1;
    assert!(grads.iter().any(|&x| x != 0.0), "the gradient is all zero");
    assert_eq!(
        results[0], results[1],
        "Recompute::Layer changed logp or gradients"
    );
}
