//! Parity of the CPU reference engine with Hugging Face transformers on the tiny fixture
//! checkpoints (tests/fixtures/models/*, made by scripts/make_fixtures.py): one per family
//! and config style (llama: old keys, llama3 RoPE, 2 shards, untied; qwen2: new keys, bf16,
//! biases, tied; qwen3: f16, q/k norm, head_dim ≠ hidden/heads; mistral: sliding window).
//!
//! Tolerance: 1e-4 absolute on logits and log-probabilities. The expectations are f32
//! forward passes of the same f32 weights (bf16/f16 on disk are exactly representable in
//! f32), so the only differences are summation order in GEMMs and softmax; over 2 layers of
//! width 64 these stay around 1e-6 — 1e-4 leaves a wide margin while any real bug (a wrong
//! norm, bias, RoPE frequency or mask) moves logits by 1e-2 or more. Greedy tokens must be
//! identical: the fixtures were drawn so every step's top-2 logit margin exceeds 0.02.

use rft::cpu::engine::CpuEngine;
use rft::cpu::model::{KvCache, LogitsFor};
use rft::engine::Engine;
use rft::sampling::{FinishReason, SamplingParams, StopCriteria};
use serde_json::Value;
use std::path::PathBuf;

const MODELS: [&str; 4] = ["llama", "qwen2", "qwen3", "mistral"];
const TOL: f32 = 1e-4;

