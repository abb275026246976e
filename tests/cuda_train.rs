//! The CUDA training step (src/cuda/train.rs) against the CPU training core
//! (`rft::trainer::step`), on every fixture model: token log-probs, loss and LoRA gradients of
//! one pass (every loss option), recompute on/off, micro-batching, the lm_head's vocabulary
//! chunks, and five optimiser steps.
//!
//! Both sides use the SAME bf16-rounded weights (the CPU model is rounded before the engine is
//! built from it), so what differs is only the CUDA side's bf16 activations: every stored
//! activation is rounded to 8 significant bits (relative 2^-9 ≈ 2e-3), a few dozen stores per
//! layer. The tolerances are derived from Hugging Face's own bf16-vs-f32 distance on the same
//! fixture (tests/fixtures/models/NAME/bf16_noise.json, scripts/make_bf16_noise.py): rft must be
//! within twice it (`Tol`). An implementation error (a missing LoRA path, a transposed GEMM, a
//! wrong RoPE sign) moves log-probs by O(1) and gradients by O(100%).
//! - Log-probs: |Δlogp| ≤ Tol::lp = 2 · HF's teacher-forced log-prob distance / T (T = 0.9
//!   divides the logits and their errors).
//! - LoRA gradients: per tensor (norm ≥ 1% of the largest) relative L2 ≤ Tol::grad =
//!   max(0.05, 2 · HF's, which is 0.048–0.063 here). The adapter's change after five AdamW steps:
//!   Tol::update = max(0.05, 2 · HF's own five-step distance, 0.11–0.14 here: Adam divides each
//!   element by its own gradient scale, so elements whose gradient is mostly rounding noise
//!   move by ±lr either way). Cosine of the flat gradient ≥ COS_MIN = 0.995 (HF's own: ≥ 0.9991).
//! - GPU vs GPU (recompute, micro-batches, vocabulary chunks): bits where the kernels and their
//!   order are the same, else cuBLAS's summation order only: SAME_DEVICE (0.05 relative L2).
//! - The loss is a weighted mean of per-token terms, each within its logp error times |A|
//!   (≤ ~2): |Δloss| ≤ 0.05 · max(1, |loss|).
//!
//! Without a usable GPU every test prints "skipping: <reason>" and passes; `RFT_REQUIRE_GPU=1`
//! makes that a failure.

mod common;

use common::{bf16_noise, fixture_model, gpu_or_skip};
use rft::cpu::model::CpuModel;
use rft::cpu::train::Recompute;
use rft::cuda::train::all_linear;
use rft::cuda::{CudaEngine, CudaTrainer};
use rft::lora::LoraWeights;
use rft::loss::{GrpoLossConfig, KlEstimator, LossType};
use rft::model::config::ModelConfig;
use rft::optim::{AdamW, AdamWState, LrSchedule, SchedulerType, Warmup};
use rft::trainer::{
    grpo_gradients, grpo_update, lora_params, weight_params_mut, GrpoBatch, GrpoOptions, GrpoSeq, TrainState,
};

const MODELS: [&str; 4] = ["llama", "qwen2", "qwen3", "mistral"];
const COS_MIN: f64 = 0.995;
/// The sampling temperature of every pass here.
const TEMP: f32 = 0.9;

/// Per-model tolerances from HF's bf16 noise (top comment).
#[derive(Clone, Copy, Debug)]
struct Tol {
    lp: f32,
    grad: f64,
}

/// GPU against GPU: the same kernels, only cuBLAS's summation order may differ.
const SAME_DEVICE: Tol = Tol { lp: 0.05, grad: 0.05 };

fn tol(name: &str) -> Tol {
    let n = bf16_noise(name);
    Tol {
        lp: 2.0 * n.logprob / TEMP,
        grad: (2.0 * n.lora_grad_rel_l2).max(0.05),
    }
}

/// The tolerance of the adapter's change after five AdamW steps (top comment).
fn update_tol(name: &str) -> Tol {
    Tol {
        grad: (2.0 * bf16_noise(name).adam5_update_rel_l2).max(0.05),
        ..tol(name)
    }
}

