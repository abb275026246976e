// kernels/rmsnorm.cu under the emulator (see run.sh): rmsnorm_fwd_{bf16,f32} launched as
// src/cuda/kernels.rs::launch_rmsnorm_fwd (one warp per row: grid = ceil(rows / RMS_FWD_WARPS),
// block = 32·RMS_FWD_WARPS, no dynamic smem), against src/cpu/ops.rs::rmsnorm_fwd (f32) with
// tests/cuda_kernels.rs's tolerances (bf16: atol 1e-6, rtol 2^-7; f32: atol 1e-6, rtol 1e-4).
// Also on buffers offset by one element (not 16-byte aligned: the scalar path) and with dims that
// are not a multiple of the vector width.
#include "emu.h"
#include "rmsnorm.inc"

// The launcher: dim > 0 (else an error), rows == 0 launches nothing.
template <class T, class K>
static void launch(K kernel, T* out, const T* x, const T* w, size_t rows, size_t dim, float eps) {
    if (rows == 0) return;
    const int rows_i = (int)rows, dim_i = (int)dim;
    emu_launch(grid1((rows + RMS_FWD_WARPS - 1) / RMS_FWD_WARPS), 32 * RMS_FWD_WARPS, 0,
               [&] { kernel(out, x, w, eps, rows_i, dim_i); });
}

static std::vector<double> reference(const std::vector<float>& x, const std::vector<float>& w, size_t dim, float eps) {
    std::vector<double> y(x.size());
    for (size_t r = 0; r < x.size() / dim; ++r) {
        float ss = 0;
        for (size_t i = 0; i < dim; ++i) ss += x[r * dim + i] * x[r * dim + i];
        const float inv = 1.0f / std::sqrt(ss / (float)dim + eps);
        for (size_t i = 0; i < dim; ++i) y[r * dim + i] = x[r * dim + i] * inv * w[i];
    }
    return y;
}

// off: elements of offset of x, out and weight from their allocations (1: misaligned, scalar path).
static void run(size_t rows, size_t dim, size_t off = 0) {
    Rng rng(rows * 1000 + dim + off);
    const float eps = 1e-6f;
    auto x = bfr(rng.vec(rows * dim, -2, 2)), w = bfr(rng.vec(dim, 0.5, 1.5));
    const std::string what = "rows " + std::to_string(rows) + " dim " + std::to_string(dim) + " offset " + std::to_string(off);
    auto want = reference(x, w, dim, eps);
    auto shift = [&](auto v) { v.insert(v.begin(), off, typename decltype(v)::value_type{}); return v; };
    std::vector<bf16> xb = shift(to_bf(x)), wb = shift(to_bf(w)), ob(off + rows * dim, bf_nan());
    launch(rmsnorm_fwd_bf16, ob.data() + off, xb.data() + off, wb.data() + off, rows, dim, eps);
    check("bf16 " + what, want, from_bf(std::vector<bf16>(ob.begin() + off, ob.end())), 1e-6, 1.0 / 128);
    std::vector<float> xf = shift(x), wf = shift(w), of(off + rows * dim, NAN);
    launch(rmsnorm_fwd_f32, of.data() + off, xf.data() + off, wf.data() + off, rows, dim, eps);
    check("f32 " + what, want, std::vector<float>(of.begin() + off, of.end()), 1e-6, 1e-4);
}

int main(int argc, char** argv) {
    parse_args(argc, argv);
    run(7, 123);
    if (g_full) {
        // dims: one lane, a partial warp, 896 (Qwen2.5-0.5B), block-clamped 512 with strides
        // (4097: 9 elements per thread, the last stride partial).
        // 8, 896, 1000: vector path (bf16: dim % 8; f32: dim % 4); 1000 also leaves lanes idle in
        // the last step; 4, 12: f32 vectors, bf16 scalar. rows 5: a partial last block.
        for (size_t dim : {1, 4, 8, 12, 31, 32, 33, 896, 1000, 4097})
            for (size_t rows : {0, 1, 5, 33}) run(rows, dim);
        for (size_t dim : {8, 896, 33})
            for (size_t rows : {1, 5}) run(rows, dim, 1);
    }
    return finish("rmsnorm");
}
