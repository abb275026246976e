//! The training-step kernels (src/cuda/train_kernels.rs, kernels/train.cu) against the CPU
//! reference, llm.c style: every element within `atol + rtol·|ref|`, each tolerance justified
//! where it is set.
//!
//! Inputs are rounded to bf16 before BOTH sides see them where the kernel reads bf16, so the
//! tolerances cover only the kernels' own rounding (one bf16 store: ≤ 2^-9 relative, 2^-8 used)
//! and f32 summation order. Where a sum's error scales with the size of its terms, the bound is
//! taken relative to Σ|terms| (computed by the same product on absolute values). Without a usable
//! GPU every test prints "skipping: <reason>" and passes; `RFT_REQUIRE_GPU=1` makes that a
//! failure. Shapes are odd on purpose: rows 1/7/33, V 461 and 151936, in/out 123/896, r 1/4/16.

mod common;
use common::{bf, device_or_skip, uniform_vec};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use half::bf16;
use rft::cpu::ops;
use rft::cuda::{clip_report_from_stats, kernels_fatbin, CudaDevice, TRAIN_KERNEL_NAMES};
use rft::loss::{grpo_loss, GrpoInputs, GrpoLossConfig, KlEstimator, LossType, OldLogp};
use rft::optim::{clip_and_step, grad_norm, AdamW, AdamWState};

fn abs(v: &[f32]) -> Vec<f32> {
    v.iter().map(|x| x.abs()).collect()
}

