//! CUDA kernels against the f32 CPU reference (`rft::cpu::ops`), llm.c style: every element
//! compared with `|ref - gpu| <= atol + rtol·|ref|`, the first mismatches printed.
//!
//! Without a usable GPU the kernel tests print "skipping: <reason>" and pass; with
//! `RFT_REQUIRE_GPU=1` (set on the GPU machine) a missing GPU fails them. The availability and
//! fatbin tests run everywhere.

mod common;
use common::{bf, device_or_skip, uniform_vec};
use rft::cpu::ops::rmsnorm_fwd;
use rft::cuda::{availability, kernels_fatbin, nvcc_required_at_build, CudaDevice};
use rft::Error;

/// Odd sizes on purpose: 1 (one thread busy), 64 (two warps), 123 (ragged last warp),
/// 896 (Qwen2.5-0.5B hidden), 4097 (more than one stride of the 512-thread block, ragged).
const ROWS: &[usize] = &[1, 7, 33];
const DIMS: &[usize] = &[1, 64, 123, 896, 4097];
/// Qwen2.5's rms_norm_eps.
const EPS: f32 = 1e-6;

/// x (rows, dim) with a few special rows: row 1 all zeros (only eps keeps rsqrt finite, y = 0),
/// row 2 large (|x| ~ 1e3: sum of squares ~ 4e9 must not lose the row).
fn rmsnorm_inputs(rows: usize, dim: usize) -> (Vec<f32>, Vec<f32>) {
    let mut x = uniform_vec(rows * dim, (rows * 10_007 + dim) as u64, -3.0, 3.0);
    if rows > 1 {
        x[dim..2 * dim].fill(0.0);
    }
    if rows > 2 {
        x[2 * dim..3 * dim].iter_mut().for_each(|v| *v *= 400.0);
    }
    let weight = uniform_vec(dim, dim as u64 + 1, -2.0, 2.0);
    (x, weight)
}

/// Every element within `atol + rtol·|ref|`; prints the first mismatches before failing.
fn assert_close(what: &str, reference: &[f32], got: &[f32], atol: f32, rtol: f32) {
    assert_eq!(reference.len(), got.len(), "{what}: length");
    let mut bad = 0;
    for (i, (&r, &g)) in reference.iter().zip(got).enumerate() {
        let ok = (r - g).abs() <= atol + rtol * r.abs();
        if !ok || !g.is_finite() {
            if bad < 8 {
                eprintln!("{what}: mismatch at {i}: ref {r} gpu {g}");
            }
            bad += 1;
        }
    }
    assert_eq!(
        bad,
        0,
        "{what}: {bad} of {} elements out of tolerance",
        reference.len()
    );
}

#[test]
fn availability_explains_itself_and_never_panics() {
    match availability() {
        Err(reason) => {
            assert!(
                reason.len() > 20,
                "availability() reason is not readable: {reason:?}"
            );
            eprintln!("CUDA unavailable here (expected on machines without a GPU): {reason}");
            match CudaDevice::new(0) {
                Err(Error::CudaUnavailable(msg)) => assert!(!msg.is_empty()),
                Err(e) => panic!("expected Error::CudaUnavailable, got {e}"),
                Ok(dev) => panic!("availability() said no, but {dev:?} opened"),
            }
        }
        Ok(()) => {
            let dev = CudaDevice::new(0).expect("availability() is Ok, so device 0 must open");
            let count = 1 + (1..16).take_while(|&i| CudaDevice::new(i).is_ok()).count();
            assert!(matches!(
                CudaDevice::new(count + 100),
                Err(Error::CudaUnavailable(_))
            ));
            eprintln!("{dev:?}");
        }
    }
}

#[test]
fn fatbin_is_embedded_when_nvcc_was_required() {
    // build.rs sets RFT_NVCC_REQUIRED for the crate's compilations when RFT_REQUIRE_NVCC=1.
    let required = option_env!("RFT_NVCC_REQUIRED") == Some("1");
    assert_eq!(required, nvcc_required_at_build());
    match kernels_fatbin() {
        Some(fatbin) => {
            assert_eq!(&fatbin[..4], &[0x50, 0xed, 0x55, 0xba], "fatbin magic 0xBA55ED50");
            // Cubin symbol tables are stored uncompressed: every kernel name must be in there.
            for name in ["rmsnorm_fwd_bf16", "rmsnorm_fwd_f32"] {
                assert!(
                    fatbin.windows(name.len()).any(|w| w == name.as_bytes()),
                    "{name} not in the fatbin"
                );
            }
        }
        None => {
            assert!(
                !required,
                "built with RFT_REQUIRE_NVCC=1 but no fatbin is embedded"
            );
            let reason = availability().expect_err("no kernels, so CUDA cannot be available");
            assert!(
                reason.contains("nvcc"),
                "reason should say nvcc was missing: {reason}"
            );
        }
    }
}

