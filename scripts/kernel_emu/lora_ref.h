// The rollout's LoRA kernels as they were before the row tiling (kernels/lora.cu and
// kernels/fused.cu at commit 673903f, with common.cuh's warp_dot_bf16_f32 and rank_dot_f32),
// verbatim but for the ref_ prefix and the unroll pragmas: one warp per (row, j) for xa, one
// thread per (row, column) for the expand, every row re-reading A and B. The emulator's
// bit-identity oracle for the tiled kernels (lora_emu.cpp, fused_emu.cpp), launched as the
// launchers of that commit did; below them, the launches of the current launchers. Included
// after a kernel .inc (it uses its helpers: vec16_ok, load8_bf16, load4_f32, warp_reduce_sum,
// the bf16 conversions, LoraGroup3, whose layout did not change).
#pragma once

static inline float ref_warp_dot_bf16_f32(const bf16* __restrict__ x, const float* __restrict__ a, int n, int lane) {
    float acc = 0.0f;
    if (n % 8 == 0 && vec16_ok(x) && vec16_ok(a)) {
        for (int v = lane; v < n / 8; v += WARP_SIZE) {
            float xv[8], a0[4], a1[4];
            load8_bf16(x + (size_t)v * 8, xv);
            load4_f32(a + (size_t)v * 8, a0);
            load4_f32(a + (size_t)v * 8 + 4, a1);
            for (int k = 0; k < 4; ++k) acc += xv[k] * a0[k];
            for (int k = 0; k < 4; ++k) acc += xv[4 + k] * a1[k];
        }
    } else {
        for (int i = lane; i < n; i += WARP_SIZE) acc += bf16_to_f32(x[i]) * a[i];
    }
    return warp_reduce_sum(acc);
}

static inline float ref_rank_dot_f32(const float* __restrict__ u, const float* __restrict__ b, int rank) {
    float acc = 0.0f;
    if (rank % 4 == 0 && vec16_ok(u) && vec16_ok(b)) {
        for (int j = 0; j < rank; j += 4) {
            float uv[4], bv[4];
            load4_f32(u + j, uv);
            load4_f32(b + j, bv);
            for (int k = 0; k < 4; ++k) acc += uv[k] * bv[k];
        }
        return acc;
    }
    for (int j = 0; j < rank; ++j) acc += u[j] * b[j];
    return acc;
}

static void ref_lora_xa_bf16(float* __restrict__ xa, const bf16* __restrict__ x, const float* __restrict__ a, int rows,
                             int in_dim, int rank) {
    const int row = blockIdx.x;
    const int warps = blockDim.x / WARP_SIZE;
    const int j = blockIdx.y * warps + threadIdx.x / WARP_SIZE;
    if (row >= rows || j >= rank) return;  // whole warp
    const int lane = threadIdx.x % WARP_SIZE;
    const float acc = ref_warp_dot_bf16_f32(x + (size_t)row * in_dim, a + (size_t)j * in_dim, in_dim, lane);
    if (lane == 0) xa[(size_t)row * rank + j] = acc;
}

static void ref_lora_expand_add_bf16(bf16* __restrict__ y, const float* __restrict__ xa, const float* __restrict__ b,
                                     float scale, int rows, int out_dim, int rank) {
    const int row = blockIdx.x;
    const int o = blockIdx.y * blockDim.x + threadIdx.x;
    if (row >= rows || o >= out_dim) return;
    const float acc = ref_rank_dot_f32(xa + (size_t)row * rank, b + (size_t)o * rank, rank);
    bf16* yp = y + (size_t)row * out_dim + o;
    *yp = f32_to_bf16(bf16_to_f32(*yp) + scale * acc);
}

static void ref_lora_group_xa_bf16(float* __restrict__ xa, const bf16* __restrict__ x, LoraGroup3 g, int rows,
                                   int in_dim, int rank) {
    const int row = blockIdx.x;
    const int warps = blockDim.x / WARP_SIZE;
    const int pj = blockIdx.y * warps + threadIdx.x / WARP_SIZE;
    if (row >= rows || pj >= g.n * rank) return;  // whole warp
    const int lane = threadIdx.x % WARP_SIZE;
    const float* aj = g.a[pj / rank] + (size_t)(pj % rank) * in_dim;
    const float acc = ref_warp_dot_bf16_f32(x + (size_t)row * in_dim, aj, in_dim, lane);
    if (lane == 0) xa[(size_t)row * g.n * rank + pj] = acc;
}

