//! The skinny decode GEMM (kernels/gemm.cu, src/cuda/gemm.rs) on the GPU against Σ_k x·w in f64
//! of the same bf16 inputs, and cuBLAS under the same bound; its determinism and batch
//! invariance; the split-count rule (pure, runs everywhere).
//!
//! Tolerance (the emulator's, scripts/kernel_emu/gemm_emu.cpp): a bf16 output is one rounding
//! of the f32 sum (rtol 2^-8); the f32 sum of K products carries at most K · 2^-24 · Σ_k |x·w|
//! of rounding error (atol), whatever the order the tensor cores and the splits add in. A wrong
//! fragment, k-chunk or split moves an output by a whole product term, far above both.
//!
//! Without a usable GPU every GPU test prints "skipping: <reason>" and passes;
//! `RFT_REQUIRE_GPU=1` makes that a failure.

mod common;

use common::{device_or_skip, uniform_vec};
use half::bf16;
use rft::cuda::{
    kernels_fatbin, skinny_applies, skinny_splits, CudaDevice, GemmChoice, GEMM_KERNEL_NAMES,
    SKINNY_MAX_ROWS, SKINNY_PARTIAL_LEN,
};

#[test]
fn gemm_kernels_are_in_the_fatbin() {
    let Some(fatbin) = kernels_fatbin() else {
        eprintln!("skipping: kernels were not compiled (no nvcc at build time)");
        return;
    };
    for name in GEMM_KERNEL_NAMES {
        assert!(
            fatbin.windows(name.len()).any(|w| w == name.as_bytes()),
            "{name} missing from the fatbin"
        );
    }
}

/// The split rule for the decode shapes of Qwen2.5-0.5B / 1.5B / 7B on 132 and 78 SMs: within
/// 1..=8, no empty split, partials within the scratch; independent of the row count by type.
#[test]
fn skinny_split_rule() {
    let shapes = [
        (896, 1152),
        (896, 896),
        (896, 9728),
        (4864, 896),
        (896, 151_936),
        (1536, 2048),
        (1536, 1536),
        (1536, 17_920),
        (8960, 1536),
        (3584, 4608),
        (18_944, 3584),
        (64, 64),
        (8, 8),
    ];
    for sms in [132usize, 78, 1] {
        for &(k, n) in &shapes {
            let s = skinny_splits(k, n, sms);
            let chunks = k.div_ceil(64);
            let cps = chunks.div_ceil(s);
            assert!((1..=8).contains(&s), "{k}->{n} on {sms} SMs: {s} splits");
            assert_eq!(chunks.div_ceil(cps), s, "{k}->{n}: an empty split");
            assert!(
                s == 1 || s * SKINNY_MAX_ROWS * n <= SKINNY_PARTIAL_LEN,
                "{k}->{n}: partials overflow"
            );
        }
    }
    // Qwen2.5-0.5B on an H200 (132 SMs): the down projection (14 column tiles) splits, the
    // gate|up one (152 tiles) needs at most 2, the lm_head none.
    assert!(skinny_splits(4864, 896, 132) >= 4);
    assert!(skinny_splits(896, 9728, 132) <= 2);
    assert_eq!(skinny_splits(896, 151_936, 132), 1);
    assert!(skinny_applies(64, 896, 1152));
    assert!(!skinny_applies(65, 896, 1152), "more than 64 rows");
    assert!(!skinny_applies(8, 900, 64), "in not a multiple of 8");
    assert!(!skinny_applies(0, 896, 64), "no rows");
}

fn reference(x: &[f32], w: &[f32], rows: usize, k: usize, n: usize) -> (Vec<f64>, Vec<f64>) {
    let (mut want, mut atol) = (vec![0.0; rows * n], vec![0.0; rows * n]);
    for r in 0..rows {
        for c in 0..n {
            let (mut s, mut a) = (0.0f64, 0.0f64);
            for i in 0..k {
                let p = x[r * k + i] as f64 * w[c * k + i] as f64;
                s += p;
                a += p.abs();
            }
            want[r * n + c] = s;
            atol[r * n + c] = k as f64 * 2f64.powi(-24) * a;
        }
    }
    (want, atol)
}

