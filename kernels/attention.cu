// Causal GQA attention over a paged bf16 KV cache, for rollouts (decode and prefill).
//
// KV cache (per layer): k_cache, v_cache (num_pages, page_size, n_kv_heads, hd) bf16, and a
// block table (num_seqs, max_pages) i32: position t of sequence s lives in page
// block_table[s, t / page_size] at slot t % page_size. A contiguous per-sequence cache
// (num_seqs, T_max, n_kv_heads, hd) is the case page_size = T_max, block_table[s, 0] = s; paging
// lets the G samples of a prompt share the prompt's full pages.
//
// A query at position p attends positions [start, p] of its own sequence, start = 0, or
// p + 1 - window with a sliding window (Mistral), as src/cpu/model.rs::attend. Scores
// q·k · scale with scale = 1/sqrt(hd) (passed in, computed on the host in f32 as the CPU does),
// softmax and the weighted sum of v in f32 (online softmax), output rounded to bf16 once.
// Query head h reads kv head h / (n_heads / n_kv_heads) (GQA).
//
// Kernels:
//   kv_cache_append_bf16          writes new rows' k, v into the cache at (seq, pos)
//   attention_decode_hd{64,128,256}_bf16
//                                 one query per sequence at position len-1 (its newest token,
//                                 already appended), flash-decoding over FIXED partitions of
//                                 part_size positions (grid = (sequence, kv head [× sub-group of
//                                 ≤ 8 query heads], partition index)), on tensor cores: the
//                                 group's query heads are the rows of mma.sync m16n8k16, k and v
//                                 come 16 positions at a time through shared memory (cp.async).
//                                 For hd % 8 == 0, hd ≤ 64 / 128 / 256. A sequence with one
//                                 partition is written out directly; one with more writes f32
//                                 partials, and the last of its partition blocks to finish merges
//                                 them (log-sum-exp rescaling, partitions in index order) into
//                                 the bf16 output
//   attention_decode_simt_bf16    the same on CUDA cores (a warp per position), for head dims
//                                 that are not a multiple of 8 (tiny test models)
//
// Batch invariance of decode: how a sequence's positions are partitioned, the order every sum
// runs in, and which kernel writes its output depend only on its own length (and the window),
// never on the other sequences of the batch or on the grid (grid.z only has to cover the
// longest sequence; partitions past a sequence's end exit at once). So a sequence's output is
// bit-identical whether it is decoded alone or in any batch, and a grid sized for the memory
// plan's longest sequence (a CUDA graph) gives the same bits as one sized for the step.
//   attention_prefill_bf16        many queries per sequence (prompt tokens), tiled: 16 query
//                                 rows × 32 key positions per step through shared memory
//
// Rust launchers: src/cuda/rollout.rs (shapes, partitions, shared memory sizes).

#include "common.cuh"

#define ATTN_GMAX 8      // query heads handled per decode block (one kv head's group, or part)
#define ATTN_WARPS 4     // warps per block, decode and prefill
#define PREFILL_BQ 16    // query rows per prefill block (4 per warp)
#define PREFILL_BK 32    // key positions per prefill tile (one per lane)

// Element offset of (page-resolved position t, kv head) in a paged cache. The caller has
// bounded t to [0, max_pages·page_size).
static __device__ __forceinline__ size_t kv_offset(const int* __restrict__ block_table, int seq, int t,
                                                   int page_size, int max_pages, int n_kv_heads, int kvh,
                                                   int hd) {
    const int page = block_table[(size_t)seq * max_pages + t / page_size];
    return (((size_t)page * page_size + t % page_size) * n_kv_heads + kvh) * hd;
}

// ----------------------------------------------------------------------------
// KV append

// k_cache/v_cache[(seq, pos)] = k_new/v_new[row]: k_new, v_new (rows, n_kv_heads, hd);
// row_seq, row_pos (rows) i32. A row whose pos is outside [0, max_pages·page_size) is skipped.
// grid = rows, block strides over n_kv_heads·hd.
extern "C" __global__ void kv_cache_append_bf16(bf16* __restrict__ k_cache, bf16* __restrict__ v_cache,
                                                const bf16* __restrict__ k_new, const bf16* __restrict__ v_new,
                                                const int* __restrict__ block_table,
                                                const int* __restrict__ row_seq, const int* __restrict__ row_pos,
                                                int rows, int n_kv_heads, int hd, int page_size, int max_pages) {
    const int r = blockIdx.x;
    if (r >= rows) return;
    const int seq = row_seq[r];
    const int pos = row_pos[r];
    if (pos < 0 || pos >= page_size * max_pages) return;
    const size_t dst = kv_offset(block_table, seq, pos, page_size, max_pages, n_kv_heads, 0, hd);
    const int width = n_kv_heads * hd;
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        k_cache[dst + i] = k_new[(size_t)r * width + i];
        v_cache[dst + i] = v_new[(size_t)r * width + i];
    }
}

// ----------------------------------------------------------------------------
// Decode (flash-decoding)

// Lane `lane` holds dims [lane·E, lane·E + E) of a head (E = ceil(hd/32) rounded to 1, 2, 4, 8);
// dims ≥ hd read as 0. When hd == 32·E the E values are one aligned vector load (the launcher
// checks the cache buffers are 16-byte aligned; offsets are multiples of hd, so of E).
template <int E>
static __device__ __forceinline__ void load_head_slice(const bf16* __restrict__ row, int lane, int hd,
                                                       float (&x)[E]) {
    const int d0 = lane * E;
    if (hd == WARP_SIZE * E) {
        if constexpr (E == 1) {
            x[0] = bf16_to_f32(row[d0]);
        } else if constexpr (E == 2) {
            const __nv_bfloat162 v = *reinterpret_cast<const __nv_bfloat162*>(row + d0);
            x[0] = __low2float(v);
            x[1] = __high2float(v);
        } else if constexpr (E == 4) {
            const uint2 raw = *reinterpret_cast<const uint2*>(row + d0);
            const bf16* b = reinterpret_cast<const bf16*>(&raw);
#pragma unroll
            for (int e = 0; e < 4; ++e) x[e] = bf16_to_f32(b[e]);
        } else {
            const uint4 raw = *reinterpret_cast<const uint4*>(row + d0);
            const bf16* b = reinterpret_cast<const bf16*>(&raw);
#pragma unroll
            for (int e = 0; e < E; ++e) x[e] = bf16_to_f32(b[e]);
        }
    } else {
#pragma unroll
        for (int e = 0; e < E; ++e) x[e] = d0 + e < hd ? bf16_to_f32(row[d0 + e]) : 0.0f;
    }
}

