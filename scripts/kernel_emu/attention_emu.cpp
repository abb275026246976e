// kernels/attention.cu under the emulator (see run.sh): kv_cache_append, decode attention over
// fixed partitions (the last partition block merging), prefill attention, over a paged cache with scrambled pages (garbage
// in every unused slot) or a contiguous one, launched as src/cuda/rollout.rs does (grids, 4-warp
// blocks, dynamic shared memory, partition count from decode_partitions(min(max_len, cap))),
// against src/cpu/model.rs::attend (f32) with tests/cuda_rollout_kernels.rs's tolerances (atol
// 2e-5, rtol 2^-8; the append exact). Decode also checks the batch-invariance contract bit for bit
// (grid sized for the batch, the whole cache, 10× past it, each sequence alone) and the NaN of a
// sequence the grid does not cover.
#include "emu.h"
#include "attention.inc"
#include <array>

// DECODE_PARTITION_SIZE; a harness-only case raises it to give each warp more steps than the
// tensor-core kernel's slots (a slot refilled while the other is read).
static int PART = 128;
struct Shape { int h, kv, hd, num_pages, page_size, max_pages, window; };  // window 0 = None
static int decode_partitions(int len, int window) {
    const int span = window > 0 ? std::min(len, window) : len;
    return std::max(1, (span + PART - 1) / PART);
}
static int blocks_per_seq(const Shape& s) { return s.kv * ((s.h / s.kv + ATTN_GMAX - 1) / ATTN_GMAX); }

// ---- launchers (src/cuda/rollout.rs) ----
static void kv_append(std::vector<bf16>& kc, std::vector<bf16>& vc, const std::vector<bf16>& kn, const std::vector<bf16>& vn,
                      const std::vector<int>& bt, const std::vector<int>& rs, const std::vector<int>& rp, const Shape& s) {
    const int rows = (int)rs.size();
    if (rows == 0) return;
    emu_launch(grid1(rows), row_block((size_t)s.kv * s.hd), 0, [&] {
        kv_cache_append_bf16(kc.data(), vc.data(), kn.data(), vn.data(), bt.data(), rs.data(), rp.data(), rows, s.kv, s.hd,
                             s.page_size, s.max_pages);
    });
}

static std::vector<bf16> decode(const std::vector<bf16>& q, const std::vector<bf16>& kc, const std::vector<bf16>& vc,
                                const std::vector<int>& bt, const std::vector<int>& lens, const Shape& s, int max_len) {
    const int num_seqs = (int)lens.size(), cap = s.page_size * s.max_pages;
    std::vector<bf16> out((size_t)num_seqs * s.h * s.hd, bf_nan());
    const int parts = decode_partitions(std::min(max_len, cap), s.window);
    // Scratch exactly as the *_host helper allocates it: the launcher's length when parts > 1,
    // else one (unused) slot.
    const size_t part = parts > 1 ? (size_t)num_seqs * s.h * parts : 1;
    std::vector<float> part_o(part * s.hd, NAN), part_ml(part * 2, NAN);
    // The merge's arrival counters (num_seqs, blocks per sequence), zero before and after.
    std::vector<unsigned> counters((size_t)std::max(num_seqs, 1) * blocks_per_seq(s), 0u);
    if (num_seqs == 0) return out;
    const float scale = 1.0f / std::sqrt((float)s.hd);
    const int part_i = PART;
    // The launcher's choice: tensor cores (the kernel compiled for the next of 64, 128, 256) when
    // hd % 8 == 0, else the CUDA-core kernel; HD 128's and 256's > 48 KiB are opted in at load.
    const emu_dim3 grid = grid1(num_seqs, blocks_per_seq(s), parts);
    auto args = [&](auto kernel) {
        return [&, kernel] {
            kernel(out.data(), part_o.data(), part_ml.data(), counters.data(), q.data(), kc.data(), vc.data(), bt.data(), lens.data(), s.h, s.kv,
                   s.hd, s.page_size, s.max_pages, s.window, part_i, scale);
        };
    };
    if (s.hd % 8 != 0) {
        emu_launch(grid, ATTN_WARPS * 32, (size_t)ATTN_WARPS * ATTN_GMAX * (s.hd + 2) * 4, args(attention_decode_simt_bf16));
    } else if (s.hd <= 64) {
        emu_launch(grid, ATTN_WARPS * 32, DECODE_MMA_SMEM(64), args(attention_decode_hd64_bf16));
    } else if (s.hd <= 128) {
        emu_launch(grid, ATTN_WARPS * 32, DECODE_MMA_SMEM(128), args(attention_decode_hd128_bf16), DECODE_MMA_SMEM(128));
    } else {
        emu_launch(grid, ATTN_WARPS * 32, DECODE_MMA_SMEM(256), args(attention_decode_hd256_bf16), DECODE_MMA_SMEM(256));
    }
    for (size_t i = 0; i < counters.size(); ++i)
        if (counters[i] != 0) { printf("  decode: counter %zu = %u after the launch\n", i, counters[i]); ++g_bad; break; }
    return out;
}

