// A CUDA device simulated on the host, for testing the kernels' own source without a GPU.
//
// The kernels of cuda/ are compiled as C++ by the host compiler with this header in front and
// cuda/host/ptx.h in the place of cuda/ptx.cuh (src/cuda/sim.rs assembles the source and runs
// the compiler). Every CUDA thread of a block is a fiber on the calling OS thread; the fibers of a
// block take turns, each running until it reaches a barrier (`__syncthreads`, `__syncwarp`, a warp
// shuffle, `mma.sync`), so the kernels run with the CUDA semantics they rely on: shared memory
// is one object per block, warp collectives exchange data between the 32 lanes, and a barrier
// waits for every thread that takes part in it. Blocks run one after another.
//
// What it finds: wrong indexing and addressing, races between barriers that change results,
// collectives not reached by every lane (reported as a deadlock), prefetches into L2 of lines
// that the warp does not then copy, and any difference of the kernels' arithmetic from the CPU
// cache. What it cannot find: timing, memory-model effects between concurrent blocks, register or
// shared-memory limits, and errors in the PTX helpers themselves (ptx.h models them on the PTX
// ISA).
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// One object per block: blocks of one launch run one after another on the calling thread, and
// the fibers of a block share it; thread_local keeps launches on different threads apart.
#define __shared__ static thread_local
// Dynamic shared memory: an object of the size the launch passes, like the static ones.
#define KV_DYNAMIC_SHARED(name, bytes) __shared__ __align__(16) u8 name[bytes]
#define __CUDA_ARCH__ 900

namespace kvsim {

struct Dim3 {
    unsigned x, y, z;
};

enum State { RUNNABLE, WAITING, DONE };

// Switching between fibers: a few instructions on x86-64 (callee-saved registers and the stack
// pointer); ucontext elsewhere (or with KVSIM_UCONTEXT defined, which the tests use to run that
// path on x86-64 too), which also saves the signal mask with a system call each time.
#if defined(__x86_64__) && !defined(KVSIM_UCONTEXT)
extern "C" void kvsim_switch(void** save_sp, void* load_sp);
asm(R"(
    .text
    .p2align 4
    .globl kvsim_switch
    .hidden kvsim_switch
    .type kvsim_switch, @function
kvsim_switch:
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
    .size kvsim_switch, .-kvsim_switch
)");
struct Context {
    void* sp;
};
inline void switch_to(Context& save, Context& load) { kvsim_switch(&save.sp, load.sp); }
// A context that starts `entry` (which never returns) on the stack [base, base + size).
inline void make_context(Context& c, char* base, size_t size, void (*entry)(), Context&) {
    uintptr_t top = ((uintptr_t)(base + size)) & ~(uintptr_t)15;
    void** sp = (void**)(top - 64);  // six saved registers, then the address `ret` jumps to
    for (int i = 0; i < 6; i++) sp[i] = nullptr;
    sp[6] = (void*)entry;
    c.sp = sp;
}
#else
struct Context {
    ucontext_t uc;
};
inline void switch_to(Context& save, Context& load) { swapcontext(&save.uc, &load.uc); }
inline void make_context(Context& c, char* base, size_t size, void (*entry)(), Context& link) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = base;
    c.uc.uc_stack.ss_size = size;
    c.uc.uc_link = &link.uc;
    makecontext(&c.uc, entry, 0);
}
#endif

// An asynchronous copy (cp.async) queued by a thread and not yet waited for: it belongs to the
// thread's commit group `group` (the number of commits before it).
struct PendingCopy {
    void* dst;
    const void* src;
    unsigned group;
};

struct Fiber {
    Context ctx;
    unsigned tid;
    State state;
    unsigned parity;  // alternates per warp collective, so that one barrier per collective suffices
    std::vector<PendingCopy> copies;  // cp.async copies not yet waited for
    unsigned commits;                 // cp.async groups committed
};

// Data that lanes of a warp exchange in collectives; two copies, chosen by the parity.
struct WarpSlots {
    uint32_t word[2][32];
    uint32_t a[2][32][4], b[2][32][2];
};