#[test]
fn rmsnorm_fwd_bf16_matches_cpu() {
    let Some(dev) = device_or_skip() else { return };
    // Tolerance. Both sides see the same bf16-rounded x and weight, so the only differences are
    // (a) the kernel's single bf16 rounding of y: ≤ 2^-9·|y| (round to nearest, 8-bit
    // significand), and (b) f32 summation order and rsqrtf (≤ 2 ulp) in the inverse RMS:
    // ~1e-5 relative at dim 4097. rtol = 2^-7 ≈ 0.0078 is 4× (a)+(b); atol covers results
    // that are ~0. llm.c uses 0.079 for bf16 because its references cover chains of ops; for
    // one op that loose a bound would let a wrong eps or a dropped weight factor pass.
    let (atol, rtol) = (1e-6, 1.0 / 128.0);
    for &rows in ROWS {
        for &dim in DIMS {
            let (x, w) = rmsnorm_inputs(rows, dim);
            let (x, w) = (bf(&x), bf(&w));
            let reference = rmsnorm_fwd(&x, &w, EPS, dim);
            let got = dev
                .rmsnorm_fwd_bf16_host(&x, &w, rows, dim, EPS)
                .expect("rmsnorm_fwd_bf16");
            assert_close(
                &format!("rmsnorm_fwd_bf16 rows {rows} dim {dim}"),
                &reference,
                &got,
                atol,
                rtol,
            );
        }
    }
}

#[test]
fn rmsnorm_fwd_f32_matches_cpu() {
    let Some(dev) = device_or_skip() else { return };
    // Same math in f32 on both sides: only summation order (CPU sequential, GPU tree; typical
    // relative error ~sqrt(dim)·2^-24 ≈ 4e-6 at dim 4097) and rsqrtf's ≤ 2 ulp differ.
    let (atol, rtol) = (1e-6, 1e-4);
    for &rows in ROWS {
        for &dim in DIMS {
            let (x, w) = rmsnorm_inputs(rows, dim);
            let reference = rmsnorm_fwd(&x, &w, EPS, dim);
            let got = dev
                .rmsnorm_fwd_f32_host(&x, &w, rows, dim, EPS)
                .expect("rmsnorm_fwd_f32");
            assert_close(
                &format!("rmsnorm_fwd_f32 rows {rows} dim {dim}"),
                &reference,
                &got,
                atol,
                rtol,
            );
        }
    }
}

#[test]
fn rmsnorm_launcher_rejects_wrong_shapes() {
    let Some(dev) = device_or_skip() else { return };
    let x = dev.upload_bf16(&[1.0; 12]).unwrap();
    let w = dev.upload_bf16(&[1.0; 4]).unwrap();
    let mut out = dev.alloc_zeros::<half::bf16>(12).unwrap();
    // 3 rows of 4 is right; 4 rows of 4 and a weight of the wrong length are not.
    dev.rmsnorm_fwd_bf16(&x, &w, &mut out, 3, 4, EPS)
        .expect("right shapes");
    assert!(matches!(
        dev.rmsnorm_fwd_bf16(&x, &w, &mut out, 4, 4, EPS),
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        dev.rmsnorm_fwd_bf16(&x, &w, &mut out, 2, 6, EPS),
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        dev.rmsnorm_fwd_bf16(&x, &w, &mut out, 12, 0, EPS),
        Err(Error::Invalid(_))
    ));
    dev.synchronize().unwrap();
    // Views work as well as owned buffers: normalize only the middle row.
    let mut out_row = out.slice_mut(4..8);
    dev.rmsnorm_fwd_bf16(&x.slice(4..8), &w, &mut out_row, 1, 4, EPS)
        .expect("views");
    let y = dev.download_bf16(&out).unwrap();
    assert!(y.iter().all(|&v| (v - 1.0).abs() < 1e-2), "{y:?}");
}
