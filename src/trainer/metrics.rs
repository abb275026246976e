//! What a user watches: per-step training records and validation records, appended as JSON
//! lines to `RUN_DIR/metrics.jsonl`, and the end-of-run `summary.json`.
//!
//! One file holds both kinds, tagged `"kind": "train"` or `"kind": "eval"`, so a run can be
//! followed with `tail -f` and plotted at any time (`rft plot RUN_DIR`).

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// One GRPO step.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct TrainRecord {
    pub step: usize,
    pub reward_mean: f64,
    pub reward_std: f64,
    /// Mean sub-score of every named grader (a `multi` grader's parts, or the single one).
    pub reward_per_grader: BTreeMap<String, f64>,
    /// Fraction of completions whose reward reaches the accuracy threshold.
    pub accuracy: f64,
    pub loss: f64,
    pub kl: Option<f64>,
    pub clip_low: f64,
    pub clip_high: f64,
    pub entropy: f64,
    pub completion_len_mean: f64,
    pub completion_len_max: usize,
    pub truncated_frac: f64,
    pub zero_std_frac: f64,
    pub grad_norm: f64,
    pub lr: f64,
    /// The update was skipped (non-finite loss or gradients).
    pub skipped: bool,
    pub rollout_tok_s: f64,
    pub train_tok_s: f64,
    pub rollout_seconds: f64,
    pub grade_seconds: f64,
    pub train_seconds: f64,
    pub step_seconds: f64,
    /// Forward/backward passes per update, and whether layers were recomputed in the backward:
    /// the config's micro-batching and gradient_checkpointing, or (GPU) the layout that fitted
    /// the device memory (`max_train_memory_gib`).
    pub micro_batches: usize,
    pub gradient_checkpointing: bool,
}

/// One validation pass (greedy decoding on held-out prompts).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct EvalRecord {
    pub step: usize,
    pub accuracy: f64,
    pub reward_mean: f64,
    pub num_prompts: usize,
    pub completion_len_mean: f64,
    pub seconds: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Record {
    Train(TrainRecord),
    Eval(EvalRecord),
}

impl Record {
    /// The optimiser step the record was logged at.
    pub fn step(&self) -> usize {
        match self {
            Record::Train(t) => t.step,
            Record::Eval(e) => e.step,
        }
    }
}

/// Appends records to `metrics.jsonl` (flushed per line, so a crash loses nothing written).
pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsLog {
    /// Opens `dir/metrics.jsonl` for appending (a resumed run continues the same file).
    pub fn open(dir: &Path) -> Result<MetricsLog> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let path = dir.join("metrics.jsonl");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        Ok(MetricsLog { path, file })
    }

    /// Before a resumed run appends: drops the records logged after the checkpoint's `step`
    /// (a run killed between two checkpoints logged steps it will now run again) and a torn
    /// last line (else the next record would be glued onto it). Rewritten atomically; a file
    /// that needs no change is left alone.
    pub fn rewind(dir: &Path, step: usize) -> Result<()> {
        let path = dir.join("metrics.jsonl");
        if !path.exists() {
            return Ok(());
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let records = read_records(&path)?;
        let kept: Vec<&Record> = records.iter().filter(|r| r.step() <= step).collect();
        if kept.len() == records.len() && (text.is_empty() || text.ends_with('\n')) {
            return Ok(());
        }
        let out: String = kept
            .iter()
            .map(|r| serde_json::to_string(r).expect("metrics serialise") + "\n")
            .collect();
        crate::model::weights::write_atomic(&path, out.as_bytes())
    }

    pub fn write(&mut self, r: &Record) -> Result<()> {
        let line = serde_json::to_string(r).expect("metrics serialise");
        writeln!(self.file, "{line}").map_err(|e| Error::io(&self.path, e))?;
        self.file.flush().map_err(|e| Error::io(&self.path, e))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads every record of a `metrics.jsonl` (a truncated last line — a run killed mid-write —
/// is ignored; any other bad line is an error with its line number).
pub fn read_records(path: &Path) -> Result<Vec<Record>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Record>(line) {
            Ok(r) => out.push(r),
            Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => {}
            Err(e) => {
                return Err(Error::Input {
                    path: path.to_path_buf(),
                    line: i + 1,
                    msg: format!("{e}"),
                })
            }
        }
    }
    Ok(out)
}

/// The end-of-run summary written as `summary.json`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    pub initial_validation_accuracy: Option<f64>,
    pub final_validation_accuracy: Option<f64>,
    pub best_validation_accuracy: Option<f64>,
    pub best_step: Option<usize>,
    pub initial_validation_reward: Option<f64>,
    pub final_validation_reward: Option<f64>,
    pub steps: usize,
    pub wall_seconds: f64,
    pub final_train_reward_mean: Option<f64>,
    pub rollout_tokens: u64,
    pub train_tokens: u64,
    pub device: String,
    pub interrupted: bool,
}

