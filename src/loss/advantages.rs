//! Group-relative advantages (see the module spec in `loss/mod.rs`).

use super::ScaleRewards;
use crate::{Error, Result};

/// The 1e-4 TRL adds to the std before dividing.
pub const STD_EPS: f64 = 1e-4;

/// Advantages for a group-major batch of rewards, plus the group statistics TRL logs.
#[derive(Clone, Debug, PartialEq)]
pub struct Advantages {
    /// One advantage per completion, group-major like the rewards.
    pub values: Vec<f32>,
    /// Completions per prompt (G).
    pub group_size: usize,
    /// Mean reward of each group.
    pub group_mean: Vec<f32>,
    /// Unbiased std of each group's rewards (reported whatever the scaling, as TRL does).
    pub group_std: Vec<f32>,
    /// Unbiased std over the whole batch.
    pub batch_std: f32,
    /// Whether each group's rewards are all equal (zero std: no learning signal).
    pub group_zero_std: Vec<bool>,
    /// How many groups have all-equal rewards.
    pub zero_std_groups: usize,
}

impl Advantages {
    pub fn num_groups(&self) -> usize {
        self.group_mean.len()
    }

    /// Fraction of groups with zero reward std (TRL's `frac_reward_zero_std`, per group).
    pub fn frac_zero_std(&self) -> f32 {
        if self.num_groups() == 0 {
            0.0
        } else {
            self.zero_std_groups as f32 / self.num_groups() as f32
        }
    }

    /// One flag per completion: `false` for completions of a zero-std group (drop them for
    /// dynamic sampling), `true` otherwise.
    pub fn keep_mask(&self) -> Vec<bool> {
        self.group_zero_std
            .iter()
            .flat_map(|&z| std::iter::repeat_n(!z, self.group_size))
            .collect()
    }
}

fn mean(xs: &[f32]) -> f64 {
    xs.iter().map(|&x| x as f64).sum::<f64>() / xs.len() as f64
}

/// Unbiased (Bessel-corrected) standard deviation; needs `xs.len() >= 2`.
fn std_unbiased(xs: &[f32]) -> f64 {
    let m = mean(xs);
    let ss: f64 = xs.iter().map(|&x| (x as f64 - m).powi(2)).sum();
    (ss / (xs.len() - 1) as f64).sqrt()
}

