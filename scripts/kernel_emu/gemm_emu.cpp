// kernels/gemm.cu under the emulator (see run.sh): skinny_gemm_m{16,32,48,64}_{bf16,f32} launched
// as src/cuda/gemm.rs's skinny_gemm_raw does (grid = (ceil(N/64), S), 128 threads, dynamic shared
// memory skinny_smem_bytes(mt), opted in above 48 KiB; S recomputed so that no split is empty;
// split-K scratch and zeroed counters), against Σ_k x·w in f64 of the bf16 inputs. Tolerance:
// bf16 output one rounding (rtol 2^-8) plus the f32 accumulation's error, bounded by
// K · 2^-24 · Σ_k |x·w| (an f32 sum of K products); the same bound as tests/cuda_gemm.rs. Also:
// the counters are back to 0 after a split-K launch (a graph replays it), a row's output is
// bit-identical whatever the row count (batch invariance), and a second launch is bit-identical.
// The SwiGLU variant against swiglu + the plain kernel, bit for bit (run_swiglu).
#include "emu.h"
#include "gemm.inc"

static size_t smem_bytes(int mt) { return (size_t)4 * (64 + 16 * mt) * 72 * 2; }

template <class OutT>
static void launch(std::vector<OutT>& y, const std::vector<bf16>& x, const std::vector<bf16>& w, int M, int N, int K,
                   int splits, std::vector<float>& partial, std::vector<unsigned>& counters) {
    const int chunks = (K + 63) / 64;
    const int cps = (chunks + splits - 1) / splits;
    splits = (chunks + cps - 1) / cps;
    const int mt = (M + 15) / 16;
    if (splits > 1 && partial.size() < (size_t)splits * M * N) { printf("  scratch too small\n"); ++g_bad; return; }
    auto k = [&] {
        float* p = splits > 1 ? partial.data() : nullptr;
        unsigned* c = splits > 1 ? counters.data() : nullptr;
        if constexpr (sizeof(OutT) == 2) {
            if (mt == 1) skinny_gemm_m16_bf16(y.data(), x.data(), w.data(), p, c, M, N, K, cps);
            if (mt == 2) skinny_gemm_m32_bf16(y.data(), x.data(), w.data(), p, c, M, N, K, cps);
            if (mt == 3) skinny_gemm_m48_bf16(y.data(), x.data(), w.data(), p, c, M, N, K, cps);
            if (mt == 4) skinny_gemm_m64_bf16(y.data(), x.data(), w.data(), p, c, M, N, K, cps);
        } else {
            if (mt == 1) skinny_gemm_m16_f32(y.data(), x.data(), w.data(), p, c, M, N, K, cps);
            if (mt == 2) skinny_gemm_m32_f32(y.data(), x.data(), w.data(), p, c, M, N, K, cps);
            if (mt == 3) skinny_gemm_m48_f32(y.data(), x.data(), w.data(), p, c, M, N, K, cps);
            if (mt == 4) skinny_gemm_m64_f32(y.data(), x.data(), w.data(), p, c, M, N, K, cps);
        }
    };
    emu_launch(grid1((N + 63) / 64, splits), 128, smem_bytes(mt), k, std::max<size_t>(smem_bytes(mt), 48 * 1024));
}

static float as_f32(bf16 v) { return __bfloat162float(v); }
static float as_f32(float v) { return v; }

template <class OutT>
static void run(int M, int N, int K, int splits) {
    Rng rng((uint64_t)M * 1000003 + N * 1009 + K * 7 + splits + sizeof(OutT));
    auto xf = bfr(rng.vec((size_t)M * K, -2, 2)), wf = bfr(rng.vec((size_t)N * K, -0.5f, 0.5f));
    std::vector<bf16> x = to_bf(xf), w = to_bf(wf);
    std::vector<float> partial((size_t)8 * 64 * N + 1, NAN);
    std::vector<unsigned> counters((N + 63) / 64 + 1, 0u);
    std::vector<OutT> y((size_t)M * N);
    memset(y.data(), 0xff, y.size() * sizeof(OutT));  // NaN: an unwritten output shows
    launch(y, x, w, M, N, K, splits, partial, counters);
    std::vector<double> want((size_t)M * N), atol((size_t)M * N);
    for (int r = 0; r < M; ++r)
        for (int n = 0; n < N; ++n) {
            double s = 0, a = 0;
            for (int k = 0; k < K; ++k) {
                const double p = (double)xf[(size_t)r * K + k] * wf[(size_t)n * K + k];
                s += p;
                a += std::fabs(p);
            }
            want[(size_t)r * N + n] = s;
            atol[(size_t)r * N + n] = K * std::ldexp(1.0, -24) * a + 1e-30;
        }
    std::vector<float> got(y.size());
    for (size_t i = 0; i < y.size(); ++i) got[i] = as_f32(y[i]);
    char what[128];
    snprintf(what, sizeof what, "skinny %s M %d N %d K %d S %d", sizeof(OutT) == 2 ? "bf16" : "f32", M, N, K, splits);
    check(what, want, got, atol, sizeof(OutT) == 2 ? 1.0 / 256 : 0.0);
    for (size_t i = 0; i < counters.size(); ++i)
        if (counters[i] != 0) { printf("  %s: counter %zu = %u after the launch\n", what, i, counters[i]); ++g_bad; break; }
    // Deterministic: a second launch gives the same bits.
    std::vector<OutT> y2(y.size());
    launch(y2, x, w, M, N, K, splits, partial, counters);
    check_bits(std::string(what) + " rerun", y, y2);
    // Batch invariance: the first min(M, 3) rows alone give the same bits as in the batch.
    const int m1 = std::min(M, 3);
    std::vector<bf16> x1(x.begin(), x.begin() + (size_t)m1 * K);
    std::vector<OutT> y1((size_t)m1 * N);
    launch(y1, x1, w, m1, N, K, splits, partial, counters);
    check_bits(std::string(what) + " rows alone", std::vector<OutT>(y.begin(), y.begin() + (size_t)m1 * N), y1);
}

