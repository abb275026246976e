//! The CUDA training step: [`CudaTrainer`] runs one GRPO policy update (forward with saved or
//! recomputed activations, fused lm_head + log-softmax gather, the GRPO loss, backward to every
//! LoRA A and B, global grad norm, clipping and AdamW) on the GPU of a [`CudaEngine`], whose
//! bf16 weights it shares. The adapter it trains is the engine's live adapter: after each
//! update the new A and B are copied into the engine's LoRA buffers on the device, so the next
//! rollout samples from the new policy with no host round trip.
//!
//! It owns the flat f32 LoRA state (params, grads, AdamW m and v: one buffer each, tensors in
//! [`crate::trainer::lora_params`] order, so host checkpoints line up tensor by tensor), the
//! bf16 copy of the params the LoRA kernels read, and the training memory plan ([`TrainPlan`]).
//!
//! Full fine-tuning ([`CudaTrainer::new_full`], `model.full_fine_tuning`): the same step with no
//! adapter, training every base weight. The flat f32 state holds the master weights in
//! [`crate::trainer::weight_params`] order (16 B per parameter with grads, m, v: small models);
//! the backward adds dW += dyᵀx (cuBLAS, bf16 in, f32 accumulated over micro-batches), db += dyᵀ·1,
//! each RMSNorm's dweight (the kernel's fixed-order partials), dW_lm += dlogitsᵀ·hsel per
//! vocabulary chunk (into the embedding when tied) and the embedding's rows (one thread per
//! element over its token's rows in order: deterministic). After AdamW the engine's bf16 weights
//! (and its stacked q|k|v / gate|up bias copies) are rewritten in place from the master, so the
//! next forward and rollout read the new model and captured decode graphs stay valid.
//! It owns no math of its own: every op is a launcher tested against the CPU reference
//! (`rollout.rs`, `train_kernels.rs`, `attention_train.rs`, `lora_train.rs`),
//! and the CPU training core (`crate::cpu::train`, `crate::trainer::step`) is the oracle of the
//! whole step (tests/cuda_train.rs).
//!
//! ```text
//! micro-batch (S sequences packed into N rows, T scored tokens)
//!   ids ─► embed ─► xs[0] ─► layer 0 ─► xs[1] ─► … ─► xs[L] ─► final norm hf [N,D]
//!   per chunk of ≤ C scored rows: hsel = hf[rows]; per vocabulary chunk of ≤ Vc columns:
//!     logits f32 [C,Vc] ─► row statistics ─► online-softmax merge ─► logp, entropy, lse, E[s]
//!   GRPO loss kernel over the chunk's tokens ─► dL/dlogp
//!   per vocabulary chunk: dlogits (bf16, one pass from the f32 logits, which are recomputed
//!     unless the vocabulary is one chunk: then all of this runs in the forward's chunk loop)
//!     ─► dhsel (f32) += dlogits·W_lm[chunk];  dh[rows] = dhsel
//!   final norm bwd ─► dx ─► layer L-1 bwd … layer 0 bwd   (dx: dL/d residual stream)
//!   layer bwd (recompute: rerun the layer's forward from xs[l] first):
//!     down ─► swiglu ─► gate/up ─► post-norm (+dx) ─► o ─► attention ─► RoPE ─► q/k norm
//!     ─► q/k/v ─► input-norm (+dx)
//!   every projection: y = x·Wᵀ (cuBLAS, frozen bf16 W), LoRA y += s·xa·Bᵀ with xa = x·Aᵀ kept
//!     per projection; backward dx = dy·W (cuBLAS), dyb = dy·B and dx += s·dyb·A (one fused
//!     kernel), dB += s·dyᵀxa, dA += s·dybᵀx (tensor-core kernels of lora_train.rs on bf16
//!     copies of A and B, refreshed after every AdamW step; W + BA is never formed)
//! after the micro-batches: Σ g² ─► clip scale (host, from 2 f64) ─► AdamW on the flat buffers
//! ```
//!
//! Memory: with `Recompute::Layer` (the default of the CUDA path) only the L+1 layer inputs
//! \[N,D\] bf16 are kept and one layer's activations exist at a time; `Recompute::None` keeps
//! every layer's activations (faster, L times the activation memory). The lm_head never holds
//! more than \[C,Vc\] f32 logits and \[C,Vc\] bf16 dlogits: by default Vc = V and C = 256 rows at
//! a 152k vocabulary (0.23 GB; [`train_logit_chunk_rows`]), and a training forward runs the
//! loss and the lm_head backward of each chunk while its logits are there
//! ([`TrainPlan::head_in_forward`]); with a split vocabulary ([`TRAIN_VOCAB_CHUNK`]) the chunks
//! merge by an online softmax and the backward recomputes the logits. LoRA dropout adds one x̃ buffer of
//! [N, max(D, qd, I)] bf16 ([`TrainPlan::lora_dropout`]). A step whose requested layout
//! (micro-batches, recompute, kept layers) does not fit the free memory or
//! [`CudaTrainer::set_memory_budget`] runs the first of [`fit_layout`]'s fallbacks that does
//! (smaller micro-batches without recompute, then layer recompute); `last_stats` says which.
//!
//! LoRA dropout (training passes only; eval, reference and old-logp passes have none, as on the
//! CPU): the LoRA kernels read x̃ = x ⊙ mask, written per projection into one scratch (the base
//! GEMM reads x), and the LoRA term of dx is masked in the fused input-gradient kernel; the mask
//! is the CPU's `dropout_factor` of (step seed + micro-batch, layer, projection, packed row,
//! column), a pure hash, so the backward and a recomputed forward regenerate it.
//!
//! Not on the GPU yet (clear errors): an entropy bonus.

use cudarc::cublas::sys::{cublasOperation_t, cudaDataType};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaFunction, CudaSlice, CudaView, DevicePtr, DevicePtrMut, DeviceRepr, PushKernelArg};
use half::bf16;
use std::ops::Range;
use std::time::Instant;

use super::engine::{
    check, gemm_ex, gemm_int, gemm_logits, get, gib, put, CudaEngine, DeviceLinear, DeviceWeights,
};
use super::train_kernels::{cfg, ew_grid, ew_vec_grid, nonempty};
use super::{
    cuda_err, grad_norm_partials_len, grpo_loss_partials_len, lora_train_compiled_rank,
    lora_train_grad_scratch_len, rmsnorm_bwd_partials_len, CudaDevice, GrpoLossScalars, LoraDropoutSite,
    LoraOut, TrainAttnShape, GRPO_FIELDS,
};
use crate::cpu::train::{Grads, LoraDropout, Recompute, Sequence};
use crate::lora::LoraWeights;
use crate::loss::sequence_weights;
use crate::model::config::ModelConfig;
use crate::model::weights::{Linear, Proj, Weights};
use crate::optim::{AdamWState, StepReport};
use crate::trainer::state::TrainState;
use crate::trainer::step::{
    prepare_batch, step_metrics, GrpoBatch, GrpoGradients, GrpoOptions, Prepared, StepMetrics,
};
use crate::{Error, Result};

/// Scored rows of one lm_head chunk, at most (and exactly, when the vocabulary is split).
pub const TRAIN_LOGIT_CHUNK_ROWS: usize = 1024;
/// Vocabulary columns of one lm_head chunk: by default the whole vocabulary (`usize::MAX`,
/// clamped to V), so that a training forward's logits are still there for the lm_head backward
/// (no second lm_head GEMM; see [`TrainPlan::head_in_forward`]). Smaller values (tests, the
/// `RFT_TRAIN_VOCAB_CHUNK` environment variable) split it: [C, Vc] f32 logits and bf16
/// dlogits at a time, merged across chunks by an online softmax, the backward recomputing them.
pub const TRAIN_VOCAB_CHUNK: usize = usize::MAX;
/// f32 logits one whole-vocabulary chunk aims at: 2^25 (134 MB), i.e. 221 rows at a 152k
/// vocabulary, rounded to 256 (a multiple of 128 rows keeps the lm_head GEMM's tiles full).
pub const TRAIN_LOGIT_CHUNK_ELEMS: usize = 1 << 25;

/// The default vocabulary chunk: [`TRAIN_VOCAB_CHUNK`], or `RFT_TRAIN_VOCAB_CHUNK` (a column
/// count ≥ 1; one below the vocabulary size splits it, e.g. for an A/B of the two lm_head paths).
pub fn vocab_chunk_from_env() -> Result<usize> {
    match std::env::var("RFT_TRAIN_VOCAB_CHUNK") {
        Err(_) => Ok(TRAIN_VOCAB_CHUNK),
        Ok(v) => match v.trim() {
            "" | "all" => Ok(TRAIN_VOCAB_CHUNK),
            t => t.parse::<usize>().ok().filter(|&c| c >= 1).ok_or_else(|| {
                Error::invalid(format!(
                    "RFT_TRAIN_VOCAB_CHUNK={t:?}: expected a number of vocabulary columns ≥ 1, or \
                     `all` (the default: the whole vocabulary in one chunk)"
                ))
            }),
        },
    }
}

/// Which side of a projection writes its output first in the training forward and backward,
/// from `RFT_TRAIN_LORA_EPILOGUE` (an A/B switch for the GPU check, scripts/gpu_check.sh):
/// `store` (unset: the default) — the LoRA kernel stores s·(x Aᵀ) Bᵀ and the base GEMM adds
/// onto it with beta = 1, so no kernel reads the projection's output back; `add` — the GEMM
/// stores x Wᵀ and the LoRA kernel adds its term (a read-modify-write of the output). Rounded
/// differently (bf16(xWᵀ + bf16(t)) against bf16(bf16(xWᵀ) + t)), equal within bf16.
pub fn lora_store_from_env() -> Result<bool> {
    match std::env::var("RFT_TRAIN_LORA_EPILOGUE") {
        Err(_) => Ok(true),
        Ok(v) => match v.trim() {
            "" | "store" => Ok(true),
            "add" => Ok(false),
            t => Err(Error::invalid(format!(
                "RFT_TRAIN_LORA_EPILOGUE={t:?}: expected `store` (the default: the LoRA term \
                 first, the base GEMM adding onto it) or `add` (the GEMM first, the LoRA term \
                 added onto it)"
            ))),
        },
    }
}

/// `RFT_TRAIN_LORA_BLOCKS=N` (N ≥ 1): the block target of the training step's fused LoRA
/// kernels before they split the output columns (default
/// [`super::lora_train::FUSED_TARGET_BLOCKS`]; more blocks in flight for the memory-bound
/// kernels at the cost of recomputing x·Aᵀ per split). Bit-identical results either way; for
/// an A/B on a GPU.
pub fn lora_blocks_from_env() -> Result<Option<usize>> {
    match std::env::var("RFT_TRAIN_LORA_BLOCKS") {
        Err(_) => Ok(None),
        Ok(v) if v.trim().is_empty() => Ok(None),
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if (1..=1 << 20).contains(&n) => Ok(Some(n)),
            _ => Err(Error::invalid(format!(
                "RFT_TRAIN_LORA_BLOCKS={v:?}: expected a block count from 1 to 1048576 (default {})",
                super::lora_train::FUSED_TARGET_BLOCKS
            ))),
        },
    }
}

/// Scored rows of one lm_head chunk for a vocabulary of `vocab` split into chunks of
/// `vocab_chunk` columns and micro-batches of up to `max_tokens` tokens: [`TRAIN_LOGIT_CHUNK_ROWS`]
/// with a split vocabulary; with a whole one [`TRAIN_LOGIT_CHUNK_ELEMS`] / V rounded to a
/// multiple of 128 in [128, 1024]; never more than the tokens.
pub fn train_logit_chunk_rows(vocab: usize, vocab_chunk: usize, max_tokens: usize) -> usize {
    let v = vocab.max(1);
    let rows = if vocab_chunk >= v {
        let r = TRAIN_LOGIT_CHUNK_ELEMS / v;
        ((r + 64) / 128 * 128).clamp(128, TRAIN_LOGIT_CHUNK_ROWS)
    } else {
        TRAIN_LOGIT_CHUNK_ROWS
    };
    rows.min(max_tokens.max(1))
}

// ---------------------------------------------------------------------------------------------
// Packed micro-batch (pure; tested without a GPU)

/// Sequences packed into rows without padding, as the CPU training core stacks them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackedBatch {
    /// \[N\] token of each row.
    pub ids: Vec<u32>,
    /// \[N\] position of each row within its sequence.
    pub pos: Vec<i32>,
    /// [S+1] rows of sequence s are cu_rows\[s\]..cu_rows[s+1].
    pub cu_rows: Vec<i32>,
    /// Longest sequence (rows).
    pub max_rows: usize,
    /// \[T\] rows whose next token is scored (t + 1 ∈ [prompt_len, len)), in output order.
    pub scored: Vec<u32>,
    /// \[T\] the token each scored row predicts.
    pub targets: Vec<u32>,
    /// \[T\] sequence (within the batch) of each scored token.
    pub token_seq: Vec<i32>,
    /// [S+1] sequence s's tokens are outputs token_off\[s\]..token_off[s+1].
    pub token_off: Vec<usize>,
}

impl PackedBatch {
    pub fn new(seqs: &[Sequence]) -> Result<PackedBatch> {
        let mut b = PackedBatch {
            ids: vec![],
            pos: vec![],
            cu_rows: vec![0],
            max_rows: 0,
            scored: vec![],
            targets: vec![],
            token_seq: vec![],
            token_off: vec![0],
        };
        for (s, seq) in seqs.iter().enumerate() {
            let len = seq.tokens.len();
            if seq.prompt_len == 0 || seq.prompt_len > len {
                return Err(Error::invalid(format!(
                    "sequence {s}: prompt_len {} must be in [1, len = {len}]",
                    seq.prompt_len
                )));
            }
            let n0 = b.ids.len();
            for t in 0..len {
                if t + 1 >= seq.prompt_len && t + 1 < len {
                    b.scored.push((n0 + t) as u32);
                    b.targets.push(seq.tokens[t + 1]);
                    b.token_seq.push(s as i32);
                }
                b.pos.push(t as i32);
            }
            b.ids.extend_from_slice(seq.tokens);
            b.max_rows = b.max_rows.max(len);
            b.cu_rows.push(b.ids.len() as i32);
            b.token_off.push(b.scored.len());
        }
        if b.ids.len() > i32::MAX as usize {
            return Err(Error::invalid(format!(
                "a micro-batch of {} rows exceeds i32 row indices",
                b.ids.len()
            )));
        }
        Ok(b)
    }

    pub fn rows(&self) -> usize {
        self.ids.len()
    }

    pub fn num_seqs(&self) -> usize {
        self.cu_rows.len() - 1
    }

    pub fn num_tokens(&self) -> usize {
        self.scored.len()
    }