static std::vector<bf16> prefill(const std::vector<bf16>& q, const std::vector<bf16>& kc, const std::vector<bf16>& vc,
                                 const std::vector<int>& bt, const std::vector<int>& cu, const std::vector<int>& pos0, const Shape& s) {
    const int num_seqs = (int)pos0.size();
    std::vector<bf16> out(q.size(), bf_nan());
    int max_rows = 0;
    for (int i = 0; i < num_seqs; ++i) max_rows = std::max(max_rows, cu[i + 1] - cu[i]);
    if (num_seqs == 0 || max_rows == 0) return out;
    const float scale = 1.0f / std::sqrt((float)s.hd);
    const size_t smem = PREFILL_BK * 8 + ((size_t)PREFILL_BQ * s.hd + PREFILL_BK * (s.hd + 2) + PREFILL_BK * s.hd) * 2;
    emu_launch(grid1((max_rows + PREFILL_BQ - 1) / PREFILL_BQ, s.h, num_seqs), ATTN_WARPS * 32, smem, [&] {
        attention_prefill_bf16(out.data(), q.data(), kc.data(), vc.data(), bt.data(), cu.data(), pos0.data(), s.h, s.kv, s.hd,
                               s.page_size, s.max_pages, s.window, scale);
    });
    return out;
}

// ---- reference: src/cpu/model.rs::attend, f32, one query row over a sequence's contiguous k, v ----
static void attend(const float* q, const std::vector<float>& k, const std::vector<float>& v, int kvh, int nkv, int hd, int pos,
                   int window, double* out) {
    const int start = (window > 0 && pos + 1 > window) ? pos + 1 - window : 0;
    const float scale = 1.0f / std::sqrt((float)hd);
    const int kvd = nkv * hd;
    std::vector<float> sc;
    for (int t = start; t <= pos; ++t) {
        float d = 0;
        for (int i = 0; i < hd; ++i) d += q[i] * k[(size_t)t * kvd + kvh * hd + i];
        sc.push_back(d * scale);
    }
    float m = -INFINITY, z = 0;
    for (float x : sc) m = std::max(m, x);
    for (float& x : sc) { x = expf(x - m); z += x; }
    for (float& x : sc) x /= z;
    std::vector<float> o(hd, 0.0f);
    for (int t = start; t <= pos; ++t)
        for (int i = 0; i < hd; ++i) o[i] += sc[t - start] * v[(size_t)t * kvd + kvh * hd + i];
    for (int i = 0; i < hd; ++i) out[i] = o[i];
}

