// Training attention: causal GQA self-attention over packed sequences (no KV cache), the forward
// saving the log-sum-exp, and a deterministic backward. Also scatter_rows_bf16 (places the
// lm_head's input-gradient rows).
//
// Layout: q, out, dout, dq (N, H, hd) bf16; k, v, dk, dv (N, KV, hd) bf16; lse, delta (N, H) f32.
// The rows of sequence s are [cu_rows[s], cu_rows[s+1]) (cu_rows (S+1) i32), at positions 0, 1, ...
// within the sequence. Row i (position i) attends keys j of its own sequence with j ≤ i and,
// with a sliding window w, i − j < w (as src/cpu/model.rs::attend: start = i + 1 − w). Query head
// h reads kv head h / (H / KV). Scores s_ij = q_i·k_j · scale, scale = 1/sqrt(hd) computed on the
// host in f32 as the CPU does; P = softmax_j(s); out_i = Σ_j P_ij v_j.
//
// Math (FlashAttention-2):
//   forward   online softmax per row over key tiles; lse_i = log Σ_j e^{s_ij} (natural log)
//   backward  delta_i = Σ_d dout_id·out_id                         attention_train_bwd_delta_bf16
//             P_ij = exp(s_ij − lse_i),  dP_ij = dout_i·v_j,  dS_ij = P_ij (dP_ij − delta_i)
//             dv_j = Σ_{i,h in group} P_ij dout_i,  dk_j = scale Σ_{i,h} dS_ij q_i   ..._dkdv_*
//             dq_i = scale Σ_j dS_ij k_j                                               ..._dq_*
// (delta_i = Σ_j P_ij dP_ij because out_i = Σ_j P_ij v_j; it uses the stored bf16 out.)
//
// Tensor cores: every product is mma.sync m16n8k16 (bf16 in, f32 accumulate; sm_80+). A warp
// owns 16 rows of the tile (queries in forward / dq, keys in dkdv); tiles of q, k, v, dout are
// staged in shared memory with rows of HD + 8 bf16 and read into fragments with ldmatrix (the
// 16-byte pad puts the 8 rows of each 8×8 matrix in distinct banks). The score accumulator of
// one mma (C layout) is reused as the A operand of the next (P·V, dS·K, ...) after rounding to
// bf16, as FlashAttention-2 does: P and dS are bf16 in those products, all sums are f32.
// hd ≤ 256 and hd % 4 == 0: each kernel is compiled for HD = 64, 128, 256 (the `_hd*` in the
// name) and runs any hd ≤ HD, with q/k/v columns hd..HD-1 zero in shared memory. Outputs
// wider than 128 columns are accumulated in passes of 128 (the scores are recomputed per pass)
// so the accumulators stay in registers.
//
// Pipeline: the tiles stream global → shared memory with cp.async (16-byte copies, or 8-byte ones
// when hd % 8 != 0 or a tensor is not 16-byte aligned; rows past the edge and columns hd..HD-1
// zero-filled), never through registers. The streamed tiles (k, v in forward and dq; q, dout in
// dk/dv) have two stages where shared memory allows (AtCfg::*_STAGES): after the barrier that
// opens tile t, the copies of the next tile of the block's walk go into the other stage and land
// while tile t is computed; one __syncthreads per tile, as with one stage. Only where the data come
// from and when they arrive changed: every product, every sum and its order are those of the
// synchronous one-stage kernels (scripts/kernel_emu checks the outputs bit for bit against them).
//
// Grids: forward and dq blocks are (64-query tile, head, sequence), the tiles taken last-first
// (the causal tail sees the most keys, so the longest blocks start first); dk/dv blocks are
// (64-key tile, kv head, sequence), tile 0 (seen by the most queries) first.
//
// Determinism: no atomics. Each output element is written by exactly one thread, its sums run
// over key/query tiles and heads in a fixed order: same shape → bit-identical results.
//
// Rust launchers: src/cuda/attention_train.rs (grids, shared memory, checks). Tests:
// tests/cuda_attention_train.rs (f64 host oracle, itself checked by finite differences).

#include "common.cuh"

#define AT_WARPS 4
#define AT_THREADS (AT_WARPS * WARP_SIZE)
#define AT_BQ 64   // query rows per forward / dq block (16 per warp)
#define AT_BKV 64  // key rows per dkdv block (16 per warp)
#define AT_PAD 8   // bf16 padding per shared-memory row

#define AT_LOG2E 1.4426950408889634f
#define AT_LN2 0.6931471805599453f

// Tile sizes per compiled head dim HD (the Rust launcher mirrors them for shared memory).
template <int HD>
struct AtCfg {
    static constexpr int LD = HD + AT_PAD;                 // shared-memory row stride (bf16)
    static constexpr int ACC_D = HD < 128 ? HD : 128;      // output columns per pass
    static constexpr int PASSES = HD / ACC_D;
    static constexpr int BK = HD <= 128 ? 64 : 32;         // keys per forward / dq tile
    static constexpr int DKDV_BQ = HD <= 64 ? 64 : (HD <= 128 ? 32 : 16);  // queries per dkdv tile
    // Stages of the streamed tiles (2: the next tile is copied while this one is computed), as many
    // as fit the 99 KiB of dynamic shared memory a block may opt in to on every sm_80+ GPU (the
    // launcher's allow_smem). dq at HD 128 has two stages of k but one of v: the next tile's v is
    // copied after a second barrier, once every warp has done its dP = dout Vᵀ (dQ += dS K reads
    // k only).
    static constexpr int FWD_STAGES = 2;
    static constexpr int DQ_K_STAGES = HD <= 128 ? 2 : 1;
    static constexpr int DQ_V_STAGES = HD <= 64 ? 2 : 1;
    static constexpr int DKDV_STAGES = HD <= 128 ? 2 : 1;
    // Dynamic shared memory in bytes (mirrored by src/cuda/attention_train.rs).
    static constexpr int FWD_SMEM = (AT_BQ + FWD_STAGES * 2 * BK) * LD * 2;
    static constexpr int DQ_SMEM = (2 * AT_BQ + (DQ_K_STAGES + DQ_V_STAGES) * BK) * LD * 2;
    static constexpr int DKDV_SMEM = (2 * AT_BKV + DKDV_STAGES * 2 * DKDV_BQ) * LD * 2 + DKDV_STAGES * 2 * DKDV_BQ * 4;
    static_assert(FWD_SMEM <= 99 * 1024 && DQ_SMEM <= 99 * 1024 && DKDV_SMEM <= 99 * 1024, "over the opt-in limit");
    static_assert(DKDV_BQ <= AT_THREADS, "one thread per query row stages lse and delta");
    // Blocks per SM the register allocation must allow (__launch_bounds__): at HD 64 as many as
    // the one-stage kernels' registers allowed (forward, dk/dv, dq: 4, 3, 4 blocks, ≤ 128, 168,
    // 128 registers). Left free, ptxas gives the cp.async kernels more registers (sm_90a: 128,
    // 222, 168) and dk/dv and dq lose a block per SM; capped, they spill a few words per tile,
    // outside the mma loops. 1: no cap (shared memory bounds the blocks per SM there anyway).
    static constexpr int FWD_MIN_BLOCKS = HD == 64 ? 4 : 1;
    static constexpr int DKDV_MIN_BLOCKS = HD == 64 ? 3 : 1;
    static constexpr int DQ_MIN_BLOCKS = HD == 64 ? 4 : 1;
};

