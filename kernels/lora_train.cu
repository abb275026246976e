// LoRA for the training step on tensor cores: the projection's low-rank term forward, its input
// gradient and the A / B gradients over N packed rows (thousands to tens of thousands).
//
// Chain rule (y = x Wᵀ + s·(x Aᵀ) Bᵀ, x (n, in), A (r, in), B (out, r), dy = dL/dy (n, out)):
//   xa  (n, r)   = x Aᵀ                      forward, kept for the backward (it is u = x Aᵀ)
//   y   (n, out) += s · xa Bᵀ                 lora_train_fwd_r*_bf16       (one fused kernel)
//   dyb (n, r)   = dy B                       backward
//   dx  (n, in)  += s · dyb A                 lora_train_bwd_dx_r*_bf16    (one fused kernel)
//   dB  (out, r) += s · dyᵀ xa                lora_train_grad_r*_bf16 (p = out rows of dy)
//   dA  (r, in)  += s · dybᵀ x                lora_train_grad_r*_bf16 (p = in rows of x, stored ᵀ)
// Multiplying through the rank-r side first (as Unsloth's fast_lora), W + BA is never formed.
//
// LoRA dropout (x̃ = x ⊙ m, m = 0 or 1/(1−p) per entry, on the input of A only):
//   x̃   (n, in)  = x ⊙ m                      lora_dropout_bf16 (the forward and dA read x̃)
//   dx  (n, in)  += s · (dyb A) ⊙ m           lora_train_bwd_dx_drop_r*_bf16 (the mask in the
//                                             fused kernel's epilogue)
// m is lt_dropout_factor: a pure hash of (seed, layer, projection, row, column), bit for bit
// the CPU reference's crate::cpu::train::dropout_factor, so a recomputed forward and the
// backward see the forward's mask without storing it.
// Precision (as HF + peft training in bf16): x, dy, A, B are bf16 operands (A and B are bf16
// copies of the f32 master weights, refreshed after every optimizer step), every product is an
// mma.sync m16n8k16 with f32 accumulation, xa and dyb are rounded to bf16 once (in registers,
// before the second product, and that same value is what is stored), y and dx are read, added to
// in f32 and rounded to bf16 once, dA and dB stay f32.
//
// The two fused kernels share one body (lt_fused): per block, BM = 64 rows (16 per warp, 4 warps):
//   phase 1: low (64 × RP) = act (64 × K) · W1 (K × RP), K walked in chunks of 64 staged in shared
//            memory; RP = the rank rounded up to the compiled 16, 32, 64 or 128 (rank columns
//            ≥ r are zero in shared memory, so any r ≤ 128 runs). Accumulators: 16 × RP f32 per
//            warp in mma C layout, rounded to bf16 A fragments for phase 2 without leaving
//            registers, and stored to low_out (n, r) bf16.
//   phase 2: for each 64-column chunk of the output: out tile (64 × 64) and W2 chunk staged in
//            shared memory, out_tile += s · low · W2 (mma), the tile written back with 16-byte
//            stores: y / dx are read once and written once.
//   forward:  act = x (K = in),  W1(k, j) = A[j, k],  W2(j, o) = B[o, j],  out = y (N = out)
//   backward: act = dy (K = out), W1(k, j) = B[k, j], W2(j, i) = A[j, i],  out = dx (N = in)
// `accumulate` = 0 (store mode) writes out = bf16(s · low · W2) without reading out: the trainer
// then adds the base GEMM onto it (cuBLAS beta = 1, whose read of C hides under its math), which
// saves this memory-bound kernel the read of y / dx.
// A second grid dimension splits the output chunks over blocks when the row tiles alone would
// leave the GPU idle (small n); each such block recomputes phase 1 (identical values), only
// blockIdx.y == 0 stores low_out. Every output element is written by exactly one block.
//
// The gradient kernel (lt_grad): G[p, j] = Σ_m act[m, p] · low[m, j] over a fixed split of the
// rows: block (p tile of 64, split z) walks rows [z·rows_per_split, (z+1)·rows_per_split) in
// chunks of 64, warp w owns p rows 16w..16w+15 of the tile, act is read through transposing
// ldmatrix (the rows m are the reduction index). One split writes scale·G straight into the
// gradient (+=); more write raw partials (splits, out layout) that sum_partials_add_f32
// (kernels/train.cu) adds in split order. dB: act = dy, low = xa, G stored (out, r); dA:
// act = x, low = dyb, G stored transposed (r, in). The split depends on the problem size only
// (src/cuda/lora_train.rs), so the summation order, and the result, is the same on every GPU.
//
// Loads: tiles move global → registers → shared memory in 16-byte pieces, the next chunk's loads
// issued before the current chunk's mma (double-buffered shared memory, one barrier per chunk in
// phase 1 and the gradient). Pieces that are misaligned or cross the matrix edge fall back to
// element loads with zero fill, so any n, in, out, r ≤ 128 and any element offset work; the
// 16-byte path is taken when a row has 8 elements left and its address is 16-byte aligned.
//
// Rust launchers: src/cuda/lora_train.rs. Tests: tests/cuda_lora_train.rs (f64 host oracle) and
// the CPU emulator scripts/kernel_emu/run.sh lora_train (no GPU needed).

