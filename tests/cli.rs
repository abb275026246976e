//! End-to-end tests of the `rft` binary: the JSON-lines output of `generate` and `score`,
//! greedy parity with the HF fixtures, reproducibility of sampling, the PEFT round trip, and
//! that every kind of bad input ends in a non-zero exit status with ONE readable line on
//! stderr that names what is wrong (never a panic).
//!
//! Bad inputs are made in temp dirs from copies of the fixture models
//! (tests/fixtures/models, see tests/fixtures/README.md).

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Value};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use tempfile::TempDir;

const RFT: &str = env!("CARGO_BIN_EXE_rft");

/// Log-probs against the HF / PEFT fixtures: rft's f32 forward vs transformers' f32 (or f64)
/// forward of the same weights, ~1e-6 apart over these 2-layer, width-64 models (see
/// tests/hf_parity.rs); a wrong norm, RoPE, bias or adapter scale moves them by 1e-2 or more.
const TOL_HF: f64 = 1e-4;
/// `score` vs `generate` log-probs of the same tokens on the same engine: the same f32 ops,
/// one whole-sequence forward vs a KV-cache step per token; a few ulps of O(1) values.
const TOL_SELF: f64 = 1e-5;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn model(name: &str) -> PathBuf {
    root().join("tests/fixtures/models").join(name)
}

