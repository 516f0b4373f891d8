#!/usr/bin/env python3
"""One kv_decode_mma launch's Nsight Compute counters per quantized group, to set beside the
static count of `scripts/sass_mix.py` (instructions and shared-memory wavefronts per group of
one KV head): a raw page (`ncu --page raw --print-units base`) and the launch's number of
groups.

Usage: ncu_per_group.py NCU_RAW_TXT GROUPS

Prints the warp instructions, shared-memory instructions, wavefronts and bank conflicts per
group (whichever of these counters the page holds), then the busiest pipes and the shared
memory's utilization. The counters are the whole launch's (the window's tokens and the merge of
the splits too), so per group they come out a little above the loop's own. Counters that the
page lacks are left out, and a page with none of them says so: ncu's names differ between
versions, and the whole page stays in the file.
"""
import re
import sys

# (label, counter): summed over the launch, shown per group.
PER_GROUP = [
    ("warp instructions", "smsp__inst_executed.sum"),
    ("shared-memory load instructions", "smsp__inst_executed_op_shared_ld.sum"),
    ("shared-memory load wavefronts", "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum"),
    ("shared-memory store wavefronts", "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_st.sum"),
    ("shared-memory wavefronts, all", "l1tex__data_pipe_lsu_wavefronts_mem_shared.sum"),
    ("shared-memory load bank conflicts", "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum"),
    ("cp.async (LDGSTS) instructions", "smsp__inst_executed_op_ldgsts.sum"),
]


def metrics(lines):
    """Counter name -> value, for the raw page's lines `name unit value` (or `name value`)."""
    out = {}
    for line in lines:
        parts = line.split()
        if len(parts) < 2 or "__" not in parts[0]:
            continue
        value = parts[-1].replace(",", "")
        if re.fullmatch(r"-?[0-9.]+(e[-+]?[0-9]+)?", value):
            out.setdefault(parts[0], float(value))
    return out


def report(m, groups):
    lines = []
    for label, name in PER_GROUP:
        if name in m:
            lines.append(f"{label} per group: {m[name] / groups:.1f}  ({name} {m[name]:.4g})")
    # The busiest pipes, and the shared memory's and L1's data pipe, in % of their peak.
    pipes = sorted(((v, k) for k, v in m.items() if "pipe" in k and k.endswith("pct_of_peak_sustained_active")),
                   reverse=True)
    lines += [f"{k}: {v:.1f}%" for v, k in pipes[:8]]
    lines += [f"{k}: {v:.1f}%" for k, v in sorted(m.items())
              if ("wavefronts" in k or "mio" in k) and "pct_of_peak" in k]
    return lines


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    with open(sys.argv[1], errors="replace") as f:
        m = metrics(f)
    groups = int(sys.argv[2])
    lines = report(m, groups)
    if not lines:
        print(f"none of the per-group counters or pipe utilizations found in {sys.argv[1]}")
        return
    print(f"per group of 32 tokens of one KV head ({groups} groups in the launch):")
    for line in lines:
        print("  " + line)


if __name__ == "__main__":
    main()
