#!/usr/bin/env python3
"""The static cost of the tensor-core decode kernel, without a GPU.

Disassembles the cubins that `gpu_check cubins DIR` writes (`decode-kivi*.cubin` at the
benchmark's head_dim 128, `decode-hs256-kivi*.cubin` at 256; nvdisasm: from the CUDA toolkit or
the PyPI package nvidia-cuda-nvdisasm), finds the loop of kv_decode_mma that handles one
quantized group per warp per iteration (the loop holding the HMMA instructions), and counts its
instructions by kind. `gpu_check cubins` builds the kernel with KV_COST_PROBE, so the loop holds
the path most groups take (no position masking, no accumulator rescale). From the counts it
estimates the cycles one group costs a multiprocessor, the largest of: issue (4 schedulers, one
instruction each per cycle), the integer pipes (half rate on sm_80/sm_90), shared memory (128
bytes per cycle: one wavefront for a warp's 32-bit access, two for 64-bit, four for 128-bit,
bank conflicts not counted), and the tensor cores (an m16n8k16 f16 mma takes one of the four
sub-partitions' tensor cores 4 cycles at the full rate of an H100/H200, `--hmma-cycles` for
another rate: Hopper's full rate is wgmma's, and mma.sync may not reach it); this assumes the pipes
overlap perfectly, so it is a lower bound. It compares that with the cycles the group's bytes take at a
device's memory bandwidth: while the first is larger, the kernel is bound by instructions, not
by memory.

For the `chunk-kivi*.cubin` of the same folder (the module chunks of queries launch) it counts
what 32 quantized tokens cost for 64 query vectors in kv_decode_mma (8 blocks of 8 vectors)
and in kv_prefill_q (one block of 64), and what one tile of 32 full-precision tokens costs
kv_prefill_fp's block, per query vector and token; the same for `chunk-hs256-kivi*.cubin`
(head_dim 256: 32 query vectors per block, two warps sharing each 16; kv_decode_mma's blocks
take 4).

Usage: sass_mix.py DIR [--nvdisasm PATH] [--bandwidth-gbs 4800 --sms 132 --clock-ghz 1.98]
[--hmma-cycles 4] (the defaults are an H200's).
"""
import argparse
import collections
import glob
import os
import re
import shutil
import subprocess
import sys

INT = {"LOP3", "SHF", "PRMT", "IADD3", "IMAD", "LEA", "ISETP", "IABS", "IMNMX", "VIADD", "SEL", "BMSK", "POPC", "FLO"}
# Shared-memory and async-copy instructions: about one per multiprocessor cycle (one wavefront).
SHARED = {"LDS", "STS", "LDSM", "LDGSTS"}
# Tensor-core cycles of one sub-partition per HMMA.16816 at full rate (sm_80: 8).
HMMA_CYCLES = 4
FREE = {"NOP", "BSSY", "BSYNC", "BRA", "WARPSYNC", "DEPBAR", "LDGDEPBAR"}


def nvdisasm_path(given):
    if given:
        return given
    found = shutil.which("nvdisasm")
    if found:
        return found
    toolkit = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvdisasm")
    if os.path.exists(toolkit):
        return toolkit
    try:
        import nvidia  # noqa: F401  (the PyPI packages)

        for p in nvidia.__path__:
            for c in glob.glob(os.path.join(p, "*", "bin", "nvdisasm")):
                return c
    except ImportError:
        pass
    sys.exit("nvdisasm not found: pip install nvidia-cuda-nvdisasm, or pass --nvdisasm")


def loop_of(sass, kernel):
    """The instructions of the innermost loop of `kernel` that holds HMMA instructions."""
    text = sass.split(f".text.{kernel}:", 1)[1].split(".text.", 1)[0]
    lines = text.splitlines()
    labels = {}
    insts = []  # (line index, opcode, target label or None)
    for i, line in enumerate(lines):
        m = re.match(r"^(\.L_x_\d+):", line)
        if m:
            labels[m.group(1)] = len(insts)
            continue
        m = re.match(r"^\s+/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_]+)(\.[A-Z0-9_.]*)?\s*(.*?);", line)
        if m:
            target = re.search(r"\(\s*(\.L_x_\d+)\s*\)", m.group(4))
            # "@!PT": never executed (the compiler's padding); it takes an issue slot only.
            mods = (m.group(3) or "") + (" never" if (m.group(1) or "").strip() == "@!PT" else "")
            insts.append((m.group(2), target.group(1) if target else None, mods))
    best = None
    for j, (op, target, _) in enumerate(insts):
        if op == "BRA" and target in labels and labels[target] <= j:
            body = insts[labels[target]: j + 1]
            n_mma = sum(1 for o, _, _ in body if o == "HMMA")
            if n_mma and (best is None or len(body) < len(best)):
                best = body
    if best is None:
        sys.exit(f"no loop with HMMA found in {kernel}")
    return [(o, mods) for o, _, mods in best]


