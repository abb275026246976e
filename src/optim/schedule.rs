//! Learning-rate schedules, as transformers' `get_scheduler` (`LambdaLR` multipliers).

use serde::Deserialize;

use crate::{Error, Result};

/// transformers' `lr_scheduler_type` names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SchedulerType {
    /// Multiplier 1 always; warm-up is ignored (as transformers' `get_constant_schedule`).
    Constant,
    /// Linear warm-up from 0, then 1.
    ConstantWithWarmup,
    /// Linear warm-up, then linear decay to 0 at `total_steps` (transformers' default).
    #[default]
    Linear,
    /// Linear warm-up, then `0.5·(1 + cos(π·progress))` (half a cosine cycle to 0).
    Cosine,
}

/// Warm-up length, absolute or as a fraction of the total steps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Warmup {
    Steps(usize),
    /// `ceil(total_steps · ratio)` steps.
    Ratio(f64),
}

impl Warmup {
    /// transformers' precedence: `warmup_steps` if > 0, else `warmup_ratio`.
    pub fn from_config(warmup_steps: usize, warmup_ratio: f64) -> Self {
        if warmup_steps > 0 {
            Warmup::Steps(warmup_steps)
        } else {
            Warmup::Ratio(warmup_ratio)
        }
    }

    /// The warm-up in steps for a run of `total_steps`.
    pub fn steps(&self, total_steps: usize) -> usize {
        match *self {
            Warmup::Steps(n) => n,
            Warmup::Ratio(r) => (total_steps as f64 * r).ceil() as usize,
        }
    }
}

/// A schedule: `lr_at(step) = base_lr · multiplier(step)`, where `step` is the number of
/// optimiser steps already taken (0 for the first update — so with warm-up the first update
/// uses lr 0, exactly as `LambdaLR` does).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LrSchedule {
    pub kind: SchedulerType,
    pub base_lr: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl LrSchedule {
    pub fn new(kind: SchedulerType, base_lr: f64, total_steps: usize, warmup: Warmup) -> Result<Self> {
        if !(base_lr.is_finite() && base_lr >= 0.0) {
            return Err(Error::invalid(format!(
                "learning rate must be finite and >= 0, got {base_lr}"
            )));
        }
        if let Warmup::Ratio(r) = warmup {
            if !(0.0..=1.0).contains(&r) {
                return Err(Error::invalid(format!("warmup_ratio must be in [0, 1], got {r}")));
            }
        }
        Ok(LrSchedule {
            kind,
            base_lr,
            warmup_steps: warmup.steps(total_steps),
            total_steps,
        })
    }

    /// The multiplier at `step` (transformers' lambdas, verbatim; in f64).
    pub fn multiplier(&self, step: usize) -> f64 {
        let (s, w, n) = (step as f64, self.warmup_steps as f64, self.total_steps as f64);
        if self.kind == SchedulerType::Constant {
            return 1.0;
        }
        if step < self.warmup_steps {
            return s / w.max(1.0);
        }
        let decay_len = (n - w).max(1.0);
        match self.kind {
            SchedulerType::Constant | SchedulerType::ConstantWithWarmup => 1.0,
            SchedulerType::Linear => ((n - s) / decay_len).max(0.0),
            SchedulerType::Cosine => {
                let progress = (s - w) / decay_len;
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        }
    }

    /// The learning rate for the update taken after `step` previous updates.
    pub fn lr_at(&self, step: usize) -> f64 {
        self.base_lr * self.multiplier(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(kind: SchedulerType, warmup: Warmup) -> LrSchedule {
        LrSchedule::new(kind, 1.0, 100, warmup).unwrap()
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    // total 100, warm-up 10: step 0 → 0, step 5 → 0.5, step 10 (end of warm-up) → 1.
    // Decay over 90 steps: midpoint step 55 → linear 45/90 = 0.5, cosine 0.5(1 + cos(π/2)) = 0.5;
    // step 100 (end) → 0 for both. Step 28: progress 18/90 = 0.2, linear 72/90 = 0.8,
    // cosine 0.5(1 + cos 0.2π) = 0.904508…
    #[test]
    fn boundaries() {
        let w = Warmup::Steps(10);
        for kind in [
            SchedulerType::Linear,
            SchedulerType::Cosine,
            SchedulerType::ConstantWithWarmup,
        ] {
            let sc = s(kind, w);
            assert_eq!(sc.lr_at(0), 0.0, "{kind:?}");
            assert!(close(sc.lr_at(5), 0.5));
            assert!(close(sc.lr_at(10), 1.0));
        }
        let lin = s(SchedulerType::Linear, w);
        assert!(close(lin.lr_at(55), 0.5));
        assert!(close(lin.lr_at(28), 0.8));
        assert_eq!(lin.lr_at(100), 0.0);
        assert_eq!(lin.lr_at(150), 0.0);
        let cos = s(SchedulerType::Cosine, w);
        assert!(close(cos.lr_at(55), 0.5));
        assert!(close(
            cos.lr_at(28),
            0.5 * (1.0 + (0.2 * std::f64::consts::PI).cos())
        ));
        assert!(close(cos.lr_at(100), 0.0));
        let cww = s(SchedulerType::ConstantWithWarmup, w);
        assert_eq!((cww.lr_at(55), cww.lr_at(100)), (1.0, 1.0));
        let c = s(SchedulerType::Constant, w);
        assert_eq!((c.lr_at(0), c.lr_at(5), c.lr_at(100)), (1.0, 1.0, 1.0));
    }

    #[test]
    fn no_warmup_and_ratio() {
        let lin = LrSchedule::new(SchedulerType::Linear, 2e-5, 100, Warmup::Steps(0)).unwrap();
        assert_eq!(lin.lr_at(0), 2e-5);
        assert!((lin.lr_at(50) - 1e-5).abs() < 1e-18);
        let cos = LrSchedule::new(SchedulerType::Cosine, 1.0, 100, Warmup::Ratio(0.0)).unwrap();
        assert_eq!(cos.lr_at(0), 1.0);
        assert!(close(cos.lr_at(50), 0.5));
        // ceil(100 · 0.105) = 11.
        assert_eq!(Warmup::Ratio(0.105).steps(100), 11);
        assert_eq!(Warmup::from_config(5, 0.5), Warmup::Steps(5));
        assert_eq!(Warmup::from_config(0, 0.5), Warmup::Ratio(0.5));
        let r = LrSchedule::new(SchedulerType::Linear, 1.0, 20, Warmup::Ratio(0.1)).unwrap();
        assert_eq!(r.warmup_steps, 2);
        assert!(close(r.lr_at(1), 0.5));
        assert!(LrSchedule::new(SchedulerType::Linear, 1.0, 20, Warmup::Ratio(1.5)).is_err());
        assert!(LrSchedule::new(SchedulerType::Linear, -1.0, 20, Warmup::Steps(0)).is_err());
    }

    #[test]
    fn names() {
        let n = |j: &str| serde_json::from_str::<SchedulerType>(j).unwrap();
        assert_eq!(n("\"constant\""), SchedulerType::Constant);
        assert_eq!(n("\"constant_with_warmup\""), SchedulerType::ConstantWithWarmup);
        assert_eq!(n("\"linear\""), SchedulerType::Linear);
        assert_eq!(n("\"cosine\""), SchedulerType::Cosine);
        assert!(serde_json::from_str::<SchedulerType>("\"polynomial\"").is_err());
    }
}
