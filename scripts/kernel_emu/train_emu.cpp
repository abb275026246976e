// kernels/train.cu under the emulator (see run.sh), every kernel launched as
// src/cuda/train_kernels.rs does (grids, blocks, shared memory, split-K and second passes), against
// references ported from the CPU code with tests/cuda_train_kernels.rs's tolerances:
//   logprob_gather_fwd/bwd   f64 log-softmax gold (1e-5 + 1e-6·|ref|; dlogits 2e-5·Σ|terms| + 2^-8
//                            for bf16), in place, with and without dentropy, target ≥ vocab;
//                            f32 → bf16 out of place bit-equal to in-place f32 + bf16 rounding,
//                            vector and scalar (vocab % 8 ≠ 0, misaligned in or out) paths
//   grpo_loss_fwd_bwd        src/loss/grpo.rs (grad 1e-6·max|g| + 2e-6, exact without exp; loss
//                            2e-6·Σ|w·loss|; clip counts exact) incl. the grid-stride past 1024 blocks
//   lora_* + sum_partials    src/cpu/train.rs::proj_bwd in f64 (2e-5·Σ|terms|, dx + 2^-8), split-K
//   rmsnorm_bwd (+dweight)   src/cpu/ops.rs::rmsnorm_bwd (1e-5·Σ|terms| + 2^-8), dx aliasing dy,
//                            vector and (misaligned / wide) scalar paths
//   swiglu_bwd (+fused)      src/cpu/ops.rs::swiglu_bwd (1e-5 + 2^-8), fused bit-equal, aliasing,
//                            misaligned (scalar path) bit-equal
//   rope_bwd                 src/cpu/ops.rs::rope_inplace(inverse) (1e-5 + 2^-8), misaligned
//                            (one-pair path) bit-equal
//   grad_sq_norm, adamw      src/optim (norm within 1 ulp, non-finite count exact; AdamW bit-exact,
//                            the device-side skip on a non-finite gradient)
#include <array>
#include "emu.h"
#include "train.inc"

static const double BF16_STORE_RTOL = 1.0 / 256;
static unsigned red_blocks(size_t n, size_t per) { return (unsigned)std::min<size_t>(std::max<size_t>((n + per - 1) / per, 1), 1024); }

// ---- launchers (src/cuda/train_kernels.rs) ----
static void sum_partials_f64_l(const std::vector<double>& partials, std::vector<double>& out, int num_partials, int fields) {
    emu_launch(grid1(1), 256, 0, [&] { sum_partials_f64(out.data(), partials.data(), num_partials, fields); });
}
static void sum_partials_add_l(const std::vector<float>& partials, std::vector<float>& out, int splits, float scale) {
    const uint64_t len = out.size();
    if (len == 0) return;
    emu_launch(grid1(ew_grid(len)), 256, 0, [&] { sum_partials_add_f32(out.data(), partials.data(), splits, len, scale); });
}

// ---- log-softmax gather ----
static void gold(const std::vector<float>& s, double& lse, double& es) {
    float m = -INFINITY;
    for (float v : s) m = std::max(m, v);
    double z = 0;
    for (float v : s) z += std::exp((double)v - m);
    lse = m + std::log(z);
    es = 0;
    for (float v : s) if (std::isfinite(v)) es += std::exp(v - lse) * v;
}

template <class T> static std::vector<T> store(const std::vector<float>& x) {
    std::vector<T> o(x.size());
    for (size_t i = 0; i < x.size(); ++i) { if constexpr (std::is_same<T, float>::value) o[i] = x[i]; else o[i] = __float2bfloat16_rn(x[i]); }
    return o;
}
template <class T> static std::vector<float> load(const std::vector<T>& x) {
    if constexpr (std::is_same<T, float>::value) return x; else return from_bf(x);
}