struct Block {
    std::vector<Fiber> fibers;
    Context sched;
    unsigned n, cur, alive;
    unsigned block_waiting;
    unsigned warp_waiting[32], warp_alive[32];
    WarpSlots slots[32];
    Dim3 block_idx, grid_dim, block_dim;
    void (*body)(const void*);
    const void* params;
    const char* error;
    // Loads through L2 (ld_cg) of the launch so far: the address, the bits read and the block.
    // Each must still hold those bits when the launch ends: a block that reads what a later
    // block writes was not ordered after that write (the fused combine's counting protocol).
    struct CgRead {
        const void* p;
        uint32_t bits;
        Dim3 block;
    };
    std::vector<CgRead> cg_reads;
    // Lines a thread asked to have prefetched into L2 (prefetch_l2): the address, the warp and the
    // commit group its lanes had open. Each leaves the list when a lane of the warp copies the 16
    // bytes there with a cp.async of a later commit group; any left when the block ends fail it.
    struct Prefetch {
        const char* p;
        unsigned warp, commits;
    };
    std::vector<Prefetch> prefetches;
};

inline thread_local Block* blk = nullptr;
// Prefetches (prefetch_l2) that a later cp.async of the same warp used, on this thread since
// the last kvsim_prefetches().
inline thread_local unsigned long long prefetches_used = 0;

inline Fiber& me() { return blk->fibers[blk->cur]; }

// Records a fault of the running thread (what the device would reject or get wrong, such as a
// misaligned asynchronous copy); the launch then fails with the first fault's message.
inline void fault(const char* what) {
    if (!blk->error) blk->error = what;
}

inline void prefetched(const void* p) {
    const Fiber& f = me();
    if ((uintptr_t)p & 15) fault("a prefetch of an address not 16-byte aligned (the kernels prefetch what they copy)");
    blk->prefetches.push_back({(const char*)p, f.tid / 32, f.commits});
}

// A cp.async from src by the running thread: the prefetches of src by its warp, in earlier
// commit groups, have served.
inline void copied(const void* src) {
    const Fiber& f = me();
    auto& all = blk->prefetches;
    for (size_t i = 0; i < all.size();) {
        if (all[i].p == (const char*)src && all[i].warp == f.tid / 32 && f.commits > all[i].commits) {
            all[i] = all.back();
            all.pop_back();
            prefetches_used++;
        } else {
            i++;
        }
    }
}

// Back to the scheduler until released.
inline void wait_here() {
    Fiber& f = me();
    f.state = WAITING;
    switch_to(f.ctx, blk->sched);
}

inline void release_block() {
    for (auto& f : blk->fibers)
        if (f.state == WAITING) f.state = RUNNABLE;
    blk->block_waiting = 0;
}

inline void release_warp(unsigned w) {
    for (unsigned i = w * 32; i < blk->n && i < w * 32 + 32; i++)
        if (blk->fibers[i].state == WAITING) blk->fibers[i].state = RUNNABLE;
    blk->warp_waiting[w] = 0;
}

// __syncthreads(): waits for every thread of the block that has not exited.
inline void sync_block() {
    if (++blk->block_waiting == blk->alive) {
        release_block();
        return;
    }
    wait_here();
}

// A barrier of the warp: waits for all of its lanes (a lane that exited never arrives, and the
// launch then fails as a deadlock, as a collective missing lanes is undefined on the device).
inline void sync_warp() {
    unsigned w = me().tid / 32;
    unsigned lanes = blk->n - w * 32 < 32 ? blk->n - w * 32 : 32;
    if (++blk->warp_waiting[w] == lanes) {
        release_warp(w);
        return;
    }
    wait_here();
}

// v of lane src_of(lane) (this lane's own where that lane does not exist).
template <class T, class F>
inline T shfl(T v, F src_of) {
    static_assert(sizeof(T) == 4, "32-bit shuffles only");
    Fiber& f = me();
    unsigned w = f.tid / 32, lane = f.tid % 32, p = f.parity ^= 1;
    uint32_t bits;
    memcpy(&bits, &v, 4);
    blk->slots[w].word[p][lane] = bits;
    sync_warp();
    unsigned src = src_of(lane) % 32;
    if (w * 32 + src >= blk->n) src = lane;
    memcpy(&v, &blk->slots[w].word[p][src], 4);
    return v;
}

