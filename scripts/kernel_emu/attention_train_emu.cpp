// Drives the emulated kernels of kernels/attention_train.cu (see run.sh): forward, delta, dk/dv
// and dq with the grids and shared-memory sizes of src/cuda/attention_train.rs, compared with
//   - an f64 reference under the tolerances of tests/cuda_attention_train.rs (atol = mag/64 with
//     mag = Σ|terms| of each output's sum, plus 0.079·|ref|; lse 1e-5 relative);
//   - the kernels before the cp.async pipeline (attention_train_ref.cu, namespace at_ref, launched
//     with that commit's shared memory), bit for bit: out, lse, dq, dk, dv (the backward of both on
//     the pipelined forward's lse and the same delta).
// Inputs are 16-byte aligned (the 16-byte copies where hd % 8 == 0), or with `misalign` start 8
// bytes past that (the 8-byte copies).
#include "emu.h"
// src/cuda/attention_train.rs fwd/dkdv/dq_smem_bytes (kernels AtCfg::*_SMEM).
static size_t fwd_smem(int c) { int bk = c <= 128 ? 64 : 32; return (size_t)(64 + 2 * 2 * bk) * (c + 8) * 2; }
static size_t dq_smem(int c) {
    int bk = c <= 128 ? 64 : 32, ks = c <= 128 ? 2 : 1, vs = c <= 64 ? 2 : 1;
    return (size_t)(128 + (ks + vs) * bk) * (c + 8) * 2;
}
static size_t dkdv_smem(int c) {
    int bq = c <= 64 ? 64 : c <= 128 ? 32 : 16, st = c <= 128 ? 2 : 1;
    return (size_t)(128 + 2 * st * bq) * (c + 8) * 2 + 2 * st * bq * 4;
}
// The same before the pipeline (one stage).
static size_t ref_fwd_smem(int c) { int bk = c <= 128 ? 64 : 32; return (size_t)(64 + 2 * bk) * (c + 8) * 2; }
static size_t ref_dq_smem(int c) { int bk = c <= 128 ? 64 : 32; return (size_t)(128 + 2 * bk) * (c + 8) * 2; }
static size_t ref_dkdv_smem(int c) { int bq = c <= 64 ? 64 : c <= 128 ? 32 : 16; return (size_t)(128 + 2 * bq) * (c + 8) * 2 + 2 * bq * 4; }
// Each in its own namespace: helpers of the same name taking bf16* would otherwise be ambiguous by
// argument-dependent lookup. The reference finds common.cuh's helpers through the using-directive.
namespace at_new {
#include "attention_train.inc"
}
using namespace at_new;
#undef AT_FWD_KERNEL
#undef AT_DKDV_KERNEL
#undef AT_DQ_KERNEL
namespace at_ref {
#include "attention_train_ref.inc"
}

static Rng rng(1);
static float urand(float lo, float hi) { return rng.uni(lo, hi); }

struct Ref { std::vector<double> out, lse, dq, dk, dv, mag_out, mag_dq, mag_dk, mag_dv; };

