//! The training step's tensor-core LoRA kernels (src/cuda/lora_train.rs, kernels/lora_train.cu)
//! against an f64 host reference, llm.c style: every element within `atol + 0.079·|ref|`.
//!
//! Both sides see the same bf16 inputs (x, dy, A, B, the incoming y and dx), so what differs is
//! the kernels' own rounding:
//! - xa = x Aᵀ and dyb = dy B are rounded to bf16 (relative ≤ 2^-8) before they are used again:
//!   y, dx, dB and dA each move by at most 2^-8·mag, mag = Σ|terms| of the output's sum chained
//!   through the intermediate (e.g. mag(y) = |y_in| + s·Σ_j mag(xa_j)·|B_oj|, mag(xa_j) =
//!   Σ_i |x_i A_ji|). atol = mag/128 is twice that worst case; it also covers the f32 (tensor-
//!   core) accumulation, ~K·2^-24·mag ≤ 3e-4·mag at K = 4864 in the worst case, far less in
//!   practice.
//! - y and dx are rounded to bf16 once more when stored (≤ 2^-8·|y|), and xa, dyb when stored:
//!   the relative term 0.079 (llm.c's bf16 tolerance) covers these.
//!
//! A wrong index, a dropped K chunk or a missing split moves many elements by a sizeable fraction
//! of mag (checked on the CPU emulator by deliberately broken kernels: scripts/kernel_emu).
//!
//! Shapes: n 1, 17, 1000+ (row splits of the gradients, partial row tiles), in/out not multiples
//! of 64 (72, 136, 896, 4864) or of 8 (45, 123: the element-wise load path), r 4, 8, 16, 48, 64,
//! 128. Without a usable GPU every test prints "skipping: <reason>" and passes;
//! `RFT_REQUIRE_GPU=1` makes that a failure.

mod common;
use common::{bf, device_or_skip, uniform_vec};
use cudarc::driver::{CudaSlice, DevicePtr};
use half::bf16;
use rft::cuda::{
    lora_train_col_splits, lora_train_grad_scratch_len, lora_train_grad_split, set_lora_train_target_blocks,
    CudaDevice, LoraDropoutSite, LoraOut, FUSED_TARGET_BLOCKS,
};

/// Reference outputs (f64) and their magnitudes Σ|terms|.
struct Reference {
    xa: Vec<f64>,
    y: Vec<f64>,
    dyb: Vec<f64>,
    dx: Vec<f64>,
    da: Vec<f64>,
    db: Vec<f64>,
    mag: [Vec<f64>; 6],
}

/// Inputs of one projection's LoRA forward and backward (already bf16-representable where the
/// kernels read bf16).
struct Case {
    n: usize,
    d_in: usize,
    d_out: usize,
    r: usize,
    s: f32,
    x: Vec<f32>,
    dy: Vec<f32>,
    a: Vec<f32>,
    b: Vec<f32>,
    y_in: Vec<f32>,
    dx_in: Vec<f32>,
    da_in: Vec<f32>,
    db_in: Vec<f32>,
}

impl Case {
    fn new(n: usize, d_in: usize, d_out: usize, r: usize) -> Case {
        let seed = (n * 7919 + d_in * 31 + d_out * 17 + r) as u64;
        Case {
            n,
            d_in,
            d_out,
            r,
            s: 2.0,
            x: bf(&uniform_vec(n * d_in, seed, -2.0, 2.0)),
            dy: bf(&uniform_vec(n * d_out, seed + 1, -1.0, 1.0)),
            a: bf(&uniform_vec(r * d_in, seed + 2, -0.1, 0.1)),
            b: bf(&uniform_vec(d_out * r, seed + 3, -0.1, 0.1)),
            y_in: bf(&uniform_vec(n * d_out, seed + 4, -0.5, 0.5)),
            dx_in: bf(&uniform_vec(n * d_in, seed + 5, -0.5, 0.5)),
            da_in: uniform_vec(r * d_in, seed + 6, -0.01, 0.01),
            db_in: uniform_vec(d_out * r, seed + 7, -0.01, 0.01),
        }
    }

