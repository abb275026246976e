// kernels/elementwise.cu under the emulator (see run.sh): embedding, RoPE, SwiGLU (plain and
// fused gate‖up), bias and residual adds, launched as src/cuda/rollout.rs does (embedding: grid =
// rows, block = row_block; RoPE: grid = ceil(rows / ROPE_ROWS), block = ROPE_THREADS, dynamic smem
// 2·ROPE_ROWS·(hd/2) f32; vectorised grid-stride kernels: ew_vec_grid(n) = ew_grid(ceil(n/8))
// blocks of 256), against src/cpu/ops.rs with tests/cuda_rollout_kernels.rs's tolerances
// (embedding exact; RoPE atol 1e-5, SwiGLU 1e-6, adds 0; rtol 2^-8 for the bf16 store). The
// grid-stride kernels also run on a tiny grid (their comments allow any grid), and residual_add
// once past the launcher's 65535-block cap. Every kernel with a 16-byte vector path also runs on
// buffers offset by one element (misaligned: the scalar path), and the two results must be
// bit-identical (same per-element arithmetic).
#include <array>
#include "emu.h"
#include "elementwise.inc"

static const double BF16_STORE_RTOL = 1.0 / 256;

static void embedding(size_t vocab, size_t dim, size_t rows) {
    Rng rng(vocab + dim + rows);
    auto table = bfr(rng.vec(vocab * dim, -2, 2));
    std::vector<uint32_t> ids(rows);
    for (size_t r = 0; r < rows; ++r) ids[r] = (uint32_t)((r * 7919 + 3) % (vocab + 2));  // some ≥ vocab
    if (rows > 2) { ids[0] = (uint32_t)vocab - 1; ids[1] = 0xffffffffu; }
    std::vector<bf16> tb = to_bf(table), out(rows * dim, bf_nan());
    std::vector<double> want(rows * dim, 0.0);
    for (size_t r = 0; r < rows; ++r)
        if (ids[r] < vocab) for (size_t i = 0; i < dim; ++i) want[r * dim + i] = table[ids[r] * dim + i];
    if (rows > 0 && dim > 0) {  // the launcher returns early otherwise
        const int rows_i = (int)rows, dim_i = (int)dim, vocab_i = (int)vocab;
        emu_launch(grid1(rows), row_block(dim), 0, [&] { embedding_fwd_bf16(out.data(), tb.data(), ids.data(), rows_i, dim_i, vocab_i); });
    }
    check("embedding vocab " + std::to_string(vocab) + " dim " + std::to_string(dim) + " rows " + std::to_string(rows), want, from_bf(out), 0, 0);
}

// ops::rope_inplace on one row of heads (f32 angle, sin_cos, a·c − b·s), inverse = false.
static void rope_ref(std::vector<float>& x, size_t r, size_t heads, size_t hd, int pos, const std::vector<float>& inv_freq) {
    const size_t half = hd / 2;
    for (size_t h = 0; h < heads; ++h) {
        float* v = &x[(r * heads + h) * hd];
        for (size_t i = 0; i < half; ++i) {
            const float ang = (float)pos * inv_freq[i];
            const float s = sinf(ang), c = cosf(ang);
            const float a = v[i], b = v[i + half];
            v[i] = a * c - b * s;
            v[i + half] = b * c + a * s;
        }
    }
}

static void rope_launch(bf16* q, bf16* k, const int* pos, const float* inv_freq, size_t rows, size_t h, size_t kv, size_t hd) {
    if (rows == 0) return;
    const int rows_i = (int)rows, h_i = (int)h, kv_i = (int)kv, hd_i = (int)hd;
    emu_launch(grid1((rows + ROPE_ROWS - 1) / ROPE_ROWS), ROPE_THREADS, 2 * ROPE_ROWS * (hd / 2) * sizeof(float),
               [&] { rope_fwd_bf16(q, k, pos, inv_freq, rows_i, h_i, kv_i, hd_i); });
}

