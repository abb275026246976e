//! Launchers for the training step's tensor-core LoRA kernels of `kernels/lora_train.cu`: the
//! fused forward (y += s·(x Aᵀ) Bᵀ, storing xa = x Aᵀ for the backward), the fused input
//! gradient (dyb = dy B stored, dx += s·dyb A) and the A / B gradients (dB += s·dyᵀ xa,
//! dA += s·dybᵀ x, reduced over rows in a fixed split then summed in split order by
//! `sum_partials_add_f32`). A and B are bf16 copies of the f32 master weights (the trainer
//! refreshes them after every optimizer step); xa and dyb are bf16; dA and dB are f32.
//!
//! Each launcher checks buffer lengths against the shapes, picks the kernel compiled for the
//! rank (16, 32, 64 or 128 ≥ r), the grid and the shared memory, and pushes the arguments in the
//! kernel's order. It owns no memory: the partials scratch is passed in, sized by
//! [`lora_train_grad_scratch_len`], which like the split itself depends on the problem size only
//! (never on the GPU), so the summation order and the gradients are the same on every GPU. The
//! oracle is an f64 host reference (tests/cuda_lora_train.rs; without a GPU,
//! `scripts/kernel_emu/run.sh lora_train` runs the same kernels on the CPU emulator).
//!
//! LoRA dropout ([`LoraDropoutSite`]): [`CudaDevice::lora_dropout_bf16`] writes x̃ = x ⊙ mask
//! (what the forward and dA read instead of x) and [`CudaDevice::lora_train_bwd_dx_dropout_bf16`]
//! masks the LoRA term of dx in the fused kernel's epilogue; the mask is the CPU reference's
//! `crate::cpu::train::dropout_factor`, bit for bit (tests/cuda_train.rs).

use cudarc::driver::{CudaFunction, DevicePtr, DevicePtrMut, PushKernelArg};
use half::bf16;

use super::train_kernels::{as_i32, cfg, check_len, ew_grid};
use super::{allow_smem, cuda_err, CudaDevice};
use crate::cpu::train::LoraDropout;
use crate::model::weights::Proj;
use crate::{Error, Result};

/// Threads per block: 4 warps (kernels/lora_train.cu `LT_THREADS`).
const LT_THREADS: u32 = 128;
/// Rows per fused block; rows per gradient chunk (`LT_BM`).
const LT_BM: usize = 64;
/// K chunk, output-column chunk, gradient p tile (`LT_BK`).
const LT_BK: usize = 64;
/// bf16 padding per shared-memory row (`LT_PAD`).
const LT_PAD: usize = 8;
/// The ranks the kernels are compiled for; a rank runs on the smallest one ≥ it (the rank
/// columns beyond r are zero in shared memory).
pub const LORA_TRAIN_COMPILED_RANKS: [usize; 4] = [16, 32, 64, 128];
/// Largest LoRA rank of the training kernels.
pub const LORA_TRAIN_MAX_RANK: usize = 128;
/// Blocks a fused launch aims for before splitting the output columns over a second grid
/// dimension (each split recomputes the rank-side product: worth it only for small n). Two
/// waves of one block per SM on a 132-SM H100/H200, the same on every GPU; the column split
/// changes no result bit (each output element is written by one block, the recomputed
/// rank-side product is identical), so `RFT_TRAIN_LORA_BLOCKS` may set another target for an
/// A/B ([`set_lora_train_target_blocks`]).
pub const FUSED_TARGET_BLOCKS: usize = 264;
static FUSED_TARGET: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(FUSED_TARGET_BLOCKS);

/// Sets the block target of every later fused LoRA launch in this process (≥ 1; the default
/// [`FUSED_TARGET_BLOCKS`]). Results do not depend on it; speed may.
pub fn set_lora_train_target_blocks(blocks: usize) {
    FUSED_TARGET.store(blocks.max(1), std::sync::atomic::Ordering::Relaxed);
}
const FUSED_MAX_COL_SPLITS: usize = 8;
/// Blocks a gradient launch aims for before splitting its reduction over rows (4 per SM of a
/// 132-SM GPU: the kernel streams x or dy once and needs several blocks per SM in flight).
const GRAD_TARGET_BLOCKS: usize = 528;
/// Each row split of a gradient reduces at least this many rows, and at most this many splits.
const GRAD_MIN_ROWS_PER_SPLIT: usize = 256;
const GRAD_MAX_SPLITS: usize = 128;

