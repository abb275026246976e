//! One GRPO policy update on the CPU reference.
//!
//! ```text
//! batch (B groups × G rollouts, group-major) ──► advantages (or the caller's)
//!   ├─ dynamic sampling: drop zero-std groups (mask reported)
//!   ├─ ref_logp with the adapter off (β > 0), old_logp (num_iterations > 1)
//!   └─ per iteration: per micro-batch: forward → dL/dlogp with the *global* aggregation
//!        weights (sequence_weights over the whole batch) → backward → Σ gradients
//!      → clip global norm → AdamW (skipped, and reported, when loss or gradient is non-finite)
//! ```
//!
//! Because each micro-batch's dL/dlogp already carries the whole batch's normalisation
//! (1/ΣL tokens for dapo, 1/(N·L_i) for grpo, 1/(N·max_len) for dr_grpo), summing the
//! micro-batch gradients gives the gradient of the one-big-batch loss, whatever the
//! micro-batch size. TRL's `gradient_accumulation_steps` is the number of micro-batches.

use crate::cpu::model::CpuModel;
use crate::cpu::train::{self, Grads, LoraDropout, Recompute, Sequence, TrainOptions};
use crate::error::{Error, Result};
use crate::lora::LoraWeights;
use crate::loss::{
    advantages, grpo_loss, grpo_token, sequence_weights, Advantages, GrpoInputs, GrpoLossConfig, GrpoMetrics,
    OldLogp, ScaleRewards,
};
use crate::model::config::ModelConfig;
use crate::optim::{AdamW, LrSchedule, SchedulerType};
use crate::trainer::state::TrainState;
use crate::trainer::{add_grads, apply_update};

/// One rollout: prompt, sampled completion and, optionally, the log-probs recorded at
/// sampling time (used as old_logp when `num_iterations > 1`).
#[derive(Clone, Debug, PartialEq)]
pub struct GrpoSeq {
    pub prompt_ids: Vec<u32>,
    pub completion_ids: Vec<u32>,
    pub old_logp: Option<Vec<f32>>,
}

/// A group-major batch: `seqs[b·G + g]` is sample g of prompt b.
#[derive(Clone, Debug, PartialEq)]
pub struct GrpoBatch {
    pub seqs: Vec<GrpoSeq>,
    /// G (num_generations).
    pub group_size: usize,
    /// One reward per sequence (used unless `advantages` is given).
    pub rewards: Vec<f32>,
    /// Precomputed advantages, one per sequence (then `rewards` may be empty).
    pub advantages: Option<Vec<f32>>,
}

/// Options of the update, named after TRL's `GRPOConfig` where they coincide.
#[derive(Clone, Debug)]
pub struct GrpoOptions {
    pub loss: GrpoLossConfig,
    pub scale_rewards: ScaleRewards,
    /// Updates taken on the same rollouts (TRL's μ); > 1 uses old_logp.
    pub num_iterations: usize,
    /// Sequences per forward/backward; 0 = derived from `gradient_accumulation_steps`.
    pub micro_batch_size: usize,
    /// Used when `micro_batch_size` is 0: the batch is cut into this many micro-batches.
    pub gradient_accumulation_steps: usize,
    /// Clip the global gradient norm to this (≤ 0: off).
    pub max_grad_norm: f32,
    pub temperature: f32,
    pub recompute: Recompute,
    /// Rows of the lm_head chunk.
    pub chunk_rows: usize,
    /// Train every base weight instead of an adapter (β must be 0: no frozen reference).
    pub full_fine_tuning: bool,
    /// Drop the sequences of zero-std groups before the update (DAPO's dynamic sampling).
    pub dynamic_sampling: bool,
    /// AdamW hyper-parameters; its `lr` is replaced by `schedule.lr_at(step)`.
    pub optimizer: AdamW,
    pub schedule: LrSchedule,
}

