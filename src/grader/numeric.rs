//! `numeric`: extracts the final answer from the completion and compares it as a number with
//! the reference. Extraction (`extract`): `answer_tag` (content of the last `<answer>…</answer>`,
//! tag name configurable), `boxed` (the last `\boxed{…}`, nested braces allowed), `last_number`
//! (the last number anywhere), or `auto` (tag if present, else boxed if present, else last
//! number). Inside the extracted text a `\boxed{}` wins, then the whole text as a number, then
//! its last number. Numbers: `1,234`, `-3.5`, `.5`, `1e-3`, `3/4`, `\frac{3}{4}`, `$5`, `50%`
//! (the `%` is dropped), `\text{…}` units are ignored. Pass iff
//! `|x - ref| <= max(abs_tol, rel_tol * |ref|)`.

use std::sync::OnceLock;

use regex::Regex;
use serde::Deserialize;

use super::template;
use super::{bad, GradeResult, Grader, Sample};
use crate::Result;

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Extract {
    AnswerTag,
    Boxed,
    LastNumber,
    #[default]
    Auto,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NumericConfig {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default = "super::string_check::default_input")]
    pub input: String,
    /// The expected number (templated; `"#### 72"`-style text is fine: its last number is used).
    pub reference: String,
    #[serde(default)]
    pub extract: Extract,
    /// Tag name for `answer_tag` (default `answer`).
    #[serde(default = "default_tag")]
    pub tag: String,
    /// Absolute tolerance (default 1e-6).
    #[serde(default = "default_abs", alias = "tolerance")]
    pub abs_tol: f64,
    /// Relative tolerance (default 0).
    #[serde(default)]
    pub rel_tol: f64,
}

fn default_tag() -> String {
    "answer".into()
}
fn default_abs() -> f64 {
    1e-6
}

pub struct Numeric {
    name: String,
    cfg: NumericConfig,
    tag_re: Regex,
}

impl Numeric {
    pub fn new(cfg: &NumericConfig) -> Result<Self> {
        template::check("input", &cfg.input)?;
        template::check("reference", &cfg.reference)?;
        if !(cfg.abs_tol >= 0.0 && cfg.rel_tol >= 0.0) {
            return Err(bad("abs_tol/rel_tol", "tolerances must be >= 0"));
        }
        if cfg.tag.is_empty()
            || !cfg
                .tag
                .chars()
                .all(|c| c.is_alphanumeric() || c == '_' || c == '-')
        {
            return Err(bad("tag", format!("{:?} is not a plain tag name", cfg.tag)));
        }
        Ok(Numeric {
            name: cfg.name.clone().unwrap_or_else(|| "numeric".into()),
            tag_re: tag_regex(&cfg.tag),
            cfg: cfg.clone(),
        })
    }
}

pub(crate) fn tag_regex(tag: &str) -> Regex {
    let t = regex::escape(tag);
    Regex::new(&format!(r"(?s)<{t}>(.*?)</{t}>")).expect("escaped tag regex")
}

/// The content of the last `<tag>…</tag>`.
pub fn last_tag<'a>(re: &Regex, text: &'a str) -> Option<&'a str> {
    re.captures_iter(text)
        .last()
        .and_then(|c| c.get(1))
        .map(|m| m.as_str())
}

/// The content of the last `\boxed{…}` (or `\fbox{…}`), with balanced nested braces.
pub fn last_boxed(text: &str) -> Option<&str> {
    let mut found = None;
    let mut from = 0;
    while let Some(pos) = find_box(&text[from..]) {
        let (start, open_len) = (from + pos.0, pos.1);
        let body_start = start + open_len;
        let mut depth = 1usize;
        let mut end = None;
        for (i, ch) in text[body_start..].char_indices() {
            match ch {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = Some(body_start + i);
                        break;
                    }
                }
                _ => {}
            }
        }
        match end {
            Some(e) => {
                found = Some(&text[body_start..e]);
                from = e + 1;
            }
            None => break, // unbalanced: ignore the rest
        }
    }
    found
}

fn find_box(s: &str) -> Option<(usize, usize)> {
    let a = s.find("\\boxed{").map(|p| (p, 7));
    let b = s.find("\\fbox{").map(|p| (p, 6));
    match (a, b) {
        (Some(x), Some(y)) => Some(if x.0 <= y.0 { x } else { y }),
        (x, y) => x.or(y),
    }
}

