//! The rollout forward's fused kernels (kernels/fused.cu) against the unfused kernels they
//! replace, on the GPU (the unfused ones are checked against the CPU reference in
//! tests/cuda_rollout_kernels.rs and tests/cuda_kernels.rs):
//! - qkv_rope_append_bf16 vs add_bias_bf16 + rope_fwd_bf16 + kv_cache_append_bf16: the same
//!   roundings in the same order, so q and the caches agree to within one bf16 rounding
//!   (rtol 2^-8: the compiler may contract a·c − b·s into an FMA differently in the two kernels;
//!   the count of bit-identical elements is printed) and v is bit-identical;
//! - lora_group_xa/expand_add vs lora_xa + lora_expand_add per projection: bit-identical (the
//!   same arithmetic per element);
//! - residual_rmsnorm_fwd_bf16 vs residual_add_bf16 + rmsnorm_fwd_bf16: x bit-identical, out
//!   within rtol 2^-7 (one warp's sum of squares vs a block's: another f32 summation order, and
//!   one bf16 rounding of the product).
//!
//! Without a usable GPU every test prints "skipping: <reason>" and passes; `RFT_REQUIRE_GPU=1`
//! makes that a failure.

mod common;

use common::{bf, device_or_skip, uniform_vec};
use rft::cuda::{kernels_fatbin, AttnShape, FUSED_KERNEL_NAMES};

fn assert_close(what: &str, want: &[f32], got: &[f32], rtol: f32) -> usize {
    assert_eq!(want.len(), got.len(), "{what}: length");
    let mut same = 0;
    for (i, (&w, &g)) in want.iter().zip(got).enumerate() {
        if w.to_bits() == g.to_bits() {
            same += 1;
            continue;
        }
        assert!(
            (w - g).abs() <= 1e-6 + rtol * w.abs(),
            "{what}: element {i}: fused {g} vs unfused {w}"
        );
    }
    same
}

#[test]
fn fused_kernels_are_in_the_fatbin() {
    let Some(fatbin) = kernels_fatbin() else {
        eprintln!("skipping: kernels were not compiled (no nvcc at build time)");
        return;
    };
    for name in FUSED_KERNEL_NAMES {
        assert!(
            fatbin.windows(name.len()).any(|w| w == name.as_bytes()),
            "{name} missing from the fatbin"
        );
    }
}

#[test]
fn qkv_rope_append_matches_the_unfused_kernels() {
    let Some(dev) = device_or_skip() else { return };
    // (heads, kv heads, hd, rows): Qwen2.5-0.5B's attention, 1.5B's hd 128, a tiny odd one.
    for &(h, kv, hd, rows) in &[
        (14usize, 2usize, 64usize, 37usize),
        (12, 2, 128, 9),
        (4, 4, 16, 1),
    ] {
        for with_bias in [false, true] {
            let (qd, kvd) = (h * hd, kv * hd);
            let w = qd + 2 * kvd;
            let shape = AttnShape {
                n_heads: h,
                n_kv_heads: kv,
                head_dim: hd,
                num_pages: 12,
                page_size: 16,
                max_pages: 6,
                window: None,
            };
            let x = bf(&uniform_vec(rows * w, (rows * w) as u64, -3.0, 3.0));
            let bias = bf(&uniform_vec(w, w as u64 + 5, -1.0, 1.0));
            let inv_freq: Vec<f32> = (0..hd / 2)
                .map(|i| (1.0 / 1e6f64.powf(2.0 * i as f64 / hd as f64)) as f32)
                .collect();
            // Two sequences on shuffled pages, each row at its own (sequence, position) (two
            // rows writing one cache slot would race in either path); every fifth row outside
            // the cache (q only).
            let bt: Vec<i32> = vec![3, 7, 1, 9, 0, 10, 2, 11, 5, 4, 8, 6];
            let seq: Vec<i32> = (0..rows).map(|r| (r % 2) as i32).collect();
            let pos: Vec<i32> = (0..rows)
                .map(|r| if r % 5 == 4 { -1 } else { (r / 2 * 3 + 1) as i32 })
                .collect();
            let cache = shape.cache_len();
            let kc = bf(&uniform_vec(cache, 11, -1.0, 1.0));
            let vc = bf(&uniform_vec(cache, 12, -1.0, 1.0));
            let (q, k_cache, v_cache) = dev
                .qkv_rope_append_bf16_host(
                    &x,
                    with_bias.then_some(&bias[..]),
                    &pos,
                    &inv_freq,
                    &bt,
                    &seq,
                    &kc,
                    &vc,
                    &shape,
                )
                .unwrap();
            // Unfused: bias on the stacked rows, split, RoPE, append.
            let xb = if with_bias {
                dev.add_bias_bf16_host(&x, &bias).unwrap()
            } else {
                x.clone()
            };
            let split = |c0: usize, n: usize| -> Vec<f32> {
                (0..rows)
                    .flat_map(|r| xb[r * w + c0..r * w + c0 + n].to_vec())
                    .collect()
            };
            let (q0, k0, v0) = (split(0, qd), split(qd, kvd), split(qd + kvd, kvd));
            let (q1, k1) = dev
                .rope_fwd_bf16_host(&q0, &k0, &pos, &inv_freq, h, kv, hd)
                .unwrap();
            let (kc1, vc1) = dev
                .kv_cache_append_bf16_host(&kc, &vc, &k1, &v0, &bt, &seq, &pos, &shape)
                .unwrap();
            let what = format!("h {h} kv {kv} hd {hd} rows {rows} bias {with_bias}");
            let sq = assert_close(&format!("{what}: q"), &q1, &q, 1.0 / 256.0);
            let sk = assert_close(&format!("{what}: k cache"), &kc1, &k_cache, 1.0 / 256.0);
            assert_eq!(vc1, v_cache, "{what}: v cache");
            eprintln!(
                "{what}: bit-identical q {sq}/{}, k cache {sk}/{}",
                q1.len(),
                kc1.len()
            );
        }
    }
}