fn adapter(name: &str) -> PathBuf {
    root().join("tests/fixtures/train").join(name)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn run(args: &[&str]) -> Output {
    Command::new(RFT).args(args).output().expect("spawn rft")
}

/// Runs rft, expects success and returns its stdout parsed as JSON lines.
fn ok(args: &[&str]) -> Vec<Value> {
    let out = run(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "rft {args:?} failed: {stderr}");
    let stdout = String::from_utf8(out.stdout).expect("stdout is UTF-8");
    assert!(stdout.ends_with('\n') || stdout.is_empty());
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line: {l:?}: {e}")))
        .collect()
}

/// Runs rft, expects failure with one `error: ...` line on stderr containing every `want`;
/// returns that line.
fn fail(args: &[&str], want: &[&str]) -> String {
    let out = run(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "rft {args:?} should fail; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!stderr.contains("panicked"), "rft {args:?} panicked: {stderr}");
    assert!(out.stdout.is_empty(), "rft {args:?} failed but wrote to stdout");
    let line = stderr.trim_end_matches('\n');
    assert_eq!(
        line.lines().count(),
        1,
        "stderr of rft {args:?} is not one line: {stderr:?}"
    );
    assert!(line.starts_with("error: "), "stderr of rft {args:?}: {line:?}");
    // An error's cause is printed once (e.g. an io::Error both in the message and as source).
    assert!(line.matches("(os error").count() <= 1, "cause repeated: {line}");
    for w in want {
        assert!(line.contains(w), "stderr of rft {args:?} lacks {w:?}: {line}");
    }
    line.to_string()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

fn expected(name: &str) -> Value {
    serde_json::from_str(&fs::read_to_string(model(name).join("expected.json")).unwrap()).unwrap()
}

/// Writes JSON lines to `dir/name` and returns the path.
fn jsonl(dir: &Path, name: &str, lines: &[Value]) -> PathBuf {
    let p = dir.join(name);
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    fs::write(&p, text).unwrap();
    p
}

/// A temp dir holding a copy of fixture dir `src` under `name`.
fn copy_dir(src: &Path, name: &str) -> (TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join(name);
    fs::create_dir(&dst).unwrap();
    for e in fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    (tmp, dst)
}

fn copy_model(name: &str) -> (TempDir, PathBuf) {
    copy_dir(&model(name), name)
}

type Tensors = Vec<(String, Dtype, Vec<usize>, Vec<u8>)>;

/// Rewrites a safetensors file after `edit` changes its list of (name, dtype, shape, bytes).
fn rewrite_safetensors(path: &Path, edit: impl FnOnce(&mut Tensors)) {
    let bytes = fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut ts: Tensors = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    edit(&mut ts);
    let views: Vec<(String, TensorView<'_>)> = ts
        .iter()
        .map(|(n, d, sh, b)| (n.clone(), TensorView::new(*d, sh.clone(), b).unwrap()))
        .collect();
    fs::write(path, safetensors::tensor::serialize(views, None).unwrap()).unwrap();
}

/// Edits a JSON file in place.
fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let mut v: Value = serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap();
    edit(v.as_object_mut().unwrap());
    fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// The five keys of a `generate` line, with logprobs per token and a known finish reason.
fn check_generate_line(l: &Value, max_new: usize) {
    let o = l.as_object().unwrap_or_else(|| panic!("not an object: {l}"));
    let mut keys: Vec<&str> = o.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "completion",
            "completion_ids",
            "finish_reason",
            "logprobs",
            "prompt_ids"
        ],
        "{l}"
    );
    assert!(!ids(&l["prompt_ids"]).is_empty());
    let c = ids(&l["completion_ids"]);
    let lp = floats(&l["logprobs"]);
    assert!(!c.is_empty() && c.len() <= max_new, "{l}");
    assert_eq!(lp.len(), c.len(), "{l}");
    assert!(lp.iter().all(|&x| x <= 0.0 && x.is_finite()), "{l}");
    assert!(l["completion"].is_string(), "{l}");
    let fr = l["finish_reason"].as_str().unwrap();
    assert!(fr == "stop" || fr == "length", "{l}");
    if fr == "length" {
        assert_eq!(c.len(), max_new, "{l}");
    }
}

// ---------------------------------------------------------------- output format

#[test]
fn generate_prompt_output_format() {
    let e = expected("qwen2");
    let m = model("qwen2");
    let out = ok(&[
        "generate",
        "--model",
        s(&m),
        "--prompt",
        "The quick b",
        "--max-new-tokens",
        "8",
    ]);
    assert_eq!(out.len(), 1);
    check_generate_line(&out[0], 8);
    // A raw prompt is `tokenizer(text)`.
    assert_eq!(ids(&out[0]["prompt_ids"]), ids(&e["prompts"][0]["ids"]));

    // --chat: the user message rendered with the chat template (with the generation prompt).
    let chat = &e["chat"][1];
    assert_eq!(chat["messages"].as_array().unwrap().len(), 1);
    let text = chat["messages"][0]["content"].as_str().unwrap();
    let out = ok(&[
        "generate",
        "--model",
        s(&m),
        "--prompt",
        text,
        "--chat",
        "--max-new-tokens",
        "4",
        "--num-samples",
        "3",
    ]);
    assert_eq!(out.len(), 3);
    for l in &out {
        check_generate_line(l, 4);
        assert_eq!(ids(&l["prompt_ids"]), ids(&chat["ids"]));
    }
}

#[test]
fn generate_input_output_format() {
    let e = expected("qwen2");
    let m = model("qwen2");
    let tmp = tempfile::tempdir().unwrap();
    let chat = &e["chat"][0];
    let input = jsonl(
        tmp.path(),
        "in.jsonl",
        &[
            json!({"prompt": "The quick b", "id": "a"}),
            json!({"messages": chat["messages"]}),
            json!({"prompt_ids": e["prompts"][2]["ids"]}),
        ],
    );
    let out = ok(&[
        "generate",
        "--model",
        s(&m),
        "--input",
        s(&input),
        "--num-samples",
        "3",
        "--max-new-tokens",
        "6",
        "--seed",
        "5",
    ]);
    // Prompt-major, G = 3 per prompt.
    assert_eq!(out.len(), 9);
    let want = [
        ids(&e["prompts"][0]["ids"]),
        ids(&chat["ids"]),
        ids(&e["prompts"][2]["ids"]),
    ];
    for (i, l) in out.iter().enumerate() {
        check_generate_line(l, 6);
        assert_eq!(ids(&l["prompt_ids"]), want[i / 3], "line {i}");
    }
    // The three samples of a prompt are different draws.
    let c: Vec<Vec<u32>> = out.iter().map(|l| ids(&l["completion_ids"])).collect();
    assert!(c[0] != c[1] || c[1] != c[2], "3 identical samples: {c:?}");
}

#[test]
fn generate_stop_string_gives_stop() {
    // A stop string that some of 8 samples will contain; stopping reports "stop".
    let out = ok(&[
        "generate",
        "--model",
        s(&model("qwen2")),
        "--prompt",
        "The quick b",
        "--num-samples",
        "8",
        "--max-new-tokens",
        "40",
        "--stop",
        "e",
        "--seed",
        "3",
    ]);
    assert_eq!(out.len(), 8);
    for l in &out {
        check_generate_line(l, 40);
    }
    assert!(
        out.iter().any(|l| l["finish_reason"] == "stop"),
        "no sample stopped at \"e\""
    );
}

/// Greedy (`--temperature 0`) equals HF's greedy tokens for all three fixture prompts, and
/// `score` of those completions reproduces generate's logprobs.
#[test]
fn greedy_matches_fixture_and_score_reproduces_logprobs() {
    let e = expected("qwen2");
    let m = model("qwen2");
    let tmp = tempfile::tempdir().unwrap();
    let prompts: Vec<Value> = e["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| json!({"prompt_ids": p["ids"]}))
        .collect();
    let input = jsonl(tmp.path(), "in.jsonl", &prompts);
    let out = ok(&[
        "generate",
        "--model",
        s(&m),
        "--input",
        s(&input),
        "--temperature",
        "0",
        "--ignore-eos",
        "--max-new-tokens",
        "16",
    ]);
    assert_eq!(out.len(), 3);
    for (p, l) in out.iter().enumerate() {
        check_generate_line(l, 16);
        assert_eq!(l["finish_reason"], "length");
        assert_eq!(ids(&l["completion_ids"]), ids(&e["greedy"][p]), "prompt {p}");
        let d = max_abs_diff(&floats(&l["logprobs"]), &floats(&e["greedy_logprobs"][p]));
        assert!(d < TOL_HF, "prompt {p}: greedy logprobs differ from HF by {d}");
    }

    // Score generate's own output (prompt_ids + completion_ids).
    let items: Vec<Value> = out
        .iter()
        .map(|l| json!({"prompt_ids": l["prompt_ids"], "completion_ids": l["completion_ids"]}))
        .collect();
    let score_in = jsonl(tmp.path(), "score.jsonl", &items);
    let scored = ok(&["score", "--model", s(&m), "--input", s(&score_in)]);
    assert_eq!(scored.len(), 3);
    for (g, sc) in out.iter().zip(&scored) {
        let mut keys: Vec<&str> = sc.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(keys, ["completion_ids", "logprobs"]);
        assert_eq!(sc["completion_ids"], g["completion_ids"]);
        let d = max_abs_diff(&floats(&sc["logprobs"]), &floats(&g["logprobs"]));
        assert!(d < TOL_SELF, "score vs generate logprobs differ by {d}");
    }
}

#[test]
fn score_fixture_logprobs_and_text_completion() {
    let e = expected("qwen2");
    let m = model("qwen2");
    let tmp = tempfile::tempdir().unwrap();
    let input = jsonl(
        tmp.path(),
        "in.jsonl",
        &[
            json!({"prompt_ids": e["score"]["prompt"], "completion_ids": e["score"]["completion"]}),
            json!({"prompt": "The quick b", "completion": "rown fox"}),
            json!({"prompt_ids": [5], "completion_ids": []}),
        ],
    );
    let out = ok(&["score", "--model", s(&m), "--input", s(&input)]);
    assert_eq!(out.len(), 3);
    assert_eq!(ids(&out[0]["completion_ids"]), ids(&e["score"]["completion"]));
    let d = max_abs_diff(&floats(&out[0]["logprobs"]), &floats(&e["score"]["logprobs"]));
    assert!(d < TOL_HF, "score logprobs differ from HF by {d}");
    let c = ids(&out[1]["completion_ids"]);
    assert!(!c.is_empty());
    assert_eq!(floats(&out[1]["logprobs"]).len(), c.len());
    assert_eq!(out[2], json!({"completion_ids": [], "logprobs": []}));
}

// ---------------------------------------------------------------- reproducibility

#[test]
fn sampling_reproducible_and_independent_of_batching() {
    let m = model("llama");
    let tmp = tempfile::tempdir().unwrap();
    let input = jsonl(
        tmp.path(),
        "in.jsonl",
        &[
            json!({"prompt": "The quick b"}),
            json!({"prompt_ids": [15, 316]}),
            json!({"prompt": "What is 12 + 7? The answer"}),
        ],
    );
    let gen = |seed: &str, extra: &[&str]| {
        let mut a = vec![
            "generate",
            "--model",
            s(&m),
            "--input",
            s(&input),
            "--num-samples",
            "3",
            "--max-new-tokens",
            "12",
            "--seed",
            seed,
            "--top-k",
            "50",
            "--top-p",
            "0.95",
        ];
        a.extend_from_slice(extra);
        ok(&a)
    };
    let a = gen("7", &[]);
    assert_eq!(a.len(), 9);
    assert_eq!(a, gen("7", &[]), "same seed, different output");
    assert_eq!(
        a,
        gen("7", &["--batch-size", "1"]),
        "--batch-size 1 changed the samples"
    );
    assert_eq!(
        a,
        gen("7", &["--batch-size", "4"]),
        "--batch-size 4 changed the samples"
    );
    let b = gen("8", &[]);
    let differ = a
        .iter()
        .zip(&b)
        .filter(|(x, y)| x["completion_ids"] != y["completion_ids"])
        .count();
    assert!(
        differ >= 7,
        "seeds 7 and 8 gave {} of 9 identical samples",
        9 - differ
    );
}

// ---------------------------------------------------------------- adapters

#[test]
fn adapter_changes_logprobs_and_matches_peft() {
    let m = model("qwen2");
    let ad = adapter("peft_roundtrip");
    let items = ad.join("items.jsonl");
    let base = ok(&["score", "--model", s(&m), "--input", s(&items)]);
    let with = ok(&[
        "score",
        "--model",
        s(&m),
        "--adapter",
        s(&ad),
        "--input",
        s(&items),
    ]);
    let want: Value =
        serde_json::from_str(&fs::read_to_string(ad.join("expected_logprobs.json")).unwrap()).unwrap();
    let want = want["items"].as_array().unwrap();
    assert_eq!(with.len(), want.len());
    for ((b, w), x) in base.iter().zip(&with).zip(want) {
        assert_eq!(w["completion_ids"], x["completion_ids"]);
        let exp = x.get("logprobs_f32").unwrap_or(&x["logprobs"]);
        let d = max_abs_diff(&floats(&w["logprobs"]), &floats(exp));
        assert!(d < TOL_HF, "adapter logprobs differ from PEFT by {d}");
        let moved = max_abs_diff(&floats(&w["logprobs"]), &floats(&b["logprobs"]));
        assert!(moved > 1e-2, "the adapter did not change the logprobs ({moved})");
    }
    // And in generate: the adapter changes greedy logprobs.
    let g = |extra: &[&str]| {
        let mut a = vec![
            "generate",
            "--model",
            s(&m),
            "--prompt",
            "The quick b",
            "--temperature",
            "0",
            "--max-new-tokens",
            "4",
            "--ignore-eos",
        ];
        a.extend_from_slice(extra);
        ok(&a)
    };
    assert_ne!(g(&[])[0]["logprobs"], g(&["--adapter", s(&ad)])[0]["logprobs"]);
}

#[test]
fn adapter_errors() {
    let m = model("qwen2");
    let args = |ad: &Path| -> Vec<String> {
        [
            "generate",
            "--model",
            s(&m),
            "--prompt",
            "hi",
            "--max-new-tokens",
            "2",
            "--adapter",
            s(ad),
        ]
        .map(String::from)
        .to_vec()
    };
    let fail_ad = |ad: &Path, want: &[&str]| {
        let a = args(ad);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        fail(&a, want)
    };
    let tmp = tempfile::tempdir().unwrap();
    fail_ad(
        &tmp.path().join("nope"),
        &["adapter directory", "nope", "does not exist"],
    );

    // adapter_config.json without "r".
    let (_t1, ad) = copy_dir(&adapter("peft_roundtrip"), "ad");
    edit_json(&ad.join("adapter_config.json"), |o| {
        o.remove("r");
    });
    fail_ad(&ad, &["adapter_config.json", "\"r\""]);

    // adapter_config.json is not JSON.
    fs::write(ad.join("adapter_config.json"), "{\n  \"r\": 4,\n  oops\n}").unwrap();
    fail_ad(&ad, &["adapter_config.json", "invalid JSON", "line 3"]);

    // r = 8 in the config, tensors of rank 4: shape mismatch naming the first tensor.
    let (_t2, ad) = copy_dir(&adapter("peft_roundtrip"), "ad");
    edit_json(&ad.join("adapter_config.json"), |o| {
        o.insert("r".into(), json!(8));
    });
    fail_ad(
        &ad,
        &[
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
            "expected shape [8, 64]",
            "found [4, 64]",
        ],
    );

    // A tensor of the wrong shape in the weights.
    let (_t3, ad) = copy_dir(&adapter("peft_roundtrip"), "ad");
    let key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight";
    rewrite_safetensors(&ad.join("adapter_model.safetensors"), |ts| {
        let t = ts.iter_mut().find(|t| t.0 == key).unwrap();
        t.2 = vec![32, 4];
        t.3 = vec![0; 32 * 4 * 4];
    });
    fail_ad(&ad, &[key, "expected shape [64, 4]", "found [32, 4]"]);

    // A key the model does not have (lm_head is not adapted; layer 5 does not exist).
    for stray in [
        "base_model.model.lm_head.lora_A.weight",
        "base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight",
    ] {
        let (_t, ad) = copy_dir(&adapter("peft_roundtrip"), "ad");
        rewrite_safetensors(&ad.join("adapter_model.safetensors"), |ts| {
            ts.push((stray.to_string(), Dtype::F32, vec![4, 64], vec![0; 4 * 64 * 4]));
        });
        fail_ad(&ad, &["unexpected tensor", stray]);
    }

    // A LoRA matrix missing.
    let (_t4, ad) = copy_dir(&adapter("peft_roundtrip"), "ad");
    let key = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight";
    rewrite_safetensors(&ad.join("adapter_model.safetensors"), |ts| {
        ts.retain(|t| t.0 != key)
    });
    fail_ad(&ad, &[key, "missing"]);

    // Weights file missing.
    fs::remove_file(ad.join("adapter_model.safetensors")).unwrap();
    fail_ad(&ad, &["adapter_model.safetensors"]);
}

// ---------------------------------------------------------------- bad model directories

fn gen_args(dir: &Path) -> Vec<String> {
    [
        "generate",
        "--model",
        s(dir),
        "--prompt",
        "hi",
        "--max-new-tokens",
        "2",
    ]
    .map(String::from)
    .to_vec()
}

fn fail_model(dir: &Path, want: &[&str]) -> String {
    let a = gen_args(dir);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    fail(&a, want)
}

#[test]
fn missing_model_dir_and_files() {
    let tmp = tempfile::tempdir().unwrap();
    fail_model(
        &tmp.path().join("nope"),
        &["model directory", "nope", "does not exist"],
    );

    let (_t, m) = copy_model("qwen2");
    fs::write(m.join("tokenizer.json"), "{\"model\": 1}").unwrap();
    fail_model(&m, &["tokenizer.json", "not a valid tokenizer.json"]);
    fs::remove_file(m.join("tokenizer.json")).unwrap();
    fail_model(&m, &["tokenizer.json", "No such file"]);

    // A file where the model directory should be.
    fail_model(&m.join("config.json"), &["config.json", "is not a directory"]);

    fs::remove_file(m.join("model.safetensors")).unwrap();
    fail_model(&m, &["no model.safetensors or model.safetensors.index.json"]);

    fs::remove_file(m.join("config.json")).unwrap();
    fail_model(&m, &["config.json", "No such file"]);
}

#[test]
fn bad_config_json() {
    let (_t, m) = copy_model("mistral");
    let cfg = m.join("config.json");
    let orig = fs::read_to_string(&cfg).unwrap();

    // Malformed JSON: names the file and the line.
    let mut lines: Vec<&str> = orig.lines().collect();
    lines.insert(3, "  \"broken\" 1,");
    fs::write(&cfg, lines.join("\n")).unwrap();
    fail_model(&m, &["config.json", "invalid JSON", "line 4"]);

    // Unsupported architecture: named, with the supported list.
    fs::write(&cfg, &orig).unwrap();
    edit_json(&cfg, |o| {
        o.insert("architectures".into(), json!(["GPT2LMHeadModel"]));
    });
    fail_model(
        &m,
        &[
            "GPT2LMHeadModel",
            "LlamaForCausalLM",
            "Qwen2ForCausalLM",
            "Qwen3ForCausalLM",
            "MistralForCausalLM",
        ],
    );

    // A required key missing.
    for key in ["hidden_size", "vocab_size", "num_hidden_layers"] {
        fs::write(&cfg, &orig).unwrap();
        edit_json(&cfg, |o| {
            o.remove(key);
        });
        fail_model(&m, &["config.json", "missing required key", key]);
    }

    // A key of the wrong type.
    fs::write(&cfg, &orig).unwrap();
    edit_json(&cfg, |o| {
        o.insert("num_attention_heads".into(), json!("four"));
    });
    fail_model(&m, &["config.json", "num_attention_heads"]);

    // An absurd layer count ends in a missing tensor, not an allocation failure.
    fs::write(&cfg, &orig).unwrap();
    edit_json(&cfg, |o| {
        o.insert("num_hidden_layers".into(), json!(1_000_000_000_000u64));
    });
    fail_model(&m, &["model.layers.2.input_layernorm.weight", "missing"]);

    // generation_config.json malformed.
    fs::write(&cfg, &orig).unwrap();
    fs::write(m.join("generation_config.json"), "{\"eos_token_id\": 2,,}").unwrap();
    fail_model(&m, &["generation_config.json", "invalid JSON", "line 1"]);
}

#[test]
fn truncated_safetensors() {
    let (_t, m) = copy_model("qwen2");
    let st = m.join("model.safetensors");
    let bytes = fs::read(&st).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    // Cut inside the 8-byte length (and empty), inside the JSON header, inside the data.
    for cut in [0, 5] {
        fs::write(&st, &bytes[..cut]).unwrap();
        fail_model(
            &m,
            &[
                "model.safetensors",
                "truncated",
                "shorter than the 8-byte header length",
            ],
        );
    }
    let cut = 8 + header_len / 2;
    fs::write(&st, &bytes[..cut]).unwrap();
    let want = format!(
        "the header needs {} bytes but the file has only {cut}",
        8 + header_len
    );
    fail_model(&m, &["model.safetensors", "truncated", &want]);
    for cut in [8 + header_len + 100, bytes.len() - 1] {
        fs::write(&st, &bytes[..cut]).unwrap();
        let want = format!("tensors need {} bytes but the file has only {cut}", bytes.len());
        fail_model(&m, &["model.safetensors", "truncated", &want]);
    }
    // Not truncated but garbage: still a clean error.
    let mut junk = bytes.clone();
    junk[8..16].copy_from_slice(b"]]]]]]]]");
    fs::write(&st, &junk).unwrap();
    fail_model(&m, &["model.safetensors", "not a valid safetensors file"]);

    // A truncated adapter.
    let (_t2, ad) = copy_dir(&adapter("peft_roundtrip"), "ad");
    let f = ad.join("adapter_model.safetensors");
    let b = fs::read(&f).unwrap();
    fs::write(&f, &b[..b.len() / 2]).unwrap();
    fail(
        &[
            "generate",
            "--model",
            s(&model("qwen2")),
            "--prompt",
            "hi",
            "--adapter",
            s(&ad),
        ],
        &["adapter_model.safetensors", "truncated"],
    );
}

#[test]
fn tensor_missing_or_wrong_shape() {
    let (_t, m) = copy_model("qwen2");
    let st = m.join("model.safetensors");
    let orig = fs::read(&st).unwrap();

    let name = "model.layers.1.mlp.up_proj.weight";
    rewrite_safetensors(&st, |ts| ts.retain(|t| t.0 != name));
    fail_model(&m, &[name, "missing", "model.safetensors"]);

    // q/k/v biases are required for Qwen2.
    fs::write(&st, &orig).unwrap();
    let name = "model.layers.0.self_attn.k_proj.bias";
    rewrite_safetensors(&st, |ts| ts.retain(|t| t.0 != name));
    fail_model(&m, &[name, "missing"]);

    // k_proj is [kv_heads·head_dim, hidden] = [32, 64]; store [64, 64].
    fs::write(&st, &orig).unwrap();
    let name = "model.layers.0.self_attn.k_proj.weight";
    rewrite_safetensors(&st, |ts| {
        let t = ts.iter_mut().find(|t| t.0 == name).unwrap();
        t.2 = vec![64, 64];
        t.3 = vec![0; 64 * 64 * 2];
    });
    fail_model(&m, &[name, "expected shape [32, 64]", "found [64, 64]"]);

    // An unsupported dtype.
    fs::write(&st, &orig).unwrap();
    let name = "model.norm.weight";
    rewrite_safetensors(&st, |ts| {
        let t = ts.iter_mut().find(|t| t.0 == name).unwrap();
        t.1 = Dtype::I16;
    });
    fail_model(&m, &[name, "I16", "not supported"]);
}

#[test]
fn sharded_checkpoint_problems() {
    let (_t, m) = copy_model("llama");
    let shard = m.join("model-00002-of-00002.safetensors");
    let orig = fs::read(&shard).unwrap();
    fs::remove_file(&shard).unwrap();
    fail_model(
        &m,
        &["model-00002-of-00002.safetensors", "model.safetensors.index.json"],
    );

    // A tensor the index names, gone from its shard.
    fs::write(&shard, &orig).unwrap();
    let name = "model.layers.1.self_attn.o_proj.weight";
    rewrite_safetensors(&shard, |ts| ts.retain(|t| t.0 != name));
    fail_model(&m, &[name, "missing"]);

    // Malformed index.
    fs::write(&shard, &orig).unwrap();
    fs::write(m.join("model.safetensors.index.json"), "{\"weight_map\": [}").unwrap();
    fail_model(&m, &["model.safetensors.index.json", "invalid JSON"]);
}

// ---------------------------------------------------------------- bad inputs

#[test]
fn bad_jsonl_inputs() {
    let m = model("qwen2");
    let tmp = tempfile::tempdir().unwrap();
    let gen_in = |name: &str, text: &str, want: &[&str]| {
        let p = tmp.path().join(name);
        fs::write(&p, text).unwrap();
        fail(
            &[
                "generate",
                "--model",
                s(&m),
                "--input",
                s(&p),
                "--max-new-tokens",
                "2",
            ],
            want,
        )
    };
    gen_in(
        "a.jsonl",
        "{\"prompt\": \"hi\"}\n\n{\"prompt\": \"x\",\n",
        &["a.jsonl:3:", "invalid JSON"],
    );
    gen_in(
        "b.jsonl",
        "{\"prompt\": \"hi\", \"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}\n",
        &["b.jsonl:1:", "both \"prompt\" and \"messages\""],
    );
    gen_in(
        "c.jsonl",
        "{\"prompt_ids\": [5]}\n{\"prompt_ids\": [5, 461]}\n",
        &["c.jsonl:2", "461"],
    );
    gen_in("d.jsonl", "\n\n", &["d.jsonl", "no inputs"]);
    gen_in(
        "e.jsonl",
        "{\"text\": \"hi\"}\n",
        &["e.jsonl:1:", "missing prompt"],
    );
    gen_in("f.jsonl", "{\"prompt_ids\": [1, -2]}\n", &["f.jsonl:1:", "-2"]);
    fail(
        &[
            "generate",
            "--model",
            s(&m),
            "--input",
            s(&tmp.path().join("none.jsonl")),
        ],
        &["none.jsonl", "No such file"],
    );

    // score: completion missing, completion id outside the vocabulary.
    let p = jsonl(tmp.path(), "s1.jsonl", &[json!({"prompt_ids": [5]})]);
    fail(
        &["score", "--model", s(&m), "--input", s(&p)],
        &["s1.jsonl:1:", "missing completion"],
    );
    let p = jsonl(
        tmp.path(),
        "s2.jsonl",
        &[
            json!({"prompt_ids": [5], "completion_ids": [3]}),
            json!({"prompt_ids": [5], "completion_ids": [3, 999]}),
        ],
    );
    fail(
        &["score", "--model", s(&m), "--input", s(&p)],
        &["s2.jsonl:2", "999"],
    );
}

#[test]
fn messages_without_chat_template() {
    let (_t, m) = copy_model("llama");
    fs::remove_file(m.join("chat_template.jinja")).unwrap();
    let p = jsonl(
        m.parent().unwrap(),
        "in.jsonl",
        &[
            json!({"prompt": "ok"}),
            json!({"messages": [{"role": "user", "content": "hi"}]}),
        ],
    );
    fail(
        &[
            "generate",
            "--model",
            s(&m),
            "--input",
            s(&p),
            "--max-new-tokens",
            "2",
        ],
        &["in.jsonl:2", "no chat_template"],
    );
    fail(
        &["generate", "--model", s(&m), "--prompt", "hi", "--chat"],
        &["no chat_template"],
    );
}

#[test]
fn prompt_longer_than_context() {
    // max_position_embeddings is 128 for every fixture.
    let m = model("qwen2");
    let tmp = tempfile::tempdir().unwrap();
    let long: Vec<u32> = (0..200).map(|i| 3 + i % 400).collect();
    let p = jsonl(tmp.path(), "long.jsonl", &[json!({"prompt_ids": long})]);
    fail(
        &[
            "generate",
            "--model",
            s(&m),
            "--input",
            s(&p),
            "--max-new-tokens",
            "2",
        ],
        &["long.jsonl:1", "200 tokens", "context of 128"],
    );
    // Exactly the context: no room for one generated token.
    let p = jsonl(tmp.path(), "ctx.jsonl", &[json!({"prompt_ids": vec![5; 128]})]);
    fail(
        &["generate", "--model", s(&m), "--input", s(&p)],
        &["128 tokens", "context of 128"],
    );
    // One less fits and stops at the context with "length".
    let p = jsonl(tmp.path(), "fit.jsonl", &[json!({"prompt_ids": vec![5; 127]})]);
    let out = ok(&["generate", "--model", s(&m), "--input", s(&p), "--ignore-eos"]);
    assert_eq!(out[0]["finish_reason"], "length");
    assert_eq!(ids(&out[0]["completion_ids"]).len(), 1);
    // A long raw-text prompt.
    let text = "The quick brown fox jumps over the lazy dog. ".repeat(30);
    fail(
        &["generate", "--model", s(&m), "--prompt", &text],
        &["context of 128"],
    );
    // score: prompt + completion over the context.
    let p = jsonl(
        tmp.path(),
        "score.jsonl",
        &[json!({"prompt_ids": vec![5; 100], "completion_ids": vec![6; 40]})],
    );
    fail(
        &["score", "--model", s(&m), "--input", s(&p)],
        &["140 tokens", "context of 128"],
    );
}

#[test]
fn bad_options() {
    let m = model("qwen2");
    let base = ["generate", "--model", s(&m), "--prompt", "hi"];
    let with = |extra: &[&str], want: &[&str]| {
        let mut a = base.to_vec();
        a.extend_from_slice(extra);
        fail(&a, want)
    };
    with(&["--top-p", "1.5"], &["top_p", "1.5"]);
    with(&["--top-p", "0"], &["top_p"]);
    with(&["--temperature=-1"], &["temperature", "-1"]);
    with(&["--temperature", "nan"], &["temperature"]);
    with(&["--min-p", "1"], &["min_p", "1"]);
    with(&["--num-samples", "0"], &["num_samples"]);
    with(&["--batch-size", "0"], &["batch-size"]);
    with(&["--max-new-tokens", "0"], &["max_new_tokens must be at least 1"]);
    fail(&["generate", "--model", s(&m), "--prompt", ""], &["zero tokens"]);
    let tmp = tempfile::tempdir().unwrap();
    let p = jsonl(
        tmp.path(),
        "s.jsonl",
        &[json!({"prompt_ids": [5], "completion_ids": [6]})],
    );
    fail(
        &["score", "--model", s(&m), "--input", s(&p), "--temperature", "0"],
        &["temperature"],
    );
}

#[test]
fn cuda_without_gpu_is_a_clear_error() {
    let out = run(&[
        "generate",
        "--model",
        s(&model("qwen2")),
        "--prompt",
        "hi",
        "--device",
        "cuda",
    ]);
    if out.status.success() {
        return; // a machine where the CUDA engine runs
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    let line = stderr.trim_end();
    assert_eq!(line.lines().count(), 1, "{stderr:?}");
    assert!(line.starts_with("error: --device cuda: "), "{line}");
    assert!(
        line.len() > "error: --device cuda: ".len() + 20,
        "no reason given: {line}"
    );
}

// ---------------------------------------------------------------- sft, merge, train, bench

/// One-line SFT data for the qwen2 fixture.
fn sft_data(dir: &Path) -> PathBuf {
    jsonl(
        dir,
        "sft.jsonl",
        &[
            json!({"prompt_ids": [57, 210, 33], "completion_ids": [91, 300]}),
            json!({"prompt_ids": [120, 5], "completion_ids": [402, 19]}),
        ],
    )
}

#[test]
fn sft_bad_options_and_data() {
    let m = model("qwen2");
    let tmp = tempfile::tempdir().unwrap();
    let data = sft_data(tmp.path());
    let out = tmp.path().join("out");
    let sft = |data: &Path, extra: &[&str], want: &[&str]| {
        let mut a = vec![
            "sft",
            "--model",
            s(&m),
            "--data",
            s(data),
            "--output",
            s(&out),
            "--max-steps",
            "1",
        ];
        a.extend_from_slice(extra);
        fail(&a, want);
        assert!(!out.exists(), "a failed sft wrote {}", out.display());
    };
    // Values that trained with NaN / no effect and exited 0.
    sft(&data, &["--lora-alpha", "nan"], &["--lora-alpha", "NaN"]);
    sft(&data, &["--lora-dropout", "1.5"], &["--lora-dropout", "[0, 1)"]);
    sft(&data, &["--max-grad-norm", "nan"], &["--max-grad-norm"]);
    sft(&data, &["--log-every", "0"], &["--log-every", "at least 1"]);
    // Negative numbers reach the check (was clap's "unexpected argument '-1'").
    sft(&data, &["--lr", "-1"], &["--lr", "-1"]);
    sft(&data, &["--weight-decay", "-1"], &["--weight-decay", "-1"]);
    sft(&data, &["--warmup-ratio", "2"], &["--warmup-ratio", "2"]);
    // An empty completion with --no-eos trains on nothing.
    let empty = jsonl(
        tmp.path(),
        "empty.jsonl",
        &[json!({"prompt": "hi", "completion": ""})],
    );
    sft(&empty, &["--no-eos"], &["empty.jsonl:1", "completion is empty"]);
    // Over the context: the file and line, not "example 0".
    let long = jsonl(
        tmp.path(),
        "long.jsonl",
        &[
            json!({"prompt_ids": [5], "completion_ids": [6]}),
            json!({"prompt_ids": vec![5; 100], "completion_ids": vec![6; 60]}),
        ],
    );
    sft(&long, &[], &["long.jsonl:2", "context of 128"]);
}

#[test]
fn sft_and_merge_outputs_are_checked_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let data = sft_data(tmp.path());
    let ad = adapter("peft_roundtrip");
    // The base model itself as the output: was overwritten (f32, after training).
    let (_t, m) = copy_model("qwen2");
    let before = fs::read(m.join("model.safetensors")).unwrap();
    fail(
        &[
            "sft",
            "--model",
            s(&m),
            "--data",
            s(&data),
            "--output",
            s(&m),
            "--full",
        ],
        &["--output", "is the --model directory"],
    );
    fail(
        &["merge", "--model", s(&m), "--adapter", s(&ad), "--out", s(&m)],
        &["--out", "is the --model directory"],
    );
    fail(
        &["merge", "--model", s(&m), "--adapter", s(&ad), "--out", s(&ad)],
        &["--out", "is the --adapter directory"],
    );
    assert_eq!(before, fs::read(m.join("model.safetensors")).unwrap());

    // A file as the output: was reported only after the training.
    let file = tmp.path().join("file");
    fs::write(&file, "x").unwrap();
    fail(
        &["sft", "--model", s(&m), "--data", s(&data), "--output", s(&file)],
        &["--output", "file", "not a directory"],
    );

    // Another model's directory: its shards and index stayed and shadowed the merged weights.
    let (_t2, other) = copy_model("llama");
    let out = fail(
        &["merge", "--model", s(&m), "--adapter", s(&ad), "--out", s(&other)],
        &["--out", "already holds", "mixed"],
    );
    assert!(out.contains("model-00001-of-00002.safetensors"), "{out}");
    assert!(other.join("model.safetensors.index.json").exists());

    // A directory of an earlier merge is replaced, stale optional files removed.
    let merged = tmp.path().join("merged");
    ok(&[
        "merge",
        "--model",
        s(&m),
        "--adapter",
        s(&ad),
        "--out",
        s(&merged),
    ]);
    fs::write(merged.join("chat_template.jinja"), "{{ stale }}").unwrap();
    ok(&[
        "merge",
        "--model",
        s(&m),
        "--adapter",
        s(&ad),
        "--out",
        s(&merged),
    ]);
    assert!(!merged.join("chat_template.jinja").exists());
    // …but not an adapter directory with an sft --full.
    fail(
        &[
            "sft",
            "--model",
            s(&m),
            "--data",
            s(&data),
            "--output",
            s(&ad),
            "--full",
        ],
        &["already holds adapter_config.json"],
    );
}

#[test]
fn generate_rejects_empty_stop_and_negative_values_clearly() {
    let m = model("qwen2");
    fail(
        &["generate", "--model", s(&m), "--prompt", "hi", "--stop", ""],
        &["--stop", "empty"],
    );
    fail(
        &[
            "generate",
            "--model",
            s(&m),
            "--prompt",
            "hi",
            "--temperature",
            "-1",
        ],
        &["temperature", "-1"],
    );
    fail(
        &["generate", "--model", s(&m), "--prompt", "hi", "--top-p", "-0.5"],
        &["top_p", "-0.5"],
    );
}

#[test]
fn model_config_values_that_gave_nan_or_never_stopped() {
    for (key, value, want) in [
        ("rms_norm_eps", json!(-1.0), "rms_norm_eps"),
        ("max_position_embeddings", json!(0), "max_position_embeddings"),
        ("intermediate_size", json!(0), "intermediate_size"),
        (
            "eos_token_id",
            json!(99999),
            "eos_token_id 99999 is outside the vocabulary",
        ),
    ] {
        let (_t, m) = copy_model("qwen2");
        edit_json(&m.join("config.json"), |o| {
            o.insert(key.into(), value);
        });
        fail_model(&m, &["config.json", want]);
    }
    let (_t, m) = copy_model("qwen2");
    fs::write(m.join("generation_config.json"), "{\"eos_token_id\": [2, 500]}").unwrap();
    fail_model(
        &m,
        &["generation_config.json", "eos_token_id 500", "vocab_size 461"],
    );
}

#[test]
fn bench_arguments_are_checked_without_a_gpu() {
    fail(
        &["bench", "rollout", "--shape", "gpt5"],
        &["unknown shape \"gpt5\""],
    );
    fail(&["bench", "rollout", "--prompts", "0"], &["--prompts"]);
    fail(
        &["bench", "rollout", "--peak-bandwidth", "0"],
        &["--peak-bandwidth"],
    );
    fail(
        &["bench", "rollout", "--prompt-len", "100000"],
        &["--prompt-len 100000", "context"],
    );
    fail(
        &["bench", "train", "--seq-len", "10", "--prompt-len", "20"],
        &["--prompt-len"],
    );
    fail(&["bench", "train", "--steps", "0"], &["--steps"]);
    fail(
        &["bench", "train", "--seq-len", "100000"],
        &["--seq-len 100000", "context"],
    );
    fail(
        &["bench", "train", "--max-train-memory-gib", "-1"],
        &["--max-train-memory-gib", "-1"],
    );
}

/// A 1-step config on the tiny model (2-digit addition).
fn train_config(dir: &Path, name: &str, extra_top: &str, lora_r: usize) -> PathBuf {
    let p = dir.join(name);
    let text = format!(
        "seed = 0\nprompts_per_step = 4\nnum_generations = 4\nmax_completion_length = 4\n\
         max_steps = 1\neval_steps = 0\ndevice = \"cpu\"\n{extra_top}\n\
         [model]\npath = \"{}\"\n\n[data]\ntask = \"arithmetic\"\nformat = \"plain\"\ndigits = 2\n\
         ops = [\"+\"]\nnum_train = 40\nnum_val = 8\nseed = 7\n\n[lora]\nr = {lora_r}\nalpha = 8\n",
        root().join("models/tiny").display()
    );
    fs::write(&p, text).unwrap();
    p
}

#[test]
fn train_keeps_earlier_runs_and_resumes_only_what_it_saved() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cfg = train_config(d, "c.toml", "", 4);
    let run_dir = d.join("run");
    let o = run(&["train", s(&cfg), "--output-dir", s(&run_dir), "--quiet"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let metrics = fs::read(run_dir.join("metrics.jsonl")).unwrap();
    let state = fs::read(run_dir.join("checkpoint/trainer_state.json")).unwrap();

    // A fresh run into it appended to its metrics.jsonl and replaced its checkpoint.
    fail(
        &["train", s(&cfg), "--output-dir", s(&run_dir), "--quiet"],
        &["--output-dir", "already holds a run", "--resume"],
    );
    let cfg_out = train_config(d, "o.toml", &format!("output_dir = \"{}\"", run_dir.display()), 4);
    fail(
        &["train", s(&cfg_out), "--quiet"],
        &["output_dir", "already holds a run"],
    );
    let file = d.join("file");
    fs::write(&file, "x").unwrap();
    fail(
        &["train", s(&cfg), "--output-dir", s(&file), "--quiet"],
        &["not a directory"],
    );

    // Resuming with a config the checkpoint does not match: was silently the checkpoint's.
    let r8 = train_config(d, "r8.toml", "", 8);
    fail(
        &[
            "train",
            s(&r8),
            "--resume",
            s(&run_dir),
            "--max-steps",
            "2",
            "--quiet",
        ],
        &["trainer_state.json", "lora.r = 4", "8"],
    );
    let full = train_config(d, "full.toml", "", 4);
    let text = fs::read_to_string(&full)
        .unwrap()
        .replace("[model]\n", "[model]\nfull_fine_tuning = true\n");
    fs::write(&full, text).unwrap();
    fail(
        &[
            "train",
            s(&full),
            "--resume",
            s(&run_dir),
            "--max-steps",
            "2",
            "--quiet",
        ],
        &["LoRA adapter", "full_fine_tuning"],
    );
    let more = d.join("more.toml");
    fs::write(
        &more,
        fs::read_to_string(&cfg)
            .unwrap()
            .replace("num_train = 40", "num_train = 80"),
    )
    .unwrap();
    fail(
        &[
            "train",
            s(&more),
            "--resume",
            s(&run_dir),
            "--max-steps",
            "2",
            "--quiet",
        ],
        &["40 training prompts", "80"],
    );
    assert_eq!(metrics, fs::read(run_dir.join("metrics.jsonl")).unwrap());
    assert_eq!(
        state,
        fs::read(run_dir.join("checkpoint/trainer_state.json")).unwrap()
    );

    // The run's own config continues it.
    let o = run(&[
        "train",
        s(&cfg),
        "--resume",
        s(&run_dir),
        "--max-steps",
        "2",
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// A copy of the files of `src` (not its subdirectories) at `dst`; with `perturb`, every f32
/// weight's mantissa bits 8..15 flipped (the same shapes and header, slightly other weights).
fn copy_files(src: &Path, dst: &Path, perturb: bool) {
    fs::create_dir_all(dst).unwrap();
    for e in fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        if !p.is_file() {
            continue;
        }
        let mut bytes = fs::read(&p).unwrap();
        if perturb && p.extension().is_some_and(|x| x == "safetensors") {
            let data = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            let st = SafeTensors::deserialize(&bytes).unwrap();
            assert!(st.tensors().iter().all(|(_, t)| t.dtype() == Dtype::F32));
            for (i, b) in bytes[data..].iter_mut().enumerate() {
                if i % 4 == 1 {
                    *b ^= 0xff;
                }
            }
        }
        fs::write(dst.join(p.file_name().unwrap()), bytes).unwrap();
    }
}

/// `--resume` with a config whose `[model] path` is another base model of the same shape:
/// refused (the adapter would silently go onto other weights), naming both models. A copy of
/// the same model elsewhere resumes (the check is on the contents, not the path), and so does a
/// checkpoint written before the base model was recorded.
#[test]
fn resume_refuses_another_base_model_of_the_same_shape() {
    use rft::trainer::state::base_model_fingerprint;
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let tiny = root().join("models/tiny");
    let (same, other) = (d.join("tiny_copy"), d.join("tiny_other"));
    copy_files(&tiny, &same, false);
    copy_files(&tiny, &other, true);
    let fp = |p: &Path| base_model_fingerprint(p).unwrap();
    assert_eq!(fp(&same), fp(&tiny), "a moved copy is the same model");
    assert_ne!(fp(&other), fp(&tiny), "other weights, same header");
    assert_ne!(fp(&model("llama")), fp(&model("qwen2")));
    // The perturbed copy loads as a model of the same shape.
    let mc = |p: &Path| rft::model::config::ModelConfig::from_dir(p).unwrap();
    assert_eq!(format!("{:?}", mc(&other)), format!("{:?}", mc(&tiny)));

    let cfg = train_config(d, "c.toml", "", 4);
    let with_model = |name: &str, m: &Path| {
        let p = d.join(name);
        let text = fs::read_to_string(&cfg).unwrap();
        fs::write(
            &p,
            text.replace(&tiny.display().to_string(), &m.display().to_string()),
        )
        .unwrap();
        p
    };
    let (cfg_same, cfg_other) = (with_model("same.toml", &same), with_model("other.toml", &other));
    let run_dir = d.join("run");
    let o = run(&["train", s(&cfg), "--output-dir", s(&run_dir), "--quiet"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let state_path = run_dir.join("checkpoint/trainer_state.json");
    let state: Value = serde_json::from_slice(&fs::read(&state_path).unwrap()).unwrap();
    assert_eq!(state["config"]["base_model_fingerprint"], fp(&tiny).as_str());
    let (metrics, state_bytes) = (
        fs::read(run_dir.join("metrics.jsonl")).unwrap(),
        fs::read(&state_path).unwrap(),
    );
    let resume = |cfg: &Path, dir: &Path| {
        vec![
            "train".to_string(),
            s(cfg).into(),
            "--resume".into(),
            s(dir).into(),
            "--max-steps".into(),
            "2".into(),
            "--quiet".into(),
        ]
    };
    let args = resume(&cfg_other, &run_dir);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    fail(
        &args,
        &[
            "trainer_state.json",
            "different model",
            s(&tiny),
            s(&other),
            "[model] path",
            "--output-dir",
        ],
    );
    assert_eq!(metrics, fs::read(run_dir.join("metrics.jsonl")).unwrap());
    assert_eq!(state_bytes, fs::read(&state_path).unwrap());

    // A checkpoint without the record (written before it existed) is not checked.
    let old = d.join("old");
    copy_files(&run_dir, &old, false);
    copy_files(&run_dir.join("checkpoint"), &old.join("checkpoint"), false);
    let mut st = state.clone();
    st["config"]
        .as_object_mut()
        .unwrap()
        .remove("base_model_fingerprint");
    fs::write(old.join("checkpoint/trainer_state.json"), st.to_string()).unwrap();
    let args = resume(&cfg_other, &old);
    let o = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // The same model under another path continues the run.
    let args = resume(&cfg_same, &run_dir);
    let o = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let st: Value = serde_json::from_slice(&fs::read(&state_path).unwrap()).unwrap();
    assert_eq!(st["step"], 2);
}

/// `NAME.toml` in `d`: GRPO on models/tiny (G = 2, 2 prompts a step) over `rows` written to
/// `NAME.jsonl`, graded by a numeric grader against `{{ item.FIELD }}`.
fn numeric_task_config(d: &Path, name: &str, rows: &[Value], field: &str) -> PathBuf {
    jsonl(d, &format!("{name}.jsonl"), rows);
    let cfg = d.join(format!("{name}.toml"));
    fs::write(
        &cfg,
        format!(
            "device = \"cpu\"\nnum_generations = 2\nprompts_per_step = 2\n[model]\npath = \"{}\"\n\
             [data]\npath = \"{name}.jsonl\"\nval_size = 2\n[grader]\ntype = \"numeric\"\n\
             reference = \"{{{{ item.{field} }}}}\"\n",
            root().join("models/tiny").display()
        ),
    )
    .unwrap();
    cfg
}

#[test]
fn grader_template_field_missing_from_the_data() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let rows: Vec<Value> = (0..10)
        .map(|i| json!({"prompt": format!("{i}+1="), "answer": (i + 1).to_string()}))
        .collect();
    let cfg = numeric_task_config(d, "g", &rows, "answr");
    // Every grade failed quietly: reward 0 for the whole run, exit 0.
    fail(&["eval", s(&cfg)], &["item.answr", "no field `answr`", "answer"]);
}

#[test]
fn resume_after_a_crash_does_not_log_steps_twice() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cfg = train_config(d, "c.toml", "", 4);
    let run_dir = d.join("run");
    let o = run(&["train", s(&cfg), "--output-dir", s(&run_dir), "--quiet"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // A crash after the checkpoint of step 1: step 2 was logged, then a torn line.
    let metrics = run_dir.join("metrics.jsonl");
    let text = fs::read_to_string(&metrics).unwrap();
    let step1 = text.lines().find(|l| l.contains("\"kind\":\"train\"")).unwrap();
    let step2 = step1.replace("\"step\":1", "\"step\":2");
    fs::write(&metrics, format!("{text}{step2}\n{{\"kind\":\"tr")).unwrap();
    let o = run(&["train", "--resume", s(&run_dir), "--max-steps", "2", "--quiet"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let train_steps: Vec<u64> = fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("a whole JSON line"))
        .filter(|v| v["kind"] == "train")
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(train_steps, [1, 2]);
}

#[test]
fn train_prompt_longer_than_the_context_and_empty_plot() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // The tiny model's context is 64 tokens (one a character).
    let rows: Vec<Value> = (0..6)
        .map(|i| json!({"prompt": format!("{}{i}=", "1+".repeat(40)), "answer": "1"}))
        .collect();
    let cfg = numeric_task_config(d, "long", &rows, "answer");
    let out = d.join("out");
    // Was: the error in the middle of the first validation, "prompt 0", after the run began.
    fail(
        &["train", s(&cfg), "--output-dir", s(&out), "--quiet"],
        &[
            "training prompt 1 of 4",
            "82 tokens",
            "context of 64",
            "max_prompt_length ≤ 63",
        ],
    );
    assert!(!out.exists());
    // An empty metrics.jsonl drew an empty plot and exited 0.
    fs::create_dir(&out).unwrap();
    fs::write(out.join("metrics.jsonl"), "").unwrap();
    fail(&["plot", s(&out)], &["metrics.jsonl", "no records"]);
}

#[test]
fn resume_without_a_checkpoint_says_where_one_was_expected() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    fail(
        &["train", "--resume", s(&d.join("nowhere"))],
        &["--resume", "nowhere", "no such run directory"],
    );
    let run_dir = d.join("run");
    fs::create_dir(&run_dir).unwrap();
    fail(
        &["train", "--resume", s(&run_dir)],
        &["no checkpoint there", "checkpoint/trainer_state.json"],
    );
    // A save cut between its two renames: the complete new checkpoint is still in its temp dir
    // and the previous one was moved aside; the newer one is the one to resume from.
    for ck in [".checkpoint.old1234", ".checkpoint.tmp1234"] {
        fs::create_dir(run_dir.join(ck)).unwrap();
        fs::write(run_dir.join(ck).join("trainer_state.json"), "{}").unwrap();
    }
    fail(
        &["train", "--resume", s(&run_dir)],
        &["a save was interrupted", ".checkpoint.tmp1234", "rename it"],
    );
}

#[test]
fn absurd_num_samples_is_an_error_not_an_abort() {
    // Was: "memory allocation of … bytes failed", a backtrace and SIGABRT.
    fail(
        &[
            "generate",
            "--model",
            s(&model("qwen2")),
            "--prompt",
            "hi",
            "--num-samples",
            "100000000000000",
            "--max-new-tokens",
            "1",
        ],
        &["num_samples 100000000000000", "do not fit in memory"],
    );
}

/// Rewrites `dir`'s safetensors with the first `n` rows of every `[vocab, ..]` tensor.
fn shrink_vocab(dir: &Path, vocab: usize, n: usize) {
    rewrite_safetensors(&dir.join("model.safetensors"), |ts| {
        for t in ts.iter_mut().filter(|t| t.2.first() == Some(&vocab)) {
            let row = t.3.len() / vocab;
            t.2[0] = n;
            t.3.truncate(row * n);
        }
    });
    edit_json(&dir.join("config.json"), |o| {
        o.insert("vocab_size".into(), json!(n));
    });
}

#[test]
fn train_tokenizer_beyond_the_model_vocabulary() {
    // The tiny model's 16 tokens cut to 12: "+" and "=" encode outside it.
    let (_t, m) = copy_dir(&root().join("models/tiny"), "tiny");
    shrink_vocab(&m, 16, 12);
    let d = m.parent().unwrap();
    let cfg = train_config(d, "c.toml", "", 4);
    let text = fs::read_to_string(&cfg).unwrap().replace(
        &root().join("models/tiny").display().to_string(),
        &m.display().to_string(),
    );
    fs::write(&cfg, text).unwrap();
    let out = d.join("out");
    // Was: "prompt 0: token id 13 …" in the first validation, after "output in …".
    fail(
        &["train", s(&cfg), "--output-dir", s(&out), "--quiet"],
        &[
            "training prompt 1 of 40",
            "outside the model's vocabulary of 12",
            "tokenizer",
        ],
    );
    assert!(!out.exists());
}
