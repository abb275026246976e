// Training-step kernels: the chunked lm_head's log-softmax gather (forward and backward, dlogits
// in place or f32 → bf16), the GRPO loss with its gradient, LoRA backward, RMSNorm / SwiGLU / RoPE backward,
// and the optimiser (global grad norm with a non-finite flag, AdamW).
//
// CPU oracles (tests/cuda_train_kernels.rs compares against them):
//   logprob_gather_*        src/cpu/ops.rs::logprob_and_entropy and the head loop of
//                           src/cpu/train.rs::TrainForward::backward
//   grpo_loss_fwd_bwd_f32   src/loss/grpo.rs (grpo_token, grpo_loss_into; spec in loss/mod.rs)
//   lora_*                  src/cpu/train.rs::proj_bwd
//   rmsnorm/swiglu/rope_bwd src/cpu/ops.rs (rmsnorm_bwd, swiglu_bwd, rope_inplace inverse)
//   grad_sq_norm, adamw     src/optim/clip.rs, src/optim/adamw.rs
//
// Determinism: nothing here uses floating-point atomics. Every reduction has a fixed shape that
// depends only on the problem size (never on the GPU): a kernel writes one partial per block (or
// per k-split) and a second, single-purpose kernel adds the partials in index order. So the same
// inputs give bit-identical outputs run after run, and on any GPU.
//
// Helpers are `static` with a `tr_` prefix: build.rs compiles all kernels/*.cu as ONE unit.
// Rust launchers: src/cuda/train_kernels.rs (grid, block, shared memory, argument order).

#include "common.cuh"

// ----------------------------------------------------------------------------
// Helpers

// f64 sum over the block, every thread gets it (blockDim.x a multiple of 32, all threads call).
// Fixed xor-tree per warp, then warp partials in warp order: deterministic.
static __device__ __forceinline__ double tr_warp_sum_f64(double v) {
    for (int offset = WARP_SIZE / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(FULL_MASK, v, offset);
    return v;
}

static __device__ __forceinline__ double tr_block_sum_f64(double v) {
    __shared__ double partial[WARP_SIZE];
    const int lane = threadIdx.x % WARP_SIZE;
    const int warp = threadIdx.x / WARP_SIZE;
    const int num_warps = blockDim.x / WARP_SIZE;
    v = tr_warp_sum_f64(v);
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < num_warps ? partial[lane] : 0.0;
    return tr_warp_sum_f64(v);
}

// out[f] = Σ_{b < num_partials} partials[b·fields + f], f < fields, summed in f64 by ONE block
// in a fixed order (thread t takes b = t, t + blockDim, ...; then the block tree). The second
// pass of grpo_loss_fwd_bwd_f32 (fields 5) and grad_sq_norm_partial_f32 (fields 2).
// grid = 1, block = multiple of 32.
extern "C" __global__ void sum_partials_f64(double* __restrict__ out, const double* __restrict__ partials,
                                            int num_partials, int fields) {
    for (int f = 0; f < fields; ++f) {
        double acc = 0.0;
        for (int b = threadIdx.x; b < num_partials; b += blockDim.x) acc += partials[(size_t)b * fields + f];
        acc = tr_block_sum_f64(acc);
        if (threadIdx.x == 0) out[f] = acc;
    }
}

// out[i] += scale · Σ_{z < splits} partials[z·len + i] (z in order), over i < len. The second
// pass of the split-K LoRA gradients and of rmsnorm_bwd_bf16's dweight partials. grid-stride.
extern "C" __global__ void sum_partials_add_f32(float* __restrict__ out, const float* __restrict__ partials,
                                                int splits, size_t len, float scale) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < len; i += (size_t)gridDim.x * blockDim.x) {
        float acc = 0.0f;
        for (int z = 0; z < splits; ++z) acc += partials[(size_t)z * len + i];
        out[i] += scale * acc;
    }
}

// ----------------------------------------------------------------------------
// Log-softmax gather over a chunk of logits, forward and backward.
//
// s = logits / T (one IEEE division, as the CPU's `v / temperature`), p = softmax(s):
//   forward:  logp = s[target] − lse,  entropy H = lse − E_p[s]
//             saved for the backward: lse (max folded in: p = exp(s − lse) ≤ 1 needs no
//             separate max) and mean_s = E_p[s]
//   backward: dlogits_j = (dlogp·(δ_{j,target} − p_j) − dH·p_j·(s_j − E_p[s])) / T
//             written over the logits in place (same dtype), or from f32 logits to a separate
//             bf16 buffer (rounded once), ready for dX = dlogits · W_lm.
// Online softmax over one row (one block per row) carrying (m, Z = Σ e^{s−m}, S1 = Σ e^{s−m}(s−m)):
// then lse = m + log Z, E[s] = m + S1/Z, H = log Z − S1/Z. s = −∞ entries have p = 0. When vocab
// is a multiple of the 16-byte vector (4 f32 / 8 bf16) and logits 16-byte aligned, each thread
// reads whole vectors and rescales once per vector; otherwise one element per step. Either way the
// per-thread states merge in a fixed tree (deterministic); the two paths round differently.

struct TrSoftmaxStat {
    float m, z, s1;
};

static __device__ __forceinline__ TrSoftmaxStat tr_softmax_merge(TrSoftmaxStat a, TrSoftmaxStat b) {
    if (b.z == 0.0f) return a;
    if (a.z == 0.0f) return b;
    if (a.m < b.m) {
        const TrSoftmaxStat t = a;
        a = b;
        b = t;
    }
    const float d = b.m - a.m;  // ≤ 0
    const float e = expf(d);
    return TrSoftmaxStat{a.m, a.z + e * b.z, a.s1 + e * (b.s1 + d * b.z)};
}

