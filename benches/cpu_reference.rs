//! Criterion benches of the f32 CPU reference (the oracle, not the fast path): a batched
//! decode step, a GRPO rollout, and a GRPO update, on the tiny default model (models/tiny)
//! and on a random model of a wider shape. The CUDA benches live in benches/rollout.rs.

use criterion::{criterion_group, criterion_main, Criterion};
use rft::cpu::engine::CpuEngine;
use rft::cpu::model::{CpuModel, KvCache, LogitsFor};
use rft::engine::Engine;
use rft::lora::{LoraConfig, LoraWeights};
use rft::model::config::{Arch, ModelConfig};
use rft::model::weights::{Proj, Weights};
use rft::sampling::{SamplingParams, StopCriteria};
use rft::trainer::state::TrainState;
use rft::trainer::step::{grpo_update, GrpoBatch, GrpoOptions, GrpoSeq};
use std::path::PathBuf;

fn tiny() -> CpuEngine {
    let root = std::env::var("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| ".".into());
    CpuEngine::load(&root.join("models/tiny")).expect("models/tiny")
}

/// A Qwen2-style random model: 4 layers of width 256 (about 4M parameters).
fn wide() -> CpuModel {
    let mut c = ModelConfig::preset("qwen2.5-0.5b").expect("preset");
    c.arch = Arch::Qwen2;
    c.vocab_size = 2048;
    c.hidden_size = 256;
    c.intermediate_size = 768;
    c.num_hidden_layers = 4;
    c.num_attention_heads = 4;
    c.num_key_value_heads = 2;
    c.head_dim = 64;
    c.max_position_embeddings = 512;
    let w = Weights::random(&c, 1, 0.05);
    CpuModel::new(c, w)
}

fn lora(c: &ModelConfig) -> LoraWeights {
    let cfg = LoraConfig {
        r: 16,
        alpha: 32.0,
        dropout: 0.0,
        use_rslora: false,
        target_modules: Proj::ALL.to_vec(),
    };
    LoraWeights::new_random(cfg, c, 3, 0.05, 0.05)
}

fn decode_step(c: &mut Criterion) {
    for (name, model) in [("tiny", tiny().model), ("wide", wide())] {
        let adapter = lora(&model.config);
        // 64 sequences with a 32-token context each; one new token per sequence per step.
        let mut caches: Vec<KvCache> = (0..64).map(|_| KvCache::new(&model.config)).collect();
        let prompt: Vec<u32> = (0..32).map(|i| (i % 10) as u32 + 1).collect();
        {
            let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
            let toks: Vec<&[u32]> = (0..64).map(|_| prompt.as_slice()).collect();
            model.forward(&mut refs, &toks, Some(&adapter), LogitsFor::LastPerSeq);
        }
        c.bench_function(&format!("cpu decode step, 64 seqs, ctx 32, {name}"), |b| {
            b.iter(|| {
                let mut cs = caches.clone();
                let mut refs: Vec<&mut KvCache> = cs.iter_mut().collect();
                let toks: Vec<&[u32]> = (0..64).map(|_| &prompt[..1]).collect();
                model.forward(&mut refs, &toks, Some(&adapter), LogitsFor::LastPerSeq)
            })
        });
    }
}

fn rollout(c: &mut Criterion) {
    let mut engine = tiny();
    let prompts: Vec<Vec<u32>> = (0..16)
        .map(|i| vec![5, (i % 10) as u32 + 1, 11, 3, 4, 13])
        .collect();
    let params = SamplingParams {
        temperature: 1.0,
        seed: 1,
        ..Default::default()
    };
    let stop = StopCriteria {
        eos_ids: vec![],
        stop_strings: vec![],
        max_new_tokens: 4,
    };
    c.bench_function("cpu rollout, tiny, 16 prompts x G 8, 4 new tokens", |b| {
        b.iter(|| engine.generate(&prompts, 8, &params, &stop, None).unwrap())
    });
}

fn grpo_step(c: &mut Criterion) {
    for (name, mut model, plen, clen) in [("tiny", tiny().model, 6, 4), ("wide", wide(), 64, 64)] {
        let mut adapter = lora(&model.config);
        let v = model.config.vocab_size as u32;
        let seqs: Vec<GrpoSeq> = (0..32u32)
            .map(|i| GrpoSeq {
                prompt_ids: (0..plen).map(|j| (i / 8 * 7 + j) % v).collect(),
                completion_ids: (0..clen).map(|j| (i * 13 + j * 5) % v).collect(),
                old_logp: None,
            })
            .collect();
        let rewards = (0..32).map(|i| (i % 3) as f32 / 2.0).collect();
        let batch = GrpoBatch {
            seqs,
            group_size: 8,
            rewards,
            advantages: None,
        };
        let opts = GrpoOptions::default();
        c.bench_function(
            &format!("cpu GRPO update, 32 seqs x {} tokens, {name}", plen + clen),
            |b| {
                b.iter(|| {
                    let mut state = TrainState::new(0);
                    grpo_update(&mut model, Some(&mut adapter), &mut state, &batch, &opts).unwrap()
                })
            },
        );
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = decode_step, rollout, grpo_step
}
criterion_main!(benches);