// ----------------------------------------------------------------------------
// Warp-level mma helpers. Lane = 4·g + t (g = lane / 4, t = lane % 4). For m16n8k16:
//   A (16×16, row-major): reg 0 = (row g, cols 2t, 2t+1), reg 1 = (row g+8, cols 2t, 2t+1),
//                         reg 2 = (row g, cols 2t+8, 2t+9), reg 3 = (row g+8, cols 2t+8, 2t+9)
//   B (16×8, k × n):      reg 0 = (k 2t, 2t+1; n g),  reg 1 = (k 2t+8, 2t+9; n g)
//   C (16×8 f32):         c0, c1 = (row g, cols 2t, 2t+1),  c2, c3 = (row g+8, cols 2t, 2t+1)
// The lower 16 bits of a register hold the element with the smaller index.

// d += a · b (m16n8k16, bf16 inputs, f32 accumulate).
static __device__ __forceinline__ void at_mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

static __device__ __forceinline__ uint32_t at_pack_bf16(bf16 lo, bf16 hi) {
    return (uint32_t)__bfloat16_as_ushort(lo) | ((uint32_t)__bfloat16_as_ushort(hi) << 16);
}

static __device__ __forceinline__ uint32_t at_pack_f32(float lo, float hi) {
    return at_pack_bf16(f32_to_bf16(lo), f32_to_bf16(hi));
}

// ldmatrix .x4: lane L gives the address of row L % 8 of 8×8 matrix L / 8 (8 consecutive bf16,
// 16-byte aligned); register i receives, in mma fragment order, the lane's pair of matrix i:
// (row g, cols 2t, 2t+1), or with .trans (rows 2t, 2t+1, col g).
static __device__ __forceinline__ void at_ldsm_x4(uint32_t (&r)[4], const bf16* p) {
    const uint32_t addr = (uint32_t)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

static __device__ __forceinline__ void at_ldsm_x4_trans(uint32_t (&r)[4], const bf16* p) {
    const uint32_t addr = (uint32_t)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// A fragment of rows r0..r0+15, cols c0..c0+15 of a row-major shared tile (element (r, c) at
// base[r·ld + c]). Matrices: 0 = (r0, c0), 1 = (r0+8, c0), 2 = (r0, c0+8), 3 = (r0+8, c0+8).
static __device__ __forceinline__ void at_frag_a(uint32_t (&a)[4], const bf16* base, int ld, int r0, int c0,
                                                 int lane) {
    const int mat = lane / 8;
    at_ldsm_x4(a, base + (r0 + (mat & 1) * 8 + lane % 8) * ld + c0 + (mat >> 1) * 8);
}

// B fragments (k0..k0+15) × (n0..n0+7) and × (n0+8..n0+15) of B = Tᵀ for a row-major shared
// tile T (B(k, n) = base[n·ld + k]), e.g. Kᵀ in S = Q Kᵀ: b[0], b[1] for n-tile n0, b[2], b[3]
// for n0+8. Matrices: 0 = T(n0, k0), 1 = T(n0, k0+8), 2 = T(n0+8, k0), 3 = T(n0+8, k0+8).
static __device__ __forceinline__ void at_frag_b_t(uint32_t (&b)[4], const bf16* base, int ld, int k0, int n0,
                                                   int lane) {
    const int mat = lane / 8;
    at_ldsm_x4(b, base + (n0 + (mat >> 1) * 8 + lane % 8) * ld + k0 + (mat & 1) * 8);
}

// The same two B fragments of a row-major shared tile used as is (B(k, n) = base[k·ld + n]),
// e.g. V in O = P V, through the transposing load. Matrices: 0 = (k0, n0), 1 = (k0+8, n0),
// 2 = (k0, n0+8), 3 = (k0+8, n0+8).
static __device__ __forceinline__ void at_frag_b(uint32_t (&b)[4], const bf16* base, int ld, int k0, int n0,
                                                 int lane) {
    const int mat = lane / 8;
    at_ldsm_x4_trans(b, base + (k0 + (mat & 1) * 8 + lane % 8) * ld + n0 + (mat >> 1) * 8);
}

// The A fragment for k-step kk of a product whose left operand is the C-layout accumulator
// c[NT][4] (16 rows × 8·NT cols), rounded to bf16.
template <int NT>
static __device__ __forceinline__ void at_frag_a_from_c(uint32_t (&a)[4], const float (&c)[NT][4], int kk) {
    a[0] = at_pack_f32(c[2 * kk][0], c[2 * kk][1]);
    a[1] = at_pack_f32(c[2 * kk][2], c[2 * kk][3]);
    a[2] = at_pack_f32(c[2 * kk + 1][0], c[2 * kk + 1][1]);
    a[3] = at_pack_f32(c[2 * kk + 1][2], c[2 * kk + 1][3]);
}

// cp.async global → shared, asynchronous: the first src_bytes (0 or the size) of the 16 (.cg, L2
// only) or 8 (.ca) bytes are copied, the rest zero-filled (src_bytes = 0 reads nothing); both
// addresses aligned to the size. A thread's copies land after its at_cp_async_commit and a
// matching at_cp_async_wait_all, and are visible to the other threads after a __syncthreads.
static __device__ __forceinline__ void at_cp_async16(bf16* smem, const bf16* gmem, int src_bytes) {
    const uint32_t addr = (uint32_t)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(gmem), "r"(src_bytes)
                 : "memory");
}
static __device__ __forceinline__ void at_cp_async8(bf16* smem, const bf16* gmem, int src_bytes) {
    const uint32_t addr = (uint32_t)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(addr), "l"(gmem), "r"(src_bytes)
                 : "memory");
}
static __device__ __forceinline__ void at_cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until every committed group of this thread's copies has landed (wait_group 0).
static __device__ __forceinline__ void at_cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

