//! `format` (alias `regex`): structure and regex criteria with partial credit.
//! `tags = ["think", "answer"]` adds one criterion per tag (exactly one `<t>…</t>` pair with
//! non-blank content) and, when `strict` (default true), one for the whole completion being
//! exactly those blocks in that order, separated by whitespace only. Each `[[criteria]]` is a
//! regex (Rust `regex` syntax: no look-around or back-references; add `(?s)`/`(?i)` flags
//! inline) with a `weight` (default 1) that passes when it matches (or, with `negate = true`,
//! when it does not). Score = weight of passed criteria / total weight.

use regex::Regex;
use serde::Deserialize;

use super::template;
use super::{bad, GradeResult, Grader, Sample};
use crate::Result;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Criterion {
    #[serde(default)]
    pub name: Option<String>,
    pub pattern: String,
    #[serde(default = "one")]
    pub weight: f32,
    #[serde(default)]
    pub negate: bool,
}

fn one() -> f32 {
    1.0
}
fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FormatConfig {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default = "super::string_check::default_input")]
    pub input: String,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default = "yes")]
    pub strict: bool,
    #[serde(default)]
    pub criteria: Vec<Criterion>,
}

enum Check {
    Regex {
        re: Regex,
        negate: bool,
    },
    /// The strict layout regex plus "each tag exactly once" (the regex alone would accept a
    /// repeated block inside a lazy `.*?`).
    Structure {
        re: Regex,
        tags: Vec<(String, String)>,
    },
    Tag {
        open: String,
        close: String,
    },
}

pub struct Format {
    name: String,
    input: String,
    checks: Vec<(String, f32, Check)>,
    total: f32,
}

impl Format {
    pub fn new(cfg: &FormatConfig) -> Result<Self> {
        template::check("input", &cfg.input)?;
        let mut checks = Vec::new();
        for t in &cfg.tags {
            if t.is_empty() || !t.chars().all(|c| c.is_alphanumeric() || c == '_' || c == '-') {
                return Err(bad("tags", format!("{t:?} is not a plain tag name")));
            }
            checks.push((
                format!("tag:{t}"),
                1.0,
                Check::Tag {
                    open: format!("<{t}>"),
                    close: format!("</{t}>"),
                },
            ));
        }
        if cfg.strict && !cfg.tags.is_empty() {
            let body: String = cfg
                .tags
                .iter()
                .map(|t| {
                    let t = regex::escape(t);
                    format!(r"\s*<{t}>.*?</{t}>")
                })
                .collect();
            let re = Regex::new(&format!(r"(?s)\A{body}\s*\z")).map_err(|e| bad("tags", e))?;
            let tags = cfg
                .tags
                .iter()
                .map(|t| (format!("<{t}>"), format!("</{t}>")))
                .collect();
            checks.push(("structure".into(), 1.0, Check::Structure { re, tags }));
        }
        for (i, c) in cfg.criteria.iter().enumerate() {
            let re = Regex::new(&c.pattern).map_err(|e| bad(&format!("criteria[{i}].pattern"), e))?;
            if !(c.weight >= 0.0 && c.weight.is_finite()) {
                return Err(bad(
                    &format!("criteria[{i}].weight"),
                    "must be a finite number >= 0",
                ));
            }
            let name = c.name.clone().unwrap_or_else(|| format!("criteria[{i}]"));
            checks.push((name, c.weight, Check::Regex { re, negate: c.negate }));
        }
        let total: f32 = checks.iter().map(|c| c.1).sum();
        if checks.is_empty() || total <= 0.0 {
            return Err(bad("criteria", "no tags and no criteria with positive weight"));
        }
        Ok(Format {
            name: cfg.name.clone().unwrap_or_else(|| "format".into()),
            input: cfg.input.clone(),
            checks,
            total,
        })
    }
}

impl Grader for Format {
    fn name(&self) -> &str {
        &self.name
    }
    fn grade(&self, s: &Sample) -> GradeResult {
        let text = match template::render(&self.input, s) {
            Ok(t) => t,
            Err(e) => return GradeResult::fail(e),
        };
        let mut got = 0.0;
        let mut r = GradeResult::ok(0.0);
        for (name, w, check) in &self.checks {
            let pass = match check {
                Check::Regex { re, negate } => re.is_match(&text) != *negate,
                Check::Structure { re, tags } => {
                    re.is_match(&text)
                        && tags.iter().all(|(o, c)| {
                            text.matches(o.as_str()).count() == 1 && text.matches(c.as_str()).count() == 1
                        })
                }
                Check::Tag { open, close } => {
                    text.matches(open.as_str()).count() == 1
                        && text.matches(close.as_str()).count() == 1
                        && match (text.find(open.as_str()), text.find(close.as_str())) {
                            (Some(a), Some(b)) => {
                                a + open.len() <= b && !text[a + open.len()..b].trim().is_empty()
                            }
                            _ => false,
                        }
                }
            };
            if pass {
                got += w;
            }
            r.details
                .insert(name.clone(), if pass { 1.0 } else { 0.0 }.into());
        }
        r.score = got / self.total;
        r
    }
}

#[cfg(test)]
mod tests {
    use super::super::build_from_toml;
    use super::*;
    use serde_json::Value;

    fn score(g: &dyn Grader, c: &str) -> f32 {
        g.grade(&Sample::new("", c, Value::Null)).score
    }

    #[test]
    fn tags_and_structure() {
        let g = build_from_toml("type = \"format\"\ntags = [\"think\", \"answer\"]").unwrap();
        assert_eq!(score(&*g, "<think>hmm</think>\n<answer>4</answer>\n"), 1.0);
        // Text outside the blocks: tags ok, structure not.
        assert!((score(&*g, "Sure! <think>hmm</think><answer>4</answer>") - 2.0 / 3.0).abs() < 1e-6);
        // Wrong order.
        assert!((score(&*g, "<answer>4</answer><think>hmm</think>") - 2.0 / 3.0).abs() < 1e-6);
        // Empty think, duplicated answer (hedging) earn nothing for those tags.
        assert_eq!(
            score(&*g, "<think> </think><answer>4</answer><answer>5</answer>"),
            0.0
        );
        assert!(
            (score(&*g, "<think>a</think><answer>4</answer><answer>5</answer>") - 1.0 / 3.0).abs() < 1e-6
        );
        assert_eq!(score(&*g, ""), 0.0);
        assert_eq!(score(&*g, "</think>x<think>"), 0.0);
    }

    #[test]
    fn weighted_criteria() {
        let g = build_from_toml(
            r#"type = "regex"
criteria = [
  { name = "has_answer", pattern = '<answer>\s*-?\d+\s*</answer>', weight = 3 },
  { name = "short", pattern = '(?s)\A.{0,50}\z', weight = 1 },
  { name = "no_sorry", pattern = '(?i)sorry', negate = true },
]"#,
        )
        .unwrap();
        assert_eq!(score(&*g, "<answer>7</answer>"), 1.0);
        assert!((score(&*g, "Sorry, <answer>7</answer>") - 0.8).abs() < 1e-6);
        let r = g.grade(&Sample::new("", "x".repeat(60), Value::Null));
        assert!((r.score - 0.2).abs() < 1e-6);
        assert_eq!(r.details["has_answer"], 0.0);
        assert!(build_from_toml("type = \"format\"\ncriteria = [{ pattern = \"a\", weight = -1 }]").is_err());
        assert!(build_from_toml("type = \"format\"").is_err());
    }
}
