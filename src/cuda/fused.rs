//! Launchers for kernels/fused.cu: the rollout forward's fused per-layer kernels (the stacked
//! q|k|v output → bias + RoPE + KV-cache append; residual add + RMSNorm). Each checks buffer
//! lengths against the shapes, picks grid and block, and pushes the arguments in the kernel's
//! order; `*_host` conveniences (host slices in, host vectors out) exist for tests. The
//! unfused kernels they replace (src/cuda/rollout.rs) are their oracle in tests/cuda_fused.rs.

use cudarc::driver::{
    CudaFunction, CudaModule, CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, PushKernelArg,
};
use half::bf16;
use std::sync::Arc;

use super::rollout::{lora_expand_cfg, lora_xa_cfg};
use super::train_kernels::{as_i32, cfg, check_len};
use super::{cuda_err, AttnShape, CudaDevice};
use crate::{Error, Result};

/// The kernels of kernels/fused.cu, looked up when the device is opened.
pub(super) struct FusedKernels {
    qkv_rope_append_bf16: CudaFunction,
    residual_rmsnorm_fwd_bf16: CudaFunction,
    lora_group_xa_bf16: CudaFunction,
    lora_group_expand_add_bf16: CudaFunction,
}

/// Every kernel name of kernels/fused.cu (for the fatbin-content test).
pub const FUSED_KERNEL_NAMES: &[&str] = &[
    "qkv_rope_append_bf16",
    "residual_rmsnorm_fwd_bf16",
    "lora_group_xa_bf16",
    "lora_group_expand_add_bf16",
];

/// kernels/fused.cu's `LoraGroup3`, passed by value (same C layout: 3 + 3 pointers, 3 + 3 + 1
/// ints, padded to 8 bytes).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct LoraGroup3 {
    a: [u64; 3],
    b: [u64; 3],
    col: [i32; 3],
    out: [i32; 3],
    n: i32,
}

// SAFETY: plain old data with the layout of the kernel's struct (repr(C), no padding the kernel
// reads), passed by value as a kernel parameter.
unsafe impl DeviceRepr for LoraGroup3 {}

/// One projection of a LoRA group: A (rank, in) and B (out, rank) f32, and where its output
/// columns start in the stacked output.
pub struct LoraMember<'a> {
    pub a: &'a CudaSlice<f32>,
    pub b: &'a CudaSlice<f32>,
    pub col: usize,
    pub out: usize,
}

impl FusedKernels {
    pub(super) fn load(module: &Arc<CudaModule>) -> Result<FusedKernels> {
        let f = |name: &str| super::load_kernel(module, name);
        Ok(FusedKernels {
            qkv_rope_append_bf16: f("qkv_rope_append_bf16")?,
            residual_rmsnorm_fwd_bf16: f("residual_rmsnorm_fwd_bf16")?,
            lora_group_xa_bf16: f("lora_group_xa_bf16")?,
            lora_group_expand_add_bf16: f("lora_group_expand_add_bf16")?,
        })
    }
}

/// residual_rmsnorm_fwd_bf16's block: one thread per 8 columns (its vector path), rounded up to
/// a warp, at most 1024 (wider rows take the kernel's strided path).
fn residual_norm_block(dim: usize) -> u32 {
    dim.div_ceil(8).next_multiple_of(32).clamp(32, 1024) as u32
}

