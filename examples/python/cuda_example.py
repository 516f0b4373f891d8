"""kivi's CUDA backend from Python: PyTorch CUDA tensors in, PyTorch CUDA tensors out, every call
queued on a PyTorch stream.

A KIVI-2 cache on device 0 (2 layers, 8 KV heads of 128, 32 query heads, f16) takes a chunked
prefill and batched decode steps of two sequences; a CPU cache takes the same data through
numpy. The outputs must agree within 1e-3 relative (plus one f16 rounding step), and both are
compared with exact attention (PyTorch's scaled_dot_product_attention over the unquantized keys
and values) to show what 2-bit storage costs. Prints one JSON line; exits 1 on a mismatch.

Where there is no PyTorch or no CUDA device it says why and exits 0.

    cargo build --release && python3 examples/python/cuda_example.py
"""

import json
import sys
import time

import numpy as np

import kivi

try:
    import torch
except ImportError:
    print("skipped: PyTorch is not installed")
    sys.exit(0)
if not torch.cuda.is_available():
    print("skipped: PyTorch sees no CUDA device")
    sys.exit(0)
try:
    info = kivi.device_info(0)
except kivi.KiviError as e:
    print(f"skipped: {e}")
    sys.exit(0)

LAYERS, KV, HD, QH = 2, 8, 128, 32
PREFILL, STEPS = (700, 300), 40
TOL = 1e-3 + 1.0 / 1024

torch.manual_seed(0)
dev = torch.device("cuda", 0)
fields = dict(n_layers=LAYERS, n_kv_heads=KV, head_dim=HD, dtype=1, key_bits=2, value_bits=2, max_tokens=4096,
              max_seqs=2)
gpu = kivi.Cache(device=0, **fields)
cpu = kivi.Cache(**fields)
stream = torch.cuda.Stream(device=dev)
gpu.set_stream(stream)
gpu.prepare(QH)  # the attention kernels compiled now, not in the first call


def keys(n):
    """Keys with a few outlier channels per head, like real models'."""
    k = torch.randn(n, KV, HD, device=dev)
    k[:, :, [3, 17, 40]] = 10 + 4 * torch.randn(n, KV, 3, device=dev)
    return k.reshape(n, KV * HD).half()


def rel_err(got, want):
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def exact(q, k_all, v_all, n_new):
    """Causal attention of the last n_new positions over all of k_all/v_all (f32)."""
    t = k_all.shape[0]
    qh = q.float().reshape(n_new, QH, HD).transpose(0, 1)
    kh = k_all.float().reshape(t, KV, HD).transpose(0, 1).repeat_interleave(QH // KV, 0)
    vh = v_all.float().reshape(t, KV, HD).transpose(0, 1).repeat_interleave(QH // KV, 0)
    mask = torch.arange(t, device=dev)[None, :] <= torch.arange(t - n_new, t, device=dev)[:, None]
    o = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
    return o.transpose(0, 1).reshape(n_new, QH * HD)


worst, vs_exact, calls = 0.0, 0.0, 0
history = {(layer, seq): ([], []) for layer in range(LAYERS) for seq in range(2)}
t0 = time.time()
with torch.cuda.stream(stream):
    for layer in range(LAYERS):
        for seq, n in enumerate(PREFILL):
            k, v, q = keys(n), torch.randn(n, KV * HD, device=dev).half(), torch.randn(n, QH * HD, device=dev).half()
            out = gpu.append_attend(layer, seq, k, v, q)
            ref = cpu.append_attend(layer, seq, k.cpu().numpy(), v.cpu().numpy(), q.cpu().numpy())
            worst = max(worst, rel_err(out, torch.from_numpy(ref).to(dev)))
            history[layer, seq][0].append(k)
            history[layer, seq][1].append(v)
            calls += 1
    for step in range(STEPS):
        for layer in range(LAYERS):
            k, v, q = keys(2), torch.randn(2, KV * HD, device=dev).half(), torch.randn(2, QH * HD, device=dev).half()
            out = gpu.decode(layer, [0, 1], k, v, q)
            ref = cpu.decode(layer, [0, 1], k.cpu().numpy(), v.cpu().numpy(), q.cpu().numpy())
            worst = max(worst, rel_err(out, torch.from_numpy(ref).to(dev)))
            calls += 1
            for seq in range(2):
                history[layer, seq][0].append(k[seq:seq + 1])
                history[layer, seq][1].append(v[seq:seq + 1])
                if step == STEPS - 1:
                    ks, vs = torch.cat(history[layer, seq][0]), torch.cat(history[layer, seq][1])
                    vs_exact = max(vs_exact, rel_err(out[seq:seq + 1], exact(q[seq:seq + 1], ks, vs, 1)))
    stream.synchronize()

lens = [gpu.seq_len(s) for s in range(2)]
ok = worst <= TOL and lens == [n + STEPS for n in PREFILL] and gpu.stats() == cpu.stats()
print(json.dumps({"kind": "python-cuda", "device": info["name"], "calls": calls, "max_rel_err_vs_cpu": worst,
                  "tol": TOL, "kivi2_rel_err_vs_exact": vs_exact, "seq_lens": lens,
                  "stats_match": gpu.stats() == cpu.stats(), "seconds": round(time.time() - t0, 2), "ok": ok}))
gpu.close()
cpu.close()
sys.exit(0 if ok else 1)