template <class T>
inline T shfl_xor(T v, int mask) {
    return shfl(v, [mask](unsigned lane) { return lane ^ (unsigned)mask; });
}

// __any_sync over the whole warp.
inline bool any_lane(bool x) {
    Fiber& f = me();
    unsigned w = f.tid / 32, lane = f.tid % 32, p = f.parity ^= 1;
    blk->slots[w].word[p][lane] = x ? 1u : 0u;
    sync_warp();
    unsigned lanes = blk->n - w * 32 < 32 ? blk->n - w * 32 : 32;
    for (unsigned i = 0; i < lanes; i++)
        if (blk->slots[w].word[p][i]) return true;
    return false;
}

// An f16 as f32 (defined with the PTX helpers, ptx.h).
inline float h16(uint32_t bits);

// A bf16 as f32 (exact).
inline float bf16f(uint32_t bits) {
    uint32_t x = (bits & 0xffffu) << 16;
    float f;
    memcpy(&f, &x, 4);
    return f;
}

// mma.sync.m16n8k16.row.col.f32.f16.f16.f32 (BF16: .bf16.bf16), fragments as in the PTX ISA:
// lane = 4 * group + t; A row g and g + 8, columns 2t, 2t+1 (registers 0, 1) and 2t+8, 2t+9
// (registers 2, 3); B column g, rows 2t, 2t+1 and 2t+8, 2t+9; C row g and g + 8 at columns
// 2t, 2t+1.
template <bool BF16 = false>
inline void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    Fiber& f = me();
    unsigned w = f.tid / 32, lane = f.tid % 32, p = f.parity ^= 1;
    WarpSlots& s = blk->slots[w];
    memcpy(s.a[p][lane], a, sizeof a);
    memcpy(s.b[p][lane], b, sizeof b);
    sync_warp();
    auto A = [&](unsigned r, unsigned k) {
        unsigned l = (r % 8) * 4 + (k % 8) / 2, reg = (r >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
        const uint32_t x = s.a[p][l][reg] >> (16 * (k % 2));
        return BF16 ? bf16f(x) : h16(x);
    };
    auto B = [&](unsigned k, unsigned n) {
        unsigned l = n * 4 + (k % 8) / 2, reg = k >= 8 ? 1 : 0;
        const uint32_t x = s.b[p][l][reg] >> (16 * (k % 2));
        return BF16 ? bf16f(x) : h16(x);
    };
    unsigned g = lane / 4, t = lane % 4;
    for (unsigned i = 0; i < 4; i++) {
        unsigned r = g + (i >= 2 ? 8 : 0), n = 2 * t + i % 2;
        float acc = c[i];
        for (unsigned k = 0; k < 16; k++) acc += A(r, k) * B(k, n);
        c[i] = acc;
    }
}

// A CUDA thread: the kernel's body, then back to the scheduler for good.
inline void fiber_main() {
    Fiber& f = me();
    blk->body(blk->params);
    f.state = DONE;
    blk->alive--;
    // A thread that exits no longer holds up __syncthreads.
    if (blk->block_waiting > 0 && blk->block_waiting == blk->alive) release_block();
    switch_to(f.ctx, blk->sched);
}