// A cache holding sequence s's rows seq_k[s] (len_s × KV·hd): pages handed out scrambled,
// page_size 16 (or contiguous: page_size = cap, block_table[s] = s), unused slots ±1e3.
static void build_cache(const std::vector<std::vector<float>>& sk, const std::vector<std::vector<float>>& sv, Shape& s, int cap,
                        bool contiguous, std::vector<float>& kc, std::vector<float>& vc, std::vector<int>& bt) {
    const int n = (int)sk.size();
    s.page_size = contiguous ? cap : 16;
    s.max_pages = contiguous ? 1 : (cap + 15) / 16;
    s.num_pages = n * s.max_pages + 3;
    const int width = s.kv * s.hd;
    bt.assign((size_t)n * s.max_pages, 0);
    for (size_t i = 0; i < bt.size(); ++i) bt[i] = contiguous ? (int)i : (int)((i * 37 + 5) % bt.size()) + 3;
    kc.assign((size_t)s.num_pages * s.page_size * width, 1e3f);
    vc.assign(kc.size(), -1e3f);
    for (int q = 0; q < n; ++q)
        for (size_t t = 0; t < sk[q].size() / width; ++t) {
            const size_t at = ((size_t)bt[q * s.max_pages + t / s.page_size] * s.page_size + t % s.page_size) * width;
            std::copy(sk[q].begin() + t * width, sk[q].begin() + (t + 1) * width, kc.begin() + at);
            std::copy(sv[q].begin() + t * width, sv[q].begin() + (t + 1) * width, vc.begin() + at);
        }
}

static std::string shape_str(const Shape& s, bool contiguous) {
    char b[160];
    snprintf(b, sizeof b, "h %d kv %d hd %d window %d %s", s.h, s.kv, s.hd, s.window, contiguous ? "contiguous" : "paged");
    return b;
}

static void decode_case(int h, int kv, int hd, int window, bool contiguous, const std::vector<int>& lens, bool invariance) {
    Shape s{h, kv, hd, 0, 0, 0, window};
    const int cap = 400, width = kv * hd, n = (int)lens.size();
    Rng rng(h * 1000 + hd * 10 + window + contiguous);
    std::vector<std::vector<float>> sk, sv;
    for (int l : lens) { sk.push_back(bfr(rng.vec((size_t)l * width, -1, 1))); sv.push_back(bfr(rng.vec((size_t)l * width, -1, 1))); }
    auto q = bfr(rng.vec((size_t)n * h * hd, -4, 4));
    std::vector<float> kcf, vcf; std::vector<int> bt;
    build_cache(sk, sv, s, cap, contiguous, kcf, vcf, bt);
    const std::vector<bf16> kc = to_bf(kcf), vc = to_bf(vcf), qb = to_bf(q);
    std::vector<double> want((size_t)n * h * hd, 0.0);
    for (int i = 0; i < n; ++i)
        if (lens[i] > 0)
            for (int hh = 0; hh < h; ++hh)
                attend(&q[((size_t)i * h + hh) * hd], sk[i], sv[i], hh / (h / kv), kv, hd, lens[i] - 1, window, &want[((size_t)i * h + hh) * hd]);
    const std::string what = "decode " + shape_str(s, contiguous);
    const auto batch = decode(qb, kc, vc, bt, lens, s, cap);
    check(what, want, from_bf(batch), 2e-5, 1.0 / 256);
    if (!invariance) return;
    const int span = s.page_size * s.max_pages;
    check_bits(what + ": grid for the whole cache", batch, decode(qb, kc, vc, bt, lens, s, span));
    check_bits(what + ": grid 10x past the cache", batch, decode(qb, kc, vc, bt, lens, s, 10 * span));
    const size_t wq = (size_t)h * hd;
    for (int i = 0; i < n; ++i) {
        std::vector<bf16> qi(qb.begin() + i * wq, qb.begin() + (i + 1) * wq);
        std::vector<int> bti(bt.begin() + (size_t)i * s.max_pages, bt.begin() + (size_t)(i + 1) * s.max_pages);
        const auto alone = decode(qi, kc, vc, bti, {lens[i]}, s, lens[i]);
        check_bits(what + ": sequence " + std::to_string(i) + " alone", std::vector<bf16>(batch.begin() + i * wq, batch.begin() + (i + 1) * wq), alone);
    }
    // A grid of one partition: covered sequences unchanged, the others NaN.
    const auto small = decode(qb, kc, vc, bt, lens, s, 1);
    for (int i = 0; i < n; ++i) {
        std::vector<bf16> a(batch.begin() + i * wq, batch.begin() + (i + 1) * wq), b(small.begin() + i * wq, small.begin() + (i + 1) * wq);
        if (decode_partitions(lens[i], window) > 1) {
            bool all_nan = true;
            for (auto x : b) all_nan &= std::isnan(__bfloat162float(x));
            expect(all_nan, what + ": sequence " + std::to_string(i) + " not covered by a 1-partition grid must be NaN");
        } else {
            check_bits(what + ": sequence " + std::to_string(i) + " covered by a 1-partition grid", a, b);
        }
    }
}

