//! The CPU reference engine: batched generation with per-sequence KV caches (each prompt
//! prefilled once, its cache cloned for its G samples) and teacher-forced scoring.
//!
//! Plain by design: it is the oracle the CUDA engine's tokens and log-probabilities are
//! checked against.

use crate::cpu::model::{CpuModel, KvCache, LogitsFor};
use crate::engine::{Decode, Engine, Rollout};
use crate::error::{Error, Result};
use crate::lora::LoraWeights;
use crate::model::config::ModelConfig;
use crate::model::weights::{Checkpoint, Weights};
use crate::sampling::{FinishReason, Sampler, SamplingParams, StopCriteria};
use std::path::Path;

pub struct CpuEngine {
    pub model: CpuModel,
    pub adapter: Option<LoraWeights>,
    /// At most this many sequences decode together (memory bound, not a semantic knob).
    pub max_batch_seqs: usize,
}

impl CpuEngine {
    pub fn new(model: CpuModel) -> CpuEngine {
        CpuEngine {
            model,
            adapter: None,
            max_batch_seqs: 64,
        }
    }

    /// Loads config.json (+ generation_config.json) and the safetensors weights of `dir`.
    pub fn load(dir: &Path) -> Result<CpuEngine> {
        if !dir.is_dir() {
            let what = if dir.exists() {
                "is not a directory"
            } else {
                "does not exist"
            };
            return Err(Error::invalid(format!(
                "model directory {} {what}",
                dir.display()
            )));
        }
        let config = ModelConfig::from_dir(dir)?;
        let ckpt = Checkpoint::open(dir)?;
        let weights = Weights::load(&ckpt, &config)?;
        Ok(CpuEngine::new(CpuModel::new(config, weights)))
    }
}

impl Engine for CpuEngine {
    fn config(&self) -> &ModelConfig {
        &self.model.config
    }

    fn set_adapter(&mut self, adapter: Option<LoraWeights>) {
        self.adapter = adapter;
    }

    fn set_max_batch_seqs(&mut self, n: usize) {
        self.max_batch_seqs = n.max(1);
    }