def wavefronts(op, mods):
    """Shared-memory wavefronts of one warp-wide access (no bank conflicts)."""
    if op not in SHARED or mods.endswith(" never"):
        return 0
    if op == "LDSM":
        m = re.search(r"\.X(\d)", mods)
        return int(m.group(1)) if m else 1
    if ".128" in mods:
        return 4
    if ".64" in mods:
        return 2
    return 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--nvdisasm")
    ap.add_argument("--bandwidth-gbs", type=float, default=4800)
    ap.add_argument("--sms", type=int, default=132)
    ap.add_argument("--clock-ghz", type=float, default=1.98)
    ap.add_argument("--hmma-cycles", type=float, default=HMMA_CYCLES,
                    help="tensor-core cycles of one sub-partition per HMMA.16816")
    a = ap.parse_args()
    tool = nvdisasm_path(a.nvdisasm)
    # decode-kiviB.cubin: the benchmark's heads (head_dim 128); decode-hsH-kiviB.cubin: head_dim H.
    for path in sorted(glob.glob(os.path.join(a.dir, "decode-*kivi*.cubin"))):
        bits = int(re.search(r"kivi(\d+)", path).group(1))
        hs = re.search(r"-hs(\d+)-", os.path.basename(path))
        hd = int(hs.group(1)) if hs else 128
        sass = subprocess.run([tool, "-c", path], capture_output=True, text=True, check=True).stdout
        body = loop_of(sass, "kv_decode_mma")
        mix = collections.Counter(o for o, _ in body)
        n = sum(c for o, c in mix.items() if o not in FREE)
        issue = n / 4
        int_pipe = sum(c for o, c in mix.items() if o in INT) * 2 / 4
        shared = sum(wavefronts(o, mods) for o, mods in body)
        tensor = mix["HMMA"] * a.hmma_cycles / 4
        cycles = max(issue, int_pipe, shared, tensor)
        # One group of 32 tokens of one KV head of hd channels: codes, f16 scales and zeros (value
        # groups of 32 channels).
        group_bytes = 2 * 32 * hd * bits // 8 + 2 * 2 * hd + 2 * 2 * 32 * (hd // 32)
        mem_cycles = group_bytes / (a.bandwidth_gbs * 1e9 / a.sms / (a.clock_ghz * 1e9))
        top = ", ".join(f"{o} {c}" for o, c in mix.most_common(12))
        label = f"KIVI-{bits}" + ("" if hd == 128 else f", head_dim {hd}")
        print(f"{label}: {n} instructions per group per warp ({mix['HMMA']} HMMA); at least {cycles:.0f} "
              f"cycles per group per multiprocessor (issue {issue:.0f}, integer pipe {int_pipe:.0f}, shared "
              f"memory {shared:.0f}, tensor cores {tensor:.0f}) against {mem_cycles:.0f} for its "
              f"{group_bytes} bytes: {'instruction' if cycles > mem_cycles else 'memory'}-bound, "
              f"at most {min(1.0, mem_cycles / cycles):.0%} of the bandwidth")
        print(f"  {top}")
    # Chunks of queries (the module for 8 query vectors, `chunk-kivi*.cubin`, or for 4 at head_dim
    # 256, `chunk-hs256-kivi*.cubin`): the quantized groups of 64 query vectors (32 at 256) cost
    # 8 kv_decode_mma blocks one group each (one warp), or one kv_prefill_q block one tile of 32
    # tokens (4 warps).
    for path in sorted(glob.glob(os.path.join(a.dir, "chunk-*kivi*.cubin"))):
        bits = int(re.search(r"kivi(\d+)", path).group(1))
        hs = re.search(r"-hs(\d+)-", os.path.basename(path))
        hd = int(hs.group(1)) if hs else 128
        sass = subprocess.run([tool, "-c", path], capture_output=True, text=True, check=True).stdout
        # A prompt's tokens: one tile of 32 per warp (each warp's 16 query vectors; at head_dim
        # 256 two warps share them, half of the output channels each).
        mix = collections.Counter(o for o, _ in loop_of(sass, "kv_prefill_fp"))
        n = sum(c for o, c in mix.items() if o not in FREE)
        vectors = 64 if hd <= 128 else 32
        print(f"prompts, KIVI-{bits}, head_dim {hd}: a tile of 32 tokens for {vectors} query vectors: 4 x {n} "
              f"instructions ({4 * mix['HMMA']} HMMA), {4 * n / (vectors * 32):.2f} per query vector and token "
              f"({4 * mix['HMMA'] / (vectors * 32):.3f} HMMA)")
        # A chunk's quantized groups: kv_decode_mma takes 8 query vectors per block (4 at head_dim
        # 256), so `vectors` of them take 8 of its blocks, one group each (one warp).
        counts = []
        for kernel, times in (("kv_decode_mma", 8), ("kv_prefill_q", 4)):
            mix = collections.Counter(o for o, _ in loop_of(sass, kernel))
            n = sum(c for o, c in mix.items() if o not in FREE)
            counts.append(f"{kernel} {times} x {n} = {times * n} ({times * mix['HMMA']} HMMA)")
        print(f"chunks, KIVI-{bits}, head_dim {hd}: 32 quantized tokens for {vectors} query vectors: "
              + "; ".join(counts))


if __name__ == "__main__":
    main()