// Whether tiles of (rows, heads, hd) tensors at these bases can move in 16-byte pieces: hd % 8 == 0
// and every base 16-byte aligned (every row then is). Else 8-byte pieces: hd % 4 == 0 and the
// launcher checks the bases are 8-byte aligned. Each kernel is compiled for both (template VEC =
// 8 or 4 bf16 per copy) and picks one at entry, block-uniformly.
static __device__ __forceinline__ bool at_vec16(int hd, const bf16* a, const bf16* b, const bf16* c,
                                                const bf16* d = nullptr) {
    return hd % 8 == 0 && vec16_ok(a) && vec16_ok(b) && vec16_ok(c) && (d == nullptr || vec16_ok(d));
}

// Issues the copies dst[r][c] (row stride HD + AT_PAD) = src[row0 + r, head, c] of a (rows, heads,
// hd) bf16 tensor for r < nr, c < hd; zero elsewhere (r < R, c < HD), VEC bf16 per copy (8: 16-byte
// copies, the tensor at_vec16; 4: 8-byte ones). Thread x copies column (x % CH)·VEC of rows
// x / CH + i·RS (CH copies per row, RS rows per sweep of the block). All threads of the block call
// it; it does not commit or wait.
template <int R, int HD, int VEC>
static __device__ __forceinline__ void at_copy_tile(bf16* dst, const bf16* __restrict__ src, int row0, int nr,
                                                    int heads, int head, int hd) {
    constexpr int CH = HD / VEC, RS = AT_THREADS / CH;
    static_assert((VEC == 8 || VEC == 4) && AT_THREADS % CH == 0 && R % RS == 0, "sweeps cover the tile");
    const int c = (threadIdx.x % CH) * VEC;
    const int rt = threadIdx.x / CH;
#pragma unroll
    for (int i = 0; i < R / RS; ++i) {
        const int r = rt + i * RS;
        const bool ok = r < nr && c < hd;
        const bf16* from = ok ? src + ((size_t)(row0 + r) * heads + head) * hd + c : src;
        if (VEC == 8)
            at_cp_async16(dst + r * (HD + AT_PAD) + c, from, ok ? 16 : 0);
        else
            at_cp_async8(dst + r * (HD + AT_PAD) + c, from, ok ? 8 : 0);
    }
}

// Whether key j is visible from query i (both positions within the sequence).
static __device__ __forceinline__ bool at_visible(int i, int j, int window) {
    return j <= i && (window <= 0 || i - j < window);
}

// ----------------------------------------------------------------------------
// Forward

// One block = (query tile of AT_BQ rows, head h = blockIdx.y, sequence s = blockIdx.z); tiles are
// taken last-first (the causal tail has the most keys, so the longest blocks start first). Warp w
// owns rows 16w..16w+15 of the tile. Keys [lo, hi] (lo = the first row's window start, hi = the
// last row) are walked in tiles of BK staged in shared memory; per tile S = Q Kᵀ (mma), masked,
// scaled into the log2 domain, the online-softmax max/sum updated per row (a row lives in the 4
// lanes of a quad), O rescaled and O += P V (mma, P from the S registers). The key/value tiles
// stream through FWD_STAGES stages, the walk (a pass's tiles, then the next pass's) prefetched one
// tile ahead. Dynamic shared memory: (AT_BQ + FWD_STAGES·2·BK)·(HD + 8) bf16 (AtCfg::FWD_SMEM).
template <int HD, int VEC>
static __device__ void at_fwd(bf16* __restrict__ out, float* __restrict__ lse, const bf16* __restrict__ q,
                              const bf16* __restrict__ k, const bf16* __restrict__ v,
                              const int* __restrict__ cu_rows, int n_heads, int n_kv_heads, int hd, int window,
                              float scale) {
    using C = AtCfg<HD>;
    constexpr int LD = C::LD, BK = C::BK, NT = BK / 8, DT = C::ACC_D / 8;
    static_assert(C::FWD_STAGES == 2, "the forward's walk is written for two stages");
    extern __shared__ __align__(16) unsigned char at_smem[];
    bf16* q_s = reinterpret_cast<bf16*>(at_smem);  // [AT_BQ][LD]
    bf16* kv_s = q_s + AT_BQ * LD;                  // [2 stages][k, v][BK][LD]

    const int lane = threadIdx.x % WARP_SIZE;
    const int warp = threadIdx.x / WARP_SIZE;
    const int g = lane / 4, t = lane % 4;
    const int s = blockIdx.z;
    const int h = blockIdx.y;
    const int kvh = h / (n_heads / n_kv_heads);
    const int row_begin = cu_rows[s];
    const int nrows = cu_rows[s + 1] - row_begin;
    const int q0 = (int)(gridDim.x - 1 - blockIdx.x) * AT_BQ;
    if (q0 >= nrows) return;  // whole block leaves together
    const int lo = (window > 0 && q0 + 1 > window) ? q0 + 1 - window : 0;
    const int hi = min(q0 + AT_BQ, nrows) - 1;
    const int r0 = warp * 16;
    const int row_pos[2] = {q0 + r0 + g, q0 + r0 + g + 8};  // this lane's two rows
    const float scale_log2 = scale * AT_LOG2E;
    // Issues the copies of the key/value tile at kt into stage st.
    auto load_kv = [&](int st, int kt) {
        bf16* ks = kv_s + st * 2 * BK * LD;
        at_copy_tile<BK, HD, VEC>(ks, k, row_begin + kt, hi + 1 - kt, n_kv_heads, kvh, hd);
        at_copy_tile<BK, HD, VEC>(ks + BK * LD, v, row_begin + kt, hi + 1 - kt, n_kv_heads, kvh, hd);
    };

    at_copy_tile<AT_BQ, HD, VEC>(q_s, q, row_begin + q0, nrows - q0, n_heads, h, hd);
    load_kv(0, lo);  // the walk's first tile
    at_cp_async_commit();
    int stage = 0;  // the stage of the current tile

    for (int pass = 0; pass < C::PASSES; ++pass) {
        const int d0 = pass * C::ACC_D;
        float o[DT][4];
#pragma unroll
        for (int dn = 0; dn < DT; ++dn) o[dn][0] = o[dn][1] = o[dn][2] = o[dn][3] = 0.0f;
        float m[2] = {-INFINITY, -INFINITY};  // running max (log2 domain) per row
        float l[2] = {0.0f, 0.0f};            // this lane's share of the running sum per row

        for (int kt = lo; kt <= hi; kt += BK) {
            at_cp_async_wait_all();  // this thread's copies of the tile (first: and of q) landed
            __syncthreads();         // everyone's; and the other stage (the previous tile) is no longer read
            const int cur = stage;
            stage ^= 1;
            // The walk's next tile (after a pass's last: the next pass's first) into the other stage.
            if (kt + BK <= hi || pass + 1 < C::PASSES) {
                load_kv(cur ^ 1, kt + BK <= hi ? kt + BK : lo);
                at_cp_async_commit();
            }
            const bf16* k_s = kv_s + cur * 2 * BK * LD;
            const bf16* v_s = k_s + BK * LD;
            // Warp-uniform skip: no key of the tile is visible from any of the warp's rows.
            const int w_first = q0 + r0, w_last = q0 + r0 + 15;
            if (kt > w_last || (window > 0 && kt + BK - 1 < w_first + 1 - window)) continue;

            float sc[NT][4];
#pragma unroll
            for (int n = 0; n < NT; ++n) sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < HD / 16; ++kk) {
                uint32_t a[4];
                at_frag_a(a, q_s, LD, r0, kk * 16, lane);
#pragma unroll
                for (int n = 0; n < NT; n += 2) {
                    uint32_t b[4];
                    at_frag_b_t(b, k_s, LD, kk * 16, n * 8, lane);
                    at_mma(sc[n], a, b[0], b[1]);
                    at_mma(sc[n + 1], a, b[2], b[3]);
                }
            }

            float mx[2] = {m[0], m[1]};
#pragma unroll
            for (int n = 0; n < NT; ++n) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int i = row_pos[e / 2];
                    const int j = kt + n * 8 + 2 * t + (e & 1);
                    const bool ok = i < nrows && at_visible(i, j, window);
                    sc[n][e] = ok ? sc[n][e] * scale_log2 : -INFINITY;
                    mx[e / 2] = fmaxf(mx[e / 2], sc[n][e]);
                }
            }
            float corr[2], mu[2];
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                mx[r] = fmaxf(mx[r], __shfl_xor_sync(FULL_MASK, mx[r], 1));
                mx[r] = fmaxf(mx[r], __shfl_xor_sync(FULL_MASK, mx[r], 2));
                // A row with no visible key yet keeps m = −∞: use 0 so exp2(−∞ − 0) = 0, not NaN.
                mu[r] = mx[r] == -INFINITY ? 0.0f : mx[r];
                corr[r] = exp2f(m[r] - mu[r]);  // 0 when m was −∞ (then l = o = 0)
                m[r] = mx[r];
                l[r] *= corr[r];
            }