template <class T>
static void gather_case(size_t vocab, size_t rows, float temp, bool with_ent) {
    Rng rng(vocab * 3 + rows);
    auto x = rng.vec(rows * vocab, -10, 10);
    if (rows > 1) for (size_t i = vocab; i < 2 * vocab; i += 3) x[i] = -INFINITY;
    const bool bf = std::is_same<T, bf16>::value;
    if (bf) x = bfr(x);
    std::vector<uint32_t> targets(rows);
    for (size_t r = 0; r < rows; ++r) targets[r] = (uint32_t)((r * 7919 + 1) % vocab);
    if (rows > 2) targets[2] = (uint32_t)vocab + 3;  // out of range: logp NaN, no one-hot in the backward
    auto dlogp = rng.vec(rows, -1, 1), dent = rng.vec(rows, -0.5f, 0.5f);
    std::vector<T> xt = store<T>(x);
    std::vector<float> lp(rows, 12345), ent(rows, 12345), lse(rows, 12345), ms(rows, 12345);
    const int r_i = (int)rows, v_i = (int)vocab;
    emu_launch(grid1(rows), row_block(vocab), 0, [&] {
        if constexpr (std::is_same<T, float>::value)
            logprob_gather_fwd_f32(lp.data(), ent.data(), lse.data(), ms.data(), xt.data(), targets.data(), temp, r_i, v_i);
        else
            logprob_gather_fwd_bf16(lp.data(), ent.data(), lse.data(), ms.data(), xt.data(), targets.data(), temp, r_i, v_i);
    });
    std::vector<double> w_lp(rows), w_ent(rows), w_lse(rows), w_es(rows), want_d, mag;
    for (size_t r = 0; r < rows; ++r) {
        std::vector<float> s(vocab);
        for (size_t i = 0; i < vocab; ++i) s[i] = x[r * vocab + i] / temp;
        double l, es;
        gold(s, l, es);
        w_lp[r] = targets[r] < vocab ? s[targets[r]] - l : NAN;
        w_ent[r] = l - es; w_lse[r] = l; w_es[r] = es;
        const double gl = dlogp[r], ge = with_ent ? dent[r] : 0.0, t = temp;
        for (size_t j = 0; j < vocab; ++j) {
            const double p = std::exp(s[j] - l), hot = j == targets[r] ? 1.0 : 0.0, dse = std::isfinite(s[j]) ? s[j] - es : 0.0;
            want_d.push_back((-gl * p - ge * p * dse) / t + hot * gl / t);
            mag.push_back((std::fabs(gl) * (p + hot) + std::fabs(ge) * p * (std::fabs(dse) + std::fabs(es) + 1.0)) / t);
        }
    }
    char what[128];
    snprintf(what, sizeof what, "gather %s vocab %zu rows %zu T %g ent %d", bf ? "bf16" : "f32", vocab, rows, temp, with_ent);
    const std::string w = what;
    std::vector<double> a1(rows, 1e-5);
    check(w + " logp", w_lp, lp, a1, 1e-6);
    check(w + " entropy", w_ent, ent, a1, 1e-6);
    check(w + " lse", w_lse, lse, a1, 1e-6);
    check(w + " mean_s", w_es, ms, a1, 1e-6);
    const float* de = with_ent ? dent.data() : nullptr;
    // Out of place f32 → bf16 (f32 logits only), before the in-place backward overwrites xt:
    // logits and dlogits each at element offset 0 or 1 (a misaligned pointer: the element path
    // even when vocab % 8 == 0), in buffers that end where the data ends (ASan sees overruns).
    const size_t n = rows * vocab;
    std::vector<std::vector<bf16>> fused;
    std::vector<std::string> fused_what;
    if constexpr (std::is_same<T, float>::value) {
        for (auto off : {std::pair<size_t, size_t>{0, 0}, {1, 0}, {0, 1}}) {
            std::vector<float> in(off.first + n);
            std::copy(xt.begin(), xt.end(), in.begin() + off.first);
            std::vector<bf16> out(off.second + n, bf_nan());
            emu_launch(grid1(rows), row_block(vocab), 0, [&] {
                logprob_gather_bwd_f32_to_bf16(in.data() + off.first, out.data() + off.second, targets.data(),
                                               dlogp.data(), de, lse.data(), ms.data(), temp, r_i, v_i);
            });
            char o[64];
            snprintf(o, sizeof o, " f32_to_bf16 (offsets %zu, %zu)", off.first, off.second);
            check_bits(w + o + " leaves logits", std::vector<float>(in.begin() + off.first, in.end()), xt);
            fused.emplace_back(out.begin() + off.second, out.end());
            fused_what.push_back(w + o);
        }
    }
    emu_launch(grid1(rows), row_block(vocab), 0, [&] {
        if constexpr (std::is_same<T, float>::value)
            logprob_gather_bwd_f32(xt.data(), targets.data(), dlogp.data(), de, lse.data(), ms.data(), temp, r_i, v_i);
        else
            logprob_gather_bwd_bf16(xt.data(), targets.data(), dlogp.data(), de, lse.data(), ms.data(), temp, r_i, v_i);
    });
    for (auto& m : mag) m = 2e-5 * m + 1e-30;
    check(w + " dlogits", want_d, load(xt), mag, bf ? BF16_STORE_RTOL : 0.0);
    if constexpr (std::is_same<T, float>::value) {
        // Bit for bit logprob_gather_bwd_f32 then cast_f32_to_bf16 (f32_to_bf16 per element),
        // and within the reference's tolerance plus one bf16 store.
        const std::vector<bf16> want_bits = store<bf16>(xt);
        for (size_t k = 0; k < fused.size(); ++k) {
            check_bits(fused_what[k] + " == bwd_f32 + cast", fused[k], want_bits);
            check(fused_what[k] + " dlogits", want_d, from_bf(fused[k]), mag, BF16_STORE_RTOL);
        }
    }
}

// ---- GRPO loss (src/loss/grpo.rs) ----
enum LossType { GRPO, DAPO, DRGRPO };
struct GrpoCfg { LossType lt; double beta, eps; double eps_high; bool k1; size_t max_len; };  // eps_high < 0: = eps
struct Terms { float loss, dloss, ratio, kl; };
static Terms grpo_token(float logp, const float* old, const float* ref, float adv, float lo, float hi, float beta, bool k1) {
    const float ratio = old ? expf(logp - *old) : 1.0f;
    const float l1 = ratio * adv;
    float c = ratio < lo ? lo : ratio;
    c = c > hi ? hi : c;
    const float l2 = c * adv;
    float loss, d;
    if (l2 < l1) { loss = -l2; d = 0.0f; } else { loss = -l1; d = -(adv * ratio); }
    float kl = 0;
    if (ref) {
        float k, dk;
        if (k1) { k = logp - *ref; dk = 1; } else { const float e = expf(*ref - logp); k = e - (*ref - logp) - 1.0f; dk = 1.0f - e; }
        kl = k; loss = loss + beta * k; d = d + beta * dk;
    }
    return {loss, d, ratio, kl};
}

