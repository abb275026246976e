//! Sampling: parameters, a counter-based RNG, the sampler and stop criteria.
//!
//! Everything here is specified exactly, so that the CUDA sampling kernel can reproduce the
//! CPU reference token for token. The algorithm, step by step:
//!
//! # Random numbers: Philox4x32-10 (Random123)
//!
//! [`philox4x32_10`] is Salmon et al.'s Philox4x32 with 10 rounds, bit-exact with Random123
//! (checked against its `tests/kat_vectors`). One round on counter `c[0..4]`, key `k[0..2]`:
//!
//! ```text
//! (hi0, lo0) = 0xD2511F53 * c[0]      (32x32 -> 64-bit product, high and low words)
//! (hi1, lo1) = 0xCD9E8D57 * c[2]
//! c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0]
//! ```
//!
//! Between rounds (9 times) the key is bumped: `k[0] += 0x9E3779B9; k[1] += 0xBB67AE85`
//! (wrapping).
//!
//! [`uniform`]`(seed, stream, step)` is one f32 in `[0, 1)`:
//!
//! ```text
//! key     = [seed as u32, (seed >> 32) as u32]
//! counter = [step as u32, (step >> 32) as u32, stream as u32, (stream >> 32) as u32]
//! w       = philox4x32_10(counter, key)[0]
//! u       = (w >> 8) as f32 * 2^-24            (exact: a multiple of 2^-24, at most 1 - 2^-24)
//! ```
//!
//! `stream` is the sequence's id (e.g. its index in the rollout: prompt * G + sample) and `step`
//! the index of the generated token within that sequence (0 for the first new token). A draw thus
//! depends only on (seed, sequence id, step), never on which other sequences share the batch,
//! their order, or how many tokens the others have produced.
//!
//! # The sampler
//!
//! [`Sampler::sample`]`(logits, params, stream, step)` over a vocabulary of `V` f32 logits:
//!
//! 0. Any NaN or `+inf` logit is an error ([`Error::Invalid`]). `-inf` is allowed and means
//!    probability 0. If no logit is finite, it is an error.
//! 1. **Greedy** (`temperature == 0`): the token is the *first* index of the maximum logit.
//!    `logprob = log_softmax(logits)[token]` (temperature 1). Top-k/top-p/min-p are ignored
//!    (they never remove the arg-max) and no random number is drawn.
//! 2. **Scale** (HF `TemperatureLogitsWarper`): `s[i] = logits[i] / T` in f32 (IEEE division,
//!    round to nearest). A `+inf` result (absurdly small T) is an error. `m = max_i s[i]`.
//! 3. **Weights**: `w[i] = exp((s[i] - m) as f64)` in f64 (`s[i] - m` rounded in f32 first;
//!    `exp(-inf) = 0`). All later arithmetic on probabilities is f64. A filter "removes" token i
//!    by setting `w[i] = 0`; the arg-max has `w = 1` and always survives every filter.
//! 4. **Top-k** (HF `TopKLogitsWarper`), if `0 < top_k < V`: `kth` = the k-th largest of `s`
//!    counting duplicates (what `torch.topk(s, k).values[-1]` returns). Remove every token with
//!    `s[i] < kth`; tokens tied with `kth` are all kept, so more than k may survive.
//! 5. **Top-p** (HF `TopPLogitsWarper`), if `top_p < 1`: over the survivors, order tokens by
//!    `w` descending, ties broken by *higher token id first* (the order a stable ascending sort,
//!    as in HF, reversed gives). `total` = sum of surviving `w` in ascending id order;
//!    `thr = top_p as f64 * total`. Walk the order accumulating `w` (in that order); keep a token
//!    iff the mass *before* it is `< thr`, i.e. keep the smallest prefix whose mass reaches
//!    `top_p` (at least one token). Remove the rest. (HF removes a token iff its ascending
//!    cumulative probability is `<= 1 - top_p`: the same set up to rounding.)
//! 6. **Min-p** (HF `MinPLogitsWarper`), if `min_p > 0`: on the distribution left by 4–5, remove
//!    every token with `prob < min_p * max_prob`; as the max weight is exactly 1 and the
//!    normaliser cancels, this is `w[i] < min_p as f64`.
//! 7. **Draw**: `kept_total` = sum of the surviving `w` in ascending token id order;
//!    `target = uniform(seed, stream, step) as f64 * kept_total`. Walk token ids 0..V in
//!    ascending order with `acc += w[i]`; the token is the first `i` with `w[i] > 0` and
//!    `acc > target`. (If rounding ever lets the walk finish, the last token with `w > 0` is
//!    taken; with the same summation order this cannot happen since `u < 1`.)
//! 8. **Logprob**: `logprob = (s[token] - m) as f64 - ln(sum_i w_full[i])` where `w_full` are the
//!    weights of step 3 *before* any filter, i.e. `log_softmax(logits / T)[token]` over the full
//!    vocabulary, returned as f32. This is the model's log-probability of the token at the
//!    sampling temperature, before truncation: the quantity a GRPO importance ratio compares
//!    against the trainer's `log_softmax(logits / T)` (truncation is a property of the sampler,
//!    not of the policy).
//!
//! Bit-exact agreement with a CUDA kernel needs the same f32 scaling, the same f64 sums in the
//! stated orders and an exp accurate to within an ulp or so; the token can only differ when `u`
//! lands within rounding error of a cumulative boundary (probability ~1e-12 per draw), and a kept
//! set only when a cumulative top-p mass lands within rounding of `thr`.
//!
//! # Stop criteria
//!
//! [`StopCriteria::check`] is called after each new token, with the completion's length
//! (including the new token) and, if stop strings are used, the decoded completion so far:
//! the new token is an EOS id → `Stop` (the EOS token is part of the completion, as in HF);
//! else some non-empty stop string occurs in the decoded text → `Stop`; else
//! `generated_len >= max_new_tokens` → `Length`; else continue (`None`).

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

