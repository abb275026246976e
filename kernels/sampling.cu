// Token sampling and log-prob gathering over logits rows, for rollouts and the GRPO update.
//
// sample_tokens_{f32,bf16}: one block per row mirrors src/sampling.rs (its top comment is the
// spec) step by step: Philox4x32-10 with the same counter/key mapping and u = (w >> 8)·2^-24;
// greedy = first arg-max with logprob at T = 1; s = logits / T in f32 (IEEE division);
// w = exp((double)(s - m)); top-k by the k-th largest s counting duplicates; top-p over the
// survivors ordered by w descending, ties higher id first, keeping a token iff the mass before
// it is < top_p·total; min-p as w >= min_p; the draw walks ids ascending until acc > u·kept_total;
// logprob = (s[token] - m) - log(Σ w over the full vocabulary). All probability arithmetic f64.
//
// Instead of sorting, the kernel finds thresholds with radix selection on order-preserving
// integer keys of the values (8 bits per pass, a 256-bin shared histogram, one pass over the row
// each), recomputing s and w from the logits in every pass (no [rows, V] scratch):
//   top-k: the k-th largest s is found exactly (4 passes on the f32 key of s; count histograms).
//   top-p: the last kept token in the order (w desc, id desc) is found by descending a 64-bit key
//          (f32 key of d = s - m, then the id) with *mass* histograms: at each digit the last
//          non-empty bin whose preceding mass is < thr holds it (≤ 8 passes, stopping when that
//          bin holds one token). Equal d gives equal w, so ties are broken by id as on the CPU;
//          only distinct d with equal f64 w (|d| < 2^-53, or w subnormal) order differently.
//   draw:  each thread owns a contiguous chunk of ids, sums its kept w in id order, thread 0
//          scans the chunk sums in order, and each thread walks its chunk from its prefix.
//
// Where the float summation order differs from the CPU (and what it means):
//   - log Z = log Σ w: a block tree sum vs the CPU's sequential sum; both f64, relative
//     difference ~1e-15, invisible in the f32 logprob.
//   - top-p masses: bin sums with shared-memory f64 atomics (order not even fixed between runs)
//     vs a sequential walk in sorted order; top-p total: tree vs sequential.
//   - the draw's running sum: (sequential chunk prefix) + (sequential within chunk) vs one
//     sequential sum; kept_total is computed the same way as the walk, so the walk always ends.
// Each is an f64 rounding difference of ~1e-16 relative, so a kept set or a token can differ
// from the CPU only when a cumulative mass lands within ~1e-15 of top_p·total or of u·kept_total
// (probability ~1e-12 per draw); exp in f64 differs by ≤ 1 ulp from the CPU's libm, the same order.
//
// Fast path (sample_fast_{max,sum,pick}_*): greedy rows and rows with neither top-k nor top-p
// (min-p allowed: it is the threshold w >= min_p, as w_max = 1) — the GRPO case. One block per
// row leaves most SMs idle and re-reads the row in f64 several times, so these rows are split
// into chunks of SAMPLE_CHUNK = 4096 ids (a function of V alone, so a row's arithmetic never
// depends on the batch) over three launches:
//   max:  block (row, chunk): the chunk's max s (exact) and first arg-max, a NaN max marking a
//         NaN/+inf logit or an overflowing s;
//   sum:  block (row, chunk): m = max of the row's chunk maxima; Z_c = Σ w and K_c = Σ kept w,
//         w = exp((double)(s - m)) as above, each thread summing its 16 consecutive ids in order,
//         then the 32 thread sums of a warp in order, then the 8 warp sums in order;
//   pick: one block per row: Z = Σ Z_c, kept_total = Σ K_c (chunks in order), target =
//         u·kept_total, the first chunk whose running Σ K_c exceeds it, and the walk of that
//         chunk alone with the running sum formed as the sums were (see fast_pick_row), so it
//         always ends; logprob = (s[token] - m) - log Z; greedy: the first chunk arg-max = m.
// sample_tokens_* (skip_fast = 1) skip these rows, the fast kernels skip the others: the launcher
// always issues all four, whatever the parameters. Versus the single-block kernel only the f64
// summation orders of Z and of the draw's running sum differ (the same kind as below).
//
// Invalid rows (a NaN or +inf logit, every logit -inf, logits/T overflowing, or out-of-range
// parameters, all of which the CPU rejects with an error) get token 0xFFFFFFFF and logprob NaN.
//
// logprob_gather_{f32,bf16}: log_softmax(logits / T)[target] and the entropy of softmax(logits / T)
// per row in one pass (online softmax carrying (m, Z, S1 = Σ e^{s-m}(s-m))), no [rows, V] output.
//
// Rust launchers: src/cuda/rollout.rs.

#include "common.cuh"

#define SAMPLE_THREADS 512

// ----------------------------------------------------------------------------
// Philox4x32-10 and the uniform of src/sampling.rs::uniform

static __device__ __forceinline__ uint32_t philox4x32_10_first(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                                               uint32_t k0, uint32_t k1) {
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        const uint32_t hi0 = __umulhi(0xD2511F53u, c0);
        const uint32_t lo0 = 0xD2511F53u * c0;
        const uint32_t hi1 = __umulhi(0xCD9E8D57u, c2);
        const uint32_t lo1 = 0xCD9E8D57u * c2;
        const uint32_t n0 = hi1 ^ c1 ^ k0;
        const uint32_t n2 = hi0 ^ c3 ^ k1;
        c0 = n0;
        c1 = lo1;
        c2 = n2;
        c3 = lo0;
    }
    return c0;
}