    /// The targets as seen by each vocabulary chunk of `chunk` columns: [nchunks × T], entry
    /// (k, i) = target − k·chunk when the target is in chunk k, else u32::MAX (no one-hot term,
    /// NaN log-prob: the merge ignores it).
    pub fn vocab_chunk_targets(&self, vocab: usize, chunk: usize) -> Vec<u32> {
        let chunk = chunk.max(1);
        let nc = vocab.div_ceil(chunk).max(1);
        let t = self.targets.len();
        let mut out = vec![u32::MAX; nc * t];
        for (i, &tok) in self.targets.iter().enumerate() {
            let k = tok as usize / chunk;
            if k < nc {
                out[k * t + i] = (tok as usize - k * chunk) as u32;
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Memory plan (pure arithmetic; tested without a GPU)

/// Sizes of the training step's device buffers (the f32 trained state is separate:
/// `lora_bytes`, `full_bytes`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct TrainPlan {
    /// Rows (tokens) of the largest micro-batch.
    pub max_rows: usize,
    pub max_seqs: usize,
    /// Scored tokens of the largest micro-batch.
    pub max_tokens: usize,
    /// Rows of one lm_head chunk.
    pub chunk_rows: usize,
    /// Vocabulary columns of one lm_head chunk.
    pub vocab_chunk: usize,
    /// The vocabulary is one chunk: a training forward runs the loss and the lm_head backward
    /// of each chunk of rows right after its logits (which are then still there), instead of
    /// the backward recomputing them (one lm_head GEMM and one f32 logits write saved).
    pub head_in_forward: bool,
    /// Trailing layers whose activations are kept from the forward to the backward (L without
    /// recompute; with layer recompute 0, or K from [`TrainPlan::keeping_last_layers`]): the
    /// backward recomputes only layers 0 .. L − kept.
    pub kept_layers: usize,
    /// Activation sets that exist at once: the kept layers' plus one scratch set the other
    /// layers are computed (and recomputed) into, when there are any.
    pub saved_layers: usize,
    /// Bytes of one layer's activation set.
    pub layer_act_bytes: usize,
    pub lora_rank: usize,
    /// Largest f32 scratch of one LoRA-gradient launch.
    pub lora_scratch: usize,
    /// Holds the LoRA-dropout input x̃ (R, max projection input) bf16.
    pub lora_dropout: bool,
    pub activation_bytes: usize,
    pub backward_bytes: usize,
    pub logits_bytes: usize,
    /// params, grads, m, v (f32 each), the bf16 copy of the params, the grad-norm partials.
    pub lora_bytes: usize,
    /// Full fine-tuning: the trained base weights (0 with an adapter).
    pub full_params: usize,
    /// Full fine-tuning: f32 elements of the RMSNorm weight-gradient partials (0 with an adapter).
    pub norm_partials: usize,
    /// Full fine-tuning: f32 master weights, grads, m, v and the grad-norm partials (the bf16
    /// weights are the engine's).
    pub full_bytes: usize,
}

impl TrainPlan {
    /// The plan of a LoRA step (`lora_params` trained f32 values, rank `lora_rank`).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        c: &ModelConfig,
        max_rows: usize,
        max_seqs: usize,
        max_tokens: usize,
        lora_params: usize,
        lora_rank: usize,
        recompute: Recompute,
        lora_dropout: bool,
        vocab_chunk: usize,
    ) -> TrainPlan {
        Self::build(
            c,
            max_rows,
            max_seqs,
            max_tokens,
            (lora_params, lora_rank),
            0,
            recompute,
            lora_dropout,
            vocab_chunk,
        )
    }

    /// The plan of a full fine-tuning step (`params` base weights, every one trained).
    pub fn new_full(
        c: &ModelConfig,
        max_rows: usize,
        max_seqs: usize,
        max_tokens: usize,
        params: usize,
        recompute: Recompute,
        vocab_chunk: usize,
    ) -> TrainPlan {
        Self::build(
            c,
            max_rows,
            max_seqs,
            max_tokens,
            (0, 0),
            params,
            recompute,
            false,
            vocab_chunk,
        )
    }

    /// f32 state bytes of full fine-tuning of `params` weights: master weights, gradients,
    /// AdamW m and v (4 × 4 B each), the grad-norm partials.
    pub fn full_state_bytes(params: usize) -> usize {
        16 * params + grad_norm_partials_len(params.max(1)) * 8
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        c: &ModelConfig,
        max_rows: usize,
        max_seqs: usize,
        max_tokens: usize,
        (lora_params, lora_rank): (usize, usize),
        full_params: usize,
        recompute: Recompute,
        lora_dropout: bool,
        vocab_chunk: usize,
    ) -> TrainPlan {
        let (d, qd, kvd, i, v) = (
            c.hidden_size,
            c.q_dim(),
            c.kv_dim(),
            c.intermediate_size,
            c.vocab_size,
        );
        let (l, h, r) = (c.num_hidden_layers, c.num_attention_heads, max_rows);
        let (kept_layers, saved_layers) = match recompute {
            Recompute::None => (l, l),
            Recompute::Layer => (0, 1),
        };
        let qk = if c.qk_norm { qd + kvd } else { 0 };
        // One layer's activations per row, bf16: h1, x_mid, h2 (D); q, attn (qd); k, v (kvd);
        // q_pre, k_pre (Qwen3); gate, up, act (I); each projection's LoRA xa (rank); plus lse
        // (H f32).
        let layer_row =
            (3 * d + 2 * qd + 2 * kvd + qk + 3 * i + Proj::ALL.len() * lora_rank.max(1)) * 2 + h * 4;
        // xs: L+1 layer inputs; hf (final norm); per row ids, pos (4 B each); with LoRA dropout
        // one x̃ of the widest projection input (D, qd or I), regenerated per projection.
        let xdrop = if lora_dropout { r * d.max(qd).max(i) * 2 } else { 0 };
        let activation_bytes = (l + 1) * r * d * 2 + saved_layers * r * layer_row + r * d * 2 + r * 8 + xdrop;
        // dx, dh (D); dattn, dq (qd); dk, dv (kvd); dq_pre, dk_pre (Qwen3); dgate, dup, dact
        // (I), LoRA dyb (rank), bf16; delta (H f32).
        let per_row_bwd = (2 * d + 2 * qd + 2 * kvd + qk + 3 * i + lora_rank.max(1)) * 2 + h * 4;
        let lora_scratch = Proj::ALL
            .iter()
            .map(|p| {
                let (din, dout) = p.dims(c);
                lora_train_grad_scratch_len(r, dout, lora_rank)
                    .max(lora_train_grad_scratch_len(r, din, lora_rank))
            })
            .max()
            .unwrap_or(0)
            .max(1);
        // Full fine-tuning: the RMSNorm dweight partials (the hidden norms over R rows, the q/k
        // norms over R·heads rows of head_dim), a ones column (R bf16, the bias gradients' GEMM)
        // and the embedding gradient's row index (3 × R i32).
        let full = full_params > 0;
        let norm_partials = if full {
            let mut p = rmsnorm_bwd_partials_len(r, d);
            if c.qk_norm {
                p = p.max(rmsnorm_bwd_partials_len(r * h, c.head_dim));
            }
            p
        } else {
            0
        };
        let full_bwd = if full {
            norm_partials * 4 + r * 2 + (3 * r + 1) * 4
        } else {
            0
        };
        let backward_bytes = r * per_row_bwd + lora_scratch * 4 + full_bwd;
        let vc = vocab_chunk.clamp(1, v.max(1));
        let chunk_rows = train_logit_chunk_rows(v, vc, max_tokens);
        // logits f32 + dlogits bf16 [C, Vc], hsel/dhsel bf16 [C, D], one vocabulary chunk's
        // statistics (4 × C f32); per token: scored row, target, seq, s_t, logp, entropy, lse,
        // mean_s, grad, old, ref (4 B) and one target per vocabulary chunk; per sequence:
        // advantage (4 B), weight (8 B); the loss partials.
        let logits_bytes = chunk_rows * vc * 6
            + 2 * chunk_rows * d * 2
            + chunk_rows * d * 4
            + 4 * chunk_rows * 4
            + max_tokens * (11 + v.div_ceil(vc)) * 4
            + max_seqs * 12
            + grpo_loss_partials_len(max_tokens.max(1)) * 8;
        let lora_bytes = if full {
            0
        } else {
            4 * lora_params * 4 + lora_params * 2 + grad_norm_partials_len(lora_params.max(1)) * 8
        };
        let full_bytes = if full {
            Self::full_state_bytes(full_params)
        } else {
            0
        };
        TrainPlan {
            max_rows,
            max_seqs,
            max_tokens,
            chunk_rows,
            vocab_chunk: vc,
            head_in_forward: vc >= v,
            kept_layers,
            saved_layers,
            layer_act_bytes: r * layer_row,
            lora_rank,
            lora_scratch,
            lora_dropout,
            activation_bytes,
            backward_bytes,
            logits_bytes,
            lora_bytes,
            full_params,
            norm_partials,
            full_bytes,
        }
    }

    /// With layer recompute, also keeps the activations of the last `k` layers (≤ L; `k` = L is
    /// no recompute): their backward skips the recompute, for `k` more layers' activations.
    /// Results are bit-identical whatever `k` (a recompute reruns the forward's kernels).
    pub fn keeping_last_layers(mut self, num_layers: usize, k: usize) -> TrainPlan {
        let kept = k.clamp(self.kept_layers, num_layers);
        let saved = if kept == num_layers { num_layers } else { kept + 1 };
        self.activation_bytes =
            self.activation_bytes - self.saved_layers * self.layer_act_bytes + saved * self.layer_act_bytes;
        self.kept_layers = kept;
        self.saved_layers = saved;
        self
    }

    /// The activation set of layer `l` (of `num_layers`) in a training forward: its own for a
    /// kept layer, else the scratch set.
    fn act_slot(&self, l: usize, num_layers: usize) -> usize {
        let first_kept = num_layers - self.kept_layers;
        if l >= first_kept {
            l - first_kept
        } else {
            self.kept_layers
        }
    }

    /// The scratch activation set (also what a log-prob-only pass uses).
    fn scratch_slot(&self, num_layers: usize) -> usize {
        if self.kept_layers == num_layers {
            0
        } else {
            self.kept_layers
        }
    }

    /// Bytes of the step's buffers (weights and the rollout plan not included).
    pub fn total_bytes(&self) -> usize {
        self.activation_bytes + self.backward_bytes + self.logits_bytes + self.lora_bytes + self.full_bytes
    }

    /// The bytes of the step's buffers: [`Self::total_bytes`] less the trained state, which the
    /// trainer holds from its construction.
    pub fn buffer_bytes(&self) -> usize {
        self.total_bytes() - self.lora_bytes - self.full_bytes
    }

    fn covers(&self, o: &TrainPlan) -> bool {
        self.max_rows >= o.max_rows
            && self.max_seqs >= o.max_seqs
            && self.max_tokens >= o.max_tokens
            && self.chunk_rows >= o.chunk_rows
            && self.vocab_chunk == o.vocab_chunk
            && self.kept_layers >= o.kept_layers
            && self.lora_scratch >= o.lora_scratch
            && (self.lora_dropout || !o.lora_dropout)
            && self.full_params == o.full_params
            && self.norm_partials >= o.norm_partials
    }
}

/// How a step cuts its batch and what its backward recomputes: the options' micro-batching and
/// `recompute` with the trainer's kept layers, or the fallback [`fit_layout`] chose to fit the
/// device memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepLayout {
    /// Sequences of the largest micro-batch.
    pub micro_batch_seqs: usize,
    pub recompute: Recompute,
    /// With layer recompute: the trailing layers whose activations are kept anyway.
    pub keep_layers: usize,
}

impl Default for StepLayout {
    fn default() -> Self {
        StepLayout {
            micro_batch_seqs: 0,
            recompute: Recompute::None,
            keep_layers: 0,
        }
    }
}

/// Device bytes the memory fitting of the training step leaves free ([`fit_layout`] against the
/// free memory; an explicit budget is taken as given).
pub const FIT_MARGIN: usize = 256 << 20;

/// Rows under which a micro-batch is not cut further to avoid recomputing layers. A layer
/// recompute adds a layer forward to the layer's forward + backward (≈ 1/3 more of its FLOPs);
/// halving the rows keeps the FLOPs and costs only GEMM efficiency, which stays high down to
/// about 2048 rows (0.5B: 2048 × 896 outputs are ~1 wave of 128 × 128 tiles on 132 SMs for the
/// narrowest projections, the MLP's several; wider models more).
pub const MIN_MICRO_BATCH_ROWS: usize = 2048;

/// The first layout, in this order, whose plan (`plan_of`) `fits`:
/// 1. `requested` itself;
/// 2. without layer recompute requested: smaller micro-batches (halved, ⌈s/2⌉) without
///    recompute, while a micro-batch keeps ≥ [`MIN_MICRO_BATCH_ROWS`] rows — no extra FLOPs,
///    only more, smaller GEMMs;
/// 3. layer recompute at the requested micro-batch with as many kept layers as fit (fewer than
///    requested when it was requested; up to L − 1 otherwise) — each recomputed layer is one more
///    layer forward;
/// 4. halved micro-batches with layer recompute and as many kept layers as fit, down to one
///    sequence.
///
/// Results do not depend on the layout (micro-batches add their gradients under the whole
/// batch's loss weights; a recompute reruns the same kernels), except that LoRA dropout draws
/// its masks per micro-batch. `Err` carries the smallest plan (one sequence, every layer
/// recomputed) when nothing fits.
pub fn fit_layout(
    requested: StepLayout,
    num_layers: usize,
    plan_of: impl Fn(StepLayout) -> TrainPlan,
    fits: impl Fn(&TrainPlan) -> bool,
) -> std::result::Result<(StepLayout, TrainPlan), Box<TrainPlan>> {
    let mb0 = requested.micro_batch_seqs.max(1);
    let halvings = move || std::iter::successors(Some(mb0), |&s| (s > 1).then(|| s.div_ceil(2))).skip(1);
    let layout = |micro_batch_seqs, recompute, keep_layers| StepLayout {
        micro_batch_seqs,
        recompute,
        keep_layers,
    };
    let try_one = |l: StepLayout| {
        let p = plan_of(l);
        fits(&p).then_some((l, p))
    };
    if let Some(hit) = try_one(requested) {
        return Ok(hit);
    }
    if requested.recompute == Recompute::None {
        for s in halvings() {
            let l = layout(s, Recompute::None, 0);
            let p = plan_of(l);
            if p.max_rows < MIN_MICRO_BATCH_ROWS {
                break;
            }
            if fits(&p) {
                return Ok((l, p));
            }
        }
    }
    // Kept layers under recompute: at most the requested count, or L − 1 when none was asked
    // for (L kept is no recompute). The requested layout itself was tried first.
    let max_keep = match requested.recompute {
        Recompute::None => num_layers.saturating_sub(1),
        Recompute::Layer => requested.keep_layers.min(num_layers),
    };
    std::iter::once(mb0)
        .chain(halvings())
        .find_map(|s| {
            (0..=max_keep)
                .rev()
                .find_map(|k| try_one(layout(s, Recompute::Layer, k)))
        })
        .ok_or_else(|| Box::new(plan_of(layout(1, Recompute::Layer, 0))))
}

// ---------------------------------------------------------------------------------------------
// The flat LoRA layout

/// Where each A and B lives in the flat f32 buffers.
#[derive(Clone, Debug)]
struct PairRanges {
    a: Range<usize>,
    b: Range<usize>,
}

/// The adapter's shape: per layer and projection, the ranges of A (r, in) and B (out, r) in
/// the flat buffers, in `lora_params` order (layer, projection, A then B).
#[derive(Clone, Debug)]
struct FlatLora {
    rank: usize,
    scale: f32,
    pairs: Vec<[Option<PairRanges>; 7]>,
    len: usize,
    /// Tensor sizes in order (AdamW moments on the host are one Vec per tensor).
    sizes: Vec<usize>,
}

impl FlatLora {
    fn of(w: &LoraWeights) -> FlatLora {
        let mut off = 0;
        let mut sizes = Vec::new();
        let pairs = w
            .layers
            .iter()
            .map(|layer| {
                let mut out: [Option<PairRanges>; 7] = Default::default();
                for (slot, pair) in out.iter_mut().zip(layer.iter()) {
                    if let Some(p) = pair {
                        let a = off..off + p.a.len();
                        off += p.a.len();
                        let b = off..off + p.b.len();
                        off += p.b.len();
                        sizes.push(p.a.len());
                        sizes.push(p.b.len());
                        *slot = Some(PairRanges { a, b });
                    }
                }
                out
            })
            .collect();
        FlatLora {
            rank: w.config.r,
            scale: w.config.scale(),
            pairs,
            len: off,
            sizes,
        }
    }

    fn flatten(w: &LoraWeights) -> Vec<f32> {
        crate::trainer::lora_params(w).concat()
    }

    fn pair(&self, l: usize, p: Proj) -> Option<&PairRanges> {
        self.pairs[l][p as usize].as_ref()
    }
}

// ---------------------------------------------------------------------------------------------
// The flat layout of full fine-tuning

/// Where one linear's weight (out, in) and bias (out) live in the flat buffers.
#[derive(Clone, Debug)]
struct LinearRanges {
    w: Range<usize>,
    b: Option<Range<usize>>,
}

/// One layer's tensors in the flat buffers.
#[derive(Clone, Debug)]
struct LayerRanges {
    input_norm: Range<usize>,
    /// Indexed by `Proj as usize`.
    proj: [LinearRanges; 7],
    q_norm: Option<Range<usize>>,
    k_norm: Option<Range<usize>>,
    post_norm: Range<usize>,
}

/// Every base weight's range in the flat f32 buffers, in [`crate::trainer::weight_params`]
/// order (so gradients, AdamW moments and checkpoints line up with the CPU's tensor by tensor).
#[derive(Clone, Debug)]
struct FlatWeights {
    embed: Range<usize>,
    layers: Vec<LayerRanges>,
    final_norm: Range<usize>,
    lm_head: Option<Range<usize>>,
    len: usize,
    /// Tensor sizes in order.
    sizes: Vec<usize>,
}

/// Hands out consecutive ranges, recording their sizes.
#[derive(Default)]
struct Cursor {
    off: usize,
    sizes: Vec<usize>,
}

impl Cursor {
    fn take(&mut self, n: usize) -> Range<usize> {
        let r = self.off..self.off + n;
        self.off += n;
        self.sizes.push(n);
        r
    }

    fn linear(&mut self, l: &Linear) -> LinearRanges {
        LinearRanges {
            w: self.take(l.w.len()),
            b: l.b.as_ref().map(|b| self.take(b.len())),
        }
    }
}

impl FlatWeights {
    /// The layout of `w`'s tensors, walked as `weight_params` walks them.
    fn of(w: &Weights) -> FlatWeights {
        let mut c = Cursor::default();
        let embed = c.take(w.embed.len());
        let layers = w
            .layers
            .iter()
            .map(|lw| {
                let input_norm = c.take(lw.input_norm.len());
                let (q, k, v, o) = (c.linear(&lw.q), c.linear(&lw.k), c.linear(&lw.v), c.linear(&lw.o));
                let q_norm = lw.q_norm.as_ref().map(|t| c.take(t.len()));
                let k_norm = lw.k_norm.as_ref().map(|t| c.take(t.len()));
                let post_norm = c.take(lw.post_norm.len());
                let (gate, up, down) = (c.linear(&lw.gate), c.linear(&lw.up), c.linear(&lw.down));
                LayerRanges {
                    input_norm,
                    proj: [q, k, v, o, gate, up, down],
                    q_norm,
                    k_norm,
                    post_norm,
                }
            })
            .collect();
        let final_norm = c.take(w.final_norm.len());
        let lm_head = w.lm_head.as_ref().map(|t| c.take(t.len()));
        FlatWeights {
            embed,
            layers,
            final_norm,
            lm_head,
            len: c.off,
            sizes: c.sizes,
        }
    }