// ---------------------------------------------------------------------------------------------
// Philox4x32-10
// ---------------------------------------------------------------------------------------------

const PHILOX_M0: u32 = 0xD251_1F53;
const PHILOX_M1: u32 = 0xCD9E_8D57;
const PHILOX_W0: u32 = 0x9E37_79B9;
const PHILOX_W1: u32 = 0xBB67_AE85;

#[inline(always)]
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = a as u64 * b as u64;
    ((p >> 32) as u32, p as u32)
}

/// Philox4x32 with 10 rounds, bit-exact with Random123's `philox4x32(ctr, key)`.
#[inline]
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = counter;
    let mut k = key;
    for round in 0..10 {
        if round > 0 {
            k[0] = k[0].wrapping_add(PHILOX_W0);
            k[1] = k[1].wrapping_add(PHILOX_W1);
        }
        let (hi0, lo0) = mulhilo(PHILOX_M0, c[0]);
        let (hi1, lo1) = mulhilo(PHILOX_M1, c[2]);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

/// One uniform f32 in `[0, 1)` for (seed, stream, step); see the module docs for the mapping.
#[inline]
pub fn uniform(seed: u64, stream: u64, step: u64) -> f32 {
    let key = [seed as u32, (seed >> 32) as u32];
    let counter = [
        step as u32,
        (step >> 32) as u32,
        stream as u32,
        (stream >> 32) as u32,
    ];
    let w = philox4x32_10(counter, key)[0];
    (w >> 8) as f32 * (1.0 / 16_777_216.0)
}

// ---------------------------------------------------------------------------------------------
// Parameters
// ---------------------------------------------------------------------------------------------

/// How to pick the next token. Defaults: temperature 1, top-k/top-p/min-p off, seed 0.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingParams {
    /// Logits are divided by this; 0 means greedy (arg-max).
    pub temperature: f32,
    /// Keep the k highest-scoring tokens (ties with the k-th kept); 0 = off.
    pub top_k: usize,
    /// Nucleus: keep the smallest most-probable set with mass >= top_p; 1 = off.
    pub top_p: f32,
    /// Drop tokens with probability < min_p * max probability; 0 = off.
    pub min_p: f32,
    /// Key of the counter-based RNG.
    pub seed: u64,
    /// Stream of the first sample of a `generate` call: sample g of prompt i draws from stream
    /// `first_stream + i·G + g`. 0 for one call; a caller splitting one batch of prompts across
    /// calls passes the number of samples before each call, so the split changes no sample.
    #[serde(skip)]
    pub first_stream: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 0,
            first_stream: 0,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding (temperature 0).
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            ..Default::default()
        }
    }

    /// Checks ranges: temperature finite and >= 0, top_p in (0, 1], min_p in [0, 1).
    pub fn validate(&self) -> Result<()> {
        let t = self.temperature;
        if !t.is_finite() || t < 0.0 {
            return Err(Error::invalid(format!(
                "sampling: temperature must be a finite number >= 0 (0 = greedy), got {t}"
            )));
        }
        let p = self.top_p;
        if !(p > 0.0 && p <= 1.0) {
            return Err(Error::invalid(format!(
                "sampling: top_p must be in (0, 1] (1 = off), got {p}"
            )));
        }
        let mp = self.min_p;
        if !(0.0..1.0).contains(&mp) {
            return Err(Error::invalid(format!(
                "sampling: min_p must be in [0, 1) (0 = off), got {mp}"
            )));
        }
        Ok(())
    }

    /// Whether this is greedy decoding.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// A sampled token and its log-probability `log_softmax(logits / T)[token]` over the full
