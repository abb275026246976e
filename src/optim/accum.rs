//! Gradient accumulation over micro-batches, as Accelerate does it: each micro-batch's
//! gradient enters the buffer scaled by `1 / accumulation_steps` (Accelerate divides the loss),
//! so after all micro-batches the buffer holds their mean.
//!
//! Two ways to use it, neither copying a gradient:
//! - fold [`GradAccumulator::scale`] into `dL/dlogp` and let the backward pass add straight
//!   into the buffer (the cheap path; call [`GradAccumulator::zero`] first);
//! - or hand each finished micro-batch gradient to [`GradAccumulator::add`], which writes
//!   the first one (`buf = s·g`, no separate zeroing pass) and adds the rest (`buf += s·g`).

use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GradAccumulator {
    steps: usize,
    seen: usize,
}

impl GradAccumulator {
    /// `steps`: micro-batches per optimiser step (TRL's `gradient_accumulation_steps`, ≥ 1).
    pub fn new(steps: usize) -> Result<Self> {
        if steps == 0 {
            return Err(Error::invalid("gradient_accumulation_steps must be >= 1"));
        }
        Ok(GradAccumulator { steps, seen: 0 })
    }

    pub fn steps(&self) -> usize {
        self.steps
    }

    /// Micro-batches accumulated since the last reset.
    pub fn seen(&self) -> usize {
        self.seen
    }

    /// `1 / accumulation_steps`.
    pub fn scale(&self) -> f32 {
        1.0 / self.steps as f32
    }

    /// Whether a full set of micro-batches has been accumulated.
    pub fn is_ready(&self) -> bool {
        self.seen >= self.steps
    }

    /// Starts a new accumulation window (after the optimiser step).
    pub fn reset(&mut self) {
        self.seen = 0;
    }

    /// Zeroes the buffer and starts a new window (for the fold-into-backward path).
    pub fn zero(&mut self, buf: &mut [&mut [f32]]) {
        buf.iter_mut().for_each(|b| b.fill(0.0));
        self.seen = 0;
    }

    /// Counts a micro-batch whose (already scaled) gradient the backward pass added into the
    /// buffer itself. Returns whether the window is now complete.
    pub fn mark(&mut self) -> bool {
        self.seen += 1;
        self.is_ready()
    }

    /// Adds one micro-batch gradient: `buf = s·micro` for the first of a window, `buf += s·micro`
    /// afterwards, with `s = 1/steps`. Returns whether the window is now complete.
    pub fn add(&mut self, buf: &mut [&mut [f32]], micro: &[&[f32]]) -> Result<bool> {
        let bs: Vec<usize> = buf.iter().map(|b| b.len()).collect();
        let ms: Vec<usize> = micro.iter().map(|m| m.len()).collect();
        if bs != ms {
            return Err(Error::invalid(format!(
                "gradient accumulation: buffer sizes {bs:?}, micro-batch gradient sizes {ms:?}"
            )));
        }
        if self.is_ready() {
            return Err(Error::invalid(format!(
                "gradient accumulation: already holds {} of {} micro-batches; reset after the step",
                self.seen, self.steps
            )));
        }
        let s = self.scale();
        let first = self.seen == 0;
        for (b, m) in buf.iter_mut().zip(micro) {
            for (b, &m) in b.iter_mut().zip(m.iter()) {
                *b = if first { s * m } else { *b + s * m };
            }
        }
        Ok(self.mark())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Two micro-batches [2, 4] and [6, −4] with 2 steps: buffer = [1, 2] then [4, 0] (the mean).
    #[test]
    fn mean_of_micro_batches() {
        let mut acc = GradAccumulator::new(2).unwrap();
        let mut buf = vec![99.0f32, 99.0]; // stale contents are overwritten by the first add
        assert!(!acc.add(&mut [&mut buf], &[&[2.0, 4.0]]).unwrap());
        assert_eq!(buf, vec![1.0, 2.0]);
        assert!(acc.add(&mut [&mut buf], &[&[6.0, -4.0]]).unwrap());
        assert_eq!(buf, vec![4.0, 0.0]);
        assert!(acc.add(&mut [&mut buf], &[&[1.0, 1.0]]).is_err());
        acc.reset();
        assert!(!acc.add(&mut [&mut buf], &[&[2.0, 2.0]]).unwrap());
        assert_eq!(buf, vec![1.0, 1.0]);
        assert!(acc.add(&mut [&mut buf], &[&[1.0]]).is_err());
        assert!(GradAccumulator::new(0).is_err());
    }

    #[test]
    fn fold_into_backward() {
        let mut acc = GradAccumulator::new(4).unwrap();
        let mut buf = vec![5.0f32; 3];
        acc.zero(&mut [&mut buf]);
        assert_eq!(buf, vec![0.0; 3]);
        for _ in 0..3 {
            buf.iter_mut().for_each(|b| *b += acc.scale() * 2.0);
            assert!(!acc.mark());
        }
        buf.iter_mut().for_each(|b| *b += acc.scale() * 2.0);
        assert!(acc.mark());
        assert_eq!(buf, vec![2.0; 3]);
    }
}
