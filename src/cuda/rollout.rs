//! Launchers for the rollout kernels: embedding, RoPE, SwiGLU, bias/residual adds
//! (`kernels/elementwise.cu`), the paged KV cache and attention (`kernels/attention.cu`), the
//! live LoRA path (`kernels/lora.cu`), sampling and log-prob gathering (`kernels/sampling.cu`).
//! Each launcher checks buffer lengths against the shapes, picks grid/block/shared memory and
//! pushes the arguments in the kernel's order; each has a `*_host` convenience (host slices in,
//! host vectors out) for tests. The CPU oracles are named in each kernel file's top comment.
//! The RoPE launch is shared with the training step's inverse rotation (train_kernels.rs).
//!
//! It owns no memory plan: scratch buffers (decode partials, the LoRA `xa`, the sampler's
//! per-chunk sums) are passed in.

use cudarc::driver::{
    CudaFunction, CudaModule, CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};
use half::bf16;
use std::sync::Arc;

use super::train_kernels::{as_i32, cfg, check_len, ew_vec_grid, row_block, EW_THREADS};
use super::{cuda_err, CudaDevice};
use crate::sampling::SamplingParams;
use crate::{Error, Result};

/// Warps per attention block and query heads per decode block (kernels/attention.cu).
const ATTN_WARPS: usize = 4;
const ATTN_GMAX: usize = 8;
const PREFILL_BQ: usize = 16;
/// Positions per warp step of the tensor-core decode (kernels/attention.cu `DEC_PW`).
const DEC_PW: usize = 16;

/// Dynamic shared memory of the tensor-core decode compiled for head dim `hd_max`
/// (kernels/attention.cu `DECODE_MMA_SMEM`): per warp and slot (2 slots up to hd_max 128, 1 at
/// 256) 16 k rows and 16 v rows of hd_max + 8 bf16 (the warps' merge, 4·8·(hd+2) f32, reuses
/// them and is smaller): 36 KiB, 68 KiB, 66 KiB.
const fn decode_mma_smem(hd_max: usize) -> usize {
    let slots = if hd_max <= 128 { 2 } else { 1 };
    ATTN_WARPS * slots * 2 * DEC_PW * (hd_max + 8) * 2
}

const PREFILL_BK: usize = 32;
/// Threads per sampling block (kernels/sampling.cu `SAMPLE_THREADS`).
const SAMPLE_THREADS: u32 = 512;
/// Vocabulary ids per chunk of the sampling fast path and threads per fast-path block
/// (kernels/sampling.cu `SAMPLE_CHUNK`, `SAMPLE_CHUNK_THREADS`).
pub const SAMPLE_CHUNK: usize = 4096;
const SAMPLE_CHUNK_THREADS: u32 = 256;

/// f64 elements of the scratch [`CudaDevice::sample_tokens_f32`] needs for `rows` rows of
/// `vocab` logits: per row and chunk of [`SAMPLE_CHUNK`] ids, the chunk's Σ w, kept Σ w and
/// (max, arg-max) — 24 bytes.
pub fn sample_scratch_len(rows: usize, vocab: usize) -> usize {
    3 * rows * vocab.div_ceil(SAMPLE_CHUNK)
}

/// The kernels of one sampling launch (f32 or bf16 logits).
struct SampleFns<'a> {
    single: &'a CudaFunction,
    max: &'a CudaFunction,
    sum: &'a CudaFunction,
    pick: &'a CudaFunction,
}

/// The shape of one sampling launch; `single_block`: every row by the single-block kernel (tests).
struct SampleCall<'a> {
    kn: &'a str,
    params: &'a SamplingParamsDev,
    rows: usize,
    vocab: usize,
    single_block: bool,
}
/// RoPE: rows per block and threads per block (kernels/common.cuh `ROPE_ROWS`, `ROPE_THREADS`).
const ROPE_ROWS: usize = 4;
const ROPE_THREADS: u32 = 128;
/// LoRA (kernels/common.cuh): rows per warp of the xa kernels (`LORA_XA_ROWS`); columns (threads)
/// and rows per block of the expand kernels (`LORA_EXPAND_THREADS`, `LORA_EXPAND_ROWS`); the
/// largest rank whose xa tile the expand kernels stage in shared memory (`LORA_REG_RANK`).
const LORA_XA_ROWS: usize = 4;
const LORA_EXPAND_THREADS: usize = 128;
const LORA_EXPAND_ROWS: usize = 32;
const LORA_REG_RANK: usize = 64;

/// Launch of the xa kernels (lora_xa_bf16, lora_group_xa_bf16) for `pairs` = n·rank values of j:
/// grid = (ceil(rows / LORA_XA_ROWS), ceil(pairs / warps)), block = warps = min(pairs, 8) warps.
pub(super) fn lora_xa_cfg(rows: usize, pairs: usize) -> LaunchConfig {
    let warps = pairs.min(8);
    cfg(
        (
            rows.div_ceil(LORA_XA_ROWS) as u32,
            pairs.div_ceil(warps) as u32,
            1,
        ),
        (warps * 32) as u32,
        0,
    )
}

/// Launch of the expand kernels (lora_expand_add_bf16, lora_group_expand_add_bf16) over `cols`
/// output columns of n projections: grid = (ceil(cols / 128), ceil(rows / 32)), block 128, and
/// dynamic shared memory for a tile of min(rows, 32) rows: its y (128 bf16 per row) and, for
/// rank ≤ LORA_REG_RANK, its xa (n·rank f32 per row): ≤ 32·(256 + 768) = 32 KiB at n 3, rank 64.
/// Errors when the row tiles exceed grid.y's 65535.
pub(super) fn lora_expand_cfg(
    kn: &str,
    rows: usize,
    cols: usize,
    n: usize,
    rank: usize,
) -> Result<LaunchConfig> {
    let tiles = rows.div_ceil(LORA_EXPAND_ROWS);
    if tiles > 65_535 {
        return Err(Error::invalid(format!(
            "{kn}: {rows} rows need {tiles} row tiles, more than the grid's 65535"
        )));
    }
    let tile = rows.min(LORA_EXPAND_ROWS);
    let xa_row = if rank <= LORA_REG_RANK { n * rank * 4 } else { 0 };
    Ok(cfg(
        (cols.div_ceil(LORA_EXPAND_THREADS) as u32, tiles as u32, 1),
        LORA_EXPAND_THREADS as u32,
        (tile * (LORA_EXPAND_THREADS * 2 + xa_row)) as u32,
    ))
}

/// The rollout kernels, looked up once when the device is opened.
pub(super) struct RolloutKernels {
    embedding_fwd_bf16: CudaFunction,
    rope_fwd_bf16: CudaFunction,
    swiglu_fwd_bf16: CudaFunction,
    swiglu_fused_fwd_bf16: CudaFunction,
    add_bias_bf16: CudaFunction,
    residual_add_bf16: CudaFunction,
    kv_cache_append_bf16: CudaFunction,
    attention_decode_simt_bf16: CudaFunction,
    /// Tensor-core decode compiled for head dims ≤ 64, 128, 256 (hd % 8 == 0).
    attention_decode_hd64_bf16: CudaFunction,
    attention_decode_hd128_bf16: CudaFunction,
    attention_decode_hd256_bf16: CudaFunction,
    attention_prefill_bf16: CudaFunction,
    lora_xa_bf16: CudaFunction,
    lora_expand_add_bf16: CudaFunction,
    sampling_uniform_f32: CudaFunction,
    sample_tokens_f32: CudaFunction,
    sample_tokens_bf16: CudaFunction,
    sample_fast_max_f32: CudaFunction,
    sample_fast_max_bf16: CudaFunction,
    sample_fast_sum_f32: CudaFunction,
    sample_fast_sum_bf16: CudaFunction,
    sample_fast_pick_f32: CudaFunction,
    sample_fast_pick_bf16: CudaFunction,
    logprob_gather_f32: CudaFunction,
    logprob_gather_bf16: CudaFunction,
}

/// Every kernel name of this module (for the fatbin-content test).
pub const ROLLOUT_KERNEL_NAMES: &[&str] = &[
    "embedding_fwd_bf16",
    "rope_fwd_bf16",
    "swiglu_fwd_bf16",
    "swiglu_fused_fwd_bf16",
    "add_bias_bf16",
    "residual_add_bf16",
    "kv_cache_append_bf16",
    "attention_decode_simt_bf16",
    "attention_decode_hd64_bf16",
    "attention_decode_hd128_bf16",
    "attention_decode_hd256_bf16",
    "attention_prefill_bf16",
    "lora_xa_bf16",
    "lora_expand_add_bf16",
    "sampling_uniform_f32",
    "sample_tokens_f32",
    "sample_tokens_bf16",
    "sample_fast_max_f32",
    "sample_fast_max_bf16",
    "sample_fast_sum_f32",
    "sample_fast_sum_bf16",
    "sample_fast_pick_f32",
    "sample_fast_pick_bf16",
    "logprob_gather_f32",
    "logprob_gather_bf16",
];

