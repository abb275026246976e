//! The training core beyond gradient parity (that is tests/train_parity.rs):
//! - exact resume: N steps, save, load, M steps == N+M straight, bit for bit (LoRA with
//!   dropout, num_iterations 2, a warm-up + cosine schedule; and full fine-tuning via SFT);
//! - non-finite steps are skipped and reported, the adapter stays finite and unchanged;
//! - dynamic sampling drops zero-std groups; GRPO and SFT actually lower their losses;
//! - bad adapters: another architecture/shape, missing adapter_config keys;
//! - random init (training from scratch) has the promised statistics.

use rft::cpu::engine::CpuEngine;
use rft::cpu::model::CpuModel;
use rft::engine::Engine;
use rft::lora::{peft, LoraConfig, LoraWeights};
use rft::model::config::ModelConfig;
use rft::model::weights::{Proj, Weights};
use rft::optim::{LrSchedule, SchedulerType, Warmup};
use rft::trainer::{
    grpo_gradients, grpo_update, init, load_checkpoint, lora_params, save_checkpoint, sft_step,
    weight_params, GrpoBatch, GrpoOptions, GrpoSeq, SftExample, SftOptions, TrainState, Trainable,
};
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The qwen2 fixture's shapes (2 layers, D 64, vocab 461) with random weights.
fn tiny_model() -> CpuModel {
    let c = ModelConfig::from_dir(&root().join("tests/fixtures/models/qwen2")).unwrap();
    let w = Weights::random(&c, 7, 0.05);
    CpuModel::new(c, w)
}

fn lora_cfg(dropout: f32) -> LoraConfig {
    LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout,
        use_rslora: false,
        target_modules: Proj::ALL.to_vec(),
    }
}

/// A deterministic synthetic batch for step `k`: 2 prompts × G = 3, ragged lengths.
fn synthetic_batch(k: u64) -> GrpoBatch {
    let tok = |i: u64, j: u64| (3 + (i * 131 + j * 17 + k * 29) % 450) as u32;
    let mut seqs = vec![];
    for i in 0..6u64 {
        let prompt: Vec<u32> = (0..(3 + i / 3)).map(|j| tok(i / 3, j)).collect();
        let completion: Vec<u32> = (0..(2 + (i + k) % 5)).map(|j| tok(i + 7, j)).collect();
        seqs.push(GrpoSeq {
            prompt_ids: prompt,
            completion_ids: completion,
            old_logp: None,
        });
    }
    let rewards = (0..6)
        .map(|i| ((i as u64 * 7 + k * 3) % 4) as f32 / 3.0)
        .collect();
    GrpoBatch {
        seqs,
        group_size: 3,
        rewards,
        advantages: None,
    }
}

fn grpo_opts(total_steps: usize) -> GrpoOptions {
    let mut o = GrpoOptions {
        num_iterations: 2,
        micro_batch_size: 4,
        max_grad_norm: 0.5,
        ..Default::default()
    };
    o.loss.beta = 0.04;
    o.loss.epsilon_high = Some(0.28);
    o.loss.max_completion_length = 8;
    o.schedule = LrSchedule::new(SchedulerType::Cosine, 1e-2, total_steps, Warmup::Steps(1)).unwrap();
    o
}

fn bits(l: &LoraWeights) -> Vec<u32> {
    lora_params(l)
        .iter()
        .flat_map(|t| t.iter().map(|x| x.to_bits()))
        .collect()
}

