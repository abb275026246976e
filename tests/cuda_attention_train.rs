//! Training attention (src/cuda/attention_train.rs, kernels/attention_train.cu) against an f64
//! host oracle, llm.c style: every element within `atol + eps·|ref|`, eps = 0.079 for bf16
//! storage, atol justified where it is set.
//!
//! The oracle is written here from the math (causal GQA softmax attention over packed sequences,
//! optional sliding window) and is itself checked without a GPU: its forward against
//! `cpu::model::attend` (the project's CPU reference), its backward against central finite
//! differences of its own forward. Inputs are rounded to bf16 before both sides see them, so the
//! tolerances cover only the kernels' own rounding (P and dS go through bf16 into the tensor-core
//! products, outputs are stored in bf16) and f32 summation order. Without a usable GPU the GPU
//! tests print "skipping: <reason>" and pass; `RFT_REQUIRE_GPU=1` makes that a failure. Shapes
//! are odd on purpose: sequences of 0, 1, 3, 17, 70, 129, 130 rows (tiles are 64 rows), head
//! dims 36, 64, 96, 128, 256, GQA groups 1, 2, 3, 6, 7, windows 1, 5, 40, 100.

mod common;
use common::{bf, device_or_skip, uniform_vec};
use rft::cpu::model::attend;
use rft::cuda::{
    attention_train_row_tiles, packed_max_rows, CudaDevice, TrainAttnShape, ATTN_TRAIN_COMPILED_HEAD_DIMS,
};

/// One packed batch: q, dout (rows, H, hd), k, v (rows, KV, hd), all bf16-exact.
struct Problem {
    shape: TrainAttnShape,
    cu_rows: Vec<i32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    dout: Vec<f32>,
}

impl Problem {
    fn new(
        lens: &[usize],
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        window: Option<usize>,
    ) -> Problem {
        let mut cu_rows = vec![0i32];
        for &l in lens {
            cu_rows.push(cu_rows.last().unwrap() + l as i32);
        }
        let rows = *cu_rows.last().unwrap() as usize;
        let seed = (rows * 1_000 + n_heads * 100 + head_dim) as u64;
        // q in [-2, 2) makes the softmax peaky enough that a wrong mask or a lost key shows.
        Problem {
            shape: TrainAttnShape {
                n_heads,
                n_kv_heads,
                head_dim,
                window,
            },
            cu_rows,
            q: bf(&uniform_vec(rows * n_heads * head_dim, seed + 1, -2.0, 2.0)),
            k: bf(&uniform_vec(rows * n_kv_heads * head_dim, seed + 2, -1.0, 1.0)),
            v: bf(&uniform_vec(rows * n_kv_heads * head_dim, seed + 3, -1.0, 1.0)),
            dout: bf(&uniform_vec(rows * n_heads * head_dim, seed + 4, -1.0, 1.0)),
        }
    }

    fn rows(&self) -> usize {
        *self.cu_rows.last().unwrap() as usize
    }

    fn name(&self) -> String {
        let lens: Vec<i32> = self.cu_rows.windows(2).map(|w| w[1] - w[0]).collect();
        let s = &self.shape;
        format!(
            "lens {lens:?} H {} KV {} hd {} window {:?}",
            s.n_heads, s.n_kv_heads, s.head_dim, s.window
        )
    }
}

/// First visible key of the row at position i (as `attend`: start = i + 1 − w).
fn window_start(i: usize, window: Option<usize>) -> usize {
    match window {
        Some(w) if i + 1 > w => i + 1 - w,
        _ => 0,
    }
}

/// The f64 oracle's results, with per-element magnitudes Σ|terms| of each output's sum (for
/// the tolerances; see `check`).
#[derive(Default)]
struct Gold {
    out: Vec<f64>,
    lse: Vec<f64>,
    dq: Vec<f64>,
    dk: Vec<f64>,
    dv: Vec<f64>,
    mag_out: Vec<f64>,
    mag_dq: Vec<f64>,
    mag_dk: Vec<f64>,
    mag_dv: Vec<f64>,
}

