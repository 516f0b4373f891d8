#!/usr/bin/env python3
"""The fp16 baseline and the copy bandwidth for the CUDA benchmark, with PyTorch.

Reads the JSON lines of `gpu_check bench`, times torch.nn.functional.scaled_dot_product_attention
on the same shapes (one query token per sequence, f16 keys and values of the full context,
grouped-query attention; the fastest of the flash, cuDNN and memory-efficient backends that takes
them), measures the device's copy bandwidth, and writes:
  results.jsonl   each bench line plus baseline_ms, speedup, copy_gbytes_per_s, bw_fraction,
                  and, for calls queued back to back, baseline_ms_stream and speedup_stream
  benchmarks.md   a table for BENCHMARKS.md
  targets.json    the issue's targets, met or not
With --prompt, also the lines of `gpu_check prompt` against causal SDPA over the same prompts
(prompt-results.jsonl, and a second table in benchmarks.md); and the chunked-prefill lines of
`gpu_check bench` against causal SDPA over the same rows and context (chunk-results.jsonl, and a
table in benchmarks.md).
Usage: gpu_baseline.py BENCH_JSONL OUT_DIR [--iters N] [--prompt PROMPT_JSONL]
"""
import json
import statistics
import sys

import torch


def timed(fn, iters):
    """Median milliseconds of fn() over iters runs, with CUDA events."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def streamed(fn, iters):
    """Milliseconds per fn() over iters runs queued back to back (no wait between them), with
    CUDA events around all of them: the device's time per call once the host keeps ahead."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    a = torch.cuda.Event(enable_timing=True)
    b = torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / iters


def copy_bandwidth(iters):
    """Bytes read plus bytes written per second by a device-to-device copy of 4 GiB."""
    n = 1 << 30  # f32 elements: 4 GiB
    src = torch.empty(n, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), iters)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * 4 * n / (ms * 1e-3) / 1e9


def sdpa_ms(batch, ctx, hd, nkv, nq, iters):
    """Median ms of SDPA on these shapes with the fastest backend that takes them (flash first),
    that backend's name, and its ms per call back to back (`streamed`)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(batch, nq, 1, hd, dtype=torch.float16, device="cuda")
    k = torch.randn(batch, nkv, ctx, hd, dtype=torch.float16, device="cuda")
    v = torch.randn(batch, nkv, ctx, hd, dtype=torch.float16, device="cuda")
    f = torch.nn.functional.scaled_dot_product_attention
    best = None
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel(backend):
                f(q, k, v, enable_gqa=True)
                torch.cuda.synchronize()
                ms = timed(lambda: f(q, k, v, enable_gqa=True), iters)
        except Exception:  # this backend does not take these shapes
            continue
        if best is None or ms < best[0]:
            best = (ms, backend.name)
    if best is None:  # whatever PyTorch picks by itself
        best = (timed(lambda: f(q, k, v, enable_gqa=True), iters), "default")
    if best[1] == "default":
        stream_ms = streamed(lambda: f(q, k, v, enable_gqa=True), iters)
    else:
        with sdpa_kernel(getattr(SDPBackend, best[1])):
            stream_ms = streamed(lambda: f(q, k, v, enable_gqa=True), iters)
    del q, k, v
    torch.cuda.empty_cache()
    return best[0], best[1], stream_ms


def records(path, kind, field):
    """The JSON lines of `path` of this kind that have this field."""
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("{"):
                r = json.loads(line)
                if r.get("kind") == kind and field in r:
                    out.append(r)
    return out


def causal_sdpa_ms(rows, ctx, hd, nkv, nq, iters):
    """Median ms of causal SDPA for the last `rows` positions of one sequence of `ctx` tokens as
    queries (a whole prompt when rows == ctx, a chunk over its past otherwise) with the fastest
    backend that takes it, and that backend's name."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, nq, rows, hd, dtype=torch.float16, device="cuda")
    k = torch.randn(1, nkv, ctx, hd, dtype=torch.float16, device="cuda")
    v = torch.randn(1, nkv, ctx, hd, dtype=torch.float16, device="cuda")
    f = torch.nn.functional.scaled_dot_product_attention
    if rows == ctx:
        kw = {"is_causal": True}
    else:
        # Row i sees positions up to ctx - rows + i (is_causal would align the rows to the start).
        from torch.nn.attention.bias import causal_lower_right

        kw = {"attn_mask": causal_lower_right(rows, ctx)}
    best = None
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel(backend):
                f(q, k, v, enable_gqa=True, **kw)
                torch.cuda.synchronize()
                ms = timed(lambda: f(q, k, v, enable_gqa=True, **kw), iters)
        except Exception:  # this backend does not take these shapes
            continue
        if best is None or ms < best[0]:
            best = (ms, backend.name)
    if best is None:
        if rows != ctx:  # the default backend with a dense mask
            pos = torch.arange(ctx, device="cuda")
            kw = {"attn_mask": pos[None, :] <= (ctx - rows + torch.arange(rows, device="cuda"))[:, None]}
        best = (timed(lambda: f(q, k, v, enable_gqa=True, **kw), iters), "default")
    del q, k, v
    torch.cuda.empty_cache()
    return best


