//! Helpers shared by the GPU test files (tests/cuda_*.rs): the skip-or-require rule for a
//! missing GPU, deterministic inputs, and bf16 rounding. Each test file keeps its own
//! tolerance check, since the tolerances differ per kernel family.
#![allow(dead_code)]

use rft::cuda::{availability, CudaDevice};

/// The directory of a committed fixture model (tests/fixtures/models/NAME), found at run time
/// from `CARGO_MANIFEST_DIR` or the current directory (the GPU machine runs from a repo copy).
pub fn fixture_model(name: &str) -> std::path::PathBuf {
    std::env::var("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::path::PathBuf::from("."))
        .join("tests/fixtures/models")
        .join(name)
}

/// `RFT_REQUIRE_GPU=1` turns "no GPU, skipping" into a failure (set on the GPU machine).
pub fn require_gpu() -> bool {
    std::env::var("RFT_REQUIRE_GPU").is_ok_and(|v| v == "1")
}

/// Whether CUDA is usable; otherwise prints why the test is skipped (or fails under
/// `RFT_REQUIRE_GPU=1`). For tests that build engines rather than use a bare device.
pub fn gpu_or_skip() -> bool {
    if let Err(reason) = availability() {
        assert!(
            !require_gpu(),
            "RFT_REQUIRE_GPU=1 but CUDA is unavailable: {reason}"
        );
        eprintln!("skipping: {reason}");
        return false;
    }
    true
}

/// Device 0, or `None` after printing why the test is skipped.
pub fn device_or_skip() -> Option<CudaDevice> {
    if let Err(reason) = availability() {
        assert!(
            !require_gpu(),
            "RFT_REQUIRE_GPU=1 but CUDA is unavailable: {reason}"
        );
        eprintln!("skipping: {reason}");
        return None;
    }
    let dev =
        CudaDevice::new(0).unwrap_or_else(|e| panic!("CUDA is available but opening device 0 failed: {e}"));
    eprintln!(
        "running on {} (compute capability {:?})",
        dev.name(),
        dev.compute_capability()
    );
    Some(dev)
}

/// Whether `dev` is the CPU stand-in of scripts/cuda_emu (the real kernels in the kernel
/// emulator). It compiles the kernels without FMA contraction, which nvcc does by default, so a
/// comparison that is bit-exact against an FMA-ordered CPU replay only holds within an ulp there.
#[allow(dead_code)]
pub fn emulated(dev: &CudaDevice) -> bool {
    dev.name().starts_with("rft CUDA emulator")
}

/// Deterministic values in [lo, hi) (xorshift64*), so failures reproduce.
pub fn uniform_vec(n: usize, seed: u64, lo: f32, hi: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            let u = (s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32;
            lo + (hi - lo) * u
        })
        .collect()
}

/// max(m, x) that keeps a NaN: `f32::max` returns the other argument, so a worst-error fold
/// written with it lets a NaN output pass its `worst <= tol` check.
pub fn max_nan(m: f32, x: f32) -> f32 {
    if x.is_nan() || x > m {
        x
    } else {
        m
    }
}

/// Each value rounded to bf16 and back.
pub fn bf(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect()
}

/// How far Hugging Face transformers' own bf16 model is from its f32 model on a fixture model
/// (tests/fixtures/models/NAME/bf16_noise.json, made by scripts/make_bf16_noise.py): the noise
/// floor that the GPU tests' tolerances are derived from (an implementation that rounds to bf16
/// where HF does should be within a small multiple of it; the bugs these tests look for — a
/// wrong RoPE, a misplaced KV page, a missing LoRA term — move logits by O(1)).
pub struct Bf16Noise {
    /// max |Δz| at the last position of the engine tests' prompts, over those prompts.
    pub last_logits: f32,
    /// max |Δ log_softmax(z)| over every position of those prompts and every token.
    pub logprob: f32,
    /// max per-tensor relative L2 distance of the LoRA gradients of a GRPO-shaped loss.
    pub lora_grad_rel_l2: f64,
    /// cosine of the flat LoRA gradients.
    pub lora_grad_cosine: f64,
    /// max per-tensor relative L2 distance of the adapter's change after 5 AdamW steps.
    pub adam5_update_rel_l2: f64,
    /// max per-tensor relative L2 distance of every weight's gradient (full fine-tuning, no
    /// adapter) of the same loss.
    pub full_grad_rel_l2: f64,
    /// cosine of the flat full-fine-tuning gradients.
    pub full_grad_cosine: f64,
}

