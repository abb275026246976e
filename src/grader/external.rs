//! `external`: a user grader in any language, spoken to over JSON lines. rft writes one line
//! `{"prompt": …, "completion": …, "item": …}` to its stdin and reads one line
//! `{"score": f, "details": {…}, "error": "…"?}` from its stdout (details and error optional;
//! the score is used as given, it must be finite). The process is started on first use and
//! reused; `pool_size` processes serve concurrent calls. A call that times out (`timeout_s`),
//! a crash, or a malformed reply gives score 0 with the reason, and that process is killed
//! (with its process group) and restarted on the next call. Its stderr is inherited (for the
//! user's debugging) and it runs with rft's environment: it is trusted code, not sandboxed.
//!
//! `python` (OpenAI's python grader): `source` defines `grade(sample, item)` returning a float
//! (or a dict with `score`); `sample` has `output_text` and `prompt`. It runs through the same
//! protocol with a small wrapper; its prints go to stderr.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use super::{bad, GradeResult, Grader, Sample};
use crate::Result;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalConfig {
    #[serde(default)]
    pub name: Option<String>,
    /// Program and arguments, e.g. `["python3", "grader.py"]`.
    pub command: Vec<String>,
    #[serde(default)]
    pub cwd: Option<PathBuf>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    #[serde(default = "default_timeout")]
    pub timeout_s: f64,
    #[serde(default = "one")]
    pub pool_size: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PythonConfig {
    #[serde(default)]
    pub name: Option<String>,
    pub source: String,
    #[serde(default = "default_timeout")]
    pub timeout_s: f64,
    #[serde(default = "one")]
    pub pool_size: usize,
    #[serde(default = "default_python")]
    pub python: String,
}

fn default_timeout() -> f64 {
    30.0
}
fn one() -> usize {
    1
}
fn default_python() -> String {
    "python3".into()
}

struct Worker {
    child: Child,
    /// Requests go through a writer thread, so a grader that stops reading its stdin cannot
    /// block the caller past the timeout.
    requests: Option<Sender<Vec<u8>>>,
    lines: Receiver<std::io::Result<String>>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.requests = None;
        // SAFETY: the worker was started as its own process group leader.
        unsafe { libc::killpg(self.child.id() as libc::pid_t, libc::SIGKILL) };
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct External {
    name: String,
    cfg: ExternalConfig,
    timeout: Duration,
    slots: Vec<Mutex<Option<Worker>>>,
    next: std::sync::atomic::AtomicUsize,
    _keep: Option<Arc<tempfile::TempDir>>,
}

const PY_WRAPPER: &str = r#"import json, sys
out = sys.stdout
sys.stdout = sys.stderr
ns = {"__name__": "rft_grader"}
exec(compile(open(sys.argv[1]).read(), sys.argv[1], "exec"), ns)
grade = ns["grade"]
for line in sys.stdin:
    try:
        req = json.loads(line)
        r = grade({"output_text": req["completion"], "prompt": req["prompt"]}, req["item"])
        reply = dict(r) if isinstance(r, dict) else {"score": float(r)}
    except Exception as e:
        reply = {"score": 0.0, "error": "%s: %s" % (type(e).__name__, e)}
    out.write(json.dumps(reply) + "\n")
    out.flush()
"#;

impl External {
    pub fn new(cfg: &ExternalConfig) -> Result<Self> {
        Self::with_keep(cfg, None)
    }

    fn with_keep(cfg: &ExternalConfig, keep: Option<Arc<tempfile::TempDir>>) -> Result<Self> {
        if cfg.command.is_empty() {
            return Err(bad("command", "empty command"));
        }
        if !(cfg.timeout_s > 0.0 && cfg.timeout_s.is_finite()) {
            return Err(bad("timeout_s", format!("{} must be > 0", cfg.timeout_s)));
        }
        if cfg.pool_size == 0 || cfg.pool_size > 256 {
            return Err(bad("pool_size", format!("{} is not in 1..=256", cfg.pool_size)));
        }
        Ok(External {
            name: cfg.name.clone().unwrap_or_else(|| "external".into()),
            timeout: Duration::from_secs_f64(cfg.timeout_s),
            slots: (0..cfg.pool_size).map(|_| Mutex::new(None)).collect(),
            next: Default::default(),
            cfg: cfg.clone(),
            _keep: keep,
        })
    }

    /// OpenAI-style `python` grader: `source` defines `grade(sample, item)`.
    pub fn python(cfg: &PythonConfig) -> Result<Self> {
        if !cfg.source.contains("def grade") {
            return Err(bad("source", "must define `grade(sample, item)`"));
        }
        let dir = tempfile::Builder::new()
            .prefix("rft-pygrader-")
            .tempdir()
            .map_err(|e| bad("source", format!("temp dir: {e}")))?;
        let wrapper = dir.path().join("rft_wrapper.py");
        let source = dir.path().join("grader.py");
        std::fs::write(&wrapper, PY_WRAPPER)
            .and_then(|_| std::fs::write(&source, &cfg.source))
            .map_err(|e| bad("source", e))?;
        let ext = ExternalConfig {
            name: Some(cfg.name.clone().unwrap_or_else(|| "python".into())),
            command: vec![
                cfg.python.clone(),
                wrapper.to_string_lossy().into_owned(),
                source.to_string_lossy().into_owned(),
            ],
            cwd: None,
            env: Default::default(),
            timeout_s: cfg.timeout_s,
            pool_size: cfg.pool_size,
        };
        Self::with_keep(&ext, Some(Arc::new(dir)))
    }

    fn spawn(&self) -> std::result::Result<Worker, String> {
        let mut cmd = Command::new(&self.cfg.command[0]);
        cmd.args(&self.cfg.command[1..])
            .envs(&self.cfg.env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0);
        if let Some(d) = &self.cfg.cwd {
            cmd.current_dir(d);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("starting {:?}: {e}", self.cfg.command[0]))?;
        let mut stdin: ChildStdin = child.stdin.take().ok_or("no stdin")?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name(format!("grader-{}", self.name))
            .spawn(move || {
                let mut r = BufReader::new(stdout);
                loop {
                    let mut line = String::new();
                    match r.read_line(&mut line) {
                        Ok(0) => break,
                        Ok(_) => {
                            if tx.send(Ok(line)).is_err() {
                                break;
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            break;
                        }
                    }
                }
            })
            .map_err(|e| format!("reader thread: {e}"))?;
        let (req_tx, req_rx) = mpsc::channel::<Vec<u8>>();
        std::thread::Builder::new()
            .name(format!("grader-{}-in", self.name))
            .spawn(move || {
                for buf in req_rx {
                    if stdin.write_all(&buf).and_then(|_| stdin.flush()).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| format!("writer thread: {e}"))?;
        Ok(Worker {
            child,
            requests: Some(req_tx),
            lines: rx,
        })
    }

    fn call(&self, w: &mut Worker, s: &Sample) -> std::result::Result<GradeResult, String> {
        let req = json!({"prompt": s.prompt, "completion": s.completion, "item": s.item});
        let mut line = req.to_string();
        line.push('\n');
        let sent = w
            .requests
            .as_ref()
            .is_some_and(|tx| tx.send(line.into_bytes()).is_ok());
        if !sent {
            return Err("grader process is gone".into());
        }
        let reply = match w.lines.recv_timeout(self.timeout) {
            Ok(Ok(l)) => l,
            Ok(Err(e)) => return Err(format!("reading the reply: {e}")),
            Err(RecvTimeoutError::Timeout) => {
                return Err(format!("no reply within {:.1}s", self.timeout.as_secs_f32()))
            }
            Err(RecvTimeoutError::Disconnected) => {
                let status = w.child.wait().map(|s| s.to_string()).unwrap_or_default();
                return Err(format!("grader process exited ({status})"));
            }
        };
        let v: Value = serde_json::from_str(reply.trim()).map_err(|e| {
            let r: String = reply.trim().chars().take(120).collect();
            format!("malformed reply {r:?}: {e}")
        })?;
        let score = v
            .get("score")
            .and_then(Value::as_f64)
            .ok_or_else(|| format!("reply has no numeric `score`: {v}"))?;
        if !score.is_finite() {
            return Err(format!("score {score} is not finite"));
        }
        let mut r = GradeResult::ok(score as f32);
        if let Some(Value::Object(d)) = v.get("details") {
            r.details = d.clone();
        }
        if let Some(e) = v.get("error").and_then(Value::as_str) {
            r.error = Some(e.to_string());
        }
        Ok(r)
    }
}

impl Grader for External {
    fn name(&self) -> &str {
        &self.name
    }
    fn grade(&self, s: &Sample) -> GradeResult {
        // Take a free worker if there is one, else wait on the round-robin choice.
        let n = self.slots.len();
        let start = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut guard = None;
        for k in 0..n {
            if let Ok(g) = self.slots[(start + k) % n].try_lock() {
                guard = Some(g);
                break;
            }
        }
        let mut guard = match guard {
            Some(g) => g,
            None => self.slots[start % n].lock().unwrap_or_else(|e| e.into_inner()),
        };
        if guard.is_none() {
            match self.spawn() {
                Ok(w) => *guard = Some(w),
                Err(e) => return GradeResult::fail(e),
            }
        }
        let w = guard.as_mut().expect("worker started above");
        match self.call(w, s) {
            Ok(r) => r,
            Err(e) => {
                *guard = None; // killed now (Drop), restarted on the next call
                GradeResult::fail(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{build, grade_batch, GraderConfig};
    use super::*;
    use std::time::Instant;

    fn script(dir: &std::path::Path, name: &str, body: &str) -> String {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        p.to_string_lossy().into_owned()
    }
    fn ext(cmd: Vec<String>, timeout: f64) -> Box<dyn Grader> {
        let cfg = ExternalConfig {
            name: None,
            command: cmd,
            cwd: None,
            env: Default::default(),
            timeout_s: timeout,
            pool_size: 2,
        };
        build(&GraderConfig::External(cfg)).unwrap()
    }
    fn sample(c: &str) -> Sample {
        Sample::new("p", c, json!({"answer": "yes"}))
    }

    const GOOD: &str = "import json, sys\nfor l in sys.stdin:\n    r = json.loads(l)\n    ok = r['completion'] == r['item']['answer']\n    print(json.dumps({'score': 1.0 if ok else 0.0, 'details': {'len': len(r['completion'])}}), flush=True)\n";

    #[test]
    fn good_grader_is_reused() {
        let d = tempfile::tempdir().unwrap();
        let g = ext(vec!["python3".into(), script(d.path(), "g.py", GOOD)], 10.0);
        let samples: Vec<Sample> = (0..20)
            .map(|i| sample(if i % 2 == 0 { "yes" } else { "no" }))
            .collect();
        let r = grade_batch(g.as_ref(), &samples, 4);
        for (i, r) in r.iter().enumerate() {
            assert_eq!(r.score, if i % 2 == 0 { 1.0 } else { 0.0 }, "{r:?}");
            assert!(r.error.is_none());
        }
        assert_eq!(r[1].details["len"], 2);
    }

    #[test]
    fn crash_garbage_and_hang_give_zero_then_recover() {
        let d = tempfile::tempdir().unwrap();
        // Crashes on "crash", prints garbage on "garbage", hangs on "hang", else answers.
        let body = "#!/bin/sh\nwhile read -r line; do\n  case \"$line\" in\n    *crash*) exit 3;;\n    *garbage*) echo 'not json at all';;\n    *hang*) sleep 30;;\n    *) echo '{\"score\": 0.75}';;\n  esac\ndone\n";
        let sh = script(d.path(), "g.sh", body);
        let g = ext(vec!["sh".into(), sh], 1.0);
        assert_eq!(g.grade(&sample("fine")).score, 0.75);
        let r = g.grade(&sample("crash"));
        assert_eq!(r.score, 0.0);
        assert!(r.error.unwrap().contains("exit"));
        assert_eq!(g.grade(&sample("fine")).score, 0.75);
        let r = g.grade(&sample("garbage"));
        assert!(r.error.unwrap().contains("malformed"));
        let t = Instant::now();
        let r = g.grade(&sample("hang"));
        assert!(r.error.unwrap().contains("no reply"));
        assert!(t.elapsed() < Duration::from_millis(1800));
        assert_eq!(g.grade(&sample("fine")).score, 0.75);
        // A grader that never reads its stdin, fed a request bigger than the pipe buffer:
        // the call still returns at the timeout.
        let deaf = ext(vec!["sh".into(), "-c".into(), "sleep 30".into()], 0.5);
        let t = Instant::now();
        let r = deaf.grade(&sample(&"x".repeat(1 << 20)));
        assert!(r.error.unwrap().contains("no reply"));
        assert!(t.elapsed() < Duration::from_millis(1500));
        // A command that does not exist: 0 with the error, no panic.
        let r = ext(vec!["/nonexistent/grader".into()], 1.0).grade(&sample("x"));
        assert!(r.error.unwrap().contains("starting"));
    }

    #[test]
    fn python_grader() {
        let g = super::super::build_from_toml(
            "type = \"python\"\nsource = '''\ndef grade(sample, item):\n    print('debug output goes to stderr')\n    return 1.0 if sample['output_text'] == item['answer'] else 0.25\n'''",
        )
        .unwrap();
        assert_eq!(g.grade(&sample("yes")).score, 1.0);
        assert_eq!(g.grade(&sample("no")).score, 0.25);
        let bad = super::super::build_from_toml(
            "type = \"python\"\nsource = '''\ndef grade(s, i):\n    return 1/0'''",
        )
        .unwrap();
        let r = bad.grade(&sample("x"));
        assert_eq!(r.score, 0.0);
        assert!(r.error.unwrap().contains("ZeroDivision"));
    }
}
