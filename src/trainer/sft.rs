//! Supervised fine-tuning on the CPU reference: cross-entropy on the completion tokens (the
//! prompt is context only), for an adapter or for every base weight, micro-batched with the
//! whole batch's normalisation (−1/N per completion token, N = the batch's completion tokens)
//! and the same clip → AdamW path as GRPO.

use crate::cpu::model::CpuModel;
use crate::cpu::train::{self, Grads, LoraDropout, Recompute, Sequence, TrainOptions};
use crate::error::{Error, Result};
use crate::lora::LoraWeights;
use crate::optim::{AdamW, LrSchedule, SchedulerType};
use crate::trainer::state::TrainState;
use crate::trainer::step::micro_ranges;
use crate::trainer::{add_grads, apply_update};

/// One training example: the loss covers `completion_ids` only.
#[derive(Clone, Debug, PartialEq)]
pub struct SftExample {
    pub prompt_ids: Vec<u32>,
    pub completion_ids: Vec<u32>,
}

#[derive(Clone, Debug)]
pub struct SftOptions {
    /// Examples per forward/backward (0: the whole batch at once).
    pub micro_batch_size: usize,
    pub max_grad_norm: f32,
    pub recompute: Recompute,
    pub chunk_rows: usize,
    pub full_fine_tuning: bool,
    /// AdamW hyper-parameters; its `lr` is replaced by `schedule.lr_at(step)`.
    pub optimizer: AdamW,
    pub schedule: LrSchedule,
}

impl Default for SftOptions {
    fn default() -> Self {
        SftOptions {
            micro_batch_size: 0,
            max_grad_norm: 1.0,
            recompute: Recompute::None,
            chunk_rows: 64,
            full_fine_tuning: false,
            optimizer: AdamW {
                weight_decay: 0.0,
                ..AdamW::default()
            },
            schedule: LrSchedule {
                kind: SchedulerType::Constant,
                base_lr: 1e-4,
                warmup_steps: 0,
                total_steps: 1,
            },
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct SftMetrics {
    pub step: u64,
    /// Mean cross-entropy per completion token.
    pub loss: f32,
    pub grad_norm: f32,
    pub lr: f64,
    pub num_tokens: usize,
    pub skipped: bool,
}

/// (loss, gradients, completion tokens) of the batch for the current parameters.
pub fn sft_gradients(
    model: &CpuModel,
    lora: Option<&LoraWeights>,
    examples: &[SftExample],
    opts: &SftOptions,
    dropout_seed: u64,
) -> Result<(f32, Grads, usize)> {
    if opts.full_fine_tuning == lora.is_some() {
        return Err(Error::invalid(
            "give an adapter for LoRA training, or none with full fine-tuning",
        ));
    }
    let vocab = model.config.vocab_size;
    let mut tokens = Vec::with_capacity(examples.len());
    for (i, e) in examples.iter().enumerate() {
        if e.prompt_ids.is_empty() {
            return Err(Error::invalid(format!("example {i}: empty prompt")));
        }
        if let Some(&t) = e
            .prompt_ids
            .iter()
            .chain(&e.completion_ids)
            .find(|&&t| t as usize >= vocab)
        {
            return Err(Error::invalid(format!(
                "example {i}: token id {t} is outside the vocabulary of {vocab} tokens"
            )));
        }
        let all = [&e.prompt_ids[..], &e.completion_ids[..]].concat();
        if all.len() > model.config.max_position_embeddings {
            return Err(Error::invalid(format!(
                "example {i}: {} tokens, longer than the model's context of {}",
                all.len(),
                model.config.max_position_embeddings
            )));
        }
        tokens.push(all);
    }
    let total: usize = examples.iter().map(|e| e.completion_ids.len()).sum();
    let g = if total == 0 { 0.0 } else { -1.0 / total as f64 };
    let mut loss = 0f64;
    let mut acc: Option<Grads> = None;
    for (mi, rg) in micro_ranges(examples.len(), opts.micro_batch_size, 1)
        .into_iter()
        .enumerate()
    {
        let seqs: Vec<Sequence> = rg
            .clone()
            .map(|i| Sequence {
                tokens: &tokens[i],
                prompt_len: examples[i].prompt_ids.len(),
            })
            .collect();
        let to = TrainOptions {
            temperature: 1.0,
            recompute: opts.recompute,
            chunk_rows: opts.chunk_rows,
            dropout: lora.filter(|l| l.config.dropout > 0.0).map(|l| LoraDropout {
                p: l.config.dropout,
                seed: dropout_seed.wrapping_add(mi as u64),
            }),
            full_grads: opts.full_fine_tuning,
        };
        let fwd = train::forward(model, lora, &seqs, &to);
        loss += fwd.logp.iter().map(|&l| l as f64).sum::<f64>() * g;
        let dlogp = vec![g as f32; fwd.logp.len()];
        let mut gr = fwd.backward(&dlogp, None);
        match acc.as_mut() {
            None => acc = Some(gr),
            Some(a) => add_grads(a, &mut gr),
        }
    }
    let grads = acc.unwrap_or_else(|| Grads {
        lora: lora.map(|l| l.zeros_like()),
        weights: opts
            .full_fine_tuning
            .then(|| train::zeros_like_weights(&model.weights)),
    });
    Ok((loss as f32, grads, total))
}

/// One SFT optimiser step on `examples` (skipped and reported when non-finite).
pub fn sft_step(
    model: &mut CpuModel,
    lora: Option<&mut LoraWeights>,
    state: &mut TrainState,
    examples: &[SftExample],
    opts: &SftOptions,
) -> Result<SftMetrics> {
    let (loss, mut grads, num_tokens) =
        sft_gradients(model, lora.as_deref(), examples, opts, state.dropout_seed())?;
    let lr = opts.schedule.lr_at(state.step as usize);
    let opt = opts.optimizer.with_lr(lr);
    let rep = apply_update(
        model,
        lora,
        &mut state.adam,
        &opt,
        &mut grads,
        opts.max_grad_norm,
        !loss.is_finite(),
    )?;
    let m = SftMetrics {
        step: state.step,
        loss,
        grad_norm: rep.grad_norm,
        lr,
        num_tokens,
        skipped: rep.skipped,
    };
    state.step += 1;
    state.skipped_steps += rep.skipped as u64;
    Ok(m)
}

/// The order in which an epoch visits `n` examples: a Fisher–Yates shuffle that is a pure
/// function of (seed, epoch), so a resumed run sees the same order.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut x = crate::trainer::state::splitmix(seed ^ crate::trainer::state::splitmix(epoch ^ 0x5F7));
    for i in (1..n).rev() {
        x = crate::trainer::state::splitmix(x);
        let j = (x % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}
