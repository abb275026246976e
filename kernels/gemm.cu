// Skinny GEMM for decode steps: Y (M, N) = X (M, K) · W (N, K)ᵀ with M ≤ 64 rows, bf16 inputs,
// f32 accumulation on tensor cores (mma.sync m16n8k16), Y bf16 (rounded once) or f32.
//
// Why: a decode step of 64 sequences multiplies 64 rows by every weight matrix once, so its
// GEMMs are bound by reading the weights (0.99 GB a step on Qwen2.5-0.5B). cuBLAS picks small
// tiles plus split-K with a separate reduce kernel for these shapes and reached ~1.2 TB/s
// (Nsight Compute on an H200: 5–9 µs per projection, 2.8 µs per reduce). Here every weight
// element is read from global memory exactly once per launch, 16 bytes at a time through a
// 4-stage cp.async pipeline, and the split-K partial sums are added by the last block of each
// column tile (no second launch).
//
// Layout of one launch: grid = (ceil(N / 64), S), block = 128 threads (4 warps).
//   Block (nb, s) owns output columns [64·nb, 64·nb + 64) and the k-chunks (64 wide)
//   [s·cps, min((s+1)·cps, ceil(K/64))): it streams that slab of W (64 rows) and of X (all M
//   rows, 16·MT of them with zero-filled padding) through shared memory. Warp w computes the
//   16 columns [16w, 16w + 16) of the tile for all rows: MT × 2 accumulator tiles of 16 × 8.
//   S = 1: the block rounds and writes Y. S > 1: it writes its f32 partial sums to
//   partial[s] (M, N), and the last of the S blocks of its column tile (an atomic counter per
//   tile, reset to 0 by that block, so a graph replays it) adds partial[0] + … + partial[S−1]
//   in that order and writes Y.
//
// Numerics: each output is Σ_k x·w in f32, in an order fixed by (K, S) alone: the mma's
// within-instruction order, then k-chunks in order, then the S partials in order. It does not
// depend on M or on the other rows, so a row's result is the same in a batch of 1 or of 64
// (batch invariance, unlike cuBLAS, which may pick another kernel per row count), and two runs
// are bit-identical (no float atomics).
//
// skinny_gemm_swiglu_m*_bf16: the same GEMM whose X is act = silu(gate) · up, computed per
// k-chunk in shared memory from the stacked gate|up output (the decode step's SwiGLU and down
// projection in one launch; bit-identical to swiglu_fused_fwd_bf16 then skinny_gemm_m*_bf16).
//
// Requirements (checked by the launcher, src/cuda/gemm.rs): K % 8 == 0 and 16-byte aligned X, W
// (every row starts 16-byte aligned), 1 ≤ M ≤ 64, S·cps ≥ ceil(K/64) > (S−1)·cps, partial
// holds S·M·N floats and counters ceil(N/64) zeros when S > 1.
// CPU reference: src/cpu/ops.rs (matmul of bf16 values in f32). Launchers: src/cuda/gemm.rs.

#include "common.cuh"

#define SK_NB 64                     // output columns per block
#define SK_KC 64                     // k per pipeline stage
#define SK_STAGES 4                  // cp.async pipeline depth
#define SK_LD (SK_KC + 8)            // shared row stride in bf16: 144 bytes, conflict-free ldmatrix
#define SK_THREADS 128
// Dynamic shared memory of the MT-row-tile kernel: STAGES × (64 W rows + 16·MT X rows) × LD bf16;
// the SwiGLU variant also 16·MT up rows per stage.
#define SK_SMEM(MT) (SK_STAGES * (SK_NB + 16 * (MT)) * SK_LD * 2)
#define SK_SMEM_SWIGLU(MT) (SK_STAGES * (SK_NB + 32 * (MT)) * SK_LD * 2)