#include "common.cuh"

#define LT_WARPS 4
#define LT_THREADS (LT_WARPS * WARP_SIZE)
#define LT_BM 64  // rows per fused block (16 per warp); rows per gradient chunk
#define LT_BK 64  // K chunk of phase 1; output chunk of phase 2; p tile of the gradient
#define LT_PAD 8  // bf16 padding per shared-memory row (the 8 rows of an 8×8 matrix hit distinct banks)
#define LT_LDK (LT_BK + LT_PAD)

// ----------------------------------------------------------------------------
// Warp-level mma helpers (the fragment layouts are those of kernels/attention_train.cu). Lane =
// 4·g + t. m16n8k16: A (16×16 row-major) regs (g, 2t..), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..);
// B (16×8, k × n) regs (k 2t.., n g), (k 2t+8.., n g); C (16×8 f32) (g, 2t..), (g+8, 2t..).

// d += a · b (m16n8k16, bf16 inputs, f32 accumulate).
static __device__ __forceinline__ void lt_mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ldmatrix .x4 (.trans): lane L gives the address of row L % 8 of 8×8 matrix L / 8.
static __device__ __forceinline__ void lt_ldsm_x4(uint32_t (&r)[4], const bf16* p) {
    const uint32_t addr = (uint32_t)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

static __device__ __forceinline__ void lt_ldsm_x4_trans(uint32_t (&r)[4], const bf16* p) {
    const uint32_t addr = (uint32_t)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

static __device__ __forceinline__ uint32_t lt_pack_f32(float lo, float hi) {
    return (uint32_t)__bfloat16_as_ushort(f32_to_bf16(lo)) | ((uint32_t)__bfloat16_as_ushort(f32_to_bf16(hi)) << 16);
}

// A fragment, rows r0..r0+15 × cols c0..c0+15 of a row-major tile (A(r, c) = base[r·ld + c]).
static __device__ __forceinline__ void lt_frag_a(uint32_t (&a)[4], const bf16* base, int ld, int r0, int c0,
                                                 int lane) {
    const int mat = lane / 8;
    lt_ldsm_x4(a, base + (r0 + (mat & 1) * 8 + lane % 8) * ld + c0 + (mat >> 1) * 8);
}

// A fragment of a tile stored transposed (A(r, c) = base[c·ld + r]), through the transposing
// load: matrix 0 = stored (c0.., r0..), 1 = (c0.., r0+8..), 2 = (c0+8.., r0..), 3 = (c0+8.., r0+8..).
static __device__ __forceinline__ void lt_frag_a_t(uint32_t (&a)[4], const bf16* base, int ld, int r0, int c0,
                                                   int lane) {
    const int mat = lane / 8;
    lt_ldsm_x4_trans(a, base + (c0 + (mat >> 1) * 8 + lane % 8) * ld + r0 + (mat & 1) * 8);
}

// B fragments (k0..k0+15) × (n0..n0+7) → b[0], b[1] and × (n0+8..n0+15) → b[2], b[3] of a tile
// stored n-major (B(k, n) = base[n·ld + k]).
static __device__ __forceinline__ void lt_frag_b_nk(uint32_t (&b)[4], const bf16* base, int ld, int k0, int n0,
                                                    int lane) {
    const int mat = lane / 8;
    lt_ldsm_x4(b, base + (n0 + (mat >> 1) * 8 + lane % 8) * ld + k0 + (mat & 1) * 8);
}

// The same of a tile stored k-major (B(k, n) = base[k·ld + n]), through the transposing load.
static __device__ __forceinline__ void lt_frag_b_kn(uint32_t (&b)[4], const bf16* base, int ld, int k0, int n0,
                                                    int lane) {
    const int mat = lane / 8;
    lt_ldsm_x4_trans(b, base + (k0 + (mat & 1) * 8 + lane % 8) * ld + n0 + (mat >> 1) * 8);
}

// ----------------------------------------------------------------------------
// LoRA dropout mask.

// One projection's dropout: keep probability 1 − p, kept entries scaled by keep_scale = 1/(1−p)
// (computed on the host in f32, as the CPU does), seed of the micro-batch, site = (layer << 56) ^
// (projection << 48).
struct LtDrop {
    float p;
    float keep_scale;
    unsigned long long seed;
    unsigned long long site;
};

// The mask value of entry (row, col): 0 or keep_scale. splitmix64 of seed + (site ^ row << 24 ^
// col), its top 24 bits as u ∈ [0, 1) (exact in f32), dropped when u < p: the CPU's
// dropout_factor bit for bit (same integer hash, same f32 compare).
static __device__ __forceinline__ float lt_dropout_factor(const LtDrop& d, int row, int col) {
    unsigned long long z = d.seed + (d.site ^ ((unsigned long long)row << 24) ^ (unsigned long long)col);
    z *= 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    const float u = (float)(z >> 40) / 16777216.0f;
    return u < d.p ? 0.0f : d.keep_scale;
}

// ----------------------------------------------------------------------------
// Tiles: global ⇄ registers ⇄ shared memory in 16-byte pieces.

// 8 consecutive bf16 from p of which `valid` (≥ 1) exist; the rest read as 0.
static __device__ __forceinline__ uint4 lt_load8(const bf16* __restrict__ p, int valid) {
    if (valid >= 8 && ((uintptr_t)p & 15) == 0) return *reinterpret_cast<const uint4*>(p);
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const uint32_t lo = 2 * i < valid ? (uint32_t)__bfloat16_as_ushort(p[2 * i]) : 0u;
        const uint32_t hi = 2 * i + 1 < valid ? (uint32_t)__bfloat16_as_ushort(p[2 * i + 1]) : 0u;
        w[i] = lo | (hi << 16);
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
}

// Stores the first min(valid, 8) of the 8 bf16 in v to p.
static __device__ __forceinline__ void lt_store8(bf16* p, int valid, uint4 v) {
    if (valid >= 8 && ((uintptr_t)p & 15) == 0) {
        *reinterpret_cast<uint4*>(p) = v;
        return;
    }
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 8; ++i)
        if (i < valid) p[i] = __ushort_as_bfloat16((unsigned short)(w[i / 2] >> (16 * (i % 2))));
}

// An R × C tile of a row-major bf16 matrix (row stride ld) at (row0, col0), held in registers by
// the whole block: thread i holds pieces i, i + LT_THREADS, ... (piece e = row e / (C/8), columns
// 8·(e % (C/8)) ..+7). Elements at rows ≥ row_end or columns ≥ col_end are 0. In shared memory the
// tile has row stride C + LT_PAD.
template <int R, int C>
struct LtTile {
    static constexpr int CPR = C / 8;
    static constexpr int PER = R * CPR / LT_THREADS;
    static_assert(C % 8 == 0 && (R * CPR) % LT_THREADS == 0, "tile pieces must divide evenly over the block");
    uint4 v[PER];

    __device__ __forceinline__ void fetch(const bf16* __restrict__ src, size_t ld, int row0, int row_end, int col0,
                                          int col_end) {
#pragma unroll
        for (int i = 0; i < PER; ++i) {
            const int e = threadIdx.x + i * LT_THREADS;
            const int r = row0 + e / CPR, c = col0 + (e % CPR) * 8;
            v[i] = (r < row_end && c < col_end) ? lt_load8(src + (size_t)r * ld + c, col_end - c) : make_uint4(0u, 0u, 0u, 0u);
        }
    }

    __device__ __forceinline__ void stash(bf16* dst) const {
#pragma unroll
        for (int i = 0; i < PER; ++i) {
            const int e = threadIdx.x + i * LT_THREADS;
            *reinterpret_cast<uint4*>(dst + (e / CPR) * (C + LT_PAD) + (e % CPR) * 8) = v[i];
        }
    }

    // The tile in shared memory (src, row stride C + LT_PAD) back to the matrix, in-range elements only.
    static __device__ __forceinline__ void put(bf16* dst, size_t ld, int row0, int row_end, int col0, int col_end,
                                               const bf16* src) {
#pragma unroll
        for (int i = 0; i < PER; ++i) {
            const int e = threadIdx.x + i * LT_THREADS;
            const int r = row0 + e / CPR, c = col0 + (e % CPR) * 8;
            if (r < row_end && c < col_end)
                lt_store8(dst + (size_t)r * ld + c, col_end - c,
                          *reinterpret_cast<const uint4*>(src + (e / CPR) * (C + LT_PAD) + (e % CPR) * 8));
        }
    }
};

// ----------------------------------------------------------------------------
// Fused low-rank product: low = act · W1 (rounded to bf16), out += scale · low · W2.

// Shared-memory carve-up of one stage (two stages, double-buffered) in bf16 elements: the act or
// out tile (64 × LT_LDK) then the weight tile, [RP][LT_LDK] (rows = rank) or [64][RP + 8]
// (rows = K or output index). The Rust launcher mirrors LT_SMEM_BYTES.
template <int RP>
struct LtCfg {
    static constexpr int LDR = RP + LT_PAD;
    static constexpr int W_RANK_ROWS = RP * LT_LDK;
    static constexpr int W_CHUNK_ROWS = LT_BK * LDR;
    static constexpr int W_ELEMS = W_RANK_ROWS > W_CHUNK_ROWS ? W_RANK_ROWS : W_CHUNK_ROWS;
    static constexpr int STAGE = LT_BM * LT_LDK + W_ELEMS;
    static constexpr int SMEM_BYTES = 2 * STAGE * 2;
};

// FWD: act = x (n, dk = in), w1 = A (rank, in), w2 = B (out, rank), out = y (n, dn = out).
// !FWD: act = dy (n, dk = out), w1 = B (out, rank), w2 = A (rank, in), out = dx (n, dn = in).
// low_out (n, rank) bf16 or NULL. DROP (backward only): out += scale · (low · W2) ⊙ mask of `drop`.
// grid = (ceil(n / 64), column splits), block = LT_THREADS.
template <int RP, bool FWD, bool DROP = false>
static __device__ void lt_fused(bf16* out, bf16* __restrict__ low_out, const bf16* __restrict__ act,
                                const bf16* __restrict__ w1, const bf16* __restrict__ w2, float scale, int n, int dk,
                                int dn, int rank, int accumulate, LtDrop drop = LtDrop{0.0f, 1.0f, 0ull, 0ull}) {
    using Cfg = LtCfg<RP>;
    constexpr int LDR = Cfg::LDR, NT = RP / 8;
    extern __shared__ __align__(16) unsigned char lt_smem[];
    bf16* smem = reinterpret_cast<bf16*>(lt_smem);
    const int lane = threadIdx.x % WARP_SIZE;
    const int warp = threadIdx.x / WARP_SIZE;
    const int g = lane / 4, t = lane % 4;
    const int m0 = blockIdx.x * LT_BM;
    const int r0 = warp * 16;
    const bool warp_rows = m0 + r0 < n;  // warp-uniform: the warp has at least one row

    // ---- phase 1: low (64 × RP) = act (64 × dk) · W1 (dk × RP)
    float acc[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
    {
        LtTile<LT_BM, LT_BK> act_t;
        LtTile<FWD ? RP : LT_BK, FWD ? LT_BK : RP> w_t;  // A[j][k] (FWD) or B[k][j]
        const int nk = CEIL_DIV(dk, LT_BK);
        auto fetch = [&](int kc) {
            const int k0 = kc * LT_BK;
            act_t.fetch(act, dk, m0, n, k0, dk);
            if (FWD)
                w_t.fetch(w1, dk, 0, rank, k0, dk);
            else
                w_t.fetch(w1, rank, k0, dk, 0, rank);
        };
        fetch(0);
        act_t.stash(smem);
        w_t.stash(smem + LT_BM * LT_LDK);
        __syncthreads();
        for (int kc = 0; kc < nk; ++kc) {
            const bf16* a_s = smem + (kc & 1) * Cfg::STAGE;
            const bf16* w_s = a_s + LT_BM * LT_LDK;
            if (kc + 1 < nk) fetch(kc + 1);  // in flight during the mma below
            if (warp_rows) {
#pragma unroll
                for (int kk = 0; kk < LT_BK; kk += 16) {
                    uint32_t a[4];
                    lt_frag_a(a, a_s, LT_LDK, r0, kk, lane);
#pragma unroll
                    for (int j = 0; j < NT; j += 2) {
                        uint32_t b[4];
                        if (FWD)
                            lt_frag_b_nk(b, w_s, LT_LDK, kk, j * 8, lane);
                        else
                            lt_frag_b_kn(b, w_s, LDR, kk, j * 8, lane);
                        lt_mma(acc[j], a, b[0], b[1]);
                        lt_mma(acc[j + 1], a, b[2], b[3]);
                    }
                }
            }
            if (kc + 1 < nk) {
                bf16* nx = smem + ((kc + 1) & 1) * Cfg::STAGE;  // last read in iteration kc − 1
                act_t.stash(nx);
                w_t.stash(nx + LT_BM * LT_LDK);
            }
            __syncthreads();
        }
    }

    // low rounded to bf16 once: the A fragments of phase 2 and the stored low_out are that value.
    uint32_t low_f[RP / 16][4];
#pragma unroll
    for (int kk = 0; kk < RP / 16; ++kk) {
        low_f[kk][0] = lt_pack_f32(acc[2 * kk][0], acc[2 * kk][1]);
        low_f[kk][1] = lt_pack_f32(acc[2 * kk][2], acc[2 * kk][3]);
        low_f[kk][2] = lt_pack_f32(acc[2 * kk + 1][0], acc[2 * kk + 1][1]);
        low_f[kk][3] = lt_pack_f32(acc[2 * kk + 1][2], acc[2 * kk + 1][3]);
    }
    if (low_out != nullptr && blockIdx.y == 0) {
#pragma unroll
        for (int j = 0; j < NT; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int row = m0 + r0 + g + (e >= 2 ? 8 : 0);
                const int col = j * 8 + 2 * t + (e & 1);
                if (row < n && col < rank) low_out[(size_t)row * rank + col] = f32_to_bf16(acc[j][e]);
            }
        }
    }

    // ---- phase 2: out (64 × dn) += scale · low (64 × RP) · W2 (RP × dn), 64 columns at a time
    const int nc = CEIL_DIV(dn, LT_BK);
    const int per = CEIL_DIV(nc, (int)gridDim.y);
    const int c_begin = blockIdx.y * per;
    const int c_end = min(nc, c_begin + per);
    LtTile<LT_BM, LT_BK> out_t;
    LtTile<FWD ? LT_BK : RP, FWD ? RP : LT_BK> w_t;  // B[o][j] (FWD) or A[j][i]
    // accumulate == 0 (store): the tile is not read; the epilogue writes scale·o alone.
    const bool add = accumulate != 0;
    auto fetch = [&](int c) {
        const int o0 = c * LT_BK;
        if (add) out_t.fetch(out, dn, m0, n, o0, dn);
        if (FWD)
            w_t.fetch(w2, rank, o0, dn, 0, rank);
        else
            w_t.fetch(w2, dn, 0, rank, o0, dn);
    };
    if (c_begin < c_end) {
        fetch(c_begin);
        if (add) out_t.stash(smem);
        w_t.stash(smem + LT_BM * LT_LDK);
    }
    __syncthreads();
    for (int c = c_begin; c < c_end; ++c) {
        bf16* o_s = smem + ((c - c_begin) & 1) * Cfg::STAGE;
        const bf16* w_s = o_s + LT_BM * LT_LDK;
        if (c + 1 < c_end) fetch(c + 1);
        if (warp_rows) {
            float o[LT_BK / 8][4];
#pragma unroll
            for (int j = 0; j < LT_BK / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < RP / 16; ++kk) {
#pragma unroll
                for (int j = 0; j < LT_BK / 8; j += 2) {
                    uint32_t b[4];
                    if (FWD)
                        lt_frag_b_nk(b, w_s, LDR, kk * 16, j * 8, lane);
                    else
                        lt_frag_b_kn(b, w_s, LT_LDK, kk * 16, j * 8, lane);
                    lt_mma(o[j], low_f[kk], b[0], b[1]);
                    lt_mma(o[j + 1], low_f[kk], b[2], b[3]);
                }
            }
            // This warp's 16 rows of the staged tile: out = bf16(out + scale·o), with dropout
            // out = bf16(out + (scale·o)·mask) (the CPU's order: s·(dyb A) first, then the mask);
            // in store mode the tile holds no out values and out = bf16(scale·o) (· mask).
#pragma unroll
            for (int j = 0; j < LT_BK / 8; ++j) {
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    bf16* p = o_s + (r0 + g + 8 * h) * LT_LDK + j * 8 + 2 * t;
                    const float y0 = add ? bf16_to_f32(p[0]) : 0.0f, y1 = add ? bf16_to_f32(p[1]) : 0.0f;
                    float v0, v1;
                    if (DROP) {
                        const int row = m0 + r0 + g + 8 * h, col = c * LT_BK + j * 8 + 2 * t;
                        const float t0 = scale * o[j][2 * h], t1 = scale * o[j][2 * h + 1];
                        v0 = y0 + t0 * lt_dropout_factor(drop, row, col);
                        v1 = y1 + t1 * lt_dropout_factor(drop, row, col + 1);
                    } else {
                        v0 = y0 + scale * o[j][2 * h];
                        v1 = y1 + scale * o[j][2 * h + 1];
                    }
                    *reinterpret_cast<uint32_t*>(p) = lt_pack_f32(v0, v1);
                }
            }
        }
        __syncthreads();  // the whole tile is updated
        LtTile<LT_BM, LT_BK>::put(out, dn, m0, n, c * LT_BK, dn, o_s);
        if (c + 1 < c_end) {
            bf16* nx = o_s == smem ? smem + Cfg::STAGE : smem;
            if (add) out_t.stash(nx);
            w_t.stash(nx + LT_BM * LT_LDK);
        }
        __syncthreads();  // the next tile is staged; this one is written back before it is reused
    }
}

