// kernels/fused.cu under the emulator (see run.sh), launched as src/cuda/fused.rs does:
//   qkv_rope_append_bf16 (grid = rows, block = max(pairs, kvd) rounded to 32, clamped to
//   [32, 256]) against bias add (rounded to bf16) + ops::rope_inplace + the paged cache write,
//   with tests/cuda_rollout_kernels.rs's RoPE tolerance (atol 1e-5, rtol 2^-8 for the bf16
//   store); v exact; cache slots no row writes must keep their contents; rows whose position is
//   outside the cache write q only.
//   residual_rmsnorm_fwd_bf16 (block per row of ceil(dim/8) threads rounded to a warp, ≤ 1024;
//   dims 8200 and 4104 exercise the strided path) against x + y rounded to bf16
//   (exact) and the RMSNorm of rmsnorm_emu.cpp (atol 1e-6, rtol 2^-7).
#include "emu.h"
#include "fused.inc"
#include "lora_ref.h"

static const double BF16_STORE_RTOL = 1.0 / 256;

static void rope_pair(float& a, float& b, int pos, float inv_freq) {
    const float ang = (float)pos * inv_freq;
    const float s = sinf(ang), c = cosf(ang);
    const float x = a, y = b;
    a = x * c - y * s;
    b = y * c + x * s;
}

static void qkv(size_t h, size_t kv, size_t hd, size_t rows, bool with_bias) {
    Rng rng(h * 1000 + kv * 100 + hd + rows + (with_bias ? 7 : 0));
    const size_t qd = h * hd, kvd = kv * hd, W = qd + 2 * kvd, half = hd / 2;
    const int page_size = 4, max_pages = 5, num_pages = 12;  // cache capacity 20 positions per sequence
    const size_t cache_len = (size_t)num_pages * page_size * kvd;
    std::vector<float> inv_freq(half);
    for (size_t i = 0; i < half; ++i) inv_freq[i] = (float)(1.0 / std::pow(1e4, 2.0 * i / hd));
    auto x = bfr(rng.vec(rows * W, -3, 3));
    auto bias = bfr(rng.vec(W, -1, 1));
    // Two sequences with shuffled pages; rows alternate between them; some positions outside.
    std::vector<int> bt = {3, 7, 1, 9, 0, /* seq 1 */ 2, 11, 5, 4, 8};
    std::vector<int> pos(rows), seq(rows);
    for (size_t r = 0; r < rows; ++r) {
        seq[r] = (int)(r % 2);
        pos[r] = (int)(r / 2);
        if (r % 7 == 5) pos[r] = (r % 2) ? -1 : page_size * max_pages;  // skipped by the cache
    }
    auto kc0 = bfr(rng.vec(cache_len, -1, 1)), vc0 = bfr(rng.vec(cache_len, -1, 1));
    // Reference.
    std::vector<double> want_q(rows * qd), want_k(kc0.begin(), kc0.end()), want_v(vc0.begin(), vc0.end());
    for (size_t r = 0; r < rows; ++r) {
        std::vector<float> row(x.begin() + r * W, x.begin() + (r + 1) * W);
        if (with_bias)
            for (size_t c = 0; c < W; ++c) row[c] = bfr(row[c] + bias[c]);
        for (size_t head = 0; head < h + kv; ++head)
            for (size_t i = 0; i < half; ++i) rope_pair(row[head * hd + i], row[head * hd + i + half], pos[r], inv_freq[i]);
        for (size_t c = 0; c < qd; ++c) want_q[r * qd + c] = row[c];
        if (pos[r] < 0 || pos[r] >= page_size * max_pages) continue;
        const size_t slot = ((size_t)bt[seq[r] * max_pages + pos[r] / page_size] * page_size + pos[r] % page_size) * kvd;
        for (size_t c = 0; c < kvd; ++c) {
            want_k[slot + c] = row[qd + c];
            want_v[slot + c] = row[qd + kvd + c];
        }
    }
    std::vector<bf16> xb = to_bf(x), bb = to_bf(bias), qb(rows * qd, bf_nan()), kb = to_bf(kc0), vb = to_bf(vc0);
    if (rows > 0) {
        const size_t pairs = (h + kv) * half;
        const size_t want_block = std::max(pairs, kvd);
        const int block = (int)std::min<size_t>(std::max<size_t>((want_block + 31) / 32 * 32, 32), 256);
        const int rows_i = (int)rows, h_i = (int)h, kv_i = (int)kv, hd_i = (int)hd;
        emu_launch(grid1(rows), block, 0, [&] {
            qkv_rope_append_bf16(qb.data(), kb.data(), vb.data(), xb.data(), with_bias ? bb.data() : nullptr, pos.data(),
                                 inv_freq.data(), bt.data(), seq.data(), rows_i, h_i, kv_i, hd_i, page_size, max_pages);
        });
    }
    const std::string what = "qkv h " + std::to_string(h) + " kv " + std::to_string(kv) + " hd " + std::to_string(hd) +
                             " rows " + std::to_string(rows) + (with_bias ? " bias" : "");
    check(what + " q", want_q, from_bf(qb), 1e-5, BF16_STORE_RTOL);
    check(what + " k cache", want_k, from_bf(kb), 1e-5, BF16_STORE_RTOL);
    check(what + " v cache", want_v, from_bf(vb), 0, 0);
}