impl Summary {
    /// Fills the validation fields from the records of a run.
    pub fn from_records(records: &[Record]) -> Summary {
        let evals: Vec<&EvalRecord> = records
            .iter()
            .filter_map(|r| if let Record::Eval(e) = r { Some(e) } else { None })
            .collect();
        let last_train = records
            .iter()
            .rev()
            .find_map(|r| if let Record::Train(t) = r { Some(t) } else { None });
        let best = evals
            .iter()
            .max_by(|a, b| a.accuracy.total_cmp(&b.accuracy).then(b.step.cmp(&a.step)))
            .copied();
        Summary {
            initial_validation_accuracy: evals.first().map(|e| e.accuracy),
            final_validation_accuracy: evals.last().map(|e| e.accuracy),
            best_validation_accuracy: best.map(|e| e.accuracy),
            best_step: best.map(|e| e.step),
            initial_validation_reward: evals.first().map(|e| e.reward_mean),
            final_validation_reward: evals.last().map(|e| e.reward_mean),
            steps: last_train.map(|t| t.step).unwrap_or(0),
            final_train_reward_mean: last_train.map(|t| t.reward_mean),
            ..Default::default()
        }
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("summary serialise");
        crate::model::weights::write_atomic(&dir.join("summary.json"), text.as_bytes())
    }
}

/// A plain-text table of a summary, for the end of `rft train`.
pub fn summary_table(s: &Summary) -> String {
    let pct = |v: Option<f64>| {
        v.map(|x| format!("{:.1}%", 100.0 * x))
            .unwrap_or_else(|| "-".into())
    };
    let num = |v: Option<f64>| v.map(|x| format!("{x:.3}")).unwrap_or_else(|| "-".into());
    let rows = [
        ("steps", s.steps.to_string()),
        ("wall time", format!("{:.1} s", s.wall_seconds)),
        ("validation accuracy (start)", pct(s.initial_validation_accuracy)),
        ("validation accuracy (end)", pct(s.final_validation_accuracy)),
        (
            "validation accuracy (best)",
            format!(
                "{} at step {}",
                pct(s.best_validation_accuracy),
                s.best_step.map_or("-".into(), |b| b.to_string())
            ),
        ),
        (
            "validation reward (start → end)",
            format!(
                "{} → {}",
                num(s.initial_validation_reward),
                num(s.final_validation_reward)
            ),
        ),
        ("train reward (last step)", num(s.final_train_reward_mean)),
        (
            "rollout / train tokens",
            format!("{} / {}", s.rollout_tokens, s.train_tokens),
        ),
        ("device", s.device.clone()),
    ];
    let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in rows {
        out.push_str(&format!("  {k:<w$}  {v}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Appends half a record without its newline: what a process killed mid-write leaves.
    fn append_torn_line(path: &std::path::Path) {
        std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .unwrap()
            .write_all(b"{\"kind\":\"tra")
            .unwrap();
    }

    #[test]
    fn records_round_trip_and_summary() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = MetricsLog::open(dir.path()).unwrap();
        log.write(&Record::Eval(EvalRecord {
            step: 0,
            accuracy: 0.25,
            reward_mean: 0.3,
            ..Default::default()
        }))
        .unwrap();
        log.write(&Record::Train(TrainRecord {
            step: 1,
            reward_mean: 0.5,
            ..Default::default()
        }))
        .unwrap();
        log.write(&Record::Eval(EvalRecord {
            step: 1,
            accuracy: 0.5,
            reward_mean: 0.6,
            ..Default::default()
        }))
        .unwrap();
        // A torn last line (killed mid-write) is ignored.
        append_torn_line(log.path());
        let recs = read_records(log.path()).unwrap();
        assert_eq!(recs.len(), 3);
        let s = Summary::from_records(&recs);
        assert_eq!(s.initial_validation_accuracy, Some(0.25));
        assert_eq!(s.final_validation_accuracy, Some(0.5));
        assert_eq!(s.best_step, Some(1));
        assert_eq!(s.steps, 1);
        assert!(summary_table(&s).contains("50.0%"));
    }

    #[test]
    fn rewind_drops_records_after_the_checkpoint_and_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = MetricsLog::open(dir.path()).unwrap();
        for step in 1..=5 {
            log.write(&Record::Train(TrainRecord {
                step,
                ..Default::default()
            }))
            .unwrap();
        }
        log.write(&Record::Eval(EvalRecord {
            step: 3,
            ..Default::default()
        }))
        .unwrap();
        append_torn_line(log.path());
        MetricsLog::rewind(dir.path(), 3).unwrap();
        let steps: Vec<usize> = read_records(log.path())
            .unwrap()
            .iter()
            .map(Record::step)
            .collect();
        assert_eq!(steps, [1, 2, 3, 3]);
        assert!(std::fs::read_to_string(log.path()).unwrap().ends_with('\n'));
        // Nothing to drop: the file is not rewritten.
        let before = std::fs::metadata(log.path()).unwrap().modified().unwrap();
        MetricsLog::rewind(dir.path(), 9).unwrap();
        assert_eq!(before, std::fs::metadata(log.path()).unwrap().modified().unwrap());
    }

    #[test]
    fn bad_line_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("metrics.jsonl");
        std::fs::write(&p, "{\"kind\":\"train\",\"step\":1}\nnot json\n{}\n").unwrap();
        let e = read_records(&p).unwrap_err().to_string();
        assert!(e.contains("metrics.jsonl:2"), "{e}");
    }
}
