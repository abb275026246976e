//! The GRPO per-token loss, its aggregation and its analytic gradient (see the module spec in
//! `loss/mod.rs`).

use serde::Deserialize;

use super::{KlEstimator, LossType, Real};
use crate::{Error, Result};

/// Loss options, named as in TRL's `GRPOConfig`.
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(default)]
pub struct GrpoLossConfig {
    pub loss_type: LossType,
    /// KL coefficient; 0 (TRL's default) needs no reference log-probs.
    pub beta: f64,
    /// Lower clip range: ratios below `1 − epsilon` are clipped.
    pub epsilon: f64,
    /// Upper clip range (`1 + epsilon_high`); `None` means `epsilon` (DAPO uses 0.28).
    pub epsilon_high: Option<f64>,
    pub kl_estimator: KlEstimator,
    /// The configured maximum completion length: the `dr_grpo` normaliser.
    pub max_completion_length: usize,
}

impl Default for GrpoLossConfig {
    fn default() -> Self {
        GrpoLossConfig {
            loss_type: LossType::default(),
            beta: 0.0,
            epsilon: 0.2,
            epsilon_high: None,
            kl_estimator: KlEstimator::default(),
            max_completion_length: 256,
        }
    }
}

impl GrpoLossConfig {
    pub fn epsilon_high(&self) -> f64 {
        self.epsilon_high.unwrap_or(self.epsilon)
    }

    pub fn validate(&self) -> Result<()> {
        let nonneg = |name: &str, x: f64| {
            if x.is_finite() && x >= 0.0 {
                Ok(())
            } else {
                Err(Error::invalid(format!(
                    "{name} must be a finite number >= 0, got {x}"
                )))
            }
        };
        nonneg("beta", self.beta)?;
        nonneg("epsilon", self.epsilon)?;
        nonneg("epsilon_high", self.epsilon_high())?;
        if self.loss_type == LossType::DrGrpo && self.max_completion_length == 0 {
            return Err(Error::invalid(
                "loss_type = \"dr_grpo\" needs max_completion_length > 0",
            ));
        }
        Ok(())
    }
}

/// The behaviour policy's log-probs.
#[derive(Clone, Copy, Debug)]
pub enum OldLogp<'a, T> {
    /// `num_iterations == 1`: old is the detached current log-prob, so ratio ≡ 1 and
    /// d ratio / d logp = 1.
    Current,
    /// Log-probs recorded at sampling time (one per token, packed like `logp`).
    Given(&'a [T]),
}

/// Per-token inputs, packed sequence-major: sequence `i` owns the next `lengths[i]` tokens.
#[derive(Clone, Copy, Debug)]
pub struct GrpoInputs<'a, T> {
    /// Current-policy log-prob of each completion token.
    pub logp: &'a [T],
    pub old_logp: OldLogp<'a, T>,
    /// Reference-policy (adapter off) log-probs; required when `beta > 0`, used for the KL
    /// metric whenever given.
    pub ref_logp: Option<&'a [T]>,
    /// One advantage per sequence.
    pub advantages: &'a [T],
    /// Completion length of each sequence (0 allowed).
    pub lengths: &'a [usize],
}

impl<T> GrpoInputs<'_, T> {
    fn validate(&self, cfg: &GrpoLossConfig) -> Result<()> {
        let n: usize = self.lengths.iter().sum();
        if self.logp.len() != n {
            return Err(Error::invalid(format!(
                "grpo loss: {} log-probs but the sequence lengths sum to {n}",
                self.logp.len()
            )));
        }
        if self.advantages.len() != self.lengths.len() {
            return Err(Error::invalid(format!(
                "grpo loss: {} advantages for {} sequences",
                self.advantages.len(),
                self.lengths.len()
            )));
        }
        if let OldLogp::Given(o) = self.old_logp {
            if o.len() != n {
                return Err(Error::invalid(format!(
                    "grpo loss: {} old log-probs for {n} tokens",
                    o.len()
                )));
            }
        }
        match self.ref_logp {
            Some(r) if r.len() != n => Err(Error::invalid(format!(
                "grpo loss: {} reference log-probs for {n} tokens",
                r.len()
            ))),
            None if cfg.beta > 0.0 => Err(Error::invalid("grpo loss: beta > 0 needs reference log-probs")),
            _ => Ok(()),
        }
    }
}

