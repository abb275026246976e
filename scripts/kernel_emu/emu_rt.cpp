// Runtime of the CPU kernel emulator (see run.sh): fibers, barriers, warp collectives.
// Every CUDA thread of a block is a fiber on one OS thread. Barriers yield to the scheduler, which
// runs the runnable fibers in a fresh pseudo-random order each round (so a missing barrier shows
// up as a wrong result: some reader runs before its writer), releases a warp barrier when all 32
// lanes of the warp wait on it with the same tag (at random a round late, so that warps drift
// apart as on the GPU; and after a block barrier, at random, one warp only once every other
// thread waits at the next one), and a block barrier when every live thread waits
// on it; anything else is a deadlock, a divergent warp collective, or a barrier after a partial
// exit, and aborts with the block's coordinates.
#include <vector>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include "inc/cuda_bf16.h"
#include "emu.h"
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#include <sanitizer/asan_interface.h>
#define EMU_ASAN 1
#endif

emu_dim3 threadIdx, blockIdx, blockDim, gridDim;
unsigned char emu_xchg[32][32][8];
unsigned char* emu_dyn_smem = nullptr;

// Context switch: x86-64 saves the callee-saved registers on the old stack and swaps stack
// pointers (~100× cheaper than swapcontext, which makes a signal-mask syscall every switch).
#if defined(__x86_64__)
extern "C" void emu_switch(void** save_sp, void* to_sp);
asm(".text\n.globl emu_switch\n.type emu_switch,@function\nemu_switch:\n"
    "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
    "  movq %rsp, (%rdi)\n  movq %rsi, %rsp\n"
    "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n  ret\n");
#else
#error "scripts/kernel_emu: emu_switch is written for x86-64"
#endif

enum Wait { RUN, WARPB, BLOCKB, DONE };
struct Fiber { char* stack; void* sp; Wait wait; unsigned tag; };
static const size_t STACK = 1 << 18;
static std::vector<Fiber> fibers;  // grows to the largest block; the first nthr are this launch's
static int nthr;
static void* sched_sp;
static int cur = -1;
static const std::function<void()>* body;
static std::vector<int> preds;
static std::vector<std::pair<void*, size_t>>& shared_regs() { static std::vector<std::pair<void*, size_t>> r; return r; }
emu_shared_reg::emu_shared_reg(void* p, size_t bytes) { memset(p, 0xff, bytes); shared_regs().push_back({p, bytes}); }
#ifdef EMU_ASAN
static const void* sched_bottom;
static size_t sched_size;
#endif

static void to_fiber(int t) {
#ifdef EMU_ASAN
    void* fake;
    __sanitizer_start_switch_fiber(&fake, fibers[t].stack, STACK);
    emu_switch(&sched_sp, fibers[t].sp);
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
    emu_switch(&sched_sp, fibers[t].sp);
#endif
}
static void to_scheduler(bool dying) {
#ifdef EMU_ASAN
    void* fake;
    __sanitizer_start_switch_fiber(dying ? nullptr : &fake, sched_bottom, sched_size);
    emu_switch(&fibers[cur].sp, sched_sp);
    __sanitizer_finish_switch_fiber(fake, &sched_bottom, &sched_size);
#else
    (void)dying;
    emu_switch(&fibers[cur].sp, sched_sp);
#endif
}
static void fiber_main() {
#ifdef EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &sched_bottom, &sched_size);
#endif
    (*body)();
    fibers[cur].wait = DONE;
    to_scheduler(true);
    abort();  // never resumed
}
static void yield_wait(Wait w, unsigned tag) { fibers[cur].wait = w; fibers[cur].tag = tag; to_scheduler(false); }
void emu_block_barrier() { yield_wait(BLOCKB, 0); }
void emu_warp_barrier(unsigned tag) { yield_wait(WARPB, tag); }
int emu_syncthreads_or(int pred) {
    preds[threadIdx.x] = pred != 0;
    emu_block_barrier();
    int r = 0;
    for (unsigned t = 0; t < blockDim.x; ++t) r |= preds[t];
    emu_block_barrier();
    return r;
}

[[noreturn]] static void fail(const char* what) {
    fprintf(stderr, "%s in block (%u,%u,%u); thread states (0 run, 1 warp barrier, 2 block barrier, 3 exited):\n",
            what, blockIdx.x, blockIdx.y, blockIdx.z);
    for (int t = 0; t < nthr; ++t) fprintf(stderr, "%d:%d ", t, fibers[t].wait);
    fprintf(stderr, "\n");
    abort();
}

static uint64_t skew_rng = 0xD1B54A32D192ED03ull;
static unsigned skew_rand() { skew_rng ^= skew_rng << 13; skew_rng ^= skew_rng >> 7; skew_rng ^= skew_rng << 17; return (unsigned)(skew_rng >> 32); }
static std::vector<int> ready;  // warps whose lanes all wait at a warp barrier
static uint64_t order_rng = 0x9E3779B97F4A7C15ull;
static unsigned next_rand() { order_rng ^= order_rng << 13; order_rng ^= order_rng >> 7; order_rng ^= order_rng << 17; return (unsigned)(order_rng >> 32); }

