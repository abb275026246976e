//! The RFT loop as a user runs it: `rft train` end to end on the tiny model (outputs, metrics,
//! checkpoints, adapters, plot, summary), exact resume (Ctrl-C, `--max-steps`, the library's
//! stop flag), config errors, dataset files with configured graders, `rft eval` / `rft data`,
//! `--device cuda` without a CUDA engine, and the options `max_prompt_length`,
//! `eval_num_prompts`, `accuracy_threshold` and `[model] adapter`. Every run is a few dozen
//! steps of the 124k-parameter model in models/tiny on the built-in 2-digit addition task, so
//! the whole file takes seconds.

use rft::cpu::engine::CpuEngine;
use rft::grader::{GradeResult, Grader, Sample};
use rft::model::tokenizer::Tokenizer;
use rft::trainer::run::{TaskGrader, TrainConfig, Trainer};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tiny() -> PathBuf {
    root().join("models/tiny")
}

fn rft() -> Command {
    Command::new(env!("CARGO_BIN_EXE_rft"))
}

fn run_in(dir: &Path, args: &[&str]) -> Output {
    rft().args(args).current_dir(dir).output().expect("run rft")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok_in(dir: &Path, args: &[&str]) -> Output {
    let o = run_in(dir, args);
    assert!(o.status.success(), "rft {args:?} failed: {}", stderr(&o));
    o
}

/// A config for the tiny model on plain 2-digit addition; `top` goes before the tables.
fn config(top: &str) -> String {
    format!(
        r#"seed = 0
prompts_per_step = 8
num_generations = 8
max_completion_length = 4
learning_rate = 3e-3
lr_scheduler_type = "linear"
device = "cpu"
{top}

[model]
path = "{model}"

[data]
task = "arithmetic"
format = "plain"
digits = 2
ops = ["+"]
num_train = 400
num_val = 40
seed = 7

[lora]
r = 8
alpha = 16
"#,
        model = tiny().display()
    )
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn kind<'a>(recs: &'a [Value], k: &str) -> Vec<&'a Value> {
    recs.iter().filter(|r| r["kind"] == k).collect()
}

fn f(r: &Value, key: &str) -> f64 {
    r[key]
        .as_f64()
        .unwrap_or_else(|| panic!("`{key}` missing or not a number in {r}"))
}

const TIMING: [&str; 7] = [
    "rollout_tok_s",
    "train_tok_s",
    "rollout_seconds",
    "grade_seconds",
    "train_seconds",
    "step_seconds",
    "seconds",
];

/// The records without their wall-clock fields (everything else is deterministic).
fn untimed(recs: &[Value]) -> Vec<Value> {
    recs.iter()
        .map(|r| {
            let mut r = r.clone();
            for k in TIMING {
                r.as_object_mut().unwrap().remove(k);
            }
            r
        })
        .collect()
}

/// Checks every documented field of a train record.
fn check_train_record(r: &Value, beta: f64) {
    for k in [
        "reward_mean",
        "reward_std",
        "accuracy",
        "loss",
        "clip_low",
        "clip_high",
        "entropy",
        "completion_len_mean",
        "truncated_frac",
        "zero_std_frac",
        "rollout_tok_s",
        "train_tok_s",
        "step_seconds",
        "lr",
        "grad_norm",
    ] {
        assert!(f(r, k).is_finite(), "{k} not finite in {r}");
    }
    for k in [
        "reward_mean",
        "accuracy",
        "clip_low",
        "clip_high",
        "truncated_frac",
        "zero_std_frac",
    ] {
        assert!((0.0..=1.0).contains(&f(r, k)), "{k} outside [0, 1] in {r}");
    }
    assert!(f(r, "reward_std") >= 0.0 && f(r, "reward_std") <= 0.5 + 1e-12);
    assert!(f(r, "entropy") >= 0.0);
    assert!(f(r, "grad_norm") >= 0.0);
    assert!(f(r, "rollout_tok_s") > 0.0 && f(r, "train_tok_s") > 0.0 && f(r, "step_seconds") > 0.0);
    assert!(r["micro_batches"].as_u64().is_some_and(|m| m >= 1), "{r}");
    assert!(r["gradient_checkpointing"].is_boolean(), "{r}");
    let len_max = r["completion_len_max"].as_u64().expect("completion_len_max");
    assert!((1..=4).contains(&len_max), "{r}");
    assert!(f(r, "completion_len_mean") <= len_max as f64 && f(r, "completion_len_mean") > 0.0);
    let per = r["reward_per_grader"].as_object().expect("reward_per_grader");
    assert_eq!(per.len(), 1, "{r}");
    assert!((per["task"].as_f64().unwrap() - f(r, "reward_mean")).abs() < 1e-12);
    // Exact checker: reward is 0/1 so accuracy is the mean reward.
    assert!((f(r, "accuracy") - f(r, "reward_mean")).abs() < 1e-12);
    if beta == 0.0 {
        assert!(r["kl"].is_null(), "kl must be null with beta = 0: {r}");
    } else {
        let kl = f(r, "kl");
        assert!(kl.is_finite() && kl >= 0.0, "{r}");
    }
    assert_eq!(r["skipped"], false);
}

fn score_input(dir: &Path) -> PathBuf {
    let rows: String = ["12+34=", "70+8=", "55+55="]
        .iter()
        .zip(["46", "78", "110"])
        .map(|(p, c)| format!("{}\n", serde_json::json!({"prompt": p, "completion": c})))
        .collect();
    write(dir, "score.jsonl", &rows)
}

