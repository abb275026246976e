//! The GRPO update path (`rft::trainer::grpo_gradients`) against PyTorch + peft float64
//! autograd (tests/fixtures/train/*, see its README): advantages, policy and reference
//! log-probs, the loss and every LoRA gradient, for each loss type / KL estimator / rsLoRA /
//! on-policy case; and the same gradients from micro-batches of 1 and 4 sequences.
//!
//! Tolerances. The fixture is a true f64 forward; rft computes in f32 over a 2-layer model.
//! f32 has a unit roundoff of 6e-8; a 64-wide model accumulates O(√K · u) per dot product and
//! a handful of layers of such error, which is what the fixture README measures on log-probs
//! (~4e-6 between the f32 and the f64 model). Log-probs and advantages are therefore checked
//! to 1e-4 absolute, and the loss and each gradient tensor to 1e-4 relative to the tensor's
//! largest entry (an entry-wise relative test would fail on entries that are ~0 by
//! cancellation). The measured errors, printed with `--nocapture`, are 1-2 orders below.

use rft::cpu::engine::CpuEngine;
use rft::cpu::model::CpuModel;
use rft::lora::peft::{self, peft_key};
use rft::lora::LoraWeights;
use rft::loss::GrpoLossConfig;
use rft::model::weights::Checkpoint;
use rft::trainer::{grpo_gradients, GrpoBatch, GrpoGradients, GrpoOptions, GrpoSeq};
use serde_json::Value;
use std::path::PathBuf;