#pragma unroll
            for (int n = 0; n < NT; ++n) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    sc[n][e] = exp2f(sc[n][e] - mu[e / 2]);
                    l[e / 2] += sc[n][e];
                }
            }
#pragma unroll
            for (int dn = 0; dn < DT; ++dn) {
                o[dn][0] *= corr[0];
                o[dn][1] *= corr[0];
                o[dn][2] *= corr[1];
                o[dn][3] *= corr[1];
            }
#pragma unroll
            for (int kk = 0; kk < BK / 16; ++kk) {
                uint32_t a[4];
                at_frag_a_from_c<NT>(a, sc, kk);
#pragma unroll
                for (int dn = 0; dn < DT; dn += 2) {
                    uint32_t b[4];
                    at_frag_b(b, v_s, LD, kk * 16, d0 + dn * 8, lane);
                    at_mma(o[dn], a, b[0], b[1]);
                    at_mma(o[dn + 1], a, b[2], b[3]);
                }
            }
        }

#pragma unroll
        for (int r = 0; r < 2; ++r) {
            l[r] += __shfl_xor_sync(FULL_MASK, l[r], 1);
            l[r] += __shfl_xor_sync(FULL_MASK, l[r], 2);
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int i = row_pos[r];
            if (i >= nrows) continue;
            const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
            bf16* orow = out + ((size_t)(row_begin + i) * n_heads + h) * hd;
#pragma unroll
            for (int dn = 0; dn < DT; ++dn) {
                const int c = d0 + dn * 8 + 2 * t;  // even; hd % 4 == 0 so c < hd ⇒ c + 1 < hd
                if (c < hd) {
                    *reinterpret_cast<uint32_t*>(orow + c) = at_pack_f32(o[dn][2 * r] * inv, o[dn][2 * r + 1] * inv);
                }
            }
            if (pass == 0 && t == 0)
                lse[(size_t)(row_begin + i) * n_heads + h] = l[r] > 0.0f ? (m[r] + log2f(l[r])) * AT_LN2 : -INFINITY;
        }
    }
}

// q (N, H, hd), k, v (N, KV, hd) bf16, cu_rows (S+1) i32 → out (N, H, hd) bf16, lse (N, H) f32
// (natural log of Σ_j e^{s_ij}). window 0 = none. grid = (ceil(max_rows / 64), H, S), block = 128,
// dynamic shared memory AtCfg<HD>::FWD_SMEM = (64 + 4·BK)·(HD + 8)·2 bytes (BK = 64, or 32 for HD 256:
// 46080, 87040, 101376). hd ≤ HD, hd % 4 == 0.
#define AT_FWD_KERNEL(HD)                                                                                          \
    extern "C" __global__ void __launch_bounds__(AT_THREADS, AtCfg<HD>::FWD_MIN_BLOCKS)                            \
    attention_train_fwd_hd##HD##_bf16(                                                                             \
        bf16* __restrict__ out, float* __restrict__ lse, const bf16* __restrict__ q, const bf16* __restrict__ k,   \
        const bf16* __restrict__ v, const int* __restrict__ cu_rows, int n_heads, int n_kv_heads, int hd,          \
        int window, float scale) {                                                                                 \
        if (at_vec16(hd, q, k, v))                                                                                 \
            at_fwd<HD, 8>(out, lse, q, k, v, cu_rows, n_heads, n_kv_heads, hd, window, scale);                     \
        else                                                                                                       \
            at_fwd<HD, 4>(out, lse, q, k, v, cu_rows, n_heads, n_kv_heads, hd, window, scale);                     \
    }
AT_FWD_KERNEL(64)
AT_FWD_KERNEL(128)
AT_FWD_KERNEL(256)

// ----------------------------------------------------------------------------
// Backward: delta