// Runs one launch: grid blocks of `threads` threads, one block after another. Returns 0, or -1
// with a message in `err` when the block's threads can no longer all progress.
inline int launch(void (*body)(const void*), const void* params, Dim3 grid, unsigned threads, char* err,
                  size_t err_len) {
    const size_t stack = 64 * 1024;
    // Stacks are kept for the thread's later launches (allocating and clearing them each time
    // would cost more than most launches).
    static thread_local std::vector<char> stacks;
    if (stacks.size() < stack * threads) stacks.resize(stack * threads);
    Block b{};
    Block* saved = blk;
    blk = &b;
    b.n = threads;
    b.fibers.resize(threads);
    b.grid_dim = grid;
    b.block_dim = {threads, 1, 1};
    b.body = body;
    b.params = params;
    int rc = 0;
    for (unsigned z = 0; z < grid.z && rc == 0; z++)
        for (unsigned y = 0; y < grid.y && rc == 0; y++)
            for (unsigned x = 0; x < grid.x && rc == 0; x++) {
                b.block_idx = {x, y, z};
                b.error = nullptr;
                b.prefetches.clear();
                b.alive = threads;
                b.block_waiting = 0;
                memset(b.warp_waiting, 0, sizeof b.warp_waiting);
                for (unsigned i = 0; i < threads; i++) {
                    Fiber& f = b.fibers[i];
                    f.tid = i;
                    f.state = RUNNABLE;
                    f.parity = 0;
                    f.copies.clear();
                    f.commits = 0;
                    make_context(f.ctx, stacks.data() + stack * i, stack, fiber_main, b.sched);
                }
                // Odd blocks run their threads in reverse order, so that a missing barrier shows
                // whichever thread of a pair writes first.
                const bool reverse = ((x + y + z) & 1) != 0;
                for (;;) {
                    bool ran = false, done = true;
                    for (unsigned j = 0; j < threads; j++) {
                        const unsigned i = reverse ? threads - 1 - j : j;
                        if (b.fibers[i].state == RUNNABLE) {
                            b.cur = i;
                            ran = true;
                            switch_to(b.sched, b.fibers[i].ctx);
                        }
                        if (b.fibers[i].state != DONE) done = false;
                    }
                    if (done) {
                        if (!b.error && !b.prefetches.empty())
                            b.error = "a warp prefetched bytes into L2 that it did not copy with a later cp.async";
                        if (b.error) {
                            snprintf(err, err_len, "block (%u, %u, %u): %s", x, y, z, b.error);
                            rc = -1;
                        }
                        break;
                    }
                    if (!ran) {
                        unsigned waiting = 0, first = 0;
                        for (unsigned i = 0; i < threads; i++)
                            if (b.fibers[i].state == WAITING && waiting++ == 0) first = i;
                        snprintf(err, err_len,
                                 "deadlock in block (%u, %u, %u): %u of %u threads wait at a barrier that the "
                                 "others never reach (first waiting thread %u; %u exited)",
                                 x, y, z, waiting, threads, first, threads - b.alive);
                        rc = -1;
                        break;
                    }
                }
            }
    for (const Block::CgRead& r : b.cg_reads) {
        uint32_t now;
        memcpy(&now, r.p, 4);
        if (rc == 0 && now != r.bits) {
            snprintf(err, err_len,
                     "block (%u, %u, %u) read %p through L2 before a later block of the launch changed it: "
                     "its read was not ordered after that write",
                     r.block.x, r.block.y, r.block.z, r.p);
            rc = -1;
        }
    }
    blk = saved;
    return rc;
}

}  // namespace kvsim

// CUDA's built-in variables and functions.
#define threadIdx (kvsim::Dim3{kvsim::me().tid, 0, 0})
#define blockIdx (kvsim::blk->block_idx)
#define blockDim (kvsim::blk->block_dim)
#define gridDim (kvsim::blk->grid_dim)

inline void __syncthreads() { kvsim::sync_block(); }
inline void __syncwarp(unsigned = 0xffffffffu) { kvsim::sync_warp(); }
template <class T>
inline T __shfl_xor_sync(unsigned, T v, int mask) {
    return kvsim::shfl_xor(v, mask);
}
template <class T>
inline T __shfl_sync(unsigned, T v, int src) {
    return kvsim::shfl(v, [src](unsigned) { return (unsigned)src; });
}
inline int __any_sync(unsigned, int x) { return kvsim::any_lane(x != 0); }
template <class T>
inline T __ldg(const T* p) {
    return *p;
}
inline float __int_as_float(int i) {
    float f;
    memcpy(&f, &i, 4);
    return f;
}
inline float __uint_as_float(unsigned u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned u;
    memcpy(&u, &f, 4);
    return u;
}
inline float __expf(float x) { return expf(x); }
// IEEE f32 operations that the device never fuses (the simulator is compiled with
// -ffp-contract=off, so plain operators are not fused either).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
