/*
 * harness.c: plays an inference engine's part against kivi through the C ABI, and checks it.
 *
 * A model shaped like Llama-3-8B: 8 KV heads of 128 channels and 32 query heads (GQA 4) per layer;
 * all 32 layers by default (--layers N for fewer).
 * Three caches run side by side on the same data: KIVI-2, KIVI-4 and KIVI-8 (keys per channel in
 * groups of G = 32 tokens, values per token in groups of 32 channels, the first token and the last
 * R = 128 tokens in f16). The engine's part, every layer of every step:
 *
 *   1. prefill: each sequence's prompt in chunks (kivi_append_attend);
 *   2. decode: one token per sequence per step, all sequences in one call (kivi_decode);
 *   3. rollback: sequence 0 drops its last 150 tokens, as when an answer is regenerated
 *      (kivi_seq_truncate; the cut falls inside a quantized group), and decoding goes on;
 *   4. fork: sequence 0 is copied into a new sequence (kivi_seq_copy) and both go on;
 *   5. save/restore: the state is saved, steps are decoded, the state is restored and the same
 *      steps are decoded again: the outputs must be bit for bit the same; then one sequence is
 *      saved, removed and loaded back (kivi_seq_state_*); then, as an engine restarting with
 *      other settings would, each cache's state is loaded into a new cache of 256-token pages:
 *      the next step decoded on it and on a copy with the old settings must agree within 1e-5.
 *
 * Keys have outlier channels (a few channels per head with a large offset and spread, as in real
 * models; the reason KIVI quantizes keys per channel); keys and values are f16 numbers, as an f16
 * engine holds them. Every attention output is compared with this file's own plain-C float
 * attention over the same unquantized f16 data, so the error reported is what quantization costs.
 * With --baseline a fourth cache quantizes keys per token, like values (the KIVI paper's baseline),
 * to show what per-channel keys buy; KIVI-2 must then have less error than it.
 *
 * The run fails (exit 1) when an error passes its bound (see BOUND below), when restored or
 * moved outputs differ, or when any call fails.
 *
 *   make -C examples/c run          # builds the library (release) and runs this
 *   ./harness --help                # sizes and options
 */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kivi.h"

#define CHECK(call)                                                                                \
    do {                                                                                           \
        kivi_status st_ = (call);                                                                  \
        if (st_ != KIVI_OK) {                                                                      \
            fprintf(stderr, "harness: %s failed at %s:%d: %s\n  %s\n", #call, __FILE__, __LINE__, \
                    kivi_status_str(st_), kivi_last_error_message());                              \
            exit(2);                                                                               \
        }                                                                                          \
    } while (0)

/* ---------------------------------------------------------------- settings and bounds */

/* The three KIVI settings, and with --baseline the paper's baseline: 2-bit keys grouped per token
   like values, which outlier channels hurt (KIVI-2 must beat it). */
enum { N_SET = 4, FORK_ID = 1000 };
static uint32_t n_set = 3;
static const uint32_t BITS[N_SET] = {2, 4, 8, 2};
static const int32_t KEY_MODE[N_SET] = {KIVI_KEY_PER_CHANNEL, KIVI_KEY_PER_CHANNEL, KIVI_KEY_PER_CHANNEL,
                                        KIVI_KEY_PER_TOKEN};
static const char *const NAMES[N_SET] = {"KIVI-2", "KIVI-4", "KIVI-8", "2b-token"};

/*
 * Bounds on the relative L2 error of one head's output, ||o - ref|| / ||ref||: its mean over all
 * outputs, its 99th percentile and its largest value. A b-bit group has 2^b - 1 steps, so the
 * rounding error shrinks about 5x from 2 to 4 bits and 17x from 4 to 8 bits; the measured means
 * follow that ladder (README.md has the numbers), and each bound leaves 1.6-2.3x headroom over the
 * worst of 12 seeds of --quick and of the 4- and 32-layer runs. The mean and p99 bounds catch a kernel
 * that loses accuracy; the max bounds catch a single broken output in KIVI-4 and KIVI-8 (a wrong
 * or zero output has an error near 1), while for KIVI-2 the max only catches blow-ups, since a
 * head whose softmax is decided by a few quantized keys can legitimately be far off.
 */
static const double BOUND_MEAN[N_SET] = {0.10, 0.020, 0.0015, 10};
static const double BOUND_P99[N_SET] = {0.80, 0.150, 0.0100, 10};
static const double BOUND_MAX[N_SET] = {2.00, 0.400, 0.0400, 10};

typedef struct {
    uint32_t layers, kv_heads, head_dim, gqa, seqs, prompt, chunk, decode, threads;
    uint64_t seed;
} Options;

/* ---------------------------------------------------------------- synthetic model data */

static uint64_t rng_state;