#[test]
fn residual_rmsnorm_matches_the_unfused_kernels() {
    let Some(dev) = device_or_skip() else { return };
    for &(rows, dim) in &[(1usize, 896usize), (7, 1536), (33, 123), (64, 3584)] {
        let x = bf(&uniform_vec(rows * dim, (rows + dim) as u64, -2.0, 2.0));
        let y = bf(&uniform_vec(rows * dim, (rows * dim) as u64 + 1, -2.0, 2.0));
        let wt = bf(&uniform_vec(dim, dim as u64 + 2, 0.5, 1.5));
        let (x1, out) = dev
            .residual_rmsnorm_fwd_bf16_host(&x, &y, &wt, dim, 1e-6)
            .unwrap();
        let x0 = dev.residual_add_bf16_host(&x, &y).unwrap();
        let out0 = dev.rmsnorm_fwd_bf16_host(&x0, &wt, rows, dim, 1e-6).unwrap();
        assert_eq!(x0, x1, "rows {rows} dim {dim}: x + y");
        let same = assert_close(&format!("rows {rows} dim {dim}: out"), &out0, &out, 1.0 / 128.0);
        eprintln!("rows {rows} dim {dim}: bit-identical out {same}/{}", out.len());
    }
}

#[test]
fn lora_group_is_bit_identical_to_per_projection_lora() {
    let Some(dev) = device_or_skip() else { return };
    // q|k|v of Qwen2.5-0.5B at rank 16, then gate|up with a gap of 5 unadapted columns; the row
    // tiles (4 rows per xa warp, 32 per expand block): one row, 70, 64 rows of Qwen2.5-0.5B's
    // gate|up (the profiled decode bucket); ranks 64 and 80 (B and xa read per row) with odd
    // outputs whose 128-column blocks straddle projections.
    for (rows, outs, gap, din, rank) in [
        (7, vec![896usize, 128, 128], 0usize, 896usize, 16usize),
        (7, vec![300, 300], 5, 96, 8),
        (1, vec![896, 128, 128], 0, 896, 16),
        (70, vec![200, 40, 40], 0, 96, 16),
        (64, vec![4864, 4864], 0, 896, 16),
        (37, vec![131, 33, 7], 3, 64, 64),
        (35, vec![77, 150], 1, 56, 80),
    ] {
        let n = outs.len();
        let mut cols = Vec::new();
        let mut ldy = 0;
        for &o in &outs {
            cols.push(ldy + gap);
            ldy += gap + o;
        }
        let x = bf(&uniform_vec(rows * din, 1, -2.0, 2.0));
        let y = bf(&uniform_vec(rows * ldy, 2, -2.0, 2.0));
        let a: Vec<Vec<f32>> = (0..n)
            .map(|p| uniform_vec(rank * din, 10 + p as u64, -0.1, 0.1))
            .collect();
        let b: Vec<Vec<f32>> = (0..n)
            .map(|p| uniform_vec(outs[p] * rank, 20 + p as u64, -0.1, 0.1))
            .collect();
        let scale = 1.5;
        // Per projection: lora_xa + lora_expand_add on its columns taken out of y.
        let mut want = y.clone();
        for p in 0..n {
            let cols_p: Vec<f32> = (0..rows)
                .flat_map(|r| y[r * ldy + cols[p]..r * ldy + cols[p] + outs[p]].to_vec())
                .collect();
            let got = dev
                .lora_bf16_host(&cols_p, &x, &a[p], &b[p], scale, rows, din, outs[p], rank)
                .unwrap();
            for r in 0..rows {
                want[r * ldy + cols[p]..r * ldy + cols[p] + outs[p]]
                    .copy_from_slice(&got[r * outs[p]..(r + 1) * outs[p]]);
            }
        }
        let xd = dev.upload_bf16(&x).unwrap();
        let mut yd = dev.upload_bf16(&y).unwrap();
        let (ad, bd): (Vec<_>, Vec<_>) = (0..n)
            .map(|p| (dev.upload(&a[p]).unwrap(), dev.upload(&b[p]).unwrap()))
            .unzip();
        let members: Vec<_> = (0..n)
            .map(|p| rft::cuda::LoraMember {
                a: &ad[p],
                b: &bd[p],
                col: cols[p],
                out: outs[p],
            })
            .collect();
        let mut xa = dev.alloc_zeros::<f32>(rows * n * rank).unwrap();
        dev.lora_group_bf16(&xd, &members, scale, rank, &mut xa, &mut yd, ldy, rows, din)
            .unwrap();
        let got = dev.download_bf16(&yd).unwrap();
        assert_eq!(
            got, want,
            "rows {rows} outs {outs:?} gap {gap} rank {rank}: grouped vs per-projection LoRA"
        );
    }
}