/// Worst |got − want| / (atol + rtol·|want|) (≤ 1 passes).
fn worst_ratio(want: &[f64], atol: &[f64], got: &[f32], rtol: f64) -> f64 {
    want.iter()
        .zip(atol)
        .zip(got)
        .map(|((&w, &a), &g)| {
            if !g.is_finite() {
                return f64::INFINITY;
            }
            (g as f64 - w).abs() / (a + rtol * w.abs() + 1e-30)
        })
        .fold(0.0, f64::max)
}

/// y by `choice`, as f32.
#[allow(clippy::too_many_arguments)]
fn run(
    dev: &CudaDevice,
    choice: GemmChoice,
    x: &[f32],
    w: &[f32],
    rows: usize,
    k: usize,
    n: usize,
    f32_out: bool,
) -> Vec<f32> {
    if f32_out {
        dev.gemm_host::<f32>(choice, x, w, rows, k, n).unwrap()
    } else {
        dev.gemm_host::<bf16>(choice, x, w, rows, k, n).unwrap()
    }
}

#[test]
fn skinny_gemm_matches_f64_and_cublas() {
    let Some(dev) = device_or_skip() else { return };
    let sms = dev.multiprocessors();
    // (rows, in, out, f32 out): Qwen2.5-0.5B's stacked q|k|v, o, gate|up, down and a slice of
    // the lm_head at 64 rows, single rows, partial row / column / k tiles.
    for &(rows, k, n, f32_out) in &[
        (64usize, 896usize, 1152usize, false),
        (64, 896, 896, false),
        (64, 896, 9728, false),
        (64, 4864, 896, false),
        (64, 896, 4000, true),
        (1, 896, 9728, false),
        (7, 1536, 2048, false),
        (33, 136, 200, false),
        (17, 200, 70, true),
        (48, 8960, 1536, false),
    ] {
        let x: Vec<f32> = common::bf(&uniform_vec(rows * k, (rows * k) as u64, -2.0, 2.0));
        let w: Vec<f32> = common::bf(&uniform_vec(n * k, (n * k + 1) as u64, -0.1, 0.1));
        let (want, atol) = reference(&x, &w, rows, k, n);
        let rtol = if f32_out { 0.0 } else { 2f64.powi(-8) };
        let cublas = run(&dev, GemmChoice::Cublas, &x, &w, rows, k, n, f32_out);
        let wc = worst_ratio(&want, &atol, &cublas, rtol);
        // 1, the rule's and 8 splits (as trimmed: no empty split), where the partials fit.
        let chunks = k.div_ceil(64);
        let mut splits: Vec<usize> = [1, skinny_splits(k, n, sms), 8]
            .iter()
            .map(|&s| chunks.div_ceil(chunks.div_ceil(s)))
            .filter(|&s| s == 1 || s * rows * n <= SKINNY_PARTIAL_LEN)
            .collect();
        splits.dedup();
        for s in splits {
            let c = GemmChoice::Skinny { splits: s };
            let got = run(&dev, c, &x, &w, rows, k, n, f32_out);
            let ws = worst_ratio(&want, &atol, &got, rtol);
            let same = got
                .iter()
                .zip(&cublas)
                .filter(|(a, b)| a.to_bits() == b.to_bits())
                .count();
            eprintln!(
                "skinny_gemm {rows}x{k}->{n} f32_out={f32_out} splits {s}: worst error/bound {ws:.3} \
                 (cuBLAS {wc:.3}); {same}/{} outputs bit-identical to cuBLAS",
                got.len()
            );
            assert!(ws <= 1.0, "{rows}x{k}->{n} splits {s}: error {ws} × the bound");
            // Deterministic, and a split-K launch leaves its counters at 0: a rerun is identical.
            let again = run(&dev, c, &x, &w, rows, k, n, f32_out);
            assert!(
                got.iter().zip(&again).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{rows}x{k}->{n} splits {s}: a second launch differs"
            );
            // Batch invariance: the first rows alone give the same bits.
            let r1 = rows.min(3);
            let alone = run(&dev, c, &x[..r1 * k], &w, r1, k, n, f32_out);
            assert!(
                alone
                    .iter()
                    .zip(&got[..r1 * n])
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{rows}x{k}->{n} splits {s}: rows alone differ from rows in the batch"
            );
        }
        assert!(
            wc <= 1.0,
            "cuBLAS {rows}x{k}->{n}: error {wc} × the bound (the bound is wrong)"
        );
    }
}

