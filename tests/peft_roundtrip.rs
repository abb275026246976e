//! rft's outputs in the Python stack (fixtures: tests/fixtures/train/rft_roundtrip/, made by
//! scripts/make_roundtrip_fixtures.sh; the peft -> rft direction is in tests/cli.rs):
//! (a) an adapter saved by rft, loaded by peft, gives the logprobs `rft score --adapter` gives;
//! (b) loading that adapter with `rft::lora::peft::load` and saving it again is lossless;
//! (c) the committed adapter is rft's output: the same `rft sft` command reproduces it bit for bit;
//! (d) `rft merge`, `rft sft --full` and `rft sft --init-random` write HF checkpoints that
//!     transformers loads (checked by the script) to the same weights (sha256 of
//!     model.safetensors) and the same logprobs as `rft score` on them.
//!
//! Tolerance 1e-4 on logprobs: rft computes in f32 (CPU reference); the fixtures hold peft's /
//! transformers' f64 forward of the same f32 weights (`logprobs`) and their f32 forward
//! (`logprobs_f32`). f32 rounding in matmuls, RMSNorm, RoPE and softmax over these tiny models
//! (hidden 64, 2 layers, vocab 461, <= 14 positions) moves logprobs by ~5e-6 (measured max
//! 5.5e-6 rft vs peft f64, 4.3e-6 rft vs peft f32); 1e-4 is 20x that and still far below what a
//! wrong key, scale or transpose does (the adapter moves logprobs by > 0.5).

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

const DIR: &str = "tests/fixtures/train/rft_roundtrip";
const MODEL: &str = "tests/fixtures/models/qwen2";
const TOL: f64 = 1e-4;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(name: &str) -> PathBuf {
    root().join(DIR).join(name)
}

