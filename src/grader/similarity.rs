//! `text_similarity` (as OpenAI's): `evaluation_metric` =
//! - `fuzzy_match`: rapidfuzz's `fuzz.ratio` / 100 — the normalised Indel similarity over
//!   characters, `2·LCS / (len_a + len_b)` (1 for two empty strings);
//! - `bleu`: sentence BLEU-4 as sacrebleu's `sentence_bleu` (/100): whitespace tokens with
//!   punctuation split off (close to the 13a tokenizer), case-sensitive, clipped n-gram
//!   precisions, brevity penalty, effective order (orders with no hypothesis n-grams are
//!   skipped) and the `exp` smoothing (Chen & Cherry method 3: the k-th zero-match order gets
//!   precision 1 / (2^k · total));
//! - `rouge_l`: ROUGE-L F1 (β = 1) of the token LCS, rouge-score style tokens (lower-cased,
//!   split on non-alphanumerics).
//!
//! With `pass_threshold` the score becomes 1 if the similarity ≥ threshold, else 0
//! (the raw similarity stays in `details.similarity`).

use std::collections::HashMap;

use serde::Deserialize;

use super::template;
use super::{bad, GradeResult, Grader, Sample};
use crate::Result;

#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    FuzzyMatch,
    Bleu,
    RougeL,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextSimilarityConfig {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default = "super::string_check::default_input")]
    pub input: String,
    pub reference: String,
    pub evaluation_metric: Metric,
    #[serde(default)]
    pub pass_threshold: Option<f32>,
}

pub struct TextSimilarity {
    name: String,
    cfg: TextSimilarityConfig,
}

impl TextSimilarity {
    pub fn new(cfg: &TextSimilarityConfig) -> Result<Self> {
        template::check("input", &cfg.input)?;
        template::check("reference", &cfg.reference)?;
        if let Some(t) = cfg.pass_threshold {
            if !(0.0..=1.0).contains(&t) {
                return Err(bad("pass_threshold", format!("{t} is not in [0, 1]")));
            }
        }
        Ok(TextSimilarity {
            name: cfg.name.clone().unwrap_or_else(|| "text_similarity".into()),
            cfg: cfg.clone(),
        })
    }
}

/// Length of the longest common subsequence (O(n·m) time, O(m) memory).
fn lcs<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    let mut row = vec![0u32; b.len() + 1];
    for x in a {
        let mut diag = 0u32;
        for (j, y) in b.iter().enumerate() {
            let up = row[j + 1];
            row[j + 1] = if x == y { diag + 1 } else { up.max(row[j]) };
            diag = up;
        }
    }
    row[b.len()] as usize
}

/// rapidfuzz `fuzz.ratio` / 100.
pub fn fuzzy_ratio(a: &str, b: &str) -> f32 {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    if a.is_empty() && b.is_empty() {
        return 1.0;
    }
    2.0 * lcs(&a, &b) as f32 / (a.len() + b.len()) as f32
}

fn bleu_tokens(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    for w in s.split_whitespace() {
        let mut cur = String::new();
        for ch in w.chars() {
            if ch.is_ascii_punctuation() {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
                out.push(ch.to_string());
            } else {
                cur.push(ch);
            }
        }
        if !cur.is_empty() {
            out.push(cur);
        }
    }
    out
}

fn ngrams(t: &[String], n: usize) -> HashMap<&[String], usize> {
    let mut m = HashMap::new();
    if t.len() >= n {
        for w in t.windows(n) {
            *m.entry(w).or_insert(0) += 1;
        }
    }
    m
}

/// Sentence BLEU-4 in [0, 1] (sacrebleu `sentence_bleu`, exp smoothing, effective order).
pub fn bleu(hyp: &str, reference: &str) -> f32 {
    let h = bleu_tokens(hyp);
    let r = bleu_tokens(reference);
    if h.is_empty() {
        return 0.0;
    }
    let mut log_sum = 0.0f64;
    let mut order = 0;
    let mut smooth = 1.0f64;
    for n in 1..=4 {
        let hn = ngrams(&h, n);
        let total: usize = hn.values().sum();
        if total == 0 {
            break;
        }
        let rn = ngrams(&r, n);
        let correct: usize = hn.iter().map(|(g, c)| (*c).min(*rn.get(g).unwrap_or(&0))).sum();
        let p = if correct == 0 {
            smooth *= 2.0;
            1.0 / (smooth * total as f64)
        } else {
            correct as f64 / total as f64
        };
        log_sum += p.ln();
        order += 1;
    }
    let bp = if h.len() >= r.len() {
        1.0
    } else {
        (1.0 - r.len() as f64 / h.len() as f64).exp()
    };
    (bp * (log_sum / order as f64).exp()) as f32
}