impl Default for GrpoOptions {
    fn default() -> Self {
        GrpoOptions {
            loss: GrpoLossConfig::default(),
            scale_rewards: ScaleRewards::Group,
            num_iterations: 1,
            micro_batch_size: 0,
            gradient_accumulation_steps: 1,
            max_grad_norm: 1.0,
            temperature: 1.0,
            recompute: Recompute::None,
            chunk_rows: 64,
            full_fine_tuning: false,
            dynamic_sampling: false,
            optimizer: AdamW {
                weight_decay: 0.0,
                ..AdamW::default()
            },
            schedule: LrSchedule {
                kind: SchedulerType::Constant,
                base_lr: 1e-6,
                warmup_steps: 0,
                total_steps: 1,
            },
        }
    }
}

/// What one optimiser step saw and did (TRL's metric names in the comments).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepMetrics {
    /// Steps taken before this one (the schedule's step).
    pub step: u64,
    /// Which pass over the rollouts (0..num_iterations).
    pub iteration: usize,
    pub loss: f32,
    /// `kl`: token mean (when β > 0).
    pub kl: Option<f64>,
    pub clip_low: f64,
    pub clip_high: f64,
    pub clip_region: f64,
    pub ratio_mean: f64,
    /// `entropy`: token mean of the policy's entropy.
    pub entropy: f64,
    /// `grad_norm` before clipping.
    pub grad_norm: f32,
    pub lr: f64,
    /// `frac_reward_zero_std` (0 when advantages were given).
    pub frac_zero_std: f32,
    pub reward_mean: f32,
    pub num_tokens: usize,
    pub num_seqs: usize,
    /// The step was skipped (non-finite loss or gradient): parameters unchanged.
    pub skipped: bool,
}

/// Gradients of the GRPO loss for one pass over a batch, with what went into them.
#[derive(Clone, Debug)]
pub struct GrpoGradients {
    pub grads: Grads,
    pub loss: f32,
    pub metrics: GrpoMetrics,
    pub entropy: f64,
    /// Advantage of every input sequence (before dynamic sampling).
    pub advantages: Vec<f32>,
    /// Reward statistics, when computed from rewards.
    pub stats: Option<Advantages>,
    /// Which input sequences were used (all, unless dynamic sampling dropped zero-std groups).
    pub keep: Vec<bool>,
    /// Per used sequence: policy, reference (β > 0) log-probs of the completion tokens.
    pub logp: Vec<Vec<f32>>,
    pub ref_logp: Option<Vec<Vec<f32>>>,
}

/// The batch after advantages, filtering, reference and old log-probs: what every iteration
/// reuses.
pub(crate) struct Prepared {
    pub(crate) tokens: Vec<Vec<u32>>,
    pub(crate) prompt_lens: Vec<usize>,
    /// Completion lengths.
    pub(crate) lengths: Vec<usize>,
    pub(crate) adv: Vec<f32>,
    pub(crate) old: Option<Vec<f32>>,
    pub(crate) reference: Option<Vec<f32>>,
    pub(crate) all_adv: Vec<f32>,
    pub(crate) stats: Option<Advantages>,
    pub(crate) keep: Vec<bool>,
}

impl Prepared {
    pub(crate) fn seqs(&self, range: std::ops::Range<usize>) -> Vec<Sequence<'_>> {
        range
            .map(|i| Sequence {
                tokens: &self.tokens[i],
                prompt_len: self.prompt_lens[i],
            })
            .collect()
    }

    /// Micro-batches as sequence ranges.
    pub(crate) fn micro_batches(&self, opts: &GrpoOptions) -> Vec<std::ops::Range<usize>> {
        micro_ranges(
            self.tokens.len(),
            opts.micro_batch_size,
            opts.gradient_accumulation_steps,
        )
    }
}

