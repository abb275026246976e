//! Launchers for the training-step kernels of `kernels/train.cu`: the chunked lm_head's
//! log-softmax gather (forward, and backward writing dlogits in place or from f32 logits to
//! bf16), the GRPO loss with its gradient, LoRA backward, RMSNorm / SwiGLU / RoPE backward, the
//! global gradient norm with its non-finite flag, and AdamW. Each launcher checks buffer lengths
//! against the shapes, picks grid / block / shared memory and pushes the arguments in the
//! kernel's order; `*_host` conveniences (host slices in, host vectors out) exist for tests. The
//! CPU oracles are named in kernels/train.cu's top comment. Its small launch helpers
//! (`check_len`, `as_i32`, `cfg`, the elementwise grids) serve the other launcher modules too.
//!
//! It owns no memory plan: scratch buffers (reduction partials, split-K partials) are passed
//! in, sized by the pure functions here ([`grpo_loss_partials_len`], [`grad_norm_partials_len`],
//! [`lora_grad_scratch_len`], [`rmsnorm_bwd_partials_len`]), which depend on the problem size
//! only: that is what makes every reduction deterministic (same shape → same summation order,
//! on any GPU). It does not own the train step either (the engine calls these in order).

use cudarc::driver::{
    CudaFunction, CudaModule, CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};
use half::bf16;
use std::sync::Arc;

use super::{cuda_err, CudaDevice, SMEM_DEFAULT_BYTES};
use crate::loss::{
    sequence_weights, GrpoInputs, GrpoLossConfig, GrpoLossOutput, GrpoMetrics, KlEstimator, OldLogp,
};
use crate::optim::{AdamW, AdamWScalars, AdamWState, ClipReport, StepReport};
use crate::{Error, Result};

macro_rules! train_kernels {
    ($($name:ident),* $(,)?) => {
        /// The training-step kernels, looked up once when the device is opened (fields visible
        /// to the sibling launcher modules, e.g. attention_train.rs).
        pub(super) struct TrainKernels {
            $(pub(super) $name: CudaFunction,)*
        }

        /// Every kernel name of kernels/train.cu, kernels/attention_train.cu and
        /// kernels/lora_train.cu (for the fatbin-content test).
        pub const TRAIN_KERNEL_NAMES: &[&str] = &[$(stringify!($name),)*];

        impl TrainKernels {
            pub(super) fn load(module: &Arc<CudaModule>) -> Result<TrainKernels> {
                let f = |name: &str| super::load_kernel(module, name);
                Ok(TrainKernels { $($name: f(stringify!($name))?,)* })
            }
        }
    };
}

train_kernels!(
    sum_partials_f64,
    sum_partials_add_f32,
    logprob_gather_fwd_f32,
    logprob_gather_fwd_bf16,
    logprob_gather_bwd_f32,
    logprob_gather_bwd_bf16,
    logprob_gather_bwd_f32_to_bf16,
    grpo_loss_fwd_bwd_f32,
    lora_bwd_xa_bf16,
    lora_bwd_dyb_bf16,
    lora_grad_b_bf16,
    lora_grad_a_bf16,
    lora_bwd_dx_bf16,
    rmsnorm_bwd_bf16,
    swiglu_bwd_bf16,
    swiglu_fused_bwd_bf16,
    rope_bwd_bf16,
    grad_sq_norm_partial_f32,
    adamw_step_f32,
    embedding_grad_bf16_to_f32,
    // kernels/attention_train.cu (launchers in attention_train.rs)
    attention_train_fwd_hd64_bf16,
    attention_train_fwd_hd128_bf16,
    attention_train_fwd_hd256_bf16,
    attention_train_bwd_delta_bf16,
    attention_train_bwd_dkdv_hd64_bf16,
    attention_train_bwd_dkdv_hd128_bf16,
    attention_train_bwd_dkdv_hd256_bf16,
    attention_train_bwd_dq_hd64_bf16,
    attention_train_bwd_dq_hd128_bf16,
    attention_train_bwd_dq_hd256_bf16,
    scatter_rows_bf16,
    // kernels/lora_train.cu (launchers in lora_train.rs)
    lora_train_fwd_r16_bf16,
    lora_train_fwd_r32_bf16,
    lora_train_fwd_r64_bf16,
    lora_train_fwd_r128_bf16,
    lora_train_bwd_dx_r16_bf16,
    lora_train_bwd_dx_r32_bf16,
    lora_train_bwd_dx_r64_bf16,
    lora_train_bwd_dx_r128_bf16,
    lora_train_bwd_dx_drop_r16_bf16,
    lora_train_bwd_dx_drop_r32_bf16,
    lora_train_bwd_dx_drop_r64_bf16,
    lora_train_bwd_dx_drop_r128_bf16,
    lora_dropout_bf16,
    lora_train_grad_r16_bf16,
    lora_train_grad_r32_bf16,
    lora_train_grad_r64_bf16,
    lora_train_grad_r128_bf16,
);

/// f64 fields of one GRPO partial (kernels/train.cu `GRPO_FIELDS`): Σ w·loss, Σ kl, Σ ratio,
/// #clip low, #clip high.
pub const GRPO_FIELDS: usize = 5;
/// Threads per block of the grid-stride reductions (GRPO loss, grad norm, sum_partials_f64).
const RED_THREADS: u32 = 256;
/// Blocks of the grid-stride reductions: enough for ~8 waves on 132 SMs, never more.
const RED_MAX_BLOCKS: usize = 1024;
/// LoRA tile kernel: 32×32 outputs per block, 256 threads (kernels/train.cu `LT_*`).
const LT_TILE: usize = 32;
const LT_THREADS: u32 = 256;
/// Blocks a LoRA gradient launch aims for before splitting its reduction over rows: two waves
/// on a 132-SM H100/H200. A constant (not the device's SM count) so the split, and with it the
/// summation order, is the same on every GPU.
const LORA_TARGET_BLOCKS: usize = 264;
/// Each k-split of a LoRA gradient reduces at least this many rows.
const LORA_MIN_ROWS_PER_SPLIT: usize = 256;
const LORA_MAX_SPLITS: usize = 64;
/// Rows per block of rmsnorm_bwd_bf16 (kernels/train.cu `RMS_BWD_ROWS`).
const RMS_BWD_ROWS: usize = 16;
/// Threads and grid cap of the grid-stride elementwise kernels (also rollout.rs's).
pub(super) const EW_THREADS: u32 = 256;
const EW_MAX_BLOCKS: usize = 65_535;
/// Elements per thread per step of the vectorised grid-stride kernels (one 16-byte bf16 vector).
const EW_VEC: usize = 8;
/// rmsnorm_bwd_bf16's static shared memory (tr_block_sum2's 2 × 32 f32 partials,
/// kernels/train.cu), which counts against the same limit as its dynamic dweight accumulator.
const RMS_BWD_STATIC_SMEM_BYTES: usize = 2 * 32 * 4;

/// The largest dim whose rmsnorm_bwd dweight accumulator (dim f32 of dynamic shared memory on
/// the scalar path) fits next to the kernel's static shared memory in the default 48 KiB.
pub const RMSNORM_BWD_MAX_DIM: usize = (SMEM_DEFAULT_BYTES - RMS_BWD_STATIC_SMEM_BYTES) / 4;
/// rmsnorm_bwd_bf16 takes its vector path (one thread per 8 columns) up to this block size.
const RMS_BWD_VEC_MAX_THREADS: usize = 512;

/// Blocks of `grpo_loss_fwd_bwd_f32` for `n_tokens` tokens (≥ 1).
pub fn grpo_loss_blocks(n_tokens: usize) -> usize {
    n_tokens.div_ceil(RED_THREADS as usize).clamp(1, RED_MAX_BLOCKS)
}

/// f64 elements of the GRPO loss's partials buffer.
pub fn grpo_loss_partials_len(n_tokens: usize) -> usize {
    grpo_loss_blocks(n_tokens) * GRPO_FIELDS
}

/// Blocks of `grad_sq_norm_partial_f32` over `n` gradient elements (≥ 1).
pub fn grad_norm_blocks(n: usize) -> usize {
    n.div_ceil(RED_THREADS as usize * 4).clamp(1, RED_MAX_BLOCKS)
}

/// f64 elements of the grad-norm partials buffer (2 per block).
pub fn grad_norm_partials_len(n: usize) -> usize {
    grad_norm_blocks(n) * 2
}

/// k-splits of a LoRA gradient C [p, q] reduced over `rows`: 1 when the 32×32 tiles already
/// give `LORA_TARGET_BLOCKS` blocks, else enough to get there, each split ≥ 256 rows, ≤ 64.
pub fn lora_grad_splits(rows: usize, p: usize, q: usize) -> usize {
    let tiles = (p.div_ceil(LT_TILE) * q.div_ceil(LT_TILE)).max(1);
    let want = LORA_TARGET_BLOCKS.div_ceil(tiles);
    let by_rows = (rows / LORA_MIN_ROWS_PER_SPLIT).max(1);
    want.min(by_rows).clamp(1, LORA_MAX_SPLITS)
}

/// f32 scratch elements a LoRA gradient launch needs: splits·p·q when split, else 0.
/// dB: (p, q) = (out, r); dA: (p, q) = (r, in).
pub fn lora_grad_scratch_len(rows: usize, p: usize, q: usize) -> usize {
    match lora_grad_splits(rows, p, q) {
        1 => 0,
        s => s * p * q,
    }
}

/// Blocks of rmsnorm_bwd_bf16 (one dweight partial each).
pub fn rmsnorm_bwd_blocks(rows: usize) -> usize {
    rows.div_ceil(RMS_BWD_ROWS).max(1)
}

/// f32 elements of rmsnorm_bwd_bf16's dweight partials buffer.
pub fn rmsnorm_bwd_partials_len(rows: usize, dim: usize) -> usize {
    rmsnorm_bwd_blocks(rows) * dim
}

/// The GRPO loss kernel's scalars, rounded from the f64 config exactly as the CPU loss does
/// (`lo = f32(1 − ε)`, `hi = f32(1 + ε_high)`, `beta = f32(β)`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GrpoLossScalars {
    pub lo: f32,
    pub hi: f32,
    pub beta: f32,
    pub kl_estimator: KlEstimator,
}

impl GrpoLossScalars {
    pub fn from_config(cfg: &GrpoLossConfig) -> Self {
        GrpoLossScalars {
            lo: (1.0 - cfg.epsilon) as f32,
            hi: (1.0 + cfg.epsilon_high()) as f32,
            beta: cfg.beta as f32,
            kl_estimator: cfg.kl_estimator,
        }
    }
}