static uint64_t next_u64(void) {
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static double uniform(void) { return (double)(next_u64() >> 11) / 9007199254740992.0; }

/* About N(0, 1): the sum of four uniforms (Irwin-Hall), cheap enough for millions of numbers. */
static float normal(void) {
    uint64_t r = next_u64();
    double s = (double)(r & 0xFFFF) + (double)((r >> 16) & 0xFFFF) + (double)((r >> 32) & 0xFFFF) +
               (double)(r >> 48);
    return (float)((s / 65535.0 - 2.0) * 1.7320508075688772);
}

/* x rounded to the nearest f16 (ties to even), back as a float: what an f16 engine stores. */
static float round_f16(float x) {
    uint32_t u;
    float ax = fabsf(x);
    if (ax < 6.103515625e-05f) return (float)(nearbyint((double)x * 16777216.0) / 16777216.0);
    memcpy(&u, &x, sizeof u);
    u = (u + 0x0FFFu + ((u >> 13) & 1u)) & ~0x1FFFu;
    memcpy(&x, &u, sizeof u);
    return x;
}

typedef struct {
    float *key_mean, *key_spread, *value_mean; /* [layers][kv_heads * head_dim] */
} Model;

static Model make_model(const Options *o) {
    size_t row = (size_t)o->kv_heads * o->head_dim, n = (size_t)o->layers * row, i;
    uint32_t l, h, j;
    Model m;
    m.key_mean = malloc(n * sizeof(float));
    m.key_spread = malloc(n * sizeof(float));
    m.value_mean = malloc(n * sizeof(float));
    if (!m.key_mean || !m.key_spread || !m.value_mean) exit(3);
    for (i = 0; i < n; i++) {
        m.key_mean[i] = 0.3f * normal();
        m.key_spread[i] = 0.6f + 0.8f * (float)uniform();
        m.value_mean[i] = 0.5f * normal();
    }
    /* Three outlier channels per head: a large offset and spread that persist across tokens. */
    for (l = 0; l < o->layers; l++)
        for (h = 0; h < o->kv_heads; h++)
            for (j = 0; j < 3; j++) {
                size_t c = (size_t)l * row + (size_t)h * o->head_dim + (size_t)(next_u64() % o->head_dim);
                m.key_mean[c] = (float)((next_u64() & 1) ? 1 : -1) * (8.0f + 8.0f * (float)uniform());
                m.key_spread[c] = 3.0f + 5.0f * (float)uniform();
            }
    return m;
}

/* One token of one layer: keys and values (f16 numbers) and queries. */
static void gen_token(const Options *o, const Model *m, uint32_t layer, float *k, float *v, float *q) {
    size_t row = (size_t)o->kv_heads * o->head_dim, qrow = row * o->gqa, i;
    const float *km = m->key_mean + layer * row, *ks = m->key_spread + layer * row, *vm = m->value_mean + layer * row;
    for (i = 0; i < row; i++) {
        k[i] = round_f16(km[i] + ks[i] * normal());
        v[i] = round_f16(vm[i] + normal());
    }
    for (i = 0; i < qrow; i++) q[i] = normal();
}

/* ---------------------------------------------------------------- the engine's own copy */

/* What the engine knows of one sequence: its id and every key and value, unquantized. */
typedef struct {
    uint32_t id, len, live;
    float **k, **v; /* [layers][cap * kv_row] */
} Seq;

static uint32_t seq_cap;

static void seq_init(Seq *s, const Options *o, uint32_t id) {
    size_t row = (size_t)o->kv_heads * o->head_dim, n = (size_t)seq_cap * row;
    uint32_t l;
    s->id = id;
    s->len = 0;
    s->live = 1;
    s->k = malloc(o->layers * sizeof(float *));
    s->v = malloc(o->layers * sizeof(float *));
    if (!s->k || !s->v) exit(3);
    for (l = 0; l < o->layers; l++) {
        s->k[l] = malloc(n * sizeof(float));
        s->v[l] = malloc(n * sizeof(float));
        if (!s->k[l] || !s->v[l]) exit(3);
    }
}

static float dot(const float *a, const float *b, uint32_t n) {
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0;
    uint32_t i;
    for (i = 0; i + 8 <= n; i += 8) {
        s0 += a[i] * b[i];
        s1 += a[i + 1] * b[i + 1];
        s2 += a[i + 2] * b[i + 2];
        s3 += a[i + 3] * b[i + 3];
        s4 += a[i + 4] * b[i + 4];
        s5 += a[i + 5] * b[i + 5];
        s6 += a[i + 6] * b[i + 6];
        s7 += a[i + 7] * b[i + 7];
    }
    for (; i < n; i++) s0 += a[i] * b[i];
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7));
}

/*
 * Plain float attention of one query row at position `pos` over keys/values 0..pos of one
 * sequence's layer (causal), all query heads: out[h] = softmax(scale * q[h] . K) V.
 */
