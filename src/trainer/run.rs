//! The RFT loop behind `rft train`: prompts per step × G samples → grade (on worker threads,
//! overlapping generation) → advantages → policy update(s) → log → validate → save.
//!
//! [`TrainConfig`] is the TOML file (option names follow TRL's GRPOConfig where the meaning is
//! the same). [`Trainer`] is the library API: build it from a config, or from your own model,
//! dataset and [`Grader`] with [`Trainer::new`], then call [`Trainer::run`] or drive
//! [`Trainer::step`] / [`Trainer::evaluate`] yourself.
//!
//! A custom reward and a hand-built dataset, trained for two steps on the tiny model:
//!
//! ```
//! use rft::cpu::engine::CpuEngine;
//! use rft::data::{Dataset, Item, PromptSpec};
//! use rft::grader::{GradeResult, Grader, Sample};
//! use rft::model::tokenizer::Tokenizer;
//! use rft::trainer::run::{TrainConfig, Trainer};
//! use std::sync::Arc;
//!
//! /// 1 when the completion is the row's `answer`, 0.5 for a number, else 0.
//! struct Sum;
//!
//! impl Grader for Sum {
//!     fn name(&self) -> &str {
//!         "sum"
//!     }
//!     fn grade(&self, s: &Sample) -> GradeResult {
//!         let got = s.completion.trim();
//!         let score = if Some(got) == s.item["answer"].as_str() {
//!             1.0
//!         } else if got.parse::<i64>().is_ok() {
//!             0.5
//!         } else {
//!             0.0
//!         };
//!         GradeResult::ok(score).with("is_number", got.parse::<i64>().is_ok())
//!     }
//! }
//!
//! # fn main() -> rft::Result<()> {
//! let model = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/models/tiny"));
//! let rows = |range: std::ops::Range<i64>| {
//!     Dataset::new(
//!         range
//!             .map(|a| {
//!                 let mut extra = serde_json::Map::new();
//!                 extra.insert("answer".into(), (a + 17).to_string().into());
//!                 Item::new(PromptSpec::Text(format!("{a}+17=")), extra)
//!             })
//!             .collect(),
//!     )
//! };
//! let out = tempfile::tempdir().unwrap();
//! let config = TrainConfig {
//!     max_steps: 2,
//!     prompts_per_step: 4,
//!     num_generations: 4,
//!     max_completion_length: 4,
//!     learning_rate: 3e-3,
//!     output_dir: Some(out.path().to_path_buf()),
//!     ..TrainConfig::default()
//! };
//! let mut trainer = Trainer::new(
//!     CpuEngine::load(model)?,
//!     Tokenizer::from_dir(model)?,
//!     rows(10..40),  // training prompts
//!     rows(60..68),  // validation prompts
//!     Arc::new(Sum),
//!     config,
//!     "",            // the config's text, kept in checkpoints (none here)
//! )?;
//! // Either drive it step by step ...
//! let rec = trainer.step()?;
//! assert_eq!(rec.reward_per_grader.keys().collect::<Vec<_>>(), ["sum"]);
//! assert!((0.0..=1.0).contains(&rec.reward_mean));
//! // ... or run to max_steps: validation, metrics.jsonl, adapters, plot.png, summary.json.
//! let summary = trainer.run(&std::sync::atomic::AtomicBool::new(false), false)?;
//! assert_eq!(summary.steps, 2);
//! assert!(out.path().join("adapter_last/adapter_model.safetensors").exists());
//! # Ok(())
//! # }
//! ```
//!
//! Everything random is derived from (seed, step): rollout sampling seeds, the prompt order
//! (a seeded per-epoch permutation) and LoRA dropout, so a run resumed from a checkpoint
//! continues exactly as if it had never stopped.

use crate::cpu::engine::CpuEngine;
use crate::cpu::train::Recompute;
use crate::cuda::{CudaEngine, CudaTrainer};
use crate::data::dataset::{Dataset, Item, PromptSampler, SamplerState};
use crate::data::input::{encode_prompt, PromptSpec};
use crate::data::tasks::TaskConfig;
use crate::engine::{Engine, Rollout};
use crate::error::{Error, Result};
use crate::grader::{grade_batch, GradeResult, Grader, GraderConfig, Sample};
use crate::lora::{peft, LoraConfig, LoraWeights};
use crate::loss::{GrpoLossConfig, KlEstimator, LossType, ScaleRewards};
use crate::model::tokenizer::Tokenizer;
use crate::optim::{AdamW, LrSchedule, SchedulerType, Warmup};
use crate::sampling::{FinishReason, SamplingParams, StopCriteria};
use crate::trainer::metrics::{EvalRecord, MetricsLog, Record, Summary, TrainRecord};
use crate::trainer::state::{
    base_model_fingerprint, load_checkpoint, save_checkpoint, TrainState, Trainable,
};
use crate::trainer::step::{grpo_update, micro_ranges, GrpoBatch, GrpoOptions, GrpoSeq};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// `[model]`: the base model and what is trained.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// Hugging Face model directory (relative paths: to the config file's directory).
    pub path: PathBuf,
    /// Start from this PEFT adapter instead of a fresh one.
    #[serde(default)]
    pub adapter: Option<PathBuf>,
    /// Train every weight instead of a LoRA adapter (small models; requires beta = 0).
    #[serde(default)]
    pub full_fine_tuning: bool,
}

/// `[lora]`: the adapter (PEFT's names accepted as aliases).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraSection {
    pub r: usize,
    #[serde(alias = "lora_alpha")]
    pub alpha: f32,
    #[serde(alias = "lora_dropout")]
    pub dropout: f32,
    /// A list of module names (`q_proj` … `down_proj`) or "all-linear".
    pub target_modules: toml::Value,
    pub use_rslora: bool,
}

impl Default for LoraSection {
    fn default() -> Self {
        LoraSection {
            r: 16,
            alpha: 32.0,
            dropout: 0.0,
            target_modules: toml::Value::String("all-linear".into()),
            use_rslora: false,
        }
    }
}

/// Where rollouts and updates run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    Cpu,
    Cuda,
    #[default]
    Auto,
}