/// The compiled rank a LoRA rank runs with (16, 32, 64, 128), or an error naming the limit.
pub fn lora_train_compiled_rank(rank: usize) -> Result<usize> {
    LORA_TRAIN_COMPILED_RANKS
        .into_iter()
        .find(|&c| rank >= 1 && rank <= c)
        .ok_or_else(|| {
            Error::invalid(format!(
                "LoRA rank {rank} is not supported by the CUDA training kernels (1 ≤ r ≤ \
                 {LORA_TRAIN_MAX_RANK}); use a smaller lora.r or --device cpu"
            ))
        })
}

/// Dynamic shared memory of the fused kernels at compiled rank `rp` (kernels `LtCfg::SMEM_BYTES`):
/// two stages of a 64 × (64 + 8) activation / output tile and a weight tile of
/// max(rp × (64 + 8), 64 × (rp + 8)) bf16.
pub fn lora_train_fused_smem_bytes(rp: usize) -> usize {
    let w = (rp * (LT_BK + LT_PAD)).max(LT_BK * (rp + LT_PAD));
    2 * (LT_BM * (LT_BK + LT_PAD) + w) * 2
}

/// Dynamic shared memory of the gradient kernel at compiled rank `rp` (`LtGradCfg::SMEM_BYTES`):
/// two stages of a 64 × (64 + 8) activation tile and a 64 × (rp + 8) rank-side tile, bf16.
pub fn lora_train_grad_smem_bytes(rp: usize) -> usize {
    2 * (LT_BM * (LT_BK + LT_PAD) + LT_BM * (rp + LT_PAD)) * 2
}

/// Blocks along grid.y of a fused launch with n rows and `d_cols` output columns: 1 when the
/// row tiles give `FUSED_TARGET_BLOCKS`, else enough column splits to get there (≤ 8, ≤ the
/// 64-column chunks; none left empty).
pub fn lora_train_col_splits(n: usize, d_cols: usize) -> usize {
    let tiles = n.div_ceil(LT_BM).max(1);
    let chunks = d_cols.div_ceil(LT_BK).max(1);
    let s = FUSED_TARGET
        .load(std::sync::atomic::Ordering::Relaxed)
        .div_ceil(tiles)
        .min(chunks)
        .clamp(1, FUSED_MAX_COL_SPLITS);
    let per = chunks.div_ceil(s);
    chunks.div_ceil(per)
}

/// The row split of a LoRA gradient G (p, r) reduced over n rows: (splits, rows per split).
/// 1 split when the p tiles already give `GRAD_TARGET_BLOCKS` blocks, else enough to get
/// there, each ≥ 256 rows, ≤ 128 splits; rows per split a multiple of 64; no split empty.
pub fn lora_train_grad_split(n: usize, p: usize) -> (usize, usize) {
    let tiles = p.div_ceil(LT_BK).max(1);
    let want = GRAD_TARGET_BLOCKS.div_ceil(tiles);
    let by_rows = (n / GRAD_MIN_ROWS_PER_SPLIT).max(1);
    let s = want.min(by_rows).clamp(1, GRAD_MAX_SPLITS);
    let rows = n.div_ceil(s).next_multiple_of(LT_BM).max(LT_BM);
    (n.div_ceil(rows).max(1), rows)
}

/// f32 scratch elements a LoRA gradient launch needs: splits·p·r when split, else 0.
/// dB: p = out; dA: p = in.
pub fn lora_train_grad_scratch_len(n: usize, p: usize, rank: usize) -> usize {
    match lora_train_grad_split(n, p).0 {
        1 => 0,
        s => s * p * rank,
    }
}

/// One projection's LoRA dropout as the kernels take it (kernels/lora_train.cu `LtDrop`): drop
/// probability p, the keep scale 1/(1−p) (f32, computed here as the CPU computes it), the
/// micro-batch's seed and the projection's site (layer << 56) ^ (projection << 48); the mask of
/// entry (row, col) is then `crate::cpu::train::dropout_factor(&LoraDropout { p, seed }, layer,
/// proj, row, col)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoraDropoutSite {
    pub p: f32,
    pub keep_scale: f32,
    pub seed: u64,
    pub site: u64,
}

impl LoraDropoutSite {
    pub fn new(d: &LoraDropout, layer: usize, proj: Proj) -> LoraDropoutSite {
        LoraDropoutSite {
            p: d.p,
            keep_scale: 1.0 / (1.0 - d.p),
            seed: d.seed,
            site: ((layer as u64) << 56) ^ ((proj as u64) << 48),
        }
    }

    fn check(&self, kn: &str) -> Result<()> {
        if !(0.0..1.0).contains(&self.p) {
            return Err(Error::invalid(format!(
                "{kn}: dropout probability must be in [0, 1), got {}",
                self.p
            )));
        }
        Ok(())
    }
}