static __device__ __forceinline__ TrSoftmaxStat tr_softmax_warp_merge(TrSoftmaxStat v) {
    for (int offset = WARP_SIZE / 2; offset > 0; offset >>= 1) {
        TrSoftmaxStat o;
        o.m = __shfl_xor_sync(FULL_MASK, v.m, offset);
        o.z = __shfl_xor_sync(FULL_MASK, v.z, offset);
        o.s1 = __shfl_xor_sync(FULL_MASK, v.s1, offset);
        v = tr_softmax_merge(v, o);
    }
    return v;
}

template <typename T>
static __device__ void tr_logprob_fwd_row(float* __restrict__ logp, float* __restrict__ entropy,
                                          float* __restrict__ lse_out, float* __restrict__ mean_s_out,
                                          const T* __restrict__ logits, const uint32_t* __restrict__ targets,
                                          float temperature, int rows, int vocab) {
    __shared__ TrSoftmaxStat partial[WARP_SIZE];
    const int row = blockIdx.x;
    if (row >= rows) return;
    const T* x = logits + (size_t)row * vocab;
    TrSoftmaxStat st = {-INFINITY, 0.0f, 0.0f};
    constexpr int V = 16 / sizeof(T);
    if (vocab % V == 0 && vec16_ok(logits)) {
        // V elements per step: raise the running max once to the vector's max, then add every
        // element against it (independent expf's instead of a per-element rescale chain).
        for (int i0 = threadIdx.x * V; i0 < vocab; i0 += blockDim.x * V) {
            float s[V];
            load_vec16(x + i0, s);
            float m = st.m;
#pragma unroll
            for (int k = 0; k < V; ++k) {
                s[k] = __fdiv_rn(s[k], temperature);
                m = fmaxf(m, s[k]);  // NaN s leaves m; −∞ never raises it
            }
            if (m > st.m) {
                const float d = st.m - m;
                const float e = expf(d);  // 0 when st.m = −∞ (then z = s1 = 0)
                st.s1 = st.z == 0.0f ? 0.0f : e * (st.s1 + d * st.z);
                st.z = st.z * e;
                st.m = m;
            }
#pragma unroll
            for (int k = 0; k < V; ++k) {
                if (s[k] == -INFINITY) continue;
                const float d = s[k] - st.m;
                const float e = expf(d);
                st.z += e;
                st.s1 += e * d;
            }
        }
    } else {
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            const float s = __fdiv_rn(load_f32(x + i), temperature);
            if (s == -INFINITY) continue;
            if (s > st.m) {
                const float d = st.m - s;
                const float e = expf(d);  // 0 when st.m = −∞ (then z = s1 = 0)
                st.s1 = st.z == 0.0f ? 0.0f : e * (st.s1 + d * st.z);
                st.z = st.z * e + 1.0f;
                st.m = s;
            } else {
                const float d = s - st.m;
                const float e = expf(d);
                st.z += e;
                st.s1 += e * d;
            }
        }
    }
    st = tr_softmax_warp_merge(st);
    const int lane = threadIdx.x % WARP_SIZE;
    const int warp = threadIdx.x / WARP_SIZE;
    if (lane == 0) partial[warp] = st;
    __syncthreads();
    if (warp == 0) {
        st = lane < (int)(blockDim.x / WARP_SIZE) ? partial[lane] : TrSoftmaxStat{-INFINITY, 0.0f, 0.0f};
        st = tr_softmax_warp_merge(st);
        if (lane == 0) {
            const uint32_t t = targets[row];
            const float log_z = logf(st.z);
            const float mean_d = st.s1 / st.z;  // E[s] − m
            logp[row] = t < (uint32_t)vocab ? (__fdiv_rn(load_f32(x + t), temperature) - st.m) - log_z
                                            : __int_as_float(0x7fc00000);
            entropy[row] = log_z - mean_d;
            lse_out[row] = st.m + log_z;
            mean_s_out[row] = st.m + mean_d;
        }
    }
}

// logp[r] = log_softmax(logits[r] / T)[targets[r]] (target ≥ vocab → NaN), entropy[r] = H of
// softmax(logits[r] / T), and the saved lse[r], mean_s[r] for logprob_gather_bwd_f32.
// logits (rows, vocab) f32; targets (rows) u32; outputs (rows) f32. grid = rows, block = 32k ≤ 1024.
extern "C" __global__ void logprob_gather_fwd_f32(float* __restrict__ logp, float* __restrict__ entropy,
                                                  float* __restrict__ lse, float* __restrict__ mean_s,
                                                  const float* __restrict__ logits,
                                                  const uint32_t* __restrict__ targets, float temperature,
                                                  int rows, int vocab) {
    tr_logprob_fwd_row(logp, entropy, lse, mean_s, logits, targets, temperature, rows, vocab);
}

// As logprob_gather_fwd_f32 with bf16 logits (rows, vocab).
extern "C" __global__ void logprob_gather_fwd_bf16(float* __restrict__ logp, float* __restrict__ entropy,
                                                   float* __restrict__ lse, float* __restrict__ mean_s,
                                                   const bf16* __restrict__ logits,
                                                   const uint32_t* __restrict__ targets, float temperature,
                                                   int rows, int vocab) {
    tr_logprob_fwd_row(logp, entropy, lse, mean_s, logits, targets, temperature, rows, vocab);
}

// V elements at a 16-byte-aligned p, as V·sizeof(T)/16 16-byte loads (each lane converted as
// load_f32 would): 4 or 8 f32, 8 bf16.
static __device__ __forceinline__ void tr_load_vec(const float* p, float (&v)[4]) { load4_f32(p, v); }
static __device__ __forceinline__ void tr_load_vec(const bf16* p, float (&v)[8]) { load8_bf16(p, v); }
static __device__ __forceinline__ void tr_load_vec(const float* p, float (&v)[8]) {
    float a[4], b[4];
    load4_f32(p, a);
    load4_f32(p + 4, b);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        v[k] = a[k];
        v[k + 4] = b[k];
    }
}

