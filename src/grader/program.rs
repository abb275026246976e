//! `program`: runs model-written code against test cases in the [`sandbox`].
//!
//! The code is the last ```` ``` ```` fenced block of the completion, else the last
//! `<answer>…</answer>`, else the whole completion (`extract = "auto"`; or `fence` / `whole`).
//! It is written to `file_name` in a fresh temp dir per run and executed with `command`
//! (`{file}` is replaced by the file name; default `["python3", "-I", "{file}"]`).
//!
//! Tests (`tests`, templated, e.g. `"{{ item.tests }}"`): a JSON array whose entries are
//! `{"stdin": "...", "stdout": "..."}` (aliases `input` / `output` / `expected_output`) — run
//! the program with that stdin and compare its stdout (`compare`: `trimmed` (default: trailing
//! whitespace of lines and trailing blank lines ignored), `exact`, `tokens`) — or a string /
//! `{"assert": "..."}` snippet appended to the code, which passes on exit code 0 (for Python
//! commands a random sentinel line printed after the snippet must also appear, so `os._exit(0)`
//! or `sys.exit(0)` in the code does not pass). `{"inputs": [...], "outputs": [...]}` (APPS
//! style) and a single string are accepted too. Score = fraction of tests passed.
//!
//! Anti-reward-hacking (`stub_check`, default on): when the code passes anything, the tests
//! are also run against an empty program and, for Python with assert tests, against the code
//! with every function body replaced by `pass`. If a stub passes every test, the score is 0
//! and `error` says which stub: either the tests are vacuous or the code games them at top
//! level rather than in the functions under test. Known false positive: a correct solution
//! whose function is defined at top level without `def` (`add = lambda a, b: a + b`,
//! `add = operator.add`) survives the stub and scores 0; set `stub_check = false` if the
//! task invites that style. For stdin/stdout tests only the empty program is tried.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use super::numeric::{last_tag, tag_regex};
use super::sandbox::{self, Limits, Sandbox};
use super::template;
use super::{bad, GradeResult, Grader, Sample};
use crate::Result;

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Default)]
#[serde(rename_all = "snake_case")]
pub enum CodeExtract {
    #[default]
    Auto,
    Fence,
    Whole,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Compare {
    #[default]
    Trimmed,
    Exact,
    Tokens,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProgramConfig {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default = "super::string_check::default_input")]
    pub input: String,
    pub tests: toml::Value,
    #[serde(default = "default_command")]
    pub command: Vec<String>,
    #[serde(default = "default_file")]
    pub file_name: String,
    #[serde(default)]
    pub extract: CodeExtract,
    #[serde(default)]
    pub compare: Compare,
    /// Wall-clock seconds per run (default 2).
    #[serde(default = "default_timeout")]
    pub timeout_s: f64,
    /// CPU seconds per run (default: the wall limit, rounded up).
    #[serde(default)]
    pub cpu_s: Option<u64>,
    #[serde(default = "default_mem")]
    pub memory_mb: u64,
    #[serde(default = "default_output")]
    pub max_output_bytes: usize,
    #[serde(default = "default_procs")]
    pub max_procs: u64,
    #[serde(default = "default_fsize")]
    pub max_file_mb: u64,
    #[serde(default = "yes")]
    pub stub_check: bool,
    #[serde(default = "yes")]
    pub isolate_network: bool,
}

fn default_command() -> Vec<String> {
    vec!["python3".into(), "-I".into(), "{file}".into()]
}
fn default_file() -> String {
    "main.py".into()
}
fn default_timeout() -> f64 {
    2.0
}
fn default_mem() -> u64 {
    512
}
fn default_output() -> usize {
    64 * 1024
}
fn default_procs() -> u64 {
    32
}
fn default_fsize() -> u64 {
    16
}
fn yes() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq)]
enum Test {
    Io { stdin: String, stdout: String },
    Assert(String),
}

pub struct Program {
    name: String,
    cfg: ProgramConfig,
    tests: Value,
    argv: Vec<String>,
    python: bool,
    sandbox: Sandbox,
    tag: regex::Regex,
}

