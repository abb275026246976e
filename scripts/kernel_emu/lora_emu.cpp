// kernels/lora.cu under the emulator (see run.sh): lora_xa_bf16 (grid = (rows, ceil(rank /
// warps)), block = min(rank, 8) warps) then lora_expand_add_bf16 (grid = (rows, ceil(out/256)), block 256), as
// src/cuda/rollout.rs launches them, against y + s·(x Aᵀ) Bᵀ in f64 (src/cpu/model.rs::linear)
// with tests/cuda_rollout_kernels.rs's tolerance (atol 2e-4, rtol 2^-8).
#include "emu.h"
#include "lora.inc"

static void run(size_t rows, size_t d_in, size_t d_out, size_t r) {
    Rng rng(rows * 7 + d_in * 5 + d_out * 3 + r);
    auto x = bfr(rng.vec(rows * d_in, -2, 2)), a = rng.vec(r * d_in, -0.1f, 0.1f), b = rng.vec(d_out * r, -0.1f, 0.1f);
    auto y = bfr(rng.vec(rows * d_out, -1, 1));
    const float scale = 2.0f;
    std::vector<bf16> xb = to_bf(x), yb = to_bf(y);
    std::vector<float> xa(std::max<size_t>(rows * r, 1), NAN);
    const int r_i = (int)rows, in_i = (int)d_in, out_i = (int)d_out, k_i = (int)r;
    if (rows * r != 0)
        emu_launch(grid1(rows, (r + std::min<size_t>(r, 8) - 1) / std::min<size_t>(r, 8)), (int)std::min<size_t>(r, 8) * 32, 0, [&] { lora_xa_bf16(xa.data(), xb.data(), a.data(), r_i, in_i, k_i); });
    if (rows * d_out != 0)
        emu_launch(grid1(rows, (d_out + 255) / 256), 256, 0,
                   [&] { lora_expand_add_bf16(yb.data(), xa.data(), b.data(), scale, r_i, out_i, k_i); });
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
    char what[96];
    snprintf(what, sizeof what, "lora %zux%zu->%zu r %zu", rows, d_in, d_out, r);
    check(what, want, from_bf(yb), 2e-4, 1.0 / 256);
}

int main(int argc, char** argv) {
    parse_args(argc, argv);
    run(5, 64, 461, 3);
    if (g_full) {
        // rank 1, 16 and 9 (> 8 warps: xa grid.y = 2), out > 256 (grid.y 2..4), out < 32; in a
        // multiple of 8 (16-byte vector dot products) and not (123, 37, 31: the element path).
        run(1, 123, 45, 1);
        run(7, 896, 896, 16);
        run(33, 4864, 896, 8);
        run(3, 37, 1000, 9);
        run(2, 31, 7, 64);
    }
    return finish("lora");
}
