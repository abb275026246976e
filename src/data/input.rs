//! JSONL inputs of `rft generate` / `rft score`.
//!
//! One JSON object per non-empty line, with exactly one prompt key:
//! - `"prompt"`: a string, encoded as raw text (`tokenizer(text)`, special tokens added, no
//!   chat template);
//! - `"messages"`: a list of `{"role", "content", ...}`, rendered with the model's chat template
//!   and its generation prompt, then encoded without adding special tokens;
//! - `"prompt_ids"`: a list of token ids, used as is.
//!
//! For `score`, also exactly one of `"completion"` (string, encoded without special tokens) or
//! `"completion_ids"`. Every other field is kept in `extra` and passed through to the output.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value as Json};

use crate::error::{Error, Result};
use crate::model::chat::json_kind;
use crate::model::tokenizer::Tokenizer;

const PROMPT_KEYS: [&str; 3] = ["prompt", "messages", "prompt_ids"];
const COMPLETION_KEYS: [&str; 2] = ["completion", "completion_ids"];

#[derive(Debug, Clone, PartialEq)]
pub enum PromptSpec {
    /// Raw text, no chat template.
    Text(String),
    /// A chat (JSON array of message objects), rendered with the chat template.
    Messages(Json),
    /// Token ids.
    Ids(Vec<u32>),
}

#[derive(Debug, Clone, PartialEq)]
pub enum CompletionSpec {
    Text(String),
    Ids(Vec<u32>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct InputLine {
    /// 1-based line number in the file.
    pub line: usize,
    pub prompt: PromptSpec,
    pub completion: Option<CompletionSpec>,
    /// Every other field of the object, in file order.
    pub extra: Map<String, Json>,
}

/// Reads a JSONL input file. With `require_completion` (score) every line needs a completion;
/// without it (generate) a completion is parsed if present.
pub fn read_inputs(path: impl AsRef<Path>, require_completion: bool) -> Result<Vec<InputLine>> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_inputs(&bytes, path, require_completion)
}

/// [`read_inputs`] on bytes already read; `path` is only used in error messages.
pub fn parse_inputs(bytes: &[u8], path: &Path, require_completion: bool) -> Result<Vec<InputLine>> {
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf".as_slice()).unwrap_or(bytes);
    let mut out = Vec::new();
    let mut n_lines = 0;
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = i + 1;
        n_lines = line;
        let err = |msg: String| Error::Input {
            path: path.to_path_buf(),
            line,
            msg,
        };
        let text = std::str::from_utf8(raw).map_err(|e| {
            err(format!(
                "not valid UTF-8 (byte {} of the line)",
                e.valid_up_to() + 1
            ))
        })?;
        let text = text.strip_suffix('\r').unwrap_or(text);
        if text.trim().is_empty() {
            continue;
        }
        out.push(parse_line(text, require_completion).map_err(err)?.with_line(line));
    }
    if out.is_empty() {
        return Err(Error::Input {
            path: path.to_path_buf(),
            line: n_lines.max(1),
            msg: "no inputs: expected one JSON object per line with \"prompt\", \"messages\" or \
                  \"prompt_ids\""
                .into(),
        });
    }
    Ok(out)
}

impl InputLine {
    fn with_line(mut self, line: usize) -> Self {
        self.line = line;
        self
    }
}