impl Program {
    pub fn new(cfg: &ProgramConfig) -> Result<Self> {
        template::check("input", &cfg.input)?;
        let tests = serde_json::to_value(&cfg.tests).map_err(|e| bad("tests", e))?;
        template::check_value("tests", &tests)?;
        if cfg.command.is_empty() {
            return Err(bad("command", "empty command"));
        }
        if !cfg.command.iter().any(|a| a.contains("{file}")) {
            return Err(bad("command", "no `{file}` placeholder for the code file"));
        }
        if cfg.file_name.is_empty() || cfg.file_name.contains('/') || cfg.file_name.starts_with('.') {
            return Err(bad(
                "file_name",
                format!("{:?} must be a plain file name", cfg.file_name),
            ));
        }
        if !(cfg.timeout_s > 0.0 && cfg.timeout_s <= 3600.0) {
            return Err(bad("timeout_s", format!("{} is not in (0, 3600]", cfg.timeout_s)));
        }
        let limits = Limits {
            wall: Duration::from_secs_f64(cfg.timeout_s),
            cpu_s: cfg.cpu_s.unwrap_or(cfg.timeout_s.ceil() as u64),
            memory_bytes: cfg.memory_mb << 20,
            max_output: cfg.max_output_bytes,
            max_procs: cfg.max_procs.max(1),
            max_file_bytes: cfg.max_file_mb << 20,
        };
        let mut sandbox = Sandbox::new(limits);
        sandbox.isolate_net = cfg.isolate_network;
        // Resolve the interpreter once; as root it must be usable by the per-run uid.
        let prog = &cfg.command[0];
        let path = match sandbox::resolve_program(prog, sandbox.drop_uid) {
            Some(p) => p,
            None => match sandbox::resolve_program(prog, false) {
                Some(p) => {
                    sandbox.drop_uid = false; // only reachable by root: run as root, less isolated
                    p
                }
                None => return Err(bad("command", format!("{prog:?} not found on PATH"))),
            },
        };
        let mut argv = cfg.command.clone();
        argv[0] = path.to_string_lossy().into_owned();
        let python = PathBuf::from(prog)
            .file_name()
            .is_some_and(|f| f.to_string_lossy().starts_with("python"));
        Ok(Program {
            name: cfg.name.clone().unwrap_or_else(|| "program".into()),
            cfg: cfg.clone(),
            tests,
            argv,
            python,
            sandbox,
            tag: tag_regex("answer"),
        })
    }

    /// The sandbox used (for reporting).
    pub fn sandbox(&self) -> &Sandbox {
        &self.sandbox
    }
}

fn parse_tests(v: &Value) -> std::result::Result<Vec<Test>, String> {
    let s = |x: &Value| match x {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    };
    match v {
        Value::String(snippet) => Ok(vec![Test::Assert(snippet.clone())]),
        Value::Object(o) if o.contains_key("inputs") => {
            let (Some(Value::Array(i)), Some(Value::Array(out))) = (o.get("inputs"), o.get("outputs")) else {
                return Err("`inputs` and `outputs` must both be arrays".into());
            };
            if i.len() != out.len() {
                return Err(format!("{} inputs but {} outputs", i.len(), out.len()));
            }
            Ok(i.iter()
                .zip(out)
                .map(|(a, b)| Test::Io {
                    stdin: s(a),
                    stdout: s(b),
                })
                .collect())
        }
        Value::Array(a) => a
            .iter()
            .enumerate()
            .map(|(k, t)| match t {
                Value::String(snippet) => Ok(Test::Assert(snippet.clone())),
                Value::Object(o) => {
                    if let Some(x) = o.get("assert").or_else(|| o.get("code")) {
                        return Ok(Test::Assert(s(x)));
                    }
                    let stdin = o
                        .get("stdin")
                        .or_else(|| o.get("input"))
                        .map(s)
                        .unwrap_or_default();
                    let stdout = o
                        .get("stdout")
                        .or_else(|| o.get("output"))
                        .or_else(|| o.get("expected_output"))
                        .map(s)
                        .ok_or_else(|| format!("test {k} has no `stdout` / `output` / `assert`"))?;
                    Ok(Test::Io { stdin, stdout })
                }
                other => Err(format!("test {k} is neither a string nor an object: {other}")),
            })
            .collect(),
        other => Err(format!(
            "tests must be an array, an object or a string, not {other}"
        )),
    }
}

fn same_output(got: &str, want: &str, how: Compare) -> bool {
    match how {
        Compare::Exact => got == want,
        Compare::Tokens => got.split_whitespace().eq(want.split_whitespace()),
        Compare::Trimmed => {
            let norm = |s: &str| {
                let lines: Vec<&str> = s.lines().map(str::trim_end).collect();
                let n = lines.iter().rposition(|l| !l.is_empty()).map_or(0, |i| i + 1);
                lines[..n].join("\n")
            };
            norm(got) == norm(want)
        }
    }
}

