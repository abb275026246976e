//! The CUDA rollout engine: [`CudaEngine`] implements [`crate::engine::Engine`] (generate,
//! score, set_adapter) on one GPU from the launchers of `rollout.rs`/`kernels.rs` and cuBLAS.
//! It owns the device copies of the weights (bf16), of the live LoRA adapter (f32), and one
//! memory plan's buffers (paged KV cache, activations, logits, sampling outputs) with the
//! decode-step CUDA graphs captured against them. It does not own any math of its own: every
//! op is a launcher tested against the CPU reference, and the CPU engine
//! (`crate::cpu::engine`) is the oracle for its tokens and log-probabilities.
//!
//! Semantics match the CPU engine exactly: prompts are processed in chunks of
//! `max_batch_seqs / G` prompts; each prompt is prefilled once and its G samples share its KV
//! pages (when G > max_batch_seqs, or a chunk does not fit the free memory or the budget, fewer
//! prompts and then slices of one prompt's samples, the prompt prefilled per slice:
//! [`generate_chunks`]); sample g of prompt i draws from stream `first_stream` + i·G + g at
//! step = tokens generated so far, so the chunking changes no sample;
//! stop checks (EOS, stop strings, max_new_tokens, context) run on the host after every token,
//! and a sequence that stopped leaves the batch (it costs no more compute).
//!
//! # Decode steps as CUDA graphs
//!
//! A decode step is ~700 launches (24 layers × norms, 7 GEMMs, biases, RoPE, KV append,
//! attention, LoRA, residuals, SwiGLU), which alone would cost milliseconds; so the whole
//! step — unstaging its inputs, the forward from the embedding to the logits, and the sampler —
//! is captured once into a CUDA graph and replayed (`run_decode_step`):
//! - Buckets: the active sequences are padded to [`decode_bucket`] rows (1, 2, 4, 8, 16, 32,
//!   48, …), one graph per bucket, captured lazily: a bucket's first step runs eagerly (it
//!   loads every kernel and lets cuBLAS choose its kernels outside a capture), its second is
//!   captured and replayed, later ones replay. Graphs live in the plan's `Buffers` (dropped
//!   when those are re-allocated) and are cleared when `adapter_key` changes (the adapter's
//!   buffers, rank or scale; its values are read from the buffers at replay).
//! - Padded rows: token 0 at position −1 with length 0, every block-table entry the scratch
//!   page ([`stage_decode_rows`]): the KV append skips them, attention reads nothing, their
//!   logits and tokens are computed and ignored. Rows never mix in any kernel but the GEMMs.
//! - Everything that changes per step sits in device buffers at fixed addresses, written by one
//!   host→device copy from a pinned staging buffer ([`DecodeStaging`]: ids, positions, row
//!   sequences, lengths, sampling streams/steps, block tables) and unstaged by device copies
//!   inside the graph; sampling parameters are filled once per call. Kernel arguments depend
//!   only on the bucket and the plan: the attention grid covers the block-table span
//!   (fixed-size partitions: blocks past a sequence's length exit), so a graph serves every
//!   step of its bucket. Tokens and logprobs come back with one copy into pinned memory.
//! - The eager path runs the same launches one by one: `RFT_CUDA_GRAPHS=0` (or
//!   [`CudaEngine::cuda_graphs`] = false, or `RFT_CUDA_DEBUG=1`) forces it, and a failed capture
//!   falls back to it (one line on stderr; [`GenerateStats::graph_error`]). Graph and eager give
//!   bit-identical results (tests/cuda_engine.rs `cuda_engine_graphs_match_eager`).
//!
//! Decode GEMMs: up to 64 rows, each GEMM shape runs either cuBLAS or kernels/gemm.cu's skinny
//! tensor-core GEMM, whichever was timed faster for that exact shape the first time it ran
//! (the bucket's eager step, src/cuda/gemm.rs; `RFT_SKINNY_GEMM=0` keeps cuBLAS, `=1` forces the
//! skinny kernel); the choice is kept per device, so the graph captured next replays it.
//!
//! Batch invariance: every kernel but cuBLAS's GEMMs is per row or per sequence with a
//! summation order fixed by that row (decode attention: fixed 128-position partitions; the
//! skinny GEMM: fixed by the shape and its split count), and the sampler's randomness is
//! (seed, stream, step). So a sequence's numbers do not depend on the others in its batch,
//! except through the GEMM kernel picked for the bucket's row count (cuBLAS's own choice, or
//! cuBLAS vs the skinny kernel), which may sum in another order (bf16-rounding differences, a
//! different token only at a near-tie of the sampled distribution). Equal tokens across batch
//! sizes are asserted on the fixture models, not guaranteed in general.
//!
//! # First GPU run checklist
//!
//! 1. Here: `scripts/gpu_pack.sh` (it writes `.gpu/extra.sh`: the GPU tests with
//!    `RFT_REQUIRE_GPU=1`, the generate smoke test, the rollout benches, one of them also with
//!    `RFT_CUDA_GRAPHS=0`). There (carry `.gpu`): `SKIP_BENCH=1 bash .gpu/go.sh`. Look first at
//!    the `cuda_engine ...` lines: every test prints what it compared (steps, worst |Δlogit| /
//!    |Δlogprob|, graph steps replayed).
//! 2. If *everything* fails at load: the message names the step (context, stream, fatbin,
//!    cuBLAS and its workspace, a tensor). cuBLAS missing → `LD_LIBRARY_PATH=/usr/local/cuda/lib64`.
//! 3. Graph or kernel? Rerun the failing test or command with `RFT_CUDA_GRAPHS=0`: if it then
//!    passes, the problem is capture/replay (a per-step value frozen into the graph instead of
//!    staged, a buffer re-allocated under a cached graph, cuBLAS refusing capture — the stderr
//!    line and `graph_error` in the bench JSON say so); if it still fails, it is a kernel or the
//!    paging, go on below. `cuda_engine_graphs_match_eager` compares the two directly.
//! 4. If tokens differ from step 0 on every model: the GEMM operand order (`gemm_raw`) is the
//!    first suspect; `RFT_CUDA_DEBUG=1` (eager) prints, per forward, the max |x| of the residual
//!    stream after every layer and of the logits (NaN/inf → the first layer that shows it is the
//!    bug). `cuda_engine_score_matches_cpu` isolates the forward from sampling and paging.
//! 5. If generate fails but score passes: paging (block tables, the partial-page copy in
//!    `copy_partial_pages`) or the decode kernel (tests/cuda_rollout_kernels.rs
//!    `attention_decode_bf16_matches_cpu`, also alone-vs-batch bit equality). Run with
//!    `--batch-size 1` (one sequence, no sharing) vs larger to tell them apart.
//! 6. A kernel fault shows up at the next synchronizing call (the per-step readback); rerun with
//!    `CUDA_LAUNCH_BLOCKING=1 RFT_CUDA_GRAPHS=0` to attribute it to the launch that caused it
//!    (inside a graph every launch is one replay).
//! 7. Then speed: `.gpu/bin/rft bench rollout --shape qwen2.5-0.5b --prompts 8
//!    --num-generations 8 --prompt-len 128 --new-tokens 256 --json` (`cuda_graphs`,
//!    `graph_steps`, `decode_ms_per_step`); the same with `RFT_CUDA_GRAPHS=0` shows what the
//!    graphs save.
//!
//! # Memory
//!
//! [`MemoryPlan`] sizes every device buffer from the request (sequences, longest prompt, new
//! tokens; for score: the items) once per call; buffers are kept and grown (re-allocated
//! whole, before any forward; the decode graphs go with them) when a later call needs more.
//! Nothing is allocated inside the decode loop: each step writes its inputs into the pinned
//! staging buffer, copies them to the device in one piece, and reads back tokens and logprobs
//! in one piece. Padded rows use the planned rows (the largest bucket is `max_seqs`), the
//! scratch page is one extra KV page, and the pinned host buffers are counted in
//! [`MemoryPlan::pinned_host_bytes`]; the cuBLAS workspace (32 MiB) and the skinny GEMM's
//! split-K scratch (8 MiB + 16 KiB, allocated at its first split-K launch) belong to the device.
//!
//! KV cache: per layer, k and v of (num_pages + 1, PAGE_SIZE, KV, hd) bf16. Pages are assigned
//! on the host before the chunk starts: first every prompt's pages (ceil(P/16)), then each
//! sample's own pages for positions from floor(P/16)·16 on; the last page is the scratch page.
//! A sample's block table points at its prompt's full pages (shared), then at its own pages,
//! then at the scratch page; the prompt's last partial page is copied into the sample's first
//! own page after prefill (`copy_partial_pages`).

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::cublas::CudaBlas;
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{
    CudaGraph, CudaSlice, CudaView, DevicePtr, DevicePtrMut, DeviceRepr, PinnedHostSlice, PushKernelArg,
};
use half::bf16;
use std::ffi::c_void;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use super::{cuda_err, AttnShape, CudaDevice, SamplingParamsDev};
use crate::engine::{Decode, Engine, Rollout};
use crate::lora::LoraWeights;
use crate::model::config::ModelConfig;
use crate::model::weights::{Checkpoint, Proj, Weights};
use crate::sampling::{FinishReason, SamplingParams, StopCriteria};
use crate::{Error, Result};

/// Positions per KV page.
pub const PAGE_SIZE: usize = 16;
/// Token rows of one prefill/score forward (more prompts wait for the next group), unless a
/// single prompt is longer.
pub const PREFILL_ROW_BUDGET: usize = 8192;
/// Rows of f32 logits one score forward may hold ([rows, V] f32: 1024 × 152k × 4 B = 622 MB).
pub const SCORE_LOGIT_ROW_BUDGET: usize = 1024;

// ---------------------------------------------------------------------------------------------
// Memory plan (pure arithmetic; tested without a GPU)

/// Sizes of every planned device buffer. All counts are maxima over the forwards of one call.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MemoryPlan {
    pub page_size: usize,
    /// KV pages per layer (k and v each) for the sequences. One more page, the scratch page
    /// (index `num_pages`), is allocated after them: padded decode rows and unused block-table
    /// entries point at it, so nothing but real sequences ever maps to a real page.
    pub num_pages: usize,
    /// Block-table width: pages one sequence can reference.
    pub max_pages_per_seq: usize,
    /// Sequences (block-table rows) of one forward.
    pub max_seqs: usize,
    /// Token rows of one forward.
    pub max_rows: usize,
    /// Rows of one forward that get logits (and sampling/gather outputs).
    pub max_logit_rows: usize,
    /// Flash-decoding partitions the decode attention grid covers: [`super::decode_partitions`]
    /// of the block-table span (max_pages_per_seq · PAGE_SIZE), the longest a sequence can get;
    /// 0 without decode. Partials are sized for max_seqs × this.
    pub max_decode_parts: usize,
    /// LoRA rank the xa scratch is sized for (0: no adapter).
    pub lora_rank: usize,
    pub kv_cache_bytes: usize,
    pub activation_bytes: usize,
    pub logits_bytes: usize,
    pub scratch_bytes: usize,
    /// Page-locked HOST memory (not in [`Self::total_bytes`], which counts device memory): the
    /// decode step's staged inputs and the sampled tokens/logprobs read back.
    pub pinned_host_bytes: usize,
    /// What the plan was made for (growing a plan takes the fieldwise max of two of these).
    pub needs: PlanNeeds,
}

/// What one call needs, in the plan's terms (see [`MemoryPlan::for_generate`],
/// [`MemoryPlan::for_score`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PlanNeeds {
    pub num_pages: usize,
    pub max_pages_per_seq: usize,
    pub max_seqs: usize,
    pub max_rows: usize,
    pub max_logit_rows: usize,
    /// Longest attention span (positions) of one sequence, for the decode split count.
    pub max_seq_len: usize,
    /// Whether decode steps run (flash-decoding partials are needed).
    pub decode: bool,
}

impl PlanNeeds {
    /// Fieldwise maximum (a plan that serves both).
    pub fn max(self, o: PlanNeeds) -> PlanNeeds {
        PlanNeeds {
            num_pages: self.num_pages.max(o.num_pages),
            max_pages_per_seq: self.max_pages_per_seq.max(o.max_pages_per_seq),
            max_seqs: self.max_seqs.max(o.max_seqs),
            max_rows: self.max_rows.max(o.max_rows),
            max_logit_rows: self.max_logit_rows.max(o.max_logit_rows),
            max_seq_len: self.max_seq_len.max(o.max_seq_len),
            decode: self.decode || o.decode,
        }
    }
}

impl MemoryPlan {
    /// Needs of `generate` for chunks of `prompts_per_chunk` prompts × `samples` (G), prompts of
    /// at most `max_prompt_len` tokens, `max_new_tokens` new tokens, a context of
    /// `c.max_position_embeddings`.
    ///
    /// Pages per prompt ≤ ceil(Pmax/16) (its own) + G · (ceil(T/16) + 1): a sample needs pages
    /// for positions floor(P/16)·16 .. min(P+T, ctx), i.e. ceil(min(P+T,ctx)/16) − floor(P/16)
    /// ≤ ceil(T/16) + 1 pages.
    pub fn for_generate(
        c: &ModelConfig,
        prompts_per_chunk: usize,
        samples: usize,
        max_prompt_len: usize,
        max_new_tokens: usize,
    ) -> PlanNeeds {
        let ps = PAGE_SIZE;
        let ctx = c.max_position_embeddings;
        let seqs = prompts_per_chunk * samples;
        let t_eff = max_new_tokens.min(ctx);
        let per_prompt = max_prompt_len.div_ceil(ps) + samples * (t_eff.div_ceil(ps) + 1);
        let max_seq_len = (max_prompt_len + max_new_tokens).min(ctx);
        let prefill_rows = (prompts_per_chunk * max_prompt_len).min(PREFILL_ROW_BUDGET.max(max_prompt_len));
        PlanNeeds {
            num_pages: prompts_per_chunk * per_prompt,
            max_pages_per_seq: max_seq_len.div_ceil(ps),
            max_seqs: seqs.max(prompts_per_chunk),
            max_rows: prefill_rows.max(seqs),
            max_logit_rows: seqs,
            max_seq_len,
            decode: true,
        }
    }

    /// Needs of `score` for the given groups of (prompt_len, completion_len) items (one
    /// forward per group, see [`score_groups`]).
    pub fn for_score(groups: &[Vec<(usize, usize)>]) -> PlanNeeds {
        let mut n = PlanNeeds {
            num_pages: 1,
            max_pages_per_seq: 1,
            max_seqs: 1,
            max_rows: 1,
            max_logit_rows: 1,
            max_seq_len: 1,
            decode: false,
        };
        for g in groups {
            let rows = g.iter().map(|&(p, c)| p + c - 1).sum::<usize>();
            let pages = g
                .iter()
                .map(|&(p, c)| (p + c - 1).div_ceil(PAGE_SIZE))
                .sum::<usize>();
            n = n.max(PlanNeeds {
                num_pages: pages,
                max_pages_per_seq: g
                    .iter()
                    .map(|&(p, c)| (p + c - 1).div_ceil(PAGE_SIZE))
                    .max()
                    .unwrap_or(1),
                max_seqs: g.len(),
                max_rows: rows,
                max_logit_rows: g.iter().map(|&(_, c)| c).sum(),
                max_seq_len: g.iter().map(|&(p, c)| p + c - 1).max().unwrap_or(1),
                decode: false,
            });
        }
        n
    }