// ----------------------------------------------------------------------------
// Gradient: G[p, j] = Σ_m act[m, p] · low[m, j] over one split of the rows.

// Stage: act tile [64 rows m][64 cols p] (row stride LT_LDK), low tile [64 rows m][RP] (RP + 8).
template <int RP>
struct LtGradCfg {
    static constexpr int LDR = RP + LT_PAD;
    static constexpr int STAGE = LT_BM * LT_LDK + LT_BM * LDR;
    static constexpr int SMEM_BYTES = 2 * STAGE * 2;
};

// act (n, dp) bf16, low (n, rank) bf16. Block (p tile blockIdx.x of 64, split z = blockIdx.y)
// reduces rows [z·rows_per_split, min(n, (z+1)·rows_per_split)). gridDim.y == 1: out[idx] +=
// scale·G; else partials[z·dp·rank + idx] = G. idx = p·rank + j (transposed = 0: (dp, rank), dB)
// or j·dp + p (transposed = 1: (rank, dp), dA). grid = (ceil(dp / 64), splits), block = LT_THREADS.
template <int RP>
static __device__ void lt_grad(float* out, float* __restrict__ partials, const bf16* __restrict__ act,
                               const bf16* __restrict__ low, float scale, int n, int dp, int rank,
                               int rows_per_split, int transposed) {
    using Cfg = LtGradCfg<RP>;
    constexpr int LDR = Cfg::LDR, NT = RP / 8;
    extern __shared__ __align__(16) unsigned char lt_smem[];
    bf16* smem = reinterpret_cast<bf16*>(lt_smem);
    const int lane = threadIdx.x % WARP_SIZE;
    const int warp = threadIdx.x / WARP_SIZE;
    const int g = lane / 4, t = lane % 4;
    const int p0 = blockIdx.x * LT_BK;
    const int r0 = warp * 16;  // this warp's p rows within the tile
    const bool warp_rows = p0 + r0 < dp;
    const int m_begin = blockIdx.y * rows_per_split;
    const int m_end = min(n, m_begin + rows_per_split);

    float acc[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
    LtTile<LT_BM, LT_BK> act_t;
    LtTile<LT_BM, RP> low_t;
    auto fetch = [&](int m0) {
        act_t.fetch(act, dp, m0, m_end, p0, dp);
        low_t.fetch(low, rank, m0, m_end, 0, rank);
    };
    const int nk = m_end > m_begin ? CEIL_DIV(m_end - m_begin, LT_BM) : 0;
    if (nk > 0) {
        fetch(m_begin);
        act_t.stash(smem);
        low_t.stash(smem + LT_BM * LT_LDK);
    }
    __syncthreads();
    for (int kc = 0; kc < nk; ++kc) {
        const bf16* a_s = smem + (kc & 1) * Cfg::STAGE;
        const bf16* l_s = a_s + LT_BM * LT_LDK;
        if (kc + 1 < nk) fetch(m_begin + (kc + 1) * LT_BM);
        if (warp_rows) {
#pragma unroll
            for (int kk = 0; kk < LT_BM; kk += 16) {
                uint32_t a[4];
                lt_frag_a_t(a, a_s, LT_LDK, r0, kk, lane);  // A(p, m) = act_s[m][p]
#pragma unroll
                for (int j = 0; j < NT; j += 2) {
                    uint32_t b[4];
                    lt_frag_b_kn(b, l_s, LDR, kk, j * 8, lane);  // B(m, j) = low_s[m][j]
                    lt_mma(acc[j], a, b[0], b[1]);
                    lt_mma(acc[j + 1], a, b[2], b[3]);
                }
            }
        }
        if (kc + 1 < nk) {
            bf16* nx = smem + ((kc + 1) & 1) * Cfg::STAGE;
            act_t.stash(nx);
            low_t.stash(nx + LT_BM * LT_LDK);
        }
        __syncthreads();
    }

    const bool split = gridDim.y > 1;
    float* part = split ? partials + (size_t)blockIdx.y * dp * rank : nullptr;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int p = p0 + r0 + g + (e >= 2 ? 8 : 0);
            const int col = j * 8 + 2 * t + (e & 1);
            if (p >= dp || col >= rank) continue;
            const size_t idx = transposed ? (size_t)col * dp + p : (size_t)p * rank + col;
            if (split)
                part[idx] = acc[j][e];
            else
                out[idx] += scale * acc[j][e];
        }
    }
}