/// vocabulary (T = 1 when greedy), before any truncation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprob: f32,
}

// ---------------------------------------------------------------------------------------------
// Sampler
// ---------------------------------------------------------------------------------------------

/// Reusable scratch buffers for sampling; one per thread. Buffers grow to the vocabulary size
/// once and are reused, so steady-state sampling does not allocate.
#[derive(Debug, Default)]
pub struct Sampler {
    /// Scaled logits `s`.
    scaled: Vec<f32>,
    /// Weights `w` (zeroed when a token is removed).
    weights: Vec<f64>,
    /// Scratch for top-k selection.
    select: Vec<f32>,
    /// Candidate token ids for top-p.
    cand: Vec<u32>,
    /// `m = max_i s[i]` of the last `prepare`.
    max_scaled: f32,
}

/// Top-p order: `w` descending, ties by higher token id first. `Less` means "comes first".
#[inline]
fn top_p_order(w: &[f64], a: u32, b: u32) -> Ordering {
    w[b as usize].total_cmp(&w[a as usize]).then(b.cmp(&a))
}

impl Sampler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Samples one token; see the module docs for the exact algorithm. `stream` identifies the
    /// sequence and `step` the position of the new token within it.
    pub fn sample(
        &mut self,
        logits: &[f32],
        params: &SamplingParams,
        stream: u64,
        step: u64,
    ) -> Result<Sampled> {
        params.validate()?;
        check_logits(logits)?;
        if params.is_greedy() {
            return Ok(greedy(logits));
        }
        let log_z = self.prepare(logits, params)?;
        let w = &self.weights;
        let kept_total: f64 = w.iter().sum();
        let target = uniform(params.seed, stream, step) as f64 * kept_total;
        let mut acc = 0.0f64;
        let mut token = None;
        let mut last_positive = 0usize;
        for (i, &wi) in w.iter().enumerate() {
            if wi > 0.0 {
                acc += wi;
                last_positive = i;
                if acc > target {
                    token = Some(i);
                    break;
                }
            }
        }
        let token = token.unwrap_or(last_positive);
        let m = self.max_scaled;
        let logprob = ((self.scaled[token] - m) as f64 - log_z) as f32;
        Ok(Sampled {
            token: token as u32,
            logprob,
        })
    }

    /// The renormalised distribution the sampler draws from (0 for removed tokens), in token id
    /// order. For greedy, a one-hot on the first arg-max. For tests and kernel parity checks.
    pub fn distribution(&mut self, logits: &[f32], params: &SamplingParams) -> Result<Vec<f64>> {
        params.validate()?;
        check_logits(logits)?;
        if params.is_greedy() {
            let mut d = vec![0.0; logits.len()];
            d[greedy(logits).token as usize] = 1.0;
            return Ok(d);
        }
        self.prepare(logits, params)?;
        let total: f64 = self.weights.iter().sum();
        Ok(self.weights.iter().map(|&w| w / total).collect())
    }

    /// Steps 2–6: fills `scaled`, `weights` (filtered) and returns `ln(sum of unfiltered w)`.
    fn prepare(&mut self, logits: &[f32], params: &SamplingParams) -> Result<f64> {
        let v = logits.len();
        let t = params.temperature;
        // 2. scale
        self.scaled.clear();
        self.scaled.extend(logits.iter().map(|&x| x / t));
        let mut m = f32::NEG_INFINITY;
        for &s in &self.scaled {
            if s == f32::INFINITY {
                return Err(Error::invalid(format!(
                    "sampling: logits / temperature overflowed (temperature {t} is too small)"
                )));
            }
            if s > m {
                m = s;
            }
        }
        self.max_scaled = m;
        // 3. weights
        self.weights.clear();
        self.weights
            .extend(self.scaled.iter().map(|&s| ((s - m) as f64).exp()));
        let log_z = self.weights.iter().sum::<f64>().ln();

        // 4. top-k
        let k = params.top_k;
        if k > 0 && k < v {
            self.select.clear();
            self.select.extend_from_slice(&self.scaled);
            let (_, kth, _) = self.select.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
            let kth = *kth;
            for (w, &s) in self.weights.iter_mut().zip(&self.scaled) {
                if s < kth {
                    *w = 0.0;
                }
            }
        }

        // 5. top-p
        if params.top_p < 1.0 {
            self.top_p(params.top_p as f64);
        }

        // 6. min-p (max weight is exactly 1: exp(0))
        if params.min_p > 0.0 {
            let mp = params.min_p as f64;
            for w in self.weights.iter_mut() {
                if *w < mp {
                    *w = 0.0;
                }
            }
        }
        Ok(log_z)
    }

    fn top_p(&mut self, top_p: f64) {
        let w = &mut self.weights;
        let total: f64 = w.iter().sum();
        let thr = top_p * total;
        self.cand.clear();
        self.cand
            .extend((0..w.len() as u32).filter(|&i| w[i as usize] > 0.0));
        let n = self.cand.len();
        if n == 0 {
            return;
        }
        // Sort only as large a head of the order as needed: select the first `h` candidates
        // (unordered), sort them, and walk; grow `h` if the nucleus is not inside it.
        let mut h = n.min(256);
        let last_kept = loop {
            if h < n {
                self.cand
                    .select_nth_unstable_by(h - 1, |&a, &b| top_p_order(w, a, b));
            }
            let head = &mut self.cand[..h];
            head.sort_unstable_by(|&a, &b| top_p_order(w, a, b));
            let mut before = 0.0f64;
            let mut last = None;
            for (j, &id) in head.iter().enumerate() {
                if before >= thr {
                    last = Some(j - 1);
                    break;
                }
                before += w[id as usize];
            }
            match last {
                Some(j) => break head[j],
                None if h == n => break head[n - 1],
                None => h = n.min(h.saturating_mul(8)),
            }
        };
        for &id in &self.cand {
            if top_p_order(w, id, last_kept) == Ordering::Greater {
                w[id as usize] = 0.0;
            }
        }
    }
}