    fn run(&self, dev: &CudaDevice) -> [Vec<f32>; 6] {
        dev.lora_train_host(
            &self.x,
            &self.dy,
            &self.a,
            &self.b,
            &self.y_in,
            &self.dx_in,
            &self.da_in,
            &self.db_in,
            self.s,
            self.n,
            self.d_in,
            self.d_out,
            self.r,
        )
        .unwrap_or_else(|e| panic!("n {} {}→{} r {}: {e}", self.n, self.d_in, self.d_out, self.r))
    }

    fn reference(&self) -> Reference {
        let (n, din, dout, r, s) = (self.n, self.d_in, self.d_out, self.r, self.s as f64);
        let (x, dy, a, b) = (&self.x, &self.dy, &self.a, &self.b);
        let mut xa = vec![0.0; n * r];
        let mut xa_m = vec![0.0; n * r];
        let mut dyb = vec![0.0; n * r];
        let mut dyb_m = vec![0.0; n * r];
        for m in 0..n {
            for j in 0..r {
                let (mut v, mut mv, mut w, mut mw) = (0.0, 0.0, 0.0, 0.0);
                for i in 0..din {
                    let t = x[m * din + i] as f64 * a[j * din + i] as f64;
                    v += t;
                    mv += t.abs();
                }
                for o in 0..dout {
                    let t = dy[m * dout + o] as f64 * b[o * r + j] as f64;
                    w += t;
                    mw += t.abs();
                }
                (xa[m * r + j], xa_m[m * r + j]) = (v, mv);
                (dyb[m * r + j], dyb_m[m * r + j]) = (w, mw);
            }
        }
        let mut y: Vec<f64> = self.y_in.iter().map(|&v| v as f64).collect();
        let mut y_m: Vec<f64> = y.iter().map(|v| v.abs()).collect();
        let mut dx: Vec<f64> = self.dx_in.iter().map(|&v| v as f64).collect();
        let mut dx_m: Vec<f64> = dx.iter().map(|v| v.abs()).collect();
        let mut da: Vec<f64> = self.da_in.iter().map(|&v| v as f64).collect();
        let mut da_m: Vec<f64> = da.iter().map(|v| v.abs()).collect();
        let mut db: Vec<f64> = self.db_in.iter().map(|&v| v as f64).collect();
        let mut db_m: Vec<f64> = db.iter().map(|v| v.abs()).collect();
        for m in 0..n {
            for j in 0..r {
                let (u, um) = (xa[m * r + j], xa_m[m * r + j]);
                let (e, em) = (dyb[m * r + j], dyb_m[m * r + j]);
                for o in 0..dout {
                    let bo = b[o * r + j] as f64;
                    y[m * dout + o] += s * u * bo;
                    y_m[m * dout + o] += s * um * bo.abs();
                    let g = dy[m * dout + o] as f64;
                    db[o * r + j] += s * g * u;
                    db_m[o * r + j] += s * g.abs() * um;
                }
                for i in 0..din {
                    let aj = a[j * din + i] as f64;
                    dx[m * din + i] += s * e * aj;
                    dx_m[m * din + i] += s * em * aj.abs();
                    let g = x[m * din + i] as f64;
                    da[j * din + i] += s * e * g;
                    da_m[j * din + i] += s * em * g.abs();
                }
            }
        }
        Reference {
            xa,
            y,
            dyb,
            dx,
            da,
            db,
            mag: [xa_m, y_m, dyb_m, dx_m, da_m, db_m],
        }
    }
}

