//! Criterion bench of the CUDA rollout engine on random weights of the Qwen2.5-0.5B shape: one
//! `generate` of 64 sequences (8 prompts × G = 8, prompt 128) for 1 and for 33 new tokens, so
//! (t33 − t1) / 32 is the time of one decode step of 64 sequences. Skips (prints why) without a
//! GPU. `rft bench rollout` reports the same quantities directly, with the roofline fraction.

use criterion::{criterion_group, criterion_main, Criterion};
use rft::cuda::{availability, CudaEngine};
use rft::engine::Engine;
use rft::model::config::ModelConfig;
use rft::sampling::{SamplingParams, StopCriteria};

fn rollout(c: &mut Criterion) {
    if let Err(why) = availability() {
        eprintln!("skipping rollout bench: {why}");
        return;
    }
    let config = ModelConfig::preset("qwen2.5-0.5b").expect("preset");
    let vocab = config.vocab_size as u32;
    let mut engine = CudaEngine::random(config, 1, 0).expect("CUDA engine");
    let prompts: Vec<Vec<u32>> = (0..8u32)
        .map(|i| (0..128u32).map(|t| (t * 7919 + i * 104_729) % vocab).collect())
        .collect();
    let params = SamplingParams {
        temperature: 1.0,
        seed: 3,
        ..Default::default()
    };
    let mut group = c.benchmark_group("rollout_qwen2.5-0.5b_64seqs");
    group.sample_size(10);
    for new_tokens in [1usize, 33] {
        let stop = StopCriteria {
            eos_ids: vec![],
            stop_strings: vec![],
            max_new_tokens: new_tokens,
        };
        group.bench_function(format!("generate_{new_tokens}_tokens"), |b| {
            b.iter(|| {
                engine
                    .generate(&prompts, 8, &params, &stop, None)
                    .expect("generate")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, rollout);
criterion_main!(benches);
