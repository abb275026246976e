//! `rft sft` and `rft merge` end to end through the binary:
//! - merge: score and generate with the merged directory equal base + adapter (1e-4);
//! - sft from scratch (`--init-random`, a model dir with only config + tokenizer): the loss
//!   falls, the output is an HF dir that `rft generate` loads;
//! - sft of a LoRA adapter: a PEFT adapter that `rft score --adapter` loads;
//! - bad arguments fail with a readable message.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rft(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rft"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json_lines(s: &str) -> Vec<Value> {
    s.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn merge_equals_base_plus_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let model = root().join("tests/fixtures/models/qwen2");
    let adapter = root().join("tests/fixtures/train/peft_roundtrip");
    let merged = tmp.path().join("merged");
    let (ok, _, err) = rft(&[
        "merge",
        "--model",
        p(&model),
        "--adapter",
        p(&adapter),
        "--out",
        p(&merged),
    ]);
    assert!(ok, "{err}");
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(merged.join(f).exists(), "{f}");
    }
    let items = adapter.join("items.jsonl");
    let (ok1, live, e1) = rft(&[
        "score",
        "--model",
        p(&model),
        "--adapter",
        p(&adapter),
        "--input",
        p(&items),
    ]);
    let (ok2, merged_scores, e2) = rft(&["score", "--model", p(&merged), "--input", p(&items)]);
    assert!(ok1 && ok2, "{e1} {e2}");
    let (a, b) = (json_lines(&live), json_lines(&merged_scores));
    assert_eq!(a.len(), 2);
    let mut max = 0f64;
    for (x, y) in a.iter().zip(&b) {
        for (u, v) in x["logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .zip(y["logprobs"].as_array().unwrap())
        {
            max = max.max((u.as_f64().unwrap() - v.as_f64().unwrap()).abs());
        }
    }
    eprintln!("merge: max |logp(merged) − logp(base+adapter)| = {max:.1e}");
    // The merged weights are W + s·B·A rounded once to f32 (saved as F32), against x·W +
    // s·(x·A)·B computed live: f32 reassociation only, ~1e-6 on these 2-layer width-64
    // models; a merge with a wrong scale or a transposed B·A moves log-probs by > 1e-2.
    assert!(max < 1e-4, "{max}");
    // Generation: same tokens, log-probs within 1e-4 (same reason).
    let gen = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--prompt",
            "hello world",
            "--max-new-tokens",
            "12",
            "--seed",
            "5",
            "--num-samples",
            "2",
            "--ignore-eos",
        ];
        args.extend_from_slice(extra);
        let (ok, out, err) = rft(&args);
        assert!(ok, "{err}");
        json_lines(&out)
    };
    let g1 = gen(&["--model", p(&model), "--adapter", p(&adapter)]);
    let g2 = gen(&["--model", p(&merged)]);
    for (x, y) in g1.iter().zip(&g2) {
        assert_eq!(x["completion_ids"], y["completion_ids"]);
        for (u, v) in x["logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .zip(y["logprobs"].as_array().unwrap())
        {
            assert!((u.as_f64().unwrap() - v.as_f64().unwrap()).abs() < 1e-4);
        }
    }
    // The adapter must matter (a merge that ignored it would pass the checks above trivially).
    let (_, base_scores, _) = rft(&["score", "--model", p(&model), "--input", p(&items)]);
    assert_ne!(json_lines(&base_scores)[0]["logprobs"], a[0]["logprobs"]);
    // Bad input: an adapter for a model of other shapes (qwen3 fixture: head_dim 32).
    let qwen3 = root().join("tests/fixtures/models/qwen3");
    let (ok, _, err) = rft(&[
        "merge",
        "--model",
        p(&qwen3),
        "--adapter",
        p(&adapter),
        "--out",
        p(&tmp.path().join("x")),
    ]);
    assert!(
        !ok && err.starts_with("error:") && err.contains("--adapter"),
        "{err}"
    );
}

fn write_data(path: &Path) {
    let mut s = String::new();
    for i in 0..12 {
        s += &serde_json::json!({"prompt": format!("add {i} and {}:", i + 1), "completion": format!(" {}", 2 * i + 1)}).to_string();
        s.push('\n');
    }
    std::fs::write(path, s).unwrap();
}