/// Every element within mag/128 + 0.079·|ref| (module comment).
fn assert_close(what: &str, reference: &[f64], mag: &[f64], got: &[f32]) {
    assert_eq!(reference.len(), got.len(), "{what}: length");
    let (mut bad, mut worst) = (0, 0.0f64);
    for (i, (&r, &g)) in reference.iter().zip(got).enumerate() {
        let err = (r - g as f64).abs();
        let tol = mag[i] / 128.0 + 0.079 * r.abs() + 1e-30;
        worst = worst.max(err / tol);
        if err > tol || !g.is_finite() {
            if bad < 8 {
                eprintln!("{what}: mismatch at {i}: ref {r} gpu {g} (mag {})", mag[i]);
            }
            bad += 1;
        }
    }
    eprintln!("{what}: worst err/tol {worst:.3}");
    assert_eq!(
        bad,
        0,
        "{what}: {bad} of {} elements out of tolerance",
        reference.len()
    );
}

#[test]
fn lora_train_matches_f64_reference() {
    let Some(dev) = device_or_skip() else { return };
    // (n, in, out, r): single row; odd row counts with partial tiles; Qwen2.5-0.5B shapes
    // (896 → 128 k/v, 896 → 4864 gate/up, 4864 → 896 down) with row-split gradients; dims that
    // are not multiples of 8 (element-wise loads); every compiled rank (16: r 4, 8, 16; 64: 48;
    // 128: 128).
    for &(n, d_in, d_out, r) in &[
        (1usize, 896usize, 128usize, 16usize),
        (17, 136, 72, 8),
        (33, 123, 45, 4),
        (1000, 896, 136, 16),
        (1029, 4864, 896, 16),
        (300, 896, 4864, 64),
        (70, 72, 136, 48),
        (1100, 136, 72, 32),
        (40, 136, 72, 128),
    ] {
        let case = Case::new(n, d_in, d_out, r);
        let got = case.run(&dev);
        let want = case.reference();
        let what = format!("n {n} {d_in}→{d_out} r {r}");
        let names = ["xa", "y", "dyb", "dx", "dA", "dB"];
        let refs = [&want.xa, &want.y, &want.dyb, &want.dx, &want.da, &want.db];
        for k in 0..6 {
            assert_close(&format!("{what}: {}", names[k]), refs[k], &want.mag[k], &got[k]);
        }
    }
}

#[test]
fn lora_train_is_deterministic() {
    let Some(dev) = device_or_skip() else { return };
    // Row-split gradients (35 splits of dA at in = 896) and several row tiles: two runs must be
    // bit-identical (fixed split, no atomics).
    let case = Case::new(2000, 896, 136, 16);
    assert!(lora_train_grad_split(2000, 896).0 > 1);
    let (a, b) = (case.run(&dev), case.run(&dev));
    for (k, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()),
            "output {k} differs between two runs"
        );
    }
}

#[test]
fn column_splits_change_no_bit() {
    let Some(dev) = device_or_skip() else { return };
    // `RFT_TRAIN_LORA_BLOCKS` (set_lora_train_target_blocks) changes how the fused kernels split
    // the output columns over blocks, and must change no output bit: each element is written by
    // one block and each split recomputes the same x·Aᵀ. 66 row tiles; y's 8 column chunks
    // split 4 ways by default and 8 with the largest target, dx's 9 chunks 3 and 5 ways. Only
    // raised here (other tests of this binary may run meanwhile and expect their splits).
    let case = Case::new(4224, 520, 512, 16);
    assert_eq!(
        (lora_train_col_splits(4224, 512), lora_train_col_splits(4224, 520)),
        (4, 3)
    );
    let base = case.run(&dev);
    set_lora_train_target_blocks(1 << 20);
    assert_eq!(
        (lora_train_col_splits(4224, 512), lora_train_col_splits(4224, 520)),
        (8, 5)
    );
    let split = case.run(&dev);
    set_lora_train_target_blocks(FUSED_TARGET_BLOCKS);
    for (k, (x, y)) in base.iter().zip(&split).enumerate() {
        assert!(
            x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()),
            "output {k} differs between the default and the largest column splits"
        );
    }
}

