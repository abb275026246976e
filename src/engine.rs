//! What the GRPO loop and the CLI need from a backend: rollouts (G samples per prompt,
//! prompt prefilled once and its KV shared), teacher-forced log-probabilities, and the live
//! adapter. Implemented by the CPU reference ([`crate::cpu::engine::CpuEngine`]) and, where
//! built and present, by the CUDA engine.

use crate::error::Result;
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
    /// prompt i is `i · num_samples + g`, so results do not depend on how the engine batches.
    /// Output order: prompt-major, then sample index.
    fn generate(
        &mut self,
        prompts: &[Vec<u32>],
        num_samples: usize,
        params: &SamplingParams,
        stop: &StopCriteria,
        decode: Option<Decode<'_>>,
    ) -> Result<Vec<Rollout>>;

    /// log p(completion[j] | prompt, completion[..j]) at `temperature` (logits / T), per item.
    fn score(&mut self, items: &[(Vec<u32>, Vec<u32>)], temperature: f32) -> Result<Vec<Vec<f32>>>;
}