impl CudaDevice {
    /// qkv (rows, qd + 2·kvd) bf16, the stacked projections without bias; bias (qd + 2·kvd) or
    /// None. Writes q_out (rows, qd) = RoPE(q + b_q) and, for rows whose pos is inside the
    /// cache, k_cache/v_cache at (row_seq\[r\], pos\[r\]) = RoPE(k + b_k), v + b_v (shapes of
    /// [`AttnShape`]). pos, row_seq (rows) i32; inv_freq (hd/2) f32.
    #[allow(clippy::too_many_arguments)]
    pub fn qkv_rope_append_bf16(
        &self,
        qkv: &impl DevicePtr<bf16>,
        bias: Option<&CudaSlice<bf16>>,
        pos: &impl DevicePtr<i32>,
        inv_freq: &impl DevicePtr<f32>,
        block_table: &impl DevicePtr<i32>,
        row_seq: &impl DevicePtr<i32>,
        q_out: &mut impl DevicePtrMut<bf16>,
        k_cache: &mut impl DevicePtrMut<bf16>,
        v_cache: &mut impl DevicePtrMut<bf16>,
        shape: &AttnShape,
        rows: usize,
    ) -> Result<()> {
        let kn = "qkv_rope_append_bf16";
        shape.check(kn)?;
        let (hd, qd, kvd) = (
            shape.head_dim,
            shape.n_heads * shape.head_dim,
            shape.n_kv_heads * shape.head_dim,
        );
        let width = qd + 2 * kvd;
        check_len("qkv", kn, qkv.len(), rows * width, "rows*(qd+2kvd)")?;
        if let Some(b) = bias {
            check_len("bias", kn, b.len(), width, "qd+2kvd")?;
        }
        check_len("q_out", kn, q_out.len(), rows * qd, "rows*qd")?;
        shape.check_cache(kn, k_cache.len(), v_cache.len(), block_table.len())?;
        check_len("pos", kn, pos.len(), rows, "rows")?;
        check_len("row_seq", kn, row_seq.len(), rows, "rows")?;
        check_len("inv_freq", kn, inv_freq.len(), hd / 2, "hd/2")?;
        let rows_i = as_i32(kn, "rows", rows)?;
        if rows == 0 {
            return Ok(());
        }
        let (h, kv, hd_i, ps, mp) = (
            shape.n_heads as i32,
            shape.n_kv_heads as i32,
            hd as i32,
            shape.page_size as i32,
            shape.max_pages as i32,
        );
        let s = self.stream();
        let (qp, _q) = q_out.device_ptr_mut(s);
        let (kc, _kc) = k_cache.device_ptr_mut(s);
        let (vc, _vc) = v_cache.device_ptr_mut(s);
        let (xp, _x) = qkv.device_ptr(s);
        let (bp, _b) = match bias {
            Some(b) => {
                let (p, g) = b.device_ptr(s);
                (p, Some(g))
            }
            None => (0, None),
        };
        let (pp, _p) = pos.device_ptr(s);
        let (fp, _f) = inv_freq.device_ptr(s);
        let (bt, _bt) = block_table.device_ptr(s);
        let (rs, _rs) = row_seq.device_ptr(s);
        let mut l = s.launch_builder(&self.fused.qkv_rope_append_bf16);
        l.arg(&qp)
            .arg(&kc)
            .arg(&vc)
            .arg(&xp)
            .arg(&bp)
            .arg(&pp)
            .arg(&fp)
            .arg(&bt)
            .arg(&rs);
        l.arg(&rows_i).arg(&h).arg(&kv).arg(&hd_i).arg(&ps).arg(&mp);
        let pairs = (shape.n_heads + shape.n_kv_heads) * hd / 2;
        let block = pairs.max(kvd).next_multiple_of(32).clamp(32, 256) as u32;
        // SAFETY: argument order as kernels/fused.cu qkv_rope_append_bf16 (bias null when None);
        // host-side lengths checked; pos is bounds-checked by the kernel, row_seq and the block
        // table's page ids are the caller's contract (as kv_cache_append_bf16).
        unsafe { l.launch(cfg((rows as u32, 1, 1), block, 0)) }.map_err(cuda_err(kn))?;
        Ok(())
    }