/// The forward of `c` with A and B given as device buffers: (y, xa).
fn fwd(
    dev: &CudaDevice,
    c: &Case,
    x: &CudaSlice<bf16>,
    a: &impl DevicePtr<bf16>,
    b: &impl DevicePtr<bf16>,
) -> (Vec<f32>, Vec<f32>) {
    let mut y = dev.upload_bf16(&c.y_in).unwrap();
    let mut xa = dev.alloc_zeros::<bf16>(c.n * c.r).unwrap();
    dev.lora_train_fwd_bf16(
        x,
        a,
        b,
        &mut y,
        LoraOut::Add,
        Some(&mut xa),
        c.s,
        c.n,
        c.d_in,
        c.d_out,
        c.r,
    )
    .unwrap();
    (dev.download_bf16(&y).unwrap(), dev.download_bf16(&xa).unwrap())
}

#[test]
fn store_mode_writes_without_reading() {
    let Some(dev) = device_or_skip() else { return };
    // LoraOut::Store (the trainer's forward and first input gradient, before cuBLAS adds the base
    // GEMM onto the output with beta = 1) must write every output element without reading it:
    // the outputs start as NaN, and must equal LoraOut::Add onto zeros bit for bit
    // (bf16(0 + s·t) = bf16(s·t)). Shapes: column-split grids (few rows), a partial row tile,
    // element-wise edges, the 0.5B gate/up shape; with and without LoRA dropout on dx.
    let nan = |len: usize| dev.upload_bf16(&vec![f32::NAN; len]).unwrap();
    let zeros = |len: usize| dev.alloc_zeros::<bf16>(len).unwrap();
    for &(n, d_in, d_out, r) in &[
        (17usize, 136usize, 72usize, 8usize),
        (70, 123, 45, 4),
        (129, 896, 4864, 16),
    ] {
        let c = Case::new(n, d_in, d_out, r);
        let what = format!("n {n} {d_in}→{d_out} r {r}");
        let (x, dy) = (dev.upload_bf16(&c.x).unwrap(), dev.upload_bf16(&c.dy).unwrap());
        let (a, b) = (dev.upload_bf16(&c.a).unwrap(), dev.upload_bf16(&c.b).unwrap());
        assert!(
            n > 64 || lora_train_col_splits(n, d_out) > 1,
            "{what}: no column split"
        );
        let (mut y_store, mut y_add) = (nan(n * d_out), zeros(n * d_out));
        let (mut xa1, mut xa2) = (zeros(n * r), zeros(n * r));
        for (y, mode, xa) in [
            (&mut y_store, LoraOut::Store, &mut xa1),
            (&mut y_add, LoraOut::Add, &mut xa2),
        ] {
            dev.lora_train_fwd_bf16(&x, &a, &b, y, mode, Some(xa), c.s, n, d_in, d_out, r)
                .unwrap();
        }
        let (ys, ya) = (
            dev.download_bf16(&y_store).unwrap(),
            dev.download_bf16(&y_add).unwrap(),
        );
        assert!(
            ys.iter().all(|v| v.is_finite()),
            "{what}: y store mode left or read NaN"
        );
        assert!(
            ys.iter().zip(&ya).all(|(p, q)| p.to_bits() == q.to_bits()),
            "{what}: y"
        );
        let drop = LoraDropoutSite {
            p: 0.25,
            keep_scale: 1.0 / 0.75,
            seed: 7,
            site: 3 << 48,
        };
        for dropout in [None, Some(drop)] {
            let (mut dx_store, mut dx_add) = (nan(n * d_in), zeros(n * d_in));
            let (mut dyb1, mut dyb2) = (zeros(n * r), zeros(n * r));
            for (dx, mode, dyb) in [
                (&mut dx_store, LoraOut::Store, &mut dyb1),
                (&mut dx_add, LoraOut::Add, &mut dyb2),
            ] {
                dev.lora_train_bwd_dx_dropout_bf16(
                    &dy, &a, &b, dx, mode, dyb, c.s, n, d_in, d_out, r, dropout,
                )
                .unwrap();
            }
            let (ds, da) = (
                dev.download_bf16(&dx_store).unwrap(),
                dev.download_bf16(&dx_add).unwrap(),
            );
            assert!(
                ds.iter().all(|v| v.is_finite()),
                "{what} {dropout:?}: dx store mode left or read NaN"
            );
            assert!(
                ds.iter().zip(&da).all(|(p, q)| p.to_bits() == q.to_bits()),
                "{what} {dropout:?}: dx"
            );
        }
    }
}