    /// The plan (with byte counts) for `needs` on model `c` with a LoRA of `lora_rank`
    /// (0 = none).
    pub fn new(c: &ModelConfig, needs: PlanNeeds, lora_rank: usize) -> MemoryPlan {
        let (d, hd, l) = (c.hidden_size, c.head_dim, c.num_hidden_layers);
        let (qd, kvd, inter, v) = (c.q_dim(), c.kv_dim(), c.intermediate_size, c.vocab_size);
        let (r, s, m) = (needs.max_rows, needs.max_seqs, needs.max_logit_rows);
        let max_decode_parts = if needs.decode {
            super::decode_partitions(needs.max_pages_per_seq * PAGE_SIZE, c.sliding_window)
        } else {
            0
        };
        // The sequences' pages and the scratch page.
        let kv_cache_bytes = l * 2 * (needs.num_pages + 1) * PAGE_SIZE * kvd * 2;
        // Per row, bf16: x, h, proj (D); q, attn (qd); gate|up, act (3·I); and either the
        // stacked q|k|v output (qd + 2·kvd) or, with a q/k norm (Qwen3), q_pre (qd) and k,
        // k_pre, v (kvd).
        let per_row_bf16 = 3 * d + 2 * qd + 3 * inter + if c.qk_norm { qd + 3 * kvd } else { qd + 2 * kvd };
        // Per row: ids u32, pos i32, row_seq i32; xa f32 (3·rank: a q|k|v LoRA group).
        let activation_bytes = r * (per_row_bf16 * 2 + 3 * 4 + (3 * lora_rank).max(1) * 4);
        // logits f32 [M, V], the gathered normed rows bf16 [M, D], and per logit row: row index,
        // logprob, entropy, target (4 B each).
        let logits_bytes = m * v * 4 + m * d * 2 + m * 4 * 4;
        // Flash-decoding partials (acc hd + m, l) for max_seqs × max_decode_parts partitions and
        // the merge's arrival counters (max_seqs × head groups u32), block
        // table, cu_rows/pos0/seq_lens, the sampling parameters (temperature, top_k, top_p,
        // min_p: 4 B; seed, stream, step: 8 B), the decode step's staged inputs (words of the
        // largest bucket, max_seqs rows), the sampled tokens + logprobs (2 words per row) and the
        // sampler's fast-path scratch (24 B per row and vocabulary chunk, `sample_scratch_len`).
        let part_rows = if max_decode_parts > 1 {
            s * max_decode_parts
        } else {
            1
        };
        let staging_bytes = DecodeStaging {
            rows: s,
            pages: needs.max_pages_per_seq,
        }
        .words()
            * 4;
        let sampled_bytes = 2 * m * 4;
        let scratch_bytes = part_rows * c.num_attention_heads * (hd + 2) * 4
            + s * super::rollout::decode_blocks_per_seq(c.num_attention_heads, c.num_key_value_heads) * 4
            + s * needs.max_pages_per_seq * 4
            + (3 * s + 1) * 4
            + m * (4 * 4 + 3 * 8)
            + staging_bytes
            + sampled_bytes
            + super::sample_scratch_len(m, v) * 8;
        MemoryPlan {
            page_size: PAGE_SIZE,
            num_pages: needs.num_pages,
            max_pages_per_seq: needs.max_pages_per_seq,
            max_seqs: s,
            max_rows: r,
            max_logit_rows: m,
            max_decode_parts,
            lora_rank,
            kv_cache_bytes,
            activation_bytes,
            logits_bytes,
            scratch_bytes,
            pinned_host_bytes: staging_bytes + sampled_bytes,
            needs,
        }
    }

    /// Index of the scratch KV page (after the sequences' pages).
    pub fn scratch_page(&self) -> usize {
        self.num_pages
    }

    /// The most rows one decode step runs (its bucket, padding included).
    pub fn max_decode_rows(&self) -> usize {
        self.max_seqs.min(self.max_rows).min(self.max_logit_rows)
    }

    pub fn total_bytes(&self) -> usize {
        self.kv_cache_bytes + self.activation_bytes + self.logits_bytes + self.scratch_bytes
    }

    /// Whether buffers of this plan can serve `other` (every count at least as large).
    pub fn covers(&self, o: &MemoryPlan) -> bool {
        self.num_pages >= o.num_pages
            && self.max_pages_per_seq >= o.max_pages_per_seq
            && self.max_seqs >= o.max_seqs
            && self.max_rows >= o.max_rows
            && self.max_logit_rows >= o.max_logit_rows
            && self.max_decode_parts >= o.max_decode_parts
            && self.lora_rank >= o.lora_rank
    }
}

/// Groups consecutive score items (prompt_len, completion_len ≥ 1) into forwards of at most
/// [`PREFILL_ROW_BUDGET`] rows and [`SCORE_LOGIT_ROW_BUDGET`] logit rows (a larger single item
/// is a group of its own). Returns item indices per group.
pub fn score_groups(lens: &[(usize, usize)]) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let (mut rows, mut logit_rows) = (0, 0);
    for (i, &(p, c)) in lens.iter().enumerate() {
        let (r, m) = (p + c - 1, c);
        let fits = rows + r <= PREFILL_ROW_BUDGET && logit_rows + m <= SCORE_LOGIT_ROW_BUDGET;
        match groups.last_mut() {
            Some(g) if fits => g.push(i),
            _ => {
                groups.push(vec![i]);
                rows = 0;
                logit_rows = 0;
            }
        }
        rows += r;
        logit_rows += m;
    }
    groups
}

// ---------------------------------------------------------------------------------------------
// Decode buckets and the staged step inputs (pure; tested without a GPU)

/// The row count a decode step of `n` active sequences is padded to (its bucket: one CUDA graph
/// each), at most `max_rows` (the plan's [`MemoryPlan::max_decode_rows`]): 1, 2, 4, 8, then
/// multiples of 16 up to 128, of 32 up to 256, of 64 up to 512, of 128 beyond. Padding costs at
/// most 15 rows up to 128 (where a step is bound by reading the weights once and extra rows
/// are nearly free) and under 25 % above, while a run whose sequences finish one by one
/// captures at most 24 graphs up to 1024 rows.
pub fn decode_bucket(n: usize, max_rows: usize) -> usize {
    let b = match n {
        0..=1 => 1,
        2 => 2,
        3..=4 => 4,
        5..=8 => 8,
        9..=128 => n.next_multiple_of(16),
        129..=256 => n.next_multiple_of(32),
        257..=512 => n.next_multiple_of(64),
        _ => n.next_multiple_of(128),
    };
    b.min(max_rows)
}

/// Where one decode step's inputs sit in the staging buffers (u32 words; one host→device copy
/// per step), for a bucket of `rows` rows and block tables of `pages` pages:
///
/// | words            | what                         |
/// |------------------|------------------------------|
/// | [0, R)           | ids u32 (the newest tokens)  |
/// | [R, 2R)          | pos i32 (their positions)    |
/// | [2R, 3R)         | row_seq i32 (= row index)    |
/// | [3R, 4R)         | seq_lens i32 (= pos + 1)     |
/// | [4R, 6R)         | sampling stream u64          |
/// | [6R, 8R)         | sampling step u64            |
/// | [8R, 8R + R·P)   | block tables i32 (R, P)      |
///
/// u64 values start on even words (8-byte aligned) and are stored lo word first, the byte order
/// of the host and the GPU (little-endian).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeStaging {
    pub rows: usize,
    pub pages: usize,
}

impl DecodeStaging {
    pub fn words(&self) -> usize {
        self.rows * (8 + self.pages)
    }
    pub fn ids(&self) -> usize {
        0
    }
    pub fn pos(&self) -> usize {
        self.rows
    }
    pub fn row_seq(&self) -> usize {
        2 * self.rows
    }
    pub fn seq_lens(&self) -> usize {
        3 * self.rows
    }
    pub fn stream(&self) -> usize {
        4 * self.rows
    }
    pub fn step(&self) -> usize {
        6 * self.rows
    }
    pub fn block_table(&self) -> usize {
        8 * self.rows
    }
}

/// One active sequence of a decode step, as it is staged.
#[derive(Clone, Copy, Debug)]
pub struct DecodeRow<'a> {
    /// The newest token (its k, v are appended this step).
    pub token: u32,
    /// Its position (the sequence then attends pos + 1 positions).
    pub pos: usize,
    /// Sampling stream and step of the token drawn this step.
    pub stream: u64,
    pub step: u64,
    /// Block-table row (the layout's `pages` page ids).
    pub table: &'a [i32],
}

/// Writes `rows` and then padding up to `lay.rows` rows into `out` (`lay.words()` words).
/// A padded row has token 0, position −1 (the KV append skips it), length 0 (attention reads
/// no position and outputs 0), stream and step 0, and every block-table entry `scratch_page`;
/// its logits and sampled token are computed and ignored. Rows are independent in every kernel
/// of the forward (per-row launches, per-sequence attention), so padding cannot change a real
/// row's numbers except through cuBLAS's choice of GEMM kernel for the padded row count.
pub fn stage_decode_rows(lay: &DecodeStaging, rows: &[DecodeRow<'_>], scratch_page: i32, out: &mut [u32]) {
    assert!(
        rows.len() <= lay.rows,
        "{} rows for a bucket of {}",
        rows.len(),
        lay.rows
    );
    assert_eq!(out.len(), lay.words(), "staging words");
    let (r, p) = (lay.rows, lay.pages);
    for i in 0..r {
        let (token, pos, stream, step) = match rows.get(i) {
            Some(row) => (row.token, row.pos as i32, row.stream, row.step),
            None => (0, -1, 0, 0),
        };
        out[lay.ids() + i] = token;
        out[lay.pos() + i] = pos as u32;
        out[lay.row_seq() + i] = i as u32;
        out[lay.seq_lens() + i] = (pos + 1) as u32;
        out[lay.stream() + 2 * i] = stream as u32;
        out[lay.stream() + 2 * i + 1] = (stream >> 32) as u32;
        out[lay.step() + 2 * i] = step as u32;
        out[lay.step() + 2 * i + 1] = (step >> 32) as u32;
        let table = &mut out[lay.block_table() + i * p..lay.block_table() + (i + 1) * p];
        match rows.get(i) {
            Some(row) => {
                assert_eq!(row.table.len(), p, "block-table row width");
                for (dst, &page) in table.iter_mut().zip(row.table) {
                    *dst = page as u32;
                }
            }
            None => table.fill(scratch_page as u32),
        }
    }
}

/// The attention shape of model `c` for a cache of `num_pages` pages.
pub(super) fn attn_shape(c: &ModelConfig, num_pages: usize, max_pages: usize) -> AttnShape {
    AttnShape {
        n_heads: c.num_attention_heads,
        n_kv_heads: c.num_key_value_heads,
        head_dim: c.head_dim,
        num_pages,
        page_size: PAGE_SIZE,
        max_pages,
        window: c.sliding_window,
    }
}

// ---------------------------------------------------------------------------------------------
// Device weights

/// A frozen linear on the device: w (out, in) bf16 row-major, optional bias (out) bf16. The
/// weights of q, k, v (and of gate, up) live in one buffer per layer, stacked by rows, so that a
/// rollout runs one GEMM for all three (two): `w` is this projection's rows of it.
pub(super) struct DeviceLinear {
    w: WeightRows,
    pub(super) b: Option<CudaSlice<bf16>>,
    pub(super) d_in: usize,
    pub(super) d_out: usize,
}

/// Where a projection's weights are: its own buffer, or rows of a layer's stacked buffer
/// (element offset `off`, length d_out·d_in).
enum WeightRows {
    Own(CudaSlice<bf16>),
    Stacked { buf: Arc<CudaSlice<bf16>>, off: usize },
}

impl DeviceLinear {
    /// w (out, in) bf16.
    pub(super) fn w(&self) -> CudaView<'_, bf16> {
        match &self.w {
            WeightRows::Own(w) => w.slice(..),
            WeightRows::Stacked { buf, off } => buf.slice(*off..*off + self.d_out * self.d_in),
        }
    }
}

/// The biases of `lins` copied into one buffer, in order (Σ d_out); None when none has one
/// (zeros for one that has none while another has).
fn stack_biases(dev: &CudaDevice, lins: &[&mut DeviceLinear]) -> Result<Option<CudaSlice<bf16>>> {
    if lins.iter().all(|l| l.b.is_none()) {
        return Ok(None);
    }
    let total: usize = lins.iter().map(|l| l.d_out).sum();
    let mut buf = dev.alloc_zeros::<bf16>(total)?;
    let mut off = 0;
    for l in lins {
        if let Some(b) = &l.b {
            dev.stream()
                .memcpy_dtod(b, &mut buf.slice_mut(off..off + l.d_out))
                .map_err(cuda_err("stacking projection biases"))?;
        }
        off += l.d_out;
    }
    Ok(Some(buf))
}

/// Moves the weights of `lins` (same d_in) into one buffer stacked by rows, in order; returns it
/// ((Σ d_out, d_in) bf16). The linears then view their rows of it.
fn stack_rows(dev: &CudaDevice, lins: &mut [&mut DeviceLinear]) -> Result<Arc<CudaSlice<bf16>>> {
    let total: usize = lins.iter().map(|l| l.d_out * l.d_in).sum();
    let mut buf = dev.alloc_zeros::<bf16>(total.max(1))?;
    let mut off = 0;
    for l in lins.iter() {
        let n = l.d_out * l.d_in;
        dev.stream()
            .memcpy_dtod(&l.w(), &mut buf.slice_mut(off..off + n))
            .map_err(cuda_err("stacking projection weights"))?;
        off += n;
    }
    let buf = Arc::new(buf);
    let mut off = 0;
    for l in lins.iter_mut() {
        // Dropping the projection's own buffer here is ordered after the copy above: cudarc
        // frees on the same stream.
        l.w = WeightRows::Stacked {
            buf: buf.clone(),
            off,
        };
        off += l.d_out * l.d_in;
    }
    Ok(buf)
}

pub(super) struct DeviceLayer {
    pub(super) input_norm: CudaSlice<bf16>,     // (D)
    pub(super) post_norm: CudaSlice<bf16>,      // (D)
    pub(super) q_norm: Option<CudaSlice<bf16>>, // (hd) Qwen3
    pub(super) k_norm: Option<CudaSlice<bf16>>, // (hd) Qwen3
    /// Indexed by `Proj as usize`: q, k, v, o, gate, up, down.
    pub(super) proj: [DeviceLinear; 7],
    /// (qd + 2·kvd, D): the q, k, v weights stacked (the rows of proj[Q], proj[K], proj[V]).
    pub(super) qkv_w: Arc<CudaSlice<bf16>>,
    /// (2·I, D): the gate and up weights stacked.
    pub(super) gate_up_w: Arc<CudaSlice<bf16>>,
    /// (qd + 2·kvd): the q, k, v biases stacked (copies), when the model has them.
    pub(super) qkv_b: Option<CudaSlice<bf16>>,
    /// (2·I): the gate and up biases stacked (copies), when the model has them.
    pub(super) gate_up_b: Option<CudaSlice<bf16>>,
}

/// Every weight of the model in bf16 on the device.
pub(super) struct DeviceWeights {
    pub(super) embed: CudaSlice<bf16>, // (V, D)
    pub(super) layers: Vec<DeviceLayer>,
    pub(super) final_norm: CudaSlice<bf16>, // (D)
    /// (V, D); None when tied to `embed` (the same buffer is used).
    pub(super) lm_head: Option<CudaSlice<bf16>>,
    pub(super) bytes: usize,
}

impl DeviceWeights {
    pub(super) fn lm_head(&self) -> &CudaSlice<bf16> {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Every tensor as a view, in [`crate::trainer::weight_params`] order: the embedding; per
    /// layer the input norm, q/k/v/o (weight then bias), the q and k norms (Qwen3), the post
    /// norm, gate/up/down (weight then bias); the final norm; the lm_head when untied. The q/k/v
    /// and gate/up weights are views of their rows of the stacked buffers.
    pub(super) fn param_views(&self) -> Vec<CudaView<'_, bf16>> {
        let mut v = vec![self.embed.slice(..)];
        for lw in &self.layers {
            v.push(lw.input_norm.slice(..));
            let lin = |p: Proj| {
                let l = &lw.proj[p as usize];
                std::iter::once(l.w()).chain(l.b.iter().map(|b| b.slice(..)))
            };
            for p in [Proj::Q, Proj::K, Proj::V, Proj::O] {
                v.extend(lin(p));
            }
            v.extend(lw.q_norm.iter().map(|t| t.slice(..)));
            v.extend(lw.k_norm.iter().map(|t| t.slice(..)));
            v.push(lw.post_norm.slice(..));
            for p in [Proj::Gate, Proj::Up, Proj::Down] {
                v.extend(lin(p));
            }
        }
        v.push(self.final_norm.slice(..));
        v.extend(self.lm_head.iter().map(|t| t.slice(..)));
        v
    }

    /// Copies every layer's q/k/v and gate/up biases into their stacked copies (`qkv_b`,
    /// `gate_up_b`), after the biases changed. Device to device on the stream.
    fn restack_biases(&mut self, dev: &CudaDevice) -> Result<()> {
        let st = dev.stream();
        for lw in &mut self.layers {
            for (stack, projs) in [
                (&mut lw.qkv_b, &[Proj::Q, Proj::K, Proj::V][..]),
                (&mut lw.gate_up_b, &[Proj::Gate, Proj::Up][..]),
            ] {
                let Some(stack) = stack.as_mut() else { continue };
                let mut off = 0;
                for &p in projs {
                    let l = &lw.proj[p as usize];
                    if let Some(b) = &l.b {
                        st.memcpy_dtod(b, &mut stack.slice_mut(off..off + l.d_out))
                            .map_err(cuda_err("restacking projection biases"))?;
                    }
                    off += l.d_out;
                }
            }
        }
        Ok(())
    }