static Ref reference(const std::vector<float>& q, const std::vector<float>& k, const std::vector<float>& v, const std::vector<float>& dout,
                     const std::vector<int>& cu, int H, int KV, int hd, int window) {
    const int N = cu.back(); const int grp = H / KV;
    const double scale = (double)(1.0f / std::sqrt((float)hd));
    Ref r; r.out.assign((size_t)N * H * hd, 0); r.lse.assign((size_t)N * H, 0); r.dq.assign(r.out.size(), 0);
    r.dk.assign((size_t)N * KV * hd, 0); r.dv = r.dk; r.mag_out = r.out; r.mag_dq = r.out; r.mag_dk = r.dk; r.mag_dv = r.dk;
    for (size_t s = 0; s + 1 < cu.size(); ++s) {
        const int b = cu[s], n = cu[s + 1] - cu[s];
        for (int h = 0; h < H; ++h) {
            const int kh = h / grp;
            for (int i = 0; i < n; ++i) {
                const int st = (window > 0 && i + 1 > window) ? i + 1 - window : 0;
                std::vector<double> sc(i + 1 - st), P(sc.size()), dP(sc.size());
                auto Q = [&](int row, int d) { return (double)q[((size_t)(b + row) * H + h) * hd + d]; };
                auto K = [&](int row, int d) { return (double)k[((size_t)(b + row) * KV + kh) * hd + d]; };
                auto V = [&](int row, int d) { return (double)v[((size_t)(b + row) * KV + kh) * hd + d]; };
                auto DO = [&](int row, int d) { return (double)dout[((size_t)(b + row) * H + h) * hd + d]; };
                double mx = -1e300;
                for (int j = st; j <= i; ++j) { double a = 0; for (int d = 0; d < hd; ++d) a += Q(i, d) * K(j, d); sc[j - st] = a * scale; mx = std::max(mx, sc[j - st]); }
                double z = 0; for (auto x : sc) z += std::exp(x - mx);
                const double lse = mx + std::log(z);
                r.lse[(size_t)(b + i) * H + h] = lse;
                for (size_t jj = 0; jj < sc.size(); ++jj) P[jj] = std::exp(sc[jj] - lse);
                double delta = 0, D = 0;
                for (int j = st; j <= i; ++j) { double a = 0; for (int d = 0; d < hd; ++d) a += DO(i, d) * V(j, d); dP[j - st] = a; delta += P[j - st] * a; }
                for (int d = 0; d < hd; ++d) {
                    double o = 0, mo = 0;
                    for (int j = st; j <= i; ++j) { o += P[j - st] * V(j, d); mo += P[j - st] * std::fabs(V(j, d)); }
                    r.out[((size_t)(b + i) * H + h) * hd + d] = o; r.mag_out[((size_t)(b + i) * H + h) * hd + d] = mo;
                    D += std::fabs(DO(i, d)) * mo;
                }
                for (int j = st; j <= i; ++j) {
                    const double p = P[j - st], ds = p * (dP[j - st] - delta), mds = p * (std::fabs(dP[j - st]) + std::fabs(delta) + 2 * D);
                    for (int d = 0; d < hd; ++d) {
                        const size_t qi = ((size_t)(b + i) * H + h) * hd + d, kj = ((size_t)(b + j) * KV + kh) * hd + d;
                        r.dq[qi] += scale * ds * K(j, d); r.mag_dq[qi] += scale * mds * std::fabs(K(j, d));
                        r.dk[kj] += scale * ds * Q(i, d); r.mag_dk[kj] += scale * mds * std::fabs(Q(i, d));
                        r.dv[kj] += p * DO(i, d); r.mag_dv[kj] += p * std::fabs(DO(i, d));
                    }
                }
            }
        }
    }
    return r;
}

// atol = c·mag + 1e-6 (mag = Σ|terms| of the output's sum), rtol = eps.
static int check(const char* what, const std::vector<double>& ref, const std::vector<double>& mag, const std::vector<float>& got, double c, double eps) {
    std::vector<double> atol(ref.size());
    for (size_t i = 0; i < ref.size(); ++i) atol[i] = c * mag[i] + 1e-6;
    return ::check(what, ref, got, atol, eps);
}

// A copy of v whose data() starts `off` elements past a 16-byte boundary (the vector keeps it alive).
struct Buf {
    std::vector<bf16> mem; size_t off;
    Buf(const std::vector<bf16>& v, size_t o) : mem(v.size() + 16), off(o) {
        off = (16 - ((uintptr_t)mem.data() & 15)) % 16 / 2 + o;  // elements to a 16-byte boundary, + o
        if (((uintptr_t)(mem.data() + off) & 15) != o * 2) { printf("  FAIL Buf alignment\n"); ++g_bad; }
        std::copy(v.begin(), v.end(), mem.begin() + off);
    }
    bf16* data() { return mem.data() + off; }
};