// Asynchronous cp.async (emu.h): per thread of the block, its uncommitted copies and its committed
// groups, oldest first. Copy decisions draw from their own generator so that the scheduling order
// of kernels without cp.async stays what it was.
struct CpaCopy { unsigned char* dst; unsigned char data[16]; int bytes; };
struct CpaThread { std::vector<CpaCopy> open; std::vector<std::vector<CpaCopy>> groups; };
static std::vector<CpaThread> cpa;
static size_t dyn_smem_bytes = 0;
static uint64_t cpa_rng = 0x2545F4914F6CDD1Dull;
static bool cpa_coin() { cpa_rng ^= cpa_rng << 13; cpa_rng ^= cpa_rng >> 7; cpa_rng ^= cpa_rng << 17; return (cpa_rng >> 40) & 1; }
static void cpa_fail(const char* what) {
    fprintf(stderr, "cp.async: %s (thread %d, block (%u,%u,%u))\n", what, cur, blockIdx.x, blockIdx.y, blockIdx.z);
    abort();
}
void emu_cpa_issue(void* dst, const void* src, int bytes, int src_bytes) {
    if ((bytes != 4 && bytes != 8 && bytes != 16) || (src_bytes != 0 && src_bytes != bytes)) cpa_fail("bad size or src-size");
    if (((uintptr_t)dst % bytes) || ((uintptr_t)src % bytes)) cpa_fail("misaligned address");
    unsigned char* d = (unsigned char*)dst;
    if (d < emu_dyn_smem || d + bytes > emu_dyn_smem + dyn_smem_bytes) cpa_fail("destination outside the dynamic shared memory");
    CpaCopy c;
    c.dst = d;
    c.bytes = bytes;
    memset(c.data, 0, sizeof c.data);
    if (src_bytes) memcpy(c.data, src, src_bytes);  // the source is read now (ASan checks it here)
    if (cpa_coin()) memcpy(d, c.data, bytes);       // landed at once
    else cpa[cur].open.push_back(c);                // lands when the thread waits for it
}
void emu_cpa_commit() {
    CpaThread& t = cpa[cur];
    t.groups.push_back(std::move(t.open));
    t.open.clear();
}
void emu_cpa_wait(int n) {
    CpaThread& t = cpa[cur];
    while ((int)t.groups.size() > n) {
        for (const CpaCopy& c : t.groups.front()) memcpy(c.dst, c.data, c.bytes);
        t.groups.erase(t.groups.begin());
    }
}

