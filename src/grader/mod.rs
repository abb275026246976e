//! Graders: the [`Grader`] trait, the [`Sample`] / [`GradeResult`] types, the TOML-configurable
//! catalogue ([`GraderConfig`] → [`build`]) and [`grade_batch`], which grades on worker threads.
//!
//! A grader never panics and never aborts the run: every failure becomes score 0 with the
//! reason in [`GradeResult::error`]. Configuration mirrors OpenAI's grader JSON where the two
//! overlap (`string_check`, `text_similarity`, `multi`, `{{ item.x }}` / `{{ sample.output_text }}`
//! templates); see each module for its keys.

pub mod external;
pub mod format;
pub mod json;
pub mod llm_judge;
pub mod multi;
pub mod numeric;
pub mod program;
pub mod rank;
pub mod sandbox;
pub mod similarity;
pub mod string_check;
pub mod template;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{Error, Result};

/// One completion to grade: the prompt it answered, the model's text, and the dataset row
/// (`answer`, `tests`, … — whatever the templates of the grader refer to as `item.…`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Sample {
    pub prompt: String,
    pub completion: String,
    pub item: Value,
}

impl Sample {
    pub fn new(prompt: impl Into<String>, completion: impl Into<String>, item: Value) -> Self {
        Sample {
            prompt: prompt.into(),
            completion: completion.into(),
            item,
        }
    }
}

/// The outcome of grading one sample. `score` is in [0, 1] unless a grader documents
/// otherwise (only `multi` with a free formula can leave it). `details` holds sub-scores and
/// diagnostics; `error` says why the score is 0 when grading failed.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct GradeResult {
    pub score: f32,
    pub details: Map<String, Value>,
    pub error: Option<String>,
}

impl GradeResult {
    pub fn ok(score: f32) -> Self {
        let score = if score.is_finite() { score } else { 0.0 };
        GradeResult {
            score,
            details: Map::new(),
            error: None,
        }
    }
    pub fn fail(error: impl Into<String>) -> Self {
        GradeResult {
            score: 0.0,
            details: Map::new(),
            error: Some(error.into()),
        }
    }
    /// Adds one detail entry (builder style).
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.details.insert(key.to_string(), value.into());
        self
    }
}

/// Scores completions. Implementations must be cheap to share across threads and must not
/// panic (a panic is still caught by [`grade_batch`] and turned into a failed result).
pub trait Grader: Send + Sync {
    fn name(&self) -> &str;
    fn grade(&self, s: &Sample) -> GradeResult;
}

/// Grades one sample, turning a panic into a failed result.
pub fn grade_one(grader: &dyn Grader, s: &Sample) -> GradeResult {
    match catch_unwind(AssertUnwindSafe(|| grader.grade(s))) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            GradeResult::fail(format!("grader {} panicked: {msg}", grader.name()))
        }
    }
}

/// Grades `samples` on `threads` worker threads (scoped std threads pulling from a shared
/// counter, so the global rayon pool stays free for the CPU engine). Results are in input order.
pub fn grade_batch(grader: &dyn Grader, samples: &[Sample], threads: usize) -> Vec<GradeResult> {
    let threads = threads.max(1).min(samples.len().max(1));
    if threads == 1 {
        return samples.iter().map(|s| grade_one(grader, s)).collect();
    }
    let next = AtomicUsize::new(0);
    let out: Mutex<Vec<Option<GradeResult>>> = Mutex::new(vec![None; samples.len()]);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= samples.len() {
                    break;
                }
                let r = grade_one(grader, &samples[i]);
                out.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(r);
            });
        }
    });
    out.into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .into_iter()
        .map(|r| r.unwrap_or_else(|| GradeResult::fail("not graded")))
        .collect()
}

/// Starts [`grade_batch`] on a background thread so the caller (the trainer) can keep the
/// engine busy; join the handle to collect the results.
pub fn grade_batch_async(
    grader: Arc<dyn Grader>,
    samples: Vec<Sample>,
    threads: usize,
) -> std::thread::JoinHandle<Vec<GradeResult>> {
    std::thread::spawn(move || grade_batch(grader.as_ref(), &samples, threads))
}

/// A grader's configuration, as written in TOML (`type = "…"` selects the variant).
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum GraderConfig {
    StringCheck(string_check::StringCheckConfig),
    Numeric(numeric::NumericConfig),
    #[serde(alias = "regex")]
    Format(format::FormatConfig),
    TextSimilarity(similarity::TextSimilarityConfig),
    Rank(rank::RankConfig),
    Json(json::JsonConfig),
    Program(program::ProgramConfig),
    External(external::ExternalConfig),
    /// OpenAI's `python` grader: a `grade(sample, item) -> float` function in `source`,
    /// run (trusted, unsandboxed) through the external JSON-lines protocol.
    Python(external::PythonConfig),
    LlmJudge(llm_judge::LlmJudgeConfig),
    Multi(multi::MultiConfig),
}

