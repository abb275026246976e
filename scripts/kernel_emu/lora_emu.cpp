// kernels/lora.cu under the emulator (see run.sh): lora_xa_bf16 (grid = (ceil(rows / 4),
// ceil(rank / warps)), block = min(rank, 8) warps) then lora_expand_add_bf16 (grid =
// (ceil(out / 128), ceil(rows / 32)), block 128, shared memory min(rows, 32)·(256 + 4·rank bytes,
// the latter for rank ≤ 64)), as src/cuda/rollout.rs launches them (lora_ref.h), against
//   - the kernels before the row tiling (lora_ref.h, launched as they were): xa and y
//     bit-identical;
//   - y + s·(x Aᵀ) Bᵀ in f64 (src/cpu/model.rs::linear) with tests/cuda_rollout_kernels.rs's
//     tolerance (atol 2e-4, rtol 2^-8).
// x_off / b_off shift x / B by one element (not 16-byte aligned: the element paths).
// expand_order: lora_expand_add_bf16 alone on an xa and B whose sums cancel (lora_ref.h), so
// that y's bits show the summation order (bit-identical to the untiled kernel).
#include "emu.h"
#include "lora.inc"
#include "lora_ref.h"

static void run(size_t rows, size_t d_in, size_t d_out, size_t r, size_t x_off = 0, size_t b_off = 0) {
    Rng rng(rows * 7 + d_in * 5 + d_out * 3 + r);
    auto x = bfr(rng.vec(rows * d_in, -2, 2)), a = rng.vec(r * d_in, -0.1f, 0.1f), b = rng.vec(d_out * r, -0.1f, 0.1f);
    auto y = bfr(rng.vec(rows * d_out, -1, 1));
    const float scale = 2.0f;
    std::vector<bf16> xbuf(x_off + rows * d_in), yb = to_bf(y), yref = yb;
    std::copy_n(to_bf(x).begin(), rows * d_in, xbuf.begin() + x_off);
    std::vector<float> bbuf(b_off + d_out * r);
    std::copy(b.begin(), b.end(), bbuf.begin() + b_off);
    const bf16* xp = xbuf.data() + x_off;
    const float* bp = bbuf.data() + b_off;
    std::vector<float> xa(rows * r, NAN), xa_ref(rows * r, NAN);
    const int r_i = (int)rows, in_i = (int)d_in, out_i = (int)d_out, k_i = (int)r;
    if (rows * r != 0) lora_xa_launch(rows, r, [&] { lora_xa_bf16(xa.data(), xp, a.data(), r_i, in_i, k_i); });
    if (rows * d_out != 0)
        lora_expand_launch(rows, d_out, 1, r, [&] { lora_expand_add_bf16(yb.data(), xa.data(), bp, scale, r_i, out_i, k_i); });
    ref_lora_xa_launch(rows, r, [&] { ref_lora_xa_bf16(xa_ref.data(), xp, a.data(), r_i, in_i, k_i); });
    ref_lora_expand_launch(rows, d_out, [&] { ref_lora_expand_add_bf16(yref.data(), xa_ref.data(), bp, scale, r_i, out_i, k_i); });
    std::vector<double> want(rows * d_out);
    for (size_t n = 0; n < rows; ++n) {
        std::vector<double> u(r, 0.0);
        for (size_t j = 0; j < r; ++j) for (size_t i = 0; i < d_in; ++i) u[j] += (double)x[n * d_in + i] * a[j * d_in + i];
        for (size_t o = 0; o < d_out; ++o) {
            double acc = 0;
            for (size_t j = 0; j < r; ++j) acc += u[j] * b[o * r + j];
            want[n * d_out + o] = y[n * d_out + o] + scale * acc;
        }
    }
    char what[128];
    snprintf(what, sizeof what, "lora %zux%zu->%zu r %zu%s%s", rows, d_in, d_out, r, x_off ? " x+1" : "", b_off ? " b+1" : "");
    check(what, want, from_bf(yb), 2e-4, 1.0 / 256);
    check_bits(std::string(what) + " xa vs the untiled kernel", xa, xa_ref);
    check_bits(std::string(what) + " y vs the untiled kernel", yb, yref);
}