/// `rft score` logprobs (with an optional adapter).
fn score(dir: &Path, adapter: Option<&Path>) -> Vec<f64> {
    let input = score_input(dir);
    let tiny = tiny();
    let mut args = vec![
        "score",
        "--model",
        tiny.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
    ];
    if let Some(a) = adapter {
        args.extend(["--adapter", a.to_str().unwrap()]);
    }
    let o = ok_in(dir, &args);
    String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .flat_map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            v["logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn train_writes_every_output() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let steps = 24;
    let cfg = write(
        dir,
        "run.toml",
        // Seed 1: a run whose validation accuracy rises within 24 steps (checked below).
        &config(&format!("max_steps = {steps}\neval_steps = 4\nsave_steps = 6")).replacen(
            "seed = 0\n",
            "seed = 1\n",
            1,
        ),
    );
    let t0 = Instant::now();
    let o = ok_in(
        dir,
        &["train", cfg.to_str().unwrap(), "--output-dir", "out", "--quiet"],
    );
    let wall = t0.elapsed();
    let err = stderr(&o);
    assert!(err.contains("validation accuracy"), "{err}");
    let out = dir.join("out");

    // metrics.jsonl: every line parses, with every field, sane values, the LR schedule.
    let recs = lines(&out.join("metrics.jsonl"));
    let train = kind(&recs, "train");
    let evals = kind(&recs, "eval");
    assert_eq!(train.len() + evals.len(), recs.len(), "unknown record kinds");
    assert_eq!(train.len(), steps);
    for (i, r) in train.iter().enumerate() {
        assert_eq!(r["step"].as_u64(), Some(i as u64 + 1));
        check_train_record(r, 0.0);
        // The default layout: one micro-batch, nothing recomputed.
        assert_eq!(
            (r["micro_batches"].as_u64(), r["gradient_checkpointing"].as_bool()),
            (Some(1), Some(false))
        );
        // linear decay to 0 over max_steps, no warmup: step k uses lr·(1 − (k−1)/max_steps)
        let want = 3e-3 * (1.0 - i as f64 / steps as f64);
        assert!(
            (f(r, "lr") - want).abs() < 1e-9 * 3e-3,
            "step {}: lr {} want {want}",
            i + 1,
            f(r, "lr")
        );
    }
    let eval_steps: Vec<u64> = evals.iter().map(|e| e["step"].as_u64().unwrap()).collect();
    assert_eq!(eval_steps, [0, 4, 8, 12, 16, 20, 24]);
    for e in &evals {
        assert!((0.0..=1.0).contains(&f(e, "accuracy")));
        assert!((0.0..=1.0).contains(&f(e, "reward_mean")));
        assert_eq!(e["num_prompts"], 40);
        assert!(f(e, "completion_len_mean") > 0.0 && f(e, "seconds") >= 0.0);
    }
    // Each eval line sits right after the train line of its step.
    for (i, r) in recs.iter().enumerate().skip(1) {
        if r["kind"] == "eval" {
            assert_eq!(recs[i - 1]["kind"], "train");
            assert_eq!(recs[i - 1]["step"], r["step"]);
        }
    }

    // checkpoint/: trainer state, adapter, optimizer moments, at the last step.
    let ck = out.join("checkpoint");
    for f in [
        "trainer_state.json",
        "adapter_model.safetensors",
        "adapter_config.json",
        "optimizer.safetensors",
    ] {
        assert!(ck.join(f).is_file(), "checkpoint/{f} missing");
    }
    let st = json(&ck.join("trainer_state.json"));
    assert_eq!(st["step"], steps as u64);
    for a in ["adapter_last", "adapter_best"] {
        assert!(out.join(a).join("adapter_model.safetensors").is_file(), "{a}");
        assert!(out.join(a).join("adapter_config.json").is_file(), "{a}");
    }
    assert_eq!(
        std::fs::read(out.join("adapter_last/adapter_model.safetensors")).unwrap(),
        std::fs::read(ck.join("adapter_model.safetensors")).unwrap(),
        "adapter_last differs from the final checkpoint's adapter"
    );
    for e in std::fs::read_dir(&out).unwrap() {
        let name = e.unwrap().file_name();
        assert!(!name.to_string_lossy().starts_with('.'), "leftover {name:?}");
    }

    // plot.png
    let png = std::fs::read(out.join("plot.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(png.len() > 5_000, "plot.png is only {} bytes", png.len());

    // summary.json agrees with the metrics.
    let s = json(&out.join("summary.json"));
    assert_eq!(s["steps"], steps as u64);
    assert_eq!(s["interrupted"], false);
    assert!(f(&s, "wall_seconds") > 0.0 && f(&s, "wall_seconds") <= wall.as_secs_f64() + 1.0);
    assert_eq!(f(&s, "initial_validation_accuracy"), f(evals[0], "accuracy"));
    assert_eq!(
        f(&s, "final_validation_accuracy"),
        f(evals.last().unwrap(), "accuracy")
    );
    let best = evals.iter().map(|e| f(e, "accuracy")).fold(0.0, f64::max);
    assert_eq!(f(&s, "best_validation_accuracy"), best);
    // best_step: the first validation that reached it (adapter_best is saved on a strict
    // improvement only, so it holds that step's adapter; checked with `rft eval` below).
    let first_best = evals.iter().find(|e| f(e, "accuracy") == best).unwrap();
    assert_eq!(s["best_step"], first_best["step"], "{eval_steps:?}");

    // The run learned: the adapter is non-zero (logprobs moved), and validation accuracy went up
    // somewhere (the tiny model starts near 35% on 2-digit sums; a few updates at 3e-3 help).
    let base = score(dir, None);
    for a in ["adapter_last", "adapter_best"] {
        let with = score(dir, Some(&out.join(a)));
        assert_eq!(with.len(), base.len());
        let moved = base
            .iter()
            .zip(&with)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(moved > 1e-3, "{a} leaves the logprobs unchanged ({moved})");
    }
    assert!(
        best > f(&s, "initial_validation_accuracy"),
        "validation accuracy never rose above the start: {eval_steps:?} {:?}",
        evals.iter().map(|e| f(e, "accuracy")).collect::<Vec<_>>()
    );

    // `rft eval` of adapter_last reproduces the final validation accuracy.
    let o = ok_in(
        dir,
        &["eval", cfg.to_str().unwrap(), "--adapter", "out/adapter_last"],
    );
    let e: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(f(&e, "accuracy"), f(&s, "final_validation_accuracy"));
    assert_eq!(e["num_prompts"], 40);
    // adapter_best reproduces the best validation accuracy.
    let o = ok_in(
        dir,
        &["eval", cfg.to_str().unwrap(), "--adapter", "out/adapter_best"],
    );
    let e: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(f(&e, "accuracy"), best);
    // ... and without an adapter, the initial one (a fresh LoRA has B = 0).
    let o = ok_in(dir, &["eval", cfg.to_str().unwrap()]);
    let e: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(f(&e, "accuracy"), f(&s, "initial_validation_accuracy"));

    // `rft plot` redraws the plot.
    std::fs::remove_file(out.join("plot.png")).unwrap();
    ok_in(dir, &["plot", "out"]);
    assert!(out.join("plot.png").is_file());
}

#[test]
fn kl_is_logged_when_beta_is_positive() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cfg = write(
        dir,
        "kl.toml",
        &config(
            "max_steps = 3\neval_steps = 0\nbeta = 0.04\ngradient_accumulation_steps = 2\n\
             gradient_checkpointing = true",
        )
        .replace("3e-3", "1e-2"),
    );
    ok_in(
        dir,
        &["train", cfg.to_str().unwrap(), "--output-dir", "out", "--quiet"],
    );
    let recs = lines(&dir.join("out/metrics.jsonl"));
    let train = kind(&recs, "train");
    assert_eq!(train.len(), 3);
    for r in &train {
        check_train_record(r, 0.04);
        // 64 sequences in 2 micro-batches, layers recomputed, as configured (the CPU never
        // changes the layout).
        assert_eq!(
            (r["micro_batches"].as_u64(), r["gradient_checkpointing"].as_bool()),
            (Some(2), Some(true))
        );
    }
    // The policy starts equal to the reference: KL 0 at step 1, then it moves away.
    assert!(f(train[0], "kl").abs() < 1e-9, "{}", train[0]);
    assert!(f(train[2], "kl") > 0.0, "{}", train[2]);
    // eval_steps = 0: validation only at the start and the end.
    let ev: Vec<u64> = kind(&recs, "eval")
        .iter()
        .map(|e| e["step"].as_u64().unwrap())
        .collect();
    assert_eq!(ev, [0, 3]);
}

/// Files of a run that must match bit for bit between a resumed and a straight run.
fn compare_runs(a: &Path, b: &Path) {
    assert_eq!(
        untimed(&lines(&a.join("metrics.jsonl"))),
        untimed(&lines(&b.join("metrics.jsonl"))),
        "metrics differ between {} and {}",
        a.display(),
        b.display()
    );
    for f in [
        "adapter_last/adapter_model.safetensors",
        "adapter_best/adapter_model.safetensors",
        "checkpoint/adapter_model.safetensors",
        "checkpoint/optimizer.safetensors",
    ] {
        assert!(
            std::fs::read(a.join(f)).unwrap() == std::fs::read(b.join(f)).unwrap(),
            "{f} differs"
        );
    }
    let (sa, sb) = (json(&a.join("summary.json")), json(&b.join("summary.json")));
    for k in [
        "initial_validation_accuracy",
        "final_validation_accuracy",
        "best_validation_accuracy",
        "best_step",
        "steps",
        "rollout_tokens",
        "train_tokens",
        "interrupted",
    ] {
        assert_eq!(sa[k], sb[k], "summary.{k}");
    }
}

/// Ctrl-C during `rft train`, then `rft train --resume DIR` (no config: the checkpoint's own,
/// from another working directory, with a model path relative to the config) ends bit-identical
/// to an uninterrupted run. The linear schedule is the config's, so it is the same in both.
#[test]
fn ctrl_c_then_resume_is_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::os::unix::fs::symlink(root().join("models"), dir.join("models")).unwrap();
    let text = config("max_steps = 40\neval_steps = 5\nwarmup_steps = 3")
        .replace(&tiny().display().to_string(), "models/tiny");
    write(dir, "rel.toml", &text);
    ok_in(dir, &["train", "rel.toml", "--output-dir", "straight", "--quiet"]);

    let child = rft()
        .args(["train", "rel.toml", "--output-dir", "cut", "--quiet"])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let metrics = dir.join("cut/metrics.jsonl");
    let t0 = Instant::now();
    loop {
        let n = std::fs::read_to_string(&metrics)
            .map(|t| t.matches("\"kind\":\"train\"").count())
            .unwrap_or(0);
        if n >= 3 || t0.elapsed() > Duration::from_secs(60) {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "interrupted run: {}", stderr(&o));
    let cut = dir.join("cut");
    let s = json(&cut.join("summary.json"));
    let done = s["steps"].as_u64().unwrap();
    eprintln!("interrupted at step {done}");
    if s["interrupted"] == true {
        assert!(done < 40);
        assert!(stderr(&o).contains("rft train --resume"), "{}", stderr(&o));
        assert_eq!(json(&cut.join("checkpoint/trainer_state.json"))["step"], done);
        assert!(cut.join("adapter_last/adapter_model.safetensors").is_file());
    } else {
        // The run finished before the signal landed; the resume below is then a no-op.
        assert_eq!(done, 40);
    }
    let elsewhere = tempfile::tempdir().unwrap();
    let o = ok_in(
        elsewhere.path(),
        &["train", "--resume", cut.to_str().unwrap(), "--quiet"],
    );
    if done < 40 {
        assert!(stderr(&o).contains(&format!("at step {done}")), "{}", stderr(&o));
    }
    compare_runs(&cut, &dir.join("straight"));
}

/// `--max-steps N` then `--resume … --max-steps N+M` equals a straight N+M run when the
/// schedule does not depend on max_steps (constant LR). With a linear schedule it cannot:
/// the schedule is built from max_steps, so the first N steps used a different LR.
#[test]
fn max_steps_then_resume_is_bit_identical_with_constant_lr() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let text =
        config("max_steps = 1000\neval_steps = 4\nsave_steps = 3").replace("\"linear\"", "\"constant\"");
    let cfg = write(dir, "c.toml", &text);
    let c = cfg.to_str().unwrap();
    ok_in(
        dir,
        &[
            "train",
            c,
            "--output-dir",
            "straight",
            "--max-steps",
            "14",
            "--quiet",
        ],
    );
    ok_in(
        dir,
        &["train", c, "--output-dir", "split", "--max-steps", "8", "--quiet"],
    );
    let part = json(&dir.join("split/summary.json"));
    assert_eq!(part["steps"], 8);
    assert_eq!(part["interrupted"], false);
    ok_in(
        dir,
        &["train", c, "--resume", "split", "--max-steps", "14", "--quiet"],
    );
    compare_runs(&dir.join("split"), &dir.join("straight"));
    // Resuming a finished run does nothing and logs nothing more.
    let before = std::fs::read(dir.join("split/metrics.jsonl")).unwrap();
    ok_in(
        dir,
        &[
            "train",
            c,
            "--resume",
            "split/checkpoint",
            "--max-steps",
            "14",
            "--quiet",
        ],
    );
    assert_eq!(before, std::fs::read(dir.join("split/metrics.jsonl")).unwrap());
    assert_eq!(json(&dir.join("split/summary.json"))["steps"], 14);
}

/// A grader that raises a stop flag once it has graded `after` samples (a deterministic
/// Ctrl-C in the middle of a step).
struct StopAfter {
    inner: TaskGrader,
    seen: AtomicUsize,
    after: usize,
    stop: Arc<AtomicBool>,
}

impl Grader for StopAfter {
    fn name(&self) -> &str {
        "task"
    }
    fn grade(&self, s: &Sample) -> GradeResult {
        if self.seen.fetch_add(1, Ordering::SeqCst) + 1 == self.after {
            self.stop.store(true, Ordering::SeqCst);
        }
        self.inner.grade(s)
    }
}

fn library_trainer(cfg: &TrainConfig, grader: Arc<dyn Grader>, out: &Path) -> Trainer {
    let mut cfg = cfg.clone();
    cfg.output_dir = Some(out.to_path_buf());
    let splits = cfg.data.load(&root()).unwrap();
    let engine = CpuEngine::load(&tiny()).unwrap();
    let tok = Tokenizer::from_dir(tiny()).unwrap();
    Trainer::new(engine, tok, splits.train, splits.val, grader, cfg, "").unwrap()
}

/// The library's stop flag (raised mid-run, linear schedule over the config's max_steps):
/// `run` stops after the current step with a checkpoint and `interrupted = true`; a new
/// trainer resumed from it ends bit-identical to an uninterrupted run.
#[test]
fn stop_flag_then_resume_is_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let text = config("max_steps = 12\neval_steps = 4\nnum_iterations = 2\nsave_steps = 5");
    let cfg = TrainConfig::from_toml_str(&text, Path::new("lib.toml")).unwrap();
    let never = AtomicBool::new(false);

    let mut t = library_trainer(&cfg, Arc::new(TaskGrader), &dir.join("straight"));
    let s = t.run(&never, false).unwrap();
    assert!(!s.interrupted);
    assert_eq!(s.steps, 12);

    // Stop during step 6: 40 validation prompts, 64 samples per step, validation after step 4.
    let stop = Arc::new(AtomicBool::new(false));
    let g = StopAfter {
        inner: TaskGrader,
        seen: AtomicUsize::new(0),
        after: 40 + 4 * 64 + 40 + 64 + 1,
        stop: stop.clone(),
    };
    let cut = dir.join("cut");
    let mut t = library_trainer(&cfg, Arc::new(g), &cut);
    let s = t.run(&stop, false).unwrap();
    assert!(s.interrupted);
    assert_eq!(s.steps, 6);
    assert_eq!(t.step_count(), 6);
    assert_eq!(
        json(&cut.join("checkpoint/trainer_state.json"))["step"],
        12,
        "2 iterations per step"
    );
    assert_eq!(json(&cut.join("summary.json"))["interrupted"], true);
    assert!(cut.join("adapter_last/adapter_model.safetensors").is_file());
    assert!(cut.join("plot.png").is_file());
    // No final validation for an interrupted run.
    let evals: Vec<u64> = kind(&lines(&cut.join("metrics.jsonl")), "eval")
        .iter()
        .map(|e| e["step"].as_u64().unwrap())
        .collect();
    assert_eq!(evals, [0, 4]);

    let mut t = library_trainer(&cfg, Arc::new(TaskGrader), &cut);
    t.resume_from(&cut.join("checkpoint")).unwrap();
    assert_eq!(t.step_count(), 6);
    let s = t.run(&never, false).unwrap();
    assert!(!s.interrupted);
    compare_runs(&cut, &dir.join("straight"));

    // A stop raised before the first step: the initial validation, a step-0 checkpoint.
    let early = dir.join("early");
    let mut t = library_trainer(&cfg, Arc::new(TaskGrader), &early);
    let s = t.run(&AtomicBool::new(true), false).unwrap();
    assert!(s.interrupted);
    assert_eq!(s.steps, 0);
    assert_eq!(json(&early.join("checkpoint/trainer_state.json"))["step"], 0);
}