/// The fixture model with bf16-rounded weights (CPU), and a CUDA engine of the same weights.
fn models(name: &str) -> (CpuModel, CudaEngine) {
    let dir = fixture_model(name);
    let cpu = rft::cpu::engine::CpuEngine::load(&dir).unwrap_or_else(|e| panic!("{name}: CPU load: {e}"));
    let mut model = cpu.model;
    for t in weight_params_mut(&mut model.weights) {
        for x in t.iter_mut() {
            *x = half::bf16::from_f32(*x).to_f32();
        }
    }
    let gpu = CudaEngine::from_weights(model.config.clone(), &model.weights, 0)
        .unwrap_or_else(|e| panic!("{name}: CUDA engine: {e}"));
    (model, gpu)
}

/// A rank-4 adapter on every projection with non-zero A and B (every backward term is live).
fn adapter(c: &ModelConfig) -> LoraWeights {
    LoraWeights::new_random(all_linear(4), c, 11, 0.05, 0.05)
}

/// 3 groups × G = 3, prompts of 1..9 tokens, completions of 0..12 tokens (one empty), rewards
/// with one zero-std group.
fn batch(c: &ModelConfig) -> GrpoBatch {
    let v = c.vocab_size as u64;
    let mut s = 0x1234_5678u64;
    let mut rnd = move |m: u64| {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s % m
    };
    let mut seqs = Vec::new();
    for g in 0..3 {
        let prompt: Vec<u32> = (0..1 + 4 * g).map(|_| rnd(v) as u32).collect();
        for k in 0..3 {
            let len = if g == 1 && k == 0 {
                0
            } else {
                1 + (rnd(12) as usize)
            };
            seqs.push(GrpoSeq {
                prompt_ids: prompt.clone(),
                completion_ids: (0..len).map(|_| rnd(v) as u32).collect(),
                old_logp: None,
            });
        }
    }
    GrpoBatch {
        seqs,
        group_size: 3,
        rewards: vec![1.0, 0.0, 0.5, 1.0, 1.0, 1.0, 0.0, 0.25, 1.0],
        advantages: None,
    }
}

fn opts(loss: GrpoLossConfig, micro_batches: usize, recompute: Recompute) -> GrpoOptions {
    GrpoOptions {
        loss,
        gradient_accumulation_steps: micro_batches,
        recompute,
        temperature: TEMP,
        optimizer: AdamW {
            lr: 1e-2,
            weight_decay: 0.01,
            ..AdamW::default()
        },
        schedule: LrSchedule::new(SchedulerType::Constant, 1e-2, 5, Warmup::Steps(0)).unwrap(),
        ..GrpoOptions::default()
    }
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let (mut d, mut n) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        d += (*x as f64 - *y as f64).powi(2);
        n += (*y as f64).powi(2);
    }
    (d / n.max(1e-30)).sqrt()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        ab += *x as f64 * *y as f64;
        aa += (*x as f64).powi(2);
        bb += (*y as f64).powi(2);
    }
    ab / (aa.sqrt() * bb.sqrt()).max(1e-30)
}

/// Compares two adapters' tensors (gradients or weights): per-tensor relative L2 for tensors
/// whose norm is at least 1% of the largest, and the cosine of the flat vectors.
fn compare_tensors(what: &str, tol: Tol, gpu: &LoraWeights, cpu: &LoraWeights) {
    let (g, c) = (lora_params(gpu), lora_params(cpu));
    assert_eq!(g.len(), c.len());
    let norm = |t: &[f32]| t.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let max_norm = c.iter().map(|t| norm(t)).fold(0f64, f64::max);
    let mut worst = 0f64;
    for (i, (gt, ct)) in g.iter().zip(&c).enumerate() {
        if norm(ct) < 0.01 * max_norm {
            continue;
        }
        let e = rel_l2(gt, ct);
        worst = worst.max(e);
        assert!(
            e <= tol.grad,
            "{what}: tensor {i} relative L2 error {e:.4} > {}",
            tol.grad
        );
    }
    let cos = cosine(&g.concat(), &c.concat());
    eprintln!("  {what}: worst tensor rel L2 {worst:.2e}, cosine {cos:.6}");
    assert!(cos >= COS_MIN, "{what}: cosine {cos} < {COS_MIN}");
}

