//! `rank` (multiple-response): the completion lists candidate answers — a JSON array, or one
//! per line (leading `1.`, `1)`, `(1)`, `-`, `*`, `•` markers are stripped), or a single line
//! of comma-separated answers — optionally inside `<answer>…</answer>` (used when present).
//! Only the first `top_n` candidates count (listing more earns nothing). For each reference
//! (`reference` = one value or a JSON array, templated), the credit at its first position
//! `r` (1-based) is `reciprocal`: 1/r, `linear`: (top_n − r + 1)/top_n, or `top1`: 1 iff r = 1;
//! 0 when absent. Score = mean credit over references. Matching (`match`): `exact` (trimmed),
//! `normalized` (default: case-, whitespace- and trailing-punctuation-insensitive) or
//! `numeric` (equal as numbers, see `numeric`).

use serde::Deserialize;
use serde_json::Value;

use super::numeric::{last_tag, parse_number_strict, tag_regex};
use super::template;
use super::{bad, GradeResult, Grader, Sample};
use crate::Result;

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Credit {
    #[default]
    Reciprocal,
    Linear,
    Top1,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Match {
    Exact,
    #[default]
    Normalized,
    Numeric,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RankConfig {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default = "super::string_check::default_input")]
    pub input: String,
    /// One reference or an array of them (templated: `"{{ item.answers }}"`).
    pub reference: toml::Value,
    #[serde(default = "default_top_n")]
    pub top_n: usize,
    #[serde(default)]
    pub credit: Credit,
    #[serde(default, rename = "match")]
    pub matching: Match,
}

fn default_top_n() -> usize {
    5
}

pub struct Rank {
    name: String,
    cfg: RankConfig,
    reference: Value,
    tag: regex::Regex,
}

impl Rank {
    pub fn new(cfg: &RankConfig) -> Result<Self> {
        template::check("input", &cfg.input)?;
        let reference = serde_json::to_value(&cfg.reference).map_err(|e| bad("reference", e))?;
        template::check_value("reference", &reference)?;
        if cfg.top_n == 0 {
            return Err(bad("top_n", "must be >= 1"));
        }
        Ok(Rank {
            name: cfg.name.clone().unwrap_or_else(|| "rank".into()),
            cfg: cfg.clone(),
            reference,
            tag: tag_regex("answer"),
        })
    }
}

fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Splits a completion into candidate answers.
pub fn candidates(text: &str) -> Vec<String> {
    let t = text.trim();
    if t.starts_with('[') {
        if let Ok(Value::Array(a)) = serde_json::from_str::<Value>(t) {
            return a.iter().map(value_text).collect();
        }
    }
    let lines: Vec<&str> = t.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let items: Vec<&str> = if lines.len() == 1 && lines[0].contains(',') {
        lines[0].split(',').collect()
    } else {
        lines
    };
    items
        .into_iter()
        .map(strip_marker)
        .filter(|s| !s.is_empty())
        .collect()
}

fn strip_marker(s: &str) -> String {
    let s = s.trim();
    let s = s.trim_start_matches(['-', '*', '•']).trim_start();
    let digits = s.chars().take_while(|c| c.is_ascii_digit()).count();
    let s = if let Some(inner) = s.strip_prefix('(') {
        let d = inner.chars().take_while(|c| c.is_ascii_digit()).count();
        if d > 0 && inner[d..].starts_with(')') {
            &inner[d + 1..]
        } else {
            s
        }
    } else if digits > 0
        && (s[digits..].starts_with(". ") || s[digits..].starts_with(')') || s[digits..] == *".")
    {
        &s[digits + 1..]
    } else {
        s
    };
    s.trim().to_string()
}