/// The whole `rft train` configuration. Top-level keys are TRL GRPOConfig names.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub model: Option<ModelSection>,
    pub data: TaskConfig,
    /// A grader table (`type = "..."`); built-in tasks bring their own checker when absent.
    pub grader: Option<toml::Value>,
    pub lora: LoraSection,

    pub num_generations: usize,
    /// Prompts drawn per step (each sampled `num_generations` times).
    pub prompts_per_step: usize,
    pub max_prompt_length: usize,
    pub max_completion_length: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub min_p: f32,
    /// Extra stop strings (the model's EOS tokens always stop).
    pub stop: Vec<String>,

    pub learning_rate: f64,
    pub lr_scheduler_type: SchedulerType,
    pub warmup_ratio: f64,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub max_grad_norm: f32,

    pub beta: f64,
    pub epsilon: f64,
    pub epsilon_high: Option<f64>,
    pub loss_type: LossType,
    pub kl_estimator: KlEstimator,
    pub scale_rewards: ScaleRewards,
    pub num_iterations: usize,
    pub gradient_accumulation_steps: usize,
    /// Sequences per forward/backward (0: from gradient_accumulation_steps).
    pub micro_batch_size: usize,
    /// Recompute each layer's activations in the backward (less memory, more time).
    pub gradient_checkpointing: bool,
    /// With gradient_checkpointing on the GPU: keep the last K layers' activations anyway (their
    /// backward skips the recompute; K layers' activations more memory). Same results.
    pub gradient_checkpointing_keep_layers: usize,
    /// GPU: cap the training step's device memory (activations, backward scratch, lm_head chunk,
    /// trained f32 state; not the bf16 weights nor the rollout KV cache) at this many GiB. A step
    /// whose micro-batching / gradient_checkpointing does not fit (the cap, or the free device
    /// memory) runs with smaller micro-batches, then with layer recompute (see
    /// `cuda::train::fit_layout`; results are the same up to float summation order, except LoRA
    /// dropout masks, drawn per micro-batch). 0: no cap beyond the free memory.
    pub max_train_memory_gib: f64,
    /// DAPO's dynamic sampling: drop groups whose rewards are all equal and draw more prompts.
    pub dynamic_sampling: bool,
    /// At most this many extra draws per step when dynamic sampling refills the batch.
    pub max_resample_rounds: usize,

    pub max_steps: usize,
    pub seed: u64,
    /// Validate every N steps (0: only at the start and the end).
    pub eval_steps: usize,
    /// Validation prompts used (0: all).
    pub eval_num_prompts: usize,
    /// Save a resumable checkpoint every N steps (0: only at the end).
    pub save_steps: usize,
    /// A completion is "correct" when its reward reaches this.
    pub accuracy_threshold: f32,
    pub grader_threads: usize,
    /// Sequences decoded together by the rollout engine: whole prompts' G samples while they
    /// fit, else slices of one prompt's samples. Changes no sample (per-sample streams).
    pub rollout_batch_size: usize,
    pub output_dir: Option<PathBuf>,
    pub device: Device,
}

/// A GiB budget (`max_train_memory_gib`, `--max-train-memory-gib`) in bytes: None for 0 (no
/// cap); an error for a negative or non-finite value.
pub fn memory_budget_bytes(gib: f64) -> Result<Option<usize>> {
    if !(gib >= 0.0 && gib.is_finite()) {
        return Err(Error::invalid(format!(
            "a memory budget must be a number of GiB ≥ 0 (0: no cap), got {gib}"
        )));
    }
    Ok((gib > 0.0).then_some((gib * (1u64 << 30) as f64) as usize))
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model: None,
            data: TaskConfig::default(),
            grader: None,
            lora: LoraSection::default(),
            num_generations: 8,
            prompts_per_step: 8,
            max_prompt_length: 512,
            max_completion_length: 256,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            stop: Vec::new(),
            learning_rate: 1e-5,
            lr_scheduler_type: SchedulerType::Constant,
            warmup_ratio: 0.0,
            warmup_steps: 0,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_grad_norm: 1.0,
            beta: 0.0,
            epsilon: 0.2,
            epsilon_high: None,
            loss_type: LossType::Dapo,
            kl_estimator: KlEstimator::K3,
            scale_rewards: ScaleRewards::Group,
            num_iterations: 1,
            gradient_accumulation_steps: 1,
            micro_batch_size: 0,
            gradient_checkpointing: false,
            gradient_checkpointing_keep_layers: 0,
            max_train_memory_gib: 0.0,
            dynamic_sampling: false,
            max_resample_rounds: 4,
            max_steps: 100,
            seed: 42,
            eval_steps: 10,
            eval_num_prompts: 0,
            save_steps: 0,
            accuracy_threshold: 1.0,
            grader_threads: 2,
            rollout_batch_size: 64,
            output_dir: None,
            device: Device::Auto,
        }
    }
}

impl TrainConfig {
    /// Parses TOML; unknown keys and wrong types are errors naming the key.
    pub fn from_toml_str(text: &str, origin: &Path) -> Result<TrainConfig> {
        let cfg: TrainConfig =
            toml::from_str(text).map_err(|e| Error::config(origin, toml_error(text, &e)))?;
        cfg.validate(origin)?;
        Ok(cfg)
    }

