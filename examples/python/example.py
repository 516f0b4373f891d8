"""kivi from Python through ctypes, checked against attention in numpy.

    pip install numpy
    cargo build --release
    python3 examples/python/example.py

A 2-layer model (4 KV heads of 64 channels, 8 query heads) prefills a 320-token prompt in chunks
of 80 and decodes 16 tokens; every output is compared with numpy attention (float64) over the
unquantized keys and values. Each pool is sized to 1 MiB before its cache is made. Then a
rollback, a save/restore round trip, the sequence operations and an error.
"""

import sys

import numpy as np

from kivi import Cache, KiviError, cpu_isa, fit_max_tokens, memory_plan, version

LAYERS, KV, QH, HD, PROMPT, CHUNK, STEPS = 2, 4, 8, 64, 320, 80, 16
rng = np.random.default_rng(7)

# Keys with outlier channels (a large offset on 2 channels per head), as in real models.
key_offset = np.zeros((LAYERS, KV * HD), np.float32)
for layer in range(LAYERS):
    for h in range(KV):
        key_offset[layer, h * HD + rng.choice(HD, 2, replace=False)] = rng.choice([-1, 1], 2) * 12


def token_rows(layer, n):
    k = (key_offset[layer] + rng.standard_normal((n, KV * HD))).astype(np.float32)
    v = (0.5 + rng.standard_normal((n, KV * HD))).astype(np.float32)
    q = rng.standard_normal((n, QH * HD)).astype(np.float32)
    return k, v, q


def reference(K, V, q, pos0):
    """Causal attention in float64: q holds the queries of positions pos0.., K and V every token so far."""
    n, out = q.shape[0], np.zeros((q.shape[0], QH * HD))
    for h in range(QH):
        g = h // (QH // KV)
        Kh, Vh, qh = K[:, g * HD:(g + 1) * HD], V[:, g * HD:(g + 1) * HD], q[:, h * HD:(h + 1) * HD]
        logits = qh.astype(np.float64) @ Kh.T.astype(np.float64) / np.sqrt(HD)
        logits[np.arange(K.shape[0])[None, :] > (pos0 + np.arange(n))[:, None]] = -np.inf
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        out[:, h * HD:(h + 1) * HD] = (p / p.sum(axis=1, keepdims=True)) @ Vh
    return out


def rel_err(out, ref):
    o, r = out.reshape(-1, QH, HD), ref.reshape(-1, QH, HD)
    return np.linalg.norm(o - r, axis=2) / np.linalg.norm(r, axis=2)


print(f"kivi {version()} from Python (ctypes), CPU kernels: {cpu_isa()}")
errors = {}
for bits in (2, 4, 8):
    fields = dict(n_layers=LAYERS, n_kv_heads=KV, head_dim=HD, key_bits=bits, value_bits=bits,
                  dtype=1)  # recent tokens kept in f16
    # The largest pool that 1 MiB of memory holds, sized before the cache is made.
    max_tokens = fit_max_tokens(1 << 20, **fields)
    plan = memory_plan(max_tokens=max_tokens, **fields)
    assert plan["bytes"] <= 1 << 20 < memory_plan(max_tokens=max_tokens + 1, **fields)["bytes"]
    assert max_tokens >= PROMPT + STEPS, max_tokens
    cache = Cache(max_tokens=max_tokens, **fields)
    cache.prepare(QH)  # nothing to compile on the CPU: it checks the number of query heads
    K = [np.zeros((0, KV * HD), np.float32) for _ in range(LAYERS)]
    V = [np.zeros((0, KV * HD), np.float32) for _ in range(LAYERS)]
    errs = []
    for pos in range(0, PROMPT + STEPS, CHUNK):
        n = CHUNK if pos < PROMPT else 1
        for step in range(1 if pos < PROMPT else STEPS):
            p0 = K[0].shape[0]
            for layer in range(LAYERS):
                k, v, q = token_rows(layer, n)
                K[layer], V[layer] = np.vstack([K[layer], k]), np.vstack([V[layer], v])
                if n > 1:
                    out = cache.append_attend(layer, 0, k, v, q)
                else:
                    out = cache.decode(layer, [0], k, v, q)
                errs.append(rel_err(out, reference(K[layer], V[layer], q, p0)).ravel())
    errs = np.concatenate(errs)
    errors[bits] = errs.mean()
    st = cache.stats()
    assert st["reserved_bytes"] + st["table_bytes"] == plan["bytes"], (st, plan)
    print(f"KIVI-{bits}: {cache.seq_len(0)} tokens, mean error {errs.mean():.5f}, max {errs.max():.5f}, "
          f"{st['used_bytes']} bytes vs {st['f16_bytes']} for f16 (room for {max_tokens} in 1 MiB)")

    # A rollback, then a save/restore round trip that must give back the same outputs.
    cache.seq_truncate(0, cache.seq_len(0) - 4)
    blob = cache.save()
    k, v, q = token_rows(0, 1)
    first = cache.decode(0, [0], k, v, q)
    cache.load(blob)
    again = cache.decode(0, [0], k, v, q)
    assert np.array_equal(first, again), "outputs after restore differ"
    # The sequence, parked and resumed in a cache of another page size and pool (256-token pages,
    # as CPU engines set them): the next step gives the same outputs, to float rounding.
    other = Cache(n_layers=LAYERS, n_kv_heads=KV, head_dim=HD, key_bits=bits, value_bits=bits, max_tokens=2048,
                  max_seqs=4, page_tokens=256, dtype=1)
    other.load_seq(3, cache.save_seq(0))
    assert other.seq_len(3) == cache.seq_len(0)
    k, v, q = token_rows(0, 1)
    here, there = cache.decode(0, [0], k, v, q), other.decode(0, [3], k, v, q)
    assert np.abs(here - there).max() <= 1e-5 * np.abs(here).max(), "outputs after moving a sequence differ"
    # The scheduler's view: which sequences there are, per-layer lengths, keeping one, clearing.
    other.seq_copy(3, 5)
    k, v, q = token_rows(1, 2)
    other.append(1, 5, k, v)  # layers fill one after another within a step
    assert other.seq_ids() == [3, 5] and other.config()["page_tokens"] == 256
    assert other.seq_layer_len(5, 0) == other.seq_layer_len(3, 0)  # one decode step ahead of layer 1
    assert other.seq_layer_len(5, 1) == other.seq_layer_len(3, 1) + 2 == other.seq_len(5)
    other.seq_keep(5)
    assert other.seq_ids() == [5]
    other.clear()
    assert other.seq_ids() == [] and other.stats()["tokens"] == 0
    other.close()
    cache.close()

