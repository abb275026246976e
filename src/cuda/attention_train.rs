//! Launchers for the training attention kernels of `kernels/attention_train.cu`: causal GQA
//! self-attention over packed sequences (no KV cache) forward, saving the log-sum-exp, and its
//! deterministic backward (delta, then dk/dv and dq); plus `scatter_rows_bf16`. Each launcher
//! checks buffer lengths and alignment against the shapes, picks the kernel compiled for the
//! head dim (64, 128 or 256 ≥ head_dim), the grid and the shared memory, and pushes the arguments
//! in the kernel's order; `*_host` conveniences (host slices in, host vectors out) exist for tests.
//!
//! It owns no memory plan: out, lse, the gradients and the delta scratch are passed in. It does not
//! own the oracle either: tests/cuda_attention_train.rs compares against an f64 host reference of
//! `cpu::model::attend` and its backward (`cpu::train`), itself checked by finite differences.
//!
//! The kernels cannot read `cu_rows` before launch, so what the host must guarantee is documented
//! at each launcher: cu_rows (num_seqs + 1) i32 non-decreasing from 0 to `rows`, and `max_rows` ≥
//! the longest sequence ([`packed_max_rows`] checks a host copy and returns it).

use cudarc::driver::{CudaFunction, CudaSlice, DevicePtr, DevicePtrMut, PushKernelArg};
use half::bf16;

use super::train_kernels::{as_i32, cfg, check_len, row_block};
use super::{allow_smem, cuda_err, CudaDevice};
use crate::{Error, Result};

/// Threads per attention block: 4 warps (kernels/attention_train.cu `AT_THREADS`).
const AT_THREADS: u32 = 128;
/// Query rows per forward / dq block and key rows per dk/dv block (`AT_BQ`, `AT_BKV`).
const AT_BQ: usize = 64;
const AT_BKV: usize = 64;
/// bf16 padding per shared-memory row (`AT_PAD`).
const AT_PAD: usize = 8;
/// Threads per block of the delta kernel (a lane group of `delta_group(hd)` per (row, head)).
const DELTA_THREADS: u32 = 256;

/// Lanes per (row, head) of attention_train_bwd_delta_bf16 (kernels/attention_train.cu
/// `at_delta_group`): hd/8 (one 16-byte vector each) when that is a power of two ≤ 32, else a warp.
fn delta_group(hd: usize) -> usize {
    let g = hd / 8;
    if hd.is_multiple_of(8) && (1..=32).contains(&g) && g.is_power_of_two() {
        g
    } else {
        32
    }
}
/// Largest grid.y / grid.z.
const GRID_YZ_MAX: usize = 65_535;
/// The head dims the kernels are compiled for; a shape runs on the smallest one ≥ its head_dim.
pub const ATTN_TRAIN_COMPILED_HEAD_DIMS: [usize; 3] = [64, 128, 256];

/// Shape of training attention: q (rows, n_heads, head_dim), k, v (rows, n_kv_heads, head_dim).
#[derive(Clone, Copy, Debug)]
pub struct TrainAttnShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Sliding window (Mistral): row i attends keys j with i − j < w; None = full causal.
    pub window: Option<usize>,
}

