// The PTX helpers of cuda/ptx.cuh in C++, for the host simulator (cuda/host/sim.h): the same
// functions, computing what the PTX ISA says the instructions compute.
#pragma once

// f16 bits to f32 (exact).
inline float h2f(u16 h) {
    u32 sign = (u32)(h >> 15) << 31, e = (h >> 10) & 31, m = h & 1023;
    u32 bits;
    if (e == 31) {
        bits = sign | 0x7f800000u | (m << 13);
    } else if (e == 0) {
        if (m == 0) {
            bits = sign;
        } else {
            float f = (float)m * (1.0f / 16777216.0f);  // m * 2^-24
            return sign ? -f : f;
        }
    } else {
        bits = sign | ((e + 112) << 23) | (m << 13);
    }
    return __uint_as_float(bits);
}

// f32 to f16 bits, rounding to nearest even (cvt.rn.f16.f32).
inline u16 f2h(float f) {
    u32 x = __float_as_uint(f);
    u32 sign = (x >> 16) & 0x8000u;
    u32 ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return (u16)(sign | 0x7e00u);  // NaN
    if (ax >= 0x477ff000u) return (u16)(sign | 0x7c00u);  // rounds to infinity (65520 and up)
    if (ax < 0x38800000u) {
        // Below the smallest normal f16: a multiple of 2^-24, rounded to nearest even.
        float a = __uint_as_float(ax) * 16777216.0f;
        float r = nearbyintf(a);  // the default rounding mode: to nearest even
        return (u16)(sign | (u32)r);
    }
    u32 e = (ax >> 23) - 112, m = ax & 0x7fffffu;
    u32 h = (e << 10) | (m >> 13);
    u32 rest = m & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1))) h++;
    return (u16)(sign | h);
}

// f32 to bf16 bits, rounding to nearest even (cvt.rn.bf16.f32).
inline u16 f2bf(float f) {
    u32 x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (u16)((x >> 16) | 0x40u);  // NaN stays NaN
    x += 0x7fffu + ((x >> 16) & 1);
    return (u16)(x >> 16);
}

inline u32 f2h2(float x0, float x1) { return (u32)f2h(x0) | ((u32)f2h(x1) << 16); }

inline u32 sub_h2(u32 a, u32 b) {
    u16 lo = f2h(h2f((u16)a) - h2f((u16)b));
    u16 hi = f2h(h2f((u16)(a >> 16)) - h2f((u16)(b >> 16)));
    return (u32)lo | ((u32)hi << 16);
}

// A double to f16 bits, rounding to nearest even (finite inputs).
inline u16 f2h_d(double d) {
    u32 sign = d < 0 ? 0x8000u : 0;
    double a = fabs(d);
    if (a >= 65520.0) return (u16)(sign | 0x7c00u);
    if (a < 6.103515625e-05) return (u16)(sign | (u32)nearbyint(a * 16777216.0));  // multiples of 2^-24
    int ex;
    frexp(a, &ex);  // a = m * 2^ex, m in [0.5, 1)
    int e = ex - 1;
    double r = nearbyint(ldexp(a, 10 - e));  // in [1024, 2048]
    if (r == 2048.0) {
        r = 1024.0;
        e++;
    }
    if (e + 15 >= 31) return (u16)(sign | 0x7c00u);
    return (u16)(sign | ((u32)(e + 15) << 10) | ((u32)r - 1024u));
}

// fma.rn.f16x2 half by half: the product and sum are exact in double (or below f16's rounding),
// then rounded once to f16.
inline u16 fma1(u16 a, u16 b, u16 c) {
    double r = (double)h2f(a) * (double)h2f(b) + (double)h2f(c);
    return f2h_d(r);
}
inline u32 fma_h2(u32 a, u32 b, u32 c) {
    return (u32)fma1((u16)a, (u16)b, (u16)c) | ((u32)fma1((u16)(a >> 16), (u16)(b >> 16), (u16)(c >> 16)) << 16);
}

inline u32 mul_h2(u32 a, u32 b) {
    return (u32)f2h_d((double)h2f((u16)a) * h2f((u16)b)) |
           ((u32)f2h_d((double)h2f((u16)(a >> 16)) * h2f((u16)(b >> 16))) << 16);
}

inline u32 fms_h2(u32 a, u32 b, u32 c) { return fma_h2(a, b, c ^ 0x80008000u); }

// ex2.approx.ftz.f32: 2^x, results below the smallest normal f32 flushed to zero.
inline float ex2(float x) {
    float r = exp2f(x);
    return std::fabs(r) < 1.17549435e-38f ? 0.0f : r;
}

// prmt.b32 in its default mode: byte i of the result is byte (sel >> 4i) & 7 of {b, a}.
inline u32 prmt(u32 a, u32 b, u32 sel) {
    u64 ab = (u64)a | ((u64)b << 32);
    u32 d = 0;
    for (u32 i = 0; i < 4; i++) {
        u32 s = (sel >> (4 * i)) & 15;
        u32 byte = (u32)(ab >> (8 * (s & 7))) & 0xffu;
        if (s & 8) byte = (byte & 0x80u) ? 0xffu : 0;  // sign replication
        d |= byte << (8 * i);
    }
    return d;
}

// The simulator runs one block at a time: fences have nothing to order, atomics nothing to race;
// what loads through L2 read is checked when the launch ends instead (ld_cg).
inline void fence_gpu() {}
inline u32 atom_add_u32(u32* p, u32 x) {
    const u32 old = *p;
    *p = old + x;
    return old;
}
// A load through L2: recorded, so that the launch fails if a later block changes what it read.
inline float ld_cg(const float* p) {
    const float x = *p;
    uint32_t bits;
    memcpy(&bits, &x, 4);
    kvsim::blk->cg_reads.push_back({p, bits, kvsim::blk->block_idx});
    return x;
}