// d += a · b: mma.m16n8k16 row.col, f32 accumulate; lane = 4g + t holds a0 = A(g, 2t..2t+1),
// a1 = A(g+8, 2t..), a2 = A(g, 2t+8..), a3 = A(g+8, 2t+8..), b0 = B(2t..2t+1, g),
// b1 = B(2t+8..2t+9, g); d0, d1 = C(g, 2t..2t+1), d2, d3 = C(g+8, 2t..2t+1).
static __device__ __forceinline__ void sk_mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ldmatrix .x4: lane L gives the address of row L % 8 of 8×8 matrix L / 8 (16-byte aligned);
// register i receives the lane's pair of matrix i: (row g, cols 2t, 2t+1).
static __device__ __forceinline__ void sk_ldsm_x4(uint32_t (&r)[4], const bf16* p) {
    const uint32_t addr = (uint32_t)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// 16 bytes global → shared, asynchronous; src_bytes (0 or 16) are read, the rest zero-filled.
static __device__ __forceinline__ void sk_cp_async16(bf16* smem, const bf16* gmem, int src_bytes) {
    const uint32_t addr = (uint32_t)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(gmem), "r"(src_bytes)
                 : "memory");
}
static __device__ __forceinline__ void sk_cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most the N newest committed groups of this thread are in flight.
template <int N> static __device__ __forceinline__ void sk_cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }


