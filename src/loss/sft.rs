//! SFT / cross-entropy loss over gathered target log-probs (see the module spec).

use super::Real;
use crate::{Error, Result};

#[derive(Clone, Debug, PartialEq)]
pub struct SftLossOutput<T> {
    pub loss: T,
    pub grad_logp: Vec<T>,
    /// Number of target tokens that counted.
    pub num_tokens: usize,
}

/// [`sft_loss_into`], allocating the gradient.
pub fn sft_loss<T: Real>(logp: &[T], mask: Option<&[bool]>) -> Result<SftLossOutput<T>> {
    let mut grad_logp = vec![T::ZERO; logp.len()];
    let (loss, num_tokens) = sft_loss_into(logp, mask, &mut grad_logp)?;
    Ok(SftLossOutput {
        loss,
        grad_logp,
        num_tokens,
    })
}

/// `L = −(1/n) Σ_selected logp` over the `n` tokens selected by `mask` (all when `None`);
/// writes `dL/dlogp` (−1/n on selected tokens, 0 elsewhere) into `grad`. Returns `(L, n)`;
/// `L = 0` when `n = 0`.
pub fn sft_loss_into<T: Real>(logp: &[T], mask: Option<&[bool]>, grad: &mut [T]) -> Result<(T, usize)> {
    if let Some(m) = mask {
        if m.len() != logp.len() {
            return Err(Error::invalid(format!(
                "sft loss: mask has {} entries for {} tokens",
                m.len(),
                logp.len()
            )));
        }
    }
    if grad.len() != logp.len() {
        return Err(Error::invalid(format!(
            "sft loss: gradient buffer has {} entries for {} tokens",
            grad.len(),
            logp.len()
        )));
    }
    let selected = |t: usize| mask.is_none_or(|m| m[t]);
    let n = (0..logp.len()).filter(|&t| selected(t)).count();
    if n == 0 {
        grad.fill(T::ZERO);
        return Ok((T::ZERO, 0));
    }
    let g = T::from_f64(-1.0 / n as f64);
    let mut sum = 0f64;
    for (t, (&lp, gr)) in logp.iter().zip(grad.iter_mut()).enumerate() {
        if selected(t) {
            sum += lp.to_f64();
            *gr = g;
        } else {
            *gr = T::ZERO;
        }
    }
    Ok((T::from_f64(-sum / n as f64), n))
}

#[cfg(test)]
mod tests {
    use super::*;

    // logp = [−1, −2, −3, −6], mask [1, 1, 0, 1]: n = 3, L = (1 + 2 + 6)/3 = 3,
    // grads −1/3, −1/3, 0, −1/3. Unmasked: L = 12/4 = 3, grads −1/4.
    #[test]
    fn by_hand() {
        let logp = [-1.0f64, -2.0, -3.0, -6.0];
        let out = sft_loss(&logp, Some(&[true, true, false, true])).unwrap();
        assert_eq!(out.num_tokens, 3);
        assert!((out.loss - 3.0).abs() < 1e-15);
        assert_eq!(out.grad_logp, vec![-1.0 / 3.0, -1.0 / 3.0, 0.0, -1.0 / 3.0]);
        let out = sft_loss(&logp, None).unwrap();
        assert!((out.loss - 3.0).abs() < 1e-15);
        assert_eq!(out.grad_logp, vec![-0.25; 4]);

        // Finite difference of the masked loss.
        let mask = [true, false, true, true];
        let out = sft_loss(&logp, Some(&mask)).unwrap();
        for t in 0..4 {
            let mut p = logp;
            p[t] += 1e-6;
            let fp = sft_loss(&p, Some(&mask)).unwrap().loss;
            p[t] -= 2e-6;
            let fm = sft_loss(&p, Some(&mask)).unwrap().loss;
            assert!(((fp - fm) / 2e-6 - out.grad_logp[t]).abs() < 1e-8);
        }
    }

    #[test]
    fn empty_and_bad() {
        let out = sft_loss(&[-1.0f32], Some(&[false])).unwrap();
        assert_eq!((out.loss, out.num_tokens, out.grad_logp), (0.0, 0, vec![0.0]));
        assert!(sft_loss(&[-1.0f32], Some(&[true, false])).is_err());
        assert!(sft_loss_into(&[-1.0f32], None, &mut []).is_err());
    }
}