static void grpo_case(const std::vector<size_t>& lengths, const GrpoCfg& cfg, bool old_given, bool ref_given, uint64_t seed) {
    size_t n = 0;
    for (size_t l : lengths) n += l;
    const double lo64 = 1.0 - cfg.eps, hi64 = 1.0 + (cfg.eps_high < 0 ? cfg.eps : cfg.eps_high);
    Rng rng(seed);
    auto logp = rng.vec(n, -3, -0.01f), delta = rng.vec(n, -0.6f, 0.6f), dref = rng.vec(n, -0.5f, 0.5f);
    for (auto& d : delta) while (std::fabs(std::exp((double)d) - lo64) < 1e-4 || std::fabs(std::exp((double)d) - hi64) < 1e-4) d += 1e-3f;
    std::vector<float> old(n), ref(n);
    for (size_t i = 0; i < n; ++i) { old[i] = logp[i] - delta[i]; ref[i] = logp[i] + dref[i]; }
    auto adv = rng.vec(lengths.size(), -2, 2);
    const double nseq = (double)lengths.size();
    std::vector<double> wts;
    for (size_t l : lengths)
        wts.push_back(cfg.lt == GRPO ? 1.0 / (nseq * std::max<size_t>(l, 1)) : cfg.lt == DAPO ? 1.0 / std::max<size_t>(n, 1) : 1.0 / (nseq * cfg.max_len));
    const float lo = (float)lo64, hi = (float)hi64, beta = (float)cfg.beta;
    // CPU
    std::vector<double> want_grad(n);
    double loss = 0, kl_sum = 0, ratio_sum = 0, abs_sum = 0;
    size_t n_low = 0, n_high = 0;
    std::vector<int> token_seq;
    for (size_t i = 0, t = 0; i < lengths.size(); ++i)
        for (size_t j = 0; j < lengths[i]; ++j, ++t) {
            token_seq.push_back((int)i);
            const Terms tt = grpo_token(logp[t], old_given ? &old[t] : nullptr, ref_given ? &ref[t] : nullptr, adv[i], lo, hi, beta, cfg.k1);
            loss += wts[i] * tt.loss;
            want_grad[t] = (float)wts[i] * tt.dloss;
            kl_sum += tt.kl; ratio_sum += tt.ratio;
            n_low += tt.ratio < lo && adv[i] < 0;
            n_high += tt.ratio > hi && adv[i] > 0;
        }
    // GPU, as grpo_loss_fwd_bwd_f32 launches it (then sum_partials_f64 over the block partials).
    const unsigned blocks = red_blocks(n, 256);
    std::vector<float> grad(std::max<size_t>(n, 1), NAN), tl(std::max<size_t>(n, 1), NAN);
    std::vector<double> partials(blocks * 5, NAN), totals(5, NAN);
    const int kl_k1 = cfg.k1, n_i = (int)n;
    emu_launch(grid1(blocks), 256, 0, [&] {
        grpo_loss_fwd_bwd_f32(tl.data(), grad.data(), partials.data(), logp.data(), old_given ? old.data() : nullptr,
                              ref_given ? ref.data() : nullptr, token_seq.data(), adv.data(), wts.data(), lo, hi, beta, kl_k1, n_i);
    });
    sum_partials_f64_l(partials, totals, (int)blocks, 5);
    grad.resize(n); tl.resize(n);
    for (float v : tl) abs_sum += std::fabs(v);
    char what[160];
    snprintf(what, sizeof what, "grpo %zu seqs %zu tokens type %d old %d ref %d beta %g k1 %d", lengths.size(), n, cfg.lt, old_given, ref_given,
             cfg.beta, cfg.k1);
    const std::string w = what;
    double gmax = 0;
    for (double g : want_grad) gmax = std::max(gmax, std::fabs(g));
    check(w + " grad", want_grad, grad, 1e-6 * gmax, 2e-6);
    if (!old_given && !ref_given) check_bits(w + " grad exact without exp", std::vector<float>(want_grad.begin(), want_grad.end()), grad);
    const float gpu_loss = (float)totals[0], cpu_loss = (float)loss;
    expect(std::fabs((double)cpu_loss - gpu_loss) <= 2e-6 * abs_sum + 1e-7 * std::fabs(cpu_loss), w + " loss");
    expect((size_t)totals[3] == n_low && (size_t)totals[4] == n_high, w + " clip counts");
    if (n > 0) {
        expect(std::fabs(ratio_sum / n - totals[2] / n) < 1e-6, w + " ratio mean");
        if (ref_given) expect(std::fabs(kl_sum / n - totals[1] / n) < 1e-6, w + " kl mean");
    } else {
        expect(totals[0] == 0 && totals[1] == 0 && totals[2] == 0 && totals[3] == 0 && totals[4] == 0, w + " empty: zero totals");
    }
}

// ---- LoRA backward (src/cpu/train.rs::proj_bwd) ----
static size_t lora_grad_splits(size_t rows, size_t p, size_t q) {
    const size_t tiles = std::max<size_t>(((p + 31) / 32) * ((q + 31) / 32), 1);
    const size_t want = (264 + tiles - 1) / tiles, by_rows = std::max<size_t>(rows / 256, 1);
    return std::min<size_t>(std::max<size_t>(std::min(want, by_rows), 1), 64);
}
static size_t lora_grad_scratch_len(size_t rows, size_t p, size_t q) { size_t s = lora_grad_splits(rows, p, q); return s == 1 ? 0 : s * p * q; }
static emu_dim3 tile_grid(size_t p, size_t q, size_t splits) { return grid1((q + 31) / 32, (p + 31) / 32, splits); }

// C[p][q] = Σ_k L(k, p)·R(k, q) in f64, with Σ|terms| as the magnitude.
static void gemm_ref(size_t P, size_t Q, size_t K, const std::function<double(size_t, size_t)>& L, const std::function<double(size_t, size_t)>& R,
                     std::vector<double>& c, std::vector<double>& mag) {
    c.assign(P * Q, 0); mag.assign(P * Q, 0);
    for (size_t p = 0; p < P; ++p)
        for (size_t q = 0; q < Q; ++q) {
            double acc = 0, m = 0;
            for (size_t k = 0; k < K; ++k) { const double t = L(k, p) * R(k, q); acc += t; m += std::fabs(t); }
            c[p * Q + q] = acc; mag[p * Q + q] = m;
        }
}