# Attention options through the ABI: scale, sliding window, softcap, non-causal. 40 tokens stay in
# the full-precision window (f32 here), so kivi must match numpy to float rounding.
def reference_opts(K, V, q, scale, window, softcap, causal):
    out = np.zeros((q.shape[0], QH * HD))
    for h in range(QH):
        g = h // (QH // KV)
        logits = q[:, h * HD:(h + 1) * HD].astype(np.float64) @ K[:, g * HD:(g + 1) * HD].T.astype(np.float64)
        logits *= scale
        if softcap:
            logits = softcap * np.tanh(logits / softcap)
        i, j = np.arange(q.shape[0])[:, None], np.arange(K.shape[0])[None, :]
        mask = (j > i) if causal else np.zeros_like(j > i)
        if window:
            mask |= j < i - window + 1
        logits[mask] = -np.inf
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        out[:, h * HD:(h + 1) * HD] = (p / p.sum(axis=1, keepdims=True)) @ V[:, g * HD:(g + 1) * HD]
    return out


for opts in ({"scale": 0.1, "sliding_window": 16, "softcap": 5.0}, {"causal": False}):
    cache = Cache(n_layers=1, n_kv_heads=KV, head_dim=HD)
    k, v, q = token_rows(0, 40)
    out = cache.append_attend(0, 3, k, v, q, **opts)
    ref = reference_opts(k, v, q, opts.get("scale", 1 / np.sqrt(HD)), opts.get("sliding_window", 0),
                         opts.get("softcap", 0.0), opts.get("causal", True))
    assert np.abs(out - ref).max() < 1e-4, (opts, np.abs(out - ref).max())
    cache.close()
print("options (scale, sliding window, softcap, non-causal) match numpy")

# f16 inputs and outputs, and rows taken as strided views of one fused QKV buffer (no copies).
qkv = np.hstack(token_rows(1, 24))  # 24 tokens: [keys | values | queries] per row
k, v, q = qkv[:, :KV * HD], qkv[:, KV * HD:2 * KV * HD], qkv[:, 2 * KV * HD:]
exact = reference(k, v, q, 0)
for dtype, tol in ((np.float32, 1e-5), (np.float16, 2e-2)):
    cache = Cache(n_layers=1, n_kv_heads=KV, head_dim=HD)
    fused = qkv.astype(dtype)
    out = cache.append_attend(0, 0, fused[:, :KV * HD], fused[:, KV * HD:2 * KV * HD], fused[:, 2 * KV * HD:])
    assert out.dtype == dtype and np.abs(out.astype(np.float64) - exact).max() < tol, dtype
    cache.close()
print("strided rows of a fused QKV buffer, in f32 and f16, match numpy")

# Errors come back as exceptions carrying the status and kivi's message.
try:
    Cache(n_layers=1, n_kv_heads=1, head_dim=60)
    sys.exit("an invalid head_dim was accepted")
except KiviError as e:
    assert e.status == 2, e
    print(f"expected error: {e}")

assert errors[8] < errors[4] < errors[2] < 0.15, errors
assert errors[8] < 2e-3, errors
print("numpy check passed")
