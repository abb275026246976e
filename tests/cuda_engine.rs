//! The CUDA rollout engine (src/cuda/engine.rs) against the f32 CPU engine, on every fixture
//! model: greedy tokens and logprobs, seeded sampling independent of the batch size, a live
//! LoRA adapter, teacher-forced scores, the context limit. Plus the memory plan's arithmetic
//! (pure CPU, runs everywhere).
//!
//! Tolerances. The CUDA engine stores weights and activations in bf16 (relative rounding 2^-9
//! per store, a few dozen stores per layer), so its logits differ from the f32 reference by
//! ~1e-2 on these models. Token comparisons therefore stop at the first step whose CPU top-2
//! logit margin is below MARGIN = 0.05: a logit error below MARGIN/2 on both tokens cannot swap
//! them. The same bound gives the logprob tolerance: logprob = z_t − logsumexp(z) moves by at
//! most 2·max|Δz| ≤ MARGIN, so |Δlogprob| ≤ LP_TOL = 0.05.
//!
//! Without a usable GPU every GPU test prints "skipping: <reason>" and passes;
//! `RFT_REQUIRE_GPU=1` makes that a failure. Fixtures are found at run time from
//! `CARGO_MANIFEST_DIR` or the current directory (the GPU machine runs from a repo copy).

use rft::cpu::engine::CpuEngine;
use rft::cpu::model::{KvCache, LogitsFor};
use rft::cuda::engine::{score_groups, MemoryPlan, PlanNeeds, PAGE_SIZE, PREFILL_ROW_BUDGET};
use rft::cuda::{availability, decode_splits, CudaEngine};
use rft::engine::Engine;
use rft::lora::LoraWeights;
use rft::model::config::ModelConfig;
use rft::sampling::{FinishReason, SamplingParams, StopCriteria};
use std::path::PathBuf;

const MODELS: [&str; 4] = ["llama", "qwen2", "qwen3", "mistral"];
const MARGIN: f32 = 0.05;
const LP_TOL: f32 = 0.05;

fn root() -> PathBuf {
    std::env::var("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("."))
}

fn model_dir(name: &str) -> PathBuf {
    root().join("tests/fixtures/models").join(name)
}

fn require_gpu() -> bool {
    std::env::var("RFT_REQUIRE_GPU").is_ok_and(|v| v == "1")
}

fn gpu_or_skip() -> bool {
    if let Err(reason) = availability() {
        assert!(
            !require_gpu(),
            "RFT_REQUIRE_GPU=1 but CUDA is unavailable: {reason}"
        );
        eprintln!("skipping: {reason}");
        return false;
    }
    true
}

fn engines(name: &str) -> (CpuEngine, CudaEngine) {
    let dir = model_dir(name);
    let cpu = CpuEngine::load(&dir).unwrap_or_else(|e| panic!("{name}: CPU load: {e}"));
    let gpu = CudaEngine::load(&dir, 0).unwrap_or_else(|e| panic!("{name}: CUDA load: {e}"));
    (cpu, gpu)
}

/// Prompts of lengths that cross page boundaries (1, PAGE_SIZE-1, PAGE_SIZE, PAGE_SIZE+1, 37).
fn prompts(vocab: usize) -> Vec<Vec<u32>> {
    let lens = [1, PAGE_SIZE - 1, PAGE_SIZE, PAGE_SIZE + 1, 37];
    lens.iter()
        .enumerate()
        .map(|(i, &n)| (0..n).map(|t| ((t * 31 + i * 17 + 3) % vocab) as u32).collect())
        .collect()
}

fn no_eos(max_new_tokens: usize) -> StopCriteria {
    StopCriteria {
        eos_ids: vec![],
        stop_strings: vec![],
        max_new_tokens,
    }
}

/// The CPU greedy path of one prompt: tokens, their logprobs, and the top-2 margin per step.
fn cpu_greedy(cpu: &CpuEngine, prompt: &[u32], steps: usize) -> (Vec<u32>, Vec<f32>, Vec<f32>) {
    let m = &cpu.model;
    let ctx = m.config.max_position_embeddings;
    let mut cache = KvCache::new(&m.config);
    let mut logits = m.forward(
        &mut [&mut cache],
        &[prompt],
        cpu.adapter.as_ref(),
        LogitsFor::LastPerSeq,
    );
    let (mut toks, mut lps, mut margins) = (vec![], vec![], vec![]);
    for _ in 0..steps {
        let mut best = 0;
        for (i, &z) in logits.iter().enumerate() {
            if z > logits[best] {
                best = i;
            }
        }
        let second = logits
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != best)
            .map(|(_, &z)| z)
            .fold(f32::NEG_INFINITY, f32::max);
        margins.push(logits[best] - second);
        lps.push(rft::cpu::ops::logprob_and_entropy(&logits, best).0);
        toks.push(best as u32);
        if cache.len + 1 >= ctx {
            break;
        }
        logits = m.forward(
            &mut [&mut cache],
            &[&[best as u32]],
            cpu.adapter.as_ref(),
            LogitsFor::LastPerSeq,
        );
    }
    (toks, lps, margins)
}