/// Sequence ranges of `n` items cut into micro-batches of `mb` (0: `n / gas`, rounded up).
pub(crate) fn micro_ranges(n: usize, mb: usize, gas: usize) -> Vec<std::ops::Range<usize>> {
    let mb = if mb > 0 { mb } else { n.div_ceil(gas.max(1)).max(1) };
    (0..n).step_by(mb).map(|s| s..(s + mb).min(n)).collect()
}

fn train_opts(opts: &GrpoOptions, lora: Option<&LoraWeights>, seed: Option<u64>) -> TrainOptions {
    let dropout = match (lora, seed) {
        (Some(l), Some(seed)) if l.config.dropout > 0.0 => Some(LoraDropout {
            p: l.config.dropout,
            seed,
        }),
        _ => None,
    };
    TrainOptions {
        temperature: opts.temperature,
        recompute: opts.recompute,
        chunk_rows: opts.chunk_rows,
        dropout,
        full_grads: opts.full_fine_tuning,
    }
}

fn check_options(config: &ModelConfig, lora: Option<&LoraWeights>, opts: &GrpoOptions) -> Result<()> {
    opts.loss.validate()?;
    if opts.full_fine_tuning == lora.is_some() {
        return Err(Error::invalid(if opts.full_fine_tuning {
            "full fine-tuning trains the base weights: give no adapter"
        } else {
            "LoRA training needs an adapter (or set full fine-tuning)"
        }));
    }
    if opts.full_fine_tuning && opts.loss.beta > 0.0 {
        return Err(Error::invalid(
            "beta > 0 needs the frozen reference model, which full fine-tuning does not keep; set beta = 0",
        ));
    }
    if opts.num_iterations == 0 {
        return Err(Error::invalid("num_iterations must be at least 1"));
    }
    if !(opts.temperature.is_finite() && opts.temperature > 0.0) {
        return Err(Error::invalid(format!(
            "temperature must be > 0, got {}",
            opts.temperature
        )));
    }
    if opts.chunk_rows == 0 {
        return Err(Error::invalid("chunk_rows must be at least 1"));
    }
    if let Some(l) = lora {
        if l.layers.len() != config.num_hidden_layers {
            return Err(Error::invalid(format!(
                "the adapter has {} layers, the model {}",
                l.layers.len(),
                config.num_hidden_layers
            )));
        }
    }
    Ok(())
}

/// Advantages, dynamic-sampling filter, reference log-probs (β > 0, adapter off) and old
/// log-probs (num_iterations > 1: the batch's, else the current policy's before any update),
/// on the CPU reference.
fn prepare(
    model: &CpuModel,
    lora: Option<&LoraWeights>,
    batch: &GrpoBatch,
    opts: &GrpoOptions,
) -> Result<Prepared> {
    let mut p = prepare_batch(&model.config, lora, batch, opts)?;
    p.fill_logps(batch, opts, &mut |seqs, adapter| {
        Ok(if adapter {
            train::logprobs(model, lora, seqs, &train_opts(opts, lora, None)).0
        } else {
            train::ref_logp(model, seqs, opts.temperature)
        })
    })?;
    Ok(p)
}

/// The log-probs of the completion tokens of some sequences (concatenated in order), with the
/// adapter (`true`, no dropout) or without it (`false`: the frozen reference).
pub(crate) type LogpFn<'a> = dyn FnMut(&[Sequence], bool) -> Result<Vec<f32>> + 'a;