/// The last fenced code block (any language tag).
pub fn last_code_fence(text: &str) -> Option<&str> {
    let mut found = None;
    let mut rest = text;
    while let Some(open) = rest.find("```") {
        let after = &rest[open + 3..];
        let Some(nl) = after.find('\n') else { break };
        let body = &after[nl + 1..];
        let Some(close) = body.find("```") else { break };
        found = Some(&body[..close]);
        rest = &body[close + 3..];
    }
    found
}

const STUBGEN: &str = r#"import ast, sys
tree = ast.parse(open(sys.argv[1]).read())
class Stub(ast.NodeTransformer):
    def visit_FunctionDef(self, node):
        node.body = [ast.Pass()]
        return node
    visit_AsyncFunctionDef = visit_FunctionDef
sys.stdout.write(ast.unparse(ast.fix_missing_locations(Stub().visit(tree))))
"#;

fn nonce() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

impl Program {
    fn code_of(&self, text: &str) -> String {
        let c = match self.cfg.extract {
            CodeExtract::Whole => text,
            CodeExtract::Fence => last_code_fence(text).unwrap_or(""),
            CodeExtract::Auto => last_code_fence(text)
                .or_else(|| last_tag(&self.tag, text))
                .unwrap_or(text),
        };
        c.to_string()
    }

    /// Runs one program text with optional stdin; returns the sandbox outcome.
    fn run_source(&self, source: &str, stdin: Option<&str>) -> std::result::Result<sandbox::Outcome, String> {
        let dir = tempfile::Builder::new()
            .prefix("rft-prog-")
            .tempdir()
            .map_err(|e| format!("temp dir: {e}"))?;
        let file = dir.path().join(&self.cfg.file_name);
        std::fs::write(&file, source).map_err(|e| format!("writing the code: {e}"))?;
        // stdin lives outside the run's directory so the code cannot rewrite it.
        let stdin_file = match stdin {
            Some(text) => {
                let f = tempfile::NamedTempFile::new().map_err(|e| format!("stdin file: {e}"))?;
                std::fs::write(f.path(), text).map_err(|e| format!("stdin file: {e}"))?;
                Some(f)
            }
            None => None,
        };
        let argv: Vec<String> = self
            .argv
            .iter()
            .map(|a| a.replace("{file}", &self.cfg.file_name))
            .collect();
        self.sandbox
            .run(&argv, dir.path(), stdin_file.as_ref().map(|f| f.path()))
            .map_err(|e| format!("could not start {:?}: {e}", self.argv[0]))
    }

    /// Runs every test against `code`; returns (passed flags, first failure reason).
    fn run_tests(&self, code: &str, tests: &[Test]) -> (Vec<bool>, Option<String>) {
        let mut passed = Vec::with_capacity(tests.len());
        let mut first_fail = None;
        for (k, t) in tests.iter().enumerate() {
            let (ok, why) = match t {
                Test::Io { stdin, stdout } => match self.run_source(code, Some(stdin)) {
                    Ok(o) if o.success() => {
                        let got = String::from_utf8_lossy(&o.stdout);
                        if same_output(&got, stdout, self.cfg.compare) {
                            (true, None)
                        } else {
                            let g: String = got.chars().take(100).collect();
                            (false, Some(format!("wrong output {g:?}")))
                        }
                    }
                    Ok(o) => (false, Some(o.describe())),
                    Err(e) => (false, Some(e)),
                },
                Test::Assert(snippet) => {
                    let sentinel = format!("RFT-TESTS-PASSED-{:016x}", nonce());
                    let src = if self.python {
                        format!("{code}\n\n{snippet}\nprint({sentinel:?})\n")
                    } else {
                        format!("{code}\n\n{snippet}\n")
                    };
                    match self.run_source(&src, None) {
                        Ok(o) if o.success() => {
                            let out = String::from_utf8_lossy(&o.stdout);
                            if !self.python || out.lines().any(|l| l.trim() == sentinel) {
                                (true, None)
                            } else {
                                (false, Some("exited before the tests finished".into()))
                            }
                        }
                        Ok(o) => (false, Some(o.describe())),
                        Err(e) => (false, Some(e)),
                    }
                }
            };
            if let (None, Some(w)) = (&first_fail, why) {
                first_fail = Some(format!("test {k}: {w}"));
            }
            passed.push(ok);
        }
        (passed, first_fail)
    }

