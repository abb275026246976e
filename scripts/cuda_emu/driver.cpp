// A CPU stand-in for libcuda and libcublas, so the Rust CUDA code (src/cuda: engine, trainer,
// launchers, memory plans, CUDA graphs, the GEMM tuner) runs end to end on a machine without a
// GPU: cudarc dlopens libcuda.so / libcublas.so by name, and run.sh puts this library first on
// LD_LIBRARY_PATH under those names. Every kernel of kernels/*.cu runs in the kernel emulator
// (../kernel_emu: each CUDA thread a fiber, barriers, shuffles, mma/ldmatrix/cp.async modelled),
// registered by name (kreg.h), so cuLaunchKernel runs the very kernel the fatbin holds; cuBLAS
// GEMMs are plain f32-accumulating loops.
//
// What it models, and checks where the real driver would fail:
//   - device memory is host memory (device pointer = host address, 256-byte aligned), filled
//     with 0xff bytes (NaN in bf16 and f32) when allocated, so a read of memory nobody wrote
//     shows up; a budget (RFT_CUDA_EMU_MEM_GIB, default 16) answers cuMemGetInfo and fails
//     allocations beyond it; every pointer argument of a launch must lie in a live allocation;
//   - one in-order queue per stream; work runs when enqueued (synchronous), which is a legal
//     schedule of a single stream;
//   - stream capture records launches, copies, memsets, GEMMs and event records into a graph,
//     replayed by cuGraphLaunch with the argument values of capture time (host sources of
//     copies are read at replay; only pinned host memory can be captured); a synchronous call during a
//     capture (cuMemAlloc, a synchronous copy, cuCtxSynchronize: in the capturing thread, or in
//     any thread while a global-mode capture runs) or waiting for the capturing stream fails
//     with CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED and invalidates the capture, as on the GPU;
//   - launch configuration: 1-D blocks of 32k ≤ 1024 threads (all rft launchers), dynamic shared
//     memory ≤ 48 KiB unless cuFuncSetAttribute raised the kernel's limit (≤ 227 KiB, sm_90);
//   - events time the host's wall clock (the GEMM tuner's choices are then arbitrary but valid).
// The device reports itself as compute capability 9.0 with RFT_CUDA_EMU_SMS (default 132) SMs.
// Not modelled: concurrency between streams, the memory model, performance. One big lock makes
// every call atomic (tests call from several threads; the emulator is single-threaded).
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "emu.h"
#include "kreg.h"

typedef int CUresult;
typedef unsigned long long CUdeviceptr;
enum : int {
    OK = 0, INVALID_VALUE = 1, OUT_OF_MEMORY = 2, INVALID_CONTEXT = 201, INVALID_HANDLE = 400,
    NOT_FOUND = 500, NOT_READY = 600, NOT_SUPPORTED = 801, CAPTURE_UNSUPPORTED = 900,
    CAPTURE_INVALIDATED = 901, CAPTURE_UNMATCHED = 903,
};
#define API extern "C" __attribute__((visibility("default")))

static std::recursive_mutex& big_lock() { static std::recursive_mutex m; return m; }
#define LOCK std::lock_guard<std::recursive_mutex> lock_(big_lock())