void emu_launch(emu_dim3 grid, int threads, size_t smem, const std::function<void()>& kernel, size_t smem_limit) {
    if (threads <= 0 || threads > 1024 || threads % 32 != 0) { fprintf(stderr, "launch: block of %d threads (need 32k ≤ 1024)\n", threads); abort(); }
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
        fprintf(stderr, "launch: invalid grid (%u,%u,%u)\n", grid.x, grid.y, grid.z);
        abort();
    }
    if (smem > smem_limit) { fprintf(stderr, "launch: %zu bytes of dynamic shared memory > %zu\n", smem, smem_limit); abort(); }
    // Exactly the launch's dynamic shared memory, so ASan sees an overrun; refilled with 0xff
    // (NaN as f32) for every block, as is every static __shared__ variable seen so far, so a read
    // of a slot no thread of the block wrote shows up.
    std::vector<unsigned char> smem_buf(smem);
    emu_dyn_smem = smem_buf.data();
    dyn_smem_bytes = smem;
    gridDim = grid; blockDim = emu_dim3{(unsigned)threads, 1, 1};
    body = &kernel;
    if (fibers.size() < (size_t)threads) {
        size_t old = fibers.size();
        fibers.resize(threads);
        for (size_t t = old; t < fibers.size(); ++t) fibers[t].stack = (char*)malloc(STACK);
    }
    nthr = threads;
    preds.assign(threads, 0);
    std::vector<int> order(threads);
    for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx = emu_dim3{bx, by, bz};
        if (smem) memset(emu_dyn_smem, 0xff, smem);
        cpa.assign(threads, CpaThread());
        for (auto& r : shared_regs()) memset(r.first, 0xff, r.second);
        for (int t = 0; t < threads; ++t) {
            // Fresh stack: [6 callee-saved registers][fiber_main][fake return address], 16-aligned
            // so that fiber_main starts as if called.
#ifdef EMU_ASAN
            // A finished fiber never returned from fiber_main and the scheduler switch below it,
            // so their stack redzones are still poisoned; a new fiber on the same stack (another
            // block, another kernel with a different frame layout) would trip over them.
            __asan_unpoison_memory_region(fibers[t].stack, STACK);
#endif
            void** sp = (void**)(((uintptr_t)(fibers[t].stack + STACK) & ~(uintptr_t)15) - 64);
            for (int i = 0; i < 6; ++i) sp[i] = nullptr;
            sp[6] = (void*)&fiber_main;
            sp[7] = nullptr;
            fibers[t].sp = sp;
            fibers[t].wait = RUN;
        }
        // Held warp: after the block's start and each block barrier, at random one warp runs
        // only once no other thread can move (all at the next block barrier, or exited). A warp
        // that reads what another writes after the same barrier, with no barrier between (a
        // missing one), then reads it unwritten.
        auto pick_held = [&] { return threads > 32 && skew_rand() % 2 ? (int)(skew_rand() % (threads / 32)) : -1; };
        int held = pick_held();
        for (;;) {
            bool ran = false;
            for (int t = 0; t < threads; ++t) order[t] = t;
            for (int t = threads - 1; t > 0; --t) std::swap(order[t], order[next_rand() % (t + 1)]);
            for (int t : order) {
                if (fibers[t].wait != RUN || t / 32 == held) continue;
                cur = t; threadIdx = emu_dim3{(unsigned)t, 0, 0};
                to_fiber(t);
                ran = true;
            }
            if (ran) continue;
            bool all_done = true, progress = false;
            for (int t = 0; t < threads; ++t) all_done &= fibers[t].wait == DONE;
            if (all_done) {
                for (int t = 0; t < threads; ++t) {
                    size_t pending = cpa[t].open.size();
                    for (auto& g : cpa[t].groups) pending += g.size();
                    if (pending) { cur = t; cpa_fail("copies still in flight (never waited for) at the end of the block"); }
                }
                break;
            }
            // Warps whose 32 lanes all wait at a warp barrier are released, each but one at random
            // held back a round now and then: warps drift apart between block barriers, as on the
            // GPU, so that one warp writing shared memory that another still reads (a missing
            // block barrier) shows up even where every warp runs the same collectives.
            ready.clear();
            for (int w = 0; w < threads / 32; ++w) {
                Fiber* lanes = &fibers[w * 32];
                bool all = true;
                for (int l = 0; l < 32; ++l) all &= lanes[l].wait == WARPB;
                if (!all) continue;
                for (int l = 0; l < 32; ++l)
                    if (lanes[l].tag != lanes[0].tag) fail("divergent warp collective (lanes at different shuffles)");
                ready.push_back(w);
            }
            if (!ready.empty()) {
                const int keep = ready[skew_rand() % ready.size()];  // always released: progress
                for (int w : ready) {
                    if (w != keep && skew_rand() % 4 == 0) continue;
                    for (int l = 0; l < 32; ++l) fibers[w * 32 + l].wait = RUN;
                }
                progress = true;
            }
            if (progress) continue;
            if (held >= 0) { held = -1; continue; }
            bool blk = true, any = false, exited = false;
            for (int t = 0; t < threads; ++t) {
                const Wait w = fibers[t].wait;
                blk &= w == BLOCKB || w == DONE; any |= w == BLOCKB; exited |= w == DONE;
            }
            // A block barrier after some threads exited is legal CUDA, but these kernels never do
            // it (their early exits are block-uniform), so it means a bug.
            if (blk && any && exited) fail("barrier after partial exit");
            if (blk && any) { for (int t = 0; t < threads; ++t) fibers[t].wait = RUN; held = pick_held(); continue; }
            fail("DEADLOCK");
        }
    }
    emu_dyn_smem = nullptr;
    dyn_smem_bytes = 0;
}

// mma.m16n8k16 row.col bf16 → f32, from the PTX ISA fragment layout.
void at_mma_emu(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    static uint32_t A[32][32][4], B[32][32][2];
    const int lane = threadIdx.x % 32, w = threadIdx.x / 32;
    for (int i = 0; i < 4; ++i) A[w][lane][i] = a[i];
    B[w][lane][0] = b0; B[w][lane][1] = b1;
    emu_warp_barrier(1);
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
    emu_warp_barrier(1);
    for (int e = 0; e < 4; ++e) d[e] = out[e];
}
// ldmatrix.m8n8.x4 (.trans): lane L gives row L%8 of matrix L/8; register i of lane (g, t) gets
// matrix i's (row g, cols 2t, 2t+1), or transposed (rows 2t, 2t+1, col g).
void at_ldsm_emu(uint32_t (&r)[4], const __nv_bfloat16* p, bool trans) {
    static const __nv_bfloat16* P[32][32];
    const int lane = threadIdx.x % 32, w = threadIdx.x / 32;
    if (((uintptr_t)p & 15) != 0) { fprintf(stderr, "ldmatrix row address not 16-byte aligned\n"); abort(); }
    P[w][lane] = p;
    emu_warp_barrier(trans ? 3 : 2);
    const int g = lane / 4, t = lane % 4;
    for (int i = 0; i < 4; ++i) {
        uint16_t lo, hi;
        if (!trans) { lo = P[w][i * 8 + g][2 * t].x; hi = P[w][i * 8 + g][2 * t + 1].x; }
        else { lo = P[w][i * 8 + 2 * t][g].x; hi = P[w][i * 8 + 2 * t + 1][g].x; }
        r[i] = (uint32_t)lo | ((uint32_t)hi << 16);
    }
    emu_warp_barrier(trans ? 3 : 2);
}