    /// Where the lm_head's gradient goes: its own tensor, or the embedding when tied (both
    /// uses accumulate there, as on the CPU).
    fn lm_head_grad(&self) -> &Range<usize> {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }
}

/// What a [`CudaTrainer`] trains.
enum Trained {
    /// A LoRA adapter: its layout, its shape and config (initial values; the live ones are on
    /// the device), and the bf16 copy of the params the LoRA kernels read (cast from the f32
    /// params at `new` and after every AdamW step).
    Lora {
        flat: FlatLora,
        shape: LoraWeights,
        params_bf16: CudaSlice<bf16>,
    },
    /// Every base weight (full fine-tuning): the bf16 weights the forward and the rollout engine
    /// read are the engine's, rewritten from the f32 master after every AdamW step.
    Full(FlatWeights),
}

/// Splits a flat vector into tensors of `sizes`.
fn split_sizes(flat: &[f32], sizes: &[usize]) -> Vec<Vec<f32>> {
    let mut off = 0;
    sizes
        .iter()
        .map(|&n| {
            let v = flat[off..off + n].to_vec();
            off += n;
            v
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Buffers

/// One layer's forward activations (R = plan rows).
struct LayerActs {
    h1: CudaSlice<bf16>,            // (R, D) rmsnorm(x_in)
    q_pre: Option<CudaSlice<bf16>>, // (R, qd) before the q norm (Qwen3)
    k_pre: Option<CudaSlice<bf16>>, // (R, kvd)
    q: CudaSlice<bf16>,             // (R, qd) after norm + RoPE
    k: CudaSlice<bf16>,             // (R, kvd)
    v: CudaSlice<bf16>,             // (R, kvd)
    attn: CudaSlice<bf16>,          // (R, qd) attention output (o_proj input)
    lse: CudaSlice<f32>,            // (R, H)
    x_mid: CudaSlice<bf16>,         // (R, D) after the attention residual
    h2: CudaSlice<bf16>,            // (R, D) rmsnorm(x_mid)
    gate: CudaSlice<bf16>,          // (R, I)
    up: CudaSlice<bf16>,            // (R, I)
    act: CudaSlice<bf16>,           // (R, I) silu(gate)·up (down_proj input)
    xa: Vec<CudaSlice<bf16>>,       // 7 × (R, rank) each projection's x·Aᵀ (Proj order)
}

impl LayerActs {
    fn alloc(dev: &CudaDevice, c: &ModelConfig, r: usize, rank: usize) -> Result<LayerActs> {
        let (d, qd, kvd, i) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        let bf = |n: usize| dev.alloc_zeros::<bf16>(n.max(1));
        Ok(LayerActs {
            h1: bf(r * d)?,
            q_pre: if c.qk_norm { Some(bf(r * qd)?) } else { None },
            k_pre: if c.qk_norm { Some(bf(r * kvd)?) } else { None },
            q: bf(r * qd)?,
            k: bf(r * kvd)?,
            v: bf(r * kvd)?,
            attn: bf(r * qd)?,
            lse: dev.alloc_zeros((r * c.num_attention_heads).max(1))?,
            x_mid: bf(r * d)?,
            h2: bf(r * d)?,
            gate: bf(r * i)?,
            up: bf(r * i)?,
            act: bf(r * i)?,
            xa: Proj::ALL
                .iter()
                .map(|_| bf(r * rank.max(1)))
                .collect::<Result<_>>()?,
        })
    }
}

/// Every device buffer of a [`TrainPlan`] (R rows, S sequences, T tokens, C chunk rows).
struct TrainBuffers {
    ids: CudaSlice<u32>,       // (R)
    pos: CudaSlice<i32>,       // (R)
    cu_rows: CudaSlice<i32>,   // (S+1)
    scored: CudaSlice<u32>,    // (T)
    targets: CudaSlice<u32>,   // (T)
    token_seq: CudaSlice<i32>, // (T)
    adv: CudaSlice<f32>,       // (S)
    seq_w: CudaSlice<f64>,     // (S)
    old: CudaSlice<f32>,       // (T)
    refl: CudaSlice<f32>,      // (T)
    xs: Vec<CudaSlice<bf16>>,  // L+1 × (R, D) layer inputs (xs[L]: the last layer's output)
    acts: Vec<LayerActs>,      // saved_layers (TrainPlan::act_slot)
    /// The layer whose training-forward activations the scratch set still holds (the last
    /// recomputable layer right after a training forward: its backward needs no recompute).
    scratch_holds: Option<usize>,
    hf: CudaSlice<bf16>,        // (R, D) final norm
    hsel: CudaSlice<bf16>,      // (C, D)
    dhsel: CudaSlice<bf16>,     // (C, D)
    dhsel_f: CudaSlice<f32>,    // (C, D) accumulated over vocabulary chunks
    logits: CudaSlice<f32>,     // (C, Vc)
    dlogits: CudaSlice<bf16>,   // (C, Vc)
    targets_vc: CudaSlice<u32>, // (nchunks, T) the targets per vocabulary chunk
    s_t: CudaSlice<f32>,        // (T) target logit / temperature
    lp_c: CudaSlice<f32>,       // (C) one vocabulary chunk's statistics
    ent_c: CudaSlice<f32>,      // (C)
    lse_c: CudaSlice<f32>,      // (C)
    ms_c: CudaSlice<f32>,       // (C) the chunk's E[s] (the gather writes it; the merge uses H)
    logp: CudaSlice<f32>,       // (T)
    entropy: CudaSlice<f32>,    // (T)
    lse_t: CudaSlice<f32>,      // (T)
    mean_s: CudaSlice<f32>,     // (T)
    grad_logp: CudaSlice<f32>,  // (T)
    loss_partials: CudaSlice<f64>,
    loss_totals: CudaSlice<f64>, // (GRPO_FIELDS)
    dx: CudaSlice<bf16>,         // (R, D) dL/d residual stream
    dh: CudaSlice<bf16>,         // (R, D) dL/d normed input of a block
    dattn: CudaSlice<bf16>,      // (R, qd)
    dq: CudaSlice<bf16>,         // (R, qd)
    dk: CudaSlice<bf16>,         // (R, kvd)
    dv: CudaSlice<bf16>,         // (R, kvd)
    dq_pre: CudaSlice<bf16>,     // (R, qd) Qwen3
    dk_pre: CudaSlice<bf16>,     // (R, kvd) Qwen3
    dgate: CudaSlice<bf16>,      // (R, I)
    dup: CudaSlice<bf16>,        // (R, I)
    dact: CudaSlice<bf16>,       // (R, I)
    delta: CudaSlice<f32>,       // (R, H)
    dyb: CudaSlice<bf16>,        // (R, rank) LoRA dy·B
    lora_scratch: CudaSlice<f32>,
    xdrop: CudaSlice<bf16>, // (R, max(D, qd, I)) LoRA-dropout x̃ of one projection (1 without dropout)
    // Full fine-tuning (one element each with an adapter):
    norm_partials: CudaSlice<f32>, // (plan.norm_partials) RMSNorm dweight partials
    ones: CudaSlice<bf16>,         // (R) all 1: db = dyᵀ·1
    emb_tokens: CudaSlice<u32>,    // (R) the micro-batch's distinct tokens
    emb_off: CudaSlice<i32>,       // (R+1) their first entry in emb_rows
    emb_rows: CudaSlice<i32>,      // (R) the rows of each distinct token, ascending
}

impl TrainBuffers {
    fn alloc(dev: &CudaDevice, c: &ModelConfig, p: &TrainPlan) -> Result<TrainBuffers> {
        let (d, qd, kvd, i, v) = (
            c.hidden_size,
            c.q_dim(),
            c.kv_dim(),
            c.intermediate_size,
            c.vocab_size,
        );
        let (r, s, t, ch) = (p.max_rows, p.max_seqs, p.max_tokens.max(1), p.chunk_rows);
        let rank = p.lora_rank.max(1);
        let bf = |n: usize| dev.alloc_zeros::<bf16>(n.max(1));
        let f = |n: usize| dev.alloc_zeros::<f32>(n.max(1));
        let qk = c.qk_norm;
        Ok(TrainBuffers {
            ids: dev.alloc_zeros(r.max(1))?,
            pos: dev.alloc_zeros(r.max(1))?,
            cu_rows: dev.alloc_zeros(s + 1)?,
            scored: dev.alloc_zeros(t)?,
            targets: dev.alloc_zeros(t)?,
            token_seq: dev.alloc_zeros(t)?,
            adv: f(s)?,
            seq_w: dev.alloc_zeros(s.max(1))?,
            old: f(t)?,
            refl: f(t)?,
            xs: (0..=c.num_hidden_layers)
                .map(|_| bf(r * d))
                .collect::<Result<_>>()?,
            acts: (0..p.saved_layers)
                .map(|_| LayerActs::alloc(dev, c, r, rank))
                .collect::<Result<_>>()?,
            scratch_holds: None,
            hf: bf(r * d)?,
            hsel: bf(ch * d)?,
            dhsel: bf(ch * d)?,
            dhsel_f: f(ch * d)?,
            logits: f(ch * p.vocab_chunk)?,
            dlogits: bf(ch * p.vocab_chunk)?,
            targets_vc: dev.alloc_zeros((t * v.div_ceil(p.vocab_chunk)).max(1))?,
            s_t: f(t)?,
            lp_c: f(ch)?,
            ent_c: f(ch)?,
            lse_c: f(ch)?,
            ms_c: f(ch)?,
            logp: f(t)?,
            entropy: f(t)?,
            lse_t: f(t)?,
            mean_s: f(t)?,
            grad_logp: f(t)?,
            loss_partials: dev.alloc_zeros(grpo_loss_partials_len(t))?,
            loss_totals: dev.alloc_zeros(GRPO_FIELDS)?,
            dx: bf(r * d)?,
            dh: bf(r * d)?,
            dattn: bf(r * qd)?,
            dq: bf(r * qd)?,
            dk: bf(r * kvd)?,
            dv: bf(r * kvd)?,
            dq_pre: bf(if qk { r * qd } else { 1 })?,
            dk_pre: bf(if qk { r * kvd } else { 1 })?,
            dgate: bf(r * i)?,
            dup: bf(r * i)?,
            dact: bf(r * i)?,
            delta: f(r * c.num_attention_heads)?,
            dyb: bf(r * rank)?,
            lora_scratch: f(p.lora_scratch)?,
            xdrop: bf(if p.lora_dropout { r * d.max(qd).max(i) } else { 1 })?,
            norm_partials: f(p.norm_partials)?,
            ones: if p.full_params > 0 {
                dev.upload(&vec![bf16::ONE; r.max(1)])?
            } else {
                bf(1)?
            },
            emb_tokens: dev.alloc_zeros(if p.full_params > 0 { r.max(1) } else { 1 })?,
            emb_off: dev.alloc_zeros(if p.full_params > 0 { r + 1 } else { 1 })?,
            emb_rows: dev.alloc_zeros(if p.full_params > 0 { r.max(1) } else { 1 })?,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// GEMM and projections

/// Element types a GEMM may write (cuBLAS's name for them).
trait GemmOut: DeviceRepr {
    const TYPE: cudaDataType;
}

impl GemmOut for bf16 {
    const TYPE: cudaDataType = cudaDataType::CUDA_R_16BF;
}

impl GemmOut for f32 {
    const TYPE: cudaDataType = cudaDataType::CUDA_R_32F;
}

/// Row-major dx (rows, d_in) = dy (rows, d_out) · W (d_out, d_in) + beta · dx, bf16 inputs, f32
/// compute, dx bf16 or f32 (f32: accumulating over several GEMMs without bf16 rounding).
/// Column-major view: dxᵀ (d_in, rows) = Wᵀ · dyᵀ where row-major W is the column-major
/// (d_in, d_out) matrix with ld d_in (OP_N) and row-major dy the column-major (d_out, rows)
/// with ld d_out (OP_N): `gemm(N, N, m = d_in, n = rows, k = d_out)`.
#[allow(clippy::too_many_arguments)]
fn gemm_dx<T: GemmOut>(
    dev: &CudaDevice,
    blas: &CudaBlas,
    dy: &impl DevicePtr<bf16>,
    w: &impl DevicePtr<bf16>,
    dx: &mut impl DevicePtrMut<T>,
    rows: usize,
    d_in: usize,
    d_out: usize,
    beta: f32,
) -> Result<()> {
    check("gemm_dx dx", dx.len(), rows * d_in)?;
    let s = dev.stream();
    let (dxp, _c) = dx.device_ptr_mut(s);
    gemm_dx_raw(dev, blas, dy, w, dxp, T::TYPE, rows, d_in, d_out, beta)
}

#[allow(clippy::too_many_arguments)]
fn gemm_dx_raw(
    dev: &CudaDevice,
    blas: &CudaBlas,
    dy: &impl DevicePtr<bf16>,
    w: &impl DevicePtr<bf16>,
    dxp: u64,
    dx_type: cudaDataType,
    rows: usize,
    d_in: usize,
    d_out: usize,
    beta: f32,
) -> Result<()> {
    check("gemm_dx dy", dy.len(), rows * d_out)?;
    check("gemm_dx w", w.len(), d_out * d_in)?;
    let int = |v, name| gemm_int("gemm_dx", name, v);
    let (m, n, k) = (int(d_in, "in")?, int(rows, "rows")?, int(d_out, "out")?);
    if m == 0 || n == 0 {
        return Ok(());
    }
    let s = dev.stream();
    let (dyp, _a) = dy.device_ptr(s);
    let (wp, _b) = w.device_ptr(s);
    let ops = (cublasOperation_t::CUBLAS_OP_N, cublasOperation_t::CUBLAS_OP_N);
    // SAFETY: pointers of buffers with the lengths checked here and by the callers (dx holds
    // rows·d_in of `dx_type`; dy rows·d_out, w d_out·d_in bf16).
    unsafe {
        gemm_ex(
            blas,
            ops,
            (m, n, k),
            (wp, m),
            (dyp, k),
            (dxp, m, dx_type),
            (1.0, beta),
        )
    }
    .map_err(|e| {
        Error::Cuda(format!(
            "cublasGemmEx dx ({rows}×{d_out} · {d_out}×{d_in}): {e:?}"
        ))
    })?;
    Ok(())
}

/// Full fine-tuning's weight gradient: row-major dW (d_out, d_in) f32 += dyᵀ (d_out, rows) ·
/// x (rows, d_in), bf16 inputs, f32 compute, accumulating (beta = 1) across micro-batches and
/// the lm_head's chunks. With x a column of ones (d_in = 1) it is a bias gradient, db (d_out)
/// += Σ_rows dy. Column-major view: dWᵀ (d_in, d_out) = xᵀ · dy where row-major x is the
/// column-major (d_in, rows) matrix with ld d_in (OP_N) and row-major dy the column-major
/// (d_out, rows) with ld d_out, transposed (OP_T): `gemm(N, T, m = d_in, n = d_out, k = rows)`.
#[allow(clippy::too_many_arguments)]
fn gemm_dw(
    dev: &CudaDevice,
    blas: &CudaBlas,
    dy: &impl DevicePtr<bf16>,
    x: &impl DevicePtr<bf16>,
    dw: &mut impl DevicePtrMut<f32>,
    rows: usize,
    d_in: usize,
    d_out: usize,
) -> Result<()> {
    check("gemm_dw dy", dy.len(), rows * d_out)?;
    check("gemm_dw x", x.len(), rows * d_in)?;
    check("gemm_dw dw", dw.len(), d_out * d_in)?;
    let int = |v, name| gemm_int("gemm_dw", name, v);
    let (m, n, k) = (int(d_in, "in")?, int(d_out, "out")?, int(rows, "rows")?);
    if m == 0 || n == 0 || k == 0 {
        return Ok(());
    }
    let s = dev.stream();
    let (dyp, _a) = dy.device_ptr(s);
    let (xp, _b) = x.device_ptr(s);
    let (dwp, _c) = dw.device_ptr_mut(s);
    let ops = (cublasOperation_t::CUBLAS_OP_N, cublasOperation_t::CUBLAS_OP_T);
    let f32_out = cudaDataType::CUDA_R_32F;
    // SAFETY: pointers of buffers with the lengths checked above (x rows·d_in, dy rows·d_out
    // bf16, dw d_out·d_in f32).
    unsafe {
        gemm_ex(
            blas,
            ops,
            (m, n, k),
            (xp, m),
            (dyp, n),
            (dwp, m, f32_out),
            (1.0, 1.0),
        )
    }
    .map_err(|e| Error::Cuda(format!("cublasGemmEx dW ({d_out}×{rows} · {rows}×{d_in}): {e:?}")))?;
    Ok(())
}

/// RMSNorm backward, dx (rows, dim) from x and dy (`accumulate`: added onto dx, the residual
/// stream's gradient, rounded as a store then a residual add); with `dweight` = (partials,
/// grads, range) also grads[range] (dim) += dL/dweight (full fine-tuning, via the kernel's
/// per-block partials summed in a fixed order).
#[allow(clippy::too_many_arguments)]
fn rmsnorm_bwd(
    dev: &CudaDevice,
    x: &impl DevicePtr<bf16>,
    weight: &impl DevicePtr<bf16>,
    dy: &impl DevicePtr<bf16>,
    dx: &mut impl DevicePtrMut<bf16>,
    dweight: Option<(&mut CudaSlice<f32>, &mut CudaSlice<f32>, Range<usize>)>,
    rows: usize,
    dim: usize,
    eps: f32,
    accumulate: bool,
) -> Result<()> {
    match dweight {
        None => dev.rmsnorm_bwd_bf16::<CudaSlice<f32>, CudaSlice<f32>>(
            x, weight, dy, dx, None, rows, dim, eps, accumulate,
        ),
        Some((partials, grads, range)) => {
            let mut dw = grads.slice_mut(range);
            dev.rmsnorm_bwd_bf16(
                x,
                weight,
                dy,
                dx,
                Some((partials, &mut dw)),
                rows,
                dim,
                eps,
                accumulate,
            )
        }
    }
}

/// The adapter's A and B of one projection as views of the bf16 copy of the flat params, with
/// scale and rank.
struct LoraAB<'a> {
    a: CudaView<'a, bf16>,
    b: CudaView<'a, bf16>,
    scale: f32,
    rank: usize,
    /// LoRA dropout of this projection (training forward and backward only).
    drop: Option<LoraDropoutSite>,
}

/// The live adapter as seen by a forward: the bf16 copy of the flat params + layout (None:
/// adapter off), and the micro-batch's LoRA dropout (training passes only, as on the CPU).
#[derive(Clone, Copy)]
struct LoraRef<'a> {
    params_bf16: &'a CudaSlice<bf16>,
    flat: &'a FlatLora,
    dropout: Option<LoraDropout>,
}

impl<'a> LoraRef<'a> {
    fn pair(&self, l: usize, p: Proj) -> Option<LoraAB<'a>> {
        self.flat.pair(l, p).map(|r| LoraAB {
            a: self.params_bf16.slice(r.a.clone()),
            b: self.params_bf16.slice(r.b.clone()),
            scale: self.flat.scale,
            rank: self.flat.rank,
            drop: self.dropout.as_ref().map(|d| LoraDropoutSite::new(d, l, p)),
        })
    }
}

/// What every op of the step needs.
struct Ctx<'a> {
    dev: &'a CudaDevice,
    blas: &'a CudaBlas,
    c: &'a ModelConfig,
    w: &'a DeviceWeights,
    inv_freq: &'a CudaSlice<f32>,
    /// [`lora_store_from_env`]: the LoRA kernels store their term and the base GEMMs add onto
    /// it (true, the default), or the GEMMs store and the LoRA kernels add.
    lora_store: bool,
}

impl Ctx<'_> {
    fn attn_shape(&self) -> TrainAttnShape {
        TrainAttnShape {
            n_heads: self.c.num_attention_heads,
            n_kv_heads: self.c.num_key_value_heads,
            head_dim: self.c.head_dim,
            window: self.c.sliding_window,
        }
    }

    /// y (n, out) = x Wᵀ + b + s·bf16(x̃ Aᵀ) Bᵀ, bf16, with the adapter read from the bf16 copy
    /// of the flat params; `xa` (≥ n·rank) receives bf16(x̃ Aᵀ) for the backward. x̃ = x, or with
    /// LoRA dropout x ⊙ mask written into `xd` (≥ n·in) first (the base GEMM reads x).
    /// With an adapter the LoRA kernel runs first and stores t = bf16(s·xa·Bᵀ) into y
    /// ([`LoraOut::Store`]: y is not read), then cuBLAS adds the base product onto it (beta = 1:
    /// y = bf16(x Wᵀ + t), the read of y hidden under the GEMM's math), then the bias: one
    /// memory-bound read of y less than adding the LoRA term onto the GEMM's output.
    /// `accumulate`: y holds a value the projection is added onto (the residual stream: o and
    /// down write x + proj in place of a separate residual add): the LoRA kernel then adds
    /// ([`LoraOut::Add`]) and the GEMM adds too, y = bf16(bf16(y + t) + x Wᵀ) (+ b).
    #[allow(clippy::too_many_arguments)]
    fn proj_fwd(
        &self,
        x: &impl DevicePtr<bf16>,
        lin: &DeviceLinear,
        lora: Option<LoraAB<'_>>,
        xa: &mut CudaSlice<bf16>,
        xd: &mut CudaSlice<bf16>,
        y: &mut impl DevicePtrMut<bf16>,
        accumulate: bool,
        n: usize,
    ) -> Result<()> {
        check("proj x", x.len(), n * lin.d_in)?;
        check("proj y", y.len(), n * lin.d_out)?;
        // The LoRA kernel first (storing, or adding onto the residual) and the GEMM onto its
        // output, or (`lora_store` off) the GEMM first and the LoRA kernel adding onto it.
        let lora_first = lora.is_some() && (accumulate || self.lora_store);
        if !lora_first {
            self.base_fwd(x, lin, y, accumulate, n)?;
        }
        if let Some(ab) = &lora {
            let xa = Some(&mut xa.slice_mut(..n * ab.rank));
            let out = if lora_first && !accumulate {
                LoraOut::Store
            } else {
                LoraOut::Add
            };
            match ab.drop {
                None => self.dev.lora_train_fwd_bf16(
                    x, &ab.a, &ab.b, y, out, xa, ab.scale, n, lin.d_in, lin.d_out, ab.rank,
                )?,
                Some(site) => {
                    let ni = n * lin.d_in;
                    self.dev
                        .lora_dropout_bf16(x, &mut xd.slice_mut(..ni), site, n, lin.d_in)?;
                    self.dev.lora_train_fwd_bf16(
                        &xd.slice(..ni),
                        &ab.a,
                        &ab.b,
                        y,
                        out,
                        xa,
                        ab.scale,
                        n,
                        lin.d_in,
                        lin.d_out,
                        ab.rank,
                    )?;
                }
            }
        }
        if lora_first {
            self.base_fwd(x, lin, y, true, n)?;
        }
        if let Some(b) = &lin.b {
            self.dev.add_bias_bf16(y, b, n, lin.d_out)?;
        }
        Ok(())
    }

    /// y (n, out) = x Wᵀ, or (`accumulate`) y += x Wᵀ (cuBLAS beta = 1), f32 accumulation and
    /// one bf16 rounding.
    fn base_fwd(
        &self,
        x: &impl DevicePtr<bf16>,
        lin: &DeviceLinear,
        y: &mut impl DevicePtrMut<bf16>,
        accumulate: bool,
        n: usize,
    ) -> Result<()> {
        let s = self.dev.stream();
        let (xp, _x) = x.device_ptr(s);
        let w = lin.w();
        let (wp, _w) = w.device_ptr(s);
        let (yp, _y) = y.device_ptr_mut(s);
        super::engine::gemm_raw(
            self.dev,
            self.blas,
            xp,
            wp,
            yp,
            cudaDataType::CUDA_R_16BF,
            n,
            lin.d_in,
            lin.d_out,
            if accumulate { 1.0 } else { 0.0 },
        )
    }

    /// Backward of [`Self::proj_fwd`]: dx (n, in) = dy·W (+ dx when `accumulate`) + s·(dy B) A;
    /// with an adapter also dB += s·dyᵀ xa and dA += s·(dy B)ᵀ x̃ into `grads`, xa being the
    /// forward's bf16(x̃ Aᵀ) of this projection (with LoRA dropout the LoRA term of dx is masked,
    /// s·((dy B) A) ⊙ mask, and x̃ is regenerated into `sc.xd`: the mask is a pure hash); with
    /// `full` (full fine-tuning) dW += dyᵀ x and db += Σ_rows dy into `grads` instead.
    #[allow(clippy::too_many_arguments)]
    fn proj_bwd(
        &self,
        x: &impl DevicePtr<bf16>,
        lin: &DeviceLinear,
        lora: Option<(LoraAB<'_>, &PairRanges, &CudaSlice<bf16>)>,
        full: Option<&LinearRanges>,
        grads: &mut CudaSlice<f32>,
        dy: &impl DevicePtr<bf16>,
        dx: &mut impl DevicePtrMut<bf16>,
        accumulate: bool,
        sc: &mut Scratch<'_>,
        n: usize,
    ) -> Result<()> {
        // Without `accumulate` and with an adapter, the LoRA kernel stores its term into dx
        // first (LoraOut::Store, dx not read) and the base GEMM adds onto it (beta = 1); else
        // (or with `lora_store` off) the GEMM runs first and the LoRA kernel adds its term.
        let lora_first = lora.is_some() && !accumulate && self.lora_store;
        if let Some((ab, ..)) = lora.as_ref().filter(|_| lora_first) {
            self.proj_bwd_lora_dx(ab, dy, dx, LoraOut::Store, sc, n, lin)?;
        }
        gemm_dx(
            self.dev,
            self.blas,
            dy,
            &lin.w(),
            dx,
            n,
            lin.d_in,
            lin.d_out,
            if accumulate || lora_first { 1.0 } else { 0.0 },
        )?;
        if let Some((ab, ..)) = lora.as_ref().filter(|_| !lora_first) {
            self.proj_bwd_lora_dx(ab, dy, dx, LoraOut::Add, sc, n, lin)?;
        }
        if let Some(fr) = full {
            let (din, dout) = (lin.d_in, lin.d_out);
            let mut dw = grads.slice_mut(fr.w.clone());
            gemm_dw(self.dev, self.blas, dy, x, &mut dw, n, din, dout)?;
            if let Some(rb) = &fr.b {
                let mut db = grads.slice_mut(rb.clone());
                gemm_dw(self.dev, self.blas, dy, &sc.ones.slice(..n), &mut db, n, 1, dout)?;
            }
        }
        if let Some((ab, ranges, xa)) = lora {
            let r = ab.rank;
            let dyb = sc.dyb.slice(..n * r);
            self.dev.lora_train_grad_b_bf16(
                dy,
                &xa.slice(..n * r),
                &mut grads.slice_mut(ranges.b.clone()),
                sc.lora_scratch,
                ab.scale,
                n,
                lin.d_out,
                r,
            )?;
            let ga = &mut grads.slice_mut(ranges.a.clone());
            match ab.drop {
                None => {
                    self.dev
                        .lora_train_grad_a_bf16(&dyb, x, ga, sc.lora_scratch, ab.scale, n, lin.d_in, r)?
                }
                Some(site) => {
                    let ni = n * lin.d_in;
                    self.dev
                        .lora_dropout_bf16(x, &mut sc.xd.slice_mut(..ni), site, n, lin.d_in)?;
                    self.dev.lora_train_grad_a_bf16(
                        &dyb,
                        &sc.xd.slice(..ni),
                        ga,
                        sc.lora_scratch,
                        ab.scale,
                        n,
                        lin.d_in,
                        r,
                    )?;
                }
            }
        }
        Ok(())
    }

    /// The LoRA term of a projection's input gradient: dyb (n, r) = bf16(dy B) into `sc.dyb`
    /// and dx += (or, `LoraOut::Store`, =) s·dyb·A, masked with the projection's LoRA dropout.
    #[allow(clippy::too_many_arguments)]
    fn proj_bwd_lora_dx(
        &self,
        ab: &LoraAB<'_>,
        dy: &impl DevicePtr<bf16>,
        dx: &mut impl DevicePtrMut<bf16>,
        out: LoraOut,
        sc: &mut Scratch<'_>,
        n: usize,
        lin: &DeviceLinear,
    ) -> Result<()> {
        let r = ab.rank;
        let mut dyb = sc.dyb.slice_mut(..n * r);
        self.dev.lora_train_bwd_dx_dropout_bf16(
            dy, &ab.a, &ab.b, dx, out, &mut dyb, ab.scale, n, lin.d_in, lin.d_out, r, ab.drop,
        )
    }
}

/// Scratch of the LoRA backward: dyb (R, rank) bf16, the gradients' row-split partials and the
/// LoRA-dropout x̃ (R, max input) bf16; of full fine-tuning: a column of R ones (the bias
/// gradients' GEMM).
struct Scratch<'a> {
    dyb: &'a mut CudaSlice<bf16>,
    lora_scratch: &'a mut CudaSlice<f32>,
    xd: &'a mut CudaSlice<bf16>,
    ones: &'a CudaSlice<bf16>,
}

/// Row geometry of one forward.
struct Rows<'a> {
    n: usize,
    ns: usize,
    max_rows: usize,
    pos: &'a CudaSlice<i32>,
    cu_rows: &'a CudaSlice<i32>,
}

/// One decoder layer's forward from `x_in` (n, D) into `x_out`, every activation into `a`;
/// `xd` is the LoRA-dropout x̃ scratch. The single source of truth for the forward, the
/// recompute and the log-prob-only passes.
#[allow(clippy::too_many_arguments)]
fn layer_fwd(
    ctx: &Ctx<'_>,
    l: usize,
    lora: Option<LoraRef<'_>>,
    rows: &Rows<'_>,
    x_in: &CudaSlice<bf16>,
    x_out: &mut CudaSlice<bf16>,
    a: &mut LayerActs,
    xd: &mut CudaSlice<bf16>,
) -> Result<()> {
    let (dev, c) = (ctx.dev, ctx.c);
    let lw = &ctx.w.layers[l];
    let n = rows.n;
    let (d, hd, qd, kvd, inter) = (
        c.hidden_size,
        c.head_dim,
        c.q_dim(),
        c.kv_dim(),
        c.intermediate_size,
    );
    let (nh, nkv, eps) = (c.num_attention_heads, c.num_key_value_heads, c.rms_norm_eps);
    let pair = |p: Proj| lora.and_then(|lr| lr.pair(l, p));
    let lin = |p: Proj| &lw.proj[p as usize];

    dev.rmsnorm_fwd_bf16(
        &x_in.slice(..n * d),
        &lw.input_norm,
        &mut a.h1.slice_mut(..n * d),
        n,
        d,
        eps,
    )?;
    let h1 = a.h1.slice(..n * d);
    match (&mut a.q_pre, &mut a.k_pre, &lw.q_norm, &lw.k_norm) {
        (Some(q_pre), Some(k_pre), Some(qn), Some(kn)) => {
            ctx.proj_fwd(
                &h1,
                lin(Proj::Q),
                pair(Proj::Q),
                &mut a.xa[Proj::Q as usize],
                xd,
                &mut q_pre.slice_mut(..n * qd),
                false,
                n,
            )?;
            ctx.proj_fwd(
                &h1,
                lin(Proj::K),
                pair(Proj::K),
                &mut a.xa[Proj::K as usize],
                xd,
                &mut k_pre.slice_mut(..n * kvd),
                false,
                n,
            )?;
            dev.rmsnorm_fwd_bf16(
                &q_pre.slice(..n * qd),
                qn,
                &mut a.q.slice_mut(..n * qd),
                n * nh,
                hd,
                eps,
            )?;
            dev.rmsnorm_fwd_bf16(
                &k_pre.slice(..n * kvd),
                kn,
                &mut a.k.slice_mut(..n * kvd),
                n * nkv,
                hd,
                eps,
            )?;
        }
        (None, None, None, None) => {
            ctx.proj_fwd(
                &h1,
                lin(Proj::Q),
                pair(Proj::Q),
                &mut a.xa[Proj::Q as usize],
                xd,
                &mut a.q.slice_mut(..n * qd),
                false,
                n,
            )?;
            ctx.proj_fwd(
                &h1,
                lin(Proj::K),
                pair(Proj::K),
                &mut a.xa[Proj::K as usize],
                xd,
                &mut a.k.slice_mut(..n * kvd),
                false,
                n,
            )?;
        }
        _ => {
            return Err(Error::Cuda(
                "internal: q/k norm weights and buffers disagree".into(),
            ))
        }
    }
    ctx.proj_fwd(
        &h1,
        lin(Proj::V),
        pair(Proj::V),
        &mut a.xa[Proj::V as usize],
        xd,
        &mut a.v.slice_mut(..n * kvd),
        false,
        n,
    )?;
    dev.rope_fwd_bf16(
        &mut a.q.slice_mut(..n * qd),
        &mut a.k.slice_mut(..n * kvd),
        &rows.pos.slice(..n),
        ctx.inv_freq,
        n,
        nh,
        nkv,
        hd,
    )?;
    dev.attention_train_fwd_bf16(
        &a.q.slice(..n * qd),
        &a.k.slice(..n * kvd),
        &a.v.slice(..n * kvd),
        &rows.cu_rows.slice(..rows.ns + 1),
        &mut a.attn.slice_mut(..n * qd),
        &mut a.lse.slice_mut(..n * nh),
        &ctx.attn_shape(),
        rows.ns,
        n,
        rows.max_rows,
    )?;
    // x_mid = x_in + o: the residual copied in, the projection added onto it.
    let st = dev.stream();
    st.memcpy_dtod(&x_in.slice(..n * d), &mut a.x_mid.slice_mut(..n * d))
        .map_err(cuda_err("copying the residual stream"))?;
    ctx.proj_fwd(
        &a.attn.slice(..n * qd),
        lin(Proj::O),
        pair(Proj::O),
        &mut a.xa[Proj::O as usize],
        xd,
        &mut a.x_mid.slice_mut(..n * d),
        true,
        n,
    )?;
    dev.rmsnorm_fwd_bf16(
        &a.x_mid.slice(..n * d),
        &lw.post_norm,
        &mut a.h2.slice_mut(..n * d),
        n,
        d,
        eps,
    )?;
    let h2 = a.h2.slice(..n * d);
    ctx.proj_fwd(
        &h2,
        lin(Proj::Gate),
        pair(Proj::Gate),
        &mut a.xa[Proj::Gate as usize],
        xd,
        &mut a.gate.slice_mut(..n * inter),
        false,
        n,
    )?;
    ctx.proj_fwd(
        &h2,
        lin(Proj::Up),
        pair(Proj::Up),
        &mut a.xa[Proj::Up as usize],
        xd,
        &mut a.up.slice_mut(..n * inter),
        false,
        n,
    )?;
    dev.swiglu_fwd_bf16(
        &a.gate.slice(..n * inter),
        &a.up.slice(..n * inter),
        &mut a.act.slice_mut(..n * inter),
        n * inter,
    )?;
    // x_out = x_mid + down(act), likewise.
    st.memcpy_dtod(&a.x_mid.slice(..n * d), &mut x_out.slice_mut(..n * d))
        .map_err(cuda_err("copying the residual stream"))?;
    ctx.proj_fwd(
        &a.act.slice(..n * inter),
        lin(Proj::Down),
        pair(Proj::Down),
        &mut a.xa[Proj::Down as usize],
        xd,
        &mut x_out.slice_mut(..n * d),
        true,
        n,
    )?;
    Ok(())
}

/// One layer's backward: on entry `b.dx` holds dL/d(layer output); on return dL/d(layer input).
/// `a` must hold this layer's forward activations and `x_in` its input.
#[allow(clippy::too_many_arguments)]
fn layer_bwd(
    ctx: &Ctx<'_>,
    l: usize,
    lora: Option<LoraRef<'_>>,
    full: Option<&LayerRanges>,
    grads: &mut CudaSlice<f32>,
    rows: &Rows<'_>,
    x_in: &CudaSlice<bf16>,
    a: &LayerActs,
    g: &mut BwdBufs<'_>,
) -> Result<()> {
    let (dev, c) = (ctx.dev, ctx.c);
    let lw = &ctx.w.layers[l];
    let n = rows.n;
    let (d, hd, qd, kvd, inter) = (
        c.hidden_size,
        c.head_dim,
        c.q_dim(),
        c.kv_dim(),
        c.intermediate_size,
    );
    let (nh, nkv, eps) = (c.num_attention_heads, c.num_key_value_heads, c.rms_norm_eps);
    let pair = |p: Proj| {
        lora.and_then(|lr| {
            lr.pair(l, p)
                .map(|ab| (ab, lr.flat.pair(l, p).expect("pair exists"), &a.xa[p as usize]))
        })
    };
    let fr = |p: Proj| full.map(|f| &f.proj[p as usize]);
    let lin = |p: Proj| &lw.proj[p as usize];
    let mut sc = Scratch {
        dyb: &mut *g.dyb,
        lora_scratch: &mut *g.lora_scratch,
        xd: &mut *g.xd,
        ones: g.ones,
    };
    // dh (n, D) = Σ_p dy_p·W_p (+ the LoRA terms) over the projections `projs` of one input x
    // (gate and up of h2; q, k and v of h1): the first writes dh, the others accumulate.
    let input_grad = |x: &CudaView<bf16>,
                      projs: &[(Proj, &CudaView<bf16>)],
                      dh: &mut CudaSlice<bf16>,
                      grads: &mut CudaSlice<f32>,
                      sc: &mut Scratch|
     -> Result<()> {
        let mut dh = dh.slice_mut(..n * d);
        for (i, &(p, dy)) in projs.iter().enumerate() {
            ctx.proj_bwd(x, lin(p), pair(p), fr(p), grads, dy, &mut dh, i > 0, sc, n)?;
        }
        Ok(())
    };

    // --- MLP: x_out = x_mid + down(silu(gate(h2))·up(h2))
    ctx.proj_bwd(
        &a.act.slice(..n * inter),
        lin(Proj::Down),
        pair(Proj::Down),
        fr(Proj::Down),
        grads,
        &g.dx.slice(..n * d),
        &mut g.dact.slice_mut(..n * inter),
        false,
        &mut sc,
        n,
    )?;
    dev.swiglu_bwd_bf16(
        &a.gate.slice(..n * inter),
        &a.up.slice(..n * inter),
        &g.dact.slice(..n * inter),
        &mut g.dgate.slice_mut(..n * inter),
        &mut g.dup.slice_mut(..n * inter),
        n * inter,
    )?;
    let (dgate, dup) = (g.dgate.slice(..n * inter), g.dup.slice(..n * inter));
    let gate_up = [(Proj::Gate, &dgate), (Proj::Up, &dup)];
    input_grad(&a.h2.slice(..n * d), &gate_up, &mut *g.dh, &mut *grads, &mut sc)?;
    rmsnorm_bwd(
        dev,
        &a.x_mid.slice(..n * d),
        &lw.post_norm,
        &g.dh.slice(..n * d),
        &mut g.dx.slice_mut(..n * d),
        full.map(|f| (&mut *g.norm_partials, &mut *grads, f.post_norm.clone())),
        n,
        d,
        eps,
        true,
    )?;

    // --- attention: x_mid = x_in + o(attn(rope(q(h1)), rope(k(h1)), v(h1)))
    ctx.proj_bwd(
        &a.attn.slice(..n * qd),
        lin(Proj::O),
        pair(Proj::O),
        fr(Proj::O),
        grads,
        &g.dx.slice(..n * d),
        &mut g.dattn.slice_mut(..n * qd),
        false,
        &mut sc,
        n,
    )?;
    dev.attention_train_bwd_bf16(
        &a.q.slice(..n * qd),
        &a.k.slice(..n * kvd),
        &a.v.slice(..n * kvd),
        &a.attn.slice(..n * qd),
        &g.dattn.slice(..n * qd),
        &a.lse.slice(..n * nh),
        &rows.cu_rows.slice(..rows.ns + 1),
        &mut g.dq.slice_mut(..n * qd),
        &mut g.dk.slice_mut(..n * kvd),
        &mut g.dv.slice_mut(..n * kvd),
        &mut g.delta.slice_mut(..n * nh),
        &ctx.attn_shape(),
        rows.ns,
        n,
        rows.max_rows,
    )?;
    dev.rope_bwd_bf16(
        &mut g.dq.slice_mut(..n * qd),
        &mut g.dk.slice_mut(..n * kvd),
        &rows.pos.slice(..n),
        ctx.inv_freq,
        n,
        nh,
        nkv,
        hd,
    )?;
    let h1 = a.h1.slice(..n * d);
    let qk_norm = match (&a.q_pre, &a.k_pre, &lw.q_norm, &lw.k_norm) {
        (Some(q_pre), Some(k_pre), Some(qn), Some(kn)) => {
            rmsnorm_bwd(
                dev,
                &q_pre.slice(..n * qd),
                qn,
                &g.dq.slice(..n * qd),
                &mut g.dq_pre.slice_mut(..n * qd),
                full.and_then(|f| f.q_norm.clone())
                    .map(|r| (&mut *g.norm_partials, &mut *grads, r)),
                n * nh,
                hd,
                eps,
                false,
            )?;
            rmsnorm_bwd(
                dev,
                &k_pre.slice(..n * kvd),
                kn,
                &g.dk.slice(..n * kvd),
                &mut g.dk_pre.slice_mut(..n * kvd),
                full.and_then(|f| f.k_norm.clone())
                    .map(|r| (&mut *g.norm_partials, &mut *grads, r)),
                n * nkv,
                hd,
                eps,
                false,
            )?;
            true
        }
        _ => false,
    };
    let (dq, dk) = if qk_norm {
        (g.dq_pre.slice(..n * qd), g.dk_pre.slice(..n * kvd))
    } else {
        (g.dq.slice(..n * qd), g.dk.slice(..n * kvd))
    };
    let dv = g.dv.slice(..n * kvd);
    let qkv = [(Proj::Q, &dq), (Proj::K, &dk), (Proj::V, &dv)];
    input_grad(&h1, &qkv, &mut *g.dh, &mut *grads, &mut sc)?;
    rmsnorm_bwd(
        dev,
        &x_in.slice(..n * d),
        &lw.input_norm,
        &g.dh.slice(..n * d),
        &mut g.dx.slice_mut(..n * d),
        full.map(|f| (&mut *g.norm_partials, &mut *grads, f.input_norm.clone())),
        n,
        d,
        eps,
        true,
    )?;
    Ok(())
}

/// The backward's buffers, borrowed from [`TrainBuffers`].
struct BwdBufs<'a> {
    dx: &'a mut CudaSlice<bf16>,
    dh: &'a mut CudaSlice<bf16>,
    dattn: &'a mut CudaSlice<bf16>,
    dq: &'a mut CudaSlice<bf16>,
    dk: &'a mut CudaSlice<bf16>,
    dv: &'a mut CudaSlice<bf16>,
    dq_pre: &'a mut CudaSlice<bf16>,
    dk_pre: &'a mut CudaSlice<bf16>,
    dgate: &'a mut CudaSlice<bf16>,
    dup: &'a mut CudaSlice<bf16>,
    dact: &'a mut CudaSlice<bf16>,
    delta: &'a mut CudaSlice<f32>,
    dyb: &'a mut CudaSlice<bf16>,
    lora_scratch: &'a mut CudaSlice<f32>,
    xd: &'a mut CudaSlice<bf16>,
    norm_partials: &'a mut CudaSlice<f32>,
    ones: &'a CudaSlice<bf16>,
}

// ---------------------------------------------------------------------------------------------
// The trainer

/// Timings of the last update (host wall clock around synchronized phases).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct TrainStats {
    /// Reference / old log-prob passes (β > 0, num_iterations > 1).
    pub prepare_ms: f64,
    /// Forward, loss and backward of every micro-batch.
    pub grad_ms: f64,
    /// Grad norm, clipping decision, AdamW and the copy into the rollout adapter.
    pub optimizer_ms: f64,
    pub micro_batches: usize,
    /// Rows (prompt + completion tokens) forwarded and backpropagated.
    pub rows: usize,
    pub plan_bytes: usize,
    /// The layout the step ran with (the requested one, or the memory fallback), and the one
    /// requested (the options' micro-batching and recompute, the kept layers).
    #[serde(skip)]
    pub layout: StepLayout,
    #[serde(skip)]
    pub requested: StepLayout,
}