/// The backend-independent part of [`prepare`]: checks, advantages, the dynamic-sampling
/// filter and the packed sequences, without reference or old log-probs (see
/// [`Prepared::fill_logps`]).
pub(crate) fn prepare_batch(
    config: &ModelConfig,
    lora: Option<&LoraWeights>,
    batch: &GrpoBatch,
    opts: &GrpoOptions,
) -> Result<Prepared> {
    check_options(config, lora, opts)?;
    let n = batch.seqs.len();
    let vocab = config.vocab_size;
    for (i, s) in batch.seqs.iter().enumerate() {
        if s.prompt_ids.is_empty() {
            return Err(Error::invalid(format!("sequence {i}: empty prompt")));
        }
        if let Some(&t) = s
            .prompt_ids
            .iter()
            .chain(&s.completion_ids)
            .find(|&&t| t as usize >= vocab)
        {
            return Err(Error::invalid(format!(
                "sequence {i}: token id {t} is outside the vocabulary of {vocab} tokens"
            )));
        }
        if let Some(o) = &s.old_logp {
            if o.len() != s.completion_ids.len() {
                return Err(Error::invalid(format!(
                    "sequence {i}: {} old log-probs for {} completion tokens",
                    o.len(),
                    s.completion_ids.len()
                )));
            }
        }
    }
    let (all_adv, stats) = match &batch.advantages {
        Some(a) => {
            if a.len() != n {
                return Err(Error::invalid(format!(
                    "{} advantages for {n} sequences",
                    a.len()
                )));
            }
            (a.clone(), None)
        }
        None => {
            if batch.rewards.len() != n {
                return Err(Error::invalid(format!(
                    "{} rewards for {n} sequences",
                    batch.rewards.len()
                )));
            }
            let a = advantages(&batch.rewards, batch.group_size, opts.scale_rewards)?;
            (a.values.clone(), Some(a))
        }
    };
    let keep = match (&stats, opts.dynamic_sampling) {
        (Some(a), true) => a.keep_mask(),
        _ => vec![true; n],
    };
    let used: Vec<usize> = (0..n).filter(|&i| keep[i]).collect();
    Ok(Prepared {
        tokens: used
            .iter()
            .map(|&i| [&batch.seqs[i].prompt_ids[..], &batch.seqs[i].completion_ids[..]].concat())
            .collect(),
        prompt_lens: used.iter().map(|&i| batch.seqs[i].prompt_ids.len()).collect(),
        lengths: used.iter().map(|&i| batch.seqs[i].completion_ids.len()).collect(),
        adv: used.iter().map(|&i| all_adv[i]).collect(),
        old: None,
        reference: None,
        all_adv,
        stats,
        keep,
    })
}

impl Prepared {
    /// Reference log-probs (β > 0, adapter off) and old log-probs (num_iterations > 1: the
    /// batch's when every used sequence has them, else the current policy's), computed by
    /// `logp` one micro-batch at a time.
    pub(crate) fn fill_logps(
        &mut self,
        batch: &GrpoBatch,
        opts: &GrpoOptions,
        logp: &mut LogpFn<'_>,
    ) -> Result<()> {
        let ranges = self.micro_batches(opts);
        if opts.loss.beta > 0.0 {
            let mut r = Vec::new();
            for rg in &ranges {
                r.extend(logp(&self.seqs(rg.clone()), false)?);
            }
            self.reference = Some(r);
        }
        if opts.num_iterations > 1 {
            let used: Vec<&GrpoSeq> = batch
                .seqs
                .iter()
                .zip(&self.keep)
                .filter(|(_, &k)| k)
                .map(|(s, _)| s)
                .collect();
            if used.iter().all(|s| s.old_logp.is_some()) {
                self.old = Some(used.iter().flat_map(|s| s.old_logp.clone().unwrap()).collect());
            } else {
                let mut o = Vec::new();
                for rg in &ranges {
                    o.extend(logp(&self.seqs(rg.clone()), true)?);
                }
                self.old = Some(o);
            }
        }
        Ok(())
    }
}