// ----------------------------------------------------------------------------
// Kernels, compiled for RP = 16, 32, 64, 128 (the launcher picks the smallest RP ≥ rank).

// y (n, out) bf16 += scale · bf16(x Aᵀ) Bᵀ (accumulate = 0: y = ..., y not read); xa (n, rank) bf16 =
// bf16(x Aᵀ) (NULL: not stored).
// x (n, in), a (rank, in), b (out, rank) bf16. grid = (ceil(n / 64), column splits), block = 128,
// dynamic shared memory LtCfg<RP>::SMEM_BYTES.
#define LT_FWD_KERNEL(RP)                                                                                         \
    extern "C" __global__ void __launch_bounds__(LT_THREADS) lora_train_fwd_r##RP##_bf16(                         \
        bf16* y, bf16* __restrict__ xa, const bf16* __restrict__ x, const bf16* __restrict__ a,                 \
        const bf16* __restrict__ b, float scale, int n, int in_dim, int out_dim, int rank, int accumulate) {    \
        lt_fused<RP, true>(y, xa, x, a, b, scale, n, in_dim, out_dim, rank, accumulate);                        \
    }

// dx (n, in) bf16 += scale · bf16(dy B) A (accumulate = 0: dx = ...); dyb (n, rank) bf16 = bf16(dy B). dy (n, out), a (rank,
// in), b (out, rank) bf16. grid = (ceil(n / 64), column splits), block = 128, dynamic shared memory
// LtCfg<RP>::SMEM_BYTES.
#define LT_BWD_DX_KERNEL(RP)                                                                                      \
    extern "C" __global__ void __launch_bounds__(LT_THREADS) lora_train_bwd_dx_r##RP##_bf16(                      \
        bf16* dx, bf16* __restrict__ dyb, const bf16* __restrict__ dy, const bf16* __restrict__ a,              \
        const bf16* __restrict__ b, float scale, int n, int in_dim, int out_dim, int rank, int accumulate) {    \
        lt_fused<RP, false>(dx, dyb, dy, b, a, scale, n, out_dim, in_dim, rank, accumulate);                    \
    }

