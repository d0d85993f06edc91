// The CUDA execution model on the CPU, as much of it as mnkpipe/kernels/cntk_fused.cu uses: threadIdx, blockIdx,
// blockDim, gridDim, __shfl_up_sync/__shfl_down_sync (full mask), __ldg, __launch_bounds__, __forceinline__.
//
// Every CUDA thread is a fiber; a block's fibers run round robin on one OS thread, and each warp shuffle is a
// lockstep point at which the warp's lanes exchange values (run_block checks that all lanes of a warp reach the
// same shuffles). Blocks run in parallel on `nos` OS threads.
//
// Build: g++ -std=c++17 -shared -fPIC -pthread -DKERNEL_FILE='"<path>/cntk_fused.cu"' -DHH=.. -DWW=.. harness.cpp
// Fibers switch with POSIX ucontext (portable); -DEMU_ASM_SWITCH selects a hand-written x86-64 switch instead,
// which saves only the callee-saved registers and makes no signal-mask system call.
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>
#ifndef KERNEL_FILE
#error "compile with -DKERNEL_FILE=<the quoted path of cntk_fused.cu>"
#endif
#ifdef EMU_ASM_SWITCH
#ifndef __x86_64__
#error "EMU_ASM_SWITCH is x86-64 only; leave it out to use ucontext"
#endif
#else
#include <ucontext.h>
#define EMU_USE_UCONTEXT 1
#endif

struct emu_dim3 { unsigned x, y, z; };

namespace emu {
#ifdef EMU_USE_UCONTEXT
using Ctx = ucontext_t;
#else
using Ctx = void*;
#endif
struct Fiber { Ctx ctx; emu_dim3 tid; long nsync; bool done; };
struct Warp { uint64_t slot[2][32]; };
thread_local Fiber* cur = nullptr;
thread_local Ctx sched;
thread_local emu_dim3 block_idx, block_dim, grid_dim;
thread_local Warp* warps = nullptr;
thread_local const std::function<void()>* body = nullptr;
thread_local const char* fault = nullptr;
}  // namespace emu

#ifndef EMU_USE_UCONTEXT
// Save the callee-saved registers on the current stack, store its pointer in *save, switch to the stack `load`.
extern "C" void emu_swap(void** save, void* load);
asm(R"ASM(
    .text
    .globl emu_swap
    .hidden emu_swap
    .type emu_swap,@function
emu_swap:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_swap, .-emu_swap
)ASM");
#endif

namespace emu {
inline void switch_to(Ctx* save, Ctx* load) {
#ifdef EMU_USE_UCONTEXT
    swapcontext(save, load);
#else
    emu_swap(save, *load);
#endif
}

void trampoline() {
    (*body)();
    cur->done = true;
    switch_to(&cur->ctx, &sched);
    std::abort();  // a finished fiber is never resumed
}

void init_ctx(Ctx* c, char* stack, size_t size) {
#ifdef EMU_USE_UCONTEXT
    getcontext(c);
    c->uc_stack.ss_sp = stack;
    c->uc_stack.ss_size = size;
    c->uc_link = nullptr;
    makecontext(c, trampoline, 0);
#else
    auto top = reinterpret_cast<uintptr_t>(stack + size) & ~uintptr_t(15);
    void** sp = reinterpret_cast<void**>(top);
    *--sp = nullptr;                                   // trampoline's return address: never used
    *--sp = reinterpret_cast<void*>(&trampoline);      // where emu_swap's ret lands
    for (int k = 0; k < 6; ++k) *--sp = nullptr;       // rbp rbx r12 r13 r14 r15
    *c = sp;
#endif
}

inline void yield() { switch_to(&cur->ctx, &sched); }

// One lockstep exchange point of the warp: publish v, wait for the whole warp, read lane src's value.
template <class V>
V exchange(unsigned mask, V v, int delta, int width) {
    static_assert(sizeof(V) <= 8, "shuffle of at most 64 bits");
    if (mask != 0xffffffffu && !fault) fault = "emulation: only full-mask shuffles are supported";
    Fiber* f = cur;
    const int t = (int)f->tid.x, lane = t & 31;
    const int ph = (int)(f->nsync & 1);
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(V));
    warps[t >> 5].slot[ph][lane] = bits;
    f->nsync++;
    yield();
    const int base = lane / width * width, src = lane + delta;
    if (src < base || src >= base + width) return v;
    V r;
    std::memcpy(&r, &warps[t >> 5].slot[ph][src], sizeof(V));
    return r;
}