static int run(int H, int KV, int hd, int window, std::vector<int> lens, bool misalign = false) {
    int HD = hd <= 64 ? 64 : hd <= 128 ? 128 : 256;
    std::vector<int> cu{0}; int maxr = 0; for (int l : lens) { cu.push_back(cu.back() + l); maxr = std::max(maxr, l); }
    const int N = cu.back(), S = lens.size();
    printf("H %d KV %d hd %d (HD %d) window %d%s lens", H, KV, hd, HD, window, misalign ? " misaligned" : "");
    if (lens.size() <= 8) for (int l : lens) printf(" %d", l); else printf(" %zu sequences, %d rows", lens.size(), N);
    printf("\n");
    auto gen = [&](size_t n, float a) { std::vector<float> x(n); for (auto& e : x) e = bfr(urand(-a, a)); return x; };
    auto q = gen((size_t)N * H * hd, 2.0f), k = gen((size_t)N * KV * hd, 1.0f), v = gen((size_t)N * KV * hd, 1.0f), dout = gen((size_t)N * H * hd, 1.0f);
    const size_t o = misalign ? 4 : 0;
    Buf qbuf(to_bf(q), o), kbuf(to_bf(k), o), vbuf(to_bf(v), o), dobuf(to_bf(dout), o);
    bf16 *qb = qbuf.data(), *kb = kbuf.data(), *vb = vbuf.data(), *dob = dobuf.data();
    std::vector<bf16> out((size_t)N * H * hd, __float2bfloat16_rn(NAN)), dq(out.size(), __float2bfloat16_rn(NAN)), dk((size_t)N * KV * hd, __float2bfloat16_rn(NAN)), dv(dk.size(), __float2bfloat16_rn(NAN));
    std::vector<float> lse((size_t)N * H, NAN), delta((size_t)N * H, NAN);
    const float scale = 1.0f / std::sqrt((float)hd);
    const unsigned tiles = (maxr + 63) / 64;
    emu_dim3 g1{tiles, (unsigned)H, (unsigned)S}, g2{tiles, (unsigned)KV, (unsigned)S};
    auto fwd = [&] {
        if (HD == 64) attention_train_fwd_hd64_bf16(out.data(), lse.data(), qb, kb, vb, cu.data(), H, KV, hd, window, scale);
        if (HD == 128) attention_train_fwd_hd128_bf16(out.data(), lse.data(), qb, kb, vb, cu.data(), H, KV, hd, window, scale);
        if (HD == 256) attention_train_fwd_hd256_bf16(out.data(), lse.data(), qb, kb, vb, cu.data(), H, KV, hd, window, scale);
    };
    // Dynamic shared memory above 48 KiB is opted in by the launcher (allow_smem, ≤ 99 KiB).
    const size_t optin = 99 * 1024;
    emu_launch(g1, 128, fwd_smem(HD), fwd, optin);
    // delta as src/cuda/attention_train.rs launches it: delta_group(hd) lanes per (row, head).
    const int G = hd % 8 == 0 && hd / 8 <= 32 && ((hd / 8) & (hd / 8 - 1)) == 0 ? hd / 8 : 32, per_block = 256 / G;
    emu_launch(emu_dim3{(unsigned)((N * H + per_block - 1) / per_block), 1, 1}, 256, 0, [&] { attention_train_bwd_delta_bf16(delta.data(), out.data(), dob, N, H, hd); });
    {   // delta against an f64 dot of the bf16 out and dout (f32 sum: 1e-5·Σ|terms| + 1e-6);
        // and on misaligned copies (offset one element: the element-strided path).
        std::vector<double> want((size_t)N * H), mag((size_t)N * H);
        for (size_t i = 0; i < want.size(); ++i)
            for (int d = 0; d < hd; ++d) {
                const double t = (double)__bfloat162float(out[i * hd + d]) * __bfloat162float(dob[i * hd + d]);
                want[i] += t; mag[i] += std::fabs(t);
            }
        std::vector<double> atol(want.size());
        for (size_t i = 0; i < want.size(); ++i) atol[i] = 1e-5 * mag[i] + 1e-6;
        ::check("delta", want, delta, atol, 0);
        std::vector<bf16> om(1, bf16{}), dm(1, bf16{});
        om.insert(om.end(), out.begin(), out.end());
        dm.insert(dm.end(), dob, dob + out.size());
        std::vector<float> delta_m((size_t)N * H, NAN);
        emu_launch(emu_dim3{(unsigned)((N * H + per_block - 1) / per_block), 1, 1}, 256, 0, [&] { attention_train_bwd_delta_bf16(delta_m.data(), om.data() + 1, dm.data() + 1, N, H, hd); });
        ::check("delta misaligned", want, delta_m, atol, 0);
    }
    auto dkdv = [&] {
        if (HD == 64) attention_train_bwd_dkdv_hd64_bf16(dk.data(), dv.data(), qb, kb, vb, dob, lse.data(), delta.data(), cu.data(), H, KV, hd, window, scale);
        if (HD == 128) attention_train_bwd_dkdv_hd128_bf16(dk.data(), dv.data(), qb, kb, vb, dob, lse.data(), delta.data(), cu.data(), H, KV, hd, window, scale);
        if (HD == 256) attention_train_bwd_dkdv_hd256_bf16(dk.data(), dv.data(), qb, kb, vb, dob, lse.data(), delta.data(), cu.data(), H, KV, hd, window, scale);
    };
    emu_launch(g2, 128, dkdv_smem(HD), dkdv, optin);
    auto dqk = [&] {
        if (HD == 64) attention_train_bwd_dq_hd64_bf16(dq.data(), qb, kb, vb, dob, lse.data(), delta.data(), cu.data(), H, KV, hd, window, scale);
        if (HD == 128) attention_train_bwd_dq_hd128_bf16(dq.data(), qb, kb, vb, dob, lse.data(), delta.data(), cu.data(), H, KV, hd, window, scale);
        if (HD == 256) attention_train_bwd_dq_hd256_bf16(dq.data(), qb, kb, vb, dob, lse.data(), delta.data(), cu.data(), H, KV, hd, window, scale);
    };
    emu_launch(g1, 128, dq_smem(HD), dqk, optin);
    {   // The kernels before the pipeline, bit for bit.
        std::vector<bf16> out_r(out.size(), bf_nan()), dq_r(dq.size(), bf_nan()), dk_r(dk.size(), bf_nan()), dv_r(dv.size(), bf_nan());
        std::vector<float> lse_r(lse.size(), NAN);
        using namespace at_ref;
        emu_launch(g1, 128, ref_fwd_smem(HD), [&] {
            if (HD == 64) attention_train_ref_fwd_hd64_bf16(out_r.data(), lse_r.data(), qb, kb, vb, cu.data(), H, KV, hd, window, scale);
            if (HD == 128) attention_train_ref_fwd_hd128_bf16(out_r.data(), lse_r.data(), qb, kb, vb, cu.data(), H, KV, hd, window, scale);
            if (HD == 256) attention_train_ref_fwd_hd256_bf16(out_r.data(), lse_r.data(), qb, kb, vb, cu.data(), H, KV, hd, window, scale);
        }, optin);
        emu_launch(g2, 128, ref_dkdv_smem(HD), [&] {
            if (HD == 64) attention_train_ref_bwd_dkdv_hd64_bf16(dk_r.data(), dv_r.data(), qb, kb, vb, dob, lse.data(), delta.data(), cu.data(), H, KV, hd, window, scale);
            if (HD == 128) attention_train_ref_bwd_dkdv_hd128_bf16(dk_r.data(), dv_r.data(), qb, kb, vb, dob, lse.data(), delta.data(), cu.data(), H, KV, hd, window, scale);
            if (HD == 256) attention_train_ref_bwd_dkdv_hd256_bf16(dk_r.data(), dv_r.data(), qb, kb, vb, dob, lse.data(), delta.data(), cu.data(), H, KV, hd, window, scale);
        }, optin);
        emu_launch(g1, 128, ref_dq_smem(HD), [&] {
            if (HD == 64) attention_train_ref_bwd_dq_hd64_bf16(dq_r.data(), qb, kb, vb, dob, lse.data(), delta.data(), cu.data(), H, KV, hd, window, scale);
            if (HD == 128) attention_train_ref_bwd_dq_hd128_bf16(dq_r.data(), qb, kb, vb, dob, lse.data(), delta.data(), cu.data(), H, KV, hd, window, scale);
            if (HD == 256) attention_train_ref_bwd_dq_hd256_bf16(dq_r.data(), qb, kb, vb, dob, lse.data(), delta.data(), cu.data(), H, KV, hd, window, scale);
        }, optin);
        check_bits("out vs before the pipeline", out_r, out);
        check_bits("lse vs before the pipeline", lse_r, lse);
        check_bits("dq vs before the pipeline", dq_r, dq);
        check_bits("dk vs before the pipeline", dk_r, dk);
        check_bits("dv vs before the pipeline", dv_r, dv);
    }
    Ref r = reference(q, k, v, dout, cu, H, KV, hd, window);
    std::vector<double> one(r.lse.size(), 0.0);
    int bad = 0;
    bad += check("out", r.out, r.mag_out, from_bf(out), 1.0 / 64, 0.079);
    bad += check("lse", r.lse, one, lse, 0, 1e-5);
    bad += check("dq", r.dq, r.mag_dq, from_bf(dq), 1.0 / 64, 0.079);
    bad += check("dk", r.dk, r.mag_dk, from_bf(dk), 1.0 / 64, 0.079);
    bad += check("dv", r.dv, r.mag_dv, from_bf(dv), 1.0 / 64, 0.079);
    return bad;
}