fn parse_line(text: &str, require_completion: bool) -> std::result::Result<InputLine, String> {
    let value: Json = serde_json::from_str(text).map_err(|e| {
        let msg = e.to_string();
        let msg = msg
            .rsplit_once(" at line ")
            .map(|(m, _)| m.to_string())
            .unwrap_or(msg);
        format!("invalid JSON at column {}: {msg}", e.column())
    })?;
    let Json::Object(mut obj) = value else {
        return Err(format!(
            "expected a JSON object with \"prompt\", \"messages\" or \"prompt_ids\", found {}",
            json_kind(&value)
        ));
    };

    let present: Vec<&str> = PROMPT_KEYS
        .iter()
        .copied()
        .filter(|k| obj.contains_key(*k))
        .collect();
    let prompt = match present.as_slice() {
        [] => {
            return Err(
                "missing prompt: expected exactly one of \"prompt\" (string), \"messages\" (array of \
                 {role, content}) or \"prompt_ids\" (array of token ids)"
                    .into(),
            )
        }
        [key] => {
            let v = obj.remove(*key).unwrap_or(Json::Null);
            match *key {
                "prompt" => match v {
                    Json::String(s) => PromptSpec::Text(s),
                    other => {
                        return Err(format!(
                            "\"prompt\" must be a string, found {}",
                            json_kind(&other)
                        ))
                    }
                },
                "messages" => {
                    check_messages(&v)?;
                    PromptSpec::Messages(v)
                }
                _ => {
                    let ids = parse_ids("prompt_ids", &v)?;
                    if ids.is_empty() {
                        return Err("\"prompt_ids\" is empty: a prompt needs at least one token".into());
                    }
                    PromptSpec::Ids(ids)
                }
            }
        }
        keys => {
            return Err(format!(
                "found {}: give exactly one of \"prompt\", \"messages\" or \"prompt_ids\"",
                quoted_list(keys)
            ))
        }
    };

    let present: Vec<&str> = COMPLETION_KEYS
        .iter()
        .copied()
        .filter(|k| obj.contains_key(*k))
        .collect();
    let completion = match present.as_slice() {
        [] if require_completion => {
            return Err(
                "missing completion: expected exactly one of \"completion\" (string) or \
                 \"completion_ids\" (array of token ids)"
                    .into(),
            )
        }
        [] => None,
        [key] => {
            let v = obj.remove(*key).unwrap_or(Json::Null);
            Some(match *key {
                "completion" => match v {
                    Json::String(s) => CompletionSpec::Text(s),
                    other => {
                        return Err(format!(
                            "\"completion\" must be a string, found {}",
                            json_kind(&other)
                        ))
                    }
                },
                _ => CompletionSpec::Ids(parse_ids("completion_ids", &v)?),
            })
        }
        _ => {
            // Both: `rft generate` writes both; the ids are what was sampled, so they win
            // (the text stays in `extra` for whoever reads it).
            let v = obj.remove("completion_ids").unwrap_or(Json::Null);
            Some(CompletionSpec::Ids(parse_ids("completion_ids", &v)?))
        }
    };
    Ok(InputLine {
        line: 0,
        prompt,
        completion,
        extra: obj,
    })
}

fn quoted_list(keys: &[&str]) -> String {
    let q: Vec<String> = keys.iter().map(|k| format!("\"{k}\"")).collect();
    match q.len() {
        2 => format!("both {} and {}", q[0], q[1]),
        _ => q.join(", "),
    }
}

fn parse_ids(key: &str, v: &Json) -> std::result::Result<Vec<u32>, String> {
    let Json::Array(items) = v else {
        return Err(format!(
            "\"{key}\" must be an array of token ids, found {}",
            json_kind(v)
        ));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, x)| match x.as_u64() {
            Some(id) if id <= u32::MAX as u64 => Ok(id as u32),
            _ => Err(format!(
                "\"{key}\"[{i}] must be a non-negative integer token id, found {}",
                match x {
                    Json::Number(n) => n.to_string(),
                    other => json_kind(other).to_string(),
                }
            )),
        })
        .collect()
}

