//! The RFT loop on the GPU (issue #6, point 5): the embedded default config
//! (configs/default.toml: GRPO + LoRA on models/tiny, the 2-digit addition task) with
//! `device = "cuda"`, driven through the library's `Trainer` as `rft train` drives it —
//! rollouts from the CUDA engine with the live adapter, grading on CPU threads, the CUDA
//! training step — for a few steps: every metric present and sane, the adapter on the device
//! changed and written out as a PEFT adapter, greedy validation runs, a checkpoint resumes.
//! Skips without CUDA (`RFT_REQUIRE_GPU=1` makes that a failure).

mod common;

use common::gpu_or_skip;
use rft::trainer::run::{TrainConfig, Trainer};
use std::path::{Path, PathBuf};

/// The repo root at run time (`CARGO_MANIFEST_DIR`, else the current directory): the GPU
/// machine runs the packed test binary from a copy of the repo elsewhere.
fn root() -> PathBuf {
    std::env::var("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("."))
}

/// configs/default.toml with `device = "cuda"`, `max_steps` steps and 16 validation prompts.
fn config(max_steps: usize, out: &Path) -> (TrainConfig, String) {
    let path = root().join("configs/default.toml");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("max_steps = 800", &format!("max_steps = {max_steps}"))
        .replace("num_val = 500", "num_val = 16")
        .replace("device = \"auto\"", "device = \"cuda\"");
    assert!(
        text.contains("device = \"cuda\"") && text.contains("num_val = 16"),
        "{text}"
    );
    let mut c = TrainConfig::from_toml_str(&text, &path).unwrap();
    c.output_dir = Some(out.to_path_buf());
    (c, text)
}

#[test]
fn cuda_train_loop_runs_with_every_metric() {
    if !gpu_or_skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let (c, text) = config(2, &out);
    let mut t = Trainer::from_config(c, &text, &root().join("configs")).unwrap();
    assert_eq!(t.device(), "cuda");
    let before = t.engine().adapter.clone().expect("adapter");
    for step in 1..=2 {
        let r = t.step().unwrap();
        assert_eq!(r.step, step);
        assert!(!r.skipped, "step {step} skipped: {r:?}");
        for (what, v) in [
            ("loss", r.loss),
            ("entropy", r.entropy),
            ("grad_norm", r.grad_norm),
            ("lr", r.lr),
        ] {
            assert!(v.is_finite(), "step {step}: {what} = {v}");
        }
        assert!(r.grad_norm > 0.0 && r.entropy > 0.0, "{r:?}");
        assert!(
            (0.0..=1.0).contains(&r.reward_mean) && (0.0..=1.0).contains(&r.accuracy),
            "{r:?}"
        );
        assert_eq!(r.reward_per_grader.len(), 1, "{r:?}");
        assert!(r.completion_len_mean > 0.0 && r.completion_len_max <= 4, "{r:?}");
        assert!(r.rollout_tok_s > 0.0 && r.train_tok_s > 0.0, "{r:?}");
        // The config's layout fits (no memory fallback): one micro-batch, no recompute.
        assert_eq!((r.micro_batches, r.gradient_checkpointing), (1, false), "{r:?}");
        assert!(r.rollout_seconds > 0.0 && r.train_seconds > 0.0, "{r:?}");
    }
    let val = t.validation().unwrap().expect("validation prompts");
    assert_eq!(val.num_prompts, 16);
    assert!((0.0..=1.0).contains(&val.accuracy), "{val:?}");

    // The adapter trained on the device reaches the host copy and the PEFT files.
    let dir = tmp.path().join("adapter");
    t.save_weights(&dir).unwrap();
    let after = t.engine().adapter.clone().expect("adapter");
    let moved: f32 = rft::trainer::lora_params(&after)
        .iter()
        .zip(rft::trainer::lora_params(&before))
        .map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max))
        .fold(0f32, f32::max);
    assert!(moved > 0.0, "the adapter did not change in two steps");
    assert!(dir.join("adapter_model.safetensors").is_file());
    assert!(dir.join("adapter_config.json").is_file());

    // A checkpoint resumes on the GPU at the step it was written.
    let ck = t.save_checkpoint().unwrap();
    let (c2, text2) = config(3, &out);
    let mut t2 = Trainer::from_config(c2, &text2, &root().join("configs")).unwrap();
    t2.resume_from(&ck).unwrap();
    assert_eq!(t2.step_count(), 2);
    let resumed = t2.engine().adapter.clone().expect("adapter");
    assert_eq!(
        rft::trainer::lora_params(&resumed),
        rft::trainer::lora_params(&after),
        "the resumed adapter differs from the saved one"
    );
    let r3 = t2.step().unwrap();
    assert_eq!(r3.step, 3);
    assert!(r3.loss.is_finite() && !r3.skipped, "{r3:?}");
}
