//! `llm_judge`: asks an OpenAI-compatible server (`POST {base_url}/chat/completions`) to score
//! the completion with a rubric. `prompt` (and optional `system`) are templates over
//! `{{ prompt }}`, `{{ completion }}`, `{{ item.… }}`. The reply's score is, in order: a JSON
//! object's `score` (the whole reply or the first `{…}` in it), a `score: N` / `score = N`
//! phrase, or the whole reply being a number; it must lie in [0, max_score] and is divided by
//! `max_score`. HTTP 429/5xx and transport errors (timeouts included) are retried `retries`
//! times with exponential backoff (`backoff_s`, doubling); the API key is read from the env
//! var named by `api_key_env` at build time. Plain `http://` always works; `https://` needs the
//! crate's `https` feature (rustls).

use std::sync::OnceLock;
use std::time::Duration;

use regex::Regex;
use serde::Deserialize;
use serde_json::{json, Value};

use super::template;
use super::{bad, GradeResult, Grader, Sample};
use crate::Result;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmJudgeConfig {
    #[serde(default)]
    pub name: Option<String>,
    /// e.g. `http://127.0.0.1:8000/v1` or `https://api.openai.com/v1`.
    pub base_url: String,
    pub model: String,
    /// The user message (rubric) template.
    pub prompt: String,
    #[serde(default)]
    pub system: Option<String>,
    #[serde(default)]
    pub api_key_env: Option<String>,
    #[serde(default = "default_max")]
    pub max_score: f64,
    #[serde(default = "default_timeout")]
    pub timeout_s: f64,
    #[serde(default = "default_retries")]
    pub retries: u32,
    #[serde(default = "default_backoff")]
    pub backoff_s: f64,
    #[serde(default)]
    pub temperature: f64,
    #[serde(default)]
    pub max_tokens: Option<u32>,
}

fn default_max() -> f64 {
    10.0
}
fn default_timeout() -> f64 {
    60.0
}
fn default_retries() -> u32 {
    2
}
fn default_backoff() -> f64 {
    0.5
}

pub struct LlmJudge {
    name: String,
    cfg: LlmJudgeConfig,
    url: String,
    key: Option<String>,
    agent: ureq::Agent,
}

impl LlmJudge {
    pub fn new(cfg: &LlmJudgeConfig) -> Result<Self> {
        template::check("prompt", &cfg.prompt)?;
        if let Some(s) = &cfg.system {
            template::check("system", s)?;
        }
        if !(cfg.base_url.starts_with("http://") || cfg.base_url.starts_with("https://")) {
            return Err(bad(
                "base_url",
                format!("{:?} is not an http(s) URL", cfg.base_url),
            ));
        }
        if cfg.base_url.starts_with("https://") && !cfg!(feature = "https") {
            return Err(bad("base_url", "https needs rft built with `--features https`"));
        }
        if !(cfg.max_score > 0.0 && cfg.max_score.is_finite()) {
            return Err(bad("max_score", format!("{} must be > 0", cfg.max_score)));
        }
        if !(cfg.timeout_s > 0.0 && cfg.timeout_s.is_finite()) {
            return Err(bad("timeout_s", format!("{} must be > 0", cfg.timeout_s)));
        }
        if !(cfg.backoff_s >= 0.0 && cfg.backoff_s <= 600.0) {
            return Err(bad("backoff_s", format!("{} is not in [0, 600]", cfg.backoff_s)));
        }
        let key = match &cfg.api_key_env {
            Some(var) => Some(
                std::env::var(var)
                    .map_err(|_| bad("api_key_env", format!("environment variable {var} is not set")))?,
            ),
            None => None,
        };
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs_f64(cfg.timeout_s)))
            .http_status_as_error(false)
            .build()
            .into();
        Ok(LlmJudge {
            name: cfg.name.clone().unwrap_or_else(|| "llm_judge".into()),
            url: format!("{}/chat/completions", cfg.base_url.trim_end_matches('/')),
            key,
            agent,
            cfg: cfg.clone(),
        })
    }

    /// One HTTP attempt: Ok(content) or Err((retryable, message)).
    fn attempt(&self, body: &str) -> std::result::Result<String, (bool, String)> {
        let mut req = self.agent.post(&self.url).content_type("application/json");
        if let Some(k) = &self.key {
            req = req.header("Authorization", format!("Bearer {k}"));
        }
        let mut resp = req
            .send(body)
            .map_err(|e| (true, format!("request failed: {e}")))?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| (true, format!("reading the response: {e}")))?;
        if status == 429 || status >= 500 {
            return Err((true, format!("HTTP {status}: {}", snippet(&text))));
        }
        if status != 200 {
            return Err((false, format!("HTTP {status}: {}", snippet(&text))));
        }
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| (false, format!("response is not JSON ({e}): {}", snippet(&text))))?;
        v.pointer("/choices/0/message/content")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| {
                (
                    false,
                    format!("no choices[0].message.content in {}", snippet(&text)),
                )
            })
    }
}