impl TrainAttnShape {
    fn check(&self, kernel: &str) -> Result<()> {
        let bad = |msg: String| Err(Error::invalid(format!("{kernel}: {msg}")));
        if self.n_heads == 0 || self.n_kv_heads == 0 || !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(format!(
                "n_heads {} must be a positive multiple of n_kv_heads {}",
                self.n_heads, self.n_kv_heads
            ));
        }
        if self.n_heads > GRID_YZ_MAX {
            return bad(format!(
                "n_heads {} exceeds the grid's {GRID_YZ_MAX}",
                self.n_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(4) || self.head_dim > 256 {
            return bad(format!(
                "head_dim {} must be a multiple of 4 and ≤ 256",
                self.head_dim
            ));
        }
        if self.window == Some(0) {
            return bad("a sliding window of 0 positions attends nothing; use None for no window".into());
        }
        Ok(())
    }

    /// 1/sqrt(hd) in f32, as `cpu::model::attend` computes it.
    pub fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }

    fn window_i32(&self) -> i32 {
        self.window.map_or(0, |w| w.min(i32::MAX as usize) as i32)
    }

    /// The compiled head dim the kernels run this shape with: 64, 128 or 256 (columns
    /// head_dim.. of the tiles are zero). 256 for a head_dim the kernels do not support.
    pub fn compiled_head_dim(&self) -> usize {
        ATTN_TRAIN_COMPILED_HEAD_DIMS
            .into_iter()
            .find(|&c| self.head_dim <= c)
            .unwrap_or(256)
    }

    /// Dynamic shared memory of the forward kernel (kernels `AtCfg::FWD_SMEM`): the query tile
    /// and two stages of a key and a value tile, (64 + 2·2·BK) rows of (HD + 8) bf16, BK = 64 (32
    /// at HD 256): 46080, 87040, 101376 bytes at HD 64, 128, 256.
    pub fn fwd_smem_bytes(&self) -> usize {
        let c = self.compiled_head_dim();
        (AT_BQ + FWD_STAGES * 2 * fwd_keys_per_tile(c)) * (c + AT_PAD) * 2
    }

    /// Dynamic shared memory of the dk/dv kernel (`AtCfg::DKDV_SMEM`): the key and value tiles
    /// (64 rows each) and per stage a query and a dout tile (BQ rows each: 64, 32, 16 at HD 64,
    /// 128, 256) and BQ lse and delta; 2, 2, 1 stages: 56320, 70144, 84608 bytes.
    pub fn dkdv_smem_bytes(&self) -> usize {
        let c = self.compiled_head_dim();
        let (bq, st) = (dkdv_queries_per_tile(c), dkdv_stages(c));
        (2 * AT_BKV + st * 2 * bq) * (c + AT_PAD) * 2 + st * 2 * bq * 4
    }

    /// Dynamic shared memory of the dq kernel (`AtCfg::DQ_SMEM`): the query and dout tiles (64
    /// rows each) and the stages of the key and value tiles (BK rows each; 2 + 2, 2 + 1, 1 + 1 at
    /// HD 64, 128, 256): 55296, 87040, 101376 bytes.
    pub fn dq_smem_bytes(&self) -> usize {
        let c = self.compiled_head_dim();
        let (ks, vs) = dq_stages(c);
        (2 * AT_BQ + (ks + vs) * fwd_keys_per_tile(c)) * (c + AT_PAD) * 2
    }
}

/// Keys per forward / dq tile for compiled head dim `c` (kernels `AtCfg::BK`).
fn fwd_keys_per_tile(c: usize) -> usize {
    if c <= 128 {
        64
    } else {
        32
    }
}

/// Stages of the forward's key/value tiles (kernels `AtCfg::FWD_STAGES`).
const FWD_STAGES: usize = 2;

/// Stages of the dk/dv kernel's query/dout tiles for compiled head dim `c` (`AtCfg::DKDV_STAGES`).
fn dkdv_stages(c: usize) -> usize {
    if c <= 128 {
        2
    } else {
        1
    }
}

/// Stages of the dq kernel's key and value tiles for compiled head dim `c`
/// (`AtCfg::DQ_K_STAGES`, `DQ_V_STAGES`).
fn dq_stages(c: usize) -> (usize, usize) {
    match c {
        0..=64 => (2, 2),
        65..=128 => (2, 1),
        _ => (1, 1),
    }
}

/// Queries per dk/dv tile for compiled head dim `c` (kernels `AtCfg::DKDV_BQ`).
fn dkdv_queries_per_tile(c: usize) -> usize {
    match c {
        0..=64 => 64,
        65..=128 => 32,
        _ => 16,
    }
}

/// Blocks along grid.x of every attention kernel: tiles of 64 rows of the longest sequence.
pub fn attention_train_row_tiles(max_rows: usize) -> usize {
    max_rows.div_ceil(AT_BQ)
}

/// Checks a host copy of cu_rows (num_seqs + 1 offsets, non-decreasing from 0 to `rows`) and
/// returns the longest sequence's row count: the `max_rows` the launchers need.
pub fn packed_max_rows(cu_rows: &[i32], rows: usize) -> Result<usize> {
    let bad = |msg: String| Err(Error::invalid(format!("cu_rows: {msg}")));
    if cu_rows.first() != Some(&0) {
        return bad(format!("must start with 0, got {:?}", cu_rows.first()));
    }
    let mut max_rows = 0usize;
    for (s, w) in cu_rows.windows(2).enumerate() {
        if w[1] < w[0] {
            return bad(format!("decreases at sequence {s} ({} → {})", w[0], w[1]));
        }
        max_rows = max_rows.max((w[1] - w[0]) as usize);
    }
    let last = *cu_rows.last().expect("non-empty: starts with 0");
    if last as usize != rows {
        return bad(format!("ends at {last}, expected rows = {rows}"));
    }
    Ok(max_rows)
}

impl CudaDevice {
    /// The kernel of `shape`'s compiled head dim: forward, dk/dv, dq.
    fn attn_train_kernels(&self, shape: &TrainAttnShape) -> [&CudaFunction; 3] {
        let t = &self.train;
        match shape.compiled_head_dim() {
            64 => [
                &t.attention_train_fwd_hd64_bf16,
                &t.attention_train_bwd_dkdv_hd64_bf16,
                &t.attention_train_bwd_dq_hd64_bf16,
            ],
            128 => [
                &t.attention_train_fwd_hd128_bf16,
                &t.attention_train_bwd_dkdv_hd128_bf16,
                &t.attention_train_bwd_dq_hd128_bf16,
            ],
            _ => [
                &t.attention_train_fwd_hd256_bf16,
                &t.attention_train_bwd_dkdv_hd256_bf16,
                &t.attention_train_bwd_dq_hd256_bf16,
            ],
        }
    }