// delta[r, h] = Σ_d dout[r, h, d]·out[r, h, d] in f32; out, dout (rows, H, hd) bf16, delta
// (rows, H) f32. A group of G = at_delta_group(hd) consecutive lanes per (r, h): G = hd/8 when that
// is a power of two ≤ 32 (hd 8..256: each lane one 16-byte vector of out and of dout when both are
// 16-byte aligned, else the group strides d one element at a time), else G = 32 (a whole warp,
// lanes stride d). Per lane a sequential sum, then the fixed xor tree over the group:
// deterministic. grid = ceil(rows·H / (256 / G)), block = 256.
static __device__ __forceinline__ int at_delta_group(int hd) {
    const int g = hd / 8;
    return hd % 8 == 0 && g >= 1 && g <= WARP_SIZE && (g & (g - 1)) == 0 ? g : WARP_SIZE;
}

extern "C" __global__ void attention_train_bwd_delta_bf16(float* __restrict__ delta, const bf16* __restrict__ out,
                                                          const bf16* __restrict__ dout, int rows, int n_heads,
                                                          int hd) {
    const int G = at_delta_group(hd);
    const size_t idx = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) / G;
    const int sub = threadIdx.x % G;
    const bool valid = idx < (size_t)rows * n_heads;  // groups past the end still join the shuffles
    float acc = 0.0f;
    if (valid) {
        const bf16* o = out + idx * hd;
        const bf16* d = dout + idx * hd;
        if (G * 8 == hd && vec16_ok(out) && vec16_ok(dout)) {
            float ov[8], dv[8];
            load8_bf16(o + sub * 8, ov);
            load8_bf16(d + sub * 8, dv);
#pragma unroll
            for (int k = 0; k < 8; ++k) acc += ov[k] * dv[k];
        } else {
            for (int c = sub; c < hd; c += G) acc += bf16_to_f32(o[c]) * bf16_to_f32(d[c]);
        }
    }
    for (int offset = G / 2; offset > 0; offset >>= 1) acc += __shfl_xor_sync(FULL_MASK, acc, offset);
    if (valid && sub == 0) delta[idx] = acc;
}

// ----------------------------------------------------------------------------
// Backward: dk, dv