/// Batch metrics, as token means over the batch (TRL's names in the comments).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GrpoMetrics {
    /// Total completion tokens.
    pub num_tokens: usize,
    /// `kl`: mean per-token KL (chosen estimator); `None` without reference log-probs.
    pub kl_mean: Option<f64>,
    /// `clip_ratio/low_mean`: fraction of tokens with ratio < 1 − ε and A < 0.
    pub clip_low: f64,
    /// `clip_ratio/high_mean`: fraction of tokens with ratio > 1 + ε_high and A > 0.
    pub clip_high: f64,
    /// `clip_ratio/region_mean`: `clip_low + clip_high`.
    pub clip_region: f64,
    /// Mean importance ratio.
    pub ratio_mean: f64,
}

/// Loss, gradient wrt every token's `logp`, and metrics.
#[derive(Clone, Debug, PartialEq)]
pub struct GrpoLossOutput<T> {
    pub loss: T,
    pub grad_logp: Vec<T>,
    pub metrics: GrpoMetrics,
}

/// One token's terms, before the aggregation weight.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenTerms<T> {
    /// `−min(l1, l2) + β·kl`.
    pub loss: T,
    /// d loss / d logp.
    pub dloss: T,
    pub ratio: T,
    /// The KL estimate (0 without a reference).
    pub kl: T,
}

/// The per-token GRPO loss and its derivative wrt `logp` (see the spec). `old = None` is
/// [`OldLogp::Current`]; `lo = 1 − ε`, `hi = 1 + ε_high`.
#[inline]
#[allow(clippy::too_many_arguments)]
pub fn grpo_token<T: Real>(
    logp: T,
    old: Option<T>,
    reference: Option<T>,
    adv: T,
    lo: T,
    hi: T,
    beta: T,
    est: KlEstimator,
) -> TokenTerms<T> {
    let ratio = match old {
        None => T::ONE,
        Some(o) => (logp - o).exp(),
    };
    let l1 = ratio * adv;
    // torch.clamp(x, min, max) = min(max(x, min), max)
    let clamped = if ratio < lo { lo } else { ratio };
    let clamped = if clamped > hi { hi } else { clamped };
    let l2 = clamped * adv;
    let (mut loss, mut dloss) = if l2 < l1 {
        (-l2, T::ZERO)
    } else {
        (-l1, -(adv * ratio))
    };
    let mut kl = T::ZERO;
    if let Some(r) = reference {
        let (k, dk) = match est {
            KlEstimator::K3 => {
                let e = (r - logp).exp();
                (e - (r - logp) - T::ONE, T::ONE - e)
            }
            KlEstimator::K1 => (logp - r, T::ONE),
        };
        kl = k;
        loss = loss + beta * k;
        dloss = dloss + beta * dk;
    }
    TokenTerms {
        loss,
        dloss,
        ratio,
        kl,
    }
}

/// Aggregation weight `w_i` of each sequence's tokens (see the spec).
pub fn sequence_weights(lengths: &[usize], loss_type: LossType, max_completion_length: usize) -> Vec<f64> {
    let n_seq = lengths.len() as f64;
    let total: usize = lengths.iter().sum();
    lengths
        .iter()
        .map(|&len| match loss_type {
            LossType::Grpo => 1.0 / (n_seq * len.max(1) as f64),
            LossType::Dapo => 1.0 / total.max(1) as f64,
            LossType::DrGrpo => 1.0 / (n_seq * max_completion_length as f64),
        })
        .collect()
}

/// [`grpo_loss_into`], allocating the gradient.
pub fn grpo_loss<T: Real>(cfg: &GrpoLossConfig, inp: &GrpoInputs<'_, T>) -> Result<GrpoLossOutput<T>> {
    let mut grad_logp = vec![T::ZERO; inp.logp.len()];
    let (loss, metrics) = grpo_loss_into(cfg, inp, &mut grad_logp)?;
    Ok(GrpoLossOutput {
        loss,
        grad_logp,
        metrics,
    })
}