    /// x (rows, dim) += y, rounded to bf16; out (rows, dim) = rmsnorm(x) · weight (dim).
    #[allow(clippy::too_many_arguments)]
    pub fn residual_rmsnorm_fwd_bf16(
        &self,
        x: &mut impl DevicePtrMut<bf16>,
        y: &impl DevicePtr<bf16>,
        weight: &impl DevicePtr<bf16>,
        out: &mut impl DevicePtrMut<bf16>,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        let kn = "residual_rmsnorm_fwd_bf16";
        check_len("x", kn, x.len(), rows * dim, "rows*dim")?;
        check_len("y", kn, y.len(), rows * dim, "rows*dim")?;
        check_len("out", kn, out.len(), rows * dim, "rows*dim")?;
        check_len("weight", kn, weight.len(), dim, "dim")?;
        let (rows_i, dim_i) = (as_i32(kn, "rows", rows)?, as_i32(kn, "dim", dim)?);
        if rows * dim == 0 {
            return Ok(());
        }
        let s = self.stream();
        let (op, _o) = out.device_ptr_mut(s);
        let (xp, _x) = x.device_ptr_mut(s);
        let (yp, _y) = y.device_ptr(s);
        let (wp, _w) = weight.device_ptr(s);
        let mut l = s.launch_builder(&self.fused.residual_rmsnorm_fwd_bf16);
        l.arg(&op)
            .arg(&xp)
            .arg(&yp)
            .arg(&wp)
            .arg(&eps)
            .arg(&rows_i)
            .arg(&dim_i);
        // SAFETY: argument order as kernels/fused.cu residual_rmsnorm_fwd_bf16; lengths checked;
        // one block per row (block_reduce_sum: whole warps).
        unsafe { l.launch(cfg((rows as u32, 1, 1), residual_norm_block(dim), 0)) }.map_err(cuda_err(kn))?;
        Ok(())
    }