fn latex_clean(s: &str) -> String {
    static FRAC: OnceLock<Regex> = OnceLock::new();
    static TEXT: OnceLock<Regex> = OnceLock::new();
    let frac = FRAC.get_or_init(|| Regex::new(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}").unwrap());
    let text = TEXT.get_or_init(|| Regex::new(r"\\(?:text|mathrm|mbox)\{[^{}]*\}").unwrap());
    let s = text.replace_all(s, " ");
    let s = frac.replace_all(&s, "${1}/${2}");
    s.replace("\\!", "")
        .replace("\\,", "")
        .replace("\\;", "")
        .replace("\\$", "")
        .replace(['$', '%'], "")
        .replace("\\left", "")
        .replace("\\right", "")
        .replace("\\cdot", "*")
}

fn number_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        let num = r"-?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?";
        Regex::new(&format!(r"({num})(?:\s*/\s*(-?\d+(?:\.\d+)?))?")).unwrap()
    })
}

fn parse_plain(s: &str) -> Option<f64> {
    let t = s.trim().replace(',', "");
    if t.is_empty() {
        return None;
    }
    let v: f64 = t.parse().ok()?;
    v.is_finite().then_some(v)
}

/// Parses text that should be exactly one number (`1,234`, `-3.5`, `3/4`, `\frac{3}{4}`).
pub fn parse_number_strict(s: &str) -> Option<f64> {
    let c = latex_clean(s);
    let t = c.trim().trim_end_matches('.').trim();
    let m = number_re().captures(t)?;
    if m.get(0)?.as_str().len() != t.len() {
        return None;
    }
    value_of(&m)
}

fn value_of(m: &regex::Captures) -> Option<f64> {
    let n = parse_plain(m.get(1)?.as_str())?;
    match m.get(2) {
        Some(d) => {
            let d = parse_plain(d.as_str())?;
            (d != 0.0).then(|| n / d)
        }
        None => Some(n),
    }
}

/// The last number in free text.
pub fn last_number(s: &str) -> Option<f64> {
    let c = latex_clean(s);
    number_re().captures_iter(&c).last().and_then(|m| value_of(&m))
}

/// A number from an extracted answer: boxed inside wins, then strict parse, then last number.
pub fn parse_answer(s: &str) -> Option<f64> {
    if let Some(b) = last_boxed(s) {
        return parse_number_strict(b).or_else(|| last_number(b));
    }
    parse_number_strict(s).or_else(|| last_number(s))
}

impl Numeric {
    fn extract(&self, text: &str) -> std::result::Result<f64, String> {
        let tag = &self.cfg.tag;
        let from_tag = || -> Option<std::result::Result<f64, String>> {
            last_tag(&self.tag_re, text).map(|t| {
                parse_answer(t).ok_or_else(|| format!("no number inside <{tag}>…</{tag}>: {:?}", short(t)))
            })
        };
        let from_boxed = || -> Option<std::result::Result<f64, String>> {
            last_boxed(text).map(|b| {
                parse_number_strict(b)
                    .or_else(|| last_number(b))
                    .ok_or_else(|| format!("no number in \\boxed{{{}}}", short(b)))
            })
        };
        let from_last = || last_number(text).ok_or_else(|| "no number in the completion".to_string());
        match self.cfg.extract {
            Extract::AnswerTag => {
                from_tag().unwrap_or_else(|| Err(format!("no <{tag}>…</{tag}> in the completion")))
            }
            Extract::Boxed => from_boxed().unwrap_or_else(|| Err("no \\boxed{…} in the completion".into())),
            Extract::LastNumber => from_last(),
            Extract::Auto => from_tag().or_else(from_boxed).unwrap_or_else(from_last),
        }
    }
}

fn short(s: &str) -> String {
    s.chars().take(80).collect()
}

impl Grader for Numeric {
    fn name(&self) -> &str {
        &self.name
    }
    fn grade(&self, s: &Sample) -> GradeResult {
        let input = match template::render(&self.cfg.input, s) {
            Ok(x) => x,
            Err(e) => return GradeResult::fail(e),
        };
        let reference = match template::render(&self.cfg.reference, s) {
            Ok(r) => r,
            Err(e) => return GradeResult::fail(e),
        };
        let Some(want) = parse_number_strict(&reference).or_else(|| last_number(&reference)) else {
            return GradeResult::fail(format!("reference {:?} is not a number", short(&reference)));
        };
        let got = match self.extract(&input) {
            Ok(x) => x,
            Err(e) => return GradeResult::fail(e).with("reference", want),
        };
        let tol = self.cfg.abs_tol.max(self.cfg.rel_tol * want.abs());
        let pass = (got - want).abs() <= tol;
        GradeResult::ok(if pass { 1.0 } else { 0.0 })
            .with("extracted", got)
            .with("reference", want)
    }
}