// Partitions of a sequence's valid span [start, len): ceil((len - start) / part_size), at
// least 1 (a sequence of length 0 has one empty partition, whose output is 0). `len` is
// seq_lens[s] clamped to [0, cap], cap = page_size · max_pages; start = len - window under a
// sliding window that the sequence has outgrown, else 0. Every decode block of a sequence calls
// this, so they agree on its partitions (and on how many blocks the merge waits for).
static __device__ __forceinline__ int decode_num_parts(int len, int window, int part_size) {
    const int start = (window > 0 && len > window) ? len - window : 0;
    return max(1, CEIL_DIV(len - start, part_size));
}

// What a decode block works on: sequence s = blockIdx.x; the ≤ ATTN_GMAX query heads h0 ..
// h0 + gcount - 1 of kv head kvh (blockIdx.y = kvh · ceil(group / ATTN_GMAX) + sub-group);
// partition part = blockIdx.z of the sequence's nparts, covering positions [t0, t1).
struct DecodeBlock {
    int s, kvh, h0, gcount, part, max_parts, nparts, t0, t1;
};

// Fills `b`; returns false when the block has nothing to do (its partition is past the
// sequence's last, or the grid does not cover the sequence: then partition 0's block writes NaN
// to the heads' output, which the sampler rejects, instead of a silent wrong answer, and no
// block touches partials the caller did not size for). Block-uniform.
static __device__ __forceinline__ bool decode_block_setup(DecodeBlock& b, bf16* __restrict__ out,
                                                          const int* __restrict__ seq_lens, int n_heads,
                                                          int n_kv_heads, int hd, int page_size, int max_pages,
                                                          int window, int part_size) {
    b.s = blockIdx.x;
    const int group = n_heads / n_kv_heads;
    const int sub_groups = CEIL_DIV(group, ATTN_GMAX);
    b.kvh = blockIdx.y / sub_groups;
    const int sub = blockIdx.y % sub_groups;
    b.h0 = b.kvh * group + sub * ATTN_GMAX;
    b.gcount = min(ATTN_GMAX, group - sub * ATTN_GMAX);
    b.part = blockIdx.z;
    b.max_parts = gridDim.z;
    // Valid positions [start, len) of this sequence; this partition's share [t0, t1).
    const int len = min(max(seq_lens[b.s], 0), page_size * max_pages);
    const int start = (window > 0 && len > window) ? len - window : 0;
    b.nparts = decode_num_parts(len, window, part_size);
    if (b.nparts > b.max_parts) {
        // The grid does not cover this sequence (a launcher bug: max_len below a seq_len).
        if (b.part == 0) {
            for (int idx = threadIdx.x; idx < b.gcount * hd; idx += blockDim.x) {
                out[((size_t)b.s * n_heads + b.h0 + idx / hd) * hd + idx % hd] =
                    f32_to_bf16(__int_as_float(0x7fc00000));
            }
        }
        return false;
    }
    if (b.part >= b.nparts) return false;
    b.t0 = start + b.part * part_size;
    b.t1 = min(b.t0 + part_size, len);
    return true;
}

// The end of a decode block: merges the ATTN_WARPS warps' states, which the block has written to
// smem [ATTN_WARPS][ATTN_GMAX][hd + 2] f32 (per warp and head: acc[0..hd), m, l; a warp that saw
// no position has m = -inf, l = 0, acc = 0) and synchronised, in warp order, and writes either
// the normalized bf16 output (the sequence has one partition) or the unnormalized partial
// (acc, m, l) of partition `part`. In the second case the last of the sequence's nparts blocks
// of this head group to finish (counters[s · gridDim.y + blockIdx.y], reset to 0 by that block
// for the next launch or graph replay) combines the partials:
//   out[s, h, :] = Σ_i e^{m_i − M} acc_i / Σ_i e^{m_i − M} l_i over i = 0 .. nparts−1 in that
//   order, M = max m_i (a partition that saw no valid position has m = −inf, l = 0, acc = 0 and
//   drops out),
// whichever block that is: the order is fixed, so the result is too. (A second launch did this
// before; at 64 sequences it cost ~3.4 µs per layer.) All threads of the block call this.
static __device__ __forceinline__ void decode_merge_write(const float* __restrict__ smem, bf16* __restrict__ out,
                                                          float* __restrict__ part_o, float* __restrict__ part_ml,
                                                          unsigned* __restrict__ counters, int s, int h0,
                                                          int gcount, int n_heads, int hd, int nparts, int part,
                                                          int max_parts) {
    const int stride = hd + 2;
    for (int idx = threadIdx.x; idx < gcount * hd; idx += blockDim.x) {
        const int g = idx / hd;
        const int d = idx % hd;
        float mx = -INFINITY;
        for (int w = 0; w < ATTN_WARPS; ++w) mx = fmaxf(mx, smem[((size_t)w * ATTN_GMAX + g) * stride + hd]);
        float sum_l = 0.0f, sum_a = 0.0f;
        for (int w = 0; w < ATTN_WARPS; ++w) {
            const float* slot = smem + ((size_t)w * ATTN_GMAX + g) * stride;
            // A warp that saw no position has m = -inf and contributes nothing (also when all
            // did: then mx = -inf too and exp(-inf - -inf) would be NaN).
            const float wgt = slot[hd] == -INFINITY ? 0.0f : expf(slot[hd] - mx);
            sum_l += wgt * slot[hd + 1];
            sum_a += wgt * slot[d];
        }
        const int h = h0 + g;
        if (nparts == 1) {
            out[((size_t)s * n_heads + h) * hd + d] = f32_to_bf16(sum_l > 0.0f ? sum_a / sum_l : 0.0f);
        } else {
            const size_t pi = ((size_t)s * n_heads + h) * max_parts + part;
            part_o[pi * hd + d] = sum_a;
            if (d == 0) {
                part_ml[pi * 2] = mx;
                part_ml[pi * 2 + 1] = sum_l;
            }
        }
    }
    if (nparts == 1) return;
    __shared__ int dec_last;
    __threadfence();  // this block's partials are visible device-wide before it counts itself
    __syncthreads();
    unsigned* const count = counters + (size_t)s * gridDim.y + blockIdx.y;
    if (threadIdx.x == 0) dec_last = atomicAdd(count, 1u) == (unsigned)(nparts - 1);
    __syncthreads();
    if (!dec_last) return;
    __threadfence();  // the partials of the blocks counted before are visible to this one
    for (int idx = threadIdx.x; idx < gcount * hd; idx += blockDim.x) {
        const int d = idx % hd;
        const size_t r = (size_t)s * n_heads + h0 + idx / hd;
        const float* ml = part_ml + r * max_parts * 2;
        float mx = -INFINITY;
        for (int i = 0; i < nparts; ++i) mx = fmaxf(mx, __ldcg(ml + 2 * i));
        float sum_l = 0.0f, sum_a = 0.0f;
        for (int i = 0; i < nparts; ++i) {
            const float m_i = __ldcg(ml + 2 * i);
            const float wgt = m_i == -INFINITY ? 0.0f : expf(m_i - mx);
            sum_l += wgt * __ldcg(ml + 2 * i + 1);
            sum_a += wgt * __ldcg(part_o + (r * max_parts + i) * hd + d);
        }
        out[r * hd + d] = f32_to_bf16(sum_l > 0.0f ? sum_a / sum_l : 0.0f);
    }
    if (threadIdx.x == 0) *count = 0;
}