// Mirrors the CPU's rounding steps: d = (−gl·p − ge·p·(s − E[s])) / T, then d[target] += gl / T,
// with explicit _rn intrinsics so nvcc does not contract them into FMAs. Elementwise given the
// row's saved stats: reads logits (Tin) and writes dlogits (Tout, stored as store_f32 would: a
// bf16 output is d rounded once by f32_to_bf16), in place when both are the same buffer (each
// element is read and then written by the same thread). 16-byte vectors of the narrower type
// (4 f32 / 8 bf16 per thread per step; f32 → bf16: two 16-byte loads, one 16-byte store) when
// vocab is a multiple of the vector and both pointers are 16-byte aligned, else one element per
// step; same result either way.
template <typename Tin, typename Tout>
static __device__ void tr_logprob_bwd_row(const Tin* logits, Tout* dlogits, const uint32_t* __restrict__ targets,
                                          const float* __restrict__ dlogp, const float* __restrict__ dentropy,
                                          const float* __restrict__ lse, const float* __restrict__ mean_s,
                                          float temperature, int rows, int vocab) {
    const int row = blockIdx.x;
    if (row >= rows) return;
    const Tin* x = logits + (size_t)row * vocab;
    Tout* y = dlogits + (size_t)row * vocab;
    const float gl = dlogp[row];
    const float ge = dentropy ? dentropy[row] : 0.0f;
    const float l = lse[row];
    const float es = mean_s[row];
    const uint32_t t = targets[row];
    const float hot = __fdiv_rn(gl, temperature);
    auto dlogit = [&](float v, int i) {
        const float s = __fdiv_rn(v, temperature);
        const float p = expf(s - l);  // 0 for s = −∞
        float d = __fsub_rn(__fmul_rn(-gl, p), __fmul_rn(__fmul_rn(ge, p), s == -INFINITY ? 0.0f : __fsub_rn(s, es)));
        d = __fdiv_rn(d, temperature);
        if ((uint32_t)i == t) d = __fadd_rn(d, hot);
        return d;
    };
    constexpr int V = 16 / (sizeof(Tin) < sizeof(Tout) ? sizeof(Tin) : sizeof(Tout));
    if (vocab % V == 0 && vec16_ok(logits) && vec16_ok(dlogits)) {
        for (int i0 = threadIdx.x * V; i0 < vocab; i0 += blockDim.x * V) {
            float v[V];
            tr_load_vec(x + i0, v);
#pragma unroll
            for (int k = 0; k < V; ++k) v[k] = dlogit(v[k], i0 + k);
            store_vec16(y + i0, v);
        }
        return;
    }
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) store_f32(y + i, dlogit(load_f32(x + i), i));
}

// In place: logits (rows, vocab) f32 → dlogits = d(Σ dlogp·logp + dentropy·H)/d logits, from
// dlogp (rows), dentropy (rows, or NULL = 0) and the forward's lse, mean_s (rows). A target
// ≥ vocab gets no one-hot term. grid = rows, block = 32k ≤ 1024.
extern "C" __global__ void logprob_gather_bwd_f32(float* logits, const uint32_t* __restrict__ targets,
                                                  const float* __restrict__ dlogp,
                                                  const float* __restrict__ dentropy,
                                                  const float* __restrict__ lse, const float* __restrict__ mean_s,
                                                  float temperature, int rows, int vocab) {
    tr_logprob_bwd_row(logits, logits, targets, dlogp, dentropy, lse, mean_s, temperature, rows, vocab);
}

// As logprob_gather_bwd_f32 on bf16 logits (rows, vocab); dlogits rounded to bf16 once.
extern "C" __global__ void logprob_gather_bwd_bf16(bf16* logits, const uint32_t* __restrict__ targets,
                                                   const float* __restrict__ dlogp,
                                                   const float* __restrict__ dentropy,
                                                   const float* __restrict__ lse, const float* __restrict__ mean_s,
                                                   float temperature, int rows, int vocab) {
    tr_logprob_bwd_row(logits, logits, targets, dlogp, dentropy, lse, mean_s, temperature, rows, vocab);
}

// As logprob_gather_bwd_f32 but out of place: reads f32 logits (rows, vocab), writes bf16
// dlogits (rows, vocab; a separate buffer, not overlapping logits), each element the f32
// dlogit of logprob_gather_bwd_f32 rounded to bf16 once (f32_to_bf16, as cast_f32_to_bf16): bit
// for bit logprob_gather_bwd_f32 followed by cast_f32_to_bf16, in one pass (the training
// step's lm_head backward: 6 bytes per element instead of 4 + 4 + 4 + 2). grid = rows,
// block = 32k ≤ 1024.
extern "C" __global__ void logprob_gather_bwd_f32_to_bf16(const float* __restrict__ logits,
                                                          bf16* __restrict__ dlogits,
                                                          const uint32_t* __restrict__ targets,
                                                          const float* __restrict__ dlogp,
                                                          const float* __restrict__ dentropy,
                                                          const float* __restrict__ lse,
                                                          const float* __restrict__ mean_s, float temperature,
                                                          int rows, int vocab) {
    tr_logprob_bwd_row(logits, dlogits, targets, dlogp, dentropy, lse, mean_s, temperature, rows, vocab);
}

// ----------------------------------------------------------------------------
// GRPO loss, forward and backward in one pass over the packed completion tokens.
//
// Per token t of sequence i = token_seq[t] (spec: src/loss/mod.rs), all f32 like grpo_token:
//   ratio = exp(logp − old)  (old_logp NULL: ratio ≡ 1)
//   l1 = ratio·A, l2 = clamp(ratio, lo, hi)·A, (loss, d) = l2 < l1 ? (−l2, 0) : (−l1, −A·ratio)
//   ref given: k3 = e − (ref − logp) − 1, dk3 = 1 − e with e = exp(ref − logp);  k1 = logp − ref, 1
//              loss += β·kl, d += β·dkl
//   token_loss[t] = w_i·loss (f32), grad_logp[t] = (f32)w_i · d  (w_i: f64 aggregation weight)
// Block partials (f64, in this order; GRPO_FIELDS): Σ w_i·loss, Σ kl, Σ ratio,
//   #(ratio < lo ∧ A < 0), #(ratio > hi ∧ A > 0)
// summed by sum_partials_f64 (grid = 1). The f64 loss sum matches the CPU's f64 accumulation.
// lo, hi: f32 of the f64 bounds 1 − ε, 1 + ε_high (as the CPU rounds them). kl_k1: 0 = k3, 1 = k1.
// grid = GRPO blocks (depends on n only), block = 256; grid-stride over tokens.