impl TrainStats {
    /// The layout the last step ran with when it is not the requested one (it did not fit).
    pub fn fitted_layout(&self) -> Option<StepLayout> {
        (self.layout != self.requested).then_some(self.layout)
    }
}

/// What a forward of one micro-batch leaves on the host.
struct MicroOut {
    logp: Vec<f32>,
    entropy_sum: f64,
    /// The loss and the lm_head backward ran in the forward (dh holds dL/d final-norm output).
    head_done: bool,
}

/// The loss inputs of one training micro-batch (T tokens, S sequences).
struct HeadLoss<'a> {
    adv: &'a [f32],   // (S)
    seq_w: &'a [f64], // (S)
    old: Option<&'a [f32]>,
    refl: Option<&'a [f32]>,
    opts: &'a GrpoOptions,
}

impl HeadLoss<'_> {
    /// Uploads the loss inputs and zeroes dh (n·d), which the lm_head backward scatters into.
    fn prepare(&self, dev: &CudaDevice, b: &mut TrainBuffers, nd: usize) -> Result<()> {
        dev.stream()
            .memset_zeros(&mut b.dh.slice_mut(..nd))
            .map_err(cuda_err("zeroing dh"))?;
        put(dev, "advantages", self.adv, &mut b.adv)?;
        put(dev, "sequence weights", self.seq_w, &mut b.seq_w)?;
        if let Some(o) = self.old {
            put(dev, "old log-probs", o, &mut b.old)?;
        }
        if let Some(r) = self.refl {
            put(dev, "reference log-probs", r, &mut b.refl)?;
        }
        Ok(())
    }
}