    /// Checks every value a user can get wrong, naming the key.
    pub fn validate(&self, origin: &Path) -> Result<()> {
        let bad = |key: &str, msg: String| Err(Error::config(origin, format!("`{key}`: {msg}")));
        if self.model.is_none() {
            return bad("model", "a [model] table with `path` is required".into());
        }
        if self.num_generations < 2 {
            return bad(
                "num_generations",
                format!(
                    "must be ≥ 2 (GRPO compares siblings), got {}",
                    self.num_generations
                ),
            );
        }
        if self.prompts_per_step == 0 {
            return bad("prompts_per_step", "must be ≥ 1".into());
        }
        if self.max_completion_length == 0 {
            return bad("max_completion_length", "must be ≥ 1".into());
        }
        if self.max_prompt_length == 0 {
            return bad("max_prompt_length", "must be ≥ 1".into());
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return bad(
                "temperature",
                format!("rollouts need temperature > 0, got {}", self.temperature),
            );
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return bad(
                "learning_rate",
                format!("must be > 0, got {}", self.learning_rate),
            );
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return bad(
                "warmup_ratio",
                format!("must be in [0, 1), got {}", self.warmup_ratio),
            );
        }
        if !(self.beta >= 0.0 && self.beta.is_finite()) {
            return bad("beta", format!("must be ≥ 0, got {}", self.beta));
        }
        if !(self.epsilon >= 0.0 && self.epsilon < 1.0) {
            return bad("epsilon", format!("must be in [0, 1), got {}", self.epsilon));
        }
        if let Some(h) = self.epsilon_high {
            if !(h >= 0.0 && h.is_finite()) {
                return bad("epsilon_high", format!("must be ≥ 0, got {h}"));
            }
        }
        if self.num_iterations == 0 {
            return bad("num_iterations", "must be ≥ 1".into());
        }
        if self.gradient_accumulation_steps == 0 {
            return bad("gradient_accumulation_steps", "must be ≥ 1".into());
        }
        if self.max_steps == 0 {
            return bad("max_steps", "must be ≥ 1".into());
        }
        for (key, x, ok) in [
            (
                "adam_beta1",
                self.adam_beta1,
                (0.0..1.0).contains(&self.adam_beta1),
            ),
            (
                "adam_beta2",
                self.adam_beta2,
                (0.0..1.0).contains(&self.adam_beta2),
            ),
        ] {
            if !ok {
                return bad(key, format!("must be in [0, 1), got {x}"));
            }
        }
        if !(self.adam_epsilon > 0.0 && self.adam_epsilon.is_finite()) {
            // eps = 0 divides 0 by 0 wherever a gradient is still 0 (LoRA's A at the start).
            return bad("adam_epsilon", format!("must be > 0, got {}", self.adam_epsilon));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return bad("weight_decay", format!("must be ≥ 0, got {}", self.weight_decay));
        }
        if !self.accuracy_threshold.is_finite() {
            return bad(
                "accuracy_threshold",
                format!("must be a finite reward, got {}", self.accuracy_threshold),
            );
        }
        if self.stop.iter().any(String::is_empty) {
            return bad("stop", "an empty stop string matches nothing; remove it".into());
        }
        if self.max_grad_norm.is_nan() || self.max_grad_norm < 0.0 {
            return bad(
                "max_grad_norm",
                format!("must be ≥ 0 (0: no clipping), got {}", self.max_grad_norm),
            );
        }
        if self.lora.r == 0 {
            return bad("lora.r", "must be ≥ 1".into());
        }
        if self.lora.alpha.is_nan() || self.lora.alpha <= 0.0 {
            return bad("lora.alpha", format!("must be > 0, got {}", self.lora.alpha));
        }
        if !(0.0..1.0).contains(&self.lora.dropout) {
            return bad(
                "lora.dropout",
                format!("must be in [0, 1), got {}", self.lora.dropout),
            );
        }
        memory_budget_bytes(self.max_train_memory_gib)
            .map_err(|m| Error::config(origin, format!("`max_train_memory_gib`: {m}")))?;
        if self.rollout_batch_size == 0 {
            return bad("rollout_batch_size", "must be ≥ 1".into());
        }
        if self.grader_threads == 0 {
            return bad("grader_threads", "must be ≥ 1".into());
        }
        if self.model.as_ref().is_some_and(|m| m.full_fine_tuning) && self.beta > 0.0 {
            return bad(
                "beta",
                "full fine-tuning has no frozen reference: set beta = 0".into(),
            );
        }
        // The data keys (built-in task options, split keys) are checked here too, so their
        // errors name this file (a missing [data] is reported after the model's problems).
        if self.data.task.is_some() || self.data.path.is_some() {
            self.data
                .task()
                .map_err(|e| Error::config(origin, e.to_string()))?;
        }
        if self.data.num_train == Some(0) {
            return bad("data.num_train", "must be ≥ 1".into());
        }
        self.sampling(0)
            .validate()
            .map_err(|e| Error::config(origin, e.to_string()))?;
        self.lora_config()
            .map_err(|m| Error::config(origin, format!("`lora.target_modules`: {m}")))?;
        Ok(())
    }

    fn lora_config(&self) -> std::result::Result<LoraConfig, String> {
        let v = serde_json::to_value(&self.lora.target_modules).map_err(|e| e.to_string())?;
        Ok(LoraConfig {
            r: self.lora.r,
            alpha: self.lora.alpha,
            dropout: self.lora.dropout,
            use_rslora: self.lora.use_rslora,
            target_modules: peft::parse_targets(&v)?,
        })
    }

    /// Sampling parameters of step `step` (a fresh seed per step, derived from `seed`).
    fn sampling(&self, step: u64) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            seed: mix(self.seed, step),
            first_stream: 0,
        }
    }

    /// Why this config cannot train on the GPU yet (None: it can).
    pub fn cuda_unsupported(&self) -> Option<String> {
        // Every option of the training step runs on the GPU (LoRA dropout and full fine-tuning
        // included); kept as the one place to refuse a future CPU-only option.
        let _ = self;
        None
    }

    fn grpo_options(&self) -> Result<GrpoOptions> {
        let warmup = Warmup::from_config(self.warmup_steps, self.warmup_ratio);
        let schedule = LrSchedule::new(
            self.lr_scheduler_type,
            self.learning_rate,
            self.max_steps * self.num_iterations,
            warmup,
        )?;
        Ok(GrpoOptions {
            loss: GrpoLossConfig {
                loss_type: self.loss_type,
                beta: self.beta,
                epsilon: self.epsilon,
                epsilon_high: self.epsilon_high,
                kl_estimator: self.kl_estimator,
                max_completion_length: self.max_completion_length,
            },
            scale_rewards: self.scale_rewards,
            num_iterations: self.num_iterations,
            micro_batch_size: self.micro_batch_size,
            gradient_accumulation_steps: self.gradient_accumulation_steps,
            max_grad_norm: self.max_grad_norm,
            temperature: self.temperature,
            recompute: if self.gradient_checkpointing {
                Recompute::Layer
            } else {
                Recompute::None
            },
            chunk_rows: 64,
            full_fine_tuning: self.model.as_ref().is_some_and(|m| m.full_fine_tuning),
            // The loop refills zero-std groups itself; the update never drops sequences.
            dynamic_sampling: false,
            optimizer: AdamW {
                lr: self.learning_rate,
                betas: (self.adam_beta1, self.adam_beta2),
                eps: self.adam_epsilon,
                weight_decay: self.weight_decay,
            },
            schedule,
        })
    }
}

/// One line for a TOML error: where (line, enclosing `[table]`, the line itself) and what.
fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().trim_end().replace('\n', " ");
    let Some(span) = e.span() else {
        return msg;
    };
    let start = span.start.min(text.len());
    let before = &text[..start];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
    let source = text[line_start..line_end].trim();
    let table = before
        .lines()
        .rev()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .find(|l| l.starts_with('[') && l.ends_with(']') && !l.contains('='));
    let table = table.map(|t| format!(" in {t}")).unwrap_or_default();
    format!("line {line}{table} (`{source}`): {msg}")
}