#define GRPO_FIELDS 5

extern "C" __global__ void grpo_loss_fwd_bwd_f32(float* __restrict__ token_loss, float* __restrict__ grad_logp,
                                                 double* __restrict__ partials, const float* __restrict__ logp,
                                                 const float* __restrict__ old_logp,
                                                 const float* __restrict__ ref_logp,
                                                 const int* __restrict__ token_seq,
                                                 const float* __restrict__ advantages,
                                                 const double* __restrict__ seq_weight, float lo, float hi,
                                                 float beta, int kl_k1, int n) {
    double acc_loss = 0.0, acc_kl = 0.0, acc_ratio = 0.0, acc_low = 0.0, acc_high = 0.0;
    for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < n; t += gridDim.x * blockDim.x) {
        const int seq = token_seq[t];
        const float adv = advantages[seq];
        const double w64 = seq_weight[seq];
        const float lp = logp[t];
        const float ratio = old_logp ? expf(__fsub_rn(lp, old_logp[t])) : 1.0f;
        const float l1 = __fmul_rn(ratio, adv);
        float clamped = ratio < lo ? lo : ratio;
        clamped = clamped > hi ? hi : clamped;
        const float l2 = __fmul_rn(clamped, adv);
        float loss, d;
        if (l2 < l1) {
            loss = -l2;
            d = 0.0f;
        } else {
            loss = -l1;
            d = -__fmul_rn(adv, ratio);
        }
        float kl = 0.0f;
        if (ref_logp) {
            const float r = ref_logp[t];
            float dk;
            if (kl_k1) {
                kl = __fsub_rn(lp, r);
                dk = 1.0f;
            } else {
                const float diff = __fsub_rn(r, lp);
                const float e = expf(diff);
                kl = __fsub_rn(__fsub_rn(e, diff), 1.0f);
                dk = __fsub_rn(1.0f, e);
            }
            loss = __fadd_rn(loss, __fmul_rn(beta, kl));
            d = __fadd_rn(d, __fmul_rn(beta, dk));
        }
        grad_logp[t] = __fmul_rn((float)w64, d);
        if (token_loss) token_loss[t] = (float)(w64 * (double)loss);
        acc_loss += w64 * (double)loss;
        acc_kl += (double)kl;
        acc_ratio += (double)ratio;
        acc_low += (ratio < lo && adv < 0.0f) ? 1.0 : 0.0;
        acc_high += (ratio > hi && adv > 0.0f) ? 1.0 : 0.0;
    }
    double* out = partials + (size_t)blockIdx.x * GRPO_FIELDS;
    const double v0 = tr_block_sum_f64(acc_loss);
    if (threadIdx.x == 0) out[0] = v0;
    const double v1 = tr_block_sum_f64(acc_kl);
    if (threadIdx.x == 0) out[1] = v1;
    const double v2 = tr_block_sum_f64(acc_ratio);
    if (threadIdx.x == 0) out[2] = v2;
    const double v3 = tr_block_sum_f64(acc_low);
    if (threadIdx.x == 0) out[3] = v3;
    const double v4 = tr_block_sum_f64(acc_high);
    if (threadIdx.x == 0) out[4] = v4;
}

// ----------------------------------------------------------------------------
// LoRA backward (src/cpu/train.rs::proj_bwd), y = x Wᵀ + s·(x Aᵀ) Bᵀ, A (r, in), B (out, r).
// The training step no longer calls these: it runs the tensor-core kernels of
// kernels/lora_train.cu on bf16 copies of A and B. These CUDA-core tiles read the f32 adapter
// exactly and stay as a tested f32-weight reference (tests/cuda_train_kernels.rs).
//   u   [n, r]   = x Aᵀ                 lora_bwd_xa_bf16   (recomputed; rank side first)
//   dyb [n, r]   = dy B                 lora_bwd_dyb_bf16
//   dB  [out, r] += s · dyᵀ u           lora_grad_b_bf16   (reduction over n: split-K)
//   dA  [r, in]  += s · dybᵀ x          lora_grad_a_bf16   (reduction over n: split-K)
//   dx  [n, in]  += s · dyb A           lora_bwd_dx_bf16   (bf16 dx, one rounding)
// x, dy bf16 activations; A, B, u, dyb, dA, dB f32. All five are one tiled f32-FMA kernel
//   C[p, q] (+)= scale · Σ_k L(k, p) · R(k, q),  L(k, p) = L[k·lk + p·lp], R(k, q) = R[k·rk + q·rq]
// with 32×32 output tiles, k-steps of 32 staged in shared memory (loads coalesced along whichever
// of the two indices has unit stride), 256 threads × 4 outputs. Why not cuBLAS: the operands mix
// bf16 activations with f32 LoRA weights (cuBLAS GemmEx needs equal A/B types, so it would need
// bf16 copies of A, B, u, dyb, losing the f32 adapter precision the design asks for, or f32 copies
// of x and dy of up to 24576 × 8960); and the rank side is ≤ 64 wide, where a tensor-core GEMM
// wastes most of its tile. FLOPs are small: dA + dB over all projections of Qwen2.5-0.5B at
// 64 × 384 tokens and r = 16 are ~0.4 TFLOP, ~1% of the step.
// Split-K (gridDim.z > 1, only for the accumulating gradients): split z covers k in
// [z·kc, (z+1)·kc), kc = ceil(ceil(K / splits) / 32)·32, and writes its raw sums to
// partials[z][p][q]; sum_partials_add_f32 then adds scale · Σ_z in order. gridDim.z == 1 writes
// C directly (accumulate: C += scale·acc, else C = scale·acc).