/// The GRPO update on the GPU (see the module comment).
pub struct CudaTrainer {
    trained: Trained,
    /// Trained f32 values (P) and their tensor sizes in order.
    len: usize,
    sizes: Vec<usize>,
    /// (P) the trained values: the adapter in `lora_params` order, or (full fine-tuning) the
    /// f32 master weights in `weight_params` order.
    params: CudaSlice<f32>,
    grads: CudaSlice<f32>, // (P)
    m: CudaSlice<f32>,     // (P) AdamW first moment
    v: CudaSlice<f32>,     // (P) AdamW second moment
    norm_partials: CudaSlice<f64>,
    norm_stats: CudaSlice<f64>, // (2) Σ g², #non-finite
    plan: Option<(TrainPlan, TrainBuffers)>,
    cast: CudaFunction,
    /// kernels/lm_head_train.cu: the online softmax across vocabulary chunks.
    merge: CudaFunction,
    finish: CudaFunction,
    /// Vocabulary columns of one lm_head chunk ([`TRAIN_VOCAB_CHUNK`]; smaller in tests, to
    /// exercise the merge on small vocabularies).
    vocab_chunk: usize,
    /// [`lora_store_from_env`] at creation.
    lora_store: bool,
    /// With layer recompute, the trailing layers whose activations are kept
    /// ([`TrainPlan::keeping_last_layers`]; 0 by default).
    keep_layers: usize,
    /// Bytes the training plan may take ([`TrainPlan::total_bytes`]); None: what is free.
    memory_budget: Option<usize>,
    pub last_stats: TrainStats,
}

/// AdamW moments on the device: zeros (a first step) or `adam`'s, checked against `sizes`.
fn upload_moments(
    dev: &CudaDevice,
    adam: &AdamWState,
    sizes: &[usize],
    len: usize,
) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
    if adam.m.is_empty() && adam.v.is_empty() {
        return Ok((dev.alloc_zeros(len.max(1))?, dev.alloc_zeros(len.max(1))?));
    }
    adam.check_sizes(sizes)?;
    let mut m = dev.alloc_zeros::<f32>(len.max(1))?;
    let mut v = dev.alloc_zeros::<f32>(len.max(1))?;
    let mut off = 0;
    for (i, &n) in sizes.iter().enumerate() {
        put_at(dev, "AdamW m", &adam.m[i], &mut m, off)?;
        put_at(dev, "AdamW v", &adam.v[i], &mut v, off)?;
        off += n;
    }
    Ok((m, v))
}

/// Copies `host` into `dst[off..off + host.len()]` (asynchronous on the stream).
fn put_at(dev: &CudaDevice, what: &str, host: &[f32], dst: &mut CudaSlice<f32>, off: usize) -> Result<()> {
    if host.is_empty() {
        return Ok(());
    }
    check(what, dst.len(), off + host.len())?;
    dev.stream()
        .memcpy_htod(host, &mut dst.slice_mut(off..off + host.len()))
        .map_err(cuda_err(format_args!("uploading {what}")))
}

impl CudaTrainer {
    /// A trainer for `lora` (which also becomes the engine's live adapter) with AdamW moments
    /// `adam` (empty: zeros, as on a first step).
    pub fn new(engine: &mut CudaEngine, lora: &LoraWeights, adam: &AdamWState) -> Result<CudaTrainer> {
        let c = &engine.config;
        if lora.layers.len() != c.num_hidden_layers {
            return Err(Error::invalid(format!(
                "the adapter has {} layers, the model {}",
                lora.layers.len(),
                c.num_hidden_layers
            )));
        }
        if !(0.0..1.0).contains(&lora.config.dropout) {
            return Err(Error::invalid(format!(
                "lora dropout must be in [0, 1), got {}",
                lora.config.dropout
            )));
        }
        if lora.num_params() > 0 {
            lora_train_compiled_rank(lora.config.r)?;
        }
        engine.set_adapter_now(Some(lora))?;
        let flat = FlatLora::of(lora);
        let host = FlatLora::flatten(lora);
        let dev = &engine.dev;
        let params = dev.upload(&nonempty(&host))?;
        let (m, v) = if adam.m.is_empty() && adam.v.is_empty() {
            (
                dev.alloc_zeros(flat.len.max(1))?,
                dev.alloc_zeros(flat.len.max(1))?,
            )
        } else {
            adam.check_sizes(&flat.sizes)?;
            (
                dev.upload(&nonempty(&adam.m.concat()))?,
                dev.upload(&nonempty(&adam.v.concat()))?,
            )
        };
        let cast = dev.function("cast_f32_to_bf16")?;
        let mut params_bf16 = dev.alloc_zeros(flat.len.max(1))?;
        cast_f32_to_bf16(dev, &cast, &params, &mut params_bf16)?;
        let (len, sizes) = (flat.len, flat.sizes.clone());
        Self::with_state(
            engine,
            Trained::Lora {
                flat,
                shape: lora.clone(),
                params_bf16,
            },
            len,
            sizes,
            params,
            (m, v),
            cast,
        )
    }

    /// A trainer of every base weight (full fine-tuning) starting from `weights` (the f32
    /// master copy; the engine's bf16 weights are rewritten from it, so they agree), with AdamW
    /// moments `adam` (empty: zeros). The engine's adapter is switched off. Needs 16 bytes of
    /// device memory per parameter besides the engine's bf16 weights (a clear error otherwise).
    pub fn new_full(engine: &mut CudaEngine, weights: &Weights, adam: &AdamWState) -> Result<CudaTrainer> {
        let flat = FlatWeights::of(weights);
        {
            let views = engine.weights.param_views();
            let shape_ok =
                views.len() == flat.sizes.len() && views.iter().zip(&flat.sizes).all(|(v, &n)| v.len() == n);
            if !shape_ok {
                return Err(Error::invalid(
                    "full fine-tuning: the weights given do not have the shape of the CUDA engine's model",
                ));
            }
        }
        let dev = &engine.dev;
        dev.synchronize()?;
        let (free, _) = dev
            .context()
            .mem_get_info()
            .map_err(cuda_err("querying free device memory"))?;
        let need = TrainPlan::full_state_bytes(flat.len);
        if need > free {
            return Err(Error::Cuda(format!(
                "full fine-tuning of {} parameters needs {:.2} GiB of device memory for its f32 state \
                 (weights, gradients, AdamW m and v) but only {:.2} GiB are free; train a LoRA adapter \
                 (model.full_fine_tuning = false) or use --device cpu",
                flat.len,
                gib(need),
                gib(free)
            )));
        }
        let mut params = dev.alloc_zeros::<f32>(flat.len.max(1))?;
        let mut off = 0;
        for t in crate::trainer::weight_params(weights) {
            put_at(dev, "weights", t, &mut params, off)?;
            off += t.len();
        }
        let (m, v) = upload_moments(dev, adam, &flat.sizes, flat.len)?;
        let cast = dev.function("cast_f32_to_bf16")?;
        engine.set_adapter_now(None)?;
        engine.write_weights_from_f32(&params, &flat.sizes)?;
        let (len, sizes) = (flat.len, flat.sizes.clone());
        Self::with_state(engine, Trained::Full(flat), len, sizes, params, (m, v), cast)
    }

    #[allow(clippy::too_many_arguments)]
    fn with_state(
        engine: &CudaEngine,
        trained: Trained,
        len: usize,
        sizes: Vec<usize>,
        params: CudaSlice<f32>,
        (m, v): (CudaSlice<f32>, CudaSlice<f32>),
        cast: CudaFunction,
    ) -> Result<CudaTrainer> {
        let dev = &engine.dev;
        if let Some(blocks) = lora_blocks_from_env()? {
            super::lora_train::set_lora_train_target_blocks(blocks);
        }
        Ok(CudaTrainer {
            trained,
            grads: dev.alloc_zeros(len.max(1))?,
            norm_partials: dev.alloc_zeros(grad_norm_partials_len(len.max(1)))?,
            norm_stats: dev.alloc_zeros(2)?,
            len,
            sizes,
            params,
            m,
            v,
            plan: None,
            cast,
            merge: dev.function("logprob_chunk_merge_f32")?,
            finish: dev.function("logprob_chunk_finish_f32")?,
            vocab_chunk: vocab_chunk_from_env()?,
            lora_store: lora_store_from_env()?,
            keep_layers: 0,
            memory_budget: None,
            last_stats: TrainStats::default(),
        })
    }

    /// With layer recompute (`gradient_checkpointing`), also keep the activations of the last
    /// `layers` layers from the forward to the backward, so that their backward skips the
    /// recompute: faster by about one layer's forward each, for one layer's activations each
    /// (`plan().layer_act_bytes`). Bit-identical results whatever the count; takes effect at
    /// the next plan (a larger plan is kept).
    pub fn set_keep_layers(&mut self, layers: usize) {
        self.keep_layers = layers;
    }

    /// Caps the training step's device memory ([`TrainPlan::total_bytes`]: activations, backward
    /// scratch, the lm_head chunk and the trained f32 state; not the model's bf16 weights nor the
    /// rollout engine's buffers) at `bytes`; None (the default): what the device has free. A
    /// step whose requested layout (the options' micro-batches and recompute, the kept layers)
    /// does not fit runs with the first fallback of [`fit_layout`] that does (smaller
    /// micro-batches, layer recompute); `last_stats.layout` says which. Takes effect at the next
    /// step (the held buffers are released).
    pub fn set_memory_budget(&mut self, bytes: Option<usize>) {
        self.memory_budget = bytes;
        self.plan = None;
    }

    /// Sets the vocabulary columns of one lm_head chunk (≥ 1; takes effect at the next plan):
    /// fewer than the vocabulary splits it (online-softmax merge, the backward recomputing the
    /// logits; tests use it to cover that path on small vocabularies).
    pub fn set_vocab_chunk(&mut self, columns: usize) {
        self.vocab_chunk = columns.max(1);
    }

    /// Trainable parameters.
    pub fn num_params(&self) -> usize {
        self.len
    }

    /// Whether this trainer trains every base weight (made by [`Self::new_full`]).
    pub fn full_fine_tuning(&self) -> bool {
        matches!(self.trained, Trained::Full(_))
    }

    /// The plan of the buffers held (None before the first step).
    pub fn plan(&self) -> Option<&TrainPlan> {
        self.plan.as_ref().map(|(p, _)| p)
    }

    /// Copies the trained values into the tensors `dst` (in order, shaped as `sizes`).
    fn download_into(&self, engine: &CudaEngine, what: &str, mut dst: Vec<&mut [f32]>) -> Result<()> {
        let host = get(&engine.dev, what, &self.params, self.len)?;
        let parts = split_sizes(&host, &self.sizes);
        let changed = || Error::invalid(format!("downloading the {what}: the shape changed"));
        if dst.len() != parts.len() {
            return Err(changed());
        }
        for (d, s) in dst.iter_mut().zip(parts) {
            if d.len() != s.len() {
                return Err(changed());
            }
            d.copy_from_slice(&s);
        }
        Ok(())
    }

    /// Copies the adapter on the device into `into` (same shape as the one given to `new`).
    pub fn download_lora(&self, engine: &CudaEngine, into: &mut LoraWeights) -> Result<()> {
        if self.full_fine_tuning() {
            return Err(Error::invalid(
                "download_lora: this trainer trains every weight (use download_weights)",
            ));
        }
        self.download_into(engine, "adapter", crate::trainer::lora_params_mut(into))
    }

    /// Copies the trained f32 weights on the device into `into` (full fine-tuning; same shape
    /// as the weights given to `new_full`).
    pub fn download_weights(&self, engine: &CudaEngine, into: &mut Weights) -> Result<()> {
        if !self.full_fine_tuning() {
            return Err(Error::invalid(
                "download_weights: this trainer trains a LoRA adapter (use download_lora)",
            ));
        }
        self.download_into(engine, "weights", crate::trainer::weight_params_mut(into))
    }

    /// Copies the AdamW moments into `into` (its `step` is kept by the host and left as is).
    pub fn download_adam(&self, engine: &CudaEngine, into: &mut AdamWState) -> Result<()> {
        if into.step == 0 {
            into.m.clear();
            into.v.clear();
            return Ok(());
        }
        let m = get(&engine.dev, "AdamW m", &self.m, self.len)?;
        let v = get(&engine.dev, "AdamW v", &self.v, self.len)?;
        into.m = split_sizes(&m, &self.sizes);
        into.v = split_sizes(&v, &self.sizes);
        Ok(())
    }

    /// The plan for micro-batches of up to `rows` rows, `seqs` sequences and `toks` tokens.
    fn new_plan(
        &self,
        c: &ModelConfig,
        rows: usize,
        seqs: usize,
        toks: usize,
        recompute: Recompute,
    ) -> TrainPlan {
        match &self.trained {
            Trained::Lora { flat, shape, .. } => TrainPlan::new(
                c,
                rows,
                seqs,
                toks,
                flat.len,
                flat.rank,
                recompute,
                shape.config.dropout > 0.0,
                self.vocab_chunk,
            ),
            Trained::Full(flat) => {
                TrainPlan::new_full(c, rows, seqs, toks, flat.len, recompute, self.vocab_chunk)
            }
        }
    }

    /// Makes sure the held buffers serve `want`, a plan [`Self::fit_memory`] found to fit: grows
    /// them to serve both the held plan's batches and `want`'s when that union fits the free
    /// memory and the budget, else to `want`'s alone.
    fn ensure_plan(&mut self, engine: &CudaEngine, want: TrainPlan) -> Result<()> {
        if let Some((have, _)) = &self.plan {
            if have.covers(&want) {
                return Ok(());
            }
        }
        let union = self.plan.as_ref().map(|(have, _)| {
            self.new_plan(
                &engine.config,
                have.max_rows.max(want.max_rows),
                have.max_seqs.max(want.max_seqs),
                have.max_tokens.max(want.max_tokens),
                Recompute::Layer,
            )
            .keeping_last_layers(
                engine.config.num_hidden_layers,
                have.kept_layers.max(want.kept_layers),
            )
        });
        self.plan = None;
        engine.dev.synchronize()?;
        let (free, _) = engine
            .dev
            .context()
            .mem_get_info()
            .map_err(cuda_err("querying free device memory"))?;
        let budget = self.memory_budget;
        // The trained state (lora_bytes, full_bytes) was allocated by `new` / `new_full`.
        let pick = match union {
            Some(u) if u.buffer_bytes() <= free && budget.is_none_or(|b| u.total_bytes() <= b) => u,
            _ => want,
        };
        let bufs = TrainBuffers::alloc(&engine.dev, &engine.config, &pick)?;
        self.plan = Some((pick, bufs));
        Ok(())
    }

    /// The plan of `p` cut into micro-batches as `opts` says, with `keep` kept layers.
    fn plan_for(&self, c: &ModelConfig, p: &Prepared, opts: &GrpoOptions, keep: usize) -> TrainPlan {
        let ranges = p.micro_batches(opts);
        let (mut rows, mut seqs, mut toks) = (1, 1, 1);
        for rg in &ranges {
            rows = rows.max(rg.clone().map(|i| p.tokens[i].len()).sum::<usize>());
            seqs = seqs.max(rg.len());
            toks = toks.max(rg.clone().map(|i| p.lengths[i]).sum::<usize>());
        }
        self.new_plan(c, rows, seqs, toks, opts.recompute)
            .keeping_last_layers(c.num_hidden_layers, keep)
    }

    /// Allocates the plan of `p` in the requested layout (`opts`' micro-batches and recompute,
    /// the kept layers) when it fits the device memory (and the budget), else in the first
    /// fallback of [`fit_layout`] that does; returns the options with that layout's
    /// micro-batching and recompute.
    fn fit_memory(&mut self, engine: &CudaEngine, p: &Prepared, opts: &GrpoOptions) -> Result<GrpoOptions> {
        let c = &engine.config;
        let requested = StepLayout {
            micro_batch_seqs: p.micro_batches(opts).first().map_or(1, |r| r.len()),
            recompute: opts.recompute,
            keep_layers: self.keep_layers,
        };
        let with = |l: StepLayout| GrpoOptions {
            micro_batch_size: l.micro_batch_seqs,
            recompute: l.recompute,
            ..opts.clone()
        };
        self.last_stats.requested = requested;
        // The held buffers already serve the requested layout (every step after the first,
        // usually): nothing to fit. They were planned within the budget, which a change drops.
        let want = self.plan_for(c, p, &with(requested), requested.keep_layers);
        if self.plan.as_ref().is_some_and(|(have, _)| have.covers(&want)) {
            self.last_stats.layout = requested;
            return Ok(with(requested));
        }
        let (free, _) = engine
            .dev
            .context()
            .mem_get_info()
            .map_err(cuda_err("querying free device memory"))?;
        // A new plan replaces the held one: its buffers count as free. FIT_MARGIN stays free for
        // what the step allocates besides the plan (per-step uploads, cuBLAS's workspace).
        let avail =
            (free + self.plan.as_ref().map_or(0, |(h, _)| h.buffer_bytes())).saturating_sub(FIT_MARGIN);
        let budget = self.memory_budget;
        let fits =
            |pl: &TrainPlan| pl.buffer_bytes() <= avail && budget.is_none_or(|b| pl.total_bytes() <= b);
        let plan_of = |l: StepLayout| self.plan_for(c, p, &with(l), l.keep_layers);
        match fit_layout(requested, c.num_hidden_layers, plan_of, fits) {
            Ok((layout, plan)) => {
                self.ensure_plan(engine, plan)?;
                self.last_stats.layout = layout;
                Ok(with(layout))
            }
            Err(smallest) => Err(Error::Cuda(format!(
                "the training step does not fit the device memory: even one sequence per \
                 micro-batch with every layer recomputed needs {:.2} GiB (activations {:.2}, \
                 backward {:.2}, logits {:.2}, trained state {:.2}); {:.2} GiB are free{}. Use \
                 shorter sequences, a smaller LoRA rank or model, or free device memory",
                gib(smallest.total_bytes()),
                gib(smallest.activation_bytes),
                gib(smallest.backward_bytes),
                gib(smallest.logits_bytes),
                gib(smallest.lora_bytes + smallest.full_bytes),
                gib(avail),
                budget.map_or(String::new(), |b| format!(
                    " and the budget (max_train_memory_gib) is {:.2} GiB",
                    gib(b)
                ))
            ))),
        }
    }

