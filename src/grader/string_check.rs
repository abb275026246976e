//! `string_check` (as OpenAI's): compares the rendered `input` with the rendered `reference`.
//! `eq` / `ne`: exact (optionally trimmed) equality / inequality; `like`: reference is a
//! substring of input; `ilike`: the same, case-insensitive. Score 1 or 0.

use serde::Deserialize;

use super::template::{self, OUTPUT_TEXT};
use super::{GradeResult, Grader, Sample};
use crate::Result;

#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    Eq,
    Ne,
    Like,
    Ilike,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StringCheckConfig {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default = "default_input")]
    pub input: String,
    pub reference: String,
    pub operation: Operation,
    /// Trim surrounding whitespace of both sides before comparing (default false).
    #[serde(default)]
    pub trim: bool,
}

pub(crate) fn default_input() -> String {
    OUTPUT_TEXT.to_string()
}

pub struct StringCheck {
    name: String,
    cfg: StringCheckConfig,
}

impl StringCheck {
    pub fn new(cfg: &StringCheckConfig) -> Result<Self> {
        template::check("input", &cfg.input)?;
        template::check("reference", &cfg.reference)?;
        Ok(StringCheck {
            name: cfg.name.clone().unwrap_or_else(|| "string_check".into()),
            cfg: cfg.clone(),
        })
    }
}

impl Grader for StringCheck {
    fn name(&self) -> &str {
        &self.name
    }
    fn grade(&self, s: &Sample) -> GradeResult {
        let (input, reference) = match (
            template::render(&self.cfg.input, s),
            template::render(&self.cfg.reference, s),
        ) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => return GradeResult::fail(e),
        };
        let (a, b) = if self.cfg.trim {
            (input.trim(), reference.trim())
        } else {
            (&input[..], &reference[..])
        };
        let pass = match self.cfg.operation {
            Operation::Eq => a == b,
            Operation::Ne => a != b,
            Operation::Like => a.contains(b),
            Operation::Ilike => a.to_lowercase().contains(&b.to_lowercase()),
        };
        GradeResult::ok(if pass { 1.0 } else { 0.0 })
    }
}

#[cfg(test)]
mod tests {
    use super::super::build_from_toml;
    use super::*;
    use serde_json::json;

    fn g(op: &str) -> Box<dyn Grader> {
        build_from_toml(&format!(
            "type = \"string_check\"\nreference = \"{{{{ item.answer }}}}\"\noperation = \"{op}\""
        ))
        .unwrap()
    }

    #[test]
    fn operations() {
        let s = |c: &str| Sample::new("", c, json!({"answer": "Paris"}));
        assert_eq!(g("eq").grade(&s("Paris")).score, 1.0);
        assert_eq!(g("eq").grade(&s("Paris ")).score, 0.0);
        assert_eq!(g("ne").grade(&s("London")).score, 1.0);
        assert_eq!(g("like").grade(&s("It is Paris.")).score, 1.0);
        assert_eq!(g("like").grade(&s("It is paris.")).score, 0.0);
        assert_eq!(g("ilike").grade(&s("IT IS PARIS")).score, 1.0);
        // Missing reference in the item: 0 with an error, no panic.
        let r = g("eq").grade(&Sample::new("", "Paris", json!({})));
        assert_eq!(r.score, 0.0);
        assert!(r.error.is_some());
        let t = build_from_toml(
            "type = \"string_check\"\nreference = \"Paris\"\noperation = \"eq\"\ntrim = true",
        )
        .unwrap();
        assert_eq!(t.grade(&s("  Paris\n")).score, 1.0);
    }
}