/// The forward and the hand-derived backward in f64, with x = (q, k, v) as f64 slices so the
/// finite-difference test can perturb them. Per sequence, head h (kv head g = h / (H/KV)), row i:
///   s_j = q_i·k_j·scale (j in [start(i), i]),  lse_i = log Σ_j e^{s_j},  P_j = e^{s_j − lse_i}
///   out_i = Σ_j P_j v_j
/// and with L = Σ dout·out:
///   dv_j += P_j dout_i,  dP_j = dout_i·v_j,  delta_i = Σ_j P_j dP_j (= dout_i·out_i)
///   dS_j = P_j (dP_j − delta_i),  dq_i = scale Σ_j dS_j k_j,  dk_j += scale dS_j q_i
/// scale = f32(1/sqrt(hd)) widened, as the kernels receive it.
fn gold_f64(p: &Problem, q: &[f64], k: &[f64], v: &[f64], with_bwd: bool) -> Gold {
    let TrainAttnShape {
        n_heads: nh,
        n_kv_heads: nkv,
        head_dim: hd,
        window,
    } = p.shape;
    let rows = p.rows();
    let group = nh / nkv;
    let scale = p.shape.scale() as f64;
    let dout: Vec<f64> = p.dout.iter().map(|&x| x as f64).collect();
    let mut g = Gold {
        out: vec![0.0; rows * nh * hd],
        lse: vec![0.0; rows * nh],
        ..Default::default()
    };
    g.mag_out = g.out.clone();
    if with_bwd {
        g.dq = g.out.clone();
        g.mag_dq = g.out.clone();
        g.dk = vec![0.0; rows * nkv * hd];
        g.dv = g.dk.clone();
        g.mag_dk = g.dk.clone();
        g.mag_dv = g.dk.clone();
    }
    let qi = |r: usize, h: usize| (r * nh + h) * hd;
    let ki = |r: usize, kh: usize| (r * nkv + kh) * hd;
    for w in p.cu_rows.windows(2) {
        let (b, n) = (w[0] as usize, (w[1] - w[0]) as usize);
        for h in 0..nh {
            let kh = h / group;
            for i in 0..n {
                let keys: Vec<usize> = (window_start(i, window)..=i).collect();
                let qrow = &q[qi(b + i, h)..qi(b + i, h) + hd];
                let s: Vec<f64> = keys
                    .iter()
                    .map(|&j| {
                        let krow = &k[ki(b + j, kh)..ki(b + j, kh) + hd];
                        qrow.iter().zip(krow).map(|(a, c)| a * c).sum::<f64>() * scale
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let lse = m + s.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
                g.lse[(b + i) * nh + h] = lse;
                let pr: Vec<f64> = s.iter().map(|x| (x - lse).exp()).collect();
                for d in 0..hd {
                    let (mut o, mut mo) = (0.0, 0.0);
                    for (jj, &j) in keys.iter().enumerate() {
                        o += pr[jj] * v[ki(b + j, kh) + d];
                        mo += pr[jj] * v[ki(b + j, kh) + d].abs();
                    }
                    g.out[qi(b + i, h) + d] = o;
                    g.mag_out[qi(b + i, h) + d] = mo;
                }
                if !with_bwd {
                    continue;
                }
                let dorow = &dout[qi(b + i, h)..qi(b + i, h) + hd];
                let dp: Vec<f64> = keys
                    .iter()
                    .map(|&j| {
                        dorow
                            .iter()
                            .zip(&v[ki(b + j, kh)..ki(b + j, kh) + hd])
                            .map(|(a, c)| a * c)
                            .sum()
                    })
                    .collect();
                let delta: f64 = pr.iter().zip(&dp).map(|(a, c)| a * c).sum();
                // D_i bounds |delta| and the error of delta computed from the kernel's out.
                let big_d: f64 = (0..hd)
                    .map(|d| dorow[d].abs() * g.mag_out[qi(b + i, h) + d])
                    .sum();
                for (jj, &j) in keys.iter().enumerate() {
                    let ds = pr[jj] * (dp[jj] - delta);
                    let mag_ds = pr[jj] * (dp[jj].abs() + delta.abs() + 2.0 * big_d);
                    for d in 0..hd {
                        let (a, c) = (qi(b + i, h) + d, ki(b + j, kh) + d);
                        g.dq[a] += scale * ds * k[c];
                        g.mag_dq[a] += scale * mag_ds * k[c].abs();
                        g.dk[c] += scale * ds * q[a];
                        g.mag_dk[c] += scale * mag_ds * q[a].abs();
                        g.dv[c] += pr[jj] * dout[a];
                        g.mag_dv[c] += pr[jj] * dout[a].abs();
                    }
                }
            }
        }
    }
    g
}

fn gold(p: &Problem, with_bwd: bool) -> Gold {
    let f = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<f64>>();
    gold_f64(p, &f(&p.q), &f(&p.k), &f(&p.v), with_bwd)
}

/// llm.c's relative tolerance for bf16 storage.
const EPS_BF16: f64 = 0.079;
/// atol as a fraction of Σ|terms| of each output's sum. The kernels round P (forward, dk/dv) and
/// dS (dk, dq) to bf16 before the tensor-core products (unit roundoff 2^-8 relative per term)
/// and the backward's delta = dout·out uses the bf16-stored out (off by ≤ 2^-7·D, D = Σ|dout|·
/// Σ P|v|, which the oracle folds into the dS magnitudes). Each of these errors is ≤ 2^-8 of the
/// magnitude Σ|terms| the oracle accumulates next to the value; 2^-6 leaves a 4× margin. A lost
/// or extra key, a wrong head or a wrong tile is an error of whole terms, far beyond it (the
/// short sequences and small windows make single keys weigh ≥ 1/5 of a row).
const ATOL_OF_MAG: f64 = 1.0 / 64.0;

/// Every element within `atol_of_mag·mag + eps·|ref|` (NaN fails). Prints the first misses and
/// the worst error / tolerance ratio.
fn check(what: &str, reference: &[f64], mag: &[f64], got: &[f32], atol_of_mag: f64, eps: f64) {
    assert_eq!(reference.len(), got.len(), "{what}: length");
    let (mut bad, mut worst) = (0usize, 0.0f64);
    for (i, (&r, &g)) in reference.iter().zip(got).enumerate() {
        let tol = atol_of_mag * mag[i] + eps * r.abs() + 1e-7;
        let err = (r - g as f64).abs();
        worst = worst.max(err / tol);
        if err > tol || err.is_nan() {
            if bad < 8 {
                eprintln!("{what}: mismatch at {i}: ref {r} gpu {g} (tol {tol})");
            }
            bad += 1;
        }
    }
    eprintln!("{what}: worst |err|/tol {worst:.3}");
    assert_eq!(
        bad,
        0,
        "{what}: {bad} of {} elements out of tolerance",
        reference.len()
    );
}

/// The GPU shapes: the brief's odd ones plus the two target models' head layouts.
fn problems() -> Vec<Problem> {
    vec![
        Problem::new(&[1, 17, 70], 6, 2, 64, None),
        Problem::new(&[1, 17, 70], 4, 4, 128, None),
        Problem::new(&[3, 70], 6, 2, 36, Some(5)),
        Problem::new(&[1, 17, 70], 2, 1, 256, Some(40)),
        Problem::new(&[33], 4, 2, 96, Some(1)),
        // Qwen2.5-0.5B heads (14/2, hd 64), an empty sequence, several 64-row tiles.
        Problem::new(&[130, 64, 0, 1], 14, 2, 64, None),
        // Qwen2.5-1.5B heads (12/2, hd 128) with a window that spans tiles.
        Problem::new(&[129, 5], 12, 2, 128, Some(100)),
    ]
}

// ---------------------------------------------------------------------------------------------
// CPU-only: the oracle and the sizing functions

#[test]
fn oracle_forward_matches_cpu_attend() {
    for p in [
        Problem::new(&[1, 9, 23], 6, 2, 36, None),
        Problem::new(&[12, 7], 4, 4, 16, Some(3)),
    ] {
        let g = gold(&p, false);
        let TrainAttnShape {
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: hd,
            window,
        } = p.shape;
        for w in p.cu_rows.windows(2) {
            let (b, e) = (w[0] as usize, w[1] as usize);
            let kc = &p.k[b * nkv * hd..e * nkv * hd];
            let vc = &p.v[b * nkv * hd..e * nkv * hd];
            for i in 0..e - b {
                for h in 0..nh {
                    let at = ((b + i) * nh + h) * hd;
                    let mut out = vec![0.0f32; hd];
                    attend(
                        &p.q[at..at + hd],
                        kc,
                        vc,
                        h / (nh / nkv),
                        nkv,
                        hd,
                        i,
                        window,
                        &mut out,
                    );
                    for (d, (&cpu, &oracle)) in out.iter().zip(&g.out[at..at + hd]).enumerate() {
                        // attend is f32 over ≤ 23 keys of O(1) terms: ~1e-6.
                        assert!(
                            (cpu as f64 - oracle).abs() < 1e-5,
                            "{}: row {} head {h} dim {d}: attend {cpu} oracle {oracle}",
                            p.name(),
                            b + i,
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn oracle_backward_matches_finite_differences() {
    // L = Σ dout·out; dL/dx by central differences of the f64 forward, for every element of q,
    // k and v. Step 1e-5: truncation ~h²·|L'''| ~ 1e-10, rounding ~1e-16·|L|/h ~ 1e-10.
    for p in [
        Problem::new(&[1, 4, 6], 4, 2, 8, None),
        Problem::new(&[7, 2], 6, 2, 4, Some(3)),
        Problem::new(&[5], 2, 2, 8, Some(1)),
    ] {
        let f = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<f64>>();
        let (q, k, v) = (f(&p.q), f(&p.k), f(&p.v));
        let analytic = gold_f64(&p, &q, &k, &v, true);
        let loss = |q: &[f64], k: &[f64], v: &[f64]| -> f64 {
            let g = gold_f64(&p, q, k, v, false);
            g.out.iter().zip(&p.dout).map(|(o, &d)| o * d as f64).sum()
        };
        let h = 1e-5;
        for (which, grad) in [("q", &analytic.dq), ("k", &analytic.dk), ("v", &analytic.dv)] {
            for idx in 0..grad.len() {
                let perturbed = |step: f64| {
                    let (mut q2, mut k2, mut v2) = (q.clone(), k.clone(), v.clone());
                    match which {
                        "q" => q2[idx] += step,
                        "k" => k2[idx] += step,
                        _ => v2[idx] += step,
                    }
                    loss(&q2, &k2, &v2)
                };
                let fd = (perturbed(h) - perturbed(-h)) / (2.0 * h);
                assert!(
                    (fd - grad[idx]).abs() <= 1e-7 + 1e-6 * grad[idx].abs(),
                    "{}: d{which}[{idx}]: finite difference {fd}, oracle {}",
                    p.name(),
                    grad[idx]
                );
            }
        }
    }
}

#[test]
fn sizing_functions() {
    let shape = |hd: usize| TrainAttnShape {
        n_heads: 14,
        n_kv_heads: 2,
        head_dim: hd,
        window: None,
    };
    assert_eq!(ATTN_TRAIN_COMPILED_HEAD_DIMS, [64, 128, 256]);
    for (hd, c) in [
        (4, 64),
        (36, 64),
        (64, 64),
        (68, 128),
        (96, 128),
        (128, 128),
        (132, 256),
        (256, 256),
    ] {
        assert_eq!(shape(hd).compiled_head_dim(), c, "hd {hd}");
    }
    // (64 q rows + 2 stages · 2·64 key/value rows)·(64 + 8)·2 bytes; HD 256 takes 32-key tiles.
    assert_eq!(shape(64).fwd_smem_bytes(), 320 * 72 * 2);
    assert_eq!(shape(128).fwd_smem_bytes(), 320 * 136 * 2);
    assert_eq!(shape(256).fwd_smem_bytes(), 192 * 264 * 2);
    // dk/dv: 2·64 key rows + per stage (2, 2, 1) 2·BQ query rows (BQ 64, 32, 16) + BQ lse and
    // delta f32.
    assert_eq!(shape(64).dkdv_smem_bytes(), 384 * 72 * 2 + 1024);
    assert_eq!(shape(128).dkdv_smem_bytes(), 256 * 136 * 2 + 512);
    assert_eq!(shape(256).dkdv_smem_bytes(), 160 * 264 * 2 + 128);
    // dq: 2·64 q/dout rows + key and value stages (2 + 2, 2 + 1, 1 + 1) of BK rows (64, 64, 32).
    assert_eq!(shape(64).dq_smem_bytes(), 384 * 72 * 2);
    assert_eq!(shape(128).dq_smem_bytes(), 320 * 136 * 2);
    assert_eq!(shape(256).dq_smem_bytes(), 192 * 264 * 2);
    // Every kernel fits the smallest opt-in limit of sm_80+ GPUs (99 KiB on sm_86/sm_89).
    for hd in (4..=256).step_by(4) {
        let s = shape(hd);
        for bytes in [s.fwd_smem_bytes(), s.dkdv_smem_bytes(), s.dq_smem_bytes()] {
            assert!(bytes <= 99 * 1024, "hd {hd}: {bytes} bytes of shared memory");
        }
    }
    assert_eq!(shape(64).scale(), 0.125);
    assert_eq!(attention_train_row_tiles(0), 0);
    assert_eq!(attention_train_row_tiles(1), 1);
    assert_eq!(attention_train_row_tiles(64), 1);
    assert_eq!(attention_train_row_tiles(65), 2);
    assert_eq!(attention_train_row_tiles(384), 6);

    assert_eq!(packed_max_rows(&[0, 1, 18, 88], 88).unwrap(), 70);
    assert_eq!(packed_max_rows(&[0, 0, 5, 5], 5).unwrap(), 5);
    assert_eq!(packed_max_rows(&[0], 0).unwrap(), 0);
    assert!(packed_max_rows(&[], 0).is_err());
    assert!(packed_max_rows(&[1, 4], 4).is_err());
    assert!(packed_max_rows(&[0, 4, 3], 3).is_err());
    assert!(packed_max_rows(&[0, 4], 5).is_err());
}

// ---------------------------------------------------------------------------------------------
// GPU

#[test]
fn forward_matches_oracle() {
    let Some(dev) = device_or_skip() else { return };
    for p in problems() {
        eprintln!("{}", p.name());
        let g = gold(&p, false);
        let (out, lse) = dev
            .attention_train_fwd_bf16_host(&p.q, &p.k, &p.v, &p.cu_rows, &p.shape)
            .unwrap();
        check(
            &format!("{}: out", p.name()),
            &g.out,
            &g.mag_out,
            &out,
            ATOL_OF_MAG,
            EPS_BF16,
        );
        // lse is f32 end to end: scores from bf16-exact products summed in f32 (≲ 1e-5 here),
        // exp2/log2 within a few ulp. 1e-4 absolute (|lse| ≲ 10) keeps a ≥ 10× margin.
        let ones = vec![1.0; g.lse.len()];
        check(&format!("{}: lse", p.name()), &g.lse, &ones, &lse, 1e-4, 1e-5);
    }
}

#[test]
fn backward_matches_oracle() {
    let Some(dev) = device_or_skip() else { return };
    for p in problems() {
        eprintln!("{}", p.name());
        let g = gold(&p, true);
        let [out, _lse, dq, dk, dv] = dev
            .attention_train_bwd_bf16_host(&p.q, &p.k, &p.v, &p.dout, &p.cu_rows, &p.shape)
            .unwrap();
        check(
            &format!("{}: out", p.name()),
            &g.out,
            &g.mag_out,
            &out,
            ATOL_OF_MAG,
            EPS_BF16,
        );
        check(
            &format!("{}: dq", p.name()),
            &g.dq,
            &g.mag_dq,
            &dq,
            ATOL_OF_MAG,
            EPS_BF16,
        );
        check(
            &format!("{}: dk", p.name()),
            &g.dk,
            &g.mag_dk,
            &dk,
            ATOL_OF_MAG,
            EPS_BF16,
        );
        check(
            &format!("{}: dv", p.name()),
            &g.dv,
            &g.mag_dv,
            &dv,
            ATOL_OF_MAG,
            EPS_BF16,
        );
    }
}

#[test]
fn backward_is_deterministic() {
    let Some(dev) = device_or_skip() else { return };
    let p = Problem::new(&[130, 70, 3], 6, 2, 64, None);
    let run = || {
        dev.attention_train_bwd_bf16_host(&p.q, &p.k, &p.v, &p.dout, &p.cu_rows, &p.shape)
            .unwrap()
    };
    let (a, b) = (run(), run());
    for (name, x, y) in [
        ("out", &a[0], &b[0]),
        ("lse", &a[1], &b[1]),
        ("dq", &a[2], &b[2]),
        ("dk", &a[3], &b[3]),
        ("dv", &a[4], &b[4]),
    ] {
        let same = x.iter().zip(y.iter()).all(|(u, w)| u.to_bits() == w.to_bits());
        assert!(same, "{name}: two runs differ");
    }
}

#[test]
fn scatter_rows_places_rows() {
    let Some(dev) = device_or_skip() else { return };
    let (n, dim) = (11usize, 37usize);
    let rows: Vec<u32> = vec![7, 0, 10, 3];
    let src = bf(&uniform_vec(rows.len() * dim, 5, -3.0, 3.0));
    let dst = bf(&uniform_vec(n * dim, 6, -3.0, 3.0));
    let got = dev.scatter_rows_bf16_host(&src, &rows, &dst, dim).unwrap();
    let mut want = dst.clone();
    for (i, &r) in rows.iter().enumerate() {
        let r = r as usize;
        want[r * dim..(r + 1) * dim].copy_from_slice(&src[i * dim..(i + 1) * dim]);
    }
    // A copy: exact.
    assert_eq!(got, want);
    // No rows: dst unchanged.
    assert_eq!(dev.scatter_rows_bf16_host(&[], &[], &dst, dim).unwrap(), dst);
}

#[test]
fn launchers_reject_bad_shapes() {
    let Some(dev) = device_or_skip() else { return };
    let try_fwd = |dev: &CudaDevice, shape: TrainAttnShape, rows: usize, cu: &[i32], max_rows: usize| {
        let (h, kv, hd) = (shape.n_heads, shape.n_kv_heads, shape.head_dim);
        let q = dev.alloc_zeros::<half::bf16>((rows * h * hd).max(1)).unwrap();
        let k = dev.alloc_zeros::<half::bf16>((rows * kv * hd).max(1)).unwrap();
        let v = dev.alloc_zeros::<half::bf16>((rows * kv * hd).max(1)).unwrap();
        let mut out = dev.alloc_zeros::<half::bf16>((rows * h * hd).max(1)).unwrap();
        let mut lse = dev.alloc_zeros::<f32>((rows * h).max(1)).unwrap();
        let cu_d = dev.upload(cu).unwrap();
        dev.attention_train_fwd_bf16(
            &q,
            &k,
            &v,
            &cu_d,
            &mut out,
            &mut lse,
            &shape,
            cu.len() - 1,
            rows,
            max_rows,
        )
    };
    let ok = TrainAttnShape {
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 64,
        window: None,
    };
    try_fwd(&dev, ok, 5, &[0, 2, 5], 3).expect("a valid shape");
    for (what, shape) in [
        ("hd 6", TrainAttnShape { head_dim: 6, ..ok }),
        ("hd 260", TrainAttnShape { head_dim: 260, ..ok }),
        ("hd 0", TrainAttnShape { head_dim: 0, ..ok }),
        ("H 4 KV 3", TrainAttnShape { n_kv_heads: 3, ..ok }),
        (
            "window 0",
            TrainAttnShape {
                window: Some(0),
                ..ok
            },
        ),
    ] {
        let e = try_fwd(&dev, shape, 5, &[0, 2, 5], 3);
        assert!(e.is_err(), "{what} accepted");
        eprintln!("{what}: {}", e.unwrap_err());
    }
    // max_rows larger than rows, or too small to cover them.
    assert!(try_fwd(&dev, ok, 5, &[0, 2, 5], 6).is_err());
    assert!(try_fwd(&dev, ok, 5, &[0, 2, 5], 2).is_err());
}
