//! The optimiser side of a train step, all f32 over lists of parameter slices (one slice per
//! LoRA tensor):
//!
//! - [`AdamW`] + [`AdamWState`]: exactly `torch.optim.AdamW`; the state is plain vectors
//!   (serialisable) for exact resume.
//! - [`clip_grad_norm`] / [`grad_norm`] / [`check_finite`]: `torch.nn.utils.clip_grad_norm_`;
//!   a non-finite norm means the caller must skip the step ([`clip_and_step`] does that).
//! - [`LrSchedule`]: transformers' `get_scheduler` (`constant`, `constant_with_warmup`,
//!   `linear`, `cosine`), a pure `lr_at(step)`.
//! - [`GradAccumulator`]: micro-batch gradients summed into one buffer, each scaled by
//!   `1 / accumulation_steps` (as Accelerate scales the loss).
//!
//! A train step: accumulate → `clip_and_step(lr = schedule.lr_at(step))` → next step.

mod accum;
mod adamw;
mod clip;
mod schedule;

pub use accum::GradAccumulator;
pub use adamw::{clip_and_step, AdamW, AdamWScalars, AdamWState, StepReport};
pub use clip::{check_finite, clip_grad_norm, grad_norm, ClipReport};
pub use schedule::{LrSchedule, SchedulerType, Warmup};
