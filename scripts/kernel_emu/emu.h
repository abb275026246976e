// Shared by the emulator's harnesses (*_emu.cpp): the launch entry of emu_rt.cpp, and small test
// helpers (inputs, bf16 rounding, tolerance checks that print the worst offenders).
#pragma once
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cmath>
#include <vector>
#include <string>
#include <functional>
#include "inc/cuda_bf16.h"
typedef __nv_bfloat16 bf16;

// Runs `kernel` (a call of the emulated kernel) as a grid of blocks of `threads` threads with
// `smem` bytes of dynamic shared memory, exactly as cudarc's LaunchConfig would; aborts on an
// invalid configuration (a Rust launcher bug), a deadlock, a divergent warp collective, or a
// barrier after a partial exit. smem_limit: 48 KiB unless the launcher opts in to more.
void emu_launch(emu_dim3 grid, int threads, size_t smem, const std::function<void()>& kernel,
                size_t smem_limit = 48 * 1024);
extern unsigned char* emu_dyn_smem;  // the launch's dynamic shared memory (gen.py points kernels here)
void at_mma_emu(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
void at_ldsm_emu(uint32_t (&r)[4], const __nv_bfloat16* p, bool trans);
// cp.async.cg 16 bytes with src-size: copies src_bytes (0 or 16), zero-fills the rest; both
// addresses must be 16-byte aligned. Synchronous: the wait_group that follows is a no-op.
static inline void emu_cp_async16(void* dst, const void* src, int src_bytes) {
    if (((uintptr_t)dst & 15) || ((uintptr_t)src & 15) || (src_bytes != 0 && src_bytes != 16)) {
        fprintf(stderr, "cp.async: misaligned address or src-size %d\n", src_bytes);
        abort();
    }
    memset(dst, 0, 16);
    if (src_bytes) memcpy(dst, src, src_bytes);
}

// cp.async of kernels/attention_train.cu (at_cp_async*) and kernels/gemm.cu (sk_cp_async*),
// modelled as asynchronous: each copy (the
// source read and the src-size checked at issue, the destination checked to lie in the launch's
// dynamic shared memory) lands either at once or, at random, only when its thread waits for its
// commit group; copies never committed and waited for by the end of the block are an error. So a
// missing wait, commit or barrier, or a copy into a stage that another warp still reads, shows up
// as wrong data (the kernels' bit-identity check) instead of passing as with emu_cp_async16.
void emu_cpa_issue(void* dst, const void* src, int bytes, int src_bytes);
void emu_cpa_commit();
void emu_cpa_wait(int n);  // cp.async.wait_group n: all but the n newest committed groups landed

// ---- test helpers (header-only: each harness is one translation unit plus emu_rt.cpp) ----
struct Rng {
    uint64_t s;
    explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 88172645463325252ull) {}
    uint32_t next() { s ^= s << 13; s ^= s >> 7; s ^= s << 17; return (uint32_t)(s >> 32); }
    float uni(float lo, float hi) { return lo + (hi - lo) * ((next() >> 8) / 16777216.0f); }
    std::vector<float> vec(size_t n, float lo, float hi) { std::vector<float> v(n); for (auto& x : v) x = uni(lo, hi); return v; }
};
static inline float bfr(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }
static inline std::vector<float> bfr(std::vector<float> v) { for (auto& x : v) x = bfr(x); return v; }
static inline std::vector<bf16> to_bf(const std::vector<float>& v) { std::vector<bf16> o(v.size()); for (size_t i = 0; i < v.size(); ++i) o[i] = __float2bfloat16_rn(v[i]); return o; }
static inline std::vector<float> from_bf(const std::vector<bf16>& v) { std::vector<float> o(v.size()); for (size_t i = 0; i < v.size(); ++i) o[i] = __bfloat162float(v[i]); return o; }
static inline bf16 bf_nan() { return __float2bfloat16_rn(NAN); }
// ew_grid / row_block of the Rust launchers (src/cuda/rollout.rs, train_kernels.rs, kernels.rs).
static inline unsigned ew_grid(size_t n) { size_t g = (n + 255) / 256; return (unsigned)std::min<size_t>(std::max<size_t>(g, 1), 65535); }
static inline int row_block(size_t dim) { size_t b = (dim + 31) / 32 * 32; return (int)std::min<size_t>(std::max<size_t>(b, 32), 512); }
static inline emu_dim3 grid1(size_t x, size_t y = 1, size_t z = 1) { return emu_dim3{(unsigned)x, (unsigned)y, (unsigned)z}; }

static int g_bad = 0;      // failed checks over the whole run
static bool g_full = false; // "full": every case; else the first (quick) ones
// Every element within atol[i] + rtol·|ref| and finite (unless the reference is not finite, then
// bit-identical NaN-ness / equality); prints the first mismatches and the worst err/tol.
static inline int check(const std::string& what, const std::vector<double>& ref, const std::vector<float>& got,
                        const std::vector<double>& atol, double rtol) {
    int bad = 0; double worst = 0;
    if (ref.size() != got.size()) { printf("  %s: length %zu vs %zu\n", what.c_str(), ref.size(), got.size()); ++g_bad; return 1; }
    for (size_t i = 0; i < ref.size(); ++i) {
        bool ok;
        if (!std::isfinite(ref[i])) ok = std::isnan(ref[i]) ? std::isnan(got[i]) : (double)got[i] == ref[i];
        else {
            const double err = std::fabs(ref[i] - got[i]), tol = atol[i] + rtol * std::fabs(ref[i]);
            ok = std::isfinite(got[i]) && err <= tol;
            if (ok && tol > 0) worst = std::max(worst, err / tol);
        }
        if (!ok) { if (bad < 5) printf("  %s[%zu]: ref %.9g got %.9g (atol %.3g)\n", what.c_str(), i, ref[i], got[i], atol[i]); ++bad; }
    }
    if (bad) { printf("  FAIL %s: %d / %zu out of tolerance\n", what.c_str(), bad, ref.size()); ++g_bad; }
    else if (getenv("EMU_VERBOSE")) printf("  ok %s (worst err/tol %.3f)\n", what.c_str(), worst);
    return bad;
}
static inline int check(const std::string& what, const std::vector<double>& ref, const std::vector<float>& got, double atol, double rtol) {
    return check(what, ref, got, std::vector<double>(ref.size(), atol), rtol);
}
static inline std::vector<double> to_d(const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); }
template <class T> static inline int check_bits(const std::string& what, const std::vector<T>& a, const std::vector<T>& b) {
    if (a.size() != b.size() || (a.size() && memcmp(a.data(), b.data(), a.size() * sizeof(T)) != 0)) {
        size_t i = 0; while (i < a.size() && i < b.size() && !memcmp(&a[i], &b[i], sizeof(T))) ++i;
        printf("  FAIL %s: not bit-identical (first difference at %zu)\n", what.c_str(), i);
        ++g_bad; return 1;
    }
    return 0;
}
static inline void expect(bool ok, const std::string& what) { if (!ok) { printf("  FAIL %s\n", what.c_str()); ++g_bad; } }
static inline int finish(const char* suite) {
    printf(g_bad ? "%s: FAILED (%d checks)\n" : "%s: ALL OK\n", suite, g_bad);
    return g_bad != 0;
}
// argv[1]: "full" runs every case; anything else (or nothing) only the quick ones.
static inline void parse_args(int argc, char** argv) { g_full = argc > 1 && !strcmp(argv[1], "full"); }