static void residual_norm(size_t rows, size_t dim) {
    Rng rng(rows * 31 + dim);
    const float eps = 1e-6f;
    auto x = bfr(rng.vec(rows * dim, -2, 2)), y = bfr(rng.vec(rows * dim, -2, 2)), w = bfr(rng.vec(dim, 0.5, 1.5));
    std::vector<double> want_x(rows * dim), want(rows * dim);
    for (size_t r = 0; r < rows; ++r) {
        float ss = 0;
        for (size_t i = 0; i < dim; ++i) {
            const float v = bfr(x[r * dim + i] + y[r * dim + i]);
            want_x[r * dim + i] = v;
            ss += v * v;
        }
        const float inv = 1.0f / std::sqrt(ss / (float)dim + eps);
        for (size_t i = 0; i < dim; ++i) want[r * dim + i] = (float)want_x[r * dim + i] * inv * w[i];
    }
    std::vector<bf16> xb = to_bf(x), yb = to_bf(y), wb = to_bf(w), ob(rows * dim, bf_nan());
    if (rows * dim > 0) {
        const int rows_i = (int)rows, dim_i = (int)dim;
        const int block = (int)std::min<size_t>(std::max<size_t>(((dim + 7) / 8 + 31) / 32 * 32, 32), 1024);
        emu_launch(grid1(rows), block, 0,
                   [&] { residual_rmsnorm_fwd_bf16(ob.data(), xb.data(), yb.data(), wb.data(), eps, rows_i, dim_i); });
    }
    const std::string what = "residual+rmsnorm rows " + std::to_string(rows) + " dim " + std::to_string(dim);
    check(what + " x", want_x, from_bf(xb), 0, 0);
    check(what + " out", want, from_bf(ob), 1e-6, 1.0 / 128);
}

