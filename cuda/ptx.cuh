// Every inline PTX instruction of the kernels, each in one small function, so that nothing else
// in the kernels depends on the hardware's instruction set. The host simulator (cuda/host/)
// compiles the kernels with cuda/host/ptx.h in this file's place.
#pragma once

// f16 / bf16 bit patterns to and from f32, rounding to nearest even.
__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ u16 f2h(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
__device__ __forceinline__ u16 f2bf(float f) {
    u16 b;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(b) : "f"(f));
    return b;
}
// An f16 pair: x0 in the low half, x1 in the high half.
__device__ __forceinline__ u32 f2h2(float x0, float x1) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(x1), "f"(x0));
    return r;
}
// A bf16 pair: x0 in the low half, x1 in the high half (sm_80+).
__device__ __forceinline__ u32 f2bf2(float x0, float x1) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(x1), "f"(x0));
    return r;
}
// The difference of two f16 pairs, half by half.
__device__ __forceinline__ u32 sub_h2(u32 a, u32 b) {
    u32 r;
    asm("sub.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    return r;
}

// a * b on f16 pairs, half by half, rounded to nearest even.
__device__ __forceinline__ u32 mul_h2(u32 a, u32 b) {
    u32 r;
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    return r;
}
// a * b + c on f16 pairs, half by half, rounded once to nearest even.
__device__ __forceinline__ u32 fma_h2(u32 a, u32 b, u32 c) {
    u32 r;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
    return r;
}

// a * b - c on f16 pairs, rounded once.
__device__ __forceinline__ u32 fms_h2(u32 a, u32 b, u32 c) {
    u32 r;
    asm("{ .reg .b32 n; neg.f16x2 n, %3; fma.rn.f16x2 %0, %1, %2, n; }" : "=r"(r) : "r"(a), "r"(b), "r"(c));
    return r;
}

// 2^x (approximate, about 2 ulp; results below 2^-126 flush to zero, 2^-inf = 0).
__device__ __forceinline__ float ex2(float x) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}

// Byte permute: the bytes of (a, b) numbered 0-3 and 4-7, picked by the selector's nibbles.
__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 sel) {
    u32 d;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
    return d;
}

// Asynchronous 16-byte copies from global to shared memory (sm_80+), committed in groups.
// The shared-memory address comes from the compiler's own conversion, which it folds into
// constant offsets of one base register.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
    const u32 s = (u32)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
// Waits until at most N committed groups of this thread are still in flight.
template <int N>
__device__ __forceinline__ void cp_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// A hint that the 128-byte line holding p will be read soon: it is brought into L2
// asynchronously, with nothing to wait for and no effect on what any load returns.
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

// A device-wide fence (membar.gl): this thread's writes before it are seen by every thread of
// the device before its writes after it.
__device__ __forceinline__ void fence_gpu() { asm volatile("membar.gl;" ::: "memory"); }
// Adds x to *p atomically; returns the value before.
__device__ __forceinline__ u32 atom_add_u32(u32* p, u32 x) {
    u32 old;
    asm volatile("atom.global.add.u32 %0, [%1], %2;" : "=r"(old) : "l"(p), "r"(x) : "memory");
    return old;
}
// A load that bypasses this multiprocessor's L1 (ld.global.cg): data other blocks wrote during
// this kernel, seen through L2.
__device__ __forceinline__ float ld_cg(const float* p) {
    float x;
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(x) : "l"(p) : "memory");
    return x;
}

// The transpose of an 8x8 matrix of 16-bit values spread over the warp (sm_75+): lane 4g + t
// holds row g, columns 2t (low half) and 2t + 1, before and after.
__device__ __forceinline__ u32 movmatrix_t(u32 x) {
    u32 r;
    asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(r) : "r"(x));
    return r;
}

// Four 8x8 matrices of 16-bit values from shared memory (ldmatrix, sm_75+): lanes 8i .. 8i + 7
// give the addresses of matrix i's rows (16 bytes each); lane 4g + t gets row g, columns 2t
// (low half) and 2t + 1 of matrix i in ri.
__device__ __forceinline__ void ldsm_x4(const void* row, u32& r0, u32& r1, u32& r2, u32& r3) {
    const u32 s = (u32)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(s));
}
// Two 8x8 matrices (ldmatrix .x2): lanes 0 .. 15 give the row addresses.
__device__ __forceinline__ void ldsm_x2(const void* row, u32& r0, u32& r1) {
    const u32 s = (u32)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];" : "=r"(r0), "=r"(r1) : "r"(s));
}
// Four, transposed: lane 4g + t gets rows 2t (low half) and 2t + 1, column g.
__device__ __forceinline__ void ldsm_x4_t(const void* row, u32& r0, u32& r1, u32& r2, u32& r3) {
    const u32 s = (u32)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(s));
}

// D = A * B + C on tensor cores (sm_80+): m16n8k16, f16 A (row-major) and B (column-major), f32
// C and D; the fragments are spread over the warp as the PTX ISA lays them out.
__device__ __forceinline__ void mma16816(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// The same with bf16 A and B.
__device__ __forceinline__ void mma16816_bf16(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