// SWIGLU: x is the stacked gate|up output (M, 2K) and the X operand is act = silu(gate) · up,
// computed per k-chunk in shared memory exactly as swiglu_fused_fwd_bf16 rounds it (one bf16
// rounding of silu_f32(g) · u), so Y is bit-identical to swiglu_fused_fwd_bf16 followed by the
// plain kernel; the blocks of column tile 0 also write act (M, K) to act_out when it is not null
// (the down projection's LoRA reads it). Shared memory: a third region of 16·MT up rows per stage.
template <int MT, typename OutT, bool SWIGLU>
static __device__ __forceinline__ void skinny_gemm(OutT* __restrict__ y, const bf16* __restrict__ x,
                                                   const bf16* __restrict__ w, float* __restrict__ partial,
                                                   unsigned* __restrict__ counters, int M, int N, int K, int cps,
                                                   bf16* __restrict__ act_out) {
    extern __shared__ __align__(16) bf16 sk_smem[];
    __shared__ int sk_last;
    const int nb = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
    const int n0 = nb * SK_NB;
    const int c0 = split * cps;
    const int nch = min(c0 + cps, CEIL_DIV(K, SK_KC)) - c0;  // ≥ 1 (launcher)
    const int tid = threadIdx.x, warp = tid / WARP_SIZE, lane = tid % WARP_SIZE;
    bf16* ws = sk_smem;                                 // [STAGES][64][LD]   W rows n0..n0+63
    bf16* xs = sk_smem + SK_STAGES * SK_NB * SK_LD;     // [STAGES][16·MT][LD] X rows 0..16·MT−1
    bf16* us = xs + SK_STAGES * 16 * MT * SK_LD;        // SWIGLU: [STAGES][16·MT][LD] up rows
    const int ldx = SWIGLU ? 2 * K : K;                 // row stride of x

    // Chunk c of this block (k from (c0 + c)·64) into stage slot `slot`: 8 bf16 per copy.
    auto load = [&](int c, int slot) {
        const int kbase = (c0 + c) * SK_KC;
        bf16* wd = ws + slot * SK_NB * SK_LD;
        for (int p = tid; p < SK_NB * (SK_KC / 8); p += SK_THREADS) {
            const int r = p / (SK_KC / 8), kk = p % (SK_KC / 8) * 8;
            const bool ok = n0 + r < N && kbase + kk < K;
            sk_cp_async16(wd + r * SK_LD + kk, ok ? w + (size_t)(n0 + r) * K + kbase + kk : w, ok ? 16 : 0);
        }
        bf16* xd = xs + slot * 16 * MT * SK_LD;
        for (int p = tid; p < 16 * MT * (SK_KC / 8); p += SK_THREADS) {
            const int r = p / (SK_KC / 8), kk = p % (SK_KC / 8) * 8;
            const bool ok = r < M && kbase + kk < K;
            const bf16* src = x + (size_t)r * ldx + kbase + kk;
            sk_cp_async16(xd + r * SK_LD + kk, ok ? src : x, ok ? 16 : 0);
            if (SWIGLU) sk_cp_async16(us + slot * 16 * MT * SK_LD + r * SK_LD + kk, ok ? src + K : x, ok ? 16 : 0);
        }
    };

    float acc[MT][2][4];
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[m][j][e] = 0.0f;

#pragma unroll
    for (int s = 0; s < SK_STAGES - 1; ++s) {
        if (s < nch) load(s, s);
        sk_cp_async_commit();  // possibly empty: keeps the group count per chunk fixed
    }
    const int i4 = lane / 8, r8 = lane % 8;  // ldmatrix: this lane's matrix and row in it
    for (int c = 0; c < nch; ++c) {
        sk_cp_async_wait<SK_STAGES - 2>();  // chunk c has landed (this thread's copies) …
        __syncthreads();                     // … everyone's, and chunk c − 1's slot is free
        if (c + SK_STAGES - 1 < nch) load(c + SK_STAGES - 1, (c + SK_STAGES - 1) % SK_STAGES);
        sk_cp_async_commit();
        if (SWIGLU) {
            // act = silu(gate) · up over the chunk, in place of gate (padding: silu(0)·0 = 0).
            bf16* gt = xs + (c % SK_STAGES) * 16 * MT * SK_LD;
            const bf16* ut = us + (c % SK_STAGES) * 16 * MT * SK_LD;
            const int kbase = (c0 + c) * SK_KC;
            for (int p = tid; p < 16 * MT * (SK_KC / 8); p += SK_THREADS) {
                const int r = p / (SK_KC / 8), kk = p % (SK_KC / 8) * 8;
                float g[8], u[8];
                load8_bf16(gt + r * SK_LD + kk, g);
                load8_bf16(ut + r * SK_LD + kk, u);
#pragma unroll
                for (int j = 0; j < 8; ++j) g[j] = silu_f32(g[j]) * u[j];
                store8_bf16(gt + r * SK_LD + kk, g);
                if (act_out != nullptr && nb == 0 && r < M && kbase + kk < K)
                    *reinterpret_cast<uint4*>(act_out + (size_t)r * K + kbase + kk) =
                        *reinterpret_cast<const uint4*>(gt + r * SK_LD + kk);
            }
            __syncthreads();
        }
        const bf16* wt = ws + (c % SK_STAGES) * SK_NB * SK_LD + warp * 16 * SK_LD;
        const bf16* xt = xs + (c % SK_STAGES) * 16 * MT * SK_LD;
#pragma unroll
        for (int kk = 0; kk < SK_KC; kk += 16) {
            // B fragments of the warp's 2 n8 tiles: matrices (n 0–7, k 0–7), (n 0–7, k 8–15),
            // (n 8–15, k 0–7), (n 8–15, k 8–15) of W's rows (k contiguous = B column-major).
            uint32_t b[4];
            sk_ldsm_x4(b, wt + (i4 / 2 * 8 + r8) * SK_LD + kk + i4 % 2 * 8);
#pragma unroll
            for (int m = 0; m < MT; ++m) {
                // A fragment of rows 16m..16m+15: matrices (rows 0–7, k 0–7), (rows 8–15, k 0–7),
                // (rows 0–7, k 8–15), (rows 8–15, k 8–15).
                uint32_t a[4];
                sk_ldsm_x4(a, xt + (m * 16 + i4 % 2 * 8 + r8) * SK_LD + kk + i4 / 2 * 8);
                sk_mma(acc[m][0], a, b[0], b[1]);
                sk_mma(acc[m][1], a, b[2], b[3]);
            }
        }
    }

    const int g = lane / 4, t = lane % 4;
    if (splits == 1) {
#pragma unroll
        for (int m = 0; m < MT; ++m)
#pragma unroll
            for (int j = 0; j < 2; ++j)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int row = m * 16 + g + 8 * h, col = n0 + warp * 16 + j * 8 + 2 * t;
                    if (row >= M) continue;
                    if (col < N) store_f32(y + (size_t)row * N + col, acc[m][j][2 * h]);
                    if (col + 1 < N) store_f32(y + (size_t)row * N + col + 1, acc[m][j][2 * h + 1]);
                }
        return;
    }
    float* mine = partial + (size_t)split * M * N;
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int row = m * 16 + g + 8 * h, col = n0 + warp * 16 + j * 8 + 2 * t;
                if (row >= M) continue;
                if (col < N) mine[(size_t)row * N + col] = acc[m][j][2 * h];
                if (col + 1 < N) mine[(size_t)row * N + col + 1] = acc[m][j][2 * h + 1];
            }
    __threadfence();  // this block's partials are visible device-wide before it counts itself
    __syncthreads();
    if (tid == 0) sk_last = atomicAdd(counters + nb, 1u) == (unsigned)(splits - 1);
    __syncthreads();
    if (!sk_last) return;
    __threadfence();  // the other blocks' partials, counted before this block's, are visible
    // (read with __ldcg: through L2, never a stale L1 line)
    const int cols = min(SK_NB, N - n0);
    if (N % 4 == 0) {
        // 16-byte loads (N % 4 == 0: every (row, 4k-th column) is 16-byte aligned in partial),
        // the split loop outside so that each thread's 2·MT loads of one split are in flight
        // together (the tile's 64·16·MT·4 bytes × S come from L2 at once, not one latency per
        // element); each element still adds partial[0], partial[1], … in order.
        constexpr int EPT = 2 * MT;  // ≥ 16·MT rows × 16 float4 columns / 128 threads
        const int c4 = cols / 4, total = M * c4;
        float4 sum[EPT];
#pragma unroll
        for (int i = 0; i < EPT; ++i) sum[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll 2
        for (int s = 0; s < splits; ++s) {
#pragma unroll
            for (int i = 0; i < EPT; ++i) {
                const int e = tid + i * SK_THREADS;
                if (e < total) {
                    const float* src = partial + ((size_t)s * M + e / c4) * N + n0 + e % c4 * 4;
                    const float4 p = __ldcg(reinterpret_cast<const float4*>(src));
                    sum[i].x += p.x;
                    sum[i].y += p.y;
                    sum[i].z += p.z;
                    sum[i].w += p.w;
                }
            }
        }
#pragma unroll
        for (int i = 0; i < EPT; ++i) {
            const int e = tid + i * SK_THREADS;
            if (e < total) {
                OutT* yr = y + (size_t)(e / c4) * N + n0 + e % c4 * 4;
                store_f32(yr, sum[i].x);
                store_f32(yr + 1, sum[i].y);
                store_f32(yr + 2, sum[i].z);
                store_f32(yr + 3, sum[i].w);
            }
        }
    } else {
        for (int e = tid; e < M * cols; e += SK_THREADS) {
            const int row = e / cols, col = n0 + e % cols;
            float sum = 0.0f;
            for (int s = 0; s < splits; ++s) sum += __ldcg(partial + ((size_t)s * M + row) * N + col);
            store_f32(y + (size_t)row * N + col, sum);
        }
    }
    if (tid == 0) counters[nb] = 0;  // ready for the next launch (or graph replay)
}