fn check_logits(logits: &[f32]) -> Result<()> {
    if logits.is_empty() {
        return Err(Error::invalid("sampling: empty logits"));
    }
    let mut any_finite = false;
    for (i, &x) in logits.iter().enumerate() {
        if x.is_nan() {
            return Err(Error::invalid(format!("sampling: logit {i} is NaN")));
        }
        if x == f32::INFINITY {
            return Err(Error::invalid(format!("sampling: logit {i} is +inf")));
        }
        any_finite |= x.is_finite();
    }
    if !any_finite {
        return Err(Error::invalid("sampling: every logit is -inf"));
    }
    Ok(())
}

/// First index of the maximum; logprob at temperature 1. Logits already checked.
fn greedy(logits: &[f32]) -> Sampled {
    let mut best = 0usize;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    let m = logits[best];
    let log_z = logits.iter().map(|&x| ((x - m) as f64).exp()).sum::<f64>().ln();
    Sampled {
        token: best as u32,
        logprob: ((logits[best] - m) as f64 - log_z) as f32,
    }
}

/// Convenience wrapper allocating a fresh [`Sampler`]; prefer a reused `Sampler` in loops.
pub fn sample(logits: &[f32], params: &SamplingParams, stream: u64, step: u64) -> Result<Sampled> {
    Sampler::new().sample(logits, params, stream, step)
}

// ---------------------------------------------------------------------------------------------
// Stop criteria
// ---------------------------------------------------------------------------------------------

/// Why a completion ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An EOS token or a stop string.
    Stop,
    /// `max_new_tokens` reached.
    Length,
}

impl FinishReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

impl std::fmt::Display for FinishReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// When to stop generating one sequence.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct StopCriteria {
    pub eos_ids: Vec<u32>,
    /// Empty strings are ignored.
    pub stop_strings: Vec<String>,
    pub max_new_tokens: usize,
}

impl StopCriteria {
    /// Called after appending `new_token`; `generated_len` counts the completion's tokens
    /// including it, `decoded_text` is the decoded completion so far (needed only for stop
    /// strings; `None` skips them). Precedence: EOS, stop string, length.
    pub fn check(
        &self,
        new_token: u32,
        generated_len: usize,
        decoded_text: Option<&str>,
    ) -> Option<FinishReason> {
        if self.eos_ids.contains(&new_token) {
            return Some(FinishReason::Stop);
        }
        if let Some(text) = decoded_text {
            if self.find_stop_string(text).is_some() {
                return Some(FinishReason::Stop);
            }
        }
        if generated_len >= self.max_new_tokens {
            return Some(FinishReason::Length);
        }
        None
    }