static void lora_case(size_t n, size_t d_in, size_t d_out, size_t r) {
    Rng rng(n * 31 + d_in * 7 + d_out * 3 + r);
    auto x = bfr(rng.vec(n * d_in, -2, 2)), dy = bfr(rng.vec(n * d_out, -1, 1));
    auto a = rng.vec(r * d_in, -0.1f, 0.1f), b = rng.vec(d_out * r, -0.1f, 0.1f);
    auto dx_in = bfr(rng.vec(n * d_in, -0.5f, 0.5f)), da_in = rng.vec(r * d_in, -0.01f, 0.01f), db_in = rng.vec(d_out * r, -0.01f, 0.01f);
    const float s = 2.0f;
    std::vector<bf16> xb = to_bf(x), dyb16 = to_bf(dy), dx = to_bf(dx_in);
    std::vector<float> da = da_in, db = db_in, u(n * r, NAN), dyb(n * r, NAN);
    const size_t scratch_len = std::max({lora_grad_scratch_len(n, d_out, r), lora_grad_scratch_len(n, r, d_in), (size_t)1});
    std::vector<float> scratch(scratch_len, NAN);
    const int n_i = (int)n, in_i = (int)d_in, out_i = (int)d_out, r_i = (int)r;
    if (n * r != 0) {
        emu_launch(tile_grid(n, r, 1), 256, 0, [&] { lora_bwd_xa_bf16(u.data(), xb.data(), a.data(), n_i, in_i, r_i); });
        emu_launch(tile_grid(n, r, 1), 256, 0, [&] { lora_bwd_dyb_bf16(dyb.data(), dyb16.data(), b.data(), n_i, out_i, r_i); });
    }
    if (n * d_out * r != 0) {
        const size_t sp = lora_grad_splits(n, d_out, r);
        emu_launch(tile_grid(d_out, r, sp), 256, 0,
                   [&] { lora_grad_b_bf16(db.data(), scratch.data(), dyb16.data(), u.data(), s, n_i, out_i, r_i); });
        if (sp > 1) sum_partials_add_l(scratch, db, (int)sp, s);
    }
    if (n * d_in * r != 0) {
        const size_t sp = lora_grad_splits(n, r, d_in);
        std::fill(scratch.begin(), scratch.end(), NAN);
        emu_launch(tile_grid(r, d_in, sp), 256, 0,
                   [&] { lora_grad_a_bf16(da.data(), scratch.data(), dyb.data(), xb.data(), s, n_i, in_i, r_i); });
        if (sp > 1) sum_partials_add_l(scratch, da, (int)sp, s);
        emu_launch(tile_grid(n, d_in, 1), 256, 0, [&] { lora_bwd_dx_bf16(dx.data(), dyb.data(), a.data(), s, n_i, in_i, r_i); });
    }
    // f64 references chained through the f64 u and dyb, magnitudes through |·|.
    std::vector<double> wu, mu, wdyb, mdyb, t, mt;
    gemm_ref(n, r, d_in, [&](size_t k, size_t p) { return (double)x[p * d_in + k]; }, [&](size_t k, size_t q) { return (double)a[q * d_in + k]; }, wu, mu);
    gemm_ref(n, r, d_out, [&](size_t k, size_t p) { return (double)dy[p * d_out + k]; }, [&](size_t k, size_t q) { return (double)b[k * r + q]; }, wdyb, mdyb);
    char what[96];
    snprintf(what, sizeof what, "lora n %zu %zu->%zu r %zu", n, d_in, d_out, r);
    const std::string w = what;
    auto tol = [](const std::vector<double>& m) { std::vector<double> o(m.size()); for (size_t i = 0; i < m.size(); ++i) o[i] = 2e-5 * m[i] + 1e-30; return o; };
    check(w + " u", wu, u, tol(mu), 0);
    check(w + " dyb", wdyb, dyb, tol(mdyb), 0);
    gemm_ref(d_out, r, n, [&](size_t k, size_t p) { return (double)dy[k * d_out + p]; }, [&](size_t k, size_t q) { return wu[k * r + q]; }, t, mt);
    for (size_t i = 0; i < t.size(); ++i) { t[i] = db_in[i] + s * t[i]; mt[i] = std::fabs(db_in[i]) + s * mt[i]; }
    check(w + " dB", t, db, tol(mt), 0);
    gemm_ref(r, d_in, n, [&](size_t k, size_t p) { return wdyb[k * r + p]; }, [&](size_t k, size_t q) { return (double)x[k * d_in + q]; }, t, mt);
    for (size_t i = 0; i < t.size(); ++i) { t[i] = da_in[i] + s * t[i]; mt[i] = std::fabs(da_in[i]) + s * mt[i]; }
    check(w + " dA", t, da, tol(mt), 0);
    gemm_ref(n, d_in, r, [&](size_t k, size_t p) { return wdyb[p * r + k]; }, [&](size_t k, size_t q) { return (double)a[k * d_in + q]; }, t, mt);
    for (size_t i = 0; i < t.size(); ++i) { t[i] = dx_in[i] + s * t[i]; mt[i] = std::fabs(dx_in[i]) + s * mt[i]; }
    check(w + " dx", t, from_bf(dx), tol(mt), BF16_STORE_RTOL);
}

// ---- RMSNorm backward ----
// src/cuda/train_kernels.rs::rmsnorm_bwd_block: one thread per 8 columns (the vector path) up to
// 512 threads, else row_block(dim).
static int rmsnorm_bwd_block(size_t dim) {
    return dim % 8 == 0 && dim / 8 <= 512 ? (int)std::max<size_t>((dim / 8 + 31) / 32 * 32, 32) : row_block(dim);
}