    fn generate(
        &mut self,
        prompts: &[Vec<u32>],
        num_samples: usize,
        params: &SamplingParams,
        stop: &StopCriteria,
        decode: Option<Decode<'_>>,
    ) -> Result<Vec<Rollout>> {
        crate::engine::check_generate_request(&self.model.config, prompts, num_samples, params, stop)?;
        let ctx = self.model.config.max_position_embeddings;
        let g = num_samples;
        let prompts_per_chunk = (self.max_batch_seqs / g).max(1);
        let too_many = |n: usize| {
            Error::invalid(format!(
                "{} prompts × num_samples {g}: {n} sequences do not fit in memory",
                prompts.len()
            ))
        };
        let mut out = Vec::new();
        let total = prompts.len().saturating_mul(g);
        out.try_reserve_exact(total).map_err(|_| too_many(total))?;
        let mut sampler = Sampler::new();
        for (chunk_i, chunk) in prompts.chunks(prompts_per_chunk).enumerate() {
            let first_prompt = chunk_i * prompts_per_chunk;
            // Prefill every prompt of the chunk once.
            let mut prefill: Vec<KvCache> = chunk.iter().map(|_| KvCache::new(&self.model.config)).collect();
            let logits = {
                let mut refs: Vec<&mut KvCache> = prefill.iter_mut().collect();
                let toks: Vec<&[u32]> = chunk.iter().map(|p| p.as_slice()).collect();
                self.model
                    .forward(&mut refs, &toks, self.adapter.as_ref(), LogitsFor::LastPerSeq)
            };
            let vocab = self.model.config.vocab_size;
            // Share each prompt's cache with its G samples.
            struct Seq {
                cache: KvCache,
                prompt_index: usize,
                sample_index: usize,
                ids: Vec<u32>,
                logprobs: Vec<f32>,
                done: Option<FinishReason>,
            }
            let mut seqs: Vec<Seq> = Vec::new();
            let n = chunk.len().saturating_mul(g);
            seqs.try_reserve_exact(n).map_err(|_| too_many(n))?;
            for (pi, cache) in prefill.into_iter().enumerate() {
                for s in 0..g {
                    seqs.push(Seq {
                        cache: cache.clone(),
                        prompt_index: first_prompt + pi,
                        sample_index: s,
                        ids: Vec::new(),
                        logprobs: Vec::new(),
                        done: None,
                    });
                }
            }
            // The first token of every sample comes from its prompt's prefill logits.
            let mut step_logits: Vec<Vec<f32>> = seqs
                .iter()
                .map(|s| {
                    let pi = s.prompt_index - first_prompt;
                    logits[pi * vocab..(pi + 1) * vocab].to_vec()
                })
                .collect();
            let mut active: Vec<usize> = (0..seqs.len()).collect();
            loop {
                // Sample one token for every active sequence.
                for (ai, &si) in active.iter().enumerate() {
                    let seq = &mut seqs[si];
                    let stream = params.first_stream + (seq.prompt_index * g + seq.sample_index) as u64;
                    let step = seq.ids.len() as u64;
                    let sampled = sampler.sample(&step_logits[ai], params, stream, step)?;
                    seq.ids.push(sampled.token);
                    seq.logprobs.push(sampled.logprob);
                    let text = match (decode, stop.stop_strings.is_empty()) {
                        (Some(dec), false) => Some(dec(&seq.ids)),
                        _ => None,
                    };
                    seq.done = stop.check(sampled.token, seq.ids.len(), text.as_deref());
                    if seq.done.is_none() && seq.cache.len + 1 >= ctx {
                        seq.done = Some(FinishReason::Length); // the context is full
                    }
                }
                active.retain(|&si| seqs[si].done.is_none());
                if active.is_empty() {
                    break;
                }
                // One decode step for the still-active sequences.
                let last: Vec<[u32; 1]> = active.iter().map(|&si| [*seqs[si].ids.last().unwrap()]).collect();
                let toks: Vec<&[u32]> = last.iter().map(|t| t.as_slice()).collect();
                // `active` is ascending and holds exactly the sequences not yet done.
                let mut refs: Vec<&mut KvCache> = seqs
                    .iter_mut()
                    .filter(|s| s.done.is_none())
                    .map(|s| &mut s.cache)
                    .collect();
                let logits =
                    self.model
                        .forward(&mut refs, &toks, self.adapter.as_ref(), LogitsFor::LastPerSeq);
                step_logits = logits.chunks_exact(vocab).map(|r| r.to_vec()).collect();
            }
            for s in seqs {
                out.push(Rollout {
                    prompt_index: s.prompt_index,
                    sample_index: s.sample_index,
                    completion_ids: s.ids,
                    logprobs: s.logprobs,
                    finish_reason: s.done.unwrap_or(FinishReason::Length),
                });
            }
        }
        Ok(out)
    }

    fn score(&mut self, items: &[(Vec<u32>, Vec<u32>)], temperature: f32) -> Result<Vec<Vec<f32>>> {
        crate::engine::check_score_request(&self.model.config, items, temperature)?;
        let c = &self.model.config;
        let vocab = c.vocab_size;
        let mut out = Vec::with_capacity(items.len());
        for (p, comp) in items {
            if comp.is_empty() {
                out.push(Vec::new());
                continue;
            }
            // Rows P-1 .. P+C-2 predict the completion tokens.
            let seq: Vec<u32> = p.iter().chain(&comp[..comp.len() - 1]).copied().collect();
            let mut cache = KvCache::new(&self.model.config);
            let logits =
                self.model
                    .forward(&mut [&mut cache], &[&seq], self.adapter.as_ref(), LogitsFor::All);
            let lps = comp
                .iter()
                .enumerate()
                .map(|(j, &t)| {
                    let row = &logits[(p.len() - 1 + j) * vocab..(p.len() + j) * vocab];
                    let scaled: Vec<f32> = row.iter().map(|z| z / temperature).collect();
                    crate::cpu::ops::logprob_and_entropy(&scaled, t as usize).0
                })
                .collect();
            out.push(lps);
        }
        Ok(out)
    }
}