def with_causal_baseline(r, key, base, iters):
    """Adds causal SDPA over shape `key` (rows, ctx, hd, nkv, nq; timed once per shape, kept in
    `base`) to record r: baseline_ms, baseline_backend and speedup over r["ms"]. Returns the
    baseline's (ms, backend)."""
    if key not in base:
        base[key] = causal_sdpa_ms(*key, iters)
    ms, backend = base[key]
    r["baseline_ms"] = round(ms, 4)
    r["baseline_backend"] = backend
    r["speedup"] = round(ms / r["ms"], 3)
    return ms, backend


def chunks(bench, out, iters):
    """The chunked-prefill lines of `gpu_check bench` (2048 query rows over the whole context,
    causal) with the causal SDPA baseline over the same rows and context: chunk-results.jsonl and
    a table added to benchmarks.md."""
    # Each prefill line's heads: those of the bench lines of its case (the case names the shape).
    shapes = {(r["case"], r["ctx"]): (r["head_dim"], r["kv_heads"], r["q_heads"]) for r in records(bench, "bench", "head_dim")}
    rows = [r for r in records(bench, "prefill", "ms") if (r["case"], r["ctx"]) in shapes]
    if not rows:
        return
    lines = [
        "",
        "A chunk of queries over a stored past (`attend` of the last 2048 tokens of the benchmark's",
        "first sequence, causal, over the whole context; the quantized groups on `kv_prefill_q`, and",
        "on `kv_decode_mma` with `KIVI_CUDA_PREFILL_Q=0`) against causal fp16 SDPA on the same rows:",
        "",
        "| method | context | query rows | kivi ms | through kv_decode_mma ms | fp16 SDPA ms (backend) | against SDPA | against kv_decode_mma |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = {}
    for r in rows:
        ms, backend = with_causal_baseline(r, (r["query_rows"], r["ctx"], *shapes[(r["case"], r["ctx"])]), base, iters)
        mma = r.get("ms_decode_mma")
        r["speedup_vs_decode_mma"] = round(mma / r["ms"], 3) if mma else None
        print(json.dumps(r), flush=True)
        lines.append(
            f"| KIVI-{r['bits']} | {r['ctx']} | {r['query_rows']} | {r['ms']:.3f} | "
            + (f"{mma:.3f}" if mma else "-")
            + f" | {ms:.3f} ({backend}) | {r['speedup']:.2f}x | "
            + (f"{r['speedup_vs_decode_mma']:.2f}x |" if mma else "- |")
        )
    with open(f"{out}/chunk-results.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    with open(f"{out}/benchmarks.md", "a") as f:
        f.write("\n".join(lines) + "\n")


def prompts(path, out, iters):
    """The lines of `gpu_check prompt` with the causal SDPA baseline: prompt.jsonl and a table
    added to benchmarks.md."""
    rows = records(path, "prompt", "ms")
    if not rows:
        return
    lines = [
        "",
        "Attention over a whole prompt (`append_attend` into an empty sequence, causal, with the append;",
        "`gpu_check prompt`) against causal fp16 SDPA over the same prompt:",
        "",
        "| case (bits, GQA ratio, head_dim) | prompt tokens | kivi ms | CUDA-core path ms | fp16 SDPA ms (backend) | against SDPA | against CUDA cores |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    base = {}
    for r in rows:
        key = (r["tokens"], r["tokens"], r["head_dim"], r["kv_heads"], r["q_heads"])
        ms, backend = with_causal_baseline(r, key, base, iters)
        r["speedup_vs_cuda_cores"] = round(r["ms_cuda_cores"] / r["ms"], 3)
        print(json.dumps(r), flush=True)
        lines.append(
            f"| {r['case']} | {r['tokens']} | {r['ms']:.3f} | {r['ms_cuda_cores']:.3f} | {ms:.3f} ({backend}) | "
            f"{r['speedup']:.2f}x | {r['speedup_vs_cuda_cores']:.1f}x |"
        )
    with open(f"{out}/prompt-results.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    with open(f"{out}/benchmarks.md", "a") as f:
        f.write("\n".join(lines) + "\n")


# The benchmark's heads unless `gpu_check bench` was given others: head_dim, KV heads, query heads.
DEFAULT_SHAPE = (128, 8, 32)


def shape(r):
    return (r["head_dim"], r["kv_heads"], r["q_heads"])


def method(r):
    """A bench line's method, with its heads where they are not the default ones."""
    if shape(r) == DEFAULT_SHAPE:
        return f"KIVI-{r['bits']}"
    return f"KIVI-{r['bits']}, head_dim {r['head_dim']}, {r['q_heads']} / {r['kv_heads']} heads"


def main():
    if len(sys.argv) < 3:
        print(__doc__)
        return 2
    bench, out = sys.argv[1], sys.argv[2]
    iters = int(sys.argv[sys.argv.index("--iters") + 1]) if "--iters" in sys.argv else 20
    rows = records(bench, "bench", "ms_median")
    name = torch.cuda.get_device_name()
    copy = copy_bandwidth(iters)
    print(json.dumps({"kind": "copy", "device": name, "copy_gbytes_per_s": round(copy, 1)}), flush=True)
    base = {}
    for r in rows:
        key = (r["batch"], r["ctx"], r["head_dim"], r["kv_heads"], r["q_heads"])
        if key not in base:
            base[key] = sdpa_ms(*key, iters)
        ms, backend, stream_ms = base[key]
        r["baseline_ms"] = round(ms, 4)
        r["baseline_backend"] = backend
        if "ms_stream" in r:
            r["baseline_ms_stream"] = round(stream_ms, 4)
            r["speedup_stream"] = round(stream_ms / r["ms_stream"], 3)
        r["baseline_gbytes_per_s"] = round(2 * r["batch"] * r["kv_heads"] * r["ctx"] * r["head_dim"] * 2 / ms / 1e6, 1)
        r["speedup"] = round(ms / r["ms_median"], 3)
        r["copy_gbytes_per_s"] = round(copy, 1)
        r["bw_fraction"] = round(r["gbytes_per_s"] / copy, 3)
        r["torch"] = torch.__version__
    with open(f"{out}/results.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
            print(json.dumps(r), flush=True)
    lines = [
        f"GPU: {name}, copy bandwidth {copy:.0f} GB/s (read + write), PyTorch {torch.__version__}.",
        "",
        "| method | context | batch | kivi ms | fp16 SDPA ms (backend) | speedup | kivi GB/s | of copy bw "
        "| back to back: kivi ms | SDPA ms | speedup | kivi host us per call |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        streamed_cols = (
            f" {r['ms_stream']:.3f} | {r['baseline_ms_stream']:.3f} | {r['speedup_stream']:.2f}x | {r['host_us_median']:.0f} |"
            if "ms_stream" in r
            else " - | - | - | - |"
        )
        lines.append(
            f"| {method(r)} | {r['ctx']} | {r['batch']} | {r['ms_median']:.3f} | {r['baseline_ms']:.3f} ({r['baseline_backend']}) | "
            f"{r['speedup']:.2f}x | {r['gbytes_per_s']:.0f} | {100 * r['bw_fraction']:.0f}% |" + streamed_cols
        )
    with open(f"{out}/benchmarks.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    targets = []
    for r in rows:
        if r["ctx"] == 32768 and r["batch"] == 16 and shape(r) == DEFAULT_SHAPE:
            if r["bits"] == 2:
                targets.append({"target": "KIVI-2 >= 4x fp16 at 32k, batch 16", "value": r["speedup"], "met": r["speedup"] >= 4.0})
                targets.append({"target": "KIVI-2 >= 75% of copy bandwidth", "value": r["bw_fraction"], "met": r["bw_fraction"] >= 0.75})
            if r["bits"] == 4:
                targets.append({"target": "KIVI-4 >= 2.7x fp16 at 32k, batch 16", "value": r["speedup"], "met": r["speedup"] >= 2.7})
    with open(f"{out}/targets.json", "w") as f:
        json.dump(targets, f, indent=1)
    for t in targets:
        print(json.dumps({"kind": "target", **t}), flush=True)
    if "--prompt" in sys.argv:
        prompts(sys.argv[sys.argv.index("--prompt") + 1], out, iters)
    try:
        chunks(bench, out, iters)
    except Exception as e:  # the tables above are written; say what failed
        print(json.dumps({"kind": "chunks", "error": repr(e)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
