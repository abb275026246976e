// Runtime of the CPU kernel emulator (see run.sh): fibers, barriers, warp collectives.
// Fiber-based block emulator: every CUDA thread of a block is a ucontext fiber on one OS thread;
// barriers yield to the scheduler, which releases a warp barrier when all 32 lanes of the warp wait
// on it and a block barrier when every live thread waits on it; anything else is a deadlock.
#include <ucontext.h>
#include <vector>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include "inc/cuda_bf16.h"
emu_dim3 threadIdx, blockIdx, blockDim, gridDim;
unsigned char emu_xchg[32][32][8];
enum Wait { RUN, WARPB, BLOCKB, DONE };
struct Fiber { ucontext_t ctx; std::vector<char> stack; Wait wait; };
static std::vector<Fiber> fibers;
static ucontext_t sched_ctx;
static int cur = -1;
static std::function<void()> body;
static void yield_wait(Wait w) { fibers[cur].wait = w; swapcontext(&fibers[cur].ctx, &sched_ctx); }
void emu_block_barrier() { yield_wait(BLOCKB); }
void emu_warp_barrier() { yield_wait(WARPB); }
static void entry() { body(); fibers[cur].wait = DONE; swapcontext(&fibers[cur].ctx, &sched_ctx); }
void emu_launch(emu_dim3 grid, int threads, const std::function<void()>& kernel) {
    gridDim = grid; blockDim = emu_dim3{(unsigned)threads, 1, 1};
    body = kernel;
    fibers.resize(threads);
    for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx = emu_dim3{bx, by, bz};
        for (int t = 0; t < threads; ++t) {
            Fiber& f = fibers[t];
            f.stack.resize(1 << 18);
            getcontext(&f.ctx);
            f.ctx.uc_stack.ss_sp = f.stack.data();
            f.ctx.uc_stack.ss_size = f.stack.size();
            f.ctx.uc_link = nullptr;
            makecontext(&f.ctx, entry, 0);
            f.wait = RUN;
        }
        for (;;) {
            bool ran = false;
            for (int t = 0; t < threads; ++t) {
                if (fibers[t].wait != RUN) continue;
                cur = t; threadIdx = emu_dim3{(unsigned)t, 0, 0};
                swapcontext(&sched_ctx, &fibers[t].ctx);
                ran = true;
            }
            if (ran) continue;
            bool all_done = true, progress = false;
            for (auto& f : fibers) all_done &= f.wait == DONE;
            if (all_done) break;
            for (int w = 0; w < threads / 32; ++w) {
                bool all = true;
                for (int l = 0; l < 32; ++l) all &= fibers[w * 32 + l].wait == WARPB;
                if (all) { for (int l = 0; l < 32; ++l) fibers[w * 32 + l].wait = RUN; progress = true; }
            }
            if (progress) continue;
            bool blk = true, any = false;
            for (auto& f : fibers) { blk &= f.wait == BLOCKB || f.wait == DONE; any |= f.wait == BLOCKB; }
            if (blk && any) {
                for (auto& f : fibers) if (f.wait == BLOCKB) f.wait = RUN;
                // A block barrier after some threads exited: legal CUDA, but these kernels never
                // do it (their early exits are block-uniform), so it means a bug.
                for (auto& f : fibers) if (f.wait == DONE) { fprintf(stderr, "barrier after partial exit in block (%u,%u,%u)\n", bx, by, bz); abort(); }
                continue;
            }
            fprintf(stderr, "DEADLOCK in block (%u,%u,%u)\n", bx, by, bz);
            for (int t = 0; t < threads; ++t) fprintf(stderr, "%d:%d ", t, fibers[t].wait);
            fprintf(stderr, "\n");
            abort();
        }
    }
}
// mma.m16n8k16 row.col bf16 → f32, from the PTX ISA fragment layout.
void at_mma_emu(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    static uint32_t A[32][32][4], B[32][32][2];
    const int lane = threadIdx.x % 32, w = threadIdx.x / 32;
    for (int i = 0; i < 4; ++i) A[w][lane][i] = a[i];
    B[w][lane][0] = b0; B[w][lane][1] = b1;
    emu_warp_barrier();
    auto lo = [](uint32_t r) { return __bfloat162float(__nv_bfloat16{(uint16_t)(r & 0xffff)}); };
    auto hi = [](uint32_t r) { return __bfloat162float(__nv_bfloat16{(uint16_t)(r >> 16)}); };
    float Am[16][16], Bm[16][8];
    for (int L = 0; L < 32; ++L) {
        const int g = L / 4, t = L % 4;
        Am[g][2 * t] = lo(A[w][L][0]);     Am[g][2 * t + 1] = hi(A[w][L][0]);
        Am[g + 8][2 * t] = lo(A[w][L][1]); Am[g + 8][2 * t + 1] = hi(A[w][L][1]);
        Am[g][2 * t + 8] = lo(A[w][L][2]); Am[g][2 * t + 9] = hi(A[w][L][2]);
        Am[g + 8][2 * t + 8] = lo(A[w][L][3]); Am[g + 8][2 * t + 9] = hi(A[w][L][3]);
        Bm[2 * t][g] = lo(B[w][L][0]);     Bm[2 * t + 1][g] = hi(B[w][L][0]);
        Bm[2 * t + 8][g] = lo(B[w][L][1]); Bm[2 * t + 9][g] = hi(B[w][L][1]);
    }
    const int g = lane / 4, t = lane % 4;
    float out[4];
    for (int e = 0; e < 4; ++e) {
        const int row = g + (e >= 2 ? 8 : 0), col = 2 * t + (e & 1);
        float acc = d[e];
        for (int k = 0; k < 16; ++k) acc += Am[row][k] * Bm[k][col];
        out[e] = acc;
    }
    emu_warp_barrier();
    for (int e = 0; e < 4; ++e) d[e] = out[e];
}
// ldmatrix.m8n8.x4 (.trans): lane L gives row L%8 of matrix L/8; register i of lane (g, t) gets
// matrix i's (row g, cols 2t, 2t+1), or transposed (rows 2t, 2t+1, col g).
void at_ldsm_emu(uint32_t (&r)[4], const __nv_bfloat16* p, bool trans) {
    static const __nv_bfloat16* P[32][32];
    const int lane = threadIdx.x % 32, w = threadIdx.x / 32;
    if (((uintptr_t)p & 15) != 0) { fprintf(stderr, "ldmatrix row address not 16-byte aligned\n"); abort(); }
    P[w][lane] = p;
    emu_warp_barrier();
    const int g = lane / 4, t = lane % 4;
    for (int i = 0; i < 4; ++i) {
        uint16_t lo, hi;
        if (!trans) { lo = P[w][i * 8 + g][2 * t].x; hi = P[w][i * 8 + g][2 * t + 1].x; }
        else { lo = P[w][i * 8 + 2 * t][g].x; hi = P[w][i * 8 + 2 * t + 1][g].x; }
        r[i] = (uint32_t)lo | ((uint32_t)hi << 16);
    }
    emu_warp_barrier();
}