static void expand_order(size_t rows, size_t d_out, size_t r, size_t b_off = 0) {
    Rng rng(rows * 11 + d_out * 3 + r + b_off);
    auto xa = cancelling_xa(rng, rows, 1, r), b = paired_b(rng, d_out, r);
    std::vector<float> bbuf(b_off + d_out * r);
    std::copy(b.begin(), b.end(), bbuf.begin() + b_off);
    const float* bp = bbuf.data() + b_off;
    std::vector<bf16> yb = to_bf(bfr(rng.vec(rows * d_out, -2, 2))), yref = yb;
    const int r_i = (int)rows, out_i = (int)d_out, k_i = (int)r;
    lora_expand_launch(rows, d_out, 1, r, [&] { lora_expand_add_bf16(yb.data(), xa.data(), bp, 0.5f, r_i, out_i, k_i); });
    ref_lora_expand_launch(rows, d_out, [&] { ref_lora_expand_add_bf16(yref.data(), xa.data(), bp, 0.5f, r_i, out_i, k_i); });
    char what[128];
    snprintf(what, sizeof what, "lora expand order %zu->%zu r %zu%s", rows, d_out, r, b_off ? " b+1" : "");
    check_bits(std::string(what) + " vs the untiled kernel", yb, yref);
    size_t same = 0;  // how many the reversed order would keep: the test's sensitivity
    for (size_t n = 0; n < rows; ++n)
        for (size_t o = 0; o < d_out; ++o) {
            float fwd = 0, rev = 0;
            for (size_t j = 0; j < r; ++j) fwd += xa[n * r + j] * bp[o * r + j];
            for (size_t j = r; j-- > 0;) rev += xa[n * r + j] * bp[o * r + j];
            same += bfr(fwd) == bfr(rev);
        }
    if (getenv("EMU_VERBOSE")) printf("  %s: reversed order keeps %zu of %zu bf16 sums\n", what, same, rows * d_out);
}

int main(int argc, char** argv) {
    parse_args(argc, argv);
    run(5, 64, 461, 3);
    expand_order(5, 461, 16);
    if (g_full) {
        // rank 1, 16 and 9 (> 8 warps: xa grid.y = 2), out > 128 (grid.x 2..8), out < 32; in a
        // multiple of 8 (16-byte vector dot products) and not (123, 37, 31: the element path).
        run(1, 123, 45, 1);
        run(7, 896, 896, 16);
        run(33, 4864, 896, 8);
        run(3, 37, 1000, 9);
        run(2, 31, 7, 64);
        // Row tiles: rows not a multiple of 4 or 32 (70, 37, 35), one row, 64 (the profiled
        // decode bucket, Qwen2.5-0.5B o_proj), 1000 (31 full tiles and a partial one).
        run(70, 896, 300, 16);
        run(1, 896, 896, 16);
        run(64, 896, 896, 16);
        run(1000, 64, 131, 16);
        // Ranks: every register width of the expand (8, 16, 32, 64) full and partial, vector
        // (multiple of 4) and not; above 64 (B and xa read per row, rank_dot_f32); rank 0.
        run(9, 40, 33, 8);
        run(37, 96, 257, 64);
        run(6, 48, 99, 4);
        run(6, 48, 99, 12);
        run(6, 48, 99, 20);
        run(6, 48, 99, 36);
        run(6, 48, 99, 7);
        run(6, 48, 99, 23);
        run(6, 48, 99, 61);
        run(35, 72, 130, 80);
        run(5, 33, 61, 65);
        run(3, 16, 40, 0);
        // Misaligned x (the element path of the dot product) and B (element loads of its row).
        run(6, 64, 100, 16, 1, 0);
        run(6, 64, 100, 16, 0, 1);
        run(33, 64, 100, 64, 1, 1);
        for (size_t r : {2, 3, 4, 7, 8, 12, 16, 20, 23, 32, 36, 61, 64, 65, 80}) expand_order(37, 131, r);
        expand_order(70, 300, 16, 1);
        expand_order(1, 129, 64);
    }
    return finish("lora");
}
