// kernels/convert.cu under the emulator (see run.sh): cast_f32_to_bf16 launched as
// src/cuda/train.rs::cast_f32_to_bf16 (ew_vec_grid: clamp(ceil(ceil(n/8)/256), 1, 65535) blocks of
// 256, grid-stride, 8 elements per thread per step; also on buffers offset by one element: the
// scalar path),
// against round-to-nearest-even computed independently here (in f64: the bf16 neighbours of x and
// the tie rule), exact, NaN staying NaN.
#include "emu.h"
#include "convert.inc"

// The bf16 nearest to x, ties to even, overflow to ±inf (x finite), from the two candidates.
static float rne_bf16(float x) {
    if (std::isnan(x) || std::isinf(x)) return x;
    uint32_t u; memcpy(&u, &x, 4);
    uint32_t lo_bits = u & 0xffff0000u, hi_bits = lo_bits + 0x10000u;  // truncation and next (away from 0)
    float lo, hi; memcpy(&lo, &lo_bits, 4); memcpy(&hi, &hi_bits, 4);
    const double dl = std::fabs((double)x - lo), dh = std::fabs((double)hi - x);  // hi may be ±inf: dh = inf
    if (dl < dh) return lo;
    if (dh < dl) return hi;
    return ((lo_bits >> 16) & 1) ? hi : lo;
}

// off_in, off_out: element offsets of in and out from their allocations (misaligned when odd / not 0 mod 4).
static void run(size_t n, unsigned grid, size_t off_in = 0, size_t off_out = 0) {
    Rng rng(n + grid);
    std::vector<float> in(n);
    for (size_t i = 0; i < n; ++i) {
        const uint32_t b = rng.next();
        switch (i % 4) {
            case 0: memcpy(&in[i], &b, 4); break;                       // any bit pattern
            case 1: in[i] = rng.uni(-3, 3); break;
            case 2: { uint32_t t = (b & 0xffff0000u) | 0x8000u; memcpy(&in[i], &t, 4); break; }  // exact ties
            default: in[i] = (float)(i % 7) * 1e-40f + (i % 3 ? 3.3895e38f : -3.3895e38f) * (i % 5 == 0);  // subnormals, near overflow
        }
    }
    std::vector<bf16> outb(off_out + std::max<size_t>(n, 1), bf_nan());
    bf16* out = outb.data() + off_out;
    std::vector<float> inb(off_in, NAN);
    inb.insert(inb.end(), in.begin(), in.end());
    const uint64_t n64 = n;
    if (n) emu_launch(grid1(grid ? grid : std::min<size_t>(std::max<size_t>(((n + 7) / 8 + 255) / 256, 1), 65535)), 256, 0,
                      [&] { cast_f32_to_bf16(out, inb.data() + off_in, n64); });
    size_t bad = 0;
    for (size_t i = 0; i < n; ++i) {
        const float got = __bfloat162float(out[i]), want = rne_bf16(in[i]);
        const bool ok = std::isnan(want) ? std::isnan(got) : memcmp(&got, &want, 4) == 0;
        if (!ok && bad++ < 5) printf("  cast[%zu]: %.9g -> %.9g, want %.9g\n", i, in[i], got, want);
    }
    expect(bad == 0, "cast_f32_to_bf16 n " + std::to_string(n) + " grid " + std::to_string(grid) + " offsets " +
                         std::to_string(off_in) + "/" + std::to_string(off_out));
}

int main(int argc, char** argv) {
    parse_args(argc, argv);
    run(1000, 0);
    if (g_full) {
        run(1, 0);
        run(100003, 0);
        run(100003, 3);
        for (size_t n : {7, 8, 9, 17, 4099}) run(n, 0);  // n % 8 tails, one vector, partial
        run(4099, 0, 1, 0);                               // in misaligned: scalar
        run(4099, 0, 0, 1);                               // out misaligned: scalar
        run(4099, 0, 4, 8);                               // 16-byte aligned offsets: vectors
    }
    return finish("convert");
}