fn snippet(s: &str) -> String {
    s.chars().take(200).collect()
}

/// Extracts the judge's score from its reply (see the module docs).
pub fn parse_score(reply: &str) -> Option<f64> {
    static PHRASE: OnceLock<Regex> = OnceLock::new();
    let t = reply.trim();
    let from_json = |s: &str| {
        serde_json::from_str::<Value>(s)
            .ok()
            .and_then(|v| v.get("score").and_then(Value::as_f64))
    };
    if let Some(x) = from_json(t) {
        return Some(x);
    }
    if let (Some(a), Some(b)) = (t.find('{'), t.rfind('}')) {
        if a < b {
            if let Some(x) = from_json(&t[a..=b]) {
                return Some(x);
            }
        }
    }
    let re = PHRASE
        .get_or_init(|| Regex::new(r#"(?i)score[*"]*\s*(?:[:=]|is)\s*[*"]*\s*(-?\d+(?:\.\d+)?)"#).unwrap());
    if let Some(c) = re.captures_iter(t).last() {
        return c[1].parse().ok();
    }
    t.trim_end_matches('.').parse().ok()
}

impl Grader for LlmJudge {
    fn name(&self) -> &str {
        &self.name
    }
    fn grade(&self, s: &Sample) -> GradeResult {
        let user = match template::render(&self.cfg.prompt, s) {
            Ok(u) => u,
            Err(e) => return GradeResult::fail(e),
        };
        let mut messages = Vec::new();
        if let Some(sys) = &self.cfg.system {
            match template::render(sys, s) {
                Ok(t) => messages.push(json!({"role": "system", "content": t})),
                Err(e) => return GradeResult::fail(e),
            }
        }
        messages.push(json!({"role": "user", "content": user}));
        let mut body =
            json!({"model": self.cfg.model, "messages": messages, "temperature": self.cfg.temperature});
        if let Some(m) = self.cfg.max_tokens {
            body["max_tokens"] = m.into();
        }
        let body = body.to_string();
        let mut last = String::new();
        for attempt in 0..=self.cfg.retries {
            if attempt > 0 {
                std::thread::sleep(Duration::from_secs_f64(
                    self.cfg.backoff_s * (1u64 << (attempt - 1).min(16)) as f64,
                ));
            }
            match self.attempt(&body) {
                Ok(content) => {
                    return match parse_score(&content) {
                        Some(x) if (0.0..=self.cfg.max_score).contains(&x) => {
                            GradeResult::ok((x / self.cfg.max_score) as f32)
                                .with("judge_score", x)
                                .with("attempts", attempt + 1)
                        }
                        Some(x) => GradeResult::fail(format!(
                            "judge score {x} is outside [0, {}]",
                            self.cfg.max_score
                        )),
                        None => {
                            GradeResult::fail(format!("no score in the judge's reply: {}", snippet(&content)))
                        }
                    };
                }
                Err((retry, msg)) => {
                    last = msg;
                    if !retry {
                        break;
                    }
                }
            }
        }
        GradeResult::fail(format!("llm judge: {last}"))
    }
}

#[cfg(test)]
mod tests {
    use super::super::build_from_toml;
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    /// Serves `replies` (status, body, delay) to the next `replies.len()` connections, then
    /// stops; returns the base URL and the request bodies seen.
    fn server(replies: Vec<(u16, String, u64)>) -> (String, Arc<Mutex<Vec<String>>>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1", l.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        std::thread::spawn(move || {
            for (status, body, delay) in replies {
                let Ok((mut conn, _)) = l.accept() else {
                    return;
                };
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let mut len = 0;
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut req = vec![0u8; len];
                let _ = r.read_exact(&mut req);
                seen2
                    .lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&req).into_owned());
                std::thread::sleep(Duration::from_millis(delay));
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        (url, seen)
    }

    fn chat(content: &str) -> String {
        json!({"choices": [{"message": {"role": "assistant", "content": content}}]}).to_string()
    }

    fn judge(url: &str, extra: &str) -> Box<dyn Grader> {
        build_from_toml(&format!(
            "type = \"llm_judge\"\nbase_url = \"{url}\"\nmodel = \"judge-1\"\nprompt = \"Q: {{{{ prompt }}}} A: {{{{ completion }}}} Ref: {{{{ item.answer }}}}\"\nbackoff_s = 0.05\ntimeout_s = 0.5\n{extra}"
        ))
        .unwrap()
    }

    fn sample() -> Sample {
        Sample::new("2+2?", "4", json!({"answer": "4"}))
    }

    #[test]
    fn parses_scores() {
        assert_eq!(parse_score("{\"score\": 7}"), Some(7.0));
        assert_eq!(
            parse_score("Reasoning... {\"score\": 3.5, \"why\": \"ok\"}"),
            Some(3.5)
        );
        assert_eq!(parse_score("Good answer.\nScore: 8/10"), Some(8.0));
        assert_eq!(parse_score("**Score** = 6"), Some(6.0));
        assert_eq!(parse_score("score is 9"), Some(9.0));
        assert_eq!(parse_score(" 5 "), Some(5.0));
        assert_eq!(parse_score("I think it's fine"), None);
    }

    #[test]
    fn good_reply_and_request_shape() {
        let (url, seen) = server(vec![(200, chat("Score: 8"), 0)]);
        let r = judge(&url, "").grade(&sample());
        assert!((r.score - 0.8).abs() < 1e-6, "{r:?}");
        let req: Value = serde_json::from_str(&seen.lock().unwrap()[0]).unwrap();
        assert_eq!(req["model"], "judge-1");
        assert_eq!(req["messages"][0]["content"], "Q: 2+2? A: 4 Ref: 4");
    }

    #[test]
    fn malformed_and_out_of_range() {
        let (url, _) = server(vec![
            (200, "this is not json".into(), 0),
            (200, chat("no idea"), 0),
            (200, chat("{\"score\": 11}"), 0),
        ]);
        let g = judge(&url, "retries = 0");
        for want in ["not JSON", "no score", "outside"] {
            let r = g.grade(&sample());
            assert_eq!(r.score, 0.0);
            assert!(r.error.as_deref().unwrap().contains(want), "{r:?}");
        }
    }

    #[test]
    fn retries_after_500() {
        let (url, seen) = server(vec![
            (500, "oops".into(), 0),
            (503, "busy".into(), 0),
            (200, chat("{\"score\": 10}"), 0),
        ]);
        let r = judge(&url, "retries = 2").grade(&sample());
        assert_eq!(r.score, 1.0, "{r:?}");
        assert_eq!(r.details["attempts"], 3);
        assert_eq!(seen.lock().unwrap().len(), 3);
    }

    #[test]
    fn slow_reply_times_out() {
        let (url, _) = server(vec![(200, chat("Score: 10"), 1500)]);
        let t = Instant::now();
        let r = judge(&url, "retries = 0").grade(&sample());
        assert_eq!(r.score, 0.0);
        assert!(r.error.is_some());
        assert!(t.elapsed() < Duration::from_millis(1400), "{:?}", t.elapsed());
        // Missing API key variable: a build error naming it.
        let e = build_from_toml(&format!(
            "type = \"llm_judge\"\nbase_url = \"{url}\"\nmodel = \"m\"\nprompt = \"x\"\napi_key_env = \"RFT_SURELY_UNSET_KEY\""
        ))
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("RFT_SURELY_UNSET_KEY"), "{e}");
    }
}