/// Every element within `atol[i] + rtol·|ref|` (per-element atol).
fn assert_close_each(what: &str, reference: &[f32], got: &[f32], atol: &[f32], rtol: f32) {
    assert_eq!(reference.len(), got.len(), "{what}: length");
    let mut bad = 0;
    for (i, (&r, &g)) in reference.iter().zip(got).enumerate() {
        if (r - g).abs() > atol[i] + rtol * r.abs() || !g.is_finite() {
            if bad < 8 {
                eprintln!("{what}: mismatch at {i}: ref {r} gpu {g} (atol {})", atol[i]);
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

fn assert_close(what: &str, reference: &[f32], got: &[f32], atol: f32, rtol: f32) {
    assert_close_each(what, reference, got, &vec![atol; reference.len()], rtol);
}

/// One bf16 rounding of the result: ≤ 2^-9 relative; 2^-8 leaves room for ~1e-6 f32 effects.
const BF16_STORE_RTOL: f32 = 1.0 / 256.0;

#[test]
fn train_kernels_are_in_the_fatbin() {
    let Some(fatbin) = kernels_fatbin() else {
        eprintln!("skipping: no fatbin in this build");
        return;
    };
    for name in TRAIN_KERNEL_NAMES {
        assert!(
            fatbin.windows(name.len()).any(|w| w == name.as_bytes()),
            "{name} not in the fatbin"
        );
    }
}

/// f64 gold of one row of s = logits / T (f32 division, as both sides do): (lse, E_p[s]).
fn softmax_gold(row: &[f32]) -> (f64, f64) {
    let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z: f64 = row.iter().map(|&s| (s as f64 - m).exp()).sum();
    let lse = m + z.ln();
    let es: f64 = row
        .iter()
        .filter(|s| s.is_finite())
        .map(|&s| (s as f64 - lse).exp() * s as f64)
        .sum();
    (lse, es)
}

#[test]
fn logprob_gather_fwd_matches_cpu() {
    let Some(dev) = device_or_skip() else { return };
    for &vocab in &[461usize, 151_936] {
        for &rows in &[1usize, 7, 33] {
            let mut logits = uniform_vec(rows * vocab, (rows * vocab) as u64 + 1, -10.0, 10.0);
            if rows > 1 {
                logits[vocab..2 * vocab]
                    .iter_mut()
                    .step_by(3)
                    .for_each(|v| *v = f32::NEG_INFINITY);
            }
            let targets: Vec<u32> = (0..rows).map(|r| ((r * 7919 + 1) % vocab) as u32).collect();
            for &(temp, use_bf16) in &[(1.0f32, false), (0.7, false), (1.0, true), (0.7, true)] {
                let x = if use_bf16 { bf(&logits) } else { logits.clone() };
                let [lp, ent, lse, mean_s] = dev
                    .logprob_gather_fwd_host(&x, &targets, vocab, temp, use_bf16)
                    .unwrap();
                for r in 0..rows {
                    let row: Vec<f32> = x[r * vocab..(r + 1) * vocab].iter().map(|&v| v / temp).collect();
                    let (g_lse, g_es) = softmax_gold(&row);
                    let want_lp = row[targets[r] as usize] as f64 - g_lse;
                    let want_ent = g_lse - g_es;
                    let (cpu_lp, cpu_ent) = ops::logprob_and_entropy(&row, targets[r] as usize);
                    // Oracle in f64: the CPU op sums 151936 f32 terms sequentially, its own error
                    // ~sqrt(V)·2^-24 ≈ 2e-5 relative would dominate; it is checked against the
                    // gold at 1e-3. GPU: f32 online softmax, tree merge: error ~log2(V)·2^-24
                    // relative of log Z (|log Z| ≲ 25) and of the entropy sum → 1e-5 absolute
                    // is ~10× that; lse and E[s] carry |m| ≤ 15 more: 1e-6 relative of them.
                    let what = format!("vocab {vocab} rows {rows} row {r} T {temp} bf16 {use_bf16}");
                    // A target whose logit is -inf (row 1 masks every third id) has logprob
                    // exactly -inf on both sides; inf - inf is NaN, so infinities compare by equality.
                    let close = |got: f32, want: f64| {
                        got as f64 == want || (got as f64 - want).abs() < 1e-5 + 1e-6 * want.abs()
                    };
                    assert!(close(lp[r], want_lp), "{what}: lp {} vs {want_lp}", lp[r]);
                    assert!(close(ent[r], want_ent), "{what}: ent {} vs {want_ent}", ent[r]);
                    assert!(close(lse[r], g_lse), "{what}: lse {} vs {g_lse}", lse[r]);
                    assert!(close(mean_s[r], g_es), "{what}: mean_s {} vs {g_es}", mean_s[r]);
                    assert!(
                        cpu_lp as f64 == want_lp || (cpu_lp as f64 - want_lp).abs() < 1e-3,
                        "{what}: cpu lp"
                    );
                    assert!((cpu_ent as f64 - want_ent).abs() < 1e-3, "{what}: cpu ent");
                }
            }
        }
    }
}

/// The head backward of src/cpu/train.rs (TrainForward::backward, per row), in f64 on the f32
/// scaled logits: dz_j = (−gl·p_j − ge·p_j·(s_j − E[s])) / T, dz[tok] += gl / T. Also returns a
/// per-element magnitude Σ|terms| for the tolerance.
fn dlogits_gold(row: &[f32], tok: usize, gl: f32, ge: f32, temp: f32) -> (Vec<f32>, Vec<f32>) {
    let (lse, es) = softmax_gold(row);
    let (gl, ge, t) = (gl as f64, ge as f64, temp as f64);
    let mut d = Vec::with_capacity(row.len());
    let mut mag = Vec::with_capacity(row.len());
    for (j, &s) in row.iter().enumerate() {
        let s = s as f64;
        let p = (s - lse).exp();
        let hot = if j == tok { 1.0 } else { 0.0 };
        d.push(((-gl * p - ge * p * (s - es)) / t + hot * gl / t) as f32);
        mag.push(((gl.abs() * (p + hot) + ge.abs() * p * ((s - es).abs() + es.abs() + 1.0)) / t) as f32);
    }
    (d, mag)
}

#[test]
fn logprob_gather_bwd_matches_cpu() {
    let Some(dev) = device_or_skip() else { return };
    for &vocab in &[461usize, 151_936] {
        for &rows in &[1usize, 7, 33] {
            let logits = uniform_vec(rows * vocab, (rows * vocab) as u64 + 2, -8.0, 8.0);
            let targets: Vec<u32> = (0..rows).map(|r| ((r * 7919 + 5) % vocab) as u32).collect();
            let dlogp = uniform_vec(rows, rows as u64 + 3, -1.0, 1.0);
            let dent = uniform_vec(rows, rows as u64 + 4, -0.5, 0.5);
            for &(temp, use_bf16, with_ent) in &[
                (1.0f32, false, true),
                (0.7, false, true),
                (1.0, false, false),
                (1.0, true, true),
                (0.7, true, false),
            ] {
                let x = if use_bf16 { bf(&logits) } else { logits.clone() };
                let got = dev
                    .logprob_gather_bwd_host(
                        &x,
                        &targets,
                        &dlogp,
                        with_ent.then_some(&dent[..]),
                        vocab,
                        temp,
                        use_bf16,
                    )
                    .unwrap();
                let (mut want, mut mag) = (Vec::new(), Vec::new());
                for r in 0..rows {
                    let row: Vec<f32> = x[r * vocab..(r + 1) * vocab].iter().map(|&v| v / temp).collect();
                    let ge = if with_ent { dent[r] } else { 0.0 };
                    let (d, m) = dlogits_gold(&row, targets[r] as usize, dlogp[r], ge, temp);
                    want.extend(d);
                    mag.extend(m);
                }
                // p = exp(s − lse) with the GPU's lse within ~1e-5 absolute (forward test) and
                // expf ≤ 2 ulp: 2e-5 relative of every term's magnitude; the bf16 store adds
                // 2^-8 of the result.
                let atol: Vec<f32> = mag.iter().map(|m| 2e-5 * m + 1e-30).collect();
                let rtol = if use_bf16 { BF16_STORE_RTOL } else { 0.0 };
                assert_close_each(
                    &format!("dlogits vocab {vocab} rows {rows} T {temp} bf16 {use_bf16} ent {with_ent}"),
                    &want,
                    &got,
                    &atol,
                    rtol,
                );
            }
        }
    }
}

/// cast_f32_to_bf16 (kernels/convert.cu) launched as src/cuda/train.rs does: out = bf16(in).
fn cast_f32_to_bf16(dev: &CudaDevice, input: &impl DevicePtr<f32>, out: &mut impl DevicePtrMut<bf16>) {
    let n = input.len();
    assert_eq!(out.len(), n, "cast lengths");
    let f = dev.function("cast_f32_to_bf16").unwrap();
    let n64 = n as u64;
    let s = dev.stream();
    let (op, _o) = out.device_ptr_mut(s);
    let (ip, _i) = input.device_ptr(s);
    let mut l = s.launch_builder(&f);
    l.arg(&op).arg(&ip).arg(&n64);
    let grid = n.div_ceil(8).div_ceil(256).clamp(1, 65_535) as u32;
    let cfg = LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: (bf16* out, const float* in, size_t n); both hold n elements (asserted); the
    // kernel is grid-stride, correct for any grid.
    unsafe { l.launch(cfg) }.unwrap();
}

/// The training step's lm_head backward: logprob_gather_bwd_f32_to_bf16 (f32 logits read, bf16
/// dlogits written) must equal logprob_gather_bwd_f32 (in place) followed by cast_f32_to_bf16
/// BIT FOR BIT (same f32 dlogit, one f32_to_bf16 rounding), on the vector path (vocab % 8 == 0,
/// aligned) and the element path (vocab % 8 ≠ 0, or logits / dlogits one element off 16-byte
/// alignment), with and without dentropy, T ≠ 1, a target ≥ vocab and −∞ logits; it must leave
/// the logits untouched; and (through the _host wrapper) match the CPU gold within the f32
/// tolerance plus one bf16 store.
#[test]
fn logprob_gather_bwd_f32_to_bf16_is_bwd_f32_then_cast() {
    let Some(dev) = device_or_skip() else { return };
    for &vocab in &[461usize, 464, 1004, 151_936] {
        for &rows in &[1usize, 7] {
            let n = rows * vocab;
            let mut logits = uniform_vec(n, n as u64 + 11, -8.0, 8.0);
            if rows > 1 {
                for i in (vocab..2 * vocab).step_by(3) {
                    logits[i] = f32::NEG_INFINITY;
                }
            }
            let mut targets: Vec<u32> = (0..rows).map(|r| ((r * 7919 + 5) % vocab) as u32).collect();
            if rows > 2 {
                targets[2] = vocab as u32 + 3; // no one-hot term
            }
            let dlogp = uniform_vec(rows, rows as u64 + 13, -1.0, 1.0);
            let dent = uniform_vec(rows, rows as u64 + 14, -0.5, 0.5);
            let t = dev.upload(&targets).unwrap();
            let gl = dev.upload(&dlogp).unwrap();
            let ge = dev.upload(&dent).unwrap();
            for &(temp, with_ent) in &[(1.0f32, true), (0.7, false), (1.3, true)] {
                let what = format!("vocab {vocab} rows {rows} T {temp} ent {with_ent}");
                let ge = with_ent.then_some(&ge);
                let x = dev.upload(&logits).unwrap();
                let mut stats: [CudaSlice<f32>; 4] = std::array::from_fn(|_| dev.alloc_zeros(rows).unwrap());
                let [lp, ent, lse, ms] = &mut stats;
                dev.logprob_gather_fwd_f32(&x, &t, lp, ent, lse, ms, rows, vocab, temp)
                    .unwrap();
                // Reference: in place, then the cast.
                let mut x_ref = dev.upload(&logits).unwrap();
                dev.logprob_gather_bwd_f32(&mut x_ref, &t, &gl, ge, lse, ms, rows, vocab, temp)
                    .unwrap();
                let mut want = dev.alloc_zeros::<bf16>(n).unwrap();
                cast_f32_to_bf16(&dev, &x_ref, &mut want);
                let want: Vec<u16> = dev.download(&want).unwrap().iter().map(|v| v.to_bits()).collect();
                for &(off_in, off_out) in &[(0usize, 0usize), (1, 0), (0, 1)] {
                    let mut padded = vec![0.0f32; off_in];
                    padded.extend_from_slice(&logits);
                    let xin = dev.upload(&padded).unwrap();
                    let mut out = dev.upload(&vec![bf16::NAN; off_out + n]).unwrap();
                    dev.logprob_gather_bwd_f32_to_bf16(
                        &xin.slice(off_in..),
                        &mut out.slice_mut(off_out..),
                        &t,
                        &gl,
                        ge,
                        lse,
                        ms,
                        rows,
                        vocab,
                        temp,
                    )
                    .unwrap();
                    let got = dev.download(&out).unwrap();
                    let bad = got[off_out..]
                        .iter()
                        .zip(&want)
                        .filter(|(g, w)| g.to_bits() != **w)
                        .count();
                    assert_eq!(
                        bad, 0,
                        "{what} offsets ({off_in}, {off_out}): {bad} of {n} differ"
                    );
                    let back = dev.download(&xin).unwrap();
                    assert!(
                        back[off_in..]
                            .iter()
                            .zip(&logits)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{what} offsets ({off_in}, {off_out}): logits modified"
                    );
                }
                let host = dev
                    .logprob_gather_bwd_f32_to_bf16_host(
                        &logits,
                        &targets,
                        &dlogp,
                        with_ent.then_some(&dent[..]),
                        vocab,
                        temp,
                    )
                    .unwrap();
                let bad = host
                    .iter()
                    .zip(&want)
                    .filter(|(g, w)| bf16::from_f32(**g).to_bits() != **w)
                    .count();
                assert_eq!(bad, 0, "{what} _host: {bad} of {n} differ");
                // Rows without −∞ logits (the f64 gold's 0·∞) against the CPU head backward:
                // the f32 test's 2e-5·Σ|terms| plus one bf16 store.
                for r in 0..rows {
                    let xr = &logits[r * vocab..(r + 1) * vocab];
                    if xr.iter().any(|v| v.is_infinite()) {
                        continue;
                    }
                    let row: Vec<f32> = xr.iter().map(|&v| v / temp).collect();
                    let g_e = if with_ent { dent[r] } else { 0.0 };
                    let (d, m) = dlogits_gold(&row, targets[r] as usize, dlogp[r], g_e, temp);
                    let atol: Vec<f32> = m.iter().map(|m| 2e-5 * m + 1e-30).collect();
                    assert_close_each(
                        &format!("{what} row {r} vs gold"),
                        &d,
                        &host[r * vocab..(r + 1) * vocab],
                        &atol,
                        BF16_STORE_RTOL,
                    );
                }
            }
        }
    }
}

/// Packed GRPO inputs with ratios kept ≥ 1e-4 away from the clip bounds (so both sides take the
/// same branch even though the GPU's expf and the CPU's exp may differ by an ulp).
fn grpo_data(lengths: &[usize], seed: u64, lo: f64, hi: f64) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let n: usize = lengths.iter().sum();
    let logp = uniform_vec(n, seed, -3.0, -0.01);
    let mut delta = uniform_vec(n, seed + 1, -0.6, 0.6);
    for d in delta.iter_mut() {
        while ((*d as f64).exp() - lo).abs() < 1e-4 || ((*d as f64).exp() - hi).abs() < 1e-4 {
            *d += 1e-3;
        }
    }
    let old: Vec<f32> = logp.iter().zip(&delta).map(|(l, d)| l - d).collect();
    let refl: Vec<f32> = logp
        .iter()
        .zip(uniform_vec(n, seed + 2, -0.5, 0.5))
        .map(|(l, d)| l + d)
        .collect();
    let adv = uniform_vec(lengths.len(), seed + 3, -2.0, 2.0);
    (logp, old, refl, adv)
}

#[test]
fn grpo_loss_matches_cpu() {
    let Some(dev) = device_or_skip() else { return };
    // Small packed batch with an empty sequence, and 64 sequences of up to 384 tokens (several
    // blocks of the reduction).
    let big: Vec<usize> = (0..64).map(|i| (i * 97 + 13) % 385).collect();
    for lengths in [vec![3usize, 0, 7, 1, 33, 12], vec![1], big] {
        for loss_type in [LossType::Grpo, LossType::Dapo, LossType::DrGrpo] {
            for &(old_given, ref_given, beta, est, eps_high) in &[
                (false, false, 0.0, KlEstimator::K3, None),
                (true, false, 0.0, KlEstimator::K3, None),
                (true, true, 0.04, KlEstimator::K3, Some(0.28)),
                (true, true, 0.1, KlEstimator::K1, None),
                (false, true, 0.0, KlEstimator::K3, None),
                (false, true, 0.5, KlEstimator::K3, Some(0.28)),
            ] {
                let cfg = GrpoLossConfig {
                    loss_type,
                    beta,
                    epsilon: 0.2,
                    epsilon_high: eps_high,
                    kl_estimator: est,
                    max_completion_length: 384,
                };
                let (lo, hi) = (1.0 - cfg.epsilon, 1.0 + cfg.epsilon_high());
                let (logp, old, refl, adv) = grpo_data(&lengths, lengths.len() as u64, lo, hi);
                let inp = GrpoInputs {
                    logp: &logp,
                    old_logp: if old_given {
                        OldLogp::Given(&old)
                    } else {
                        OldLogp::Current
                    },
                    ref_logp: ref_given.then_some(&refl[..]),
                    advantages: &adv,
                    lengths: &lengths,
                };
                let what = format!(
                    "{} seqs {loss_type:?} old {old_given} ref {ref_given} beta {beta} {est:?} eps_high {eps_high:?}",
                    lengths.len()
                );
                let cpu = grpo_loss(&cfg, &inp).unwrap();
                let (gpu, token_loss) = dev.grpo_loss_f32_host(&cfg, &inp).unwrap();
                // Per-token f32 terms: the ratio and k3's exp differ by ≤ 3 ulp (CUDA expf ≤ 2 ulp,
                // glibc's < 1), everything else is the same f32 operations in the same order
                // (no FMA contraction): ~1e-6 relative, plus 1e-6 of the largest gradient for
                // k3's 1 − e cancellation. Without old/ref log-probs the math is exact.
                let gmax = cpu.grad_logp.iter().fold(0f32, |a, g| a.max(g.abs()));
                assert_close(
                    &format!("{what}: grad"),
                    &cpu.grad_logp,
                    &gpu.grad_logp,
                    1e-6 * gmax,
                    2e-6,
                );
                if !old_given && !ref_given {
                    assert_eq!(cpu.grad_logp, gpu.grad_logp, "{what}: exact without exp");
                }
                // Loss: f64 sums of per-token terms each within ~1e-6 relative (above).
                let abs_sum: f64 = token_loss.iter().map(|v| v.abs() as f64).sum();
                assert!(
                    (cpu.loss as f64 - gpu.loss as f64).abs()
                        <= 2e-6 * abs_sum + 1e-7 * (cpu.loss as f64).abs(),
                    "{what}: loss cpu {} gpu {}",
                    cpu.loss,
                    gpu.loss
                );
                let (cm, gm) = (cpu.metrics, gpu.metrics);
                assert_eq!(cm.num_tokens, gm.num_tokens, "{what}");
                assert_eq!(
                    (cm.clip_low, cm.clip_high),
                    (gm.clip_low, gm.clip_high),
                    "{what}: clip counts"
                );
                assert_eq!(cm.clip_region, gm.clip_region, "{what}");
                assert!((cm.ratio_mean - gm.ratio_mean).abs() < 1e-6, "{what}: ratio mean");
                match (cm.kl_mean, gm.kl_mean) {
                    (None, None) => {}
                    // k3 ≈ x²/2 for small x loses relative precision in e − x − 1 (f32 on both
                    // sides): absolute 1e-6 of terms of size ≲ 0.2.
                    (Some(a), Some(b)) => assert!((a - b).abs() < 1e-6, "{what}: kl {a} vs {b}"),
                    other => panic!("{what}: kl presence differs {other:?}"),
                }
            }
        }
    }
    // No tokens: loss 0, no launch.
    let cfg = GrpoLossConfig::default();
    let inp = GrpoInputs {
        logp: &[],
        old_logp: OldLogp::Current,
        ref_logp: None,
        advantages: &[1.0f32],
        lengths: &[0],
    };
    let (gpu, _) = dev.grpo_loss_f32_host(&cfg, &inp).unwrap();
    assert_eq!(gpu.loss, 0.0);
    assert_eq!(gpu.metrics.num_tokens, 0);
}

#[test]
fn lora_backward_matches_cpu() {
    let Some(dev) = device_or_skip() else { return };
    // (n, in, out, r): tiny, Qwen2.5-0.5B q_proj-like (896→896, r 16), odd shapes, and row counts
    // that split the dA / dB reductions over rows (600: 2 splits, 1100: 4).
    for &(n, d_in, d_out, r) in &[
        (1usize, 123usize, 45usize, 1usize),
        (7, 896, 896, 16),
        (33, 123, 896, 4),
        (33, 896, 123, 16),
        (600, 123, 64, 4),
        (1100, 96, 40, 16),
    ] {
        let x = bf(&uniform_vec(n * d_in, 21, -2.0, 2.0));
        let dy = bf(&uniform_vec(n * d_out, 22, -1.0, 1.0));
        let a = uniform_vec(r * d_in, 23, -0.1, 0.1);
        let b = uniform_vec(d_out * r, 24, -0.1, 0.1);
        let dx_in = bf(&uniform_vec(n * d_in, 25, -0.5, 0.5));
        let da_in = uniform_vec(r * d_in, 26, -0.01, 0.01);
        let db_in = uniform_vec(d_out * r, 27, -0.01, 0.01);
        let s = 2.0f32;
        let (u, dyb, dx, da, db) = dev
            .lora_bwd_bf16_host(&x, &dy, &a, &b, &dx_in, &da_in, &db_in, s, n, d_in, d_out, r)
            .unwrap();

        // CPU: src/cpu/train.rs::proj_bwd, term by term.
        let want_u = ops::matmul_wt(&x, &a, n, d_in, r);
        let mut want_dyb = vec![0.0; n * r];
        ops::matmul_acc(&dy, &b, n, d_out, r, 1.0, 0.0, &mut want_dyb);
        let mut want_db = db_in.clone();
        ops::matmul_tn_acc(&dy, &want_u, n, d_out, r, s, 1.0, &mut want_db);
        let mut want_da = da_in.clone();
        ops::matmul_tn_acc(&want_dyb, &x, n, r, d_in, s, 1.0, &mut want_da);
        let mut want_dx = dx_in.clone();
        ops::matmul_acc(&want_dyb, &a, n, r, d_in, s, 1.0, &mut want_dx);

        // Σ|terms| of each output, chained through the inputs' own sums (u and dyb are sums).
        let abs_u = ops::matmul_wt(&abs(&x), &abs(&a), n, d_in, r);
        let mut abs_dyb = vec![0.0; n * r];
        ops::matmul_acc(&abs(&dy), &abs(&b), n, d_out, r, 1.0, 0.0, &mut abs_dyb);
        let mut abs_db = abs(&db_in);
        ops::matmul_tn_acc(&abs(&dy), &abs_u, n, d_out, r, s, 1.0, &mut abs_db);
        let mut abs_da = abs(&da_in);
        ops::matmul_tn_acc(&abs_dyb, &abs(&x), n, r, d_in, s, 1.0, &mut abs_da);
        let mut abs_dx = abs(&dx_in);
        ops::matmul_acc(&abs_dyb, &abs(&a), n, r, d_in, s, 1.0, &mut abs_dx);

        // f32 sums of ≤ 1100 terms in different orders on both sides (tiles and k-splits vs
        // matrixmultiply's blocking): error ~sqrt(K)·2^-24·Σ|terms| ≲ 2e-6·Σ|terms|, 2e-5 is
        // ~10×; dx adds one bf16 store.
        let tol = |v: &[f32]| v.iter().map(|m| 2e-5 * m + 1e-30).collect::<Vec<_>>();
        let what = format!("lora n {n} {d_in}->{d_out} r {r}");
        assert_close_each(&format!("{what}: u"), &want_u, &u, &tol(&abs_u), 0.0);
        assert_close_each(&format!("{what}: dyb"), &want_dyb, &dyb, &tol(&abs_dyb), 0.0);
        assert_close_each(&format!("{what}: dB"), &want_db, &db, &tol(&abs_db), 0.0);
        assert_close_each(&format!("{what}: dA"), &want_da, &da, &tol(&abs_da), 0.0);
        assert_close_each(
            &format!("{what}: dx"),
            &want_dx,
            &dx,
            &tol(&abs_dx),
            BF16_STORE_RTOL,
        );
    }
}

#[test]
fn rmsnorm_bwd_bf16_matches_cpu() {
    let Some(dev) = device_or_skip() else { return };
    let eps = 1e-6;
    for &dim in &[123usize, 896] {
        for &rows in &[1usize, 7, 33] {
            let x = bf(&uniform_vec(rows * dim, (rows * dim) as u64, -2.0, 2.0));
            let w = bf(&uniform_vec(dim, dim as u64 + 1, 0.5, 1.5));
            let dy = bf(&uniform_vec(rows * dim, (rows * dim) as u64 + 2, -1.0, 1.0));
            let dw_in = uniform_vec(dim, 3, -0.1, 0.1);
            let (dx, dw) = dev
                .rmsnorm_bwd_bf16_host(&x, &w, &dy, &dw_in, None, dim, eps)
                .unwrap();
            let mut want_dw = dw_in.clone();
            let want_dx = ops::rmsnorm_bwd(&x, &w, &dy, eps, dim, Some(&mut want_dw));
            // Magnitudes: dx_i = r·w_i·dy_i − c·x_i, c = r³/dim·Σ x·dy·w (a dim-term f32 sum).
            let (mut atol_dx, mut abs_dw) = (Vec::new(), abs(&dw_in));
            for row in 0..rows {
                let xr = &x[row * dim..(row + 1) * dim];
                let gr = &dy[row * dim..(row + 1) * dim];
                let r = ops::rms_inv(xr, eps);
                let c_abs: f32 = r * r * r / dim as f32
                    * xr.iter()
                        .zip(gr)
                        .zip(&w)
                        .map(|((a, b), c)| (a * b * c).abs())
                        .sum::<f32>();
                for i in 0..dim {
                    // Sums of ≤ 896 terms in another order (1e-6 relative of Σ|terms|, 1e-5 used)
                    atol_dx.push(1e-5 * (r * (w[i] * gr[i]).abs() + c_abs * xr[i].abs()));
                    abs_dw[i] += (gr[i] * xr[i] * r).abs();
                }
            }
            let what = format!("rmsnorm_bwd rows {rows} dim {dim}");
            assert_close_each(&format!("{what}: dx"), &want_dx, &dx, &atol_dx, BF16_STORE_RTOL);
            // dweight: f32 sums over rows (≤ 33 terms) in per-block then partial order.
            let atol_dw: Vec<f32> = abs_dw.iter().map(|m| 1e-5 * m).collect();
            assert_close_each(&format!("{what}: dweight"), &want_dw, &dw, &atol_dw, 0.0);
            // Accumulating onto dx (the backward's residual stream): bit for bit the stored
            // result added by a bf16 residual add, bf16(dx_in + dx).
            let dx_in = bf(&uniform_vec(rows * dim, 5, -1.0, 1.0));
            let (acc, dw2) = dev
                .rmsnorm_bwd_bf16_host(&x, &w, &dy, &dw_in, Some(&dx_in), dim, eps)
                .unwrap();
            let want_acc = bf(&dx_in.iter().zip(&dx).map(|(a, b)| a + b).collect::<Vec<_>>());
            assert_eq!(acc, want_acc, "{what}: accumulate");
            assert_eq!(dw2, dw, "{what}: dweight with accumulate");
        }
    }
}

/// The dweight accumulator (dim f32 of dynamic shared memory) shares the default 48 KiB with the
/// kernel's static bytes: the largest dim the launcher accepts (RMSNORM_BWD_MAX_DIM) must launch
/// and be right, the next one must be refused by the launcher (not fail inside the CUDA launch).
#[test]
fn rmsnorm_bwd_dweight_shared_memory_limit() {
    let Some(dev) = device_or_skip() else { return };
    let eps = 1e-6;
    let dim = rft::cuda::RMSNORM_BWD_MAX_DIM;
    let rows = 2;
    let x = bf(&uniform_vec(rows * dim, 61, -2.0, 2.0));
    let w = bf(&uniform_vec(dim, 62, 0.5, 1.5));
    let dy = bf(&uniform_vec(rows * dim, 63, -1.0, 1.0));
    let dw_in = vec![0.0f32; dim];
    let (dx, dw) = dev
        .rmsnorm_bwd_bf16_host(&x, &w, &dy, &dw_in, None, dim, eps)
        .unwrap();
    let mut want_dw = dw_in.clone();
    let want_dx = ops::rmsnorm_bwd(&x, &w, &dy, eps, dim, Some(&mut want_dw));
    // Sums of ~12k terms of size ≲ 2 in another order: 1e-4 absolute, then the bf16 store.
    assert_close("rmsnorm_bwd max dim: dx", &want_dx, &dx, 1e-4, BF16_STORE_RTOL);
    assert_close("rmsnorm_bwd max dim: dweight", &want_dw, &dw, 1e-5, 1e-5);
    let (x, dy) = (vec![1.0f32; dim + 1], vec![1.0f32; dim + 1]);
    let err = dev
        .rmsnorm_bwd_bf16_host(
            &x,
            &vec![1.0; dim + 1],
            &dy,
            &vec![0.0; dim + 1],
            None,
            dim + 1,
            eps,
        )
        .unwrap_err();
    assert!(matches!(err, rft::Error::Invalid(_)), "{err}");
}

#[test]
fn swiglu_bwd_bf16_matches_cpu() {
    let Some(dev) = device_or_skip() else { return };
    for &(rows, inter) in &[(1usize, 123usize), (7, 896), (33, 4864)] {
        let n = rows * inter;
        let gate = bf(&uniform_vec(n, n as u64, -6.0, 6.0));
        let up = bf(&uniform_vec(n, n as u64 + 1, -2.0, 2.0));
        let dy = bf(&uniform_vec(n, n as u64 + 2, -1.0, 1.0));
        let (dg, du) = dev.swiglu_bwd_bf16_host(&gate, &up, &dy).unwrap();
        let (want_dg, want_du) = ops::swiglu_bwd(&gate, &up, &dy);
        // expf ≤ 2 ulp vs the CPU's exp, a few f32 roundings of terms ≲ 12: ~1e-5 absolute
        // at most, then the bf16 store.
        let what = format!("swiglu_bwd rows {rows} inter {inter}");
        assert_close(&format!("{what}: dgate"), &want_dg, &dg, 1e-5, BF16_STORE_RTOL);
        assert_close(&format!("{what}: dup"), &want_du, &du, 1e-5, BF16_STORE_RTOL);

        // Fused layout: gate_up (rows, 2·inter) = [gate | up] per row.
        let mut gate_up = Vec::with_capacity(2 * n);
        for r in 0..rows {
            gate_up.extend_from_slice(&gate[r * inter..(r + 1) * inter]);
            gate_up.extend_from_slice(&up[r * inter..(r + 1) * inter]);
        }
        let fused = dev
            .swiglu_fused_bwd_bf16_host(&gate_up, &dy, rows, inter)
            .unwrap();
        let (mut fg, mut fu) = (Vec::new(), Vec::new());
        for r in 0..rows {
            fg.extend_from_slice(&fused[r * 2 * inter..r * 2 * inter + inter]);
            fu.extend_from_slice(&fused[r * 2 * inter + inter..(r + 1) * 2 * inter]);
        }
        // Same kernel math as the unfused one: identical bits.
        assert_eq!(fg, dg, "{what}: fused dgate");
        assert_eq!(fu, du, "{what}: fused dup");
    }
}

#[test]
fn rope_bwd_bf16_matches_cpu() {
    let Some(dev) = device_or_skip() else { return };
    for c in common::rope_cases(true, 7) {
        let (gq, gk) = dev
            .rope_bwd_bf16_host(&c.q, &c.k, &c.pos, &c.inv_freq, c.h, c.kv, c.hd)
            .unwrap();
        // As the forward test: same f32 angle, sincosf vs sin_cos ≤ 2 ulp of values ≤ 1,
        // possible fma: ~1e-6 absolute on |x| ≤ 3·√2; then the bf16 store.
        assert_close(
            &format!("rope_bwd q {}", c.label),
            &c.want_q,
            &gq,
            1e-5,
            BF16_STORE_RTOL,
        );
        assert_close(
            &format!("rope_bwd k {}", c.label),
            &c.want_k,
            &gk,
            1e-5,
            BF16_STORE_RTOL,
        );
    }
}

#[test]
fn grad_norm_matches_cpu_and_flags_non_finite() {
    let Some(dev) = device_or_skip() else { return };
    for &n in &[1usize, 1000, 1_234_567] {
        let g = uniform_vec(n, n as u64, -0.01, 0.01);
        let stats = dev.grad_sq_norm_f32_host(&g).unwrap();
        assert_eq!(stats[1], 0.0, "n {n}: no non-finite");
        // Both sum squares in f64 (different order: ~1e-16 relative), then round the root to
        // f32: equal except at a rounding boundary, so allow 1 ulp.
        let gpu = stats[0].sqrt() as f32;
        let cpu = grad_norm(&[&g]);
        assert!(
            (gpu.to_bits() as i64 - cpu.to_bits() as i64).abs() <= 1,
            "n {n}: norm gpu {gpu} cpu {cpu}"
        );
        let mut bad = g.clone();
        bad[n / 2] = f32::NAN;
        bad[n - 1] = f32::INFINITY;
        bad[0] = f32::NEG_INFINITY;
        let stats = dev.grad_sq_norm_f32_host(&bad).unwrap();
        let expect = if n == 1 { 1.0 } else { 3.0 };
        assert_eq!(stats[1], expect, "n {n}: non-finite count");
        let rep = clip_report_from_stats(stats, 1.0);
        assert!(!rep.finite && !rep.norm.is_finite());
    }
}

#[test]
fn adamw_matches_cpu_bit_for_bit() {
    let Some(dev) = device_or_skip() else { return };
    let sizes = [1000usize, 123, 1];
    let total: usize = sizes.iter().sum();
    for &(wd, max_norm) in &[(0.01f64, 1.0f32), (0.0, 0.0), (0.1, 1e6)] {
        let opt = AdamW {
            lr: 3e-3,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: wd,
        };
        let init = uniform_vec(total, 31, -0.5, 0.5);
        let mut cpu_tensors: Vec<Vec<f32>> = {
            let mut off = 0;
            sizes
                .iter()
                .map(|&s| {
                    off += s;
                    init[off - s..off].to_vec()
                })
                .collect()
        };
        let mut cpu_state = AdamWState::default();
        let mut gpu_params = init.clone();
        let mut gpu_state = AdamWState::default();
        for step in 0..6u64 {
            // Gradients large enough to clip (norm ≈ 0.58·sqrt(1124)·scale ≈ 20 at step 0).
            let scale = [1.0f32, 0.01, 3.0, 1e-4, 0.5, 2.0][step as usize];
            let g: Vec<f32> = uniform_vec(total, 40 + step, -1.0, 1.0)
                .iter()
                .map(|v| v * scale)
                .collect();
            let mut cpu_grads: Vec<Vec<f32>> = {
                let mut off = 0;
                sizes
                    .iter()
                    .map(|&s| {
                        off += s;
                        g[off - s..off].to_vec()
                    })
                    .collect()
            };
            let cpu_rep = {
                let mut p: Vec<&mut [f32]> = cpu_tensors.iter_mut().map(|t| &mut t[..]).collect();
                let mut gr: Vec<&mut [f32]> = cpu_grads.iter_mut().map(|t| &mut t[..]).collect();
                clip_and_step(&opt, &mut cpu_state, &mut p, &mut gr, max_norm).unwrap()
            };
            let gpu_rep = dev
                .clip_and_step_f32_host(&opt, &mut gpu_state, &mut gpu_params, &g, max_norm)
                .unwrap();
            let what = format!("wd {wd} max_norm {max_norm} step {step}");
            assert_eq!(cpu_rep.skipped, gpu_rep.skipped, "{what}");
            let cpu_flat: Vec<f32> = cpu_tensors.concat();
            let cpu_m: Vec<f32> = cpu_state.m.concat();
            let cpu_v: Vec<f32> = cpu_state.v.concat();
            if cpu_rep.grad_norm == gpu_rep.grad_norm {
                // Same scalars (AdamW::scalars on both sides), same clip coefficient, and the
                // kernel does the CPU's f32 operations in its order with _rn intrinsics (no FMA):
                // bit-identical.
                assert_eq!(cpu_rep.clip_scale, gpu_rep.clip_scale, "{what}");
                assert_eq!(cpu_flat, gpu_params, "{what}: params");
                assert_eq!(cpu_m, gpu_state.m[0], "{what}: m");
                assert_eq!(cpu_v, gpu_state.v[0], "{what}: v");
            } else {
                // The f64 Σg² of CPU and GPU (different order) rounded to different f32 norms:
                // the clip coefficient differs by an ulp, the update by ~1e-7 relative.
                eprintln!(
                    "{what}: norms differ by an ulp ({} vs {})",
                    cpu_rep.grad_norm, gpu_rep.grad_norm
                );
                assert_close(&format!("{what}: params"), &cpu_flat, &gpu_params, 1e-7, 1e-6);
                gpu_params.copy_from_slice(&cpu_flat);
                gpu_state.m[0] = cpu_m;
                gpu_state.v[0] = cpu_v;
            }
            assert_eq!(cpu_state.step, gpu_state.step, "{what}");
        }
        // A non-finite gradient: both skip and leave everything as it was.
        let mut g = vec![0.1f32; total];
        g[7] = f32::NAN;
        let before = (gpu_params.clone(), gpu_state.clone());
        let rep = dev
            .clip_and_step_f32_host(&opt, &mut gpu_state, &mut gpu_params, &g, max_norm)
            .unwrap();
        assert!(rep.skipped);
        assert_eq!((gpu_params.clone(), gpu_state.clone()), before);
    }
}

#[test]
fn adamw_kernel_skips_on_device_flag() {
    let Some(dev) = device_or_skip() else { return };
    // The stats buffer's non-finite count makes the launch a no-op without a host round trip.
    let n = 777;
    let p0 = uniform_vec(n, 51, -1.0, 1.0);
    let mut g = uniform_vec(n, 52, -1.0, 1.0);
    g[100] = f32::INFINITY;
    let gd = dev.upload(&g).unwrap();
    let mut partials = dev
        .alloc_zeros::<f64>(rft::cuda::grad_norm_partials_len(n))
        .unwrap();
    let mut stats = dev.alloc_zeros::<f64>(2).unwrap();
    dev.grad_sq_norm_f32(&gd, &mut partials, &mut stats).unwrap();
    let mut p = dev.upload(&p0).unwrap();
    let mut m = dev.alloc_zeros::<f32>(n).unwrap();
    let mut v = dev.alloc_zeros::<f32>(n).unwrap();
    let sc = AdamW::default().scalars(1);
    dev.adamw_step_f32(&mut p, &mut m, &mut v, &gd, Some(&stats), 1.0, &sc)
        .unwrap();
    assert_eq!(dev.download(&p).unwrap(), p0);
    assert_eq!(dev.download(&m).unwrap(), vec![0.0; n]);
}

#[test]
fn embedding_grad_matches_cpu_bit_for_bit() {
    let Some(dev) = device_or_skip() else { return };
    // Full fine-tuning's embedding gradient, as the CPU's last backward loop: each row of dx
    // added into its token's row, rows in order, onto what is there. Each element is summed by
    // one thread in the CPU's order from the same bf16-rounded inputs: identical bits. Tokens
    // repeat (row 0 and 5, 2 and 4 and 6), one row only, and the vocabulary's first and last.
    let (vocab, dim) = (461usize, 123usize);
    for ids in [vec![7u32, 0, 460, 9, 460, 7, 460], vec![3]] {
        let n = ids.len();
        let dx = bf(&uniform_vec(n * dim, n as u64 + 60, -1.0, 1.0));
        let e_in = uniform_vec(vocab * dim, 61, -0.1, 0.1);
        let got = dev
            .embedding_grad_bf16_to_f32_host(&dx, &ids, &e_in, dim)
            .unwrap();
        let mut want = e_in.clone();
        for (r, &t) in ids.iter().enumerate() {
            for c in 0..dim {
                want[t as usize * dim + c] += dx[r * dim + c];
            }
        }
        assert_eq!(got, want, "ids {ids:?}");
    }
    // A token outside the vocabulary is an error, not an out-of-bounds write.
    let e = dev
        .embedding_grad_bf16_to_f32_host(&[0.0; 4], &[vocab as u32], &vec![0.0; vocab * 4], 4)
        .unwrap_err()
        .to_string();
    assert!(e.contains("outside the vocabulary"), "{e}");
}