    /// Checks shared by the forward and backward launchers; returns the grid's x extent.
    fn attn_train_check_rows(
        kn: &str,
        cu_rows_len: usize,
        num_seqs: usize,
        rows: usize,
        max_rows: usize,
    ) -> Result<usize> {
        check_len("cu_rows", kn, cu_rows_len, num_seqs + 1, "num_seqs+1")?;
        as_i32(kn, "rows", rows)?;
        if num_seqs > GRID_YZ_MAX {
            return Err(Error::invalid(format!(
                "{kn}: num_seqs {num_seqs} exceeds the grid's {GRID_YZ_MAX}"
            )));
        }
        if max_rows > rows || (rows > 0 && max_rows.saturating_mul(num_seqs) < rows) {
            return Err(Error::invalid(format!(
                "{kn}: max_rows {max_rows} cannot be the longest of {num_seqs} sequences covering {rows} rows"
            )));
        }
        Ok(attention_train_row_tiles(max_rows))
    }

    /// Training attention forward: q (rows, n_heads, hd), k, v (rows, n_kv_heads, hd) bf16 →
    /// out (rows, n_heads, hd) bf16 and lse (rows, n_heads) f32 (natural log of Σ_j e^{s_ij},
    /// s = q·k·scale), causal within each sequence, optional sliding window. The rows of
    /// sequence s are [cu_rows\[s\], cu_rows[s+1]) at positions 0, 1, ...; cu_rows (num_seqs+1)
    /// i32 must be non-decreasing from 0 to `rows` and `max_rows` ≥ the longest sequence (the
    /// kernel trusts both: rows outside are not written). Buffers start 8-byte aligned.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_train_fwd_bf16(
        &self,
        q: &impl DevicePtr<bf16>,
        k: &impl DevicePtr<bf16>,
        v: &impl DevicePtr<bf16>,
        cu_rows: &impl DevicePtr<i32>,
        out: &mut impl DevicePtrMut<bf16>,
        lse: &mut impl DevicePtrMut<f32>,
        shape: &TrainAttnShape,
        num_seqs: usize,
        rows: usize,
        max_rows: usize,
    ) -> Result<()> {
        let kn = "attention_train_fwd_bf16";
        shape.check(kn)?;
        let (h, kv, hd) = (shape.n_heads, shape.n_kv_heads, shape.head_dim);
        check_len("q", kn, q.len(), rows * h * hd, "rows*n_heads*hd")?;
        check_len("k", kn, k.len(), rows * kv * hd, "rows*n_kv_heads*hd")?;
        check_len("v", kn, v.len(), rows * kv * hd, "rows*n_kv_heads*hd")?;
        check_len("out", kn, out.len(), rows * h * hd, "rows*n_heads*hd")?;
        check_len("lse", kn, lse.len(), rows * h, "rows*n_heads")?;
        let tiles = Self::attn_train_check_rows(kn, cu_rows.len(), num_seqs, rows, max_rows)?;
        if num_seqs == 0 || rows == 0 {
            return Ok(());
        }
        let [func, _, _] = self.attn_train_kernels(shape);
        let smem = shape.fwd_smem_bytes();
        allow_smem(func, kn, smem)?;
        let s = self.stream();
        let (op, _o) = out.device_ptr_mut(s);
        let (lp, _l) = lse.device_ptr_mut(s);
        let (qp, _q) = q.device_ptr(s);
        let (kp, _k) = k.device_ptr(s);
        let (vp, _v) = v.device_ptr(s);
        let (cu, _cu) = cu_rows.device_ptr(s);
        // The kernel copies q, k, v in 16-byte pieces (8-byte ones unless hd % 8 == 0 and all three
        // start 16-byte aligned) and stores out in 4-byte pairs.
        for (what, p) in [("q", qp), ("k", kp), ("v", vp), ("out", op)] {
            if p % 8 != 0 {
                return Err(Error::invalid(format!("{kn}: {what} must start 8-byte aligned")));
            }
        }
        let (h_i, kv_i, hd_i, win) = (h as i32, kv as i32, hd as i32, shape.window_i32());
        let scale = shape.scale();
        let mut l = s.launch_builder(func);
        l.arg(&op)
            .arg(&lp)
            .arg(&qp)
            .arg(&kp)
            .arg(&vp)
            .arg(&cu)
            .arg(&h_i)
            .arg(&kv_i)
            .arg(&hd_i)
            .arg(&win)
            .arg(&scale);
        let grid = (tiles as u32, h as u32, num_seqs as u32);
        // SAFETY: (bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v,
        // const int* cu_rows, int n_heads, int n_kv_heads, int hd, int window, float scale) as
        // attention_train_fwd_hd{64,128,256}_bf16; lengths and alignment checked; hd ≤ the
        // compiled head dim, hd % 4 == 0 (TrainAttnShape::check); block = 4 warps; smem as the
        // kernel's carve-up, opted in above 48 KiB.
        unsafe { l.launch(cfg(grid, AT_THREADS, smem as u32)) }.map_err(cuda_err(kn))?;
        Ok(())
    }