/// How a fused LoRA kernel writes its output (y or dx).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraOut {
    /// out = bf16(out + s·…): read and written once.
    Add,
    /// out = bf16(s·…): out is not read (the trainer adds the base GEMM onto it afterwards with
    /// cuBLAS beta = 1, which reads it under its math, saving this kernel the read).
    Store,
}

/// Which fused kernel: the forward or the input gradient (with or without dropout).
#[derive(Clone, Copy)]
enum Fused {
    Fwd,
    BwdDx,
    BwdDxDrop,
}

impl CudaDevice {
    fn lora_train_kernel(&self, which: Option<Fused>, rp: usize) -> &CudaFunction {
        let t = &self.train;
        match (which, rp) {
            (Some(Fused::Fwd), 16) => &t.lora_train_fwd_r16_bf16,
            (Some(Fused::Fwd), 32) => &t.lora_train_fwd_r32_bf16,
            (Some(Fused::Fwd), 64) => &t.lora_train_fwd_r64_bf16,
            (Some(Fused::Fwd), _) => &t.lora_train_fwd_r128_bf16,
            (Some(Fused::BwdDx), 16) => &t.lora_train_bwd_dx_r16_bf16,
            (Some(Fused::BwdDx), 32) => &t.lora_train_bwd_dx_r32_bf16,
            (Some(Fused::BwdDx), 64) => &t.lora_train_bwd_dx_r64_bf16,
            (Some(Fused::BwdDx), _) => &t.lora_train_bwd_dx_r128_bf16,
            (Some(Fused::BwdDxDrop), 16) => &t.lora_train_bwd_dx_drop_r16_bf16,
            (Some(Fused::BwdDxDrop), 32) => &t.lora_train_bwd_dx_drop_r32_bf16,
            (Some(Fused::BwdDxDrop), 64) => &t.lora_train_bwd_dx_drop_r64_bf16,
            (Some(Fused::BwdDxDrop), _) => &t.lora_train_bwd_dx_drop_r128_bf16,
            (None, 16) => &t.lora_train_grad_r16_bf16,
            (None, 32) => &t.lora_train_grad_r32_bf16,
            (None, 64) => &t.lora_train_grad_r64_bf16,
            (None, _) => &t.lora_train_grad_r128_bf16,
        }
    }

    /// The shared launch of the two fused kernels (argument order identical:
    /// `(bf16* out, bf16* low, const bf16* act, const bf16* a, const bf16* b, float scale,
    /// int n, int in, int out, int rank, int accumulate)`, then with dropout `float p, float
    /// keep_scale, unsigned long long seed, unsigned long long site`). `low` = None passes NULL
    /// (forward only).
    #[allow(clippy::too_many_arguments)]
    fn lora_train_fused(
        &self,
        which: Fused,
        kn: &str,
        act: &impl DevicePtr<bf16>,
        a: &impl DevicePtr<bf16>,
        b: &impl DevicePtr<bf16>,
        out: &mut impl DevicePtrMut<bf16>,
        mode: LoraOut,
        low: Option<&mut impl DevicePtrMut<bf16>>,
        scale: f32,
        n: usize,
        d_in: usize,
        d_out: usize,
        rank: usize,
        drop: Option<LoraDropoutSite>,
    ) -> Result<()> {
        let rp = lora_train_compiled_rank(rank).map_err(|e| Error::invalid(format!("{kn}: {e}")))?;
        let (act_cols, out_cols) = match which {
            Fused::Fwd => (d_in, d_out),
            Fused::BwdDx | Fused::BwdDxDrop => (d_out, d_in),
        };
        let (act_name, out_name, low_name) = match which {
            Fused::Fwd => (("x", "n*in"), ("y", "n*out"), "xa"),
            Fused::BwdDx | Fused::BwdDxDrop => (("dy", "n*out"), ("dx", "n*in"), "dyb"),
        };
        if matches!(which, Fused::BwdDxDrop) != drop.is_some() {
            return Err(Error::invalid(format!(
                "{kn}: internal: dropout parameters go with the dropout kernel only"
            )));
        }
        if let Some(d) = &drop {
            d.check(kn)?;
        }
        check_len(act_name.0, kn, act.len(), n * act_cols, act_name.1)?;
        check_len("a", kn, a.len(), rank * d_in, "r*in")?;
        check_len("b", kn, b.len(), d_out * rank, "out*r")?;
        check_len(out_name.0, kn, out.len(), n * out_cols, out_name.1)?;
        if let Some(l) = &low {
            check_len(low_name, kn, l.len(), n * rank, "n*r")?;
        }
        let (n_i, in_i, out_i, r_i) = (
            as_i32(kn, "n", n)?,
            as_i32(kn, "in", d_in)?,
            as_i32(kn, "out", d_out)?,
            as_i32(kn, "r", rank)?,
        );
        if n == 0 {
            return Ok(());
        }
        let accumulate = (mode == LoraOut::Add) as i32;
        let func = self.lora_train_kernel(Some(which), rp);
        let smem = lora_train_fused_smem_bytes(rp);
        allow_smem(func, kn, smem)?;
        let grid = (
            n.div_ceil(LT_BM) as u32,
            lora_train_col_splits(n, out_cols) as u32,
            1,
        );
        let s = self.stream();
        let (op, _o) = out.device_ptr_mut(s);
        let low_guard = low.map(|l| l.device_ptr_mut(s));
        let lp: u64 = low_guard.as_ref().map_or(0, |(p, _)| *p);
        let (xp, _x) = act.device_ptr(s);
        let (ap, _a) = a.device_ptr(s);
        let (bp, _b) = b.device_ptr(s);
        let mut l = s.launch_builder(func);
        l.arg(&op)
            .arg(&lp)
            .arg(&xp)
            .arg(&ap)
            .arg(&bp)
            .arg(&scale)
            .arg(&n_i)
            .arg(&in_i)
            .arg(&out_i)
            .arg(&r_i)
            .arg(&accumulate);
        if let Some(d) = &drop {
            l.arg(&d.p).arg(&d.keep_scale).arg(&d.seed).arg(&d.site);
        }
        // SAFETY: lora_train_fwd_r{RP}_bf16(bf16* y, bf16* xa, const bf16* x, const bf16* a,
        // const bf16* b, float scale, int n, int in, int out, int rank, int accumulate),
        // lora_train_bwd_dx_r{RP}_bf16(bf16* dx, bf16* dyb, const bf16* dy, ...same) and
        // lora_train_bwd_dx_drop_r{RP}_bf16(...same, float p, float keep_scale, unsigned long
        // long seed, unsigned long long site: pushed exactly when `which` is BwdDxDrop); every
        // length checked above (low NULL only for the forward, which then stores nothing); any
        // alignment is handled in the kernel; rank ≤ RP; block = 4 warps; grid.x covers the rows,
        // grid.y ≤ the 64-column chunks; smem = LtCfg<RP>::SMEM_BYTES, opted in above 48 KiB.
        unsafe { l.launch(cfg(grid, LT_THREADS, smem as u32)) }.map_err(cuda_err(kn))?;
        Ok(())
    }