static double now_ms() {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
static bool trace() { static const bool t = getenv("RFT_CUDA_EMU_TRACE") != nullptr; return t; }
static size_t env_size(const char* name, size_t dflt) {
    const char* v = getenv(name);
    return v && *v ? (size_t)strtoull(v, nullptr, 10) : dflt;
}

// ---- kernels ----
struct Func { std::string name; EmuBinder binder; size_t max_dyn_smem = 48 * 1024; };
static std::map<std::string, EmuBinder>& registry() { static std::map<std::string, EmuBinder> r; return r; }
void emu_register_kernel(const char* name, EmuBinder binder) { registry()[name] = std::move(binder); }
static std::map<std::string, Func*>& funcs() { static std::map<std::string, Func*> f; return f; }

// ---- memory ----
struct Alloc { size_t bytes; bool device; };
static std::map<uintptr_t, Alloc>& allocs() { static std::map<uintptr_t, Alloc> a; return a; }
static size_t device_used = 0;
static size_t mem_budget() { return env_size("RFT_CUDA_EMU_MEM_GIB", 16) << 30; }
static const Alloc* find_alloc(uintptr_t p, uintptr_t* base) {
    auto& a = allocs();
    auto it = a.upper_bound(p);
    if (it == a.begin()) return nullptr;
    --it;
    if (p > it->first + it->second.bytes) return nullptr;  // one past the end: an empty view
    *base = it->first;
    return &it->second;
}
// Called by kreg.h's binder for every pointer argument of a launch.
static std::string launching;
void emu_check_kernel_ptr(const void* p, size_t arg) {
    if (!p) return;
    uintptr_t base;
    const Alloc* a = find_alloc((uintptr_t)p, &base);
    if (!a || !a->device) {
        fprintf(stderr, "cuda_emu: %s: argument %zu = %p is not in a live device allocation\n", launching.c_str(), arg, p);
        abort();
    }
}

// ---- streams, events, graphs ----
struct Graph { std::vector<EmuCall> ops; };
struct Stream {
    bool capturing = false, invalidated = false;
    Graph* graph = nullptr;
    int mode = 0;  // CUstreamCaptureMode: 0 global, 1 thread-local, 2 relaxed
    std::thread::id thread;
};
struct Event { double t = 0; bool recorded = false, captured = false; };
static std::vector<Stream*>& streams() { static std::vector<Stream*> s; return s; }
// A potentially unsafe call (cuMemAlloc, a synchronous copy, cuCtxSynchronize) is prohibited in
// a thread while it captures (unless in relaxed mode), and in every thread while any thread
// captures in global mode (the CUDA programming guide's rule); it fails and invalidates those
// captures.
static CUresult capture_violation(const char* what) {
    bool hit = false;
    for (Stream* s : streams())
        if (s->capturing && (s->mode == 0 || (s->mode == 1 && s->thread == std::this_thread::get_id()))) {
            s->invalidated = true;
            hit = true;
        }
    if (!hit) return OK;
    fprintf(stderr, "cuda_emu: %s during a stream capture (CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED)\n", what);
    return CAPTURE_UNSUPPORTED;
}
static void enqueue(void* stream, EmuCall op) {
    Stream* s = (Stream*)stream;
    if (s && s->capturing) s->graph->ops.push_back(std::move(op));
    else op();
}

static int ctx_token, current_set;
static void* const the_ctx = &ctx_token;

API CUresult cuInit(unsigned) { return OK; }
API CUresult cuDriverGetVersion(int* v) { *v = 13000; return OK; }
API CUresult cuDeviceGetCount(int* n) { *n = 1; return OK; }
API CUresult cuDeviceGet(int* d, int ordinal) { if (ordinal != 0) return INVALID_VALUE; *d = 0; return OK; }
API CUresult cuDeviceGetName(char* name, int len, int) {
    snprintf(name, len, "rft CUDA emulator (CPU)");
    return OK;
}
API CUresult cuDeviceTotalMem_v2(size_t* b, int) { *b = mem_budget(); return OK; }
API CUresult cuDeviceGetAttribute(int* v, int attr, int) {
    switch (attr) {
        case 1: case 2: *v = 1024; break;                  // max threads per block, block dim x
        case 3: case 4: *v = 1024; break;                  // block dim y, z (not modelled: 1-D only)
        case 5: *v = 0x7fffffff; break;                    // grid x
        case 6: case 7: *v = 65535; break;                 // grid y, z
        case 8: *v = 48 * 1024; break;                     // shared memory per block
        case 10: *v = 32; break;                           // warp size
        case 12: *v = 65536; break;                        // registers per block
        case 13: *v = 1980000; break;                      // clock kHz
        case 16: *v = (int)env_size("RFT_CUDA_EMU_SMS", 132); break;
        case 36: *v = 2619000; break;                      // memory clock kHz
        case 37: *v = 5120; break;                         // bus width
        case 38: *v = 50 << 20; break;                     // L2
        case 39: *v = 2048; break;                         // threads per SM
        case 75: *v = 9; break; case 76: *v = 0; break;    // compute capability 9.0
        case 81: *v = 228 * 1024; break;                   // shared memory per SM
        case 97: *v = 227 * 1024; break;                   // opt-in shared memory per block
        case 115: *v = 1; break;                           // memory pools (cuMemAllocAsync)
        default: *v = 0;
    }
    return OK;
}
API CUresult cuDevicePrimaryCtxRetain(void** ctx, int) { *ctx = the_ctx; return OK; }
API CUresult cuDevicePrimaryCtxRelease_v2(int) { return OK; }
API CUresult cuCtxSetCurrent(void* ctx) { current_set = ctx != nullptr; return OK; }
API CUresult cuCtxGetCurrent(void** ctx) { *ctx = current_set ? the_ctx : nullptr; return OK; }
API CUresult cuCtxGetDevice(int* d) { *d = 0; return OK; }
API CUresult cuCtxSynchronize() { LOCK; return capture_violation("cuCtxSynchronize"); }
API CUresult cuGetErrorString(CUresult e, const char** s) {
    static std::map<int, std::string> names;
    LOCK;
    auto& n = names[e];
    if (n.empty()) n = "cuda_emu error " + std::to_string(e);
    *s = n.c_str();
    return OK;
}
API CUresult cuGetErrorName(CUresult e, const char** s) {
    switch (e) {
        case OK: *s = "CUDA_SUCCESS"; break;
        case INVALID_VALUE: *s = "CUDA_ERROR_INVALID_VALUE"; break;
        case OUT_OF_MEMORY: *s = "CUDA_ERROR_OUT_OF_MEMORY"; break;
        case NOT_FOUND: *s = "CUDA_ERROR_NOT_FOUND"; break;
        case NOT_READY: *s = "CUDA_ERROR_NOT_READY"; break;
        case CAPTURE_UNSUPPORTED: *s = "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED"; break;
        case CAPTURE_INVALIDATED: *s = "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED"; break;
        default: *s = "CUDA_ERROR_UNKNOWN";
    }
    return OK;
}

// Memory.
static CUresult alloc(CUdeviceptr* p, size_t bytes, bool device) {
    if (device && device_used + bytes > mem_budget()) return OUT_OF_MEMORY;
#if defined(__SANITIZE_ADDRESS__)
    const size_t padded = std::max<size_t>(bytes, 1);  // ASan sees an access past the end
#else
    const size_t padded = (std::max<size_t>(bytes, 1) + 255) / 256 * 256;
#endif
    void* m = nullptr;  // posix_memalign: any size (C11 aligned_alloc wants a multiple of 256)
    if (posix_memalign(&m, 256, padded) != 0) return OUT_OF_MEMORY;
    memset(m, device ? 0xff : 0, padded);  // device memory: NaN until written
    allocs()[(uintptr_t)m] = Alloc{bytes, device};
    if (device) device_used += bytes;
    *p = (CUdeviceptr)(uintptr_t)m;
    return OK;
}
static CUresult release(uintptr_t p, bool device) {
    auto it = allocs().find(p);
    if (it == allocs().end() || it->second.device != device) {
        fprintf(stderr, "cuda_emu: freeing %p, which is not a live %s allocation\n", (void*)p, device ? "device" : "host");
        return INVALID_VALUE;
    }
    if (device) device_used -= it->second.bytes;
    allocs().erase(it);
    free((void*)p);
    return OK;
}
API CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) {
    LOCK;
    if (CUresult e = capture_violation("cuMemAlloc")) return e;
    return alloc(p, bytes, true);
}
API CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, void* stream) {
    LOCK;
    Stream* s = (Stream*)stream;
    if (s && s->capturing) {  // a graph allocation node: not used by rft, so flagged
        fprintf(stderr, "cuda_emu: cuMemAllocAsync inside a stream capture (not modelled)\n");
        s->invalidated = true;
        return CAPTURE_UNSUPPORTED;
    }
    return alloc(p, bytes, true);
}
API CUresult cuMemFree_v2(CUdeviceptr p) { LOCK; if (CUresult e = capture_violation("cuMemFree")) return e; return release(p, true); }
API CUresult cuMemFreeAsync(CUdeviceptr p, void* stream) {
    LOCK;
    Stream* s = (Stream*)stream;
    if (s && s->capturing) {
        fprintf(stderr, "cuda_emu: cuMemFreeAsync inside a stream capture (not modelled)\n");
        s->invalidated = true;
        return CAPTURE_UNSUPPORTED;
    }
    return release(p, true);
}
API CUresult cuMemGetInfo_v2(size_t* free_b, size_t* total) {
    LOCK;
    *total = mem_budget();
    *free_b = mem_budget() - device_used;
    return OK;
}
API CUresult cuMemHostAlloc(void** p, size_t bytes, unsigned) {
    LOCK;
    CUdeviceptr d;
    CUresult e = alloc(&d, bytes, false);
    *p = (void*)(uintptr_t)d;
    return e;
}
API CUresult cuMemFreeHost(void* p) { LOCK; return release((uintptr_t)p, false); }
static bool check_range(uintptr_t p, size_t bytes, const char* what) {
    uintptr_t base;
    const Alloc* a = find_alloc(p, &base);
    if (!a || !a->device || p + bytes > base + a->bytes) {
        fprintf(stderr, "cuda_emu: %s of %zu bytes at %p outside a live device allocation\n", what, bytes, (void*)p);
        return false;
    }
    return true;
}
API CUresult cuMemsetD8Async(CUdeviceptr p, unsigned char v, size_t n, void* stream) {
    LOCK;
    if (!check_range(p, n, "cuMemsetD8Async")) return INVALID_VALUE;
    enqueue(stream, [=] { memset((void*)(uintptr_t)p, v, n); });
    return OK;
}
API CUresult cuMemsetD32Async(CUdeviceptr p, unsigned v, size_t n, void* stream) {
    LOCK;
    if (!check_range(p, n * 4, "cuMemsetD32Async")) return INVALID_VALUE;
    enqueue(stream, [=] { for (size_t i = 0; i < n; ++i) ((unsigned*)(uintptr_t)p)[i] = v; });
    return OK;
}
API CUresult cuMemsetD8_v2(CUdeviceptr p, unsigned char v, size_t n) {
    LOCK;
    if (CUresult e = capture_violation("cuMemsetD8")) return e;
    if (!check_range(p, n, "cuMemsetD8")) return INVALID_VALUE;
    memset((void*)(uintptr_t)p, v, n);
    return OK;
}
// A copy between the device and pageable host memory cannot be captured (only pinned memory).
static CUresult captured_host_copy(void* stream, const void* host, size_t n, const char* what) {
    Stream* s = (Stream*)stream;
    if (!s || !s->capturing) return OK;
    uintptr_t base;
    const Alloc* a = find_alloc((uintptr_t)host, &base);
    if (a && !a->device && (uintptr_t)host + n <= base + a->bytes) return OK;
    fprintf(stderr, "cuda_emu: %s of pageable host memory in a stream capture\n", what);
    s->invalidated = true;
    return CAPTURE_UNSUPPORTED;
}
API CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, void* stream) {
    LOCK;
    if (!check_range(dst, n, "cuMemcpyHtoDAsync")) return INVALID_VALUE;
    if (CUresult e = captured_host_copy(stream, src, n, "cuMemcpyHtoDAsync")) return e;
    enqueue(stream, [=] { memcpy((void*)(uintptr_t)dst, src, n); });
    return OK;
}
API CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, void* stream) {
    LOCK;
    if (!check_range(src, n, "cuMemcpyDtoHAsync")) return INVALID_VALUE;
    if (CUresult e = captured_host_copy(stream, dst, n, "cuMemcpyDtoHAsync")) return e;
    enqueue(stream, [=] { memcpy(dst, (const void*)(uintptr_t)src, n); });
    return OK;
}
API CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, void* stream) {
    LOCK;
    if (!check_range(dst, n, "cuMemcpyDtoDAsync (destination)") || !check_range(src, n, "cuMemcpyDtoDAsync (source)"))
        return INVALID_VALUE;
    enqueue(stream, [=] { memmove((void*)(uintptr_t)dst, (const void*)(uintptr_t)src, n); });
    return OK;
}
API CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
    LOCK;
    if (CUresult e = capture_violation("cuMemcpyHtoD")) return e;
    if (!check_range(dst, n, "cuMemcpyHtoD")) return INVALID_VALUE;
    memcpy((void*)(uintptr_t)dst, src, n);
    return OK;
}
API CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
    LOCK;
    if (CUresult e = capture_violation("cuMemcpyDtoH")) return e;
    if (!check_range(src, n, "cuMemcpyDtoH")) return INVALID_VALUE;
    memcpy(dst, (const void*)(uintptr_t)src, n);
    return OK;
}
API CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    LOCK;
    if (CUresult e = capture_violation("cuMemcpyDtoD")) return e;
    memmove((void*)(uintptr_t)dst, (const void*)(uintptr_t)src, n);
    return OK;
}