// One block = (sequence s = blockIdx.x, a group of ≤ ATTN_GMAX query heads sharing kv head kvh
// = blockIdx.y, partition p = blockIdx.z). Partition p of s covers positions
// [start + p·part_size, min(start + (p+1)·part_size, len)); a block whose p is past the
// sequence's last partition returns at once. Warp w walks positions t0 + w, t0 + w +
// ATTN_WARPS, ... of the partition: it loads k and v of position t once for all the group's
// heads, reduces each q·k over the warp, and keeps an online softmax (m, l, acc) per head. The
// warps' states are merged in shared memory in warp order; the block then writes either the
// normalized output (the sequence has one partition) or its unnormalized partial (acc, m, l)
// that the last partition block merges (more than one).
//
// Dynamic shared memory: ATTN_WARPS · ATTN_GMAX · (hd + 2) floats.
template <int E>
static __device__ void attention_decode_block(bf16* __restrict__ out, float* __restrict__ part_o,
                                              float* __restrict__ part_ml, unsigned* __restrict__ counters,
                                              const bf16* __restrict__ q,
                                              const bf16* __restrict__ k_cache, const bf16* __restrict__ v_cache,
                                              const int* __restrict__ block_table, const int* __restrict__ seq_lens,
                                              int n_heads, int n_kv_heads, int hd, int page_size, int max_pages,
                                              int window, int part_size, float scale) {
    extern __shared__ float attn_smem[];
    const int lane = threadIdx.x % WARP_SIZE;
    const int warp = threadIdx.x / WARP_SIZE;
    DecodeBlock blk;
    if (!decode_block_setup(blk, out, seq_lens, n_heads, n_kv_heads, hd, page_size, max_pages, window, part_size)) {
        return;  // whole block, before any barrier
    }
    const int s = blk.s, h0 = blk.h0, gcount = blk.gcount, kvh = blk.kvh, part = blk.part;
    const int max_parts = blk.max_parts, nparts = blk.nparts, t0 = blk.t0, t1 = blk.t1;

    float qr[ATTN_GMAX][E];
    float m[ATTN_GMAX], l[ATTN_GMAX], acc[ATTN_GMAX][E];
#pragma unroll
    for (int g = 0; g < ATTN_GMAX; ++g) {
        if (g < gcount) {
            load_head_slice<E>(q + ((size_t)s * n_heads + h0 + g) * hd, lane, hd, qr[g]);
        } else {
#pragma unroll
            for (int e = 0; e < E; ++e) qr[g][e] = 0.0f;
        }
        m[g] = -INFINITY;
        l[g] = 0.0f;
#pragma unroll
        for (int e = 0; e < E; ++e) acc[g][e] = 0.0f;
    }

    // Unrolled by 2 so a warp has the next position's k/v loads in flight while it reduces
    // this one's (the order of the online-softmax updates is unchanged).
#pragma unroll 2
    for (int t = t0 + warp; t < t1; t += ATTN_WARPS) {
        const size_t off = kv_offset(block_table, s, t, page_size, max_pages, n_kv_heads, kvh, hd);
        float kx[E], vx[E];
        load_head_slice<E>(k_cache + off, lane, hd, kx);
        load_head_slice<E>(v_cache + off, lane, hd, vx);
        float dot[ATTN_GMAX];
#pragma unroll
        for (int g = 0; g < ATTN_GMAX; ++g) {
            dot[g] = 0.0f;
#pragma unroll
            for (int e = 0; e < E; ++e) dot[g] += qr[g][e] * kx[e];
        }
        // All groups' butterflies interleaved (independent shuffles in flight).
#pragma unroll
        for (int offset = WARP_SIZE / 2; offset > 0; offset >>= 1) {
#pragma unroll
            for (int g = 0; g < ATTN_GMAX; ++g) dot[g] += __shfl_xor_sync(FULL_MASK, dot[g], offset);
        }
#pragma unroll
        for (int g = 0; g < ATTN_GMAX; ++g) {
            if (g < gcount) {
                const float sc = dot[g] * scale;
                const float m_new = fmaxf(m[g], sc);
                const float corr = expf(m[g] - m_new);  // m = -inf at first: 0
                const float p = expf(sc - m_new);
                l[g] = l[g] * corr + p;
#pragma unroll
                for (int e = 0; e < E; ++e) acc[g][e] = acc[g][e] * corr + p * vx[e];
                m[g] = m_new;
            }
        }
    }

    // Merge the warps: smem [ATTN_WARPS][ATTN_GMAX][hd + 2] = acc..., m, l.
    const int stride = hd + 2;
#pragma unroll
    for (int g = 0; g < ATTN_GMAX; ++g) {
        float* slot = attn_smem + ((size_t)warp * ATTN_GMAX + g) * stride;
#pragma unroll
        for (int e = 0; e < E; ++e) {
            if (lane * E + e < hd) slot[lane * E + e] = acc[g][e];
        }
        if (lane == 0) {
            slot[hd] = m[g];
            slot[hd + 1] = l[g];
        }
    }
    __syncthreads();
    decode_merge_write(attn_smem, out, part_o, part_ml, counters, s, h0, gcount, n_heads, hd, nparts, part,
                       max_parts);
}