#define LT_TILE 32
#define LT_THREADS 256

template <typename TL, typename TR, typename TC>
static __device__ void tr_lora_tile(TC* C, float* partials, const TL* __restrict__ L, size_t lk, size_t lp,
                                    const TR* __restrict__ R, size_t rk, size_t rq, int K, int P, int Q,
                                    float scale, bool accumulate) {
    __shared__ float ls[LT_TILE][LT_TILE + 1];  // [k][p]
    __shared__ float rs[LT_TILE][LT_TILE + 1];  // [k][q]
    const int p0 = blockIdx.y * LT_TILE;
    const int q0 = blockIdx.x * LT_TILE;
    const int splits = gridDim.z;
    const int kc = CEIL_DIV(CEIL_DIV(K, splits), LT_TILE) * LT_TILE;
    const int k_begin = blockIdx.z * kc;
    const int k_end = min(K, k_begin + kc);
    const int tx = threadIdx.x % LT_TILE;  // q within the tile
    const int ty = threadIdx.x / LT_TILE;  // p = ty + 8·j, j < 4
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int k0 = k_begin; k0 < k_end; k0 += LT_TILE) {
        for (int e = threadIdx.x; e < LT_TILE * LT_TILE; e += LT_THREADS) {
            const int a = e % LT_TILE, b = e / LT_TILE;
            {
                const int kk = lp == 1 ? b : a, pp = lp == 1 ? a : b;
                const int k = k0 + kk, p = p0 + pp;
                ls[kk][pp] = (k < k_end && p < P) ? load_f32(L + (size_t)k * lk + (size_t)p * lp) : 0.0f;
            }
            {
                const int kk = rq == 1 ? b : a, qq = rq == 1 ? a : b;
                const int k = k0 + kk, q = q0 + qq;
                rs[kk][qq] = (k < k_end && q < Q) ? load_f32(R + (size_t)k * rk + (size_t)q * rq) : 0.0f;
            }
        }
        __syncthreads();
#pragma unroll 8
        for (int kk = 0; kk < LT_TILE; ++kk) {
            const float r = rs[kk][tx];
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[j] += ls[kk][ty + 8 * j] * r;
        }
        __syncthreads();
    }
    const int q = q0 + tx;
    if (q >= Q) return;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int p = p0 + ty + 8 * j;
        if (p >= P) continue;
        const size_t idx = (size_t)p * Q + q;
        if (splits > 1) {
            partials[(size_t)blockIdx.z * P * Q + idx] = acc[j];
        } else if (accumulate) {
            store_f32(C + idx, load_f32(C + idx) + scale * acc[j]);
        } else {
            store_f32(C + idx, scale * acc[j]);
        }
    }
}

// u (n, r) f32 = x (n, in) bf16 · A (r, in)ᵀ f32. grid = (ceil(r/32), ceil(n/32), 1), block = 256.
extern "C" __global__ void lora_bwd_xa_bf16(float* __restrict__ u, const bf16* __restrict__ x,
                                            const float* __restrict__ a, int n, int in_dim, int rank) {
    tr_lora_tile<bf16, float, float>(u, nullptr, x, 1, in_dim, a, 1, in_dim, in_dim, n, rank, 1.0f, false);
}

// dyb (n, r) f32 = dy (n, out) bf16 · B (out, r) f32. grid = (ceil(r/32), ceil(n/32), 1), block = 256.
extern "C" __global__ void lora_bwd_dyb_bf16(float* __restrict__ dyb, const bf16* __restrict__ dy,
                                             const float* __restrict__ b, int n, int out_dim, int rank) {
    tr_lora_tile<bf16, float, float>(dyb, nullptr, dy, 1, out_dim, b, rank, 1, out_dim, n, rank, 1.0f, false);
}

// dB (out, r) f32 += scale · dy (n, out)ᵀ bf16 · u (n, r) f32. grid = (ceil(r/32), ceil(out/32),
// splits), block = 256; splits > 1 writes partials (splits, out, r) for sum_partials_add_f32.
extern "C" __global__ void lora_grad_b_bf16(float* db, float* __restrict__ partials, const bf16* __restrict__ dy,
                                            const float* __restrict__ u, float scale, int n, int out_dim,
                                            int rank) {
    tr_lora_tile<bf16, float, float>(db, partials, dy, out_dim, 1, u, rank, 1, n, out_dim, rank, scale, true);
}

// dA (r, in) f32 += scale · dyb (n, r)ᵀ f32 · x (n, in) bf16. grid = (ceil(in/32), ceil(r/32),
// splits), block = 256; splits > 1 writes partials (splits, r, in) for sum_partials_add_f32.
extern "C" __global__ void lora_grad_a_bf16(float* da, float* __restrict__ partials, const float* __restrict__ dyb,
                                            const bf16* __restrict__ x, float scale, int n, int in_dim,
                                            int rank) {
    tr_lora_tile<float, bf16, float>(da, partials, dyb, rank, 1, x, in_dim, 1, n, rank, in_dim, scale, true);
}

// dx (n, in) bf16 += scale · dyb (n, r) f32 · A (r, in) f32 (one bf16 rounding of the sum).
// grid = (ceil(in/32), ceil(n/32), 1), block = 256.
extern "C" __global__ void lora_bwd_dx_bf16(bf16* dx, const float* __restrict__ dyb, const float* __restrict__ a,
                                            float scale, int n, int in_dim, int rank) {
    tr_lora_tile<float, float, bf16>(dx, nullptr, dyb, 1, rank, a, in_dim, 1, rank, n, in_dim, scale, true);
}