static void ref_lora_group_expand_add_bf16(bf16* __restrict__ y, int ldy, const float* __restrict__ xa, LoraGroup3 g,
                                           float scale, int rows, int rank) {
    const int row = blockIdx.x;
    int o = blockIdx.y * blockDim.x + threadIdx.x;
    if (row >= rows) return;
    int p = 0;
    while (p < g.n && o >= g.out[p]) {
        o -= g.out[p];
        ++p;
    }
    if (p >= g.n) return;
    const float acc = ref_rank_dot_f32(xa + (size_t)row * g.n * rank + (size_t)p * rank, g.b[p] + (size_t)o * rank, rank);
    bf16* yp = y + (size_t)row * ldy + g.col[p] + o;
    *yp = f32_to_bf16(bf16_to_f32(*yp) + scale * acc);
}

// The old launches (src/cuda/rollout.rs, src/cuda/fused.rs at 673903f): xa grid = (rows,
// ceil(pairs / warps)), warps = min(pairs, 8); expand grid = (rows, ceil(cols / 256)), block 256.
static inline void ref_lora_xa_launch(size_t rows, size_t pairs, const std::function<void()>& k) {
    if (rows * pairs == 0) return;
    const size_t warps = std::min<size_t>(pairs, 8);
    emu_launch(grid1(rows, (pairs + warps - 1) / warps), (int)warps * 32, 0, k);
}
static inline void ref_lora_expand_launch(size_t rows, size_t cols, const std::function<void()>& k) {
    if (rows * cols == 0) return;
    emu_launch(grid1(rows, (cols + 255) / 256), 256, 0, k);
}

// The new launches, as src/cuda/rollout.rs's lora_xa_cfg and lora_expand_cfg compute them.
static inline void lora_xa_launch(size_t rows, size_t pairs, const std::function<void()>& k) {
    const size_t warps = std::min<size_t>(pairs, 8);
    emu_launch(grid1((rows + 3) / 4, (pairs + warps - 1) / warps), (int)warps * 32, 0, k);
}
static inline void lora_expand_launch(size_t rows, size_t cols, size_t n, size_t rank, const std::function<void()>& k) {
    const size_t tile = std::min<size_t>(rows, 32);
    const size_t xa_row = rank <= 64 ? n * rank * 4 : 0;
    emu_launch(grid1((cols + 127) / 128, (rows + 31) / 32), 128, tile * (128 * 2 + xa_row), k);
}

// An xa (rows, n·rank) f32 and B (out, rank) whose sums Σ_j xa[r, p·rank + j]·B[o, j] cancel:
// xa alternates ±2^20 (+ a value in (-1, 1); an odd rank's last j only the latter) and B's
// columns come in equal pairs, so each pair of products cancels to a few units while a sum's
// rounding error is ~2^-3: a different summation order changes y's bf16 bits (with random
// inputs, a 1-ulp f32 difference in the sum almost never does).
static inline std::vector<float> cancelling_xa(Rng& rng, size_t rows, size_t n, size_t rank) {
    std::vector<float> xa(rows * n * rank);
    for (size_t i = 0; i < xa.size(); ++i) {
        const size_t j = i % rank;
        xa[i] = (j + 1 < rank || j % 2 ? (j % 2 ? -1048576.0f : 1048576.0f) : 0.0f) + rng.uni(-1, 1);
    }
    return xa;
}
static inline std::vector<float> paired_b(Rng& rng, size_t out, size_t rank) {
    std::vector<float> b(out * rank);
    for (size_t o = 0; o < out; ++o)
        for (size_t j = 0; j < rank; j += 2) {
            const float v = rng.uni(-1, 1);
            b[o * rank + j] = v;
            if (j + 1 < rank) b[o * rank + j + 1] = v;
        }
    return b;
}