/// Greedy GPU rollouts vs the CPU path up to the first small-margin step; returns steps compared.
fn check_greedy(name: &str, cpu: &CpuEngine, gpu: &mut CudaEngine, steps: usize) -> usize {
    let ps = prompts(cpu.model.config.vocab_size);
    let g = 2; // greedy: both samples must be the same path (shared prefix pages)
    let rollouts = gpu
        .generate(&ps, g, &SamplingParams::greedy(), &no_eos(steps), None)
        .unwrap_or_else(|e| panic!("{name}: CUDA generate: {e}"));
    assert_eq!(rollouts.len(), ps.len() * g);
    let (mut compared, mut worst) = (0, 0f32);
    for r in &rollouts {
        let (toks, lps, margins) = cpu_greedy(cpu, &ps[r.prompt_index], steps);
        assert_eq!(
            r.completion_ids.len(),
            toks.len(),
            "{name}: prompt {} sample {}: completion lengths (no EOS: max_new_tokens or context)",
            r.prompt_index,
            r.sample_index
        );
        for k in 0..toks.len() {
            if margins[k] < MARGIN {
                break;
            }
            assert_eq!(
                r.completion_ids[k],
                toks[k],
                "{name}: prompt {} sample {} step {k}: GPU token {} vs CPU {} (CPU margin {})\n\
                 GPU {:?}\nCPU {:?}",
                r.prompt_index,
                r.sample_index,
                r.completion_ids[k],
                toks[k],
                margins[k],
                r.completion_ids,
                toks
            );
            let d = (r.logprobs[k] - lps[k]).abs();
            worst = worst.max(d);
            assert!(
                d <= LP_TOL,
                "{name}: prompt {} step {k}: logprob GPU {} vs CPU {}",
                r.prompt_index,
                r.logprobs[k],
                lps[k]
            );
            compared += 1;
        }
    }
    eprintln!("cuda_engine {name}: greedy: {compared} steps compared, worst |Δlogprob| {worst:.2e}");
    assert!(
        compared > 0,
        "{name}: no step had a CPU margin ≥ {MARGIN}; nothing was compared"
    );
    compared
}

#[test]
fn cuda_engine_first_logits_match_cpu() {
    if !gpu_or_skip() {
        return;
    }
    for name in MODELS {
        let (cpu, mut gpu) = engines(name);
        for p in prompts(cpu.model.config.vocab_size) {
            let mut cache = KvCache::new(&cpu.model.config);
            let want = cpu
                .model
                .forward(&mut [&mut cache], &[&p], None, LogitsFor::LastPerSeq);
            let got = gpu
                .last_token_logits(&p)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let zmax = want.iter().fold(0f32, |a, z| a.max(z.abs()));
            let diff = want.iter().zip(&got).fold(0f32, |a, (w, g)| {
                if g.is_finite() {
                    a.max((w - g).abs())
                } else {
                    f32::INFINITY
                }
            });
            eprintln!(
                "cuda_engine {name}: prompt len {}: max|Δlogit| {diff:.3e} (max|z| {zmax:.3})",
                p.len()
            );
            // bf16 through the model: ~1e-2 relative of the logit scale (see the top comment).
            assert!(diff <= 0.05 + 0.02 * zmax, "{name}: logits differ by {diff}");
        }
    }
}

#[test]
fn cuda_engine_greedy_matches_cpu() {
    if !gpu_or_skip() {
        return;
    }
    for name in MODELS {
        let (cpu, mut gpu) = engines(name);
        check_greedy(name, &cpu, &mut gpu, 24);
    }
}

#[test]
fn cuda_engine_context_limit() {
    if !gpu_or_skip() {
        return;
    }
    let (cpu, mut gpu) = engines("llama");
    let ctx = cpu.model.config.max_position_embeddings;
    let prompt: Vec<u32> = (0..ctx - 5).map(|t| (t % 400) as u32).collect();
    let ps = vec![prompt];
    let stop = no_eos(50);
    let mut cpu = cpu;
    let want = cpu
        .generate(&ps, 1, &SamplingParams::greedy(), &stop, None)
        .unwrap();
    let got = gpu
        .generate(&ps, 1, &SamplingParams::greedy(), &stop, None)
        .unwrap();
    assert_eq!(got[0].completion_ids.len(), want[0].completion_ids.len());
    assert_eq!(
        got[0].completion_ids.len(),
        5,
        "P + generated reaches the context"
    );
    assert_eq!(got[0].finish_reason, FinishReason::Length);
}