fn check_messages(v: &Json) -> std::result::Result<(), String> {
    let Json::Array(list) = v else {
        return Err(format!(
            "\"messages\" must be an array of {{\"role\", \"content\"}} objects, found {}",
            json_kind(v)
        ));
    };
    if list.is_empty() {
        return Err("\"messages\" is empty: give at least one {\"role\", \"content\"} object".into());
    }
    for (i, m) in list.iter().enumerate() {
        let Json::Object(m) = m else {
            return Err(format!(
                "\"messages\"[{i}] must be an object with \"role\" and \"content\", found {}",
                json_kind(m)
            ));
        };
        match m.get("role") {
            Some(Json::String(_)) => {}
            Some(other) => {
                return Err(format!(
                    "\"messages\"[{i}].role must be a string, found {}",
                    json_kind(other)
                ))
            }
            None => return Err(format!("\"messages\"[{i}] has no \"role\"")),
        }
        match m.get("content") {
            Some(Json::String(_)) | Some(Json::Array(_)) => {}
            // Assistant messages that only call tools may have no content.
            None | Some(Json::Null) if m.contains_key("tool_calls") => {}
            Some(other) => {
                return Err(format!(
                    "\"messages\"[{i}].content must be a string or an array of parts, found {}",
                    json_kind(other)
                ))
            }
            None => return Err(format!("\"messages\"[{i}] has no \"content\"")),
        }
    }
    Ok(())
}

/// Prompt token ids: raw text with special tokens (`tokenizer(text)`), messages through the
/// chat template with the generation prompt (no special tokens added on top), ids as given.
/// Errors: no chat template for messages, ids outside the vocabulary, an empty encoding.
pub fn encode_prompt(prompt: &PromptSpec, tok: &Tokenizer) -> Result<Vec<u32>> {
    let ids = match prompt {
        PromptSpec::Text(s) => tok.encode(s, true)?,
        PromptSpec::Messages(m) => tok.apply_chat_template(m, true)?,
        PromptSpec::Ids(ids) => {
            tok.check_ids(ids)?;
            ids.clone()
        }
    };
    if ids.is_empty() {
        return Err(Error::Invalid("the prompt encodes to zero tokens".into()));
    }
    Ok(ids)
}

/// Completion token ids: text encoded without special tokens, ids checked against the vocabulary.
pub fn encode_completion(completion: &CompletionSpec, tok: &Tokenizer) -> Result<Vec<u32>> {
    match completion {
        CompletionSpec::Text(s) => tok.encode(s, false),
        CompletionSpec::Ids(ids) => {
            tok.check_ids(ids)?;
            Ok(ids.clone())
        }
    }
}