    /// Builds the table from `get(hf_name, shape)`, which returns the tensor on the device.
    fn build(
        dev: &CudaDevice,
        c: &ModelConfig,
        mut get: impl FnMut(&str, &[usize]) -> Result<CudaSlice<bf16>>,
    ) -> Result<DeviceWeights> {
        let (v, d, hd) = (c.vocab_size, c.hidden_size, c.head_dim);
        let mut bytes = 0usize;
        let mut get = |name: &str, shape: &[usize]| {
            bytes += shape.iter().product::<usize>() * 2;
            get(name, shape)
        };
        let embed = get("model.embed_tokens.weight", &[v, d])?;
        let mut layers = Vec::new();
        for l in 0..c.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let mut lin = |proj: Proj| -> Result<DeviceLinear> {
                let (d_in, d_out) = proj.dims(c);
                let base = format!("{p}.{}.{}", proj.parent(), proj.module_name());
                let w = get(&format!("{base}.weight"), &[d_out, d_in])?;
                let b = if proj.has_bias(c) {
                    Some(get(&format!("{base}.bias"), &[d_out])?)
                } else {
                    None
                };
                Ok(DeviceLinear {
                    w: WeightRows::Own(w),
                    b,
                    d_in,
                    d_out,
                })
            };
            let mut proj = [
                lin(Proj::Q)?,
                lin(Proj::K)?,
                lin(Proj::V)?,
                lin(Proj::O)?,
                lin(Proj::Gate)?,
                lin(Proj::Up)?,
                lin(Proj::Down)?,
            ];
            let [q, k, v, _, gate, up, _] = &mut proj;
            let qkv_b = stack_biases(dev, &[q, k, v])?;
            let gate_up_b = stack_biases(dev, &[gate, up])?;
            let qkv_w = stack_rows(dev, &mut [q, k, v])?;
            let gate_up_w = stack_rows(dev, &mut [gate, up])?;
            let input_norm = get(&format!("{p}.input_layernorm.weight"), &[d])?;
            let post_norm = get(&format!("{p}.post_attention_layernorm.weight"), &[d])?;
            let (q_norm, k_norm) = if c.qk_norm {
                (
                    Some(get(&format!("{p}.self_attn.q_norm.weight"), &[hd])?),
                    Some(get(&format!("{p}.self_attn.k_norm.weight"), &[hd])?),
                )
            } else {
                (None, None)
            };
            layers.push(DeviceLayer {
                input_norm,
                post_norm,
                q_norm,
                k_norm,
                proj,
                qkv_w,
                gate_up_w,
                qkv_b,
                gate_up_b,
            });
        }
        let final_norm = get("model.norm.weight", &[d])?;
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(get("lm_head.weight", &[v, d])?)
        };
        Ok(DeviceWeights {
            embed,
            layers,
            final_norm,
            lm_head,
            bytes,
        })
    }

    /// From the checkpoint's raw tensors (bf16 copied as is; f32/f16 rounded to bf16 on the host).
    fn from_checkpoint(dev: &CudaDevice, ckpt: &Checkpoint, c: &ModelConfig) -> Result<DeviceWeights> {
        Self::build(dev, c, |name, shape| {
            let v = ckpt.view(name)?;
            if v.shape != shape {
                return Err(Error::Shape {
                    path: ckpt.display_path(),
                    name: name.to_string(),
                    expected: shape.to_vec(),
                    found: v.shape.to_vec(),
                });
            }
            let host: Vec<bf16> = match v.dtype {
                safetensors::Dtype::BF16 => v
                    .bytes
                    .chunks_exact(2)
                    .map(|b| bf16::from_le_bytes([b[0], b[1]]))
                    .collect(),
                _ => crate::model::weights::to_f32(&v)
                    .map_err(|msg| Error::Safetensors {
                        path: ckpt.display_path(),
                        msg,
                    })?
                    .into_iter()
                    .map(bf16::from_f32)
                    .collect(),
            };
            dev.upload(&host)
        })
    }

    /// From the CPU engine's f32 weights (rounded to bf16).
    fn from_f32(dev: &CudaDevice, w: &Weights, c: &ModelConfig) -> Result<DeviceWeights> {
        let named = w.named_tensors(c);
        Self::build(dev, c, |name, shape| {
            let (s, data) = named
                .get(name)
                .ok_or_else(|| Error::invalid(format!("weights: tensor {name} is missing")))?;
            if s.as_slice() != shape {
                return Err(Error::invalid(format!(
                    "weights: tensor {name} has shape {s:?}, expected {shape:?}"
                )));
            }
            dev.upload_bf16(data)
        })
    }

    /// Random weights of the config's shape made on the device (benchmarks; no files): norms
    /// are 1, every other tensor tiles one uploaded block of uniform values of std 0.02.
    fn random(dev: &CudaDevice, c: &ModelConfig, seed: u64) -> Result<DeviceWeights> {
        const BLOCK: usize = 1 << 20;
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let host: Vec<bf16> = (0..BLOCK)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let u = (s >> 40) as f32 / (1u64 << 24) as f32;
                bf16::from_f32((u * 2.0 - 1.0) * 0.02 * 3f32.sqrt())
            })
            .collect();
        let block = dev.upload(&host)?;
        let ones = dev.upload(&vec![bf16::ONE; c.hidden_size.max(c.head_dim)])?;
        Self::build(dev, c, |name, shape| {
            let n: usize = shape.iter().product();
            let mut t = dev.alloc_zeros::<bf16>(n)?;
            let st = dev.stream();
            if name.ends_with("norm.weight") {
                st.memcpy_dtod(&ones.slice(..n), &mut t)
                    .map_err(cuda_err("filling a norm weight"))?;
            } else {
                let mut off = 0;
                while off < n {
                    let len = BLOCK.min(n - off);
                    st.memcpy_dtod(&block.slice(..len), &mut t.slice_mut(off..off + len))
                        .map_err(cuda_err("filling a random weight"))?;
                    off += len;
                }
            }
            Ok(t)
        })
    }
}

/// One LoRA pair on the device: a (r, in), b (out, r) f32.
pub(super) struct DeviceLoraPair {
    pub(super) a: CudaSlice<f32>,
    pub(super) b: CudaSlice<f32>,
}

/// The live adapter on the device.
pub(super) struct DeviceLora {
    pub(super) rank: usize,
    pub(super) scale: f32,
    pub(super) layers: Vec<[Option<DeviceLoraPair>; 7]>,
}