#[test]
fn cuda_engine_sampling_is_batch_independent() {
    if !gpu_or_skip() {
        return;
    }
    for name in MODELS {
        let dir = model_dir(name);
        let mut gpu = CudaEngine::load(&dir, 0).unwrap();
        let ps = prompts(gpu.config().vocab_size);
        let params = SamplingParams {
            temperature: 0.9,
            top_p: 0.95,
            top_k: 50,
            seed: 1234,
            ..Default::default()
        };
        let stop = no_eos(16);
        gpu.max_batch_seqs = 1;
        let one = gpu.generate(&ps, 3, &params, &stop, None).unwrap();
        gpu.max_batch_seqs = 64;
        let all = gpu.generate(&ps, 3, &params, &stop, None).unwrap();
        assert_eq!(one.len(), all.len());
        // cuBLAS may pick another kernel (another summation order) for another row count, so
        // the bf16 numbers of the two runs can differ by rounding; where they are identical the
        // draws (same seed, stream, step) must pick the same token. Compare each sequence up to
        // the first step whose logprobs are not bit-identical, and bound the rounding there.
        let (mut same_steps, mut total, mut worst) = (0usize, 0usize, 0f32);
        for (a, b) in one.iter().zip(&all) {
            assert_eq!((a.prompt_index, a.sample_index), (b.prompt_index, b.sample_index));
            total += a.completion_ids.len();
            for k in 0..a.completion_ids.len().min(b.completion_ids.len()) {
                worst = worst.max((a.logprobs[k] - b.logprobs[k]).abs());
                if a.logprobs[k].to_bits() != b.logprobs[k].to_bits() {
                    break;
                }
                assert_eq!(
                    a.completion_ids[k], b.completion_ids[k],
                    "{name}: prompt {} sample {} step {k}: same logprob, different token",
                    a.prompt_index, a.sample_index
                );
                same_steps += 1;
            }
        }
        eprintln!(
            "cuda_engine {name}: batch 1 vs 64: {same_steps}/{total} steps bit-identical, \
             worst |Δlogprob| on the common prefix {worst:.2e}"
        );
        assert!(worst <= LP_TOL, "{name}: batch size changes logprobs by {worst}");
        // Samples of different prompts must differ (streams are distinct).
        assert_ne!(
            all[0].completion_ids, all[1].completion_ids,
            "{name}: streams collide"
        );
    }
}

fn peft_adapter(config: &ModelConfig) -> LoraWeights {
    let dir = root().join("tests/fixtures/train/peft_roundtrip");
    rft::lora::peft::load(&dir, config).expect("peft_roundtrip adapter")
}

#[test]
fn cuda_engine_adapter_matches_cpu() {
    if !gpu_or_skip() {
        return;
    }
    let (mut cpu, mut gpu) = engines("qwen2");
    let lora = peft_adapter(&cpu.model.config);
    cpu.set_adapter(Some(lora.clone()));
    gpu.set_adapter(Some(lora.clone()));
    check_greedy("qwen2+peft_roundtrip", &cpu, &mut gpu, 16);
    check_score("qwen2+peft_roundtrip", &mut cpu, &mut gpu);
    // Setting the same-shaped adapter again copies into the same buffers; removing it must
    // give the base model's numbers back.
    gpu.set_adapter(Some(lora));
    check_score("qwen2+peft_roundtrip (re-set)", &mut cpu, &mut gpu);
    cpu.set_adapter(None);
    gpu.set_adapter(None);
    check_score("qwen2 (adapter removed)", &mut cpu, &mut gpu);
}

fn score_items(vocab: usize) -> Vec<(Vec<u32>, Vec<u32>)> {
    let ps = prompts(vocab);
    ps.into_iter()
        .enumerate()
        .map(|(i, p)| {
            let c: Vec<u32> = (0..(3 + 5 * i))
                .map(|t| ((t * 13 + i * 7 + 1) % vocab) as u32)
                .collect();
            (p, c)
        })
        .chain(std::iter::once((vec![5], vec![])))
        .collect()
}

fn check_score(name: &str, cpu: &mut CpuEngine, gpu: &mut CudaEngine) {
    let items = score_items(cpu.model.config.vocab_size);
    for t in [1.0f32, 0.7] {
        let want = cpu.score(&items, t).unwrap();
        let got = gpu
            .score(&items, t)
            .unwrap_or_else(|e| panic!("{name}: CUDA score: {e}"));
        let mut worst = 0f32;
        for (i, (w, g)) in want.iter().zip(&got).enumerate() {
            assert_eq!(w.len(), g.len(), "{name}: item {i}: lengths");
            for (a, b) in w.iter().zip(g) {
                worst = worst.max((a - b).abs());
            }
        }
        eprintln!("cuda_engine {name}: score T={t}: worst |Δlogprob| {worst:.2e}");
        // |Δlogprob| ≤ 2·max|Δz|/T; the fixtures' logit errors stay below MARGIN/2 (top comment).
        assert!(worst <= LP_TOL / t, "{name}: score differs by {worst} at T={t}");
    }
}

