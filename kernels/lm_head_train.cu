// The training lm_head's online softmax across VOCABULARY chunks. The step computes logits one
// [C rows × Vc columns] chunk at a time; logprob_gather_fwd_f32 (kernels/train.cu) reduces each
// chunk to per-row statistics over its columns (s = logit / T): lse_c = log Σ exp(s), the
// chunk's entropy H_c = lse_c − E_c[s] (computed there relative to the row maximum, so without
// cancellation), and logp_c = s_target − lse_c when the target is in the chunk, else NaN. These
// kernels merge those statistics across chunks, the online softmax of one row:
//   lse = log(exp(lse_a) + exp(lse_c)),  w_a = exp(lse_a − lse),  w_c = exp(lse_c − lse)
//   H   = w_a·(H_a + (lse − lse_a)) + w_c·(H_c + (lse − lse_c))     (E[s] = w_a·E_a + w_c·E_c)
//   s_t = logp_c + lse_c   (from the chunk that holds the target)
// and finish logp = s_t − lse and E[s] = lse − H (what logprob_gather_bwd_f32 needs). Merging
// the entropy rather than E[s] keeps its error at f32 rounding of (lse − lse_a), not of
// |E[s]|·|lse|. CPU reference: the one-pass log-softmax of src/cpu/train.rs; tests:
// tests/cuda_train.rs (vocabulary chunks vs one chunk), scripts/kernel_emu/lm_head_train_emu.cpp.
// Rust launchers: src/cuda/train.rs (launch_rows).

#include "common.cuh"

// Merges one chunk's statistics (rows f32 each) into the running ones, in place; first != 0:
// copy. s_t stays NaN until the chunk holding the row's target is merged. grid-stride over rows.
extern "C" __global__ void logprob_chunk_merge_f32(float* __restrict__ lse, float* __restrict__ entropy,
                                                   float* __restrict__ s_t, const float* __restrict__ lse_c,
                                                   const float* __restrict__ entropy_c,
                                                   const float* __restrict__ logp_c, int rows, int first) {
    for (int r = blockIdx.x * blockDim.x + threadIdx.x; r < rows; r += gridDim.x * blockDim.x) {
        const float lc = lse_c[r];
        const float hc = entropy_c[r];
        const float pc = logp_c[r];
        if (first) {
            lse[r] = lc;
            entropy[r] = hc;
            s_t[r] = isnan(pc) ? pc : pc + lc;
            continue;
        }
        const float la = lse[r];
        if (lc != -INFINITY) {  // a chunk of −∞ logits adds nothing
            if (la == -INFINITY) {
                lse[r] = lc;
                entropy[r] = hc;
            } else {
                const float l = fmaxf(la, lc) + log1pf(expf(-fabsf(la - lc)));
                const float wa = expf(la - l);
                const float wc = expf(lc - l);
                entropy[r] = wa * (entropy[r] + (l - la)) + wc * (hc + (l - lc));
                lse[r] = l;
            }
        }
        if (!isnan(pc)) s_t[r] = pc + lc;
    }
}

// logp = s_t − lse (NaN when no chunk held the target), mean_s = E[s] = lse − H. grid-stride.
extern "C" __global__ void logprob_chunk_finish_f32(float* __restrict__ logp, float* __restrict__ mean_s,
                                                    const float* __restrict__ lse,
                                                    const float* __restrict__ entropy,
                                                    const float* __restrict__ s_t, int rows) {
    for (int r = blockIdx.x * blockDim.x + threadIdx.x; r < rows; r += gridDim.x * blockDim.x) {
        logp[r] = s_t[r] - lse[r];
        mean_s[r] = lse[r] - entropy[r];
    }
}
