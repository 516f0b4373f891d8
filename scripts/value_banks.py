#!/usr/bin/env python3
"""Shared-memory wavefronts of kv_decode_mma's 16-bit loads of value scales and zeros, per
group and warp, from the addresses cuda/decode_mma.cuh computes for them (value_lane,
value_step), with each pair of tokens loaded in one order by every lane (KV_MMA_VSWAP=0) and
in the order by lane the kernel takes. A load takes one wavefront per distinct word that its
lanes read in the bank where they read the most.

    python3 scripts/value_banks.py
"""


def wavefronts(byte_addrs):
    banks = {}
    for a in byte_addrs:
        banks.setdefault(a // 4 % 32, set()).add(a // 4)
    return max(len(words) for words in banks.values())


def per_group(head_dim, g, vg, swap):
    """(loads, wavefronts) of one group: lane 4 * q + t, tokens 2 NT t onwards."""
    nt, ng, nj = g // 8, head_dim // vg, head_dim // 8
    loads = total = 0
    for column in ("scale", "zero"):
        for kk in range(g // 16):
            for row in (2 * kk, 2 * kk + 1):
                for first in (True, False):
                    addrs = []
                    for lane in range(32):
                        q, t = lane >> 2, lane & 3
                        second_first = swap and (t & 2) != 0
                        o = nt * ng if first == second_first else 0
                        col = nj * q // vg if column == "scale" else min(q, ng - 1)
                        addrs.append(2 * (2 * nt * t * ng + col + o + row * ng))
                    total += wavefronts(addrs)
                    loads += 1
    return loads, total


def main():
    print("| shape | loads | wavefronts, one order | by lane |")
    print("|---|---:|---:|---:|")
    for hd, g, vg in [(128, 32, 32), (128, 16, 32), (128, 64, 64), (256, 32, 32), (256, 64, 32), (64, 32, 32)]:
        taken = (g // 8) * (hd // vg) // 2 % 32 != 0  # KV_MMA_VSWAP's default
        loads, one = per_group(hd, g, vg, False)
        _, by_lane = per_group(hd, g, vg, taken)
        note = "" if taken else " (not taken)"
        print(f"| head_dim {hd}, G = {g}, value groups of {vg} | {loads} | {one} | {by_lane}{note} |")


if __name__ == "__main__":
    main()