#[test]
fn cuda_engine_score_matches_cpu() {
    if !gpu_or_skip() {
        return;
    }
    for name in MODELS {
        let (mut cpu, mut gpu) = engines(name);
        check_score(name, &mut cpu, &mut gpu);
    }
}

// ---------------------------------------------------------------------------------------------
// Pure CPU: the memory plan's arithmetic

#[test]
fn memory_plan_qwen25_05b() {
    let c = ModelConfig::preset("qwen2.5-0.5b").unwrap();
    // 8 prompts × G = 8, prompt ≤ 128, 256 new tokens.
    let needs = MemoryPlan::for_generate(&c, 8, 8, 128, 256);
    // Pages per prompt: its own ceil(128/16) = 8, and per sample ceil(256/16) + 1 = 17.
    assert_eq!(needs.num_pages, 8 * (8 + 8 * 17));
    assert_eq!(needs.max_pages_per_seq, (128 + 256) / 16);
    assert_eq!(needs.max_seqs, 64);
    assert_eq!(needs.max_rows, 8 * 128); // the whole prefill fits the row budget
    assert_eq!(needs.max_logit_rows, 64);
    let sm = 132;
    let p = MemoryPlan::new(&c, needs, 0, sm);
    // KV: 24 layers × (k, v) × 1152 pages × 16 positions × (2 KV heads × 64) × 2 bytes.
    assert_eq!(p.kv_cache_bytes, 24 * 2 * 1152 * 16 * 128 * 2);
    assert_eq!(p.kv_cache_bytes, 226_492_416);
    // Activations per row: x, h, proj (896) + q, q_pre, attn (896) + k, k_pre, v (128) +
    // gate, up, act (4864) in bf16, ids/pos/row_seq (12 B) and a rank-1 xa placeholder (4 B).
    let per_row = (3 * 896 + 3 * 896 + 3 * 128 + 3 * 4864) * 2 + 12 + 4;
    assert_eq!(p.activation_bytes, 1024 * per_row);
    assert_eq!(p.logits_bytes, 64 * 151_936 * 4 + 64 * 896 * 2 + 64 * 20);
    // Flash-decoding partials: the largest n · splits(n) over n = 1..=64 active sequences.
    let bps = 2; // 2 KV heads × ceil(7 query heads per group / 8)
    let parts = (1..=64)
        .map(|n| n * decode_splits(n, bps, 384, sm))
        .max()
        .unwrap();
    assert_eq!(p.max_split_parts, parts);
    assert!(parts >= 64);
    // The whole plan of the GPU.md peer workload is well under 1 GiB.
    assert!(p.total_bytes() < 1 << 30, "{} bytes", p.total_bytes());
    assert!(p.covers(&p));
    let bigger = MemoryPlan::new(&c, MemoryPlan::for_generate(&c, 16, 8, 128, 256), 0, sm);
    assert!(!p.covers(&bigger));
    // Context caps the pages: 32768-token context, prompt 128 + 40000 new.
    let capped = MemoryPlan::for_generate(&c, 1, 1, 128, 40_000);
    assert_eq!(capped.max_pages_per_seq, 32768 / 16);
    // Prefill rows are capped by the budget, but never below one prompt or the sequences.
    let many = MemoryPlan::for_generate(&c, 128, 8, 128, 16);
    assert_eq!(many.max_rows, PREFILL_ROW_BUDGET.max(1024));
    let long = MemoryPlan::for_generate(&c, 2, 1, 10_000, 16);
    assert_eq!(long.max_rows, 10_000);
}

#[test]
fn score_groups_and_plan() {
    // Items (prompt, completion): rows p + c − 1, logit rows c.
    let lens = vec![(10, 5), (3, 1), (5000, 10), (4000, 2), (20_000, 3)];
    let groups = score_groups(&lens);
    assert_eq!(groups, vec![vec![0, 1, 2], vec![3], vec![4]]);
    let gl: Vec<Vec<(usize, usize)>> = groups
        .iter()
        .map(|g| g.iter().map(|&i| lens[i]).collect())
        .collect();
    let n: PlanNeeds = MemoryPlan::for_score(&gl);
    assert_eq!(n.max_rows, 20_002);
    assert_eq!(n.max_seqs, 3);
    assert_eq!(n.max_logit_rows, 16);
    assert_eq!(n.num_pages, 20_002usize.div_ceil(16));
    assert_eq!(n.max_pages_per_seq, 20_002usize.div_ceil(16));
    assert!(!n.decode);
}
