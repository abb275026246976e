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