    /// Fused LoRA forward of one projection: y (n, out) bf16 += scale · bf16(x Aᵀ) Bᵀ
    /// ([`LoraOut::Store`]: y = …), with x (n, in), A (r, in), B (out, r) bf16; `xa_out` (n, r)
    /// bf16, when given, receives bf16(x Aᵀ) (the backward's u). y is read (when added to) and
    /// written once; 1 ≤ r ≤ 128.
    #[allow(clippy::too_many_arguments)]
    pub fn lora_train_fwd_bf16(
        &self,
        x: &impl DevicePtr<bf16>,
        a: &impl DevicePtr<bf16>,
        b: &impl DevicePtr<bf16>,
        y: &mut impl DevicePtrMut<bf16>,
        mode: LoraOut,
        xa_out: Option<&mut impl DevicePtrMut<bf16>>,
        scale: f32,
        n: usize,
        d_in: usize,
        d_out: usize,
        rank: usize,
    ) -> Result<()> {
        self.lora_train_fused(
            Fused::Fwd,
            "lora_train_fwd_bf16",
            x,
            a,
            b,
            y,
            mode,
            xa_out,
            scale,
            n,
            d_in,
            d_out,
            rank,
            None,
        )
    }

    /// Fused LoRA input gradient of one projection: dyb (n, r) bf16 = bf16(dy B) and dx (n, in)
    /// bf16 += scale · dyb A ([`LoraOut::Store`]: dx = …), with dy (n, out), A (r, in), B (out, r)
    /// bf16. dx is read (when added to) and written once; dyb feeds
    /// [`Self::lora_train_grad_a_bf16`]; 1 ≤ r ≤ 128.
    #[allow(clippy::too_many_arguments)]
    pub fn lora_train_bwd_dx_bf16(
        &self,
        dy: &impl DevicePtr<bf16>,
        a: &impl DevicePtr<bf16>,
        b: &impl DevicePtr<bf16>,
        dx: &mut impl DevicePtrMut<bf16>,
        mode: LoraOut,
        dyb_out: &mut impl DevicePtrMut<bf16>,
        scale: f32,
        n: usize,
        d_in: usize,
        d_out: usize,
        rank: usize,
    ) -> Result<()> {
        self.lora_train_bwd_dx_dropout_bf16(dy, a, b, dx, mode, dyb_out, scale, n, d_in, d_out, rank, None)
    }