/// Encodes one input line (prompt, and completion if any); errors carry `path:line`.
pub fn encode_line(path: &Path, input: &InputLine, tok: &Tokenizer) -> Result<(Vec<u32>, Option<Vec<u32>>)> {
    let at = |e: Error| Error::Input {
        path: PathBuf::from(path),
        line: input.line,
        msg: match e {
            Error::Tokenizer(m) | Error::Template(m) | Error::Invalid(m) => m,
            other => other.to_string(),
        },
    };
    let prompt = encode_prompt(&input.prompt, tok).map_err(at)?;
    let completion = match &input.completion {
        Some(c) => Some(encode_completion(c, tok).map_err(at)?),
        None => None,
    };
    Ok((prompt, completion))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str, req: bool) -> Result<Vec<InputLine>> {
        parse_inputs(s.as_bytes(), Path::new("in.jsonl"), req)
    }

    fn err(s: &str, req: bool) -> String {
        match parse(s, req) {
            Err(e @ Error::Input { .. }) => e.to_string(),
            other => panic!("expected an input error for {s:?}, got {other:?}"),
        }
    }

    #[test]
    fn parses_all_kinds() {
        let v = parse(
            "{\"prompt\": \"hi\", \"id\": 7}\n\n  \r\n{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"completion\": \"y\"}\r\n{\"prompt_ids\": [1, 2], \"completion_ids\": []}",
            false,
        )
        .unwrap();
        assert_eq!(v.len(), 3);
        assert_eq!(v[0].line, 1);
        assert_eq!(v[0].prompt, PromptSpec::Text("hi".into()));
        assert_eq!(v[0].extra.get("id"), Some(&serde_json::json!(7)));
        assert_eq!(v[1].line, 4);
        assert!(matches!(v[1].prompt, PromptSpec::Messages(_)));
        assert_eq!(v[1].completion, Some(CompletionSpec::Text("y".into())));
        assert_eq!(v[2].line, 5);
        assert_eq!(v[2].prompt, PromptSpec::Ids(vec![1, 2]));
        assert_eq!(v[2].completion, Some(CompletionSpec::Ids(vec![])));
        assert!(v[2].extra.is_empty());
    }

    #[test]
    fn every_error_names_file_and_line() {
        let cases: &[(&str, bool, &str)] = &[
            (
                "{\"prompt\": \"a\"}\n{\"prompt\": ",
                false,
                "in.jsonl:2: invalid JSON at column",
            ),
            ("[1,2]", false, "in.jsonl:1: expected a JSON object"),
            ("{\"id\": 1}", false, "in.jsonl:1: missing prompt"),
            (
                "{\"prompt\": \"a\", \"prompt_ids\": [1]}",
                false,
                "both \"prompt\" and \"prompt_ids\"",
            ),
            (
                "{\"prompt\": \"a\", \"messages\": [], \"prompt_ids\": [1]}",
                false,
                "found \"prompt\", \"messages\", \"prompt_ids\"",
            ),
            (
                "{\"prompt\": 3}",
                false,
                "\"prompt\" must be a string, found a number",
            ),
            ("{\"messages\": \"hi\"}", false, "\"messages\" must be an array"),
            ("{\"messages\": []}", false, "\"messages\" is empty"),
            (
                "{\"messages\": [\"hi\"]}",
                false,
                "\"messages\"[0] must be an object",
            ),
            (
                "{\"messages\": [{\"content\": \"x\"}]}",
                false,
                "\"messages\"[0] has no \"role\"",
            ),
            (
                "{\"messages\": [{\"role\": \"user\"}]}",
                false,
                "\"messages\"[0] has no \"content\"",
            ),
            (
                "{\"messages\": [{\"role\": 1, \"content\": \"x\"}]}",
                false,
                "role must be a string",
            ),
            (
                "{\"messages\": [{\"role\": \"user\", \"content\": 5}]}",
                false,
                "content must be a string or an array",
            ),
            (
                "{\"prompt_ids\": \"1 2\"}",
                false,
                "\"prompt_ids\" must be an array of token ids, found a string",
            ),
            (
                "{\"prompt_ids\": [1, -2]}",
                false,
                "\"prompt_ids\"[1] must be a non-negative integer token id, found -2",
            ),
            ("{\"prompt_ids\": [1.5]}", false, "found 1.5"),
            ("{\"prompt_ids\": [\"3\"]}", false, "found a string"),
            ("{\"prompt_ids\": [4294967296]}", false, "found 4294967296"),
            ("{\"prompt_ids\": []}", false, "\"prompt_ids\" is empty"),
            ("\n\n{\"prompt\": \"a\"}", true, "in.jsonl:3: missing completion"),
            (
                "{\"prompt\": \"a\", \"completion\": [1]}",
                true,
                "\"completion\" must be a string, found an array",
            ),
            (
                "{\"prompt\": \"a\", \"completion_ids\": [true]}",
                true,
                "\"completion_ids\"[0] must be a non-negative integer token id, found a boolean",
            ),
            ("", false, "in.jsonl:1: no inputs"),
            ("\n  \n", false, "in.jsonl:3: no inputs"),
        ];
        for (input, req, want) in cases {
            let got = err(input, *req);
            assert!(
                got.contains(want),
                "input {input:?}: error {got:?} does not contain {want:?}"
            );
            assert!(got.starts_with("in.jsonl:"), "{got}");
        }
        let bad_utf8 = parse_inputs(
            b"{\"prompt\": \"a\"}\n{\"prompt\": \"\xff\"}",
            Path::new("x"),
            false,
        );
        assert!(bad_utf8
            .unwrap_err()
            .to_string()
            .starts_with("x:2: not valid UTF-8"));
    }
}
