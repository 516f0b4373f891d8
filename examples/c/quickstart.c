/*
 * quickstart.c: the smallest complete use of kivi from C.
 *
 * One model of 2 layers, 4 KV heads of 64 channels and 8 query heads (GQA 2): a prompt of 300
 * tokens is prefilled in chunks of 100, then 20 tokens are decoded one at a time; the cache's
 * memory is printed at the end.
 *
 *   cc -std=c99 -I include examples/c/quickstart.c -L target/release -lkivi -lm -o quickstart
 *   LD_LIBRARY_PATH=target/release ./quickstart
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "kivi.h"

/* Every kivi call returns a status; on failure the message says what was wrong. */
#define CHECK(call)                                                                          \
    do {                                                                                     \
        kivi_status st_ = (call);                                                            \
        if (st_ != KIVI_OK) {                                                                \
            fprintf(stderr, "%s failed: %s\n  %s\n", #call, kivi_status_str(st_),            \
                    kivi_last_error_message());                                              \
            exit(1);                                                                         \
        }                                                                                    \
    } while (0)

enum { LAYERS = 2, KV_HEADS = 4, Q_HEADS = 8, HEAD_DIM = 64, PROMPT = 300, CHUNK = 100, DECODE = 20 };

/* Stand-ins for the model's projections: deterministic numbers in [-1, 1]. */
static void fill(float *x, size_t n, unsigned seed) {
    size_t i;
    for (i = 0; i < n; i++) x[i] = (float)sin(0.37 * (double)(i + 1) * (double)(seed % 97 + 1));
}

int main(void) {
    const size_t kv_row = KV_HEADS * HEAD_DIM, q_row = Q_HEADS * HEAD_DIM;
    float *k = malloc(CHUNK * kv_row * sizeof *k), *v = malloc(CHUNK * kv_row * sizeof *v);
    float *q = malloc(CHUNK * q_row * sizeof *q), *out = malloc(CHUNK * q_row * sizeof *out);
    kivi_params p;
    kivi_cache *cache = NULL;
    kivi_memory_stats st;
    uint32_t seq = 0, len = 0, t, layer, pos;

    printf("kivi %s (header %s)\n", kivi_version(), KIVI_VERSION_STRING);
    if (!k || !v || !q || !out) return 1;

    /* 1. Describe the model and create the cache: defaults are KIVI-2, G = 32, R = 128, 1 sink. */
    CHECK(kivi_params_init(&p, sizeof p));
    p.n_layers = LAYERS;
    p.n_kv_heads = KV_HEADS;
    p.head_dim = HEAD_DIM;
    p.max_tokens = 1024;
    p.dtype = KIVI_DTYPE_F16; /* recent tokens kept in f16; inputs and outputs stay float */
    CHECK(kivi_cache_create(&p, &cache));

    /* 2. Prefill: per chunk and per layer, append the chunk's keys/values and attend. */
    for (pos = 0; pos < PROMPT; pos += CHUNK) {
        for (layer = 0; layer < LAYERS; layer++) {
            kivi_rows keys = {0}, values = {0}, queries = {0};
            kivi_rows_mut o = {0};
            fill(k, CHUNK * kv_row, pos + layer + 1);
            fill(v, CHUNK * kv_row, pos + layer + 2);
            fill(q, CHUNK * q_row, pos + layer + 3);
            keys.data = k;      keys.dtype = KIVI_DTYPE_F32;    keys.n_rows = CHUNK;    keys.row_len = kv_row;
            values.data = v;    values.dtype = KIVI_DTYPE_F32;  values.n_rows = CHUNK;  values.row_len = kv_row;
            queries.data = q;   queries.dtype = KIVI_DTYPE_F32; queries.n_rows = CHUNK; queries.row_len = q_row;
            o.data = out;       o.dtype = KIVI_DTYPE_F32;       o.n_rows = CHUNK;       o.row_len = q_row;
            CHECK(kivi_append_attend(cache, layer, seq, &keys, &values, &queries, &o, NULL));
        }
    }

    /* 3. Decode: one token per step; kivi_decode takes a batch of sequences (here one). */
    for (t = 0; t < DECODE; t++) {
        for (layer = 0; layer < LAYERS; layer++) {
            kivi_rows keys = {0}, values = {0}, queries = {0};
            kivi_rows_mut o = {0};
            fill(k, kv_row, 1000 + t + layer);
            fill(v, kv_row, 2000 + t + layer);
            fill(q, q_row, 3000 + t + layer);
            keys.data = k;      keys.dtype = KIVI_DTYPE_F32;    keys.n_rows = 1;    keys.row_len = kv_row;
            values.data = v;    values.dtype = KIVI_DTYPE_F32;  values.n_rows = 1;  values.row_len = kv_row;
            queries.data = q;   queries.dtype = KIVI_DTYPE_F32; queries.n_rows = 1; queries.row_len = q_row;
            o.data = out;       o.dtype = KIVI_DTYPE_F32;       o.n_rows = 1;       o.row_len = q_row;
            CHECK(kivi_decode(cache, layer, &seq, 1, &keys, &values, &queries, &o, NULL));
        }
    }
    printf("last output, head 0: %.4f %.4f %.4f ...\n", out[0], out[1], out[2]);

    /* 4. Ask the cache what it holds. */
    CHECK(kivi_seq_len(cache, seq, &len));
    CHECK(kivi_cache_stats(cache, &st, sizeof st));
    printf("sequence %u: %u tokens, %llu of %llu (layer-)tokens quantized\n", seq, len,
           (unsigned long long)st.quantized_tokens, (unsigned long long)st.tokens);
    printf("cache: %llu bytes, an f16 cache: %llu bytes (%.2fx smaller)\n",
           (unsigned long long)st.used_bytes, (unsigned long long)st.f16_bytes,
           (double)st.f16_bytes / (double)st.used_bytes);

    /* 5. Errors come back as statuses with a message; the cache is unchanged by a failed call. */
    if (kivi_seq_truncate(cache, 42, 0) != KIVI_OK) printf("expected error: %s\n", kivi_last_error_message());

    kivi_cache_free(cache);
    free(k); free(v); free(q); free(out);
    return 0;
}