int main(int argc, char** argv) {
    parse_args(argc, argv);
    int bad = 0;
    bad += run(6, 2, 64, 0, {1, 17, 70});
    if (g_full) {
        bad += run(4, 4, 128, 0, {1, 17, 70});
        bad += run(6, 2, 36, 5, {3, 70});
        bad += run(2, 1, 256, 40, {1, 17, 70});
        bad += run(4, 2, 96, 1, {33});
        bad += run(2, 2, 64, 0, {130, 64});
        bad += run(14, 2, 64, 0, {130, 64, 0, 1});
        bad += run(12, 2, 128, 100, {129, 5});
        bad += run(6, 2, 64, 0, {130, 70, 3});
        bad += run(3, 1, 32, 0, {5, 9});  // hd 32: 4 lanes per (row, head), a partial last warp
        // The pipeline's walks: one row; many sequences; windows at and past a tile; hd 256's two
        // passes over several tiles; hd % 8 != 0 and hd < HD with 16-byte copies; misaligned
        // tensors (8-byte copies) at every HD.
        bad += run(2, 1, 64, 0, {1});
        {
            Rng lr(7);
            std::vector<int> lens(24);
            for (auto& l : lens) l = 1 + lr.next() % 140;
            bad += run(4, 2, 64, 0, lens);
        }
        bad += run(4, 1, 64, 64, {200, 65});
        bad += run(2, 1, 128, 33, {160});
        bad += run(2, 1, 256, 0, {100, 33});
        bad += run(4, 2, 100, 0, {90});
        bad += run(2, 1, 120, 0, {70});
        bad += run(6, 2, 64, 0, {130, 70, 3}, true);
        bad += run(4, 2, 128, 0, {150, 40}, true);
        bad += run(2, 1, 256, 0, {70}, true);
    }
    (void)bad;
    return finish("attention_train");
}