#[test]
fn grpo_resume_is_bit_identical() {
    let (n, m) = (3u64, 2u64);
    let opts = grpo_opts(((n + m) * 2) as usize);
    let mut model = tiny_model();
    let lora0 = LoraWeights::new_random(lora_cfg(0.1), &model.config, 11, 0.05, 0.05);

    // Straight run.
    let mut lora_a = lora0.clone();
    let mut st_a = TrainState::new(42);
    let mut metrics_a = vec![];
    for k in 0..n + m {
        metrics_a.extend(
            grpo_update(
                &mut model,
                Some(&mut lora_a),
                &mut st_a,
                &synthetic_batch(k),
                &opts,
            )
            .unwrap(),
        );
    }
    assert!(metrics_a.iter().all(|x| !x.skipped && x.loss.is_finite()));
    assert_ne!(bits(&lora_a), bits(&lora0), "training moved the adapter");

    // N steps, checkpoint, fresh load, M steps.
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("checkpoint-3");
    let mut lora_b = lora0.clone();
    let mut st_b = TrainState::new(42);
    let mut metrics_b = vec![];
    for k in 0..n {
        metrics_b.extend(
            grpo_update(
                &mut model,
                Some(&mut lora_b),
                &mut st_b,
                &synthetic_batch(k),
                &opts,
            )
            .unwrap(),
        );
    }
    let cfg = serde_json::json!({"note": "run config goes here"});
    save_checkpoint(
        &ck,
        &Trainable::Lora(lora_b.clone()),
        &model.config,
        &st_b,
        &cfg,
        "tiny",
    )
    .unwrap();
    // Saving again over the same name replaces it atomically; no temp dirs are left behind.
    save_checkpoint(
        &ck,
        &Trainable::Lora(lora_b.clone()),
        &model.config,
        &st_b,
        &cfg,
        "tiny",
    )
    .unwrap();
    let names: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["checkpoint-3".to_string()]);
    drop(lora_b);
    let loaded = load_checkpoint(&ck, &model.config).unwrap();
    assert_eq!(loaded.config, cfg);
    assert_eq!(loaded.state, st_b);
    let Trainable::Lora(mut lora_c) = loaded.params else {
        panic!("expected a LoRA checkpoint")
    };
    let mut st_c = loaded.state;
    for k in n..n + m {
        metrics_b.extend(
            grpo_update(
                &mut model,
                Some(&mut lora_c),
                &mut st_c,
                &synthetic_batch(k),
                &opts,
            )
            .unwrap(),
        );
    }
    assert_eq!(
        bits(&lora_c),
        bits(&lora_a),
        "resumed adapter differs from the straight run"
    );
    assert_eq!(st_c, st_a, "optimizer state differs");
    assert_eq!(metrics_b, metrics_a);
    // The checkpoint's adapter is a plain PEFT adapter.
    assert!(peft::load(&ck, &model.config).is_ok());
}

#[test]
fn sft_full_fine_tuning_resume_is_bit_identical() {
    let examples: Vec<SftExample> = (0..4u32)
        .map(|i| SftExample {
            prompt_ids: vec![5 + i, 9, 12],
            completion_ids: (0..4 + i).map(|j| 20 + (i * 7 + j * 3) % 40).collect(),
        })
        .collect();
    let opts = SftOptions {
        full_fine_tuning: true,
        micro_batch_size: 3,
        schedule: LrSchedule::new(SchedulerType::Linear, 1e-3, 5, Warmup::Steps(0)).unwrap(),
        ..Default::default()
    };
    let base = tiny_model();
    let wbits = |w: &Weights| -> Vec<u32> {
        weight_params(w)
            .iter()
            .flat_map(|t| t.iter().map(|x| x.to_bits()))
            .collect()
    };

    let mut a = CpuModel::new(base.config.clone(), base.weights.clone());
    let mut st_a = TrainState::new(1);
    let mut losses = vec![];
    for _ in 0..5 {
        losses.push(sft_step(&mut a, None, &mut st_a, &examples, &opts).unwrap().loss);
    }
    assert!(losses[4] < losses[0], "SFT lowers the loss: {losses:?}");

    let mut b = CpuModel::new(base.config.clone(), base.weights.clone());
    let mut st_b = TrainState::new(1);
    for _ in 0..2 {
        sft_step(&mut b, None, &mut st_b, &examples, &opts).unwrap();
    }
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck");
    save_checkpoint(
        &ck,
        &Trainable::Full(b.weights.clone()),
        &b.config,
        &st_b,
        &serde_json::json!({}),
        "tiny",
    )
    .unwrap();
    let loaded = load_checkpoint(&ck, &b.config).unwrap();
    let Trainable::Full(w) = loaded.params else {
        panic!("expected full weights")
    };
    let mut c = CpuModel::new(b.config.clone(), w);
    let mut st_c = loaded.state;
    for _ in 2..5 {
        sft_step(&mut c, None, &mut st_c, &examples, &opts).unwrap();
    }
    assert_eq!(wbits(&c.weights), wbits(&a.weights));
    assert_eq!(st_c, st_a);
}