// ----------------------------------------------------------------------------
// RMSNorm backward (src/cpu/ops.rs::rmsnorm_bwd). Per row, r = 1/sqrt(mean(x²) + eps):
//   dx_i = r·w_i·dy_i − (r³/dim)·x_i·Σ_j w_j dy_j x_j,      dw_i += dy_i·x_i·r
// x, dy, dx bf16 (rows, dim) (dx may alias dy); weight bf16 (dim). With `accumulate` != 0 the
// result is added onto dx instead, dx = bf16(dx + bf16(dx_i)) — exactly residual_add_bf16 of the
// stored result, one pass less (the backward's residual stream; dx must not alias x or dy then).
// Block b handles rows
// [b·RMS_BWD_ROWS, (b+1)·RMS_BWD_ROWS); with dweight_partial non-NULL it writes its rows' dw sum to
// dweight_partial[b, :] (f32), which sum_partials_add_f32 adds into dweight.
// Vector path (dim % 8 == 0, dim ≤ 8·blockDim.x, x, weight, dy, dx 16-byte aligned): thread t owns
// columns [8t, 8t+8) of every row: one 16-byte load of x and of dy per row (kept in registers for
// dx), w loaded once, dw accumulated in registers over the block's rows; one block reduction of
// (Σx², Σx·dy·w) per row. Otherwise the scalar path: threads stride over the row, dw accumulates
// in dynamic shared memory of dim floats. Both add dw over rows in row order; the row sums'
// order depends on the thread split only (deterministic). grid = ceil(rows / RMS_BWD_ROWS),
// block = 32k: the launcher picks ceil(dim/8) rounded up to a warp when that is ≤ 512 (the vector
// path), else row_block(dim); dynamic shared memory dim floats when dweight is wanted.

#define RMS_BWD_ROWS 16

// (a, b) summed over the block with one pair of barriers; every thread gets both. Same tree as
// block_reduce_sum applied to each.
static __device__ __forceinline__ void tr_block_sum2(float& a, float& b) {
    __shared__ float partial2[2][WARP_SIZE];
    const int lane = threadIdx.x % WARP_SIZE;
    const int warp = threadIdx.x / WARP_SIZE;
    const int num_warps = blockDim.x / WARP_SIZE;
    a = warp_reduce_sum(a);
    b = warp_reduce_sum(b);
    __syncthreads();
    if (lane == 0) {
        partial2[0][warp] = a;
        partial2[1][warp] = b;
    }
    __syncthreads();
    a = warp_reduce_sum(lane < num_warps ? partial2[0][lane] : 0.0f);
    b = warp_reduce_sum(lane < num_warps ? partial2[1][lane] : 0.0f);
}

extern "C" __global__ void rmsnorm_bwd_bf16(bf16* dx, float* __restrict__ dweight_partial, const bf16* __restrict__ x,
                                            const bf16* __restrict__ weight, const bf16* dy, float eps, int rows,
                                            int dim, int accumulate) {
    extern __shared__ float tr_rms_dw[];
    const bool want_dw = dweight_partial != nullptr;
    const int row_begin = (int)blockIdx.x * RMS_BWD_ROWS;
    const int row_end = min(rows, row_begin + RMS_BWD_ROWS);
    if (dim % 8 == 0 && dim <= 8 * (int)blockDim.x && vec16_ok(x) && vec16_ok(weight) && vec16_ok(dy) &&
        vec16_ok(dx)) {
        const int c0 = threadIdx.x * 8;
        const bool active = c0 < dim;
        float w[8], dw[8];
#pragma unroll
        for (int k = 0; k < 8; ++k) dw[k] = 0.0f;
        if (active) load8_bf16(weight + c0, w);
        float xv[8], g[8];
        if (active && row_begin < row_end) {
            load8_bf16(x + (size_t)row_begin * dim + c0, xv);
            load8_bf16(dy + (size_t)row_begin * dim + c0, g);
        }
        for (int row = row_begin; row < row_end; ++row) {
            float sum_sq = 0.0f, dot = 0.0f;
            if (active) {
#pragma unroll
                for (int k = 0; k < 8; ++k) {
                    sum_sq += xv[k] * xv[k];
                    dot += xv[k] * g[k] * w[k];
                }
            }
            tr_block_sum2(sum_sq, dot);
            const float r = 1.0f / sqrtf(sum_sq / (float)dim + eps);
            const float c = r * r * r / (float)dim * dot;
            if (active) {
                float o[8];
#pragma unroll
                for (int k = 0; k < 8; ++k) {
                    if (want_dw) dw[k] += g[k] * xv[k] * r;
                    o[k] = r * w[k] * g[k] - c * xv[k];
                }
                if (row + 1 < row_end) {  // next row's loads before this row's store (dx may alias dy)
                    load8_bf16(x + (size_t)(row + 1) * dim + c0, xv);
                    load8_bf16(dy + (size_t)(row + 1) * dim + c0, g);
                }
                if (accumulate) {
                    float acc[8];
                    load8_bf16(dx + (size_t)row * dim + c0, acc);
#pragma unroll
                    for (int k = 0; k < 8; ++k) o[k] = acc[k] + bf16_to_f32(f32_to_bf16(o[k]));
                }
                store8_bf16(dx + (size_t)row * dim + c0, o);
            }
        }
        if (want_dw && active) {
#pragma unroll
            for (int k = 0; k < 8; ++k) dweight_partial[(size_t)blockIdx.x * dim + c0 + k] = dw[k];
        }
        return;
    }
    if (want_dw)
        for (int i = threadIdx.x; i < dim; i += blockDim.x) tr_rms_dw[i] = 0.0f;
    for (int row = row_begin; row < row_end; ++row) {
        const bf16* xr = x + (size_t)row * dim;
        const bf16* gr = dy + (size_t)row * dim;
        float sum_sq = 0.0f, dot = 0.0f;
        for (int i = threadIdx.x; i < dim; i += blockDim.x) {
            const float xv = bf16_to_f32(xr[i]);
            sum_sq += xv * xv;
            dot += xv * bf16_to_f32(gr[i]) * bf16_to_f32(weight[i]);
        }
        tr_block_sum2(sum_sq, dot);
        const float r = 1.0f / sqrtf(sum_sq / (float)dim + eps);
        const float c = r * r * r / (float)dim * dot;
        bf16* dr = dx + (size_t)row * dim;
        for (int i = threadIdx.x; i < dim; i += blockDim.x) {
            const float xv = bf16_to_f32(xr[i]);
            const float g = bf16_to_f32(gr[i]);
            if (want_dw) tr_rms_dw[i] += g * xv * r;
            const float o = r * bf16_to_f32(weight[i]) * g - c * xv;
            dr[i] = accumulate ? f32_to_bf16(bf16_to_f32(dr[i]) + bf16_to_f32(f32_to_bf16(o))) : f32_to_bf16(o);
        }
    }
    if (want_dw) {
        // Each thread owns the same columns in every loop above: no barrier needed before this.
        for (int i = threadIdx.x; i < dim; i += blockDim.x)
            dweight_partial[(size_t)blockIdx.x * dim + i] = tr_rms_dw[i];
    }
}