// off: element offset of x, dy, dx from their allocations (1: misaligned, the scalar path).
static void rmsnorm_bwd_case(size_t rows, size_t dim, bool with_dw, bool alias, size_t off = 0) {
    Rng rng(rows * 13 + dim);
    const float eps = 1e-6f;
    auto x = bfr(rng.vec(rows * dim, -2, 2)), w = bfr(rng.vec(dim, 0.5f, 1.5f)), dy = bfr(rng.vec(rows * dim, -1, 1));
    auto dw_in = rng.vec(dim, -0.1f, 0.1f);
    auto shift = [&](std::vector<bf16> v) { v.insert(v.begin(), off, bf_nan()); return v; };
    std::vector<bf16> xb = shift(to_bf(x)), wb = to_bf(w), dyb = shift(to_bf(dy)), dxb = shift(std::vector<bf16>(rows * dim, bf_nan()));
    bf16* dx = (alias ? dyb.data() : dxb.data()) + off;
    const size_t blocks = std::max<size_t>((rows + 15) / 16, 1);
    std::vector<float> partials(blocks * dim, NAN), dw = dw_in;
    const int rows_i = (int)rows, dim_i = (int)dim;
    if (rows > 0) {
        emu_launch(grid1(blocks), rmsnorm_bwd_block(dim), with_dw ? dim * 4 : 0, [&] {
            rmsnorm_bwd_bf16(dx, with_dw ? partials.data() : nullptr, xb.data() + off, wb.data(), dyb.data() + off, eps, rows_i, dim_i, 0);
        });
        if (with_dw) sum_partials_add_l(partials, dw, (int)blocks, 1.0f);
    }
    std::vector<double> want_dx(rows * dim), atol_dx(rows * dim), want_dw(dw_in.begin(), dw_in.end()), abs_dw(dim);
    for (size_t i = 0; i < dim; ++i) abs_dw[i] = std::fabs(dw_in[i]);
    for (size_t r = 0; r < rows; ++r) {
        const float* xr = &x[r * dim]; const float* gr = &dy[r * dim];
        float ss = 0, dot = 0, cabs = 0;
        for (size_t i = 0; i < dim; ++i) { ss += xr[i] * xr[i]; dot += xr[i] * gr[i] * w[i]; cabs += std::fabs(xr[i] * gr[i] * w[i]); }
        const float rr = 1.0f / std::sqrt(ss / (float)dim + eps), c = rr * rr * rr / (float)dim * dot;
        cabs *= rr * rr * rr / (float)dim;
        for (size_t i = 0; i < dim; ++i) {
            want_dx[r * dim + i] = rr * w[i] * gr[i] - c * xr[i];
            atol_dx[r * dim + i] = 1e-5 * (rr * std::fabs(w[i] * gr[i]) + cabs * std::fabs(xr[i]));
            want_dw[i] += gr[i] * xr[i] * rr;
            abs_dw[i] += std::fabs(gr[i] * xr[i] * rr);
        }
    }
    char what[96];
    snprintf(what, sizeof what, "rmsnorm_bwd rows %zu dim %zu dw %d alias %d offset %zu", rows, dim, with_dw, alias, off);
    const std::vector<bf16>& dxv = alias ? dyb : dxb;
    check(std::string(what) + " dx", want_dx, from_bf(std::vector<bf16>(dxv.begin() + off, dxv.end())), atol_dx, BF16_STORE_RTOL);
    if (with_dw) { for (auto& a : abs_dw) a *= 1e-5; check(std::string(what) + " dweight", want_dw, dw, abs_dw, 0); }
    if (!alias && rows > 0) {
        // accumulate = 1 (the backward's residual stream): bit for bit residual_add_bf16 of the
        // stored result, bf16(dx_in + dx); dweight as without it.
        const std::vector<float> acc_in = bfr(rng.vec(rows * dim, -1, 1));
        std::vector<bf16> accb = shift(to_bf(acc_in));
        std::vector<float> partials2(blocks * dim, NAN), dw2 = dw_in;
        emu_launch(grid1(blocks), rmsnorm_bwd_block(dim), with_dw ? dim * 4 : 0, [&] {
            rmsnorm_bwd_bf16(accb.data() + off, with_dw ? partials2.data() : nullptr, xb.data() + off, wb.data(), dyb.data() + off, eps, rows_i, dim_i, 1);
        });
        if (with_dw) sum_partials_add_l(partials2, dw2, (int)blocks, 1.0f);
        const std::vector<float> stored = from_bf(std::vector<bf16>(dxb.begin() + off, dxb.end()));
        std::vector<double> want_acc(rows * dim);
        for (size_t i = 0; i < rows * dim; ++i) want_acc[i] = bfr(acc_in[i] + stored[i]);
        check(std::string(what) + " accumulate", want_acc, from_bf(std::vector<bf16>(accb.begin() + off, accb.end())), 0, 0);
        if (with_dw) check(std::string(what) + " accumulate dweight", std::vector<double>(dw.begin(), dw.end()), dw2, 0, 0);
    }
}

// ---- SwiGLU backward ----
// src/cuda/train_kernels.rs::ew_vec_grid: one thread per 8 elements, 256-thread blocks, ≤ 65535.
static unsigned ew_vec_grid(size_t n) { return ew_grid((n + 7) / 8); }