fn fail_with(dir: &Path, toml: &str, want: &[&str]) {
    let cfg = write(dir, "bad.toml", toml);
    let o = run_in(
        dir,
        &[
            "train",
            cfg.to_str().unwrap(),
            "--output-dir",
            "bad_out",
            "--quiet",
        ],
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "config {toml:?} should fail: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line wanted: {err}");
    for w in want {
        assert!(err.contains(w), "{w:?} not in {err:?}");
    }
    assert!(!dir.join("bad_out/metrics.jsonl").exists());
}

#[test]
fn config_errors_name_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let good = config("max_steps = 2");
    let model = format!("[model]\npath = \"{}\"\n", tiny().display());
    fail_with(
        dir,
        &format!("learning_rat = 1e-5\n{good}"),
        &["bad.toml", "`learning_rat`", "line 1 "],
    );
    fail_with(dir, &good.replace("r = 8", "rank = 8"), &["`rank`", "[lora]"]);
    fail_with(
        dir,
        &good.replace("digits = 2", "digitz = 2"),
        &["`digitz`", "[data]"],
    );
    fail_with(
        dir,
        &format!("{good}\n[grader]\ntype = \"string_check\"\noperation = \"eq\"\nreference = \"{{{{ item.answer }}}}\"\nrefrence = 1\n"),
        &["`refrence`", "grader"],
    );
    fail_with(
        dir,
        &format!("{good}\n[grader]\ntype = \"nosuch\"\n"),
        &["nosuch", "grader"],
    );
    fail_with(
        dir,
        &good.replace("learning_rate = 3e-3", "learning_rate = \"big\""),
        &["learning_rate", "\"big\""],
    );
    fail_with(
        dir,
        &good.replace("num_generations = 8", "num_generations = 1"),
        &["`num_generations`"],
    );
    fail_with(dir, &format!("temperature = 0\n{good}"), &["`temperature`"]);
    fail_with(dir, &good.replace("r = 8", "r = 0"), &["`lora.r`"]);
    fail_with(dir, &format!("epsilon = 2\n{good}"), &["`epsilon`"]);
    fail_with(
        dir,
        &format!("max_train_memory_gib = -1.0\n{good}"),
        &["`max_train_memory_gib`", "≥ 0"],
    );
    fail_with(
        dir,
        &format!("learning_rate = -1.0\n{model}"),
        &["`learning_rate`"],
    );
    fail_with(
        dir,
        &format!("beta = 0.1\n{}full_fine_tuning = true\n", model),
        &["`beta`", "full fine-tuning"],
    );
    // AdamW keys were checked only after the first validation (one line more on stderr, a
    // metrics.jsonl written, no key named); adam_epsilon = 0 ended in NaN logits.
    for (line, key) in [
        ("adam_beta1 = 1.5", "`adam_beta1`"),
        ("adam_beta2 = nan", "`adam_beta2`"),
        ("adam_epsilon = 0", "`adam_epsilon`"),
        ("weight_decay = -1", "`weight_decay`"),
        ("accuracy_threshold = nan", "`accuracy_threshold`"),
        ("stop = [\"\"]", "`stop`"),
        ("grader_threads = 0", "`grader_threads`"),
        ("rollout_batch_size = 0", "`rollout_batch_size`"),
    ] {
        fail_with(dir, &format!("{line}\n{good}"), &["bad.toml", key]);
    }
    // Task keys name the config file too.
    fail_with(
        dir,
        &good.replace("num_train = 400", "num_train = 0"),
        &["bad.toml", "`data.num_train`"],
    );
    fail_with(
        dir,
        &good.replace("digits = 2", "digits = 0"),
        &["bad.toml", "data.digits"],
    );
    fail_with(dir, "max_steps = 3\n", &["`model`"]);
    fail_with(
        dir,
        &good.replace("\"linear\"", "\"linearish\""),
        &["lr_scheduler_type", "linearish"],
    );
    fail_with(dir, &good.replace("\"cpu\"", "\"gpu\""), &["device", "gpu"]);
    fail_with(dir, "[model]\npath = \"no/such/model\"\n", &["no/such/model"]);
    write(dir, "d.jsonl", "{\"prompt\": \"1+1=\", \"answer\": \"2\"}\n");
    fail_with(
        dir,
        &format!("{model}[data]\npath = \"d.jsonl\"\n"),
        &["[grader]"],
    );
    fail_with(
        dir,
        &format!(
            "{model}[data]\npath = \"missing.jsonl\"\n[grader]\ntype = \"string_check\"\nreference = \"x\"\n"
        ),
        &["missing.jsonl"],
    );
    // A missing config file, and --resume of a directory with no checkpoint.
    let o = run_in(dir, &["train", "nope.toml"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("nope.toml"), "{}", stderr(&o));
    let o = run_in(dir, &["train", "--resume", "nowhere"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("nowhere"), "{}", stderr(&o));
    assert_eq!(stderr(&o).trim_end().lines().count(), 1, "{}", stderr(&o));
}

/// A JSONL dataset with a configured grader; the grader's name (and a multi grader's parts)
/// in `reward_per_grader`.
#[test]
fn dataset_file_with_configured_graders() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let rows: String = (0..24)
        .map(|i| {
            let (a, b) = (10 + 3 * i, 20 + 2 * i);
            format!(
                "{}\n",
                serde_json::json!({"prompt": format!("{a}+{b}="), "answer": (a + b).to_string()})
            )
        })
        .collect();
    write(dir, "sums.jsonl", &rows);
    let base = format!(
        "max_steps = 2\neval_steps = 0\nprompts_per_step = 4\nnum_generations = 4\nmax_completion_length = 4\nlearning_rate = 3e-3\n\
         [model]\npath = \"{}\"\n[data]\npath = \"sums.jsonl\"\nval_size = 4\n",
        tiny().display()
    );
    let one = format!("{base}[grader]\ntype = \"string_check\"\nname = \"exact\"\noperation = \"eq\"\nreference = \"{{{{ item.answer }}}}\"\n");
    let cfg = write(dir, "one.toml", &one);
    ok_in(
        dir,
        &["train", cfg.to_str().unwrap(), "--output-dir", "one", "--quiet"],
    );
    let recs = lines(&dir.join("one/metrics.jsonl"));
    let train = kind(&recs, "train");
    assert_eq!(train.len(), 2);
    for r in &train {
        let per = r["reward_per_grader"].as_object().unwrap();
        assert_eq!(per.keys().collect::<Vec<_>>(), ["exact"]);
        assert_eq!(per["exact"].as_f64(), r["reward_mean"].as_f64());
    }
    assert_eq!(kind(&recs, "eval")[0]["num_prompts"], 4);

    let multi = format!(
        "{base}[grader]\ntype = \"multi\"\n\
         [grader.graders.exact]\ntype = \"string_check\"\noperation = \"eq\"\nreference = \"{{{{ item.answer }}}}\"\n\
         [grader.graders.close]\ntype = \"numeric\"\nreference = \"{{{{ item.answer }}}}\"\nabs_tol = 5\n"
    );
    let cfg = write(dir, "multi.toml", &multi);
    ok_in(
        dir,
        &["train", cfg.to_str().unwrap(), "--output-dir", "multi", "--quiet"],
    );
    for r in kind(&lines(&dir.join("multi/metrics.jsonl")), "train") {
        let per = r["reward_per_grader"].as_object().unwrap();
        let mut keys: Vec<_> = per.keys().cloned().collect();
        keys.sort();
        assert_eq!(keys, ["close", "exact", "multi"], "{r}");
        let (e, c, m) = (
            per["exact"].as_f64().unwrap(),
            per["close"].as_f64().unwrap(),
            per["multi"].as_f64().unwrap(),
        );
        assert!(e <= c + 1e-12, "exact match implies close: {r}");
        assert!((m - (e + c) / 2.0).abs() < 1e-6, "equal weights: {r}");
        assert!((m - f(r, "reward_mean")).abs() < 1e-12);
    }
}