/// `A = r − mean_group(r)`, divided by `std + 1e-4` per `scale` (see the module spec).
/// `rewards` is group-major (`B` groups of `group_size`). Statistics are computed in f64.
///
/// Errors: `group_size < 2` (the unbiased std needs two samples; TRL requires
/// `num_generations >= 2`), a length that is not a multiple of `group_size`, or a non-finite
/// reward.
pub fn advantages(rewards: &[f32], group_size: usize, scale: ScaleRewards) -> Result<Advantages> {
    if group_size < 2 {
        return Err(Error::invalid(format!(
            "advantages: group size (num_generations) must be at least 2, got {group_size}"
        )));
    }
    if !rewards.len().is_multiple_of(group_size) {
        return Err(Error::invalid(format!(
            "advantages: {} rewards is not a multiple of the group size {group_size}",
            rewards.len()
        )));
    }
    if let Some(i) = rewards.iter().position(|r| !r.is_finite()) {
        return Err(Error::invalid(format!(
            "advantages: reward {i} is not finite ({})",
            rewards[i]
        )));
    }
    let batch_std = if rewards.len() >= 2 {
        std_unbiased(rewards)
    } else {
        0.0
    };
    let mut out = Advantages {
        values: Vec::with_capacity(rewards.len()),
        group_size,
        group_mean: Vec::new(),
        group_std: Vec::new(),
        batch_std: batch_std as f32,
        group_zero_std: Vec::new(),
        zero_std_groups: 0,
    };
    for group in rewards.chunks_exact(group_size) {
        let m = mean(group);
        let s = std_unbiased(group);
        let zero = group.iter().all(|&r| r == group[0]);
        let denom = match scale {
            ScaleRewards::Group => s + STD_EPS,
            ScaleRewards::Batch => batch_std + STD_EPS,
            ScaleRewards::None => 1.0,
        };
        out.values
            .extend(group.iter().map(|&r| ((r as f64 - m) / denom) as f32));
        out.group_mean.push(m as f32);
        out.group_std.push(s as f32);
        out.group_zero_std.push(zero);
        out.zero_std_groups += zero as usize;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    // The advantages are f32 values of size ≤ 2 computed from exact small integers: a few
    // ulps (1.2e-7 each at 1) of error; the ε = 1e-4 in the denominator shows at 1e-4.
    fn close(a: &[f32], b: &[f64]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((*x as f64 - y).abs() < 1e-6, "{a:?} vs {b:?}");
        }
    }

    // Two groups of G = 3: [1, 2, 3] and [5, 5, 5].
    //   group 0: mean 2, deviations −1, 0, 1, unbiased var (1 + 0 + 1)/2 = 1, std 1.
    //   group 1: mean 5, all equal → std 0, advantages 0 whatever the scaling.
    //   batch: mean 21/6 = 3.5, deviations −2.5 −1.5 −0.5 1.5 1.5 1.5,
    //          squares 6.25 + 2.25 + 0.25 + 3·2.25 = 15.5, var 15.5/5 = 3.1, std √3.1.
    const R: [f32; 6] = [1.0, 2.0, 3.0, 5.0, 5.0, 5.0];

    #[test]
    fn group_scaling() {
        let a = advantages(&R, 3, ScaleRewards::Group).unwrap();
        let d = 1.0 + 1e-4;
        close(&a.values, &[-1.0 / d, 0.0, 1.0 / d, 0.0, 0.0, 0.0]);
        close(&a.group_mean, &[2.0, 5.0]);
        close(&a.group_std, &[1.0, 0.0]);
        assert_eq!(a.group_zero_std, vec![false, true]);
        assert_eq!(a.zero_std_groups, 1);
        assert_eq!(a.frac_zero_std(), 0.5);
        assert_eq!(a.keep_mask(), vec![true, true, true, false, false, false]);
    }

    #[test]
    fn batch_scaling() {
        let a = advantages(&R, 3, ScaleRewards::Batch).unwrap();
        let d = 3.1f64.sqrt() + 1e-4;
        close(&a.values, &[-1.0 / d, 0.0, 1.0 / d, 0.0, 0.0, 0.0]);
        assert!((a.batch_std as f64 - 3.1f64.sqrt()).abs() < 1e-6);
        assert_eq!(a.zero_std_groups, 1);
    }

    #[test]
    fn no_scaling() {
        let a = advantages(&R, 3, ScaleRewards::None).unwrap();
        close(&a.values, &[-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]);
        // Group std is still reported.
        close(&a.group_std, &[1.0, 0.0]);
    }

    #[test]
    fn binary_rewards_group_of_four() {
        // [1, 0, 0, 0]: mean 0.25, deviations .75 −.25 −.25 −.25,
        // var (0.5625 + 3·0.0625)/3 = 0.25, std 0.5 → A = deviation / (0.5 + 1e-4).
        let a = advantages(&[1.0, 0.0, 0.0, 0.0], 4, ScaleRewards::Group).unwrap();
        let d = 0.5 + 1e-4;
        close(&a.values, &[0.75 / d, -0.25 / d, -0.25 / d, -0.25 / d]);
        assert_eq!(a.zero_std_groups, 0);
    }

    #[test]
    fn bad_input() {
        assert!(advantages(&R, 1, ScaleRewards::Group).is_err());
        assert!(advantages(&R, 4, ScaleRewards::Group).is_err());
        assert!(advantages(&[1.0, f32::NAN], 2, ScaleRewards::Group).is_err());
        let empty = advantages(&[], 2, ScaleRewards::Batch).unwrap();
        assert!(empty.values.is_empty());
        assert_eq!(empty.frac_zero_std(), 0.0);
    }
}