// lora_train_bwd_dx_r*_bf16 with LoRA dropout: dx (n, in) bf16 += scale · (bf16(dy B) A) ⊙ m,
// m = lt_dropout_factor of (row, column of dx) with (p, keep_scale, seed, site); dyb as above.
// Same grid, block and shared memory as lora_train_bwd_dx_r*_bf16.
#define LT_BWD_DX_DROP_KERNEL(RP)                                                                                 \
    extern "C" __global__ void __launch_bounds__(LT_THREADS) lora_train_bwd_dx_drop_r##RP##_bf16(                 \
        bf16* dx, bf16* __restrict__ dyb, const bf16* __restrict__ dy, const bf16* __restrict__ a,              \
        const bf16* __restrict__ b, float scale, int n, int in_dim, int out_dim, int rank, int accumulate,      \
        float p, float keep_scale, unsigned long long seed, unsigned long long site) {                         \
        lt_fused<RP, false, true>(dx, dyb, dy, b, a, scale, n, out_dim, in_dim, rank, accumulate,               \
                                  LtDrop{p, keep_scale, seed, site});                                           \
    }

// G (p_dim, rank) = actᵀ low over a row split (see lt_grad): dB with act = dy (n, out), low = xa;
// dA (transposed) with act = x (n, in), low = dyb. out f32 (+= scale·G when unsplit), partials f32
// (splits, p_dim·rank). grid = (ceil(p_dim / 64), splits), block = 128, dynamic shared memory
// LtGradCfg<RP>::SMEM_BYTES.
#define LT_GRAD_KERNEL(RP)                                                                                        \
    extern "C" __global__ void __launch_bounds__(LT_THREADS) lora_train_grad_r##RP##_bf16(                        \
        float* out, float* __restrict__ partials, const bf16* __restrict__ act, const bf16* __restrict__ low,   \
        float scale, int n, int p_dim, int rank, int rows_per_split, int transposed) {                          \
        lt_grad<RP>(out, partials, act, low, scale, n, p_dim, rank, rows_per_split, transposed);                \
    }