static void swiglu_bwd_case(size_t rows, size_t inter) {
    const size_t n = rows * inter;
    Rng rng(n + 5);
    auto g = bfr(rng.vec(n, -6, 6)), u = bfr(rng.vec(n, -2, 2)), dy = bfr(rng.vec(n, -1, 1));
    std::vector<double> wg(n), wu(n);
    for (size_t i = 0; i < n; ++i) {
        const float s = 1.0f / (1.0f + expf(-g[i]));
        wu[i] = dy[i] * g[i] * s;
        wg[i] = dy[i] * u[i] * s * (1.0f + g[i] * (1.0f - s));
    }
    std::vector<bf16> gb = to_bf(g), ub = to_bf(u), db = to_bf(dy), dg(n, bf_nan()), du(n, bf_nan());
    const uint64_t n64 = n;
    emu_launch(grid1(ew_vec_grid(n)), 256, 0, [&] { swiglu_bwd_bf16(dg.data(), du.data(), gb.data(), ub.data(), db.data(), n64); });
    const std::string w = "swiglu_bwd " + std::to_string(rows) + "x" + std::to_string(inter);
    // Misaligned (offset one element: the scalar path): the same bits.
    {
        auto sh = [](const std::vector<bf16>& v) { std::vector<bf16> o(1, bf_nan()); o.insert(o.end(), v.begin(), v.end()); return o; };
        std::vector<bf16> gm = sh(gb), um = sh(ub), dm = sh(db), dgm = sh(std::vector<bf16>(n, bf_nan())), dum = dgm;
        emu_launch(grid1(ew_vec_grid(n)), 256, 0, [&] { swiglu_bwd_bf16(dgm.data() + 1, dum.data() + 1, gm.data() + 1, um.data() + 1, dm.data() + 1, n64); });
        check_bits(w + " misaligned dgate", dg, std::vector<bf16>(dgm.begin() + 1, dgm.end()));
        check_bits(w + " misaligned dup", du, std::vector<bf16>(dum.begin() + 1, dum.end()));
    }
    check(w + " dgate", wg, from_bf(dg), 1e-5, BF16_STORE_RTOL);
    check(w + " dup", wu, from_bf(du), 1e-5, BF16_STORE_RTOL);
    // In place (dgate = gate, dup = up) and on a 3-block grid: the same bits.
    std::vector<bf16> g2 = gb, u2 = ub;
    emu_launch(grid1(3), 256, 0, [&] { swiglu_bwd_bf16(g2.data(), u2.data(), g2.data(), u2.data(), db.data(), n64); });
    check_bits(w + " in place", dg, g2);
    check_bits(w + " in place dup", du, u2);
    std::vector<bf16> gu;
    for (size_t r = 0; r < rows; ++r) {
        gu.insert(gu.end(), gb.begin() + r * inter, gb.begin() + (r + 1) * inter);
        gu.insert(gu.end(), ub.begin() + r * inter, ub.begin() + (r + 1) * inter);
    }
    const int rows_i = (int)rows, inter_i = (int)inter;
    if (n) emu_launch(grid1(ew_vec_grid(n)), 256, 0, [&] { swiglu_fused_bwd_bf16(gu.data(), gu.data(), db.data(), rows_i, inter_i); });
    std::vector<bf16> fg, fu;
    for (size_t r = 0; r < rows; ++r) {
        fg.insert(fg.end(), gu.begin() + r * 2 * inter, gu.begin() + r * 2 * inter + inter);
        fu.insert(fu.end(), gu.begin() + r * 2 * inter + inter, gu.begin() + (r + 1) * 2 * inter);
    }
    check_bits(w + " fused (in place) dgate", dg, fg);
    check_bits(w + " fused (in place) dup", du, fu);
}

// ---- RoPE backward ----
static void rope_bwd_case(size_t h, size_t kv, size_t hd, size_t rows) {
    Rng rng(h * 7 + hd + rows);
    std::vector<float> inv_freq(hd / 2);
    for (size_t i = 0; i < hd / 2; ++i) inv_freq[i] = (float)(1.0 / std::pow(5e5, 2.0 * i / hd));
    const int base[6] = {0, 1, 17, 300, 4095, 30000};
    std::vector<int> pos(rows);
    for (size_t r = 0; r < rows; ++r) pos[r] = base[r % 6] + (int)r;
    auto dq = bfr(rng.vec(rows * h * hd, -3, 3)), dk = bfr(rng.vec(rows * kv * hd, -3, 3));
    std::vector<bf16> qb = to_bf(dq), kb = to_bf(dk);
    const int rows_i = (int)rows, h_i = (int)h, kv_i = (int)kv, hd_i = (int)hd;
    // src/cuda/rollout.rs::rope_launch: ROPE_ROWS rows per block, sin and cos in dynamic smem.
    auto launch = [&](bf16* q, bf16* k) {
        if (rows) emu_launch(grid1((rows + ROPE_ROWS - 1) / ROPE_ROWS), ROPE_THREADS, 2 * ROPE_ROWS * (hd / 2) * sizeof(float),
                             [&] { rope_bwd_bf16(q, k, pos.data(), inv_freq.data(), rows_i, h_i, kv_i, hd_i); });
    };
    launch(qb.data(), kb.data());
    std::vector<bf16> qm(1, bf_nan()), km(1, bf_nan());  // misaligned copies: the one-pair path
    { auto a = to_bf(dq), b = to_bf(dk); qm.insert(qm.end(), a.begin(), a.end()); km.insert(km.end(), b.begin(), b.end()); }
    launch(qm.data() + 1, km.data() + 1);
    auto ref = [&](std::vector<float>& x, size_t heads) {
        for (size_t r = 0; r < rows; ++r)
            for (size_t hh = 0; hh < heads; ++hh)
                for (size_t i = 0; i < hd / 2; ++i) {
                    float* v = &x[(r * heads + hh) * hd];
                    const float ang = (float)pos[r] * inv_freq[i], s = -sinf(ang), c = cosf(ang), a = v[i], b = v[i + hd / 2];
                    v[i] = a * c - b * s;
                    v[i + hd / 2] = b * c + a * s;
                }
    };
    ref(dq, h); ref(dk, kv);
    const std::string w = "rope_bwd h " + std::to_string(h) + " kv " + std::to_string(kv) + " hd " + std::to_string(hd) + " rows " + std::to_string(rows);
    check(w + " dq", to_d(dq), from_bf(qb), 1e-5, BF16_STORE_RTOL);
    check(w + " dk", to_d(dk), from_bf(kb), 1e-5, BF16_STORE_RTOL);
    check_bits(w + " dq misaligned = aligned", qb, std::vector<bf16>(qm.begin() + 1, qm.end()));
    check_bits(w + " dk misaligned = aligned", kb, std::vector<bf16>(km.begin() + 1, km.end()));
}

// ---- optimiser (src/optim) ----
static std::array<double, 2> grad_stats(const std::vector<float>& g) {
    const size_t n = g.size();
    const unsigned blocks = red_blocks(n, 1024);
    std::vector<double> partials(blocks * 2, NAN), stats(2, NAN);
    const uint64_t n64 = n;
    emu_launch(grid1(blocks), 256, 0, [&] { grad_sq_norm_partial_f32(partials.data(), g.data(), n64); });
    sum_partials_f64_l(partials, stats, (int)blocks, 2);
    return {stats[0], stats[1]};
}

