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
by memory. It lists the shared-memory wavefronts by instruction and width, to compare with
Nsight Compute's count on a GPU (`scripts/ncu_per_group.py`).

For the `chunk-kivi*.cubin` of the same folder (the module chunks of queries launch) it counts
what 32 quantized tokens cost for 64 query vectors in kv_decode_mma (8 blocks of 8 vectors)
and in kv_prefill_q (one block of 64), and what one tile of 32 full-precision tokens costs
kv_prefill_fp's block, per query vector and token; the same for `chunk-hs256-kivi*.cubin`
(head_dim 256: 32 query vectors per block, two warps sharing each 16; kv_decode_mma's blocks
take 4).

For each decode loop it also plays one warp through three iterations alone, with the fixed
stalls the compiler encoded and assumed latencies for what it waits on through scoreboards
(shared-memory loads, shuffles, ex2: `LATENCY`), and divides the cycles an iteration takes by
its instructions: how many such warps a scheduler needs to have an instruction to issue every
cycle (if the latencies are as assumed and memory keeps up), to compare with the kernel's
occupancy (kv_decode_mma: 3 blocks of 4 warps a multiprocessor, 3 warps a scheduler, where
shared memory allows).

Usage: sass_mix.py DIR [--nvdisasm PATH] [--bandwidth-gbs 4800 --sms 132 --clock-ghz 1.98]
[--hmma-cycles 4] [--latency LDS=30 ...] (the defaults are an H200's).
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


Inst = collections.namedtuple("Inst", "op mods target stall wbar wait text")


def disassemble(tool, path):
    """nvdisasm's listing of `path` with each instruction's encoding (`-hex`)."""
    return subprocess.run([tool, "-c", "-hex", path], capture_output=True, text=True, check=True).stdout


def loop_of(sass, kernel):
    """The instructions of the innermost loop of `kernel` that holds HMMA instructions.

    Each with its scheduling control (sm_70 and later: bits 105-125 of the 128-bit encoding, the
    second word nvdisasm prints; Jia et al., "Dissecting the NVIDIA Volta GPU Architecture via
    Microbenchmarking", 2018): the cycles the warp stalls after issuing it (`stall`, the
    compiler's fixed latencies), the scoreboard its variable-latency result sets (`wbar`, 7 for
    none) and the scoreboards it waits for before it issues (`wait`, a mask of 6)."""
    text = sass.split(f".text.{kernel}:", 1)[1].split(".text.", 1)[0]
    lines = text.splitlines()
    labels = {}
    insts = []
    for i, line in enumerate(lines):
        m = re.match(r"^(\.L_x_\d+):", line)
        if m:
            labels[m.group(1)] = len(insts)
            continue
        m = re.match(r"^\s+/\*[0-9a-f]+\*/\s+((@!?U?P\w+\s+)?([A-Z0-9_]+)(\.[A-Z0-9_.]*)?\s*(.*?));", line)
        if m:
            target = re.search(r"\(\s*(\.L_x_\d+)\s*\)", m.group(5))
            # "@!PT": never executed (the compiler's padding); it takes an issue slot only.
            mods = (m.group(4) or "") + (" never" if (m.group(2) or "").strip() == "@!PT" else "")
            hi = re.search(r"/\* (0x[0-9a-f]{16}) \*/", lines[i + 1]) if i + 1 < len(lines) else None
            ctl = int(hi.group(1), 16) if hi else 0
            insts.append(Inst(m.group(3), mods, target.group(1) if target else None, (ctl >> 41) & 15,
                              (ctl >> 46) & 7, (ctl >> 52) & 63, m.group(1)))
    best = None
    for j, inst in enumerate(insts):
        if inst.op == "BRA" and inst.target in labels and labels[inst.target] <= j:
            body = insts[labels[inst.target]: j + 1]
            n_mma = sum(1 for x in body if x.op == "HMMA")
            if n_mma and (best is None or len(body) < len(best)):
                best = body
    if best is None:
        sys.exit(f"no loop with HMMA found in {kernel}")
    return best


def global_waits(body):
    """For the loop's loads from global memory (LDG), the soonest any is waited for: the
    instructions and the stall cycles (at least one an instruction) from the load to the first
    one that waits for its scoreboard, round the loop if need be. A load from L2 or memory
    takes several hundred cycles, one from L1 about thirty: a wait sooner than that stops the
    warp. (Scoreboards are shared: waiting for one result waits for every load that set the
    same one.) None when the loop has no such load."""
    soonest = None
    n = len(body)
    for k, x in enumerate(body):
        if x.op != "LDG" or x.wbar == 7:
            continue
        cycles = 0
        for step in range(1, n + 1):
            y = body[(k + step) % n]
            if y.wait >> x.wbar & 1:
                if soonest is None or cycles < soonest[1]:
                    soonest = (step, cycles, y.text)
                break
            cycles += max(1, y.stall)
    return soonest


# Assumed latencies, in cycles from issue, of the results a warp waits for through a scoreboard
# (`warp_iteration`): shared-memory loads, movmatrix, shuffles, MUFU (ex2), constant and uniform
# loads, and global loads served by L1 (about 30 cycles for a shared-memory load on sm_80 and
# sm_90 by published microbenchmarks; the rest are guesses of the same order). `--latency OP=N`
# changes one.
LATENCY = {"LDS": 30, "LDSM": 30, "MOVM": 30, "SHFL": 25, "MUFU": 18, "LDC": 10, "S2UR": 10, "LDG": 35}


def warp_iteration(body, latency):
    """The cycles one warp alone takes per iteration of the loop, and how many of them it waits
    for results of variable latency: its fixed stalls, plus its waits for the scoreboards of
    those results, each ready `latency[op]` cycles after its instruction issued (a scoreboard
    that several set is ready after the last). The steady state: the third of three
    iterations. cp.async copies are taken to have landed when the loop waits for them (memory
    keeps up); the other warps of the scheduler take none of its issue slots."""
    t, ready, waited = 0, [0] * 6, 0
    for _ in range(3):
        start, waited0 = t, waited
        for x in body:
            if x.wait:
                r = max([ready[b] for b in range(6) if x.wait >> b & 1] + [t])
                waited += r - t
                t = r
            if x.wbar != 7:
                ready[x.wbar] = max(ready[x.wbar], t + latency.get(x.op, 0))
            t += max(1, x.stall)
    return t - start, waited - waited0


def waits_line(body):
    """The loop's fixed stall cycles per iteration, and its soonest wait for a global load."""
    stalls = sum(max(1, x.stall) for x in body)
    g = global_waits(body)
    tail = "no global loads" if g is None else (
        f"global loads first waited for {g[0]} instructions ({g[1]} stall cycles) after their issue, "
        f"by `{g[2]}`")
    return f"  one warp stalls {stalls} cycles per iteration on fixed latencies; {tail}"


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


def shared_line(body):
    """The loop's shared-memory wavefronts per iteration by instruction and width (LDGSTS: the
    cp.async copies' writes), to set beside Nsight Compute's count of them on a GPU."""
    by = collections.Counter()
    for x in body:
        w = wavefronts(x.op, x.mods)
        if w:
            by[(x.op + x.mods.split(".E")[0] if x.op == "LDGSTS" else x.op + x.mods, w)] += 1
    parts = ", ".join(f"{n} {name} x {w}" for (name, w), n in sorted(by.items(), key=lambda i: -i[0][1] * i[1]))
    return f"  shared memory: {sum(w * n for (_, w), n in by.items())} wavefronts per iteration ({parts})"


def cubin(tool, path):
    """The key bits and head_dim of a cubin `gpu_check cubins` wrote (its name says them:
    NAME-kiviB.cubin at head_dim 128, NAME-hsH-kiviB.cubin at H), and its disassembly."""
    bits = int(re.search(r"kivi(\d+)", path).group(1))
    hs = re.search(r"-hs(\d+)-", os.path.basename(path))
    return bits, int(hs.group(1)) if hs else 128, disassemble(tool, path)


def mix_of(body):
    """The loop's instructions by opcode, and how many take an issue slot."""
    mix = collections.Counter(x.op for x in body)
    return mix, sum(c for o, c in mix.items() if o not in FREE)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--nvdisasm")
    ap.add_argument("--bandwidth-gbs", type=float, default=4800)
    ap.add_argument("--sms", type=int, default=132)
    ap.add_argument("--clock-ghz", type=float, default=1.98)
    ap.add_argument("--hmma-cycles", type=float, default=HMMA_CYCLES,
                    help="tensor-core cycles of one sub-partition per HMMA.16816")
    ap.add_argument("--latency", action="append", default=[], metavar="OP=N",
                    help="assumed latency of one kind of instruction's result (warp_iteration)")
    a = ap.parse_args()
    latency = dict(LATENCY)
    for o in a.latency:
        op, n = o.split("=")
        latency[op] = int(n)
    tool = nvdisasm_path(a.nvdisasm)
    # decode-kiviB.cubin: the benchmark's heads (head_dim 128); decode-hsH-kiviB.cubin: head_dim H.
    for path in sorted(glob.glob(os.path.join(a.dir, "decode-*kivi*.cubin"))):
        bits, hd, sass = cubin(tool, path)
        body = loop_of(sass, "kv_decode_mma")
        mix, n = mix_of(body)
        issue = n / 4
        int_pipe = sum(c for o, c in mix.items() if o in INT) * 2 / 4
        shared = sum(wavefronts(x.op, x.mods) for x in body)
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
        print(shared_line(body))
        print(waits_line(body))
        cyc, waited = warp_iteration(body, latency)
        print(f"  one warp alone: about {cyc} cycles per iteration, {waited} of them waiting for results of "
              f"variable latency (as assumed): {cyc / n:.2f} such warps per scheduler would give it an "
              f"instruction to issue every cycle")
    # Chunks of queries (the module for 8 query vectors, `chunk-kivi*.cubin`, or for 4 at head_dim
    # 256, `chunk-hs256-kivi*.cubin`): the quantized groups of 64 query vectors (32 at 256) cost
    # 8 kv_decode_mma blocks one group each (one warp), or one kv_prefill_q block one tile of 32
    # tokens (4 warps).
    for path in sorted(glob.glob(os.path.join(a.dir, "chunk-*kivi*.cubin"))):
        bits, hd, sass = cubin(tool, path)
        # A prompt's tokens: one tile of 32 per warp (each warp's 16 query vectors; at head_dim
        # 256 two warps share them, half of the output channels each).
        body = loop_of(sass, "kv_prefill_fp")
        mix, n = mix_of(body)
        vectors = 64 if hd <= 128 else 32
        print(f"prompts, KIVI-{bits}, head_dim {hd}: a tile of 32 tokens for {vectors} query vectors: 4 x {n} "
              f"instructions ({4 * mix['HMMA']} HMMA), {4 * n / (vectors * 32):.2f} per query vector and token "
              f"({4 * mix['HMMA'] / (vectors * 32):.3f} HMMA)")
        print(waits_line(body))
        # A chunk's quantized groups: kv_decode_mma takes 8 query vectors per block (4 at head_dim
        # 256), so `vectors` of them take 8 of its blocks, one group each (one warp).
        counts = []
        waits = []
        for kernel, times in (("kv_decode_mma", 8), ("kv_prefill_q", 4)):
            body = loop_of(sass, kernel)
            waits.append(f"{kernel}:\n" + waits_line(body))
            mix, n = mix_of(body)
            counts.append(f"{kernel} {times} x {n} = {times * n} ({times * mix['HMMA']} HMMA)")
        print(f"chunks, KIVI-{bits}, head_dim {hd}: 32 quantized tokens for {vectors} query vectors: "
              + "; ".join(counts))
        print("\n".join(waits))


if __name__ == "__main__":
    main()