#[cfg(test)]
mod tests {
    use super::super::build_from_toml;
    use super::*;
    use serde_json::json;

    fn g(extra: &str) -> Box<dyn Grader> {
        build_from_toml(&format!(
            "type = \"numeric\"\nreference = \"{{{{ item.answer }}}}\"\n{extra}"
        ))
        .unwrap()
    }
    fn score(g: &dyn Grader, c: &str, ans: serde_json::Value) -> f32 {
        g.grade(&Sample::new("", c, json!({ "answer": ans }))).score
    }

    #[test]
    fn parsing() {
        assert_eq!(parse_number_strict("1,234"), Some(1234.0));
        assert_eq!(parse_number_strict("-3.5"), Some(-3.5));
        assert_eq!(parse_number_strict("3/4"), Some(0.75));
        assert_eq!(parse_number_strict("\\frac{3}{4}"), Some(0.75));
        assert_eq!(parse_number_strict("-\\dfrac{1}{2}"), Some(-0.5));
        assert_eq!(parse_number_strict("$1,000.50"), Some(1000.5));
        assert_eq!(parse_number_strict("1/0"), None);
        assert_eq!(parse_number_strict("12 apples"), None);
        assert_eq!(last_number("so 3 + 4 = 7."), Some(7.0));
        assert_eq!(last_number("#### 1,234"), Some(1234.0));
        assert_eq!(last_number("no digits"), None);
        assert_eq!(last_boxed(r"\boxed{\frac{1}{2}} then \boxed{{3}}"), Some("{3}"));
        assert_eq!(last_boxed(r"\boxed{1} \boxed{2"), Some("1"));
        assert_eq!(parse_answer(r"\boxed{5 \text{ apples}}"), Some(5.0));
    }

    #[test]
    fn grading() {
        let auto = g("");
        assert_eq!(score(&*auto, "<answer>42</answer>", json!(42)), 1.0);
        assert_eq!(score(&*auto, "<answer> 1,234 </answer>", json!("1234")), 1.0);
        assert_eq!(
            score(&*auto, "thinking... the answer is \\boxed{3/4}", json!(0.75)),
            1.0
        );
        assert_eq!(score(&*auto, "so x = 17", json!("#### 17")), 1.0);
        // Adversarial: the right number is echoed, but the tagged answer is wrong.
        assert_eq!(
            score(
                &*auto,
                "Question: is the answer 42? <answer>41</answer> 42 42",
                json!(42)
            ),
            0.0
        );
        // Multiple boxed answers: the last one counts.
        assert_eq!(score(&*auto, r"\boxed{42} no wait \boxed{41}", json!(42)), 0.0);
        assert_eq!(score(&*auto, r"\boxed{41} no wait \boxed{42}", json!(42)), 1.0);
        // A tag with no number: 0 with an error, no fallback to the echoed number.
        let r = auto.grade(&Sample::new(
            "",
            "42 <answer>I don't know</answer>",
            json!({"answer": 42}),
        ));
        assert_eq!(r.score, 0.0);
        assert!(r.error.unwrap().contains("no number"));
        // Strict tag mode ignores boxed answers.
        let tag = g("extract = \"answer_tag\"");
        assert_eq!(score(&*tag, r"\boxed{42}", json!(42)), 0.0);
        // Tolerances.
        let tol = g("abs_tol = 0.01");
        assert_eq!(score(&*tol, "<answer>1.234</answer>", json!(1.2399)), 1.0);
        let rel = g("abs_tol = 0.0\nrel_tol = 0.01");
        assert_eq!(score(&*rel, "<answer>1005</answer>", json!(1000)), 1.0);
        assert_eq!(score(&*rel, "<answer>1011</answer>", json!(1000)), 0.0);
        // Bad reference: error, not a panic.
        assert!(auto
            .grade(&Sample::new("", "1", json!({"answer": "abc"})))
            .error
            .is_some());
        assert!(build_from_toml("type = \"numeric\"\nreference = \"1\"\nextract = \"sometimes\"").is_err());
    }
}