// cp.async as the PTX ISA allows it to behave at its latest: the destination holds garbage from
// the copy's issue (0xff bytes) until a cp.async.wait_group lets the copy's group complete, and
// only then the source's bytes. A copy into a buffer still being read, or a wait that leaves
// needed groups in flight, changes the results.
inline void cp_async16(void* smem, const void* gmem) {
    if ((((uintptr_t)smem) | ((uintptr_t)gmem)) & 15) kvsim::fault("cp.async of 16 bytes from or to an address not 16-byte aligned");
    kvsim::Fiber& f = kvsim::me();
    memset(smem, 0xff, 16);
    f.copies.push_back({smem, gmem, f.commits});
    kvsim::copied(gmem);
}
inline void cp_commit() { kvsim::me().commits++; }
// cp.async.wait_group N: every committed group but the N most recent completes.
template <int N>
inline void cp_wait() {
    kvsim::Fiber& f = kvsim::me();
    const unsigned done = f.commits > (unsigned)N ? f.commits - (unsigned)N : 0u;
    size_t keep = 0;
    for (size_t i = 0; i < f.copies.size(); i++) {
        if (f.copies[i].group < done) {
            memcpy(f.copies[i].dst, f.copies[i].src, 16);
        } else {
            f.copies[keep++] = f.copies[i];
        }
    }
    f.copies.resize(keep);
}

// prefetch.global.L2: no effect on any result. Recorded (kvsim::prefetched), and the block fails
// if the warp does not copy the 16 bytes at p with a cp.async of a later commit group: a hint at
// the wrong page or group, or one that comes too late, costs bandwidth on the device and would
// change nothing here.
inline void prefetch_l2(const void* p) { kvsim::prefetched(p); }

// movmatrix.sync.aligned.m8n8.trans.b16: lane 4g + t gets elements (2t, g) and (2t + 1, g) of
// the matrix whose row g, columns 2t, 2t + 1 lane 4g + t held.
inline u32 movmatrix_t(u32 x) {
    const u32 lo = kvsim::shfl(x, [](unsigned lane) { return 8 * (lane & 3) + (lane >> 2) / 2; });
    const u32 hi = kvsim::shfl(x, [](unsigned lane) { return 8 * (lane & 3) + 4 + (lane >> 2) / 2; });
    const u32 sh = ((kvsim::me().tid % 32) >> 2) & 1 ? 16 : 0;
    return ((lo >> sh) & 0xffffu) | (((hi >> sh) & 0xffffu) << 16);
}

// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16: each lane's row address goes to the lanes
// that read that row; lane 4g + t gets, of matrix i (rows given by lanes 8i .. 8i + 7), row g,
// columns 2t and 2t + 1 (trans: rows 2t and 2t + 1, column g).
inline u32 ldsm_one(const void* row, unsigned i, bool trans) {
    const uintptr_t a = (uintptr_t)row;
    if (a & 15) kvsim::fault("ldmatrix: a row address not 16-byte aligned");
    const u32 lo = (u32)a, hi = (u32)(a >> 32);
    const unsigned lane = kvsim::me().tid % 32, g = lane >> 2, t = lane & 3;
    auto at = [&](unsigned r, unsigned c) {
        const unsigned src = 8 * i + r;
        const u32 l = kvsim::shfl(lo, [src](unsigned) { return src; });
        const u32 h = kvsim::shfl(hi, [src](unsigned) { return src; });
        u16 x;
        memcpy(&x, (const void*)((((uintptr_t)h << 32) | l) + 2 * c), 2);
        return (u32)x;
    };
    // Every lane takes part in each shuffle, in the same order.
    const u32 x0 = trans ? at(2 * t, g) : at(g, 2 * t);
    const u32 x1 = trans ? at(2 * t + 1, g) : at(g, 2 * t + 1);
    return x0 | (x1 << 16);
}
inline void ldsm_x4(const void* row, u32& r0, u32& r1, u32& r2, u32& r3) {
    r0 = ldsm_one(row, 0, false);
    r1 = ldsm_one(row, 1, false);
    r2 = ldsm_one(row, 2, false);
    r3 = ldsm_one(row, 3, false);
}
inline void ldsm_x2(const void* row, u32& r0, u32& r1) {
    r0 = ldsm_one(row, 0, false);
    r1 = ldsm_one(row, 1, false);
}
inline void ldsm_x4_t(const void* row, u32& r0, u32& r1, u32& r2, u32& r3) {
    r0 = ldsm_one(row, 0, true);
    r1 = ldsm_one(row, 1, true);
    r2 = ldsm_one(row, 2, true);
    r3 = ldsm_one(row, 3, true);
}

inline void mma16816(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    const u32 a[4] = {a0, a1, a2, a3};
    const u32 b[2] = {b0, b1};
    kvsim::mma_m16n8k16(c, a, b);
}
inline void mma16816_bf16(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    const u32 a[4] = {a0, a1, a2, a3};
    const u32 b[2] = {b0, b1};
    kvsim::mma_m16n8k16<true>(c, a, b);
}

inline u32 f2bf2(float x0, float x1) { return (u32)f2bf(x0) | ((u32)f2bf(x1) << 16); }

namespace kvsim {
inline float h16(uint32_t bits) { return h2f((u16)bits); }
}  // namespace kvsim