    /// [`Self::lora_train_bwd_dx_bf16`] with LoRA dropout when `drop` is given: dyb (n, r) =
    /// bf16(dy B) and dx (n, in) bf16 += scale · (dyb A) ⊙ mask, the mask of `drop` at (row,
    /// column of dx): the input gradient of y = s·(x̃ Aᵀ) Bᵀ with x̃ = x ⊙ mask. Without `drop`
    /// it is [`Self::lora_train_bwd_dx_bf16`] (the plain kernel, under that name in errors).
    #[allow(clippy::too_many_arguments)]
    pub fn lora_train_bwd_dx_dropout_bf16(
        &self,
        dy: &impl DevicePtr<bf16>,
        a: &impl DevicePtr<bf16>,
        b: &impl DevicePtr<bf16>,
        dx: &mut impl DevicePtrMut<bf16>,
        mode: LoraOut,
        dyb_out: &mut impl DevicePtrMut<bf16>,
        scale: f32,
        n: usize,
        d_in: usize,
        d_out: usize,
        rank: usize,
        drop: Option<LoraDropoutSite>,
    ) -> Result<()> {
        let (which, kn) = match drop {
            None => (Fused::BwdDx, "lora_train_bwd_dx_bf16"),
            Some(_) => (Fused::BwdDxDrop, "lora_train_bwd_dx_dropout_bf16"),
        };
        self.lora_train_fused(
            which,
            kn,
            dy,
            a,
            b,
            dx,
            mode,
            Some(dyb_out),
            scale,
            n,
            d_in,
            d_out,
            rank,
            drop,
        )
    }

    /// LoRA dropout on the input of A: xd (n, in) bf16 = bf16(x · mask), x (n, in) bf16, the mask
    /// of `drop` at each (row, col) (0 or 1/(1−p)).
    pub fn lora_dropout_bf16(
        &self,
        x: &impl DevicePtr<bf16>,
        xd: &mut impl DevicePtrMut<bf16>,
        drop: LoraDropoutSite,
        n: usize,
        d_in: usize,
    ) -> Result<()> {
        let kn = "lora_dropout_bf16";
        drop.check(kn)?;
        check_len("x", kn, x.len(), n * d_in, "n*in")?;
        check_len("xd", kn, xd.len(), n * d_in, "n*in")?;
        let (n_i, in_i) = (as_i32(kn, "n", n)?, as_i32(kn, "in", d_in)?);
        if n * d_in == 0 {
            return Ok(());
        }
        let s = self.stream();
        let (op, _o) = xd.device_ptr_mut(s);
        let (xp, _x) = x.device_ptr(s);
        let mut l = s.launch_builder(&self.train.lora_dropout_bf16);
        l.arg(&op)
            .arg(&xp)
            .arg(&drop.p)
            .arg(&drop.keep_scale)
            .arg(&drop.seed)
            .arg(&drop.site)
            .arg(&n_i)
            .arg(&in_i);
        // SAFETY: lora_dropout_bf16(bf16* xd, const bf16* x, float p, float keep_scale, unsigned
        // long long seed, unsigned long long site, int n, int in); x and xd hold n·in (checked);
        // grid-stride, any grid covers every element.
        unsafe { l.launch(cfg((ew_grid(n * d_in), 1, 1), 256, 0)) }.map_err(cuda_err(kn))?;
        Ok(())
    }

    /// Test convenience of [`Self::lora_dropout_bf16`]: x (n, in) rounded to bf16, x̃ back as f32.
    pub fn lora_dropout_host(
        &self,
        x: &[f32],
        drop: LoraDropoutSite,
        n: usize,
        d_in: usize,
    ) -> Result<Vec<f32>> {
        check_len("x", "lora_dropout_host", x.len(), n * d_in, "n*in")?;
        let xd = self.upload_bf16(&super::train_kernels::nonempty(x))?;
        let mut out = self.alloc_zeros::<bf16>((n * d_in).max(1))?;
        self.lora_dropout_bf16(
            &xd.slice(..n * d_in),
            &mut out.slice_mut(..n * d_in),
            drop,
            n,
            d_in,
        )?;
        let mut v = self.download_bf16(&out)?;
        v.truncate(n * d_in);
        Ok(v)
    }