impl RolloutKernels {
    pub(super) fn load(module: &Arc<CudaModule>) -> Result<RolloutKernels> {
        let f = |name: &str| super::load_kernel(module, name);
        // The tensor-core decode kernels above 48 KiB opt in once, here: the opt-in holds for
        // every later launch and graph capture.
        let big = |name: &str, smem: usize| {
            let func = f(name)?;
            super::allow_smem(&func, name, smem)?;
            Ok::<_, crate::Error>(func)
        };
        Ok(RolloutKernels {
            embedding_fwd_bf16: f("embedding_fwd_bf16")?,
            rope_fwd_bf16: f("rope_fwd_bf16")?,
            swiglu_fwd_bf16: f("swiglu_fwd_bf16")?,
            swiglu_fused_fwd_bf16: f("swiglu_fused_fwd_bf16")?,
            add_bias_bf16: f("add_bias_bf16")?,
            residual_add_bf16: f("residual_add_bf16")?,
            kv_cache_append_bf16: f("kv_cache_append_bf16")?,
            attention_decode_simt_bf16: f("attention_decode_simt_bf16")?,
            attention_decode_hd64_bf16: f("attention_decode_hd64_bf16")?,
            attention_decode_hd128_bf16: big("attention_decode_hd128_bf16", decode_mma_smem(128))?,
            attention_decode_hd256_bf16: big("attention_decode_hd256_bf16", decode_mma_smem(256))?,
            attention_prefill_bf16: f("attention_prefill_bf16")?,
            lora_xa_bf16: f("lora_xa_bf16")?,
            lora_expand_add_bf16: f("lora_expand_add_bf16")?,
            sampling_uniform_f32: f("sampling_uniform_f32")?,
            sample_tokens_f32: f("sample_tokens_f32")?,
            sample_tokens_bf16: f("sample_tokens_bf16")?,
            sample_fast_max_f32: f("sample_fast_max_f32")?,
            sample_fast_max_bf16: f("sample_fast_max_bf16")?,
            sample_fast_sum_f32: f("sample_fast_sum_f32")?,
            sample_fast_sum_bf16: f("sample_fast_sum_bf16")?,
            sample_fast_pick_f32: f("sample_fast_pick_f32")?,
            sample_fast_pick_bf16: f("sample_fast_pick_bf16")?,
            logprob_gather_f32: f("logprob_gather_f32")?,
            logprob_gather_bf16: f("logprob_gather_bf16")?,
        })
    }
}

/// Shape of one layer's paged KV cache and its attention: k_cache, v_cache
/// (num_pages, page_size, n_kv_heads, head_dim) bf16; block_table (num_seqs, max_pages) i32.
/// A contiguous per-sequence cache (num_seqs, T_max, KV, hd) is `page_size = T_max`,
/// `max_pages = 1`, block_table\[s\] = s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub num_pages: usize,
    pub page_size: usize,
    pub max_pages: usize,
    /// Sliding window (Mistral): attend the last `w` positions; None = full causal.
    pub window: Option<usize>,
}

impl AttnShape {
    pub(super) fn check(&self, kernel: &str) -> Result<()> {
        let bad = |msg: String| Err(Error::invalid(format!("{kernel}: {msg}")));
        if self.n_heads == 0 || self.n_kv_heads == 0 || !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(format!(
                "n_heads {} must be a positive multiple of n_kv_heads {}",
                self.n_heads, self.n_kv_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(4) || self.head_dim > 256 {
            return bad(format!(
                "head_dim {} must be a multiple of 4 and ≤ 256",
                self.head_dim
            ));
        }
        if self.page_size == 0 || self.max_pages == 0 || self.num_pages == 0 {
            return bad("page_size, max_pages and num_pages must be > 0".into());
        }
        if self.window == Some(0) {
            return bad("a sliding window of 0 positions attends nothing; use None for no window".into());
        }
        as_i32(kernel, "page_size·max_pages", self.page_size * self.max_pages)?;
        as_i32(kernel, "num_pages", self.num_pages)?;
        Ok(())
    }

    /// Checks a launch's k_cache / v_cache lengths against the shape and that the block table
    /// holds whole rows of max_pages.
    pub(super) fn check_cache(
        &self,
        kernel: &str,
        k_len: usize,
        v_len: usize,
        table_len: usize,
    ) -> Result<()> {
        self.check_kv_len(kernel, k_len, v_len)?;
        if !table_len.is_multiple_of(self.max_pages) {
            return Err(Error::invalid(format!(
                "{kernel}: block_table has {table_len} elements, not a multiple of max_pages {}",
                self.max_pages
            )));
        }
        Ok(())
    }

    /// [`Self::check_cache`] for a launch over `num_seqs` sequences: the block table holds
    /// exactly num_seqs rows of max_pages.
    pub(super) fn check_seq_cache(
        &self,
        kernel: &str,
        k_len: usize,
        v_len: usize,
        table_len: usize,
        num_seqs: usize,
    ) -> Result<()> {
        self.check_kv_len(kernel, k_len, v_len)?;
        check_len(
            "block_table",
            kernel,
            table_len,
            num_seqs * self.max_pages,
            "num_seqs*max_pages",
        )
    }

    /// k_cache and v_cache hold [`Self::cache_len`] elements each.
    fn check_kv_len(&self, kernel: &str, k_len: usize, v_len: usize) -> Result<()> {
        check_len(
            "k_cache",
            kernel,
            k_len,
            self.cache_len(),
            "num_pages*page_size*KV*hd",
        )?;
        check_len(
            "v_cache",
            kernel,
            v_len,
            self.cache_len(),
            "num_pages*page_size*KV*hd",
        )
    }

    /// Elements of one of k_cache / v_cache.
    pub fn cache_len(&self) -> usize {
        self.num_pages * self.page_size * self.n_kv_heads * self.head_dim
    }

    /// 1/sqrt(hd) in f32, as `cpu::model::attend` computes it.
    pub fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }

    fn window_i32(&self) -> i32 {
        self.window.map_or(0, |w| w.min(i32::MAX as usize) as i32)
    }

    /// Decode blocks per sequence and partition: kv heads × ceil(group / 8).
    pub fn decode_blocks_per_seq(&self) -> usize {
        decode_blocks_per_seq(self.n_heads, self.n_kv_heads)
    }
}

/// Decode blocks per sequence and partition for `n_heads` query heads over `n_kv_heads` kv
/// heads: kv heads × ceil(group / 8) (also the decode merge's counters per sequence).
pub fn decode_blocks_per_seq(n_heads: usize, n_kv_heads: usize) -> usize {
    n_kv_heads * (n_heads / n_kv_heads.max(1)).div_ceil(ATTN_GMAX)
}

/// Positions per flash-decoding partition of the decode attention (a multiple of the KV page
/// size 16, so a partition never splits a page).
///
/// Fixed, not chosen per batch, so that how a sequence's attention is summed depends on that
/// sequence alone (batch invariance; kernels/attention.cu). Why 128 and not vLLM's 512: a
/// partition is one block of 4 warps, each taking every 4th step of 16 positions (128 = two
/// steps per warp, the second one's k in flight during the first one's P·V), so a partition's
/// latency grows with its length, and at the sizes GRPO rollouts run (64 sequences × ≤ 384
/// positions, Qwen2.5-0.5B: 2 kv-head blocks per sequence) 128 gives 3 partitions = 384 blocks
/// ≈ 3 per SM on 132 SMs, where 512 would give 128 blocks (one partition each), a third of the
/// SMs idle. The cost of smaller partitions is partial traffic: a partition writes
/// n_heads·(hd+2) f32 per 128 positions (29 B per position for Qwen2.5-0.5B) against 512 B of k
/// and v per position, ≈ 6 % more (and L2-resident for moderate batches); at 32k positions a
/// sequence has 256 partitions, still one grid.z.
pub const DECODE_PARTITION_SIZE: usize = 128;

/// Flash-decoding partitions of a sequence of `len` positions: ceil(span / 128) with span the
/// positions it attends (min(len, window)), at least 1. A decode grid sized for a longest
/// sequence of `max_len` positions covers every shorter one (the count is monotone in `len`).
/// Mirrors `decode_num_parts` in kernels/attention.cu.
pub fn decode_partitions(len: usize, window: Option<usize>) -> usize {
    let span = match window {
        Some(w) if w > 0 => len.min(w),
        _ => len,
    };
    span.div_ceil(DECODE_PARTITION_SIZE).max(1)
}

/// Per-row sampling parameters on the device (rows = sequences sampled this step).
pub struct SamplingParamsDev {
    pub temperature: CudaSlice<f32>,
    pub top_k: CudaSlice<i32>,
    pub top_p: CudaSlice<f32>,
    pub min_p: CudaSlice<f32>,
    pub seed: CudaSlice<u64>,
    pub stream: CudaSlice<u64>,
    pub step: CudaSlice<u64>,
}

impl SamplingParamsDev {
    /// Uploads `params[r]`, `streams[r]` (sequence ids) and `steps[r]` (token index in the
    /// sequence) for rows r. top_k ≥ i32::MAX is passed as i32::MAX (off, like any k ≥ V).
    pub fn upload(
        dev: &CudaDevice,
        params: &[SamplingParams],
        streams: &[u64],
        steps: &[u64],
    ) -> Result<Self> {
        if streams.len() != params.len() || steps.len() != params.len() {
            return Err(Error::invalid(format!(
                "sampling: {} params, {} streams, {} steps (one each per row)",
                params.len(),
                streams.len(),
                steps.len()
            )));
        }
        let col_f = |f: fn(&SamplingParams) -> f32| params.iter().map(f).collect::<Vec<f32>>();
        Ok(SamplingParamsDev {
            temperature: dev.upload(&col_f(|p| p.temperature))?,
            top_k: dev.upload(
                &params
                    .iter()
                    .map(|p| p.top_k.min(i32::MAX as usize) as i32)
                    .collect::<Vec<_>>(),
            )?,
            top_p: dev.upload(&col_f(|p| p.top_p))?,
            min_p: dev.upload(&col_f(|p| p.min_p))?,
            seed: dev.upload(&params.iter().map(|p| p.seed).collect::<Vec<_>>())?,
            stream: dev.upload(streams)?,
            step: dev.upload(steps)?,
        })
    }