// q (num_seqs, n_heads, hd) bf16: each sequence's newest token, at position seq_lens[s] - 1,
// whose k and v are already in the cache. seq_lens (num_seqs) i32; a length of 0 gives a zero
// output. out (num_seqs, n_heads, hd) bf16, written by the partition's block for sequences of
// one partition; for the others part_o (num_seqs, n_heads, max_parts, hd) f32 and part_ml
// (num_seqs, n_heads, max_parts, 2) f32 receive partitions 0..nparts-1 and the last of their
// blocks writes out (decode_merge_write), counting in counters (num_seqs, gridDim.y) u32, zero
// before the launch and after it. window 0 = no sliding window. grid = (num_seqs, n_kv_heads · ceil(group / ATTN_GMAX),
// max_parts) with max_parts ≥ every sequence's partition count, block = ATTN_WARPS·32, dynamic
// shared memory ATTN_WARPS·ATTN_GMAX·(hd+2)·4 bytes. hd ≤ 256, even.
extern "C" __global__ void __launch_bounds__(ATTN_WARPS * WARP_SIZE)
    attention_decode_simt_bf16(bf16* __restrict__ out, float* __restrict__ part_o, float* __restrict__ part_ml,
                          unsigned* __restrict__ counters, const bf16* __restrict__ q, const bf16* __restrict__ k_cache,
                          const bf16* __restrict__ v_cache, const int* __restrict__ block_table,
                          const int* __restrict__ seq_lens, int n_heads, int n_kv_heads, int hd,
                          int page_size, int max_pages, int window, int part_size, float scale) {
    if (hd <= 32) {
        attention_decode_block<1>(out, part_o, part_ml, counters, q, k_cache, v_cache, block_table, seq_lens, n_heads,
                                  n_kv_heads, hd, page_size, max_pages, window, part_size, scale);
    } else if (hd <= 64) {
        attention_decode_block<2>(out, part_o, part_ml, counters, q, k_cache, v_cache, block_table, seq_lens, n_heads,
                                  n_kv_heads, hd, page_size, max_pages, window, part_size, scale);
    } else if (hd <= 128) {
        attention_decode_block<4>(out, part_o, part_ml, counters, q, k_cache, v_cache, block_table, seq_lens, n_heads,
                                  n_kv_heads, hd, page_size, max_pages, window, part_size, scale);
    } else {
        attention_decode_block<8>(out, part_o, part_ml, counters, q, k_cache, v_cache, block_table, seq_lens, n_heads,
                                  n_kv_heads, hd, page_size, max_pages, window, part_size, scale);
    }
}

// ----------------------------------------------------------------------------
// Decode on tensor cores (hd % 8 == 0): attention_decode_hd{64,128,256}_bf16.
//
// The ≤ 8 query heads of a block are rows 0..7 of the M = 16 rows of mma.sync m16n8k16 (bf16 in,
// f32 accumulate; rows 8..15 are zero and never stored), as FlashInfer's GQA decode does: for 16
// positions at a time, S (16 × 16) = Q Kᵀ, then O (16 × HD) += P V. Warp w of the block's 4
// takes the partition's 16-position steps w, w + 4, w + 8, ... (positions t0 + 16·step + 0..15):
// its lanes copy the step's 16 k rows and 16 v rows (hd bf16 each, from wherever the block table
// puts them) into the warp's own shared slots with 16-byte cp.async (rows past t1 zero-filled).
// A warp has 2 slots (1 at HD 256), so with 128-position partitions (2 steps per warp) all of a
// block's k and v are requested at its start; k and v are separate groups, so the scores start
// when k has landed, and a slot's next k / v are requested as soon as it is read. Per step and
// head (a row, held by the 4 lanes of a quad): scores · scale, masked past t1, one max over the
// 16 positions (2 quad shuffles), the online softmax rescale of (m, l, O), p = exp(s - m) in
// f32. P enters the P·V product as bf16 twice, hi = bf16(p) and lo = bf16(p - hi) (two mma,
// O += hi·V + lo·V), so the weights carry ~16 significant bits instead of bf16's 8 (2^-17
// relative instead of 2^-9: a single bf16 P puts ~12 % of the outputs of the decode tests
// outside their tolerance, atol 2e-5 + 2^-8 relative, errors up to ~4e-4 on outputs of ~0.004
// from flat softmaxes over 300 positions); the extra mma are cheap here: HD/8 + HD/4 per 16
// positions (24 at HD 64, ~4 µs of H100 tensor time for 1024 sequences × 2 kv heads × 200
// positions against 25 µs of DRAM time for their k and v). l sums the f32 p. The 4 warps' (O, m, l) are merged in warp order by decode_merge_write, as
// in the CUDA-core kernel, and every sum runs in an order fixed by the sequence's own length
// and window (batch invariance as above).
//
// Compiled for HD = 64, 128, 256; runs any hd ≤ HD with hd % 8 == 0 (k columns hd..HD-1 zero in
// shared memory, q columns zero in registers). Shared memory: per warp and slot k and v of 16
// positions, rows of HD + 8 bf16 (the 16-byte pad puts the 8 rows an ldmatrix reads in distinct
// banks); the merge reuses them. Dynamic shared memory DECODE_MMA_SMEM(HD) = ATTN_WARPS ·
// slots · 2 · 16 · (HD + 8) · 2 bytes: 36 KiB at HD 64, 68 KiB at 128, 66 KiB at 256 (the
// launcher opts in above 48 KiB).

