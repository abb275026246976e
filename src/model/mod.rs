//! Everything read from a Hugging Face model directory: `config.json` (+ generation_config),
//! safetensors weights through mmap (single file or shards), the tokenizer and chat template.

pub mod chat;
pub mod config;
pub mod tokenizer;
pub mod weights;
