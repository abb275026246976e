// Drives the emulated kernels of kernels/lora_train.cu (see run.sh; `run.sh lora_train [all]`):
// the fused forward (y += s·bf16(x Aᵀ) Bᵀ, xa stored), the fused backward (dyb = bf16(dy B),
// dx += s·dyb A), both also in store mode (y = ..., dx = ...) and the A / B gradients (split over rows into partials, then summed in split order
// as sum_partials_add_f32 does), with the grids, splits and shared-memory sizes of
// src/cuda/lora_train.rs (mirrored below), compared with an f64 reference under the tolerance of
// tests/cuda_lora_train.rs: |ref − got| ≤ mag/128 + 0.079·|ref|, mag = Σ|terms| of the output's sum
// chained through the rank-side intermediate (the bf16 rounding of xa / dyb moves an output by at
// most 2^-8·mag; 1/128 is twice that), 0.079 = llm.c's bf16 relative tolerance.
#include "emu.h"
#include "lora_train.inc"
// The launchers opt in to more than 48 KiB of dynamic shared memory for rank 128 (99 KiB: the
// smallest sm_80+ per-block limit).
static const size_t kOptIn = 99 * 1024;

// --- mirrors of src/cuda/lora_train.rs
static size_t rp_of(int r) { return r <= 16 ? 16 : r <= 32 ? 32 : r <= 64 ? 64 : 128; }
static size_t fused_smem(int r) { size_t rp = rp_of(r), w = std::max(rp * 72, 64 * (rp + 8)); return 2 * (64 * 72 + w) * 2; }
static size_t grad_smem(int r) { size_t rp = rp_of(r); return 2 * (64 * 72 + 64 * (rp + 8)) * 2; }
static int col_splits(int n, int dn) {
    const int tiles = (n + 63) / 64, chunks = std::max(1, (dn + 63) / 64);
    int s = std::min(std::min((264 + tiles - 1) / tiles, chunks), 8);
    s = std::max(s, 1);
    const int per = (chunks + s - 1) / s;
    return (chunks + per - 1) / per;
}
static void grad_split(int n, int dp, int& splits, int& rows) {
    const int tiles = std::max(1, (dp + 63) / 64);
    int s = std::min((528 + tiles - 1) / tiles, std::max(n / 256, 1));
    s = std::max(1, std::min(s, 128));
    rows = std::max(64, ((n + s - 1) / s + 63) / 64 * 64);
    splits = std::max(1, (n + rows - 1) / rows);
}

static uint64_t rng = 88172645463325252ull;
static float urand(float lo, float hi) { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return lo + (hi - lo) * ((rng >> 40) / 16777216.0f); }
static std::vector<float> gen(size_t n, float a) { std::vector<float> x(n); for (auto& e : x) e = bfr(urand(-a, a)); return x; }

static int check_lt(const char* what, const std::vector<double>& ref, const std::vector<double>& mag, const std::vector<float>& got) {
    int bad = 0; double worst = 0;
    for (size_t i = 0; i < ref.size(); ++i) {
        const double err = std::fabs(ref[i] - got[i]);
        const double tol = mag[i] / 128 + 0.079 * std::fabs(ref[i]) + 1e-30;
        worst = std::max(worst, err / tol);
        if (!(err <= tol)) { if (bad < 5) printf("  %s[%zu]: ref %g got %g mag %g\n", what, i, ref[i], got[i], mag[i]); ++bad; }
    }
    printf("  %-4s worst err/tol %.3f  bad %d / %zu\n", what, worst, bad, ref.size());
    return bad;
}