/// The aggregated GRPO loss; writes `dL/dlogp` for every token into `grad` (same length as
/// `logp`). Returns the loss and the batch metrics.
pub fn grpo_loss_into<T: Real>(
    cfg: &GrpoLossConfig,
    inp: &GrpoInputs<'_, T>,
    grad: &mut [T],
) -> Result<(T, GrpoMetrics)> {
    cfg.validate()?;
    inp.validate(cfg)?;
    if grad.len() != inp.logp.len() {
        return Err(Error::invalid(format!(
            "grpo loss: gradient buffer has {} entries for {} tokens",
            grad.len(),
            inp.logp.len()
        )));
    }
    let weights = sequence_weights(inp.lengths, cfg.loss_type, cfg.max_completion_length);
    // Bounds computed in f64 then rounded, as torch rounds Python-float clamp bounds.
    let lo = T::from_f64(1.0 - cfg.epsilon);
    let hi = T::from_f64(1.0 + cfg.epsilon_high());
    let beta = T::from_f64(cfg.beta);

    let (mut loss, mut kl_sum, mut ratio_sum) = (0f64, 0f64, 0f64);
    let (mut n_low, mut n_high) = (0usize, 0usize);
    let mut start = 0;
    for ((&len, &adv), &w64) in inp.lengths.iter().zip(inp.advantages).zip(&weights) {
        let w = T::from_f64(w64);
        for t in start..start + len {
            let old = match inp.old_logp {
                OldLogp::Current => None,
                OldLogp::Given(o) => Some(o[t]),
            };
            let reference = inp.ref_logp.map(|r| r[t]);
            let tt = grpo_token(inp.logp[t], old, reference, adv, lo, hi, beta, cfg.kl_estimator);
            loss += w64 * tt.loss.to_f64();
            grad[t] = w * tt.dloss;
            kl_sum += tt.kl.to_f64();
            ratio_sum += tt.ratio.to_f64();
            n_low += (tt.ratio < lo && adv < T::ZERO) as usize;
            n_high += (tt.ratio > hi && adv > T::ZERO) as usize;
        }
        start += len;
    }
    let num_tokens = inp.logp.len();
    let per_token = |x: f64| {
        if num_tokens == 0 {
            0.0
        } else {
            x / num_tokens as f64
        }
    };
    let metrics = GrpoMetrics {
        num_tokens,
        kl_mean: inp.ref_logp.map(|_| per_token(kl_sum)),
        clip_low: per_token(n_low as f64),
        clip_high: per_token(n_high as f64),
        clip_region: per_token((n_low + n_high) as f64),
        ratio_mean: per_token(ratio_sum),
    };
    Ok((T::from_f64(loss), metrics))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(loss_type: LossType) -> GrpoLossConfig {
        GrpoLossConfig {
            loss_type,
            max_completion_length: 4,
            ..Default::default()
        }
    }

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol * (1.0 + a.abs().max(b.abs()))
    }

    // Hand case, β = 0, num_iterations = 1 (ratio ≡ 1, so per_token = −A and d/dlogp = −A·w):
    // lengths [2, 1, 0], advantages [1, −3, 5] → per-token losses −1, −1 | +3 | (none).
    //   grpo   : sequence means −1, 3, 0 (empty, still counted) → L = 2/3;
    //            w = [1/(3·2), 1/(3·1), 1/3] → grads −1/6, −1/6, 3/3 = 1.
    //   dapo   : (−1 − 1 + 3)/3 tokens = 1/3; grads −1/3, −1/3, 1.
    //   dr_grpo: L = 4 → 1/(3·4) = 1/12; grads −1/12, −1/12, 3/12.
    #[test]
    fn aggregation_by_hand() {
        let logp = [-0.3f64, -1.2, -0.7];
        let inp = GrpoInputs {
            logp: &logp,
            old_logp: OldLogp::Current,
            ref_logp: None,
            advantages: &[1.0, -3.0, 5.0],
            lengths: &[2, 1, 0],
        };
        let cases = [
            (LossType::Grpo, 2.0 / 3.0, [-1.0 / 6.0, -1.0 / 6.0, 1.0]),
            (LossType::Dapo, 1.0 / 3.0, [-1.0 / 3.0, -1.0 / 3.0, 1.0]),
            (
                LossType::DrGrpo,
                1.0 / 12.0,
                [-1.0 / 12.0, -1.0 / 12.0, 3.0 / 12.0],
            ),
        ];
        for (lt, loss, grad) in cases {
            let out = grpo_loss(&cfg(lt), &inp).unwrap();
            assert!(close(out.loss, loss, 1e-12), "{lt:?}: {} vs {loss}", out.loss);
            for (g, e) in out.grad_logp.iter().zip(grad) {
                assert!(close(*g, e, 1e-12), "{lt:?}: {:?} vs {grad:?}", out.grad_logp);
            }
            assert_eq!(out.metrics.ratio_mean, 1.0);
            assert_eq!(out.metrics.clip_region, 0.0);
            assert_eq!(out.metrics.kl_mean, None);
        }
    }

    // Hand case with clipping and k3, ε = 0.2, β = 0.5, dapo, three one-token sequences,
    // A = [−1, +1, +1], logp = −1, old chosen so the ratios are 0.5, 0.5, 2:
    //   s0: ratio 0.5, A −1 → l1 = −0.5, l2 = clamp(0.5, 0.8, 1.2)·(−1) = −0.8 < l1:
    //       clipped branch is the strict min → ppo 0.8, d 0; clip low.
    //   s1: ratio 0.5, A +1 → l1 0.5, l2 0.8, min l1 → ppo −0.5, d = −A·ratio = −0.5.
    //   s2: ratio 2,   A +1 → l1 2, l2 1.2 < l1 → ppo −1.2, d 0, clip high.
    //   ref = logp + ln 2 on every token: k3 = 2 − ln 2 − 1 = 1 − ln 2, d k3 = 1 − 2 = −1.
    //   per token: 0.8 + 0.5(1 − ln2), −0.5 + 0.5(1 − ln2), −1.2 + 0.5(1 − ln2);
    //   dapo L = mean = (0.8 − 0.5 − 1.2)/3 + 0.5(1 − ln 2) = −0.3 + 0.5(1 − ln 2).
    //   grads (w = 1/3): (0 − 0.5)/3, (−0.5 − 0.5)/3, (0 − 0.5)/3.
    #[test]
    fn clipping_and_kl_by_hand() {
        let ln2 = std::f64::consts::LN_2;
        let logp = [-1.0f64, -1.0, -1.0];
        let old = [-1.0 + ln2, -1.0 + ln2, -1.0 - ln2];
        let reference = [-1.0 + ln2; 3];
        let c = GrpoLossConfig {
            loss_type: LossType::Dapo,
            beta: 0.5,
            ..Default::default()
        };
        let inp = GrpoInputs {
            logp: &logp,
            old_logp: OldLogp::Given(&old),
            ref_logp: Some(&reference),
            advantages: &[-1.0, 1.0, 1.0],
            lengths: &[1, 1, 1],
        };
        let out = grpo_loss(&c, &inp).unwrap();
        let kl = 1.0 - ln2;
        assert!(close(out.loss, -0.3 + 0.5 * kl, 1e-12), "{}", out.loss);
        let expect = [-0.5 / 3.0, -1.0 / 3.0, -0.5 / 3.0];
        for (g, e) in out.grad_logp.iter().zip(expect) {
            assert!(close(*g, e, 1e-12), "{:?}", out.grad_logp);
        }
        let m = out.metrics;
        assert!(close(m.kl_mean.unwrap(), kl, 1e-12));
        assert!(close(m.clip_low, 1.0 / 3.0, 1e-12));
        assert!(close(m.clip_high, 1.0 / 3.0, 1e-12));
        assert!(close(m.clip_region, 2.0 / 3.0, 1e-12));
        assert!(close(m.ratio_mean, 3.0 / 3.0, 1e-12)); // (0.5 + 0.5 + 2)/3 = 1
        assert_eq!(m.num_tokens, 3);

        // k1: kl = logp − ref = −ln 2, d = 1.
        let c1 = GrpoLossConfig {
            kl_estimator: KlEstimator::K1,
            ..c
        };
        let out = grpo_loss(&c1, &inp).unwrap();
        assert!(close(out.loss, -0.3 - 0.5 * ln2, 1e-12));
        let expect = [0.5 / 3.0, 0.0, 0.5 / 3.0];
        for (g, e) in out.grad_logp.iter().zip(expect) {
            assert!(close(*g, e, 1e-12), "{:?}", out.grad_logp);
        }
    }

    /// A tiny deterministic generator for test data.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> f64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 11) as f64 / (1u64 << 53) as f64
        }
        fn range(&mut self, lo: f64, hi: f64) -> f64 {
            lo + (hi - lo) * self.next()
        }
    }

    /// Finite differences of dL/dlogp (f64) over every loss type × KL setting × old-logp mode,
    /// with ε_high ≠ ε, ragged sequences and an empty one. Old log-probs are placed so that
    /// every ratio is at least 0.02 away (in log space) from a clip boundary, so no kink lies
    /// within the step.
    #[test]
    fn finite_differences() {
        let lengths = [3usize, 0, 5, 1, 4, 2];
        let n: usize = lengths.iter().sum();
        let mut rng = Lcg(12345);
        let logp: Vec<f64> = (0..n).map(|_| rng.range(-3.0, -0.05)).collect();
        let reference: Vec<f64> = logp.iter().map(|&l| l + rng.range(-0.6, 0.6)).collect();
        let advantages = [1.3, -0.7, -1.1, 0.4, 0.9, -0.2];
        let (eps, eps_high) = (0.2, 0.28);
        // log-ratio offsets: well below 1−ε (ln 0.8 ≈ −0.223), inside, well above 1+ε_high
        // (ln 1.28 ≈ 0.247).
        let offsets = [-0.5, -0.1, 0.05, 0.45, -0.35, 0.3, 0.0];
        let old: Vec<f64> = (0..n).map(|t| logp[t] - offsets[t % offsets.len()]).collect();

        let h = 1e-6;
        let mut saw_low = false;
        let mut saw_high = false;
        for loss_type in [LossType::Grpo, LossType::Dapo, LossType::DrGrpo] {
            for (beta, est) in [
                (0.0, KlEstimator::K3),
                (0.3, KlEstimator::K3),
                (0.3, KlEstimator::K1),
            ] {
                for given in [false, true] {
                    let c = GrpoLossConfig {
                        loss_type,
                        beta,
                        epsilon: eps,
                        epsilon_high: Some(eps_high),
                        kl_estimator: est,
                        max_completion_length: 6,
                    };
                    let reference = (beta > 0.0).then_some(&reference[..]);
                    let mode = if given {
                        OldLogp::Given(&old[..])
                    } else {
                        OldLogp::Current
                    };
                    let inp = GrpoInputs {
                        logp: &logp,
                        old_logp: mode,
                        ref_logp: reference,
                        advantages: &advantages,
                        lengths: &lengths,
                    };
                    let out = grpo_loss(&c, &inp).unwrap();
                    if given {
                        saw_low |= out.metrics.clip_low > 0.0;
                        saw_high |= out.metrics.clip_high > 0.0;
                    }
                    // The function differentiated: old held fixed (for `Current`, at the
                    // unperturbed logp — that is what detaching means).
                    let old_fixed: &[f64] = if given { &old } else { &logp };
                    let f = |lp: &[f64]| {
                        let inp = GrpoInputs {
                            logp: lp,
                            old_logp: OldLogp::Given(old_fixed),
                            ref_logp: reference,
                            advantages: &advantages,
                            lengths: &lengths,
                        };
                        grpo_loss(&c, &inp).unwrap().loss
                    };
                    assert!(close(f(&logp), out.loss, 1e-14));
                    for t in 0..n {
                        let mut p = logp.clone();
                        p[t] += h;
                        let fp = f(&p);
                        p[t] -= 2.0 * h;
                        let fm = f(&p);
                        let fd = (fp - fm) / (2.0 * h);
                        assert!(
                            (fd - out.grad_logp[t]).abs() < 1e-8,
                            "{loss_type:?} beta={beta} {est:?} given={given} token {t}: fd {fd} analytic {}",
                            out.grad_logp[t]
                        );
                    }
                }
            }
        }
        assert!(saw_low && saw_high, "the test data must clip on both sides");
    }

    /// The f32 path agrees with the f64 one.
    #[test]
    fn f32_matches_f64() {
        let lengths = [2usize, 3];
        let logp = [-0.5f64, -1.5, -0.2, -2.0, -0.9];
        let old = [-0.6f64, -1.0, -0.2, -2.4, -0.8];
        let reference = [-0.4f64, -1.7, -0.3, -1.9, -1.0];
        let adv = [0.8f64, -1.2];
        let c = GrpoLossConfig {
            beta: 0.04,
            epsilon_high: Some(0.28),
            ..Default::default()
        };
        let out64 = grpo_loss(
            &c,
            &GrpoInputs {
                logp: &logp,
                old_logp: OldLogp::Given(&old),
                ref_logp: Some(&reference),
                advantages: &adv,
                lengths: &lengths,
            },
        )
        .unwrap();
        let f = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        let (l32, o32, r32, a32) = (f(&logp), f(&old), f(&reference), f(&adv));
        let out32 = grpo_loss(
            &c,
            &GrpoInputs {
                logp: &l32,
                old_logp: OldLogp::Given(&o32),
                ref_logp: Some(&r32),
                advantages: &a32,
                lengths: &lengths,
            },
        )
        .unwrap();
        // f32 inputs rounded from f64 (rel 6e-8) and f32 arithmetic on O(1) values through
        // exp(logp − old) and a 5-token mean: a few 1e-7; any formula difference is ≥ 1e-3.
        assert!((out32.loss as f64 - out64.loss).abs() < 1e-6);
        for (a, b) in out32.grad_logp.iter().zip(&out64.grad_logp) {
            assert!((*a as f64 - b).abs() < 1e-6);
        }
    }

    #[test]
    fn empty_batch_and_bad_input() {
        let empty: [f32; 0] = [];
        let inp = GrpoInputs {
            logp: &empty,
            old_logp: OldLogp::Current,
            ref_logp: None,
            advantages: &empty,
            lengths: &[],
        };
        let out = grpo_loss(&GrpoLossConfig::default(), &inp).unwrap();
        assert_eq!(out.loss, 0.0);
        assert_eq!(
            out.metrics,
            GrpoMetrics {
                kl_mean: None,
                ..Default::default()
            }
        );

        let logp = [-1.0f32, -2.0];
        let ok = GrpoInputs {
            logp: &logp,
            old_logp: OldLogp::Current,
            ref_logp: None,
            advantages: &[1.0],
            lengths: &[2],
        };
        let c = GrpoLossConfig::default();
        assert!(grpo_loss(&c, &ok).is_ok());
        assert!(grpo_loss(&c, &GrpoInputs { lengths: &[3], ..ok }).is_err());
        assert!(grpo_loss(
            &c,
            &GrpoInputs {
                advantages: &[1.0, 2.0],
                ..ok
            }
        )
        .is_err());
        assert!(grpo_loss(
            &c,
            &GrpoInputs {
                old_logp: OldLogp::Given(&[0.0]),
                ..ok
            }
        )
        .is_err());
        assert!(grpo_loss(
            &c,
            &GrpoInputs {
                ref_logp: Some(&[0.0]),
                ..ok
            }
        )
        .is_err());
        assert!(grpo_loss(&GrpoLossConfig { beta: 0.1, ..c }, &ok).is_err());
        assert!(grpo_loss(&GrpoLossConfig { epsilon: -0.1, ..c }, &ok).is_err());
        assert!(grpo_loss(&GrpoLossConfig { beta: f64::NAN, ..c }, &ok).is_err());
        let dr = GrpoLossConfig {
            loss_type: LossType::DrGrpo,
            max_completion_length: 0,
            ..c
        };
        assert!(grpo_loss(&dr, &ok).is_err());
        let mut short = [0.0f32; 1];
        assert!(grpo_loss_into(&c, &ok, &mut short).is_err());
    }
}