// ----------------------------------------------------------------------------
// SwiGLU backward (src/cpu/ops.rs::swiglu_bwd), σ = sigmoid(g):
//   dup = dy·g·σ,  dgate = dy·up·σ·(1 + g·(1 − σ))

static __device__ __forceinline__ void tr_swiglu_bwd(float g, float u, float dy, float* dg, float* du) {
    const float s = 1.0f / (1.0f + expf(-g));
    *du = dy * g * s;
    *dg = dy * u * s * (1.0f + g * (1.0f - s));
}

// gate, up, dy (n) bf16 → dgate, dup (n) bf16; dgate/dup may alias gate/up (each element is read
// before it is written, by the same thread). grid-stride; any grid/block. 8 elements per thread
// per step (16-byte accesses) when all five pointers are 16-byte aligned, then the n % 8 tail;
// scalar otherwise; same per-element arithmetic either way. Launcher: ceil(n/8) threads' worth of
// 256-thread blocks (capped at 65535 blocks).
extern "C" __global__ void swiglu_bwd_bf16(bf16* dgate, bf16* dup, const bf16* gate, const bf16* up,
                                           const bf16* __restrict__ dy, size_t n) {
    const size_t tid = (size_t)blockIdx.x * blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
    size_t done = 0;
    if (vec16_ok(dgate) && vec16_ok(dup) && vec16_ok(gate) && vec16_ok(up) && vec16_ok(dy)) {
        const size_t nv = n / 8;
        for (size_t v = tid; v < nv; v += stride) {
            float g[8], u[8], d[8];
            load8_bf16(gate + 8 * v, g);
            load8_bf16(up + 8 * v, u);
            load8_bf16(dy + 8 * v, d);
#pragma unroll
            for (int j = 0; j < 8; ++j) tr_swiglu_bwd(g[j], u[j], d[j], &g[j], &u[j]);
            store8_bf16(dgate + 8 * v, g);
            store8_bf16(dup + 8 * v, u);
        }
        done = nv * 8;
    }
    for (size_t i = done + tid; i < n; i += stride) {
        float dg, du;
        tr_swiglu_bwd(bf16_to_f32(gate[i]), bf16_to_f32(up[i]), bf16_to_f32(dy[i]), &dg, &du);
        dgate[i] = f32_to_bf16(dg);
        dup[i] = f32_to_bf16(du);
    }
}

// Fused layout (swiglu_fused_fwd_bf16): gate_up (rows, 2·inter), dy (rows, inter) →
// dgate_up (rows, 2·inter) (may alias gate_up). grid-stride over rows·inter, vectors of 8 as
// swiglu_bwd_bf16 when inter % 8 == 0 and the pointers are 16-byte aligned.
extern "C" __global__ void swiglu_fused_bwd_bf16(bf16* dgate_up, const bf16* gate_up, const bf16* __restrict__ dy,
                                                 int rows, int inter) {
    const size_t n = (size_t)rows * inter;
    const size_t tid = (size_t)blockIdx.x * blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
    if (inter % 8 == 0 && vec16_ok(dgate_up) && vec16_ok(gate_up) && vec16_ok(dy)) {
        const size_t per_row = (size_t)(inter / 8), nv = n / 8;
        for (size_t v = tid; v < nv; v += stride) {
            const size_t r = div_u64_fast(v, per_row);
            const size_t gi = r * 2 * inter + (v - r * per_row) * 8, ui = gi + inter;
            float g[8], u[8], d[8];
            load8_bf16(gate_up + gi, g);
            load8_bf16(gate_up + ui, u);
            load8_bf16(dy + 8 * v, d);
#pragma unroll
            for (int j = 0; j < 8; ++j) tr_swiglu_bwd(g[j], u[j], d[j], &g[j], &u[j]);
            store8_bf16(dgate_up + gi, g);
            store8_bf16(dgate_up + ui, u);
        }
        return;
    }
    for (size_t i = tid; i < n; i += stride) {
        const size_t r = i / inter, c = i % inter;
        const size_t gi = r * 2 * inter + c, ui = gi + inter;
        float dg, du;
        tr_swiglu_bwd(bf16_to_f32(gate_up[gi]), bf16_to_f32(gate_up[ui]), bf16_to_f32(dy[i]), &dg, &du);
        dgate_up[gi] = f32_to_bf16(dg);
        dgate_up[ui] = f32_to_bf16(du);
    }
}