/// The reduced sums of one GRPO loss launch (the `totals` buffer, [`GRPO_FIELDS`] f64).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GrpoLossTotals {
    /// The aggregated loss Σ w_i·per_token.
    pub loss: f64,
    pub kl_sum: f64,
    pub ratio_sum: f64,
    pub clip_low: u64,
    pub clip_high: u64,
}

impl GrpoLossTotals {
    /// From the downloaded `totals` buffer.
    pub fn from_sums(sums: &[f64]) -> Result<Self> {
        if sums.len() != GRPO_FIELDS {
            return Err(Error::invalid(format!(
                "GRPO totals: {} values, expected {GRPO_FIELDS}",
                sums.len()
            )));
        }
        Ok(GrpoLossTotals {
            loss: sums[0],
            kl_sum: sums[1],
            ratio_sum: sums[2],
            clip_low: sums[3] as u64,
            clip_high: sums[4] as u64,
        })
    }

    /// The batch metrics as `grpo_loss_into` reports them (token means; KL only with a reference).
    pub fn metrics(&self, num_tokens: usize, has_ref: bool) -> GrpoMetrics {
        let per_token = |x: f64| {
            if num_tokens == 0 {
                0.0
            } else {
                x / num_tokens as f64
            }
        };
        GrpoMetrics {
            num_tokens,
            kl_mean: has_ref.then(|| per_token(self.kl_sum)),
            clip_low: per_token(self.clip_low as f64),
            clip_high: per_token(self.clip_high as f64),
            clip_region: per_token((self.clip_low + self.clip_high) as f64),
            ratio_mean: per_token(self.ratio_sum),
        }
    }
}

/// What clipping to apply, from the grad-norm kernels' `[Σ g², #non-finite]`, with exactly the
/// decisions of `optim::clip_grad_norm` (norm = f32(sqrt(Σ g²)), coef = max_norm / (norm + 1e-6)
/// applied when < 1; `max_norm ≤ 0` disables clipping). Non-finite → `finite: false`.
pub fn clip_report_from_stats(stats: [f64; 2], max_norm: f32) -> ClipReport {
    let norm = stats[0].sqrt() as f32;
    if stats[1] != 0.0 || !norm.is_finite() {
        return ClipReport {
            norm: if norm.is_finite() { f32::NAN } else { norm },
            finite: false,
            scale: 1.0,
        };
    }
    let mut scale = 1.0f32;
    if max_norm > 0.0 {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            scale = coef;
        }
    }
    ClipReport {
        norm,
        finite: true,
        scale,
    }
}

/// What [`CudaDevice::gather_bwd_host_inputs`] uploads and allocates.
struct GatherBwdHostInputs {
    targets: CudaSlice<u32>,
    dlogp: CudaSlice<f32>,
    dentropy: Option<CudaSlice<f32>>,
    stats: [CudaSlice<f32>; 4],
}

pub(super) fn check_len(what: &str, kernel: &str, found: usize, expected: usize, shape: &str) -> Result<()> {
    if found != expected {
        return Err(Error::invalid(format!(
            "{kernel}: {what} has {found} elements, expected {expected} = {shape}"
        )));
    }
    Ok(())
}

fn check_min_len(what: &str, kernel: &str, found: usize, needed: usize, shape: &str) -> Result<()> {
    if found < needed {
        return Err(Error::invalid(format!(
            "{kernel}: {what} has {found} elements, needs at least {needed} = {shape}"
        )));
    }
    Ok(())
}

pub(super) fn as_i32(kernel: &str, what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::invalid(format!("{kernel}: {what} = {v} exceeds i32::MAX")))
}

/// Checks of the backward gathers: vocab > 0, the temperature, every `data` buffer (logits,
/// dlogits) rows·vocab and the row inputs rows long. Returns (rows, vocab) as i32, None when
/// there are no rows (nothing to launch).
#[allow(clippy::too_many_arguments)]
fn gather_bwd_check<E: DevicePtr<f32>>(
    kn: &str,
    data: &[(&str, usize)],
    targets: &impl DevicePtr<u32>,
    dlogp: &impl DevicePtr<f32>,
    dentropy: Option<&E>,
    lse: &impl DevicePtr<f32>,
    mean_s: &impl DevicePtr<f32>,
    rows: usize,
    vocab: usize,
    temperature: f32,
) -> Result<Option<(i32, i32)>> {
    if vocab == 0 {
        return Err(Error::invalid(format!("{kn}: vocab must be > 0")));
    }
    temperature_ok(kn, temperature)?;
    for &(name, len) in data {
        check_len(name, kn, len, rows * vocab, "rows*vocab")?;
    }
    check_len("targets", kn, targets.len(), rows, "rows")?;
    check_len("dlogp", kn, dlogp.len(), rows, "rows")?;
    if let Some(d) = dentropy {
        check_len("dentropy", kn, d.len(), rows, "rows")?;
    }
    check_len("lse", kn, lse.len(), rows, "rows")?;
    check_len("mean_s", kn, mean_s.len(), rows, "rows")?;
    let (r_i, v_i) = (as_i32(kn, "rows", rows)?, as_i32(kn, "vocab", vocab)?);
    Ok((rows > 0).then_some((r_i, v_i)))
}

/// Threads for one-row-per-block kernels: the row in whole warps, 32..=512.
pub(super) fn row_block(dim: usize) -> u32 {
    dim.next_multiple_of(32).clamp(32, 512) as u32
}

pub(super) fn ew_grid(n: usize) -> u32 {
    n.div_ceil(EW_THREADS as usize).clamp(1, EW_MAX_BLOCKS) as u32
}

/// Grid of a vectorised grid-stride kernel over n elements: one thread per EW_VEC elements.
pub(super) fn ew_vec_grid(n: usize) -> u32 {
    ew_grid(n.div_ceil(EW_VEC))
}

/// Threads of rmsnorm_bwd_bf16: one per 8 columns (its vector path) when dim % 8 == 0 and that
/// is at most RMS_BWD_VEC_MAX_THREADS, else row_block(dim) (its strided scalar path).
pub fn rmsnorm_bwd_block(dim: usize) -> u32 {
    let vecs = dim / 8;
    if dim.is_multiple_of(8) && vecs <= RMS_BWD_VEC_MAX_THREADS {
        vecs.next_multiple_of(32).max(32) as u32
    } else {
        row_block(dim)
    }
}

pub(super) fn cfg(grid: (u32, u32, u32), block: u32, smem: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: (block, 1, 1),
        shared_mem_bytes: smem,
    }
}

/// Grid of the LoRA tile kernel for C [p, q] with `splits` k-splits.
fn tile_grid(kn: &str, p: usize, q: usize, splits: usize) -> Result<(u32, u32, u32)> {
    let py = p.div_ceil(LT_TILE);
    if py > 65_535 {
        return Err(Error::invalid(format!(
            "{kn}: {p} rows need {py} row tiles, more than the grid's 65535"
        )));
    }
    Ok((q.div_ceil(LT_TILE) as u32, py as u32, splits as u32))
}

fn temperature_ok(kn: &str, temperature: f32) -> Result<()> {
    if !(temperature > 0.0 && temperature.is_finite()) {
        return Err(Error::invalid(format!(
            "{kn}: temperature must be finite and > 0, got {temperature}"
        )));
    }
    Ok(())
}

/// cudarc cannot allocate or copy empty buffers: at least one element.
/// The index [`CudaDevice::embedding_grad_bf16_to_f32`] reads, from the token of every row:
/// (the distinct tokens ascending (U), row_off (U+1), the rows of each token ascending (N)).
/// Errors on a token outside the vocabulary.
pub fn embedding_grad_index(ids: &[u32], vocab: usize) -> Result<(Vec<u32>, Vec<i32>, Vec<i32>)> {
    if let Some(&t) = ids.iter().find(|&&t| t as usize >= vocab) {
        return Err(Error::invalid(format!(
            "token id {t} is outside the vocabulary of {vocab} tokens"
        )));
    }
    if ids.len() > i32::MAX as usize {
        return Err(Error::invalid(format!(
            "{} rows exceed i32 row indices",
            ids.len()
        )));
    }
    let mut order: Vec<i32> = (0..ids.len() as i32).collect();
    order.sort_by_key(|&r| ids[r as usize]); // stable: rows ascending within a token
    let (mut tokens, mut row_off) = (Vec::new(), vec![0i32]);
    for (i, &r) in order.iter().enumerate() {
        let t = ids[r as usize];
        if tokens.last() != Some(&t) {
            if i > 0 {
                row_off.push(i as i32);
            }
            tokens.push(t);
        }
    }
    if !ids.is_empty() {
        row_off.push(ids.len() as i32);
    }
    Ok((tokens, row_off, order))
}

pub(super) fn nonempty<T: Clone + Default>(v: &[T]) -> Vec<T> {
    if v.is_empty() {
        vec![T::default()]
    } else {
        v.to_vec()
    }
}

impl CudaDevice {
    fn tk(&self) -> &TrainKernels {
        &self.train
    }

    // ---------------------------------------------------------------------------------------
    // Second passes of the deterministic reductions

    /// out\[f\] = Σ_b partials[b·fields + f] (f64, fixed order, one block). out: `fields` f64.
    pub fn sum_partials_f64(
        &self,
        partials: &impl DevicePtr<f64>,
        out: &mut impl DevicePtrMut<f64>,
        num_partials: usize,
        fields: usize,
    ) -> Result<()> {
        let kn = "sum_partials_f64";
        check_min_len(
            "partials",
            kn,
            partials.len(),
            num_partials * fields,
            "num_partials*fields",
        )?;
        check_len("out", kn, out.len(), fields, "fields")?;
        let (np, nf) = (
            as_i32(kn, "num_partials", num_partials)?,
            as_i32(kn, "fields", fields)?,
        );
        let s = self.stream();
        let (o, _o) = out.device_ptr_mut(s);
        let (p, _p) = partials.device_ptr(s);
        let mut l = s.launch_builder(&self.tk().sum_partials_f64);
        l.arg(&o).arg(&p).arg(&np).arg(&nf);
        // SAFETY: (double* out, const double* partials, int num_partials, int fields); lengths
        // checked above; one block of whole warps.
        unsafe { l.launch(cfg((1, 1, 1), RED_THREADS, 0)) }.map_err(cuda_err(kn))?;
        Ok(())
    }