#[test]
fn data_and_eval_commands() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // The embedded default config parses and yields its validation prompts.
    let o = ok_in(dir, &["data", "--split", "val", "--num", "3"]);
    let rows: Vec<Value> = String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 3);
    for r in &rows {
        let p = r["prompt"].as_str().unwrap();
        assert!(p.ends_with('=') && p.contains('+'), "{r}");
        assert!(r.get("answer").is_some(), "{r}");
    }
    // Deterministic, and train/val are disjoint prompts.
    let cfg = write(dir, "c.toml", &config("max_steps = 1"));
    let c = cfg.to_str().unwrap();
    let a = ok_in(dir, &["data", c, "--num", "5"]).stdout;
    assert_eq!(a, ok_in(dir, &["data", c, "--num", "5"]).stdout);
    assert_eq!(String::from_utf8_lossy(&a).lines().count(), 5);
    let all_train = String::from_utf8(ok_in(dir, &["data", c]).stdout).unwrap();
    assert_eq!(all_train.lines().count(), 400);
    let val = String::from_utf8(ok_in(dir, &["data", c, "--split", "val"]).stdout).unwrap();
    assert_eq!(val.lines().count(), 40);
    let prompts = |text: &str| -> std::collections::HashSet<String> {
        text.lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                v["prompt"].as_str().unwrap().to_string()
            })
            .collect()
    };
    let (tp, vp) = (prompts(&all_train), prompts(&val));
    assert_eq!(vp.len(), 40, "validation prompts are distinct");
    assert!(
        tp.is_disjoint(&vp),
        "{:?}",
        tp.intersection(&vp).collect::<Vec<_>>()
    );
    // `--num` is a prefix of the same list.
    assert!(all_train.starts_with(String::from_utf8_lossy(&a).as_ref()));
    let o = ok_in(dir, &["data", c, "--split", "sft", "--num", "4"]);
    for l in String::from_utf8(o.stdout).unwrap().lines() {
        let v: Value = serde_json::from_str(l).unwrap();
        assert!(v["completion"].is_string() && v["prompt"].is_string(), "{v}");
    }
    let o = run_in(dir, &["data", c, "--split", "sft"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--num"), "{}", stderr(&o));

    // rft eval: the base model's greedy accuracy as one JSON line.
    let o = ok_in(dir, &["eval", c]);
    let e: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!((0.0..=1.0).contains(&f(&e, "accuracy")));
    assert_eq!(e["num_prompts"], 40);
    let o = run_in(dir, &["eval", c, "--adapter", "no_such_adapter"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("no_such_adapter"), "{}", stderr(&o));
}

#[test]
fn device_cuda_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cfg = write(dir, "c.toml", &config("max_steps = 1"));
    let o = run_in(
        dir,
        &[
            "train",
            cfg.to_str().unwrap(),
            "--device",
            "cuda",
            "--output-dir",
            "o",
        ],
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("cuda") && err.contains("cpu"), "{err}");
    assert!(!err.contains("panicked"));
    assert!(!dir.join("o/metrics.jsonl").exists());
}

/// A trainer built from a TOML text the way `rft train` builds it (relative paths from `dir`).
fn trainer_from(dir: &Path, text: &str) -> Trainer {
    let cfg = TrainConfig::from_toml_str(text, &dir.join("t.toml")).unwrap();
    Trainer::from_config(cfg, text, dir).unwrap()
}

/// Options the other tests leave at their defaults: `max_prompt_length` keeps the END of an
/// over-long prompt (TRL's left truncation), `eval_num_prompts` validates on the first N
/// prompts, and `accuracy_threshold` decides which rewards count as correct.
#[test]
fn prompt_truncation_eval_subset_and_accuracy_threshold() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // 12 two-digit sums "a+b=" (6 tokens: the tiny tokenizer is one token per character, no
    // BOS), and the same with a "99+" prefix that cutting to 6 tokens from the left removes.
    let rows = |prefix: &str| -> String {
        (0..12u32)
            .map(|i| {
                let (a, b) = (10 + 7 * i, 23 + 5 * i);
                format!(
                    "{}\n",
                    serde_json::json!({"prompt": format!("{prefix}{a}+{b}="), "answer": (a + b).to_string()})
                )
            })
            .collect()
    };
    write(dir, "short.jsonl", &rows(""));
    write(dir, "long.jsonl", &rows("99+"));
    let exact = "[grader]\ntype = \"string_check\"\noperation = \"eq\"\nreference = \"{{ item.answer }}\"\n";
    let cfg = |top: &str, data: &str, grader: &str| {
        format!(
            "max_completion_length = 4\n{top}\n[model]\npath = \"{}\"\n[data]\npath = \"{data}\"\nval_path = \"{data}\"\n{grader}",
            tiny().display()
        )
    };
    let eval = |text: &str| -> (rft::trainer::metrics::EvalRecord, usize) {
        let mut t = trainer_from(dir, text);
        let n = t.truncated_prompts();
        (t.validation().unwrap().unwrap(), n)
    };

    // Truncated long prompts are the short ones: the same greedy validation, record for record.
    let (short, n0) = eval(&cfg("", "short.jsonl", exact));
    let (cut, n1) = eval(&cfg("max_prompt_length = 6", "long.jsonl", exact));
    let (long, n2) = eval(&cfg("", "long.jsonl", exact));
    assert_eq!(
        (n0, n1, n2),
        (0, 24, 0),
        "truncated prompt counts (12 train + 12 val)"
    );
    let key = |r: &rft::trainer::metrics::EvalRecord| {
        (r.num_prompts, r.accuracy, r.reward_mean, r.completion_len_mean)
    };
    assert_eq!(key(&cut), key(&short), "left truncation must leave \"a+b=\"");
    // The prefix does change the answers, so the equality above is not vacuous.
    assert_ne!(key(&long), key(&short));

    // eval_num_prompts: the first 5 validation prompts only.
    let (five, _) = eval(&cfg("eval_num_prompts = 5", "short.jsonl", exact));
    assert_eq!(five.num_prompts, 5);
    assert!(
        ((five.accuracy * 5.0).round() - five.accuracy * 5.0).abs() < 1e-12,
        "{five:?}"
    );

    // accuracy_threshold: a multi grader scoring (exact + always)/2 ∈ {0.5, 1}. With the default
    // threshold 1 only exact answers count, so accuracy = P(exact) = 2·reward_mean − 1; with
    // threshold 0.5 every answer counts.
    let half = "[grader]\ntype = \"multi\"\n\
        [grader.graders.exact]\ntype = \"string_check\"\noperation = \"eq\"\nreference = \"{{ item.answer }}\"\n\
        [grader.graders.always]\ntype = \"string_check\"\noperation = \"ne\"\nreference = \"zzz\"\n";
    let (strict, _) = eval(&cfg("", "short.jsonl", half));
    assert!(
        (strict.accuracy - (2.0 * strict.reward_mean - 1.0)).abs() < 1e-12,
        "{strict:?}"
    );
    assert_eq!(strict.accuracy, short.accuracy, "the same exact answers as above");
    let (lenient, _) = eval(&cfg("accuracy_threshold = 0.5", "short.jsonl", half));
    assert_eq!(lenient.accuracy, 1.0, "{lenient:?}");
    assert_eq!(lenient.reward_mean, strict.reward_mean);
    // The run must contain wrong answers for the threshold to matter.
    assert!(strict.accuracy < 1.0, "{strict:?}");
}