// The SwiGLU variant: gate_up (M, 2K) → y must equal, bit for bit, the plain kernel on
// act = bf16(silu(gate) · up) (swiglu_fused_fwd_bf16's expression) with the same splits, and
// act_out must be act (written by column tile 0's blocks only).
static void run_swiglu(int M, int N, int K, int splits, bool with_act) {
    Rng rng((uint64_t)M * 31 + N * 17 + K * 5 + splits);
    auto gu = bfr(rng.vec((size_t)M * 2 * K, -4, 4)), wf = bfr(rng.vec((size_t)N * K, -0.5f, 0.5f));
    std::vector<bf16> g = to_bf(gu), w = to_bf(wf), act((size_t)M * K);
    for (int r = 0; r < M; ++r)
        for (int k = 0; k < K; ++k) {
            const float a = gu[(size_t)r * 2 * K + k], u = gu[(size_t)r * 2 * K + K + k];
            act[(size_t)r * K + k] = __float2bfloat16_rn(a / (1.0f + expf(-a)) * u);
        }
    std::vector<float> partial((size_t)16 * 64 * N + 1, NAN);
    std::vector<unsigned> counters((N + 63) / 64 + 1, 0u);
    std::vector<bf16> want((size_t)M * N), got((size_t)M * N), act_out((size_t)M * K);
    memset(got.data(), 0xff, got.size() * 2);
    memset(act_out.data(), 0xff, act_out.size() * 2);
    launch(want, act, w, M, N, K, splits, partial, counters);
    const int chunks = (K + 63) / 64, cps = (chunks + splits - 1) / splits, s_eff = (chunks + cps - 1) / cps;
    const int mt = (M + 15) / 16;
    const size_t smem = (size_t)4 * (64 + 32 * mt) * 72 * 2;
    bf16* ao = with_act ? act_out.data() : nullptr;
    auto k = [&] {
        float* p = s_eff > 1 ? partial.data() : nullptr;
        unsigned* c = s_eff > 1 ? counters.data() : nullptr;
        if (mt == 1) skinny_gemm_swiglu_m16_bf16(got.data(), g.data(), w.data(), p, c, M, N, K, cps, ao);
        if (mt == 2) skinny_gemm_swiglu_m32_bf16(got.data(), g.data(), w.data(), p, c, M, N, K, cps, ao);
        if (mt == 3) skinny_gemm_swiglu_m48_bf16(got.data(), g.data(), w.data(), p, c, M, N, K, cps, ao);
        if (mt == 4) skinny_gemm_swiglu_m64_bf16(got.data(), g.data(), w.data(), p, c, M, N, K, cps, ao);
    };
    emu_launch(grid1((N + 63) / 64, s_eff), 128, smem, k, smem);
    char what[128];
    snprintf(what, sizeof what, "skinny swiglu M %d N %d K %d S %d", M, N, K, s_eff);
    check_bits(std::string(what) + " vs swiglu + skinny", want, got);
    if (with_act) check_bits(std::string(what) + " act_out", act, act_out);
    for (size_t i = 0; i < counters.size(); ++i)
        if (counters[i] != 0) { printf("  %s: counter %zu = %u after the launch\n", what, i, counters[i]); ++g_bad; break; }
}

int main(int argc, char** argv) {
    parse_args(argc, argv);
    run<bf16>(5, 130, 136, 1);
    run<bf16>(5, 130, 136, 2);
    run_swiglu(5, 70, 136, 2, true);
    if (g_full) {
        run_swiglu(64, 130, 320, 1, true);
        run_swiglu(33, 64, 200, 3, false);
        run_swiglu(17, 200, 512, 8, true);
        run_swiglu(1, 8, 64, 1, true);
        // Every row tile (16, 32, 48, 64 rows and partial ones), N with a partial column tile
        // and a single one, K with a partial chunk (136, 200) or whole ones, 1 to 8 splits
        // (3 of 4 chunks → 2 splits of 2: the launcher's trim), bf16 and f32 output.
        run<bf16>(1, 64, 64, 1);
        run<bf16>(16, 200, 256, 4);
        run<bf16>(17, 70, 200, 3);
        run<float>(33, 130, 136, 2);
        run<bf16>(48, 64, 512, 8);
        run<float>(64, 129, 320, 5);
        run<bf16>(64, 256, 136, 1);
        run<bf16>(40, 8, 1000, 4);
    }
    return finish("gemm");
}
