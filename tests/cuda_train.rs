//! The CUDA training step (src/cuda/train.rs) against the CPU training core
//! (`rft::trainer::step`), on every fixture model: token log-probs, loss and LoRA gradients of
//! one pass (every loss option), recompute on/off, micro-batching, the memory budget's
//! fallback layouts, the lm_head's vocabulary chunks, five optimiser steps, LoRA dropout (the masks bit for bit, and the pass with
//! dropout against the CPU's with the same step seed); full fine-tuning's gradients of every
//! weight and three optimiser steps.
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
//! - Full fine-tuning: every weight's gradient per tensor within max(0.05, 2 · HF's own
//!   full-gradient distance, 0.045–0.059 here: `full_tol`), the flat cosine ≥ COS_MIN (HF's
//!   own: ≥ 0.9990); the updates after a few steps as the LoRA ones (`update_tol`), for the
//!   matrices (see cuda_full_fine_tuning_steps_track_cpu).
//!
//! Without a usable GPU every test prints "skipping: <reason>" and passes; `RFT_REQUIRE_GPU=1`
//! makes that a failure.

mod common;

use common::{bf16_noise, device_or_skip, fixture_model, gpu_or_skip, uniform_vec};
use half::bf16;
use rft::cpu::model::CpuModel;
use rft::cpu::train::{dropout_factor, LoraDropout, Recompute};
use rft::cuda::train::all_linear;
use rft::cuda::{CudaEngine, CudaTrainer, LoraDropoutSite};
use rft::lora::LoraWeights;
use rft::loss::{GrpoLossConfig, KlEstimator, LossType};
use rft::model::config::ModelConfig;
use rft::model::weights::{Proj, Weights};
use rft::optim::{AdamW, AdamWState, LrSchedule, SchedulerType, Warmup};
use rft::trainer::{
    grpo_gradients, grpo_gradients_with_dropout, grpo_update, lora_params, weight_params, weight_params_mut,
    GrpoBatch, GrpoGradients, GrpoOptions, GrpoSeq, StepMetrics, TrainState,
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

/// The tolerance of full fine-tuning's gradients of every weight (top comment).
fn full_tol(name: &str) -> Tol {
    Tol {
        grad: (2.0 * bf16_noise(name).full_grad_rel_l2).max(0.05),
        ..tol(name)
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

/// One optimiser step of the GPU against the CPU's: loss within the loss tolerance of the
/// module comment, grad norm within 5%.
fn assert_step_tracks(step: usize, g: &StepMetrics, c: &StepMetrics) {
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
    compare_slices(what, tol, &lora_params(gpu), &lora_params(cpu), 0, COS_MIN);
}

/// [`compare_tensors`] of two models' weights (full fine-tuning's gradients or updates), in
/// `weight_params` order; tensors of fewer than `min_len` elements count in the cosine only
/// (which must reach `cos_min`).
fn compare_weights(what: &str, tol: Tol, gpu: &Weights, cpu: &Weights, min_len: usize, cos_min: f64) {
    compare_slices(
        what,
        tol,
        &weight_params(gpu),
        &weight_params(cpu),
        min_len,
        cos_min,
    );
}

fn compare_slices(what: &str, tol: Tol, g: &[&[f32]], c: &[&[f32]], min_len: usize, cos_min: f64) {
    assert_eq!(g.len(), c.len());
    let norm = |t: &[f32]| t.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let max_norm = c.iter().map(|t| norm(t)).fold(0f64, f64::max);
    let mut worst = 0f64;
    for (i, (gt, ct)) in g.iter().zip(c).enumerate() {
        if norm(ct) < 0.01 * max_norm || ct.len() < min_len {
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
    assert!(cos >= cos_min, "{what}: cosine {cos} < {cos_min}");
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
    compare_pass(name, label, &gpu, &cpu);
}

/// One pass's log-probs, loss, entropy and LoRA gradients, GPU against CPU (top comment).
fn compare_pass(name: &str, label: &str, gpu: &GrpoGradients, cpu: &GrpoGradients) {
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
fn cuda_memory_budget_falls_back_to_layouts_that_fit() {
    if !gpu_or_skip() {
        return;
    }
    let (model, mut engine) = models("qwen2");
    let nl = model.config.num_hidden_layers;
    let lora = adapter(&model.config);
    let b = batch(&model.config);
    let loss = GrpoLossConfig::default();
    let fresh = |engine: &mut CudaEngine| CudaTrainer::new(engine, &lora, &AdamWState::default()).unwrap();
    // The requested layout when nothing caps it: one micro-batch of 9, nothing recomputed.
    let mut tr = fresh(&mut engine);
    let whole = tr
        .grpo_gradients(&engine, &b, &opts(loss, 1, Recompute::None))
        .unwrap();
    let full_bytes = tr.plan().unwrap().total_bytes();
    assert_eq!(tr.last_stats.layout.micro_batch_seqs, 9);
    assert_eq!(tr.last_stats.layout.recompute, Recompute::None);
    assert_eq!(tr.last_stats.fitted_layout(), None);
    // A byte under it: the fixture's 9 short sequences are far under MIN_MICRO_BATCH_ROWS, so
    // the fallback is layer recompute at the same micro-batch, keeping as many layers as fit
    // (L − 1 kept is as large as none recomputed: L − 2). Same kernels, same order: same bits.
    let mut tr = fresh(&mut engine);
    tr.set_memory_budget(Some(full_bytes - 1));
    let kept = tr
        .grpo_gradients(&engine, &b, &opts(loss, 1, Recompute::None))
        .unwrap();
    let l = tr.last_stats.layout;
    assert_eq!(
        (l.micro_batch_seqs, l.recompute, l.keep_layers),
        (9, Recompute::Layer, nl.saturating_sub(2))
    );
    assert_eq!(tr.last_stats.fitted_layout(), Some(l));
    assert!(tr.plan().unwrap().total_bytes() < full_bytes);
    assert_eq!(whole.logp, kept.logp);
    assert_eq!(
        lora_params(whole.grads.lora.as_ref().unwrap()),
        lora_params(kept.grads.lora.as_ref().unwrap()),
        "the recompute fallback changed the gradients"
    );
    // Under every layout of 9 sequences: smaller micro-batches (other GEMM row counts, so
    // cuBLAS's summation order may differ: SAME_DEVICE).
    let mut probe = fresh(&mut engine);
    probe
        .grpo_gradients(&engine, &b, &opts(loss, 1, Recompute::Layer))
        .unwrap();
    let least_of_9 = probe.plan().unwrap().total_bytes();
    let mut tr = fresh(&mut engine);
    tr.set_memory_budget(Some(least_of_9 - 1));
    let cut = tr
        .grpo_gradients(&engine, &b, &opts(loss, 1, Recompute::None))
        .unwrap();
    let l = tr.last_stats.layout;
    eprintln!("cuda_train budget {} B: {l:?}", least_of_9 - 1);
    assert!(l.micro_batch_seqs < 9 && l.recompute == Recompute::Layer, "{l:?}");
    assert!(tr.plan().unwrap().total_bytes() < least_of_9);
    assert!(tr.last_stats.micro_batches >= 2);
    compare_tensors(
        "gradients",
        SAME_DEVICE,
        cut.grads.lora.as_ref().unwrap(),
        whole.grads.lora.as_ref().unwrap(),
    );
    // Nothing fits: a clear error naming the budget; the trainer still works after raising it.
    let mut tr = fresh(&mut engine);
    tr.set_memory_budget(Some(1 << 10));
    let e = tr
        .grpo_gradients(&engine, &b, &opts(loss, 1, Recompute::None))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("does not fit") && e.contains("max_train_memory_gib"),
        "{e}"
    );
    tr.set_memory_budget(None);
    let again = tr
        .grpo_gradients(&engine, &b, &opts(loss, 1, Recompute::None))
        .unwrap();
    assert_eq!(again.logp, whole.logp);
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
            assert_step_tracks(step, g, c);
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
    // LoRA dropout runs on the GPU (cuda_dropout_* below); a probability outside [0, 1) is refused.
    lora.config.dropout = 0.1;
    CudaTrainer::new(&mut engine, &lora, &AdamWState::default()).expect("dropout 0.1 is supported");
    lora.config.dropout = 1.0;
    let e = CudaTrainer::new(&mut engine, &lora, &AdamWState::default())
        .err()
        .expect("dropout 1 must be refused")
        .to_string();
    assert!(e.contains("dropout") && e.contains("[0, 1)"), "{e}");
    lora.config.dropout = 0.0;
    // A LoRA trainer does not do full fine-tuning, nor the reverse (each says what to use).
    let mut tr = CudaTrainer::new(&mut engine, &lora, &AdamWState::default()).unwrap();
    let b = batch(&model.config);
    let mut o = opts(GrpoLossConfig::default(), 1, Recompute::Layer);
    o.full_fine_tuning = true;
    let e = tr
        .grpo_gradients(&engine, &b, &o)
        .expect_err("a LoRA trainer must refuse full fine-tuning")
        .to_string();
    assert!(e.contains("new_full"), "{e}");
    let mut full = CudaTrainer::new_full(&mut engine, &model.weights, &AdamWState::default()).unwrap();
    o.full_fine_tuning = false;
    let e = full
        .grpo_gradients(&engine, &b, &o)
        .expect_err("a full fine-tuning trainer must refuse LoRA options")
        .to_string();
    assert!(e.contains("full fine-tuning"), "{e}");
    // No frozen reference model to compute a KL against.
    o.full_fine_tuning = true;
    o.loss.beta = 0.04;
    let e = full
        .grpo_gradients(&engine, &b, &o)
        .expect_err("β > 0 must be refused")
        .to_string();
    assert!(e.contains("beta"), "{e}");
    // Weights of another shape.
    let other = rft::cpu::engine::CpuEngine::load(&fixture_model("llama"))
        .unwrap()
        .model;
    let e = CudaTrainer::new_full(&mut engine, &other.weights, &AdamWState::default())
        .err()
        .expect("weights of another model must be refused")
        .to_string();
    assert!(e.contains("shape"), "{e}");
}

/// Full fine-tuning options: β = 0 (no frozen reference), `micro_batches`, `recompute`.
fn full_opts(micro_batches: usize, recompute: Recompute) -> GrpoOptions {
    GrpoOptions {
        full_fine_tuning: true,
        ..opts(GrpoLossConfig::default(), micro_batches, recompute)
    }
}

#[test]
fn cuda_full_fine_tuning_gradients_match_cpu_on_every_model() {
    if !gpu_or_skip() {
        return;
    }
    for name in MODELS {
        let (model, mut engine) = models(name);
        let b = batch(&model.config);
        // 2 micro-batches exercise the accumulation (cuBLAS beta = 1, the norms' partial sums,
        // the embedding's scatter into rows written by the other micro-batch).
        let o = full_opts(2, Recompute::Layer);
        let cpu = grpo_gradients(&model, None, &b, &o).unwrap();
        let mut tr = CudaTrainer::new_full(&mut engine, &model.weights, &AdamWState::default()).unwrap();
        assert!(tr.full_fine_tuning());
        assert_eq!(
            tr.num_params(),
            weight_params(&model.weights)
                .iter()
                .map(|t| t.len())
                .sum::<usize>()
        );
        let gpu = tr.grpo_gradients(&engine, &b, &o).unwrap();
        eprintln!("cuda_train {name} full fine-tuning:");
        let t = tol(name);
        let dl = compare_logp("logp", t, &gpu.logp, &cpu.logp);
        let ltol = 0.05 * cpu.loss.abs().max(1.0);
        eprintln!(
            "  loss gpu {} cpu {} (tol {ltol}), worst |Δlogp| {dl:.2e}",
            gpu.loss, cpu.loss
        );
        assert!((gpu.loss - cpu.loss).abs() <= ltol, "{name}: loss");
        assert!(gpu.grads.lora.is_none() && cpu.grads.lora.is_none());
        // Every weight's gradient within twice HF's own bf16 distance for the same (full)
        // gradients (`full_tol`), tensor by tensor; `COS_MIN` on the flat vector.
        compare_weights(
            "weight gradients",
            full_tol(name),
            gpu.grads.weights.as_ref().unwrap(),
            cpu.grads.weights.as_ref().unwrap(),
            0,
            COS_MIN,
        );
        if name == "qwen3" {
            // Saved activations vs recompute: the same kernels in the same order, identical bits.
            let saved = tr
                .grpo_gradients(&engine, &b, &full_opts(2, Recompute::None))
                .unwrap();
            assert_eq!(saved.logp, gpu.logp);
            assert_eq!(
                weight_params(saved.grads.weights.as_ref().unwrap()),
                weight_params(gpu.grads.weights.as_ref().unwrap()),
                "recompute changed the full fine-tuning gradients"
            );
        }
    }
}

#[test]
fn cuda_full_fine_tuning_steps_track_cpu() {
    if !gpu_or_skip() {
        return;
    }
    // qwen2: q/k/v biases (the rollout engine's stacked bias copies must follow the update);
    // qwen3: tied embeddings (the lm_head's gradient lands in the embedding) and q/k norms.
    for name in ["qwen2", "qwen3"] {
        let (mut model, mut engine) = models(name);
        let w0 = model.weights.clone();
        let b = batch(&model.config);
        // lr 1e-4, not the LoRA tests' 1e-2: AdamW moves every element by about lr a step, and
        // 1e-2 on every weight of these small models changes them so much a step that the two
        // trajectories part by chaos rather than by an error (grad norms 7% apart at step 3,
        // each step's own gradients still agreeing; log-probs moved by ~6 nats at 1e-3).
        let mut o = full_opts(2, Recompute::Layer);
        o.schedule = LrSchedule::new(SchedulerType::Constant, 1e-4, 5, Warmup::Steps(0)).unwrap();
        let (mut cpu_state, mut gpu_state) = (TrainState::new(5), TrainState::new(5));
        let mut tr = CudaTrainer::new_full(&mut engine, &w0, &AdamWState::default()).unwrap();
        eprintln!("cuda_train {name} full fine-tuning, three steps:");
        for step in 0..3 {
            let c = grpo_update(&mut model, None, &mut cpu_state, &b, &o).unwrap();
            let g = tr.grpo_update(&mut engine, &mut gpu_state, &b, &o).unwrap();
            let (c, g) = (&c[0], &g[0]);
            // As in cuda_five_steps_track_cpu (top comment: the loss within its logp error).
            assert_step_tracks(step, g, c);
            assert_eq!(g.skipped, c.skipped);
        }
        assert_eq!(gpu_state.adam.step, cpu_state.adam.step);
        let mut gpu_w = w0.clone();
        tr.download_weights(&engine, &mut gpu_w).unwrap();
        // The updates (the weights are dominated by the shared start), with the tolerance of
        // HF's own AdamW-update noise (`update_tol`: Adam moves elements whose gradient is
        // mostly rounding noise by ±lr either way, whatever the parameter).
        let delta = |w: &Weights| {
            let mut d = w.clone();
            for (x, x0) in weight_params_mut(&mut d).into_iter().zip(weight_params(&w0)) {
                for (v, v0) in x.iter_mut().zip(x0) {
                    *v -= v0;
                }
            }
            d
        };
        // k_proj's bias has no gradient in exact arithmetic (a shift of every key's score by
        // q·b, which the softmax ignores): both sides hold rounding noise there, which Adam
        // turns into ±lr steps of random sign. Left out of the comparison.
        let (mut dg, mut dc) = (delta(&gpu_w), delta(&model.weights));
        for d in [&mut dg, &mut dc] {
            for lw in &mut d.layers {
                lw.k.b.iter_mut().flatten().for_each(|x| *x = 0.0);
            }
        }
        // Per tensor only for the matrices: AdamW's first steps move each element by about ±lr,
        // so one element whose gradient is within rounding noise of 0 (signs differ) moves an
        // n-element tensor's relative L2 by 2/√n, 0.25 for the 64-element biases and norms of
        // these fixtures, the whole tolerance; their gradients are checked tensor by tensor in
        // cuda_full_fine_tuning_gradients_match_cpu_on_every_model. The flat update's cosine
        // bound is the one of that relative L2: two vectors of equal norm at relative distance
        // e have cosine 1 − e²/2.
        let ut = update_tol(name);
        let cos_min = 1.0 - ut.grad * ut.grad / 2.0;
        compare_weights("weight update after 3 steps", ut, &dg, &dc, 1024, cos_min);
        let mut adam = gpu_state.adam.clone();
        tr.download_adam(&engine, &mut adam).unwrap();
        assert_eq!(adam.m.len(), cpu_state.adam.m.len());
        let cos = cosine(&adam.m.concat(), &cpu_state.adam.m.concat());
        assert!(cos >= COS_MIN, "AdamW m cosine {cos}");
        // The rollout engine reads the updated weights (its own forward: stacked q|k|v and
        // gate|up GEMMs, stacked biases). Its scores equal those of a fresh engine made from the
        // downloaded weights (GPU vs GPU: SAME_DEVICE), and the CPU's log-probs of those weights
        // rounded to bf16 as the engine holds them (updates of ~lr are below bf16's resolution
        // of most weights: the CPU's own f32 model is not what any bf16 engine runs) within
        // the bf16 tolerance; and they moved by more than SAME_DEVICE since the start (so
        // stale weights would fail).
        use rft::engine::Engine;
        let mut fresh = CudaEngine::from_weights(model.config.clone(), &gpu_w, 0).unwrap();
        let (start, _) = models(name);
        let before = grpo_gradients(&start, None, &b, &o).unwrap();
        let mut trained = start;
        trained.weights = gpu_w.clone();
        for t in weight_params_mut(&mut trained.weights) {
            for x in t.iter_mut() {
                *x = half::bf16::from_f32(*x).to_f32();
            }
        }
        let after = grpo_gradients(&trained, None, &b, &o).unwrap();
        let (mut moved, mut vs_fresh, mut vs_cpu) = (0f32, 0f32, 0f32);
        for (i, s) in b
            .seqs
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.completion_ids.is_empty())
        {
            let seq = [(s.prompt_ids.clone(), s.completion_ids.clone())];
            let scored = engine.score(&seq, TEMP).unwrap();
            let reference = fresh.score(&seq, TEMP).unwrap();
            for (t, &a) in scored[0].iter().enumerate() {
                vs_fresh = vs_fresh.max((a - reference[0][t]).abs());
                vs_cpu = vs_cpu.max((a - after.logp[i][t]).abs());
                moved = moved.max((a - before.logp[i][t]).abs());
            }
        }
        eprintln!(
            "  rollout scores: vs a fresh engine {vs_fresh:.2e}, vs cpu {vs_cpu:.2e}, moved {moved:.2e}"
        );
        assert!(
            vs_fresh <= SAME_DEVICE.lp,
            "{name}: rollout engine vs fresh engine {vs_fresh}"
        );
        assert!(vs_cpu <= tol(name).lp, "{name}: rollout engine vs cpu {vs_cpu}");
        assert!(
            moved > 2.0 * SAME_DEVICE.lp,
            "{name}: the update moved the scores by {moved} only"
        );
    }
}

#[test]
fn cuda_dropout_masks_equal_the_cpu_bit_for_bit() {
    let Some(dev) = device_or_skip() else {
        return;
    };
    // x̃ = bf16(x · dropout_factor(...)) on a grid of (layer, projection, row, column): the mask
    // is an integer hash and an exact f32 compare, x·m one f32 product rounded once, so the
    // kernel must equal the CPU's value bit for bit (no tolerance). Shapes: 67 × 130 (rows and
    // columns past a block and a power of two), and 3000 × 3 (rows past 2^11, into the hash's
    // shifted row bits).
    let mut dropped = 0usize;
    let mut total = 0usize;
    for (n, d_in) in [(67usize, 130usize), (3000, 3)] {
        let x = uniform_vec(n * d_in, (n * 31 + d_in) as u64, -2.0, 2.0);
        for (p, seed) in [(0.1f32, 0x5EED_u64), (0.5, u64::MAX - 3)] {
            for layer in [0usize, 1, 27, 255] {
                for proj in Proj::ALL {
                    let d = LoraDropout { p, seed };
                    let got = dev
                        .lora_dropout_host(&x, LoraDropoutSite::new(&d, layer, proj), n, d_in)
                        .unwrap();
                    for (i, (&g, &xv)) in got.iter().zip(&x).enumerate() {
                        let (row, col) = (i / d_in, i % d_in);
                        let m = dropout_factor(&d, layer, proj, row, col);
                        let want = bf16::from_f32(bf16::from_f32(xv).to_f32() * m);
                        assert_eq!(
                            bf16::from_f32(g).to_bits(),
                            want.to_bits(),
                            "x̃ p {p} layer {layer} {proj:?} row {row} col {col}: gpu {g} cpu {want}"
                        );
                        dropped += (m == 0.0) as usize;
                        total += 1;
                    }
                }
            }
        }
    }
    // Half of the grid at p = 0.1, half at 0.5: about 30% dropped.
    let frac = dropped as f64 / total as f64;
    eprintln!("cuda_train dropout masks: {total} entries equal, {frac:.3} dropped");
    assert!((0.28..0.32).contains(&frac), "dropped fraction {frac}");

    // The masked input gradient: dx = dx_in + (s·(bf16(dy B) A)) ⊙ m. Dropped entries keep dx_in
    // bit for bit (dx_in + 0, rounded to bf16 again: itself); kept ones match an f64 oracle
    // (from the kernel's own bf16 dyb, so only the f32 accumulation and the final bf16 rounding
    // differ) within 2^-8 relative (one bf16 rounding) + 1e-6 absolute.
    let (n, d_in, d_out, r, s) = (150usize, 200usize, 72usize, 5usize, 1.75f32);
    let dy = uniform_vec(n * d_out, 1, -1.0, 1.0);
    let a = uniform_vec(r * d_in, 2, -0.5, 0.5);
    let b = uniform_vec(d_out * r, 3, -0.5, 0.5);
    let dx_in = uniform_vec(n * d_in, 4, -0.1, 0.1);
    let d = LoraDropout { p: 0.3, seed: 77 };
    let site = LoraDropoutSite::new(&d, 3, Proj::Down);
    let [dyb, dx] = dev
        .lora_train_bwd_dx_host(&dy, &a, &b, &dx_in, s, n, d_in, d_out, r, Some(site))
        .unwrap();
    let [dyb0, _] = dev
        .lora_train_bwd_dx_host(&dy, &a, &b, &dx_in, s, n, d_in, d_out, r, None)
        .unwrap();
    assert_eq!(dyb, dyb0, "dyb does not depend on the mask");
    let a_bf = common::bf(&a);
    let mut kept = 0;
    for row in 0..n {
        for col in 0..d_in {
            let i = row * d_in + col;
            let m = dropout_factor(&d, 3, Proj::Down, row, col);
            let base = bf16::from_f32(dx_in[i]).to_f32();
            if m == 0.0 {
                assert_eq!(dx[i].to_bits(), base.to_bits(), "dropped dx row {row} col {col}");
                continue;
            }
            kept += 1;
            let t: f64 = (0..r)
                .map(|j| dyb[row * r + j] as f64 * a_bf[j * d_in + col] as f64)
                .sum();
            let want = base as f64 + s as f64 * t * m as f64;
            let err = (dx[i] as f64 - want).abs();
            assert!(
                err <= want.abs() / 256.0 + 1e-6,
                "kept dx row {row} col {col}: gpu {} want {want}",
                dx[i]
            );
        }
    }
    assert!(
        kept > n * d_in / 2 && kept < n * d_in,
        "kept {kept} of {}",
        n * d_in
    );
}

/// The fixture adapter with LoRA dropout p.
fn dropout_adapter(c: &ModelConfig, p: f32) -> LoraWeights {
    let mut l = adapter(c);
    l.config.dropout = p;
    l
}

#[test]
fn cuda_dropout_gradients_match_cpu_on_every_model() {
    if !gpu_or_skip() {
        return;
    }
    // The same step seed on both sides: the same masks (the packed rows are the CPU's stacked
    // rows, packed_batch_matches_the_cpu_layout), so the oracle and tolerances are those of
    // cuda_gradients_match_cpu_on_every_model (top comment): only the GPU's bf16 activations
    // differ. p = 0.1 on every model (β > 0: the reference pass has no adapter; 2 micro-batches:
    // seed + micro-batch index), p = 0.5 with saved activations on qwen2.
    let seed = TrainState::new(7).dropout_seed();
    let loss = GrpoLossConfig {
        beta: 0.04,
        ..Default::default()
    };
    let cases: Vec<(&str, f32, Recompute)> = MODELS
        .iter()
        .map(|&m| (m, 0.1, Recompute::Layer))
        .chain([("qwen2", 0.5, Recompute::None)])
        .collect();
    for (name, p, recompute) in cases {
        let (model, mut engine) = models(name);
        let lora = dropout_adapter(&model.config, p);
        let b = batch(&model.config);
        let o = opts(loss, 2, recompute);
        let cpu = grpo_gradients_with_dropout(&model, Some(&lora), &b, &o, seed).unwrap();
        // The masks matter: without them the CPU's gradients are further from these than the
        // tolerance, so a GPU that ignored dropout (or used other masks) would fail.
        let plain = grpo_gradients(&model, Some(&lora), &b, &o).unwrap();
        let moved = rel_l2(
            &lora_params(plain.grads.lora.as_ref().unwrap()).concat(),
            &lora_params(cpu.grads.lora.as_ref().unwrap()).concat(),
        );
        assert!(
            moved > tol(name).grad,
            "{name} p {p}: dropout moves the gradients by only {moved:.3}"
        );
        let mut tr = CudaTrainer::new(&mut engine, &lora, &AdamWState::default()).unwrap();
        let gpu = tr.grpo_gradients_with_dropout(&engine, &b, &o, seed).unwrap();
        let label = format!("dropout p={p} {recompute:?}, dapo β=0.04 k3, 2 micro-batches");
        eprintln!("cuda_train {name} {label} (no-dropout gradients {moved:.3} away):");
        compare_pass(name, &label, &gpu, &cpu);
        // The reference pass never sees the adapter, the old-logp pass no dropout: the
        // reference log-probs equal the no-dropout pass's (same GPU kernels, same bits).
        let gpu_plain = tr.grpo_gradients(&engine, &b, &o).unwrap();
        assert_eq!(
            gpu.ref_logp, gpu_plain.ref_logp,
            "{name}: reference pass saw dropout"
        );
    }
}

#[test]
fn cuda_dropout_recompute_is_bit_identical_and_steps_track_cpu() {
    if !gpu_or_skip() {
        return;
    }
    let (mut model, mut engine) = models("qwen2");
    let lora = dropout_adapter(&model.config, 0.1);
    let b = batch(&model.config);
    let seed = TrainState::new(3).dropout_seed();
    let loss = GrpoLossConfig::default();
    let mut tr = CudaTrainer::new(&mut engine, &lora, &AdamWState::default()).unwrap();
    let saved = tr
        .grpo_gradients_with_dropout(&engine, &b, &opts(loss, 2, Recompute::None), seed)
        .unwrap();
    let recomputed = tr
        .grpo_gradients_with_dropout(&engine, &b, &opts(loss, 2, Recompute::Layer), seed)
        .unwrap();
    // The recomputed forward regenerates the forward's masks: identical bits.
    assert_eq!(saved.logp, recomputed.logp);
    assert_eq!(
        lora_params(saved.grads.lora.as_ref().unwrap()),
        lora_params(recomputed.grads.lora.as_ref().unwrap()),
        "recompute with dropout changed the gradients"
    );
    // Another seed, other masks.
    let other = tr
        .grpo_gradients_with_dropout(&engine, &b, &opts(loss, 2, Recompute::Layer), seed ^ 1)
        .unwrap();
    assert_ne!(other.logp, saved.logp, "the seed does not reach the masks");

    // Two optimiser steps (each its own step seed, TrainState::dropout_seed) with dropout:
    // loss and grad norm track the CPU's as in cuda_five_steps_track_cpu.
    let o = opts(loss, 2, Recompute::Layer);
    let (mut cpu_lora, mut cpu_state) = (lora.clone(), TrainState::new(5));
    let mut gpu_state = TrainState::new(5);
    let mut tr = CudaTrainer::new(&mut engine, &lora, &AdamWState::default()).unwrap();
    eprintln!("cuda_train qwen2 dropout steps:");
    for step in 0..2 {
        let c = grpo_update(&mut model, Some(&mut cpu_lora), &mut cpu_state, &b, &o).unwrap();
        let g = tr.grpo_update(&mut engine, &mut gpu_state, &b, &o).unwrap();
        let (c, g) = (&c[0], &g[0]);
        assert_step_tracks(step, g, c);
    }
}