impl GraderConfig {
    /// Parses one grader table from TOML text (the table itself, with its `type` key).
    pub fn from_toml_str(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| Error::invalid(format!("grader config: {e}")))
    }
    /// Converts from any serde value (e.g. a `toml::Value` sub-table of a larger config).
    pub fn from_toml_value(v: toml::Value) -> Result<Self> {
        v.try_into()
            .map_err(|e| Error::invalid(format!("grader config: {e}")))
    }
    /// The `type` name.
    pub fn type_name(&self) -> &'static str {
        match self {
            GraderConfig::StringCheck(_) => "string_check",
            GraderConfig::Numeric(_) => "numeric",
            GraderConfig::Format(_) => "format",
            GraderConfig::TextSimilarity(_) => "text_similarity",
            GraderConfig::Rank(_) => "rank",
            GraderConfig::Json(_) => "json",
            GraderConfig::Program(_) => "program",
            GraderConfig::External(_) => "external",
            GraderConfig::Python(_) => "python",
            GraderConfig::LlmJudge(_) => "llm_judge",
            GraderConfig::Multi(_) => "multi",
        }
    }
}

/// Builds a grader from its configuration; errors name the offending key and value.
pub fn build(cfg: &GraderConfig) -> Result<Box<dyn Grader>> {
    Ok(match cfg {
        GraderConfig::StringCheck(c) => Box::new(string_check::StringCheck::new(c)?),
        GraderConfig::Numeric(c) => Box::new(numeric::Numeric::new(c)?),
        GraderConfig::Format(c) => Box::new(format::Format::new(c)?),
        GraderConfig::TextSimilarity(c) => Box::new(similarity::TextSimilarity::new(c)?),
        GraderConfig::Rank(c) => Box::new(rank::Rank::new(c)?),
        GraderConfig::Json(c) => Box::new(json::JsonGrader::new(c)?),
        GraderConfig::Program(c) => Box::new(program::Program::new(c)?),
        GraderConfig::External(c) => Box::new(external::External::new(c)?),
        GraderConfig::Python(c) => Box::new(external::External::python(c)?),
        GraderConfig::LlmJudge(c) => Box::new(llm_judge::LlmJudge::new(c)?),
        GraderConfig::Multi(c) => Box::new(multi::Multi::new(c)?),
    })
}

/// Parses TOML and builds the grader in one go.
pub fn build_from_toml(text: &str) -> Result<Box<dyn Grader>> {
    build(&GraderConfig::from_toml_str(text)?)
}

pub(crate) fn bad(key: &str, msg: impl std::fmt::Display) -> Error {
    Error::invalid(format!("grader config: `{key}`: {msg}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Panicky;
    impl Grader for Panicky {
        fn name(&self) -> &str {
            "panicky"
        }
        fn grade(&self, s: &Sample) -> GradeResult {
            if s.completion == "boom" {
                panic!("boom");
            }
            GradeResult::ok(s.completion.len() as f32)
        }
    }

    #[test]
    fn batch_keeps_order_and_catches_panics() {
        let samples: Vec<Sample> = ["a", "bb", "boom", "dddd", "", "ffffff"]
            .iter()
            .map(|c| Sample::new("p", *c, Value::Null))
            .collect();
        let r = grade_batch(&Panicky, &samples, 3);
        let scores: Vec<f32> = r.iter().map(|r| r.score).collect();
        assert_eq!(scores, vec![1.0, 2.0, 0.0, 4.0, 0.0, 6.0]);
        assert!(r[2].error.as_deref().unwrap().contains("panicked"));
        let h = grade_batch_async(Arc::new(Panicky), samples, 2);
        assert_eq!(h.join().unwrap().len(), 6);
    }

    #[test]
    fn every_example_builds() {
        let t: toml::Table = toml::from_str(include_str!("examples.toml")).unwrap();
        assert_eq!(t.len(), 11);
        for (name, v) in t {
            let cfg = GraderConfig::from_toml_value(v).unwrap_or_else(|e| panic!("{name}: {e}"));
            let g = build(&cfg).unwrap_or_else(|e| panic!("{name}: {e}"));
            if !matches!(cfg.type_name(), "external" | "llm_judge" | "program" | "python") {
                let s = Sample::new(
                    "q",
                    "<think>x</think><answer>42</answer>",
                    serde_json::json!({"answer": "42", "answers": ["42"], "summary": "the answer is 42"}),
                );
                let r = grade_one(g.as_ref(), &s);
                assert!((0.0..=1.0).contains(&r.score), "{name}: {r:?}");
            }
        }
    }

    #[test]
    fn config_errors_name_the_key() {
        let e = GraderConfig::from_toml_str("type = \"string_check\"\nreference = \"x\"\nopration = \"eq\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("opration"), "{e}");
        let e = GraderConfig::from_toml_str("type = \"nope\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope"), "{e}");
        let e = build_from_toml("type = \"format\"\ncriteria = [{ pattern = \"(\" }]")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("pattern"), "{e}");
        // `regex` is an alias of `format`.
        assert!(build_from_toml("type = \"regex\"\ntags = [\"answer\"]").is_ok());
    }
}