    /// The stub versions of `code` to check: (label, source).
    fn stubs(&self, code: &str, tests: &[Test]) -> Vec<(&'static str, String)> {
        let mut v = vec![("an empty program", String::new())];
        if self.python && tests.iter().any(|t| matches!(t, Test::Assert(_))) && code.contains("def ") {
            let dir = tempfile::Builder::new().prefix("rft-stub-").tempdir();
            if let Ok(dir) = dir {
                let src = dir.path().join("code.py");
                let gen = dir.path().join("stubgen.py");
                if std::fs::write(&src, code).is_ok() && std::fs::write(&gen, STUBGEN).is_ok() {
                    let argv = vec![
                        self.argv[0].clone(),
                        "-I".into(),
                        "stubgen.py".into(),
                        "code.py".into(),
                    ];
                    if let Ok(o) = self.sandbox.run(&argv, dir.path(), None) {
                        if o.success() {
                            v.push((
                                "the code with every function body replaced by `pass`",
                                String::from_utf8_lossy(&o.stdout).into_owned(),
                            ));
                        }
                    }
                }
            }
        }
        v
    }
}

impl Grader for Program {
    fn name(&self) -> &str {
        &self.name
    }
    fn grade(&self, s: &Sample) -> GradeResult {
        let text = match template::render(&self.cfg.input, s) {
            Ok(t) => t,
            Err(e) => return GradeResult::fail(e),
        };
        let tests = match template::resolve(&self.tests, s).and_then(|v| match v {
            // Tests stored as a JSON string in the dataset.
            Value::String(st) if st.trim_start().starts_with(['[', '{']) => serde_json::from_str(&st)
                .map_err(|e| format!("tests: {e}"))
                .and_then(|v| parse_tests(&v)),
            v => parse_tests(&v),
        }) {
            Ok(t) if t.is_empty() => return GradeResult::fail("no tests"),
            Ok(t) => t,
            Err(e) => return GradeResult::fail(e),
        };
        let code = self.code_of(&text);
        let (passed, first_fail) = self.run_tests(&code, &tests);
        let n_pass = passed.iter().filter(|&&p| p).count();
        let mut r = GradeResult::ok(n_pass as f32 / tests.len() as f32)
            .with("passed", n_pass)
            .with("tests", tests.len())
            .with("sandbox", self.sandbox.describe());
        if let Some(f) = first_fail {
            r = r.with("first_failure", f);
        }
        if self.cfg.stub_check && n_pass > 0 {
            for (label, stub) in self.stubs(&code, &tests) {
                let (sp, _) = self.run_tests(&stub, &tests);
                if sp.iter().all(|&p| p) {
                    r.score = 0.0;
                    r.error = Some(format!(
                        "reward hack suspected: {label} also passes all {} tests (vacuous tests, or the code games them outside the functions under test)",
                        tests.len()
                    ));
                    return r;
                }
            }
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::super::build_from_toml;
    use super::*;
    use serde_json::json;
    use std::time::Instant;

    fn grader(extra: &str) -> Box<dyn Grader> {
        build_from_toml(&format!(
            "type = \"program\"\ntests = \"{{{{ item.tests }}}}\"\ntimeout_s = 1.5\n{extra}"
        ))
        .unwrap()
    }
    fn fence(code: &str) -> String {
        format!("Here is my solution:\n```python\n{code}\n```\n")
    }
    fn io_item() -> Value {
        json!({"tests": [{"stdin": "2 3\n", "stdout": "5\n"}, {"stdin": "10 -4", "stdout": "6"}]})
    }
    fn assert_item() -> Value {
        json!({"tests": ["assert add(2, 3) == 5", "assert add(-1, 1) == 0"]})
    }

    #[test]
    fn parses_test_shapes() {
        assert_eq!(
            parse_tests(&json!("assert 1")).unwrap(),
            vec![Test::Assert("assert 1".into())]
        );
        assert_eq!(
            parse_tests(&json!({"inputs": ["1"], "outputs": ["2"]})).unwrap(),
            vec![Test::Io {
                stdin: "1".into(),
                stdout: "2".into()
            }]
        );
        assert_eq!(
            parse_tests(&json!([{"input": "a", "output": "b"}, {"assert": "x"}])).unwrap(),
            vec![
                Test::Io {
                    stdin: "a".into(),
                    stdout: "b".into()
                },
                Test::Assert("x".into())
            ]
        );
        assert!(parse_tests(&json!([{"stdin": "a"}])).is_err());
        assert!(same_output("5  \n\n", "5", Compare::Trimmed));
        assert!(!same_output("5\n", "5", Compare::Exact));
        assert!(same_output("1 2\n3", "1\n2 3", Compare::Tokens));
        assert_eq!(last_code_fence("a\n```py\nx\n```\n```\ny\n```"), Some("y\n"));
    }

    #[test]
    fn stdin_stdout_and_asserts() {
        let g = grader("");
        let good = fence("a, b = map(int, input().split())\nprint(a + b)");
        let r = g.grade(&Sample::new("", good, io_item()));
        assert_eq!(r.score, 1.0, "{r:?}");
        let half = fence("a, b = map(int, input().split())\nprint(5)");
        assert_eq!(g.grade(&Sample::new("", half, io_item())).score, 0.5);
        let add = fence("def add(a, b):\n    return a + b");
        let r = g.grade(&Sample::new("", add, assert_item()));
        assert_eq!(r.score, 1.0, "{r:?}");
        let wrong = fence("def add(a, b):\n    return a - b");
        assert_eq!(g.grade(&Sample::new("", wrong, assert_item())).score, 0.0);
        let syntax = fence("def add(a, b) return");
        let r = g.grade(&Sample::new("", syntax, assert_item()));
        assert_eq!(r.score, 0.0);
        assert!(
            r.details["first_failure"]
                .as_str()
                .unwrap()
                .contains("SyntaxError"),
            "{r:?}"
        );
    }

    #[test]
    fn reward_hacks_get_zero() {
        let g = grader("");
        // Exiting early so the appended asserts never run: the sentinel is missing.
        let exit = fence("import os\ndef add(a, b):\n    return 0\nos._exit(0)");
        let r = g.grade(&Sample::new("", exit, assert_item()));
        assert_eq!(r.score, 0.0, "{r:?}");
        // Gaming the harness at top level: read the sentinel from its own file and print it
        // from an excepthook when an assert fails. The real code "passes"; so does the stub
        // with `add`'s body replaced by `pass` → 0 with the reason.
        let hack = fence("import sys, os, re\ns = re.findall(r'RFT-TESTS-PASSED-[0-9a-f]+', open(__file__).read())[-1]\nsys.excepthook = lambda *a: (print(s), sys.stdout.flush(), os._exit(0))\ndef add(a, b):\n    return 0");
        let r = g.grade(&Sample::new("", hack, assert_item()));
        assert_eq!(r.score, 0.0, "{r:?}");
        assert!(r.error.as_deref().unwrap_or("").contains("reward hack"), "{r:?}");
        // Vacuous tests (pass on an empty program) → 0.
        let vac = json!({"tests": ["assert True"]});
        let r = g.grade(&Sample::new("", fence("print('hi')"), vac));
        assert_eq!(r.score, 0.0);
        assert!(r.error.unwrap().contains("empty program"));
    }

    #[test]
    fn adversarial_programs_are_contained() {
        let g = grader("max_output_bytes = 10000");
        let item = json!({"tests": [{"stdin": "", "stdout": "x"}]});
        let run = |code: &str| {
            let t = Instant::now();
            let r = g.grade(&Sample::new("", fence(code), item.clone()));
            (r, t.elapsed())
        };
        // Infinite loop: killed at the wall limit.
        let (r, t) = run("while True:\n    pass");
        assert_eq!(r.score, 0.0);
        assert!(t < Duration::from_millis(2500), "{t:?}");
        assert!(
            r.details["first_failure"].as_str().unwrap().contains("timed out")
                || r.details["first_failure"].as_str().unwrap().contains("CPU"),
            "{r:?}"
        );
        // Fork loop: children sleep forever; the group is killed and the run finishes.
        let (r, t) = run("import os, time\nfor _ in range(200):\n    try:\n        if os.fork() == 0:\n            time.sleep(100)\n    except OSError:\n        break\nwhile True:\n    time.sleep(0.1)");
        assert_eq!(r.score, 0.0);
        assert!(t < Duration::from_millis(2500), "{t:?}");
        // A child escaping the process group with setsid keeps the pipe open: still finishes.
        let (r, t) =
            run("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(100)\nprint('x')");
        assert!(t < Duration::from_millis(2500), "{t:?}");
        assert_eq!(r.score, 1.0, "{r:?}");
        // Huge output: truncated, not buffered without bound.
        let (r, t) = run("import sys\nwhile True:\n    sys.stdout.write('y' * 65536)");
        assert_eq!(r.score, 0.0);
        assert!(
            r.details["first_failure"]
                .as_str()
                .unwrap()
                .contains("output limit"),
            "{r:?}"
        );
        assert!(t < Duration::from_millis(2500));
        // Memory bomb: RLIMIT_AS makes the allocation fail.
        let (r, _) = run("x = bytearray(4 << 30)\nprint('x')");
        assert_eq!(r.score, 0.0, "{r:?}");
        // Environment is cleared, cwd is the run's own directory.
        let env_item = json!({"tests": [{"stdin": "", "stdout": "ok"}]});
        let code = "import os\nassert 'CARGO_TARGET_DIR' not in os.environ and 'HOME' in os.environ\nassert os.getcwd() == os.environ['HOME']\nassert os.listdir('.') == ['main.py'], os.listdir('.')\nprint('ok')";
        let r = g.grade(&Sample::new("", fence(code), env_item.clone()));
        assert_eq!(r.score, 1.0, "{r:?}");
    }

    fn g_sandbox_ro(g: &dyn Grader) -> bool {
        let r = g.grade(&Sample::new(
            "",
            fence("print('done')"),
            json!({"tests": [{"stdin": "", "stdout": "done"}]}),
        ));
        r.details["sandbox"].as_str().unwrap_or("").contains("read-only")
    }

    #[test]
    fn file_system_limits() {
        let g = grader("");
        let item = json!({"tests": [{"stdin": "", "stdout": "done"}]});
        let outside = std::env::temp_dir().join(format!("rft-outside-{}", std::process::id()));
        // Writing into its own directory works; a file beyond RLIMIT_FSIZE does not.
        let r = g.grade(&Sample::new(
            "",
            fence("open('a.txt', 'w').write('hi')\nprint('done')"),
            item.clone(),
        ));
        assert_eq!(r.score, 1.0, "{r:?}");
        let r = g.grade(&Sample::new(
            "",
            fence("open('big', 'wb').write(b'0' * (64 << 20))\nprint('done')"),
            item.clone(),
        ));
        assert_eq!(r.score, 0.0, "{r:?}");
        if sandbox::is_root() {
            // As root the code runs as its own uid: root-owned places are off limits.
            let target = outside.join("x");
            std::fs::create_dir_all(&outside).unwrap();
            let code = format!(
                "try:\n    open({:?}, 'w').write('pwned')\nexcept OSError:\n    pass\ntry:\n    open('/root/.rft-pwned', 'w').write('x')\nexcept OSError:\n    pass\ntry:\n    import socket; socket.create_connection(('1.1.1.1', 53), timeout=0.5)\n    print('net')\nexcept OSError:\n    pass\nprint('done')",
                target.to_str().unwrap()
            );
            let r = g.grade(&Sample::new("", fence(&code), item.clone()));
            assert_eq!(r.score, 1.0, "{r:?}");
            assert!(!target.exists());
            assert!(!std::path::Path::new("/root/.rft-pwned").exists());
            std::fs::remove_dir_all(&outside).ok();
            // Private files are unreadable; litter in /tmp is removed after the run.
            let secret = tempfile::tempdir().unwrap();
            let secret_file = secret.path().join("secret.txt");
            std::fs::write(&secret_file, "s3cret").unwrap();
            std::fs::set_permissions(&secret_file, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .unwrap();
            let litter = format!("/tmp/rft-litter-{}", std::process::id());
            let code = format!(
                "try:\n    print(open({:?}).read())\nexcept OSError:\n    pass\ntry:\n    open({litter:?}, 'w').write('x')\nexcept OSError:\n    pass\nprint('done')",
                secret_file.to_str().unwrap()
            );
            let r = g.grade(&Sample::new("", fence(&code), item.clone()));
            assert_eq!(r.score, 1.0, "{r:?}");
            assert!(!std::path::Path::new(&litter).exists());
            // With the read-only mount namespace, writing outside the run's dir fails outright.
            if g_sandbox_ro(&*g) {
                let code = format!("try:\n    open({litter:?}, 'w').write('x')\n    print('wrote')\nexcept OSError as e:\n    print('done')");
                let r = g.grade(&Sample::new("", fence(&code), item.clone()));
                assert_eq!(r.score, 1.0, "{r:?}");
            }
        }
    }
}