    /// The LoRA of 1–3 projections sharing their input x (rows, in) bf16, added into their
    /// columns of the stacked output y (rows, ldy) bf16: y[:, col_p .. col_p + out_p] +=
    /// scale · (x A_pᵀ) B_pᵀ. xa (≥ rows · n · rank) f32 is scratch. Bit-identical to
    /// lora_xa_bf16 + lora_expand_add_bf16 per projection.
    #[allow(clippy::too_many_arguments)]
    pub fn lora_group_bf16(
        &self,
        x: &impl DevicePtr<bf16>,
        members: &[LoraMember<'_>],
        scale: f32,
        rank: usize,
        xa: &mut CudaSlice<f32>,
        y: &mut impl DevicePtrMut<bf16>,
        ldy: usize,
        rows: usize,
        in_dim: usize,
    ) -> Result<()> {
        let kn = "lora_group_bf16";
        let n = members.len();
        if n == 0 || n > 3 || rank == 0 {
            return Err(Error::invalid(format!(
                "{kn}: {n} projections of rank {rank}; expected 1–3 of rank ≥ 1"
            )));
        }
        check_len("x", kn, x.len(), rows * in_dim, "rows*in")?;
        if xa.len() < rows * n * rank {
            return Err(Error::invalid(format!(
                "{kn}: xa has {} elements, needs {} = rows*n*rank",
                xa.len(),
                rows * n * rank
            )));
        }
        check_len("y", kn, y.len(), rows * ldy, "rows*ldy")?;
        let mut g = LoraGroup3 {
            n: n as i32,
            ..Default::default()
        };
        let s = self.stream();
        let mut guards = Vec::with_capacity(2 * n);
        let mut total_out = 0;
        for (p, m) in members.iter().enumerate() {
            check_len("a", kn, m.a.len(), rank * in_dim, "rank*in")?;
            check_len("b", kn, m.b.len(), m.out * rank, "out*rank")?;
            if m.col + m.out > ldy {
                return Err(Error::invalid(format!(
                    "{kn}: projection {p}'s columns {}..{} exceed ldy {ldy}",
                    m.col,
                    m.col + m.out
                )));
            }
            let (ap, ag) = m.a.device_ptr(s);
            let (bp, bg) = m.b.device_ptr(s);
            guards.push(ag);
            guards.push(bg);
            g.a[p] = ap;
            g.b[p] = bp;
            g.col[p] = as_i32(kn, "col", m.col)?;
            g.out[p] = as_i32(kn, "out", m.out)?;
            total_out += m.out;
        }
        let (r_i, in_i, k_i, ld_i) = (
            as_i32(kn, "rows", rows)?,
            as_i32(kn, "in", in_dim)?,
            as_i32(kn, "rank", rank)?,
            as_i32(kn, "ldy", ldy)?,
        );
        if rows == 0 || total_out == 0 {
            return Ok(());
        }
        let grid = lora_expand_cfg(kn, rows, total_out, n, rank)?;
        let (xp, _x) = x.device_ptr(s);
        let (ap, _a) = xa.device_ptr_mut(s);
        let mut l = s.launch_builder(&self.fused.lora_group_xa_bf16);
        l.arg(&ap).arg(&xp).arg(&g).arg(&r_i).arg(&in_i).arg(&k_i);
        // SAFETY: (float* xa, const bf16* x, LoraGroup3 g, int rows, int in, int rank); lengths
        // checked above; g's pointers are live slices of this device (guards held); one warp per
        // (4 rows, p·rank + j): grid.x·4 ≥ rows, grid.y·warps ≥ n·rank, ≤ 8 warps (the kernel's
        // bound 256).
        unsafe { l.launch(lora_xa_cfg(rows, n * rank)) }.map_err(cuda_err("lora_group_xa_bf16"))?;
        let (yp, _y) = y.device_ptr_mut(s);
        let mut l = s.launch_builder(&self.fused.lora_group_expand_add_bf16);
        l.arg(&yp)
            .arg(&ld_i)
            .arg(&ap)
            .arg(&g)
            .arg(&scale)
            .arg(&r_i)
            .arg(&k_i);
        // SAFETY: (bf16* y, int ldy, const float* xa, LoraGroup3 g, float scale, int rows,
        // int rank); y holds rows·ldy elements and every projection's columns fit in ldy;
        // grid.x·128 ≥ Σ out_p, grid.y·32 ≥ rows, both bounded in the kernel; block 128 (the
        // kernel's bound); shared memory as lora_expand_tile's carve-up (≤ 32 KiB at rank 64).
        unsafe { l.launch(grid) }.map_err(cuda_err("lora_group_expand_add_bf16"))?;
        drop(guards);
        Ok(())
    }

    /// [`Self::qkv_rope_append_bf16`] on host data: returns (q_out, k_cache, v_cache).
    #[allow(clippy::too_many_arguments)]
    pub fn qkv_rope_append_bf16_host(
        &self,
        qkv: &[f32],
        bias: Option<&[f32]>,
        pos: &[i32],
        inv_freq: &[f32],
        block_table: &[i32],
        row_seq: &[i32],
        k_cache: &[f32],
        v_cache: &[f32],
        shape: &AttnShape,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let rows = pos.len();
        let x = self.upload_bf16(qkv)?;
        let b = bias.map(|b| self.upload_bf16(b)).transpose()?;
        let (p, f, bt, rs) = (
            self.upload(pos)?,
            self.upload(inv_freq)?,
            self.upload(block_table)?,
            self.upload(row_seq)?,
        );
        let mut q = self.alloc_zeros::<bf16>((rows * shape.n_heads * shape.head_dim).max(1))?;
        let (mut kc, mut vc) = (self.upload_bf16(k_cache)?, self.upload_bf16(v_cache)?);
        let mut qv = q.slice_mut(..rows * shape.n_heads * shape.head_dim);
        self.qkv_rope_append_bf16(
            &x,
            b.as_ref(),
            &p,
            &f,
            &bt,
            &rs,
            &mut qv,
            &mut kc,
            &mut vc,
            shape,
            rows,
        )?;
        Ok((
            self.download_bf16(&q)?[..rows * shape.n_heads * shape.head_dim].to_vec(),
            self.download_bf16(&kc)?,
            self.download_bf16(&vc)?,
        ))
    }

    /// [`Self::residual_rmsnorm_fwd_bf16`] on host data: returns (x after the add, out).
    pub fn residual_rmsnorm_fwd_bf16_host(
        &self,
        x: &[f32],
        y: &[f32],
        weight: &[f32],
        dim: usize,
        eps: f32,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let rows = x.len() / dim.max(1);
        let (mut xd, yd, wd) = (
            self.upload_bf16(x)?,
            self.upload_bf16(y)?,
            self.upload_bf16(weight)?,
        );
        let mut out = self.alloc_zeros::<bf16>(x.len().max(1))?;
        let mut ov = out.slice_mut(..x.len());
        self.residual_rmsnorm_fwd_bf16(&mut xd, &yd, &wd, &mut ov, rows, dim, eps)?;
        Ok((
            self.download_bf16(&xd)?,
            self.download_bf16(&out)?[..x.len()].to_vec(),
        ))
    }
}