// Sequences with a cached prefix (pos0) and new rows appended by kv_cache_append, then prefill.
static void prefill_case(int h, int kv, int hd, int window, const std::vector<std::pair<int, int>>& spans) {
    Shape s{h, kv, hd, 0, 0, 0, window};
    const int cap = 400, width = kv * hd, n = (int)spans.size();
    Rng rng(h * 1000 + hd * 10 + window + 7);
    std::vector<std::vector<float>> fk, fv, pk, pv;
    for (auto [p0, m] : spans) {
        fk.push_back(bfr(rng.vec((size_t)(p0 + m) * width, -1, 1)));
        fv.push_back(bfr(rng.vec((size_t)(p0 + m) * width, -1, 1)));
        pk.emplace_back(fk.back().begin(), fk.back().begin() + (size_t)p0 * width);
        pv.emplace_back(fv.back().begin(), fv.back().begin() + (size_t)p0 * width);
    }
    std::vector<float> kcf, vcf, wkc, wvc; std::vector<int> bt, bt2;
    build_cache(pk, pv, s, cap, false, kcf, vcf, bt);
    std::vector<float> kn, vn; std::vector<int> rs, rp, cu{0}, pos0;
    for (int i = 0; i < n; ++i) {
        auto [p0, m] = spans[i];
        kn.insert(kn.end(), fk[i].begin() + (size_t)p0 * width, fk[i].end());
        vn.insert(vn.end(), fv[i].begin() + (size_t)p0 * width, fv[i].end());
        for (int r = 0; r < m; ++r) { rs.push_back(i); rp.push_back(p0 + r); }
        cu.push_back(cu.back() + m);
        pos0.push_back(p0);
    }
    // Two more rows whose position is outside the cache: the append must skip them.
    std::vector<bf16> kcb = to_bf(kcf), vcb = to_bf(vcf);
    std::vector<float> kn2 = kn, vn2 = vn;
    std::vector<int> rs2 = rs, rp2 = rp;
    for (int pos : {-1, s.page_size * s.max_pages}) {
        rs2.push_back(0); rp2.push_back(pos);
        for (int i = 0; i < width; ++i) { kn2.push_back(7.0f); vn2.push_back(7.0f); }
    }
    kv_append(kcb, vcb, to_bf(kn2), to_bf(vn2), bt, rs2, rp2, s);
    Shape s2 = s;
    build_cache(fk, fv, s2, cap, false, wkc, wvc, bt2);
    const std::string what = shape_str(s, false);
    check("kv append k " + what, to_d(wkc), from_bf(kcb), 0, 0);
    check("kv append v " + what, to_d(wvc), from_bf(vcb), 0, 0);

    const int rows = (int)rs.size();
    auto q = bfr(rng.vec((size_t)rows * h * hd, -4, 4));
    const auto got = prefill(to_bf(q), kcb, vcb, bt, cu, pos0, s);
    std::vector<double> want((size_t)rows * h * hd);
    for (int r = 0; r < rows; ++r)
        for (int hh = 0; hh < h; ++hh)
            attend(&q[((size_t)r * h + hh) * hd], fk[rs[r]], fv[rs[r]], hh / (h / kv), kv, hd, rp[r], window, &want[((size_t)r * h + hh) * hd]);
    check("prefill " + what, want, from_bf(got), 2e-5, 1.0 / 256);
}