// ----------------------------------------------------------------------------
// RoPE backward: the inverse rotation (rotation by −angle; src/cpu/ops.rs::rope_inplace with
// inverse = true), in place on dq (rows, n_heads, hd) and dk (rows, n_kv_heads, hd):
//   (g_i, g_{i+hd/2}) <- (g_i cos + g_{i+hd/2} sin, g_{i+hd/2} cos − g_i sin),  angle = pos·inv_freq[i]
// pos (rows) i32, inv_freq (hd/2) f32. rope_rows_bf16<true> (common.cuh): sincos once per
// (row, i) in shared memory, 8 pairs per thread when hd % 16 == 0 and dq, dk are 16-byte aligned.
// grid = ceil(rows / ROPE_ROWS), block = ROPE_THREADS, dynamic shared memory 2·ROPE_ROWS·(hd/2) f32.
extern "C" __global__ void rope_bwd_bf16(bf16* __restrict__ dq, bf16* __restrict__ dk, const int* __restrict__ pos,
                                         const float* __restrict__ inv_freq, int rows, int n_heads, int n_kv_heads,
                                         int hd) {
    rope_rows_bf16<true>(dq, dk, pos, inv_freq, rows, n_heads, n_kv_heads, hd);
}

// ----------------------------------------------------------------------------
// Optimiser on flat f32 buffers (all LoRA tensors of the adapter, concatenated).

// partials[b] = (Σ g² in f64, #non-finite g) over the grid-stride share of block b; the
// second pass is sum_partials_f64(fields = 2). The host then has ‖g‖² and the non-finite flag
// (→ skip the step, as src/optim/adamw.rs::clip_and_step). grid = norm blocks (n only), block = 256.
extern "C" __global__ void grad_sq_norm_partial_f32(double* __restrict__ partials, const float* __restrict__ g,
                                                    size_t n) {
    double ss = 0.0, bad = 0.0;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float v = g[i];
        ss += (double)v * (double)v;
        bad += isfinite(v) ? 0.0 : 1.0;
    }
    ss = tr_block_sum_f64(ss);
    bad = tr_block_sum_f64(bad);
    if (threadIdx.x == 0) {
        partials[(size_t)blockIdx.x * 2] = ss;
        partials[(size_t)blockIdx.x * 2 + 1] = bad;
    }
}

// One AdamW step (torch's single-tensor AdamW, src/optim/adamw.rs::AdamW::step) over n elements,
// element-wise in f32 in exactly the CPU's order, every operation an _rn intrinsic (no FMA
// contraction), so results are bit-identical to the CPU given the same scalars:
//   g = grad·clip_scale;  p ← p·decay;  m ← m + w1·(g − m);  v ← v·b2 + (w2·g)·g
//   p ← p − step_size·(m / (sqrt(v)/bc2_sqrt + eps))
// Scalars come from the host (AdamW::scalars: f64 math rounded once): decay = 1 − lr·wd (1 when
// wd = 0: p·1 = p exactly), w1 = 1 − β1, w2 = 1 − β2, step_size = lr/(1 − β1^t),
// bc2_sqrt = sqrt(1 − β2^t). grad_stats (NULL or sum_partials_f64's [Σg², #non-finite]): a
// non-zero count makes this a no-op, so the step can be skipped without a host round trip.
// The gradient is read, not written (the clipped value is not stored back). grid-stride.
extern "C" __global__ void adamw_step_f32(float* __restrict__ param, float* __restrict__ m, float* __restrict__ v,
                                          const float* __restrict__ grad, const double* __restrict__ grad_stats,
                                          size_t n, float clip_scale, float decay, float w1, float b2, float w2,
                                          float step_size, float bc2_sqrt, float eps) {
    if (grad_stats && grad_stats[1] != 0.0) return;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float g = __fmul_rn(grad[i], clip_scale);
        float p = __fmul_rn(param[i], decay);
        float mi = m[i], vi = v[i];
        mi = __fadd_rn(mi, __fmul_rn(w1, __fsub_rn(g, mi)));
        vi = __fadd_rn(__fmul_rn(vi, b2), __fmul_rn(__fmul_rn(w2, g), g));
        const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), bc2_sqrt), eps);
        p = __fsub_rn(p, __fmul_rn(step_size, __fdiv_rn(mi, denom)));
        param[i] = p;
        m[i] = mi;
        v[i] = vi;
    }
}

// ----------------------------------------------------------------------------
// Full fine-tuning: the embedding's gradient (src/cpu/train.rs::TrainForward::backward, the
// last loop). The linear weights' gradients are cuBLAS GEMMs and the norms' come from
// rmsnorm_bwd_bf16's dweight (src/cuda/train.rs).

// dembed (V, dim) f32 += the rows of dx (rows, dim) bf16 added into their tokens' rows: for each
// distinct token u < num_tokens of the micro-batch, dembed[tokens[u]] += dx[rows[i]] for i in
// row_off[u] .. row_off[u+1] (the token's rows, ascending, listed by the host). One block per
// distinct token (grid-stride over tokens), threads stride over columns, so each element is
// summed by one thread in row order (the CPU's order): deterministic, no atomics.
// tokens (num_tokens) distinct, < V; row_off (num_tokens + 1); rows (row_off[num_tokens]).
// grid = min(num_tokens, 65535), block = 256.
extern "C" __global__ void embedding_grad_bf16_to_f32(float* __restrict__ dembed, const bf16* __restrict__ dx,
                                                      const uint32_t* __restrict__ tokens,
                                                      const int* __restrict__ row_off, const int* __restrict__ rows,
                                                      int num_tokens, int dim) {
    for (int u = blockIdx.x; u < num_tokens; u += gridDim.x) {
        float* out = dembed + (size_t)tokens[u] * dim;
        const int r0 = row_off[u], r1 = row_off[u + 1];
        for (int c = threadIdx.x; c < dim; c += blockDim.x) {
            float acc = out[c];
            for (int i = r0; i < r1; ++i) acc += bf16_to_f32(dx[(size_t)rows[i] * dim + c]);
            out[c] = acc;
        }
    }
}