#[test]
fn non_finite_steps_are_skipped() {
    let mut model = tiny_model();
    let lora0 = LoraWeights::new_random(lora_cfg(0.0), &model.config, 3, 0.05, 0.05);
    let mut lora = lora0.clone();
    let mut st = TrainState::new(0);
    let opts = GrpoOptions {
        num_iterations: 1,
        ..grpo_opts(4)
    };
    // One good step so the optimiser has moments to protect.
    grpo_update(&mut model, Some(&mut lora), &mut st, &synthetic_batch(0), &opts).unwrap();
    let (before, adam_before) = (lora.clone(), st.adam.clone());

    // An infinite advantage poisons the loss and the gradient.
    let mut bad = synthetic_batch(1);
    bad.advantages = Some(vec![f32::INFINITY, 0.0, -1.0, 0.5, 0.5, -1.0]);
    let m = grpo_update(&mut model, Some(&mut lora), &mut st, &bad, &opts).unwrap();
    assert_eq!(m.len(), 1);
    assert!(m[0].skipped, "{m:?}");
    assert!(!m[0].loss.is_finite() || !m[0].grad_norm.is_finite());
    assert_eq!(lora, before, "a skipped step leaves the adapter unchanged");
    assert_eq!(st.adam, adam_before, "and the optimiser moments");
    assert_eq!((st.step, st.skipped_steps), (2, 1));
    assert!(lora_params(&lora).iter().all(|t| t.iter().all(|x| x.is_finite())));

    // Infinite rewards are rejected up front with a clear error.
    let mut bad = synthetic_batch(1);
    bad.rewards[2] = f32::INFINITY;
    let e = grpo_update(&mut model, Some(&mut lora), &mut st, &bad, &opts).unwrap_err();
    assert!(e.to_string().contains("not finite"), "{e}");

    // Training continues normally afterwards.
    let m = grpo_update(&mut model, Some(&mut lora), &mut st, &synthetic_batch(2), &opts).unwrap();
    assert!(!m[0].skipped);
    assert_ne!(lora, before);
}

#[test]
fn dynamic_sampling_and_metrics() {
    let model = tiny_model();
    let lora = LoraWeights::new_random(lora_cfg(0.0), &model.config, 3, 0.05, 0.05);
    let mut batch = synthetic_batch(0);
    batch.rewards = vec![1.0, 0.0, 0.0, 0.5, 0.5, 0.5]; // group 1 has zero std
    let opts = grpo_opts(4);
    let g = grpo_gradients(&model, Some(&lora), &batch, &opts).unwrap();
    assert_eq!(g.keep, vec![true; 6]);
    assert_eq!(g.stats.as_ref().unwrap().frac_zero_std(), 0.5);
    let ds = GrpoOptions {
        dynamic_sampling: true,
        ..opts.clone()
    };
    let g2 = grpo_gradients(&model, Some(&lora), &batch, &ds).unwrap();
    assert_eq!(g2.keep, vec![true, true, true, false, false, false]);
    assert_eq!(g2.logp.len(), 3);
    let kept_tokens: usize = batch.seqs[..3].iter().map(|s| s.completion_ids.len()).sum();
    assert_eq!(g2.metrics.num_tokens, kept_tokens);

    // Several on-policy updates (β = 0; the loss value is then constant, ratio ≡ 1) raise
    // Σ_i A_i · mean_t logp_i: likelier good answers, less likely bad ones.
    let mut model = tiny_model();
    let mut lora = lora.clone();
    let mut st = TrainState::new(0);
    let mut o = GrpoOptions {
        num_iterations: 1,
        ..grpo_opts(20)
    };
    o.loss.beta = 0.0;
    o.schedule = LrSchedule::new(SchedulerType::Constant, 2e-2, 20, Warmup::Steps(0)).unwrap();
    let objective = |g: &rft::trainer::GrpoGradients| -> f64 {
        g.logp
            .iter()
            .zip(&g.advantages)
            .map(|(lp, &a)| a as f64 * lp.iter().map(|&x| x as f64).sum::<f64>() / lp.len() as f64)
            .sum()
    };
    let first = objective(&grpo_gradients(&model, Some(&lora), &batch, &o).unwrap());
    let mut m = vec![];
    for _ in 0..10 {
        m = grpo_update(&mut model, Some(&mut lora), &mut st, &batch, &o).unwrap();
    }
    let last = objective(&grpo_gradients(&model, Some(&lora), &batch, &o).unwrap());
    assert!(
        last > first + 0.1,
        "GRPO raises advantage-weighted log-probs: {first} → {last}"
    );
    let m = &m[0];
    assert!(m.entropy > 0.0 && m.grad_norm > 0.0 && m.lr > 0.0 && m.num_seqs == 6);
}

