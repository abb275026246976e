//! rft — reinforcement fine-tuning (GRPO over LoRA adapters) with hand-written CUDA kernels
//! behind a thin Rust driver, and a plain f32 CPU reference that is the oracle for them.
//!
//! Module map (see ../shared/DESIGN.md):
//! - [`model`]: Hugging Face config.json, safetensors (mmap, sharded), tokenizer + chat template.
//! - [`cpu`]: the f32 reference: ops forward/backward, the batched KV-cache engine.
//! - [`cuda`]: device, kernels compiled by build.rs, typed launchers.
//! - [`grader`]: graders (string, numeric, format, similarity, rank, json, sandboxed program,
//!   external JSON-lines, LLM judge, multi) and their TOML config.
//! - [`sampling`]: sampling parameters, the counter-based RNG, the sampler.
//! - [`error`]: the library's error type.
//! - [`engine`]: the [`engine::Engine`] trait both backends implement: rollouts and scores.
//! - [`trainer`]: the GRPO loop ([`trainer::run::Trainer`]), SFT, checkpoints, metrics.
//!
//! # As a rollout backend
//!
//! A frontend that brings its own loop uses the engines directly: G samples per prompt (the
//! prompt prefilled once), each with its log-probs at the sampling temperature, then
//! teacher-forced log-probs of any completion. The samples depend on the seed only, not on the
//! batch or the backend's chunking.
//!
//! ```
//! use rft::engine::Engine;
//! use rft::sampling::{SamplingParams, StopCriteria};
//! # fn main() -> rft::Result<()> {
//! let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/qwen2");
//! // The CUDA engine where a GPU and the kernels are there, else the CPU reference.
//! let mut engine: Box<dyn Engine> = match rft::cuda::availability() {
//!     Ok(()) => Box::new(rft::cuda::CudaEngine::load(&dir, 0)?),
//!     Err(_) => Box::new(rft::cpu::engine::CpuEngine::load(&dir)?),
//! };
//! // A PEFT adapter, read live by every later call (a new one needs no merge):
//! // engine.set_adapter(Some(rft::lora::peft::load(adapter_dir, engine.config())?));
//! let tok = rft::model::tokenizer::Tokenizer::from_dir(&dir)?;
//! let prompts = vec![tok.encode("12 + 7 =", false)?];
//! let params = SamplingParams { temperature: 1.0, top_p: 0.95, seed: 1, ..Default::default() };
//! let stop = StopCriteria {
//!     eos_ids: engine.config().eos_token_ids.clone(),
//!     stop_strings: vec![],
//!     max_new_tokens: 8,
//! };
//! let rollouts = engine.generate(&prompts, 4, &params, &stop, None)?;
//! assert_eq!(rollouts.len(), 4); // prompt-major, then sample index
//! let r = &rollouts[0];
//! println!("{:?}: {:?}", tok.decode(&r.completion_ids, true)?, r.finish_reason);
//! // Teacher-forced log-probs of a completion (the policy side of GRPO's ratio).
//! let scored = engine.score(&[(prompts[0].clone(), r.completion_ids.clone())], 1.0)?;
//! assert_eq!(scored[0].len(), r.completion_ids.len());
//! # Ok(()) }
//! ```

pub mod cpu;
pub mod cuda;
pub mod data;
pub mod engine;
pub mod error;
pub mod grader;
pub mod lora;
pub mod loss;
pub mod model;
pub mod optim;
pub mod sampling;
pub mod tensor;
pub mod trainer;

pub use error::{Error, Result};