/// Loss, gradients and metrics of one pass over the prepared batch, micro-batch by
/// micro-batch, with the whole batch's aggregation weights.
fn gradients(
    model: &CpuModel,
    lora: Option<&LoraWeights>,
    p: &Prepared,
    opts: &GrpoOptions,
    dropout_seed: u64,
) -> Result<GrpoGradients> {
    let cfg = &opts.loss;
    let weights = sequence_weights(&p.lengths, cfg.loss_type, cfg.max_completion_length);
    let (lo, hi) = ((1.0 - cfg.epsilon) as f32, (1.0 + cfg.epsilon_high()) as f32);
    let beta = cfg.beta as f32;
    let mut tok_off = vec![0usize];
    for &l in &p.lengths {
        tok_off.push(tok_off.last().unwrap() + l);
    }
    let mut acc: Option<Grads> = None;
    let mut logp_all: Vec<f32> = Vec::with_capacity(*tok_off.last().unwrap());
    let mut entropy_sum = 0f64;
    for (mi, rg) in p.micro_batches(opts).into_iter().enumerate() {
        let to = train_opts(opts, lora, Some(dropout_seed.wrapping_add(mi as u64)));
        let seqs = p.seqs(rg.clone());
        let fwd = train::forward(model, lora, &seqs, &to);
        // dL/dlogp of this micro-batch's tokens, with the global weights.
        let mut dlogp = vec![0f32; fwd.logp.len()];
        for (j, s) in rg.clone().enumerate() {
            let w = weights[s] as f32;
            for k in 0..p.lengths[s] {
                let (t, local) = (tok_off[s] + k, fwd.token_offsets[j] + k);
                let old = p.old.as_ref().map(|o| o[t]);
                let reference = p.reference.as_ref().map(|r| r[t]);
                let tt = grpo_token(
                    fwd.logp[local],
                    old,
                    reference,
                    p.adv[s],
                    lo,
                    hi,
                    beta,
                    cfg.kl_estimator,
                );
                dlogp[local] = w * tt.dloss;
            }
        }
        entropy_sum += fwd.entropy.iter().map(|&e| e as f64).sum::<f64>();
        logp_all.extend_from_slice(&fwd.logp);
        let mut g = fwd.backward(&dlogp, None);
        match acc.as_mut() {
            None => acc = Some(g),
            Some(a) => add_grads(a, &mut g),
        }
    }
    let grads = acc.unwrap_or_else(|| Grads {
        lora: lora.map(|l| l.zeros_like()),
        weights: opts
            .full_fine_tuning
            .then(|| train::zeros_like_weights(&model.weights)),
    });
    p.pass_result(cfg, grads, logp_all, entropy_sum)
}

impl Prepared {
    /// One pass's result from its gradients and the token log-probs of every micro-batch (in
    /// order) with their entropy sum: the loss and metrics over the whole batch, computed here
    /// on the host with the same per-token math as the gradients (any backend reports alike).
    pub(crate) fn pass_result(
        &self,
        cfg: &GrpoLossConfig,
        grads: Grads,
        logp_all: Vec<f32>,
        entropy_sum: f64,
    ) -> Result<GrpoGradients> {
        let out = grpo_loss(
            cfg,
            &GrpoInputs {
                logp: &logp_all,
                old_logp: match &self.old {
                    Some(o) => OldLogp::Given(o),
                    None => OldLogp::Current,
                },
                ref_logp: self.reference.as_deref(),
                advantages: &self.adv,
                lengths: &self.lengths,
            },
        )?;
        let mut tok_off = vec![0usize];
        for &l in &self.lengths {
            tok_off.push(tok_off.last().unwrap() + l);
        }
        let split =
            |v: &[f32]| -> Vec<Vec<f32>> { tok_off.windows(2).map(|w| v[w[0]..w[1]].to_vec()).collect() };
        let n_tok = logp_all.len();
        Ok(GrpoGradients {
            grads,
            loss: out.loss,
            metrics: out.metrics,
            entropy: if n_tok == 0 {
                0.0
            } else {
                entropy_sum / n_tok as f64
            },
            advantages: self.all_adv.clone(),
            stats: self.stats.clone(),
            keep: self.keep.clone(),
            logp: split(&logp_all),
            ref_logp: self.reference.as_deref().map(split),
        })
    }
}