#[test]
fn bad_options_are_rejected() {
    let model = tiny_model();
    let lora = LoraWeights::new_random(lora_cfg(0.0), &model.config, 3, 0.05, 0.05);
    let b = synthetic_batch(0);
    let o = grpo_opts(2);
    // Each case must fail for its own reason, not an earlier check's: the message is checked.
    let err = |lora: Option<&LoraWeights>, b: &GrpoBatch, o: &GrpoOptions| -> String {
        match grpo_gradients(&model, lora, b, o) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        }
    };
    let has = |e: String, want: &str| assert!(e.contains(want), "{want:?} not in {e:?}");
    // Full fine-tuning with β > 0 has no reference model.
    let full = GrpoOptions {
        full_fine_tuning: true,
        ..o.clone()
    };
    has(err(None, &b, &full), "beta > 0 needs the frozen reference model");
    // Full fine-tuning given an adapter; LoRA training without one.
    let mut full0 = full.clone();
    full0.loss.beta = 0.0;
    has(err(Some(&lora), &b, &full0), "give no adapter");
    has(err(None, &b, &o), "LoRA training needs an adapter");
    // An adapter of another depth.
    let mut shallow = lora.clone();
    shallow.layers.pop();
    has(
        err(Some(&shallow), &b, &o),
        "the adapter has 1 layers, the model 2",
    );
    // Zero iterations, a zero temperature, zero lm_head chunk rows.
    let bad = |f: &dyn Fn(&mut GrpoOptions)| {
        let mut x = o.clone();
        f(&mut x);
        err(Some(&lora), &b, &x)
    };
    has(
        bad(&|x| x.num_iterations = 0),
        "num_iterations must be at least 1",
    );
    has(bad(&|x| x.temperature = 0.0), "temperature must be > 0");
    has(bad(&|x| x.chunk_rows = 0), "chunk_rows must be at least 1");
    // Old log-probs of the wrong length (sequence 0 has 2 completion tokens).
    let mut bb = b.clone();
    bb.seqs[0].old_logp = Some(vec![0.0]);
    has(
        err(Some(&lora), &bb, &o),
        "sequence 0: 1 old log-probs for 2 completion tokens",
    );
    // Token outside the vocabulary (461); an empty prompt.
    let mut bb = b.clone();
    bb.seqs[1].completion_ids[0] = 10_000;
    has(
        err(Some(&lora), &bb, &o),
        "sequence 1: token id 10000 is outside the vocabulary of 461",
    );
    let mut bb = b.clone();
    bb.seqs[2].prompt_ids.clear();
    has(err(Some(&lora), &bb, &o), "sequence 2: empty prompt");
    // Reward / advantage count mismatch.
    let mut bb = b.clone();
    bb.rewards.pop();
    has(err(Some(&lora), &bb, &o), "5 rewards for 6 sequences");
    let mut bb = b.clone();
    bb.advantages = Some(vec![0.0; 7]);
    has(err(Some(&lora), &bb, &o), "7 advantages for 6 sequences");
    // Full fine-tuning with β = 0 works and yields base-weight gradients.
    let g = grpo_gradients(&model, None, &b, &full0).unwrap();
    assert!(g.grads.weights.is_some() && g.grads.lora.is_none());
}