#[test]
fn unaligned_weights_match_aligned() {
    let Some(dev) = device_or_skip() else { return };
    // A and B as views at an odd element offset (as in the trainer's flat bf16 copy when r·in is
    // odd): the element-wise load path must give exactly what the 16-byte path gives.
    let (n, d_in, d_out, r) = (70, 136, 72, 8);
    let c = Case::new(n, d_in, d_out, r);
    let x = dev.upload_bf16(&c.x).unwrap();
    let mut packed = vec![0.5f32];
    packed.extend_from_slice(&c.a);
    packed.extend_from_slice(&c.b);
    let shifted = dev.upload_bf16(&packed).unwrap();
    let a = dev.upload_bf16(&c.a).unwrap();
    let b = dev.upload_bf16(&c.b).unwrap();
    let aligned = fwd(&dev, &c, &x, &a, &b);
    let odd = fwd(
        &dev,
        &c,
        &x,
        &shifted.slice(1..1 + r * d_in),
        &shifted.slice(1 + r * d_in..1 + r * d_in + d_out * r),
    );
    assert_eq!(aligned.0, odd.0, "y");
    assert_eq!(aligned.1, odd.1, "xa");
}

#[test]
fn lora_train_rejects_bad_shapes() {
    let Some(dev) = device_or_skip() else { return };
    let (n, d_in, d_out) = (8, 16, 24);
    let x = dev.alloc_zeros::<bf16>(n * d_in).unwrap();
    let dy = dev.alloc_zeros::<bf16>(n * d_out).unwrap();
    // Rank above the compiled 128.
    let r = 129;
    let a = dev.alloc_zeros::<bf16>(r * d_in).unwrap();
    let b = dev.alloc_zeros::<bf16>(d_out * r).unwrap();
    let mut y = dev.alloc_zeros::<bf16>(n * d_out).unwrap();
    let e = dev
        .lora_train_fwd_bf16(
            &x,
            &a,
            &b,
            &mut y,
            LoraOut::Add,
            None::<&mut CudaSlice<bf16>>,
            1.0,
            n,
            d_in,
            d_out,
            r,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("LoRA rank 129") && e.contains("≤ 128"), "{e}");
    // Wrong lengths name the buffer and the expected shape.
    let r = 4;
    let a = dev.alloc_zeros::<bf16>(r * d_in + 1).unwrap();
    let b = dev.alloc_zeros::<bf16>(d_out * r).unwrap();
    let mut dx = dev.alloc_zeros::<bf16>(n * d_in).unwrap();
    let mut dyb = dev.alloc_zeros::<bf16>(n * r).unwrap();
    let e = dev
        .lora_train_bwd_dx_bf16(
            &dy,
            &a,
            &b,
            &mut dx,
            LoraOut::Add,
            &mut dyb,
            1.0,
            n,
            d_in,
            d_out,
            r,
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("lora_train_bwd_dx_bf16: a has 65 elements, expected 64 = r*in"),
        "{e}"
    );
    // A split gradient with too little scratch.
    let n = 4096;
    let need = lora_train_grad_scratch_len(n, d_in, r);
    assert!(need > 0);
    let x = dev.alloc_zeros::<bf16>(n * d_in).unwrap();
    let dyb = dev.alloc_zeros::<bf16>(n * r).unwrap();
    let mut da = dev.alloc_zeros::<f32>(r * d_in).unwrap();
    let mut scratch = dev.alloc_zeros::<f32>(need - 1).unwrap();
    let e = dev
        .lora_train_grad_a_bf16(&dyb, &x, &mut da, &mut scratch, 1.0, n, d_in, r)
        .unwrap_err()
        .to_string();
    assert!(e.contains("lora_train_grad_a_bf16: scratch has"), "{e}");
}