#define DEC_PW 16  // positions per warp step (the n of S, the k of P·V)
// Steps whose k and v a warp has in flight or resident at once: 2 up to HD 128, 1 at 256.
#define DEC_SLOTS(HD) ((HD) <= 128 ? 2 : 1)
#define DECODE_MMA_SMEM(HD) (ATTN_WARPS * DEC_SLOTS(HD) * 2 * DEC_PW * ((HD) + 8) * 2)

// d0, d1 += (row g of a 16×16 A whose rows 8..15 are zero) · b: mma.m16n8k16, lane = 4g + t,
// a0 = A(g, 2t..2t+1), a2 = A(g, 2t+8..2t+9), b0 = B(2t..2t+1, g), b1 = B(2t+8..2t+9, g);
// d0, d1 = C(g, 2t..2t+1) (rows g + 8 of C are zero and dropped).
static __device__ __forceinline__ void dec_mma(float& d0, float& d1, uint32_t a0, uint32_t a2, uint32_t b0,
                                               uint32_t b1) {
    float z2, z3;
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %5}, {%7, %8}, "
        "{%0, %1, %9, %9};\n"
        : "+f"(d0), "+f"(d1), "=f"(z2), "=f"(z3)
        : "r"(a0), "r"(0u), "r"(a2), "r"(b0), "r"(b1), "f"(0.0f));
}

// ldmatrix .x4 (.trans): lane L gives the address of row L % 8 of 8×8 matrix L / 8 (16-byte
// aligned); register i receives the lane's pair of matrix i: (row g, cols 2t, 2t+1), or with
// .trans (rows 2t, 2t+1, col g).
static __device__ __forceinline__ void dec_ldsm_x4(uint32_t (&r)[4], const bf16* p) {
    const uint32_t addr = (uint32_t)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

static __device__ __forceinline__ void dec_ldsm_x4_trans(uint32_t (&r)[4], const bf16* p) {
    const uint32_t addr = (uint32_t)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// 16 bytes global → shared, asynchronous; the first src_bytes (0 or 16) are copied, the rest of
// the 16 zero-filled (src_bytes = 0 reads nothing).
static __device__ __forceinline__ void dec_cp_async16(bf16* smem, const bf16* gmem, int src_bytes) {
    const uint32_t addr = (uint32_t)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(gmem), "r"(src_bytes)
                 : "memory");
}
static __device__ __forceinline__ void dec_cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most the N newest committed groups of this thread are in flight.
template <int N> static __device__ __forceinline__ void dec_cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

static __device__ __forceinline__ uint32_t dec_pack(bf16 lo, bf16 hi) {
    return (uint32_t)__bfloat16_as_ushort(lo) | ((uint32_t)__bfloat16_as_ushort(hi) << 16);
}

// Element offset of the k/v row of position base + lane (lanes 0..15) of kv head kvh, or -1 past
// t1 (lanes 16..31: -1).
static __device__ __forceinline__ long long dec_row_offset(const int* __restrict__ block_table, int s, int base,
                                                           int t1, int lane, int page_size, int max_pages,
                                                           int n_kv_heads, int kvh, int hd) {
    const int t = base + lane;
    return lane < DEC_PW && t < t1
               ? (long long)kv_offset(block_table, s, t, page_size, max_pages, n_kv_heads, kvh, hd)
               : -1ll;
}

// Starts copying the 16 rows (row r's offset in lane r's `off`) of `cache` into dst[16][HD + 8]:
// 16-byte chunk c = lane + 32j is row c / (HD/8), columns 8·(c % (HD/8)) ..+7 (chunks at or past
// hd are not copied: those columns were zeroed once).
template <int HD>
static __device__ __forceinline__ void dec_issue_rows(bf16* dst, const bf16* __restrict__ cache, long long off,
                                                      int lane, int hd) {
    constexpr int CPR = HD / 8;  // 16-byte chunks per row
#pragma unroll
    for (int j = 0; j < DEC_PW * CPR / WARP_SIZE; ++j) {
        const int c = lane + WARP_SIZE * j;
        const int row = c / CPR, col = (c % CPR) * 8;
        const long long ro = __shfl_sync(FULL_MASK, off, row);
        if (col < hd) dec_cp_async16(dst + row * (HD + 8) + col, ro >= 0 ? cache + ro + col : cache, ro >= 0 ? 16 : 0);
    }
}

template <int HD>
static __device__ void attention_decode_mma_block(bf16* __restrict__ out, float* __restrict__ part_o,
                                                  float* __restrict__ part_ml, unsigned* __restrict__ counters,
                                                  const bf16* __restrict__ q,
                                                  const bf16* __restrict__ k_cache, const bf16* __restrict__ v_cache,
                                                  const int* __restrict__ block_table,
                                                  const int* __restrict__ seq_lens, int n_heads, int n_kv_heads,
                                                  int hd, int page_size, int max_pages, int window, int part_size,
                                                  float scale) {
    constexpr int LD = HD + 8;   // shared row stride (bf16)
    constexpr int KT = HD / 16;  // k-steps of Q Kᵀ; also pairs of 8-column n-tiles of P V
    constexpr int NT = HD / 8;   // n-tiles of O
    extern __shared__ __align__(16) unsigned char dec_smem[];
    const int lane = threadIdx.x % WARP_SIZE;
    const int warp = threadIdx.x / WARP_SIZE;
    DecodeBlock blk;
    if (!decode_block_setup(blk, out, seq_lens, n_heads, n_kv_heads, hd, page_size, max_pages, window, part_size)) {
        return;  // whole block, before any barrier
    }
    const int s = blk.s, kvh = blk.kvh, t0 = blk.t0, t1 = blk.t1;
    constexpr int NS = DEC_SLOTS(HD);
    // This warp's slots: slot i = k rows [16][LD], then v rows [16][LD].
    bf16* const wbuf = reinterpret_cast<bf16*>(dec_smem) + warp * NS * 2 * DEC_PW * LD;
    const int g = lane / 4, tq = lane % 4;
    const int mat = lane / 8;  // the ldmatrix matrix whose row this lane addresses

    // Q as A fragments: row g = head h0 + g (zero for g ≥ gcount), columns ≥ hd zero.
    uint32_t qa[KT][2];
#pragma unroll
    for (int kk = 0; kk < KT; ++kk) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int col = kk * 16 + half * 8 + 2 * tq;
            qa[kk][half] = g < blk.gcount && col < hd
                               ? *reinterpret_cast<const uint32_t*>(q + ((size_t)s * n_heads + blk.h0 + g) * hd + col)
                               : 0u;
        }
    }
    // Columns hd..HD-1 of the k rows must be finite (they meet q's zero columns): zero them once.
    if (hd < HD) {
        for (int idx = lane; idx < NS * DEC_PW * (HD - hd); idx += WARP_SIZE) {
            const int r = idx / (HD - hd);  // row r % 16 of slot r / 16's k rows
            wbuf[((r / DEC_PW) * 2 * DEC_PW + r % DEC_PW) * LD + hd + idx % (HD - hd)] = f32_to_bf16(0.0f);
        }
    }

    float o[NT][2];