// key = [seed lo, seed hi], counter = [step lo, step hi, stream lo, stream hi]; u = (w >> 8)·2^-24.
static __device__ __forceinline__ float philox_uniform(uint64_t seed, uint64_t stream, uint64_t step) {
    const uint32_t w = philox4x32_10_first((uint32_t)step, (uint32_t)(step >> 32), (uint32_t)stream,
                                           (uint32_t)(stream >> 32), (uint32_t)seed, (uint32_t)(seed >> 32));
    return (float)(w >> 8) * (1.0f / 16777216.0f);
}

// out[i] = uniform(seed[i], stream[i], step[i]) (exactly the CPU's f32). Any grid/block.
extern "C" __global__ void sampling_uniform_f32(float* __restrict__ out, const uint64_t* __restrict__ seed,
                                                const uint64_t* __restrict__ stream,
                                                const uint64_t* __restrict__ step, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = philox_uniform(seed[i], stream[i], step[i]);
}

// ----------------------------------------------------------------------------
// Keys and block reductions (blockDim.x a multiple of 32, ≤ 1024; every thread must call)

// Order-preserving map of a non-NaN f32 to u32 (ascending floats → ascending keys; -0 < +0 as
// total_cmp orders them).
static __device__ __forceinline__ uint32_t f32_order_key(float x) {
    const uint32_t u = __float_as_uint(x);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
static __device__ __forceinline__ float f32_from_order_key(uint32_t k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

static __device__ __forceinline__ double smp_block_sum_f64(double v) {
    __shared__ double partial[WARP_SIZE];
    const int lane = threadIdx.x % WARP_SIZE;
    const int warp = threadIdx.x / WARP_SIZE;
    for (int o = WARP_SIZE / 2; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x / WARP_SIZE) ? partial[lane] : 0.0;
    for (int o = WARP_SIZE / 2; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

static __device__ __forceinline__ int smp_block_min_int(int v) {
    __shared__ int partial[WARP_SIZE];
    const int lane = threadIdx.x % WARP_SIZE;
    const int warp = threadIdx.x / WARP_SIZE;
    for (int o = WARP_SIZE / 2; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(FULL_MASK, v, o));
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x / WARP_SIZE) ? partial[lane] : INT_MAX;
    for (int o = WARP_SIZE / 2; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

static __device__ __forceinline__ int smp_block_max_int(int v) {
    return -smp_block_min_int(-v);  // callers pass v ≥ -1, so -v never overflows
}

// ----------------------------------------------------------------------------
// Sampling

// Scaled logit s_i = x_i / T (T > 0) in IEEE f32 division, as the CPU's `x / t`.
template <typename T>
static __device__ __forceinline__ float scaled_logit(const T* __restrict__ x, int i, float temp) {
    return __fdiv_rn(load_f32(x + i), temp);
}

// d = s - m in f32 with -0 canonicalised to +0 (the CPU orders by w = exp(d), where ±0 tie).
static __device__ __forceinline__ float shifted(float s, float m) {
    const float d = __fsub_rn(s, m);
    return d == 0.0f ? 0.0f : d;
}

// ----------------------------------------------------------------------------
// Fast path: greedy rows and rows without top-k or top-p (min-p allowed), each row split into
// chunks of SAMPLE_CHUNK ids (the chunking depends on V alone, never on the batch).

#define SAMPLE_CHUNK 4096
#define SAMPLE_CHUNK_THREADS 256
#define SAMPLE_SUB (SAMPLE_CHUNK / SAMPLE_CHUNK_THREADS)  // consecutive ids per thread: 16
#define SAMPLE_CHUNK_WARPS (SAMPLE_CHUNK_THREADS / WARP_SIZE)
// Shared-memory slot of chunk offset i: one pad word per 32, so that thread t reading offset
// 16t + j (its own consecutive ids) and a warp writing 32 consecutive offsets are both free of
// bank conflicts.
#define SAMPLE_SLOT(i) ((i) + (i) / WARP_SIZE)
#define SAMPLE_SLOTS SAMPLE_SLOT(SAMPLE_CHUNK)

// Scratch of the fast path, per (row, chunk) with nc = ceil(V / SAMPLE_CHUNK) chunks per row,
// 3·rows·nc doubles: sums[2(row·nc + c)] = Z_c (Σ w over the chunk), [.. + 1] = K_c (Σ kept w);
// then maxes[row·nc + c] = (f32 bits of the chunk's max s, NaN if the chunk holds a NaN or +inf
// logit or an s overflowing to +inf; its first arg-max id) as uint2.
static __device__ __forceinline__ double* fast_sums(double* scratch) { return scratch; }
static __device__ __forceinline__ uint2* fast_maxes(double* scratch, int rows, int nc) {
    return reinterpret_cast<uint2*>(scratch + (size_t)2 * rows * nc);
}

// Parameters as SamplingParams::validate accepts them.
static __device__ __forceinline__ bool sample_params_ok(float temp, float tp, float mp) {
    return temp >= 0.0f && temp < INFINITY && tp > 0.0f && tp <= 1.0f && mp >= 0.0f && mp < 1.0f;
}

// Rows the fast path samples: greedy, or neither top-k nor top-p active (a NaN top_p counts as
// fast, where validation rejects it). sample_tokens_* with skip_fast = 1 skip exactly these.
static __device__ __forceinline__ bool sample_is_fast(float temp, int k, float tp, int vocab) {
    return temp == 0.0f || (!(k > 0 && k < vocab) && !(tp < 1.0f));
}

// Stages the s values of ids [lo, lo + SAMPLE_CHUNK) into sh (SAMPLE_SLOT layout), -inf past
// hi (w = 0: never kept, adds 0 to every sum). Coalesced loads; ends with a barrier.
template <typename T>
static __device__ __forceinline__ void fast_stage(float* sh, const T* __restrict__ x, int lo, int hi, float temp,
                                                  bool greedy) {
#pragma unroll
    for (int j = 0; j < SAMPLE_SUB; ++j) {
        const int o = j * SAMPLE_CHUNK_THREADS + (int)threadIdx.x;
        float s = -INFINITY;
        if (lo + o < hi) {
            const float v = load_f32(x + lo + o);
            s = greedy ? v : __fdiv_rn(v, temp);
        }
        sh[SAMPLE_SLOT(o)] = s;
    }
    __syncthreads();
}

// w of chunk offset 16·tid + j and whether the draw keeps it (w > 0 and, with min-p, w ≥ min_p).
struct FastW {
    double w;
    bool kept;
};
static __device__ __forceinline__ FastW fast_w(const float* sh, int j, float m, bool use_minp, double mp64) {
    const double w = exp((double)shifted(sh[SAMPLE_SLOT((int)threadIdx.x * SAMPLE_SUB + j)], m));
    return {w, w > 0.0 && (!use_minp || w >= mp64)};
}

// The row's m = max s over its chunk maxima and whether any chunk is invalid (every thread gets
// both; all threads must call).
static __device__ __forceinline__ float fast_row_max(const uint2* __restrict__ mx, int nc, int* bad) {
    int b = 0;
    float m = -INFINITY;
    for (int c = threadIdx.x; c < nc; c += blockDim.x) {
        const float v = __uint_as_float(mx[c].x);
        if (isnan(v)) b = 1;
        m = fmaxf(m, v);
    }
    *bad = __syncthreads_or(b);
    return block_reduce_max(m);
}

// Kernel 1, block (row, chunk): the chunk's max s (exact in f32) and its first arg-max.
template <typename T>
static __device__ void fast_max_chunk(double* __restrict__ scratch, const T* __restrict__ logits,
                                      const float* __restrict__ temperature, const int* __restrict__ top_k,
                                      const float* __restrict__ top_p, const float* __restrict__ min_p, int rows,
                                      int vocab) {
    const int nc = CEIL_DIV(vocab, SAMPLE_CHUNK);
    const int row = blockIdx.x / nc, c = blockIdx.x % nc;
    if (row >= rows) return;  // whole block
    const float temp = temperature[row], tp = top_p[row];
    if (!sample_is_fast(temp, top_k[row], tp, vocab) || !sample_params_ok(temp, tp, min_p[row])) return;
    const bool greedy = temp == 0.0f;
    const T* x = logits + (size_t)row * vocab;
    const int lo = c * SAMPLE_CHUNK, hi = min(lo + SAMPLE_CHUNK, vocab);
    int bad = 0;
    float best = -INFINITY;
    int arg = INT_MAX;
#pragma unroll
    for (int j = 0; j < SAMPLE_SUB; ++j) {
        const int i = lo + j * SAMPLE_CHUNK_THREADS + (int)threadIdx.x;  // ascending per thread
        if (i < hi) {
            const float v = load_f32(x + i);
            const float s = greedy ? v : __fdiv_rn(v, temp);
            if (isnan(v) || v == INFINITY || s == INFINITY) bad = 1;
            if (s > best) {  // strict: the thread keeps its first arg-max
                best = s;
                arg = i;
            }
        }
    }
    bad = __syncthreads_or(bad);
    const float m = block_reduce_max(best);
    const int first = smp_block_min_int(best == m ? arg : INT_MAX);
    if (threadIdx.x == 0)
        fast_maxes(scratch, rows, nc)[(size_t)row * nc + c] =
            make_uint2(bad ? 0x7fc00000u : __float_as_uint(m), (uint32_t)first);
}

// Kernel 2, block (row, chunk): Z_c and K_c with w = exp((double)(s - m)), m the row's max.
// Thread t sums its 16 consecutive ids in order, lane 0 of each warp sums its 32 threads' sums
// in order, thread 0 the 8 warp sums in order: the order fast_pick_row's walk reproduces.
template <typename T>
static __device__ void fast_sum_chunk(double* __restrict__ scratch, const T* __restrict__ logits,
                                      const float* __restrict__ temperature, const int* __restrict__ top_k,
                                      const float* __restrict__ top_p, const float* __restrict__ min_p, int rows,
                                      int vocab) {
    __shared__ float sh[SAMPLE_SLOTS];
    __shared__ double sh_z[SAMPLE_CHUNK_THREADS];
    __shared__ double sh_k[SAMPLE_CHUNK_THREADS];
    __shared__ double sh_wz[SAMPLE_CHUNK_WARPS];
    __shared__ double sh_wk[SAMPLE_CHUNK_WARPS];
    const int nc = CEIL_DIV(vocab, SAMPLE_CHUNK);
    const int row = blockIdx.x / nc, c = blockIdx.x % nc;
    if (row >= rows) return;
    const float temp = temperature[row], tp = top_p[row], mp = min_p[row];
    if (!sample_is_fast(temp, top_k[row], tp, vocab) || !sample_params_ok(temp, tp, mp)) return;
    const bool greedy = temp == 0.0f;
    const bool use_minp = !greedy && mp > 0.0f;
    const double mp64 = (double)mp;
    int bad;
    const float m = fast_row_max(fast_maxes(scratch, rows, nc) + (size_t)row * nc, nc, &bad);
    if (bad || m == -INFINITY) return;  // fast_pick_row marks the row invalid
    const int lo = c * SAMPLE_CHUNK;
    fast_stage(sh, logits + (size_t)row * vocab, lo, min(lo + SAMPLE_CHUNK, vocab), temp, greedy);
    double z = 0.0, k = 0.0;
#pragma unroll
    for (int j = 0; j < SAMPLE_SUB; ++j) {
        const FastW fw = fast_w(sh, j, m, use_minp, mp64);
        z += fw.w;
        if (fw.kept) k += fw.w;
    }
    const int tid = threadIdx.x, lane = tid % WARP_SIZE, warp = tid / WARP_SIZE;
    sh_z[tid] = z;
    sh_k[tid] = k;
    __syncthreads();
    if (lane == 0) {
        double a = 0.0, b = 0.0;
        for (int l = 0; l < WARP_SIZE; ++l) {
            a += sh_z[tid + l];
            b += sh_k[tid + l];
        }
        sh_wz[warp] = a;
        sh_wk[warp] = b;
    }
    __syncthreads();
    if (tid == 0) {
        double a = 0.0, b = 0.0;
        for (int w = 0; w < SAMPLE_CHUNK_WARPS; ++w) {
            a += sh_wz[w];
            b += sh_wk[w];
        }
        double* out = fast_sums(scratch) + 2 * ((size_t)row * nc + c);
        out[0] = a;
        out[1] = b;
    }
}

// Kernel 3, one block per row: log Z = log Σ_c Z_c and kept_total = Σ_c K_c (chunks in order),
// the chunk where the running Σ K_c first exceeds u·kept_total, and the walk of that chunk only.
// The walk's running sum at an id of thread (warp w, lane l) of chunk c is
//   P_c + (W_w + (L_l + acc))
// with P_c = Σ_{c'<c} K_c', W_w = Σ_{w'<w} (warp sums), L_l = Σ_{l'<l} (thread sums) and acc the
// thread's own running sum, every Σ sequential from 0 as fast_sum_chunk formed them: at the
// chunk's last kept id it equals P_c + K_c bitwise, which exceeds the target, so the walk ends.
template <typename T>
static __device__ void fast_pick_row(uint32_t* __restrict__ tokens, float* __restrict__ logprobs,
                                     double* __restrict__ scratch, const T* __restrict__ logits,
                                     const float* __restrict__ temperature, const int* __restrict__ top_k,
                                     const float* __restrict__ top_p, const float* __restrict__ min_p,
                                     const uint64_t* __restrict__ seed, const uint64_t* __restrict__ stream,
                                     const uint64_t* __restrict__ step, int rows, int vocab) {
    __shared__ float sh[SAMPLE_SLOTS];
    __shared__ double sh_a[SAMPLE_CHUNK_THREADS];
    __shared__ double sh_b[SAMPLE_CHUNK_THREADS];
    __shared__ double sh_w[SAMPLE_CHUNK_WARPS];
    __shared__ int sh_chunk;
    __shared__ double sh_prefix;
    __shared__ double sh_kept_total;
    const int row = blockIdx.x;
    if (row >= rows) return;
    const int tid = threadIdx.x, lane = tid % WARP_SIZE, warp = tid / WARP_SIZE;
    const float temp = temperature[row], tp = top_p[row], mp = min_p[row];
    if (!sample_is_fast(temp, top_k[row], tp, vocab)) return;  // sample_tokens_* samples it
    const bool greedy = temp == 0.0f;
    const int nc = CEIL_DIV(vocab, SAMPLE_CHUNK);
    const uint2* mx = fast_maxes(scratch, rows, nc) + (size_t)row * nc;
    const double* sums = fast_sums(scratch) + (size_t)2 * row * nc;
    const T* x = logits + (size_t)row * vocab;
    if (!sample_params_ok(temp, tp, mp)) {
        if (tid == 0) {
            tokens[row] = 0xFFFFFFFFu;
            logprobs[row] = __int_as_float(0x7fc00000);
        }
        return;
    }
    int bad;
    const float m = fast_row_max(mx, nc, &bad);
    if (bad || m == -INFINITY) {
        if (tid == 0) {
            tokens[row] = 0xFFFFFFFFu;
            logprobs[row] = __int_as_float(0x7fc00000);  // NaN
        }
        return;
    }

    // Z and kept_total, chunks in order (thread 0), staged through shared memory a block at a time.
    double z = 0.0, total = 0.0;
    for (int base = 0; base < nc; base += blockDim.x) {
        __syncthreads();
        if (base + tid < nc) {
            sh_a[tid] = sums[2 * (base + tid)];
            sh_b[tid] = sums[2 * (base + tid) + 1];
        }
        __syncthreads();
        if (tid == 0)
            for (int t = 0; t < min((int)blockDim.x, nc - base); ++t) {
                z += sh_a[t];
                total += sh_b[t];
            }
    }
    if (tid == 0) sh_kept_total = total;  // z stays with thread 0, which writes the logprob
    __syncthreads();
    total = sh_kept_total;
    if (greedy) {
        int first = INT_MAX;
        for (int c = tid; c < nc; c += blockDim.x)
            if (__uint_as_float(mx[c].x) == m) first = min(first, (int)mx[c].y);
        const int token = smp_block_min_int(first);
        if (tid == 0) {
            tokens[row] = (uint32_t)token;
            logprobs[row] = (float)((double)shifted(load_f32(x + token), m) - log(z));
        }
        return;
    }

    // The chunk where P_c + K_c first exceeds target (P_nc = total > target as u < 1 and the
    // max token's w = 1 is always kept, so one does; the last chunk is only a formal fallback).
    const double target = (double)philox_uniform(seed[row], stream[row], step[row]) * total;
    if (tid == 0) {
        sh_chunk = -1;
        sh_prefix = 0.0;
    }
    double run = 0.0;
    for (int base = 0; base < nc; base += blockDim.x) {
        __syncthreads();
        if (base + tid < nc) sh_b[tid] = sums[2 * (base + tid) + 1];
        __syncthreads();
        if (tid == 0 && sh_chunk < 0)
            for (int t = 0; t < min((int)blockDim.x, nc - base); ++t) {
                const double kc = sh_b[t];
                if (run + kc > target || base + t == nc - 1) {
                    sh_chunk = base + t;
                    sh_prefix = run;
                    break;
                }
                run += kc;
            }
    }
    __syncthreads();
    const int chunk = sh_chunk;
    const double p_c = sh_prefix;

    // Walk the chunk: thread sums, then exclusive prefixes L (per warp) and W (per chunk).
    const bool use_minp = mp > 0.0f;
    const double mp64 = (double)mp;
    const int lo = chunk * SAMPLE_CHUNK;
    fast_stage(sh, x, lo, min(lo + SAMPLE_CHUNK, vocab), temp, false);
    double k = 0.0;
    int last_kept = -1;
#pragma unroll
    for (int j = 0; j < SAMPLE_SUB; ++j) {
        const FastW fw = fast_w(sh, j, m, use_minp, mp64);
        if (fw.kept) {
            k += fw.w;
            last_kept = lo + tid * SAMPLE_SUB + j;
        }
    }
    sh_a[tid] = k;
    __syncthreads();
    if (lane == 0) {
        double a = 0.0;
        for (int l = 0; l < WARP_SIZE; ++l) {
            const double v = sh_a[tid + l];
            sh_a[tid + l] = a;
            a += v;
        }
        sh_w[warp] = a;
    }
    __syncthreads();
    if (tid == 0) {
        double a = 0.0;
        for (int w = 0; w < SAMPLE_CHUNK_WARPS; ++w) {
            const double v = sh_w[w];
            sh_w[w] = a;
            a += v;
        }
    }
    __syncthreads();
    const double l_t = sh_a[tid], w_t = sh_w[warp];
    int found = INT_MAX;
    double acc = 0.0;
    for (int j = 0; j < SAMPLE_SUB; ++j) {
        const FastW fw = fast_w(sh, j, m, use_minp, mp64);
        if (fw.kept) {
            acc += fw.w;
            if (p_c + (w_t + (l_t + acc)) > target) {
                found = lo + tid * SAMPLE_SUB + j;
                break;
            }
        }
    }
    int token = smp_block_min_int(found);
    if (token == INT_MAX) token = smp_block_max_int(last_kept);  // cannot happen (above)
    if (tid == 0) {
        tokens[row] = (uint32_t)token;
        logprobs[row] = (float)((double)shifted(scaled_logit(x, token, temp), m) - log(z));
    }
}

// The fast path (f32 and bf16 logits), launched with sample_tokens_* (skip_fast = 1) on the same
// arguments; scratch as above (3·rows·ceil(V / SAMPLE_CHUNK) doubles). In stream order:
// sample_fast_max_*, then sample_fast_sum_*: grid = rows·nc (block b = row·nc + chunk), block =
// SAMPLE_CHUNK_THREADS; then sample_fast_pick_*: grid = rows, block = SAMPLE_CHUNK_THREADS.
extern "C" __global__ void __launch_bounds__(SAMPLE_CHUNK_THREADS)
    sample_fast_max_f32(double* __restrict__ scratch, const float* __restrict__ logits,
                        const float* __restrict__ temperature, const int* __restrict__ top_k,
                        const float* __restrict__ top_p, const float* __restrict__ min_p, int rows, int vocab) {
    fast_max_chunk(scratch, logits, temperature, top_k, top_p, min_p, rows, vocab);
}
extern "C" __global__ void __launch_bounds__(SAMPLE_CHUNK_THREADS)
    sample_fast_max_bf16(double* __restrict__ scratch, const bf16* __restrict__ logits,
                         const float* __restrict__ temperature, const int* __restrict__ top_k,
                         const float* __restrict__ top_p, const float* __restrict__ min_p, int rows, int vocab) {
    fast_max_chunk(scratch, logits, temperature, top_k, top_p, min_p, rows, vocab);
}
extern "C" __global__ void __launch_bounds__(SAMPLE_CHUNK_THREADS)
    sample_fast_sum_f32(double* __restrict__ scratch, const float* __restrict__ logits,
                        const float* __restrict__ temperature, const int* __restrict__ top_k,
                        const float* __restrict__ top_p, const float* __restrict__ min_p, int rows, int vocab) {
    fast_sum_chunk(scratch, logits, temperature, top_k, top_p, min_p, rows, vocab);
}
extern "C" __global__ void __launch_bounds__(SAMPLE_CHUNK_THREADS)
    sample_fast_sum_bf16(double* __restrict__ scratch, const bf16* __restrict__ logits,
                         const float* __restrict__ temperature, const int* __restrict__ top_k,
                         const float* __restrict__ top_p, const float* __restrict__ min_p, int rows, int vocab) {
    fast_sum_chunk(scratch, logits, temperature, top_k, top_p, min_p, rows, vocab);
}
extern "C" __global__ void __launch_bounds__(SAMPLE_CHUNK_THREADS)
    sample_fast_pick_f32(uint32_t* __restrict__ tokens, float* __restrict__ logprobs, double* __restrict__ scratch,
                         const float* __restrict__ logits, const float* __restrict__ temperature,
                         const int* __restrict__ top_k, const float* __restrict__ top_p,
                         const float* __restrict__ min_p, const uint64_t* __restrict__ seed,
                         const uint64_t* __restrict__ stream, const uint64_t* __restrict__ step, int rows, int vocab) {
    fast_pick_row(tokens, logprobs, scratch, logits, temperature, top_k, top_p, min_p, seed, stream, step, rows, vocab);
}
extern "C" __global__ void __launch_bounds__(SAMPLE_CHUNK_THREADS)
    sample_fast_pick_bf16(uint32_t* __restrict__ tokens, float* __restrict__ logprobs, double* __restrict__ scratch,
                          const bf16* __restrict__ logits, const float* __restrict__ temperature,
                          const int* __restrict__ top_k, const float* __restrict__ top_p,
                          const float* __restrict__ min_p, const uint64_t* __restrict__ seed,
                          const uint64_t* __restrict__ stream, const uint64_t* __restrict__ step, int rows, int vocab) {
    fast_pick_row(tokens, logprobs, scratch, logits, temperature, top_k, top_p, min_p, seed, stream, step, rows, vocab);
}

template <typename T>
static __device__ void sample_row(uint32_t* __restrict__ tokens, float* __restrict__ logprobs,
                                  const T* __restrict__ logits, const float* __restrict__ temperature,
                                  const int* __restrict__ top_k, const float* __restrict__ top_p,
                                  const float* __restrict__ min_p, const uint64_t* __restrict__ seed,
                                  const uint64_t* __restrict__ stream, const uint64_t* __restrict__ step,
                                  int rows, int vocab, int skip_fast) {
    __shared__ double hist_mass[256];
    __shared__ unsigned int hist_cnt[256];
    __shared__ double chunk_prefix[1024];
    __shared__ int sh_digit;
    __shared__ unsigned int sh_rank;
    __shared__ double sh_before;
    __shared__ double sh_total;

    const int row = blockIdx.x;
    if (row >= rows) return;  // whole block
    const int tid = threadIdx.x;
    const int nthreads = blockDim.x;
    const T* x = logits + (size_t)row * vocab;
    const float temp = temperature[row];
    const bool greedy = temp == 0.0f;
    const float tp = top_p[row];
    const float mp = min_p[row];
    const int k = top_k[row];
    if (skip_fast && sample_is_fast(temp, k, tp, vocab)) return;  // the fast path's row

    // 0 + 2. Validation (as SamplingParams::validate and check_logits) and m = max s.
    int bad = !(temp >= 0.0f && temp < INFINITY) || !(tp > 0.0f && tp <= 1.0f) || !(mp >= 0.0f && mp < 1.0f);
    float m = -INFINITY;
    for (int i = tid; i < vocab; i += nthreads) {
        const float v = load_f32(x + i);
        if (isnan(v) || v == INFINITY) bad = 1;
        const float s = greedy ? v : __fdiv_rn(v, temp);
        if (s == INFINITY) bad = 1;
        m = fmaxf(m, s);
    }
    bad = __syncthreads_or(bad);
    m = block_reduce_max(m);
    if (bad || m == -INFINITY) {
        if (tid == 0) {
            tokens[row] = 0xFFFFFFFFu;
            logprobs[row] = __int_as_float(0x7fc00000);  // NaN
        }
        return;
    }

    // 3. log Z over the full vocabulary (unfiltered w); the first arg-max for greedy.
    double z = 0.0;
    int first_max = INT_MAX;
    for (int i = tid; i < vocab; i += nthreads) {
        const float s = greedy ? load_f32(x + i) : scaled_logit(x, i, temp);
        z += exp((double)shifted(s, m));
        if (s == m && i < first_max) first_max = i;
    }
    z = smp_block_sum_f64(z);
    const double log_z = log(z);
    if (greedy) {
        const int token = smp_block_min_int(first_max);
        if (tid == 0) {
            tokens[row] = (uint32_t)token;
            logprobs[row] = (float)((double)shifted(load_f32(x + token), m) - log_z);
        }
        return;
    }

    // 4. Top-k: kth = the k-th largest s (radix select on f32 keys, counts).
    const bool use_topk = k > 0 && k < vocab;
    float kth = -INFINITY;
    if (use_topk) {
        uint32_t prefix = 0, mask = 0;
        unsigned int rank = (unsigned int)k;  // 1-based rank among keys matching the prefix
        for (int shift = 24; shift >= 0; shift -= 8) {
            for (int b = tid; b < 256; b += nthreads) hist_cnt[b] = 0;
            __syncthreads();
            for (int i = tid; i < vocab; i += nthreads) {
                const uint32_t key = f32_order_key(scaled_logit(x, i, temp));
                if ((key & mask) == prefix) atomicAdd(&hist_cnt[(key >> shift) & 255u], 1u);
            }
            __syncthreads();
            if (tid == 0) {
                unsigned int cum = 0;
                int digit = 0;
                unsigned int left = rank;
                for (int b = 255; b >= 0; --b) {
                    const unsigned int c = hist_cnt[b];
                    if (cum + c >= rank) {
                        digit = b;
                        left = rank - cum;
                        break;
                    }
                    cum += c;
                }
                sh_digit = digit;
                sh_rank = left;
            }
            __syncthreads();
            prefix |= (uint32_t)sh_digit << shift;
            mask |= 255u << shift;
            rank = sh_rank;
        }
        kth = f32_from_order_key(prefix);
    }

    // Survivors of steps 3–4: w > 0 and (top-k off or s >= kth).
    // 5. Top-p: find the last kept token of the order (w desc, id desc) by its 64-bit key.
    const bool use_topp = tp < 1.0f;
    uint64_t p_prefix = 0, p_mask = 0;
    if (use_topp) {
        double total = 0.0;
        for (int i = tid; i < vocab; i += nthreads) {
            const float s = scaled_logit(x, i, temp);
            const double w = exp((double)shifted(s, m));
            if (w > 0.0 && (!use_topk || s >= kth)) total += w;
        }
        total = smp_block_sum_f64(total);
        const double thr = (double)tp * total;
        double before = 0.0;  // mass of the survivors ordered before the current prefix's range
        for (int shift = 56; shift >= 0; shift -= 8) {
            for (int b = tid; b < 256; b += nthreads) {
                hist_cnt[b] = 0;
                hist_mass[b] = 0.0;
            }
            __syncthreads();
            for (int i = tid; i < vocab; i += nthreads) {
                const float s = scaled_logit(x, i, temp);
                const float d = shifted(s, m);
                const double w = exp((double)d);
                if (!(w > 0.0 && (!use_topk || s >= kth))) continue;
                const uint64_t key = ((uint64_t)f32_order_key(d) << 32) | (uint32_t)i;
                if ((key & p_mask) != p_prefix) continue;
                const int digit = (int)((key >> shift) & 255u);
                atomicAdd(&hist_mass[digit], w);
                atomicAdd(&hist_cnt[digit], 1u);
            }
            __syncthreads();
            if (tid == 0) {
                // The last non-empty bin (descending) whose preceding mass is < thr; the first
                // non-empty bin always qualifies (its preceding mass was < thr one level up).
                double running = before;
                int chosen = -1;
                double chosen_before = before;
                unsigned int chosen_cnt = 0;
                for (int b = 255; b >= 0; --b) {
                    const unsigned int c = hist_cnt[b];
                    if (c == 0) continue;
                    if (!(running < thr) && chosen >= 0) break;
                    chosen = b;
                    chosen_before = running;
                    chosen_cnt = c;
                    running += hist_mass[b];
                }
                sh_digit = chosen < 0 ? 0 : chosen;
                sh_before = chosen_before;
                sh_rank = chosen_cnt;
            }
            __syncthreads();
            p_prefix |= (uint64_t)sh_digit << shift;
            p_mask |= (uint64_t)255u << shift;
            before = sh_before;
            if (sh_rank <= 1) break;  // one token in the bin: it is the last kept one
        }
    }

    // 6–7. Min-p and the draw: kept w summed per contiguous chunk of ids, chunks in order.
    const bool use_minp = mp > 0.0f;
    const double mp64 = (double)mp;
    const int chunk = CEIL_DIV(vocab, nthreads);
    const int lo = min(tid * chunk, vocab);
    const int hi = min(lo + chunk, vocab);
    auto kept_weight = [&](int i) -> double {
        const float s = scaled_logit(x, i, temp);
        const float d = shifted(s, m);
        const double w = exp((double)d);
        if (!(w > 0.0)) return 0.0;
        if (use_topk && !(s >= kth)) return 0.0;
        if (use_topp && ((((uint64_t)f32_order_key(d) << 32) | (uint32_t)i) & p_mask) < p_prefix) return 0.0;
        if (use_minp && w < mp64) return 0.0;
        return w;
    };
    double local = 0.0;
    int last_kept = -1;
    for (int i = lo; i < hi; ++i) {
        const double w = kept_weight(i);
        if (w > 0.0) {
            local += w;
            last_kept = i;
        }
    }
    chunk_prefix[tid] = local;
    __syncthreads();
    if (tid == 0) {
        double run = 0.0;
        for (int t = 0; t < nthreads; ++t) {
            const double c = chunk_prefix[t];
            chunk_prefix[t] = run;
            run += c;
        }
        sh_total = run;
    }
    __syncthreads();
    const double target = (double)philox_uniform(seed[row], stream[row], step[row]) * sh_total;
    const double prefix = chunk_prefix[tid];
    int found = INT_MAX;
    double acc = 0.0;
    for (int i = lo; i < hi; ++i) {
        const double w = kept_weight(i);
        if (w > 0.0) {
            acc += w;
            if (prefix + acc > target) {
                found = i;
                break;
            }
        }
    }
    int token = smp_block_min_int(found);
    if (token == INT_MAX) token = smp_block_max_int(last_kept);  // cannot happen: u < 1
    if (tid == 0) {
        tokens[row] = (uint32_t)token;
        logprobs[row] = (float)((double)shifted(scaled_logit(x, token, temp), m) - log_z);
    }
}

// logits (rows, vocab) f32; per-row parameters (rows): temperature (0 = greedy), top_k (0 = off),
// top_p (1 = off), min_p (0 = off), seed, stream (sequence id), step (token index in the
// sequence). Out: tokens (rows) u32, logprobs (rows) f32. grid = rows, block = SAMPLE_THREADS.
// skip_fast = 1: leave the rows of the fast path (sample_is_fast) to sample_fast_*; 0: every row.
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
    sample_tokens_f32(uint32_t* __restrict__ tokens, float* __restrict__ logprobs, const float* __restrict__ logits,
                      const float* __restrict__ temperature, const int* __restrict__ top_k,
                      const float* __restrict__ top_p, const float* __restrict__ min_p,
                      const uint64_t* __restrict__ seed, const uint64_t* __restrict__ stream,
                      const uint64_t* __restrict__ step, int rows, int vocab, int skip_fast) {
    sample_row(tokens, logprobs, logits, temperature, top_k, top_p, min_p, seed, stream, step, rows, vocab, skip_fast);
}

// As sample_tokens_f32 with bf16 logits (read exactly as f32).
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
    sample_tokens_bf16(uint32_t* __restrict__ tokens, float* __restrict__ logprobs, const bf16* __restrict__ logits,
                       const float* __restrict__ temperature, const int* __restrict__ top_k,
                       const float* __restrict__ top_p, const float* __restrict__ min_p,
                       const uint64_t* __restrict__ seed, const uint64_t* __restrict__ stream,
                       const uint64_t* __restrict__ step, int rows, int vocab, int skip_fast) {
    sample_row(tokens, logprobs, logits, temperature, top_k, top_p, min_p, seed, stream, step, rows, vocab, skip_fast);
}

// ----------------------------------------------------------------------------
// Log-prob gather with entropy

// Online softmax state over a set of s values: m = max, z = Σ e^{s-m}, s1 = Σ e^{s-m}(s-m).
struct SoftmaxStat {
    float m, z, s1;
};

static __device__ __forceinline__ SoftmaxStat softmax_merge(SoftmaxStat a, SoftmaxStat b) {
    if (a.m == -INFINITY) return b;  // empty (or all -inf) side: nothing to rescale
    if (b.m == -INFINITY) return a;
    const float mx = fmaxf(a.m, b.m);
    const float ea = expf(a.m - mx), eb = expf(b.m - mx);
    // Each term's (s - m) grows by (m - mx) when re-based on mx.
    return {mx, a.z * ea + b.z * eb, ea * (a.s1 + (a.m - mx) * a.z) + eb * (b.s1 + (b.m - mx) * b.z)};
}

static __device__ __forceinline__ SoftmaxStat softmax_warp_merge(SoftmaxStat v) {
    for (int o = WARP_SIZE / 2; o > 0; o >>= 1) {
        SoftmaxStat other;
        other.m = __shfl_xor_sync(FULL_MASK, v.m, o);
        other.z = __shfl_xor_sync(FULL_MASK, v.z, o);
        other.s1 = __shfl_xor_sync(FULL_MASK, v.s1, o);
        v = softmax_merge(v, other);
    }
    return v;
}

template <typename T>
static __device__ void logprob_gather_row(float* __restrict__ logprobs, float* __restrict__ entropy,
                                          const T* __restrict__ logits, const uint32_t* __restrict__ targets,
                                          float temperature, int rows, int vocab) {
    __shared__ SoftmaxStat partial[WARP_SIZE];
    const int row = blockIdx.x;
    if (row >= rows) return;
    const T* x = logits + (size_t)row * vocab;
    SoftmaxStat st = {-INFINITY, 0.0f, 0.0f};
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float s = __fdiv_rn(load_f32(x + i), temperature);
        if (s == -INFINITY) continue;  // probability 0, no entropy term
        if (s > st.m) {
            const float e = expf(st.m - s);  // 0 when st.m = -inf
            st.s1 = st.z == 0.0f ? 0.0f : e * (st.s1 + (st.m - s) * st.z);
            st.z = st.z * e + 1.0f;
            st.m = s;
        } else {
            const float e = expf(s - st.m);
            st.z += e;
            st.s1 += e * (s - st.m);
        }
    }
    st = softmax_warp_merge(st);
    const int lane = threadIdx.x % WARP_SIZE;
    const int warp = threadIdx.x / WARP_SIZE;
    if (lane == 0) partial[warp] = st;
    __syncthreads();
    if (warp == 0) {
        st = lane < (int)(blockDim.x / WARP_SIZE) ? partial[lane] : SoftmaxStat{-INFINITY, 0.0f, 0.0f};
        st = softmax_warp_merge(st);
        if (lane == 0) {
            const uint32_t t = targets[row];
            const float log_z = logf(st.z);
            logprobs[row] = t < (uint32_t)vocab
                                ? __fsub_rn(__fdiv_rn(load_f32(x + t), temperature), st.m) - log_z
                                : __int_as_float(0x7fc00000);
            entropy[row] = log_z - st.s1 / st.z;
        }
    }
}

// logprobs[r] = log_softmax(logits[r] / T)[targets[r]], entropy[r] = -Σ p log p of
// softmax(logits[r] / T). logits (rows, vocab) f32; targets (rows) u32 (out of range → NaN).
// grid = rows, block = multiple of 32.
extern "C" __global__ void logprob_gather_f32(float* __restrict__ logprobs, float* __restrict__ entropy,
                                              const float* __restrict__ logits, const uint32_t* __restrict__ targets,
                                              float temperature, int rows, int vocab) {
    logprob_gather_row(logprobs, entropy, logits, targets, temperature, rows, vocab);
}

// As logprob_gather_f32 with bf16 logits.
extern "C" __global__ void logprob_gather_bf16(float* __restrict__ logprobs, float* __restrict__ entropy,
                                               const bf16* __restrict__ logits, const uint32_t* __restrict__ targets,
                                               float temperature, int rows, int vocab) {
    logprob_gather_row(logprobs, entropy, logits, targets, temperature, rows, vocab);
}