fn normalize(s: &str) -> String {
    let s = s
        .trim()
        .trim_end_matches(['.', '!', '?', ';', ':'])
        .to_lowercase();
    let s = s.trim_matches(['"', '\'', '`']);
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl Rank {
    fn same(&self, cand: &str, reference: &str) -> bool {
        match self.cfg.matching {
            Match::Exact => cand.trim() == reference.trim(),
            Match::Normalized => normalize(cand) == normalize(reference),
            Match::Numeric => match (parse_number_strict(cand), parse_number_strict(reference)) {
                (Some(a), Some(b)) => (a - b).abs() <= 1e-9 * b.abs().max(1.0),
                _ => false,
            },
        }
    }
}

impl Grader for Rank {
    fn name(&self) -> &str {
        &self.name
    }
    fn grade(&self, s: &Sample) -> GradeResult {
        let text = match template::render(&self.cfg.input, s) {
            Ok(t) => t,
            Err(e) => return GradeResult::fail(e),
        };
        let refs: Vec<String> = match template::resolve(&self.reference, s) {
            Ok(Value::Array(a)) => a.iter().map(value_text).collect(),
            Ok(v) => vec![value_text(&v)],
            Err(e) => return GradeResult::fail(e),
        };
        if refs.is_empty() {
            return GradeResult::fail("empty reference list");
        }
        let body = last_tag(&self.tag, &text).unwrap_or(&text);
        let cands = candidates(body);
        let top = &cands[..cands.len().min(self.cfg.top_n)];
        let n = self.cfg.top_n as f32;
        let mut total = 0.0;
        let mut ranks = Vec::new();
        for r in &refs {
            let pos = top.iter().position(|c| self.same(c, r)).map(|p| p + 1);
            total += match (pos, self.cfg.credit) {
                (None, _) => 0.0,
                (Some(p), Credit::Reciprocal) => 1.0 / p as f32,
                (Some(p), Credit::Linear) => (n - p as f32 + 1.0) / n,
                (Some(p), Credit::Top1) => (p == 1) as u8 as f32,
            };
            ranks.push(pos.map(Value::from).unwrap_or(Value::Null));
        }
        GradeResult::ok(total / refs.len() as f32)
            .with("ranks", ranks)
            .with("candidates", top.len())
    }
}

#[cfg(test)]
mod tests {
    use super::super::build_from_toml;
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_lists() {
        assert_eq!(
            candidates("1. Paris\n2) Lyon\n(3) Nice\n- Lille\n"),
            vec!["Paris", "Lyon", "Nice", "Lille"]
        );
        assert_eq!(candidates("[\"a\", 2]"), vec!["a", "2"]);
        assert_eq!(candidates("a, b ,c"), vec!["a", "b", "c"]);
        assert_eq!(candidates("2024. A year\n"), vec!["A year"]);
        assert_eq!(candidates("1984"), vec!["1984"]);
    }

    #[test]
    fn credit_by_position() {
        let g = build_from_toml("type = \"rank\"\nreference = \"{{ item.answer }}\"\ntop_n = 3").unwrap();
        let s = |c: &str| Sample::new("", c, json!({"answer": "Paris"}));
        assert_eq!(g.grade(&s("1. paris.\n2. Lyon")).score, 1.0);
        assert_eq!(g.grade(&s("1. Lyon\n2. Paris")).score, 0.5);
        // Beyond top_n: nothing, so listing everything does not pay.
        assert_eq!(g.grade(&s("a\nb\nc\nParis")).score, 0.0);
        assert_eq!(g.grade(&s("")).score, 0.0);
        let lin =
            build_from_toml("type = \"rank\"\nreference = [\"x\", \"y\"]\ntop_n = 4\ncredit = \"linear\"")
                .unwrap();
        let r = lin.grade(&Sample::new(
            "",
            "<answer>[\"y\", \"z\", \"x\"]</answer>",
            json!({}),
        ));
        assert!((r.score - (1.0 + 0.5) / 2.0).abs() < 1e-6, "{r:?}");
        let num = build_from_toml(
            "type = \"rank\"\nreference = \"{{ item.a }}\"\nmatch = \"numeric\"\ncredit = \"top1\"",
        )
        .unwrap();
        assert_eq!(
            num.grade(&Sample::new("", "1,000\n5", json!({"a": 1000}))).score,
            1.0
        );
        assert!(build_from_toml("type = \"rank\"\nreference = \"x\"\ntop_n = 0").is_err());
    }
}