#pragma unroll
    for (int n = 0; n < NT; ++n) o[n][0] = o[n][1] = 0.0f;
    float m_run = -INFINITY;  // of row g (the same in the 4 lanes of the quad)
    float l_run = 0.0f;       // this lane's share of row g's sum (its positions 2tq, 2tq+1, 8+..)

    // The warp's steps are warp, warp + 4, ...: its j-th (j = 0, 1, ...) uses slot j % NS. Every
    // step commits one cp.async group for its k and one for its v, empty when there is nothing
    // to copy, so the groups are K(0), V(0), ..., K(NS-1), V(NS-1) from the prologue, then K(j+NS)
    // after step j's scores and V(j+NS) after its P·V: when step j waits for K(j), 2·NS - 1 newer
    // groups were committed, and as many when it waits for V(j).
    const int nsteps = CEIL_DIV(t1 - t0, DEC_PW);
#pragma unroll
    for (int j = 0; j < NS; ++j) {
        const int step = warp + j * ATTN_WARPS;
        bf16* kb = wbuf + j * 2 * DEC_PW * LD;
        long long off = -1;
        if (step < nsteps) {
            off = dec_row_offset(block_table, s, t0 + step * DEC_PW, t1, lane, page_size, max_pages, n_kv_heads, kvh, hd);
            dec_issue_rows<HD>(kb, k_cache, off, lane, hd);
        }
        dec_cp_async_commit();
        if (step < nsteps) dec_issue_rows<HD>(kb + DEC_PW * LD, v_cache, off, lane, hd);
        dec_cp_async_commit();
    }
    int cur = 0;  // this step's slot
    for (int step = warp; step < nsteps; step += ATTN_WARPS) {
        const int base = t0 + step * DEC_PW;
        const int next = step + NS * ATTN_WARPS;  // the step that reuses this slot
        bf16* const ks = wbuf + cur * 2 * DEC_PW * LD;
        bf16* const vs = ks + DEC_PW * LD;
        cur = cur + 1 == NS ? 0 : cur + 1;
        const long long noff = next < nsteps ? dec_row_offset(block_table, s, t0 + next * DEC_PW, t1, lane, page_size,
                                                              max_pages, n_kv_heads, kvh, hd)
                                             : -1ll;
        dec_cp_async_wait<2 * NS - 1>();  // K(step)
        __syncwarp();
        // S = Q Kᵀ: sc[nt][e] = row g, position 8·nt + 2tq + e of the step.
        float sc[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};
#pragma unroll
        for (int kk = 0; kk < KT; ++kk) {
            if (kk * 16 < hd) {
                uint32_t b[4];  // Kᵀ fragments: b0, b1 positions 0..7; b2, b3 positions 8..15
                dec_ldsm_x4(b, ks + ((mat >> 1) * 8 + lane % 8) * LD + kk * 16 + (mat & 1) * 8);
                dec_mma(sc[0][0], sc[0][1], qa[kk][0], qa[kk][1], b[0], b[1]);
                dec_mma(sc[1][0], sc[1][1], qa[kk][0], qa[kk][1], b[2], b[3]);
            }
        }
        __syncwarp();  // every lane has read ks: the next step's k may land there
        if (next < nsteps) dec_issue_rows<HD>(ks, k_cache, noff, lane, hd);
        dec_cp_async_commit();

        // Online softmax of row g over this step's positions (past t1: -inf, weight 0).
        float mx = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int t = base + nt * 8 + 2 * tq + e;
                sc[nt][e] = t < t1 ? sc[nt][e] * scale : -INFINITY;
                mx = fmaxf(mx, sc[nt][e]);
            }
        }
        mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 2));
        const float m_new = fmaxf(m_run, mx);    // finite: position base < t1 is valid
        const float corr = expf(m_run - m_new);  // m_run = -inf at first: 0
        m_run = m_new;
        uint32_t ph[2], pl[2];  // A fragments of P: hi and lo bf16 parts (positions 2tq.., 8+2tq..)
        float psum = 0.0f;
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
            const float p0 = expf(sc[nt][0] - m_new), p1 = expf(sc[nt][1] - m_new);
            psum += p0 + p1;
            const bf16 h0b = f32_to_bf16(p0), h1b = f32_to_bf16(p1);
            ph[nt] = dec_pack(h0b, h1b);
            pl[nt] = dec_pack(f32_to_bf16(p0 - bf16_to_f32(h0b)), f32_to_bf16(p1 - bf16_to_f32(h1b)));
        }
        l_run = l_run * corr + psum;