fn losses(stdout: &str) -> Vec<f64> {
    json_lines(stdout)
        .iter()
        .map(|l| l["loss"].as_f64().unwrap())
        .collect()
}

#[test]
fn sft_from_scratch_writes_a_loadable_model() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    std::fs::create_dir(&m).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(root().join("tests/fixtures/models/qwen2").join(f), m.join(f)).unwrap();
    }
    let data = tmp.path().join("d.jsonl");
    write_data(&data);
    // One training command; only the output dir and the logging interval vary below.
    let sft = |out: &std::path::Path, log_every: &str| {
        rft(&[
            "sft",
            "--model",
            p(&m),
            "--data",
            p(&data),
            "--output",
            p(out),
            "--init-random",
            "3",
            "--epochs",
            "20",
            "--batch-size",
            "4",
            "--micro-batch-size",
            "3",
            "--lr",
            "3e-3",
            "--lr-scheduler",
            "cosine",
            "--warmup-ratio",
            "0.1",
            "--log-every",
            log_every,
        ])
    };
    let out = tmp.path().join("out");
    let (ok, stdout, err) = sft(&out, "10");
    assert!(ok, "{err}");
    let l = losses(&stdout);
    assert_eq!(l.len(), 6, "{stdout}");
    assert!(l[5] < 0.1 * l[0], "loss falls: {l:?}");
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(out.join(f).exists(), "{f}");
    }
    let (ok, stdout, err) = rft(&[
        "generate",
        "--model",
        p(&out),
        "--prompt",
        "add 3 and 4:",
        "--max-new-tokens",
        "4",
        "--temperature",
        "0",
    ]);
    assert!(ok, "{err}");
    assert_eq!(json_lines(&stdout)[0]["completion"], " 7", "{stdout}");
    // Same seed, same result, bit for bit (deterministic training; logging does not matter).
    let out2 = tmp.path().join("out2");
    let (ok, _, _) = sft(&out2, "1");
    assert!(ok);
    let same = std::fs::read(out.join("model.safetensors")).unwrap()
        == std::fs::read(out2.join("model.safetensors")).unwrap();
    assert!(same, "two identical runs differ");
    // Without --init-random the weight-less dir is an error.
    let (ok, _, err) = rft(&[
        "sft",
        "--model",
        p(&m),
        "--data",
        p(&data),
        "--output",
        p(&out2),
        "--full",
    ]);
    assert!(!ok && err.contains("safetensors"), "{err}");
}

#[test]
fn sft_lora_writes_a_peft_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let model = root().join("tests/fixtures/models/qwen2");
    let data = tmp.path().join("d.jsonl");
    write_data(&data);
    let out = tmp.path().join("adapter");
    let (ok, stdout, err) = rft(&[
        "sft",
        "--model",
        p(&model),
        "--data",
        p(&data),
        "--output",
        p(&out),
        "--lora-r",
        "8",
        "--lora-alpha",
        "16",
        "--target-modules",
        "q_proj,v_proj,down_proj",
        "--epochs",
        "5",
        "--batch-size",
        "4",
        "--lr",
        "1e-2",
        "--log-every",
        "1",
        "--max-steps",
        "12",
    ]);
    assert!(ok, "{err}");
    let l = losses(&stdout);
    assert_eq!(l.len(), 12);
    assert!(l[11] < l[0], "loss falls: {l:?}");
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["r"], 8);
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["q_proj", "v_proj", "down_proj"])
    );
    let items = root().join("tests/fixtures/train/peft_roundtrip/items.jsonl");
    let (ok, _, err) = rft(&[
        "score",
        "--model",
        p(&model),
        "--adapter",
        p(&out),
        "--input",
        p(&items),
    ]);
    assert!(ok, "{err}");
    // Bad arguments.
    let (ok, _, err) = rft(&[
        "sft",
        "--model",
        p(&model),
        "--data",
        p(&data),
        "--output",
        p(&out),
        "--target-modules",
        "c_attn",
    ]);
    assert!(!ok && err.contains("c_attn"), "{err}");
    let (ok, _, err) = rft(&[
        "sft",
        "--model",
        p(&model),
        "--data",
        p(&data),
        "--output",
        p(&out),
        "--lr-scheduler",
        "step",
    ]);
    assert!(!ok && err.contains("lr-scheduler"), "{err}");
}