    /// out\[i\] += scale · Σ_{z < splits} partials[z·len + i], i < len = out.len().
    pub fn sum_partials_add_f32(
        &self,
        partials: &impl DevicePtr<f32>,
        out: &mut impl DevicePtrMut<f32>,
        splits: usize,
        scale: f32,
    ) -> Result<()> {
        let kn = "sum_partials_add_f32";
        let len = out.len();
        check_min_len("partials", kn, partials.len(), splits * len, "splits*len")?;
        let sp = as_i32(kn, "splits", splits)?;
        if len == 0 {
            return Ok(());
        }
        let len64 = len as u64;
        let s = self.stream();
        let (o, _o) = out.device_ptr_mut(s);
        let (p, _p) = partials.device_ptr(s);
        let mut l = s.launch_builder(&self.tk().sum_partials_add_f32);
        l.arg(&o).arg(&p).arg(&sp).arg(&len64).arg(&scale);
        // SAFETY: (float* out, const float* partials, int splits, size_t len, float scale);
        // partials holds splits·len elements (checked).
        unsafe { l.launch(cfg((ew_grid(len), 1, 1), EW_THREADS, 0)) }.map_err(cuda_err(kn))?;
        Ok(())
    }

    // ---------------------------------------------------------------------------------------
    // Log-softmax gather

    /// Forward over a chunk of f32 logits (rows, vocab): logp, entropy, and the saved lse,
    /// mean_s (each rows f32) that [`Self::logprob_gather_bwd_f32`] needs. targets (rows) u32.
    #[allow(clippy::too_many_arguments)]
    pub fn logprob_gather_fwd_f32(
        &self,
        logits: &impl DevicePtr<f32>,
        targets: &impl DevicePtr<u32>,
        logp: &mut impl DevicePtrMut<f32>,
        entropy: &mut impl DevicePtrMut<f32>,
        lse: &mut impl DevicePtrMut<f32>,
        mean_s: &mut impl DevicePtrMut<f32>,
        rows: usize,
        vocab: usize,
        temperature: f32,
    ) -> Result<()> {
        let f = &self.tk().logprob_gather_fwd_f32;
        self.launch_gather_fwd(
            f,
            "logprob_gather_fwd_f32",
            logits,
            targets,
            logp,
            entropy,
            lse,
            mean_s,
            rows,
            vocab,
            temperature,
        )
    }

