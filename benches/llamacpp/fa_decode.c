/* Decode attention in llama.cpp's CPU backend, for comparison with `cargo bench --bench decode`.
 *
 * One query token against a KV cache of `ctx` tokens, built as llama.cpp builds it
 * (llama-graph.cpp, build_attn_mha with flash attention on): Q [hd, n_head, 1] and the cache's
 * K and V views [hd, n_kv_head, ctx] permuted to [hd, ctx, n_kv_head], an f16 KQ mask
 * [ctx, 1], GGML_OP_FLASH_ATTN_EXT with f32 precision, computed by the CPU backend with
 * `--threads` threads. K and V have the cache type under test (f16, q8_0, q4_0, ...: llama.cpp's
 * `--cache-type-k/-v`). As in the kivi bench, each type holds several layers (at least 64 MB
 * of KV data, at most 16) and successive calls rotate through them, so that one call's data is
 * not left in the last-level cache by the previous one.
 *
 * Usage: fa_decode [--threads N] [--ctx 512,4096,...] [--types f16,q8_0,q4_0] [--reps N]
 * Prints one JSON line per (ctx, type): median and fastest time of one call in ms.
 * scripts/bench-llamacpp.sh fetches llama.cpp, builds this and runs it beside kivi's bench. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "ggml.h"

enum { HD = 128, N_HEAD = 32, N_KV_HEAD = 8, MAX_LAYERS = 16 };

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static float rnd(void) {
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    uint64_t x = rng_state * 0x2545F4914F6CDD1Dull;
    return (float)(x >> 40) / (float)(1u << 24) * 4.0f - 2.0f;
}

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Fills a [HD, N_KV_HEAD, ctx] tensor of any type from random rows (keys get outlier channels,
   as real keys have; the timing does not depend on it). */
static void fill(struct ggml_tensor *t, int ctx, int keys) {
    int64_t n_rows = (int64_t)ctx * N_KV_HEAD;
    float *src = malloc(sizeof(float) * HD * 1024);
    size_t row_bytes = ggml_row_size(t->type, HD);
    for (int64_t r0 = 0; r0 < n_rows; r0 += 1024) {
        int64_t n = n_rows - r0 < 1024 ? n_rows - r0 : 1024;
        for (int64_t i = 0; i < n * HD; i++) {
            float x = rnd();
            src[i] = keys && (i % HD == 7 || i % HD == 45) ? x * 3.0f + 10.0f : x;
        }
        if (t->type == GGML_TYPE_F32) {
            memcpy((char *)t->data + r0 * row_bytes, src, n * row_bytes);
        } else if (t->type == GGML_TYPE_F16) {
            ggml_fp32_to_fp16_row(src, (ggml_fp16_t *)((char *)t->data + r0 * row_bytes), n * HD);
        } else {
            ggml_quantize_chunk(t->type, src, (char *)t->data + r0 * row_bytes, 0, n, HD, NULL);
        }
    }
    free(src);
}

static int parse_list(const char *s, char out[][16], int max) {
    int n = 0;
    while (*s && n < max) {
        const char *e = strchr(s, ',');
        size_t len = e ? (size_t)(e - s) : strlen(s);
        if (len == 0 || len >= 16) {
            fprintf(stderr, "bad list item in '%s'\n", s);
            exit(2);
        }
        memcpy(out[n], s, len);
        out[n++][len] = 0;
        s += len + (e ? 1 : 0);
    }
    return n;
}

static enum ggml_type type_of(const char *name) {
    for (int t = 0; t < GGML_TYPE_COUNT; t++) {
        const char *n = ggml_type_name((enum ggml_type)t);
        if (n && strcmp(n, name) == 0) return (enum ggml_type)t;
    }
    fprintf(stderr, "unknown type '%s' (f16, q8_0, q4_0, ...)\n", name);
    exit(2);
}

