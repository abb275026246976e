//! Criterion bench of one CUDA GRPO update (`CudaTrainer::grpo_update`: forward with layer
//! recompute, lm_head gather, loss, LoRA backward, grad norm, AdamW) on random weights of the
//! Qwen2.5-0.5B shape: 64 sequences × 384 tokens (prompt 128), LoRA r16 on every projection.
//! Skips (prints why) without a GPU. `rft bench train --json` reports the same step with peak
//! memory and the other shapes.

use criterion::{criterion_group, criterion_main, Criterion};
use rft::cuda::train::all_linear;
use rft::cuda::{availability, CudaEngine, CudaTrainer};
use rft::lora::LoraWeights;
use rft::model::config::ModelConfig;
use rft::optim::{AdamW, AdamWState};
use rft::trainer::{GrpoBatch, GrpoOptions, GrpoSeq, TrainState};

fn train_step(c: &mut Criterion) {
    if let Err(why) = availability() {
        eprintln!("skipping train bench: {why}");
        return;
    }
    let config = ModelConfig::preset("qwen2.5-0.5b").expect("preset");
    let vocab = config.vocab_size as u32;
    let mut engine = CudaEngine::random(config.clone(), 1, 0).expect("CUDA engine");
    let lora = LoraWeights::new_random(all_linear(16), &config, 3, 0.02, 1e-3);
    let mut trainer = CudaTrainer::new(&mut engine, &lora, &AdamWState::default()).expect("trainer");
    let seqs: Vec<GrpoSeq> = (0..64u32)
        .map(|i| GrpoSeq {
            prompt_ids: (0..128u32).map(|t| (t * 7919 + i * 104_729) % vocab).collect(),
            completion_ids: (0..256u32).map(|t| (t * 31 + i * 7) % vocab).collect(),
            old_logp: None,
        })
        .collect();
    let batch = GrpoBatch {
        rewards: (0..64).map(|i| (i % 3) as f32).collect(),
        seqs,
        group_size: 8,
        advantages: None,
    };
    let opts = GrpoOptions {
        recompute: rft::cpu::train::Recompute::Layer,
        optimizer: AdamW {
            lr: 1e-5,
            weight_decay: 0.0,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut state = TrainState::new(0);
    let mut g = c.benchmark_group("train_qwen2.5-0.5b_64x384_r16");
    g.sample_size(10);
    g.bench_function("grpo_update", |b| {
        b.iter(|| {
            trainer
                .grpo_update(&mut engine, &mut state, &batch, &opts)
                .expect("update")
        })
    });
    g.finish();
}

criterion_group!(benches, train_step);
criterion_main!(benches);