// Streams and events.
API CUresult cuStreamCreate(void** s, unsigned) { LOCK; streams().push_back(new Stream()); *s = streams().back(); return OK; }
API CUresult cuStreamCreateWithPriority(void** s, unsigned f, int) { return cuStreamCreate(s, f); }
API CUresult cuStreamDestroy_v2(void* stream) {
    LOCK;
    auto& v = streams();
    v.erase(std::remove(v.begin(), v.end(), (Stream*)stream), v.end());
    delete (Stream*)stream;
    return OK;
}
// Waiting for or querying a stream that captures, or an event recorded in a capture, is an error
// in any mode.
static CUresult capturing_stream_wait(Stream* s, const char* what) {
    if (!s || !s->capturing) return OK;
    fprintf(stderr, "cuda_emu: %s of a stream that captures (CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED)\n", what);
    s->invalidated = true;
    return CAPTURE_UNSUPPORTED;
}
API CUresult cuStreamSynchronize(void* stream) {
    LOCK;
    if (!stream) return capture_violation("cuStreamSynchronize of the legacy stream");
    return capturing_stream_wait((Stream*)stream, "cuStreamSynchronize");
}
API CUresult cuStreamQuery(void* stream) { LOCK; return capturing_stream_wait((Stream*)stream, "cuStreamQuery"); }
API CUresult cuStreamWaitEvent(void*, void*, unsigned) { return OK; }
API CUresult cuLaunchHostFunc(void* stream, void (*fn)(void*), void* data) { LOCK; enqueue(stream, [=] { fn(data); }); return OK; }
API CUresult cuEventCreate(void** e, unsigned) { *e = new Event(); return OK; }
API CUresult cuEventDestroy_v2(void* e) { LOCK; delete (Event*)e; return OK; }
API CUresult cuEventRecord(void* ev, void* stream) {
    LOCK;
    Event* e = (Event*)ev;
    Stream* s = (Stream*)stream;
    e->captured = s && s->capturing;
    enqueue(stream, [e] { e->t = now_ms(); e->recorded = true; });
    return OK;
}
static CUresult captured_event(Event* e, const char* what) {
    if (!e->captured) return OK;
    fprintf(stderr, "cuda_emu: %s of an event recorded in a stream capture\n", what);
    return CAPTURE_UNSUPPORTED;
}
API CUresult cuEventSynchronize(void* e) { LOCK; return captured_event((Event*)e, "cuEventSynchronize"); }
API CUresult cuEventQuery(void* e) { LOCK; return captured_event((Event*)e, "cuEventQuery"); }
API CUresult cuEventElapsedTime(float* ms, void* a, void* b) {
    LOCK;
    Event *s = (Event*)a, *e = (Event*)b;
    if (!s->recorded || !e->recorded) return INVALID_HANDLE;
    *ms = (float)(e->t - s->t);
    return OK;
}
API CUresult cuEventElapsedTime_v2(float* ms, void* a, void* b) { return cuEventElapsedTime(ms, a, b); }