pub fn bf16_noise(name: &str) -> Bf16Noise {
    let path = fixture_model(name).join("bf16_noise.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let v: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let num = |k: &str| {
        v[k].as_f64()
            .unwrap_or_else(|| panic!("{}: {k} is not a number", path.display()))
    };
    let last = v["last_logits_max_abs"]
        .as_array()
        .unwrap_or_else(|| panic!("{}: last_logits_max_abs is not a list", path.display()))
        .iter()
        .filter_map(|x| x.as_f64())
        .fold(0f64, f64::max);
    Bf16Noise {
        last_logits: last as f32,
        logprob: num("logprob_max_abs") as f32,
        lora_grad_rel_l2: num("lora_grad_rel_l2"),
        lora_grad_cosine: num("lora_grad_cosine"),
        adam5_update_rel_l2: num("adam5_update_rel_l2"),
        full_grad_rel_l2: num("full_grad_rel_l2"),
        full_grad_cosine: num("full_grad_cosine"),
    }
}

/// One RoPE test case: q (rows, h·hd) and k (rows, kv·hd) bf16-exact inputs at positions `pos`,
/// and the CPU reference's rotation of them (`ops::rope_inplace`, inverse for the backward).
pub struct RopeCase {
    pub label: String,
    pub h: usize,
    pub kv: usize,
    pub hd: usize,
    pub inv_freq: Vec<f32>,
    pub pos: Vec<i32>,
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub want_q: Vec<f32>,
    pub want_k: Vec<f32>,
}

/// The RoPE cases of the forward and backward kernel tests: hd 64 default RoPE (Qwen2.5-0.5B:
/// 14 q heads, 2 kv), hd 64 with llama3 scaling (Llama 3.2 1B: 32/8), hd 128 (Qwen2.5-7B: 28/4),
/// at 1, 7 and 33 rows with positions up to 30,000; inputs uniform in ±3 seeded by `seed`.
pub fn rope_cases(backward: bool, seed: u64) -> Vec<RopeCase> {
    use rft::cpu::ops;
    use rft::model::config::ModelConfig;
    let mut out = Vec::new();
    for preset in ["qwen2.5-0.5b", "llama3.2-1b", "qwen2.5-7b"] {
        let c = ModelConfig::preset(preset).unwrap();
        let (h, kv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let inv_freq = c.rope_inv_freq();
        for &rows in &[1usize, 7, 33] {
            let pos: Vec<i32> = (0..rows)
                .map(|r| [0, 1, 17, 300, 4095, 30_000][r % 6] + r as i32)
                .collect();
            let q = bf(&uniform_vec(rows * h * hd, rows as u64 + seed, -3.0, 3.0));
            let k = bf(&uniform_vec(rows * kv * hd, rows as u64 + seed + 1, -3.0, 3.0));
            let (mut want_q, mut want_k) = (q.clone(), k.clone());
            for r in 0..rows {
                let p = pos[r] as usize;
                ops::rope_inplace(
                    &mut want_q[r * h * hd..(r + 1) * h * hd],
                    p,
                    &inv_freq,
                    hd,
                    backward,
                );
                ops::rope_inplace(
                    &mut want_k[r * kv * hd..(r + 1) * kv * hd],
                    p,
                    &inv_freq,
                    hd,
                    backward,
                );
            }
            out.push(RopeCase {
                label: format!("{preset} rows {rows}"),
                h,
                kv,
                hd,
                inv_freq: inv_freq.clone(),
                pos,
                q,
                k,
                want_q,
                want_k,
            });
        }
    }
    out
}