impl DeviceLora {
    /// Checks `w` against the model, then copies it into `old`'s buffers when every pair has the
    /// same shape there (the usual case: a training step's new adapter), else uploads anew.
    pub(super) fn upload(
        dev: &CudaDevice,
        c: &ModelConfig,
        w: &LoraWeights,
        old: Option<DeviceLora>,
    ) -> Result<DeviceLora> {
        let r = w.config.r;
        if w.layers.len() != c.num_hidden_layers {
            return Err(Error::invalid(format!(
                "adapter has {} layers, the model {}",
                w.layers.len(),
                c.num_hidden_layers
            )));
        }
        for (l, layer) in w.layers.iter().enumerate() {
            for p in Proj::ALL {
                if let Some(pair) = &layer[p as usize] {
                    let (d_in, d_out) = p.dims(c);
                    if pair.a.len() != r * d_in || pair.b.len() != d_out * r {
                        return Err(Error::invalid(format!(
                            "adapter layer {l} {}: lora_A has {} values, lora_B {}; expected \
                             r·in = {} and out·r = {} (r = {r})",
                            p.module_name(),
                            pair.a.len(),
                            pair.b.len(),
                            r * d_in,
                            d_out * r
                        )));
                    }
                }
            }
        }
        let same_shape = old.as_ref().is_some_and(|o| {
            o.rank == r
                && o.layers
                    .iter()
                    .zip(&w.layers)
                    .all(|(ol, nl)| ol.iter().zip(nl.iter()).all(|(a, b)| a.is_some() == b.is_some()))
        });
        if let (true, Some(mut o)) = (same_shape, old) {
            let st = dev.stream();
            for (ol, nl) in o.layers.iter_mut().zip(&w.layers) {
                for (a, b) in ol.iter_mut().zip(nl.iter()) {
                    if let (Some(dst), Some(src)) = (a.as_mut(), b.as_ref()) {
                        st.memcpy_htod(&src.a, &mut dst.a)
                            .map_err(cuda_err("copying lora_A to the device"))?;
                        st.memcpy_htod(&src.b, &mut dst.b)
                            .map_err(cuda_err("copying lora_B to the device"))?;
                    }
                }
            }
            o.scale = w.config.scale();
            return Ok(o);
        }
        let mut layers = Vec::with_capacity(w.layers.len());
        for nl in &w.layers {
            let mut out: [Option<DeviceLoraPair>; 7] = Default::default();
            for (slot, pair) in out.iter_mut().zip(nl.iter()) {
                if let Some(p) = pair {
                    *slot = Some(DeviceLoraPair {
                        a: dev.upload(&p.a)?,
                        b: dev.upload(&p.b)?,
                    });
                }
            }
            layers.push(out);
        }
        Ok(DeviceLora {
            rank: r,
            scale: w.config.scale(),
            layers,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Planned buffers

/// Every device buffer of a [`MemoryPlan`]; shapes in comments (R = max_rows, S = max_seqs,
/// M = max_logit_rows, P = max_pages_per_seq, Z = max_decode_parts, W = staging words), the
/// pinned host buffers of the decode step, and the decode graphs captured against them (they
/// hold these buffers' addresses, so they live and die with them).
pub(super) struct Buffers {
    /// Per layer (k, v): (num_pages + 1, PAGE_SIZE, KV, hd) bf16; the last page is the scratch page.
    kv: Vec<(CudaSlice<bf16>, CudaSlice<bf16>)>,
    x: CudaSlice<bf16>,            // (R, D) residual stream
    h: CudaSlice<bf16>,            // (R, D) normed
    proj: CudaSlice<bf16>,         // (R, D) o / down output
    q: CudaSlice<bf16>,            // (R, H·hd)
    q_pre: CudaSlice<bf16>,        // (R, H·hd) before the q norm (Qwen3)
    attn: CudaSlice<bf16>,         // (R, H·hd)
    k: CudaSlice<bf16>,            // (R, KV·hd) (Qwen3: the q/k-norm path)
    k_pre: CudaSlice<bf16>,        // (R, KV·hd) (Qwen3)
    v: CudaSlice<bf16>,            // (R, KV·hd) (Qwen3)
    qkv: CudaSlice<bf16>,          // (R, qd + 2·kvd) stacked q|k|v output (models without qk norm)
    gate_up: CudaSlice<bf16>,      // (R, 2·I) stacked gate|up output
    act: CudaSlice<bf16>,          // (R, I)
    xa: CudaSlice<f32>,            // (R, rank)
    ids: CudaSlice<u32>,           // (R)
    pos: CudaSlice<i32>,           // (R)
    row_seq: CudaSlice<i32>,       // (R)
    block_table: CudaSlice<i32>,   // (S, P)
    cu_rows: CudaSlice<i32>,       // (S + 1)
    pos0: CudaSlice<i32>,          // (S)
    seq_lens: CudaSlice<i32>,      // (S)
    part_o: CudaSlice<f32>,        // (S, H, Z, hd)
    part_ml: CudaSlice<f32>,       // (S, H, Z, 2)
    attn_counters: CudaSlice<u32>, // (S, kv head groups): the decode merge's arrivals
    logit_rows: CudaSlice<u32>,    // (M)
    hsel: CudaSlice<bf16>,         // (M, D)
    logits: CudaSlice<f32>,        // (M, V)
    logprobs: CudaSlice<f32>,      // (M) score
    entropy: CudaSlice<f32>,       // (M)
    targets: CudaSlice<u32>,       // (M)
    sampling: SamplingParamsDev,   // (M) rows
    /// (3 · M · ceil(V / SAMPLE_CHUNK)) the sampler's fast-path scratch (`sample_scratch_len`).
    smp_scratch: CudaSlice<f64>,
    /// (W) a decode step's inputs ([`DecodeStaging`]), copied from `staging_host` in one piece.
    staging: CudaSlice<u32>,
    staging_host: PinnedHostSlice<u32>, // (W)
    /// (2M) sampled tokens of rows [0, m), their logprobs (f32 bits) at [m, 2m): one readback.
    sampled: CudaSlice<u32>,
    sampled_host: PinnedHostSlice<u32>, // (2M)
    graphs: DecodeGraphs,
}

/// The decode step's CUDA graphs, one per bucket (row count), captured lazily against the
/// buffers they sit in.
#[derive(Default)]
pub(super) struct DecodeGraphs {
    /// [`adapter_key`] of the adapter the graphs were captured with; another one clears them.
    adapter_key: Vec<u64>,
    /// Buckets that ran eagerly once (which loads every kernel the step uses and lets cuBLAS
    /// pick its kernels outside a capture); captured on their next use.
    warm: std::collections::HashSet<usize>,
    by_bucket: std::collections::HashMap<usize, DecodeGraph>,
    /// Captures invalidated from outside so far (retried until [`MAX_CAPTURE_TRIES`]).
    invalidated: u32,
}

/// Invalidated captures an engine retries before it decodes eagerly for good.
const MAX_CAPTURE_TRIES: u32 = 4;

/// A captured decode step. cudarc's graph holds raw driver handles and so is neither Send nor
/// Sync, which would take both from [`CudaEngine`] (a buffer of CUDA slices is both).
pub(super) struct DecodeGraph(CudaGraph);

// SAFETY: the CUDA driver allows graph handles to be used from any thread as long as calls on
// one graph are serialized. A DecodeGraph is reachable only through `&mut Buffers` (the engine's
// `&mut self` methods), so no two threads can launch or drop it at the same time.
unsafe impl Send for DecodeGraph {}
// SAFETY: as above: shared references to the engine give no access to the graph.
unsafe impl Sync for DecodeGraph {}

impl DecodeGraphs {
    fn clear(&mut self) {
        self.warm.clear();
        self.by_bucket.clear();
    }
}

impl Buffers {
    fn alloc(dev: &CudaDevice, c: &ModelConfig, p: &MemoryPlan) -> Result<Buffers> {
        let (d, hd, qd, kvd) = (c.hidden_size, c.head_dim, c.q_dim(), c.kv_dim());
        let (i, v) = (c.intermediate_size, c.vocab_size);
        let (r, s, m) = (p.max_rows, p.max_seqs, p.max_logit_rows);
        let bf = |n: usize| dev.alloc_zeros::<bf16>(n.max(1));
        let mut kv = Vec::with_capacity(c.num_hidden_layers);
        let pages = p.num_pages + 1; // + the scratch page
        for _ in 0..c.num_hidden_layers {
            kv.push((bf(pages * PAGE_SIZE * kvd)?, bf(pages * PAGE_SIZE * kvd)?));
        }
        let part_rows = if p.max_decode_parts > 1 {
            s * p.max_decode_parts
        } else {
            1
        };
        let staging_words = DecodeStaging {
            rows: s,
            pages: p.max_pages_per_seq,
        }
        .words()
        .max(1);
        let qk = c.qk_norm;
        Ok(Buffers {
            kv,
            x: bf(r * d)?,
            h: bf(r * d)?,
            proj: bf(r * d)?,
            q: bf(r * qd)?,
            q_pre: bf(if qk { r * qd } else { 1 })?,
            attn: bf(r * qd)?,
            k: bf(if qk { r * kvd } else { 1 })?,
            k_pre: bf(if qk { r * kvd } else { 1 })?,
            v: bf(if qk { r * kvd } else { 1 })?,
            qkv: bf(if qk { 1 } else { r * (qd + 2 * kvd) })?,
            gate_up: bf(r * 2 * i)?,
            act: bf(r * i)?,
            xa: dev.alloc_zeros((r * 3 * p.lora_rank).max(1))?,
            ids: dev.alloc_zeros(r.max(1))?,
            pos: dev.alloc_zeros(r.max(1))?,
            row_seq: dev.alloc_zeros(r.max(1))?,
            block_table: dev.alloc_zeros((s * p.max_pages_per_seq).max(1))?,
            cu_rows: dev.alloc_zeros(s + 1)?,
            pos0: dev.alloc_zeros(s.max(1))?,
            seq_lens: dev.alloc_zeros(s.max(1))?,
            part_o: dev.alloc_zeros(part_rows * c.num_attention_heads * hd)?,
            part_ml: dev.alloc_zeros(part_rows * c.num_attention_heads * 2)?,
            attn_counters: dev.alloc_zeros(
                (s * super::rollout::decode_blocks_per_seq(c.num_attention_heads, c.num_key_value_heads))
                    .max(1),
            )?,
            logit_rows: dev.alloc_zeros(m.max(1))?,
            hsel: bf(m * d)?,
            logits: dev.alloc_zeros((m * v).max(1))?,
            logprobs: dev.alloc_zeros(m.max(1))?,
            entropy: dev.alloc_zeros(m.max(1))?,
            targets: dev.alloc_zeros(m.max(1))?,
            sampling: SamplingParamsDev::alloc(dev, m)?,
            smp_scratch: dev.alloc_zeros(super::sample_scratch_len(m, v).max(1))?,
            staging: dev.alloc_zeros(staging_words)?,
            staging_host: dev.alloc_pinned(staging_words)?,
            sampled: dev.alloc_zeros(2 * m.max(1))?,
            sampled_host: dev.alloc_pinned(2 * m.max(1))?,
            graphs: DecodeGraphs::default(),
        })
    }
}

/// Copies `host` into the first `host.len()` elements of `dst` (asynchronous on the stream;
/// cudarc stages pageable memory, so `host` may change as soon as this returns).
pub(super) fn put<T: DeviceRepr>(
    dev: &CudaDevice,
    what: &str,
    host: &[T],
    dst: &mut CudaSlice<T>,
) -> Result<()> {
    if host.len() > dst.len() {
        return Err(Error::Cuda(format!(
            "internal: {what} needs {} elements but the memory plan gave {}",
            host.len(),
            dst.len()
        )));
    }
    if host.is_empty() {
        return Ok(());
    }
    dev.stream()
        .memcpy_htod(host, &mut dst.slice_mut(..host.len()))
        .map_err(cuda_err(format_args!("uploading {what}")))
}

/// Copies the first `n` elements of `src` to the host and waits for them.
pub(super) fn get<T: DeviceRepr + Default + Clone>(
    dev: &CudaDevice,
    what: &str,
    src: &CudaSlice<T>,
    n: usize,
) -> Result<Vec<T>> {
    let mut host = vec![T::default(); n];
    if n > 0 {
        dev.stream()
            .memcpy_dtoh(&src.slice(..n), &mut host)
            .map_err(cuda_err(format_args!("downloading {what}")))?;
    }
    dev.synchronize()?;
    Ok(host)
}

/// Asynchronous copy of `host` (page-locked) into the first `host.len()` words of `dst`.
/// The caller keeps `host` unchanged until the stream has passed the copy (the decode loop
/// writes its staging buffer again only after the previous step's synchronizing readback).
fn put_pinned(dev: &CudaDevice, what: &str, host: &[u32], dst: &mut CudaSlice<u32>) -> Result<()> {
    check(what, dst.len(), host.len())?;
    if host.is_empty() {
        return Ok(());
    }
    let st = dev.stream();
    let (ptr, _d) = dst.device_ptr_mut(st);
    // SAFETY: dst holds at least host.len() words (checked); host is page-locked memory owned by
    // the plan's buffers, alive and unmodified until the stream passes the copy (above).
    unsafe { cudarc::driver::result::memcpy_htod_async(ptr, host, st.cu_stream()) }
        .map_err(cuda_err(format_args!("uploading {what}")))
}

/// Reads back `rows` sampled tokens and their logprobs from `b.sampled` ([0, rows) and
/// [rows, 2·rows)) with one copy into the pinned buffer, and waits for it.
fn read_sampled(dev: &CudaDevice, b: &mut Buffers, rows: usize) -> Result<(Vec<u32>, Vec<f32>)> {
    check("sampled", b.sampled.len(), 2 * rows)?;
    let host = b
        .sampled_host
        .as_mut_slice()
        .map_err(cuda_err("waiting for the pinned readback buffer"))?;
    check("pinned sampled", host.len(), 2 * rows)?;
    let st = dev.stream();
    {
        let (ptr, _s) = b.sampled.device_ptr(st);
        // SAFETY: the device buffer holds ≥ 2·rows words (checked), the page-locked destination
        // too; it is read only after the synchronize below.
        unsafe { cudarc::driver::result::memcpy_dtoh_async(&mut host[..2 * rows], ptr, st.cu_stream()) }
            .map_err(cuda_err("downloading sampled tokens and logprobs"))?;
    }
    dev.synchronize()?;
    let tokens = host[..rows].to_vec();
    let logprobs = host[rows..2 * rows].iter().map(|&w| f32::from_bits(w)).collect();
    Ok((tokens, logprobs))
}

// ---------------------------------------------------------------------------------------------
// GEMM

/// One cuBLAS GEMM in cuBLAS's column-major terms: C (m, n) = alpha · op_a(A) · op_b(B) +
/// beta · C, A (ld `lda`) and B (ld `ldb`) bf16, C (ld `ldc`) of `c_type`, f32 compute:
/// `cublasGemmEx(h, op_a, op_b, m, n, k, &alpha, A, BF16, lda, B, BF16, ldb, &beta, C, c_type,
/// ldc, COMPUTE_32F, DEFAULT)`. Every cuBLAS GEMM of the engine and the trainer goes through
/// here ([`gemm_raw`], train.rs's `gemm_dx`/`gemm_dw`); each caller maps the error to its own
/// message.
///
/// # Safety
/// a, b, c are device pointers of buffers that hold the matrices the operations, dimensions and
/// leading dimensions describe, of the stated types; c does not alias a or b.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_ex(
    blas: &CudaBlas,
    (op_a, op_b): (cublasOperation_t, cublasOperation_t),
    (m, n, k): (i32, i32, i32),
    (a, lda): (u64, i32),
    (b, ldb): (u64, i32),
    (c, ldc, c_type): (u64, i32, cudaDataType),
    (alpha, beta): (f32, f32),
) -> std::result::Result<(), cudarc::cublas::result::CublasError> {
    // SAFETY: the caller's contract covers a, b, c; alpha/beta are host f32 as COMPUTE_32F
    // requires (pointer mode host, cuBLAS's default) and live across the call; the handle is
    // bound to the device's stream, so the GEMM is ordered with the kernels.
    unsafe {
        cudarc::cublas::result::gemm_ex(
            *blas.handle(),
            op_a,
            op_b,
            m,
            n,
            k,
            &alpha as *const f32 as *const c_void,
            a as *const c_void,
            cudaDataType::CUDA_R_16BF,
            lda,
            b as *const c_void,
            cudaDataType::CUDA_R_16BF,
            ldb,
            &beta as *const f32 as *const c_void,
            c as *mut c_void,
            c_type,
            ldc,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
}

/// `v` as cuBLAS's int, or an error naming the GEMM (`what`) and the dimension (`name`).
pub(super) fn gemm_int(what: &str, name: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::invalid(format!("{what}: {name} = {v} exceeds i32")))
}

/// Row-major y (rows, d_out) = x (rows, d_in) · W (d_out, d_in)ᵀ, bf16 inputs, f32 compute,
/// y in `y_type` (bf16 or f32).
///
/// Operand order (cuBLAS is column-major): a row-major (r, c) matrix is the column-major (c, r)
/// matrix with leading dimension c, i.e. its transpose. So row-major y (rows, out) is
/// column-major Yc (out, rows), ld = out, and we need Yc = W · xᵀ:
/// - A = W: row-major (out, in) is column-major (in, out), ld = in; op(A) = Aᵀ → (out, in): OP_T.
/// - B = x: row-major (rows, in) is column-major (in, rows) = xᵀ, ld = in; op(B) = B: OP_N.
/// - m = out, n = rows, k = in; C = y with ldc = out.
///
/// `cublasGemmEx(h, OP_T, OP_N, out, rows, in, &1, W, BF16, in, x, BF16, in, &beta, y, Y, out,
/// COMPUTE_32F, DEFAULT)` ([`gemm_ex`]): beta = 0 overwrites y, beta = 1 adds onto it
/// (y = x·Wᵀ + y, in f32 before the one rounding to `y_type`).
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm_raw(
    dev: &CudaDevice,
    blas: &CudaBlas,
    x: u64,
    w: u64,
    y: u64,
    y_type: cudaDataType,
    rows: usize,
    d_in: usize,
    d_out: usize,
    beta: f32,
) -> Result<()> {
    let int = |v, name| gemm_int("gemm", name, v);
    let (m, n, k) = (int(d_out, "out")?, int(rows, "rows")?, int(d_in, "in")?);
    let ops = (cublasOperation_t::CUBLAS_OP_T, cublasOperation_t::CUBLAS_OP_N);
    // SAFETY: x, w, y are device pointers of buffers holding at least rows·d_in, d_out·d_in and
    // rows·d_out elements of the stated types (checked by the callers, linear and gemm_logits).
    unsafe { gemm_ex(blas, ops, (m, n, k), (w, k), (x, k), (y, m, y_type), (1.0, beta)) }
        .map_err(|e| Error::Cuda(format!("cublasGemmEx ({rows}×{d_in} · ({d_out}×{d_in})ᵀ): {e:?}")))?;
    let _ = dev;
    Ok(())
}

/// y (rows, out) = x (rows, in) bf16 · wᵀ, w (out, in) bf16, y of `y_type` (bf16 or f32), with
/// the lengths checked (`what` names the GEMM in the error): a stacked weight (q|k|v, gate|up:
/// the projections' outputs side by side in each row, no bias, no LoRA), or the lm_head.
#[allow(clippy::too_many_arguments)]
fn gemm_checked<Y>(
    dev: &CudaDevice,
    blas: &CudaBlas,
    what: &str,
    x: &impl DevicePtr<bf16>,
    w: &impl DevicePtr<bf16>,
    y: &mut impl DevicePtrMut<Y>,
    y_type: cudaDataType,
    rows: usize,
    d_in: usize,
    d_out: usize,
) -> Result<()> {
    for (part, found, need) in [
        ("x", x.len(), rows * d_in),
        ("w", w.len(), d_out * d_in),
        ("y", y.len(), rows * d_out),
    ] {
        if found < need {
            return Err(Error::Cuda(format!(
                "internal: {what} {part} has {found} elements, needs {need}"
            )));
        }
    }
    let s = dev.stream();
    let (xp, _xs) = x.device_ptr(s);
    let (wp, _ws) = w.device_ptr(s);
    let (yp, _ys) = y.device_ptr_mut(s);
    super::gemm::gemm(dev, blas, xp, wp, yp, y_type, rows, d_in, d_out)
}

/// The live adapter's LoRA of the projections `projs` (each with its first column in the
/// stacked output y (rows, ldy)) that layer `l` adapts, in one grouped pair of launches
/// (nothing when the adapter adapts none of them). x (rows, D).
#[allow(clippy::too_many_arguments)]
fn lora_group(
    dev: &CudaDevice,
    x: &impl DevicePtr<bf16>,
    projs: &[(Proj, usize)],
    lw: &DeviceLayer,
    lora: Option<(&DeviceLora, usize)>,
    xa: &mut CudaSlice<f32>,
    y: &mut impl DevicePtrMut<bf16>,
    ldy: usize,
    rows: usize,
) -> Result<()> {
    let Some((ad, l)) = lora else { return Ok(()) };
    let members: Vec<super::fused::LoraMember<'_>> = projs
        .iter()
        .filter_map(|&(p, col)| {
            ad.layers[l][p as usize]
                .as_ref()
                .map(|pair| super::fused::LoraMember {
                    a: &pair.a,
                    b: &pair.b,
                    col,
                    out: lw.proj[p as usize].d_out,
                })
        })
        .collect();
    if members.is_empty() {
        return Ok(());
    }
    let d_in = lw.proj[projs[0].0 as usize].d_in;
    dev.lora_group_bf16(x, &members, ad.scale, ad.rank, xa, y, ldy, rows, d_in)
}

/// logits (rows, V) f32 = x (rows, D) bf16 · lm_headᵀ (f32 output: no bf16 rounding of logits).
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm_logits(
    dev: &CudaDevice,
    blas: &CudaBlas,
    x: &impl DevicePtr<bf16>,
    w: &impl DevicePtr<bf16>,
    y: &mut impl DevicePtrMut<f32>,
    rows: usize,
    d_in: usize,
    d_out: usize,
) -> Result<()> {
    let f32_out = cudaDataType::CUDA_R_32F;
    gemm_checked(dev, blas, "lm_head", x, w, y, f32_out, rows, d_in, d_out)
}

pub(super) fn check(what: &str, found: usize, need: usize) -> Result<()> {
    if found < need {
        return Err(Error::Cuda(format!(
            "internal: {what} has {found} elements, needs {need}"
        )));
    }
    Ok(())
}

/// y (rows, out) bf16 = x (rows, in) bf16 · Wᵀ (+ bias) (+ scale · (x Aᵀ) Bᵀ).
#[allow(clippy::too_many_arguments)]
pub(super) fn linear(
    dev: &CudaDevice,
    blas: &CudaBlas,
    x: &impl DevicePtr<bf16>,
    lin: &DeviceLinear,
    lora: Option<(&DeviceLoraPair, f32, usize)>,
    xa: &mut CudaSlice<f32>,
    y: &mut impl DevicePtrMut<bf16>,
    rows: usize,
) -> Result<()> {
    let (bf, w) = (cudaDataType::CUDA_R_16BF, lin.w());
    gemm_checked(dev, blas, "linear", x, &w, y, bf, rows, lin.d_in, lin.d_out)?;
    linear_epilogue(dev, x, lin, lora, xa, y, rows)
}

/// What [`linear`] adds after its GEMM: the bias, then the LoRA term of x (rows, in).
fn linear_epilogue(
    dev: &CudaDevice,
    x: &impl DevicePtr<bf16>,
    lin: &DeviceLinear,
    lora: Option<(&DeviceLoraPair, f32, usize)>,
    xa: &mut CudaSlice<f32>,
    y: &mut impl DevicePtrMut<bf16>,
    rows: usize,
) -> Result<()> {
    if let Some(b) = &lin.b {
        dev.add_bias_bf16(y, b, rows, lin.d_out)?;
    }
    if let Some((pair, scale, r)) = lora {
        check("lora xa", xa.len(), rows * r)?;
        let mut xa = xa.slice_mut(..rows * r);
        dev.lora_xa_bf16(x, &pair.a, &mut xa, rows, lin.d_in, r)?;
        dev.lora_expand_add_bf16(y, &xa, &pair.b, scale, rows, lin.d_out, r)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// One forward

/// What every forward reads and never writes: the device, the model, its weights, the live
/// adapter, RoPE's inverse frequencies.
#[derive(Clone, Copy)]
struct Model<'a> {
    dev: &'a CudaDevice,
    c: &'a ModelConfig,
    w: &'a DeviceWeights,
    lora: Option<&'a DeviceLora>,
    inv_freq: &'a CudaSlice<f32>,
}

/// How a forward's rows attend (device side; the host data is already in the buffers).
#[derive(Clone, Copy, Debug)]
enum AttnLaunch {
    /// Rows of sequence s are rows cu_rows[s]..cu_rows[s+1] at positions pos0[s], pos0[s]+1, …;
    /// `max_rows` = the most rows of one sequence (sizes the grid).
    Prefill { max_rows: usize },
    /// One row per sequence, at position seq_lens[s] − 1; the grid covers sequences of up to
    /// `max_len` positions (more only adds blocks that exit at once: same output bits).
    Decode { max_len: usize },
}

/// The launch shape of one forward: everything its kernel arguments depend on besides the
/// plan's buffers and the model.
#[derive(Clone, Copy, Debug)]
struct ForwardShape {
    rows: usize,
    seqs: usize,
    attn: AttnLaunch,
    /// Rows that get logits, gathered through `b.logit_rows` (None: every row, in order).
    logit_rows: Option<usize>,
}

/// The host side of one prefill/score forward: rows, their sequences and positions, block
/// tables; sequence s's rows are cu_rows[s]..cu_rows[s+1] at positions pos0[s], pos0[s]+1, ….
struct Step {
    ids: Vec<u32>,
    pos: Vec<i32>,
    row_seq: Vec<i32>,
    /// (num_seqs, plan.max_pages_per_seq) page ids.
    block_table: Vec<i32>,
    num_seqs: usize,
    cu_rows: Vec<i32>,
    pos0: Vec<i32>,
    /// The most rows of one sequence.
    max_rows: usize,
    /// Rows that get logits, in order (None: every row, in order).
    logit_rows: Option<Vec<u32>>,
}

pub(super) fn debug_enabled() -> bool {
    std::env::var("RFT_CUDA_DEBUG").is_ok_and(|v| v == "1")
}

/// Prints max |x| of a bf16 buffer (RFT_CUDA_DEBUG=1 only; synchronizes).
pub(super) fn debug_absmax(dev: &CudaDevice, what: &str, buf: &CudaSlice<bf16>, n: usize) -> Result<()> {
    let host = get(dev, what, buf, n)?;
    let (mut mx, mut bad) = (0f32, 0usize);
    for v in host {
        let f = v.to_f32();
        if f.is_finite() {
            mx = mx.max(f.abs());
        } else {
            bad += 1;
        }
    }
    eprintln!("rft cuda debug: {what}: max |x| = {mx}, non-finite = {bad}");
    Ok(())
}

/// Uploads `step` (a prefill or score forward) and runs it through the model; leaves f32 logits
/// of its logit rows in `b.logits` (row-major (m, V)) and returns m.
fn forward(md: Model<'_>, plan: &MemoryPlan, b: &mut Buffers, step: &Step) -> Result<usize> {
    let dev = md.dev;
    let (n, ns) = (step.ids.len(), step.num_seqs);
    if step.pos.len() != n
        || step.row_seq.len() != n
        || step.cu_rows.len() != ns + 1
        || step.pos0.len() != ns
        || step.block_table.len() != ns * plan.max_pages_per_seq
    {
        return Err(Error::Cuda(format!(
            "internal: a forward of {n} rows / {ns} sequences with {} positions, {} row \
             sequences, {} cu_rows, {} pos0, {} block-table entries",
            step.pos.len(),
            step.row_seq.len(),
            step.cu_rows.len(),
            step.pos0.len(),
            step.block_table.len()
        )));
    }
    check_forward(plan, n, ns)?;
    put(dev, "token ids", &step.ids, &mut b.ids)?;
    put(dev, "positions", &step.pos, &mut b.pos)?;
    put(dev, "row sequences", &step.row_seq, &mut b.row_seq)?;
    put(dev, "block tables", &step.block_table, &mut b.block_table)?;
    put(dev, "cu_rows", &step.cu_rows, &mut b.cu_rows)?;
    put(dev, "pos0", &step.pos0, &mut b.pos0)?;
    if let Some(rows) = &step.logit_rows {
        put(dev, "logit rows", rows, &mut b.logit_rows)?;
    }
    let shape = ForwardShape {
        rows: n,
        seqs: ns,
        attn: AttnLaunch::Prefill {
            max_rows: step.max_rows,
        },
        logit_rows: step.logit_rows.as_ref().map(|r| r.len()),
    };
    forward_device(md, plan, b, &shape, debug_enabled())
}

fn check_forward(plan: &MemoryPlan, n: usize, ns: usize) -> Result<()> {
    if n == 0 || n > plan.max_rows || ns > plan.max_seqs {
        return Err(Error::Cuda(format!(
            "internal: a forward of {n} rows / {ns} sequences against a plan of {} / {}",
            plan.max_rows, plan.max_seqs
        )));
    }
    Ok(())
}

/// The kernels of one forward over inputs already on the device (ids, pos, row_seq, block
/// tables, cu_rows/pos0 or seq_lens, logit_rows); leaves f32 logits in `b.logits` and returns
/// the number of logit rows. Launches only (plus, with `debug`, synchronizing readbacks), so
/// without `debug` it can run under stream capture: every argument is a function of `shape`,
/// the plan and the model.
fn forward_device(
    md: Model<'_>,
    plan: &MemoryPlan,
    b: &mut Buffers,
    shape: &ForwardShape,
    debug: bool,
) -> Result<usize> {
    let (dev, c) = (md.dev, md.c);
    let blas = dev.blas()?;
    let (n, ns) = (shape.rows, shape.seqs);
    let (d, hd, qd, kvd) = (c.hidden_size, c.head_dim, c.q_dim(), c.kv_dim());
    let (nh, nkv, inter, vocab) = (
        c.num_attention_heads,
        c.num_key_value_heads,
        c.intermediate_size,
        c.vocab_size,
    );
    let eps = c.rms_norm_eps;
    check_forward(plan, n, ns)?;
    let attn = attn_shape(c, plan.num_pages + 1, plan.max_pages_per_seq);
    let parts = match shape.attn {
        AttnLaunch::Prefill { .. } => 1,
        AttnLaunch::Decode { max_len } => {
            if n != ns {
                return Err(Error::Cuda(format!(
                    "internal: a decode forward of {n} rows for {ns} sequences"
                )));
            }
            let parts =
                super::decode_partitions(max_len.min(plan.max_pages_per_seq * PAGE_SIZE), c.sliding_window);
            if parts > 1 && parts > plan.max_decode_parts {
                return Err(Error::Cuda(format!(
                    "internal: a decode step of {parts} partitions against a plan of {}",
                    plan.max_decode_parts
                )));
            }
            parts
        }
    };

    // x (n, D) = embed[ids]
    dev.embedding_fwd_bf16(
        &md.w.embed,
        &b.ids.slice(..n),
        &mut b.x.slice_mut(..n * d),
        n,
        d,
        vocab,
    )?;
    let lora_of = |l: usize, p: Proj| -> Option<(&DeviceLoraPair, f32, usize)> {
        md.lora.and_then(|a| {
            a.layers[l][p as usize]
                .as_ref()
                .map(|pair| (pair, a.scale, a.rank))
        })
    };
    // h = rmsnorm(x) with layer 0's input norm; every later norm is fused with the residual
    // add before it (residual_rmsnorm_fwd_bf16), the last one with the final norm.
    dev.rmsnorm_fwd_bf16(
        &b.x.slice(..n * d),
        &md.w.layers[0].input_norm,
        &mut b.h.slice_mut(..n * d),
        n,
        d,
        eps,
    )?;
    let nl = md.w.layers.len();
    for (l, lw) in md.w.layers.iter().enumerate() {
        // --- attention block: h holds rmsnorm(x) · input_norm
        let h = b.h.slice(..n * d);
        let (kc, vc) = &mut b.kv[l];
        let bt = b.block_table.slice(..ns * plan.max_pages_per_seq);
        if c.qk_norm {
            for (p, mut y) in [
                (Proj::Q, b.q_pre.slice_mut(..n * qd)),
                (Proj::K, b.k_pre.slice_mut(..n * kvd)),
                (Proj::V, b.v.slice_mut(..n * kvd)),
            ] {
                linear(
                    dev,
                    blas,
                    &h,
                    &lw.proj[p as usize],
                    lora_of(l, p),
                    &mut b.xa,
                    &mut y,
                    n,
                )?;
            }
            let (qn, kn) = match (&lw.q_norm, &lw.k_norm) {
                (Some(q), Some(k)) => (q, k),
                _ => return Err(Error::Cuda("internal: qk_norm without q/k norm weights".into())),
            };
            // Per-head RMSNorm: rows = n·heads of hd values.
            dev.rmsnorm_fwd_bf16(
                &b.q_pre.slice(..n * qd),
                qn,
                &mut b.q.slice_mut(..n * qd),
                n * nh,
                hd,
                eps,
            )?;
            dev.rmsnorm_fwd_bf16(
                &b.k_pre.slice(..n * kvd),
                kn,
                &mut b.k.slice_mut(..n * kvd),
                n * nkv,
                hd,
                eps,
            )?;
            dev.rope_fwd_bf16(
                &mut b.q.slice_mut(..n * qd),
                &mut b.k.slice_mut(..n * kvd),
                &b.pos.slice(..n),
                md.inv_freq,
                n,
                nh,
                nkv,
                hd,
            )?;
            dev.kv_cache_append_bf16(
                kc,
                vc,
                &b.k.slice(..n * kvd),
                &b.v.slice(..n * kvd),
                &bt,
                &b.row_seq.slice(..n),
                &b.pos.slice(..n),
                &attn,
                n,
            )?;
        } else {
            // One GEMM for q | k | v against the stacked weights, each LoRA into its columns,
            // then bias + RoPE + the cache append in one kernel.
            let wq = qd + 2 * kvd;
            let bf = cudaDataType::CUDA_R_16BF;
            let y = &mut b.qkv.slice_mut(..n * wq);
            gemm_checked(dev, blas, "q|k|v", &h, lw.qkv_w.as_ref(), y, bf, n, d, wq)?;
            lora_group(
                dev,
                &h,
                &[(Proj::Q, 0), (Proj::K, qd), (Proj::V, qd + kvd)],
                lw,
                md.lora.map(|a| (a, l)),
                &mut b.xa,
                &mut b.qkv.slice_mut(..n * wq),
                wq,
                n,
            )?;
            dev.qkv_rope_append_bf16(
                &b.qkv.slice(..n * wq),
                lw.qkv_b.as_ref(),
                &b.pos.slice(..n),
                md.inv_freq,
                &bt,
                &b.row_seq.slice(..n),
                &mut b.q.slice_mut(..n * qd),
                kc,
                vc,
                &attn,
                n,
            )?;
        }
        match shape.attn {
            AttnLaunch::Prefill { max_rows } => dev.attention_prefill_bf16(
                &b.q.slice(..n * qd),
                kc,
                vc,
                &bt,
                &b.cu_rows.slice(..ns + 1),
                &b.pos0.slice(..ns),
                &mut b.attn.slice_mut(..n * qd),
                &attn,
                ns,
                n,
                max_rows,
            )?,
            AttnLaunch::Decode { max_len } => {
                let pr = if parts > 1 { ns * nh * parts } else { 1 };
                dev.attention_decode_bf16(
                    &b.q.slice(..n * qd),
                    kc,
                    vc,
                    &bt,
                    &b.seq_lens.slice(..ns),
                    &mut b.attn.slice_mut(..n * qd),
                    &mut b.part_o.slice_mut(..pr * hd),
                    &mut b.part_ml.slice_mut(..pr * 2),
                    &mut b.attn_counters,
                    &attn,
                    ns,
                    max_len,
                )?
            }
        }
        linear(
            dev,
            blas,
            &b.attn.slice(..n * qd),
            &lw.proj[Proj::O as usize],
            lora_of(l, Proj::O),
            &mut b.xa,
            &mut b.proj.slice_mut(..n * d),
            n,
        )?;
        // --- MLP block: x += o; h = rmsnorm(x) · post_norm
        dev.residual_rmsnorm_fwd_bf16(
            &mut b.x.slice_mut(..n * d),
            &b.proj.slice(..n * d),
            &lw.post_norm,
            &mut b.h.slice_mut(..n * d),
            n,
            d,
            eps,
        )?;
        // One GEMM for gate | up against the stacked weights (+ bias, + each LoRA).
        let h = b.h.slice(..n * d);
        let wg = 2 * inter;
        let bf = cudaDataType::CUDA_R_16BF;
        let y = &mut b.gate_up.slice_mut(..n * wg);
        gemm_checked(dev, blas, "gate|up", &h, lw.gate_up_w.as_ref(), y, bf, n, d, wg)?;
        if let Some(bias) = &lw.gate_up_b {
            dev.add_bias_bf16(&mut b.gate_up.slice_mut(..n * wg), bias, n, wg)?;
        }
        lora_group(
            dev,
            &h,
            &[(Proj::Gate, 0), (Proj::Up, inter)],
            lw,
            md.lora.map(|a| (a, l)),
            &mut b.xa,
            &mut b.gate_up.slice_mut(..n * wg),
            wg,
            n,
        )?;
        // SwiGLU, then the down projection: once the down GEMM's shape has been decided for the
        // skinny kernel (at an earlier, eager step: src/cuda/gemm.rs), one launch that computes
        // act inside the GEMM, bit-identical to the two launches (act is written out only when
        // the down projection's LoRA reads it); else swiglu and `linear` (which decides).
        let down = &lw.proj[Proj::Down as usize];
        let down_lora = lora_of(l, Proj::Down);
        match dev.gemm_choice(n, inter, d, false) {
            Some(super::GemmChoice::Skinny { splits }) => {
                let s = dev.stream();
                let dw = down.w();
                check("down weight", dw.len(), d * inter)?;
                check("gate_up", b.gate_up.len(), n * wg)?;
                check("act", b.act.len(), n * inter)?;
                check("proj", b.proj.len(), n * d)?;
                let (gp, _g) = b.gate_up.device_ptr(s);
                let (wp, _w) = dw.device_ptr(s);
                let (ap, _a) = b.act.device_ptr_mut(s);
                let (yp, _y) = b.proj.device_ptr_mut(s);
                let act_out = down_lora.is_some().then_some(ap);
                dev.skinny_gemm_swiglu_raw(gp, wp, yp, act_out, n, inter, d, splits)?;
            }
            _ => {
                dev.swiglu_fused_fwd_bf16(
                    &b.gate_up.slice(..n * wg),
                    &mut b.act.slice_mut(..n * inter),
                    n,
                    inter,
                )?;
                let bf = cudaDataType::CUDA_R_16BF;
                let act = b.act.slice(..n * inter);
                let (w, y) = (down.w(), &mut b.proj.slice_mut(..n * d));
                gemm_checked(dev, blas, "down", &act, &w, y, bf, n, inter, d)?;
            }
        }
        linear_epilogue(
            dev,
            &b.act.slice(..n * inter),
            down,
            down_lora,
            &mut b.xa,
            &mut b.proj.slice_mut(..n * d),
            n,
        )?;
        // x += down; h = rmsnorm(x) with the next layer's input norm (the final norm after the
        // last layer: every row is normed, cheap, then lm_head runs only on the logit rows).
        let next_norm = if l + 1 < nl {
            &md.w.layers[l + 1].input_norm
        } else {
            &md.w.final_norm
        };
        dev.residual_rmsnorm_fwd_bf16(
            &mut b.x.slice_mut(..n * d),
            &b.proj.slice(..n * d),
            next_norm,
            &mut b.h.slice_mut(..n * d),
            n,
            d,
            eps,
        )?;
        if debug {
            debug_absmax(dev, &format!("layer {l} residual"), &b.x, n * d)?;
        }
    }

    let m = shape.logit_rows.unwrap_or(n);
    if m == 0 || m > plan.max_logit_rows {
        return Err(Error::Cuda(format!(
            "internal: {m} logit rows against a plan of {}",
            plan.max_logit_rows
        )));
    }
    match shape.logit_rows {
        None => gemm_logits(
            dev,
            blas,
            &b.h.slice(..n * d),
            md.w.lm_head(),
            &mut b.logits.slice_mut(..m * vocab),
            n,
            d,
            vocab,
        )?,
        Some(_) => {
            // Gather the rows with the embedding kernel: "table" = h (n, D), ids = row indices.
            dev.embedding_fwd_bf16(
                &b.h.slice(..n * d),
                &b.logit_rows.slice(..m),
                &mut b.hsel.slice_mut(..m * d),
                m,
                d,
                n,
            )?;
            gemm_logits(
                dev,
                blas,
                &b.hsel.slice(..m * d),
                md.w.lm_head(),
                &mut b.logits.slice_mut(..m * vocab),
                m,
                d,
                vocab,
            )?;
        }
    }
    if debug {
        let host = get(dev, "logits", &b.logits, m * vocab)?;
        let mx = host
            .iter()
            .fold(0f32, |a, v| if v.is_finite() { a.max(v.abs()) } else { f32::NAN });
        eprintln!("rft cuda debug: logits ({m} rows): max |z| = {mx}");
    }
    Ok(m)
}

/// Copies `n` values of type `T` staged at word offset `at` of `b.staging` into `dst[..n]`
/// (device to device; one memcpy node in a graph).
fn unstage<T>(
    dev: &CudaDevice,
    what: &str,
    staging: &CudaSlice<u32>,
    at: usize,
    n: usize,
    dst: &mut CudaSlice<T>,
) -> Result<()> {
    let words = n * std::mem::size_of::<T>() / 4;
    check(what, staging.len(), at + words)?;
    check(what, dst.len(), n)?;
    let view = staging.slice(at..at + words);
    // SAFETY: T is u32, i32 or u64 (plain integers: every bit pattern valid), written on the host
    // as such at this offset ([`DecodeStaging`]); `at` keeps u64 values 8-byte aligned (even
    // words of a 256-byte aligned allocation).
    let src = unsafe { view.transmute::<T>(n) }
        .ok_or_else(|| Error::Cuda(format!("internal: staged {what} do not fit their words")))?;
    dev.stream()
        .memcpy_dtod(&src, &mut dst.slice_mut(..n))
        .map_err(cuda_err(format_args!("unstaging {what}")))
}

/// The device work of one decode step of `rows` rows (a bucket) whose inputs are staged in
/// `b.staging` ([`DecodeStaging`]): copy them into the forward's buffers, run the forward with
/// the attention grid sized for `max_len` positions, and sample every row; tokens land in
/// `b.sampled[..rows]`, logprobs (f32 bits) in `b.sampled[rows..2·rows]`. Device copies and
/// launches only — no host copy, allocation or synchronization — so it is what a decode graph
/// captures (then with `max_len` = the plan's block-table span and no `debug`) and what the
/// eager path runs.
fn decode_step_device(
    md: Model<'_>,
    plan: &MemoryPlan,
    b: &mut Buffers,
    rows: usize,
    max_len: usize,
    debug: bool,
) -> Result<()> {
    let dev = md.dev;
    let vocab = md.c.vocab_size;
    let lay = DecodeStaging {
        rows,
        pages: plan.max_pages_per_seq,
    };
    if rows == 0 || rows > plan.max_decode_rows() {
        return Err(Error::Cuda(format!(
            "internal: a decode step of {rows} rows against a plan of {}",
            plan.max_decode_rows()
        )));
    }
    unstage(dev, "token ids", &b.staging, lay.ids(), rows, &mut b.ids)?;
    unstage(dev, "positions", &b.staging, lay.pos(), rows, &mut b.pos)?;
    unstage(
        dev,
        "row sequences",
        &b.staging,
        lay.row_seq(),
        rows,
        &mut b.row_seq,
    )?;
    unstage(
        dev,
        "sequence lengths",
        &b.staging,
        lay.seq_lens(),
        rows,
        &mut b.seq_lens,
    )?;
    unstage(
        dev,
        "sampling streams",
        &b.staging,
        lay.stream(),
        rows,
        &mut b.sampling.stream,
    )?;
    unstage(
        dev,
        "sampling steps",
        &b.staging,
        lay.step(),
        rows,
        &mut b.sampling.step,
    )?;
    unstage(
        dev,
        "block tables",
        &b.staging,
        lay.block_table(),
        rows * lay.pages,
        &mut b.block_table,
    )?;
    let shape = ForwardShape {
        rows,
        seqs: rows,
        attn: AttnLaunch::Decode { max_len },
        logit_rows: None,
    };
    forward_device(md, plan, b, &shape, debug)?;
    sample_into(dev, b, rows, vocab)
}

/// Samples rows 0..rows of `b.logits` with the parameters in `b.sampling` into `b.sampled`:
/// tokens at [0, rows), logprobs (f32 bits) at [rows, 2·rows). Four launches (see
/// `CudaDevice::sample_tokens_f32`), scratch from the plan.
fn sample_into(dev: &CudaDevice, b: &mut Buffers, rows: usize, vocab: usize) -> Result<()> {
    check("sampled", b.sampled.len(), 2 * rows)?;
    let (mut tokens, mut rest) = b.sampled.split_at_mut(rows);
    // SAFETY: f32 and u32 have the same size and alignment, and any bits are a valid u32; the
    // kernel writes f32 logprobs that are read back as bits (`read_sampled`).
    let mut logprobs = unsafe { rest.transmute_mut::<f32>(rows) }
        .ok_or_else(|| Error::Cuda("internal: the sampled buffer is too short".into()))?;
    dev.sample_tokens_f32(
        &b.logits.slice(..rows * vocab),
        &b.sampling,
        &mut b.smp_scratch,
        &mut tokens,
        &mut logprobs,
        rows,
        vocab,
    )
}

/// Captures [`decode_step_device`] for a bucket of `rows` rows into a CUDA graph (nothing runs
/// until it is launched). The attention grid is sized for the plan's block-table span, so the
/// graph serves every step of the bucket whatever the sequences' lengths.
fn capture_decode_step(md: Model<'_>, plan: &MemoryPlan, b: &mut Buffers, rows: usize) -> Result<CudaGraph> {
    let st = md.dev.stream();
    // Thread-local mode: only this thread's unsafe calls (allocations, synchronizations) are
    // rejected, so GPU work of other threads (parallel tests) cannot invalidate the capture.
    st.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .map_err(cuda_err("beginning the decode-step capture"))?;
    let body = decode_step_device(md, plan, b, rows, plan.max_pages_per_seq * PAGE_SIZE, false);
    // Always end the capture, also after a failed launch, so the stream leaves capture mode.
    // cudarc's end_capture first returns any error stored by an earlier drop: take that out.
    let stored = md.dev.context().check_err();
    let graph = st.end_capture(CUgraphInstantiate_flags(0));
    body?;
    stored.map_err(cuda_err("a CUDA error recorded during the capture"))?;
    match graph {
        Ok(Some(g)) => Ok(g),
        Ok(None) => Err(Error::Cuda("the decode-step capture recorded no work".into())),
        Err(e) => Err(Error::Cuda(format!(
            "ending the decode-step capture or instantiating its graph: {e}"
        ))),
    }
}

/// Identifies what a captured decode graph froze of the adapter: its rank, its scale (a kernel
/// argument) and the address of every A and B buffer (0 where a projection has none). The
/// adapter's VALUES are not part of it: the graph reads them from those buffers at replay, and
/// `DeviceLora::upload` copies a same-shaped adapter into the old buffers.
fn adapter_key(dev: &CudaDevice, lora: Option<&DeviceLora>) -> Vec<u64> {
    let Some(a) = lora else { return Vec::new() };
    let mut key = vec![a.rank as u64, a.scale.to_bits() as u64];
    for layer in &a.layers {
        for pair in layer {
            match pair {
                Some(p) => {
                    key.push(p.a.device_ptr(dev.stream()).0);
                    key.push(p.b.device_ptr(dev.stream()).0);
                }
                None => key.extend([0, 0]),
            }
        }
    }
    key
}

/// After prefill: copies the prompt's last partial page `src` (k and v, every layer) into page
/// `dst`. Prompt pages are numbered before every sample page, so `src < dst`.
fn copy_partial_pages(
    dev: &CudaDevice,
    c: &ModelConfig,
    b: &mut Buffers,
    src: usize,
    dst: usize,
) -> Result<()> {
    if src >= dst {
        return Err(Error::Cuda(format!(
            "internal: partial page copy {src} → {dst} (prompt pages must come first)"
        )));
    }
    let pe = PAGE_SIZE * c.kv_dim();
    let st = dev.stream();
    for (k, v) in b.kv.iter_mut() {
        for cache in [k, v] {
            // Two disjoint views of one buffer: [0, dst·pe) holds src, [dst·pe, …) starts at dst.
            let (lo, mut hi) = cache.split_at_mut(dst * pe);
            st.memcpy_dtod(&lo.slice(src * pe..(src + 1) * pe), &mut hi.slice_mut(..pe))
                .map_err(cuda_err("copying a partial KV page"))?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The engine

/// Timings and counts of the last `generate` call (benchmarks and logs).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct GenerateStats {
    pub prefill_ms: f64,
    pub decode_ms: f64,
    pub decode_steps: usize,
    /// Sequence-steps of decode (Σ active sequences over steps).
    pub decode_rows: usize,
    pub generated_tokens: usize,
    /// KV bytes the decode steps read (Σ over steps and sequences of len·L·2·KV·hd·2).
    pub decode_kv_bytes_read: f64,
    pub plan_bytes: usize,
    /// Padding rows the decode steps computed and ignored (Σ over steps of bucket − active).
    pub decode_padded_rows: usize,
    /// Whether decode steps replayed CUDA graphs (`graph_steps` > 0).
    pub cuda_graphs: bool,
    /// Decode steps that replayed a graph. The others ran eagerly: graphs off
    /// (`RFT_CUDA_GRAPHS=0`, `RFT_CUDA_DEBUG=1`, [`CudaEngine::cuda_graphs`] false, a failed
    /// capture) or the first step of a bucket (its warm-up).
    pub graph_steps: usize,
    /// Graphs captured during this call (one per bucket; kept with the memory plan, so a later
    /// call with the same plan and adapter captures none).
    pub graphs_captured: usize,
    /// Graphs held after the call.
    pub graphs_cached: usize,
    /// Why graphs are off for this engine after a failed capture (None: they are not, or were
    /// never tried).
    pub graph_error: Option<String>,
    /// Prompts decoded together: `max_batch_seqs / G` (at least 1), or fewer when that
    /// batch's memory plan did not fit ([`CudaEngine::set_memory_budget`]).
    pub prompts_per_chunk: usize,
    /// Samples of a prompt decoded together: G, or with one prompt a chunk, fewer when G is
    /// more than `max_batch_seqs` or did not fit (the prompt is then prefilled per slice).
    pub samples_per_chunk: usize,
}

pub struct CudaEngine {
    pub(super) dev: CudaDevice,
    pub(super) config: ModelConfig,
    pub(super) weights: DeviceWeights,
    pub(super) inv_freq: CudaSlice<f32>,
    pub(super) lora: Option<DeviceLora>,
    /// Set by `set_adapter` (which cannot fail); uploaded at the next generate/score.
    pub(super) pending_adapter: Option<Option<LoraWeights>>,
    pub(super) plan: Option<(MemoryPlan, Buffers)>,
    pub(super) sm_count: usize,
    /// At most this many sequences decode together (a memory bound, not a semantic knob).
    pub max_batch_seqs: usize,
    /// Decode steps replay CUDA graphs (the default; `RFT_CUDA_GRAPHS=0` in the environment at
    /// load turns it off). false runs every step eagerly (the same launches, one by one).
    pub cuda_graphs: bool,
    /// Set when a capture failed: graphs stay off for this engine, the reason in the stats.
    pub(super) graph_error: Option<String>,
    /// Bytes the memory plan may take ([`MemoryPlan::total_bytes`]); None: what is free.
    pub(super) memory_budget: Option<usize>,
    pub last_stats: GenerateStats,
}

impl CudaEngine {
    /// Loads `dir` (config.json, generation_config.json, safetensors) onto CUDA device `ordinal`.
    pub fn load(dir: &Path, ordinal: usize) -> Result<CudaEngine> {
        if !dir.is_dir() {
            return Err(Error::invalid(format!(
                "model directory {} does not exist or is not a directory",
                dir.display()
            )));
        }
        let config = ModelConfig::from_dir(dir)?;
        let dev = CudaDevice::new(ordinal)?;
        let ckpt = Checkpoint::open(dir)?;
        let weights = DeviceWeights::from_checkpoint(&dev, &ckpt, &config)?;
        Self::with_weights(dev, config, weights)
    }

    /// From f32 weights already in memory (tests).
    pub fn from_weights(config: ModelConfig, weights: &Weights, ordinal: usize) -> Result<CudaEngine> {
        let dev = CudaDevice::new(ordinal)?;
        let w = DeviceWeights::from_f32(&dev, weights, &config)?;
        Self::with_weights(dev, config, w)
    }

    /// Random weights of `config`'s shape made on the device (benchmarks; no files).
    pub fn random(config: ModelConfig, seed: u64, ordinal: usize) -> Result<CudaEngine> {
        let dev = CudaDevice::new(ordinal)?;
        let w = DeviceWeights::random(&dev, &config, seed)?;
        Self::with_weights(dev, config, w)
    }

    fn with_weights(dev: CudaDevice, config: ModelConfig, weights: DeviceWeights) -> Result<CudaEngine> {
        let attn = attn_shape(&config, 1, 1);
        if !config.head_dim.is_multiple_of(4)
            || config.head_dim > 256
            || !config
                .num_attention_heads
                .is_multiple_of(config.num_key_value_heads)
        {
            return Err(Error::invalid(format!(
                "the CUDA engine needs head_dim a multiple of 4 and ≤ 256 and heads a multiple of \
                 KV heads; this model has {attn:?}"
            )));
        }
        if config.max_position_embeddings > i32::MAX as usize / 2 {
            return Err(Error::invalid(
                "max_position_embeddings too large for i32 positions",
            ));
        }
        let inv_freq = dev.upload(&config.rope_inv_freq())?;
        let sm_count = dev
            .context()
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(cuda_err("querying the SM count"))? as usize;
        dev.blas()?; // fail at load, not at the first forward, when cuBLAS is missing
        Ok(CudaEngine {
            dev,
            config,
            weights,
            inv_freq,
            lora: None,
            pending_adapter: None,
            plan: None,
            sm_count,
            max_batch_seqs: 64,
            cuda_graphs: graphs_enabled_by_env(),
            graph_error: None,
            memory_budget: None,
            last_stats: GenerateStats::default(),
        })
    }

    pub fn device(&self) -> &CudaDevice {
        &self.dev
    }

    /// The GPU's SM count.
    pub fn sm_count(&self) -> usize {
        self.sm_count
    }

    /// Bytes of the bf16 weights on the device (tied embeddings counted once).
    pub fn weight_bytes(&self) -> usize {
        self.weights.bytes
    }

    /// Weight bytes one decode step reads: everything but an untied embedding table (of which
    /// only the rows of the step's tokens are read).
    pub fn decode_weight_bytes(&self) -> usize {
        let c = &self.config;
        if c.tie_word_embeddings {
            self.weights.bytes
        } else {
            self.weights.bytes - c.vocab_size * c.hidden_size * 2
        }
    }

    /// The plan of the buffers currently held (None before the first call).
    pub fn memory_plan(&self) -> Option<&MemoryPlan> {
        self.plan.as_ref().map(|(p, _)| p)
    }

    /// Uploads a pending adapter (outside any forward).
    pub(super) fn sync_adapter(&mut self) -> Result<()> {
        match self.pending_adapter.take() {
            Some(pending) => self.set_adapter_now(pending.as_ref()),
            None => Ok(()),
        }
    }

    /// Makes `adapter` the live adapter now (errors surface here, not at the next call).
    pub(super) fn set_adapter_now(&mut self, adapter: Option<&LoraWeights>) -> Result<()> {
        self.pending_adapter = None;
        self.lora = match adapter {
            None => None,
            Some(w) => Some(DeviceLora::upload(&self.dev, &self.config, w, self.lora.take())?),
        };
        Ok(())
    }

    /// Copies every A and B of the live adapter from ranges of a flat f32 device buffer (the
    /// training step's parameters), device to device on the stream. `ranges(l, p)` gives the
    /// (A, B) ranges of layer l's projection p; the adapter's buffers keep their addresses.
    pub(super) fn copy_adapter_from_flat(
        &mut self,
        flat: &CudaSlice<f32>,
        ranges: impl Fn(usize, Proj) -> Option<(std::ops::Range<usize>, std::ops::Range<usize>)>,
    ) -> Result<()> {
        let lora = self
            .lora
            .as_mut()
            .ok_or_else(|| Error::Cuda("internal: no live adapter to update".into()))?;
        let st = self.dev.stream();
        for (l, layer) in lora.layers.iter_mut().enumerate() {
            for p in Proj::ALL {
                match (layer[p as usize].as_mut(), ranges(l, p)) {
                    (Some(pair), Some((a, b))) => {
                        check("adapter A", pair.a.len(), a.len())?;
                        check("adapter B", pair.b.len(), b.len())?;
                        st.memcpy_dtod(&flat.slice(a), &mut pair.a)
                            .map_err(cuda_err("copying lora_A into the rollout adapter"))?;
                        st.memcpy_dtod(&flat.slice(b), &mut pair.b)
                            .map_err(cuda_err("copying lora_B into the rollout adapter"))?;
                    }
                    (None, None) => {}
                    _ => {
                        return Err(Error::Cuda(format!(
                            "internal: layer {l} {} is trained but not in the rollout adapter (or \
                             the reverse)",
                            p.module_name()
                        )))
                    }
                }
            }
        }
        Ok(())
    }

    /// Overwrites every bf16 weight in place with `master` (f32, the tensors of
    /// [`DeviceWeights::param_views`] order concatenated, `sizes` elements each) rounded to
    /// bf16, then refreshes the stacked bias copies: full fine-tuning's weight refresh after an
    /// optimiser step. The buffers keep their addresses, so captured decode graphs stay valid.
    pub(super) fn write_weights_from_f32(&mut self, master: &CudaSlice<f32>, sizes: &[usize]) -> Result<()> {
        let cast = self.dev.function("cast_f32_to_bf16")?;
        {
            let views = self.weights.param_views();
            if views.len() != sizes.len() {
                return Err(Error::Cuda(format!(
                    "internal: {} trained tensors but the engine has {}",
                    sizes.len(),
                    views.len()
                )));
            }
            let s = self.dev.stream();
            let mut off = 0usize;
            for (i, (view, &n)) in views.iter().zip(sizes).enumerate() {
                if view.len() != n || off + n > master.len() {
                    return Err(Error::Cuda(format!(
                        "internal: trained tensor {i} has {n} elements, the engine's {} (master {} of {})",
                        view.len(),
                        off + n,
                        master.len()
                    )));
                }
                if n > 0 {
                    // The view is read-only to cudarc; the weights are this engine's, held by
                    // `&mut self`, and every read of them is ordered on this one stream.
                    let (op, _o) = view.device_ptr(s);
                    let src = master.slice(off..off + n);
                    let (ip, _i) = src.device_ptr(s);
                    let n64 = n as u64;
                    let mut l = s.launch_builder(&cast);
                    l.arg(&op).arg(&ip).arg(&n64);
                    // SAFETY: (bf16* out, const float* in, size_t n): out is n bf16 of this
                    // tensor, in n f32 of `master` (both checked above); grid-stride kernel.
                    unsafe {
                        l.launch(super::train_kernels::cfg(
                            (super::train_kernels::ew_vec_grid(n), 1, 1),
                            256,
                            0,
                        ))
                    }
                    .map_err(cuda_err("cast_f32_to_bf16 (weight refresh)"))?;
                }
                off += n;
            }
        }
        self.weights.restack_biases(&self.dev)
    }

    /// The model a forward reads, the plan and its buffers, and the graph-error slot, borrowed
    /// apart (the callers run [`Self::ensure_plan`] first).
    fn planned(&mut self) -> (Model<'_>, &mut MemoryPlan, &mut Buffers, &mut Option<String>) {
        let CudaEngine {
            dev,
            config: c,
            weights,
            inv_freq,
            lora,
            plan,
            graph_error,
            ..
        } = self;
        let (plan, b) = plan.as_mut().expect("ensure_plan set it");
        let md = Model {
            dev,
            c,
            w: weights,
            lora: lora.as_ref(),
            inv_freq,
        };
        (md, plan, b, graph_error)
    }

    /// Makes sure the held buffers serve `needs`; grows (re-allocates) them otherwise. An error
    /// names the sizes when they do not fit the free device memory (or the budget).
    fn ensure_plan(&mut self, needs: PlanNeeds) -> Result<()> {
        if self.fit_plan(needs)? {
            return Ok(());
        }
        let rank = self.lora.as_ref().map_or(0, |l| l.rank);
        let plan = MemoryPlan::new(&self.config, needs, rank);
        let (free, _total) = self
            .dev
            .context()
            .mem_get_info()
            .map_err(cuda_err("querying free device memory"))?;
        Err(Error::Cuda(format!(
            "the memory plan needs {:.2} GiB (KV cache {:.2}, activations {:.2}, logits {:.2}, \
             scratch {:.2}) but only {:.2} GiB are free{}; lower --batch-size \
             (max_batch_seqs), the prompt length or max_new_tokens",
            gib(plan.total_bytes()),
            gib(plan.kv_cache_bytes),
            gib(plan.activation_bytes),
            gib(plan.logits_bytes),
            gib(plan.scratch_bytes),
            gib(free),
            self.memory_budget.map_or(String::new(), |b| format!(
                " (the engine's budget: {:.2} GiB)",
                gib(b)
            ))
        )))
    }

    /// [`Self::ensure_plan`] without the error: false when neither the union of the held plan's
    /// needs and `needs` nor `needs` alone fits the free memory and the budget (the held
    /// buffers are released then).
    fn fit_plan(&mut self, needs: PlanNeeds) -> Result<bool> {
        let rank = self.lora.as_ref().map_or(0, |l| l.rank);
        let want = MemoryPlan::new(&self.config, needs, rank);
        if let Some((have, _)) = &self.plan {
            if have.covers(&want) {
                return Ok(true);
            }
        }
        // Grow: serve both what was held and what is needed, or what is needed alone.
        let union = self
            .plan
            .as_ref()
            .map(|(have, _)| MemoryPlan::new(&self.config, have.needs.max(needs), rank));
        // Free the old buffers (and the decode graphs captured against them) first; cudarc
        // frees on the stream.
        self.plan = None;
        self.dev.synchronize()?;
        let (free, _total) = self
            .dev
            .context()
            .mem_get_info()
            .map_err(cuda_err("querying free device memory"))?;
        let budget = self.memory_budget;
        let fits = |p: &MemoryPlan| p.total_bytes() <= free && budget.is_none_or(|b| p.total_bytes() <= b);
        let plan = match union {
            Some(u) if fits(&u) => u,
            _ if fits(&want) => want,
            _ => return Ok(false),
        };
        let bufs = Buffers::alloc(&self.dev, &self.config, &plan)?;
        self.plan = Some((plan, bufs));
        Ok(true)
    }

    /// Caps the memory plan (KV cache, activations, logits, scratch; not the weights) at
    /// `bytes`; None (the default): what the device has free. A generate call whose batch of
    /// `max_batch_seqs` does not fit decodes fewer prompts (with all their samples) at a time
    /// instead ([`GenerateStats::prompts_per_chunk`]; the samples do not depend on it). Takes
    /// effect at the next call (the held buffers are released).
    pub fn set_memory_budget(&mut self, bytes: Option<usize>) {
        self.memory_budget = bytes;
        self.plan = None;
    }
}

/// One prompt's samples decoded in one chunk of a generate call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkUnit {
    pub prompt: usize,
    pub samples: Range<usize>,
}

/// The chunks of a generate call over `num_prompts` prompts × `g` samples, in (prompt, sample)
/// order: `prompts_per_chunk` whole prompts each, or (with one prompt a chunk) slices of
/// `samples_per_chunk` of a prompt's samples.
pub fn generate_chunks(
    num_prompts: usize,
    g: usize,
    prompts_per_chunk: usize,
    samples_per_chunk: usize,
) -> Vec<Vec<ChunkUnit>> {
    let (ppc, spc) = (prompts_per_chunk.max(1), samples_per_chunk.clamp(1, g.max(1)));
    if spc < g {
        (0..num_prompts)
            .flat_map(|p| {
                (0..g).step_by(spc).map(move |s| {
                    vec![ChunkUnit {
                        prompt: p,
                        samples: s..(s + spc).min(g),
                    }]
                })
            })
            .collect()
    } else {
        (0..num_prompts)
            .step_by(ppc)
            .map(|p0| {
                (p0..(p0 + ppc).min(num_prompts))
                    .map(|p| ChunkUnit {
                        prompt: p,
                        samples: 0..g,
                    })
                    .collect()
            })
            .collect()
    }
}

/// `RFT_CUDA_GRAPHS=0` turns decode graphs off; anything else (or unset) leaves them on.
fn graphs_enabled_by_env() -> bool {
    std::env::var("RFT_CUDA_GRAPHS").map_or(true, |v| v.trim() != "0")
}

/// Prints why graphs are off, once per process (every engine falls back on its own).
fn log_graph_fallback(why: &str) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        eprintln!(
            "rft: capturing the decode step as a CUDA graph failed ({why}); decoding eagerly \
             instead (RFT_CUDA_GRAPHS=0 does so from the start)"
        )
    });
}

/// Runs one decode step of `rows` rows (a bucket) whose inputs are staged: replays the
/// bucket's graph; or, the first time the bucket is seen, runs it eagerly (warm-up); or, the
/// second time, captures its graph and replays it. With `use_graphs` false every step is
/// eager. A failed capture runs the step eagerly and sets `graph_error` (graphs then stay off),
/// unless it was invalidated from outside (retried at the bucket's next step, a few times).
#[allow(clippy::too_many_arguments)]
fn run_decode_step(
    md: Model<'_>,
    plan: &MemoryPlan,
    b: &mut Buffers,
    rows: usize,
    step_max_len: usize,
    use_graphs: bool,
    graph_error: &mut Option<String>,
    stats: &mut GenerateStats,
) -> Result<()> {
    if !use_graphs || graph_error.is_some() {
        return decode_step_device(md, plan, b, rows, step_max_len, debug_enabled());
    }
    if let Some(DecodeGraph(g)) = b.graphs.by_bucket.get(&rows) {
        g.launch().map_err(cuda_err("replaying the decode graph"))?;
        stats.graph_steps += 1;
        return Ok(());
    }
    if b.graphs.warm.insert(rows) {
        return decode_step_device(md, plan, b, rows, step_max_len, false);
    }
    // A graph that cannot be captured, instantiated or launched the first time is a graph
    // problem, not a kernel one (the same launches just ran eagerly): fall back. A launch error
    // is returned before anything is enqueued, so the eager step starts from a clean stream.
    let captured = capture_decode_step(md, plan, b, rows).and_then(|g| {
        g.launch()
            .map_err(cuda_err("launching a freshly captured decode graph"))?;
        Ok(g)
    });
    match captured {
        Ok(g) => {
            b.graphs.by_bucket.insert(rows, DecodeGraph(g));
            stats.graphs_captured += 1;
            stats.graph_steps += 1;
            Ok(())
        }
        Err(e) => {
            let why = format!("bucket of {rows} rows: {e}");
            // Work of another thread on the same device (a module load, a synchronizing call:
            // seen on the H200 with parallel tests, each opening engines) can invalidate a
            // capture from outside. That is transient: keep graphs on and capture again at the
            // bucket's next step, up to MAX_CAPTURE_TRIES invalidations per engine.
            b.graphs.invalidated += 1;
            if !(why.contains("STREAM_CAPTURE_INVALIDATED") && b.graphs.invalidated < MAX_CAPTURE_TRIES) {
                log_graph_fallback(&why);
                *graph_error = Some(why);
            }
            decode_step_device(md, plan, b, rows, step_max_len, false)
        }
    }
}

impl Drop for CudaEngine {
    fn drop(&mut self) {
        // The decode graphs reference kernels of the device's module, and `dev` (the first field)
        // would go first: destroy them, with the plan's buffers, while the module is loaded.
        self.plan = None;
    }
}

pub(super) fn gib(b: usize) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

/// One sequence of a chunk during generation.
struct Seq {
    prompt_index: usize,
    sample_index: usize,
    prompt_len: usize,
    /// Block-table row (max_pages_per_seq page ids).
    table: Vec<i32>,
    ids: Vec<u32>,
    logprobs: Vec<f32>,
    done: Option<FinishReason>,
}

impl Engine for CudaEngine {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn set_adapter(&mut self, adapter: Option<LoraWeights>) {
        self.pending_adapter = Some(adapter);
    }

    fn set_max_batch_seqs(&mut self, n: usize) {
        self.max_batch_seqs = n.max(1);
    }

    fn generate(
        &mut self,
        prompts: &[Vec<u32>],
        num_samples: usize,
        params: &SamplingParams,
        stop: &StopCriteria,
        decode: Option<Decode<'_>>,
    ) -> Result<Vec<Rollout>> {
        crate::engine::check_generate_request(&self.config, prompts, num_samples, params, stop)?;
        if prompts.is_empty() {
            return Ok(Vec::new());
        }
        self.sync_adapter()?;
        let g = num_samples;
        let ctx = self.config.max_position_embeddings;
        // A chunk decodes whole prompts (each prefilled once, its G samples sharing that KV), or,
        // when one prompt's G samples are more than max_batch_seqs or do not fit the memory, a
        // slice of one prompt's samples (the prompt is prefilled again for each slice). Samples
        // are drawn from (seed, prompt·G + sample, step) streams, so the chunking changes no
        // sample.
        let mut prompts_per_chunk = (self.max_batch_seqs / g).max(1).min(prompts.len());
        let mut samples_per_chunk = g.min(self.max_batch_seqs);
        let max_prompt_len = prompts.iter().map(|p| p.len()).max().unwrap_or(1);
        let config = self.config.clone();
        let needs = |prompts_per_chunk, samples| {
            MemoryPlan::for_generate(
                &config,
                prompts_per_chunk,
                samples,
                max_prompt_len,
                stop.max_new_tokens,
            )
        };
        // Fewer prompts, then fewer samples, at a time when a chunk does not fit.
        while prompts_per_chunk > 1 && !self.fit_plan(needs(prompts_per_chunk, g))? {
            prompts_per_chunk = prompts_per_chunk.div_ceil(2);
        }
        if prompts_per_chunk == 1 {
            while samples_per_chunk > 1 && !self.fit_plan(needs(1, samples_per_chunk))? {
                samples_per_chunk = samples_per_chunk.div_ceil(2);
            }
        }
        self.ensure_plan(needs(prompts_per_chunk, samples_per_chunk))?;
        let chunks = generate_chunks(prompts.len(), g, prompts_per_chunk, samples_per_chunk);
        let mut stats = GenerateStats {
            prompts_per_chunk,
            samples_per_chunk,
            ..GenerateStats::default()
        };
        let use_graphs = self.cuda_graphs && !debug_enabled();
        let (md, plan, b, graph_error) = self.planned();
        let (dev, c) = (md.dev, md.c);
        stats.plan_bytes = plan.total_bytes();
        // Graphs froze the adapter's buffer addresses and scale: another adapter, recapture.
        let key = adapter_key(dev, md.lora);
        if b.graphs.adapter_key != key {
            b.graphs.clear();
            b.graphs.adapter_key = key;
        }
        let mp = plan.max_pages_per_seq;
        let scratch = plan.scratch_page() as i32;
        let vocab = c.vocab_size;
        let kv_row_bytes = (c.num_hidden_layers * 2 * c.kv_dim() * 2) as f64;
        b.sampling.fill_params(dev, params)?;
        let mut out = Vec::with_capacity(prompts.len() * g);

        for units in &chunks {
            let chunk: Vec<&Vec<u32>> = units.iter().map(|u| &prompts[u.prompt]).collect();
            // First sequence of each unit in `seqs` (units.len() + 1 offsets).
            let mut seq_off = vec![0usize];
            for u in units {
                seq_off.push(seq_off.last().unwrap() + u.samples.len());
            }
            // --- Pages: every prompt's pages first, then each sample's own pages.
            let mut next_page = 0usize;
            let mut prompt_pages: Vec<Vec<i32>> = Vec::with_capacity(chunk.len());
            for p in &chunk {
                let n = p.len().div_ceil(PAGE_SIZE);
                prompt_pages.push((next_page..next_page + n).map(|x| x as i32).collect());
                next_page += n;
            }
            let mut seqs: Vec<Seq> = Vec::with_capacity(seq_off[units.len()]);
            // (prompt's partial page, the sample's copy) per sequence that needs one.
            let mut partial_copies: Vec<(usize, usize, usize)> = Vec::new(); // (prompt j, src, dst)
            for (j, (p, u)) in chunk.iter().zip(units).enumerate() {
                let plen = p.len();
                let full = plen / PAGE_SIZE;
                let total = (plen + stop.max_new_tokens).min(ctx).div_ceil(PAGE_SIZE);
                for s in u.samples.clone() {
                    // Entries past the sequence's pages point at the scratch page.
                    let mut table = vec![scratch; mp];
                    table[..full].copy_from_slice(&prompt_pages[j][..full]);
                    for slot in table.iter_mut().take(total).skip(full) {
                        *slot = next_page as i32;
                        next_page += 1;
                    }
                    if plen % PAGE_SIZE != 0 {
                        partial_copies.push((j, prompt_pages[j][full] as usize, table[full] as usize));
                    }
                    seqs.push(Seq {
                        prompt_index: u.prompt,
                        sample_index: s,
                        prompt_len: plen,
                        table,
                        ids: Vec::new(),
                        logprobs: Vec::new(),
                        done: None,
                    });
                }
            }
            if next_page > plan.num_pages {
                return Err(Error::Cuda(format!(
                    "internal: chunk needs {next_page} KV pages, the plan has {}",
                    plan.num_pages
                )));
            }

            // --- Prefill in groups of whole prompts (≤ plan.max_rows rows), sampling step 0
            // for each group's sequences right after its forward.
            let t0 = Instant::now();
            let mut j0 = 0;
            while j0 < chunk.len() {
                let mut j1 = j0;
                let mut rows = 0;
                while j1 < chunk.len() && (j1 == j0 || rows + chunk[j1].len() <= plan.max_rows) {
                    rows += chunk[j1].len();
                    j1 += 1;
                }
                let group = &chunk[j0..j1];
                let mut step = Step {
                    ids: Vec::with_capacity(rows),
                    pos: Vec::with_capacity(rows),
                    row_seq: Vec::with_capacity(rows),
                    block_table: vec![scratch; group.len() * mp],
                    num_seqs: group.len(),
                    cu_rows: Vec::with_capacity(group.len() + 1),
                    pos0: vec![0; group.len()],
                    max_rows: group.iter().map(|p| p.len()).max().unwrap_or(0),
                    logit_rows: Some(Vec::with_capacity(seq_off[j1] - seq_off[j0])),
                };
                step.cu_rows.push(0);
                for (gi, p) in group.iter().enumerate() {
                    let pages = &prompt_pages[j0 + gi];
                    step.block_table[gi * mp..gi * mp + pages.len()].copy_from_slice(pages);
                    for (t, &tok) in p.iter().enumerate() {
                        step.ids.push(tok);
                        step.pos.push(t as i32);
                        step.row_seq.push(gi as i32);
                    }
                    let end = step.ids.len();
                    step.cu_rows.push(end as i32);
                    // The prompt's last row gives the first-token logits of each of its samples.
                    if let Some(lr) = step.logit_rows.as_mut() {
                        lr.extend(std::iter::repeat_n(
                            (end - 1) as u32,
                            units[j0 + gi].samples.len(),
                        ));
                    }
                }
                let m = forward(md, plan, b, &step)?;
                for &(j, src, dst) in &partial_copies {
                    if (j0..j1).contains(&j) {
                        copy_partial_pages(dev, c, b, src, dst)?;
                    }
                }
                let seq_range = seq_off[j0]..seq_off[j1];
                debug_assert_eq!(m, seq_range.len());
                let streams: Vec<u64> = seq_range
                    .clone()
                    .map(|si| {
                        params.first_stream + (seqs[si].prompt_index * g + seqs[si].sample_index) as u64
                    })
                    .collect();
                let steps = vec![0u64; m];
                b.sampling.fill_rows(dev, &streams, &steps)?;
                sample_into(dev, b, m, vocab)?;
                let (tokens, lps) = read_sampled(dev, b, m)?;
                apply_sampled(&mut seqs[seq_range], &tokens, &lps, vocab, stop, decode, ctx)?;
                j0 = j1;
            }
            stats.prefill_ms += t0.elapsed().as_secs_f64() * 1e3;

            // --- Decode: one token per active sequence per step, padded to the step's bucket.
            let t1 = Instant::now();
            let mut active: Vec<usize> = (0..seqs.len()).filter(|&i| seqs[i].done.is_none()).collect();
            while !active.is_empty() {
                let n = active.len();
                if n > plan.max_decode_rows() {
                    return Err(Error::Cuda(format!(
                        "internal: {n} active sequences against a plan of {} decode rows",
                        plan.max_decode_rows()
                    )));
                }
                let rows = decode_bucket(n, plan.max_decode_rows());
                let lay = DecodeStaging { rows, pages: mp };
                let mut max_len = 0;
                {
                    let staged: Vec<DecodeRow<'_>> = active
                        .iter()
                        .map(|&si| {
                            let s = &seqs[si];
                            // The newest token goes to position P + (generated − 1).
                            let pos = s.prompt_len + s.ids.len() - 1;
                            max_len = max_len.max(pos + 1);
                            stats.decode_kv_bytes_read += (pos + 1) as f64 * kv_row_bytes;
                            DecodeRow {
                                token: *s.ids.last().expect("a sampled token"),
                                pos,
                                stream: params.first_stream + (s.prompt_index * g + s.sample_index) as u64,
                                step: s.ids.len() as u64,
                                table: &s.table,
                            }
                        })
                        .collect();
                    let host = b
                        .staging_host
                        .as_mut_slice()
                        .map_err(cuda_err("waiting for the pinned staging buffer"))?;
                    check("pinned staging", host.len(), lay.words())?;
                    stage_decode_rows(&lay, &staged, scratch, &mut host[..lay.words()]);
                    put_pinned(
                        dev,
                        "the decode step's inputs",
                        &host[..lay.words()],
                        &mut b.staging,
                    )?;
                }
                run_decode_step(md, plan, b, rows, max_len, use_graphs, graph_error, &mut stats)?;
                let (tokens, lps) = read_sampled(dev, b, rows)?;
                // Apply to the active sequences (in order) through a gathered view.
                let mut batch: Vec<Seq> = active.iter().map(|&si| take_seq(&mut seqs[si])).collect();
                let res = apply_sampled(&mut batch, &tokens[..n], &lps[..n], vocab, stop, decode, ctx);
                for (&si, s) in active.iter().zip(batch) {
                    seqs[si] = s;
                }
                res?;
                stats.decode_steps += 1;
                stats.decode_rows += n;
                stats.decode_padded_rows += rows - n;
                active.retain(|&si| seqs[si].done.is_none());
            }
            stats.decode_ms += t1.elapsed().as_secs_f64() * 1e3;
            for s in seqs {
                stats.generated_tokens += s.ids.len();
                out.push(Rollout {
                    prompt_index: s.prompt_index,
                    sample_index: s.sample_index,
                    completion_ids: s.ids,
                    logprobs: s.logprobs,
                    finish_reason: s.done.unwrap_or(FinishReason::Length),
                });
            }
        }
        stats.cuda_graphs = stats.graph_steps > 0;
        stats.graphs_cached = b.graphs.by_bucket.len();
        stats.graph_error = graph_error.clone();
        self.last_stats = stats;
        Ok(out)
    }

    fn score(&mut self, items: &[(Vec<u32>, Vec<u32>)], temperature: f32) -> Result<Vec<Vec<f32>>> {
        crate::engine::check_score_request(&self.config, items, temperature)?;
        self.sync_adapter()?;
        let mut out = vec![Vec::new(); items.len()];
        let live: Vec<usize> = (0..items.len()).filter(|&i| !items[i].1.is_empty()).collect();
        if live.is_empty() {
            return Ok(out);
        }
        let lens: Vec<(usize, usize)> = live
            .iter()
            .map(|&i| (items[i].0.len(), items[i].1.len()))
            .collect();
        let groups = score_groups(&lens);
        let group_lens: Vec<Vec<(usize, usize)>> = groups
            .iter()
            .map(|g| g.iter().map(|&k| lens[k]).collect())
            .collect();
        self.ensure_plan(MemoryPlan::for_score(&group_lens))?;
        let (md, plan, b, _) = self.planned();
        let (dev, c) = (md.dev, md.c);
        let mp = plan.max_pages_per_seq;
        let scratch = plan.scratch_page() as i32;
        for group in &groups {
            let ns = group.len();
            let mut step = Step {
                ids: Vec::new(),
                pos: Vec::new(),
                row_seq: Vec::new(),
                block_table: vec![scratch; ns * mp],
                num_seqs: ns,
                cu_rows: vec![0],
                pos0: vec![0; ns],
                max_rows: 0,
                logit_rows: Some(Vec::new()),
            };
            let mut targets: Vec<u32> = Vec::new();
            let mut next_page = 0usize;
            for (gi, &k) in group.iter().enumerate() {
                let (p, comp) = &items[live[k]];
                // Rows P-1 .. P+C-2 predict the completion tokens.
                let seq: Vec<u32> = p.iter().chain(&comp[..comp.len() - 1]).copied().collect();
                let pages = seq.len().div_ceil(PAGE_SIZE);
                for x in 0..pages {
                    step.block_table[gi * mp + x] = (next_page + x) as i32;
                }
                next_page += pages;
                let base = step.ids.len();
                for (t, &tok) in seq.iter().enumerate() {
                    step.ids.push(tok);
                    step.pos.push(t as i32);
                    step.row_seq.push(gi as i32);
                }
                step.cu_rows.push(step.ids.len() as i32);
                step.max_rows = step.max_rows.max(seq.len());
                if let Some(lr) = step.logit_rows.as_mut() {
                    lr.extend((0..comp.len()).map(|j| (base + p.len() - 1 + j) as u32));
                }
                targets.extend_from_slice(comp);
            }
            let m = forward(md, plan, b, &step)?;
            put(dev, "score targets", &targets, &mut b.targets)?;
            dev.logprob_gather_f32(
                &b.logits.slice(..m * c.vocab_size),
                &b.targets.slice(..m),
                &mut b.logprobs.slice_mut(..m),
                &mut b.entropy.slice_mut(..m),
                m,
                c.vocab_size,
                temperature,
            )?;
            let lps = get(dev, "score logprobs", &b.logprobs, m)?;
            let mut off = 0;
            for &k in group {
                let n = items[live[k]].1.len();
                out[live[k]] = lps[off..off + n].to_vec();
                off += n;
            }
        }
        Ok(out)
    }
}

/// Moves a sequence out (leaving an empty placeholder) so a batch can be handed out as a slice.
fn take_seq(s: &mut Seq) -> Seq {
    std::mem::replace(
        s,
        Seq {
            prompt_index: s.prompt_index,
            sample_index: s.sample_index,
            prompt_len: s.prompt_len,
            table: Vec::new(),
            ids: Vec::new(),
            logprobs: Vec::new(),
            done: s.done,
        },
    )
}

/// Applies sampled `tokens` and their logprobs to `seqs` (in order) with the CPU engine's stop
/// rules.
fn apply_sampled(
    seqs: &mut [Seq],
    tokens: &[u32],
    lps: &[f32],
    vocab: usize,
    stop: &StopCriteria,
    decode: Option<Decode<'_>>,
    ctx: usize,
) -> Result<()> {
    if tokens.len() != seqs.len() || lps.len() != seqs.len() {
        return Err(Error::Cuda(format!(
            "internal: {} tokens and {} logprobs for {} sequences",
            tokens.len(),
            lps.len(),
            seqs.len()
        )));
    }
    for ((s, &tok), &lp) in seqs.iter_mut().zip(tokens).zip(lps) {
        if tok == u32::MAX || tok as usize >= vocab {
            return Err(Error::Cuda(format!(
                "the sampling kernel rejected the logits of prompt {} sample {} at step {} \
                 (NaN/inf logits or invalid parameters; RFT_CUDA_DEBUG=1 shows where they start)",
                s.prompt_index,
                s.sample_index,
                s.ids.len()
            )));
        }
        s.ids.push(tok);
        s.logprobs.push(lp);
        let text = match (decode, stop.stop_strings.is_empty()) {
            (Some(dec), false) => Some(dec(&s.ids)),
            _ => None,
        };
        s.done = stop.check(tok, s.ids.len(), text.as_deref());
        // KV holds P + (generated − 1) positions; the context is full when one more would not fit.
        let kv_len = s.prompt_len + s.ids.len() - 1;
        if s.done.is_none() && kv_len + 1 >= ctx {
            s.done = Some(FinishReason::Length);
        }
    }
    Ok(())
}

/// For tests: the f32 logits the CUDA forward gives for the last token of `tokens` (one
/// sequence prefilled from position 0), through the same prefill path as generate.
impl CudaEngine {
    pub fn last_token_logits(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        crate::engine::check_prompt(&self.config, 0, tokens)?;
        self.sync_adapter()?;
        let needs = MemoryPlan::for_generate(&self.config, 1, 1, tokens.len(), 1);
        self.ensure_plan(needs)?;
        let (md, plan, b, _) = self.planned();
        let (dev, c) = (md.dev, md.c);
        let mp = plan.max_pages_per_seq;
        let pages = tokens.len().div_ceil(PAGE_SIZE);
        let mut block_table = vec![plan.scratch_page() as i32; mp];
        for (x, slot) in block_table.iter_mut().enumerate().take(pages) {
            *slot = x as i32;
        }
        let step = Step {
            ids: tokens.to_vec(),
            pos: (0..tokens.len() as i32).collect(),
            row_seq: vec![0; tokens.len()],
            block_table,
            num_seqs: 1,
            cu_rows: vec![0, tokens.len() as i32],
            pos0: vec![0],
            max_rows: tokens.len(),
            logit_rows: Some(vec![tokens.len() as u32 - 1]),
        };
        let m = forward(md, plan, b, &step)?;
        get(dev, "logits", &b.logits, m * c.vocab_size)
    }
}

// ---------------------------------------------------------------------------------------------
// Benchmark

/// What `rft bench rollout` measures and prints.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RolloutBench {
    pub shape: String,
    pub device: String,
    pub prompts: usize,
    pub num_generations: usize,
    pub prompt_len: usize,
    pub new_tokens: usize,
    /// Rank of the live LoRA adapter on every projection (0: none).
    pub lora_rank: usize,
    pub generated_tokens: usize,
    pub total_s: f64,
    pub tok_s: f64,
    pub prefill_ms: f64,
    pub decode_steps: usize,
    pub decode_ms_per_step: f64,
    pub weight_bytes: usize,
    pub plan_bytes: usize,
    /// Device memory in use after the run minus before loading (driver's view).
    pub peak_gpu_bytes_measured: usize,
    /// Average bytes a decode step must read: all weights + the KV cache of the active rows.
    pub decode_bytes_per_step: f64,
    pub peak_bandwidth_bytes_s: f64,
    /// decode_bytes_per_step / step time / peak bandwidth.
    pub roofline_fraction: f64,
    /// Whether the timed run's decode steps replayed CUDA graphs (`RFT_CUDA_GRAPHS=0`: eager).
    pub cuda_graphs: bool,
    /// Decode steps of the timed run that replayed a graph.
    pub graph_steps: usize,
    /// Graphs captured in the warm-up and the timed run (one per bucket used).
    pub graphs_captured: usize,
    /// Padding rows the timed run's decode steps computed (bucket − active, summed).
    pub decode_padded_rows: usize,
    /// Why graphs were turned off (a failed capture), if they were.
    pub graph_error: Option<String>,
    /// `RFT_SKINNY_GEMM`'s policy and, under `auto`, every decode GEMM shape timed (cuBLAS vs
    /// the skinny kernel, µs per launch) with the kernel chosen (src/cuda/gemm.rs).
    pub gemm_policy: String,
    pub gemm_tuning: Vec<super::GemmTuneRecord>,
}

/// The config of a benchmark shape (`rft bench …`, checked before a GPU is looked for): a preset
/// name, or a model directory whose config.json gives the shape (its weights are not read).
pub(super) fn bench_shape(shape: &str) -> Result<ModelConfig> {
    if let Some(c) = ModelConfig::preset(shape) {
        return Ok(c);
    }
    let dir = std::path::Path::new(shape);
    if dir.join("config.json").is_file() {
        return ModelConfig::from_dir(dir);
    }
    Err(Error::invalid(format!(
        "unknown shape {shape:?}; expected qwen2.5-0.5b, qwen2.5-1.5b, qwen2.5-7b, llama3.2-1b or a \
         model directory with a config.json"
    )))
}

/// Random weights of preset `shape` on device `ordinal`; `prompts` random prompts of
/// `prompt_len` tokens, G samples each, exactly `new_tokens` new tokens (no EOS), temperature 1.
/// `lora_rank` > 0 runs with a live random LoRA adapter of that rank on every projection (as
/// GRPO's rollouts do); 0 runs the base model.
#[allow(clippy::too_many_arguments)]
pub fn bench_rollout(
    shape: &str,
    prompts: usize,
    num_generations: usize,
    prompt_len: usize,
    new_tokens: usize,
    lora_rank: usize,
    peak_bandwidth_bytes_s: f64,
    ordinal: usize,
) -> Result<RolloutBench> {
    // The arguments are checked before the GPU is looked for, so a bad one is named anywhere.
    if prompts == 0 || num_generations == 0 || prompt_len == 0 || new_tokens == 0 {
        return Err(Error::invalid(
            "--prompts, --num-generations, --prompt-len and --new-tokens must be ≥ 1",
        ));
    }
    if !(peak_bandwidth_bytes_s > 0.0 && peak_bandwidth_bytes_s.is_finite()) {
        return Err(Error::invalid(format!(
            "--peak-bandwidth must be a number of bytes/s > 0, got {peak_bandwidth_bytes_s}"
        )));
    }
    let config = bench_shape(shape)?;
    let ctx = config.max_position_embeddings;
    if prompt_len.saturating_add(new_tokens) > ctx {
        return Err(Error::invalid(format!(
            "--prompt-len {prompt_len} + --new-tokens {new_tokens} exceed the context of {shape} \
             ({ctx} tokens, max_position_embeddings)"
        )));
    }
    super::availability().map_err(Error::CudaUnavailable)?;
    let dev0 = CudaDevice::new(ordinal)?;
    let (free0, _) = dev0.context().mem_get_info().map_err(cuda_err("mem_get_info"))?;
    drop(dev0);
    let mut engine = CudaEngine::random(config.clone(), 1, ordinal)?;
    engine.max_batch_seqs = prompts * num_generations;
    if lora_rank > 0 {
        let lora = LoraWeights::new_random(super::train::all_linear(lora_rank), &config, 3, 0.02, 0.02);
        engine.set_adapter_now(Some(&lora))?;
    }
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    let ps: Vec<Vec<u32>> = (0..prompts)
        .map(|_| {
            (0..prompt_len)
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    (s % config.vocab_size as u64) as u32
                })
                .collect()
        })
        .collect();
    let params = SamplingParams {
        temperature: 1.0,
        seed: 7,
        ..Default::default()
    };
    let stop = StopCriteria {
        eos_ids: vec![],
        stop_strings: vec![],
        max_new_tokens: new_tokens,
    };
    // The plan of the timed run, allocated up front; a warm-up of the same batch for 3 tokens
    // (prefill, then 2 decode steps of the timed run's bucket: the first runs eagerly and loads
    // every kernel and cuBLAS heuristic, the second captures the bucket's graph); the run.
    engine.ensure_plan(MemoryPlan::for_generate(
        &config,
        prompts,
        num_generations,
        prompt_len,
        new_tokens,
    ))?;
    engine.generate(
        &ps,
        num_generations,
        &params,
        &StopCriteria {
            max_new_tokens: 3.min(new_tokens),
            ..stop.clone()
        },
        None,
    )?;
    let warmup_captured = engine.last_stats.graphs_captured;
    let t = Instant::now();
    let r = engine.generate(&ps, num_generations, &params, &stop, None)?;
    let total_s = t.elapsed().as_secs_f64();
    let (free1, _) = engine
        .dev
        .context()
        .mem_get_info()
        .map_err(cuda_err("mem_get_info"))?;
    let st = engine.last_stats.clone();
    let generated: usize = r.iter().map(|x| x.completion_ids.len()).sum();
    let steps = st.decode_steps.max(1) as f64;
    let ms_per_step = st.decode_ms / steps;
    let bytes_per_step = engine.decode_weight_bytes() as f64 + st.decode_kv_bytes_read / steps;
    Ok(RolloutBench {
        shape: shape.to_string(),
        device: engine.dev.name().to_string(),
        prompts,
        num_generations,
        prompt_len,
        new_tokens,
        lora_rank,
        generated_tokens: generated,
        total_s,
        tok_s: generated as f64 / total_s,
        prefill_ms: st.prefill_ms,
        decode_steps: st.decode_steps,
        decode_ms_per_step: ms_per_step,
        weight_bytes: engine.weight_bytes(),
        plan_bytes: st.plan_bytes,
        peak_gpu_bytes_measured: free0.saturating_sub(free1),
        decode_bytes_per_step: bytes_per_step,
        peak_bandwidth_bytes_s,
        roofline_fraction: if ms_per_step > 0.0 {
            bytes_per_step / (ms_per_step / 1e3) / peak_bandwidth_bytes_s
        } else {
            0.0
        },
        cuda_graphs: st.cuda_graphs,
        graph_steps: st.graph_steps,
        graphs_captured: warmup_captured + st.graphs_captured,
        decode_padded_rows: st.decode_padded_rows,
        graph_error: st.graph_error,
        gemm_policy: format!("{:?}", engine.dev.gemm_policy()).to_lowercase(),
        gemm_tuning: engine.dev.gemm_tuning(),
    })
}