// Capture and graphs.
API CUresult cuStreamBeginCapture_v2(void* stream, int mode) {
    LOCK;
    Stream* s = (Stream*)stream;
    if (!s) return NOT_SUPPORTED;  // the legacy stream cannot be captured
    if (s->capturing || mode < 0 || mode > 2) return INVALID_VALUE;
    s->capturing = true;
    s->mode = mode;
    s->thread = std::this_thread::get_id();
    s->invalidated = false;
    s->graph = new Graph();
    return OK;
}
API CUresult cuStreamEndCapture(void* stream, void** graph) {
    LOCK;
    Stream* s = (Stream*)stream;
    if (!s || !s->capturing) return INVALID_VALUE;
    s->capturing = false;
    *graph = nullptr;
    if (s->invalidated) { delete s->graph; s->graph = nullptr; return CAPTURE_INVALIDATED; }
    *graph = s->graph;
    s->graph = nullptr;
    return OK;
}
API CUresult cuStreamIsCapturing(void* stream, int* status) {
    LOCK;
    Stream* s = (Stream*)stream;
    *status = s && s->capturing ? (s->invalidated ? 2 : 1) : 0;
    return OK;
}
API CUresult cuGraphInstantiateWithFlags(void** exec, void* graph, unsigned long long) {
    LOCK;
    *exec = new Graph(*(Graph*)graph);
    return OK;
}
API CUresult cuGraphUpload(void*, void*) { return OK; }
API CUresult cuGraphLaunch(void* exec, void* stream) {
    LOCK;
    for (const EmuCall& op : ((Graph*)exec)->ops) enqueue(stream, op);
    return OK;
}
API CUresult cuGraphExecDestroy(void* exec) { LOCK; delete (Graph*)exec; return OK; }
API CUresult cuGraphDestroy(void* graph) { LOCK; delete (Graph*)graph; return OK; }