// One block = (key tile of AT_BKV keys = blockIdx.x, kv head = blockIdx.y, sequence = blockIdx.z);
// warp w owns keys 16w..16w+15 of the tile, K and V stay in shared memory. For each query head
// of the group (in order) and each query tile (DKDV_BQ rows, in order) of the rows that can see
// the tile's keys ([k0, last key + window − 1]): Sᵀ = K Qᵀ and dPᵀ = V doutᵀ (mma),
// Pᵀ = exp2(Sᵀ·scale·log2e − lse·log2e), dSᵀ = Pᵀ ∘ (dPᵀ − delta), then dV += Pᵀ dout and
// dK += dSᵀ Q (mma, Pᵀ and dSᵀ from registers). dK is scaled once at the end. The query/dout
// tiles stream through DKDV_STAGES stages, the walk (heads of the group, their query tiles, then
// the next pass's) prefetched one tile ahead; the tile's lse·log2e and delta (one query row per
// thread) are read into registers when its copies are issued and stored into its stage at the top
// of its iteration, before the barrier. Dynamic shared memory:
// (2·AT_BKV + DKDV_STAGES·2·DKDV_BQ)·(HD + 8) bf16 + DKDV_STAGES·2·DKDV_BQ f32 (AtCfg::DKDV_SMEM).
template <int HD, int VEC>
static __device__ void at_dkdv(bf16* __restrict__ dk, bf16* __restrict__ dv, const bf16* __restrict__ q,
                               const bf16* __restrict__ k, const bf16* __restrict__ v,
                               const bf16* __restrict__ dout, const float* __restrict__ lse,
                               const float* __restrict__ delta, const int* __restrict__ cu_rows, int n_heads,
                               int n_kv_heads, int hd, int window, float scale) {
    using C = AtCfg<HD>;
    constexpr int LD = C::LD, BQ = C::DKDV_BQ, NT = BQ / 8, DT = C::ACC_D / 8, ST = C::DKDV_STAGES;
    extern __shared__ __align__(16) unsigned char at_smem[];
    bf16* k_s = reinterpret_cast<bf16*>(at_smem);  // [AT_BKV][LD]
    bf16* v_s = k_s + AT_BKV * LD;                  // [AT_BKV][LD]
    bf16* qd_s = v_s + AT_BKV * LD;                 // [ST][q, dout][BQ][LD]
    float* ld_s = reinterpret_cast<float*>(qd_s + ST * 2 * BQ * LD);  // [ST][lse (log2 domain), delta][BQ]

    const int lane = threadIdx.x % WARP_SIZE;
    const int warp = threadIdx.x / WARP_SIZE;
    const int g = lane / 4, t = lane % 4;
    const int s = blockIdx.z;
    const int kvh = blockIdx.y;
    const int group = n_heads / n_kv_heads;
    const int row_begin = cu_rows[s];
    const int nrows = cu_rows[s + 1] - row_begin;
    const int k0 = blockIdx.x * AT_BKV;
    if (k0 >= nrows) return;  // whole block leaves together
    const int k_last = min(k0 + AT_BKV, nrows) - 1;
    const int q_hi = window > 0 ? min(nrows - 1, k_last + window - 1) : nrows - 1;
    const int r0 = warp * 16;
    const int key_pos[2] = {k0 + r0 + g, k0 + r0 + g + 8};  // this lane's two keys
    const float scale_log2 = scale * AT_LOG2E;
    // Issues the copies of head hh's query/dout tile at qq into stage st.
    auto load_qd = [&](int st, int hh, int qq) {
        bf16* qs = qd_s + st * 2 * BQ * LD;
        const int nqq = min(BQ, q_hi + 1 - qq);
        at_copy_tile<BQ, HD, VEC>(qs, q, row_begin + qq, nqq, n_heads, hh, hd);
        at_copy_tile<BQ, HD, VEC>(qs + BQ * LD, dout, row_begin + qq, nqq, n_heads, hh, hd);
    };
    // lse·log2e and delta of query row qq + threadIdx.x of head hh (past the tile: +∞ and 0), read
    // into registers until stored at the top of the tile's iteration (thread i < BQ: row i).
    float ld_lse = 0.0f, ld_delta = 0.0f;
    auto read_ld = [&](int hh, int qq) {
        const int i = threadIdx.x;
        if (i < BQ) {
            const int nqq = min(BQ, q_hi + 1 - qq);
            const size_t r = (size_t)(row_begin + qq + i) * n_heads + hh;
            ld_lse = i < nqq ? lse[r] * AT_LOG2E : INFINITY;
            ld_delta = i < nqq ? delta[r] : 0.0f;
        }
    };

    at_copy_tile<AT_BKV, HD, VEC>(k_s, k, row_begin + k0, k_last + 1 - k0, n_kv_heads, kvh, hd);
    at_copy_tile<AT_BKV, HD, VEC>(v_s, v, row_begin + k0, k_last + 1 - k0, n_kv_heads, kvh, hd);
    if (ST == 2) {  // the walk's first tile
        load_qd(0, kvh * group, k0);
        read_ld(kvh * group, k0);
    }
    at_cp_async_commit();
    int stage = 0;  // the stage of the current tile

    for (int pass = 0; pass < C::PASSES; ++pass) {
        const int d0 = pass * C::ACC_D;
        float dk_acc[DT][4], dv_acc[DT][4];
#pragma unroll
        for (int dn = 0; dn < DT; ++dn) {
            dk_acc[dn][0] = dk_acc[dn][1] = dk_acc[dn][2] = dk_acc[dn][3] = 0.0f;
            dv_acc[dn][0] = dv_acc[dn][1] = dv_acc[dn][2] = dv_acc[dn][3] = 0.0f;
        }
        for (int gi = 0; gi < group; ++gi) {
            const int h = kvh * group + gi;
            for (int qt = k0; qt <= q_hi; qt += BQ) {
                const int nq = min(BQ, q_hi + 1 - qt);
                if (ST == 1) {
                    __syncthreads();  // the previous tile is no longer read
                    load_qd(0, h, qt);
                    at_cp_async_commit();
                    read_ld(h, qt);
                }
                const int cur = stage;
                float* lse_s = ld_s + cur * 2 * BQ;  // [BQ]
                float* delta_s = lse_s + BQ;         // [BQ]
                if (threadIdx.x < BQ) {  // this tile's, read a tile ago (two stages) or just now
                    lse_s[threadIdx.x] = ld_lse;
                    delta_s[threadIdx.x] = ld_delta;
                }
                at_cp_async_wait_all();  // this thread's copies of the tile (first: and of k, v) landed
                __syncthreads();         // everyone's; two stages: the other stage is no longer read
                if (ST == 2) {
                    stage ^= 1;
                    // The walk's next tile: the head's next query tile, else the next head's first,
                    // else the next pass's first.
                    int nqt = qt + BQ, ngi = gi, npass = pass;
                    if (nqt > q_hi) {
                        nqt = k0;
                        if (++ngi == group) {
                            ngi = 0;
                            ++npass;
                        }
                    }
                    if (npass < C::PASSES) {
                        load_qd(cur ^ 1, kvh * group + ngi, nqt);
                        at_cp_async_commit();
                        read_ld(kvh * group + ngi, nqt);
                    }
                }
                const bf16* q_s = qd_s + cur * 2 * BQ * LD;  // [BQ][LD]
                const bf16* do_s = q_s + BQ * LD;             // [BQ][LD]
                // Warp-uniform skip: no query of the tile sees any of the warp's keys.
                const int w_first = k0 + r0, w_last = k0 + r0 + 15;
                if (qt + BQ - 1 < w_first || (window > 0 && qt > w_last + window - 1)) continue;

                float st[NT][4], dpt[NT][4];
#pragma unroll
                for (int n = 0; n < NT; ++n) {
                    st[n][0] = st[n][1] = st[n][2] = st[n][3] = 0.0f;
                    dpt[n][0] = dpt[n][1] = dpt[n][2] = dpt[n][3] = 0.0f;
                }
#pragma unroll
                for (int kk = 0; kk < HD / 16; ++kk) {
                    uint32_t ak[4], av[4];
                    at_frag_a(ak, k_s, LD, r0, kk * 16, lane);
                    at_frag_a(av, v_s, LD, r0, kk * 16, lane);
#pragma unroll
                    for (int n = 0; n < NT; n += 2) {
                        uint32_t b[4];
                        at_frag_b_t(b, q_s, LD, kk * 16, n * 8, lane);
                        at_mma(st[n], ak, b[0], b[1]);
                        at_mma(st[n + 1], ak, b[2], b[3]);
                        at_frag_b_t(b, do_s, LD, kk * 16, n * 8, lane);
                        at_mma(dpt[n], av, b[0], b[1]);
                        at_mma(dpt[n + 1], av, b[2], b[3]);
                    }
                }
#pragma unroll
                for (int n = 0; n < NT; ++n) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int il = n * 8 + 2 * t + (e & 1);
                        const int i = qt + il;
                        const int j = key_pos[e / 2];
                        const bool ok = il < nq && j <= k_last && at_visible(i, j, window);
                        const float p = ok ? exp2f(st[n][e] * scale_log2 - lse_s[il]) : 0.0f;
                        st[n][e] = p;
                        dpt[n][e] = p * (dpt[n][e] - delta_s[il]);
                    }
                }
#pragma unroll
                for (int kk = 0; kk < BQ / 16; ++kk) {
                    uint32_t ap[4], ads[4];
                    at_frag_a_from_c<NT>(ap, st, kk);
                    at_frag_a_from_c<NT>(ads, dpt, kk);
#pragma unroll
                    for (int dn = 0; dn < DT; dn += 2) {
                        uint32_t b[4];
                        at_frag_b(b, do_s, LD, kk * 16, d0 + dn * 8, lane);
                        at_mma(dv_acc[dn], ap, b[0], b[1]);
                        at_mma(dv_acc[dn + 1], ap, b[2], b[3]);
                        at_frag_b(b, q_s, LD, kk * 16, d0 + dn * 8, lane);
                        at_mma(dk_acc[dn], ads, b[0], b[1]);
                        at_mma(dk_acc[dn + 1], ads, b[2], b[3]);
                    }
                }
            }
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int j = key_pos[r];
            if (j > k_last) continue;
            const size_t base = ((size_t)(row_begin + j) * n_kv_heads + kvh) * hd;
#pragma unroll
            for (int dn = 0; dn < DT; ++dn) {
                const int c = d0 + dn * 8 + 2 * t;
                if (c < hd) {
                    *reinterpret_cast<uint32_t*>(dk + base + c) =
                        at_pack_f32(dk_acc[dn][2 * r] * scale, dk_acc[dn][2 * r + 1] * scale);
                    *reinterpret_cast<uint32_t*>(dv + base + c) = at_pack_f32(dv_acc[dn][2 * r], dv_acc[dn][2 * r + 1]);
                }
            }
        }
    }
}