    /// The adapter's LoRA dropout probability (0 without, and with full fine-tuning).
    fn dropout_p(&self) -> f32 {
        match &self.trained {
            Trained::Lora { shape, .. } => shape.config.dropout,
            Trained::Full(_) => 0.0,
        }
    }

    /// The LoRA dropout of micro-batch `mi` of a training pass whose step seed is `dropout_seed`
    /// (None: no dropout, as the CPU's eval, reference, old-logp and `grpo_gradients` passes):
    /// the CPU's `train_opts` (seed + micro-batch index).
    fn micro_dropout(&self, dropout_seed: Option<u64>, mi: usize) -> Option<LoraDropout> {
        match dropout_seed {
            Some(seed) if self.dropout_p() > 0.0 => Some(LoraDropout {
                p: self.dropout_p(),
                seed: seed.wrapping_add(mi as u64),
            }),
            _ => None,
        }
    }

    fn check_options(&self, opts: &GrpoOptions) -> Result<()> {
        match (self.full_fine_tuning(), opts.full_fine_tuning) {
            (false, true) => Err(Error::invalid(
                "full fine-tuning needs a trainer of every weight (CudaTrainer::new_full); this one \
                 trains a LoRA adapter",
            )),
            (true, false) => Err(Error::invalid(
                "this trainer trains every weight (full fine-tuning): set full_fine_tuning, or make \
                 a LoRA trainer (CudaTrainer::new)",
            )),
            _ => Ok(()),
        }
    }

    /// Log-probs (and the entropy sum) of the completion tokens of `seqs`, with the trainer's
    /// adapter (`adapter`) or without it; no gradients. The rows of `seqs` must fit the plan.
    fn logprobs_planned(
        &mut self,
        engine: &CudaEngine,
        seqs: &[Sequence],
        adapter: bool,
        temperature: f32,
    ) -> Result<MicroOut> {
        let pk = PackedBatch::new(seqs)?;
        self.forward(engine, &pk, adapter, None, temperature, false, None)
    }

    /// Uploads the packed rows, runs the forward (saving activations when `train`; with the
    /// adapter's LoRA `dropout` when given), and the chunked lm_head gather; leaves
    /// logp/entropy/lse/mean_s of the T tokens on the device. A training forward given the loss
    /// inputs `head` also runs the loss and the lm_head backward when the plan has
    /// `head_in_forward` (`MicroOut::head_done`).
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &mut self,
        engine: &CudaEngine,
        pk: &PackedBatch,
        adapter: bool,
        dropout: Option<LoraDropout>,
        temperature: f32,
        train: bool,
        head: Option<&HeadLoss<'_>>,
    ) -> Result<MicroOut> {
        let (plan, b) = self
            .plan
            .as_mut()
            .ok_or_else(|| Error::Cuda("internal: forward without a training plan".into()))?;
        let c = &engine.config;
        let dev = &engine.dev;
        let (n, ns, t) = (pk.rows(), pk.num_seqs(), pk.num_tokens());
        if n > plan.max_rows || ns > plan.max_seqs || t > plan.max_tokens {
            return Err(Error::Cuda(format!(
                "internal: a micro-batch of {n} rows / {ns} sequences / {t} tokens against a plan of \
                 {} / {} / {}",
                plan.max_rows, plan.max_seqs, plan.max_tokens
            )));
        }
        if dropout.is_some() && !plan.lora_dropout {
            return Err(Error::Cuda(
                "internal: a LoRA-dropout forward against a plan without the x̃ buffer".into(),
            ));
        }
        let ctx = Ctx {
            dev,
            blas: dev.blas()?,
            c,
            w: &engine.weights,
            inv_freq: &engine.inv_freq,
            lora_store: self.lora_store,
        };
        let (d, v) = (c.hidden_size, c.vocab_size);
        put(dev, "token ids", &pk.ids, &mut b.ids)?;
        put(dev, "positions", &pk.pos, &mut b.pos)?;
        put(dev, "cu_rows", &pk.cu_rows, &mut b.cu_rows)?;
        put(dev, "scored rows", &pk.scored, &mut b.scored)?;
        put(dev, "targets", &pk.targets, &mut b.targets)?;
        put(dev, "token sequences", &pk.token_seq, &mut b.token_seq)?;
        dev.embedding_fwd_bf16(
            &engine.weights.embed,
            &b.ids.slice(..n),
            &mut b.xs[0].slice_mut(..n * d),
            n,
            d,
            v,
        )?;
        // Full fine-tuning has no adapter: its weights are the engine's.
        let lora = match (&self.trained, adapter) {
            (
                Trained::Lora {
                    flat, params_bf16, ..
                },
                true,
            ) => Some(LoraRef {
                params_bf16,
                flat,
                dropout,
            }),
            _ => None,
        };
        let rows = Rows {
            n,
            ns,
            max_rows: pk.max_rows,
            pos: &b.pos,
            cu_rows: &b.cu_rows,
        };
        let nl = c.num_hidden_layers;
        for l in 0..nl {
            // Training keeps every layer input; a log-prob pass ping-pongs xs[0] and xs[1].
            let (i, o) = if train { (l, l + 1) } else { (l % 2, 1 - l % 2) };
            let (lo, hi) = b.xs.split_at_mut(i.max(o));
            let (x_in, x_out) = if i < o {
                (&lo[i], &mut hi[0])
            } else {
                (&hi[0], &mut lo[o])
            };
            let ai = if train {
                plan.act_slot(l, nl)
            } else {
                plan.scratch_slot(nl)
            };
            layer_fwd(&ctx, l, lora, &rows, x_in, x_out, &mut b.acts[ai], &mut b.xdrop)?;
        }
        // After a training forward the scratch set holds the last recomputable layer.
        b.scratch_holds = (train && plan.kept_layers < nl).then(|| nl - plan.kept_layers - 1);
        let last = if train { nl } else { nl % 2 };
        dev.rmsnorm_fwd_bf16(
            &b.xs[last].slice(..n * d),
            &engine.weights.final_norm,
            &mut b.hf.slice_mut(..n * d),
            n,
            d,
            c.rms_norm_eps,
        )?;
        // lm_head + log-softmax gather, chunk by chunk over tokens (C rows) and vocabulary (Vc
        // columns): each [C, Vc] chunk is reduced to per-row statistics by the gather kernel,
        // merged across vocabulary chunks by the online softmax of kernels/lm_head_train.cu.
        let vc_max = plan.vocab_chunk;
        put(
            dev,
            "per-chunk targets",
            &pk.vocab_chunk_targets(v, vc_max),
            &mut b.targets_vc,
        )?;
        // A training forward given the loss inputs, with the vocabulary in one chunk: each row
        // chunk's loss and lm_head backward run right after its logits, which are still there.
        let fused = match head {
            Some(h) if train && plan.head_in_forward => {
                h.prepare(dev, b, n * d)?;
                Some(h)
            }
            _ => None,
        };
        let full = match &self.trained {
            Trained::Full(f) => Some(f),
            Trained::Lora { .. } => None,
        };
        let ch = plan.chunk_rows;
        let mut start = 0;
        while start < t {
            let m = ch.min(t - start);
            gather_scored_rows(dev, b, start, m, n, d)?;
            for (k, v0) in (0..v).step_by(vc_max).enumerate() {
                let w = vc_max.min(v - v0);
                gemm_logits(
                    dev,
                    ctx.blas,
                    &b.hsel.slice(..m * d),
                    &engine.weights.lm_head().slice(v0 * d..(v0 + w) * d),
                    &mut b.logits.slice_mut(..m * w),
                    m,
                    d,
                    w,
                )?;
                dev.logprob_gather_fwd_f32(
                    &b.logits.slice(..m * w),
                    &b.targets_vc.slice(k * t + start..k * t + start + m),
                    &mut b.lp_c.slice_mut(..m),
                    &mut b.ent_c.slice_mut(..m),
                    &mut b.lse_c.slice_mut(..m),
                    &mut b.ms_c.slice_mut(..m),
                    m,
                    w,
                    temperature,
                )?;
                let st = dev.stream();
                let (mut lse, mut ent, mut s_t) = (
                    b.lse_t.slice_mut(start..start + m),
                    b.entropy.slice_mut(start..start + m),
                    b.s_t.slice_mut(start..start + m),
                );
                let (p0, _g0) = lse.device_ptr_mut(st);
                let (p1, _g1) = ent.device_ptr_mut(st);
                let (p2, _g2) = s_t.device_ptr_mut(st);
                let (p3, _g3) = b.lse_c.device_ptr(st);
                let (p4, _g4) = b.ent_c.device_ptr(st);
                let (p5, _g5) = b.lp_c.device_ptr(st);
                // (float* lse, float* entropy, float* s_t, const float* lse_c, const float*
                // entropy_c, const float* logp_c, int rows, int first): m rows each.
                launch_rows(
                    dev,
                    &self.merge,
                    "logprob_chunk_merge_f32",
                    m,
                    &[p0, p1, p2, p3, p4, p5],
                    &[m as i32, (k == 0) as i32],
                )?;
            }
            {
                let st = dev.stream();
                let (mut logp, mut mean_s) = (
                    b.logp.slice_mut(start..start + m),
                    b.mean_s.slice_mut(start..start + m),
                );
                let (p0, _g0) = logp.device_ptr_mut(st);
                let (p1, _g1) = mean_s.device_ptr_mut(st);
                let (lse, ent, s_t) = (
                    b.lse_t.slice(start..start + m),
                    b.entropy.slice(start..start + m),
                    b.s_t.slice(start..start + m),
                );
                let (p2, _g2) = lse.device_ptr(st);
                let (p3, _g3) = ent.device_ptr(st);
                let (p4, _g4) = s_t.device_ptr(st);
                // (float* logp, float* mean_s, const float* lse, const float* entropy, const
                // float* s_t, int rows): m rows each.
                launch_rows(
                    dev,
                    &self.finish,
                    "logprob_chunk_finish_f32",
                    m,
                    &[p0, p1, p2, p3, p4],
                    &[m as i32],
                )?;
            }
            if let Some(h) = fused {
                loss_tokens(dev, b, start..start + m, ns, h)?;
                head_bwd_chunk(
                    &ctx,
                    plan,
                    b,
                    &self.cast,
                    full.map(|f| (f, &mut self.grads)),
                    start,
                    m,
                    t,
                    n,
                    h.opts.temperature,
                    true,
                )?;
            }
            start += m;
        }
        let logp = get(dev, "log-probs", &b.logp, t)?;
        let entropy = get(dev, "entropies", &b.entropy, t)?;
        Ok(MicroOut {
            logp,
            entropy_sum: entropy.iter().map(|&e| e as f64).sum(),
            head_done: fused.is_some(),
        })
    }

    /// Loss and backward of the micro-batch whose forward (train = true, LoRA dropout
    /// `dropout`, loss inputs `head`) just ran: unless that forward already did (`head_done`),
    /// the GRPO loss over its T tokens with the batch's weights and the lm_head backward; then
    /// every layer backward (with the forward's dropout masks), accumulating the gradients.
    fn loss_backward(
        &mut self,
        engine: &CudaEngine,
        pk: &PackedBatch,
        dropout: Option<LoraDropout>,
        head: &HeadLoss<'_>,
        head_done: bool,
    ) -> Result<()> {
        let (plan, b) = self
            .plan
            .as_mut()
            .ok_or_else(|| Error::Cuda("internal: backward without a training plan".into()))?;
        let c = &engine.config;
        let dev = &engine.dev;
        let (n, ns, t) = (pk.rows(), pk.num_seqs(), pk.num_tokens());
        let (d, v, nl) = (c.hidden_size, c.vocab_size, c.num_hidden_layers);
        let ctx = Ctx {
            dev,
            blas: dev.blas()?,
            c,
            w: &engine.weights,
            inv_freq: &engine.inv_freq,
            lora_store: self.lora_store,
        };
        let (lora, full) = match &self.trained {
            Trained::Lora {
                flat, params_bf16, ..
            } => (
                Some(LoraRef {
                    params_bf16,
                    flat,
                    dropout,
                }),
                None,
            ),
            Trained::Full(flat) => (None, Some(flat)),
        };
        if !head_done {
            // --- the loss over the T tokens, then the lm_head backward into dh chunk by chunk
            // (rows that are not scored get no gradient), recomputing the logits.
            head.prepare(dev, b, n * d)?;
            loss_tokens(dev, b, 0..t, ns, head)?;
            let ch = plan.chunk_rows;
            let mut start = 0;
            while start < t {
                let m = ch.min(t - start);
                gather_scored_rows(dev, b, start, m, n, d)?;
                head_bwd_chunk(
                    &ctx,
                    plan,
                    b,
                    &self.cast,
                    full.map(|f| (f, &mut self.grads)),
                    start,
                    m,
                    t,
                    n,
                    head.opts.temperature,
                    false,
                )?;
                start += m;
            }
        }
        rmsnorm_bwd(
            dev,
            &b.xs[nl].slice(..n * d),
            &engine.weights.final_norm,
            &b.dh.slice(..n * d),
            &mut b.dx.slice_mut(..n * d),
            full.map(|f| (&mut b.norm_partials, &mut self.grads, f.final_norm.clone())),
            n,
            d,
            c.rms_norm_eps,
            false,
        )?;

        // --- layers, last to first
        let rows = Rows {
            n,
            ns,
            max_rows: pk.max_rows,
            pos: &b.pos,
            cu_rows: &b.cu_rows,
        };
        let mut g = BwdBufs {
            dx: &mut b.dx,
            dh: &mut b.dh,
            dattn: &mut b.dattn,
            dq: &mut b.dq,
            dk: &mut b.dk,
            dv: &mut b.dv,
            dq_pre: &mut b.dq_pre,
            dk_pre: &mut b.dk_pre,
            dgate: &mut b.dgate,
            dup: &mut b.dup,
            dact: &mut b.dact,
            delta: &mut b.delta,
            dyb: &mut b.dyb,
            lora_scratch: &mut b.lora_scratch,
            xd: &mut b.xdrop,
            norm_partials: &mut b.norm_partials,
            ones: &b.ones,
        };
        let scratch_holds = b.scratch_holds.take();
        for l in (0..nl).rev() {
            let ai = plan.act_slot(l, nl);
            if l < nl - plan.kept_layers && scratch_holds != Some(l) {
                // Recompute this layer's activations from its saved input (same kernels, same
                // order: bit-identical to the forward). Its output goes to a scratch copy of
                // xs[l+1] (it is identical, and no longer needed: the final norm backward ran).
                let (lo, hi) = b.xs.split_at_mut(l + 1);
                // The same masks too: LoRA dropout is a pure hash of (seed, layer, projection,
                // row, column).
                layer_fwd(
                    &ctx,
                    l,
                    lora,
                    &rows,
                    &lo[l],
                    &mut hi[0],
                    &mut b.acts[ai],
                    &mut *g.xd,
                )?;
            }
            layer_bwd(
                &ctx,
                l,
                lora,
                full.map(|f| &f.layers[l]),
                &mut self.grads,
                &rows,
                &b.xs[l],
                &b.acts[ai],
                &mut g,
            )?;
        }
        if let Some(f) = full {
            // dx = dL/d(embedding rows): added into each row's token of the embedding.
            let (tokens, row_off, rows_of) = super::embedding_grad_index(&pk.ids, v)?;
            put(dev, "embedding gradient tokens", &tokens, &mut b.emb_tokens)?;
            put(dev, "embedding gradient offsets", &row_off, &mut b.emb_off)?;
            put(dev, "embedding gradient rows", &rows_of, &mut b.emb_rows)?;
            let u = tokens.len();
            dev.embedding_grad_bf16_to_f32(
                &b.dx.slice(..n * d),
                &b.emb_tokens.slice(..u),
                &b.emb_off.slice(..u + 1),
                &b.emb_rows.slice(..n),
                &mut self.grads.slice_mut(f.embed.clone()),
                u,
                n,
                d,
                v,
            )?;
        }
        Ok(())
    }

    /// The gradients of one pass over the prepared batch (accumulated in `self.grads`, zeroed
    /// first), with the loss, metrics and log-probs the CPU's `gradients` reports; LoRA dropout
    /// (when the adapter has it) seeded by `dropout_seed` + micro-batch index, None: off.
    fn gradients(
        &mut self,
        engine: &CudaEngine,
        p: &Prepared,
        opts: &GrpoOptions,
        dropout_seed: Option<u64>,
    ) -> Result<GrpoGradients> {
        let cfg = &opts.loss;
        let weights = sequence_weights(&p.lengths, cfg.loss_type, cfg.max_completion_length);
        let mut tok_off = vec![0usize];
        for &l in &p.lengths {
            tok_off.push(tok_off.last().unwrap() + l);
        }
        engine
            .dev
            .stream()
            .memset_zeros(&mut self.grads)
            .map_err(cuda_err("zeroing the gradients"))?;
        let mut logp_all = Vec::with_capacity(*tok_off.last().unwrap());
        let mut entropy_sum = 0f64;
        for (mi, rg) in p.micro_batches(opts).into_iter().enumerate() {
            let seqs = p.seqs(rg.clone());
            let pk = PackedBatch::new(&seqs)?;
            let dropout = self.micro_dropout(dropout_seed, mi);
            let toks = tok_off[rg.start]..tok_off[rg.end];
            let head = HeadLoss {
                adv: &p.adv[rg.clone()],
                seq_w: &weights[rg.clone()],
                old: p.old.as_ref().map(|o| &o[toks.clone()]),
                refl: p.reference.as_ref().map(|r| &r[toks.clone()]),
                opts,
            };
            let out = self.forward(engine, &pk, true, dropout, opts.temperature, true, Some(&head))?;
            self.loss_backward(engine, &pk, dropout, &head, out.head_done)?;
            entropy_sum += out.entropy_sum;
            logp_all.extend_from_slice(&out.logp);
            self.last_stats.micro_batches += 1;
            self.last_stats.rows += pk.rows();
        }
        p.pass_result(
            &opts.loss,
            Grads {
                lora: None,
                weights: None,
            },
            logp_all,
            entropy_sum,
        )
    }

    /// Advantages, filtering, and the reference / old log-probs on the GPU.
    /// Also fits the step into the device memory: the options returned carry the micro-batching
    /// and recompute the step runs with ([`Self::fit_memory`]).
    fn prepare(
        &mut self,
        engine: &CudaEngine,
        batch: &GrpoBatch,
        opts: &GrpoOptions,
    ) -> Result<(Prepared, GrpoOptions)> {
        self.check_options(opts)?;
        // The packed batch sizes the plan; the reference / old log-prob passes run inside it.
        let shape = match &self.trained {
            Trained::Lora { shape, .. } => Some(shape),
            Trained::Full(_) => None,
        };
        let mut p = prepare_batch(&engine.config, shape, batch, opts)?;
        let opts = self.fit_memory(engine, &p, opts)?;
        let t0 = Instant::now();
        let temperature = opts.temperature;
        p.fill_logps(batch, &opts, &mut |seqs, adapter| {
            self.logprobs_planned(engine, seqs, adapter, temperature)
                .map(|o| o.logp)
        })?;
        self.last_stats.prepare_ms = t0.elapsed().as_secs_f64() * 1e3;
        Ok((p, opts))
    }

    /// Gradients of the GRPO loss on `batch` for the current parameters, without stepping and
    /// without LoRA dropout (as the CPU's [`crate::trainer::grpo_gradients`]); the gradients are
    /// downloaded into `grads.lora` (an adapter) or `grads.weights` (full fine-tuning) (tests
    /// and tools).
    pub fn grpo_gradients(
        &mut self,
        engine: &CudaEngine,
        batch: &GrpoBatch,
        opts: &GrpoOptions,
    ) -> Result<GrpoGradients> {
        self.gradients_downloaded(engine, batch, opts, None)
    }

    /// [`Self::grpo_gradients`] of a training step whose LoRA-dropout seed is `dropout_seed`
    /// ([`TrainState::dropout_seed`]): the adapter's dropout applies, with the masks of the
    /// CPU's [`crate::trainer::step::grpo_gradients_with_dropout`] for the same seed.
    pub fn grpo_gradients_with_dropout(
        &mut self,
        engine: &CudaEngine,
        batch: &GrpoBatch,
        opts: &GrpoOptions,
        dropout_seed: u64,
    ) -> Result<GrpoGradients> {
        self.gradients_downloaded(engine, batch, opts, Some(dropout_seed))
    }

    fn gradients_downloaded(
        &mut self,
        engine: &CudaEngine,
        batch: &GrpoBatch,
        opts: &GrpoOptions,
        dropout_seed: Option<u64>,
    ) -> Result<GrpoGradients> {
        let (p, opts) = self.prepare(engine, batch, opts)?;
        let mut g = self.gradients(engine, &p, &opts, dropout_seed)?;
        let host = get(&engine.dev, "gradients", &self.grads, self.len)?;
        let parts = split_sizes(&host, &self.sizes);
        match &self.trained {
            Trained::Lora { shape, .. } => {
                let mut lg = shape.zeros_like();
                for (d, s) in crate::trainer::lora_params_mut(&mut lg).into_iter().zip(parts) {
                    d.copy_from_slice(&s);
                }
                g.grads.lora = Some(lg);
            }
            Trained::Full(_) => {
                let mut gw = Weights::zeros(&engine.config);
                let dst = crate::trainer::weight_params_mut(&mut gw);
                if dst.len() != parts.len() || dst.iter().zip(&parts).any(|(d, s)| d.len() != s.len()) {
                    return Err(Error::Cuda(
                        "internal: the trained weights do not have the model config's shape".into(),
                    ));
                }
                for (d, s) in dst.into_iter().zip(parts) {
                    d.copy_from_slice(&s);
                }
                g.grads.weights = Some(gw);
            }
        }
        Ok(g)
    }

    /// The GRPO policy update on the GPU: `num_iterations` optimiser steps on the same
    /// rollouts, exactly as [`crate::trainer::step::grpo_update`] does on the CPU (skipped
    /// steps, schedule, metrics). The engine's live adapter is the updated one on return; the
    /// host copy of the adapter and the AdamW moments are fetched with [`Self::download_lora`]
    /// and [`Self::download_adam`] (checkpoints).
    pub fn grpo_update(
        &mut self,
        engine: &mut CudaEngine,
        state: &mut TrainState,
        batch: &GrpoBatch,
        opts: &GrpoOptions,
    ) -> Result<Vec<StepMetrics>> {
        self.last_stats = TrainStats::default();
        let (p, opts) = self.prepare(engine, batch, opts)?;
        let opts = &opts;
        let mut out = Vec::with_capacity(opts.num_iterations);
        for iteration in 0..opts.num_iterations {
            let t0 = Instant::now();
            let g = self.gradients(engine, &p, opts, Some(state.dropout_seed()))?;
            engine.dev.synchronize()?;
            let t1 = Instant::now();
            let lr = opts.schedule.lr_at(state.step as usize);
            let opt = opts.optimizer.with_lr(lr);
            opt.validate()?;
            let rep = self.apply_update(engine, state, &opt, opts.max_grad_norm, !g.loss.is_finite())?;
            engine.dev.synchronize()?;
            self.last_stats.grad_ms += (t1 - t0).as_secs_f64() * 1e3;
            self.last_stats.optimizer_ms += t1.elapsed().as_secs_f64() * 1e3;
            out.push(step_metrics(
                state,
                iteration,
                &g,
                &rep,
                lr,
                batch,
                p.tokens.len(),
            ));
            state.step += 1;
            state.skipped_steps += rep.skipped as u64;
        }
        self.last_stats.plan_bytes = self.plan().map_or(0, |p| p.total_bytes());
        Ok(out)
    }

    /// Grad norm → clip decision (host, as `optim::clip_and_step`) → AdamW on the flat
    /// buffers → copy into the engine's live adapter (full fine-tuning: rewrite the engine's
    /// bf16 weights from the f32 master). Skipped (nothing changes) on a
    /// non-finite gradient or `force_skip`.
    fn apply_update(
        &mut self,
        engine: &mut CudaEngine,
        state: &mut TrainState,
        opt: &crate::optim::AdamW,
        max_grad_norm: f32,
        force_skip: bool,
    ) -> Result<StepReport> {
        let dev = &engine.dev;
        dev.grad_sq_norm_f32(
            &self.grads.slice(..self.len),
            &mut self.norm_partials,
            &mut self.norm_stats,
        )?;
        let s = get(dev, "gradient norm", &self.norm_stats, 2)?;
        let clip = super::clip_report_from_stats([s[0], s[1]], max_grad_norm);
        if force_skip || !clip.finite {
            return Ok(StepReport {
                grad_norm: clip.norm,
                clip_scale: 1.0,
                skipped: true,
            });
        }
        state.adam.step += 1;
        let scalars = opt.scalars(state.adam.step);
        let len = self.len;
        dev.adamw_step_f32(
            &mut self.params.slice_mut(..len),
            &mut self.m.slice_mut(..len),
            &mut self.v.slice_mut(..len),
            &self.grads.slice(..len),
            Some(&self.norm_stats),
            clip.scale,
            &scalars,
        )?;
        match &mut self.trained {
            Trained::Lora {
                flat, params_bf16, ..
            } => {
                cast_f32_to_bf16(dev, &self.cast, &self.params, params_bf16)?;
                engine.copy_adapter_from_flat(&self.params, |l, p| {
                    flat.pair(l, p).map(|r| (r.a.clone(), r.b.clone()))
                })?;
            }
            // The bf16 weights of the forward and the rollouts, rewritten in place.
            Trained::Full(_) => engine.write_weights_from_f32(&self.params, &self.sizes)?,
        }
        Ok(StepReport {
            grad_norm: clip.norm,
            clip_scale: clip.scale,
            skipped: false,
        })
    }
}