    /// Test convenience of [`Self::lora_train_bwd_dx_dropout_bf16`] (without `drop`: the plain
    /// kernel) on host data: dy (n, out), a (r, in), b (out, r), dx_in (n, in) rounded to bf16.
    /// Returns (dyb, dx) as f32.
    #[allow(clippy::too_many_arguments)]
    pub fn lora_train_bwd_dx_host(
        &self,
        dy: &[f32],
        a: &[f32],
        b: &[f32],
        dx_in: &[f32],
        scale: f32,
        n: usize,
        d_in: usize,
        d_out: usize,
        rank: usize,
        drop: Option<LoraDropoutSite>,
    ) -> Result<[Vec<f32>; 2]> {
        let nz = super::train_kernels::nonempty::<f32>;
        let dyd = self.upload_bf16(&nz(dy))?;
        let ad = self.upload_bf16(&nz(a))?;
        let bd = self.upload_bf16(&nz(b))?;
        let mut dx = self.upload_bf16(&nz(dx_in))?;
        let mut dyb = self.alloc_zeros::<bf16>((n * rank).max(1))?;
        let (dyv, av, bv) = (
            dyd.slice(..n * d_out),
            ad.slice(..rank * d_in),
            bd.slice(..d_out * rank),
        );
        let (mut dxv, mut dybv) = (dx.slice_mut(..n * d_in), dyb.slice_mut(..n * rank));
        self.lora_train_bwd_dx_dropout_bf16(
            &dyv,
            &av,
            &bv,
            &mut dxv,
            LoraOut::Add,
            &mut dybv,
            scale,
            n,
            d_in,
            d_out,
            rank,
            drop,
        )?;
        let (mut dyb, mut dx) = (self.download_bf16(&dyb)?, self.download_bf16(&dx)?);
        dyb.truncate(n * rank);
        dx.truncate(n * d_in);
        Ok([dyb, dx])
    }

    /// The shared launch of the gradient kernel: grad (p, r) or, `transposed`, (r, p) f32 +=
    /// scale · actᵀ low, act (n, p) bf16, low (n, r) bf16.
    #[allow(clippy::too_many_arguments)]
    fn lora_train_grad(
        &self,
        kn: &str,
        act: &impl DevicePtr<bf16>,
        low: &impl DevicePtr<bf16>,
        grad: &mut impl DevicePtrMut<f32>,
        scratch: &mut (impl DevicePtr<f32> + DevicePtrMut<f32>),
        scale: f32,
        n: usize,
        p: usize,
        rank: usize,
        transposed: bool,
    ) -> Result<()> {
        let rp = lora_train_compiled_rank(rank).map_err(|e| Error::invalid(format!("{kn}: {e}")))?;
        let (splits, rows) = lora_train_grad_split(n, p);
        let need = lora_train_grad_scratch_len(n, p, rank);
        if scratch.len() < need {
            return Err(Error::invalid(format!(
                "{kn}: scratch has {} f32, needs at least {need} = lora_train_grad_scratch_len({n}, {p}, {rank})",
                scratch.len()
            )));
        }
        let (n_i, p_i, r_i, rows_i) = (
            as_i32(kn, "n", n)?,
            as_i32(kn, "p", p)?,
            as_i32(kn, "r", rank)?,
            as_i32(kn, "rows per split", rows)?,
        );
        if n == 0 || p == 0 {
            return Ok(());
        }
        let func = self.lora_train_kernel(None, rp);
        let smem = lora_train_grad_smem_bytes(rp);
        allow_smem(func, kn, smem)?;
        let grid = (p.div_ceil(LT_BK) as u32, splits as u32, 1);
        let tr = i32::from(transposed);
        {
            let s = self.stream();
            let (gp, _g) = grad.device_ptr_mut(s);
            let (sp, _s) = scratch.device_ptr_mut(s);
            let (xp, _x) = act.device_ptr(s);
            let (lp, _l) = low.device_ptr(s);
            let mut l = s.launch_builder(func);
            l.arg(&gp)
                .arg(&sp)
                .arg(&xp)
                .arg(&lp)
                .arg(&scale)
                .arg(&n_i)
                .arg(&p_i)
                .arg(&r_i)
                .arg(&rows_i)
                .arg(&tr);
            // SAFETY: lora_train_grad_r{RP}_bf16(float* out, float* partials, const bf16* act,
            // const bf16* low, float scale, int n, int p_dim, int rank, int rows_per_split,
            // int transposed); act holds n·p, low n·r, out p·r (checked by the callers), scratch
            // splits·p·r when split (checked); grid.y = splits covers the rows in rows_per_split
            // pieces; smem = LtGradCfg<RP>::SMEM_BYTES, opted in above 48 KiB.
            unsafe { l.launch(cfg(grid, LT_THREADS, smem as u32)) }.map_err(cuda_err(kn))?;
        }
        if splits > 1 {
            self.sum_partials_add_f32(scratch, grad, splits, scale)?;
        }
        Ok(())
    }