// q, dout (N, H, hd), k, v (N, KV, hd) bf16, lse, delta (N, H) f32 (the forward's lse and
// attention_train_bwd_delta_bf16's delta), cu_rows (S+1) i32 → dk, dv (N, KV, hd) bf16 (every row
// of every sequence written). grid = (ceil(max_rows / 64), KV, S), block = 128, dynamic shared
// memory AtCfg<HD>::DKDV_SMEM = (128 + 2·ST·BQ)·(HD + 8)·2 + 8·ST·BQ bytes (BQ = 64, 32, 16 and
// stages ST = 2, 2, 1 for HD 64, 128, 256: 56320, 70144, 84608).
#define AT_DKDV_KERNEL(HD)                                                                                         \
    extern "C" __global__ void __launch_bounds__(AT_THREADS, AtCfg<HD>::DKDV_MIN_BLOCKS)                           \
    attention_train_bwd_dkdv_hd##HD##_bf16(                                                                        \
        bf16* __restrict__ dk, bf16* __restrict__ dv, const bf16* __restrict__ q, const bf16* __restrict__ k,      \
        const bf16* __restrict__ v, const bf16* __restrict__ dout, const float* __restrict__ lse,                  \
        const float* __restrict__ delta, const int* __restrict__ cu_rows, int n_heads, int n_kv_heads, int hd,     \
        int window, float scale) {                                                                                 \
        if (at_vec16(hd, q, k, v, dout))                                                                           \
            at_dkdv<HD, 8>(dk, dv, q, k, v, dout, lse, delta, cu_rows, n_heads, n_kv_heads, hd, window, scale);    \
        else                                                                                                       \
            at_dkdv<HD, 4>(dk, dv, q, k, v, dout, lse, delta, cu_rows, n_heads, n_kv_heads, hd, window, scale);    \
    }
AT_DKDV_KERNEL(64)
AT_DKDV_KERNEL(128)
AT_DKDV_KERNEL(256)

// ----------------------------------------------------------------------------
// Backward: dq

// One block = (query tile of AT_BQ rows, head, sequence), last tile first, as the forward. Warp w
// owns rows 16w..16w+15; Q and dout stay in shared memory; keys [lo, hi] in tiles of BK:
// S = Q Kᵀ, dP = dout Vᵀ (mma), P = exp2(S·scale·log2e − lse·log2e), dS = P ∘ (dP − delta),
// dQ += dS K (mma, dS from registers); dQ scaled once at the end. The key tiles stream through
// DQ_K_STAGES stages, the value tiles through DQ_V_STAGES, the walk (a pass's tiles, then the next
// pass's) prefetched one tile ahead: with two stages of both, the next tile's copies are issued
// after the barrier that opens a tile; with two of k and one of v (HD 128), the next k then, the
// next v after a second barrier that follows every warp's dP. Dynamic shared memory:
// (2·AT_BQ + (DQ_K_STAGES + DQ_V_STAGES)·BK)·(HD + 8) bf16 (AtCfg::DQ_SMEM).
template <int HD, int VEC>
static __device__ void at_dq(bf16* __restrict__ dq, const bf16* __restrict__ q, const bf16* __restrict__ k,
                             const bf16* __restrict__ v, const bf16* __restrict__ dout,
                             const float* __restrict__ lse, const float* __restrict__ delta,
                             const int* __restrict__ cu_rows, int n_heads, int n_kv_heads, int hd, int window,
                             float scale) {
    using C = AtCfg<HD>;
    constexpr int LD = C::LD, BK = C::BK, NT = BK / 8, DT = C::ACC_D / 8;
    constexpr int KS = C::DQ_K_STAGES, VS = C::DQ_V_STAGES;
    static_assert(VS <= KS, "v has at most the stages of k");
    extern __shared__ __align__(16) unsigned char at_smem[];
    bf16* q_s = reinterpret_cast<bf16*>(at_smem);  // [AT_BQ][LD]
    bf16* do_s = q_s + AT_BQ * LD;                  // [AT_BQ][LD]
    bf16* k_ring = do_s + AT_BQ * LD;               // [KS][BK][LD]
    bf16* v_ring = k_ring + KS * BK * LD;           // [VS][BK][LD]

    const int lane = threadIdx.x % WARP_SIZE;
    const int warp = threadIdx.x / WARP_SIZE;
    const int g = lane / 4, t = lane % 4;
    const int s = blockIdx.z;
    const int h = blockIdx.y;
    const int kvh = h / (n_heads / n_kv_heads);
    const int row_begin = cu_rows[s];
    const int nrows = cu_rows[s + 1] - row_begin;
    const int q0 = (int)(gridDim.x - 1 - blockIdx.x) * AT_BQ;
    if (q0 >= nrows) return;  // whole block leaves together
    const int lo = (window > 0 && q0 + 1 > window) ? q0 + 1 - window : 0;
    const int hi = min(q0 + AT_BQ, nrows) - 1;
    const int r0 = warp * 16;
    const int row_pos[2] = {q0 + r0 + g, q0 + r0 + g + 8};
    const float scale_log2 = scale * AT_LOG2E;
    float lse2[2], dlt[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const bool ok = row_pos[r] < nrows;
        const size_t idx = (size_t)(row_begin + row_pos[r]) * n_heads + h;
        lse2[r] = ok ? lse[idx] * AT_LOG2E : INFINITY;
        dlt[r] = ok ? delta[idx] : 0.0f;
    }
    // Issues the copies of the key (value) tile at kt into stage st.
    auto load_k = [&](int st, int kt) {
        at_copy_tile<BK, HD, VEC>(k_ring + st * BK * LD, k, row_begin + kt, hi + 1 - kt, n_kv_heads, kvh, hd);
    };
    auto load_v = [&](int st, int kt) {
        at_copy_tile<BK, HD, VEC>(v_ring + st * BK * LD, v, row_begin + kt, hi + 1 - kt, n_kv_heads, kvh, hd);
    };

    at_copy_tile<AT_BQ, HD, VEC>(q_s, q, row_begin + q0, nrows - q0, n_heads, h, hd);
    at_copy_tile<AT_BQ, HD, VEC>(do_s, dout, row_begin + q0, nrows - q0, n_heads, h, hd);
    if (KS == 2) {  // the walk's first tile
        load_k(0, lo);
        load_v(0, lo);
    }
    at_cp_async_commit();
    int stage = 0;  // the k stage of the current tile

    for (int pass = 0; pass < C::PASSES; ++pass) {
        const int d0 = pass * C::ACC_D;
        float acc[DT][4];
#pragma unroll
        for (int dn = 0; dn < DT; ++dn) acc[dn][0] = acc[dn][1] = acc[dn][2] = acc[dn][3] = 0.0f;

        for (int kt = lo; kt <= hi; kt += BK) {
            if (KS == 1) {
                __syncthreads();  // the previous tile's k, v are no longer read
                load_k(0, kt);
                load_v(0, kt);
                at_cp_async_commit();
            }
            at_cp_async_wait_all();  // this thread's copies of the tile (first: and of q, dout) landed
            __syncthreads();         // everyone's; two stages: the other stage is no longer read
            const int cur = stage;
            // The walk's next tile (after a pass's last: the next pass's first).
            const bool has_next = KS == 2 && (kt + BK <= hi || pass + 1 < C::PASSES);
            const int next = kt + BK <= hi ? kt + BK : lo;
            if (KS == 2) {
                stage ^= 1;
                if (has_next) {
                    load_k(cur ^ 1, next);
                    if (VS == 2) load_v(cur ^ 1, next);
                    at_cp_async_commit();
                }
            }
            const bf16* k_s = k_ring + cur * BK * LD;
            const bf16* v_s = v_ring + (VS == 2 ? cur : 0) * BK * LD;
            // Warp-uniform skip: no key of the tile is visible from any of the warp's rows.
            const int w_first = q0 + r0, w_last = q0 + r0 + 15;
            const bool skip = kt > w_last || (window > 0 && kt + BK - 1 < w_first + 1 - window);

            float sc[NT][4], dp[NT][4];
            if (!skip) {
#pragma unroll
                for (int n = 0; n < NT; ++n) {
                    sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.0f;
                    dp[n][0] = dp[n][1] = dp[n][2] = dp[n][3] = 0.0f;
                }
#pragma unroll
                for (int kk = 0; kk < HD / 16; ++kk) {
                    uint32_t aq[4], ado[4];
                    at_frag_a(aq, q_s, LD, r0, kk * 16, lane);
                    at_frag_a(ado, do_s, LD, r0, kk * 16, lane);
#pragma unroll
                    for (int n = 0; n < NT; n += 2) {
                        uint32_t b[4];
                        at_frag_b_t(b, k_s, LD, kk * 16, n * 8, lane);
                        at_mma(sc[n], aq, b[0], b[1]);
                        at_mma(sc[n + 1], aq, b[2], b[3]);
                        at_frag_b_t(b, v_s, LD, kk * 16, n * 8, lane);
                        at_mma(dp[n], ado, b[0], b[1]);
                        at_mma(dp[n + 1], ado, b[2], b[3]);
                    }
                }
#pragma unroll
                for (int n = 0; n < NT; ++n) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int i = row_pos[e / 2];
                        const int j = kt + n * 8 + 2 * t + (e & 1);
                        const bool ok = i < nrows && at_visible(i, j, window);
                        const float p = ok ? exp2f(sc[n][e] * scale_log2 - lse2[e / 2]) : 0.0f;
                        dp[n][e] = p * (dp[n][e] - dlt[e / 2]);
                    }
                }
            }
            if (KS == 2 && VS == 1) {
                __syncthreads();  // every warp's dP is done: v_s is no longer read
                if (has_next) {
                    load_v(0, next);
                    at_cp_async_commit();
                }
            }
            if (!skip) {
#pragma unroll
                for (int kk = 0; kk < BK / 16; ++kk) {
                    uint32_t a[4];
                    at_frag_a_from_c<NT>(a, dp, kk);
#pragma unroll
                    for (int dn = 0; dn < DT; dn += 2) {
                        uint32_t b[4];
                        at_frag_b(b, k_s, LD, kk * 16, d0 + dn * 8, lane);
                        at_mma(acc[dn], a, b[0], b[1]);
                        at_mma(acc[dn + 1], a, b[2], b[3]);
                    }
                }
            }
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int i = row_pos[r];
            if (i >= nrows) continue;
            bf16* drow = dq + ((size_t)(row_begin + i) * n_heads + h) * hd;
#pragma unroll
            for (int dn = 0; dn < DT; ++dn) {
                const int c = d0 + dn * 8 + 2 * t;
                if (c < hd)
                    *reinterpret_cast<uint32_t*>(drow + c) = at_pack_f32(acc[dn][2 * r] * scale, acc[dn][2 * r + 1] * scale);
            }
        }
    }
}

