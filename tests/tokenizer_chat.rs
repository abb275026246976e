//! Tokenizer + chat template parity with transformers (fixtures from
//! scripts/make_chat_fixtures.py), and the JSONL inputs of generate/score end to end.

use std::path::{Path, PathBuf};

use rft::data::input::{
    encode_completion, encode_line, encode_prompt, read_inputs, CompletionSpec, PromptSpec,
};
use rft::model::chat::{ChatTemplate, RenderOptions};
use rft::model::tokenizer::Tokenizer;
use rft::Error;
use serde_json::{json, Value};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat")
}

fn expected() -> Value {
    let text = std::fs::read_to_string(fixtures().join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn load(name: &str, fixed_unix: i64) -> Tokenizer {
    let mut tok = Tokenizer::from_dir(fixtures().join(name)).unwrap();
    tok.chat_template_mut().unwrap().set_fixed_time(Some(fixed_unix));
    tok
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn chat_templates_match_transformers() {
    let exp = expected();
    let fixed = exp["fixed_unix"].as_i64().unwrap();
    let mut n_cases = 0;
    let mut n_errors = 0;
    for (name, model) in exp["models"].as_object().unwrap() {
        let tok = load(name, fixed);
        assert_eq!(
            tok.vocab_size(),
            model["vocab_size"].as_u64().unwrap() as usize,
            "{name}"
        );
        assert_eq!(tok.bos_token(), model["bos_token"].as_str(), "{name}");
        assert_eq!(tok.eos_token(), model["eos_token"].as_str(), "{name}");
        let tmpl = tok.chat_template().unwrap();
        for case in model["cases"].as_array().unwrap() {
            let cname = case["name"].as_str().unwrap();
            let agp = case["add_generation_prompt"].as_bool().unwrap();
            let extra = case.get("extra").and_then(Value::as_object);
            let opts = RenderOptions {
                tools: case.get("tools"),
                documents: None,
                extra,
            };
            let got = tmpl.render_with(&case["messages"], agp, &opts);
            let what = format!("{name}/{cname} add_generation_prompt={agp}");
            n_cases += 1;
            if let Some(msg) = case.get("error") {
                n_errors += 1;
                match got {
                    Err(Error::Template(m)) => assert_eq!(m, msg.as_str().unwrap(), "{what}"),
                    other => panic!("{what}: expected raise_exception error, got {other:?}"),
                }
                // Through the tokenizer/input path it is an error too.
                assert!(tok.apply_chat_template(&case["messages"], agp).is_err());
                continue;
            }
            let text = got.unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(text, case["text"].as_str().unwrap(), "{what}");
            let want_ids = ids(&case["ids"]);
            assert_eq!(tok.encode(&text, false).unwrap(), want_ids, "{what}");
            if opts.tools.is_none() && extra.is_none() {
                assert_eq!(
                    tok.apply_chat_template(&case["messages"], agp).unwrap(),
                    want_ids,
                    "{what}"
                );
            }
            // Round trip: decoding the ids gives the rendered text back.
            assert_eq!(tok.decode(&want_ids, false).unwrap(), text, "{what}");
        }
        for e in model["encodes"].as_array().unwrap() {
            let text = e["text"].as_str().unwrap();
            assert_eq!(
                tok.encode(text, true).unwrap(),
                ids(&e["ids_special"]),
                "{name} {text:?}"
            );
            let plain = ids(&e["ids_plain"]);
            assert_eq!(tok.encode(text, false).unwrap(), plain, "{name} {text:?}");
            assert_eq!(tok.decode(&plain, false).unwrap(), text);
            assert_eq!(tok.decode(&ids(&e["ids_special"]), true).unwrap(), text);
        }
    }
    assert!(
        n_cases >= 25 && n_errors >= 6,
        "{n_cases} cases, {n_errors} errors"
    );
}

#[test]
fn custom_templates_match_transformers() {
    let exp = expected();
    let tok = Tokenizer::from_dir(fixtures().join("qwen2.5")).unwrap();
    for case in exp["custom"].as_array().unwrap() {
        let t = ChatTemplate::new(case["template"].as_str().unwrap())
            .unwrap()
            .with_special_tokens(tok.special_tokens().iter().cloned());
        let agp = case["add_generation_prompt"].as_bool().unwrap();
        let got = t
            .render(&case["messages"], agp)
            .unwrap_or_else(|e| panic!("{}: {e}", case["name"]));
        assert_eq!(
            got,
            case["text"].as_str().unwrap(),
            "custom/{} agp={agp}",
            case["name"]
        );
    }
}

#[test]
fn template_sources_and_special_tokens() {
    // llama3: chat_template.jinja wins over the stale inline template; AddedToken objects.
    let llama = Tokenizer::from_dir(fixtures().join("llama3")).unwrap();
    assert!(llama
        .chat_template()
        .unwrap()
        .source()
        .starts_with("{{- bos_token }}"));
    assert_eq!(llama.bos_token(), Some("<|begin_of_text|>"));
    assert_eq!(llama.bos_token_id(), llama.token_to_id("<|begin_of_text|>"));
    assert!(llama.bos_token_id().is_some());
    // mistral: list of named templates, "default" taken.
    let mistral = Tokenizer::from_dir(fixtures().join("mistral")).unwrap();
    assert!(mistral.chat_template().unwrap().source().contains("[INST]"));
    // qwen: inline string, no bos.
    let qwen = Tokenizer::from_dir(fixtures().join("qwen2.5")).unwrap();
    assert_eq!(qwen.bos_token(), None);
    assert_eq!(qwen.pad_token(), Some("<|endoftext|>"));
    assert_eq!(qwen.eos_token_id(), qwen.token_to_id("<|im_end|>"));
    // Special tokens decode, or are skipped.
    let ids = qwen.encode("<|im_start|>user\nhi<|im_end|>", false).unwrap();
    assert_eq!(ids[0], qwen.token_to_id("<|im_start|>").unwrap());
    assert_eq!(qwen.decode(&ids, true).unwrap(), "user\nhi");
    assert_eq!(
        qwen.decode(&ids, false).unwrap(),
        "<|im_start|>user\nhi<|im_end|>"
    );
}

fn temp_model(tokenizer_json: Option<&str>, config: Option<&str>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    if let Some(t) = tokenizer_json {
        std::fs::write(dir.path().join("tokenizer.json"), t).unwrap();
    }
    if let Some(c) = config {
        std::fs::write(dir.path().join("tokenizer_config.json"), c).unwrap();
    }
    dir
}

#[test]
fn tokenizer_load_errors_name_the_file() {
    let good = std::fs::read_to_string(fixtures().join("qwen2.5/tokenizer.json")).unwrap();
    let dir = temp_model(None, None);
    let e = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(e.contains("tokenizer.json"), "{e}");
    let dir = temp_model(Some("{not json"), None);
    let e = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(
        e.contains("tokenizer.json") && e.contains("not a valid tokenizer.json"),
        "{e}"
    );
    let dir = temp_model(Some(&good), Some("{\"chat_template\": 3}"));
    let e = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(
        e.contains("tokenizer_config.json") && e.contains("chat_template"),
        "{e}"
    );
    let dir = temp_model(
        Some(&good),
        Some("{\"chat_template\": [{\"name\": \"tool_use\", \"template\": \"x\"}]}"),
    );
    let e = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(e.contains("no template named \"default\""), "{e}");
    let dir = temp_model(Some(&good), Some("{\"chat_template\": \"{% for %}\"}"));
    let e = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(
        e.contains("tokenizer_config.json") && e.contains("chat template"),
        "{e}"
    );
    // No config at all: loads, no template, messages are a clear error.
    let dir = temp_model(Some(&good), None);
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    assert!(tok.chat_template().is_none());
    let e = encode_prompt(
        &PromptSpec::Messages(json!([{"role": "user", "content": "hi"}])),
        &tok,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("has no chat_template"), "{e}");
}

#[test]
fn inputs_end_to_end() {
    let tok = Tokenizer::from_dir(fixtures().join("llama3")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("score.jsonl");
    let v = tok.vocab_size();
    std::fs::write(
        &path,
        format!(
            "{{\"prompt\": \"Hello world\", \"completion\": \" Paris\", \"id\": \"a\"}}\n\
             {{\"messages\": [{{\"role\": \"user\", \"content\": \"hi\"}}], \"completion_ids\": [5, 6]}}\n\
             {{\"prompt_ids\": [1, 2, 3], \"completion\": \"x\"}}\n\
             {{\"prompt_ids\": [1, {v}], \"completion\": \"x\"}}\n\
             {{\"prompt\": \"ok\", \"completion_ids\": [0, 99999]}}\n"
        ),
    )
    .unwrap();
    let lines = read_inputs(&path, true).unwrap();
    assert_eq!(lines.len(), 5);
    assert_eq!(lines[0].extra["id"], json!("a"));

    // Raw prompt: BOS added (tokenizer(text)); completion: no special tokens.
    let (p, c) = encode_line(&path, &lines[0], &tok).unwrap();
    assert_eq!(p, tok.encode("Hello world", true).unwrap());
    assert_eq!(p[0], tok.bos_token_id().unwrap());
    assert_eq!(c.unwrap(), tok.encode(" Paris", false).unwrap());

    // Messages: chat template with generation prompt, no extra BOS.
    let (p, c) = encode_line(&path, &lines[1], &tok).unwrap();
    let text = tok
        .render_chat(&json!([{"role": "user", "content": "hi"}]), true)
        .unwrap();
    assert!(text.ends_with("<|start_header_id|>assistant<|end_header_id|>\n\n"));
    assert_eq!(p, tok.encode(&text, false).unwrap());
    assert_eq!(p.iter().filter(|&&i| Some(i) == tok.bos_token_id()).count(), 1);
    assert_eq!(c.unwrap(), vec![5, 6]);

    assert_eq!(encode_line(&path, &lines[2], &tok).unwrap().0, vec![1, 2, 3]);

    let e = encode_line(&path, &lines[3], &tok).unwrap_err().to_string();
    assert!(
        e.contains("score.jsonl:4:")
            && e.contains(&format!("token id {v}"))
            && e.contains(&format!("{v} tokens")),
        "{e}"
    );
    let e = encode_line(&path, &lines[4], &tok).unwrap_err().to_string();
    assert!(e.contains("score.jsonl:5:") && e.contains("99999"), "{e}");

    assert!(encode_completion(&CompletionSpec::Ids(vec![v as u32]), &tok).is_err());
    assert_eq!(
        encode_completion(&CompletionSpec::Text(String::new()), &tok).unwrap(),
        Vec::<u32>::new()
    );

    // Generate: completion optional; a missing file names the path.
    let gen = dir.path().join("gen.jsonl");
    std::fs::write(&gen, "{\"prompt\": \"x\"}\n").unwrap();
    assert!(read_inputs(&gen, false).unwrap()[0].completion.is_none());
    let e = read_inputs(&gen, true).unwrap_err().to_string();
    assert!(
        e.starts_with(&format!("{}:1: missing completion", gen.display())),
        "{e}"
    );
    let e = read_inputs(dir.path().join("nope.jsonl"), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope.jsonl"), "{e}");
}
