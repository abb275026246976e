// The training lm_head's online softmax across VOCABULARY chunks. The step computes logits one
// [C rows × Vc columns] chunk at a time; logprob_gather_fwd_f32 (kernels/train.cu) reduces each
// chunk to per-row statistics over its columns (lse_c = log Σ exp(s), mean_s_c = E[s] under the
// chunk's softmax, and logp_c = s_target − lse_c when the target is in the chunk, else NaN),
// with s = logit / T. These kernels merge those statistics across chunks (the same algebra as
// the online softmax of one row) and finish logp and entropy:
//   lse  = log(exp(lse_a) + exp(lse_c))
//   E[s] = exp(lse_a − lse)·E_a[s] + exp(lse_c − lse)·E_c[s]
//   s_t  = logp_c + lse_c   (from the chunk that holds the target)
//   logp = s_t − lse,  entropy = lse − E[s]
// CPU reference: the single-pass log-softmax of src/cpu/train.rs (and tests/cuda_lm_head.rs).
// Rust launchers: src/cuda/train.rs.

#include "common.cuh"

// Merges chunk statistics (rows f32 each) into the running ones, in place. first != 0: copy.
// s_t stays NaN until the chunk holding the row's target is merged. grid-stride over rows.
extern "C" __global__ void logprob_chunk_merge_f32(float* __restrict__ lse, float* __restrict__ mean_s,
                                                   float* __restrict__ s_t, const float* __restrict__ lse_c,
                                                   const float* __restrict__ mean_s_c,
                                                   const float* __restrict__ logp_c, int rows, int first) {
    for (int r = blockIdx.x * blockDim.x + threadIdx.x; r < rows; r += gridDim.x * blockDim.x) {
        const float lc = lse_c[r];
        const float mc = mean_s_c[r];
        const float pc = logp_c[r];
        if (first) {
            lse[r] = lc;
            mean_s[r] = mc;
            s_t[r] = isnan(pc) ? pc : pc + lc;
            continue;
        }
        const float la = lse[r];
        float l, wa, wc;
        if (la == -INFINITY && lc == -INFINITY) {
            l = -INFINITY;
            wa = 1.0f;
            wc = 0.0f;
        } else {
            const float m = fmaxf(la, lc);
            l = m + log1pf(expf(-fabsf(la - lc)));
            wa = expf(la - l);
            wc = expf(lc - l);
        }
        mean_s[r] = (wa == 0.0f ? 0.0f : wa * mean_s[r]) + (wc == 0.0f ? 0.0f : wc * mc);
        lse[r] = l;
        if (!isnan(pc)) s_t[r] = pc + lc;
    }
}

// logp = s_t − lse (NaN when no chunk held the target), entropy = lse − E[s]. grid-stride.
extern "C" __global__ void logprob_chunk_finish_f32(float* __restrict__ logp, float* __restrict__ entropy,
                                                    const float* __restrict__ lse,
                                                    const float* __restrict__ mean_s,
                                                    const float* __restrict__ s_t, int rows) {
    for (int r = blockIdx.x * blockDim.x + threadIdx.x; r < rows; r += gridDim.x * blockDim.x) {
        logp[r] = s_t[r] - lse[r];
        entropy[r] = lse[r] - mean_s[r];
    }
}