static void rope(size_t h, size_t kv, size_t hd, size_t rows) {
    Rng rng(h * 100 + kv * 10 + hd + rows);
    std::vector<float> inv_freq(hd / 2);
    for (size_t i = 0; i < hd / 2; ++i) inv_freq[i] = (float)(1.0 / std::pow(1e6, 2.0 * i / hd));
    std::vector<int> pos(rows);
    const int base[6] = {0, 1, 17, 300, 4095, 30000};
    for (size_t r = 0; r < rows; ++r) pos[r] = base[r % 6] + (int)r;
    auto q = bfr(rng.vec(rows * h * hd, -3, 3)), k = bfr(rng.vec(rows * kv * hd, -3, 3));
    std::vector<bf16> qb = to_bf(q), kb = to_bf(k);
    rope_launch(qb.data(), kb.data(), pos.data(), inv_freq.data(), rows, h, kv, hd);
    // Misaligned copies (offset one element): the one-pair path, bit-identical.
    std::vector<bf16> qm = to_bf(q), km = to_bf(k);
    qm.insert(qm.begin(), bf_nan());
    km.insert(km.begin(), bf_nan());
    rope_launch(qm.data() + 1, km.data() + 1, pos.data(), inv_freq.data(), rows, h, kv, hd);
    for (size_t r = 0; r < rows; ++r) { rope_ref(q, r, h, hd, pos[r], inv_freq); rope_ref(k, r, kv, hd, pos[r], inv_freq); }
    const std::string what = "rope h " + std::to_string(h) + " kv " + std::to_string(kv) + " hd " + std::to_string(hd) + " rows " + std::to_string(rows);
    check(what + " q", to_d(q), from_bf(qb), 1e-5, BF16_STORE_RTOL);
    check(what + " k", to_d(k), from_bf(kb), 1e-5, BF16_STORE_RTOL);
    check_bits(what + " q misaligned = aligned", from_bf(qb), from_bf(std::vector<bf16>(qm.begin() + 1, qm.end())));
    check_bits(what + " k misaligned = aligned", from_bf(kb), from_bf(std::vector<bf16>(km.begin() + 1, km.end())));
}

// A copy of v at element offset `off` of its allocation (1: not 16-byte aligned); pointer via .data() + off.
static std::vector<bf16> at_off(const std::vector<bf16>& v, size_t off) {
    std::vector<bf16> o(off, bf_nan());
    o.insert(o.end(), v.begin(), v.end());
    return o;
}
static std::vector<float> drop(const std::vector<bf16>& v, size_t off) { return from_bf(std::vector<bf16>(v.begin() + off, v.end())); }

// grid: 0 = the launcher's ew_vec_grid(n), else that many blocks (the kernels are grid-stride).
// off: element offset of every buffer (1 = misaligned: the scalar paths); the result must be
// bit-identical to the aligned run's.
static std::array<std::vector<float>, 3> swiglu_bias_residual(size_t rows, size_t inter, unsigned grid, size_t off) {
    const size_t n = rows * inter;
    Rng rng(n + grid);
    auto gate = bfr(rng.vec(n, -8, 8)), up = bfr(rng.vec(n, -3, 3)), b = bfr(rng.vec(inter, -1, 1));
    const unsigned g = grid ? grid : ew_grid((n + 7) / 8);
    const std::string what = std::to_string(rows) + "x" + std::to_string(inter) + " grid " + std::to_string(g) + " offset " + std::to_string(off);
    std::vector<double> want(n);
    for (size_t i = 0; i < n; ++i) want[i] = (gate[i] * (1.0f / (1.0f + expf(-gate[i])))) * up[i];
    std::vector<bf16> gb = at_off(to_bf(gate), off), ub = at_off(to_bf(up), off), out = at_off(std::vector<bf16>(n, bf_nan()), off);
    const uint64_t n64 = n;
    emu_launch(grid1(g), 256, 0, [&] { swiglu_fwd_bf16(out.data() + off, gb.data() + off, ub.data() + off, n64); });
    check("swiglu " + what, want, drop(out, off), 1e-6, BF16_STORE_RTOL);
    std::vector<float> gate_up;
    for (size_t r = 0; r < rows; ++r) {
        gate_up.insert(gate_up.end(), gate.begin() + r * inter, gate.begin() + (r + 1) * inter);
        gate_up.insert(gate_up.end(), up.begin() + r * inter, up.begin() + (r + 1) * inter);
    }
    std::vector<bf16> gub = at_off(to_bf(gate_up), off), outf = at_off(std::vector<bf16>(n, bf_nan()), off);
    const int rows_i = (int)rows, inter_i = (int)inter;
    emu_launch(grid1(g), 256, 0, [&] { swiglu_fused_fwd_bf16(outf.data() + off, gub.data() + off, rows_i, inter_i); });
    check_bits("swiglu fused = unfused " + what, drop(out, off), drop(outf, off));

    std::vector<bf16> yb = at_off(to_bf(up), off), bb = at_off(to_bf(b), off);
    emu_launch(grid1(g), 256, 0, [&] { add_bias_bf16(yb.data() + off, bb.data() + off, rows_i, inter_i); });
    for (size_t i = 0; i < n; ++i) want[i] = up[i] + b[i % inter];
    check("add_bias " + what, want, drop(yb, off), 0, BF16_STORE_RTOL);
    std::vector<bf16> xb = at_off(to_bf(gate), off);
    emu_launch(grid1(g), 256, 0, [&] { residual_add_bf16(xb.data() + off, ub.data() + off, n64); });
    for (size_t i = 0; i < n; ++i) want[i] = gate[i] + up[i];
    check("residual " + what, want, drop(xb, off), 0, BF16_STORE_RTOL);
    return {drop(out, off), drop(yb, off), drop(xb, off)};
}