fn root() -> PathBuf {
    std::env::var("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("."))
}

fn model_dir(name: &str) -> PathBuf {
    root().join("tests/fixtures/models").join(name)
}

fn expected(name: &str) -> Value {
    let p = model_dir(name).join("expected.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// max |a − b|, NaN when any difference is NaN (`f32::max` skips NaN, so a NaN logit would
/// otherwise pass every `d <= TOL` check).
fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, |m, d| if d.is_nan() || d > m { d } else { m })
}

fn prompts(e: &Value) -> Vec<Vec<u32>> {
    e["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| ids(&p["ids"]))
        .collect()
}

#[test]
fn eos_ids_are_the_union_of_config_and_generation_config() {
    for name in MODELS {
        let e = expected(name);
        let engine = CpuEngine::load(&model_dir(name)).unwrap();
        let mut got = engine.config().eos_token_ids.clone();
        got.sort();
        assert_eq!(got, ids(&e["eos_token_ids"]), "{name}");
    }
}

#[test]
fn last_prompt_logits_match_hf_unbatched_and_batched() {
    for name in MODELS {
        let e = expected(name);
        let engine = CpuEngine::load(&model_dir(name)).unwrap();
        let ps = prompts(&e);
        let want: Vec<Vec<f32>> = e["last_logits"].as_array().unwrap().iter().map(floats).collect();
        let v = engine.config().vocab_size;
        // One prompt at a time.
        for (p, w) in ps.iter().zip(&want) {
            let mut cache = KvCache::new(engine.config());
            let got = engine
                .model
                .forward(&mut [&mut cache], &[p], None, LogitsFor::LastPerSeq);
            let d = max_abs_diff(&got, w);
            assert!(d <= TOL, "{name}: unbatched last logits differ by {d}");
        }
        // All prompts in one batch (different lengths, no padding).
        let mut caches: Vec<KvCache> = ps.iter().map(|_| KvCache::new(engine.config())).collect();
        let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
        let toks: Vec<&[u32]> = ps.iter().map(|p| p.as_slice()).collect();
        let got = engine
            .model
            .forward(&mut refs, &toks, None, LogitsFor::LastPerSeq);
        for (i, w) in want.iter().enumerate() {
            let d = max_abs_diff(&got[i * v..(i + 1) * v], w);
            assert!(
                d <= TOL,
                "{name}: batched last logits of prompt {i} differ by {d}"
            );
        }
    }
}

fn greedy_stop(n: usize) -> StopCriteria {
    // No EOS: the fixtures' greedy continuations were computed without stopping.
    StopCriteria {
        eos_ids: vec![],
        stop_strings: vec![],
        max_new_tokens: n,
    }
}

#[test]
fn greedy_tokens_and_logprobs_match_hf_batched_and_unbatched() {
    let greedy = SamplingParams {
        temperature: 0.0,
        ..Default::default()
    };
    for name in MODELS {
        let e = expected(name);
        let mut engine = CpuEngine::load(&model_dir(name)).unwrap();
        let ps = prompts(&e);
        let n = e["n_generate"].as_u64().unwrap() as usize;
        let want_ids: Vec<Vec<u32>> = e["greedy"].as_array().unwrap().iter().map(ids).collect();
        let want_lp: Vec<Vec<f32>> = e["greedy_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(floats)
            .collect();
        for batch in [1usize, 64] {
            engine.max_batch_seqs = batch;
            let out = engine.generate(&ps, 1, &greedy, &greedy_stop(n), None).unwrap();
            assert_eq!(out.len(), ps.len());
            for (i, r) in out.iter().enumerate() {
                assert_eq!(r.prompt_index, i);
                assert_eq!(r.completion_ids, want_ids[i], "{name} prompt {i} (batch {batch})");
                let d = max_abs_diff(&r.logprobs, &want_lp[i]);
                assert!(d <= TOL, "{name} prompt {i}: greedy logprobs differ by {d}");
                assert_eq!(r.finish_reason, FinishReason::Length);
            }
        }
    }
}

/// Sampled rollouts do not depend on how the engine batches: whole prompts, several prompts
/// together, or slices of one prompt's G samples (max_batch_seqs below G), nor on which chunk of
/// the prompts a call gets (`first_stream` = the chunk's first prompt · G). Tokens are equal; the
/// log-probs are the same f32 forward on other row counts (within TOL).
#[test]
fn sampled_rollouts_do_not_depend_on_the_batch() {
    let params = SamplingParams {
        temperature: 1.0,
        top_p: 0.95,
        seed: 7,
        ..Default::default()
    };
    let g = 5;
    for name in MODELS {
        let e = expected(name);
        let mut engine = CpuEngine::load(&model_dir(name)).unwrap();
        let ps = prompts(&e);
        let stop = greedy_stop(6);
        engine.max_batch_seqs = 64;
        let whole = engine.generate(&ps, g, &params, &stop, None).unwrap();
        assert_eq!(whole.len(), ps.len() * g);
        let same = |got: &[rft::engine::Rollout], first_prompt: usize, how: &str| {
            for (a, b) in got.iter().zip(&whole[first_prompt * g..]) {
                assert_eq!(
                    (a.prompt_index + first_prompt, a.sample_index),
                    (b.prompt_index, b.sample_index),
                    "{name} ({how}): order"
                );
                assert_eq!(
                    a.completion_ids, b.completion_ids,
                    "{name} ({how}): prompt {} sample {}",
                    b.prompt_index, b.sample_index
                );
                let d = max_abs_diff(&a.logprobs, &b.logprobs);
                assert!(d <= TOL, "{name} ({how}): logprobs differ by {d}");
            }
        };
        // Samples differ from each other (else the comparison proves little).
        let distinct: std::collections::HashSet<_> = whole.iter().map(|r| &r.completion_ids).collect();
        assert!(
            distinct.len() > g,
            "{name}: only {} distinct samples",
            distinct.len()
        );
        for batch in [1, 2, 7, 2 * g] {
            engine.max_batch_seqs = batch;
            let got = engine.generate(&ps, g, &params, &stop, None).unwrap();
            assert_eq!(got.len(), whole.len());
            same(&got, 0, &format!("max_batch_seqs {batch}"));
        }
        engine.max_batch_seqs = 3;
        for k in 1..ps.len() {
            let chunk = SamplingParams {
                first_stream: (k * g) as u64,
                ..params
            };
            let got = engine.generate(&ps[k..], g, &chunk, &stop, None).unwrap();
            same(&got, k, &format!("prompts from {k} on"));
        }
    }
}

#[test]
fn teacher_forced_scores_match_hf() {
    for name in MODELS {
        let e = expected(name);
        let mut engine = CpuEngine::load(&model_dir(name)).unwrap();
        let s = &e["score"];
        let item = (ids(&s["prompt"]), ids(&s["completion"]));
        let got = engine.score(&[item.clone(), item], 1.0).unwrap();
        let want = floats(&s["logprobs"]);
        for g in &got {
            let d = max_abs_diff(g, &want);
            assert!(d <= TOL, "{name}: score logprobs differ by {d}");
        }
    }
}

#[test]
fn greedy_samples_equal_scores_of_their_own_tokens() {
    // Internal consistency: the logprobs generate reports are the teacher-forced ones.
    let e = expected("qwen3");
    let mut engine = CpuEngine::load(&model_dir("qwen3")).unwrap();
    let ps = prompts(&e);
    let params = SamplingParams {
        temperature: 0.8,
        top_k: 50,
        seed: 7,
        ..Default::default()
    };
    let out = engine.generate(&ps, 3, &params, &greedy_stop(10), None).unwrap();
    let items: Vec<(Vec<u32>, Vec<u32>)> = out
        .iter()
        .map(|r| (ps[r.prompt_index].clone(), r.completion_ids.clone()))
        .collect();
    let scores = engine.score(&items, 0.8).unwrap();
    for (r, s) in out.iter().zip(&scores) {
        let d = max_abs_diff(&r.logprobs, s);
        assert!(d <= TOL, "sampled logprobs vs scored differ by {d}");
    }
}