    /// Buffers for up to `rows` rows (zeros: greedy), to be filled with [`Self::fill_params`] and
    /// [`Self::fill_rows`] without allocating again (the rollout engine's decode loop).
    pub fn alloc(dev: &CudaDevice, rows: usize) -> Result<Self> {
        let rows = rows.max(1);
        Ok(SamplingParamsDev {
            temperature: dev.alloc_zeros(rows)?,
            top_k: dev.alloc_zeros(rows)?,
            top_p: dev.alloc_zeros(rows)?,
            min_p: dev.alloc_zeros(rows)?,
            seed: dev.alloc_zeros(rows)?,
            stream: dev.alloc_zeros(rows)?,
            step: dev.alloc_zeros(rows)?,
        })
    }

    /// Writes the same `params` into every row of the buffers (one request's parameters).
    pub fn fill_params(&mut self, dev: &CudaDevice, params: &SamplingParams) -> Result<()> {
        let n = self.rows();
        let s = dev.stream();
        let e = |what: &'static str| move |err| Error::Cuda(format!("uploading sampling {what}: {err}"));
        s.memcpy_htod(&vec![params.temperature; n], &mut self.temperature)
            .map_err(e("temperature"))?;
        s.memcpy_htod(
            &vec![params.top_k.min(i32::MAX as usize) as i32; n],
            &mut self.top_k,
        )
        .map_err(e("top_k"))?;
        s.memcpy_htod(&vec![params.top_p; n], &mut self.top_p)
            .map_err(e("top_p"))?;
        s.memcpy_htod(&vec![params.min_p; n], &mut self.min_p)
            .map_err(e("min_p"))?;
        s.memcpy_htod(&vec![params.seed; n], &mut self.seed)
            .map_err(e("seed"))?;
        Ok(())
    }

    /// Writes `streams[r]`, `steps[r]` into rows 0..len (the rows sampled this step).
    pub fn fill_rows(&mut self, dev: &CudaDevice, streams: &[u64], steps: &[u64]) -> Result<()> {
        if streams.len() != steps.len() || streams.len() > self.rows() {
            return Err(Error::invalid(format!(
                "sampling: {} streams and {} steps for buffers of {} rows",
                streams.len(),
                steps.len(),
                self.rows()
            )));
        }
        if streams.is_empty() {
            return Ok(());
        }
        let s = dev.stream();
        let n = streams.len();
        s.memcpy_htod(streams, &mut self.stream.slice_mut(..n))
            .map_err(cuda_err("uploading sampling streams"))?;
        s.memcpy_htod(steps, &mut self.step.slice_mut(..n))
            .map_err(cuda_err("uploading sampling steps"))?;
        Ok(())
    }

    /// Rows the buffers hold; a launch may use the first `rows ≤ self.rows()` of them.
    pub fn rows(&self) -> usize {
        self.temperature.len()
    }
}

/// (grid, dynamic shared memory bytes) of rope_fwd_bf16 / rope_bwd_bf16: ROPE_ROWS rows per
/// block, sin and cos of each (row, pair index) in shared memory.
fn rope_launch(rows: usize, head_dim: usize) -> (u32, u32) {
    (
        rows.div_ceil(ROPE_ROWS) as u32,
        (2 * ROPE_ROWS * (head_dim / 2) * 4) as u32,
    )
}

impl CudaDevice {
    fn rk(&self) -> &RolloutKernels {
        &self.rollout
    }

    // ---------------------------------------------------------------------------------------
    // Elementwise

    /// out (rows, dim) = table[ids\[r\], :]; table (vocab, dim) bf16, ids (rows) u32. An id ≥ vocab
    /// gives a zero row (the kernel cannot report it; check ids on the host where they come from).
    pub fn embedding_fwd_bf16(
        &self,
        table: &impl DevicePtr<bf16>,
        ids: &impl DevicePtr<u32>,
        out: &mut impl DevicePtrMut<bf16>,
        rows: usize,
        dim: usize,
        vocab: usize,
    ) -> Result<()> {
        let kn = "embedding_fwd_bf16";
        check_len("table", kn, table.len(), vocab * dim, "vocab*dim")?;
        check_len("ids", kn, ids.len(), rows, "rows")?;
        check_len("out", kn, out.len(), rows * dim, "rows*dim")?;
        let (rows_i, dim_i, vocab_i) = (
            as_i32(kn, "rows", rows)?,
            as_i32(kn, "dim", dim)?,
            as_i32(kn, "vocab", vocab)?,
        );
        if rows == 0 || dim == 0 {
            return Ok(());
        }
        let s = self.stream();
        let (o, _o) = out.device_ptr_mut(s);
        let (t, _t) = table.device_ptr(s);
        let (i, _i) = ids.device_ptr(s);
        let mut l = s.launch_builder(&self.rk().embedding_fwd_bf16);
        l.arg(&o).arg(&t).arg(&i).arg(&rows_i).arg(&dim_i).arg(&vocab_i);
        // SAFETY: (bf16* out, const bf16* table, const u32* ids, int rows, int dim, int vocab);
        // lengths checked above; the kernel bounds ids against vocab.
        unsafe { l.launch(cfg((rows as u32, 1, 1), row_block(dim), 0)) }.map_err(cuda_err(kn))?;
        Ok(())
    }

    /// RoPE in place on q (rows, n_heads, hd) and k (rows, n_kv_heads, hd) at positions pos
    /// (rows) i32, with inv_freq (hd/2) f32 from `ModelConfig::rope_inv_freq`.
    #[allow(clippy::too_many_arguments)]
    pub fn rope_fwd_bf16(
        &self,
        q: &mut impl DevicePtrMut<bf16>,
        k: &mut impl DevicePtrMut<bf16>,
        pos: &impl DevicePtr<i32>,
        inv_freq: &impl DevicePtr<f32>,
        rows: usize,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        let (func, kn) = (&self.rk().rope_fwd_bf16, "rope_fwd_bf16");
        self.rope_in_place(
            func,
            kn,
            ["q", "k"],
            q,
            k,
            pos,
            inv_freq,
            rows,
            n_heads,
            n_kv_heads,
            head_dim,
        )
    }