static void reference(const Options *o, const float *K, const float *V, uint32_t pos, const float *q, float *out,
                      float *logits) {
    uint32_t hd = o->head_dim, row = o->kv_heads * hd, nq = o->kv_heads * o->gqa, h, j, c;
    float scale = 1.0f / sqrtf((float)hd);
    for (h = 0; h < nq; h++) {
        uint32_t g = h / o->gqa;
        const float *qh = q + (size_t)h * hd;
        float *oh = out + (size_t)h * hd, mx = -INFINITY, sum = 0;
        for (j = 0; j <= pos; j++) {
            logits[j] = scale * dot(qh, K + (size_t)j * row + (size_t)g * hd, hd);
            if (logits[j] > mx) mx = logits[j];
        }
        for (j = 0; j <= pos; j++) sum += (logits[j] = expf(logits[j] - mx));
        for (c = 0; c < hd; c++) oh[c] = 0;
        for (j = 0; j <= pos; j++) {
            const float *vj = V + (size_t)j * row + (size_t)g * hd;
            float p = logits[j] / sum;
            for (c = 0; c < hd; c++) oh[c] += p * vj[c];
        }
    }
}

/* ---------------------------------------------------------------- error bookkeeping */

enum { PH_PREFILL, PH_DECODE, PH_ROLLBACK, PH_FORK, PH_RESTORE, N_PH };
static const char *const PHASES[N_PH] = {"prefill (chunked)", "decode", "after rollback", "after fork",
                                         "after restore"};

typedef struct {
    double sum, max;
    uint64_t n;
} Err;

static Err errs[N_PH][N_SET];
static double *all_errs[N_SET]; /* every error of a setting, for percentiles */
static size_t n_errs[N_SET], cap_errs[N_SET];