/// The SwiGLU variant (the decode step's fused SwiGLU + down projection) against
/// swiglu_fused_fwd_bf16 then the plain skinny kernel with the same splits: y and act bit for
/// bit (the same act values enter the same GEMM).
#[test]
fn skinny_swiglu_gemm_matches_swiglu_then_gemm() {
    let Some(dev) = device_or_skip() else { return };
    let sms = dev.multiprocessors();
    for &(rows, inter, d) in &[
        (64usize, 4864usize, 896usize),
        (7, 8960, 1536),
        (33, 200, 70),
        (1, 64, 8),
    ] {
        let gu = common::bf(&uniform_vec(rows * 2 * inter, (rows * inter) as u64, -4.0, 4.0));
        let w = common::bf(&uniform_vec(d * inter, (d * inter + 3) as u64, -0.1, 0.1));
        let gud = dev.upload_bf16(&gu).unwrap();
        let wd = dev.upload_bf16(&w).unwrap();
        let mut act_ref = dev.alloc_zeros::<bf16>(rows * inter).unwrap();
        dev.swiglu_fused_fwd_bf16(&gud, &mut act_ref, rows, inter)
            .unwrap();
        for s in [1, skinny_splits(inter, d, sms)] {
            let c = GemmChoice::Skinny { splits: s };
            let mut want = dev.alloc_zeros::<bf16>(rows * d).unwrap();
            dev.gemm_with(c, &act_ref, &wd, &mut want, rows, inter, d)
                .unwrap();
            let mut got = dev.alloc_zeros::<bf16>(rows * d).unwrap();
            let mut act = dev.alloc_zeros::<bf16>(rows * inter).unwrap();
            dev.skinny_swiglu_gemm(s, &gud, &wd, &mut got, Some(&mut act), rows, inter, d)
                .unwrap();
            let bits = |v: Vec<bf16>| v.into_iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(dev.download(&got).unwrap()),
                bits(dev.download(&want).unwrap()),
                "{rows}x{inter}->{d} splits {s}: y"
            );
            assert_eq!(
                bits(dev.download(&act).unwrap()),
                bits(dev.download(&act_ref).unwrap()),
                "{rows}x{inter}->{d} splits {s}: act"
            );
        }
        eprintln!("skinny_swiglu_gemm {rows}x{inter}->{d}: bit-identical to swiglu + skinny GEMM");
    }
}

#[test]
fn skinny_gemm_rejects_what_it_does_not_take() {
    let Some(dev) = device_or_skip() else { return };
    let c = GemmChoice::Skinny { splits: 1 };
    for &(rows, k, n) in &[(65usize, 64usize, 64usize), (4, 36, 64)] {
        let x = vec![0.5f32; rows * k];
        let w = vec![0.25f32; n * k];
        let err = dev
            .gemm_host::<bf16>(c, &x, &w, rows, k, n)
            .expect_err("should be refused");
        assert!(err.to_string().contains("skinny_gemm"), "{err}");
    }
}