/// `[model] adapter`: training starts from a PEFT adapter (its rank, not `[lora]`'s), the
/// validation is that of `rft eval --adapter` on it, and the first step moves it.
#[test]
fn model_adapter_is_the_starting_point() {
    use rft::lora::{peft, LoraConfig, LoraWeights};
    use rft::model::config::ModelConfig;
    use rft::model::weights::Proj;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mc = ModelConfig::from_dir(&tiny()).unwrap();
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        use_rslora: false,
        target_modules: vec![Proj::Q, Proj::V, Proj::Down],
    };
    // B ≠ 0, so the adapter changes the model from the start.
    let start = LoraWeights::new_random(cfg, &mc, 9, 0.1, 0.1);
    peft::save(&dir.join("ad"), &start, &tiny().display().to_string()).unwrap();
    let text = config("max_steps = 1\neval_steps = 0").replace("[model]", "[model]\nadapter = \"ad\"");
    assert!(text.contains("r = 8"), "[lora] asks for another rank");

    let mut t = trainer_from(dir, &text);
    let loaded = peft::load(&dir.join("ad"), &mc).unwrap();
    assert_eq!(t.engine().adapter.as_ref(), Some(&loaded));
    let v = t.validation().unwrap().unwrap();
    // `rft eval --adapter` of the config without `[model] adapter`: the same validation.
    let plain = write(dir, "plain.toml", &config("max_steps = 1\neval_steps = 0"));
    let o = ok_in(dir, &["eval", plain.to_str().unwrap(), "--adapter", "ad"]);
    let e: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(f(&e, "accuracy"), v.accuracy);
    assert_eq!(f(&e, "reward_mean"), v.reward_mean);
    assert_eq!(f(&e, "completion_len_mean"), v.completion_len_mean);
    // Without the adapter the validation differs (else the checks above prove nothing).
    let base = ok_in(dir, &["eval", plain.to_str().unwrap()]);
    let b: Value = serde_json::from_slice(&base.stdout).unwrap();
    assert_ne!(
        (f(&b, "accuracy"), f(&b, "completion_len_mean")),
        (v.accuracy, v.completion_len_mean)
    );

    t.step().unwrap();
    let after = t.engine().adapter.clone().unwrap();
    assert_eq!(after.config.r, 4);
    assert_eq!(after.config.target_modules, loaded.config.target_modules);
    assert_ne!(after, loaded, "the step trained the loaded adapter");
}