static void keep_err(int set, double e) {
    if (n_errs[set] == cap_errs[set]) {
        cap_errs[set] = cap_errs[set] ? 2 * cap_errs[set] : 65536;
        all_errs[set] = realloc(all_errs[set], cap_errs[set] * sizeof(double));
        if (!all_errs[set]) exit(3);
    }
    all_errs[set][n_errs[set]++] = e;
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Adds the per-head relative errors of `rows` output rows. */
static void compare(const Options *o, int phase, int set, const float *got, const float *ref, uint32_t rows) {
    uint32_t hd = o->head_dim, nq = o->kv_heads * o->gqa, r, h, c;
    for (r = 0; r < rows; r++)
        for (h = 0; h < nq; h++) {
            const float *a = got + ((size_t)r * nq + h) * hd, *b = ref + ((size_t)r * nq + h) * hd;
            double num = 0, den = 0, e;
            for (c = 0; c < hd; c++) {
                num += (double)(a[c] - b[c]) * (double)(a[c] - b[c]);
                den += (double)b[c] * (double)b[c];
            }
            e = sqrt(num / (den > 1e-30 ? den : 1e-30));
            keep_err(set, e);
            errs[phase][set].sum += e;
            errs[phase][set].n++;
            if (e > errs[phase][set].max || e != e) errs[phase][set].max = e != e ? INFINITY : e;
        }
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* ---------------------------------------------------------------- the engine */

typedef struct {
    Options o;
    Model m;
    kivi_cache *cache[N_SET];
    Seq *seqs;
    uint32_t n_seqs;
    float *k, *v, *q, *ref, *out[N_SET], *logits;
    double decode_time[N_SET], prefill_time[N_SET];
    uint64_t decode_steps, prefill_tokens;
    float *record; /* outputs recorded for the restore check */
    size_t record_len, record_pos;
    int replay, replay_mismatch;
    float replay_tol;   /* 0: replayed outputs must be bit for bit the same; else within this */
    int moved_mismatch; /* outputs after the move to other pages differ by more than replay_tol */
    uint64_t planned[N_SET]; /* what kivi_params_memory said each cache would take */
    int plan_mismatch;       /* a cache took other memory than that */
} Engine;

static kivi_rows rows_of(const float *data, uint32_t n, uint32_t len) {
    kivi_rows r;
    memset(&r, 0, sizeof r);
    r.data = data;
    r.dtype = KIVI_DTYPE_F32;
    r.n_rows = n;
    r.row_len = len;
    return r;
}

static kivi_rows_mut rows_mut_of(float *data, uint32_t n, uint32_t len) {
    kivi_rows_mut r;
    memset(&r, 0, sizeof r);
    r.data = data;
    r.dtype = KIVI_DTYPE_F32;
    r.n_rows = n;
    r.row_len = len;
    return r;
}

/* Outputs of the save/restore phase: recorded the first time, compared bit for bit the second. */
static void record_or_compare(Engine *e, const float *out, size_t n) {
    if (!e->record) return;
    if (e->record_pos + n > e->record_len) exit(4);
    if (!e->replay) {
        memcpy(e->record + e->record_pos, out, n * sizeof(float));
    } else if (e->replay_tol == 0) {
        if (memcmp(e->record + e->record_pos, out, n * sizeof(float)) != 0) e->replay_mismatch = 1;
    } else {
        size_t i;
        for (i = 0; i < n; i++) {
            float a = e->record[e->record_pos + i];
            if (!(fabsf(out[i] - a) <= e->replay_tol * (1.0f + fabsf(a)))) e->moved_mismatch = 1;
        }
    }
    e->record_pos += n;
}

/* Prefill `n` tokens of sequence `s` in chunks: every layer appends and attends. */
static void prefill(Engine *e, Seq *s, uint32_t n) {
    const Options *o = &e->o;
    uint32_t row = o->kv_heads * o->head_dim, qrow = row * o->gqa, done, l, t, i;
    for (done = 0; done < n; done += o->chunk) {
        uint32_t c = n - done < o->chunk ? n - done : o->chunk, pos0 = s->len;
        for (l = 0; l < o->layers; l++) {
            kivi_rows kr = rows_of(e->k, c, row), vr = rows_of(e->v, c, row), qr = rows_of(e->q, c, qrow);
            for (t = 0; t < c; t++) {
                gen_token(o, &e->m, l, e->k + (size_t)t * row, e->v + (size_t)t * row, e->q + (size_t)t * qrow);
                memcpy(s->k[l] + (size_t)(pos0 + t) * row, e->k + (size_t)t * row, row * sizeof(float));
                memcpy(s->v[l] + (size_t)(pos0 + t) * row, e->v + (size_t)t * row, row * sizeof(float));
            }
            for (t = 0; t < c; t++)
                reference(o, s->k[l], s->v[l], pos0 + t, e->q + (size_t)t * qrow, e->ref + (size_t)t * qrow,
                          e->logits);
            for (i = 0; i < n_set; i++) {
                kivi_rows_mut orow = rows_mut_of(e->out[i], c, qrow);
                double t0 = now();
                CHECK(kivi_append_attend(e->cache[i], l, s->id, &kr, &vr, &qr, &orow, NULL));
                e->prefill_time[i] += now() - t0;
                compare(o, PH_PREFILL, (int)i, e->out[i], e->ref, c);
            }
        }
        s->len += c;
        e->prefill_tokens += c;
    }
}

/* One decode step: every live sequence gets one token, in every layer, one kivi_decode per layer. */
/* One decode step of every live sequence, every layer. With a phase, outputs are checked against
   the reference and counted in its errors and the decode time; with -1 (caches checked against
   each other) they are only recorded or compared. */
static void decode_step(Engine *e, int phase) {
    const Options *o = &e->o;
    uint32_t row = o->kv_heads * o->head_dim, qrow = row * o->gqa, ids[64], n = 0, l, j, i;
    Seq *live[64];
    for (j = 0; j < e->n_seqs; j++)
        if (e->seqs[j].live) {
            live[n] = &e->seqs[j];
            ids[n++] = e->seqs[j].id;
        }
    for (l = 0; l < o->layers; l++) {
        kivi_rows kr = rows_of(e->k, n, row), vr = rows_of(e->v, n, row), qr = rows_of(e->q, n, qrow);
        for (j = 0; j < n; j++) {
            Seq *s = live[j];
            gen_token(o, &e->m, l, e->k + (size_t)j * row, e->v + (size_t)j * row, e->q + (size_t)j * qrow);
            memcpy(s->k[l] + (size_t)s->len * row, e->k + (size_t)j * row, row * sizeof(float));
            memcpy(s->v[l] + (size_t)s->len * row, e->v + (size_t)j * row, row * sizeof(float));
            if (phase >= 0)
                reference(o, s->k[l], s->v[l], s->len, e->q + (size_t)j * qrow, e->ref + (size_t)j * qrow,
                          e->logits);
        }
        for (i = 0; i < n_set; i++) {
            kivi_rows_mut orow = rows_mut_of(e->out[i], n, qrow);
            double t0 = now();
            CHECK(kivi_decode(e->cache[i], l, ids, n, &kr, &vr, &qr, &orow, NULL));
            if (phase >= 0) {
                e->decode_time[i] += now() - t0;
                compare(o, phase, (int)i, e->out[i], e->ref, n);
            }
            record_or_compare(e, e->out[i], (size_t)n * qrow);
        }
    }
    for (j = 0; j < n; j++) live[j]->len++;
    if (phase >= 0) e->decode_steps++;
}

/* The sequence's length in every cache is what the engine expects. */
static void check_len(Engine *e, const Seq *s) {
    uint32_t i, len = 0;
    for (i = 0; i < n_set; i++) {
        CHECK(kivi_seq_len(e->cache[i], s->id, &len));
        if (len != s->len) {
            fprintf(stderr, "harness: %s holds %u tokens of sequence %u, expected %u\n", NAMES[i], len, s->id,
                    s->len);
            exit(1);
        }
    }
}

static int parse(int argc, char **argv, Options *o) {
    int a;
    for (a = 1; a < argc; a++) {
        const char *k = argv[a];
        unsigned long v;
        if (!strcmp(k, "--quick")) {
            o->layers = 2, o->kv_heads = 2, o->head_dim = 64, o->gqa = 2, o->seqs = 2;
            o->prompt = 200, o->chunk = 64, o->decode = 8;
            continue;
        }
        if (!strcmp(k, "--baseline")) {
            n_set = 4;
            continue;
        }
        if (!strcmp(k, "--help") || !strcmp(k, "-h") || a + 1 >= argc) return 0;
        v = strtoul(argv[++a], NULL, 10);
        if (!strcmp(k, "--layers")) o->layers = (uint32_t)v;
        else if (!strcmp(k, "--kv-heads")) o->kv_heads = (uint32_t)v;
        else if (!strcmp(k, "--head-dim")) o->head_dim = (uint32_t)v;
        else if (!strcmp(k, "--gqa")) o->gqa = (uint32_t)v;
        else if (!strcmp(k, "--seqs")) o->seqs = (uint32_t)v;
        else if (!strcmp(k, "--prompt")) o->prompt = (uint32_t)v;
        else if (!strcmp(k, "--chunk")) o->chunk = (uint32_t)v;
        else if (!strcmp(k, "--decode")) o->decode = (uint32_t)v;
        else if (!strcmp(k, "--threads")) o->threads = (uint32_t)v;
        else if (!strcmp(k, "--seed")) o->seed = (uint64_t)v;
        else return 0;
    }
    return o->layers && o->kv_heads && o->head_dim && o->gqa && o->seqs && o->seqs <= 32 && o->prompt >= 64 &&
           o->chunk && o->decode;
}

static void usage(void) {
    fprintf(stderr,
            "usage: harness [--quick] [--baseline] [--layers N] [--kv-heads N] [--head-dim N] [--gqa N] [--seqs N]\n"
            "               [--prompt N] [--chunk N] [--decode N] [--threads N] [--seed N]\n"
            "defaults: the 32 layers of a Llama-3-8B-like shape (8 KV heads, head_dim 128, GQA 4), 2 sequences,\n"
            "prompt 512 (each next sequence's 64 shorter), chunks of 128, 16 decode steps, 2 threads, seed 1.\n"
            "--quick: 2 layers, 2 KV heads, head_dim 64, GQA 2, prompt 200, chunks of 64, 8 steps.\n"
            "--baseline: a fourth cache with 2-bit keys grouped per token (the KIVI paper's baseline).\n");
}

static void line(void) {
    printf("%s\n", n_set > 3 ? "------------------------------------------------------------------------------------------"
                              "----------------------------"
                            : "------------------------------------------------------------------------------------------"
                              "------------");
}

int main(int argc, char **argv) {
    Engine e;
    Options *o = &e.o;
    uint32_t row, qrow, i, step, extra = 8, rollback = 150, max_rows;
    size_t j;
    kivi_params p;
    int failed = 0;
    double t_start = now(), quantized = 0;

    memset(&e, 0, sizeof e);
    o->layers = 32, o->kv_heads = 8, o->head_dim = 128, o->gqa = 4, o->seqs = 2;
    o->prompt = 512, o->chunk = 128, o->decode = 16, o->threads = 2, o->seed = 1;
    if (!parse(argc, argv, o)) {
        usage();
        return 2;
    }
    row = o->kv_heads * o->head_dim;
    qrow = row * o->gqa;
    rng_state = o->seed;
    e.m = make_model(o);

    /* Room per sequence: prompt, decode, then three phases of `extra` steps (restore decodes twice
       over the same positions), the per-sequence restore step, and one more (the restart check
       decodes a step on copies). */
    seq_cap = o->prompt + o->decode + 4 * extra + 2;
    e.n_seqs = o->seqs + 1;
    e.seqs = calloc(e.n_seqs, sizeof(Seq));
    max_rows = o->chunk > e.n_seqs ? o->chunk : e.n_seqs;
    e.k = malloc((size_t)max_rows * row * sizeof(float));
    e.v = malloc((size_t)max_rows * row * sizeof(float));
    e.q = malloc((size_t)max_rows * qrow * sizeof(float));
    e.ref = malloc((size_t)max_rows * qrow * sizeof(float));
    e.logits = malloc((size_t)seq_cap * sizeof(float));
    if (!e.seqs || !e.k || !e.v || !e.q || !e.ref || !e.logits) return 3;

    printf("kivi %s engine harness, CPU kernels: %s\n", kivi_version(), kivi_cpu_isa());
    printf("model: %u layers, %u KV heads x %u channels, %u query heads (GQA %u); %u sequences, prompt %u\n",
           o->layers, o->kv_heads, o->head_dim, o->kv_heads * o->gqa, o->gqa, o->seqs, o->prompt);
    printf("       in chunks of %u, %u decode steps, %u thread(s) per call, seed %llu\n", o->chunk, o->decode,
           o->threads, (unsigned long long)o->seed);
    CHECK(kivi_params_init(&p, sizeof p));
    printf("cache: keys per channel in groups of %u tokens, values per token in groups of %u channels,\n",
           p.group_size, p.value_group);
    printf("       first %u and last %u tokens in f16; reference: plain-C float attention over the\n", p.sinks,
           p.residual);
    printf("       unquantized f16 data\n");

    p.n_layers = o->layers;
    p.n_kv_heads = o->kv_heads;
    p.head_dim = o->head_dim;
    p.dtype = KIVI_DTYPE_F16;
    p.max_seqs = e.n_seqs;
    p.max_tokens = e.n_seqs * seq_cap; /* the pool, shared by every sequence */
    p.max_seq_tokens = seq_cap;        /* one sequence's context length: sizes its page tables */
    p.n_threads = o->threads;
    for (i = 0; i < n_set; i++) {
        p.key_bits = p.value_bits = BITS[i];
        p.key_mode = KEY_MODE[i];
        {
            /* What the cache will take, known before it is made (an engine sizes its pool so). */
            kivi_memory_plan plan;
            kivi_memory_stats st0;
            CHECK(kivi_params_memory(&p, &plan, sizeof plan));
            CHECK(kivi_cache_create(&p, &e.cache[i]));
            /* The attention kernels ready before the first call (a CUDA cache compiles them here;
               a CPU cache checks the number of query heads). */
            CHECK(kivi_cache_prepare(e.cache[i], o->kv_heads * o->gqa));
            CHECK(kivi_cache_stats(e.cache[i], &st0, sizeof st0));
            e.planned[i] = plan.bytes;
            if (st0.reserved_bytes + st0.table_bytes != plan.bytes) e.plan_mismatch = 1;
        }
        e.out[i] = malloc((size_t)max_rows * qrow * sizeof(float));
        if (!e.out[i]) return 3;
    }
    for (j = 0; j < e.n_seqs; j++) seq_init(&e.seqs[j], o, j == o->seqs ? FORK_ID : j);
    e.seqs[o->seqs].live = 0;

    /* 1. prefill, 2. decode */
    for (j = 0; j < o->seqs; j++) {
        uint32_t shorter = 64 * (uint32_t)(j % 4);
        prefill(&e, &e.seqs[j], o->prompt > shorter + 64 ? o->prompt - shorter : o->prompt);
    }
    for (step = 0; step < o->decode; step++) decode_step(&e, PH_DECODE);
    for (j = 0; j < o->seqs; j++) check_len(&e, &e.seqs[j]);

    /* 3. rollback: sequence 0 drops its last tokens, then decoding goes on. */
    if (rollback > e.seqs[0].len / 2) rollback = e.seqs[0].len / 2;
    for (i = 0; i < n_set; i++) CHECK(kivi_seq_truncate(e.cache[i], e.seqs[0].id, e.seqs[0].len - rollback));
    e.seqs[0].len -= rollback;
    check_len(&e, &e.seqs[0]);
    for (step = 0; step < extra; step++) decode_step(&e, PH_ROLLBACK);

    /* 4. fork: sequence 0 is copied, and both go on with different tokens. */
    {
        Seq *src = &e.seqs[0], *dst = &e.seqs[o->seqs];
        for (i = 0; i < n_set; i++) CHECK(kivi_seq_copy(e.cache[i], src->id, dst->id, UINT32_MAX));
        for (i = 0; i < o->layers; i++) {
            memcpy(dst->k[i], src->k[i], (size_t)src->len * row * sizeof(float));
            memcpy(dst->v[i], src->v[i], (size_t)src->len * row * sizeof(float));
        }
        dst->len = src->len;
        dst->live = 1;
        check_len(&e, dst);
        for (step = 0; step < extra; step++) decode_step(&e, PH_FORK);
    }

    /* 5. save/restore: save, decode, restore, decode the same steps again; outputs must match. */
    {
        uint8_t *blob[N_SET];
        size_t size[N_SET], written = 0;
        uint32_t lens[64], live = 0;
        uint64_t rng = rng_state;
        for (j = 0; j < e.n_seqs; j++) {
            lens[j] = e.seqs[j].len;
            live += e.seqs[j].live;
        }
        for (i = 0; i < n_set; i++) {
            CHECK(kivi_state_size(e.cache[i], &size[i]));
            blob[i] = malloc(size[i]);
            if (!blob[i]) return 3;
            CHECK(kivi_state_save(e.cache[i], blob[i], size[i], &written));
        }
        e.record_len = (size_t)extra * o->layers * n_set * live * qrow;
        e.record = malloc(e.record_len * sizeof(float));
        if (!e.record) return 3;
        for (step = 0; step < extra; step++) decode_step(&e, PH_RESTORE);
        for (i = 0; i < n_set; i++) {
            CHECK(kivi_state_load(e.cache[i], blob[i], size[i]));
            free(blob[i]);
        }
        for (j = 0; j < e.n_seqs; j++) e.seqs[j].len = lens[j];
        rng_state = rng;
        e.replay = 1;
        e.record_pos = 0;
        for (step = 0; step < extra; step++) decode_step(&e, PH_RESTORE);
        free(e.record);
        e.record = NULL;

        /* One sequence on its own: save it, remove it, load it back, and decode a step. */
        for (i = 0; i < n_set; i++) {
            uint32_t id = e.seqs[o->seqs - 1].id;
            uint8_t *one;
            CHECK(kivi_seq_state_size(e.cache[i], id, &size[i]));
            one = malloc(size[i]);
            if (!one) return 3;
            CHECK(kivi_seq_state_save(e.cache[i], id, one, size[i], &written));
            CHECK(kivi_seq_remove(e.cache[i], id));
            CHECK(kivi_seq_state_load(e.cache[i], id, one, written));
            free(one);
        }
        for (j = 0; j < e.n_seqs; j++) check_len(&e, &e.seqs[j]);
        decode_step(&e, PH_RESTORE);

        /* A restart with other settings: each cache's state is loaded into a copy with the same
           settings and into a new cache of 256-token pages (the pages are regrouped). The next
           step is decoded on both: the outputs must agree to float rounding (attention may sum
           the pages in another order). The caches themselves are left as they are, so the check
           changes none of the statistics reported below. */
        {
            kivi_cache *same[N_SET], *moved[N_SET], *kept[N_SET];
            rng = rng_state;
            live = 0;
            for (j = 0; j < e.n_seqs; j++) {
                lens[j] = e.seqs[j].len;
                live += e.seqs[j].live;
            }
            for (i = 0; i < n_set; i++) {
                kivi_params q;
                uint8_t *all;
                CHECK(kivi_cache_params(e.cache[i], &q, sizeof q));
                CHECK(kivi_state_size(e.cache[i], &size[i]));
                all = malloc(size[i]);
                if (!all) return 3;
                CHECK(kivi_state_save(e.cache[i], all, size[i], &written));
                CHECK(kivi_cache_create(&q, &same[i]));
                CHECK(kivi_state_load(same[i], all, written));
                q.page_tokens = 256;
                CHECK(kivi_cache_create(&q, &moved[i]));
                CHECK(kivi_state_load(moved[i], all, written));
                free(all);
                kept[i] = e.cache[i];
                e.cache[i] = same[i];
            }
            e.record_len = (size_t)o->layers * n_set * live * qrow;
            e.record = malloc(e.record_len * sizeof(float));
            if (!e.record) return 3;
            e.replay = 0;
            e.record_pos = 0;
            decode_step(&e, -1);
            for (i = 0; i < n_set; i++) e.cache[i] = moved[i];
            for (j = 0; j < e.n_seqs; j++) e.seqs[j].len = lens[j];
            rng_state = rng;
            e.replay = 1;
            e.replay_tol = 1e-5f;
            e.record_pos = 0;
            decode_step(&e, -1);
            for (j = 0; j < e.n_seqs; j++) check_len(&e, &e.seqs[j]);
            for (i = 0; i < n_set; i++) {
                kivi_cache_free(same[i]);
                kivi_cache_free(moved[i]);
                e.cache[i] = kept[i];
            }
            for (j = 0; j < e.n_seqs; j++) e.seqs[j].len = lens[j];
            rng_state = rng;
            free(e.record);
            e.record = NULL;
        }
    }

    /* ------------------------------------------------------------ report */
    printf("\nattention error, ||out - ref|| / ||ref|| per head: mean / max over %llu outputs\n",
           (unsigned long long)(errs[PH_PREFILL][0].n + errs[PH_DECODE][0].n + errs[PH_ROLLBACK][0].n +
                                errs[PH_FORK][0].n + errs[PH_RESTORE][0].n));
    line();
    printf("%-20s %9s", "phase", "outputs");
    for (i = 0; i < n_set; i++) printf("   %-8s mean / max", NAMES[i]);
    printf("\n");
    line();
    for (j = 0; j < N_PH; j++) {
        printf("%-20s %9llu", PHASES[j], (unsigned long long)errs[j][0].n);
        for (i = 0; i < n_set; i++)
            printf("   %7.5f / %-9.5f", errs[j][i].n ? errs[j][i].sum / (double)errs[j][i].n : 0.0, errs[j][i].max);
        printf("\n");
    }
    line();

    printf("\n%-8s %9s %9s %9s %10s %9s %7s %11s %9s  %s\n", "setting", "mean err", "p99 err", "max err",
           "cache MiB", "f16 MiB", "vs f16", "decode ms", "prefill", "result");
    printf("%-8s %9s %9s %9s %10s %9s %7s %11s %9s\n", "", "", "", "", "", "", "", "per step", "tok/s");
    line();
    for (i = 0; i < n_set; i++) {
        kivi_memory_stats st;
        double mean, p99, mx;
        int ok;
        qsort(all_errs[i], n_errs[i], sizeof(double), by_value);
        mean = 0;
        for (j = 0; j < n_errs[i]; j++) mean += all_errs[i][j];
        mean /= (double)n_errs[i];
        p99 = all_errs[i][(size_t)(0.99 * (double)(n_errs[i] - 1))];
        mx = all_errs[i][n_errs[i] - 1];
        ok = mean <= BOUND_MEAN[i] && p99 <= BOUND_P99[i] && mx <= BOUND_MAX[i];
        failed |= !ok;
        CHECK(kivi_cache_stats(e.cache[i], &st, sizeof st));
        if (i == 0) quantized = 100.0 * (double)st.quantized_tokens / (double)st.tokens;
        printf("%-8s %9.5f %9.5f %9.5f %10.2f %9.2f %6.2fx %11.2f %9.0f  %s\n", NAMES[i], mean, p99, mx,
               (double)st.used_bytes / 1048576.0, (double)st.f16_bytes / 1048576.0,
               (double)st.f16_bytes / (double)st.used_bytes, 1e3 * e.decode_time[i] / (double)e.decode_steps,
               (double)e.prefill_tokens / e.prefill_time[i], ok ? "ok" : "FAIL (bound broken)");
        if (i < 3)
            printf("%-8s %9.5f %9.5f %9.5f\n", "  bound", BOUND_MEAN[i], BOUND_P99[i], BOUND_MAX[i]);
        else
            printf("%-8s %9s  (a baseline: KIVI-2 must have less error)\n", "  bound", "none");
    }
    line();
    printf("cache: all %u sequences at the end, %.1f%% of their tokens quantized; f16: an f16 cache of the same\n"
           "tokens. decode step: %u layers x one kivi_decode for %u sequences; prefill: kivi_append_attend calls.\n",
           o->seqs + 1, quantized, o->layers, o->seqs + 1);
    printf("save/restore: outputs after restore %s the outputs before it\n",
           e.replay_mismatch ? "DIFFER FROM" : "are bit for bit");
    printf("restart: outputs of the caches moved to 256-token pages %s the original caches' (1e-5)\n",
           e.moved_mismatch ? "DIFFER FROM" : "match");
    printf("memory: each cache took at creation %s kivi_params_memory planned (%.1f MiB for %s)\n",
           e.plan_mismatch ? "OTHER THAN what" : "what", (double)e.planned[0] / 1048576.0, NAMES[0]);
    failed |= e.replay_mismatch | e.moved_mismatch | e.plan_mismatch;
    for (i = 1; i < 3; i++) {
        double a = errs[PH_DECODE][i - 1].sum, b = errs[PH_DECODE][i].sum;
        if (quantized > 0 && !(b < a)) { /* with nothing quantized, all are exact */
            printf("FAIL: %s is not more accurate than %s\n", NAMES[i], NAMES[i - 1]);
            failed = 1;
        }
    }
    if (n_set > 3) {
        double kivi = errs[PH_DECODE][0].sum, token = errs[PH_DECODE][3].sum;
        printf("keys per channel (KIVI-2) against keys per token (2b-token), decode: %.1fx less error\n",
               token / kivi);
        if (quantized > 0 && !(kivi < token)) {
            printf("FAIL: per-channel keys are not more accurate than per-token keys\n");
            failed = 1;
        }
    }
    printf("total time %.1f s: %s\n", now() - t_start, failed ? "FAILED" : "all checks passed");

    for (i = 0; i < n_set; i++) {
        kivi_cache_free(e.cache[i]);
        free(e.out[i]);
    }
    for (j = 0; j < e.n_seqs; j++) {
        for (i = 0; i < o->layers; i++) {
            free(e.seqs[j].k[i]);
            free(e.seqs[j].v[i]);
        }
        free(e.seqs[j].k);
        free(e.seqs[j].v);
    }
    free(e.seqs), free(e.k), free(e.v), free(e.q), free(e.ref), free(e.logits);
    free(e.m.key_mean), free(e.m.key_spread), free(e.m.value_mean);
    return failed ? 1 : 0;
}