static void grad_norm_case(size_t n) {
    Rng rng(n);
    auto g = rng.vec(n, -0.01f, 0.01f);
    auto st = grad_stats(g);
    double ss = 0;
    for (float v : g) ss += (double)v * v;
    const float cpu = (float)std::sqrt(ss), gpu = (float)std::sqrt(st[0]);
    uint32_t a, b;
    memcpy(&a, &cpu, 4); memcpy(&b, &gpu, 4);
    expect(st[1] == 0 && (a > b ? a - b : b - a) <= 1, "grad norm n " + std::to_string(n));
    g[n / 2] = NAN; g[n - 1] = INFINITY; g[0] = -INFINITY;
    st = grad_stats(g);
    expect(st[1] == (n == 1 ? 1.0 : 3.0), "grad norm non-finite count n " + std::to_string(n));
}

struct AdamScalars { float decay, w1, b2, w2, step_size, bc2_sqrt, eps; };
static AdamScalars adam_scalars(double lr, double b1, double b2, double eps, double wd, uint64_t t) {
    return {(float)(1.0 - lr * wd), (float)(1.0 - b1), (float)b2, (float)(1.0 - b2), (float)(lr / (1.0 - std::pow(b1, (double)t))),
            (float)std::sqrt(1.0 - std::pow(b2, (double)t)), (float)eps};
}

static void adamw_case(double wd, float max_norm) {
    const size_t n = 1124;
    const double lr = 3e-3, b1 = 0.9, b2 = 0.999, eps = 1e-8;
    Rng rng(n + (uint64_t)(wd * 1000));
    auto p_cpu = rng.vec(n, -0.5f, 0.5f), p_gpu = p_cpu;
    std::vector<float> m_cpu(n, 0), v_cpu(n, 0), m_gpu(n, 0), v_gpu(n, 0);
    const float scales[6] = {1.0f, 0.01f, 3.0f, 1e-4f, 0.5f, 2.0f};
    for (uint64_t step = 1; step <= 6; ++step) {
        auto g = rng.vec(n, -1, 1);
        for (auto& x : g) x *= scales[step - 1];
        // CPU: clip_grad_norm then AdamW::step.
        double ss = 0;
        for (float x : g) ss += (double)x * x;
        const float norm = (float)std::sqrt(ss);
        float scale = 1.0f;
        if (max_norm > 0) { const float coef = max_norm / (norm + 1e-6f); if (coef < 1.0f) scale = coef; }
        auto gc = g;
        if (scale != 1.0f) for (auto& x : gc) x *= scale;
        const AdamScalars sc = adam_scalars(lr, b1, b2, eps, wd, step);
        for (size_t i = 0; i < n; ++i) {
            if (wd != 0) p_cpu[i] *= sc.decay;
            m_cpu[i] += sc.w1 * (gc[i] - m_cpu[i]);
            v_cpu[i] = v_cpu[i] * sc.b2 + sc.w2 * gc[i] * gc[i];
            const float denom = std::sqrt(v_cpu[i]) / sc.bc2_sqrt + sc.eps;
            p_cpu[i] -= sc.step_size * (m_cpu[i] / denom);
        }
        // GPU: stats, the host clip decision (clip_report_from_stats), adamw_step_f32 with the stats.
        const auto st = grad_stats(g);
        const float gnorm = (float)std::sqrt(st[0]);
        float gscale = 1.0f;
        if (max_norm > 0) { const float coef = max_norm / (gnorm + 1e-6f); if (coef < 1.0f) gscale = coef; }
        const std::vector<double> stats{st[0], st[1]};
        const uint64_t n64 = n;
        emu_launch(grid1(ew_grid(n)), 256, 0, [&] {
            adamw_step_f32(p_gpu.data(), m_gpu.data(), v_gpu.data(), g.data(), stats.data(), n64, gscale, sc.decay, sc.w1, sc.b2, sc.w2,
                           sc.step_size, sc.bc2_sqrt, sc.eps);
        });
        const std::string w = "adamw wd " + std::to_string(wd) + " max_norm " + std::to_string(max_norm) + " step " + std::to_string(step);
        if (gnorm == norm) {
            check_bits(w + " params", p_cpu, p_gpu);
            check_bits(w + " m", m_cpu, m_gpu);
            check_bits(w + " v", v_cpu, v_gpu);
        } else {
            check(w + " params (norms 1 ulp apart)", to_d(p_cpu), p_gpu, 1e-7, 1e-6);
            p_gpu = p_cpu; m_gpu = m_cpu; v_gpu = v_cpu;
        }
    }
    // A non-finite gradient: the stats' count makes the kernel a no-op.
    auto g = rng.vec(n, -1, 1);
    g[7] = NAN;
    const auto st = grad_stats(g);
    const std::vector<double> stats{st[0], st[1]};
    const auto p0 = p_gpu, m0 = m_gpu, v0 = v_gpu;
    const AdamScalars sc = adam_scalars(lr, b1, b2, eps, wd, 7);
    const uint64_t n64 = n;
    emu_launch(grid1(ew_grid(n)), 256, 0, [&] {
        adamw_step_f32(p_gpu.data(), m_gpu.data(), v_gpu.data(), g.data(), stats.data(), n64, 1.0f, sc.decay, sc.w1, sc.b2, sc.w2,
                       sc.step_size, sc.bc2_sqrt, sc.eps);
    });
    check_bits("adamw skipped on a non-finite gradient", p0, p_gpu);
    check_bits("adamw skipped: m", m0, m_gpu);
}

