//! The GRPO loss family, group-relative advantages and the SFT (cross-entropy) loss, over
//! plain slices. Nothing here knows about the model: the engine gathers per-token log-probs,
//! calls these functions (CPU reference) or the CUDA loss kernel that mirrors them, and
//! back-propagates `dL/dlogp` through log-softmax into the LoRA weights.
//!
//! Names and semantics follow TRL's `GRPOTrainer` where they coincide. **This comment is the
//! spec the CUDA loss kernel mirrors.**
//!
//! # Advantages ([`advantages`])
//!
//! Rewards are group-major: `B` prompts × `G` completions, `r[b*G + g]`.
//! ```text
//! A[b,g] = r[b,g] − mean_g(r[b,·])
//! scale_rewards = group: A /= std_g(r[b,·]) + 1e-4      (std unbiased: Σ(x−x̄)²/(n−1), torch default)
//!                 batch: A /= std(r[all B·G]) + 1e-4     (unbiased, over the whole batch)
//!                 none : no division                     (Dr. GRPO)
//! ```
//! A group whose rewards are all equal has zero std and all-zero advantages; such groups are
//! counted (`zero_std_groups`) and masked (`Advantages::keep_mask`) for metrics and dynamic
//! sampling.
//!
//! # Per-token GRPO loss ([`grpo_loss`], [`grpo_token`])
//!
//! Completion tokens are packed sequence-major: sequence `i` owns `lengths[i]` consecutive
//! entries of `logp`, `old_logp`, `ref_logp`, `grad`; `A_i` is its advantage. For token `t`:
//! ```text
//! ratio    = exp(logp − old_logp)          (OldLogp::Current, num_iterations = 1: old is the
//!                                           detached logp, ratio ≡ 1, d ratio/d logp = 1)
//! l1       = ratio · A
//! l2       = clamp(ratio, 1 − ε, 1 + ε_high) · A          (ε_high defaults to ε)
//! ppo      = −min(l1, l2)
//! d ppo    = 0            if l2 < l1 (the clipped branch is the strict minimum)
//!          = −A · ratio   otherwise  (inside the clip range, or on the unclipped side)
//! KL (ref = adapter-off log-prob, only needed when β > 0; logged whenever given):
//!   k3 = exp(ref − logp) − (ref − logp) − 1     d k3/d logp = 1 − exp(ref − logp)   (default)
//!   k1 = logp − ref                             d k1/d logp = 1
//! per_token   = ppo + β · kl
//! d per_token = d ppo + β · d kl
//! ```
//! # Aggregation (`loss_type`), `N` sequences, `n_i = lengths[i]`, `L = max_completion_length`
//! ```text
//! L = Σ_i Σ_{t∈i} w_i · per_token_t          dL/dlogp_t = w_i · d per_token_t
//! grpo          : w_i = 1 / (N · max(n_i, 1))    mean per sequence, then over sequences
//!                                                (an empty sequence contributes 0, still counted)
//! dapo (= bnpo) : w_i = 1 / max(Σ_j n_j, 1)      token mean over the whole batch
//! dr_grpo       : w_i = 1 / (N · L)              L is the configured constant, not the observed max
//! ```
//! ([`sequence_weights`] returns `w_i`.) With no sequences the loss is 0.
//!
//! # Metrics (token means over the batch, TRL's names)
//! ```text
//! kl          = Σ kl / Σ n_i                      (when ref_logp is given)
//! clip low    = #{ratio < 1 − ε      and A < 0} / Σ n_i
//! clip high   = #{ratio > 1 + ε_high and A > 0} / Σ n_i
//! clip region = clip low + clip high
//! ratio mean  = Σ ratio / Σ n_i
//! ```
//! # SFT / cross-entropy ([`sft_loss`])
//! `logp` holds the log-prob of each target token; `mask` (optional) selects the tokens that
//! count (e.g. completion, not prompt). With `n` selected tokens:
//! `L = −(1/n) Σ_selected logp`, `dL/dlogp = −1/n` on selected tokens, 0 elsewhere (L = 0 if n = 0).
//!
//! Loss scalars and metrics are accumulated in f64 and returned as `T`; per-token terms and
//! gradients are computed in `T`.

mod advantages;
mod grpo;
mod real;
mod sft;