// q, dout (N, H, hd), k, v (N, KV, hd) bf16, lse, delta (N, H) f32, cu_rows (S+1) i32 → dq
// (N, H, hd) bf16. grid = (ceil(max_rows / 64), H, S), block = 128, dynamic shared memory
// AtCfg<HD>::DQ_SMEM = (128 + (KS + VS)·BK)·(HD + 8)·2 bytes (BK = 64, 64, 32 and k/v stages
// KS + VS = 4, 3, 2 for HD 64, 128, 256: 55296, 87040, 101376).
#define AT_DQ_KERNEL(HD)                                                                                           \
    extern "C" __global__ void __launch_bounds__(AT_THREADS, AtCfg<HD>::DQ_MIN_BLOCKS)                             \
    attention_train_bwd_dq_hd##HD##_bf16(                                                                          \
        bf16* __restrict__ dq, const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v, \
        const bf16* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,             \
        const int* __restrict__ cu_rows, int n_heads, int n_kv_heads, int hd, int window, float scale) {           \
        if (at_vec16(hd, q, k, v, dout))                                                                           \
            at_dq<HD, 8>(dq, q, k, v, dout, lse, delta, cu_rows, n_heads, n_kv_heads, hd, window, scale);          \
        else                                                                                                       \
            at_dq<HD, 4>(dq, q, k, v, dout, lse, delta, cu_rows, n_heads, n_kv_heads, hd, window, scale);          \
    }
AT_DQ_KERNEL(64)
AT_DQ_KERNEL(128)
AT_DQ_KERNEL(256)

// ----------------------------------------------------------------------------
// Scatter

// dst[rows[i], :] = src[i, :] for i < m; src (m, dim), dst (n, dim) bf16; rows (m) u32, distinct
// (a row ≥ n is skipped: the kernel cannot report it). grid = m, block strides over dim.
extern "C" __global__ void scatter_rows_bf16(bf16* __restrict__ dst, const bf16* __restrict__ src,
                                             const uint32_t* __restrict__ rows, int m, int n, int dim) {
    const int i = blockIdx.x;
    if (i >= m) return;
    const uint32_t r = rows[i];
    if (r >= (uint32_t)n) return;
    const bf16* from = src + (size_t)i * dim;
    bf16* to = dst + (size_t)r * dim;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) to[c] = from[c];
}