// One projection (n rows, in → out, rank r), scale s; `force` > 0 forces that many column / row
// splits (exercising the split paths at small sizes) instead of the launcher's choice. `acc` = 0
// runs the fused kernels in store mode: y and dx start as NaN (a read of them would show) and the
// reference's y0 = dx0 = 0.
static int run(int n, int din, int dout, int r, int force, int acc = 1) {
    const float s = 2.0f;
    int bad = 0;
    auto x = gen((size_t)n * din, 2.0f), dy = gen((size_t)n * dout, 1.0f), a = gen((size_t)r * din, 0.1f), b = gen((size_t)dout * r, 0.1f);
    auto y0 = gen((size_t)n * dout, 0.5f), dx0 = gen((size_t)n * din, 0.5f), da0 = gen((size_t)r * din, 0.01f), db0 = gen((size_t)dout * r, 0.01f);
    if (!acc) { std::fill(y0.begin(), y0.end(), 0.0f); std::fill(dx0.begin(), dx0.end(), 0.0f); }
    // The A / B copies start at an odd element offset when r·in is odd (as in the trainer's flat
    // bf16 shadow): the element-wise load path.
    const size_t aoff = (r * din) % 2 ? 1 : 0;
    std::vector<bf16> wbuf(aoff + a.size() + b.size());  // exact: ASAN sees any overread of B
    auto ab = to_bf(a), bb = to_bf(b);
    std::copy(ab.begin(), ab.end(), wbuf.begin() + aoff);
    std::copy(bb.begin(), bb.end(), wbuf.begin() + aoff + ab.size());
    const bf16* A = wbuf.data() + aoff;
    const bf16* B = A + ab.size();
    auto xb = to_bf(x), dyb_in = to_bf(dy);
    auto y = to_bf(y0), dx = to_bf(dx0);
    if (!acc) { std::fill(y.begin(), y.end(), __float2bfloat16_rn(NAN)); std::fill(dx.begin(), dx.end(), __float2bfloat16_rn(NAN)); }
    std::vector<bf16> xa((size_t)n * r, __float2bfloat16_rn(NAN)), dyb((size_t)n * r, __float2bfloat16_rn(NAN));
    std::vector<float> da = da0, db = db0;
    const int rp = rp_of(r);
    printf("n %d in %d out %d r %d (RP %d)%s%s\n", n, din, dout, r, rp, force ? " forced splits" : "", acc ? "" : " store mode");
    if (fused_smem(r) != (size_t)(rp == 16 ? LtCfg<16>::SMEM_BYTES : rp == 32 ? LtCfg<32>::SMEM_BYTES : rp == 64 ? LtCfg<64>::SMEM_BYTES : LtCfg<128>::SMEM_BYTES) ||
        grad_smem(r) != (size_t)(rp == 16 ? LtGradCfg<16>::SMEM_BYTES : rp == 32 ? LtGradCfg<32>::SMEM_BYTES : rp == 64 ? LtGradCfg<64>::SMEM_BYTES : LtGradCfg<128>::SMEM_BYTES)) {
        printf("  shared-memory size mirror disagrees with the kernel's LtCfg\n");
        return 1;
    }
    const unsigned row_tiles = (n + 63) / 64;
    // forward
    {
        int cs = force ? std::min(force, std::max(1, (dout + 63) / 64)) : col_splits(n, dout);
        emu_launch(emu_dim3{row_tiles, (unsigned)cs, 1}, 128, fused_smem(r), [&] {
            if (rp == 16) lora_train_fwd_r16_bf16(y.data(), xa.data(), xb.data(), A, B, s, n, din, dout, r, acc);
            if (rp == 32) lora_train_fwd_r32_bf16(y.data(), xa.data(), xb.data(), A, B, s, n, din, dout, r, acc);
            if (rp == 64) lora_train_fwd_r64_bf16(y.data(), xa.data(), xb.data(), A, B, s, n, din, dout, r, acc);
            if (rp == 128) lora_train_fwd_r128_bf16(y.data(), xa.data(), xb.data(), A, B, s, n, din, dout, r, acc);
        }, kOptIn);
    }
    // backward: dx and dyb
    {
        int cs = force ? std::min(force, std::max(1, (din + 63) / 64)) : col_splits(n, din);
        emu_launch(emu_dim3{row_tiles, (unsigned)cs, 1}, 128, fused_smem(r), [&] {
            if (rp == 16) lora_train_bwd_dx_r16_bf16(dx.data(), dyb.data(), dyb_in.data(), A, B, s, n, din, dout, r, acc);
            if (rp == 32) lora_train_bwd_dx_r32_bf16(dx.data(), dyb.data(), dyb_in.data(), A, B, s, n, din, dout, r, acc);
            if (rp == 64) lora_train_bwd_dx_r64_bf16(dx.data(), dyb.data(), dyb_in.data(), A, B, s, n, din, dout, r, acc);
            if (rp == 128) lora_train_bwd_dx_r128_bf16(dx.data(), dyb.data(), dyb_in.data(), A, B, s, n, din, dout, r, acc);
        }, kOptIn);
    }
    // gradients: dB (out, r) from dy and xa; dA (r, in) from x and dyb, stored transposed.
    auto grad = [&](std::vector<float>& out, const std::vector<bf16>& act, const std::vector<bf16>& low, int dp, int transposed) {
        int splits, rows;
        grad_split(n, dp, splits, rows);
        if (force) { rows = std::max(64, ((n + force - 1) / force + 63) / 64 * 64); splits = std::max(1, (n + rows - 1) / rows); }
        std::vector<float> partials(splits > 1 ? (size_t)splits * dp * r : 1, NAN);
        emu_launch(emu_dim3{(unsigned)((dp + 63) / 64), (unsigned)splits, 1}, 128, grad_smem(r), [&] {
            float* p = partials.data();
            if (rp == 16) lora_train_grad_r16_bf16(out.data(), p, act.data(), low.data(), s, n, dp, r, rows, transposed);
            if (rp == 32) lora_train_grad_r32_bf16(out.data(), p, act.data(), low.data(), s, n, dp, r, rows, transposed);
            if (rp == 64) lora_train_grad_r64_bf16(out.data(), p, act.data(), low.data(), s, n, dp, r, rows, transposed);
            if (rp == 128) lora_train_grad_r128_bf16(out.data(), p, act.data(), low.data(), s, n, dp, r, rows, transposed);
        }, kOptIn);
        if (splits > 1)  // sum_partials_add_f32
            for (size_t i = 0; i < out.size(); ++i) { float acc = 0.0f; for (int z = 0; z < splits; ++z) acc += partials[(size_t)z * out.size() + i]; out[i] += s * acc; }
        printf("  grad %s: %d split(s) of %d rows\n", transposed ? "dA" : "dB", splits, rows);
    };
    grad(db, dyb_in, xa, dout, 0);
    grad(da, xb, dyb, din, 1);

    // f64 reference on the same bf16 inputs, with magnitudes.
    std::vector<double> xa_r((size_t)n * r), xa_m(xa_r.size()), dyb_r(xa_r.size()), dyb_m(xa_r.size());
    for (int m = 0; m < n; ++m)
        for (int j = 0; j < r; ++j) {
            double v = 0, mv = 0, w = 0, mw = 0;
            for (int i = 0; i < din; ++i) { const double t = (double)x[(size_t)m * din + i] * a[(size_t)j * din + i]; v += t; mv += std::fabs(t); }
            for (int o = 0; o < dout; ++o) { const double t = (double)dy[(size_t)m * dout + o] * b[(size_t)o * r + j]; w += t; mw += std::fabs(t); }
            xa_r[(size_t)m * r + j] = v; xa_m[(size_t)m * r + j] = mv; dyb_r[(size_t)m * r + j] = w; dyb_m[(size_t)m * r + j] = mw;
        }
    std::vector<double> y_r((size_t)n * dout), y_m(y_r.size()), dx_r((size_t)n * din), dx_m(dx_r.size());
    for (int m = 0; m < n; ++m) {
        for (int o = 0; o < dout; ++o) {
            double v = 0, mv = 0;
            for (int j = 0; j < r; ++j) { v += xa_r[(size_t)m * r + j] * b[(size_t)o * r + j]; mv += xa_m[(size_t)m * r + j] * std::fabs(b[(size_t)o * r + j]); }
            y_r[(size_t)m * dout + o] = y0[(size_t)m * dout + o] + s * v; y_m[(size_t)m * dout + o] = std::fabs(y0[(size_t)m * dout + o]) + s * mv;
        }
        for (int i = 0; i < din; ++i) {
            double v = 0, mv = 0;
            for (int j = 0; j < r; ++j) { v += dyb_r[(size_t)m * r + j] * a[(size_t)j * din + i]; mv += dyb_m[(size_t)m * r + j] * std::fabs(a[(size_t)j * din + i]); }
            dx_r[(size_t)m * din + i] = dx0[(size_t)m * din + i] + s * v; dx_m[(size_t)m * din + i] = std::fabs(dx0[(size_t)m * din + i]) + s * mv;
        }
    }
    std::vector<double> db_r(db0.begin(), db0.end()), db_m(db0.size()), da_r(da0.begin(), da0.end()), da_m(da0.size());
    for (size_t i = 0; i < db0.size(); ++i) db_m[i] = std::fabs(db0[i]);
    for (size_t i = 0; i < da0.size(); ++i) da_m[i] = std::fabs(da0[i]);
    for (int m = 0; m < n; ++m)
        for (int j = 0; j < r; ++j) {
            const double u = xa_r[(size_t)m * r + j], um = xa_m[(size_t)m * r + j], e = dyb_r[(size_t)m * r + j], em = dyb_m[(size_t)m * r + j];
            for (int o = 0; o < dout; ++o) { const double g = dy[(size_t)m * dout + o]; db_r[(size_t)o * r + j] += s * g * u; db_m[(size_t)o * r + j] += s * std::fabs(g) * um; }
            for (int i = 0; i < din; ++i) { const double g = x[(size_t)m * din + i]; da_r[(size_t)j * din + i] += s * e * g; da_m[(size_t)j * din + i] += s * em * std::fabs(g); }
        }
    bad += check_lt("xa", xa_r, xa_m, from_bf(xa));
    bad += check_lt("y", y_r, y_m, from_bf(y));
    bad += check_lt("dyb", dyb_r, dyb_m, from_bf(dyb));
    bad += check_lt("dx", dx_r, dx_m, from_bf(dx));
    bad += check_lt("dB", db_r, db_m, db);
    bad += check_lt("dA", da_r, da_m, da);
    return bad;
}

int main(int argc, char** argv) {
    parse_args(argc, argv);
    int bad = 0;
    bad += run(17, 136, 72, 8, 0);
    bad += run(70, 72, 136, 16, 2);
    bad += run(5, 123, 45, 4, 0);
    bad += run(33, 136, 200, 64, 0);
    bad += run(70, 72, 136, 16, 2, 0);
    bad += run(5, 123, 45, 4, 0, 0);
    if (g_full) {
        bad += run(1, 896, 128, 16, 0);
        bad += run(1000, 896, 136, 16, 0);
        bad += run(300, 136, 896, 32, 3);
        bad += run(129, 4864, 896, 16, 0);
        bad += run(65, 896, 4864, 64, 0);
        bad += run(40, 72, 136, 128, 0);
        bad += run(100, 130, 70, 48, 2);
        bad += run(129, 896, 4864, 16, 0, 0);
        bad += run(1030, 72, 72, 8, 0);
    }
    g_bad += bad;
    return finish("lora_train");
}