// Modules and launches.
static int module_token;
API CUresult cuModuleLoadData(void** m, const void*) { *m = &module_token; return OK; }
API CUresult cuModuleUnload(void*) { return OK; }
API CUresult cuModuleGetFunction(void** f, void*, const char* name) {
    LOCK;
    Func*& fn = funcs()[name];
    if (!fn) {
        auto it = registry().find(name);
        if (it == registry().end()) {
            funcs().erase(name);
            fprintf(stderr, "cuda_emu: no kernel named %s among the emulated kernels\n", name);
            return NOT_FOUND;
        }
        fn = new Func{name, it->second};
    }
    *f = fn;
    return OK;
}
API CUresult cuFuncSetAttribute(void* f, int attr, int value) {
    LOCK;
    if (attr == 8) {  // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        if (value < 0 || value > 227 * 1024) return INVALID_VALUE;
        ((Func*)f)->max_dyn_smem = (size_t)value;
    }
    return OK;
}
API CUresult cuFuncGetAttribute(int* v, int attr, void* f) {
    LOCK;
    switch (attr) {
        case 0: *v = 1024; break;                                // max threads per block
        case 4: *v = 64; break;                                  // registers
        case 8: *v = (int)((Func*)f)->max_dyn_smem; break;
        default: *v = 0;
    }
    return OK;
}
API CUresult cuFuncSetCacheConfig(void*, int) { return OK; }
API CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                            unsigned smem, void* stream, void** params, void** extra) {
    LOCK;
    Func* fn = (Func*)f;
    if (extra) { fprintf(stderr, "cuda_emu: %s: `extra` launch parameters are not modelled\n", fn->name.c_str()); return NOT_SUPPORTED; }
    if (by != 1 || bz != 1 || bx == 0 || bx > 1024 || bx % 32 != 0) {
        fprintf(stderr, "cuda_emu: %s: block (%u,%u,%u) (the emulator runs 1-D blocks of 32k ≤ 1024 threads)\n",
                fn->name.c_str(), bx, by, bz);
        return INVALID_VALUE;
    }
    if (gx == 0 || gy == 0 || gz == 0 || gy > 65535 || gz > 65535) {
        fprintf(stderr, "cuda_emu: %s: grid (%u,%u,%u)\n", fn->name.c_str(), gx, gy, gz);
        return INVALID_VALUE;
    }
    if (smem > fn->max_dyn_smem) {
        fprintf(stderr, "cuda_emu: %s: %u bytes of dynamic shared memory > the kernel's limit %zu\n",
                fn->name.c_str(), smem, fn->max_dyn_smem);
        return INVALID_VALUE;
    }
    launching = fn->name;
    EmuCall call = fn->binder(params);  // checks pointer arguments, copies the values
    const size_t limit = fn->max_dyn_smem;
    const std::string name = fn->name;
    enqueue(stream, [=] {
        if (trace()) fprintf(stderr, "cuda_emu: launch %s grid (%u,%u,%u) block %u smem %u\n", name.c_str(), gx, gy, gz, bx, smem);
        emu_launch(emu_dim3{gx, gy, gz}, (int)bx, smem, call, limit);
    });
    return OK;
}
API CUresult cuOccupancyMaxActiveBlocksPerMultiprocessor(int* n, void*, int block, size_t) {
    *n = std::max(1, 2048 / std::max(block, 1));
    return OK;
}