// The aligned (vector) and misaligned (scalar) paths give bit-identical results.
static void swiglu_bias_residual_paths(size_t rows, size_t inter, unsigned grid) {
    auto a = swiglu_bias_residual(rows, inter, grid, 0), m = swiglu_bias_residual(rows, inter, grid, 1);
    const std::string what = std::to_string(rows) + "x" + std::to_string(inter) + " grid " + std::to_string(grid);
    check_bits("swiglu misaligned = aligned " + what, a[0], m[0]);
    check_bits("add_bias misaligned = aligned " + what, a[1], m[1]);
    check_bits("residual misaligned = aligned " + what, a[2], m[2]);
}

// residual_add past the launcher's grid cap: ew_vec_grid clamps to 65535 blocks of 256 threads
// (8 elements each), the kernel strides; n % 8 = 7 leaves a scalar tail.
static void residual_past_grid_cap() {
    const size_t n = (size_t)65535 * 256 * 8 + 999;
    std::vector<bf16> x(n), y(n);
    for (size_t i = 0; i < n; ++i) { x[i] = __float2bfloat16_rn((float)(i % 251)); y[i] = __float2bfloat16_rn((float)(i % 3)); }
    const uint64_t n64 = n;
    emu_launch(grid1(ew_grid((n + 7) / 8)), 256, 0, [&] { residual_add_bf16(x.data(), y.data(), n64); });
    size_t bad = 0;
    for (size_t i = 0; i < n; ++i) bad += __bfloat162float(x[i]) != (float)(i % 251 + i % 3);
    expect(bad == 0, "residual_add of " + std::to_string(n) + " elements (grid capped at 65535): " + std::to_string(bad) + " wrong");
}

int main(int argc, char** argv) {
    parse_args(argc, argv);
    embedding(461, 123, 7);
    rope(14, 2, 64, 7);
    swiglu_bias_residual_paths(7, 123, 0);
    swiglu_bias_residual_paths(5, 64, 0);
    if (g_full) {
        for (auto vd : {std::pair<size_t, size_t>{461, 123}, {1000, 896}, {3, 1}, {5, 513}})
            for (size_t rows : {0, 1, 33}) embedding(vd.first, vd.second, rows);
        // Qwen2.5-0.5B, Llama-3.2-1B, Qwen2.5-7B (pairs > 512: strided), hd 36, hd 2.
        // Qwen2.5-0.5B, Llama-3.2-1B, Qwen2.5-7B; hd 16 (one vector per half), hd 36 and 2 (the
        // one-pair path); rows 1, 5, 33: partial last blocks of ROPE_ROWS.
        for (auto c : {std::array<size_t, 3>{14, 2, 64}, {32, 8, 64}, {28, 4, 128}, {3, 1, 16}, {6, 2, 36}, {3, 1, 2}})
            for (size_t rows : {1, 5, 33}) rope(c[0], c[1], c[2], rows);
        // 4864: Qwen2.5-0.5B's intermediate (vector rows); 123, 1, 12: odd / n % 8 tails, rows not
        // a whole number of vectors (fused / bias: scalar path); 1 x 24: one vector per row.
        for (auto ri : {std::pair<size_t, size_t>{1, 123}, {33, 4864}, {3, 1}, {5, 12}, {1, 24}, {7, 896}})
            for (unsigned g : {0u, 1u, 3u}) swiglu_bias_residual_paths(ri.first, ri.second, g);
        residual_past_grid_cap();
    }
    return finish("elementwise");
}