#define SK_DEFINE(ROWS, MT)                                                                                       \
    extern "C" __global__ void __launch_bounds__(SK_THREADS)                                                     \
        skinny_gemm_m##ROWS##_bf16(bf16* __restrict__ y, const bf16* __restrict__ x, const bf16* __restrict__ w, \
                                   float* __restrict__ partial, unsigned* __restrict__ counters, int M, int N,   \
                                   int K, int cps) {                                                             \
        skinny_gemm<MT, bf16, false>(y, x, w, partial, counters, M, N, K, cps, nullptr);                         \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(SK_THREADS)                                                     \
        skinny_gemm_m##ROWS##_f32(float* __restrict__ y, const bf16* __restrict__ x, const bf16* __restrict__ w, \
                                  float* __restrict__ partial, unsigned* __restrict__ counters, int M, int N,    \
                                  int K, int cps) {                                                              \
        skinny_gemm<MT, float, false>(y, x, w, partial, counters, M, N, K, cps, nullptr);                        \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(SK_THREADS) skinny_gemm_swiglu_m##ROWS##_bf16(                  \
        bf16* __restrict__ y, const bf16* __restrict__ gate_up, const bf16* __restrict__ w,                      \
        float* __restrict__ partial, unsigned* __restrict__ counters, int M, int N, int K, int cps,              \
        bf16* __restrict__ act_out) {                                                                            \
        skinny_gemm<MT, bf16, true>(y, gate_up, w, partial, counters, M, N, K, cps, act_out);                    \
    }
SK_DEFINE(16, 1)
SK_DEFINE(32, 2)
SK_DEFINE(48, 3)
SK_DEFINE(64, 4)

// Holds the stream for about `cycles` SM clock cycles (one thread). The GEMM autotuner
// (src/cuda/gemm.rs) launches it first so that the candidates' launches are all queued before
// the GPU reaches them: the events then time the kernels back to back, as a CUDA graph replays
// them, not the host's launch overhead.
extern "C" __global__ void gemm_tune_spin(long long cycles) {
    const long long start = clock64();
    while (clock64() - start < cycles) {
    }
}