/// Adapters that do not fit: another architecture / shape, missing or bad config keys.
#[test]
fn bad_adapters_are_rejected() {
    let qwen = ModelConfig::from_dir(&root().join("tests/fixtures/models/qwen2")).unwrap();
    let llama = ModelConfig::from_dir(&root().join("tests/fixtures/models/llama")).unwrap();
    let qdir = root().join("tests/fixtures/train/qwen2_grpo_k3");
    assert!(peft::load(&qdir, &qwen).is_ok());

    // A qwen2 adapter on a model of another shape: rank-r shapes mismatch or stray keys.
    let mut other = qwen.clone();
    other.hidden_size = 32;
    let e = peft::load(&qdir, &other).unwrap_err().to_string();
    assert!(e.contains("shape") || e.contains("expected"), "{e}");
    let mut deeper = qwen.clone();
    deeper.num_hidden_layers = 3;
    let e = peft::load(&qdir, &deeper).unwrap_err().to_string();
    assert!(e.contains("missing") || e.contains("layers.2"), "{e}");
    let mut shallower = qwen.clone();
    shallower.num_hidden_layers = 1;
    let e = peft::load(&qdir, &shallower).unwrap_err().to_string();
    assert!(e.contains("unexpected tensor"), "{e}");
    // The qwen3 fixture (head_dim 32: q_proj is [128, 64]) is another architecture and shape.
    let qwen3 = ModelConfig::from_dir(&root().join("tests/fixtures/models/qwen3")).unwrap();
    let e = peft::load(&qdir, &qwen3).unwrap_err().to_string();
    assert!(e.contains("shape"), "{e}");
    // The llama fixture has exactly qwen2's shapes (hidden 64, MLP 128, K/V 2 × 16, 2 layers):
    // PEFT adapters carry no architecture, so one whose every shape fits must load.
    assert_eq!(
        (
            llama.hidden_size,
            llama.intermediate_size,
            llama.kv_dim(),
            llama.num_hidden_layers
        ),
        (
            qwen.hidden_size,
            qwen.intermediate_size,
            qwen.kv_dim(),
            qwen.num_hidden_layers
        )
    );
    assert!(peft::load(&qdir, &llama).is_ok());

    // adapter_config.json edits.
    let orig: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(qdir.join("adapter_config.json")).unwrap()).unwrap();
    let try_cfg = |edit: &dyn Fn(&mut serde_json::Map<String, serde_json::Value>)| -> String {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::copy(
            qdir.join("adapter_model.safetensors"),
            tmp.path().join("adapter_model.safetensors"),
        )
        .unwrap();
        let mut v = orig.clone();
        edit(v.as_object_mut().unwrap());
        std::fs::write(tmp.path().join("adapter_config.json"), v.to_string()).unwrap();
        match peft::load(tmp.path(), &qwen) {
            Ok(_) => String::from("ok"),
            Err(e) => e.to_string(),
        }
    };
    assert_eq!(try_cfg(&|_| {}), "ok", "unknown keys are ignored");
    assert!(try_cfg(&|o| {
        o.remove("r");
    })
    .contains("\"r\""));
    assert!(try_cfg(&|o| {
        o.remove("lora_alpha");
    })
    .contains("lora_alpha"));
    assert!(try_cfg(&|o| {
        o.remove("target_modules");
    })
    .contains("target_modules"));
    assert!(try_cfg(&|o| {
        o.insert("r".into(), 8.into());
    })
    .contains("shape"));
    assert!(try_cfg(&|o| {
        o.insert("target_modules".into(), serde_json::json!(["q_proj", "c_attn"]));
    })
    .contains("c_attn"));
    assert!(try_cfg(&|o| {
        o.insert("target_modules".into(), serde_json::json!(["q_proj"]));
    })
    .contains("unexpected tensor"));
    assert!(try_cfg(&|o| {
        o.insert("peft_type".into(), "IA3".into());
    })
    .contains("IA3"));
    assert!(try_cfg(&|o| {
        o.insert("use_dora".into(), true.into());
    })
    .contains("dora"));
    // PEFT's own range: any finite alpha (a negative one loads), dropout a probability.
    assert_eq!(
        try_cfg(&|o| {
            o.insert("lora_alpha".into(), (-8.0).into());
        }),
        "ok"
    );
    let e = try_cfg(&|o| {
        o.insert("lora_alpha".into(), 1e300.into());
    });
    assert!(e.contains("lora_alpha = 1e+300 does not fit"), "{e}");
    assert!(try_cfg(&|o| {
        o.insert("lora_dropout".into(), 1.5.into());
    })
    .contains("lora_dropout = 1.5"));
    // Missing weights file / directory.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("adapter_config.json"), orig.to_string()).unwrap();
    assert!(peft::load(tmp.path(), &qwen).is_err());
    assert!(peft::load(&tmp.path().join("nope"), &qwen).is_err());
    // A checkpoint for another shape is rejected too.
    let model = tiny_model();
    let lora = LoraWeights::new_random(lora_cfg(0.0), &model.config, 3, 0.05, 0.05);
    let ck = tmp.path().join("ck");
    save_checkpoint(
        &ck,
        &Trainable::Lora(lora),
        &model.config,
        &TrainState::new(0),
        &serde_json::json!({}),
        "x",
    )
    .unwrap();
    let mut other = model.config.clone();
    other.intermediate_size = 64;
    assert!(load_checkpoint(&ck, &other).is_err());
}