int main(int argc, char** argv) {
    parse_args(argc, argv);
    // Lengths: 1, one partial partition, 3 partitions, exactly 1 and 2 partitions (+1), empty.
    const std::vector<int> lens{1, 17, 300, 129, 128, 0};
    // Tensor-core decode at the shapes that matter (Qwen2.5-0.5B: 14/2 hd 64, group 7; group 6;
    // hd 128): lengths around a page (16) and a partition (128), one of 3 partitions, empty.
    const std::vector<int> tc_lens{1, 15, 16, 17, 127, 128, 129, 300, 0};
    decode_case(14, 2, 64, 0, false, tc_lens, true);
    decode_case(12, 2, 128, 0, false, tc_lens, true);
    prefill_case(14, 2, 64, 0, {{0, 1}, {0, 17}, {5, 40}, {300, 33}});
    if (g_full) {
        // (h, kv, hd): hd 16 and 36 (lanes beyond hd), 32·E vector loads (32, 64, 128, 256),
        // hd 100 (E = 4, partial), group 16 (two full 8-head sub-groups), group 12 (8 + 4), MHA.
        const int shapes[][3] = {{4, 2, 16}, {6, 2, 36}, {8, 8, 32}, {16, 1, 128}, {12, 4, 100}, {2, 1, 256}, {24, 2, 64}};
        for (auto& c : shapes)
            for (int window : {0, 100}) decode_case(c[0], c[1], c[2], window, false, lens, c[2] == 36 || c[2] == 128);
        decode_case(14, 2, 64, 100, true, lens, true);
        for (int window : {0, 100, 16})
            for (auto& c : {std::array<int, 3>{14, 2, 64}, {12, 2, 64}, {14, 2, 128}, {12, 2, 128}})
                decode_case(c[0], c[1], c[2], window, false, tc_lens, true);
        decode_case(12, 2, 128, 100, true, tc_lens, true);
        PART = 320;  // 20 steps of 16 positions: 5 per warp
        for (int window : {0, 100}) {
            decode_case(14, 2, 64, window, false, tc_lens, true);
            decode_case(12, 2, 128, window, false, tc_lens, true);
            decode_case(4, 1, 256, window, false, tc_lens, true);
        }
        PART = 128;
        // hd % 8 == 0 below a compiled HD (q, k columns zero-padded): 40 and 72 (hd % 16 == 8),
        // 200 (HD 256); group 1 (MHA) and group 16.
        for (auto& c : {std::array<int, 3>{14, 2, 40}, {6, 6, 72}, {4, 1, 200}, {32, 2, 64}})
            for (int window : {0, 100}) decode_case(c[0], c[1], c[2], window, false, tc_lens, c[2] == 72);
        decode_case(16, 1, 128, 0, true, lens, false);
        // Windows at a partition boundary, of one position, longer than every sequence.
        for (int window : {128, 1, 1000}) decode_case(6, 2, 36, window, false, lens, window == 128);
        const std::vector<std::pair<int, int>> spans{{0, 1}, {0, 17}, {5, 40}, {300, 33}, {16, 16}, {100, 70}};
        const int pshapes[][3] = {{4, 2, 16}, {6, 2, 36}, {14, 2, 64}, {8, 8, 128}, {2, 1, 256}, {12, 4, 100}};
        for (auto& c : pshapes)
            for (int window : {0, 8, 40}) prefill_case(c[0], c[1], c[2], window, spans);
    }
    return finish("attention");
}