#pragma unroll
        for (int n = 0; n < NT; ++n) {
            o[n][0] *= corr;
            o[n][1] *= corr;
        }

        dec_cp_async_wait<2 * NS - 1>();  // V(step) (later steps' k, v may still be in flight)
        __syncwarp();
        // O += P V: V fragments for columns 16·kk .. 16·kk + 15 through the transposing load.
#pragma unroll
        for (int kk = 0; kk < KT; ++kk) {
            if (kk * 16 < hd) {
                uint32_t b[4];  // b0, b1 columns 16kk..+7; b2, b3 columns 16kk+8..+15
                dec_ldsm_x4_trans(b, vs + ((mat & 1) * 8 + lane % 8) * LD + kk * 16 + (mat >> 1) * 8);
                dec_mma(o[2 * kk][0], o[2 * kk][1], ph[0], ph[1], b[0], b[1]);
                dec_mma(o[2 * kk][0], o[2 * kk][1], pl[0], pl[1], b[0], b[1]);
                dec_mma(o[2 * kk + 1][0], o[2 * kk + 1][1], ph[0], ph[1], b[2], b[3]);
                dec_mma(o[2 * kk + 1][0], o[2 * kk + 1][1], pl[0], pl[1], b[2], b[3]);
            }
        }
        __syncwarp();  // every lane has read vs
        if (next < nsteps) dec_issue_rows<HD>(vs, v_cache, noff, lane, hd);
        dec_cp_async_commit();
    }
    l_run += __shfl_xor_sync(FULL_MASK, l_run, 1);
    l_run += __shfl_xor_sync(FULL_MASK, l_run, 2);
    dec_cp_async_wait<0>();  // (only empty groups remain) before the buffers are reused
    __syncthreads();

    // Merge: smem [ATTN_WARPS][ATTN_GMAX][hd + 2] f32 = O row, m, l.
    float* ms = reinterpret_cast<float*>(dec_smem);
    float* slot = ms + ((size_t)warp * ATTN_GMAX + g) * (hd + 2);
#pragma unroll
    for (int n = 0; n < NT; ++n) {
        const int d = n * 8 + 2 * tq;
        if (d < hd) {  // hd even: d + 1 < hd too
            slot[d] = o[n][0];
            slot[d + 1] = o[n][1];
        }
    }
    if (tq == 0) {
        slot[hd] = m_run;
        slot[hd + 1] = l_run;
    }
    __syncthreads();
    decode_merge_write(ms, out, part_o, part_ml, counters, s, blk.h0, blk.gcount, n_heads, hd, blk.nparts, blk.part,
                       blk.max_parts);
}

// The tensor-core decode for hd ≤ HD, hd % 8 == 0: arguments, outputs and grid as
// attention_decode_simt_bf16; block = ATTN_WARPS·32; dynamic shared memory DECODE_MMA_SMEM(HD).
// (Minimum 1 block per SM in the bounds: without it ptxas for sm_80 caps the HD 64 kernel at 72
// registers and spills; with it 94, and 100 on sm_90a: 4 blocks of 4 warps per SM, each with
// 32 KiB of k and v requested at once, far more in flight than DRAM needs.)
#define DECODE_MMA_ENTRY(HD)                                                                                      \
    extern "C" __global__ void __launch_bounds__(ATTN_WARPS * WARP_SIZE, 1) attention_decode_hd##HD##_bf16(      \
        bf16* __restrict__ out, float* __restrict__ part_o, float* __restrict__ part_ml,                         \
        unsigned* __restrict__ counters, const bf16* __restrict__ q, const bf16* __restrict__ k_cache, const bf16* __restrict__ v_cache,          \
        const int* __restrict__ block_table, const int* __restrict__ seq_lens, int n_heads, int n_kv_heads,      \
        int hd, int page_size, int max_pages, int window, int part_size, float scale) {                          \
        attention_decode_mma_block<HD>(out, part_o, part_ml, counters, q, k_cache, v_cache, block_table, seq_lens, n_heads, \
                                       n_kv_heads, hd, page_size, max_pages, window, part_size, scale);           \
    }
DECODE_MMA_ENTRY(64)
DECODE_MMA_ENTRY(128)
DECODE_MMA_ENTRY(256)

// ----------------------------------------------------------------------------
// Prefill

