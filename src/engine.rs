//! What the GRPO loop and the CLI need from a backend: rollouts (G samples per prompt,
//! prompt prefilled once and its KV shared), teacher-forced log-probabilities, and the live
//! adapter. Implemented by the CPU reference ([`crate::cpu::engine::CpuEngine`]) and, where
//! built and present, by the CUDA engine.

use crate::error::{Error, Result};
use crate::lora::LoraWeights;
use crate::model::config::ModelConfig;
use crate::sampling::{FinishReason, SamplingParams, StopCriteria};

/// One sampled completion of one prompt.
#[derive(Clone, Debug, PartialEq)]
pub struct Rollout {
    /// Index of the prompt in the request.
    pub prompt_index: usize,
    /// Which of the G samples of that prompt (0..G).
    pub sample_index: usize,
    pub completion_ids: Vec<u32>,
    /// log p(token) under the model at the sampling temperature (see `sampling`), per token.
    pub logprobs: Vec<f32>,
    pub finish_reason: FinishReason,
}

/// Turns completion ids into text (for stop strings); usually the tokenizer's decode.
pub type Decode<'a> = &'a (dyn Fn(&[u32]) -> String + Sync);

pub trait Engine {
    fn config(&self) -> &ModelConfig;

    /// Sets (or removes) the live LoRA adapter used by `generate` and `score`.
    fn set_adapter(&mut self, adapter: Option<LoraWeights>);

    /// At most `n` sequences decode together (a memory bound; results do not depend on it).
    fn set_max_batch_seqs(&mut self, n: usize);

    /// Samples `num_samples` completions for every prompt. The random stream of sample g of
    /// prompt i is `params.first_stream + i · num_samples + g`, so results do not depend on how
    /// the engine batches.
    /// Output order: prompt-major, then sample index.
    fn generate(
        &mut self,
        prompts: &[Vec<u32>],
        num_samples: usize,
        params: &SamplingParams,
        stop: &StopCriteria,
        decode: Option<Decode<'_>>,
    ) -> Result<Vec<Rollout>>;

    /// log p(completion\[j\] | prompt, completion[..j]) at `temperature` (logits / T), per item.
    fn score(&mut self, items: &[(Vec<u32>, Vec<u32>)], temperature: f32) -> Result<Vec<Vec<f32>>>;
}

/// The checks every engine makes on a `generate` request before touching the model.
pub fn check_generate_request(
    c: &ModelConfig,
    prompts: &[Vec<u32>],
    num_samples: usize,
    params: &SamplingParams,
    stop: &StopCriteria,
) -> Result<()> {
    params.validate()?;
    if num_samples == 0 {
        return Err(Error::invalid("num_samples must be at least 1"));
    }
    if stop.max_new_tokens == 0 {
        return Err(Error::invalid("max_new_tokens must be at least 1"));
    }
    for (i, p) in prompts.iter().enumerate() {
        check_prompt(c, i, p)?;
    }
    Ok(())
}

/// The checks every engine makes on a `score` request.
pub fn check_score_request(c: &ModelConfig, items: &[(Vec<u32>, Vec<u32>)], temperature: f32) -> Result<()> {
    if !(temperature > 0.0 && temperature.is_finite()) {
        return Err(Error::invalid(format!(
            "score temperature must be > 0, got {temperature}"
        )));
    }
    for (i, (p, comp)) in items.iter().enumerate() {
        check_prompt(c, i, p)?;
        if let Some(&bad) = comp.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(Error::invalid(format!(
                "item {i}: completion token id {bad} is outside the vocabulary of {} tokens",
                c.vocab_size
            )));
        }
        if p.len() + comp.len() > c.max_position_embeddings {
            return Err(Error::invalid(format!(
                "item {i}: prompt + completion = {} tokens exceed the model's context of {}",
                p.len() + comp.len(),
                c.max_position_embeddings
            )));
        }
    }
    Ok(())
}

/// A prompt must be non-empty, inside the vocabulary, and leave room for one new token.
pub fn check_prompt(c: &ModelConfig, i: usize, ids: &[u32]) -> Result<()> {
    if ids.is_empty() {
        return Err(Error::invalid(format!(
            "prompt {i} is empty (at least one token is needed)"
        )));
    }
    if let Some(&bad) = ids.iter().find(|&&t| t as usize >= c.vocab_size) {
        return Err(Error::invalid(format!(
            "prompt {i}: token id {bad} is outside the vocabulary of {} tokens",
            c.vocab_size
        )));
    }
    if ids.len() >= c.max_position_embeddings {
        return Err(Error::invalid(format!(
            "prompt {i} has {} tokens, longer than the model's context of {} \
             (max_position_embeddings) minus one generated token",
            ids.len(),
            c.max_position_embeddings
        )));
    }
    Ok(())
}