// Run one block: all its threads as fibers, round robin; each round every live fiber runs to its next exchange.
const char* run_block(std::vector<Fiber>& fibers, std::vector<char>& stacks, size_t stack_size) {
    const size_t n = fibers.size();
    for (size_t t = 0; t < n; ++t) {
        fibers[t].tid = {(unsigned)t, 0, 0};
        fibers[t].nsync = 0;
        fibers[t].done = false;
        init_ctx(&fibers[t].ctx, stacks.data() + t * stack_size, stack_size);
    }
    size_t alive = n;
    while (alive) {
        for (auto& f : fibers) {
            if (f.done) continue;
            cur = &f;
            switch_to(&sched, &f.ctx);
            if (f.done) --alive;
        }
        if (fault) return fault;
        for (size_t w = 0; w < n / 32; ++w) {
            long ns = -1;
            int ndone = 0;
            for (size_t k = 32 * w; k < 32 * w + 32; ++k) {
                if (fibers[k].done) { ++ndone; continue; }
                if (ns >= 0 && fibers[k].nsync != ns) return "emulation: lanes of a warp reached different shuffles";
                ns = fibers[k].nsync;
            }
            if (ndone && ndone < 32) return "emulation: lanes of a warp exited while others wait at a shuffle";
        }
    }
    return nullptr;
}

int launch(unsigned grid, unsigned block, int nos, const std::function<void()>& kernel, char* err, int errlen) {
    if (block == 0 || block % 32) { std::snprintf(err, errlen, "block size must be a multiple of 32"); return 1; }
    const size_t stack_size = 64 * 1024;
    std::atomic<unsigned> next{0};
    std::atomic<bool> failed{false};
    std::mutex m;
    std::string first;
    auto worker = [&] {
        std::vector<Fiber> fibers(block);
        std::vector<char> stacks(block * stack_size);
        std::vector<Warp> ws(block / 32);
        body = &kernel;
        warps = ws.data();
        block_dim = {block, 1, 1};
        grid_dim = {grid, 1, 1};
        fault = nullptr;
        for (unsigned b; !failed && (b = next++) < grid;) {
            block_idx = {b, 0, 0};
            if (const char* e = run_block(fibers, stacks, stack_size)) {
                std::lock_guard<std::mutex> g(m);
                if (!failed) first = e;
                failed = true;
            }
        }
    };
    std::vector<std::thread> pool;
    for (int k = 0; k < (nos > 0 ? nos : 1); ++k) pool.emplace_back(worker);
    for (auto& th : pool) th.join();
    if (failed) { std::snprintf(err, errlen, "%s", first.c_str()); return 2; }
    return 0;
}
}  // namespace emu

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define threadIdx (emu::cur->tid)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)
template <class T> inline T __ldg(const T* p) { return *p; }
template <class V> inline V __shfl_up_sync(unsigned m, V v, unsigned d, int w = 32) { return emu::exchange(m, v, -(int)d, w); }
template <class V> inline V __shfl_down_sync(unsigned m, V v, unsigned d, int w = 32) { return emu::exchange(m, v, (int)d, w); }

#include KERNEL_FILE

extern "C" int emu_cntk_fused(unsigned grid, unsigned block, int nos, const float* X2, const float* L2,
                              const int* pidx, const int* qidx, long long nitems, int ntiles, int C, int depth,
                              int fix, double* out, char* err, int errlen) {
    const std::function<void()> k = [=] { cntk_fused(X2, L2, pidx, qidx, nitems, ntiles, C, depth, fix, out); };
    return emu::launch(grid, block, nos, k, err, errlen);
}
