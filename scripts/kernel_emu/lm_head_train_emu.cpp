// kernels/lm_head_train.cu under the emulator (see run.sh): the online-softmax merge of the
// training lm_head's vocabulary chunks, launched as src/cuda/train.rs::launch_rows does
// (clamp(ceil(rows/256), 1, 65535) blocks of 256, grid-stride). Each chunk's statistics are what
// logprob_gather_fwd_f32 writes for the chunk (computed here in f64 and rounded to f32: lse_c,
// the chunk's entropy, logp_c = s_t − lse_c or NaN when the target is elsewhere); after merging
// every chunk in order and finishing, logp / entropy / lse / E[s] must match the one-pass f64
// values of the whole row within f32 rounding: 1e-5 absolute + 1e-5 relative (|s| ≤ 30 here;
// E[s] = lse − H carries the rounding of lse, ~4e-6 at |lse| ≈ 40).
#include "emu.h"
#include "lm_head_train.inc"

static void run(int rows, int vocab, int chunk, float spread) {
    Rng rng(rows * 7919 + vocab + chunk);
    std::vector<double> s((size_t)rows * vocab);
    std::vector<int> target(rows);
    for (auto& x : s) x = rng.uni(-spread, spread);
    for (int r = 0; r < rows; ++r) target[r] = (int)(rng.next() % vocab);
    // One-pass f64 reference.
    std::vector<double> ref_lse(rows), ref_ms(rows), ref_logp(rows), ref_ent(rows);
    for (int r = 0; r < rows; ++r) {
        const double* x = &s[(size_t)r * vocab];
        double m = -INFINITY; for (int i = 0; i < vocab; ++i) m = std::max(m, x[i]);
        double z = 0, sz = 0; for (int i = 0; i < vocab; ++i) { const double e = std::exp(x[i] - m); z += e; sz += e * x[i]; }
        ref_lse[r] = m + std::log(z); ref_ms[r] = sz / z;
        ref_logp[r] = x[target[r]] - ref_lse[r]; ref_ent[r] = ref_lse[r] - ref_ms[r];
    }
    std::vector<float> lse(rows, NAN), ms(rows, NAN), st(rows, NAN), logp(rows, NAN), ent(rows, NAN);
    const unsigned grid = (unsigned)std::min(std::max((rows + 255) / 256, 1), 65535);
    for (int v0 = 0, k = 0; v0 < vocab; v0 += chunk, ++k) {
        const int w = std::min(chunk, vocab - v0);
        std::vector<float> lse_c(rows), h_c(rows), lp_c(rows);
        for (int r = 0; r < rows; ++r) {
            const double* x = &s[(size_t)r * vocab + v0];
            double m = -INFINITY; for (int i = 0; i < w; ++i) m = std::max(m, x[i]);
            double z = 0, sz = 0; for (int i = 0; i < w; ++i) { const double e = std::exp(x[i] - m); z += e; sz += e * x[i]; }
            const double l = m + std::log(z);
            lse_c[r] = (float)l; h_c[r] = (float)(l - sz / z);
            lp_c[r] = (target[r] >= v0 && target[r] < v0 + w) ? (float)(x[target[r] - v0] - l) : NAN;
        }
        const int first = k == 0;
        emu_launch(grid1(grid), 256, 0, [&] {
            logprob_chunk_merge_f32(lse.data(), ent.data(), st.data(), lse_c.data(), h_c.data(), lp_c.data(), rows, first);
        });
    }
    emu_launch(grid1(grid), 256, 0, [&] { logprob_chunk_finish_f32(logp.data(), ms.data(), lse.data(), ent.data(), st.data(), rows); });
    const std::string tag = " rows " + std::to_string(rows) + " vocab " + std::to_string(vocab) + " chunk " + std::to_string(chunk);
    auto tol = [](const std::vector<double>& ref) { std::vector<double> t(ref.size()); for (size_t i = 0; i < t.size(); ++i) t[i] = 1e-5 + 1e-5 * std::fabs(ref[i]); return t; };
    check("lse" + tag, ref_lse, lse, tol(ref_lse), 0);
    check("mean_s" + tag, ref_ms, ms, tol(ref_ms), 0);
    check("logp" + tag, ref_logp, logp, tol(ref_logp), 0);
    check("entropy" + tag, ref_ent, ent, tol(ref_ent), 0);
}

int main(int argc, char** argv) {
    parse_args(argc, argv);
    run(37, 461, 61, 8);
    if (g_full) {
        run(37, 461, 7, 8);      // 66 chunks, the last of 6 columns
        run(300, 1000, 1000, 30); // one chunk: the merge is a copy
        run(5, 3000, 128, 30);    // peaked rows: most chunks far below the maximum
        run(1, 17, 1, 4);         // one column per chunk
    }
    return finish("lm_head_train");
}