LT_FWD_KERNEL(16)
LT_FWD_KERNEL(32)
LT_FWD_KERNEL(64)
LT_FWD_KERNEL(128)
LT_BWD_DX_KERNEL(16)
LT_BWD_DX_KERNEL(32)
LT_BWD_DX_KERNEL(64)
LT_BWD_DX_KERNEL(128)
LT_BWD_DX_DROP_KERNEL(16)
LT_BWD_DX_DROP_KERNEL(32)
LT_BWD_DX_DROP_KERNEL(64)
LT_BWD_DX_DROP_KERNEL(128)
LT_GRAD_KERNEL(16)
LT_GRAD_KERNEL(32)
LT_GRAD_KERNEL(64)
LT_GRAD_KERNEL(128)

// ----------------------------------------------------------------------------
// x̃ (n, in) bf16 = bf16(x · m): LoRA dropout on the input of A, m = lt_dropout_factor of entry
// (row, col) with (p, keep_scale, seed, site). x (n, in) bf16. Grid-stride over n·in:
// 256-thread blocks, ceil(n·in / 256) of them (capped at 65535).
extern "C" __global__ void lora_dropout_bf16(bf16* __restrict__ xd, const bf16* __restrict__ x, float p,
                                             float keep_scale, unsigned long long seed, unsigned long long site,
                                             int n, int in_dim) {
    const LtDrop d{p, keep_scale, seed, site};
    const size_t total = (size_t)n * in_dim;
    const size_t tid = (size_t)blockIdx.x * blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = tid; i < total; i += stride) {
        const int row = (int)(i / (size_t)in_dim), col = (int)(i - (size_t)row * in_dim);
        xd[i] = f32_to_bf16(bf16_to_f32(x[i]) * lt_dropout_factor(d, row, col));
    }
}