static void sum_partials_case() {
    // More partials than threads, odd field counts; and the f32 second pass on a small grid.
    Rng rng(3);
    for (int np : {0, 1, 1000}) {
        std::vector<double> p(std::max(np * 3, 1)), out(3, NAN), want(3, 0);
        for (int i = 0; i < np * 3; ++i) { p[i] = rng.uni(-1, 1); want[i % 3] += p[i]; }
        sum_partials_f64_l(p, out, np, 3);
        check("sum_partials_f64 " + std::to_string(np), want, std::vector<float>(out.begin(), out.end()), 1e-6, 1e-6);
    }
    const size_t len = 70000;
    std::vector<float> p = rng.vec(len * 3, -1, 1), out = rng.vec(len, -1, 1);
    std::vector<double> want(len);
    for (size_t i = 0; i < len; ++i) want[i] = out[i] + 0.5f * ((p[i] + p[len + i]) + p[2 * len + i]);
    sum_partials_add_l(p, out, 3, 0.5f);
    check("sum_partials_add_f32", want, out, 0, 1e-6);
}

int main(int argc, char** argv) {
    parse_args(argc, argv);
    sum_partials_case();
    gather_case<float>(461, 7, 0.7f, true);
    gather_case<float>(464, 7, 1.3f, false);
    grpo_case({3, 0, 7, 1, 33, 12}, {GRPO, 0.04, 0.2, 0.28, false, 384}, true, true, 6);
    lora_case(33, 123, 896, 4);
    rmsnorm_bwd_case(7, 123, true, false);
    swiglu_bwd_case(7, 123);
    rope_bwd_case(14, 2, 64, 7);
    grad_norm_case(1000);
    adamw_case(0.01, 1.0f);
    if (g_full) {
        for (size_t vocab : {461, 151936})
            for (size_t rows : {1, 7}) {
                gather_case<float>(vocab, rows, 1.0f, true);
                gather_case<float>(vocab, rows, 1.0f, false);
                gather_case<bf16>(vocab, rows, 1.0f, true);
                gather_case<bf16>(vocab, rows, 0.7f, false);
            }
        gather_case<float>(33, 4, 1.3f, true);
        // vocab % 8 == 0: the backward's vector path (4 f32 / 8 bf16; f32 → bf16: 8), 461 / 33
        // above: scalar. 1004, 12 (% 4 == 0, % 8 != 0): in-place f32 vector, f32 → bf16 scalar.
        for (size_t vocab : {8, 464, 1000}) {
            gather_case<float>(vocab, 5, 1.0f, true);
            gather_case<float>(vocab, 5, 0.7f, false);
            gather_case<bf16>(vocab, 5, 0.7f, true);
        }
        for (size_t vocab : {12, 1004}) {
            gather_case<float>(vocab, 5, 1.3f, true);
            gather_case<float>(vocab, 3, 1.0f, false);
        }
        std::vector<size_t> big;
        for (size_t i = 0; i < 64; ++i) big.push_back((i * 97 + 13) % 385);
        std::vector<size_t> huge(1100, 300);  // 330000 tokens: 1024 blocks, the grid-stride loop iterates
        for (auto& lengths : {std::vector<size_t>{3, 0, 7, 1, 33, 12}, std::vector<size_t>{1}, big, std::vector<size_t>{0}})
            for (LossType lt : {GRPO, DAPO, DRGRPO}) {
                uint64_t seed = lengths.size();
                grpo_case(lengths, {lt, 0.0, 0.2, -1, false, 384}, false, false, seed);
                grpo_case(lengths, {lt, 0.0, 0.2, -1, false, 384}, true, false, seed);
                grpo_case(lengths, {lt, 0.04, 0.2, 0.28, false, 384}, true, true, seed);
                grpo_case(lengths, {lt, 0.1, 0.2, -1, true, 384}, true, true, seed);
                grpo_case(lengths, {lt, 0.0, 0.2, -1, false, 384}, false, true, seed);
                grpo_case(lengths, {lt, 0.5, 0.2, 0.28, false, 384}, false, true, seed);
            }
        grpo_case(huge, {DAPO, 0.04, 0.2, 0.28, false, 384}, true, true, 9);
        const size_t lc[][4] = {{1, 123, 45, 1}, {7, 896, 896, 16}, {33, 896, 123, 16}, {600, 123, 64, 4}, {1100, 96, 40, 16},
                                {5000, 37, 33, 8}, {70, 33, 1000, 64}, {3, 5, 7, 2}};
        for (auto& c : lc) lora_case(c[0], c[1], c[2], c[3]);
        // 8, 896, 1000 (125 vectors: idle lanes), 3584, 4096 (512 threads): the vector path;
        // 4104 (513 vectors), 1, 123, 4097: the strided scalar path.
        for (size_t dim : {1, 8, 123, 896, 1000, 3584, 4096, 4097, 4104})
            for (size_t rows : {1, 16, 17, 33}) rmsnorm_bwd_case(rows, dim, true, false);
        rmsnorm_bwd_case(33, 896, false, false);
        rmsnorm_bwd_case(33, 896, true, true);
        rmsnorm_bwd_case(0, 896, true, false);
        rmsnorm_bwd_case(17, 896, true, false, 1);  // misaligned: scalar path, 128-thread blocks
        rmsnorm_bwd_case(17, 896, true, true, 1);
        for (auto ri : {std::pair<size_t, size_t>{1, 123}, {33, 4864}, {3, 1}, {5, 12}, {1, 24}, {7, 896}})
            swiglu_bwd_case(ri.first, ri.second);
        for (auto c : {std::array<size_t, 3>{14, 2, 64}, {32, 8, 64}, {28, 4, 128}, {3, 1, 16}, {6, 2, 36}, {3, 1, 2}})
            for (size_t rows : {1, 5, 33}) rope_bwd_case(c[0], c[1], c[2], rows);
        for (size_t n : {1, 1000, 1234567}) grad_norm_case(n);
        adamw_case(0.0, 0.0f);
        adamw_case(0.1, 1e6f);
    }
    return finish("train");
}