// Grouped LoRA of n projections into a stacked y (rows, ldy) whose columns are [col_p, col_p+out_p),
// launched as src/cuda/fused.rs (lora_ref.h: xa grid = (ceil(rows / 4), ceil(n·rank / warps)),
// block = min(n·rank, 8) warps; expand grid = (ceil(Σout / 128), ceil(rows / 32)), block 128,
// shared memory min(rows, 32)·(256 + 4·n·rank bytes, the latter for rank ≤ 64)), against
//   - the grouped kernels before the row tiling (lora_ref.h, launched as they were): xa and y
//     bit-identical (columns outside every projection included: untouched);
//   - f64 x·Aᵀ then y + s·xa·Bᵀ (atol 1e-5 on xa, rtol 2^-8 for the bf16 store of y).
static void lora_group(size_t n, size_t rows, size_t in, size_t rank, const std::vector<size_t>& outs, size_t gap) {
    Rng rng(n * 1000 + rows * 10 + in + rank);
    std::vector<size_t> col(n);
    size_t ldy = 0;
    for (size_t p = 0; p < n; ++p) { col[p] = ldy + gap; ldy = col[p] + outs[p]; }
    ldy += gap;
    auto x = bfr(rng.vec(rows * in, -2, 2)), y = bfr(rng.vec(rows * ldy, -2, 2));
    std::vector<std::vector<float>> a(n), b(n);
    for (size_t p = 0; p < n; ++p) { a[p] = rng.vec(rank * in, -0.1, 0.1); b[p] = rng.vec(outs[p] * rank, -0.1, 0.1); }
    const float scale = 1.5f;
    std::vector<double> want(y.begin(), y.end()), want_xa(rows * n * rank);
    for (size_t r = 0; r < rows; ++r)
        for (size_t p = 0; p < n; ++p) {
            for (size_t j = 0; j < rank; ++j) {
                double acc = 0;
                for (size_t i = 0; i < in; ++i) acc += (double)x[r * in + i] * a[p][j * in + i];
                want_xa[r * n * rank + p * rank + j] = acc;
            }
            for (size_t o = 0; o < outs[p]; ++o) {
                double acc = 0;
                for (size_t j = 0; j < rank; ++j) acc += want_xa[r * n * rank + p * rank + j] * b[p][o * rank + j];
                want[r * ldy + col[p] + o] = y[r * ldy + col[p] + o] + scale * acc;
            }
        }
    LoraGroup3 g{};
    g.n = (int)n;
    size_t total = 0;
    for (size_t p = 0; p < n; ++p) { g.a[p] = a[p].data(); g.b[p] = b[p].data(); g.col[p] = (int)col[p]; g.out[p] = (int)outs[p]; total += outs[p]; }
    std::vector<float> xa(rows * n * rank, NAN), xa_ref = xa;
    std::vector<bf16> xb = to_bf(x), yb = to_bf(y), yref = yb;
    const int rows_i = (int)rows, in_i = (int)in, k_i = (int)rank, ld_i = (int)ldy;
    if (rows > 0 && total > 0) {
        lora_xa_launch(rows, n * rank, [&] { lora_group_xa_bf16(xa.data(), xb.data(), g, rows_i, in_i, k_i); });
        lora_expand_launch(rows, total, n, rank, [&] { lora_group_expand_add_bf16(yb.data(), ld_i, xa.data(), g, scale, rows_i, k_i); });
        ref_lora_xa_launch(rows, n * rank, [&] { ref_lora_group_xa_bf16(xa_ref.data(), xb.data(), g, rows_i, in_i, k_i); });
        ref_lora_expand_launch(rows, total, [&] { ref_lora_group_expand_add_bf16(yref.data(), ld_i, xa_ref.data(), g, scale, rows_i, k_i); });
    }
    const std::string what = "lora group n " + std::to_string(n) + " rows " + std::to_string(rows) + " in " + std::to_string(in) +
                             " rank " + std::to_string(rank) + " gap " + std::to_string(gap);
    check(what + " xa", want_xa, xa, 1e-5, 1e-5);
    check(what + " y", want, from_bf(yb), 1e-5, BF16_STORE_RTOL);
    check_bits(what + " xa vs the untiled kernel", xa, xa_ref);
    check_bits(what + " y vs the untiled kernel", yb, yref);
}

// lora_group_expand_add_bf16 alone on an xa and B whose sums cancel (lora_ref.h: y's bits show
// the summation order), bit-identical to the untiled grouped kernel.
static void lora_group_expand_order(size_t rows, size_t rank, const std::vector<size_t>& outs, size_t gap) {
    const size_t n = outs.size();
    Rng rng(rows * 13 + rank * 7 + n + gap);
    std::vector<size_t> col(n);
    size_t ldy = 0, total = 0;
    for (size_t p = 0; p < n; ++p) { col[p] = ldy + gap; ldy = col[p] + outs[p]; total += outs[p]; }
    ldy += gap;
    auto xa = cancelling_xa(rng, rows, n, rank);
    std::vector<std::vector<float>> b(n);
    LoraGroup3 g{};
    g.n = (int)n;
    for (size_t p = 0; p < n; ++p) {
        b[p] = paired_b(rng, outs[p], rank);
        g.b[p] = b[p].data(); g.col[p] = (int)col[p]; g.out[p] = (int)outs[p];
    }
    std::vector<bf16> yb = to_bf(bfr(rng.vec(rows * ldy, -2, 2))), yref = yb;
    const int rows_i = (int)rows, k_i = (int)rank, ld_i = (int)ldy;
    lora_expand_launch(rows, total, n, rank, [&] { lora_group_expand_add_bf16(yb.data(), ld_i, xa.data(), g, 0.5f, rows_i, k_i); });
    ref_lora_expand_launch(rows, total, [&] { ref_lora_group_expand_add_bf16(yref.data(), ld_i, xa.data(), g, 0.5f, rows_i, k_i); });
    check_bits("lora group expand order n " + std::to_string(n) + " rows " + std::to_string(rows) + " rank " +
                   std::to_string(rank) + " vs the untiled kernel", yb, yref);
}