/// Sample mean, standard deviation and kurtosis of `x` against N(0, std²), each within 6
/// standard errors for its sample size n (σ/√n for the mean, σ/√(2n) for the std, √(24/n)
/// for the kurtosis of a normal, which is 3): a wrong std, a non-zero mean or a uniform
/// instead of a normal (kurtosis 1.8) fail; sampling noise passes with probability ~1 − 1e-8.
fn check_normal(what: &str, x: &[f32], std: f64) {
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let m2 = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    let m4 = x.iter().map(|&v| (v as f64 - mean).powi(4)).sum::<f64>() / n;
    let (sd, kurt) = (m2.sqrt(), m4 / (m2 * m2));
    assert!(mean.abs() < 6.0 * std / n.sqrt(), "{what}: mean {mean} (n {n})");
    assert!(
        (sd - std).abs() < 6.0 * std / (2.0 * n).sqrt(),
        "{what}: std {sd}, want {std} (n {n})"
    );
    assert!(
        (kurt - 3.0).abs() < 6.0 * (24.0 / n).sqrt(),
        "{what}: kurtosis {kurt}, a normal has 3 (n {n})"
    );
}

#[test]
fn random_init_statistics() {
    // The llama fixture's shapes (untied lm_head), with every bias switched on.
    let mut c = ModelConfig::from_dir(&root().join("tests/fixtures/models/llama")).unwrap();
    assert!(!c.tie_word_embeddings);
    (c.qkv_bias, c.o_bias, c.mlp_bias) = (true, true, true);
    let w = init::init_weights(&c, 5, 0.02);
    check_normal("embed", &w.embed, 0.02);
    check_normal("lm_head", w.lm_head.as_ref().unwrap(), 0.02);
    for (l, lw) in w.layers.iter().enumerate() {
        for p in Proj::ALL {
            check_normal(&format!("layer {l} {p:?}"), &lw.proj(p).w, 0.02);
            assert!(lw.proj(p).b.as_ref().is_none_or(|b| b.iter().all(|&x| x == 0.0)));
        }
        assert!(lw.input_norm.iter().chain(&lw.post_norm).all(|&x| x == 1.0));
    }
    assert!(w.layers[0].down.b.is_some(), "biases exist and were checked");
    assert!(w.final_norm.iter().all(|&x| x == 1.0));
    // Matrices are drawn independently: no two start with the same values.
    assert_ne!(w.layers[0].q.w[..8], w.layers[1].q.w[..8]);
    assert_ne!(w.embed[..8], w.lm_head.as_ref().unwrap()[..8]);
    // Deterministic in the seed.
    assert_eq!(init::init_weights(&c, 5, 0.02).embed, w.embed);
    assert_ne!(init::init_weights(&c, 6, 0.02).embed, w.embed);
    // The engine scores with it, and the model is untrained: after the final RMSNorm the
    // hidden state has unit RMS, so each logit is ~ N(0, D·0.02²) (std 0.16 for D = 64) and
    // every log-prob is within ~6·0.16 < 1 of the uniform −ln V.
    let mut engine = CpuEngine::new(CpuModel::new(c.clone(), w));
    let lp = engine
        .score(&[(vec![1, 2, 3], vec![10, 200, 460, 7])], 1.0)
        .unwrap();
    assert_eq!(lp[0].len(), 4);
    let uniform = -(c.vocab_size as f32).ln();
    for &x in &lp[0] {
        assert!((x - uniform).abs() < 1.0, "log-prob {x} vs uniform {uniform}");
    }
}