/// Gradients of the GRPO loss on `batch` for the current parameters, without stepping (the
/// first pass of [`grpo_update`]). `lora = None` with `opts.full_fine_tuning` gives the base
/// weights' gradients. No LoRA dropout here (dropout belongs to a training step's seed).
pub fn grpo_gradients(
    model: &CpuModel,
    lora: Option<&LoraWeights>,
    batch: &GrpoBatch,
    opts: &GrpoOptions,
) -> Result<GrpoGradients> {
    let p = prepare(model, lora, batch, opts)?;
    let no_dropout = lora.map(|l| {
        let mut l = l.clone();
        l.config.dropout = 0.0;
        l
    });
    let lora = no_dropout.as_ref().or(lora);
    gradients(model, lora, &p, opts, 0)
}

/// [`grpo_gradients`] of a training step whose LoRA-dropout seed is `dropout_seed`
/// ([`TrainState::dropout_seed`]): the adapter's dropout applies, exactly as in the first pass
/// of [`grpo_update`] at that seed (micro-batch i uses `dropout_seed + i`).
pub fn grpo_gradients_with_dropout(
    model: &CpuModel,
    lora: Option<&LoraWeights>,
    batch: &GrpoBatch,
    opts: &GrpoOptions,
    dropout_seed: u64,
) -> Result<GrpoGradients> {
    let p = prepare(model, lora, batch, opts)?;
    gradients(model, lora, &p, opts, dropout_seed)
}

/// The GRPO policy update: `num_iterations` optimiser steps on the same rollouts. Trains the
/// adapter when given, else (with `opts.full_fine_tuning`) every base weight. A step whose loss
/// or gradient is non-finite is skipped (parameters and moments unchanged, `skipped` set); the
/// schedule's step still advances. Returns one metrics record per step.
pub fn grpo_update(
    model: &mut CpuModel,
    mut lora: Option<&mut LoraWeights>,
    state: &mut TrainState,
    batch: &GrpoBatch,
    opts: &GrpoOptions,
) -> Result<Vec<StepMetrics>> {
    let p = prepare(model, lora.as_deref(), batch, opts)?;
    let mut out = Vec::with_capacity(opts.num_iterations);
    for iteration in 0..opts.num_iterations {
        let mut g = gradients(model, lora.as_deref(), &p, opts, state.dropout_seed())?;
        let lr = opts.schedule.lr_at(state.step as usize);
        let opt = opts.optimizer.with_lr(lr);
        let bad_loss = !g.loss.is_finite();
        let rep = apply_update(
            model,
            lora.as_deref_mut(),
            &mut state.adam,
            &opt,
            &mut g.grads,
            opts.max_grad_norm,
            bad_loss,
        )?;
        out.push(step_metrics(
            state,
            iteration,
            &g,
            &rep,
            lr,
            batch,
            p.tokens.len(),
        ));
        state.step += 1;
        state.skipped_steps += rep.skipped as u64;
    }
    Ok(out)
}

/// The metrics record of one optimiser step (any backend).
pub(crate) fn step_metrics(
    state: &TrainState,
    iteration: usize,
    g: &GrpoGradients,
    rep: &crate::optim::StepReport,
    lr: f64,
    batch: &GrpoBatch,
    num_seqs: usize,
) -> StepMetrics {
    let m = &g.metrics;
    StepMetrics {
        step: state.step,
        iteration,
        loss: g.loss,
        kl: m.kl_mean,
        clip_low: m.clip_low,
        clip_high: m.clip_high,
        clip_region: m.clip_region,
        ratio_mean: m.ratio_mean,
        entropy: g.entropy,
        grad_norm: rep.grad_norm,
        lr,
        frac_zero_std: g.stats.as_ref().map_or(0.0, |a| a.frac_zero_std()),
        reward_mean: if batch.rewards.is_empty() {
            0.0
        } else {
            batch.rewards.iter().sum::<f32>() / batch.rewards.len() as f32
        },
        num_tokens: m.num_tokens,
        num_seqs,
        skipped: rep.skipped,
    }
}