    /// dB (out, r) f32 += scale · dy (n, out)ᵀ u (n, r), dy and u = xa (the forward's
    /// `xa_out`) bf16. `scratch` needs at least [`lora_train_grad_scratch_len`]`(n, out, r)` f32
    /// (any non-empty buffer when that is 0). Deterministic: fixed row split, ordered sum.
    #[allow(clippy::too_many_arguments)]
    pub fn lora_train_grad_b_bf16(
        &self,
        dy: &impl DevicePtr<bf16>,
        u: &impl DevicePtr<bf16>,
        db: &mut impl DevicePtrMut<f32>,
        scratch: &mut (impl DevicePtr<f32> + DevicePtrMut<f32>),
        scale: f32,
        n: usize,
        d_out: usize,
        rank: usize,
    ) -> Result<()> {
        let kn = "lora_train_grad_b_bf16";
        check_len("dy", kn, dy.len(), n * d_out, "n*out")?;
        check_len("u", kn, u.len(), n * rank, "n*r")?;
        check_len("db", kn, db.len(), d_out * rank, "out*r")?;
        self.lora_train_grad(kn, dy, u, db, scratch, scale, n, d_out, rank, false)
    }

    /// dA (r, in) f32 += scale · dyb (n, r)ᵀ x (n, in), dyb (from
    /// [`Self::lora_train_bwd_dx_bf16`]) and x bf16. `scratch` needs at least
    /// [`lora_train_grad_scratch_len`]`(n, in, r)` f32. Deterministic: fixed row split, ordered sum.
    #[allow(clippy::too_many_arguments)]
    pub fn lora_train_grad_a_bf16(
        &self,
        dyb: &impl DevicePtr<bf16>,
        x: &impl DevicePtr<bf16>,
        da: &mut impl DevicePtrMut<f32>,
        scratch: &mut (impl DevicePtr<f32> + DevicePtrMut<f32>),
        scale: f32,
        n: usize,
        d_in: usize,
        rank: usize,
    ) -> Result<()> {
        let kn = "lora_train_grad_a_bf16";
        check_len("dyb", kn, dyb.len(), n * rank, "n*r")?;
        check_len("x", kn, x.len(), n * d_in, "n*in")?;
        check_len("da", kn, da.len(), rank * d_in, "r*in")?;
        self.lora_train_grad(kn, x, dyb, da, scratch, scale, n, d_in, rank, true)
    }

