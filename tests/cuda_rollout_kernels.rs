//! The rollout kernels (src/cuda/rollout.rs, kernels/{elementwise,attention,lora,sampling}.cu)
//! against the f32 CPU reference, llm.c style: every element within `atol + rtol·|ref|`.
//!
//! Inputs are rounded to bf16 before BOTH sides see them, so tolerances only cover the kernels'
//! own rounding (one bf16 store: ≤ 2^-9 relative) and f32 summation order; each is justified
//! where it is set. The LoRA kernels are also held bit-exact to their documented summation
//! order and to one row per launch (`lora_bf16_is_bit_exact_and_row_invariant`). Without a usable GPU every test prints "skipping: <reason>" and passes;
//! `RFT_REQUIRE_GPU=1` makes that a failure. Pure-host tests (decode partitions, fatbin names) run
//! everywhere.

mod common;
use common::{bf, device_or_skip, emulated, uniform_vec};
use rft::cpu::model::attend;
use rft::cpu::ops;
use rft::cuda::{
    decode_partitions, kernels_fatbin, AttnShape, CudaDevice, DECODE_PARTITION_SIZE, ROLLOUT_KERNEL_NAMES,
};
use rft::sampling::{uniform, Sampler, SamplingParams};

fn assert_close(what: &str, reference: &[f32], got: &[f32], atol: f32, rtol: f32) {
    assert_eq!(reference.len(), got.len(), "{what}: length");
    let mut bad = 0;
    for (i, (&r, &g)) in reference.iter().zip(got).enumerate() {
        if (r - g).abs() > atol + rtol * r.abs() || !g.is_finite() {
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

/// One bf16 rounding of the result: ≤ 2^-9 relative; 2^-8 leaves room for ~1e-6 f32 effects.
const BF16_STORE_RTOL: f32 = 1.0 / 256.0;

#[test]
fn rollout_kernels_are_in_the_fatbin() {
    let Some(fatbin) = kernels_fatbin() else {
        eprintln!("skipping: no fatbin in this build");
        return;
    };
    for name in ROLLOUT_KERNEL_NAMES {
        assert!(
            fatbin.windows(name.len()).any(|w| w == name.as_bytes()),
            "{name} not in the fatbin"
        );
    }
}

#[test]
fn decode_partitions_depend_on_the_sequence_only() {
    let p = DECODE_PARTITION_SIZE;
    assert_eq!(p % 16, 0, "a partition never splits a KV page");
    assert_eq!(
        decode_partitions(0, None),
        1,
        "an empty sequence has one (empty) partition"
    );
    assert_eq!(decode_partitions(1, None), 1);
    assert_eq!(decode_partitions(p, None), 1);
    assert_eq!(decode_partitions(p + 1, None), 2);
    // The GRPO rollout shape: prompt 128 + 256 new tokens.
    assert_eq!(decode_partitions(384, None), 384usize.div_ceil(p));
    assert_eq!(decode_partitions(32_768, None), 32_768 / p);
    // A sliding window bounds the attended span.
    assert_eq!(decode_partitions(100_000, Some(4096)), 4096usize.div_ceil(p));
    assert_eq!(decode_partitions(50, Some(4096)), 1);
    // Monotone in the length: a grid sized for the longest sequence covers every shorter one.
    for w in [None, Some(100), Some(1000)] {
        let mut prev = 0;
        for len in 0..3000 {
            let n = decode_partitions(len, w);
            assert!(n >= prev, "len {len} window {w:?}");
            prev = n;
        }
    }
}

#[test]
fn embedding_fwd_bf16_matches_cpu() {
    let Some(dev) = device_or_skip() else { return };
    for &(vocab, dim) in &[(461usize, 123usize), (1000, 896)] {
        let table = bf(&uniform_vec(vocab * dim, dim as u64, -2.0, 2.0));
        for &rows in &[1usize, 7, 33] {
            let ids: Vec<u32> = (0..rows).map(|r| ((r * 7919 + 3) % vocab) as u32).collect();
            let got = dev.embedding_fwd_bf16_host(&table, &ids, dim).unwrap();
            let want: Vec<f32> = ids
                .iter()
                .flat_map(|&i| table[i as usize * dim..(i as usize + 1) * dim].to_vec())
                .collect();
            // A copy: exact.
            assert_eq!(got, want, "embedding vocab {vocab} dim {dim} rows {rows}");
        }
    }
}

#[test]
fn rope_fwd_bf16_matches_cpu() {
    let Some(dev) = device_or_skip() else { return };
    for c in common::rope_cases(false, 5) {
        let (gq, gk) = dev
            .rope_fwd_bf16_host(&c.q, &c.k, &c.pos, &c.inv_freq, c.h, c.kv, c.hd)
            .unwrap();
        // Same f32 angle on both sides; sincosf vs Rust's sin_cos differ by ≤ 2 ulp of
        // values ≤ 1, and the GPU may fuse a·c − b·s into an fma: ~1e-6 absolute on
        // |x| ≤ 3·√2, far below the bf16 store (2^-9 relative); atol for results near 0.
        assert_close(
            &format!("rope q {}", c.label),
            &c.want_q,
            &gq,
            1e-5,
            BF16_STORE_RTOL,
        );
        assert_close(
            &format!("rope k {}", c.label),
            &c.want_k,
            &gk,
            1e-5,
            BF16_STORE_RTOL,
        );
    }
}

#[test]
fn swiglu_bias_residual_bf16_match_cpu() {
    let Some(dev) = device_or_skip() else { return };
    for &(rows, inter) in &[(1usize, 123usize), (7, 896), (33, 4864)] {
        let n = rows * inter;
        let gate = bf(&uniform_vec(n, 1 + n as u64, -8.0, 8.0));
        let up = bf(&uniform_vec(n, 2 + n as u64, -3.0, 3.0));
        // silu via expf (≤ 2 ulp) and one division: ~1e-6 relative before the bf16 store.
        let want = ops::swiglu_fwd(&gate, &up);
        let got = dev.swiglu_fwd_bf16_host(&gate, &up).unwrap();
        assert_close(
            &format!("swiglu {rows}x{inter}"),
            &want,
            &got,
            1e-6,
            BF16_STORE_RTOL,
        );
        let mut gate_up = Vec::with_capacity(2 * n);
        for r in 0..rows {
            gate_up.extend_from_slice(&gate[r * inter..(r + 1) * inter]);
            gate_up.extend_from_slice(&up[r * inter..(r + 1) * inter]);
        }
        let got = dev.swiglu_fused_fwd_bf16_host(&gate_up, rows, inter).unwrap();
        assert_close(
            &format!("swiglu fused {rows}x{inter}"),
            &want,
            &got,
            1e-6,
            BF16_STORE_RTOL,
        );

        // One f32 add of two bf16 values, rounded once: the bf16 store bound; atol for
        // cancellations (the sum of two bf16 is exact in f32, so even those are within rtol).
        let b = bf(&uniform_vec(inter, 3, -1.0, 1.0));
        let mut want = up.clone();
        ops::add_bias(&mut want, &b);
        let got = dev.add_bias_bf16_host(&up, &b).unwrap();
        assert_close(
            &format!("add_bias {rows}x{inter}"),
            &want,
            &got,
            0.0,
            BF16_STORE_RTOL,
        );
        let want: Vec<f32> = gate.iter().zip(&up).map(|(a, b)| a + b).collect();
        let got = dev.residual_add_bf16_host(&gate, &up).unwrap();
        assert_close(
            &format!("residual {rows}x{inter}"),
            &want,
            &got,
            0.0,
            BF16_STORE_RTOL,
        );
    }
}

/// A paged cache holding per-sequence K/V rows `seq_k[s]` ([len_s, KV·hd], bf16-valued):
/// returns (k_cache, v_cache, block_table, shape). Pages are handed out in a scrambled order
/// (so a wrong page lookup cannot pass), page_size 16; `contiguous` instead builds the
/// per-sequence layout (page_size = cap, block_table[s] = [s]).
#[allow(clippy::too_many_arguments)]
fn build_cache(
    seq_k: &[Vec<f32>],
    seq_v: &[Vec<f32>],
    n_heads: usize,
    n_kv: usize,
    hd: usize,
    cap: usize,
    window: Option<usize>,
    contiguous: bool,
) -> (Vec<f32>, Vec<f32>, Vec<i32>, AttnShape) {
    let num_seqs = seq_k.len();
    let (page_size, max_pages) = if contiguous {
        (cap, 1)
    } else {
        (16, cap.div_ceil(16))
    };
    let num_pages = num_seqs * max_pages + 3; // a few unused pages
    let width = n_kv * hd;
    let mut table = vec![0i32; num_seqs * max_pages];
    for (i, t) in table.iter_mut().enumerate() {
        *t = if contiguous {
            i as i32
        } else {
            ((i * 37 + 5) % (num_seqs * max_pages)) as i32 + 3
        };
    }
    // Fill unused slots with garbage that would show up if read.
    let mut kc = vec![1e3f32; num_pages * page_size * width];
    let mut vc = vec![-1e3f32; num_pages * page_size * width];
    for s in 0..num_seqs {
        for t in 0..seq_k[s].len() / width {
            let page = table[s * max_pages + t / page_size] as usize;
            let at = (page * page_size + t % page_size) * width;
            kc[at..at + width].copy_from_slice(&seq_k[s][t * width..(t + 1) * width]);
            vc[at..at + width].copy_from_slice(&seq_v[s][t * width..(t + 1) * width]);
        }
    }
    let shape = AttnShape {
        n_heads,
        n_kv_heads: n_kv,
        head_dim: hd,
        num_pages,
        page_size,
        max_pages,
        window,
    };
    (kc, vc, table, shape)
}

/// CPU reference for one query row at position `pos` of a sequence's contiguous k, v.
#[allow(clippy::too_many_arguments)]
fn attend_ref(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    n_heads: usize,
    n_kv: usize,
    hd: usize,
    pos: usize,
    window: Option<usize>,
) -> Vec<f32> {
    let mut out = vec![0.0; n_heads * hd];
    for h in 0..n_heads {
        attend(
            &q[h * hd..(h + 1) * hd],
            k,
            v,
            h / (n_heads / n_kv),
            n_kv,
            hd,
            pos,
            window,
            &mut out[h * hd..(h + 1) * hd],
        );
    }
    out
}

// Attention tolerance: q, k, v are the same bf16 values on both sides; scores, softmax and the
// weighted sum are f32 with different summation orders (tree/online vs sequential, ≤ ~1e-6
// relative of the terms, which are bounded by max|v| = 1), then one bf16 store (2^-9 relative).
// The output is an average of v, so near-zero outputs come from cancellation: atol 2e-5 covers
// the f32 part against max|v| = 1.
const ATTN_ATOL: f32 = 2e-5;

#[test]
fn attention_decode_bf16_matches_cpu() {
    let Some(dev) = device_or_skip() else { return };
    // (n_heads, n_kv, hd): the tiny fixtures' hd 16 and 32, Qwen2.5-0.5B (14/2, hd 64, group
    // 7), hd 128 with group 16 (> 8 heads per block: two sub-groups).
    for &(h, kv, hd) in &[(4usize, 2usize, 16usize), (4, 2, 32), (14, 2, 64), (16, 1, 128)] {
        for &window in &[None, Some(100)] {
            for &contiguous in &[false, true] {
                let lens = [1usize, 17, 300, 1000, 0];
                let num_seqs = lens.len();
                let cap = 1000;
                let width = kv * hd;
                let seq_k: Vec<Vec<f32>> = lens
                    .iter()
                    .enumerate()
                    .map(|(s, &l)| bf(&uniform_vec(l * width, 100 + s as u64, -1.0, 1.0)))
                    .collect();
                let seq_v: Vec<Vec<f32>> = lens
                    .iter()
                    .enumerate()
                    .map(|(s, &l)| bf(&uniform_vec(l * width, 200 + s as u64, -1.0, 1.0)))
                    .collect();
                // q scaled up so the softmax is peaked for some rows and flat for others.
                let q = bf(&uniform_vec(num_seqs * h * hd, hd as u64, -4.0, 4.0));
                let (kc, vc, table, shape) = build_cache(&seq_k, &seq_v, h, kv, hd, cap, window, contiguous);
                let seq_lens: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
                let mut want = Vec::new();
                for s in 0..num_seqs {
                    if lens[s] == 0 {
                        want.extend(std::iter::repeat_n(0.0, h * hd));
                    } else {
                        let qs = &q[s * h * hd..(s + 1) * h * hd];
                        want.extend(attend_ref(
                            qs,
                            &seq_k[s],
                            &seq_v[s],
                            h,
                            kv,
                            hd,
                            lens[s] - 1,
                            window,
                        ));
                    }
                }
                // The grid sized for the longest sequence, for the cache's whole span, and far
                // past it (clamped to the span): same bits, all within tolerance of the CPU.
                let span = shape.page_size * shape.max_pages;
                let mut first: Option<Vec<f32>> = None;
                for max_len in [cap, span, 10 * span] {
                    let what = format!(
                        "decode h {h} kv {kv} hd {hd} window {window:?} contiguous {contiguous} max_len {max_len}"
                    );
                    let got = dev
                        .attention_decode_bf16_host(&q, &kc, &vc, &table, &seq_lens, &shape, max_len)
                        .unwrap();
                    assert_close(&what, &want, &got, ATTN_ATOL, BF16_STORE_RTOL);
                    match &first {
                        None => first = Some(got),
                        Some(f) => assert_bits_eq(&what, f, &got),
                    }
                }
                let batch = first.expect("ran");
                // Batch invariance: each sequence decoded alone (its grid sized for itself) and
                // in the reversed batch gives exactly the bits it has in the batch.
                let width_q = h * hd;
                let mp = shape.max_pages;
                for s in 0..num_seqs {
                    let alone = dev
                        .attention_decode_bf16_host(
                            &q[s * width_q..(s + 1) * width_q],
                            &kc,
                            &vc,
                            &table[s * mp..(s + 1) * mp],
                            &seq_lens[s..s + 1],
                            &shape,
                            lens[s],
                        )
                        .unwrap();
                    assert_bits_eq(
                        &format!("decode h {h} kv {kv} hd {hd} window {window:?} contiguous {contiguous}: sequence {s} (len {}) alone vs in the batch", lens[s]),
                        &batch[s * width_q..(s + 1) * width_q],
                        &alone,
                    );
                }
                let order: Vec<usize> = (0..num_seqs).rev().collect();
                let rq: Vec<f32> = order
                    .iter()
                    .flat_map(|&s| q[s * width_q..(s + 1) * width_q].to_vec())
                    .collect();
                let rt: Vec<i32> = order
                    .iter()
                    .flat_map(|&s| table[s * mp..(s + 1) * mp].to_vec())
                    .collect();
                let rl: Vec<i32> = order.iter().map(|&s| seq_lens[s]).collect();
                let rev = dev
                    .attention_decode_bf16_host(&rq, &kc, &vc, &rt, &rl, &shape, cap)
                    .unwrap();
                for (i, &s) in order.iter().enumerate() {
                    assert_bits_eq(
                        &format!("decode h {h} kv {kv} hd {hd} window {window:?}: sequence {s} in the reversed batch"),
                        &batch[s * width_q..(s + 1) * width_q],
                        &rev[i * width_q..(i + 1) * width_q],
                    );
                }
                // A grid too small for a sequence (max_len below its length) must not fail
                // silently: that sequence's output is NaN, the covered ones are unchanged.
                let short = dev
                    .attention_decode_bf16_host(&q, &kc, &vc, &table, &seq_lens, &shape, 1)
                    .unwrap();
                for s in 0..num_seqs {
                    let (a, b) = (
                        &batch[s * width_q..(s + 1) * width_q],
                        &short[s * width_q..(s + 1) * width_q],
                    );
                    if decode_partitions(lens[s], window) > 1 {
                        assert!(
                            b.iter().all(|x| x.is_nan()),
                            "sequence {s} (len {}) not covered: NaN expected",
                            lens[s]
                        );
                    } else {
                        assert_bits_eq(&format!("sequence {s} covered by a 1-partition grid"), a, b);
                    }
                }
            }
        }
    }
}

/// Bitwise equality of two kernel outputs (batch/grid invariance is exact, not a tolerance).
fn assert_bits_eq(what: &str, a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len(), "{what}: length");
    let bad: Vec<usize> = (0..a.len())
        .filter(|&i| a[i].to_bits() != b[i].to_bits())
        .collect();
    assert!(
        bad.is_empty(),
        "{what}: {} of {} values differ in their bits, first at {}: {} vs {}",
        bad.len(),
        a.len(),
        bad[0],
        a[bad[0]],
        b[bad[0]]
    );
}

#[test]
fn kv_append_and_attention_prefill_bf16_match_cpu() {
    let Some(dev) = device_or_skip() else { return };
    for &(h, kv, hd) in &[(4usize, 2usize, 16usize), (14, 2, 64), (8, 8, 128)] {
        for &window in &[None, Some(8)] {
            // Sequences with a cached prefix (pos0) and new rows: (pos0, new rows).
            let spans = [(0usize, 1usize), (0, 17), (5, 40), (300, 33)];
            let cap = 400;
            let width = kv * hd;
            let full_k: Vec<Vec<f32>> = spans
                .iter()
                .enumerate()
                .map(|(s, &(p0, n))| bf(&uniform_vec((p0 + n) * width, 300 + s as u64, -1.0, 1.0)))
                .collect();
            let full_v: Vec<Vec<f32>> = spans
                .iter()
                .enumerate()
                .map(|(s, &(p0, n))| bf(&uniform_vec((p0 + n) * width, 400 + s as u64, -1.0, 1.0)))
                .collect();
            // The cache holds only the prefixes; the new rows go in through kv_cache_append.
            let pre_k: Vec<Vec<f32>> = full_k
                .iter()
                .zip(&spans)
                .map(|(k, &(p0, _))| k[..p0 * width].to_vec())
                .collect();
            let pre_v: Vec<Vec<f32>> = full_v
                .iter()
                .zip(&spans)
                .map(|(v, &(p0, _))| v[..p0 * width].to_vec())
                .collect();
            let (kc, vc, table, shape) = build_cache(&pre_k, &pre_v, h, kv, hd, cap, window, false);
            let (mut k_new, mut v_new, mut row_seq, mut row_pos, mut cu_rows) =
                (vec![], vec![], vec![], vec![], vec![0i32]);
            for (s, &(p0, n)) in spans.iter().enumerate() {
                k_new.extend_from_slice(&full_k[s][p0 * width..]);
                v_new.extend_from_slice(&full_v[s][p0 * width..]);
                row_seq.extend(std::iter::repeat_n(s as i32, n));
                row_pos.extend((p0..p0 + n).map(|p| p as i32));
                cu_rows.push(cu_rows[s] + n as i32);
            }
            let (kc2, vc2) = dev
                .kv_cache_append_bf16_host(&kc, &vc, &k_new, &v_new, &table, &row_seq, &row_pos, &shape)
                .unwrap();
            // The append is a copy: the cache must equal one built from the full sequences.
            let (want_kc, want_vc, _, _) = build_cache(&full_k, &full_v, h, kv, hd, cap, window, false);
            assert_eq!(kc2, want_kc, "kv append k");
            assert_eq!(vc2, want_vc, "kv append v");

            let rows = row_seq.len();
            let q = bf(&uniform_vec(rows * h * hd, 7 + hd as u64, -4.0, 4.0));
            let pos0: Vec<i32> = spans.iter().map(|&(p0, _)| p0 as i32).collect();
            let got = dev
                .attention_prefill_bf16_host(&q, &kc2, &vc2, &table, &cu_rows, &pos0, &shape)
                .unwrap();
            let mut want = Vec::new();
            for r in 0..rows {
                let s = row_seq[r] as usize;
                let qr = &q[r * h * hd..(r + 1) * h * hd];
                want.extend(attend_ref(
                    qr,
                    &full_k[s],
                    &full_v[s],
                    h,
                    kv,
                    hd,
                    row_pos[r] as usize,
                    window,
                ));
            }
            assert_close(
                &format!("prefill h {h} kv {kv} hd {hd} window {window:?}"),
                &want,
                &got,
                ATTN_ATOL,
                BF16_STORE_RTOL,
            );
        }
    }
}

#[test]
fn lora_bf16_matches_cpu() {
    let Some(dev) = device_or_skip() else { return };
    // (rows, in, out, rank): Qwen2.5-0.5B q_proj (896 → 896) and down_proj (4864 → 896), odd sizes.
    // Rows not a multiple of the kernels' row tiles (4 for xa, 32 for the expand), 1000 rows,
    // ranks 64 (B's row in registers at the widest) and 80 (B and xa read per row).
    for &(rows, d_in, d_out, r) in &[
        (1usize, 123usize, 45usize, 1usize),
        (7, 896, 896, 16),
        (33, 4864, 896, 8),
        (5, 64, 461, 3),
        (70, 896, 300, 16),
        (1000, 64, 131, 16),
        (37, 96, 257, 64),
        (35, 72, 130, 80),
    ] {
        let x = bf(&uniform_vec(rows * d_in, 11, -2.0, 2.0));
        let a = uniform_vec(r * d_in, 12, -0.1, 0.1);
        let b = uniform_vec(d_out * r, 13, -0.1, 0.1);
        let y = bf(&uniform_vec(rows * d_out, 14, -1.0, 1.0));
        let scale = 2.0;
        let got = dev
            .lora_bf16_host(&y, &x, &a, &b, scale, rows, d_in, d_out, r)
            .unwrap();
        let xa = ops::matmul_wt(&x, &a, rows, d_in, r);
        let mut want = y.clone();
        ops::matmul_wt_acc(&xa, &b, rows, r, d_out, scale, 1.0, &mut want);
        // f32 dot products of length in (≤ 4864) in different orders: ≤ ~1e-5 absolute on a
        // LoRA term of size ≲ 1; then one bf16 store of y (2^-9 relative of |y| ≲ 2).
        assert_close(
            &format!("lora {rows}x{d_in}->{d_out} r{r}"),
            &want,
            &got,
            2e-4,
            BF16_STORE_RTOL,
        );
    }
}

/// The LoRA kernels' arithmetic per element (kernels/common.cuh, "The rollout's LoRA"), on the
/// CPU: xa[r, j] by 32 lane partials (lane l: 8-element vectors l, l + 32, ... when in % 8 == 0,
/// else elements l, l + 32, ...; x and A are whole allocations, 16-byte aligned) and the
/// butterfly; y = bf16(y + scale · Σ_j xa·B, j ascending). nvcc contracts every a·b + c of it
/// into an FMA (no separate f32 multiply in the kernels' PTX), so `mul_add` makes this exact.
#[allow(clippy::too_many_arguments)]
fn lora_in_kernel_order(
    y: &[f32],
    x: &[f32],
    a: &[f32],
    b: &[f32],
    scale: f32,
    rows: usize,
    d_in: usize,
    d_out: usize,
    r: usize,
) -> Vec<f32> {
    let mut out = y.to_vec();
    let width = if d_in.is_multiple_of(8) { 8 } else { 1 };
    for n in 0..rows {
        let xa: Vec<f32> = (0..r)
            .map(|j| {
                let mut lanes = [0f32; 32];
                for i in 0..d_in {
                    let lane = (i / width) % 32;
                    lanes[lane] = x[n * d_in + i].mul_add(a[j * d_in + i], lanes[lane]);
                }
                for off in [16, 8, 4, 2, 1] {
                    let prev = lanes;
                    for (l, v) in lanes.iter_mut().enumerate() {
                        *v = prev[l] + prev[l ^ off];
                    }
                }
                lanes[0]
            })
            .collect();
        for o in 0..d_out {
            let acc = (0..r).fold(0f32, |acc, j| xa[j].mul_add(b[o * r + j], acc));
            let v = scale.mul_add(acc, out[n * d_out + o]);
            out[n * d_out + o] = half::bf16::from_f32(v).to_f32();
        }
    }
    out
}

/// The LoRA kernels tile rows (xa: 4 rows per warp; expand: 32 rows per block, B's row read
/// once per tile), but each element's arithmetic is that of the untiled kernels they replaced:
/// bit-exact against [`lora_in_kernel_order`], and a row's result does not depend on the other
/// rows of the launch (70 rows at once vs one launch per row).
#[test]
fn lora_bf16_is_bit_exact_and_row_invariant() {
    let Some(dev) = device_or_skip() else { return };
    for &(rows, d_in, d_out, r) in &[
        (70usize, 896usize, 300usize, 16usize),
        (33, 4864, 896, 8),
        (37, 123, 257, 64),
        (5, 64, 461, 3),
        (35, 72, 130, 80),
        (64, 896, 9728, 16),
    ] {
        let x = bf(&uniform_vec(rows * d_in, 21, -2.0, 2.0));
        let a = uniform_vec(r * d_in, 22, -0.1, 0.1);
        let b = uniform_vec(d_out * r, 23, -0.1, 0.1);
        let y = bf(&uniform_vec(rows * d_out, 24, -1.0, 1.0));
        let scale = 2.0;
        let got = dev
            .lora_bf16_host(&y, &x, &a, &b, scale, rows, d_in, d_out, r)
            .unwrap();
        let what = format!("lora {rows}x{d_in}->{d_out} r{r}");
        let want = lora_in_kernel_order(&y, &x, &a, &b, scale, rows, d_in, d_out, r);
        if emulated(&dev) {
            // No FMA contraction in the emulator: the replay's mul_adds hold within one bf16 ulp
            // of the result (relative ≤ 2⁻⁷); the tiling and order are still checked by the row
            // invariance below and by the kernel emulator's own bit-identity oracle (lora_ref.h).
            assert_close(
                &format!("{what} vs the kernel order on the CPU"),
                &want,
                &got,
                1e-6,
                1.0 / 128.0,
            );
        } else {
            assert_bits_eq(&format!("{what} vs the kernel order on the CPU"), &want, &got);
        }
        if rows <= 70 {
            let one_by_one: Vec<f32> = (0..rows)
                .flat_map(|n| {
                    let xr = &x[n * d_in..(n + 1) * d_in];
                    let yr = &y[n * d_out..(n + 1) * d_out];
                    dev.lora_bf16_host(yr, xr, &a, &b, scale, 1, d_in, d_out, r)
                        .unwrap()
                })
                .collect();
            assert_bits_eq(
                &format!("{what}: all rows vs one row per launch"),
                &one_by_one,
                &got,
            );
        }
    }
}

#[test]
fn sampling_uniform_matches_cpu_bit_for_bit() {
    let Some(dev) = device_or_skip() else { return };
    let n = 4096;
    let seed: Vec<u64> = (0..n)
        .map(|i| (i as u64 / 64).wrapping_mul(0x0123_4567_89ab_cdef))
        .collect();
    let stream: Vec<u64> = (0..n).map(|i| (i as u64 % 64) | ((i as u64 % 3) << 40)).collect();
    let step: Vec<u64> = (0..n).map(|i| i as u64 * 977 + ((i as u64 % 5) << 33)).collect();
    let got = dev.sampling_uniform_f32_host(&seed, &stream, &step).unwrap();
    for i in 0..n {
        assert_eq!(
            got[i].to_bits(),
            uniform(seed[i], stream[i], step[i]).to_bits(),
            "draw {i}"
        );
    }
}

/// Logits rows for sampling: smooth random values, a few special rows (ties at the top, -inf
/// entries, a row of equal logits, a sharply peaked row).
fn sampling_logits(rows: usize, vocab: usize, seed: u64) -> Vec<f32> {
    let mut x = uniform_vec(rows * vocab, seed, -6.0, 6.0);
    for r in 0..rows {
        let row = &mut x[r * vocab..(r + 1) * vocab];
        match r % 6 {
            1 => {
                // tied maximum at three ids
                let (a, b, c) = (vocab / 3, vocab / 2, vocab - 1);
                row[a] = 9.0;
                row[b] = 9.0;
                row[c] = 9.0;
            }
            2 => row.iter_mut().step_by(3).for_each(|v| *v = f32::NEG_INFINITY),
            3 => row.iter_mut().for_each(|v| *v = 0.5),
            4 => row[vocab / 4] = 40.0,
            _ => {}
        }
    }
    x
}

fn param_grid(rows: usize) -> Vec<SamplingParams> {
    let base = [
        SamplingParams::greedy(),
        SamplingParams {
            temperature: 1.0,
            ..Default::default()
        },
        SamplingParams {
            temperature: 0.7,
            top_k: 20,
            ..Default::default()
        },
        SamplingParams {
            temperature: 1.0,
            top_p: 0.9,
            ..Default::default()
        },
        SamplingParams {
            temperature: 0.6,
            top_k: 50,
            top_p: 0.95,
            min_p: 0.05,
            ..Default::default()
        },
        SamplingParams {
            temperature: 1.3,
            min_p: 0.1,
            ..Default::default()
        },
        SamplingParams {
            temperature: 1.0,
            top_k: 1,
            ..Default::default()
        },
        SamplingParams {
            temperature: 2.0,
            top_p: 0.5,
            ..Default::default()
        },
    ];
    (0..rows)
        .map(|r| SamplingParams {
            seed: 1000 + r as u64 / 8,
            ..base[r % base.len()]
        })
        .collect()
}

/// Compares GPU tokens with the CPU sampler: greedy rows must match exactly; sampled rows may
/// differ only where u lands within f64 rounding of a cumulative boundary (probability ~1e-12
/// per draw, see kernels/sampling.cu), so at most `max_mismatch_frac` of them (a safety margin
/// for kept-set boundary cases in the top-p rows with ties). Logprobs: f32 of an f64 value on
/// both sides, both from the same s and m: ≤ 1 ulp apart plus ~1e-15 from log Z.
fn check_sampling(dev: &CudaDevice, vocab: usize, rows: usize, steps_per_row: u64, bf16_logits: bool) {
    let logits = sampling_logits(rows, vocab, vocab as u64);
    let logits = if bf16_logits { bf(&logits) } else { logits };
    let params = param_grid(rows);
    let mut sampler = Sampler::new();
    let (mut mismatches, mut sampled) = (0usize, 0usize);
    for step in 0..steps_per_row {
        let streams: Vec<u64> = (0..rows as u64).collect();
        let steps = vec![step; rows];
        let (tok, lp) = if bf16_logits {
            dev.sample_tokens_bf16_host(&logits, &params, &streams, &steps, vocab)
                .unwrap()
        } else {
            dev.sample_tokens_f32_host(&logits, &params, &streams, &steps, vocab)
                .unwrap()
        };
        for r in 0..rows {
            let row = &logits[r * vocab..(r + 1) * vocab];
            let want = sampler.sample(row, &params[r], streams[r], step).unwrap();
            if params[r].is_greedy() {
                assert_eq!(tok[r], want.token, "greedy row {r} vocab {vocab}");
            } else {
                sampled += 1;
                if tok[r] != want.token {
                    mismatches += 1;
                    eprintln!(
                        "vocab {vocab} row {r} step {step}: gpu {} cpu {} ({:?})",
                        tok[r], want.token, params[r]
                    );
                    continue;
                }
            }
            let tol = 2e-6 * want.logprob.abs().max(1.0);
            assert!(
                (lp[r] - want.logprob).abs() <= tol,
                "logprob row {r} step {step} vocab {vocab}: gpu {} cpu {}",
                lp[r],
                want.logprob
            );
        }
    }
    // With ~1e-12 per draw, any mismatch in these few thousand draws would be a bug in
    // practice; allow 1 in 1000 for an unlucky boundary so a GPU run is not wasted on it.
    assert!(
        mismatches * 1000 <= sampled,
        "vocab {vocab}: {mismatches} of {sampled} sampled tokens differ from the CPU sampler"
    );
}

#[test]
fn sample_tokens_f32_matches_cpu_sampler() {
    let Some(dev) = device_or_skip() else { return };
    check_sampling(&dev, 461, 48, 40, false);
    check_sampling(&dev, 151_936, 16, 3, false);
}

#[test]
fn sample_tokens_bf16_matches_cpu_sampler() {
    let Some(dev) = device_or_skip() else { return };
    // bf16 logits have many exact ties (8-bit significand): exercises the tie-breaking by id.
    check_sampling(&dev, 461, 48, 40, true);
    check_sampling(&dev, 151_936, 16, 3, true);
}

/// The chunked fast path (greedy, or no top-k/top-p; min-p allowed) against the single-block
/// kernel alone on random rows of a real vocabulary: identical tokens (they could differ only
/// where u·kept_total lands within f64 rounding of a boundary, ~1e-12 per draw) and logprobs
/// within 2e-6 (log Z summed in another order); each row alone gives the same bits.
#[test]
fn sample_tokens_fast_path_matches_single_block() {
    let Some(dev) = device_or_skip() else { return };
    for &bf16_logits in &[false, true] {
        let (vocab, rows) = (151_936usize, 48usize);
        let mut logits = uniform_vec(rows * vocab, 77 + bf16_logits as u64, -8.0, 8.0);
        for r in (1..rows).step_by(6) {
            logits[r * vocab..(r + 1) * vocab]
                .iter_mut()
                .step_by(3)
                .for_each(|v| *v = f32::NEG_INFINITY);
        }
        for r in (2..rows).step_by(6) {
            logits[r * vocab + 4095] = 30.0; // tied maxima across a chunk boundary
            logits[r * vocab + 4096] = 30.0;
        }
        let logits = if bf16_logits { bf(&logits) } else { logits };
        let base = [(1.0f32, 0.0f32), (0.7, 0.0), (1.0, 0.05), (0.0, 0.0), (1.3, 0.1)];
        let params: Vec<SamplingParams> = (0..rows)
            .map(|r| SamplingParams {
                temperature: base[r % base.len()].0,
                min_p: base[r % base.len()].1,
                seed: 7 + r as u64,
                ..Default::default()
            })
            .collect();
        for step in 0..3u64 {
            let streams: Vec<u64> = (0..rows as u64).collect();
            let steps = vec![step; rows];
            let (tok, lp) = if bf16_logits {
                dev.sample_tokens_bf16_host(&logits, &params, &streams, &steps, vocab)
            } else {
                dev.sample_tokens_f32_host(&logits, &params, &streams, &steps, vocab)
            }
            .unwrap();
            let (tok1, lp1) = dev
                .sample_tokens_single_block_host(&logits, &params, &streams, &steps, vocab, bf16_logits)
                .unwrap();
            for r in 0..rows {
                assert_eq!(tok[r], tok1[r], "row {r} step {step} bf16 {bf16_logits}");
                let tol = 2e-6 * lp1[r].abs().max(1.0);
                assert!(
                    (lp[r] - lp1[r]).abs() <= tol,
                    "row {r} step {step}: fast {} single-block {}",
                    lp[r],
                    lp1[r]
                );
            }
            if step == 0 {
                for r in (0..rows).step_by(7) {
                    let row = &logits[r * vocab..(r + 1) * vocab];
                    let (t, l) = if bf16_logits {
                        dev.sample_tokens_bf16_host(row, &params[r..r + 1], &[r as u64], &[0], vocab)
                    } else {
                        dev.sample_tokens_f32_host(row, &params[r..r + 1], &[r as u64], &[0], vocab)
                    }
                    .unwrap();
                    assert_eq!((t[0], l[0].to_bits()), (tok[r], lp[r].to_bits()), "row {r} alone");
                }
            }
        }
    }
}

#[test]
fn sample_tokens_marks_invalid_rows() {
    let Some(dev) = device_or_skip() else { return };
    let vocab = 5;
    let logits = [
        0.0,
        1.0,
        f32::NAN,
        0.0,
        0.0, // NaN
        0.0,
        f32::INFINITY,
        0.0,
        0.0,
        0.0, // +inf
        f32::NEG_INFINITY,
        f32::NEG_INFINITY,
        f32::NEG_INFINITY,
        f32::NEG_INFINITY,
        f32::NEG_INFINITY,
        1.0,
        2.0,
        3.0,
        2.0,
        1.0, // valid
    ];
    let params = vec![SamplingParams::default(); 4];
    let (tok, lp) = dev
        .sample_tokens_f32_host(&logits, &params, &[0, 1, 2, 3], &[0; 4], vocab)
        .unwrap();
    for r in 0..3 {
        assert_eq!(tok[r], u32::MAX, "row {r} should be invalid");
        assert!(lp[r].is_nan());
    }
    assert!(tok[3] < 5 && lp[3].is_finite());
}

#[test]
fn sample_tokens_frequencies_match_distribution() {
    let Some(dev) = device_or_skip() else { return };
    // Independent of the CPU sampler's draw: many (stream, step) draws of one row against the
    // distribution `Sampler::distribution` gives, 5 binomial sd per token.
    let vocab = 12;
    let logits: Vec<f32> = uniform_vec(vocab, 5, -1.2, 1.2);
    let p = SamplingParams {
        temperature: 0.8,
        top_k: 9,
        top_p: 0.95,
        min_p: 0.02,
        seed: 2024,
        first_stream: 0,
    };
    let d = Sampler::new().distribution(&logits, &p).unwrap();
    let rows = 4096;
    let mut counts = vec![0u64; vocab];
    let all: Vec<f32> = (0..rows).flat_map(|_| logits.clone()).collect();
    for step in 0..16u64 {
        let streams: Vec<u64> = (0..rows as u64).collect();
        let (tok, _) = dev
            .sample_tokens_f32_host(&all, &vec![p; rows], &streams, &vec![step; rows], vocab)
            .unwrap();
        tok.iter().for_each(|&t| counts[t as usize] += 1);
    }
    let n = (rows * 16) as f64;
    for (i, (&c, &pi)) in counts.iter().zip(&d).enumerate() {
        if pi == 0.0 {
            assert_eq!(c, 0, "removed token {i} was drawn");
        } else {
            let sd = (pi * (1.0 - pi) / n).sqrt();
            assert!(
                (c as f64 / n - pi).abs() < 5.0 * sd,
                "token {i}: {} vs {pi}",
                c as f64 / n
            );
        }
    }
}

#[test]
fn logprob_gather_matches_cpu() {
    let Some(dev) = device_or_skip() else { return };
    for &vocab in &[461usize, 151_936] {
        for &rows in &[1usize, 7, 33] {
            let mut logits = uniform_vec(rows * vocab, (rows * vocab) as u64, -10.0, 10.0);
            if rows > 1 {
                logits[vocab..2 * vocab]
                    .iter_mut()
                    .step_by(2)
                    .for_each(|v| *v = f32::NEG_INFINITY);
            }
            let targets: Vec<u32> = (0..rows).map(|r| ((r * 7919 + 1) % vocab) as u32).collect();
            for &(temp, use_bf16) in &[(1.0f32, false), (0.7, false), (1.0, true)] {
                let x = if use_bf16 { bf(&logits) } else { logits.clone() };
                let (lp, ent) = if use_bf16 {
                    dev.logprob_gather_bf16_host(&x, &targets, vocab, temp).unwrap()
                } else {
                    dev.logprob_gather_f32_host(&x, &targets, vocab, temp).unwrap()
                };
                // Oracle in f64 (the CPU op sums 151936 f32 terms sequentially, whose own error
                // ~sqrt(V)·2^-24 ≈ 2e-5 relative would dominate); the CPU op is checked too.
                for r in 0..rows {
                    let row: Vec<f32> = x[r * vocab..(r + 1) * vocab].iter().map(|&v| v / temp).collect();
                    let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
                    let z: f64 = row.iter().map(|&s| (s as f64 - m).exp()).sum();
                    let lse = m + z.ln();
                    let want_lp = row[targets[r] as usize] as f64 - lse;
                    let want_ent: f64 = -row
                        .iter()
                        .filter(|s| s.is_finite())
                        .map(|&s| (s as f64 - lse).exp() * (s as f64 - lse))
                        .sum::<f64>();
                    let (cpu_lp, cpu_ent) = ops::logprob_and_entropy(&row, targets[r] as usize);
                    // GPU: f32 online softmax with a tree merge, error ~log2(V)·2^-24 relative
                    // of log Z (|log Z| ≲ 25) and of the entropy sum: 1e-5 absolute is ~10×.
                    let what = format!("vocab {vocab} rows {rows} row {r} T {temp} bf16 {use_bf16}");
                    // A target whose logit is -inf (row 1 masks every other id) has logprob
                    // exactly -inf on both sides; inf - inf is NaN, so compare those by equality.
                    let close_lp = |got: f64| {
                        if want_lp.is_infinite() {
                            got == want_lp
                        } else {
                            (got - want_lp).abs() < 1e-5 + 1e-6 * want_lp.abs()
                        }
                    };
                    assert!(close_lp(lp[r] as f64), "{what}: lp {} vs {want_lp}", lp[r]);
                    assert!(
                        (ent[r] as f64 - want_ent).abs() < 1e-5 + 1e-6 * want_ent.abs(),
                        "{what}: ent {} vs {want_ent}",
                        ent[r]
                    );
                    assert!(
                        (cpu_lp as f64 == want_lp) || (cpu_lp as f64 - want_lp).abs() < 1e-3,
                        "{what}: cpu lp {cpu_lp} vs {want_lp}"
                    );
                    assert!(
                        (cpu_ent as f64 - want_ent).abs() < 1e-3,
                        "{what}: cpu ent {cpu_ent} vs {want_ent}"
                    );
                }
            }
        }
    }
}
