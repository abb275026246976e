// kernels/elementwise.cu under the emulator (see run.sh): embedding, RoPE, SwiGLU (plain and
// fused gate‖up), bias and residual adds, launched as src/cuda/rollout.rs does (row kernels:
// grid = rows, block = row_block; grid-stride kernels: ew_grid(n) blocks of 256), against
// src/cpu/ops.rs with tests/cuda_rollout_kernels.rs's tolerances (embedding exact; RoPE atol 1e-5,
// SwiGLU 1e-6, adds 0; rtol 2^-8 for the bf16 store). The grid-stride kernels also run on a tiny
// grid (their comments allow any grid), and residual_add once past the launcher's 65535-block cap.
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

static void rope(size_t h, size_t kv, size_t hd, size_t rows) {
    Rng rng(h * 100 + kv * 10 + hd + rows);
    std::vector<float> inv_freq(hd / 2);
    for (size_t i = 0; i < hd / 2; ++i) inv_freq[i] = (float)(1.0 / std::pow(1e6, 2.0 * i / hd));
    std::vector<int> pos(rows);
    const int base[6] = {0, 1, 17, 300, 4095, 30000};
    for (size_t r = 0; r < rows; ++r) pos[r] = base[r % 6] + (int)r;
    auto q = bfr(rng.vec(rows * h * hd, -3, 3)), k = bfr(rng.vec(rows * kv * hd, -3, 3));
    std::vector<bf16> qb = to_bf(q), kb = to_bf(k);
    if (rows > 0) {
        const int rows_i = (int)rows, h_i = (int)h, kv_i = (int)kv, hd_i = (int)hd;
        emu_launch(grid1(rows), row_block((h + kv) * hd / 2), 0,
                   [&] { rope_fwd_bf16(qb.data(), kb.data(), pos.data(), inv_freq.data(), rows_i, h_i, kv_i, hd_i); });
    }
    for (size_t r = 0; r < rows; ++r) { rope_ref(q, r, h, hd, pos[r], inv_freq); rope_ref(k, r, kv, hd, pos[r], inv_freq); }
    const std::string what = "rope h " + std::to_string(h) + " kv " + std::to_string(kv) + " hd " + std::to_string(hd) + " rows " + std::to_string(rows);
    check(what + " q", to_d(q), from_bf(qb), 1e-5, BF16_STORE_RTOL);
    check(what + " k", to_d(k), from_bf(kb), 1e-5, BF16_STORE_RTOL);
}

// grid: 0 = the launcher's ew_grid(n), else that many blocks (the kernels are grid-stride).
static void swiglu_bias_residual(size_t rows, size_t inter, unsigned grid) {
    const size_t n = rows * inter;
    Rng rng(n + grid);
    auto gate = bfr(rng.vec(n, -8, 8)), up = bfr(rng.vec(n, -3, 3)), b = bfr(rng.vec(inter, -1, 1));
    const unsigned g = grid ? grid : ew_grid(n);
    const std::string what = std::to_string(rows) + "x" + std::to_string(inter) + " grid " + std::to_string(g);
    std::vector<double> want(n);
    for (size_t i = 0; i < n; ++i) want[i] = (gate[i] * (1.0f / (1.0f + expf(-gate[i])))) * up[i];
    std::vector<bf16> gb = to_bf(gate), ub = to_bf(up), out(n, bf_nan());
    const uint64_t n64 = n;
    emu_launch(grid1(g), 256, 0, [&] { swiglu_fwd_bf16(out.data(), gb.data(), ub.data(), n64); });
    check("swiglu " + what, want, from_bf(out), 1e-6, BF16_STORE_RTOL);
    std::vector<float> gate_up;
    for (size_t r = 0; r < rows; ++r) {
        gate_up.insert(gate_up.end(), gate.begin() + r * inter, gate.begin() + (r + 1) * inter);
        gate_up.insert(gate_up.end(), up.begin() + r * inter, up.begin() + (r + 1) * inter);
    }
    std::vector<bf16> gub = to_bf(gate_up), outf(n, bf_nan());
    const int rows_i = (int)rows, inter_i = (int)inter;
    emu_launch(grid1(g), 256, 0, [&] { swiglu_fused_fwd_bf16(outf.data(), gub.data(), rows_i, inter_i); });
    check_bits("swiglu fused = unfused " + what, out.size() ? from_bf(out) : std::vector<float>(), from_bf(outf));

    std::vector<bf16> yb = to_bf(up), bb = to_bf(b);
    emu_launch(grid1(g), 256, 0, [&] { add_bias_bf16(yb.data(), bb.data(), rows_i, inter_i); });
    for (size_t i = 0; i < n; ++i) want[i] = up[i] + b[i % inter];
    check("add_bias " + what, want, from_bf(yb), 0, BF16_STORE_RTOL);
    std::vector<bf16> xb = to_bf(gate);
    emu_launch(grid1(g), 256, 0, [&] { residual_add_bf16(xb.data(), ub.data(), n64); });
    for (size_t i = 0; i < n; ++i) want[i] = gate[i] + up[i];
    check("residual " + what, want, from_bf(xb), 0, BF16_STORE_RTOL);
}

// residual_add past the launcher's grid cap: ew_grid clamps to 65535 blocks, the kernel strides.
static void residual_past_grid_cap() {
    const size_t n = (size_t)65535 * 256 + 999;
    std::vector<bf16> x(n), y(n);
    for (size_t i = 0; i < n; ++i) { x[i] = __float2bfloat16_rn((float)(i % 251)); y[i] = __float2bfloat16_rn((float)(i % 3)); }
    const uint64_t n64 = n;
    emu_launch(grid1(ew_grid(n)), 256, 0, [&] { residual_add_bf16(x.data(), y.data(), n64); });
    size_t bad = 0;
    for (size_t i = 0; i < n; ++i) bad += __bfloat162float(x[i]) != (float)(i % 251 + i % 3);
    expect(bad == 0, "residual_add of " + std::to_string(n) + " elements (grid capped at 65535): " + std::to_string(bad) + " wrong");
}

int main(int argc, char** argv) {
    parse_args(argc, argv);
    embedding(461, 123, 7);
    rope(14, 2, 64, 7);
    swiglu_bias_residual(7, 123, 0);
    if (g_full) {
        for (auto vd : {std::pair<size_t, size_t>{461, 123}, {1000, 896}, {3, 1}, {5, 513}})
            for (size_t rows : {0, 1, 33}) embedding(vd.first, vd.second, rows);
        // Qwen2.5-0.5B, Llama-3.2-1B, Qwen2.5-7B (pairs > 512: strided), hd 36, hd 2.
        for (auto c : {std::array<size_t, 3>{14, 2, 64}, {32, 8, 64}, {28, 4, 128}, {6, 2, 36}, {3, 1, 2}})
            for (size_t rows : {1, 33}) rope(c[0], c[1], c[2], rows);
        for (auto ri : {std::pair<size_t, size_t>{1, 123}, {33, 4864}, {3, 1}})
            for (unsigned g : {0u, 1u, 3u}) swiglu_bias_residual(ri.first, ri.second, g);
        residual_past_grid_cap();
    }
    return finish("elementwise");
}