/// splitmix64 of (seed, k): independent per-step / per-chunk seeds.
fn mix(seed: u64, k: u64) -> u64 {
    let mut z = seed
        ^ k.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(0x632B_E59B_D9B4_E019);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The checker of a built-in task (countdown, arithmetic) as a [`Grader`].
pub struct TaskGrader;

impl Grader for TaskGrader {
    fn name(&self) -> &str {
        "task"
    }
    fn grade(&self, s: &Sample) -> GradeResult {
        match crate::data::tasks::score_item(&s.item, &s.completion) {
            Ok(x) => GradeResult::ok(x),
            Err(e) => GradeResult::fail(e.to_string()),
        }
    }
}

/// A prompt ready for the engine and for graders.
struct Prompt {
    ids: Vec<u32>,
    /// What graders see as the prompt (raw text or the rendered chat).
    text: String,
}

/// The GPU side of a run: the rollout engine (with the live adapter) and the update.
struct CudaBackend {
    engine: CudaEngine,
    trainer: CudaTrainer,
}

/// The GRPO trainer. Owns the engine (with the live adapter), the data and the grader.
pub struct Trainer {
    pub config: TrainConfig,
    /// The config as written (saved in checkpoints so `--resume` needs nothing else).
    config_text: String,
    /// Where the config's relative paths start (saved in checkpoints for `--resume`).
    base_dir: Option<PathBuf>,
    base_model: String,
    /// [`base_model_fingerprint`] of the base model directory (None: built by [`Trainer::new`]
    /// from an engine, whose directory is unknown); kept in checkpoints, checked on resume.
    base_fingerprint: Option<String>,
    /// The host model and adapter: the CPU backend, and the copy checkpoints are written from.
    engine: CpuEngine,
    /// Rollouts and updates on the GPU (then `engine`'s adapter is refreshed before saves).
    cuda: Option<CudaBackend>,
    tok: Tokenizer,
    train: Vec<(Item, Prompt)>,
    val: Vec<(Item, Prompt)>,
    grader: Arc<dyn Grader>,
    /// Names of the sub-scores logged per grader.
    grader_parts: Vec<String>,
    sampler: PromptSampler,
    state: TrainState,
    opts: GrpoOptions,
    pub output_dir: PathBuf,
    log: Option<MetricsLog>,
    best_val: Option<f64>,
    rollout_tokens: u64,
    train_tokens: u64,
    truncated_prompts: usize,
}

impl Trainer {
    /// Builds a trainer from a parsed config; relative paths resolve against `base_dir`.
    pub fn from_config(config: TrainConfig, config_text: &str, base_dir: &Path) -> Result<Trainer> {
        let m = config
            .model
            .clone()
            .ok_or_else(|| Error::invalid("config: [model] path is required"))?;
        let model_dir = resolve(base_dir, &m.path);
        let use_cuda = match config.device {
            Device::Cpu => false,
            Device::Cuda => {
                crate::cuda::availability().map_err(|why| {
                    Error::CudaUnavailable(format!("device = \"cuda\": {why}; use device = \"cpu\""))
                })?;
                config.cuda_unsupported().map_or(Ok(()), |why| {
                    Err(Error::invalid(format!("device = \"cuda\": {why}")))
                })?;
                true
            }
            Device::Auto => crate::cuda::availability().is_ok() && config.cuda_unsupported().is_none(),
        };
        let engine = CpuEngine::load(&model_dir)?;
        let tok = Tokenizer::from_dir(&model_dir)?;
        let splits = config.data.load(base_dir)?;
        let (grader, parts): (Arc<dyn Grader>, Vec<String>) =
            match &config.grader {
                Some(v) => {
                    let gc = GraderConfig::from_toml_value(v.clone())?;
                    let parts = match &gc {
                        GraderConfig::Multi(mc) => mc.graders.keys().cloned().collect(),
                        _ => vec![],
                    };
                    (Arc::from(crate::grader::build(&gc)?), parts)
                }
                None if splits.task.is_some() => (Arc::new(TaskGrader), vec![]),
                None => return Err(Error::invalid(
                    "config: a [grader] table is required for a dataset file (built-in tasks have their own)",
                )),
            };
        if let Some(g) = &config.grader {
            check_item_fields(g, &splits.train, "training")?;
            check_item_fields(g, &splits.val, "validation")?;
        }
        let mut t = Trainer::new(engine, tok, splits.train, splits.val, grader, config, config_text)?;
        t.grader_parts = parts;
        t.base_model = model_dir.display().to_string();
        t.base_fingerprint = Some(base_model_fingerprint(&model_dir)?);
        let base = if base_dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            base_dir
        };
        t.base_dir = Some(std::path::absolute(base).unwrap_or_else(|_| base.to_path_buf()));
        if let Some(a) = &m.adapter {
            let dir = resolve(base_dir, a);
            let lora = peft::load(&dir, t.engine.config())?;
            t.engine.set_adapter(Some(lora));
        }
        if use_cuda {
            t.enable_cuda(0)?;
        }
        Ok(t)
    }

    /// Moves rollouts and updates to CUDA device `ordinal`: a [`CudaEngine`] made from the host
    /// model's weights (bf16) with the current adapter live on it, and a [`CudaTrainer`] with
    /// the current AdamW state (of the adapter, or with full fine-tuning of every weight). The
    /// host copies (`engine()`) are refreshed from the device before every save.
    pub fn enable_cuda(&mut self, ordinal: usize) -> Result<()> {
        if let Some(why) = self.config.cuda_unsupported() {
            return Err(Error::invalid(format!("CUDA training: {why}")));
        }
        let mut engine =
            CudaEngine::from_weights(self.engine.config().clone(), &self.engine.model.weights, ordinal)?;
        engine.set_max_batch_seqs(self.config.rollout_batch_size);
        let trainer = self.cuda_trainer(&mut engine)?;
        self.cuda = Some(CudaBackend { engine, trainer });
        Ok(())
    }

    /// A [`CudaTrainer`] of the host's trained parameters (the adapter, or every weight with
    /// full fine-tuning) and AdamW state, on `engine`.
    fn cuda_trainer(&self, engine: &mut CudaEngine) -> Result<CudaTrainer> {
        let mut trainer = if self.opts.full_fine_tuning {
            CudaTrainer::new_full(engine, &self.engine.model.weights, &self.state.adam)?
        } else {
            let lora = self
                .engine
                .adapter
                .as_ref()
                .ok_or_else(|| Error::invalid("CUDA training needs a LoRA adapter"))?;
            CudaTrainer::new(engine, lora, &self.state.adam)?
        };
        trainer.set_keep_layers(self.config.gradient_checkpointing_keep_layers);
        trainer.set_memory_budget(memory_budget_bytes(self.config.max_train_memory_gib)?);
        Ok(trainer)
    }

    /// "cpu" or "cuda": where rollouts and updates run.
    pub fn device(&self) -> &'static str {
        if self.cuda.is_some() {
            "cuda"
        } else {
            "cpu"
        }
    }

    /// Copies the adapter (full fine-tuning: the weights) and the AdamW moments from the GPU
    /// into the host copies (no-op on the CPU).
    fn sync_host(&mut self) -> Result<()> {
        if let Some(c) = &self.cuda {
            if c.trainer.full_fine_tuning() {
                c.trainer
                    .download_weights(&c.engine, &mut self.engine.model.weights)?;
            } else if let Some(l) = self.engine.adapter.as_mut() {
                c.trainer.download_lora(&c.engine, l)?;
            }
            c.trainer.download_adam(&c.engine, &mut self.state.adam)?;
        }
        Ok(())
    }

    /// The embeddable constructor: your engine (model), tokenizer, datasets and grader.
    /// `config.model` may be `None` here; `config.data` is ignored.
    pub fn new(
        mut engine: CpuEngine,
        tok: Tokenizer,
        train: Dataset,
        val: Dataset,
        grader: Arc<dyn Grader>,
        config: TrainConfig,
        config_text: &str,
    ) -> Result<Trainer> {
        if train.is_empty() {
            return Err(Error::invalid("the training set is empty"));
        }
        let ctx = engine.config().max_position_embeddings;
        let vocab = engine.config().vocab_size;
        let encode = |ds: &Dataset, split: &str, truncated: &mut usize| -> Result<Vec<(Item, Prompt)>> {
            ds.iter()
                .enumerate()
                .map(|(i, item)| {
                    let mut ids = encode_prompt(&item.prompt, &tok)?;
                    if ids.len() > config.max_prompt_length {
                        // TRL keeps the end of an over-long prompt (left truncation).
                        ids.drain(..ids.len() - config.max_prompt_length);
                        *truncated += 1;
                    }
                    if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
                        return Err(Error::invalid(format!(
                            "{split} prompt {} of {} encodes to token id {id}, outside the \
                             model's vocabulary of {vocab} (config.json vocab_size): the tokenizer \
                             does not belong to the model",
                            i + 1,
                            ds.len()
                        )));
                    }
                    if ids.len() >= ctx {
                        // Found here, not in the middle of the first validation.
                        return Err(Error::invalid(format!(
                            "{split} prompt {} of {} has {} tokens (max_prompt_length = {}): \
                             longer than the model's context of {ctx} (max_position_embeddings) \
                             minus one generated token; set max_prompt_length ≤ {}",
                            i + 1,
                            ds.len(),
                            ids.len(),
                            config.max_prompt_length,
                            ctx.saturating_sub(1)
                        )));
                    }
                    let text = match &item.prompt {
                        PromptSpec::Text(s) => s.clone(),
                        PromptSpec::Messages(m) => tok.render_chat(m, true)?,
                        PromptSpec::Ids(ids) => tok.decode(ids, false)?,
                    };
                    Ok((item.clone(), Prompt { ids, text }))
                })
                .collect()
        };
        let mut truncated_prompts = 0;
        let train = encode(&train, "training", &mut truncated_prompts)?;
        let val = encode(&val, "validation", &mut truncated_prompts)?;
        let opts = config.grpo_options()?;
        let full = opts.full_fine_tuning;
        if !full && engine.adapter.is_none() {
            let lc = config
                .lora_config()
                .map_err(|m| Error::invalid(format!("lora.target_modules: {m}")))?;
            engine.set_adapter(Some(LoraWeights::init(lc, engine.config(), config.seed)));
        }
        if full {
            engine.set_adapter(None);
        }
        engine.max_batch_seqs = config.rollout_batch_size;
        let sampler = PromptSampler::new(train.len(), config.prompts_per_step, config.seed)?;
        let output_dir = config.output_dir.clone().unwrap_or_else(default_output_dir);
        Ok(Trainer {
            state: TrainState::new(config.seed),
            config,
            config_text: config_text.to_string(),
            base_model: String::new(),
            base_fingerprint: None,
            base_dir: None,
            engine,
            cuda: None,
            tok,
            train,
            val,
            grader_parts: vec![],
            grader,
            sampler,
            opts,
            output_dir,
            log: None,
            best_val: None,
            rollout_tokens: 0,
            train_tokens: 0,
            truncated_prompts,
        })
    }

    /// Optimiser steps taken so far.
    pub fn step_count(&self) -> usize {
        self.state.step as usize / self.config.num_iterations.max(1)
    }

    pub fn engine(&self) -> &CpuEngine {
        &self.engine
    }

    /// Prompts whose start was cut to fit `max_prompt_length`.
    pub fn truncated_prompts(&self) -> usize {
        self.truncated_prompts
    }

    fn log(&mut self, r: Record) -> Result<()> {
        if self.log.is_none() {
            self.log = Some(MetricsLog::open(&self.output_dir)?);
        }
        self.log.as_mut().expect("opened").write(&r)
    }

    fn stop_criteria(&self) -> StopCriteria {
        StopCriteria {
            eos_ids: self.engine.config().eos_token_ids.clone(),
            stop_strings: self.config.stop.clone(),
            max_new_tokens: self.config.max_completion_length,
        }
    }

    /// Generates G samples for each prompt index and grades them; grading of one chunk of
    /// prompts runs on worker threads while the engine generates the next chunk.
    fn rollout_and_grade(
        &mut self,
        indices: &[usize],
        use_val: bool,
        params: &SamplingParams,
        g: usize,
    ) -> Result<(Vec<Rollout>, Vec<GradeResult>, f64, f64)> {
        let stop = self.stop_criteria();
        let chunk_prompts = (self.config.rollout_batch_size / g).max(1);
        let threads = self.config.grader_threads;
        let mut rollouts = Vec::with_capacity(indices.len() * g);
        let mut grades = Vec::with_capacity(indices.len() * g);
        let (mut gen_s, mut wait_s) = (0.0, 0.0);
        let grader = self.grader.clone();
        let set = if use_val { &self.val } else { &self.train };
        let tok = &self.tok;
        let decode = |ids: &[u32]| tok.decode(ids, false).unwrap_or_default();
        std::thread::scope(|scope| -> Result<()> {
            let mut pending: Option<std::thread::ScopedJoinHandle<'_, Vec<GradeResult>>> = None;
            for (ci, chunk) in indices.chunks(chunk_prompts).enumerate() {
                let prompts: Vec<Vec<u32>> = chunk.iter().map(|&i| set[i].1.ids.clone()).collect();
                // One stream per sample of the whole call: the chunking (rollout_batch_size)
                // changes no sample.
                let chunk_params = SamplingParams {
                    first_stream: params.first_stream + (ci * chunk_prompts * g) as u64,
                    ..*params
                };
                let t0 = Instant::now();
                let engine: &mut dyn Engine = match self.cuda.as_mut() {
                    Some(c) => &mut c.engine,
                    None => &mut self.engine,
                };
                let mut out = engine.generate(&prompts, g, &chunk_params, &stop, Some(&decode))?;
                gen_s += t0.elapsed().as_secs_f64();
                let samples: Vec<Sample> = out
                    .iter()
                    .map(|r| {
                        let (item, p) = &set[chunk[r.prompt_index]];
                        let completion = tok.decode(&r.completion_ids, true).unwrap_or_default();
                        Sample::new(p.text.clone(), completion, item.fields.clone())
                    })
                    .collect();
                for r in out.iter_mut() {
                    r.prompt_index = chunk[r.prompt_index];
                }
                rollouts.extend(out);
                let t1 = Instant::now();
                if let Some(h) = pending.take() {
                    grades.extend(h.join().map_err(|_| Error::invalid("grader thread panicked"))?);
                }
                wait_s += t1.elapsed().as_secs_f64();
                let gr = grader.clone();
                pending = Some(scope.spawn(move || grade_batch(gr.as_ref(), &samples, threads)));
            }
            let t1 = Instant::now();
            if let Some(h) = pending.take() {
                grades.extend(h.join().map_err(|_| Error::invalid("grader thread panicked"))?);
            }
            wait_s += t1.elapsed().as_secs_f64();
            Ok(())
        })?;
        Ok((rollouts, grades, gen_s, wait_s))
    }

    /// One GRPO step: draw prompts, sample G completions each, grade, update.
    pub fn step(&mut self) -> Result<TrainRecord> {
        let t_step = Instant::now();
        let g = self.config.num_generations;
        let step_no = self.step_count() as u64;
        let params = self.config.sampling(step_no);
        let want = self.config.prompts_per_step;
        let (mut rollouts, mut grades) = (Vec::new(), Vec::new());
        let (mut gen_s, mut wait_s) = (0.0, 0.0);
        let mut drawn_groups = 0usize;
        let mut zero_std_groups = 0usize;
        let mut round = 0u64;
        // Dynamic sampling keeps drawing until `want` informative groups or the round limit.
        loop {
            let indices = self.sampler.next_batch();
            let round_params = SamplingParams {
                seed: mix(params.seed, 1_000 + round),
                ..params
            };
            let (r, gr, a, b) = self.rollout_and_grade(&indices, false, &round_params, g)?;
            gen_s += a;
            wait_s += b;
            for (grp_r, grp_g) in r.chunks(g).zip(gr.chunks(g)) {
                drawn_groups += 1;
                let first = grp_g[0].score;
                let zero = grp_g.iter().all(|x| x.score == first);
                if zero {
                    zero_std_groups += 1;
                }
                let keep = !self.config.dynamic_sampling || !zero;
                if keep && rollouts.len() / g < want {
                    rollouts.extend_from_slice(grp_r);
                    grades.extend_from_slice(grp_g);
                }
            }
            round += 1;
            if !self.config.dynamic_sampling
                || rollouts.len() / g >= want
                || round > self.config.max_resample_rounds as u64
            {
                break;
            }
        }

        let rewards: Vec<f32> = grades.iter().map(|x| x.score).collect();
        let mut rec = TrainRecord {
            step: step_no as usize + 1,
            ..Default::default()
        };
        let n = rewards.len().max(1) as f64;
        rec.reward_mean = rewards.iter().map(|&x| x as f64).sum::<f64>() / n;
        rec.reward_std = (rewards
            .iter()
            .map(|&x| (x as f64 - rec.reward_mean).powi(2))
            .sum::<f64>()
            / n)
            .sqrt();
        let thr = self.config.accuracy_threshold;
        rec.accuracy = rewards.iter().filter(|&&x| x >= thr - 1e-6).count() as f64 / n;
        rec.reward_per_grader = per_grader(self.grader.name(), &self.grader_parts, &grades);
        let lens: Vec<usize> = rollouts.iter().map(|r| r.completion_ids.len()).collect();
        rec.completion_len_mean = lens.iter().sum::<usize>() as f64 / n;
        rec.completion_len_max = lens.iter().copied().max().unwrap_or(0);
        rec.truncated_frac = rollouts
            .iter()
            .filter(|r| r.finish_reason == FinishReason::Length)
            .count() as f64
            / n;
        rec.zero_std_frac = zero_std_groups as f64 / drawn_groups.max(1) as f64;
        let gen_tokens: usize = lens.iter().sum();
        rec.rollout_seconds = gen_s;
        rec.grade_seconds = wait_s;
        rec.rollout_tok_s = gen_tokens as f64 / gen_s.max(1e-9);
        self.rollout_tokens += gen_tokens as u64;

        if rollouts.is_empty() {
            // Dynamic sampling found no informative group: nothing to learn from this step.
            self.state.step += self.config.num_iterations as u64;
            rec.skipped = true;
            rec.step_seconds = t_step.elapsed().as_secs_f64();
            self.log(Record::Train(rec.clone()))?;
            return Ok(rec);
        }

        let set = &self.train;
        let batch = GrpoBatch {
            seqs: rollouts
                .iter()
                .map(|r| GrpoSeq {
                    prompt_ids: set[r.prompt_index].1.ids.clone(),
                    completion_ids: r.completion_ids.clone(),
                    old_logp: (self.config.num_iterations > 1).then(|| r.logprobs.clone()),
                })
                .collect(),
            group_size: g,
            rewards: rewards.clone(),
            advantages: None,
        };
        let t_train = Instant::now();
        let metrics = match self.cuda.as_mut() {
            Some(c) => {
                let m = c
                    .trainer
                    .grpo_update(&mut c.engine, &mut self.state, &batch, &self.opts)?;
                let st = &c.trainer.last_stats;
                rec.micro_batches = st.micro_batches / self.config.num_iterations.max(1);
                rec.gradient_checkpointing = st.layout.recompute == Recompute::Layer;
                m
            }
            None => {
                let lora = self.engine.adapter.as_mut();
                let m = grpo_update(&mut self.engine.model, lora, &mut self.state, &batch, &self.opts)?;
                rec.micro_batches = micro_ranges(
                    batch.seqs.len(),
                    self.opts.micro_batch_size,
                    self.opts.gradient_accumulation_steps,
                )
                .len();
                rec.gradient_checkpointing = self.opts.recompute == Recompute::Layer;
                m
            }
        };
        rec.train_seconds = t_train.elapsed().as_secs_f64();
        let train_tokens: usize = batch
            .seqs
            .iter()
            .map(|s| s.prompt_ids.len() + s.completion_ids.len())
            .sum::<usize>()
            * self.config.num_iterations;
        self.train_tokens += train_tokens as u64;
        rec.train_tok_s = train_tokens as f64 / rec.train_seconds.max(1e-9);
        if let Some(last) = metrics.last() {
            rec.loss = last.loss as f64;
            rec.kl = last.kl;
            rec.clip_low = last.clip_low;
            rec.clip_high = last.clip_high;
            rec.entropy = last.entropy;
            rec.grad_norm = last.grad_norm as f64;
            rec.lr = last.lr;
            rec.skipped = metrics.iter().any(|m| m.skipped);
        }
        rec.step_seconds = t_step.elapsed().as_secs_f64();
        self.log(Record::Train(rec.clone()))?;
        Ok(rec)
    }

    /// Validation (see [`Trainer::validation`]), logged to metrics.jsonl; a new best
    /// accuracy saves `adapter_best`.
    pub fn evaluate(&mut self) -> Result<Option<EvalRecord>> {
        let Some(rec) = self.validation()? else {
            return Ok(None);
        };
        self.log(Record::Eval(rec.clone()))?;
        if self.best_val.is_none_or(|b| rec.accuracy > b) {
            self.best_val = Some(rec.accuracy);
            let dir = self.output_dir.join("adapter_best");
            self.save_weights(&dir)?;
        }
        Ok(Some(rec))
    }

    /// Greedy decoding on the validation prompts: accuracy and mean reward. No side effects.
    pub fn validation(&mut self) -> Result<Option<EvalRecord>> {
        if self.val.is_empty() {
            return Ok(None);
        }
        let t0 = Instant::now();
        let n = match self.config.eval_num_prompts {
            0 => self.val.len(),
            k => k.min(self.val.len()),
        };
        let indices: Vec<usize> = (0..n).collect();
        let greedy = SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        };
        let (rollouts, grades, _, _) = self.rollout_and_grade(&indices, true, &greedy, 1)?;
        let thr = self.config.accuracy_threshold;
        let m = grades.len().max(1) as f64;
        let rec = EvalRecord {
            step: self.step_count(),
            accuracy: grades.iter().filter(|x| x.score >= thr - 1e-6).count() as f64 / m,
            reward_mean: grades.iter().map(|x| x.score as f64).sum::<f64>() / m,
            num_prompts: n,
            completion_len_mean: rollouts.iter().map(|r| r.completion_ids.len()).sum::<usize>() as f64 / m,
            seconds: t0.elapsed().as_secs_f64(),
        };
        Ok(Some(rec))
    }

    /// The trained parameters, as a PEFT adapter or (full fine-tuning) an HF model directory.
    pub fn save_weights(&mut self, dir: &Path) -> Result<()> {
        self.sync_host()?;
        match &self.engine.adapter {
            Some(l) => peft::save(dir, l, &self.base_model),
            None => {
                let base = PathBuf::from(&self.base_model);
                peft::write_merged(&base, dir, self.engine.config(), &self.engine.model.weights)
            }
        }
    }

    /// Writes a resumable checkpoint to `OUTPUT_DIR/checkpoint`.
    pub fn save_checkpoint(&mut self) -> Result<PathBuf> {
        self.sync_host()?;
        let dir = self.output_dir.join("checkpoint");
        let params = match &self.engine.adapter {
            Some(l) => Trainable::Lora(l.clone()),
            None => Trainable::Full(self.engine.model.weights.clone()),
        };
        let extra = serde_json::json!({
            "toml": self.config_text,
            "sampler": self.sampler.state(),
            "train_len": self.train.len(),
            "best_val": self.best_val,
            "rollout_tokens": self.rollout_tokens,
            "train_tokens": self.train_tokens,
            "base_dir": self.base_dir,
            "base_model": self.base_model,
            "base_model_fingerprint": self.base_fingerprint,
        });
        save_checkpoint(
            &dir,
            &params,
            self.engine.config(),
            &self.state,
            &extra,
            &self.base_model,
        )?;
        Ok(dir)
    }

    /// Continues from a checkpoint written by [`Trainer::save_checkpoint`].
    pub fn resume_from(&mut self, dir: &Path) -> Result<()> {
        let ck = load_checkpoint(dir, self.engine.config())?;
        self.check_resumable(&ck, dir)?;
        match ck.params {
            Trainable::Lora(l) => self.engine.set_adapter(Some(l)),
            Trainable::Full(w) => {
                self.engine.model.weights = w;
                self.engine.set_adapter(None);
            }
        }
        self.state = ck.state;
        let sampler: SamplerState = serde_json::from_value(ck.config["sampler"].clone())
            .map_err(|e| Error::config(dir, format!("checkpoint sampler state: {e}")))?;
        self.sampler = PromptSampler::from_state(self.train.len(), self.config.prompts_per_step, sampler)?;
        MetricsLog::rewind(&self.output_dir, self.step_count())?;
        self.best_val = ck.config["best_val"].as_f64();
        self.rollout_tokens = ck.config["rollout_tokens"].as_u64().unwrap_or(0);
        self.train_tokens = ck.config["train_tokens"].as_u64().unwrap_or(0);
        if let Some(mut c) = self.cuda.take() {
            // Full fine-tuning: new_full also rewrites the engine's weights from the checkpoint's.
            let trainer = self.cuda_trainer(&mut c.engine);
            self.cuda = Some(match trainer {
                Ok(t) => CudaBackend { trainer: t, ..c },
                Err(e) => {
                    self.cuda = Some(c);
                    return Err(e);
                }
            });
        }
        Ok(())
    }

    /// A checkpoint trains what this trainer's config trains (LoRA or every weight, the same
    /// adapter shape) on a training set of the same size; else the config would be silently
    /// overridden by the checkpoint (or its sampler state would index another dataset).
    fn check_resumable(&self, ck: &crate::trainer::state::Checkpoint, dir: &Path) -> Result<()> {
        let at = dir.join(crate::trainer::state::STATE_FILE);
        let hint = "resume with the run's own config (omit CONFIG) or start a new --output-dir";
        match (&ck.params, &self.engine.adapter) {
            (Trainable::Lora(saved), Some(cur)) => {
                let (a, b) = (&saved.config, &cur.config);
                let sorted = |c: &LoraConfig| {
                    let mut t: Vec<&str> = c.target_modules.iter().map(|p| p.module_name()).collect();
                    t.sort_unstable();
                    t.join(", ")
                };
                let diffs = [
                    ("lora.r", a.r.to_string(), b.r.to_string()),
                    ("lora.alpha", a.alpha.to_string(), b.alpha.to_string()),
                    ("lora.dropout", a.dropout.to_string(), b.dropout.to_string()),
                    ("lora.use_rslora", a.use_rslora.to_string(), b.use_rslora.to_string()),
                    ("lora.target_modules", sorted(a), sorted(b)),
                ];
                if let Some((key, saved, wanted)) = diffs.iter().find(|(_, x, y)| x != y) {
                    return Err(Error::config(
                        at,
                        format!("the checkpoint's adapter has {key} = {saved}, the config asks for {wanted}; {hint}"),
                    ));
                }
            }
            (Trainable::Lora(_), None) => {
                return Err(Error::config(
                    at,
                    format!("the checkpoint holds a LoRA adapter, the config sets model.full_fine_tuning = true; {hint}"),
                ))
            }
            (Trainable::Full(_), Some(_)) => {
                return Err(Error::config(
                    at,
                    format!("the checkpoint holds fully fine-tuned weights, the config trains a LoRA adapter (model.full_fine_tuning = false); {hint}"),
                ))
            }
            (Trainable::Full(_), None) => {}
        }
        // The adapter (or the weights) would silently go onto another base model of the same
        // shape. Checkpoints written before the fingerprint existed are not checked.
        if let (Some(saved), Some(cur)) = (
            ck.config["base_model_fingerprint"].as_str(),
            self.base_fingerprint.as_deref(),
        ) {
            if saved != cur {
                let was = ck.config["base_model"].as_str().unwrap_or("?");
                return Err(Error::config(
                    at,
                    format!(
                        "the checkpoint was trained on the base model {was}, but [model] path is {}, \
                         a different model (its config.json or weights differ); resume with \
                         [model] path set to that model (or a copy of it), or start a new --output-dir",
                        self.base_model
                    ),
                ));
            }
        }
        if let Some(n) = ck.config["train_len"].as_u64() {
            if n as usize != self.train.len() {
                return Err(Error::config(
                    at,
                    format!(
                        "the checkpoint's run had {n} training prompts, the config gives {} (was [data] changed?); {hint}",
                        self.train.len()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Runs to `max_steps` (or until `stop` is raised, e.g. by Ctrl-C: then a checkpoint is
    /// saved), validating every `eval_steps`, then writes the last adapter, the plot and
    /// `summary.json`.
    pub fn run(&mut self, stop: &AtomicBool, progress: bool) -> Result<Summary> {
        let t0 = Instant::now();
        std::fs::create_dir_all(&self.output_dir).map_err(|e| Error::io(&self.output_dir, e))?;
        let total = self.config.max_steps;
        let bar = if progress {
            let b = indicatif::ProgressBar::new(total as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} steps [{elapsed_precise}<{eta}] {msg}",
                )
                .expect("template"),
            );
            b.set_position(self.step_count() as u64);
            b
        } else {
            indicatif::ProgressBar::hidden()
        };
        let mut last_eval = None;
        if self.step_count() == 0 {
            last_eval = self.evaluate()?;
        }
        let mut interrupted = false;
        let start = self.step_count();
        let mut noted = None;
        while self.step_count() < total {
            if stop.load(Ordering::SeqCst) {
                interrupted = true;
                break;
            }
            let r = self.step()?;
            let step = self.step_count();
            // A GPU update that had to change its layout to fit the memory says so (once per
            // change).
            let fitted = self
                .cuda
                .as_ref()
                .and_then(|c| c.trainer.last_stats.fitted_layout());
            if let Some(l) = fitted.filter(|_| fitted != noted) {
                bar.suspend(|| {
                    eprintln!(
                        "note: step {step}: the update ran in micro-batches of {} sequences {} to \
                         fit the GPU memory (free, or max_train_memory_gib); set micro_batch_size / \
                         gradient_checkpointing to choose",
                        l.micro_batch_seqs,
                        match l.recompute {
                            Recompute::None => "without recompute".to_string(),
                            Recompute::Layer =>
                                format!("with layer recompute ({} layers kept)", l.keep_layers),
                        }
                    )
                });
                noted = fitted;
            }
            bar.set_position(step as u64);
            let val = last_eval
                .as_ref()
                .map(|e: &EvalRecord| format!(" val acc {:.1}%", e.accuracy * 100.0));
            bar.set_message(format!(
                "reward {:.3} acc {:.1}%{} | rollout {:.0} tok/s, train {:.0} tok/s",
                r.reward_mean,
                r.accuracy * 100.0,
                val.unwrap_or_default(),
                r.rollout_tok_s,
                r.train_tok_s
            ));
            if self.config.eval_steps > 0 && step.is_multiple_of(self.config.eval_steps) && step < total {
                last_eval = self.evaluate()?;
            }
            if self.config.save_steps > 0 && step.is_multiple_of(self.config.save_steps) {
                self.save_checkpoint()?;
            }
        }
        // The final validation (not when stopped early, nor when resuming a finished run).
        if !interrupted && self.step_count() > start {
            self.evaluate()?;
        }
        bar.finish_and_clear();
        self.save_checkpoint()?;
        let last = self.output_dir.join("adapter_last");
        self.save_weights(&last)?;
        // Nothing logged yet (stopped before the first step, no validation set): no file.
        let metrics = self.output_dir.join("metrics.jsonl");
        let records = if metrics.exists() {
            crate::trainer::metrics::read_records(&metrics)?
        } else {
            Vec::new()
        };
        let mut summary = Summary::from_records(&records);
        summary.wall_seconds = t0.elapsed().as_secs_f64();
        summary.rollout_tokens = self.rollout_tokens;
        summary.train_tokens = self.train_tokens;
        summary.device = self.device().into();
        summary.interrupted = interrupted;
        summary.steps = self.step_count();
        summary.write(&self.output_dir)?;
        if !records.is_empty() {
            crate::trainer::plot::plot_run(&self.output_dir)?;
        }
        Ok(summary)
    }
}

/// Every `{{ item.<field> }}` of the grader table names a field of every dataset row: a typo
/// would otherwise fail each grade quietly (reward 0 for the whole run).
fn check_item_fields(grader: &toml::Value, ds: &Dataset, split: &str) -> Result<()> {
    fn strings<'a>(v: &'a toml::Value, out: &mut Vec<&'a str>) {
        match v {
            toml::Value::String(s) => out.push(s),
            toml::Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
            toml::Value::Table(t) => t.values().for_each(|x| strings(x, out)),
            _ => {}
        }
    }
    let mut texts = Vec::new();
    strings(grader, &mut texts);
    let fields: Vec<&str> = texts
        .iter()
        .flat_map(|t| crate::grader::template::item_fields(t))
        .collect();
    for (i, item) in ds.iter().enumerate() {
        let Some(row) = item.fields.as_object() else {
            continue;
        };
        if let Some(f) = fields.iter().find(|f| !row.contains_key(**f)) {
            let has: Vec<&str> = row.keys().map(String::as_str).collect();
            return Err(Error::invalid(format!(
                "[grader] reads `item.{f}`, but {split} row {} has no field `{f}` (its fields: {})",
                i + 1,
                has.join(", ")
            )));
        }
    }
    Ok(())
}

/// Mean score of the grader and, for a `multi` grader, of each named part.
fn per_grader(name: &str, parts: &[String], grades: &[GradeResult]) -> BTreeMap<String, f64> {
    let n = grades.len().max(1) as f64;
    let mut m = BTreeMap::new();
    m.insert(
        name.to_string(),
        grades.iter().map(|g| g.score as f64).sum::<f64>() / n,
    );
    for p in parts {
        let s: f64 = grades
            .iter()
            .map(|g| g.details.get(p).and_then(|v| v.as_f64()).unwrap_or(0.0))
            .sum();
        m.insert(p.clone(), s / n);
    }
    m
}

/// `p` relative to `base`, with `..` resolved lexically (the base need not exist).
fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        return p.to_path_buf();
    }
    let mut out = PathBuf::new();
    for c in base.join(p).components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir if out.file_name().is_some() => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

/// `runs/rft-YYYYmmdd-HHMMSS` (UTC).
pub fn default_output_dir() -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    PathBuf::from("runs").join(format!(
        "rft-{}",
        crate::model::chat::strftime_utc("%Y%m%d-%H%M%S", secs as i64)
    ))
}
