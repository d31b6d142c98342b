// emu.h -- an EMULATOR of CUDA thread blocks on the CPU, for tests only (see README.md).
//
// A kernel source is compiled for the host with `g++ -include emu.h`. Every thread of a block is a
// ucontext fiber with its own stack; blocks run one after another. __syncthreads() suspends the calling
// fiber and the scheduler runs each other fiber of the block up to its next barrier (or its end), then
// releases them all. Threads of a block run in increasing index order in even-numbered blocks and in
// decreasing order in odd-numbered ones, so a read of shared memory that lacks a barrier sees stale or
// poisoned data in one of the two orders.
//
// What it checks: indexing, bounds (with the harness's guard zones), reduction order, that every thread
// of a block reaches the same barriers (emu_problems() counts violations). What it does not model: warps
// and lockstep execution, the memory model, concurrent blocks, timing, real data races. Passing here is
// not "verified on a GPU".
#pragma once
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <type_traits>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
static dim3 threadIdx, blockIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __constant__
// `__shared__ T a[..];` is rewritten by the harness to a static array poisoned once per block
// (EMU_SHARED); `extern __shared__ T a[];` to a pointer into emu::dynamic_shared.

// ------------------------------------------------------------------------------ device functions
using std::isfinite;
using std::isinf;
using std::isnan;
template <class A, class B>
static inline std::common_type_t<A, B> min(A a, B b) { return b < a ? b : a; }
template <class A, class B>
static inline std::common_type_t<A, B> max(A a, B b) { return a < b ? b : a; }
static inline float __int_as_float(int v) { float f; std::memcpy(&f, &v, 4); return f; }
static inline int __float_as_int(float f) { int v; std::memcpy(&v, &f, 4); return v; }
static inline float __uint_as_float(unsigned v) { float f; std::memcpy(&f, &v, 4); return f; }
static inline unsigned __float_as_uint(float f) { unsigned v; std::memcpy(&v, &f, 4); return v; }
static inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
static inline float __fdividef(float a, float b) { return a / b; }
static inline float __fmul_rn(float a, float b) { return a * b; }  // (the host compiles no FMA: -std=c++17, no -mfma)
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
template <class T> static inline T __ldg(const T* p) { return *p; }
// Atomics: a fiber is never interrupted between barriers, so a plain read-modify-write is atomic here.
template <class T, class U> static inline T atomicAdd(T* a, U v) { T old = *a; *a = old + (T)v; return old; }
template <class T, class U> static inline T atomicSub(T* a, U v) { T old = *a; *a = old - (T)v; return old; }
template <class T, class U> static inline T atomicExch(T* a, U v) { T old = *a; *a = (T)v; return old; }
template <class T, class U> static inline T atomicMax(T* a, U v) { T old = *a; *a = old < (T)v ? (T)v : old; return old; }
template <class T, class U> static inline T atomicMin(T* a, U v) { T old = *a; *a = (T)v < old ? (T)v : old; return old; }
template <class T, class U, class V>
static inline T atomicCAS(T* a, U cmp, V v) { T old = *a; if (old == (T)cmp) *a = (T)v; return old; }
static inline void __threadfence() {}
// Warp-level intrinsics (__shfl_*_sync, __ballot_sync, ...) are deliberately missing: lockstep warps are
// not modelled, so a kernel using them fails to compile here rather than being checked wrongly.

// ------------------------------------------------------------------------------ the scheduler
namespace emu {
constexpr std::size_t kStack = 64 * 1024;
constexpr std::size_t kDynamicShared = 256 * 1024;
alignas(16) static unsigned char dynamic_shared[kDynamicShared];
static unsigned long block_serial = 0;  // increases at every block start (shared-memory poisoning)

struct Fiber {
    ucontext_t ctx;
    std::vector<char> stack;
    dim3 tid;
    bool done = false;
    const char* site_file = nullptr;  // the barrier this fiber waits at, when not done
    int site_line = 0;
};
static std::vector<Fiber> fibers;
static ucontext_t scheduler;
static Fiber* current = nullptr;
static std::function<void()>* body = nullptr;
static long problems = 0;
static char first_problem[256] = "";

static void problem(const char* what) {
    if (!problems++) std::snprintf(first_problem, sizeof first_problem, "%s", what);
}

static void trampoline() {
    (*body)();
    current->done = true;
    swapcontext(&current->ctx, &scheduler);
}

static void syncthreads(const char* file, int line) {
    current->site_file = file;
    current->site_line = line;
    swapcontext(&current->ctx, &scheduler);
}

// Runs the whole grid; returns after the last block.
static void run(dim3 grid, dim3 block, std::size_t shared_bytes, std::function<void()> fn) {
    gridDim = grid;
    blockDim = block;
    const unsigned nt = block.x * block.y * block.z;
    while (fibers.size() < nt) {
        fibers.emplace_back();
        fibers.back().stack.resize(kStack);
        getcontext(&fibers.back().ctx);
    }
    body = &fn;
    char msg[256];
    for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx = dim3{bx, by, bz};
        ++block_serial;
        std::memset(dynamic_shared, 0xff, shared_bytes);  // NaN floats, -1 integers: unwritten data shows
        const bool reverse = block_serial & 1;
        for (unsigned t = 0; t < nt; ++t) {
            Fiber& f = fibers[t];
            f.done = false;
            f.site_file = nullptr;
            f.tid = dim3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
            f.ctx.uc_stack.ss_sp = f.stack.data();
            f.ctx.uc_stack.ss_size = f.stack.size();
            f.ctx.uc_link = nullptr;
            makecontext(&f.ctx, trampoline, 0);
        }
        for (;;) {  // one phase: every live thread runs to its next barrier or its end
            for (unsigned k = 0; k < nt; ++k) {
                Fiber& f = fibers[reverse ? nt - 1 - k : k];
                if (f.done) continue;
                current = &f;
                threadIdx = f.tid;
                swapcontext(&scheduler, &f.ctx);
            }
            unsigned finished = 0;
            const Fiber* waiting = nullptr;
            for (unsigned t = 0; t < nt; ++t) {
                const Fiber& f = fibers[t];
                if (f.done) { ++finished; continue; }
                if (!waiting) { waiting = &f; continue; }
                if (f.site_line != waiting->site_line || std::strcmp(f.site_file, waiting->site_file)) {
                    std::snprintf(msg, sizeof msg, "block (%u,%u,%u): threads wait at different barriers "
                                  "(%s:%d and %s:%d)", bx, by, bz, waiting->site_file, waiting->site_line,
                                  f.site_file, f.site_line);
                    problem(msg);
                }
            }
            if (finished == nt) break;
            if (finished) {
                std::snprintf(msg, sizeof msg, "block (%u,%u,%u): %u of %u threads exited while the others "
                              "wait at the barrier %s:%d", bx, by, bz, finished, nt, waiting->site_file,
                              waiting->site_line);
                problem(msg);
            }
        }
    }
}
}  // namespace emu

#define __syncthreads() emu::syncthreads(__FILE__, __LINE__)
// A static __shared__ array, poisoned (all bits set) by the first thread of each block to reach it.
#define EMU_SHARED(a)                                                              \
    do {                                                                           \
        static unsigned long emu_poisoned_ = 0;                                    \
        if (emu_poisoned_ != emu::block_serial) {                                  \
            emu_poisoned_ = emu::block_serial;                                     \
            std::memset(&(a), 0xff, sizeof(a));                                    \
        }                                                                          \
    } while (0)

extern "C" long emu_problems() { return emu::problems; }
extern "C" const char* emu_first_problem() { return emu::first_problem; }