/// A grader whose reward is constant on prompts with an even sum (0.5: a zero-variance group)
/// and, on odd sums, one of 0, 0.1, … 0.4 from the completion's bytes; it logs every (prompt, reward) in
/// the order graded (with grader_threads = 1: the rollout order, prompt-major).
struct Parity {
    log: std::sync::Mutex<Vec<(String, f32)>>,
}

impl Parity {
    fn take(&self) -> Vec<(String, f32)> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

impl Grader for Parity {
    fn name(&self) -> &str {
        "parity"
    }
    fn grade(&self, s: &Sample) -> GradeResult {
        let sum: i64 = s
            .prompt
            .trim_end_matches('=')
            .split('+')
            .map(|x| x.parse::<i64>().unwrap())
            .sum();
        let score = if sum % 2 == 0 {
            0.5
        } else {
            // Different completions mostly score differently, whatever the model has learned.
            (s.completion.bytes().map(u32::from).sum::<u32>() % 5) as f32 / 10.0
        };
        self.log.lock().unwrap().push((s.prompt.clone(), score));
        GradeResult::ok(score)
    }
}

/// `dynamic_sampling` (DAPO): a step's update uses the first `prompts_per_step` groups whose
/// rewards are not all equal, drawing `prompts_per_step` more prompts per round while it has
/// fewer, for at most 1 + `max_resample_rounds` rounds (none found: the step is skipped). The
/// expectation is rebuilt from what the grader saw: its log splits into rounds and groups, the
/// kept groups give the logged reward mean/std, and the drawn ones `zero_std_frac`.
#[test]
fn dynamic_sampling_keeps_informative_groups_and_draws_more() {
    let tmp = tempfile::tempdir().unwrap();
    let (want, g) = (4usize, 4usize);
    let text = config(&format!(
        "max_steps = 6\neval_steps = 0\ngrader_threads = 1\nprompts_per_step = {want}\n\
         num_generations = {g}\ndynamic_sampling = true\nmax_resample_rounds = 3"
    ))
    .replacen("prompts_per_step = 8\nnum_generations = 8\n", "", 1);
    let cfg = TrainConfig::from_toml_str(&text, Path::new("ds.toml")).unwrap();
    assert_eq!((cfg.prompts_per_step, cfg.num_generations), (want, g));
    let grader = Arc::new(Parity {
        log: Default::default(),
    });
    let mut t = library_trainer(&cfg, grader.clone(), tmp.path());
    let mean_std = |x: &[f32]| {
        let n = x.len() as f64;
        let m = x.iter().map(|&v| v as f64).sum::<f64>() / n;
        (
            m,
            (x.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / n).sqrt(),
        )
    };
    let mut resampled = 0;
    for step in 1..=6 {
        let rec = t.step().unwrap();
        let seen = grader.take();
        assert_eq!(seen.len() % (want * g), 0, "whole rounds of {want} prompts × {g}");
        let rounds = seen.len() / (want * g);
        let groups: Vec<&[(String, f32)]> = seen.chunks(g).collect();
        for grp in &groups {
            assert!(
                grp.iter().all(|(p, _)| *p == grp[0].0),
                "a group is one prompt: {grp:?}"
            );
        }
        let informative: Vec<bool> = groups
            .iter()
            .map(|grp| grp.iter().any(|(_, s)| *s != grp[0].1))
            .collect();
        let kept: Vec<f32> = groups
            .iter()
            .zip(&informative)
            .filter(|(_, &i)| i)
            .take(want)
            .flat_map(|(grp, _)| grp.iter().map(|(_, s)| *s))
            .collect();
        // Drawing stops after the first round that completes the batch (or the last allowed).
        let enough_after = |r: usize| informative[..r * want].iter().filter(|&&i| i).count() >= want;
        let want_rounds = (1..=4).find(|&r| r <= rounds && enough_after(r)).unwrap_or(4);
        assert_eq!(rounds, want_rounds, "step {step}: rounds drawn");
        if rounds > 1 {
            resampled += 1;
        }
        let zero = informative.iter().filter(|&&i| !i).count();
        assert_eq!(
            rec.zero_std_frac,
            zero as f64 / groups.len() as f64,
            "step {step}"
        );
        if kept.is_empty() {
            assert!(rec.skipped, "step {step}: no informative group, yet an update");
            continue;
        }
        if rounds < 4 {
            assert_eq!(
                kept.len(),
                want * g,
                "step {step}: a full batch of informative groups"
            );
        }
        let (m, s) = mean_std(&kept);
        assert!(
            (rec.reward_mean - m).abs() < 1e-12,
            "step {step}: {} vs {m}",
            rec.reward_mean
        );
        assert!(
            (rec.reward_std - s).abs() < 1e-12,
            "step {step}: {} vs {s}",
            rec.reward_std
        );
        // Even sums (constant 0.5) never reach the update.
        assert!(
            !kept.contains(&0.5),
            "step {step}: a zero-variance group was kept"
        );
        assert!(!rec.skipped);
    }
    assert!(
        resampled > 0,
        "no step needed a second round: the test proves nothing"
    );

    // Off: one round, every group kept (the constant ones too).
    let mut off = cfg.clone();
    off.dynamic_sampling = false;
    let mut t = library_trainer(&off, grader.clone(), &tmp.path().join("off"));
    let rec = t.step().unwrap();
    let seen = grader.take();
    assert_eq!(seen.len(), want * g);
    let scores: Vec<f32> = seen.iter().map(|(_, s)| *s).collect();
    assert!((rec.reward_mean - mean_std(&scores).0).abs() < 1e-12);

    // Nothing informative: 1 + max_resample_rounds rounds, then the step is skipped unchanged.
    struct Constant(AtomicUsize);
    impl Grader for Constant {
        fn name(&self) -> &str {
            "constant"
        }
        fn grade(&self, _: &Sample) -> GradeResult {
            self.0.fetch_add(1, Ordering::SeqCst);
            GradeResult::ok(1.0)
        }
    }
    let constant = Arc::new(Constant(AtomicUsize::new(0)));
    let mut t = library_trainer(&cfg, constant.clone(), &tmp.path().join("const"));
    let before = t.engine().adapter.clone();
    let rec = t.step().unwrap();
    assert_eq!(constant.0.load(Ordering::SeqCst), (1 + 3) * want * g);
    assert!(rec.skipped && rec.zero_std_frac == 1.0, "{rec:?}");
    assert_eq!(
        t.engine().adapter,
        before,
        "a skipped step left the adapter alone"
    );
    assert_eq!(t.step_count(), 1, "the skipped step still counts");
}

/// Options that only change how the work is spread: `grader_threads` (graders on 1 or 3
/// threads) and `rollout_batch_size` (sequences decoded together: 3 < G, one prompt per call,
/// the whole step in one call) give the same run, record for record, for the same seed: every
/// sample draws from its own (seed, step, sample) stream. A different seed does not (so the
/// equality is not vacuous).
#[test]
fn grader_threads_and_rollout_batch_size_leave_the_run_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |name: &str, top: &str| -> Vec<Value> {
        let out = tmp.path().join(name);
        let text = config(&format!(
            "max_steps = 3\neval_steps = 2\noutput_dir = \"{}\"\n{top}",
            out.display()
        ))
        .replacen(
            "seed = 0\n",
            if name == "seed1" {
                "seed = 1\n"
            } else {
                "seed = 0\n"
            },
            1,
        );
        let mut t = trainer_from(tmp.path(), &text);
        t.run(&AtomicBool::new(false), false).unwrap();
        untimed(&lines(&out.join("metrics.jsonl")))
    };
    let base = run("base", "grader_threads = 1\nrollout_batch_size = 64");
    assert_eq!(kind(&base, "train").len(), 3);
    for (name, top) in [
        ("threads3", "grader_threads = 3\nrollout_batch_size = 64"),
        ("rbs8", "grader_threads = 1\nrollout_batch_size = 8"),
        ("rbs3", "grader_threads = 1\nrollout_batch_size = 3"),
        ("rbs16_threads3", "grader_threads = 3\nrollout_batch_size = 16"),
    ] {
        assert_eq!(run(name, top), base, "{top}");
    }
    let other = run("seed1", "grader_threads = 1");
    assert_ne!(kind(&other, "train"), kind(&base, "train"));
}