    /// Test convenience: one projection's LoRA forward and backward on host data, in the order
    /// the trainer runs them (fwd, bwd_dx, grad_b, grad_a). x (n, in), dy (n, out), a (r, in),
    /// b (out, r), y_in (n, out), dx_in (n, in) are rounded to bf16; da_in (r, in), db_in
    /// (out, r) f32 are accumulated into. Returns (xa, y, dyb, dx, da, db), bf16 ones as f32.
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    pub fn lora_train_host(
        &self,
        x: &[f32],
        dy: &[f32],
        a: &[f32],
        b: &[f32],
        y_in: &[f32],
        dx_in: &[f32],
        da_in: &[f32],
        db_in: &[f32],
        scale: f32,
        n: usize,
        d_in: usize,
        d_out: usize,
        rank: usize,
    ) -> Result<[Vec<f32>; 6]> {
        let nz = |v: &[f32]| -> Vec<f32> {
            if v.is_empty() {
                vec![0.0]
            } else {
                v.to_vec()
            }
        };
        let xd = self.upload_bf16(&nz(x))?;
        let dyd = self.upload_bf16(&nz(dy))?;
        let ad = self.upload_bf16(&nz(a))?;
        let bd = self.upload_bf16(&nz(b))?;
        let mut y = self.upload_bf16(&nz(y_in))?;
        let mut dx = self.upload_bf16(&nz(dx_in))?;
        let mut da = self.upload(&nz(da_in))?;
        let mut db = self.upload(&nz(db_in))?;
        let mut xa = self.alloc_zeros::<bf16>((n * rank).max(1))?;
        let mut dyb = self.alloc_zeros::<bf16>((n * rank).max(1))?;
        let scratch_len = lora_train_grad_scratch_len(n, d_out, rank)
            .max(lora_train_grad_scratch_len(n, d_in, rank))
            .max(1);
        let mut scratch = self.alloc_zeros::<f32>(scratch_len)?;
        let nr = n * rank;
        let (xv, dyv) = (xd.slice(..n * d_in), dyd.slice(..n * d_out));
        let (av, bv) = (ad.slice(..rank * d_in), bd.slice(..d_out * rank));
        self.lora_train_fwd_bf16(
            &xv,
            &av,
            &bv,
            &mut y.slice_mut(..n * d_out),
            LoraOut::Add,
            Some(&mut xa.slice_mut(..nr)),
            scale,
            n,
            d_in,
            d_out,
            rank,
        )?;
        self.lora_train_bwd_dx_bf16(
            &dyv,
            &av,
            &bv,
            &mut dx.slice_mut(..n * d_in),
            LoraOut::Add,
            &mut dyb.slice_mut(..nr),
            scale,
            n,
            d_in,
            d_out,
            rank,
        )?;
        self.lora_train_grad_b_bf16(
            &dyv,
            &xa.slice(..nr),
            &mut db.slice_mut(..d_out * rank),
            &mut scratch,
            scale,
            n,
            d_out,
            rank,
        )?;
        self.lora_train_grad_a_bf16(
            &dyb.slice(..nr),
            &xv,
            &mut da.slice_mut(..rank * d_in),
            &mut scratch,
            scale,
            n,
            d_in,
            rank,
        )?;
        let mut xa = self.download_bf16(&xa)?;
        let mut y = self.download_bf16(&y)?;
        let mut dyb = self.download_bf16(&dyb)?;
        let mut dx = self.download_bf16(&dx)?;
        let mut da = self.download(&da)?;
        let mut db = self.download(&db)?;
        xa.truncate(nr);
        dyb.truncate(nr);
        y.truncate(n * d_out);
        dx.truncate(n * d_in);
        da.truncate(rank * d_in);
        db.truncate(d_out * rank);
        Ok([xa, y, dyb, dx, da, db])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compiled_rank_and_shared_memory() {
        assert_eq!(lora_train_compiled_rank(1).unwrap(), 16);
        assert_eq!(lora_train_compiled_rank(16).unwrap(), 16);
        assert_eq!(lora_train_compiled_rank(17).unwrap(), 32);
        assert_eq!(lora_train_compiled_rank(48).unwrap(), 64);
        assert_eq!(lora_train_compiled_rank(128).unwrap(), 128);
        for bad in [0, 129, 256] {
            let e = lora_train_compiled_rank(bad).unwrap_err().to_string();
            assert!(
                e.contains(&format!("LoRA rank {bad}")) && e.contains("≤ 128"),
                "{e}"
            );
        }
        // Mirrors of kernels/lora_train.cu's LtCfg / LtGradCfg (the emulator checks the kernel's
        // own constants against the same formulas).
        assert_eq!(lora_train_fused_smem_bytes(16), 24_576);
        assert_eq!(lora_train_fused_smem_bytes(64), 36_864);
        assert_eq!(lora_train_fused_smem_bytes(128), 55_296);
        assert_eq!(lora_train_grad_smem_bytes(16), 24_576);
        assert_eq!(lora_train_grad_smem_bytes(128), 53_248);
        for rp in LORA_TRAIN_COMPILED_RANKS {
            assert!(lora_train_fused_smem_bytes(rp) <= 99 * 1024);
            assert!(lora_train_grad_smem_bytes(rp) <= 99 * 1024);
        }
    }

    #[test]
    fn splits_depend_on_the_problem_only() {
        // Qwen2.5-0.5B at 64 × 384 rows: the row tiles alone fill the GPU.
        assert_eq!(lora_train_col_splits(24_576, 4864), 1);
        // Small n: the output columns are split, never more than 8 ways, none empty.
        assert_eq!(lora_train_col_splits(17, 4864), 8);
        assert_eq!(lora_train_col_splits(17, 72), 2);
        assert_eq!(lora_train_col_splits(1, 1), 1);
        for (n, d) in [(1, 64), (5000, 896), (64, 130), (700, 200)] {
            let s = lora_train_col_splits(n, d);
            let chunks = d.div_ceil(64);
            let per = chunks.div_ceil(s);
            assert!(
                s >= 1 && (s - 1) * per < chunks,
                "n {n} d {d}: split {s} leaves one empty"
            );
        }
        // Gradients at the target shape: dA of q (in 896) and dB of k (out 128), dA of down.
        assert_eq!(lora_train_grad_split(24_576, 896), (35, 704));
        assert_eq!(lora_train_grad_split(24_576, 128), (96, 256));
        assert_eq!(lora_train_grad_split(24_576, 4864), (7, 3520));
        assert_eq!(lora_train_grad_scratch_len(24_576, 896, 16), 35 * 896 * 16);
        // Few rows: one split, no scratch.
        assert_eq!(lora_train_grad_split(300, 896), (1, 320));
        assert_eq!(lora_train_grad_scratch_len(300, 896, 16), 0);
        assert_eq!(lora_train_grad_split(0, 896), (1, 64));
        for (n, p) in [(1000, 136), (1030, 72), (24_576, 18_944), (100_000, 8)] {
            let (s, rows) = lora_train_grad_split(n, p);
            assert!(
                rows % 64 == 0 && s * rows >= n && (s - 1) * rows < n,
                "n {n} p {p}"
            );
        }
    }
}