int main(int argc, char** argv) {
    parse_args(argc, argv);
    qkv(4, 2, 8, 9, true);
    residual_norm(5, 64);
    lora_group(3, 3, 40, 4, {24, 8, 8}, 0);
    lora_group_expand_order(5, 16, {300, 40, 40}, 0);
    if (g_full) {
        // q|k|v of Qwen2.5-0.5B at rank 16; gate|up; one projection; gaps between projections
        // (a partially adapted group: columns of an unadapted projection stay as they are); a
        // total output that is not a multiple of the 256-thread block; rank > 8 warps' worth.
        lora_group(3, 5, 896, 16, {896, 128, 128}, 0);
        lora_group(2, 2, 96, 8, {300, 300}, 0);
        lora_group(1, 4, 33, 3, {17}, 0);
        lora_group(2, 3, 64, 5, {40, 9}, 13);
        lora_group(3, 0, 64, 4, {8, 8, 8}, 0);
        // Row tiles (4 rows per xa warp, 32 per expand block): one row, rows not a multiple of
        // either, 64 (the profiled decode bucket), 1000; gate|up of Qwen2.5-0.5B at 64 rows.
        lora_group(3, 1, 896, 16, {896, 128, 128}, 0);
        lora_group(3, 70, 96, 16, {200, 40, 40}, 0);
        lora_group(2, 64, 896, 16, {4864, 4864}, 0);
        lora_group(3, 1000, 64, 8, {64, 16, 16}, 2);
        // Ranks 8 / 16 / 64 and odd ones (vector and element paths of the register B row), > 64
        // (B and xa per row), with odd outputs and gaps; blocks of 128 columns that straddle
        // two or three projections (outputs < 128) and one that starts mid-projection.
        lora_group(3, 37, 64, 64, {131, 33, 7}, 3);
        lora_group(2, 33, 40, 8, {129, 127}, 1);
        lora_group(3, 5, 48, 5, {3, 200, 1}, 0);
        lora_group(2, 9, 72, 12, {61, 61}, 4);
        lora_group(3, 6, 33, 23, {50, 50, 50}, 0);
        lora_group(2, 35, 56, 80, {77, 150}, 1);
        lora_group(3, 4, 24, 65, {9, 9, 9}, 0);
        // A projection with no columns (out 0) between two others.
        lora_group(3, 6, 32, 4, {100, 0, 60}, 2);
        for (size_t rank : {3, 8, 12, 16, 23, 64, 80}) lora_group_expand_order(37, rank, {131, 33, 70}, 1);
        lora_group_expand_order(64, 16, {4864, 4864}, 0);
        // Qwen2.5-0.5B heads (14/2, hd 64) with and without bias, a GQA 1:1 and an hd 128 case;
        // rows: none, one, odd, and enough to fill every cache position of both sequences.
        for (bool b : {false, true}) {
            qkv(14, 2, 64, 41, b);
            qkv(4, 4, 16, 0, b);
            qkv(4, 4, 16, 1, b);
            qkv(12, 2, 128, 17, b);
        }
        for (size_t dim : {1, 31, 32, 33, 896, 1536, 3584, 4097, 8192, 8200})
            for (size_t rows : {0, 1, 4, 5, 33}) residual_norm(rows, dim);
    }
    return finish("fused");
}
