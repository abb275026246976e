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

/// Each value rounded to bf16 and back.
pub fn bf(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect()
}