    /// The shared launch of the in-place RoPE kernels, rope_fwd_bf16 (the rotation, above) and
    /// train_kernels.rs's rope_bwd_bf16 (the inverse rotation): `func` is one of them, `kn` its
    /// name, `names` the names of its q and k buffers (in errors).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn rope_in_place(
        &self,
        func: &CudaFunction,
        kn: &str,
        [q_name, k_name]: [&str; 2],
        q: &mut impl DevicePtrMut<bf16>,
        k: &mut impl DevicePtrMut<bf16>,
        pos: &impl DevicePtr<i32>,
        inv_freq: &impl DevicePtr<f32>,
        rows: usize,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(Error::invalid(format!(
                "{kn}: head_dim {head_dim} must be even and > 0"
            )));
        }
        check_len(q_name, kn, q.len(), rows * n_heads * head_dim, "rows*n_heads*hd")?;
        check_len(
            k_name,
            kn,
            k.len(),
            rows * n_kv_heads * head_dim,
            "rows*n_kv_heads*hd",
        )?;
        check_len("pos", kn, pos.len(), rows, "rows")?;
        check_len("inv_freq", kn, inv_freq.len(), head_dim / 2, "hd/2")?;
        let rows_i = as_i32(kn, "rows", rows)?;
        let (h, kv, hd) = (
            as_i32(kn, "n_heads", n_heads)?,
            as_i32(kn, "n_kv_heads", n_kv_heads)?,
            as_i32(kn, "hd", head_dim)?,
        );
        if rows == 0 {
            return Ok(());
        }
        let s = self.stream();
        let (qp, _q) = q.device_ptr_mut(s);
        let (kp, _k) = k.device_ptr_mut(s);
        let (pp, _p) = pos.device_ptr(s);
        let (fp, _f) = inv_freq.device_ptr(s);
        let mut l = s.launch_builder(func);
        l.arg(&qp)
            .arg(&kp)
            .arg(&pp)
            .arg(&fp)
            .arg(&rows_i)
            .arg(&h)
            .arg(&kv)
            .arg(&hd);
        let (grid, smem) = rope_launch(rows, head_dim);
        // SAFETY: rope_fwd_bf16 and rope_bwd_bf16 alike: (bf16* q, bf16* k, const int* pos,
        // const float* inv_freq, int rows, int n_heads, int n_kv_heads, int hd) (q, k = dq, dk
        // for the backward); lengths checked above; smem holds sin and cos of ROPE_ROWS rows ×
        // hd/2 pair indices.
        unsafe { l.launch(cfg((grid, 1, 1), ROPE_THREADS, smem)) }.map_err(cuda_err(kn))?;
        Ok(())
    }

    /// out = silu(gate)·up elementwise over n elements.
    pub fn swiglu_fwd_bf16(
        &self,
        gate: &impl DevicePtr<bf16>,
        up: &impl DevicePtr<bf16>,
        out: &mut impl DevicePtrMut<bf16>,
        n: usize,
    ) -> Result<()> {
        let kn = "swiglu_fwd_bf16";
        check_len("gate", kn, gate.len(), n, "n")?;
        check_len("up", kn, up.len(), n, "n")?;
        check_len("out", kn, out.len(), n, "n")?;
        if n == 0 {
            return Ok(());
        }
        let n64 = n as u64;
        let s = self.stream();
        let (o, _o) = out.device_ptr_mut(s);
        let (g, _g) = gate.device_ptr(s);
        let (u, _u) = up.device_ptr(s);
        let mut l = s.launch_builder(&self.rk().swiglu_fwd_bf16);
        l.arg(&o).arg(&g).arg(&u).arg(&n64);
        // SAFETY: (bf16* out, const bf16* gate, const bf16* up, size_t n); lengths checked.
        unsafe { l.launch(cfg((ew_vec_grid(n), 1, 1), EW_THREADS, 0)) }.map_err(cuda_err(kn))?;
        Ok(())
    }

    /// out (rows, inter) = silu(gate_up[:, :inter]) · gate_up[:, inter:], gate_up (rows, 2·inter).
    pub fn swiglu_fused_fwd_bf16(
        &self,
        gate_up: &impl DevicePtr<bf16>,
        out: &mut impl DevicePtrMut<bf16>,
        rows: usize,
        inter: usize,
    ) -> Result<()> {
        let kn = "swiglu_fused_fwd_bf16";
        check_len("gate_up", kn, gate_up.len(), rows * 2 * inter, "rows*2*inter")?;
        check_len("out", kn, out.len(), rows * inter, "rows*inter")?;
        let (rows_i, inter_i) = (as_i32(kn, "rows", rows)?, as_i32(kn, "inter", inter)?);
        if rows * inter == 0 {
            return Ok(());
        }
        let s = self.stream();
        let (o, _o) = out.device_ptr_mut(s);
        let (g, _g) = gate_up.device_ptr(s);
        let mut l = s.launch_builder(&self.rk().swiglu_fused_fwd_bf16);
        l.arg(&o).arg(&g).arg(&rows_i).arg(&inter_i);
        // SAFETY: (bf16* out, const bf16* gate_up, int rows, int inter); lengths checked.
        unsafe { l.launch(cfg((ew_vec_grid(rows * inter), 1, 1), EW_THREADS, 0)) }.map_err(cuda_err(kn))?;
        Ok(())
    }

    /// y (rows, dim) += b (dim), in place.
    pub fn add_bias_bf16(
        &self,
        y: &mut impl DevicePtrMut<bf16>,
        b: &impl DevicePtr<bf16>,
        rows: usize,
        dim: usize,
    ) -> Result<()> {
        let kn = "add_bias_bf16";
        check_len("y", kn, y.len(), rows * dim, "rows*dim")?;
        check_len("b", kn, b.len(), dim, "dim")?;
        let (rows_i, dim_i) = (as_i32(kn, "rows", rows)?, as_i32(kn, "dim", dim)?);
        if rows * dim == 0 {
            return Ok(());
        }
        let s = self.stream();
        let (yp, _y) = y.device_ptr_mut(s);
        let (bp, _b) = b.device_ptr(s);
        let mut l = s.launch_builder(&self.rk().add_bias_bf16);
        l.arg(&yp).arg(&bp).arg(&rows_i).arg(&dim_i);
        // SAFETY: (bf16* y, const bf16* b, int rows, int dim); lengths checked.
        unsafe { l.launch(cfg((ew_vec_grid(rows * dim), 1, 1), EW_THREADS, 0)) }.map_err(cuda_err(kn))?;
        Ok(())
    }

    /// x += y elementwise over n elements (the residual stream), in place.
    pub fn residual_add_bf16(
        &self,
        x: &mut impl DevicePtrMut<bf16>,
        y: &impl DevicePtr<bf16>,
        n: usize,
    ) -> Result<()> {
        let kn = "residual_add_bf16";
        check_len("x", kn, x.len(), n, "n")?;
        check_len("y", kn, y.len(), n, "n")?;
        if n == 0 {
            return Ok(());
        }
        let n64 = n as u64;
        let s = self.stream();
        let (xp, _x) = x.device_ptr_mut(s);
        let (yp, _y) = y.device_ptr(s);
        let mut l = s.launch_builder(&self.rk().residual_add_bf16);
        l.arg(&xp).arg(&yp).arg(&n64);
        // SAFETY: (bf16* x, const bf16* y, size_t n); lengths checked.
        unsafe { l.launch(cfg((ew_vec_grid(n), 1, 1), EW_THREADS, 0)) }.map_err(cuda_err(kn))?;
        Ok(())
    }

    // ---------------------------------------------------------------------------------------
    // KV cache and attention

    /// Writes k_new, v_new (rows, n_kv_heads, hd) into the paged cache at (row_seq\[r\], row_pos\[r\]).
    #[allow(clippy::too_many_arguments)]
    pub fn kv_cache_append_bf16(
        &self,
        k_cache: &mut impl DevicePtrMut<bf16>,
        v_cache: &mut impl DevicePtrMut<bf16>,
        k_new: &impl DevicePtr<bf16>,
        v_new: &impl DevicePtr<bf16>,
        block_table: &impl DevicePtr<i32>,
        row_seq: &impl DevicePtr<i32>,
        row_pos: &impl DevicePtr<i32>,
        shape: &AttnShape,
        rows: usize,
    ) -> Result<()> {
        let kn = "kv_cache_append_bf16";
        shape.check(kn)?;
        let width = shape.n_kv_heads * shape.head_dim;
        shape.check_cache(kn, k_cache.len(), v_cache.len(), block_table.len())?;
        check_len("k_new", kn, k_new.len(), rows * width, "rows*KV*hd")?;
        check_len("v_new", kn, v_new.len(), rows * width, "rows*KV*hd")?;
        check_len("row_seq", kn, row_seq.len(), rows, "rows")?;
        check_len("row_pos", kn, row_pos.len(), rows, "rows")?;
        let rows_i = as_i32(kn, "rows", rows)?;
        if rows == 0 {
            return Ok(());
        }
        let (kv, hd, ps, mp) = (
            shape.n_kv_heads as i32,
            shape.head_dim as i32,
            shape.page_size as i32,
            shape.max_pages as i32,
        );
        let s = self.stream();
        let (kc, _kc) = k_cache.device_ptr_mut(s);
        let (vc, _vc) = v_cache.device_ptr_mut(s);
        let (kp, _k) = k_new.device_ptr(s);
        let (vp, _v) = v_new.device_ptr(s);
        let (bt, _bt) = block_table.device_ptr(s);
        let (rs, _rs) = row_seq.device_ptr(s);
        let (rp, _rp) = row_pos.device_ptr(s);
        let mut l = s.launch_builder(&self.rk().kv_cache_append_bf16);
        l.arg(&kc).arg(&vc).arg(&kp).arg(&vp).arg(&bt).arg(&rs).arg(&rp);
        l.arg(&rows_i).arg(&kv).arg(&hd).arg(&ps).arg(&mp);
        // SAFETY: argument order as kernels/attention.cu kv_cache_append_bf16; host-side lengths
        // checked; row_seq/row_pos/block_table contents are the caller's contract (pos is
        // bounds-checked by the kernel, seq and page ids are not).
        unsafe { l.launch(cfg((rows as u32, 1, 1), row_block(width), 0)) }.map_err(cuda_err(kn))?;
        Ok(())
    }

    /// Decode attention: q (num_seqs, n_heads, hd) at positions seq_lens\[s\] - 1 over each
    /// sequence's cache; out (num_seqs, n_heads, hd). Flash-decoding over fixed partitions of
    /// [`DECODE_PARTITION_SIZE`] positions: the grid covers `parts` = [`decode_partitions`]`
    /// (max_len, window)` partitions, so `max_len` must be at least every seq_lens\[s\] (a
    /// sequence the grid does not cover gets NaN, never a silently wrong output); a larger
    /// `max_len` only adds blocks that exit at once, the output bits do not change. When
    /// parts > 1, `part_o` (num_seqs·n_heads·parts·hd) and `part_ml` (num_seqs·n_heads·parts·2)
    /// f32 receive the partials of sequences with more than one partition and the last block of
    /// each (sequence, head group) merges them, counting arrivals in `counters`
    /// (≥ num_seqs · [`AttnShape::decode_blocks_per_seq`] u32, zero before the first launch;
    /// every launch leaves them zero); with parts = 1 the scratch is not touched (may be a dummy).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_decode_bf16(
        &self,
        q: &impl DevicePtr<bf16>,
        k_cache: &impl DevicePtr<bf16>,
        v_cache: &impl DevicePtr<bf16>,
        block_table: &impl DevicePtr<i32>,
        seq_lens: &impl DevicePtr<i32>,
        out: &mut impl DevicePtrMut<bf16>,
        part_o: &mut impl DevicePtrMut<f32>,
        part_ml: &mut impl DevicePtrMut<f32>,
        counters: &mut impl DevicePtrMut<u32>,
        shape: &AttnShape,
        num_seqs: usize,
        max_len: usize,
    ) -> Result<()> {
        let kn = "attention_decode_bf16";
        shape.check(kn)?;
        let (h, hd) = (shape.n_heads, shape.head_dim);
        check_len("q", kn, q.len(), num_seqs * h * hd, "num_seqs*n_heads*hd")?;
        check_len("out", kn, out.len(), num_seqs * h * hd, "num_seqs*n_heads*hd")?;
        shape.check_seq_cache(kn, k_cache.len(), v_cache.len(), block_table.len(), num_seqs)?;
        check_len("seq_lens", kn, seq_lens.len(), num_seqs, "num_seqs")?;
        let cap = shape.page_size * shape.max_pages;
        let parts = decode_partitions(max_len.min(cap), shape.window);
        if parts > 65_535 {
            return Err(Error::invalid(format!(
                "{kn}: {parts} partitions of {DECODE_PARTITION_SIZE} positions exceed the grid's \
                 z limit 65535"
            )));
        }
        if parts > 1 {
            check_len(
                "part_o",
                kn,
                part_o.len(),
                num_seqs * h * parts * hd,
                "num_seqs*n_heads*parts*hd",
            )?;
            check_len(
                "part_ml",
                kn,
                part_ml.len(),
                num_seqs * h * parts * 2,
                "num_seqs*n_heads*parts*2",
            )?;
            let need = num_seqs * shape.decode_blocks_per_seq();
            if counters.len() < need {
                return Err(Error::invalid(format!(
                    "{kn}: counters has {} elements, needs {need} = num_seqs*decode_blocks_per_seq",
                    counters.len()
                )));
            }
        }
        as_i32(kn, "num_seqs·n_heads", num_seqs * h)?;
        if num_seqs == 0 {
            return Ok(());
        }
        let s = self.stream();
        let (qp, _q) = q.device_ptr(s);
        let (kc, _kc) = k_cache.device_ptr(s);
        let (vc, _vc) = v_cache.device_ptr(s);
        // The kernels read head slices with 4/8/16-byte vector loads (the CUDA-core one when
        // hd = 32·E) and copy 16-byte chunks of k/v rows (cp.async, the tensor-core ones).
        for (what, p) in [("q", qp), ("k_cache", kc), ("v_cache", vc)] {
            if p % 16 != 0 {
                return Err(Error::invalid(format!("{kn}: {what} must start 16-byte aligned")));
            }
        }
        let (bt, _bt) = block_table.device_ptr(s);
        let (sl, _sl) = seq_lens.device_ptr(s);
        let (op, _o) = out.device_ptr_mut(s);
        let (po, _po) = part_o.device_ptr_mut(s);
        let (pm, _pm) = part_ml.device_ptr_mut(s);
        let (cn, _cn) = counters.device_ptr_mut(s);
        let (h_i, kv_i, hd_i) = (h as i32, shape.n_kv_heads as i32, hd as i32);
        let (ps, mp, win, part_i) = (
            shape.page_size as i32,
            shape.max_pages as i32,
            shape.window_i32(),
            DECODE_PARTITION_SIZE as i32,
        );
        let scale = shape.scale();
        // Tensor cores for hd % 8 == 0 (the kernel compiled for the next of 64, 128, 256), the
        // CUDA-core kernel for the other head dims (hd % 4 == 0: tiny test models).
        let rk = self.rk();
        let (func, smem) = match hd {
            _ if !hd.is_multiple_of(8) => (
                &rk.attention_decode_simt_bf16,
                ATTN_WARPS * ATTN_GMAX * (hd + 2) * 4,
            ),
            0..=64 => (&rk.attention_decode_hd64_bf16, decode_mma_smem(64)),
            65..=128 => (&rk.attention_decode_hd128_bf16, decode_mma_smem(128)),
            _ => (&rk.attention_decode_hd256_bf16, decode_mma_smem(256)),
        };
        let mut l = s.launch_builder(func);
        l.arg(&op)
            .arg(&po)
            .arg(&pm)
            .arg(&cn)
            .arg(&qp)
            .arg(&kc)
            .arg(&vc)
            .arg(&bt)
            .arg(&sl);
        l.arg(&h_i)
            .arg(&kv_i)
            .arg(&hd_i)
            .arg(&ps)
            .arg(&mp)
            .arg(&win)
            .arg(&part_i)
            .arg(&scale);
        let grid = (
            num_seqs as u32,
            shape.decode_blocks_per_seq() as u32,
            parts as u32,
        );
        // SAFETY: argument order as kernels/attention.cu attention_decode_simt_bf16 and
        // attention_decode_hd*_bf16 (the same); lengths checked above (part buffers and counters
        // only when parts > 1, the only case the kernels touch them: a sequence with more than one
        // partition needs a grid of more than one); block = 4 warps as the kernels' merge
        // assumes; smem: the CUDA-core kernel's 4·8·(hd+2) f32 ≤ 33 KiB, the tensor-core
        // kernels' decode_mma_smem (36 KiB; 68 and 66 KiB at hd_max 128 and 256, opted in at
        // load).
        unsafe { l.launch(cfg(grid, (ATTN_WARPS * 32) as u32, smem as u32)) }.map_err(cuda_err(kn))?;
        Ok(())
    }

    /// Prefill attention: the rows of sequence s are q rows [cu_rows\[s\], cu_rows[s+1]) at
    /// positions pos0\[s\], pos0\[s\]+1, ...; their k, v are already in the cache. q, out
    /// (rows, n_heads, hd); cu_rows (num_seqs+1) i32; pos0 (num_seqs) i32; `max_rows` = the
    /// largest row count of one sequence (sizes the grid).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_prefill_bf16(
        &self,
        q: &impl DevicePtr<bf16>,
        k_cache: &impl DevicePtr<bf16>,
        v_cache: &impl DevicePtr<bf16>,
        block_table: &impl DevicePtr<i32>,
        cu_rows: &impl DevicePtr<i32>,
        pos0: &impl DevicePtr<i32>,
        out: &mut impl DevicePtrMut<bf16>,
        shape: &AttnShape,
        num_seqs: usize,
        rows: usize,
        max_rows: usize,
    ) -> Result<()> {
        let kn = "attention_prefill_bf16";
        shape.check(kn)?;
        let (h, hd) = (shape.n_heads, shape.head_dim);
        check_len("q", kn, q.len(), rows * h * hd, "rows*n_heads*hd")?;
        check_len("out", kn, out.len(), rows * h * hd, "rows*n_heads*hd")?;
        shape.check_seq_cache(kn, k_cache.len(), v_cache.len(), block_table.len(), num_seqs)?;
        check_len("cu_rows", kn, cu_rows.len(), num_seqs + 1, "num_seqs+1")?;
        check_len("pos0", kn, pos0.len(), num_seqs, "num_seqs")?;
        as_i32(kn, "rows", rows)?;
        if num_seqs == 0 || max_rows == 0 {
            return Ok(());
        }
        let s = self.stream();
        let (qp, _q) = q.device_ptr(s);
        let (kc, _kc) = k_cache.device_ptr(s);
        let (vc, _vc) = v_cache.device_ptr(s);
        let (bt, _bt) = block_table.device_ptr(s);
        let (cu, _cu) = cu_rows.device_ptr(s);
        let (p0, _p0) = pos0.device_ptr(s);
        let (op, _o) = out.device_ptr_mut(s);
        let (h_i, kv_i, hd_i) = (h as i32, shape.n_kv_heads as i32, hd as i32);
        let (ps, mp, win) = (shape.page_size as i32, shape.max_pages as i32, shape.window_i32());
        let scale = shape.scale();
        let mut l = s.launch_builder(&self.rk().attention_prefill_bf16);
        l.arg(&op).arg(&qp).arg(&kc).arg(&vc).arg(&bt).arg(&cu).arg(&p0);
        l.arg(&h_i)
            .arg(&kv_i)
            .arg(&hd_i)
            .arg(&ps)
            .arg(&mp)
            .arg(&win)
            .arg(&scale);
        let smem = (PREFILL_BK * 8 + (PREFILL_BQ * hd + PREFILL_BK * (hd + 2) + PREFILL_BK * hd) * 2) as u32;
        let grid = (max_rows.div_ceil(PREFILL_BQ) as u32, h as u32, num_seqs as u32);
        // SAFETY: argument order as kernels/attention.cu attention_prefill_bf16; lengths checked;
        // block = 4 warps (4 rows each of the 16-row tile); smem as the kernel's carve-up
        // (≤ 41 KiB at hd 256); hd % 4 == 0 checked by AttnShape::check.
        unsafe { l.launch(cfg(grid, (ATTN_WARPS * 32) as u32, smem)) }.map_err(cuda_err(kn))?;
        Ok(())
    }

    // ---------------------------------------------------------------------------------------
    // LoRA

    /// xa (rows, rank) f32 = x (rows, in) bf16 · A (rank, in)ᵀ f32.
    pub fn lora_xa_bf16(
        &self,
        x: &impl DevicePtr<bf16>,
        a: &impl DevicePtr<f32>,
        xa: &mut impl DevicePtrMut<f32>,
        rows: usize,
        in_dim: usize,
        rank: usize,
    ) -> Result<()> {
        let kn = "lora_xa_bf16";
        check_len("x", kn, x.len(), rows * in_dim, "rows*in")?;
        check_len("a", kn, a.len(), rank * in_dim, "rank*in")?;
        check_len("xa", kn, xa.len(), rows * rank, "rows*rank")?;
        let (r_i, in_i, k_i) = (
            as_i32(kn, "rows", rows)?,
            as_i32(kn, "in", in_dim)?,
            as_i32(kn, "rank", rank)?,
        );
        if rows * rank == 0 {
            return Ok(());
        }
        let s = self.stream();
        let (o, _o) = xa.device_ptr_mut(s);
        let (xp, _x) = x.device_ptr(s);
        let (ap, _a) = a.device_ptr(s);
        let mut l = s.launch_builder(&self.rk().lora_xa_bf16);
        l.arg(&o).arg(&xp).arg(&ap).arg(&r_i).arg(&in_i).arg(&k_i);
        // SAFETY: (float* xa, const bf16* x, const float* a, int rows, int in, int rank);
        // lengths checked; block is whole warps (≤ 8, the kernel's bound 256), grid.x·4 ≥ rows
        // and grid.y·warps ≥ rank (one warp per (4 rows, j)).
        unsafe { l.launch(lora_xa_cfg(rows, rank)) }.map_err(cuda_err(kn))?;
        Ok(())
    }

    /// y (rows, out) bf16 += scale · xa (rows, rank) · B (out, rank)ᵀ, B f32.
    #[allow(clippy::too_many_arguments)]
    pub fn lora_expand_add_bf16(
        &self,
        y: &mut impl DevicePtrMut<bf16>,
        xa: &impl DevicePtr<f32>,
        b: &impl DevicePtr<f32>,
        scale: f32,
        rows: usize,
        out_dim: usize,
        rank: usize,
    ) -> Result<()> {
        let kn = "lora_expand_add_bf16";
        check_len("y", kn, y.len(), rows * out_dim, "rows*out")?;
        check_len("xa", kn, xa.len(), rows * rank, "rows*rank")?;
        check_len("b", kn, b.len(), out_dim * rank, "out*rank")?;
        let (r_i, o_i, k_i) = (
            as_i32(kn, "rows", rows)?,
            as_i32(kn, "out", out_dim)?,
            as_i32(kn, "rank", rank)?,
        );
        if rows * out_dim == 0 {
            return Ok(());
        }
        let s = self.stream();
        let (yp, _y) = y.device_ptr_mut(s);
        let (xp, _x) = xa.device_ptr(s);
        let (bp, _b) = b.device_ptr(s);
        let mut l = s.launch_builder(&self.rk().lora_expand_add_bf16);
        l.arg(&yp)
            .arg(&xp)
            .arg(&bp)
            .arg(&scale)
            .arg(&r_i)
            .arg(&o_i)
            .arg(&k_i);
        let launch = lora_expand_cfg(kn, rows, out_dim, 1, rank)?;
        // SAFETY: (bf16* y, const float* xa, const float* b, float scale, int rows, int out,
        // int rank); lengths checked; grid.x·128 ≥ out and grid.y·32 ≥ rows with the kernel
        // bounding both; block 128 (the kernel's bound); shared memory as lora_expand_tile's
        // carve-up (≤ 16 KiB at rank 64).
        unsafe { l.launch(launch) }.map_err(cuda_err(kn))?;
        Ok(())
    }

    // ---------------------------------------------------------------------------------------
    // Sampling and log-probs

    /// `crate::sampling::uniform(seed[i], stream[i], step[i])` on the device (RNG parity checks).
    pub fn sampling_uniform_f32_host(&self, seed: &[u64], stream: &[u64], step: &[u64]) -> Result<Vec<f32>> {
        let kn = "sampling_uniform_f32";
        let n = seed.len();
        check_len("stream", kn, stream.len(), n, "n")?;
        check_len("step", kn, step.len(), n, "n")?;
        let n_i = as_i32(kn, "n", n)?;
        let mut out = self.alloc_zeros::<f32>(n.max(1))?;
        if n > 0 {
            let (sd, st, sp) = (self.upload(seed)?, self.upload(stream)?, self.upload(step)?);
            let s = self.stream();
            let (o, _o) = out.device_ptr_mut(s);
            let (a, _a) = sd.device_ptr(s);
            let (b, _b) = st.device_ptr(s);
            let (c, _c) = sp.device_ptr(s);
            let mut l = s.launch_builder(&self.rk().sampling_uniform_f32);
            l.arg(&o).arg(&a).arg(&b).arg(&c).arg(&n_i);
            // SAFETY: (float* out, const u64* seed, const u64* stream, const u64* step, int n).
            unsafe { l.launch(cfg((n.div_ceil(256) as u32, 1, 1), 256, 0)) }.map_err(cuda_err(kn))?;
        }
        let mut v = self.download(&out)?;
        v.truncate(n);
        Ok(v)
    }

    /// Samples one token per row of logits (rows, vocab) f32 with per-row parameters, exactly
    /// as `crate::sampling::Sampler::sample` (see kernels/sampling.cu for where float sums
    /// differ). tokens (rows) u32, logprobs (rows) f32; an invalid row gets u32::MAX and NaN.
    /// `scratch` holds at least [`sample_scratch_len`]`(rows, vocab)` f64 (the fast path's
    /// per-chunk sums and maxima; its contents need not survive between calls).
    ///
    /// Four launches whatever the parameters (so a captured graph serves any of them): the
    /// single-block kernel for rows with top-k or top-p, then the fast path's three kernels
    /// for greedy rows and rows with neither (min-p allowed); each kernel skips the other's rows.
    #[allow(clippy::too_many_arguments)]
    pub fn sample_tokens_f32(
        &self,
        logits: &impl DevicePtr<f32>,
        params: &SamplingParamsDev,
        scratch: &mut impl DevicePtrMut<f64>,
        tokens: &mut impl DevicePtrMut<u32>,
        logprobs: &mut impl DevicePtrMut<f32>,
        rows: usize,
        vocab: usize,
    ) -> Result<()> {
        let k = self.rk();
        let fs = SampleFns {
            single: &k.sample_tokens_f32,
            max: &k.sample_fast_max_f32,
            sum: &k.sample_fast_sum_f32,
            pick: &k.sample_fast_pick_f32,
        };
        let sc = SampleCall {
            kn: "sample_tokens_f32",
            params,
            rows,
            vocab,
            single_block: false,
        };
        self.launch_sample(&fs, &sc, logits, scratch, tokens, logprobs)
    }

    /// As [`Self::sample_tokens_f32`] with bf16 logits.
    #[allow(clippy::too_many_arguments)]
    pub fn sample_tokens_bf16(
        &self,
        logits: &impl DevicePtr<bf16>,
        params: &SamplingParamsDev,
        scratch: &mut impl DevicePtrMut<f64>,
        tokens: &mut impl DevicePtrMut<u32>,
        logprobs: &mut impl DevicePtrMut<f32>,
        rows: usize,
        vocab: usize,
    ) -> Result<()> {
        let k = self.rk();
        let fs = SampleFns {
            single: &k.sample_tokens_bf16,
            max: &k.sample_fast_max_bf16,
            sum: &k.sample_fast_sum_bf16,
            pick: &k.sample_fast_pick_bf16,
        };
        let sc = SampleCall {
            kn: "sample_tokens_bf16",
            params,
            rows,
            vocab,
            single_block: false,
        };
        self.launch_sample(&fs, &sc, logits, scratch, tokens, logprobs)
    }

    fn launch_sample<T>(
        &self,
        fs: &SampleFns<'_>,
        c: &SampleCall<'_>,
        logits: &impl DevicePtr<T>,
        scratch: &mut impl DevicePtrMut<f64>,
        tokens: &mut impl DevicePtrMut<u32>,
        logprobs: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let (kn, params, rows, vocab) = (c.kn, c.params, c.rows, c.vocab);
        if vocab == 0 {
            return Err(Error::invalid(format!("{kn}: vocab must be > 0")));
        }
        check_len("logits", kn, logits.len(), rows * vocab, "rows*vocab")?;
        if params.rows() < rows {
            return Err(Error::invalid(format!(
                "{kn}: sampling params hold {} rows, fewer than the {rows} rows to sample",
                params.rows()
            )));
        }
        check_len("tokens", kn, tokens.len(), rows, "rows")?;
        check_len("logprobs", kn, logprobs.len(), rows, "rows")?;
        let need = sample_scratch_len(rows, vocab);
        if scratch.len() < need {
            return Err(Error::invalid(format!(
                "{kn}: scratch has {} f64, needs {need} (3·rows·ceil(vocab/{SAMPLE_CHUNK}))",
                scratch.len()
            )));
        }
        let (r_i, v_i) = (as_i32(kn, "rows", rows)?, as_i32(kn, "vocab", vocab)?);
        let chunk_blocks = as_i32(kn, "rows·chunks", rows * vocab.div_ceil(SAMPLE_CHUNK))? as u32;
        if rows == 0 {
            return Ok(());
        }
        let s = self.stream();
        let (tp, _t) = tokens.device_ptr_mut(s);
        let (lp, _l) = logprobs.device_ptr_mut(s);
        let (sp, _s) = scratch.device_ptr_mut(s);
        let (xp, _x) = logits.device_ptr(s);
        let (a, _a) = params.temperature.device_ptr(s);
        let (b, _b) = params.top_k.device_ptr(s);
        let (cp, _c) = params.top_p.device_ptr(s);
        let (d, _d) = params.min_p.device_ptr(s);
        let (e, _e) = params.seed.device_ptr(s);
        let (f, _f) = params.stream.device_ptr(s);
        let (g, _g) = params.step.device_ptr(s);
        let skip_fast: i32 = if c.single_block { 0 } else { 1 };
        let mut l = s.launch_builder(fs.single);
        l.arg(&tp)
            .arg(&lp)
            .arg(&xp)
            .arg(&a)
            .arg(&b)
            .arg(&cp)
            .arg(&d)
            .arg(&e)
            .arg(&f)
            .arg(&g);
        l.arg(&r_i).arg(&v_i).arg(&skip_fast);
        // SAFETY: argument order as kernels/sampling.cu sample_tokens_*; every per-row buffer has
        // `rows` elements (checked); block = SAMPLE_THREADS ≤ 1024 as the kernel's chunk table needs.
        unsafe { l.launch(cfg((rows as u32, 1, 1), SAMPLE_THREADS, 0)) }.map_err(cuda_err(kn))?;
        if c.single_block {
            return Ok(());
        }
        for func in [fs.max, fs.sum] {
            let mut l = s.launch_builder(func);
            l.arg(&sp).arg(&xp).arg(&a).arg(&b).arg(&cp).arg(&d);
            l.arg(&r_i).arg(&v_i);
            // SAFETY: (double* scratch, const T* logits, const float* temperature, const int*
            // top_k, const float* top_p, const float* min_p, int rows, int vocab); scratch holds
            // 3·rows·nc f64 (checked); grid = rows·nc blocks of SAMPLE_CHUNK_THREADS as the
            // kernels index them; max before sum in stream order.
            unsafe { l.launch(cfg((chunk_blocks, 1, 1), SAMPLE_CHUNK_THREADS, 0)) }.map_err(cuda_err(kn))?;
        }
        let mut l = s.launch_builder(fs.pick);
        l.arg(&tp)
            .arg(&lp)
            .arg(&sp)
            .arg(&xp)
            .arg(&a)
            .arg(&b)
            .arg(&cp)
            .arg(&d)
            .arg(&e)
            .arg(&f)
            .arg(&g);
        l.arg(&r_i).arg(&v_i);
        // SAFETY: argument order as kernels/sampling.cu sample_fast_pick_*; per-row buffers and
        // scratch checked above; grid = rows blocks of SAMPLE_CHUNK_THREADS.
        unsafe { l.launch(cfg((rows as u32, 1, 1), SAMPLE_CHUNK_THREADS, 0)) }.map_err(cuda_err(kn))?;
        Ok(())
    }

    /// Test convenience: uploads f32 logits (rows, vocab) and per-row params, samples, returns
    /// (tokens, logprobs).
    pub fn sample_tokens_f32_host(
        &self,
        logits: &[f32],
        params: &[SamplingParams],
        streams: &[u64],
        steps: &[u64],
        vocab: usize,
    ) -> Result<(Vec<u32>, Vec<f32>)> {
        let x = self.upload(logits)?;
        self.sample_host(&x, params, streams, steps, vocab, false, false)
    }

    /// Test convenience for [`Self::sample_tokens_bf16`]: logits rounded to bf16 on upload.
    pub fn sample_tokens_bf16_host(
        &self,
        logits: &[f32],
        params: &[SamplingParams],
        streams: &[u64],
        steps: &[u64],
        vocab: usize,
    ) -> Result<(Vec<u32>, Vec<f32>)> {
        let x = self.upload_bf16(logits)?;
        self.sample_host(&x, params, streams, steps, vocab, true, false)
    }

    /// As [`Self::sample_tokens_f32_host`] (`bf16`: logits rounded to bf16 on upload) with every
    /// row sampled by the single-block kernel alone, fast-path rows included: the reference the
    /// fast path is compared with.
    pub fn sample_tokens_single_block_host(
        &self,
        logits: &[f32],
        params: &[SamplingParams],
        streams: &[u64],
        steps: &[u64],
        vocab: usize,
        bf16: bool,
    ) -> Result<(Vec<u32>, Vec<f32>)> {
        if bf16 {
            let x = self.upload_bf16(logits)?;
            self.sample_host(&x, params, streams, steps, vocab, true, true)
        } else {
            let x = self.upload(logits)?;
            self.sample_host(&x, params, streams, steps, vocab, false, true)
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn sample_host<T>(
        &self,
        x: &CudaSlice<T>,
        params: &[SamplingParams],
        streams: &[u64],
        steps: &[u64],
        vocab: usize,
        bf16: bool,
        single_block: bool,
    ) -> Result<(Vec<u32>, Vec<f32>)> {
        let rows = params.len();
        if rows == 0 {
            return Ok((Vec::new(), Vec::new()));
        }
        let p = SamplingParamsDev::upload(self, params, streams, steps)?;
        let mut t = self.alloc_zeros::<u32>(rows)?;
        let mut lp = self.alloc_zeros::<f32>(rows)?;
        let mut scratch = self.alloc_zeros::<f64>(sample_scratch_len(rows, vocab).max(1))?;
        let k = self.rk();
        let fs = if bf16 {
            SampleFns {
                single: &k.sample_tokens_bf16,
                max: &k.sample_fast_max_bf16,
                sum: &k.sample_fast_sum_bf16,
                pick: &k.sample_fast_pick_bf16,
            }
        } else {
            SampleFns {
                single: &k.sample_tokens_f32,
                max: &k.sample_fast_max_f32,
                sum: &k.sample_fast_sum_f32,
                pick: &k.sample_fast_pick_f32,
            }
        };
        let sc = SampleCall {
            kn: if bf16 {
                "sample_tokens_bf16"
            } else {
                "sample_tokens_f32"
            },
            params: &p,
            rows,
            vocab,
            single_block,
        };
        self.launch_sample(&fs, &sc, x, &mut scratch, &mut t, &mut lp)?;
        Ok((self.download(&t)?, self.download(&lp)?))
    }

    /// logprobs\[r\] = log_softmax(logits\[r\] / T)[targets\[r\]] and entropy\[r\] of softmax(logits\[r\] / T);
    /// logits (rows, vocab) f32, targets (rows) u32 (out of range → NaN).
    #[allow(clippy::too_many_arguments)]
    pub fn logprob_gather_f32(
        &self,
        logits: &impl DevicePtr<f32>,
        targets: &impl DevicePtr<u32>,
        logprobs: &mut impl DevicePtrMut<f32>,
        entropy: &mut impl DevicePtrMut<f32>,
        rows: usize,
        vocab: usize,
        temperature: f32,
    ) -> Result<()> {
        let f = &self.rk().logprob_gather_f32;
        self.launch_gather(
            f,
            "logprob_gather_f32",
            logits,
            targets,
            logprobs,
            entropy,
            rows,
            vocab,
            temperature,
        )
    }

    /// As [`Self::logprob_gather_f32`] with bf16 logits.
    #[allow(clippy::too_many_arguments)]
    pub fn logprob_gather_bf16(
        &self,
        logits: &impl DevicePtr<bf16>,
        targets: &impl DevicePtr<u32>,
        logprobs: &mut impl DevicePtrMut<f32>,
        entropy: &mut impl DevicePtrMut<f32>,
        rows: usize,
        vocab: usize,
        temperature: f32,
    ) -> Result<()> {
        let f = &self.rk().logprob_gather_bf16;
        self.launch_gather(
            f,
            "logprob_gather_bf16",
            logits,
            targets,
            logprobs,
            entropy,
            rows,
            vocab,
            temperature,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn launch_gather<T>(
        &self,
        func: &CudaFunction,
        kn: &str,
        logits: &impl DevicePtr<T>,
        targets: &impl DevicePtr<u32>,
        logprobs: &mut impl DevicePtrMut<f32>,
        entropy: &mut impl DevicePtrMut<f32>,
        rows: usize,
        vocab: usize,
        temperature: f32,
    ) -> Result<()> {
        if vocab == 0 {
            return Err(Error::invalid(format!("{kn}: vocab must be > 0")));
        }
        if !(temperature > 0.0 && temperature.is_finite()) {
            return Err(Error::invalid(format!(
                "{kn}: temperature must be finite and > 0, got {temperature}"
            )));
        }
        check_len("logits", kn, logits.len(), rows * vocab, "rows*vocab")?;
        check_len("targets", kn, targets.len(), rows, "rows")?;
        check_len("logprobs", kn, logprobs.len(), rows, "rows")?;
        check_len("entropy", kn, entropy.len(), rows, "rows")?;
        let (r_i, v_i) = (as_i32(kn, "rows", rows)?, as_i32(kn, "vocab", vocab)?);
        if rows == 0 {
            return Ok(());
        }
        let s = self.stream();
        let (lp, _lp) = logprobs.device_ptr_mut(s);
        let (en, _en) = entropy.device_ptr_mut(s);
        let (xp, _x) = logits.device_ptr(s);
        let (tg, _tg) = targets.device_ptr(s);
        let mut l = s.launch_builder(func);
        l.arg(&lp)
            .arg(&en)
            .arg(&xp)
            .arg(&tg)
            .arg(&temperature)
            .arg(&r_i)
            .arg(&v_i);
        // SAFETY: (float* logprobs, float* entropy, const T* logits, const u32* targets,
        // float temperature, int rows, int vocab); lengths checked; block is whole warps.
        unsafe { l.launch(cfg((rows as u32, 1, 1), row_block(vocab), 0)) }.map_err(cuda_err(kn))?;
        Ok(())
    }

    /// Test convenience: (logprobs, entropy) for f32 host logits (rows, vocab).
    pub fn logprob_gather_f32_host(
        &self,
        logits: &[f32],
        targets: &[u32],
        vocab: usize,
        temperature: f32,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let rows = targets.len();
        let x = self.upload(logits)?;
        let t = self.upload(&targets_or_dummy(targets))?;
        let mut lp = self.alloc_zeros::<f32>(rows.max(1))?;
        let mut en = self.alloc_zeros::<f32>(rows.max(1))?;
        if rows > 0 {
            self.logprob_gather_f32(&x, &t, &mut lp, &mut en, rows, vocab, temperature)?;
        }
        let (mut lp, mut en) = (self.download(&lp)?, self.download(&en)?);
        lp.truncate(rows);
        en.truncate(rows);
        Ok((lp, en))
    }

    /// Test convenience for [`Self::logprob_gather_bf16`]: logits rounded to bf16 on upload.
    pub fn logprob_gather_bf16_host(
        &self,
        logits: &[f32],
        targets: &[u32],
        vocab: usize,
        temperature: f32,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let rows = targets.len();
        let x = self.upload_bf16(logits)?;
        let t = self.upload(&targets_or_dummy(targets))?;
        let mut lp = self.alloc_zeros::<f32>(rows.max(1))?;
        let mut en = self.alloc_zeros::<f32>(rows.max(1))?;
        if rows > 0 {
            self.logprob_gather_bf16(&x, &t, &mut lp, &mut en, rows, vocab, temperature)?;
        }
        let (mut lp, mut en) = (self.download(&lp)?, self.download(&en)?);
        lp.truncate(rows);
        en.truncate(rows);
        Ok((lp, en))
    }
}

/// cudarc cannot copy an empty slice; zero rows still uploads one dummy target.
fn targets_or_dummy(targets: &[u32]) -> Vec<u32> {
    if targets.is_empty() {
        vec![0]
    } else {
        targets.to_vec()
    }
}

/// Host conveniences for tests: f32 host data rounded to bf16 on upload, bf16 results returned
/// as f32 (exact). Empty inputs are not supported (cudarc cannot copy empty slices).
impl CudaDevice {
    /// [`Self::embedding_fwd_bf16`] on host data: table (vocab, dim), ids (rows).
    pub fn embedding_fwd_bf16_host(&self, table: &[f32], ids: &[u32], dim: usize) -> Result<Vec<f32>> {
        let t = self.upload_bf16(table)?;
        let i = self.upload(ids)?;
        let mut out = self.alloc_zeros::<bf16>(ids.len() * dim)?;
        self.embedding_fwd_bf16(&t, &i, &mut out, ids.len(), dim, table.len() / dim.max(1))?;
        self.download_bf16(&out)
    }

    /// [`Self::rope_fwd_bf16`] on host data; returns (q, k) rotated.
    #[allow(clippy::too_many_arguments)]
    pub fn rope_fwd_bf16_host(
        &self,
        q: &[f32],
        k: &[f32],
        pos: &[i32],
        inv_freq: &[f32],
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let mut qd = self.upload_bf16(q)?;
        let mut kd = self.upload_bf16(k)?;
        let p = self.upload(pos)?;
        let f = self.upload(inv_freq)?;
        self.rope_fwd_bf16(&mut qd, &mut kd, &p, &f, pos.len(), n_heads, n_kv_heads, head_dim)?;
        Ok((self.download_bf16(&qd)?, self.download_bf16(&kd)?))
    }

    /// [`Self::swiglu_fwd_bf16`] on host data.
    pub fn swiglu_fwd_bf16_host(&self, gate: &[f32], up: &[f32]) -> Result<Vec<f32>> {
        let (g, u) = (self.upload_bf16(gate)?, self.upload_bf16(up)?);
        let mut out = self.alloc_zeros::<bf16>(gate.len())?;
        self.swiglu_fwd_bf16(&g, &u, &mut out, gate.len())?;
        self.download_bf16(&out)
    }

    /// [`Self::swiglu_fused_fwd_bf16`] on host data: gate_up (rows, 2·inter).
    pub fn swiglu_fused_fwd_bf16_host(&self, gate_up: &[f32], rows: usize, inter: usize) -> Result<Vec<f32>> {
        let g = self.upload_bf16(gate_up)?;
        let mut out = self.alloc_zeros::<bf16>(rows * inter)?;
        self.swiglu_fused_fwd_bf16(&g, &mut out, rows, inter)?;
        self.download_bf16(&out)
    }

    /// [`Self::add_bias_bf16`] on host data: returns y + b per row.
    pub fn add_bias_bf16_host(&self, y: &[f32], b: &[f32]) -> Result<Vec<f32>> {
        let mut yd = self.upload_bf16(y)?;
        let bd = self.upload_bf16(b)?;
        self.add_bias_bf16(&mut yd, &bd, y.len() / b.len(), b.len())?;
        self.download_bf16(&yd)
    }

    /// [`Self::residual_add_bf16`] on host data: returns x + y.
    pub fn residual_add_bf16_host(&self, x: &[f32], y: &[f32]) -> Result<Vec<f32>> {
        let mut xd = self.upload_bf16(x)?;
        let yd = self.upload_bf16(y)?;
        self.residual_add_bf16(&mut xd, &yd, x.len())?;
        self.download_bf16(&xd)
    }

    /// Appends k_new, v_new (rows, KV, hd) at (row_seq, row_pos) into host caches
    /// (num_pages, page_size, KV, hd) through [`Self::kv_cache_append_bf16`]; returns the caches.
    #[allow(clippy::too_many_arguments)]
    pub fn kv_cache_append_bf16_host(
        &self,
        k_cache: &[f32],
        v_cache: &[f32],
        k_new: &[f32],
        v_new: &[f32],
        block_table: &[i32],
        row_seq: &[i32],
        row_pos: &[i32],
        shape: &AttnShape,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let (mut kc, mut vc) = (self.upload_bf16(k_cache)?, self.upload_bf16(v_cache)?);
        let (kn, vn) = (self.upload_bf16(k_new)?, self.upload_bf16(v_new)?);
        let (bt, rs, rp) = (
            self.upload(block_table)?,
            self.upload(row_seq)?,
            self.upload(row_pos)?,
        );
        self.kv_cache_append_bf16(&mut kc, &mut vc, &kn, &vn, &bt, &rs, &rp, shape, row_seq.len())?;
        Ok((self.download_bf16(&kc)?, self.download_bf16(&vc)?))
    }

    /// [`Self::attention_decode_bf16`] on host data, the grid sized for sequences of up to
    /// `max_len` positions (scratch allocated here).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_decode_bf16_host(
        &self,
        q: &[f32],
        k_cache: &[f32],
        v_cache: &[f32],
        block_table: &[i32],
        seq_lens: &[i32],
        shape: &AttnShape,
        max_len: usize,
    ) -> Result<Vec<f32>> {
        let num_seqs = seq_lens.len();
        let (qd, kc, vc) = (
            self.upload_bf16(q)?,
            self.upload_bf16(k_cache)?,
            self.upload_bf16(v_cache)?,
        );
        let (bt, sl) = (self.upload(block_table)?, self.upload(seq_lens)?);
        let mut out = self.alloc_zeros::<bf16>(q.len())?;
        let parts = decode_partitions(max_len.min(shape.page_size * shape.max_pages), shape.window);
        let part = if parts > 1 {
            num_seqs * shape.n_heads * parts
        } else {
            1
        };
        let mut part_o = self.alloc_zeros::<f32>(part * shape.head_dim)?;
        let mut part_ml = self.alloc_zeros::<f32>(part * 2)?;
        let mut counters = self.alloc_zeros::<u32>((num_seqs * shape.decode_blocks_per_seq()).max(1))?;
        self.attention_decode_bf16(
            &qd,
            &kc,
            &vc,
            &bt,
            &sl,
            &mut out,
            &mut part_o,
            &mut part_ml,
            &mut counters,
            shape,
            num_seqs,
            max_len,
        )?;
        self.download_bf16(&out)
    }

    /// [`Self::attention_prefill_bf16`] on host data: cu_rows (num_seqs+1), pos0 (num_seqs).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_prefill_bf16_host(
        &self,
        q: &[f32],
        k_cache: &[f32],
        v_cache: &[f32],
        block_table: &[i32],
        cu_rows: &[i32],
        pos0: &[i32],
        shape: &AttnShape,
    ) -> Result<Vec<f32>> {
        let num_seqs = pos0.len();
        let rows = q.len() / (shape.n_heads * shape.head_dim);
        let max_rows = cu_rows
            .windows(2)
            .map(|w| (w[1] - w[0]).max(0) as usize)
            .max()
            .unwrap_or(0);
        let (qd, kc, vc) = (
            self.upload_bf16(q)?,
            self.upload_bf16(k_cache)?,
            self.upload_bf16(v_cache)?,
        );
        let (bt, cu, p0) = (
            self.upload(block_table)?,
            self.upload(cu_rows)?,
            self.upload(pos0)?,
        );
        let mut out = self.alloc_zeros::<bf16>(q.len())?;
        self.attention_prefill_bf16(
            &qd, &kc, &vc, &bt, &cu, &p0, &mut out, shape, num_seqs, rows, max_rows,
        )?;
        self.download_bf16(&out)
    }

    /// The LoRA path on host data: y (rows, out) + scale · (x Aᵀ) Bᵀ through
    /// [`Self::lora_xa_bf16`] and [`Self::lora_expand_add_bf16`]; A (rank, in), B (out, rank) f32.
    #[allow(clippy::too_many_arguments)]
    pub fn lora_bf16_host(
        &self,
        y: &[f32],
        x: &[f32],
        a: &[f32],
        b: &[f32],
        scale: f32,
        rows: usize,
        in_dim: usize,
        out_dim: usize,
        rank: usize,
    ) -> Result<Vec<f32>> {
        let (mut yd, xd) = (self.upload_bf16(y)?, self.upload_bf16(x)?);
        let (ad, bd) = (self.upload(a)?, self.upload(b)?);
        let mut xa_buf = self.alloc_zeros::<f32>((rows * rank).max(1))?;
        {
            let mut xa = xa_buf.slice_mut(..rows * rank);
            self.lora_xa_bf16(&xd, &ad, &mut xa, rows, in_dim, rank)?;
            self.lora_expand_add_bf16(&mut yd, &xa, &bd, scale, rows, out_dim, rank)?;
        }
        self.download_bf16(&yd)
    }
}