fn compare_logp(what: &str, tol: Tol, gpu: &[Vec<f32>], cpu: &[Vec<f32>]) -> f32 {
    assert_eq!(gpu.len(), cpu.len(), "{what}: sequence count");
    let mut worst = 0f32;
    for (s, (g, c)) in gpu.iter().zip(cpu).enumerate() {
        assert_eq!(g.len(), c.len(), "{what}: sequence {s} token count");
        for (t, (a, b)) in g.iter().zip(c).enumerate() {
            let d = (a - b).abs();
            assert!(
                d <= tol.lp,
                "{what}: sequence {s} token {t}: gpu {a} cpu {b} (tolerance {})",
                tol.lp
            );
            worst = worst.max(d);
        }
    }
    worst
}

fn check_pass(name: &str, label: &str, opts: &GrpoOptions) {
    let (model, mut engine) = models(name);
    let lora = adapter(&model.config);
    let b = batch(&model.config);
    let cpu = grpo_gradients(&model, Some(&lora), &b, opts).unwrap();
    let mut tr = CudaTrainer::new(&mut engine, &lora, &AdamWState::default()).unwrap();
    let gpu = tr.grpo_gradients(&engine, &b, opts).unwrap();
    eprintln!("cuda_train {name} {label}:");
    let t = tol(name);
    let dl = compare_logp("logp", t, &gpu.logp, &cpu.logp);
    if let (Some(g), Some(c)) = (&gpu.ref_logp, &cpu.ref_logp) {
        compare_logp("ref_logp", t, g, c);
    }
    assert_eq!(gpu.ref_logp.is_some(), cpu.ref_logp.is_some());
    let tol = 0.05 * cpu.loss.abs().max(1.0);
    eprintln!(
        "  loss gpu {} cpu {} (tol {tol}), worst |Δlogp| {dl:.2e}",
        gpu.loss, cpu.loss
    );
    assert!((gpu.loss - cpu.loss).abs() <= tol, "{label}: loss");
    assert_eq!(gpu.metrics.num_tokens, cpu.metrics.num_tokens);
    assert!((gpu.entropy - cpu.entropy).abs() <= 0.05 * cpu.entropy.abs().max(1.0));
    compare_tensors(
        "LoRA gradients",
        t,
        gpu.grads.lora.as_ref().unwrap(),
        cpu.grads.lora.as_ref().unwrap(),
    );
}

#[test]
fn cuda_gradients_match_cpu_on_every_model() {
    if !gpu_or_skip() {
        return;
    }
    for name in MODELS {
        // β > 0 with k3 exercises the adapter-off reference pass; 2 micro-batches the
        // accumulation.
        let loss = GrpoLossConfig {
            beta: 0.04,
            ..Default::default()
        };
        check_pass(
            name,
            "dapo β=0.04 k3, 2 micro-batches",
            &opts(loss, 2, Recompute::Layer),
        );
    }
}

#[test]
fn cuda_gradients_match_cpu_for_every_loss_option() {
    if !gpu_or_skip() {
        return;
    }
    let cases: Vec<(&str, GrpoLossConfig, usize)> = vec![
        (
            "grpo",
            GrpoLossConfig {
                loss_type: LossType::Grpo,
                ..Default::default()
            },
            1,
        ),
        (
            "dr_grpo k1 β=0.1",
            GrpoLossConfig {
                loss_type: LossType::DrGrpo,
                beta: 0.1,
                kl_estimator: KlEstimator::K1,
                max_completion_length: 16,
                ..Default::default()
            },
            1,
        ),
        (
            "dapo ε_high=0.28",
            GrpoLossConfig {
                epsilon_high: Some(0.28),
                ..Default::default()
            },
            3,
        ),
    ];
    for (label, loss, mb) in cases {
        check_pass("qwen2", label, &opts(loss, mb, Recompute::None));
    }
    // num_iterations > 1: old log-probs from the current policy (ratio = 1 on the first pass).
    let mut o = opts(GrpoLossConfig::default(), 1, Recompute::Layer);
    o.num_iterations = 2;
    check_pass("qwen3", "num_iterations 2", &o);
}