int main(int argc, char **argv) {
    int threads = 2, reps_arg = 0;
    char ctxs[8][16], types[8][16];
    int n_ctx = parse_list("512,4096,16384,65536", ctxs, 8);
    int n_types = parse_list("f16,q8_0,q4_0", types, 8);
    for (int i = 1; i < argc; i++) {
        if (i + 1 < argc && strcmp(argv[i], "--threads") == 0) {
            threads = atoi(argv[++i]);
        } else if (i + 1 < argc && strcmp(argv[i], "--ctx") == 0) {
            n_ctx = parse_list(argv[++i], ctxs, 8);
        } else if (i + 1 < argc && strcmp(argv[i], "--types") == 0) {
            n_types = parse_list(argv[++i], types, 8);
        } else if (i + 1 < argc && strcmp(argv[i], "--reps") == 0) {
            reps_arg = atoi(argv[++i]);
        } else {
            fprintf(stderr, "usage: %s [--threads N] [--ctx 512,4096] [--types f16,q8_0,q4_0] [--reps N]\n",
                    argv[0]);
            return 2;
        }
    }
    if (threads < 1) {
        fprintf(stderr, "--threads must be at least 1\n");
        return 2;
    }
    ggml_backend_t backend = ggml_backend_cpu_init();
    ggml_backend_cpu_set_n_threads(backend, threads);

    for (int ci = 0; ci < n_ctx; ci++) {
        int ctx = atoi(ctxs[ci]);
        if (ctx < 1) {
            fprintf(stderr, "bad context '%s'\n", ctxs[ci]);
            return 2;
        }
        for (int ti = 0; ti < n_types; ti++) {
            enum ggml_type type = type_of(types[ti]);
            size_t kv_bytes = 2 * ggml_row_size(type, HD) * N_KV_HEAD * (size_t)ctx;
            int layers = (int)ceil(64e6 / (double)kv_bytes);
            layers = layers < 1 ? 1 : layers > MAX_LAYERS ? MAX_LAYERS : layers;
            struct ggml_init_params ip = {
                .mem_size = layers * (kv_bytes + (size_t)ctx * 2 + HD * N_HEAD * 8 + 64 * 1024) +
                            ggml_graph_overhead() * layers + 1024 * 1024,
                .mem_buffer = NULL,
                .no_alloc = false,
            };
            struct ggml_context *gctx = ggml_init(ip);
            struct ggml_cgraph *graphs[MAX_LAYERS];
            struct ggml_tensor *qs[MAX_LAYERS];
            for (int l = 0; l < layers; l++) {
                struct ggml_tensor *q = ggml_new_tensor_3d(gctx, GGML_TYPE_F32, HD, N_HEAD, 1);
                struct ggml_tensor *k = ggml_new_tensor_3d(gctx, type, HD, N_KV_HEAD, ctx);
                struct ggml_tensor *v = ggml_new_tensor_3d(gctx, type, HD, N_KV_HEAD, ctx);
                struct ggml_tensor *mask = ggml_new_tensor_2d(gctx, GGML_TYPE_F16, ctx, 1);
                fill(k, ctx, 1);
                fill(v, ctx, 0);
                memset(mask->data, 0, ggml_nbytes(mask));
                struct ggml_tensor *out = ggml_flash_attn_ext(
                    gctx, ggml_permute(gctx, q, 0, 2, 1, 3), ggml_permute(gctx, k, 0, 2, 1, 3),
                    ggml_permute(gctx, v, 0, 2, 1, 3), mask, 1.0f / sqrtf((float)HD), 0.0f, 0.0f);
                ggml_prec_set_acc(out, GGML_PREC_F32);
                graphs[l] = ggml_new_graph(gctx);
                ggml_build_forward_expand(graphs[l], out);
                qs[l] = q;
            }
            /* As many repetitions as the kivi bench makes for this context. */
            int reps = 2000000 / ctx;
            reps = reps < 15 ? 15 : reps > 200 ? 200 : reps;
            if (reps_arg > 0) reps = reps_arg;
            double *t = malloc(sizeof(double) * reps);
            for (int rep = 0; rep < reps + 3; rep++) {
                int l = rep % layers;
                float *qd = qs[l]->data;
                for (int i = 0; i < HD * N_HEAD; i++) qd[i] = rnd();
                double t0 = now_ms();
                if (ggml_backend_graph_compute(backend, graphs[l]) != GGML_STATUS_SUCCESS) {
                    fprintf(stderr, "graph compute failed\n");
                    return 1;
                }
                double dt = now_ms() - t0;
                if (rep >= 3) t[rep - 3] = dt;
            }
            qsort(t, reps, sizeof(double), cmp_double);
            printf("{\"case\":\"gqa4-hs128\",\"impl\":\"llama.cpp\",\"type\":\"%s\",\"ctx\":%d,\"head_dim\":%d,"
                   "\"kv_heads\":%d,\"q_heads\":%d,\"threads\":%d,\"layers\":%d,\"ms_median\":%.4f,"
                   "\"ms_min\":%.4f}\n",
                   types[ti], ctx, HD, N_KV_HEAD, N_HEAD, threads, layers, t[reps / 2], t[0]);
            fflush(stdout);
            free(t);
            ggml_free(gctx);
        }
    }
    ggml_backend_free(backend);
    return 0;
}