fn rouge_tokens(s: &str) -> Vec<String> {
    s.to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

/// ROUGE-L F1.
pub fn rouge_l(hyp: &str, reference: &str) -> f32 {
    let h = rouge_tokens(hyp);
    let r = rouge_tokens(reference);
    if h.is_empty() || r.is_empty() {
        return 0.0;
    }
    let l = lcs(&h, &r) as f32;
    if l == 0.0 {
        return 0.0;
    }
    let (p, rc) = (l / h.len() as f32, l / r.len() as f32);
    2.0 * p * rc / (p + rc)
}

impl Grader for TextSimilarity {
    fn name(&self) -> &str {
        &self.name
    }
    fn grade(&self, s: &Sample) -> GradeResult {
        let (a, b) = match (
            template::render(&self.cfg.input, s),
            template::render(&self.cfg.reference, s),
        ) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => return GradeResult::fail(e),
        };
        let sim = match self.cfg.evaluation_metric {
            Metric::FuzzyMatch => fuzzy_ratio(&a, &b),
            Metric::Bleu => bleu(&a, &b),
            Metric::RougeL => rouge_l(&a, &b),
        };
        let score = match self.cfg.pass_threshold {
            Some(t) => (sim >= t) as u8 as f32,
            None => sim,
        };
        GradeResult::ok(score).with("similarity", sim)
    }
}

#[cfg(test)]
mod tests {
    use super::super::build_from_toml;
    use super::*;
    use serde_json::json;

    // The metrics are exact ratios (or f64 BLEU) returned as f32: a few ulps (6e-8 each) of
    // error; any wrong count moves them by > 1e-2.
    fn close(a: f32, b: f32) -> bool {
        (a - b).abs() < 1e-6
    }

    #[test]
    fn fuzzy_matches_rapidfuzz() {
        // rapidfuzz.fuzz.ratio("this is a test", "this is a test!") == 96.55… = 100·28/29
        // (LCS 14 of lengths 14 + 15).
        assert!(close(
            fuzzy_ratio("this is a test", "this is a test!"),
            28.0 / 29.0
        ));
        // fuzz.ratio("kitten", "sitting") == 61.538… = 100·8/13 (LCS "ittn", lengths 6 + 7).
        assert!(close(fuzzy_ratio("kitten", "sitting"), 8.0 / 13.0));
        assert_eq!(fuzzy_ratio("", ""), 1.0);
        assert_eq!(fuzzy_ratio("abc", ""), 0.0);
        assert_eq!(fuzzy_ratio("héllo", "héllo"), 1.0);
    }

    #[test]
    fn bleu_and_rouge() {
        let r = "The cat sat on the mat.";
        assert!(close(bleu(r, r), 1.0));
        assert_eq!(bleu("", r), 0.0);
        // Hand-computed: hyp "the cat sat" vs ref "the cat sat on the mat": precisions
        // 3/3, 2/2, 1/1 (effective order 3), BP = exp(1 - 6/3).
        assert!(close(
            bleu("the cat sat", "the cat sat on the mat"),
            (-1.0f32).exp()
        ));
        // No 2-gram match: smoothed, not zero. 1-gram 2/2, 2-gram 0/1 → 1/(2·1).
        assert!(close(bleu("mat the", "the mat"), 0.5f32.sqrt()));
        // Hand-computed: tokens "a cat sat on a mat ." vs "The cat sat on the mat ." (7 each,
        // BP = 1; case-sensitive, so "The" ≠ "the"): 1-grams 5/7 (cat sat on mat .), 2-grams
        // 3/6 (cat sat, sat on, mat .), 3-grams 1/5 (cat sat on), 4-grams 0/4 → smoothed
        // 1/(2·4). BLEU = (5/7 · 1/2 · 1/5 · 1/8)^(1/4) = 112^(−1/4).
        assert!(close(bleu("a cat sat on a mat.", r), 112f32.powf(-0.25)));
        // Clipping, case and repeated smoothing: 7 × "the" vs "The cat is on the mat" (BP 1):
        // 1-grams clipped to the one lower-case "the" → 1/7; no 2-, 3-, 4-gram matches out of
        // 6, 5, 4 → 1/(2·6), 1/(4·5), 1/(8·4). BLEU = (1/7 · 1/12 · 1/20 · 1/32)^(1/4).
        assert!(close(
            bleu("the the the the the the the", "The cat is on the mat"),
            53760f32.powf(-0.25)
        ));
        assert!(close(
            rouge_l("The cat sat on the mat", "the cat, on the mat"),
            2.0 * 5.0 / 11.0
        ));
        assert_eq!(rouge_l("dog", "cat"), 0.0);
        assert_eq!(rouge_l("", "cat"), 0.0);
    }

    #[test]
    fn grader_and_threshold() {
        let g = build_from_toml(
            "type = \"text_similarity\"\nreference = \"{{ item.ref }}\"\nevaluation_metric = \"fuzzy_match\"\npass_threshold = 0.9",
        )
        .unwrap();
        let s = |c: &str| Sample::new("", c, json!({"ref": "this is a test"}));
        assert_eq!(g.grade(&s("this is a test!")).score, 1.0);
        let r = g.grade(&s("kitten"));
        assert_eq!(r.score, 0.0);
        assert!(r.details["similarity"].as_f64().unwrap() < 0.9);
        assert!(build_from_toml(
            "type = \"text_similarity\"\nreference = \"x\"\nevaluation_metric = \"meteor\""
        )
        .is_err());
        assert!(build_from_toml(
            "type = \"text_similarity\"\nreference = \"x\"\nevaluation_metric = \"bleu\"\npass_threshold = 2"
        )
        .is_err());
    }
}