pub use advantages::{advantages, Advantages};
pub use grpo::{
    grpo_loss, grpo_loss_into, grpo_token, sequence_weights, GrpoInputs, GrpoLossConfig, GrpoLossOutput,
    GrpoMetrics, OldLogp, TokenTerms,
};
pub use real::Real;
pub use sft::{sft_loss, sft_loss_into, SftLossOutput};

use serde::{Deserialize, Deserializer};

/// How advantages are scaled (TRL's `scale_rewards`). Deserialises from `"group"`,
/// `"batch"`, `"none"`, and, as TRL accepts, `true` (= group) / `false` (= none).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ScaleRewards {
    /// Divide by the group's unbiased std + 1e-4 (TRL's default).
    #[default]
    Group,
    /// Divide by the whole batch's unbiased std + 1e-4.
    Batch,
    /// No division (Dr. GRPO).
    None,
}

impl<'de> Deserialize<'de> for ScaleRewards {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Name(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bool(true) => Ok(ScaleRewards::Group),
            Raw::Bool(false) => Ok(ScaleRewards::None),
            Raw::Name(s) => match s.as_str() {
                "group" => Ok(ScaleRewards::Group),
                "batch" => Ok(ScaleRewards::Batch),
                "none" => Ok(ScaleRewards::None),
                other => Err(serde::de::Error::custom(format!(
                    "scale_rewards: unknown value {other:?}; expected \"group\", \"batch\", \"none\", true or false"
                ))),
            },
        }
    }
}

/// How per-token losses are aggregated (TRL's `loss_type`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub enum LossType {
    /// Mean over each sequence's tokens, then mean over sequences.
    #[serde(rename = "grpo")]
    Grpo,
    /// Sum over all tokens / number of tokens in the batch (TRL's default). `bnpo` is accepted
    /// as an alias: on one process TRL's `bnpo` and `dapo` normalise by the same count.
    #[default]
    #[serde(rename = "dapo", alias = "bnpo")]
    Dapo,
    /// Sum over all tokens / (num_sequences · max_completion_length).
    #[serde(rename = "dr_grpo")]
    DrGrpo,
}

/// The KL estimator used for the β-penalty to the reference policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub enum KlEstimator {
    /// `exp(ref − logp) − (ref − logp) − 1` (Schulman's k3; TRL's only estimator).
    #[default]
    #[serde(rename = "k3")]
    K3,
    /// `logp − ref`.
    #[serde(rename = "k1")]
    K1,
}

#[cfg(test)]
mod serde_tests {
    use super::*;

    #[test]
    fn option_names_follow_trl() {
        let s = |j: &str| serde_json::from_str::<ScaleRewards>(j).unwrap();
        assert_eq!(s("\"group\""), ScaleRewards::Group);
        assert_eq!(s("\"batch\""), ScaleRewards::Batch);
        assert_eq!(s("\"none\""), ScaleRewards::None);
        assert_eq!(s("true"), ScaleRewards::Group);
        assert_eq!(s("false"), ScaleRewards::None);
        assert!(serde_json::from_str::<ScaleRewards>("\"std\"").is_err());

        let l = |j: &str| serde_json::from_str::<LossType>(j).unwrap();
        assert_eq!(l("\"grpo\""), LossType::Grpo);
        assert_eq!(l("\"dapo\""), LossType::Dapo);
        assert_eq!(l("\"bnpo\""), LossType::Dapo);
        assert_eq!(l("\"dr_grpo\""), LossType::DrGrpo);
        assert!(serde_json::from_str::<LossType>("\"ppo\"").is_err());

        let k = |j: &str| serde_json::from_str::<KlEstimator>(j).unwrap();
        assert_eq!(k("\"k3\""), KlEstimator::K3);
        assert_eq!(k("\"k1\""), KlEstimator::K1);

        let c: GrpoLossConfig =
            serde_json::from_str(r#"{"loss_type":"dr_grpo","beta":0.04,"epsilon_high":0.28}"#).unwrap();
        assert_eq!(c.loss_type, LossType::DrGrpo);
        assert_eq!(c.beta, 0.04);
        assert_eq!(c.epsilon, 0.2);
        assert_eq!(c.epsilon_high(), 0.28);
        assert_eq!(c.kl_estimator, KlEstimator::K3);
        assert_eq!(c.max_completion_length, 256);
    }
}