/// Runs the binary in the repo root (relative paths as in scripts/make_roundtrip_fixtures.sh).
fn rft(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_rft"))
        .current_dir(root())
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "rft {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// `rft score` of items.jsonl: per-item logprobs.
fn score(model: &str, adapter: Option<&str>) -> Vec<Vec<f64>> {
    let items = format!("{DIR}/items.jsonl");
    let mut args = vec!["score", "--model", model, "--input", &items];
    if let Some(a) = adapter {
        args.extend(["--adapter", a]);
    }
    rft(&args)
        .lines()
        .map(|l| floats(&serde_json::from_str::<Value>(l).unwrap()["logprobs"]))
        .collect()
}

/// Max |rft − expected| over all tokens, for both the f64 and the f32 numbers of a fixture.
fn max_diff(got: &[Vec<f64>], expected: &Value) -> f64 {
    let items = expected["items"].as_array().unwrap();
    assert_eq!(got.len(), items.len());
    let mut max = 0f64;
    for (g, it) in got.iter().zip(items) {
        for key in ["logprobs", "logprobs_f32"] {
            let e = floats(&it[key]);
            assert_eq!(g.len(), e.len());
            for (a, b) in g.iter().zip(&e) {
                max = max.max((a - b).abs());
            }
        }
    }
    max
}

#[test]
fn rft_adapter_scores_like_peft() {
    let expected = read_json(&fixture("peft_logprobs.json"));
    assert_eq!(expected["model"], MODEL);
    let adapter = format!("{DIR}/adapter");
    let got = score(MODEL, Some(&adapter));
    let d = max_diff(&got, &expected);
    eprintln!("rft score --adapter vs peft: max |diff| = {d:.2e}");
    assert!(d < TOL, "{d}");
    // The adapter matters: without it the scores are far off.
    let base = score(MODEL, None);
    assert!(max_diff(&base, &expected) > 0.5);
}

#[test]
fn load_then_save_is_lossless() {
    let src = fixture("adapter");
    let config = rft::model::config::ModelConfig::from_dir(&root().join(MODEL)).unwrap();
    let lora = rft::lora::peft::load(&src, &config).unwrap();
    // B is non-zero everywhere (trained), so a test of B·A is not vacuous.
    for slot in &lora.layers {
        for pair in slot.iter().flatten() {
            assert!(pair.a.iter().any(|&x| x != 0.0) && pair.b.iter().any(|&x| x != 0.0));
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    rft::lora::peft::save(tmp.path(), &lora, MODEL).unwrap();
    let w = rft::lora::peft::WEIGHTS_FILE;
    assert!(
        std::fs::read(src.join(w)).unwrap() == std::fs::read(tmp.path().join(w)).unwrap(),
        "adapter_model.safetensors changed on load + save"
    );
    let c = rft::lora::peft::CONFIG_FILE;
    assert_eq!(read_json(&src.join(c)), read_json(&tmp.path().join(c)));
    let (cfg, _) = rft::lora::peft::read_config(tmp.path()).unwrap();
    assert_eq!((cfg.r, cfg.alpha, cfg.use_rslora), (4, 8.0, false));
    assert_eq!(cfg.target_modules.len(), 7);
}

/// The LoRA `rft sft` command of scripts/make_roundtrip_fixtures.sh.
fn sft_adapter(out: &Path) {
    let data = format!("{DIR}/sft_data.jsonl");
    rft(&[
        "sft",
        "--model",
        MODEL,
        "--data",
        &data,
        "--output",
        s(out),
        "--lora-r",
        "4",
        "--lora-alpha",
        "8",
        "--target-modules",
        "all-linear",
        "--batch-size",
        "2",
        "--epochs",
        "3",
        "--lr",
        "1e-2",
        "--seed",
        "7",
    ]);
}

#[test]
fn committed_adapter_is_rfts_output() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("adapter");
    sft_adapter(&out);
    for f in [rft::lora::peft::WEIGHTS_FILE, rft::lora::peft::CONFIG_FILE] {
        assert!(
            std::fs::read(out.join(f)).unwrap() == std::fs::read(fixture("adapter").join(f)).unwrap(),
            "{f} differs from the committed one: rerun scripts/make_roundtrip_fixtures.sh"
        );
    }
    // base_model_name_or_path is the --model path as given: repo-relative, as peft needs.
    assert_eq!(
        read_json(&out.join("adapter_config.json"))["base_model_name_or_path"],
        MODEL
    );
}

/// Checks an HF dir written by rft against a stage-3 fixture: same model.safetensors (sha256)
/// as the one transformers loaded, and `rft score` on it equals transformers' logprobs.
fn check_hf_dir(dir: &Path, fixture_name: &str) -> f64 {
    let expected = read_json(&fixture(fixture_name));
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    assert_eq!(
        sha256_hex(&bytes),
        expected["model_safetensors_sha256"].as_str().unwrap(),
        "{fixture_name}: rft wrote other weights than the ones transformers was checked on"
    );
    let d = max_diff(&score(s(dir), None), &expected);
    eprintln!("{fixture_name}: rft score vs transformers: max |diff| = {d:.2e}");
    assert!(d < TOL, "{fixture_name}: {d}");
    d
}

#[test]
fn merged_checkpoint_matches_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let merged = tmp.path().join("merged");
    let adapter = format!("{DIR}/adapter");
    rft(&[
        "merge",
        "--model",
        MODEL,
        "--adapter",
        &adapter,
        "--out",
        s(&merged),
    ]);
    check_hf_dir(&merged, "hf_merged.json");
    // transformers on the merged dir = peft on base + adapter (recorded by the script).
    let hf = read_json(&fixture("hf_merged.json"));
    let d = &hf["reference"]["max_abs_diff"];
    assert!(d["logprobs"].as_f64().unwrap() < TOL && d["logprobs_f32"].as_f64().unwrap() < TOL);
}

#[test]
fn full_fine_tuning_checkpoints_match_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let data = format!("{DIR}/sft_data.jsonl");
    let full = tmp.path().join("full");
    rft(&[
        "sft",
        "--model",
        MODEL,
        "--data",
        &data,
        "--output",
        s(&full),
        "--full",
        "--batch-size",
        "2",
        "--max-steps",
        "4",
        "--epochs",
        "2",
        "--lr",
        "1e-3",
        "--seed",
        "7",
    ]);
    check_hf_dir(&full, "hf_full.json");

    let bare = tmp.path().join("bare");
    std::fs::create_dir(&bare).unwrap();
    for f in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(root().join(MODEL).join(f), bare.join(f)).unwrap();
    }
    let scratch = tmp.path().join("scratch");
    rft(&[
        "sft",
        "--model",
        s(&bare),
        "--data",
        &data,
        "--output",
        s(&scratch),
        "--init-random",
        "11",
        "--batch-size",
        "2",
        "--max-steps",
        "4",
        "--epochs",
        "2",
        "--lr",
        "1e-2",
        "--seed",
        "7",
    ]);
    check_hf_dir(&scratch, "hf_init_random.json");
}

/// SHA-256 (FIPS 180-4), to compare a file with the digest the fixture script recorded.
fn sha256_hex(data: &[u8]) -> String {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
        0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
        0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
        0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
        0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
        0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
        0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
    ];
    let mut h: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
    ];
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    for block in msg.chunks_exact(64) {
        let mut w = [0u32; 64];
        for (i, c) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16].wrapping_add(s0).wrapping_add(w[i - 7]).wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for i in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(K[i])
                .wrapping_add(w[i]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            hh = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *x = x.wrapping_add(y);
        }
    }
    h.iter().map(|x| format!("{x:08x}")).collect()
}

#[test]
fn sha256_known_answers() {
    assert_eq!(
        sha256_hex(b""),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    assert_eq!(
        sha256_hex(b"abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}