const CASES: [&str; 6] = [
    "qwen2_grpo_k3",
    "qwen2_dapo_k3",
    "llama_grpo_k3",
    "llama_drgrpo_k1",
    "qwen2_rslora_dapo_k3",
    "qwen2_dapo_onpolicy_beta0",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

struct Case {
    exp: Value,
    model: CpuModel,
    lora: LoraWeights,
    batch: GrpoBatch,
    opts: GrpoOptions,
    dir: PathBuf,
}

fn load_case(name: &str) -> Case {
    let dir = root().join("tests/fixtures/train").join(name);
    let exp: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let model = CpuEngine::load(&root().join(exp["model"].as_str().unwrap()))
        .unwrap()
        .model;
    let lora = peft::load(&dir, &model.config).unwrap();
    let o = &exp["options"];
    let loss: GrpoLossConfig = serde_json::from_value(o.clone()).unwrap();
    let num_iterations = o["num_iterations"].as_u64().unwrap() as usize;
    let b = &exp["batch"];
    let seqs: Vec<GrpoSeq> = b["sequences"]
        .as_array()
        .unwrap()
        .iter()
        .zip(exp["old_logp"].as_array().unwrap())
        .map(|(s, old)| GrpoSeq {
            prompt_ids: u32s(&s["prompt_ids"]),
            completion_ids: u32s(&s["completion_ids"]),
            old_logp: Some(f32s(old)),
        })
        .collect();
    let batch = GrpoBatch {
        seqs,
        group_size: b["num_generations"].as_u64().unwrap() as usize,
        rewards: f32s(&b["rewards"]),
        advantages: None,
    };
    let opts = GrpoOptions {
        loss,
        scale_rewards: serde_json::from_value(o["scale_rewards"].clone()).unwrap(),
        num_iterations,
        temperature: o["temperature"].as_f64().unwrap() as f32,
        ..Default::default()
    };
    Case {
        exp,
        model,
        lora,
        batch,
        opts,
        dir,
    }
}

/// max(m, x) that keeps a NaN (`f64::max` returns the other argument, so a NaN log-prob or
/// gradient would pass every `< tol` check below).
fn nan_max(m: f64, x: f64) -> f64 {
    if x.is_nan() || x > m {
        x
    } else {
        m
    }
}

/// max |a − b| over two ragged lists.
fn max_abs_ragged(a: &[Vec<f32>], b: &Value) -> f64 {
    let b = b.as_array().unwrap();
    assert_eq!(a.len(), b.len());
    let mut m = 0f64;
    for (x, y) in a.iter().zip(b) {
        let y = y.as_array().unwrap();
        assert_eq!(x.len(), y.len());
        for (p, q) in x.iter().zip(y) {
            m = nan_max(m, (*p as f64 - q.as_f64().unwrap()).abs());
        }
    }
    m
}

/// For each LoRA tensor: (key, max |g − e| / max |e|).
fn grad_errors(g: &GrpoGradients, expected: &Checkpoint, lora: &LoraWeights) -> Vec<(String, f64)> {
    let gl = g.grads.lora.as_ref().unwrap();
    let r = lora.config.r;
    let mut out = vec![];
    for (l, slot) in gl.layers.iter().enumerate() {
        for p in rft::model::weights::Proj::ALL {
            let Some(pair) = &slot[p as usize] else { continue };
            for (which, got, shape) in [
                ("lora_A", &pair.a, [r, pair.a.len() / r]),
                ("lora_B", &pair.b, [pair.b.len() / r, r]),
            ] {
                let key = peft_key(l, p, which);
                let e = expected.read_f32(&key, &shape).unwrap();
                let scale = e.iter().fold(0f64, |m, &x| m.max((x as f64).abs()));
                assert!(scale > 0.0, "{key}: expected gradient is all zero");
                let err = got
                    .iter()
                    .zip(&e)
                    .fold(0f64, |m, (a, b)| nan_max(m, (*a as f64 - *b as f64).abs()));
                out.push((key, err / scale));
            }
        }
    }
    out
}

fn max_rel_between(a: &GrpoGradients, b: &GrpoGradients) -> f64 {
    let (a, b) = (a.grads.lora.as_ref().unwrap(), b.grads.lora.as_ref().unwrap());
    let (pa, pb) = (rft::trainer::lora_params(a), rft::trainer::lora_params(b));
    let mut m = 0f64;
    for (x, y) in pa.iter().zip(&pb) {
        let scale = y.iter().fold(0f64, |s, &v| s.max((v as f64).abs())).max(1e-30);
        let err = x
            .iter()
            .zip(y.iter())
            .fold(0f64, |s, (p, q)| nan_max(s, (*p as f64 - *q as f64).abs()));
        m = nan_max(m, err / scale);
    }
    m
}

#[test]
fn grpo_gradients_match_pytorch() {
    for name in CASES {
        let c = load_case(name);
        let t0 = std::time::Instant::now();
        let g = grpo_gradients(&c.model, Some(&c.lora), &c.batch, &c.opts).unwrap();
        let elapsed = t0.elapsed();

        let adv_err = g
            .advantages
            .iter()
            .zip(f32s(&c.exp["advantages"]))
            .fold(0f64, |m, (a, b)| nan_max(m, (*a as f64 - b as f64).abs()));
        let logp_err = max_abs_ragged(&g.logp, &c.exp["logp"]);
        let ref_err = match &g.ref_logp {
            Some(r) => max_abs_ragged(r, &c.exp["ref_logp"]),
            None => {
                assert_eq!(c.exp["options"]["beta"].as_f64().unwrap(), 0.0);
                0.0
            }
        };
        let exp_loss = c.exp["loss"].as_f64().unwrap();
        let loss_err = (g.loss as f64 - exp_loss).abs() / exp_loss.abs().max(1e-12);
        let expected = Checkpoint::open_files(&[c.dir.join("grads.safetensors")]).unwrap();
        let errs = grad_errors(&g, &expected, &c.lora);
        assert_eq!(errs.len(), 28, "{name}: every LoRA matrix has a gradient");
        let (worst_key, worst) = errs.iter().cloned().fold((String::new(), 0f64), |a, b| {
            if b.1.is_nan() || b.1 > a.1 {
                b
            } else {
                a
            }
        });
        let norm: f64 = rft::trainer::lora_params(g.grads.lora.as_ref().unwrap())
            .iter()
            .flat_map(|t| t.iter())
            .map(|&x| (x as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let exp_norm = c.exp["grads"]["norm"].as_f64().unwrap();
        eprintln!(
            "{name:28} adv {adv_err:.1e} logp {logp_err:.1e} ref {ref_err:.1e} loss(rel) {loss_err:.1e} \
             grad max rel {worst:.1e} ({worst_key}) norm {norm:.6} vs {exp_norm:.6} [{elapsed:.2?}]"
        );
        assert!(adv_err < 1e-4, "{name}: advantages off by {adv_err}");
        assert!(logp_err < 1e-4, "{name}: logp off by {logp_err}");
        assert!(ref_err < 1e-4, "{name}: ref_logp off by {ref_err}");
        assert!(loss_err < 1e-4, "{name}: loss {} vs {exp_loss}", g.loss);
        assert!(
            worst < 1e-4,
            "{name}: {worst_key} gradient off by {worst} (relative)"
        );
        assert!(((norm - exp_norm) / exp_norm).abs() < 1e-4);

        // Micro-batching gives the same gradients (the normalisation is global).
        for mb in [1, 4] {
            let opts = GrpoOptions {
                micro_batch_size: mb,
                ..c.opts.clone()
            };
            let gm = grpo_gradients(&c.model, Some(&c.lora), &c.batch, &opts).unwrap();
            let d = max_rel_between(&gm, &g);
            eprintln!(
                "{name:28}   micro-batch {mb}: max rel diff to one batch {d:.1e}, loss {} vs {}",
                gm.loss, g.loss
            );
            // Micro-batching only regroups the f32 sums of per-sequence contributions (6
            // sequences, u = 6e-8): ~1e-7 relative, so 1e-5 is 100× that, and 10× below the
            // fixture tolerance; a wrong normalisation (per micro-batch instead of global)
            // is off by O(1). The loss is likewise a regrouped sum of 6 terms.
            assert!(d < 1e-5, "{name}: micro-batch {mb} gradients differ by {d}");
            assert!((gm.loss - g.loss).abs() <= 1e-6 * g.loss.abs().max(1e-3));
            let errs = grad_errors(&gm, &expected, &c.lora);
            assert!(errs.iter().all(|e| e.1 < 1e-4));
        }
    }
}

/// Recompute mode and gradient accumulation steps (instead of a micro-batch size) agree too.
#[test]
fn recompute_and_accumulation_steps_agree() {
    let c = load_case("qwen2_dapo_k3");
    let g = grpo_gradients(&c.model, Some(&c.lora), &c.batch, &c.opts).unwrap();
    let opts = GrpoOptions {
        recompute: rft::cpu::train::Recompute::Layer,
        gradient_accumulation_steps: 3,
        chunk_rows: 5,
        ..c.opts.clone()
    };
    let g2 = grpo_gradients(&c.model, Some(&c.lora), &c.batch, &opts).unwrap();
    // Same bound and reason as the micro-batch check above (regrouped f32 sums only).
    let d = max_rel_between(&g2, &g);
    assert!(d < 1e-5, "recompute + accumulation: gradients differ by {d}");
    assert!((g2.loss - g.loss).abs() <= 1e-6 * g.loss.abs().max(1e-3));
}

#[test]
fn fixtures_present() {
    for name in CASES {
        assert!(root()
            .join("tests/fixtures/train")
            .join(name)
            .join("grads.safetensors")
            .exists());
    }
}