#[test]
fn cuda_recompute_is_bit_identical_and_micro_batches_add_up() {
    if !gpu_or_skip() {
        return;
    }
    let (model, mut engine) = models("qwen2");
    let lora = adapter(&model.config);
    let b = batch(&model.config);
    let mut tr = CudaTrainer::new(&mut engine, &lora, &AdamWState::default()).unwrap();
    let loss = GrpoLossConfig::default();
    let saved = tr
        .grpo_gradients(&engine, &b, &opts(loss, 2, Recompute::None))
        .unwrap();
    let recomputed = tr
        .grpo_gradients(&engine, &b, &opts(loss, 2, Recompute::Layer))
        .unwrap();
    // The same kernels in the same order on the same rows: identical bits.
    assert_eq!(saved.logp, recomputed.logp);
    assert_eq!(
        lora_params(saved.grads.lora.as_ref().unwrap()),
        lora_params(recomputed.grads.lora.as_ref().unwrap()),
        "recompute changed the gradients"
    );
    // Layer recompute keeping the last layer's activations (a kept set and the scratch set;
    // the first layer recomputed): the same bits again. A fresh trainer, since a plan that
    // keeps more layers is reused as it is.
    let mut partial = CudaTrainer::new(&mut engine, &lora, &AdamWState::default()).unwrap();
    partial.set_keep_layers(1);
    let kept = partial
        .grpo_gradients(&engine, &b, &opts(loss, 2, Recompute::Layer))
        .unwrap();
    let plan = partial.plan().unwrap();
    assert_eq!((plan.kept_layers, plan.saved_layers), (1, 2));
    assert_eq!(saved.logp, kept.logp);
    assert_eq!(
        lora_params(saved.grads.lora.as_ref().unwrap()),
        lora_params(kept.grads.lora.as_ref().unwrap()),
        "keeping the last layer changed the gradients"
    );
    // One micro-batch vs two: the GEMMs see other row counts (cuBLAS may pick other kernels),
    // so equality holds to bf16 rounding, not bits.
    let whole = tr
        .grpo_gradients(&engine, &b, &opts(loss, 1, Recompute::Layer))
        .unwrap();
    eprintln!("cuda_train micro-batches 1 vs 2:");
    compare_tensors(
        "gradients",
        SAME_DEVICE,
        whole.grads.lora.as_ref().unwrap(),
        saved.grads.lora.as_ref().unwrap(),
    );
}

#[test]
fn cuda_vocabulary_chunks_merge_like_one_pass() {
    if !gpu_or_skip() {
        return;
    }
    // The fixtures' vocabularies fit one default chunk; chunks of 7 and 61 columns exercise the
    // online-softmax merge (targets in the first, a middle and the last, partial chunk).
    for name in ["qwen2", "llama"] {
        let (model, mut engine) = models(name);
        let lora = adapter(&model.config);
        let b = batch(&model.config);
        let o = opts(GrpoLossConfig::default(), 2, Recompute::Layer);
        let mut tr = CudaTrainer::new(&mut engine, &lora, &AdamWState::default()).unwrap();
        let one = tr.grpo_gradients(&engine, &b, &o).unwrap();
        for vc in [7, 61] {
            tr.set_vocab_chunk(vc);
            let chunked = tr.grpo_gradients(&engine, &b, &o).unwrap();
            eprintln!("cuda_train {name} vocabulary chunks of {vc}:");
            // Only the f32 merge algebra (and per-chunk GEMM kernels) differ: logits agree to
            // f32 rounding, so log-probs to ~1e-5; gradients see the bf16 rounding of dlogits.
            for (g, c) in chunked.logp.iter().flatten().zip(one.logp.iter().flatten()) {
                assert!((g - c).abs() <= 1e-4, "logp {g} vs one pass {c}");
            }
            assert!((chunked.entropy - one.entropy).abs() <= 1e-4);
            compare_tensors(
                "gradients vs one chunk",
                SAME_DEVICE,
                chunked.grads.lora.as_ref().unwrap(),
                one.grads.lora.as_ref().unwrap(),
            );
        }
    }
}