// Rows of sequence s are q rows [cu_rows[s], cu_rows[s+1]) (varlen, no padding), at positions
// pos0[s] + (row - cu_rows[s]); their k and v are already in the cache. q, out (rows, n_heads, hd)
// bf16; cu_rows (num_seqs + 1) i32; pos0 (num_seqs) i32.
//
// One block = (tile of PREFILL_BQ consecutive rows of sequence s = blockIdx.z, query head
// h = blockIdx.y); warp w owns rows w·4 .. w·4+3 of the tile. The block walks key positions
// [lo, hi] (lo = the first row's window start, hi = the last row's position) in tiles of
// PREFILL_BK = 32 staged in shared memory; lane j scores key j of the tile for each of the
// warp's rows (masked to [start_row, pos_row]), the warp updates that row's online softmax with
// one max and one sum reduction per tile, and accumulates p·v with lane = output dims.
// grid = (ceil(max rows of a sequence / 16), n_heads, num_seqs), block = 128, dynamic shared
// memory (16·hd + 32·(hd+2) + 32·hd)·2 + 32·8 bytes. hd ≤ 256, hd % 4 == 0.
extern "C" __global__ void __launch_bounds__(ATTN_WARPS * WARP_SIZE)
    attention_prefill_bf16(bf16* __restrict__ out, const bf16* __restrict__ q, const bf16* __restrict__ k_cache,
                           const bf16* __restrict__ v_cache, const int* __restrict__ block_table,
                           const int* __restrict__ cu_rows, const int* __restrict__ pos0, int n_heads,
                           int n_kv_heads, int hd, int page_size, int max_pages, int window, float scale) {
    constexpr int RPW = PREFILL_BQ / ATTN_WARPS;  // rows per warp
    constexpr int EMAX = 8;                       // dims per lane, hd ≤ 256
    extern __shared__ __align__(16) unsigned char prefill_smem[];
    size_t* base_s = reinterpret_cast<size_t*>(prefill_smem);                  // [BK]
    bf16* q_s = reinterpret_cast<bf16*>(prefill_smem + PREFILL_BK * sizeof(size_t));  // [BQ][hd]
    bf16* k_s = q_s + PREFILL_BQ * hd;                                          // [BK][hd+2]
    bf16* v_s = k_s + PREFILL_BK * (hd + 2);                                    // [BK][hd]

    const int lane = threadIdx.x % WARP_SIZE;
    const int warp = threadIdx.x / WARP_SIZE;
    const int s = blockIdx.z;
    const int h = blockIdx.y;
    const int kvh = h / (n_heads / n_kv_heads);
    const int row_begin = cu_rows[s];
    const int nrows = cu_rows[s + 1] - row_begin;
    const int tile0 = blockIdx.x * PREFILL_BQ;
    if (tile0 >= nrows) return;  // whole block leaves together
    const int tile_rows = min(PREFILL_BQ, nrows - tile0);
    const int cap = page_size * max_pages;
    const int first_pos = pos0[s] + tile0;
    const int lo = (window > 0 && first_pos + 1 > window) ? first_pos + 1 - window : 0;
    const int hi = min(first_pos + tile_rows - 1, cap - 1);

    for (int idx = threadIdx.x; idx < PREFILL_BQ * hd; idx += blockDim.x) {
        const int i = idx / hd;
        const int d = idx % hd;
        q_s[idx] = i < tile_rows ? q[((size_t)(row_begin + tile0 + i) * n_heads + h) * hd + d] : f32_to_bf16(0.0f);
    }

    float m[RPW], l[RPW], acc[RPW][EMAX];
#pragma unroll
    for (int rr = 0; rr < RPW; ++rr) {
        m[rr] = -INFINITY;
        l[rr] = 0.0f;
#pragma unroll
        for (int e = 0; e < EMAX; ++e) acc[rr][e] = 0.0f;
    }
    const int E = CEIL_DIV(hd, WARP_SIZE);  // dims per lane: lane·E .. lane·E + E - 1

    for (int kt = lo; kt <= hi; kt += PREFILL_BK) {
        __syncthreads();  // the previous tile's k_s, v_s, base_s are no longer read
        if (threadIdx.x < PREFILL_BK) {
            const int t = kt + threadIdx.x;
            base_s[threadIdx.x] =
                t <= hi ? kv_offset(block_table, s, t, page_size, max_pages, n_kv_heads, kvh, hd) : (size_t)-1;
        }
        __syncthreads();
        for (int idx = threadIdx.x; idx < PREFILL_BK * hd; idx += blockDim.x) {
            const int j = idx / hd;
            const int d = idx % hd;
            const size_t base = base_s[j];
            const bool ok = base != (size_t)-1;
            k_s[j * (hd + 2) + d] = ok ? k_cache[base + d] : f32_to_bf16(0.0f);
            v_s[j * hd + d] = ok ? v_cache[base + d] : f32_to_bf16(0.0f);
        }
        __syncthreads();

        const int t = kt + lane;  // this lane's key position
#pragma unroll
        for (int rr = 0; rr < RPW; ++rr) {
            const int i = warp * RPW + rr;
            if (i >= tile_rows) continue;  // warp-uniform
            const int p = first_pos + i;
            const int start = (window > 0 && p + 1 > window) ? p + 1 - window : 0;
            const bool valid = t >= start && t <= p && t <= hi;
            float sc = -INFINITY;
            if (valid) {
                // q_s row i is read by all lanes at the same address (broadcast); k_s rows are
                // (hd+2) bf16 apart, an odd number of words for hd % 4 == 0: no bank conflicts.
                const __nv_bfloat162* qp = reinterpret_cast<const __nv_bfloat162*>(q_s + i * hd);
                const __nv_bfloat162* kp = reinterpret_cast<const __nv_bfloat162*>(k_s + lane * (hd + 2));
                float dot = 0.0f;
                for (int d2 = 0; d2 < hd / 2; ++d2) {
                    const float2 qa = __bfloat1622float2(qp[d2]);
                    const float2 ka = __bfloat1622float2(kp[d2]);
                    dot += qa.x * ka.x + qa.y * ka.y;
                }
                sc = dot * scale;
            }
            const float m_new = fmaxf(m[rr], warp_reduce_max(sc));
            if (m_new == -INFINITY) continue;  // no valid key yet for this row (warp-uniform)
            const float pr = valid ? expf(sc - m_new) : 0.0f;
            const float corr = expf(m[rr] - m_new);
            l[rr] = l[rr] * corr + warp_reduce_sum(pr);
#pragma unroll
            for (int e = 0; e < EMAX; ++e) acc[rr][e] *= corr;
            for (int j = 0; j < PREFILL_BK; ++j) {
                const float pj = __shfl_sync(FULL_MASK, pr, j);
                if (pj == 0.0f) continue;  // warp-uniform (pj is the same in every lane)
                const bf16* vrow = v_s + j * hd;
#pragma unroll
                for (int e = 0; e < EMAX; ++e) {
                    const int d = lane * E + e;
                    if (e < E && d < hd) acc[rr][e] += pj * bf16_to_f32(vrow[d]);
                }
            }
            m[rr] = m_new;
        }
    }

#pragma unroll
    for (int rr = 0; rr < RPW; ++rr) {
        const int i = warp * RPW + rr;
        if (i >= tile_rows) continue;
        bf16* o = out + ((size_t)(row_begin + tile0 + i) * n_heads + h) * hd;
#pragma unroll
        for (int e = 0; e < EMAX; ++e) {
            const int d = lane * E + e;
            if (e < E && d < hd) o[d] = f32_to_bf16(l[rr] > 0.0f ? acc[rr][e] / l[rr] : 0.0f);
        }
    }
}
