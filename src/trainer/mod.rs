//! The RFT loop and the training core. The loop (rollouts → grades → advantages → update →
//! log → save) is in [`run`]; what a user watches in [`metrics`] and [`plot`]. The core on the
//! CPU reference: one GRPO policy update over a batch of rollouts
//! ([`step`]), supervised fine-tuning ([`sft`]), checkpoints with exact resume ([`state`]) and
//! random initialisation for training a model from scratch ([`init`]).
//!
//! The trainable parameters are either a LoRA adapter (the base weights stay frozen) or every
//! base weight (full fine-tuning). Both are handled as one ordered list of f32 slices
//! ([`lora_params`], [`weight_params`]): gradients, AdamW moments and checkpoints use the same
//! order, so optimiser state lines up tensor by tensor.

pub mod init;
pub mod metrics;
pub mod plot;
pub mod run;
pub mod sft;
pub mod state;
pub mod step;

pub use sft::{epoch_order, sft_gradients, sft_step, SftExample, SftMetrics, SftOptions};
pub use state::{load_checkpoint, save_checkpoint, Checkpoint, TrainState, Trainable};
pub use step::{
    grpo_gradients, grpo_gradients_with_dropout, grpo_update, GrpoBatch, GrpoGradients, GrpoOptions, GrpoSeq,
    StepMetrics,
};

use crate::cpu::model::CpuModel;
use crate::cpu::train::Grads;
use crate::error::{Error, Result};
use crate::lora::LoraWeights;
use crate::model::weights::{Proj, Weights};
use crate::optim::{clip_and_step, AdamW, StepReport};

/// Every LoRA matrix in a fixed order: layer, then projection (`Proj::ALL`), then A, B.
pub fn lora_params(l: &LoraWeights) -> Vec<&[f32]> {
    let mut v: Vec<&[f32]> = Vec::new();
    for slot in &l.layers {
        for pair in slot.iter().flatten() {
            v.push(&pair.a);
            v.push(&pair.b);
        }
    }
    v
}

/// [`lora_params`], mutable.
pub fn lora_params_mut(l: &mut LoraWeights) -> Vec<&mut [f32]> {
    let mut v: Vec<&mut [f32]> = Vec::new();
    for slot in &mut l.layers {
        for pair in slot.iter_mut().flatten() {
            v.push(&mut pair.a);
            v.push(&mut pair.b);
        }
    }
    v
}

/// Every base weight in a fixed order: embed; per layer input_norm, q/k/v/o, q_norm, k_norm,
/// post_norm, gate/up/down (weight then bias); final_norm; lm_head (untied only).
pub fn weight_params(w: &Weights) -> Vec<&[f32]> {
    let mut v: Vec<&[f32]> = vec![&w.embed];
    for lw in &w.layers {
        v.push(&lw.input_norm);
        for p in [Proj::Q, Proj::K, Proj::V, Proj::O] {
            let l = lw.proj(p);
            v.push(&l.w);
            if let Some(b) = &l.b {
                v.push(b);
            }
        }
        if let Some(q) = &lw.q_norm {
            v.push(q);
        }
        if let Some(k) = &lw.k_norm {
            v.push(k);
        }
        v.push(&lw.post_norm);
        for p in [Proj::Gate, Proj::Up, Proj::Down] {
            let l = lw.proj(p);
            v.push(&l.w);
            if let Some(b) = &l.b {
                v.push(b);
            }
        }
    }
    v.push(&w.final_norm);
    if let Some(h) = &w.lm_head {
        v.push(h);
    }
    v
}

/// [`weight_params`], mutable.
pub fn weight_params_mut(w: &mut Weights) -> Vec<&mut [f32]> {
    let mut v: Vec<&mut [f32]> = vec![&mut w.embed];
    for lw in &mut w.layers {
        v.push(&mut lw.input_norm);
        let (q, k, vv, o) = (&mut lw.q, &mut lw.k, &mut lw.v, &mut lw.o);
        for l in [q, k, vv, o] {
            v.push(&mut l.w);
            if let Some(b) = &mut l.b {
                v.push(b);
            }
        }
        if let Some(q) = &mut lw.q_norm {
            v.push(q);
        }
        if let Some(k) = &mut lw.k_norm {
            v.push(k);
        }
        v.push(&mut lw.post_norm);
        for l in [&mut lw.gate, &mut lw.up, &mut lw.down] {
            v.push(&mut l.w);
            if let Some(b) = &mut l.b {
                v.push(b);
            }
        }
    }
    v.push(&mut w.final_norm);
    if let Some(h) = &mut w.lm_head {
        v.push(h);
    }
    v
}

/// The gradients of the trainable parameters as slices, in parameter order.
pub fn grad_slices_mut(g: &mut Grads) -> Vec<&mut [f32]> {
    match (&mut g.lora, &mut g.weights) {
        (Some(l), _) => lora_params_mut(l),
        (None, Some(w)) => weight_params_mut(w),
        (None, None) => Vec::new(),
    }
}

/// `acc += g`, tensor by tensor (both shaped alike).
pub(crate) fn add_grads(acc: &mut Grads, g: &mut Grads) {
    for (a, b) in grad_slices_mut(acc).into_iter().zip(grad_slices_mut(g)) {
        for (x, y) in a.iter_mut().zip(b.iter()) {
            *x += *y;
        }
    }
}

/// One optimiser update of the trainable parameters: clip the global grad norm to
/// `max_grad_norm` (≤ 0: off), then AdamW at `lr`. A non-finite gradient (or `force_skip`,
/// used for a non-finite loss) skips the step: parameters and moments are left unchanged.
pub(crate) fn apply_update(
    model: &mut CpuModel,
    lora: Option<&mut LoraWeights>,
    adam: &mut crate::optim::AdamWState,
    opt: &AdamW,
    grads: &mut Grads,
    max_grad_norm: f32,
    force_skip: bool,
) -> Result<StepReport> {
    let mut gs = grad_slices_mut(grads);
    if force_skip {
        let views: Vec<&[f32]> = gs.iter().map(|g| &**g).collect();
        return Ok(StepReport {
            grad_norm: crate::optim::grad_norm(&views),
            clip_scale: 1.0,
            skipped: true,
        });
    }
    let mut params = match lora {
        Some(l) => lora_params_mut(l),
        None => weight_params_mut(&mut model.weights),
    };
    if params.len() != gs.len() {
        return Err(Error::invalid(format!(
            "{} parameter tensors but {} gradient tensors",
            params.len(),
            gs.len()
        )));
    }
    clip_and_step(opt, adam, &mut params, &mut gs, max_grad_norm)
}