/// out (bf16) = in (f32), n = in.len().
fn cast_f32_to_bf16(
    dev: &CudaDevice,
    f: &CudaFunction,
    input: &impl DevicePtr<f32>,
    out: &mut impl DevicePtrMut<bf16>,
) -> Result<()> {
    let n = input.len();
    check("cast out", out.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let n64 = n as u64;
    let s = dev.stream();
    let (op, _o) = out.device_ptr_mut(s);
    let (ip, _i) = input.device_ptr(s);
    let mut l = s.launch_builder(f);
    l.arg(&op).arg(&ip).arg(&n64);
    // SAFETY: (bf16* out, const float* in, size_t n); both hold n elements (checked); the
    // kernel is grid-stride (8 elements per thread per step).
    unsafe { l.launch(cfg((ew_vec_grid(n), 1, 1), 256, 0)) }.map_err(cuda_err("cast_f32_to_bf16"))?;
    Ok(())
}

/// A LoRA of rank r (alpha 2r) on every projection.
pub fn all_linear(r: usize) -> crate::lora::LoraConfig {
    crate::lora::LoraConfig {
        r,
        alpha: 2.0 * r as f32,
        dropout: 0.0,
        use_rslora: false,
        target_modules: Proj::ALL.to_vec(),
    }
}

/// hsel (m, D) = hf[scored rows start .. start + m] of the micro-batch's n rows: the lm_head
/// input of one chunk.
fn gather_scored_rows(
    dev: &CudaDevice,
    b: &mut TrainBuffers,
    start: usize,
    m: usize,
    n: usize,
    d: usize,
) -> Result<()> {
    dev.embedding_fwd_bf16(
        &b.hf.slice(..n * d),
        &b.scored.slice(start..start + m),
        &mut b.hsel.slice_mut(..m * d),
        m,
        d,
        n,
    )
}

/// The GRPO loss forward and backward over the tokens `tok` of the micro-batch (their log-probs
/// on the device, `head` uploaded): dL/dlogp into `grad_logp[tok]`. Each token's gradient
/// depends on its own log-probs and its sequence's advantage and weight only, so a range of
/// them is the same as the whole; the kernel's totals (never read: the host reports the loss)
/// cover the last range.
fn loss_tokens(
    dev: &CudaDevice,
    b: &mut TrainBuffers,
    tok: Range<usize>,
    ns: usize,
    head: &HeadLoss<'_>,
) -> Result<()> {
    let m = tok.len();
    if m == 0 {
        return Ok(());
    }
    let old_v = head.old.map(|_| b.old.slice(tok.clone()));
    let ref_v = head.refl.map(|_| b.refl.slice(tok.clone()));
    dev.grpo_loss_fwd_bwd_f32(
        &b.logp.slice(tok.clone()),
        old_v.as_ref(),
        ref_v.as_ref(),
        &b.token_seq.slice(tok.clone()),
        &b.adv.slice(..ns),
        &b.seq_w.slice(..ns),
        &mut b.grad_logp.slice_mut(tok),
        None::<&mut CudaSlice<f32>>,
        &mut b.loss_partials,
        &mut b.loss_totals,
        m,
        ns,
        GrpoLossScalars::from_config(&head.opts.loss),
    )
}

/// The lm_head backward of the chunk of `m` scored rows at token `start` (of `t`; `n` rows),
/// whose hsel is gathered and whose dL/dlogp, lse and E[s] are on the device: per vocabulary
/// chunk the logits (recomputed unless `logits_ready`: the forward's, the vocabulary being one
/// chunk), dlogits rounded to bf16 in one pass from them, dhsel (f32) += dlogits · W_lm[chunk]
/// and, with full fine-tuning, dW_lm[chunk] (w, D) += dlogitsᵀ · hsel (into the embedding when
/// tied); then dhsel is scattered into dh's rows.
#[allow(clippy::too_many_arguments)]
fn head_bwd_chunk(
    ctx: &Ctx<'_>,
    plan: &TrainPlan,
    b: &mut TrainBuffers,
    cast: &CudaFunction,
    mut full: Option<(&FlatWeights, &mut CudaSlice<f32>)>,
    start: usize,
    m: usize,
    t: usize,
    n: usize,
    temperature: f32,
    logits_ready: bool,
) -> Result<()> {
    let dev = ctx.dev;
    let (d, v) = (ctx.c.hidden_size, ctx.c.vocab_size);
    let vc_max = plan.vocab_chunk;
    if logits_ready && vc_max < v {
        return Err(Error::Cuda(
            "internal: the lm_head backward reuses the logits of a split vocabulary".into(),
        ));
    }
    for (k, v0) in (0..v).step_by(vc_max).enumerate() {
        let w = vc_max.min(v - v0);
        let w_lm = ctx.w.lm_head().slice(v0 * d..(v0 + w) * d);
        if !logits_ready {
            gemm_logits(
                dev,
                ctx.blas,
                &b.hsel.slice(..m * d),
                &w_lm,
                &mut b.logits.slice_mut(..m * w),
                m,
                d,
                w,
            )?;
        }
        dev.logprob_gather_bwd_f32_to_bf16(
            &b.logits.slice(..m * w),
            &mut b.dlogits.slice_mut(..m * w),
            &b.targets_vc.slice(k * t + start..k * t + start + m),
            &b.grad_logp.slice(start..start + m),
            None::<&CudaSlice<f32>>,
            &b.lse_t.slice(start..start + m),
            &b.mean_s.slice(start..start + m),
            m,
            w,
            temperature,
        )?;
        gemm_dx(
            dev,
            ctx.blas,
            &b.dlogits.slice(..m * w),
            &w_lm,
            &mut b.dhsel_f.slice_mut(..m * d),
            m,
            d,
            w,
            if k == 0 { 0.0 } else { 1.0 },
        )?;
        if let Some((f, grads)) = full.as_mut() {
            let r0 = f.lm_head_grad().start + v0 * d;
            gemm_dw(
                dev,
                ctx.blas,
                &b.dlogits.slice(..m * w),
                &b.hsel.slice(..m * d),
                &mut grads.slice_mut(r0..r0 + w * d),
                m,
                d,
                w,
            )?;
        }
    }
    cast_f32_to_bf16(
        dev,
        cast,
        &b.dhsel_f.slice(..m * d),
        &mut b.dhsel.slice_mut(..m * d),
    )?;
    dev.scatter_rows_bf16(
        &b.dhsel.slice(..m * d),
        &b.scored.slice(start..start + m),
        &mut b.dh.slice_mut(..n * d),
        m,
        d,
    )
}

/// Launches a grid-stride per-row kernel (kernels/lm_head_train.cu) with its pointer arguments
/// then its int arguments, in the kernel's order. The callers hold the pointers' buffers.
fn launch_rows(
    dev: &CudaDevice,
    f: &CudaFunction,
    kn: &str,
    rows: usize,
    ptrs: &[u64],
    ints: &[i32],
) -> Result<()> {
    if rows == 0 {
        return Ok(());
    }
    let s = dev.stream();
    let mut l = s.launch_builder(f);
    for p in ptrs {
        l.arg(p);
    }
    for i in ints {
        l.arg(i);
    }
    // SAFETY: the callers pass every pointer of the kernel's signature (each buffer holding at
    // least `rows` f32) and then its ints; the kernel is grid-stride over rows.
    unsafe { l.launch(cfg((ew_grid(rows), 1, 1), 256, 0)) }.map_err(cuda_err(kn))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// `rft bench train`

/// What `rft bench train --json` prints.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TrainBench {
    pub shape: String,
    pub device: String,
    pub sequences: usize,
    pub seq_len: usize,
    pub prompt_len: usize,
    pub lora_rank: usize,
    /// Every weight trained (f32 master weights, grads and AdamW moments) instead of a LoRA
    /// adapter (`lora_rank` is then unused).
    pub full_fine_tuning: bool,
    /// The recompute the step ran with (`none` or `layer`): the requested one, or the memory
    /// fallback's ([`fit_layout`]).
    pub recompute: String,
    /// Trailing layers whose activations were kept (no recompute in their backward).
    pub kept_layers: usize,
    /// Sequences of the largest micro-batch the step ran with, and the micro-batches.
    pub micro_batch_size: usize,
    pub micro_batches: usize,
    /// The cap of [`CudaTrainer::set_memory_budget`], when given.
    pub memory_budget_bytes: Option<usize>,
    /// Scored rows × vocabulary columns of one lm_head chunk, and whether the training forward
    /// ran the loss and the lm_head backward (the vocabulary in one chunk).
    pub lm_head_chunk: (usize, usize),
    pub head_in_forward: bool,
    pub trainable_params: usize,
    /// Median over the timed steps.
    pub step_ms: f64,
    pub step_ms_all: Vec<f64>,
    /// Rows (prompt + completion tokens) per second of the median step.
    pub tokens_per_s: f64,
    pub weight_bytes: usize,
    pub plan_bytes: usize,
    /// Device memory in use after the steps, over what was free before the engine was made
    /// (everything is planned up front, so this is the peak up to cuBLAS's workspace).
    pub peak_gpu_bytes_measured: usize,
    pub grad_ms: f64,
    pub optimizer_ms: f64,
}

/// One GRPO step of `sequences` × `seq_len` tokens (prompt `prompt_len`, the rest scored) on
/// random weights of a preset shape with a rank-`lora_rank` adapter on every projection;
/// `steps` timed steps after one warm-up.
#[allow(clippy::too_many_arguments)]
pub fn bench_train(
    shape: &str,
    sequences: usize,
    seq_len: usize,
    prompt_len: usize,
    lora_rank: usize,
    recompute: Recompute,
    keep_layers: usize,
    micro_batch_size: usize,
    memory_budget: Option<usize>,
    full_fine_tuning: bool,
    steps: usize,
    ordinal: usize,
) -> Result<TrainBench> {
    // The arguments are checked before the GPU is looked for, so a bad one is named anywhere.
    if sequences == 0 || lora_rank == 0 || steps == 0 {
        return Err(Error::invalid("--sequences, --lora-rank and --steps must be ≥ 1"));
    }
    if prompt_len == 0 || prompt_len >= seq_len {
        return Err(Error::invalid(format!(
            "--prompt-len must be in [1, --seq-len), got {prompt_len} with --seq-len {seq_len}"
        )));
    }
    let config = super::engine::bench_shape(shape)?;
    if seq_len > config.max_position_embeddings {
        return Err(Error::invalid(format!(
            "--seq-len {seq_len} exceeds the context of {shape} ({} tokens, max_position_embeddings)",
            config.max_position_embeddings
        )));
    }
    super::availability().map_err(Error::CudaUnavailable)?;
    let dev0 = CudaDevice::new(ordinal)?;
    let (free0, _) = dev0.context().mem_get_info().map_err(cuda_err("mem_get_info"))?;
    drop(dev0);
    let (mut engine, mut trainer) = if full_fine_tuning {
        // The f32 master weights come from the host (16 B a parameter on the device in all).
        let w = Weights::random(&config, 1, 0.02);
        let mut engine = CudaEngine::from_weights(config.clone(), &w, ordinal)?;
        let trainer = CudaTrainer::new_full(&mut engine, &w, &AdamWState::default())?;
        (engine, trainer)
    } else {
        let mut engine = CudaEngine::random(config.clone(), 1, ordinal)?;
        // PEFT init leaves B = 0; a non-zero B exercises every term of the backward.
        let lora = LoraWeights::new_random(all_linear(lora_rank), &config, 3, 0.02, 1e-3);
        let trainer = CudaTrainer::new(&mut engine, &lora, &AdamWState::default())?;
        (engine, trainer)
    };
    trainer.set_keep_layers(keep_layers);
    trainer.set_memory_budget(memory_budget);
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let mut rnd = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let g = 8.min(sequences);
    let seqs: Vec<crate::trainer::GrpoSeq> = (0..sequences)
        .map(|_| crate::trainer::GrpoSeq {
            prompt_ids: (0..prompt_len)
                .map(|_| (rnd() % config.vocab_size as u64) as u32)
                .collect(),
            completion_ids: (0..seq_len - prompt_len)
                .map(|_| (rnd() % config.vocab_size as u64) as u32)
                .collect(),
            old_logp: None,
        })
        .collect();
    let batch = GrpoBatch {
        group_size: g,
        rewards: (0..sequences).map(|_| (rnd() % 2) as f32).collect(),
        seqs,
        advantages: None,
    };
    let opts = GrpoOptions {
        recompute,
        micro_batch_size,
        full_fine_tuning,
        optimizer: crate::optim::AdamW {
            lr: 1e-5,
            weight_decay: 0.0,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut state = TrainState::new(0);
    trainer.grpo_update(&mut engine, &mut state, &batch, &opts)?; // warm-up: plan, cuBLAS heuristics
    let mut times = Vec::with_capacity(steps);
    let (mut grad_ms, mut opt_ms) = (0.0, 0.0);
    for _ in 0..steps {
        engine.dev.synchronize()?;
        let t = Instant::now();
        trainer.grpo_update(&mut engine, &mut state, &batch, &opts)?;
        engine.dev.synchronize()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        grad_ms += trainer.last_stats.grad_ms;
        opt_ms += trainer.last_stats.optimizer_ms;
    }
    let (free1, _) = engine
        .dev
        .context()
        .mem_get_info()
        .map_err(cuda_err("mem_get_info"))?;
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let step_ms = sorted[sorted.len() / 2];
    Ok(TrainBench {
        shape: shape.to_string(),
        device: engine.dev.name().to_string(),
        sequences,
        seq_len,
        prompt_len,
        lora_rank,
        full_fine_tuning,
        recompute: format!("{:?}", trainer.last_stats.layout.recompute).to_lowercase(),
        kept_layers: trainer.plan().map_or(0, |p| p.kept_layers),
        micro_batch_size: trainer.last_stats.layout.micro_batch_seqs,
        micro_batches: trainer.last_stats.micro_batches,
        memory_budget_bytes: memory_budget,
        lm_head_chunk: trainer.plan().map_or((0, 0), |p| (p.chunk_rows, p.vocab_chunk)),
        head_in_forward: trainer.plan().is_some_and(|p| p.head_in_forward),
        trainable_params: trainer.num_params(),
        step_ms,
        step_ms_all: times,
        tokens_per_s: (sequences * seq_len) as f64 / (step_ms / 1e3),
        weight_bytes: engine.weight_bytes(),
        plan_bytes: trainer.plan().map_or(0, |p| p.total_bytes()),
        peak_gpu_bytes_measured: free0.saturating_sub(free1),
        grad_ms: grad_ms / steps as f64,
        optimizer_ms: opt_ms / steps as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// bf16 bytes of every weight of `c` (embeddings once when tied).
    fn bf16_weight_bytes(c: &ModelConfig) -> usize {
        let per_layer: usize = Proj::ALL
            .iter()
            .map(|p| {
                let (i, o) = p.dims(c);
                i * o
            })
            .sum::<usize>()
            + 2 * c.hidden_size;
        let emb = c.vocab_size * c.hidden_size * if c.tie_word_embeddings { 1 } else { 2 };
        (emb + c.num_hidden_layers * per_layer + c.hidden_size) * 2
    }

    #[test]
    fn packed_batch_matches_the_cpu_layout() {
        let a = [5u32, 6, 7, 8];
        let b = [1u32, 2];
        let seqs = [
            Sequence {
                tokens: &a,
                prompt_len: 2,
            },
            Sequence {
                tokens: &b,
                prompt_len: 2,
            },
        ];
        let pk = PackedBatch::new(&seqs).unwrap();
        assert_eq!(pk.ids, vec![5, 6, 7, 8, 1, 2]);
        assert_eq!(pk.pos, vec![0, 1, 2, 3, 0, 1]);
        assert_eq!(pk.cu_rows, vec![0, 4, 6]);
        assert_eq!(pk.max_rows, 4);
        // Row 1 (token 6) predicts 7, row 2 predicts 8; sequence 2 has no completion.
        assert_eq!(pk.scored, vec![1, 2]);
        assert_eq!(pk.targets, vec![7, 8]);
        assert_eq!(pk.token_seq, vec![0, 0]);
        assert_eq!(pk.token_off, vec![0, 2, 2]);
        let bad = [Sequence {
            tokens: &b,
            prompt_len: 0,
        }];
        let e = PackedBatch::new(&bad).unwrap_err().to_string();
        assert!(e.contains("sequence 0: prompt_len 0"), "{e}");
    }

    #[test]
    fn vocab_chunk_targets_point_into_their_chunk() {
        let toks = [0u32, 1, 2, 3, 4, 5, 6, 7, 8, 9];
        let seqs = [Sequence {
            tokens: &toks,
            prompt_len: 7,
        }];
        let pk = PackedBatch::new(&seqs).unwrap();
        assert_eq!(pk.targets, vec![7, 8, 9]);
        // Vocabulary 10 in chunks of 4: [0, 4), [4, 8), [8, 10).
        let tv = pk.vocab_chunk_targets(10, 4);
        let x = u32::MAX;
        assert_eq!(tv, vec![x, x, x, 3, x, x, x, 0, 1]);
        // One chunk: the targets themselves.
        assert_eq!(pk.vocab_chunk_targets(10, 32), vec![7, 8, 9]);
    }

    #[test]
    fn logit_chunk_rows_follow_the_vocabulary() {
        // A whole vocabulary: 2^25 logits rounded to a multiple of 128 rows in [128, 1024].
        assert_eq!(train_logit_chunk_rows(151_936, usize::MAX, 1 << 20), 256);
        assert_eq!(train_logit_chunk_rows(128_256, 128_256, 1 << 20), 256);
        assert_eq!(train_logit_chunk_rows(32_000, usize::MAX, 1 << 20), 1024);
        assert_eq!(train_logit_chunk_rows(1_000_000, usize::MAX, 1 << 20), 128);
        // A split one keeps 1024 rows; never more rows than tokens.
        assert_eq!(train_logit_chunk_rows(151_936, 32_768, 1 << 20), 1024);
        assert_eq!(train_logit_chunk_rows(151_936, usize::MAX, 100), 100);
        assert_eq!(train_logit_chunk_rows(512, 512, 0), 1);
    }

    #[test]
    fn train_plan_fits_the_issue_targets() {
        // Qwen2.5-0.5B, 64 × 384 tokens, r = 16 on every projection, layer recompute: the
        // step's buffers plus the bf16 weights must leave room under the 10 GiB target.
        let c = ModelConfig::preset("qwen2.5-0.5b").unwrap();
        let n = LoraWeights::init(all_linear(16), &c, 0).num_params();
        let p = TrainPlan::new(
            &c,
            64 * 384,
            64,
            64 * 256,
            n,
            16,
            Recompute::Layer,
            false,
            TRAIN_VOCAB_CHUNK,
        );
        let weights = bf16_weight_bytes(&c);
        let total = p.total_bytes() + weights;
        assert!(total < 8 << 30, "0.5B plan {:.2} GiB", gib(total));
        // LoRA dropout adds one x̃ of the widest projection input (I = 4864 here), bf16.
        let with_dropout = TrainPlan::new(
            &c,
            64 * 384,
            64,
            64 * 256,
            n,
            16,
            Recompute::Layer,
            true,
            TRAIN_VOCAB_CHUNK,
        );
        assert_eq!(
            with_dropout.total_bytes() - p.total_bytes(),
            64 * 384 * c.intermediate_size * 2
        );
        assert!(with_dropout.total_bytes() + weights < 8 << 30);
        // Without recompute the activations of 24 layers exceed it (the switch matters).
        let all = TrainPlan::new(
            &c,
            64 * 384,
            64,
            64 * 256,
            n,
            16,
            Recompute::None,
            false,
            TRAIN_VOCAB_CHUNK,
        );
        assert!(all.activation_bytes > 10 * p.activation_bytes);
        // The lm_head chunk: the whole 151,936-token vocabulary × 256 rows (the loss and the
        // lm_head backward then run in the forward), no larger than the split default it
        // replaced (1024 rows × 32,768 columns: 201 MB of logits and dlogits).
        assert!(p.head_in_forward);
        assert_eq!((p.chunk_rows, p.vocab_chunk), (256, c.vocab_size));
        assert!(p.chunk_rows * p.vocab_chunk * 6 < 240_000_000);
        let split = TrainPlan::new(&c, 64 * 384, 64, 64 * 256, n, 16, Recompute::Layer, false, 32_768);
        assert!(!split.head_in_forward);
        assert_eq!((split.chunk_rows, split.vocab_chunk), (1024, 32_768));
        // Qwen2.5-1.5B under 16 GiB.
        let c = ModelConfig::preset("qwen2.5-1.5b").unwrap();
        let n = LoraWeights::init(all_linear(16), &c, 0).num_params();
        let p = TrainPlan::new(
            &c,
            64 * 384,
            64,
            64 * 256,
            n,
            16,
            Recompute::Layer,
            false,
            TRAIN_VOCAB_CHUNK,
        );
        let total = p.total_bytes() + bf16_weight_bytes(&c);
        assert!(total < 14 << 30, "1.5B plan {:.2} GiB", gib(total));
    }

    #[test]
    fn fit_layout_prefers_micro_batches_then_recompute() {
        let c = ModelConfig::preset("qwen2.5-0.5b").unwrap();
        let nl = c.num_hidden_layers;
        let n = LoraWeights::init(all_linear(16), &c, 0).num_params();
        // 64 sequences of `len` tokens (the last 2/3 scored), cut as the layout says.
        let c = &c;
        let plan_of = |len: usize| {
            move |l: StepLayout| {
                TrainPlan::new(
                    c,
                    l.micro_batch_seqs * len,
                    l.micro_batch_seqs,
                    l.micro_batch_seqs * len * 2 / 3,
                    n,
                    16,
                    l.recompute,
                    false,
                    TRAIN_VOCAB_CHUNK,
                )
                .keeping_last_layers(nl, l.keep_layers)
            }
        };
        let layout = |micro_batch_seqs, recompute, keep_layers| StepLayout {
            micro_batch_seqs,
            recompute,
            keep_layers,
        };
        let under = |b: usize| move |p: &TrainPlan| p.total_bytes() <= b;
        let none64 = layout(64, Recompute::None, 0);
        // No cap: the requested layout.
        let (l, _) = fit_layout(none64, nl, plan_of(384), |_| true).unwrap();
        assert_eq!(l, none64);
        // The issue's 0.5B step in 10 GiB with the weights: no recompute in micro-batches of 16
        // (32 need 10.7 GiB of activations alone).
        let budget = (10usize << 30) - bf16_weight_bytes(c);
        let (l, p) = fit_layout(none64, nl, plan_of(384), under(budget)).unwrap();
        eprintln!(
            "0.5B × 64 × 384 in 10 GiB: {l:?}, plan {:.2} GiB",
            gib(p.total_bytes())
        );
        assert_eq!(l, layout(16, Recompute::None, 0));
        assert!(p.total_bytes() <= budget && p.max_rows == 16 * 384);
        assert!(plan_of(384)(layout(32, Recompute::None, 0)).total_bytes() > budget);
        // Short sequences: halving 64 × 32 rows would go under MIN_MICRO_BATCH_ROWS, so the
        // fallback recomputes layers at the whole batch, keeping as many as fit.
        let short = plan_of(32);
        let all = short(none64).total_bytes();
        let (l, p) = fit_layout(none64, nl, short, under(all - 1)).unwrap();
        assert_eq!(l, layout(64, Recompute::Layer, nl - 2));
        assert!(p.total_bytes() < all);
        // Layer recompute keeping 6 requested, a byte short: 5 kept, not smaller micro-batches.
        let keep6 = layout(64, Recompute::Layer, 6);
        let b6 = plan_of(384)(keep6).total_bytes();
        let (l, _) = fit_layout(keep6, nl, plan_of(384), under(b6 - 1)).unwrap();
        assert_eq!(l, layout(64, Recompute::Layer, 5));
        // Under every whole-batch layout: halved micro-batches, layer recompute.
        let least64 = plan_of(384)(layout(64, Recompute::Layer, 0)).total_bytes();
        let (l, p) = fit_layout(keep6, nl, plan_of(384), under(least64 - 1)).unwrap();
        assert_eq!((l.micro_batch_seqs, l.recompute), (32, Recompute::Layer));
        assert!(l.keep_layers <= 6 && p.total_bytes() < least64);
        // Nothing fits: the smallest plan (one sequence, every layer recomputed) comes back.
        let smallest = fit_layout(none64, nl, plan_of(384), under(1 << 20)).unwrap_err();
        assert_eq!((smallest.max_seqs, smallest.kept_layers), (1, 0));
        // Qwen2.5-1.5B in 16 GiB with its weights: still no recompute, in micro-batches of 16
        // (12.7 GiB: tight, with the CUDA context and cuBLAS's workspace to add; a 12 GiB cap
        // gives micro-batches of 8).
        let c = &ModelConfig::preset("qwen2.5-1.5b").unwrap();
        let n = LoraWeights::init(all_linear(16), c, 0).num_params();
        let plan15 = |l: StepLayout| {
            TrainPlan::new(
                c,
                l.micro_batch_seqs * 384,
                l.micro_batch_seqs,
                l.micro_batch_seqs * 256,
                n,
                16,
                l.recompute,
                false,
                TRAIN_VOCAB_CHUNK,
            )
            .keeping_last_layers(c.num_hidden_layers, l.keep_layers)
        };
        let budget = (16usize << 30) - bf16_weight_bytes(c);
        let (l, p) = fit_layout(none64, c.num_hidden_layers, plan15, under(budget)).unwrap();
        eprintln!(
            "1.5B × 64 × 384 in 16 GiB: {l:?}, plan {:.2} GiB",
            gib(p.total_bytes())
        );
        assert_eq!(l, layout(16, Recompute::None, 0));
        let (l, _) = fit_layout(none64, c.num_hidden_layers, plan15, under(12 << 30)).unwrap();
        assert_eq!(l, layout(8, Recompute::None, 0));
    }

    #[test]
    fn kept_layers_map_to_activation_sets() {
        let c = ModelConfig::preset("qwen2.5-0.5b").unwrap();
        let nl = c.num_hidden_layers;
        let plan = |recompute, keep| {
            TrainPlan::new(
                &c,
                64 * 384,
                64,
                64 * 256,
                1000,
                16,
                recompute,
                false,
                TRAIN_VOCAB_CHUNK,
            )
            .keeping_last_layers(nl, keep)
        };
        let layer = plan(Recompute::Layer, 0);
        assert_eq!((layer.kept_layers, layer.saved_layers), (0, 1));
        assert!((0..nl).all(|l| layer.act_slot(l, nl) == 0));
        assert_eq!(layer.scratch_slot(nl), 0);
        // Keep 5: layers 19..23 in sets 0..4, the rest in the scratch set 5.
        let five = plan(Recompute::Layer, 5);
        assert_eq!((five.kept_layers, five.saved_layers), (5, 6));
        assert_eq!(
            (0..nl).map(|l| five.act_slot(l, nl)).collect::<Vec<_>>(),
            [vec![5; 19], vec![0, 1, 2, 3, 4]].concat()
        );
        assert_eq!(five.scratch_slot(nl), 5);
        assert_eq!(
            five.activation_bytes - layer.activation_bytes,
            5 * layer.layer_act_bytes
        );
        // Keeping every layer is no recompute; no recompute ignores the count.
        let none = plan(Recompute::None, 0);
        assert_eq!(plan(Recompute::Layer, nl).activation_bytes, none.activation_bytes);
        assert_eq!(plan(Recompute::Layer, nl + 3).saved_layers, nl);
        assert_eq!((none.kept_layers, none.saved_layers), (nl, nl));
        assert!((0..nl).all(|l| none.act_slot(l, nl) == l));
        // The issue's 0.5B step: how many layers fit under 10 GiB with the weights (0.96 GB a
        // layer at 64 × 384 rows).
        let weights = bf16_weight_bytes(&c);
        let fit = (0..=nl)
            .take_while(|&k| plan(Recompute::Layer, k).total_bytes() + weights <= 10 << 30)
            .last()
            .unwrap();
        eprintln!(
            "0.5B: {:.2} GiB a layer, {fit} layers kept fit in 10 GiB",
            gib(layer.layer_act_bytes)
        );
        assert!(fit >= 4, "{fit}");
    }

    #[test]
    fn flat_weights_follow_weight_params_order() {
        // Qwen2 (q/k/v biases, tied embeddings), and with q/k norms and an lm_head of its own:
        // every range holds the tensor weight_params puts there.
        for (preset, qwen3_like) in [("qwen2.5-0.5b", false), ("qwen2.5-0.5b", true)] {
            let mut c = ModelConfig::preset(preset).unwrap();
            c.num_hidden_layers = 2;
            c.vocab_size = 50;
            c.qk_norm = qwen3_like;
            c.tie_word_embeddings = !qwen3_like;
            let w = Weights::random(&c, 3, 0.02);
            let flat = FlatWeights::of(&w);
            let host = crate::trainer::weight_params(&w).concat();
            assert_eq!(flat.len, host.len());
            let lw = &w.layers[1];
            let lr = &flat.layers[1];
            assert_eq!(&host[flat.embed.clone()], &w.embed[..]);
            assert_eq!(&host[lr.input_norm.clone()], &lw.input_norm[..]);
            assert_eq!(&host[lr.proj[Proj::K as usize].w.clone()], &lw.k.w[..]);
            assert_eq!(&host[lr.post_norm.clone()], &lw.post_norm[..]);
            assert_eq!(&host[lr.proj[Proj::Down as usize].w.clone()], &lw.down.w[..]);
            assert_eq!(&host[flat.final_norm.clone()], &w.final_norm[..]);
            match (&lr.proj[Proj::V as usize].b, &lw.v.b) {
                (Some(r), Some(b)) => assert_eq!(&host[r.clone()], &b[..]),
                (None, None) => {}
                _ => panic!("{preset}: v bias layout"),
            }
            match (&lr.q_norm, &lw.q_norm) {
                (Some(r), Some(q)) => assert_eq!(&host[r.clone()], &q[..]),
                (None, None) => {}
                _ => panic!("{preset}: q norm layout"),
            }
            assert_eq!(flat.lm_head.is_none(), c.tie_word_embeddings);
            assert_eq!(flat.lm_head_grad(), flat.lm_head.as_ref().unwrap_or(&flat.embed));
            assert_eq!(split_sizes(&host, &flat.sizes).concat(), host);
        }
    }

    #[test]
    fn full_fine_tuning_plan_counts_its_state() {
        // Qwen2.5-0.5B: 494M parameters × 16 B of f32 state (weights, grads, m, v) ≈ 7.4 GiB,
        // next to its 1 GB of bf16 weights: fits an 80 GB GPU with the step's buffers.
        let c = ModelConfig::preset("qwen2.5-0.5b").unwrap();
        let params = bf16_weight_bytes(&c) / 2;
        let p = TrainPlan::new_full(
            &c,
            64 * 384,
            64,
            64 * 256,
            params,
            Recompute::Layer,
            TRAIN_VOCAB_CHUNK,
        );
        assert_eq!(p.lora_bytes, 0);
        assert!(p.full_bytes >= 16 * params && p.full_bytes < 16 * params + (1 << 20));
        assert!(p.norm_partials >= rmsnorm_bwd_partials_len(64 * 384, c.hidden_size));
        let gb = gib(p.total_bytes() + bf16_weight_bytes(&c));
        assert!(gb < 20.0, "0.5B full fine-tuning plan {gb:.2} GiB");
        // The LoRA plan of the same batch has none of it.
        let l = TrainPlan::new(
            &c,
            64 * 384,
            64,
            64 * 256,
            1000,
            16,
            Recompute::Layer,
            false,
            TRAIN_VOCAB_CHUNK,
        );
        assert_eq!((l.full_bytes, l.full_params, l.norm_partials), (0, 0, 0));
    }

    #[test]
    fn flat_lora_follows_lora_params_order() {
        let c = ModelConfig::preset("qwen2.5-0.5b").unwrap();
        let mut c = c;
        c.num_hidden_layers = 2;
        let lora = LoraWeights::new_random(all_linear(2), &c, 1, 0.1, 0.1);
        let flat = FlatLora::of(&lora);
        let host = FlatLora::flatten(&lora);
        assert_eq!(flat.len, host.len());
        let pr = flat.pair(1, Proj::Up).unwrap();
        let pair = lora.pair(1, Proj::Up).unwrap();
        assert_eq!(&host[pr.a.clone()], &pair.a[..]);
        assert_eq!(&host[pr.b.clone()], &pair.b[..]);
        let parts = split_sizes(&host, &flat.sizes);
        assert_eq!(parts.concat(), host);
    }
}