#[test]
fn cuda_five_steps_track_cpu() {
    if !gpu_or_skip() {
        return;
    }
    for name in ["qwen2", "llama"] {
        let (mut model, mut engine) = models(name);
        let lora0 = adapter(&model.config);
        let b = batch(&model.config);
        let o = opts(
            GrpoLossConfig {
                beta: 0.04,
                ..Default::default()
            },
            2,
            Recompute::Layer,
        );
        let (mut cpu_lora, mut cpu_state) = (lora0.clone(), TrainState::new(5));
        let mut gpu_state = TrainState::new(5);
        let mut tr = CudaTrainer::new(&mut engine, &lora0, &AdamWState::default()).unwrap();
        eprintln!("cuda_train {name} five steps:");
        for step in 0..5 {
            let c = grpo_update(&mut model, Some(&mut cpu_lora), &mut cpu_state, &b, &o).unwrap();
            let g = tr.grpo_update(&mut engine, &mut gpu_state, &b, &o).unwrap();
            let (c, g) = (&c[0], &g[0]);
            eprintln!(
                "  step {step}: loss gpu {:.5} cpu {:.5}, grad_norm gpu {:.4} cpu {:.4}",
                g.loss, c.loss, g.grad_norm, c.grad_norm
            );
            assert!(
                (g.loss - c.loss).abs() <= 0.05 * c.loss.abs().max(1.0),
                "step {step} loss"
            );
            assert!(
                (g.grad_norm - c.grad_norm).abs() <= 0.05 * c.grad_norm.max(1e-3),
                "step {step} grad norm"
            );
            assert_eq!(g.skipped, c.skipped);
        }
        assert_eq!(gpu_state.step, cpu_state.step);
        assert_eq!(gpu_state.adam.step, cpu_state.adam.step);
        let mut gpu_lora = lora0.clone();
        tr.download_lora(&engine, &mut gpu_lora).unwrap();
        // The updates (not the weights, which are dominated by the shared start).
        let delta = |a: &LoraWeights| {
            let mut d = a.clone();
            for (x, x0) in rft::trainer::lora_params_mut(&mut d)
                .into_iter()
                .zip(lora_params(&lora0))
            {
                for (v, v0) in x.iter_mut().zip(x0) {
                    *v -= v0;
                }
            }
            d
        };
        compare_tensors(
            "adapter update after 5 steps",
            update_tol(name),
            &delta(&gpu_lora),
            &delta(&cpu_lora),
        );
        let mut adam = gpu_state.adam.clone();
        tr.download_adam(&engine, &mut adam).unwrap();
        assert_eq!(adam.m.len(), cpu_state.adam.m.len());
        let cos = cosine(&adam.m.concat(), &cpu_state.adam.m.concat());
        assert!(cos >= COS_MIN, "AdamW m cosine {cos}");
        // The rollout engine samples from the updated adapter: its scores equal the trainer's
        // log-probs of the new policy (both bf16 paths, same weights).
        use rft::engine::Engine;
        let s = &b.seqs[0];
        let scored = engine
            .score(&[(s.prompt_ids.clone(), s.completion_ids.clone())], TEMP)
            .unwrap();
        let cpu_after = grpo_gradients(&model, Some(&cpu_lora), &b, &o).unwrap();
        for (a, c) in scored[0].iter().zip(&cpu_after.logp[0]) {
            assert!(
                (a - c).abs() <= tol(name).lp,
                "rollout adapter after the update: {a} vs {c}"
            );
        }
    }
}

#[test]
fn cuda_trainer_rejects_what_it_does_not_support() {
    if !gpu_or_skip() {
        return;
    }
    let (model, mut engine) = models("qwen2");
    let mut lora = adapter(&model.config);
    lora.config.dropout = 0.1;
    let e = CudaTrainer::new(&mut engine, &lora, &AdamWState::default())
        .err()
        .expect("dropout must be refused")
        .to_string();
    assert!(e.contains("dropout"), "{e}");
    lora.config.dropout = 0.0;
    let mut tr = CudaTrainer::new(&mut engine, &lora, &AdamWState::default()).unwrap();
    let mut o = opts(GrpoLossConfig::default(), 1, Recompute::Layer);
    o.full_fine_tuning = true;
    let e = tr
        .grpo_gradients(&engine, &batch(&model.config), &o)
        .expect_err("full fine-tuning must be refused")
        .to_string();
    assert!(e.contains("full fine-tuning"), "{e}");
}