    /// Training attention backward: from the forward's inputs q, k, v, its out and lse, and dout
    /// (rows, n_heads, hd) bf16 → dq (rows, n_heads, hd), dk, dv (rows, n_kv_heads, hd) bf16,
    /// all written (not accumulated). `delta` is scratch of rows·n_heads f32 (Σ_d dout·out).
    /// Deterministic: no atomics, fixed summation order for a given shape. cu_rows and max_rows
    /// as for [`Self::attention_train_fwd_bf16`]; bf16 buffers start 8-byte aligned.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_train_bwd_bf16(
        &self,
        q: &impl DevicePtr<bf16>,
        k: &impl DevicePtr<bf16>,
        v: &impl DevicePtr<bf16>,
        out: &impl DevicePtr<bf16>,
        dout: &impl DevicePtr<bf16>,
        lse: &impl DevicePtr<f32>,
        cu_rows: &impl DevicePtr<i32>,
        dq: &mut impl DevicePtrMut<bf16>,
        dk: &mut impl DevicePtrMut<bf16>,
        dv: &mut impl DevicePtrMut<bf16>,
        delta: &mut impl DevicePtrMut<f32>,
        shape: &TrainAttnShape,
        num_seqs: usize,
        rows: usize,
        max_rows: usize,
    ) -> Result<()> {
        let kn = "attention_train_bwd_bf16";
        shape.check(kn)?;
        let (h, kv, hd) = (shape.n_heads, shape.n_kv_heads, shape.head_dim);
        for (what, len) in [
            ("q", q.len()),
            ("out", out.len()),
            ("dout", dout.len()),
            ("dq", dq.len()),
        ] {
            check_len(what, kn, len, rows * h * hd, "rows*n_heads*hd")?;
        }
        for (what, len) in [("k", k.len()), ("v", v.len()), ("dk", dk.len()), ("dv", dv.len())] {
            check_len(what, kn, len, rows * kv * hd, "rows*n_kv_heads*hd")?;
        }
        check_len("lse", kn, lse.len(), rows * h, "rows*n_heads")?;
        check_len("delta", kn, delta.len(), rows * h, "rows*n_heads")?;
        let tiles = Self::attn_train_check_rows(kn, cu_rows.len(), num_seqs, rows, max_rows)?;
        if num_seqs == 0 || rows == 0 {
            return Ok(());
        }
        let [_, dkdv_fn, dq_fn] = self.attn_train_kernels(shape);
        let (dkdv_smem, dq_smem) = (shape.dkdv_smem_bytes(), shape.dq_smem_bytes());
        allow_smem(dkdv_fn, kn, dkdv_smem)?;
        allow_smem(dq_fn, kn, dq_smem)?;
        let s = self.stream();
        let (qp, _q) = q.device_ptr(s);
        let (kp, _k) = k.device_ptr(s);
        let (vp, _v) = v.device_ptr(s);
        let (op, _o) = out.device_ptr(s);
        let (gp, _g) = dout.device_ptr(s);
        let (lp, _l) = lse.device_ptr(s);
        let (cu, _cu) = cu_rows.device_ptr(s);
        let (dqp, _dq) = dq.device_ptr_mut(s);
        let (dkp, _dk) = dk.device_ptr_mut(s);
        let (dvp, _dv) = dv.device_ptr_mut(s);
        let (dp, _d) = delta.device_ptr_mut(s);
        // 16-byte tile copies of q, k, v, dout (8-byte ones unless hd % 8 == 0 and all four start
        // 16-byte aligned); 4-byte pair stores of dq, dk, dv.
        for (what, p) in [
            ("q", qp),
            ("k", kp),
            ("v", vp),
            ("dout", gp),
            ("dq", dqp),
            ("dk", dkp),
            ("dv", dvp),
        ] {
            if p % 8 != 0 {
                return Err(Error::invalid(format!("{kn}: {what} must start 8-byte aligned")));
            }
        }
        let (rows_i, h_i, kv_i, hd_i, win) =
            (rows as i32, h as i32, kv as i32, hd as i32, shape.window_i32());
        let scale = shape.scale();

        // delta = Σ_d dout·out, a group of delta_group(hd) lanes per (row, head).
        let kn_delta = "attention_train_bwd_delta_bf16";
        let items_per_block = DELTA_THREADS as usize / delta_group(hd);
        let delta_blocks = (rows * h).div_ceil(items_per_block);
        let delta_blocks = u32::try_from(delta_blocks)
            .map_err(|_| Error::invalid(format!("{kn_delta}: {delta_blocks} blocks exceed the grid")))?;
        let mut l = s.launch_builder(&self.train.attention_train_bwd_delta_bf16);
        l.arg(&dp).arg(&op).arg(&gp).arg(&rows_i).arg(&h_i).arg(&hd_i);
        // SAFETY: (float* delta, const bf16* out, const bf16* dout, int rows, int n_heads, int hd);
        // lengths checked; block = 8 whole warps, DELTA_THREADS / delta_group(hd) (row, head)s.
        unsafe { l.launch(cfg((delta_blocks, 1, 1), DELTA_THREADS, 0)) }.map_err(cuda_err(kn_delta))?;

        // dk, dv: one block per (key tile, kv head, sequence).
        let mut l = s.launch_builder(dkdv_fn);
        l.arg(&dkp)
            .arg(&dvp)
            .arg(&qp)
            .arg(&kp)
            .arg(&vp)
            .arg(&gp)
            .arg(&lp)
            .arg(&dp)
            .arg(&cu)
            .arg(&h_i)
            .arg(&kv_i)
            .arg(&hd_i)
            .arg(&win)
            .arg(&scale);
        let grid = (tiles as u32, kv as u32, num_seqs as u32);
        // SAFETY: (bf16* dk, bf16* dv, const bf16* q, const bf16* k, const bf16* v,
        // const bf16* dout, const float* lse, const float* delta, const int* cu_rows, int n_heads,
        // int n_kv_heads, int hd, int window, float scale) as attention_train_bwd_dkdv_hd*_bf16;
        // lengths and alignment checked; delta written by the launch above on the same stream;
        // block = 4 warps; smem as the kernel's carve-up, opted in above 48 KiB.
        unsafe { l.launch(cfg(grid, AT_THREADS, dkdv_smem as u32)) }.map_err(cuda_err(kn))?;

        // dq: one block per (query tile, head, sequence).
        let mut l = s.launch_builder(dq_fn);
        l.arg(&dqp)
            .arg(&qp)
            .arg(&kp)
            .arg(&vp)
            .arg(&gp)
            .arg(&lp)
            .arg(&dp)
            .arg(&cu)
            .arg(&h_i)
            .arg(&kv_i)
            .arg(&hd_i)
            .arg(&win)
            .arg(&scale);
        let grid = (tiles as u32, h as u32, num_seqs as u32);
        // SAFETY: (bf16* dq, const bf16* q, const bf16* k, const bf16* v, const bf16* dout,
        // const float* lse, const float* delta, const int* cu_rows, int n_heads, int n_kv_heads,
        // int hd, int window, float scale) as attention_train_bwd_dq_hd*_bf16; as above.
        unsafe { l.launch(cfg(grid, AT_THREADS, dq_smem as u32)) }.map_err(cuda_err(kn))?;
        Ok(())
    }

    /// dst[rows_idx\[i\], :] = src[i, :] for i < m: src (m, dim), dst (n, dim) bf16 with n =
    /// dst.len() / dim, rows_idx (m) u32, distinct and < n (a row ≥ n is skipped on the device;
    /// the kernel cannot report it). Other rows of dst are left as they are.
    pub fn scatter_rows_bf16(
        &self,
        src: &impl DevicePtr<bf16>,
        rows_idx: &impl DevicePtr<u32>,
        dst: &mut impl DevicePtrMut<bf16>,
        m: usize,
        dim: usize,
    ) -> Result<()> {
        let kn = "scatter_rows_bf16";
        if dim == 0 {
            return Err(Error::invalid(format!("{kn}: dim must be > 0")));
        }
        check_len("src", kn, src.len(), m * dim, "m*dim")?;
        check_len("rows_idx", kn, rows_idx.len(), m, "m")?;
        if !dst.len().is_multiple_of(dim) {
            return Err(Error::invalid(format!(
                "{kn}: dst has {} elements, not a multiple of dim {dim}",
                dst.len()
            )));
        }
        let n = dst.len() / dim;
        let (m_i, n_i, dim_i) = (as_i32(kn, "m", m)?, as_i32(kn, "n", n)?, as_i32(kn, "dim", dim)?);
        if m == 0 {
            return Ok(());
        }
        let s = self.stream();
        let (dp, _d) = dst.device_ptr_mut(s);
        let (sp, _s) = src.device_ptr(s);
        let (rp, _r) = rows_idx.device_ptr(s);
        let mut l = s.launch_builder(&self.train.scatter_rows_bf16);
        l.arg(&dp).arg(&sp).arg(&rp).arg(&m_i).arg(&n_i).arg(&dim_i);
        // SAFETY: (bf16* dst, const bf16* src, const u32* rows, int m, int n, int dim); lengths
        // checked; rows ≥ n are skipped by the kernel.
        unsafe { l.launch(cfg((m as u32, 1, 1), row_block(dim), 0)) }.map_err(cuda_err(kn))?;
        Ok(())
    }

    // ---------------------------------------------------------------------------------------
    // Test conveniences

    /// Test convenience: the forward on host data rounded to bf16 (q (rows, H, hd), k, v
    /// (rows, KV, hd), cu_rows checked on the host). Returns (out as f32, lse).
    pub fn attention_train_fwd_bf16_host(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        cu_rows: &[i32],
        shape: &TrainAttnShape,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let rows = q.len() / (shape.n_heads * shape.head_dim).max(1);
        let max_rows = packed_max_rows(cu_rows, rows)?;
        if rows == 0 {
            return Ok((Vec::new(), Vec::new()));
        }
        let (qd, kd, vd) = (self.upload_bf16(q)?, self.upload_bf16(k)?, self.upload_bf16(v)?);
        let cu = self.upload(cu_rows)?;
        let mut out = self.alloc_zeros::<bf16>(q.len())?;
        let mut lse = self.alloc_zeros::<f32>(rows * shape.n_heads)?;
        self.attention_train_fwd_bf16(
            &qd,
            &kd,
            &vd,
            &cu,
            &mut out,
            &mut lse,
            shape,
            cu_rows.len() - 1,
            rows,
            max_rows,
        )?;
        Ok((self.download_bf16(&out)?, self.download(&lse)?))
    }

    /// Test convenience: forward then backward on the device from host data rounded to bf16, as
    /// a training step runs them (the backward reads the device's own out and lse). Returns
    /// [out, lse, dq, dk, dv] as f32.
    pub fn attention_train_bwd_bf16_host(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        dout: &[f32],
        cu_rows: &[i32],
        shape: &TrainAttnShape,
    ) -> Result<[Vec<f32>; 5]> {
        let rows = q.len() / (shape.n_heads * shape.head_dim).max(1);
        let max_rows = packed_max_rows(cu_rows, rows)?;
        if rows == 0 {
            return Ok(Default::default());
        }
        let num_seqs = cu_rows.len() - 1;
        let (qd, kd, vd) = (self.upload_bf16(q)?, self.upload_bf16(k)?, self.upload_bf16(v)?);
        let gd = self.upload_bf16(dout)?;
        let cu = self.upload(cu_rows)?;
        let mut out = self.alloc_zeros::<bf16>(q.len())?;
        let mut lse = self.alloc_zeros::<f32>(rows * shape.n_heads)?;
        self.attention_train_fwd_bf16(
            &qd, &kd, &vd, &cu, &mut out, &mut lse, shape, num_seqs, rows, max_rows,
        )?;
        let mut dq: CudaSlice<bf16> = self.alloc_zeros(q.len())?;
        let mut dk: CudaSlice<bf16> = self.alloc_zeros(k.len())?;
        let mut dv: CudaSlice<bf16> = self.alloc_zeros(v.len())?;
        let mut delta = self.alloc_zeros::<f32>(rows * shape.n_heads)?;
        self.attention_train_bwd_bf16(
            &qd, &kd, &vd, &out, &gd, &lse, &cu, &mut dq, &mut dk, &mut dv, &mut delta, shape, num_seqs,
            rows, max_rows,
        )?;
        Ok([
            self.download_bf16(&out)?,
            self.download(&lse)?,
            self.download_bf16(&dq)?,
            self.download_bf16(&dk)?,
            self.download_bf16(&dv)?,
        ])
    }

    /// Test convenience: [`Self::scatter_rows_bf16`] of host src (m, dim) into a copy of host dst
    /// (n, dim), both rounded to bf16; returns the new dst as f32.
    pub fn scatter_rows_bf16_host(
        &self,
        src: &[f32],
        rows_idx: &[u32],
        dst: &[f32],
        dim: usize,
    ) -> Result<Vec<f32>> {
        if dst.is_empty() {
            return Ok(Vec::new());
        }
        let m = rows_idx.len();
        let mut d = self.upload_bf16(dst)?;
        if m > 0 {
            let sd = self.upload_bf16(src)?;
            let rd = self.upload(rows_idx)?;
            self.scatter_rows_bf16(&sd, &rd, &mut d, m, dim)?;
        }
        self.download_bf16(&d)
    }
}