    /// As [`Self::logprob_gather_fwd_f32`] with bf16 logits.
    #[allow(clippy::too_many_arguments)]
    pub fn logprob_gather_fwd_bf16(
        &self,
        logits: &impl DevicePtr<bf16>,
        targets: &impl DevicePtr<u32>,
        logp: &mut impl DevicePtrMut<f32>,
        entropy: &mut impl DevicePtrMut<f32>,
        lse: &mut impl DevicePtrMut<f32>,
        mean_s: &mut impl DevicePtrMut<f32>,
        rows: usize,
        vocab: usize,
        temperature: f32,
    ) -> Result<()> {
        let f = &self.tk().logprob_gather_fwd_bf16;
        self.launch_gather_fwd(
            f,
            "logprob_gather_fwd_bf16",
            logits,
            targets,
            logp,
            entropy,
            lse,
            mean_s,
            rows,
            vocab,
            temperature,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn launch_gather_fwd<T>(
        &self,
        func: &CudaFunction,
        kn: &str,
        logits: &impl DevicePtr<T>,
        targets: &impl DevicePtr<u32>,
        logp: &mut impl DevicePtrMut<f32>,
        entropy: &mut impl DevicePtrMut<f32>,
        lse: &mut impl DevicePtrMut<f32>,
        mean_s: &mut impl DevicePtrMut<f32>,
        rows: usize,
        vocab: usize,
        temperature: f32,
    ) -> Result<()> {
        if vocab == 0 {
            return Err(Error::invalid(format!("{kn}: vocab must be > 0")));
        }
        temperature_ok(kn, temperature)?;
        check_len("logits", kn, logits.len(), rows * vocab, "rows*vocab")?;
        check_len("targets", kn, targets.len(), rows, "rows")?;
        for (name, len) in [
            ("logp", logp.len()),
            ("entropy", entropy.len()),
            ("lse", lse.len()),
            ("mean_s", mean_s.len()),
        ] {
            check_len(name, kn, len, rows, "rows")?;
        }
        let (r_i, v_i) = (as_i32(kn, "rows", rows)?, as_i32(kn, "vocab", vocab)?);
        if rows == 0 {
            return Ok(());
        }
        let s = self.stream();
        let (lp, _lp) = logp.device_ptr_mut(s);
        let (en, _en) = entropy.device_ptr_mut(s);
        let (ls, _ls) = lse.device_ptr_mut(s);
        let (ms, _ms) = mean_s.device_ptr_mut(s);
        let (xp, _x) = logits.device_ptr(s);
        let (tg, _tg) = targets.device_ptr(s);
        let mut l = s.launch_builder(func);
        l.arg(&lp)
            .arg(&en)
            .arg(&ls)
            .arg(&ms)
            .arg(&xp)
            .arg(&tg)
            .arg(&temperature)
            .arg(&r_i)
            .arg(&v_i);
        // SAFETY: (float* logp, float* entropy, float* lse, float* mean_s, const T* logits,
        // const u32* targets, float temperature, int rows, int vocab); lengths checked; the
        // block is whole warps.
        unsafe { l.launch(cfg((rows as u32, 1, 1), row_block(vocab), 0)) }.map_err(cuda_err(kn))?;
        Ok(())
    }

    /// Backward over a chunk of f32 logits (rows, vocab), IN PLACE: `logits` becomes dlogits =
    /// (dlogp·(onehot − p) − dentropy·p·(s − E\[s\])) / T, from dlogp (rows), dentropy (rows, or
    /// None), and the forward's lse, mean_s (rows). Pass `None::<&CudaSlice<f32>>` for no entropy
    /// gradient.
    #[allow(clippy::too_many_arguments)]
    pub fn logprob_gather_bwd_f32<E: DevicePtr<f32>>(
        &self,
        logits: &mut impl DevicePtrMut<f32>,
        targets: &impl DevicePtr<u32>,
        dlogp: &impl DevicePtr<f32>,
        dentropy: Option<&E>,
        lse: &impl DevicePtr<f32>,
        mean_s: &impl DevicePtr<f32>,
        rows: usize,
        vocab: usize,
        temperature: f32,
    ) -> Result<()> {
        let f = &self.tk().logprob_gather_bwd_f32;
        self.launch_gather_bwd_in_place(
            f,
            "logprob_gather_bwd_f32",
            logits,
            targets,
            dlogp,
            dentropy,
            lse,
            mean_s,
            rows,
            vocab,
            temperature,
        )
    }

    /// As [`Self::logprob_gather_bwd_f32`] on bf16 logits (dlogits rounded to bf16 once).
    #[allow(clippy::too_many_arguments)]
    pub fn logprob_gather_bwd_bf16<E: DevicePtr<f32>>(
        &self,
        logits: &mut impl DevicePtrMut<bf16>,
        targets: &impl DevicePtr<u32>,
        dlogp: &impl DevicePtr<f32>,
        dentropy: Option<&E>,
        lse: &impl DevicePtr<f32>,
        mean_s: &impl DevicePtr<f32>,
        rows: usize,
        vocab: usize,
        temperature: f32,
    ) -> Result<()> {
        let f = &self.tk().logprob_gather_bwd_bf16;
        self.launch_gather_bwd_in_place(
            f,
            "logprob_gather_bwd_bf16",
            logits,
            targets,
            dlogp,
            dentropy,
            lse,
            mean_s,
            rows,
            vocab,
            temperature,
        )
    }

    /// Backward over a chunk of f32 logits (rows, vocab), OUT OF PLACE into bf16: `dlogits`
    /// (rows, vocab) = the dlogits of [`Self::logprob_gather_bwd_f32`] rounded to bf16 once, bit
    /// for bit that kernel followed by a cast to bf16, in one pass (reads 4 bytes and writes 2
    /// per element instead of 4 + 4 + 4 + 2); `logits` is only read.
    #[allow(clippy::too_many_arguments)]
    pub fn logprob_gather_bwd_f32_to_bf16<E: DevicePtr<f32>>(
        &self,
        logits: &impl DevicePtr<f32>,
        dlogits: &mut impl DevicePtrMut<bf16>,
        targets: &impl DevicePtr<u32>,
        dlogp: &impl DevicePtr<f32>,
        dentropy: Option<&E>,
        lse: &impl DevicePtr<f32>,
        mean_s: &impl DevicePtr<f32>,
        rows: usize,
        vocab: usize,
        temperature: f32,
    ) -> Result<()> {
        let kn = "logprob_gather_bwd_f32_to_bf16";
        let data = [("logits", logits.len()), ("dlogits", dlogits.len())];
        let Some((r_i, v_i)) = gather_bwd_check(
            kn,
            &data,
            targets,
            dlogp,
            dentropy,
            lse,
            mean_s,
            rows,
            vocab,
            temperature,
        )?
        else {
            return Ok(());
        };
        let s = self.stream();
        let (xp, _x) = logits.device_ptr(s);
        let (dp, _d) = dlogits.device_ptr_mut(s);
        let f = &self.tk().logprob_gather_bwd_f32_to_bf16;
        // The kernel's head arguments: (const float* logits, bf16* dlogits), two buffers of
        // different element types, which safe code cannot alias (the kernel's __restrict__).
        self.launch_gather_bwd(
            f,
            kn,
            &[xp, dp],
            targets,
            dlogp,
            dentropy,
            lse,
            mean_s,
            r_i,
            v_i,
            temperature,
        )
    }

    /// The in-place backward (T* logits, the kernel's one head argument).
    #[allow(clippy::too_many_arguments)]
    fn launch_gather_bwd_in_place<T, E: DevicePtr<f32>>(
        &self,
        func: &CudaFunction,
        kn: &str,
        logits: &mut impl DevicePtrMut<T>,
        targets: &impl DevicePtr<u32>,
        dlogp: &impl DevicePtr<f32>,
        dentropy: Option<&E>,
        lse: &impl DevicePtr<f32>,
        mean_s: &impl DevicePtr<f32>,
        rows: usize,
        vocab: usize,
        temperature: f32,
    ) -> Result<()> {
        let data = [("logits", logits.len())];
        let Some((r_i, v_i)) = gather_bwd_check(
            kn,
            &data,
            targets,
            dlogp,
            dentropy,
            lse,
            mean_s,
            rows,
            vocab,
            temperature,
        )?
        else {
            return Ok(());
        };
        let (xp, _x) = logits.device_ptr_mut(self.stream());
        self.launch_gather_bwd(
            func,
            kn,
            &[xp],
            targets,
            dlogp,
            dentropy,
            lse,
            mean_s,
            r_i,
            v_i,
            temperature,
        )
    }

    /// Launches a backward gather whose `head` pointers (logits and, out of place, dlogits) the
    /// caller has taken from the stream and still holds, after [`gather_bwd_check`].
    #[allow(clippy::too_many_arguments)]
    fn launch_gather_bwd<E: DevicePtr<f32>>(
        &self,
        func: &CudaFunction,
        kn: &str,
        head: &[u64],
        targets: &impl DevicePtr<u32>,
        dlogp: &impl DevicePtr<f32>,
        dentropy: Option<&E>,
        lse: &impl DevicePtr<f32>,
        mean_s: &impl DevicePtr<f32>,
        r_i: i32,
        v_i: i32,
        temperature: f32,
    ) -> Result<()> {
        let s = self.stream();
        let (tg, _tg) = targets.device_ptr(s);
        let (gl, _gl) = dlogp.device_ptr(s);
        let de = dentropy.map(|d| d.device_ptr(s));
        let de_ptr: u64 = de.as_ref().map_or(0, |(p, _)| *p);
        let (ls, _ls) = lse.device_ptr(s);
        let (ms, _ms) = mean_s.device_ptr(s);
        let mut l = s.launch_builder(func);
        for p in head {
            l.arg(p);
        }
        l.arg(&tg)
            .arg(&gl)
            .arg(&de_ptr)
            .arg(&ls)
            .arg(&ms)
            .arg(&temperature)
            .arg(&r_i)
            .arg(&v_i);
        // SAFETY: (head: T* logits | const float* logits, bf16* dlogits; const u32* targets,
        // const float* dlogp, const float* dentropy or NULL, const float* lse, const float*
        // mean_s, float temperature, int rows, int vocab); every length checked by
        // gather_bwd_check, the head's guards held by the caller and the dentropy guard until the
        // end of this function.
        unsafe { l.launch(cfg((r_i as u32, 1, 1), row_block(v_i as usize), 0)) }.map_err(cuda_err(kn))?;
        Ok(())
    }

    /// Test convenience: forward on host f32 logits (rows, vocab), rounded to bf16 first when
    /// `use_bf16`. Returns (logp, entropy, lse, mean_s).
    pub fn logprob_gather_fwd_host(
        &self,
        logits: &[f32],
        targets: &[u32],
        vocab: usize,
        temperature: f32,
        use_bf16: bool,
    ) -> Result<[Vec<f32>; 4]> {
        let rows = targets.len();
        if rows == 0 {
            return Ok(Default::default());
        }
        let t = self.upload(targets)?;
        let mut outs: [CudaSlice<f32>; 4] = [
            self.alloc_zeros(rows)?,
            self.alloc_zeros(rows)?,
            self.alloc_zeros(rows)?,
            self.alloc_zeros(rows)?,
        ];
        let [a, b, c, d] = &mut outs;
        if use_bf16 {
            let x = self.upload_bf16(logits)?;
            self.logprob_gather_fwd_bf16(&x, &t, a, b, c, d, rows, vocab, temperature)?;
        } else {
            let x = self.upload(logits)?;
            self.logprob_gather_fwd_f32(&x, &t, a, b, c, d, rows, vocab, temperature)?;
        }
        Ok([
            self.download(a)?,
            self.download(b)?,
            self.download(c)?,
            self.download(d)?,
        ])
    }

    /// The device inputs of the backward test conveniences: targets, dlogp, dentropy uploaded,
    /// and the forward's four per-row outputs (logp, entropy, lse, mean_s) allocated.
    fn gather_bwd_host_inputs(
        &self,
        targets: &[u32],
        dlogp: &[f32],
        dentropy: Option<&[f32]>,
    ) -> Result<GatherBwdHostInputs> {
        let rows = targets.len();
        Ok(GatherBwdHostInputs {
            targets: self.upload(targets)?,
            dlogp: self.upload(dlogp)?,
            dentropy: dentropy.map(|d| self.upload(d)).transpose()?,
            stats: [
                self.alloc_zeros(rows)?,
                self.alloc_zeros(rows)?,
                self.alloc_zeros(rows)?,
                self.alloc_zeros(rows)?,
            ],
        })
    }

    /// Test convenience: forward then in-place backward on the device, from host logits (rows,
    /// vocab) (bf16 storage when `use_bf16`); returns dlogits (rows, vocab) as f32.
    #[allow(clippy::too_many_arguments)]
    pub fn logprob_gather_bwd_host(
        &self,
        logits: &[f32],
        targets: &[u32],
        dlogp: &[f32],
        dentropy: Option<&[f32]>,
        vocab: usize,
        temperature: f32,
        use_bf16: bool,
    ) -> Result<Vec<f32>> {
        let rows = targets.len();
        if rows == 0 {
            return Ok(Vec::new());
        }
        let mut inp = self.gather_bwd_host_inputs(targets, dlogp, dentropy)?;
        let (t, gl, ge) = (&inp.targets, &inp.dlogp, inp.dentropy.as_ref());
        let [a, b, lse, ms] = &mut inp.stats;
        if use_bf16 {
            let mut x = self.upload_bf16(logits)?;
            self.logprob_gather_fwd_bf16(&x, t, a, b, lse, ms, rows, vocab, temperature)?;
            self.logprob_gather_bwd_bf16(&mut x, t, gl, ge, lse, ms, rows, vocab, temperature)?;
            self.download_bf16(&x)
        } else {
            let mut x = self.upload(logits)?;
            self.logprob_gather_fwd_f32(&x, t, a, b, lse, ms, rows, vocab, temperature)?;
            self.logprob_gather_bwd_f32(&mut x, t, gl, ge, lse, ms, rows, vocab, temperature)?;
            self.download(&x)
        }
    }

    /// Test convenience: forward then the out-of-place f32 → bf16 backward on the device, from
    /// host f32 logits (rows, vocab); returns the bf16 dlogits (rows, vocab) as f32 (exact).
    pub fn logprob_gather_bwd_f32_to_bf16_host(
        &self,
        logits: &[f32],
        targets: &[u32],
        dlogp: &[f32],
        dentropy: Option<&[f32]>,
        vocab: usize,
        temperature: f32,
    ) -> Result<Vec<f32>> {
        let rows = targets.len();
        if rows == 0 {
            return Ok(Vec::new());
        }
        let mut inp = self.gather_bwd_host_inputs(targets, dlogp, dentropy)?;
        let (t, gl, ge) = (&inp.targets, &inp.dlogp, inp.dentropy.as_ref());
        let [a, b, lse, ms] = &mut inp.stats;
        let x = self.upload(logits)?;
        let mut dx = self.alloc_zeros::<bf16>(logits.len())?;
        self.logprob_gather_fwd_f32(&x, t, a, b, lse, ms, rows, vocab, temperature)?;
        self.logprob_gather_bwd_f32_to_bf16(&x, &mut dx, t, gl, ge, lse, ms, rows, vocab, temperature)?;
        self.download_bf16(&dx)
    }

    // ---------------------------------------------------------------------------------------
    // GRPO loss

    /// GRPO loss forward + backward over `n_tokens` packed tokens of `n_seqs` sequences:
    /// grad_logp (n) = dL/dlogp, token_loss (n, optional) = w_i·per-token loss, and `totals`
    /// ([`GRPO_FIELDS`] f64: see [`GrpoLossTotals`]) via block partials (`partials`, at least
    /// [`grpo_loss_partials_len`]) and a fixed-order second pass. token_seq (n) i32 maps each
    /// token to its sequence (values must be < n_seqs: the kernel cannot check device data);
    /// advantages (n_seqs) f32; seq_weight (n_seqs) f64 = `loss::sequence_weights`.
    /// old_logp None: ratio ≡ 1; ref_logp None: no KL (then `beta` must be 0).
    #[allow(clippy::too_many_arguments)]
    pub fn grpo_loss_fwd_bwd_f32<O: DevicePtr<f32>, R: DevicePtr<f32>, L: DevicePtrMut<f32>>(
        &self,
        logp: &impl DevicePtr<f32>,
        old_logp: Option<&O>,
        ref_logp: Option<&R>,
        token_seq: &impl DevicePtr<i32>,
        advantages: &impl DevicePtr<f32>,
        seq_weight: &impl DevicePtr<f64>,
        grad_logp: &mut impl DevicePtrMut<f32>,
        token_loss: Option<&mut L>,
        partials: &mut (impl DevicePtr<f64> + DevicePtrMut<f64>),
        totals: &mut impl DevicePtrMut<f64>,
        n_tokens: usize,
        n_seqs: usize,
        scalars: GrpoLossScalars,
    ) -> Result<()> {
        let kn = "grpo_loss_fwd_bwd_f32";
        check_len("logp", kn, logp.len(), n_tokens, "n_tokens")?;
        if let Some(o) = old_logp {
            check_len("old_logp", kn, o.len(), n_tokens, "n_tokens")?;
        }
        match ref_logp {
            Some(r) => check_len("ref_logp", kn, r.len(), n_tokens, "n_tokens")?,
            None if scalars.beta != 0.0 => {
                return Err(Error::invalid(format!(
                    "{kn}: beta = {} needs reference log-probs",
                    scalars.beta
                )))
            }
            None => {}
        }
        check_len("token_seq", kn, token_seq.len(), n_tokens, "n_tokens")?;
        check_len("advantages", kn, advantages.len(), n_seqs, "n_seqs")?;
        check_len("seq_weight", kn, seq_weight.len(), n_seqs, "n_seqs")?;
        check_len("grad_logp", kn, grad_logp.len(), n_tokens, "n_tokens")?;
        if let Some(t) = token_loss.as_ref() {
            check_len("token_loss", kn, t.len(), n_tokens, "n_tokens")?;
        }
        let blocks = grpo_loss_blocks(n_tokens);
        check_min_len(
            "partials",
            kn,
            partials.len(),
            blocks * GRPO_FIELDS,
            "grpo_loss_partials_len",
        )?;
        check_len("totals", kn, totals.len(), GRPO_FIELDS, "GRPO_FIELDS")?;
        let n_i = as_i32(kn, "n_tokens", n_tokens)?;
        let kl_k1: i32 = match scalars.kl_estimator {
            KlEstimator::K3 => 0,
            KlEstimator::K1 => 1,
        };
        {
            let s = self.stream();
            let tl = token_loss.map(|t| t.device_ptr_mut(s));
            let tl_ptr: u64 = tl.as_ref().map_or(0, |(p, _)| *p);
            let (gp, _gp) = grad_logp.device_ptr_mut(s);
            let (pp, _pp) = partials.device_ptr_mut(s);
            let (lp, _lp) = logp.device_ptr(s);
            let old = old_logp.map(|o| o.device_ptr(s));
            let old_ptr: u64 = old.as_ref().map_or(0, |(p, _)| *p);
            let rf = ref_logp.map(|r| r.device_ptr(s));
            let ref_ptr: u64 = rf.as_ref().map_or(0, |(p, _)| *p);
            let (ts, _ts) = token_seq.device_ptr(s);
            let (ad, _ad) = advantages.device_ptr(s);
            let (sw, _sw) = seq_weight.device_ptr(s);
            let mut l = s.launch_builder(&self.tk().grpo_loss_fwd_bwd_f32);
            l.arg(&tl_ptr)
                .arg(&gp)
                .arg(&pp)
                .arg(&lp)
                .arg(&old_ptr)
                .arg(&ref_ptr)
                .arg(&ts)
                .arg(&ad)
                .arg(&sw)
                .arg(&scalars.lo)
                .arg(&scalars.hi)
                .arg(&scalars.beta)
                .arg(&kl_k1)
                .arg(&n_i);
            // SAFETY: (float* token_loss or NULL, float* grad_logp, double* partials, const float*
            // logp, const float* old_logp or NULL, const float* ref_logp or NULL, const int*
            // token_seq, const float* advantages, const double* seq_weight, float lo, float hi,
            // float beta, int kl_k1, int n); lengths checked; partials hold blocks·5 doubles;
            // block = 256 (whole warps) as tr_block_sum_f64 needs.
            unsafe { l.launch(cfg((blocks as u32, 1, 1), RED_THREADS, 0)) }.map_err(cuda_err(kn))?;
        }
        self.sum_partials_f64(partials, totals, blocks, GRPO_FIELDS)
    }

    /// Test convenience mirroring `loss::grpo_loss` (f32): uploads, runs the kernel, and returns
    /// the CPU's output type (loss rounded from the f64 sum) plus the per-token w·loss.
    pub fn grpo_loss_f32_host(
        &self,
        cfg: &GrpoLossConfig,
        inp: &GrpoInputs<'_, f32>,
    ) -> Result<(GrpoLossOutput<f32>, Vec<f32>)> {
        cfg.validate()?;
        let n: usize = inp.lengths.iter().sum();
        if inp.logp.len() != n || inp.advantages.len() != inp.lengths.len() {
            return Err(Error::invalid(format!(
                "grpo loss: {} log-probs and {} advantages for lengths summing to {n} over {} sequences",
                inp.logp.len(),
                inp.advantages.len(),
                inp.lengths.len()
            )));
        }
        let has_ref = inp.ref_logp.is_some();
        if n == 0 {
            return Ok((
                GrpoLossOutput {
                    loss: 0.0,
                    grad_logp: Vec::new(),
                    metrics: GrpoLossTotals::default().metrics(0, has_ref),
                },
                Vec::new(),
            ));
        }
        let weights = sequence_weights(inp.lengths, cfg.loss_type, cfg.max_completion_length);
        let token_seq: Vec<i32> = inp
            .lengths
            .iter()
            .enumerate()
            .flat_map(|(i, &len)| std::iter::repeat_n(i as i32, len))
            .collect();
        let logp = self.upload(inp.logp)?;
        let old = match inp.old_logp {
            OldLogp::Current => None,
            OldLogp::Given(o) => Some(self.upload(o)?),
        };
        let rf = inp.ref_logp.map(|r| self.upload(r)).transpose()?;
        let ts = self.upload(&token_seq)?;
        let adv = self.upload(&nonempty(inp.advantages))?;
        let sw = self.upload(&nonempty(&weights))?;
        let mut grad = self.alloc_zeros::<f32>(n)?;
        let mut tl = self.alloc_zeros::<f32>(n)?;
        let mut partials = self.alloc_zeros::<f64>(grpo_loss_partials_len(n))?;
        let mut totals = self.alloc_zeros::<f64>(GRPO_FIELDS)?;
        let n_seqs = inp.lengths.len();
        // n > 0 implies n_seqs > 0, so the uploads above are exact (nonempty only guards).
        self.grpo_loss_fwd_bwd_f32(
            &logp,
            old.as_ref(),
            rf.as_ref(),
            &ts,
            &adv,
            &sw,
            &mut grad,
            Some(&mut tl),
            &mut partials,
            &mut totals,
            n,
            n_seqs,
            GrpoLossScalars::from_config(cfg),
        )?;
        let totals = GrpoLossTotals::from_sums(&self.download(&totals)?)?;
        Ok((
            GrpoLossOutput {
                loss: totals.loss as f32,
                grad_logp: self.download(&grad)?,
                metrics: totals.metrics(n, has_ref),
            },
            self.download(&tl)?,
        ))
    }

    // ---------------------------------------------------------------------------------------
    // LoRA backward

    /// u (n, r) f32 = x (n, in) bf16 · A (r, in)ᵀ f32 (the LoRA down-projection, recomputed).
    pub fn lora_bwd_xa_bf16(
        &self,
        x: &impl DevicePtr<bf16>,
        a: &impl DevicePtr<f32>,
        u: &mut impl DevicePtrMut<f32>,
        n: usize,
        d_in: usize,
        rank: usize,
    ) -> Result<()> {
        let kn = "lora_bwd_xa_bf16";
        check_len("x", kn, x.len(), n * d_in, "n*in")?;
        check_len("a", kn, a.len(), rank * d_in, "r*in")?;
        check_len("u", kn, u.len(), n * rank, "n*r")?;
        let (n_i, in_i, r_i) = (
            as_i32(kn, "n", n)?,
            as_i32(kn, "in", d_in)?,
            as_i32(kn, "r", rank)?,
        );
        if n * rank == 0 {
            return Ok(());
        }
        let grid = tile_grid(kn, n, rank, 1)?;
        let s = self.stream();
        let (up, _u) = u.device_ptr_mut(s);
        let (xp, _x) = x.device_ptr(s);
        let (ap, _a) = a.device_ptr(s);
        let mut l = s.launch_builder(&self.tk().lora_bwd_xa_bf16);
        l.arg(&up).arg(&xp).arg(&ap).arg(&n_i).arg(&in_i).arg(&r_i);
        // SAFETY: (float* u, const bf16* x, const float* a, int n, int in, int rank); lengths
        // checked; grid covers (r, n) in 32×32 tiles with one k-split.
        unsafe { l.launch(cfg(grid, LT_THREADS, 0)) }.map_err(cuda_err(kn))?;
        Ok(())
    }

    /// dyb (n, r) f32 = dy (n, out) bf16 · B (out, r) f32.
    pub fn lora_bwd_dyb_bf16(
        &self,
        dy: &impl DevicePtr<bf16>,
        b: &impl DevicePtr<f32>,
        dyb: &mut impl DevicePtrMut<f32>,
        n: usize,
        d_out: usize,
        rank: usize,
    ) -> Result<()> {
        let kn = "lora_bwd_dyb_bf16";
        check_len("dy", kn, dy.len(), n * d_out, "n*out")?;
        check_len("b", kn, b.len(), d_out * rank, "out*r")?;
        check_len("dyb", kn, dyb.len(), n * rank, "n*r")?;
        let (n_i, out_i, r_i) = (
            as_i32(kn, "n", n)?,
            as_i32(kn, "out", d_out)?,
            as_i32(kn, "r", rank)?,
        );
        if n * rank == 0 {
            return Ok(());
        }
        let grid = tile_grid(kn, n, rank, 1)?;
        let s = self.stream();
        let (op, _o) = dyb.device_ptr_mut(s);
        let (dp, _d) = dy.device_ptr(s);
        let (bp, _b) = b.device_ptr(s);
        let mut l = s.launch_builder(&self.tk().lora_bwd_dyb_bf16);
        l.arg(&op).arg(&dp).arg(&bp).arg(&n_i).arg(&out_i).arg(&r_i);
        // SAFETY: (float* dyb, const bf16* dy, const float* b, int n, int out, int rank);
        // lengths checked; one k-split.
        unsafe { l.launch(cfg(grid, LT_THREADS, 0)) }.map_err(cuda_err(kn))?;
        Ok(())
    }

    /// dB (out, r) f32 += scale · dy (n, out)ᵀ bf16 · u (n, r) f32. `scratch` needs at least
    /// [`lora_grad_scratch_len`]`(n, out, r)` f32 (any non-empty buffer when that is 0).
    #[allow(clippy::too_many_arguments)]
    pub fn lora_grad_b_bf16(
        &self,
        dy: &impl DevicePtr<bf16>,
        u: &impl DevicePtr<f32>,
        db: &mut impl DevicePtrMut<f32>,
        scratch: &mut (impl DevicePtr<f32> + DevicePtrMut<f32>),
        scale: f32,
        n: usize,
        d_out: usize,
        rank: usize,
    ) -> Result<()> {
        let kn = "lora_grad_b_bf16";
        check_len("dy", kn, dy.len(), n * d_out, "n*out")?;
        check_len("u", kn, u.len(), n * rank, "n*r")?;
        check_len("db", kn, db.len(), d_out * rank, "out*r")?;
        let func = &self.tk().lora_grad_b_bf16;
        self.lora_grad(
            func,
            kn,
            dy,
            u,
            db,
            scratch,
            scale,
            n,
            (d_out, rank),
            ("out", d_out),
            rank,
        )
    }

    /// dA (r, in) f32 += scale · dyb (n, r)ᵀ f32 · x (n, in) bf16. `scratch` needs at least
    /// [`lora_grad_scratch_len`]`(n, r, in)` f32 (any non-empty buffer when that is 0).
    #[allow(clippy::too_many_arguments)]
    pub fn lora_grad_a_bf16(
        &self,
        dyb: &impl DevicePtr<f32>,
        x: &impl DevicePtr<bf16>,
        da: &mut impl DevicePtrMut<f32>,
        scratch: &mut (impl DevicePtr<f32> + DevicePtrMut<f32>),
        scale: f32,
        n: usize,
        d_in: usize,
        rank: usize,
    ) -> Result<()> {
        let kn = "lora_grad_a_bf16";
        check_len("dyb", kn, dyb.len(), n * rank, "n*r")?;
        check_len("x", kn, x.len(), n * d_in, "n*in")?;
        check_len("da", kn, da.len(), rank * d_in, "r*in")?;
        let func = &self.tk().lora_grad_a_bf16;
        self.lora_grad(
            func,
            kn,
            dyb,
            x,
            da,
            scratch,
            scale,
            n,
            (rank, d_in),
            ("in", d_in),
            rank,
        )
    }

    /// The shared launch of the LoRA gradient tile kernels: out (p, q) f32 += scale · lhsᵀ rhs
    /// summed over n rows in `lora_grad_splits(n, p, q)` k-splits (then the partials in split
    /// order), `dim` the kernel's projection-side dimension (out for dB, in for dA). The callers
    /// checked the lengths of lhs, rhs and out.
    #[allow(clippy::too_many_arguments)]
    fn lora_grad<L, R>(
        &self,
        func: &CudaFunction,
        kn: &str,
        lhs: &impl DevicePtr<L>,
        rhs: &impl DevicePtr<R>,
        out: &mut impl DevicePtrMut<f32>,
        scratch: &mut (impl DevicePtr<f32> + DevicePtrMut<f32>),
        scale: f32,
        n: usize,
        (p, q): (usize, usize),
        (dim_name, dim): (&str, usize),
        rank: usize,
    ) -> Result<()> {
        let splits = lora_grad_splits(n, p, q);
        check_min_len(
            "scratch",
            kn,
            scratch.len(),
            lora_grad_scratch_len(n, p, q),
            "lora_grad_scratch_len",
        )?;
        let (n_i, dim_i, r_i) = (
            as_i32(kn, "n", n)?,
            as_i32(kn, dim_name, dim)?,
            as_i32(kn, "r", rank)?,
        );
        if n * dim * rank == 0 {
            return Ok(());
        }
        let grid = tile_grid(kn, p, q, splits)?;
        {
            let s = self.stream();
            let (op, _o) = out.device_ptr_mut(s);
            let (sp, _s) = scratch.device_ptr_mut(s);
            let (lp, _l) = lhs.device_ptr(s);
            let (rp, _r) = rhs.device_ptr(s);
            let mut l = s.launch_builder(func);
            l.arg(&op)
                .arg(&sp)
                .arg(&lp)
                .arg(&rp)
                .arg(&scale)
                .arg(&n_i)
                .arg(&dim_i)
                .arg(&r_i);
            // SAFETY: lora_grad_b_bf16(float* db, float* partials, const bf16* dy, const float* u,
            // float scale, int n, int out, int rank) with (p, q) = (out, r), and
            // lora_grad_a_bf16(float* da, float* partials, const float* dyb, const bf16* x,
            // float scale, int n, int in, int rank) with (p, q) = (r, in); lengths checked by the
            // callers, scratch here (splits·p·q when split); grid covers (p, q) in 32×32 tiles
            // and `splits` k-splits.
            unsafe { l.launch(cfg(grid, LT_THREADS, 0)) }.map_err(cuda_err(kn))?;
        }
        if splits > 1 {
            self.sum_partials_add_f32(scratch, out, splits, scale)?;
        }
        Ok(())
    }

    /// dx (n, in) bf16 += scale · dyb (n, r) f32 · A (r, in) f32.
    #[allow(clippy::too_many_arguments)]
    pub fn lora_bwd_dx_bf16(
        &self,
        dyb: &impl DevicePtr<f32>,
        a: &impl DevicePtr<f32>,
        dx: &mut impl DevicePtrMut<bf16>,
        scale: f32,
        n: usize,
        d_in: usize,
        rank: usize,
    ) -> Result<()> {
        let kn = "lora_bwd_dx_bf16";
        check_len("dyb", kn, dyb.len(), n * rank, "n*r")?;
        check_len("a", kn, a.len(), rank * d_in, "r*in")?;
        check_len("dx", kn, dx.len(), n * d_in, "n*in")?;
        let (n_i, in_i, r_i) = (
            as_i32(kn, "n", n)?,
            as_i32(kn, "in", d_in)?,
            as_i32(kn, "r", rank)?,
        );
        if n * d_in * rank == 0 {
            return Ok(());
        }
        let grid = tile_grid(kn, n, d_in, 1)?;
        let s = self.stream();
        let (op, _o) = dx.device_ptr_mut(s);
        let (dp, _d) = dyb.device_ptr(s);
        let (ap, _a) = a.device_ptr(s);
        let mut l = s.launch_builder(&self.tk().lora_bwd_dx_bf16);
        l.arg(&op)
            .arg(&dp)
            .arg(&ap)
            .arg(&scale)
            .arg(&n_i)
            .arg(&in_i)
            .arg(&r_i);
        // SAFETY: (bf16* dx, const float* dyb, const float* a, float scale, int n, int in,
        // int rank); lengths checked; one k-split (accumulates into dx).
        unsafe { l.launch(cfg(grid, LT_THREADS, 0)) }.map_err(cuda_err(kn))?;
        Ok(())
    }

    /// Test convenience: the whole LoRA backward of one projection on host data, in the order the
    /// engine would run it (u, dyb, dB, dA, dx). x (n, in) and dy (n, out) are rounded to bf16,
    /// as is dx_in (n, in) (the incoming dx the LoRA term is added to); da_in (r, in) and db_in
    /// (out, r) are the gradients accumulated into. Returns (u, dyb, dx, da, db), dx as f32.
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    pub fn lora_bwd_bf16_host(
        &self,
        x: &[f32],
        dy: &[f32],
        a: &[f32],
        b: &[f32],
        dx_in: &[f32],
        da_in: &[f32],
        db_in: &[f32],
        scale: f32,
        n: usize,
        d_in: usize,
        d_out: usize,
        rank: usize,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>)> {
        let xd = self.upload_bf16(x)?;
        let dyd = self.upload_bf16(dy)?;
        let ad = self.upload(a)?;
        let bd = self.upload(b)?;
        let mut dx = self.upload_bf16(dx_in)?;
        let mut da = self.upload(da_in)?;
        let mut db = self.upload(db_in)?;
        let mut u = self.alloc_zeros::<f32>(n * rank)?;
        let mut dyb = self.alloc_zeros::<f32>(n * rank)?;
        let scratch_len = lora_grad_scratch_len(n, d_out, rank)
            .max(lora_grad_scratch_len(n, rank, d_in))
            .max(1);
        let mut scratch = self.alloc_zeros::<f32>(scratch_len)?;
        self.lora_bwd_xa_bf16(&xd, &ad, &mut u, n, d_in, rank)?;
        self.lora_bwd_dyb_bf16(&dyd, &bd, &mut dyb, n, d_out, rank)?;
        self.lora_grad_b_bf16(&dyd, &u, &mut db, &mut scratch, scale, n, d_out, rank)?;
        self.lora_grad_a_bf16(&dyb, &xd, &mut da, &mut scratch, scale, n, d_in, rank)?;
        self.lora_bwd_dx_bf16(&dyb, &ad, &mut dx, scale, n, d_in, rank)?;
        Ok((
            self.download(&u)?,
            self.download(&dyb)?,
            self.download_bf16(&dx)?,
            self.download(&da)?,
            self.download(&db)?,
        ))
    }

    // ---------------------------------------------------------------------------------------
    // RMSNorm, SwiGLU, RoPE backward

    /// RMSNorm backward: dx (rows, dim) bf16 from x, dy (rows, dim) bf16 and weight (dim) bf16.
    /// With `dweight = Some((partials, dweight))`, also dweight (dim) f32 += Σ_rows dy·x·r, via
    /// per-block partials (at least [`rmsnorm_bwd_partials_len`] f32) and a fixed-order sum.
    /// `accumulate`: dx = bf16(dx + bf16(result)) instead (bit for bit a store into a
    /// temporary then [`Self::residual_add_bf16`]; dx must then alias neither x nor dy).
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_bwd_bf16<P: DevicePtr<f32> + DevicePtrMut<f32>, W: DevicePtrMut<f32>>(
        &self,
        x: &impl DevicePtr<bf16>,
        weight: &impl DevicePtr<bf16>,
        dy: &impl DevicePtr<bf16>,
        dx: &mut impl DevicePtrMut<bf16>,
        dweight: Option<(&mut P, &mut W)>,
        rows: usize,
        dim: usize,
        eps: f32,
        accumulate: bool,
    ) -> Result<()> {
        let kn = "rmsnorm_bwd_bf16";
        if dim == 0 {
            return Err(Error::invalid(format!("{kn}: dim must be > 0")));
        }
        check_len("x", kn, x.len(), rows * dim, "rows*dim")?;
        check_len("dy", kn, dy.len(), rows * dim, "rows*dim")?;
        check_len("dx", kn, dx.len(), rows * dim, "rows*dim")?;
        check_len("weight", kn, weight.len(), dim, "dim")?;
        let blocks = rmsnorm_bwd_blocks(rows);
        let mut smem = 0usize;
        if let Some((p, w)) = dweight.as_ref() {
            check_min_len(
                "dweight partials",
                kn,
                p.len(),
                blocks * dim,
                "rmsnorm_bwd_partials_len",
            )?;
            check_len("dweight", kn, w.len(), dim, "dim")?;
            smem = dim * 4;
            if smem + RMS_BWD_STATIC_SMEM_BYTES > SMEM_DEFAULT_BYTES {
                return Err(Error::invalid(format!(
                    "{kn}: dweight for dim {dim} needs {smem} bytes of dynamic shared memory, more than \
                     the {} left of {SMEM_DEFAULT_BYTES} next to the kernel's static {RMS_BWD_STATIC_SMEM_BYTES}",
                    SMEM_DEFAULT_BYTES - RMS_BWD_STATIC_SMEM_BYTES
                )));
            }
        }
        let (rows_i, dim_i) = (as_i32(kn, "rows", rows)?, as_i32(kn, "dim", dim)?);
        let acc_i = accumulate as i32;
        if rows == 0 {
            return Ok(());
        }
        let (partials, dweight) = match dweight {
            Some((p, w)) => (Some(p), Some(w)),
            None => (None, None),
        };
        {
            let s = self.stream();
            let (dxp, _dx) = dx.device_ptr_mut(s);
            let pg = partials.as_ref().map(|p| p.device_ptr(s));
            let p_ptr: u64 = pg.as_ref().map_or(0, |(p, _)| *p);
            let (xp, _x) = x.device_ptr(s);
            let (wp, _w) = weight.device_ptr(s);
            let (gp, _g) = dy.device_ptr(s);
            let mut l = s.launch_builder(&self.tk().rmsnorm_bwd_bf16);
            l.arg(&dxp)
                .arg(&p_ptr)
                .arg(&xp)
                .arg(&wp)
                .arg(&gp)
                .arg(&eps)
                .arg(&rows_i)
                .arg(&dim_i)
                .arg(&acc_i);
            // SAFETY: (bf16* dx, float* dweight_partial or NULL, const bf16* x, const bf16*
            // weight, const bf16* dy, float eps, int rows, int dim, int accumulate); lengths
            // checked; dynamic
            // shared memory holds dim floats when dweight is wanted; block is whole warps.
            unsafe { l.launch(cfg((blocks as u32, 1, 1), rmsnorm_bwd_block(dim), smem as u32)) }
                .map_err(cuda_err(kn))?;
        }
        if let (Some(p), Some(w)) = (partials, dweight) {
            self.sum_partials_add_f32(p, w, blocks, 1.0)?;
        }
        Ok(())
    }

    /// Test convenience: (dx, dweight) of [`Self::rmsnorm_bwd_bf16`] on host data rounded to bf16;
    /// dweight starts from `dweight_in`; with `dx_in` the result is accumulated onto it
    /// (rounded to bf16 first).
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_bwd_bf16_host(
        &self,
        x: &[f32],
        weight: &[f32],
        dy: &[f32],
        dweight_in: &[f32],
        dx_in: Option<&[f32]>,
        dim: usize,
        eps: f32,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let rows = x.len() / dim.max(1);
        let xd = self.upload_bf16(x)?;
        let wd = self.upload_bf16(weight)?;
        let gd = self.upload_bf16(dy)?;
        let mut dx = match dx_in {
            Some(d) => self.upload_bf16(d)?,
            None => self.alloc_zeros::<bf16>(x.len())?,
        };
        let mut partials = self.alloc_zeros::<f32>(rmsnorm_bwd_partials_len(rows, dim))?;
        let mut dw = self.upload(dweight_in)?;
        self.rmsnorm_bwd_bf16(
            &xd,
            &wd,
            &gd,
            &mut dx,
            Some((&mut partials, &mut dw)),
            rows,
            dim,
            eps,
            dx_in.is_some(),
        )?;
        Ok((self.download_bf16(&dx)?, self.download(&dw)?))
    }

    /// SwiGLU backward: dgate, dup (n) from gate, up, dy (n), all bf16.
    pub fn swiglu_bwd_bf16(
        &self,
        gate: &impl DevicePtr<bf16>,
        up: &impl DevicePtr<bf16>,
        dy: &impl DevicePtr<bf16>,
        dgate: &mut impl DevicePtrMut<bf16>,
        dup: &mut impl DevicePtrMut<bf16>,
        n: usize,
    ) -> Result<()> {
        let kn = "swiglu_bwd_bf16";
        for (what, len) in [
            ("gate", gate.len()),
            ("up", up.len()),
            ("dy", dy.len()),
            ("dgate", dgate.len()),
            ("dup", dup.len()),
        ] {
            check_len(what, kn, len, n, "n")?;
        }
        if n == 0 {
            return Ok(());
        }
        let n64 = n as u64;
        let s = self.stream();
        let (dg, _dg) = dgate.device_ptr_mut(s);
        let (du, _du) = dup.device_ptr_mut(s);
        let (g, _g) = gate.device_ptr(s);
        let (u, _u) = up.device_ptr(s);
        let (d, _d) = dy.device_ptr(s);
        let mut l = s.launch_builder(&self.tk().swiglu_bwd_bf16);
        l.arg(&dg).arg(&du).arg(&g).arg(&u).arg(&d).arg(&n64);
        // SAFETY: (bf16* dgate, bf16* dup, const bf16* gate, const bf16* up, const bf16* dy,
        // size_t n); lengths checked.
        unsafe { l.launch(cfg((ew_vec_grid(n), 1, 1), EW_THREADS, 0)) }.map_err(cuda_err(kn))?;
        Ok(())
    }

    /// Fused-layout SwiGLU backward: gate_up (rows, 2·inter), dy (rows, inter) → dgate_up
    /// (rows, 2·inter), all bf16.
    pub fn swiglu_fused_bwd_bf16(
        &self,
        gate_up: &impl DevicePtr<bf16>,
        dy: &impl DevicePtr<bf16>,
        dgate_up: &mut impl DevicePtrMut<bf16>,
        rows: usize,
        inter: usize,
    ) -> Result<()> {
        let kn = "swiglu_fused_bwd_bf16";
        check_len("gate_up", kn, gate_up.len(), rows * 2 * inter, "rows*2*inter")?;
        check_len("dgate_up", kn, dgate_up.len(), rows * 2 * inter, "rows*2*inter")?;
        check_len("dy", kn, dy.len(), rows * inter, "rows*inter")?;
        let (rows_i, inter_i) = (as_i32(kn, "rows", rows)?, as_i32(kn, "inter", inter)?);
        if rows * inter == 0 {
            return Ok(());
        }
        let s = self.stream();
        let (o, _o) = dgate_up.device_ptr_mut(s);
        let (g, _g) = gate_up.device_ptr(s);
        let (d, _d) = dy.device_ptr(s);
        let mut l = s.launch_builder(&self.tk().swiglu_fused_bwd_bf16);
        l.arg(&o).arg(&g).arg(&d).arg(&rows_i).arg(&inter_i);
        // SAFETY: (bf16* dgate_up, const bf16* gate_up, const bf16* dy, int rows, int inter);
        // lengths checked.
        unsafe { l.launch(cfg((ew_vec_grid(rows * inter), 1, 1), EW_THREADS, 0)) }.map_err(cuda_err(kn))?;
        Ok(())
    }

    /// Test convenience: (dgate, dup) on host data rounded to bf16.
    pub fn swiglu_bwd_bf16_host(&self, gate: &[f32], up: &[f32], dy: &[f32]) -> Result<(Vec<f32>, Vec<f32>)> {
        let n = gate.len();
        let (g, u, d) = (
            self.upload_bf16(gate)?,
            self.upload_bf16(up)?,
            self.upload_bf16(dy)?,
        );
        let mut dg = self.alloc_zeros::<bf16>(n)?;
        let mut du = self.alloc_zeros::<bf16>(n)?;
        self.swiglu_bwd_bf16(&g, &u, &d, &mut dg, &mut du, n)?;
        Ok((self.download_bf16(&dg)?, self.download_bf16(&du)?))
    }

    /// Test convenience: fused-layout dgate_up (rows, 2·inter) on host data rounded to bf16.
    pub fn swiglu_fused_bwd_bf16_host(
        &self,
        gate_up: &[f32],
        dy: &[f32],
        rows: usize,
        inter: usize,
    ) -> Result<Vec<f32>> {
        let g = self.upload_bf16(gate_up)?;
        let d = self.upload_bf16(dy)?;
        let mut o = self.alloc_zeros::<bf16>(gate_up.len())?;
        self.swiglu_fused_bwd_bf16(&g, &d, &mut o, rows, inter)?;
        self.download_bf16(&o)
    }

    /// RoPE backward (inverse rotation) in place on dq (rows, n_heads, hd) and dk (rows,
    /// n_kv_heads, hd) bf16, positions pos (rows) i32, inv_freq (hd/2) f32.
    #[allow(clippy::too_many_arguments)]
    pub fn rope_bwd_bf16(
        &self,
        dq: &mut impl DevicePtrMut<bf16>,
        dk: &mut impl DevicePtrMut<bf16>,
        pos: &impl DevicePtr<i32>,
        inv_freq: &impl DevicePtr<f32>,
        rows: usize,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        let (func, kn) = (&self.tk().rope_bwd_bf16, "rope_bwd_bf16");
        self.rope_in_place(
            func,
            kn,
            ["dq", "dk"],
            dq,
            dk,
            pos,
            inv_freq,
            rows,
            n_heads,
            n_kv_heads,
            head_dim,
        )
    }

    /// Test convenience: (dq, dk) after [`Self::rope_bwd_bf16`] on host data rounded to bf16.
    #[allow(clippy::too_many_arguments)]
    pub fn rope_bwd_bf16_host(
        &self,
        dq: &[f32],
        dk: &[f32],
        pos: &[i32],
        inv_freq: &[f32],
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let mut q = self.upload_bf16(dq)?;
        let mut k = self.upload_bf16(dk)?;
        let p = self.upload(pos)?;
        let f = self.upload(inv_freq)?;
        self.rope_bwd_bf16(&mut q, &mut k, &p, &f, pos.len(), n_heads, n_kv_heads, head_dim)?;
        Ok((self.download_bf16(&q)?, self.download_bf16(&k)?))
    }

    // ---------------------------------------------------------------------------------------
    // Optimiser

    /// Global gradient statistics of a flat f32 buffer: `stats` (2 f64) = [Σ g², #non-finite],
    /// through per-block partials (at least [`grad_norm_partials_len`]) and a fixed-order sum.
    /// Read `stats` with [`clip_report_from_stats`], or hand it to [`Self::adamw_step_f32`].
    pub fn grad_sq_norm_f32(
        &self,
        grads: &impl DevicePtr<f32>,
        partials: &mut (impl DevicePtr<f64> + DevicePtrMut<f64>),
        stats: &mut impl DevicePtrMut<f64>,
    ) -> Result<()> {
        let kn = "grad_sq_norm_partial_f32";
        let n = grads.len();
        let blocks = grad_norm_blocks(n);
        check_min_len(
            "partials",
            kn,
            partials.len(),
            blocks * 2,
            "grad_norm_partials_len",
        )?;
        check_len("stats", kn, stats.len(), 2, "2")?;
        let n64 = n as u64;
        {
            let s = self.stream();
            let (pp, _p) = partials.device_ptr_mut(s);
            let (gp, _g) = grads.device_ptr(s);
            let mut l = s.launch_builder(&self.tk().grad_sq_norm_partial_f32);
            l.arg(&pp).arg(&gp).arg(&n64);
            // SAFETY: (double* partials, const float* g, size_t n); partials hold blocks·2
            // doubles; block = 256 (whole warps).
            unsafe { l.launch(cfg((blocks as u32, 1, 1), RED_THREADS, 0)) }.map_err(cuda_err(kn))?;
        }
        self.sum_partials_f64(partials, stats, blocks, 2)
    }

    // ---------------------------------------------------------------------------------------
    // Full fine-tuning

    /// The embedding's gradient: dembed (vocab, dim) f32 += each row of dx (rows, dim) bf16
    /// added into its token's row, one block per distinct token (see kernels/train.cu). `tokens`
    /// (U) are the distinct tokens (< vocab), the rows of tokens\[u\] are rows[row_off\[u\] ..
    /// row_off[u+1]] ascending ([`embedding_grad_index`] builds the three from the row ids).
    #[allow(clippy::too_many_arguments)]
    pub fn embedding_grad_bf16_to_f32(
        &self,
        dx: &impl DevicePtr<bf16>,
        tokens: &impl DevicePtr<u32>,
        row_off: &impl DevicePtr<i32>,
        rows_of: &impl DevicePtr<i32>,
        dembed: &mut impl DevicePtrMut<f32>,
        num_tokens: usize,
        rows: usize,
        dim: usize,
        vocab: usize,
    ) -> Result<()> {
        let kn = "embedding_grad_bf16_to_f32";
        check_len("dx", kn, dx.len(), rows * dim, "rows*dim")?;
        check_len("tokens", kn, tokens.len(), num_tokens, "num_tokens")?;
        check_len("row_off", kn, row_off.len(), num_tokens + 1, "num_tokens+1")?;
        check_len("rows", kn, rows_of.len(), rows, "rows")?;
        check_len("dembed", kn, dembed.len(), vocab * dim, "vocab*dim")?;
        let (u_i, d_i) = (as_i32(kn, "num_tokens", num_tokens)?, as_i32(kn, "dim", dim)?);
        as_i32(kn, "rows", rows)?;
        if num_tokens == 0 || dim == 0 {
            return Ok(());
        }
        let s = self.stream();
        let (ep, _e) = dembed.device_ptr_mut(s);
        let (xp, _x) = dx.device_ptr(s);
        let (tp, _t) = tokens.device_ptr(s);
        let (op, _o) = row_off.device_ptr(s);
        let (rp, _r) = rows_of.device_ptr(s);
        let mut l = s.launch_builder(&self.tk().embedding_grad_bf16_to_f32);
        l.arg(&ep).arg(&xp).arg(&tp).arg(&op).arg(&rp).arg(&u_i).arg(&d_i);
        // SAFETY: (float* dembed, const bf16* dx, const uint32_t* tokens, const int* row_off,
        // const int* rows, int num_tokens, int dim); lengths checked; the tokens (< vocab) and
        // the row lists (a permutation of 0..rows) come from embedding_grad_index.
        unsafe { l.launch(cfg((num_tokens.min(EW_MAX_BLOCKS) as u32, 1, 1), EW_THREADS, 0)) }
            .map_err(cuda_err(kn))?;
        Ok(())
    }

    /// Test convenience: dembed (vocab·dim, from `dembed_in`) after
    /// [`Self::embedding_grad_bf16_to_f32`] of dx (rounded to bf16) for the row tokens `ids`.
    pub fn embedding_grad_bf16_to_f32_host(
        &self,
        dx: &[f32],
        ids: &[u32],
        dembed_in: &[f32],
        dim: usize,
    ) -> Result<Vec<f32>> {
        let vocab = dembed_in.len() / dim.max(1);
        let (tokens, row_off, rows) = embedding_grad_index(ids, vocab)?;
        let xd = self.upload_bf16(&nonempty(dx))?;
        let (td, od, rd) = (
            self.upload(&nonempty(&tokens))?,
            self.upload(&row_off)?,
            self.upload(&nonempty(&rows))?,
        );
        let mut e = self.upload(dembed_in)?;
        let n = ids.len();
        self.embedding_grad_bf16_to_f32(
            &xd.slice(..n * dim),
            &td.slice(..tokens.len()),
            &od,
            &rd.slice(..n),
            &mut e,
            tokens.len(),
            n,
            dim,
            vocab,
        )?;
        self.download(&e)
    }

    /// One AdamW step over flat f32 buffers (n = params.len()): gradients scaled by `clip_scale`
    /// on the fly, `scalars` from [`AdamW::scalars`]. With `grad_stats` (the stats of
    /// [`Self::grad_sq_norm_f32`]) a non-finite gradient makes the launch a no-op on the device.
    #[allow(clippy::too_many_arguments)]
    pub fn adamw_step_f32<S: DevicePtr<f64>>(
        &self,
        params: &mut impl DevicePtrMut<f32>,
        m: &mut impl DevicePtrMut<f32>,
        v: &mut impl DevicePtrMut<f32>,
        grads: &impl DevicePtr<f32>,
        grad_stats: Option<&S>,
        clip_scale: f32,
        scalars: &AdamWScalars,
    ) -> Result<()> {
        let kn = "adamw_step_f32";
        let n = params.len();
        check_len("m", kn, m.len(), n, "params")?;
        check_len("v", kn, v.len(), n, "params")?;
        check_len("grads", kn, grads.len(), n, "params")?;
        if let Some(st) = grad_stats {
            check_len("grad_stats", kn, st.len(), 2, "2")?;
        }
        if n == 0 {
            return Ok(());
        }
        let n64 = n as u64;
        let s = self.stream();
        let (pp, _p) = params.device_ptr_mut(s);
        let (mp, _m) = m.device_ptr_mut(s);
        let (vp, _v) = v.device_ptr_mut(s);
        let (gp, _g) = grads.device_ptr(s);
        let st = grad_stats.map(|g| g.device_ptr(s));
        let st_ptr: u64 = st.as_ref().map_or(0, |(p, _)| *p);
        let sc = scalars;
        let mut l = s.launch_builder(&self.tk().adamw_step_f32);
        l.arg(&pp)
            .arg(&mp)
            .arg(&vp)
            .arg(&gp)
            .arg(&st_ptr)
            .arg(&n64)
            .arg(&clip_scale)
            .arg(&sc.decay)
            .arg(&sc.w1)
            .arg(&sc.b2)
            .arg(&sc.w2)
            .arg(&sc.step_size)
            .arg(&sc.bc2_sqrt)
            .arg(&sc.eps);
        // SAFETY: (float* param, float* m, float* v, const float* grad, const double* grad_stats
        // or NULL, size_t n, float clip_scale, float decay, float w1, float b2, float w2,
        // float step_size, float bc2_sqrt, float eps); lengths checked.
        unsafe { l.launch(cfg((ew_grid(n), 1, 1), EW_THREADS, 0)) }.map_err(cuda_err(kn))?;
        Ok(())
    }

    /// Test convenience mirroring `optim::clip_and_step` on ONE flat tensor (the concatenation
    /// of the CPU's tensors): grad stats on the device, the clip decision on the host from the
    /// downloaded stats, then AdamW (skipped, state untouched, when a gradient is non-finite).
    /// `state` holds one moment pair of `params.len()` (created on the first step).
    pub fn clip_and_step_f32_host(
        &self,
        opt: &AdamW,
        state: &mut AdamWState,
        params: &mut [f32],
        grads: &[f32],
        max_norm: f32,
    ) -> Result<StepReport> {
        opt.validate()?;
        let n = params.len();
        if grads.len() != n || n == 0 {
            return Err(Error::invalid(format!(
                "clip_and_step_f32_host: {n} parameters, {} gradients (need equal, > 0)",
                grads.len()
            )));
        }
        if state.step == 0 && state.m.is_empty() && state.v.is_empty() {
            *state = AdamWState::new(&[n]);
        }
        state.check_sizes(&[n])?;
        let g = self.upload(grads)?;
        let mut partials = self.alloc_zeros::<f64>(grad_norm_partials_len(n))?;
        let mut stats = self.alloc_zeros::<f64>(2)?;
        self.grad_sq_norm_f32(&g, &mut partials, &mut stats)?;
        let host_stats = self.download(&stats)?;
        let clip = clip_report_from_stats([host_stats[0], host_stats[1]], max_norm);
        if !clip.finite {
            return Ok(StepReport {
                grad_norm: clip.norm,
                clip_scale: 1.0,
                skipped: true,
            });
        }
        let scalars = opt.scalars(state.step + 1);
        let mut p = self.upload(params)?;
        let mut m = self.upload(&state.m[0])?;
        let mut v = self.upload(&state.v[0])?;
        self.adamw_step_f32(&mut p, &mut m, &mut v, &g, Some(&stats), clip.scale, &scalars)?;
        params.copy_from_slice(&self.download(&p)?);
        state.m[0] = self.download(&m)?;
        state.v[0] = self.download(&v)?;
        state.step += 1;
        Ok(StepReport {
            grad_norm: clip.norm,
            clip_scale: clip.scale,
            skipped: false,
        })
    }

    /// Test convenience: `[Σ g², #non-finite]` of a host gradient buffer (n > 0).
    pub fn grad_sq_norm_f32_host(&self, grads: &[f32]) -> Result<[f64; 2]> {
        let g = self.upload(grads)?;
        let mut partials = self.alloc_zeros::<f64>(grad_norm_partials_len(grads.len()))?;
        let mut stats = self.alloc_zeros::<f64>(2)?;
        self.grad_sq_norm_f32(&g, &mut partials, &mut stats)?;
        let s = self.download(&stats)?;
        Ok([s[0], s[1]])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_heuristic() {
        // dB of Qwen2.5-0.5B's gate_proj (out 4864, r 16): 152 tiles → 2 splits at 24576 rows.
        assert_eq!(lora_grad_splits(24_576, 4864, 16), 2);
        // dA of q_proj (r 16, in 896): 28 tiles → 10 splits.
        assert_eq!(lora_grad_splits(24_576, 16, 896), 10);
        // Few rows: never a split under 256 rows.
        assert_eq!(lora_grad_splits(300, 16, 896), 1);
        assert_eq!(lora_grad_splits(7, 1, 123), 1);
        // Tiny outputs, many rows: capped at 64.
        assert_eq!(lora_grad_splits(1_000_000, 1, 1), 64);
        // Enough tiles already: none.
        assert_eq!(lora_grad_splits(24_576, 8960, 64), 1);
        assert_eq!(lora_grad_scratch_len(24_576, 8960, 64), 0);
        assert_eq!(lora_grad_scratch_len(24_576, 16, 896), 10 * 16 * 896);
        assert_eq!(grpo_loss_blocks(0), 1);
        assert_eq!(grpo_loss_blocks(257), 2);
        assert_eq!(grpo_loss_blocks(10_000_000), 1024);
        assert_eq!(rmsnorm_bwd_blocks(33), 3);
    }

    #[test]
    fn vector_launch_shapes() {
        // rmsnorm_bwd: one thread per 8 columns (whole warps) up to 512 threads, else row_block.
        assert_eq!(rmsnorm_bwd_block(896), 128);
        assert_eq!(rmsnorm_bwd_block(8), 32);
        assert_eq!(rmsnorm_bwd_block(4096), 512);
        assert_eq!(rmsnorm_bwd_block(4104), 512);
        assert_eq!(rmsnorm_bwd_block(123), 128);
        // Vectorised grid-stride kernels: one thread per 8 elements, capped at 65535 blocks.
        assert_eq!(ew_vec_grid(1), 1);
        assert_eq!(ew_vec_grid(24_576 * 4864), 58_368);
        assert_eq!(ew_vec_grid(usize::MAX / 2), 65_535);
    }

    #[test]
    fn clip_report_matches_cpu_decisions() {
        use crate::optim::clip_grad_norm;
        let (a, b) = (vec![3.0f32, 0.0], vec![4.0f32]);
        let ss: f64 = [3.0f64, 0.0, 4.0].iter().map(|x| x * x).sum();
        for max_norm in [1.0f32, 10.0, 0.0, -1.0] {
            let cpu = clip_grad_norm(&mut [&mut a.clone(), &mut b.clone()], max_norm);
            assert_eq!(
                clip_report_from_stats([ss, 0.0], max_norm),
                cpu,
                "max_norm {max_norm}"
            );
        }
        let bad = clip_report_from_stats([f64::NAN, 1.0], 1.0);
        assert!(!bad.finite && bad.scale == 1.0 && !bad.norm.is_finite());
        let bad = clip_report_from_stats([f64::INFINITY, 1.0], 1.0);
        assert!(!bad.finite && !bad.norm.is_finite());
    }
}