    /// Byte offset of the earliest occurrence of any non-empty stop string in `text` (for
    /// callers that want to trim the completion there).
    pub fn find_stop_string(&self, text: &str) -> Option<usize> {
        self.stop_strings
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| text.find(s.as_str()))
            .min()
    }

    /// Whether any stop strings are set (so the caller knows to decode text).
    pub fn needs_text(&self) -> bool {
        self.stop_strings.iter().any(|s| !s.is_empty())
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    /// Random123 `tests/kat_vectors`, the three `philox4x32 10` lines (counter[4] key[2] ->
    /// output[4]); the same vectors appear in TensorFlow's Philox tests.
    #[test]
    fn philox_known_answers() {
        let kat: [([u32; 4], [u32; 2], [u32; 4]); 3] = [
            (
                [0, 0, 0, 0],
                [0, 0],
                [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8],
            ),
            (
                [0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff],
                [0xffffffff, 0xffffffff],
                [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd],
            ),
            (
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0],
                [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1],
            ),
        ];
        for (ctr, key, want) in kat {
            assert_eq!(philox4x32_10(ctr, key), want, "ctr {ctr:x?} key {key:x?}");
        }
    }

    #[test]
    fn uniform_mapping_and_range() {
        // The documented mapping, spelled out once.
        let (seed, stream, step) = (0x0123_4567_89ab_cdefu64, 0xdead_beef_0000_0007u64, 42u64);
        let w = philox4x32_10([42, 0, 0x0000_0007, 0xdead_beef], [0x89ab_cdef, 0x0123_4567])[0];
        assert_eq!(uniform(seed, stream, step), (w >> 8) as f32 / 16_777_216.0);
        let mut sum = 0.0f64;
        let n = 100_000;
        for i in 0..n {
            let u = uniform(7, i % 97, i / 97);
            assert!((0.0..1.0).contains(&u));
            sum += u as f64;
        }
        // mean of U[0,1): sd of the mean = sqrt(1/12/n) ~ 0.0009; allow 6 sd.
        assert!((sum / n as f64 - 0.5).abs() < 0.0055);
    }

    fn lcg_logits(seed: u64, v: usize) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..v)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 8.0 - 4.0
            })
            .collect()
    }

    #[test]
    fn determinism_and_seed_dependence() {
        let logits = lcg_logits(1, 50);
        let p = SamplingParams {
            seed: 11,
            ..Default::default()
        };
        let mut s = Sampler::new();
        for step in 0..20 {
            let a = s.sample(&logits, &p, 3, step).unwrap();
            let b = sample(&logits, &p, 3, step).unwrap();
            assert_eq!(a, b);
        }
        let draws = |seed: u64| (0..32).map(|i| uniform(seed, 0, i)).collect::<Vec<_>>();
        assert_ne!(draws(0), draws(1));
        let toks = |seed: u64| {
            let p = SamplingParams {
                seed,
                ..Default::default()
            };
            (0..32)
                .map(|i| sample(&logits, &p, 0, i).unwrap().token)
                .collect::<Vec<_>>()
        };
        assert_ne!(toks(0), toks(1));
        // Streams differ too.
        assert_ne!(
            (0..32).map(|i| uniform(5, 0, i)).collect::<Vec<_>>(),
            (0..32).map(|i| uniform(5, 1, i)).collect::<Vec<_>>()
        );
    }

    #[test]
    fn independent_of_batch_composition() {
        // Sequence id -> its own logits per step. Generate sequences 0..8 in one batch, then
        // sequence 5 alone and within a reordered, different batch: same tokens.
        let p = SamplingParams {
            temperature: 0.9,
            top_p: 0.95,
            seed: 1234,
            ..Default::default()
        };
        let logits_for = |seq: u64, step: u64| lcg_logits(seq * 1000 + step, 64);
        let mut s = Sampler::new();
        let mut run = |seqs: &[u64]| {
            let mut out = vec![Vec::new(); seqs.len()];
            for step in 0..16 {
                for (j, &seq) in seqs.iter().enumerate() {
                    out[j].push(s.sample(&logits_for(seq, step), &p, seq, step).unwrap().token);
                }
            }
            out
        };
        let full = run(&[0, 1, 2, 3, 4, 5, 6, 7]);
        let alone = run(&[5]);
        let other = run(&[9, 5, 2]);
        assert_eq!(full[5], alone[0]);
        assert_eq!(full[5], other[1]);
        assert_eq!(full[2], other[2]);
    }

    #[test]
    fn greedy_first_max_and_logprob() {
        let logits = [1.0f32, 3.0, 3.0, 2.0, f32::NEG_INFINITY];
        let r = sample(&logits, &SamplingParams::greedy(), 0, 0).unwrap();
        assert_eq!(r.token, 1);
        let z: f64 = logits.iter().map(|&x| (x as f64).exp()).sum();
        // An f32 log-softmax of 4 finite logits against f64: a few ulps of a value near −1.
        assert!((r.logprob as f64 - (3.0 - z.ln())).abs() < 1e-6);
    }

    #[test]
    fn top_k_one_equals_greedy() {
        let mut s = Sampler::new();
        for case in 0..50 {
            let logits = lcg_logits(case, 100);
            let g = s.sample(&logits, &SamplingParams::greedy(), 0, 0).unwrap().token;
            let p = SamplingParams {
                top_k: 1,
                temperature: 1.3,
                seed: case,
                ..Default::default()
            };
            for step in 0..5 {
                assert_eq!(s.sample(&logits, &p, case, step).unwrap().token, g);
            }
        }
    }

    #[test]
    fn top_k_stays_in_k_best() {
        let logits = lcg_logits(3, 200);
        let mut order: Vec<usize> = (0..200).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let best: Vec<u32> = order[..7].iter().map(|&i| i as u32).collect();
        let p = SamplingParams {
            top_k: 7,
            temperature: 5.0,
            seed: 9,
            ..Default::default()
        };
        let mut s = Sampler::new();
        let mut seen = std::collections::HashSet::new();
        for step in 0..2000 {
            let t = s.sample(&logits, &p, 0, step).unwrap().token;
            assert!(best.contains(&t), "token {t} not among the 7 best");
            seen.insert(t);
        }
        assert_eq!(seen.len(), 7, "high temperature should reach all 7");
    }

    fn kept(d: &[f64]) -> Vec<usize> {
        d.iter()
            .enumerate()
            .filter(|(_, &p)| p > 0.0)
            .map(|(i, _)| i)
            .collect()
    }

    fn ln(ps: &[f64]) -> Vec<f32> {
        ps.iter().map(|&p| p.ln() as f32).collect()
    }

    #[test]
    fn top_k_keeps_ties() {
        // HF: remove s < topk(s, 2).values[-1] = 3 -> ids 1, 2, 4 stay.
        let logits = [1.0f32, 3.0, 3.0, 2.0, 3.0];
        let p = SamplingParams {
            top_k: 2,
            ..Default::default()
        };
        let d = Sampler::new().distribution(&logits, &p).unwrap();
        assert_eq!(kept(&d), vec![1, 2, 4]);
        for i in [1, 2, 4] {
            assert!((d[i] - 1.0 / 3.0).abs() < 1e-12);
        }
    }

    #[test]
    fn top_p_sets_match_hf() {
        let mut s = Sampler::new();
        let dist =
            |s: &mut Sampler, logits: &[f32], p: SamplingParams| kept(&s.distribution(logits, &p).unwrap());
        // probs .5 .3 .1 .1, top_p .75: ascending cumsum .1 .2 .5 1; HF drops cum <= .25.
        let l = ln(&[0.5, 0.3, 0.1, 0.1]);
        let p = |top_p| SamplingParams {
            top_p,
            ..Default::default()
        };
        assert_eq!(dist(&mut s, &l, p(0.75)), vec![0, 1]);
        assert_eq!(dist(&mut s, &l, p(0.3)), vec![0]);
        // Tie at the boundary (ids 2, 3 both .1): HF's stable ascending order puts id 2 first, so
        // id 2 (cum .1 <= .15) is dropped and id 3 kept.
        assert_eq!(dist(&mut s, &l, p(0.85)), vec![0, 1, 3]);
        // Ties: five equal tokens, top_p .5. HF (stable ascending sort) orders ids 0..4, cumsum
        // .2 .4 .6 .8 1, drops cum <= .5 -> ids 0, 1; keeps 2, 3, 4.
        let l = [0.0f32; 5];
        assert_eq!(dist(&mut s, &l, p(0.5)), vec![2, 3, 4]);
        // At least one token, even for a tiny top_p; the arg-max (ties: highest id).
        assert_eq!(dist(&mut s, &ln(&[0.2, 0.5, 0.3]), p(1e-6)), vec![1]);
        assert_eq!(dist(&mut s, &l, p(1e-6)), vec![4]);
        // Top-p acts on the distribution left by top-k: .4 .3 .2 .1 with top_p .72 keeps 3
        // tokens; after top-k 3 the masses are 4/9 3/9 2/9 and it keeps 2.
        let l = ln(&[0.4, 0.3, 0.2, 0.1]);
        assert_eq!(dist(&mut s, &l, p(0.72)), vec![0, 1, 2]);
        let pk = SamplingParams {
            top_k: 3,
            top_p: 0.72,
            ..Default::default()
        };
        assert_eq!(dist(&mut s, &l, pk), vec![0, 1]);
        // Kept probabilities are renormalised.
        let d = s.distribution(&l, &pk).unwrap();
        assert!((d[0] - 4.0 / 7.0).abs() < 1e-6 && (d[1] - 3.0 / 7.0).abs() < 1e-6);
    }

    #[test]
    fn top_p_large_vocab_grows_head() {
        // Nearly flat distribution over 5000 tokens: the nucleus is far beyond the first
        // 256-token head, exercising the growth path. Compare with a plain full sort.
        let logits: Vec<f32> = lcg_logits(17, 5000).iter().map(|x| x * 0.01).collect();
        let p = SamplingParams {
            top_p: 0.9,
            ..Default::default()
        };
        let d = Sampler::new().distribution(&logits, &p).unwrap();
        let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let w: Vec<f64> = logits.iter().map(|&x| ((x - m) as f64).exp()).collect();
        let total: f64 = w.iter().sum();
        let mut order: Vec<u32> = (0..5000).collect();
        order.sort_by(|&a, &b| top_p_order(&w, a, b));
        let mut before = 0.0;
        let mut want = Vec::new();
        for &id in &order {
            if before >= 0.9 * total {
                break;
            }
            before += w[id as usize];
            want.push(id as usize);
        }
        want.sort();
        assert!(want.len() > 4000);
        assert_eq!(kept(&d), want);
    }

    #[test]
    fn min_p_sets_match_hf() {
        let mut s = Sampler::new();
        // .4 .2 .2 .1 .1, min_p .3: threshold .12 -> both .2 kept, both .1 dropped.
        let l = ln(&[0.4, 0.2, 0.2, 0.1, 0.1]);
        let p = SamplingParams {
            min_p: 0.3,
            ..Default::default()
        };
        assert_eq!(kept(&s.distribution(&l, &p).unwrap()), vec![0, 1, 2]);
        // After top-k 3 on .4 .3 .2 .1: 4/9 3/9 2/9; min_p .6 -> threshold 2.4/9 keeps 0, 1.
        let l = ln(&[0.4, 0.3, 0.2, 0.1]);
        let p = SamplingParams {
            top_k: 3,
            min_p: 0.6,
            ..Default::default()
        };
        assert_eq!(kept(&s.distribution(&l, &p).unwrap()), vec![0, 1]);
        // Min-p applies after temperature: T=0.5 squares the ratios: .4 .3 .2 .1 ->
        // 1, .5625, .25, .0625 relative; min_p .3 keeps 0, 1.
        let p = SamplingParams {
            temperature: 0.5,
            min_p: 0.3,
            ..Default::default()
        };
        assert_eq!(kept(&s.distribution(&l, &p).unwrap()), vec![0, 1]);
        // Min-p after top-p: top_p .5 keeps 0, 1 (mass .7); min_p .8 then keeps only 0.
        let p = SamplingParams {
            top_p: 0.5,
            min_p: 0.8,
            ..Default::default()
        };
        assert_eq!(kept(&s.distribution(&l, &p).unwrap()), vec![0]);
    }

    #[test]
    fn empirical_frequencies_match_distribution() {
        let logits: Vec<f32> = lcg_logits(5, 12).iter().map(|x| x * 0.3).collect();
        let p = SamplingParams {
            temperature: 0.8,
            top_k: 9,
            top_p: 0.95,
            min_p: 0.02,
            seed: 2024,
            first_stream: 0,
        };
        let mut s = Sampler::new();
        let d = s.distribution(&logits, &p).unwrap();
        let n = 200_000u64;
        let mut counts = vec![0u64; logits.len()];
        for i in 0..n {
            counts[s.sample(&logits, &p, i % 1000, i / 1000).unwrap().token as usize] += 1;
        }
        let kept_n = kept(&d).len();
        assert!(kept_n >= 4, "test should keep several tokens, kept {kept_n}");
        let mut chi2 = 0.0;
        for (i, (&c, &pi)) in counts.iter().zip(&d).enumerate() {
            if pi == 0.0 {
                assert_eq!(c, 0, "removed token {i} was drawn");
                continue;
            }
            let f = c as f64 / n as f64;
            // Binomial sd of a frequency is sqrt(p(1-p)/n); 5 sd per cell gives a false alarm
            // probability < 1e-5 over 12 cells.
            let sd = (pi * (1.0 - pi) / n as f64).sqrt();
            assert!((f - pi).abs() < 5.0 * sd + 1e-9, "token {i}: freq {f} vs p {pi}");
            let e = pi * n as f64;
            chi2 += (c as f64 - e).powi(2) / e;
        }
        // Chi-square with kept_n - 1 <= 11 degrees of freedom: P(chi2 > 45) < 1e-5 at df 11.
        assert!(chi2 < 45.0, "chi2 {chi2} with {} dof", kept_n - 1);
    }

    #[test]
    fn logprob_is_full_log_softmax_at_temperature() {
        let logits = lcg_logits(8, 300);
        let mut s = Sampler::new();
        for (t, k, tp) in [(1.0f32, 0usize, 1.0f32), (0.7, 20, 0.9), (1.5, 5, 0.5)] {
            let p = SamplingParams {
                temperature: t,
                top_k: k,
                top_p: tp,
                ..Default::default()
            };
            let z: f64 = logits.iter().map(|&x| ((x / t) as f64).exp()).sum();
            for step in 0..20 {
                let r = s.sample(&logits, &p, 1, step).unwrap();
                let want = (logits[r.token as usize] / t) as f64 - z.ln();
                // f32 log-softmax over 300 logits in [−4, 4]/T against f64: the f32 sum of 300
                // terms and the log are good to ~1e-6 of values up to ~10.
                assert!((r.logprob as f64 - want).abs() < 1e-5, "{} vs {want}", r.logprob);
            }
        }
    }

    #[test]
    fn non_finite_logits() {
        let mut s = Sampler::new();
        let p = SamplingParams::default();
        let l = [0.0f32, f32::NEG_INFINITY, 1.0, f32::NEG_INFINITY];
        for step in 0..500 {
            let t = s.sample(&l, &p, 0, step).unwrap().token;
            assert!(t == 0 || t == 2);
        }
        let e = s.sample(&[0.0, f32::NAN], &p, 0, 0).unwrap_err().to_string();
        assert!(e.contains("NaN"), "{e}");
        assert!(s.sample(&[0.0, f32::INFINITY], &p, 0, 0).is_err());
        assert!(s.sample(&[f32::NEG_INFINITY; 3], &p, 0, 0).is_err());
        assert!(s.sample(&[], &p, 0, 0).is_err());
        assert!(s
            .sample(&[0.0, f32::NAN], &SamplingParams::greedy(), 0, 0)
            .is_err());
    }

    #[test]
    fn validation_messages() {
        let msg = |p: SamplingParams| p.validate().unwrap_err().to_string();
        let d = SamplingParams::default();
        assert!(d.validate().is_ok());
        assert!(SamplingParams::greedy().validate().is_ok());
        assert!(msg(SamplingParams {
            temperature: -1.0,
            ..d
        })
        .contains("temperature"));
        assert!(msg(SamplingParams {
            temperature: f32::NAN,
            ..d
        })
        .contains("temperature"));
        assert!(msg(SamplingParams {
            temperature: f32::INFINITY,
            ..d
        })
        .contains("temperature"));
        assert!(msg(SamplingParams { top_p: 0.0, ..d }).contains("top_p"));
        assert!(msg(SamplingParams { top_p: 1.5, ..d }).contains("top_p"));
        assert!(msg(SamplingParams { top_p: f32::NAN, ..d }).contains("top_p"));
        assert!(msg(SamplingParams { min_p: 1.0, ..d }).contains("min_p"));
        assert!(msg(SamplingParams { min_p: -0.1, ..d }).contains("min_p"));
        assert!(sample(&[0.0], &SamplingParams { top_p: 2.0, ..d }, 0, 0).is_err());
        let p: SamplingParams = serde_json::from_str(r#"{"temperature":0.7,"top_p":0.9}"#).unwrap();
        assert_eq!(
            p,
            SamplingParams {
                temperature: 0.7,
                top_p: 0.9,
                ..d
            }
        );
    }

    #[test]
    fn stop_criteria() {
        let c = StopCriteria {
            eos_ids: vec![2, 7],
            stop_strings: vec!["</answer>".into(), String::new()],
            max_new_tokens: 5,
        };
        assert_eq!(c.check(7, 1, None), Some(FinishReason::Stop));
        assert_eq!(c.check(2, 5, Some("x")), Some(FinishReason::Stop));
        assert_eq!(
            c.check(3, 1, Some("<answer>4</answer>")),
            Some(FinishReason::Stop)
        );
        assert_eq!(c.check(3, 1, Some("<answer>4</ans")), None);
        assert_eq!(c.check(3, 1, None), None);
        assert_eq!(c.check(3, 5, Some("abc")), Some(FinishReason::Length));
        assert_eq!(c.check(3, 6, None), Some(FinishReason::Length));
        assert_eq!(c.find_stop_string("a</answer>b</answer>"), Some(1));
        assert!(c.needs_text());
        assert_eq!(serde_json::to_string(&FinishReason::Stop).unwrap(), "\"stop\"");
        assert_eq!(
            serde_json::to_string(&FinishReason::Length).unwrap(),
            "\"length\""
        );
        assert_eq!(FinishReason::Length.to_string(), "length");
    }
}