// ---- cuBLAS ----
struct Blas { void* stream = nullptr; };
typedef int cublasStatus_t;
API cublasStatus_t cublasCreate_v2(void** h) { *h = new Blas(); return 0; }
API cublasStatus_t cublasDestroy_v2(void* h) { delete (Blas*)h; return 0; }
API cublasStatus_t cublasSetStream_v2(void* h, void* s) { ((Blas*)h)->stream = s; return 0; }
API cublasStatus_t cublasGetStream_v2(void* h, void** s) { *s = ((Blas*)h)->stream; return 0; }
API cublasStatus_t cublasSetWorkspace_v2(void*, void*, size_t) { return 0; }
API cublasStatus_t cublasSetMathMode(void*, int) { return 0; }
API cublasStatus_t cublasGetMathMode(void*, int* m) { *m = 0; return 0; }
API cublasStatus_t cublasSetPointerMode_v2(void*, int mode) { return mode == 0 ? 0 : 15; }
API cublasStatus_t cublasGetPointerMode_v2(void*, int* mode) { *mode = 0; return 0; }

static float load_elem(const void* p, int type, size_t i) {
    switch (type) {
        case 0: return ((const float*)p)[i];
        case 14: { uint32_t b = (uint32_t)((const uint16_t*)p)[i] << 16; float f; memcpy(&f, &b, 4); return f; }
        case 2: return (float)((const _Float16*)p)[i];
        default: abort();
    }
}
static void store_elem(void* p, int type, size_t i, float v) {
    switch (type) {
        case 0: ((float*)p)[i] = v; break;
        case 14: ((__nv_bfloat16*)p)[i] = __float2bfloat16_rn(v); break;
        case 2: ((_Float16*)p)[i] = (_Float16)v; break;
        default: abort();
    }
}
// C (m×n, column-major, ldc) = alpha·op(A)·op(B) + beta·C, f32 accumulation in k order; C is not
// read when beta is 0 (as cuBLAS: NaN there does not propagate).
static void gemm(int ta, int tb, int m, int n, int k, float alpha, const void* A, int at, long long lda, const void* B,
                 int bt, long long ldb, float beta, void* C, int ct, long long ldc) {
    std::vector<float> a((size_t)m * k), b((size_t)k * n);
    for (int i = 0; i < m; ++i)
        for (int l = 0; l < k; ++l) a[(size_t)i * k + l] = load_elem(A, at, ta ? (size_t)i * lda + l : (size_t)l * lda + i);
    for (int j = 0; j < n; ++j)
        for (int l = 0; l < k; ++l) b[(size_t)j * k + l] = load_elem(B, bt, tb ? (size_t)l * ldb + j : (size_t)j * ldb + l);
    for (int j = 0; j < n; ++j)
        for (int i = 0; i < m; ++i) {
            float acc = 0.0f;
            const float *ar = &a[(size_t)i * k], *bc = &b[(size_t)j * k];
            for (int l = 0; l < k; ++l) acc += ar[l] * bc[l];
            const size_t c = (size_t)j * ldc + i;
            float v = alpha * acc;
            if (beta != 0.0f) v += beta * load_elem(C, ct, c);
            store_elem(C, ct, c, v);
        }
}
static bool blas_types_ok(int at, int bt, int ct, int compute, const char* what) {
    auto ok = [](int t) { return t == 0 || t == 14 || t == 2; };
    if (ok(at) && ok(bt) && ok(ct) && (compute == 68 || compute == 75 || compute == 77 || compute == 74)) return true;
    fprintf(stderr, "cuda_emu: %s with types A %d B %d C %d compute %d is not modelled\n", what, at, bt, ct, compute);
    return false;
}
API cublasStatus_t cublasGemmStridedBatchedEx(void* h, int ta, int tb, int m, int n, int k, const void* alpha,
                                              const void* A, int at, int lda, long long sa, const void* B, int bt,
                                              int ldb, long long sb, const void* beta, void* C, int ct, int ldc,
                                              long long sc, int batch, int compute, int) {
    LOCK;
    if (!blas_types_ok(at, bt, ct, compute, "cublasGemmStridedBatchedEx")) return 15;  // NOT_SUPPORTED
    if (m < 0 || n < 0 || k < 0 || lda < std::max(1, ta ? k : m) || ldb < std::max(1, tb ? n : k) || ldc < std::max(1, m))
        return 7;  // INVALID_VALUE
    const float al = *(const float*)alpha, be = *(const float*)beta;
    auto esz = [](int t) { return t == 0 ? 4 : 2; };
    enqueue(((Blas*)h)->stream, [=] {
        for (int i = 0; i < batch; ++i)
            gemm(ta, tb, m, n, k, al, (const char*)A + sa * i * esz(at), at, lda, (const char*)B + sb * i * esz(bt), bt,
                 ldb, be, (char*)C + sc * i * esz(ct), ct, ldc);
    });
    return 0;
}
API cublasStatus_t cublasGemmEx(void* h, int ta, int tb, int m, int n, int k, const void* alpha, const void* A, int at,
                                int lda, const void* B, int bt, int ldb, const void* beta, void* C, int ct, int ldc,
                                int compute, int algo) {
    return cublasGemmStridedBatchedEx(h, ta, tb, m, n, k, alpha, A, at, lda, 0, B, bt, ldb, 0, beta, C, ct, ldc, 0, 1,
                                      compute, algo);
}
API cublasStatus_t cublasSgemm_v2(void* h, int ta, int tb, int m, int n, int k, const float* alpha, const float* A, int lda,
                                  const float* B, int ldb, const float* beta, float* C, int ldc) {
    return cublasGemmEx(h, ta, tb, m, n, k, alpha, A, 0, lda, B, 0, ldb, beta, C, 0, ldc, 68, -1);
}
API cublasStatus_t cublasSgemmStridedBatched(void* h, int ta, int tb, int m, int n, int k, const float* alpha,
                                             const float* A, int lda, long long sa, const float* B, int ldb,
                                             long long sb, const float* beta, float* C, int ldc, long long sc, int batch) {
    return cublasGemmStridedBatchedEx(h, ta, tb, m, n, k, alpha, A, 0, lda, sa, B, 0, ldb, sb, beta, C, 0, ldc, sc, batch,
                                      68, -1);
}
API const char* cublasGetStatusString(cublasStatus_t s) { return s == 0 ? "CUBLAS_STATUS_SUCCESS" : "CUBLAS_STATUS_ERROR"; }
