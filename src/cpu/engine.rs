//! The CPU reference engine: batched generation with per-sequence KV caches (each prompt
//! prefilled once, its cache cloned for its G samples; at most `max_batch_seqs` sequences decode
//! together, a prompt's samples in slices when G exceeds it) and teacher-forced scoring.
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

/// One sequence being decoded: its own copy of its prompt's cache, the tokens so far, and the
/// prompt's prefill logits (which give its first token).
struct Seq<'a> {
    cache: KvCache,
    prompt_index: usize,
    sample_index: usize,
    ids: Vec<u32>,
    logprobs: Vec<f32>,
    done: Option<FinishReason>,
    first_logits: &'a [f32],
}

impl CpuEngine {
    /// Decodes `seqs` together until each stops; sample g of prompt i draws from stream
    /// `params.first_stream + i · num_samples + g`.
    fn decode_together(
        &self,
        mut seqs: Vec<Seq<'_>>,
        num_samples: usize,
        params: &SamplingParams,
        stop: &StopCriteria,
        decode: Option<Decode<'_>>,
        sampler: &mut Sampler,
    ) -> Result<Vec<Rollout>> {
        let ctx = self.model.config.max_position_embeddings;
        let vocab = self.model.config.vocab_size;
        let mut step_logits: Vec<&[f32]> = seqs.iter().map(|s| s.first_logits).collect();
        let mut decoded: Vec<f32>;
        let mut active: Vec<usize> = (0..seqs.len()).collect();
        loop {
            // Sample one token for every active sequence.
            for (ai, &si) in active.iter().enumerate() {
                let seq = &mut seqs[si];
                let stream = params.first_stream + (seq.prompt_index * num_samples + seq.sample_index) as u64;
                let step = seq.ids.len() as u64;
                let sampled = sampler.sample(step_logits[ai], params, stream, step)?;
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
            decoded = self
                .model
                .forward(&mut refs, &toks, self.adapter.as_ref(), LogitsFor::LastPerSeq);
            step_logits = decoded.chunks_exact(vocab).collect();
        }
        Ok(seqs
            .into_iter()
            .map(|s| Rollout {
                prompt_index: s.prompt_index,
                sample_index: s.sample_index,
                completion_ids: s.ids,
                logprobs: s.logprobs,
                finish_reason: s.done.unwrap_or(FinishReason::Length),
            })
            .collect())
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
        let g = num_samples;
        // Whole prompts while they fit the batch, else slices of one prompt's G samples: the
        // slices of a prompt share its one prefill (each clones the cache), and every sample
        // keeps its own random stream, so the split changes no sample.
        let prompts_per_chunk = (self.max_batch_seqs / g).max(1);
        let samples_per_slice = g.min(self.max_batch_seqs);
        let total = prompts.len().saturating_mul(g);
        let mut out = Vec::new();
        out.try_reserve_exact(total).map_err(|_| {
            Error::invalid(format!(
                "{} prompts × num_samples {g}: {total} sequences do not fit in memory",
                prompts.len()
            ))
        })?;
        let mut sampler = Sampler::new();
        let vocab = self.model.config.vocab_size;
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
            for first_sample in (0..g).step_by(samples_per_slice) {
                let samples = first_sample..(first_sample + samples_per_slice).min(g);
                // Each prompt's cache and prefill logits shared with the slice's samples.
                let seqs = prefill
                    .iter()
                    .enumerate()
                    .flat_map(|(pi, cache)| {
                        let row = &logits[pi * vocab..(pi + 1) * vocab];
                        samples.clone().map(move |si| Seq {
                            cache: cache.clone(),
                            prompt_index: first_prompt + pi,
                            sample_index: si,
                            ids: Vec::new(),
                            logprobs: Vec::new(),
                            done: None,
                            first_logits: row,
                        })
                    })
                    .collect();
                out.extend(self.decode_together(seqs, g, params, stop, decode, &mut sampler)?);
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
