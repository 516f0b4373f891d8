/*
 * errors.c: bad input through the C ABI. Every case must return its status with a message, leave
 * output arguments unwritten and leave the cache unchanged (the saved state is compared byte for
 * byte before and after). Run by tests/c_abi.rs, plain and under ASan/UBSan.
 */
#include <math.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kivi.h"

/* The status numbers are ABI: they must never change. */
#define PIN(name, value) typedef char pin_##name[(name == value) ? 1 : -1]
PIN(KIVI_OK, 0);
PIN(KIVI_ERR_NULL_POINTER, 1);
PIN(KIVI_ERR_INVALID_CONFIG, 2);
PIN(KIVI_ERR_INVALID_ARGUMENT, 3);
PIN(KIVI_ERR_SHAPE, 4);
PIN(KIVI_ERR_NON_FINITE, 5);
PIN(KIVI_ERR_LAYER_OUT_OF_RANGE, 6);
PIN(KIVI_ERR_UNKNOWN_SEQUENCE, 7);
PIN(KIVI_ERR_CAPACITY_EXHAUSTED, 8);
PIN(KIVI_ERR_TOO_MANY_SEQUENCES, 9);
PIN(KIVI_ERR_BUFFER_TOO_SMALL, 10);
PIN(KIVI_ERR_CORRUPT_STATE, 11);
PIN(KIVI_ERR_STATE_MISMATCH, 12);
PIN(KIVI_ERR_STRUCT_SIZE, 13);
PIN(KIVI_ERR_BACKEND_UNAVAILABLE, 14);
PIN(KIVI_ERR_SEQUENCE_FULL, 15);
PIN(KIVI_ERR_INTERNAL, 99);
typedef char pin_status_width[(sizeof(kivi_status) == 4) ? 1 : -1];

enum { LAYERS = 2, KV = 2, QH = 4, HD = 32, KVROW = KV * HD, QROW = QH * HD };

static int failures = 0, checks = 0;

static void fail(const char *what, const char *why) {
    fprintf(stderr, "FAIL %s: %s\n", what, why);
    failures++;
}

/* The call returned `want`, and its message names the function. */
static void expect(const char *what, kivi_status got, kivi_status want, const char *fn) {
    const char *msg = kivi_last_error_message();
    checks++;
    if (got != want) {
        char buf[512];
        snprintf(buf, sizeof buf, "got %s, want %s (%s)", kivi_status_str(got), kivi_status_str(want), msg);
        fail(what, buf);
        return;
    }
    if (want != KIVI_OK && (msg == NULL || strncmp(msg, fn, strlen(fn)) != 0 || strlen(msg) < strlen(fn) + 8)) {
        fail(what, "the message does not name the function or says nothing");
        return;
    }
    if (want != KIVI_OK && getenv("KIVI_SHOW_ERRORS")) printf("  %-40s %s\n", what, msg);
}

static uint8_t *save(const kivi_cache *c, size_t *n) {
    size_t size = 0, written = 0;
    uint8_t *buf;
    if (kivi_state_size(c, &size) != KIVI_OK) return NULL;
    buf = malloc(size);
    if (!buf || kivi_state_save(c, buf, size, &written) != KIVI_OK) {
        free(buf);
        return NULL;
    }
    *n = written;
    return buf;
}

/* The cache's saved state is byte for byte `before`. */
static void unchanged(const char *what, const kivi_cache *c, const uint8_t *before, size_t n) {
    size_t m = 0;
    uint8_t *now = save(c, &m);
    checks++;
    if (!now || m != n || memcmp(now, before, n) != 0) fail(what, "the cache changed after a failed call");
    free(now);
}

static kivi_rows rows(const float *data, uint32_t n, uint32_t len) {
    kivi_rows r;
    memset(&r, 0, sizeof r);
    r.data = data;
    r.dtype = KIVI_DTYPE_F32;
    r.n_rows = n;
    r.row_len = len;
    return r;
}

static kivi_rows_mut rows_mut(float *data, uint32_t n, uint32_t len) {
    kivi_rows_mut r;
    memset(&r, 0, sizeof r);
    r.data = data;
    r.dtype = KIVI_DTYPE_F32;
    r.n_rows = n;
    r.row_len = len;
    return r;
}

static kivi_params small_params(void) {
    kivi_params p;
    kivi_params_init(&p, sizeof p);
    p.n_layers = LAYERS;
    p.n_kv_heads = KV;
    p.head_dim = HD;
    p.group_size = 8;
    p.value_group = 16;
    p.residual = 16;
    p.max_tokens = 64;
    p.max_seqs = 3;
    return p;
}

static float kbuf[200 * KVROW], vbuf[200 * KVROW], qbuf[200 * QROW], obuf[200 * QROW];

static void fill(void) {
    int i;
    for (i = 0; i < 200 * KVROW; i++) {
        kbuf[i] = (float)sin(0.1 * i) + (i % KVROW == 3 ? 9.0f : 0.0f);
        vbuf[i] = (float)cos(0.07 * i);
    }
    for (i = 0; i < 200 * QROW; i++) qbuf[i] = (float)sin(0.013 * i);
}

/* Appends n tokens to seq in every layer. */
static kivi_status append_all(kivi_cache *c, uint32_t seq, uint32_t n) {
    kivi_rows k = rows(kbuf, n, KVROW), v = rows(vbuf, n, KVROW);
    uint32_t l;
    for (l = 0; l < LAYERS; l++) {
        kivi_status s = kivi_append(c, l, seq, &k, &v);
        if (s != KIVI_OK) return s;
    }
    return KIVI_OK;
}

static void *other_thread(void *arg) {
    uint32_t len = 0;
    (void)arg;
    kivi_seq_len(NULL, 0, &len);
    return NULL;
}

struct reader {
    const kivi_cache *cache;
    int bad;
};

static void *read_concurrently(void *arg) {
    struct reader *r = arg;
    float o[QROW];
    kivi_rows qr = rows(qbuf, 1, QROW);
    kivi_rows_mut orow = rows_mut(o, 1, QROW);
    int i;
    for (i = 0; i < 200; i++) {
        uint32_t len;
        if (kivi_attend(r->cache, (uint32_t)(i % LAYERS), 1, &qr, &orow, NULL) != KIVI_OK) r->bad++;
        if (kivi_seq_len(r->cache, 1, &len) != KIVI_OK || len < 40 || len > 50) r->bad++;
    }
    return NULL;
}

struct writer {
    kivi_cache *cache;
    uint32_t seq;
    int bad;
};

/* Appends 10 tokens, one call per token and layer, while other threads read and write. */
static void *write_concurrently(void *arg) {
    struct writer *w = arg;
    int t;
    for (t = 0; t < 10; t++) {
        kivi_rows k = rows(kbuf + t * KVROW, 1, KVROW), v = rows(vbuf + t * KVROW, 1, KVROW);
        uint32_t l;
        for (l = 0; l < LAYERS; l++)
            if (kivi_append(w->cache, l, w->seq, &k, &v) != KIVI_OK) w->bad++;
    }
    return NULL;
}

int main(void) {
    kivi_params p = small_params();
    kivi_cache *c = NULL, *other = NULL, *sentinel = (kivi_cache *)&p;
    uint8_t *before;
    size_t n_before = 0;
    uint32_t len = 12345, seq1 = 1;
    kivi_rows k, v, q;
    kivi_rows_mut o;
    kivi_attn_options opts;

    fill();
    printf("kivi %s: bad input through the C ABI\n", kivi_version());
    if (strcmp(kivi_version(), KIVI_VERSION_STRING) != 0) fail("version", "library and header versions differ");
    checks++;
    {
        /* The CPU kernels' instruction set: one of four names, the same on every call. */
        const char *isa = kivi_cpu_isa();
        if (!isa || (strcmp(isa, "avx512") != 0 && strcmp(isa, "avx2") != 0 && strcmp(isa, "neon") != 0 &&
                     strcmp(isa, "scalar") != 0))
            fail("cpu_isa", "not one of avx512, avx2, neon, scalar");
        else if (strcmp(kivi_cpu_isa(), isa) != 0)
            fail("cpu_isa", "changed between calls");
    }

    /* --- statuses and messages */
    checks++;
    if (strncmp(kivi_status_str(KIVI_ERR_SHAPE), "KIVI_ERR_SHAPE", 14) != 0) fail("status_str", "wrong text");
    if (strncmp(kivi_status_str(12345), "KIVI_ERR_UNKNOWN", 16) != 0) fail("status_str", "unknown status");
    if (strncmp(kivi_status_str(-1), "KIVI_ERR_UNKNOWN", 16) != 0) fail("status_str", "negative status");
    if (strcmp(kivi_last_error_message(), "") != 0) fail("last_error", "not empty before any failure");
    kivi_cache_free(NULL);

    /* --- params and creation */
    expect("params_init NULL", kivi_params_init(NULL, sizeof p), KIVI_ERR_NULL_POINTER, "kivi_params_init");
    expect("params_init small", kivi_params_init(&p, sizeof p - 2), KIVI_ERR_STRUCT_SIZE, "kivi_params_init");
    expect("create NULL params", kivi_cache_create(NULL, &c), KIVI_ERR_NULL_POINTER, "kivi_cache_create");
    expect("create NULL out", kivi_cache_create(&p, NULL), KIVI_ERR_NULL_POINTER, "kivi_cache_create");
    p.struct_size = sizeof p - 2;
    c = sentinel;
    expect("params struct too small", kivi_cache_create(&p, &c), KIVI_ERR_STRUCT_SIZE, "kivi_cache_create");
    {
        /* Callers built with older headers (before value_rounding, before max_seq_tokens): their
           smaller struct is filled and read without the fields, which take their defaults. */
        const size_t old_sizes[2] = {offsetof(kivi_params, value_rounding), offsetof(kivi_params, max_seq_tokens)};
        int i;
        for (i = 0; i < 2; i++) {
            kivi_params old, back;
            kivi_cache *oc = NULL;
            const size_t old_size = old_sizes[i];
            memset(&old, 0x5A, sizeof old);
            expect("params_init older header", kivi_params_init(&old, old_size), KIVI_OK, "");
            checks++;
            if (old.struct_size != old_size || old.head_dim != 128 || old.max_seq_tokens != 0x5A5A5A5A ||
                (i == 0 && old.value_rounding != 0x5A5A5A5A))
                fail("params_init older header", "wrong fields, or wrote past the older struct");
            old.n_layers = LAYERS;
            expect("create from older header", kivi_cache_create(&old, &oc), KIVI_OK, "");
            expect("params of it", kivi_cache_params(oc, &back, sizeof back), KIVI_OK, "");
            checks++;
            if (back.value_rounding != KIVI_ROUNDING_LEAST_SQUARES || back.max_seq_tokens != 0 ||
                back.n_layers != LAYERS)
                fail("create from older header", "the fields it lacks did not take their defaults");
            kivi_cache_free(oc);
        }
    }
    p.struct_size = 0;
    expect("params struct_size 0", kivi_cache_create(&p, &c), KIVI_ERR_STRUCT_SIZE, "kivi_cache_create");
    {
        /* A newer caller's larger struct: accepted while the unknown tail is zero. */
        struct {
            kivi_params p;
            uint32_t future[4];
        } big;
        memset(&big, 0, sizeof big);
        big.p = small_params();
        big.p.struct_size = sizeof big;
        big.future[2] = 7;
        expect("params with unknown fields set", kivi_cache_create(&big.p, &c), KIVI_ERR_STRUCT_SIZE,
               "kivi_cache_create");
        big.future[2] = 0;
        expect("params with zero unknown fields", kivi_cache_create(&big.p, &other), KIVI_OK, "");
        kivi_cache_free(other);
        other = NULL;
    }
    p = small_params();
    p.head_dim = 60;
    expect("head_dim 60", kivi_cache_create(&p, &c), KIVI_ERR_INVALID_CONFIG, "kivi_cache_create");
    p = small_params();
    p.key_bits = 3;
    expect("key_bits 3", kivi_cache_create(&p, &c), KIVI_ERR_INVALID_CONFIG, "kivi_cache_create");
    p = small_params();
    p.n_layers = 0;
    expect("0 layers", kivi_cache_create(&p, &c), KIVI_ERR_INVALID_CONFIG, "kivi_cache_create");
    p = small_params();
    p.dtype = 7;
    expect("dtype 7", kivi_cache_create(&p, &c), KIVI_ERR_INVALID_CONFIG, "kivi_cache_create");
    p = small_params();
    p.value_rounding = 2;
    expect("value_rounding 2", kivi_cache_create(&p, &c), KIVI_ERR_INVALID_CONFIG, "kivi_cache_create");
    if (!strstr(kivi_last_error_message(), "value_rounding 2")) fail("value_rounding 2", "the message does not name it");
    p = small_params();
    p.max_tokens = 0xFFFFFFFFu;
    p.max_seqs = 0xFFFFFFFFu;
    p.n_layers = 0xFFFFFFFFu;
    expect("oversized cache", kivi_cache_create(&p, &c), KIVI_ERR_INVALID_CONFIG, "kivi_cache_create");
    /* Valid, but more memory than a process can map: an error, not an abort. */
    p = small_params();
    p.n_layers = 1;
    p.n_kv_heads = 1u << 20;
    p.head_dim = 1024;
    p.max_tokens = 0xFFFFFFFFu;
    p.page_tokens = 1u << 16;
    p.max_seqs = 1;
    expect("cache too large to allocate", kivi_cache_create(&p, &c), KIVI_ERR_INVALID_CONFIG, "kivi_cache_create");
    if (!strstr(kivi_last_error_message(), "could not allocate"))
        fail("cache too large to allocate", "the message does not say so");
    p = small_params();
    p.device = -2;
    expect("device -2", kivi_cache_create(&p, &c), KIVI_ERR_INVALID_CONFIG, "kivi_cache_create");
    p.device = 0;
    p.n_threads = 2;
    expect("CUDA cache with n_threads 2", kivi_cache_create(&p, &c), KIVI_ERR_INVALID_CONFIG, "kivi_cache_create");
    checks++;
    if (c != sentinel) fail("create", "out_cache written by a failed call");

    /* --- CUDA: where there is none (this test's usual machine), device 0 is refused with the
       reason; where there is one, it is reported (caches on it are examples/gpu_check.rs's to
       test: the CUDA driver under the sanitizers is not this test's business). */
    {
        kivi_device_info info;
        kivi_status st;
        memset(&info, 0xAB, sizeof info);
        expect("device_info NULL out", kivi_cuda_device_info(0, NULL, sizeof info), KIVI_ERR_NULL_POINTER,
               "kivi_cuda_device_info");
        expect("device_info device -1", kivi_cuda_device_info(-1, &info, sizeof info), KIVI_ERR_INVALID_ARGUMENT,
               "kivi_cuda_device_info");
        expect("device_info small struct", kivi_cuda_device_info(0, &info, sizeof info - 8), KIVI_ERR_STRUCT_SIZE,
               "kivi_cuda_device_info");
        st = kivi_cuda_device_info(0, &info, sizeof info);
        p = small_params();
        p.device = 0;
        if (st == KIVI_OK) {
            printf("  CUDA device 0: %s, sm_%u%u, device %d of %u\n", info.name, info.compute_capability_major,
                   info.compute_capability_minor, info.device, info.n_devices);
            checks++;
            if (info.struct_size != sizeof info || info.device != 0 || info.n_devices < 1 ||
                memchr(info.name, 0, sizeof info.name) == NULL || info.name[0] == 0)
                fail("device_info", "implausible device info");
        } else {
            const char *msg = kivi_last_error_message();
            size_t i;
            expect("device_info without CUDA", st, KIVI_ERR_BACKEND_UNAVAILABLE, "kivi_cuda_device_info");
            checks++;
            if (strstr(msg, "device 0") == NULL || strlen(msg) < 50) fail("device_info", "the reason is missing");
            for (i = 0; i < sizeof info; i++)
                if (((const unsigned char *)&info)[i] != 0xAB) break;
            checks++;
            if (i != sizeof info) fail("device_info", "out written by a failed call");
            c = sentinel;
            expect("CUDA cache without CUDA", kivi_cache_create(&p, &c), KIVI_ERR_BACKEND_UNAVAILABLE,
                   "kivi_cache_create");
            checks++;
            if (c != sentinel) fail("create", "out_cache written by a failed call");
        }
    }

    /* --- sizing a cache before making it: the plan is what the cache then reports; the fitted
       max_tokens is the largest whose plan stays within the budget; no device is needed. */
    {
        kivi_memory_plan plan, plan2;
        kivi_memory_stats st;
        kivi_cache *sized = NULL;
        uint32_t fit = 0xABABABABu;
        uint64_t budget;
        memset(&plan, 0xAB, sizeof plan);
        p = small_params();
        expect("memory NULL params", kivi_params_memory(NULL, &plan, sizeof plan), KIVI_ERR_NULL_POINTER,
               "kivi_params_memory");
        expect("memory NULL out", kivi_params_memory(&p, NULL, sizeof plan), KIVI_ERR_NULL_POINTER,
               "kivi_params_memory");
        expect("memory small struct", kivi_params_memory(&p, &plan, sizeof plan - 8), KIVI_ERR_STRUCT_SIZE,
               "kivi_params_memory");
        p.key_bits = 3;
        expect("memory key_bits 3", kivi_params_memory(&p, &plan, sizeof plan), KIVI_ERR_INVALID_CONFIG,
               "kivi_params_memory");
        expect("fit key_bits 3", kivi_params_fit_tokens(&p, 1u << 30, &fit), KIVI_ERR_INVALID_CONFIG,
               "kivi_params_fit_tokens");
        p = small_params();
        expect("fit NULL out", kivi_params_fit_tokens(&p, 1u << 30, NULL), KIVI_ERR_NULL_POINTER,
               "kivi_params_fit_tokens");
        expect("fit NULL params", kivi_params_fit_tokens(NULL, 1u << 30, &fit), KIVI_ERR_NULL_POINTER,
               "kivi_params_fit_tokens");
        expect("fit 1000 bytes", kivi_params_fit_tokens(&p, 1000, &fit), KIVI_ERR_INVALID_ARGUMENT,
               "kivi_params_fit_tokens");
        checks++;
        if (plan.bytes != 0xABABABABABABABABull || fit != 0xABABABABu) fail("sizing", "written by a failed call");

        expect("memory", kivi_params_memory(&p, &plan, sizeof plan), KIVI_OK, "");
        checks++;
        if (plan.struct_size != sizeof plan || plan.device != KIVI_DEVICE_CPU ||
            plan.bytes != plan.reserved_bytes + plan.table_bytes || plan.pages_total == 0)
            fail("memory", "implausible plan");
        expect("create sized", kivi_cache_create(&p, &sized), KIVI_OK, "");
        expect("stats sized", kivi_cache_stats(sized, &st, sizeof st), KIVI_OK, "");
        checks++;
        if (st.reserved_bytes != plan.reserved_bytes || st.table_bytes != plan.table_bytes ||
            st.pages_total != plan.pages_total)
            fail("memory", "the plan is not what the cache takes");
        kivi_cache_free(sized);

        /* max_tokens is ignored (0 is fine); the result fits and one more token does not. */
        budget = 3 * plan.bytes;
        p.max_tokens = 0;
        expect("fit", kivi_params_fit_tokens(&p, budget, &p.max_tokens), KIVI_OK, "");
        fit = p.max_tokens;
        expect("memory at the fit", kivi_params_memory(&p, &plan2, sizeof plan2), KIVI_OK, "");
        checks++;
        if (fit <= 64 || plan2.bytes > budget) fail("fit", "the fitted cache exceeds the budget");
        p.max_tokens = fit + 1;
        expect("memory past the fit", kivi_params_memory(&p, &plan2, sizeof plan2), KIVI_OK, "");
        checks++;
        if (plan2.bytes <= budget) fail("fit", "one more token fits too");

        /* A CUDA cache's device memory, found without a device: pages, windows, block tables,
           the 32 MiB scratch area and its 64 KiB of counters. */
        p = small_params();
        p.device = 0;
        expect("memory on CUDA", kivi_params_memory(&p, &plan, sizeof plan), KIVI_OK, "");
        checks++;
        if (plan.device != 0 || plan.bytes < plan.reserved_bytes + (32u << 20) + (64u << 10) ||
            plan.bytes > plan.reserved_bytes + plan.table_bytes + (32u << 20) + (64u << 10) + 3 * 256)
            fail("memory on CUDA", "implausible device bytes");
        expect("fit on CUDA 16 MiB", kivi_params_fit_tokens(&p, 16u << 20, &fit), KIVI_ERR_INVALID_ARGUMENT,
               "kivi_params_fit_tokens");
        if (!strstr(kivi_last_error_message(), "32 MiB")) fail("fit on CUDA", "the message does not name the scratch area");
    }

    p = small_params();
    expect("create", kivi_cache_create(&p, &c), KIVI_OK, "");
    expect("append seq 1", append_all(c, 1, 40), KIVI_OK, "");
    expect("append seq 2", append_all(c, 2, 9), KIVI_OK, "");
    before = save(c, &n_before);
    if (!before) {
        fail("save", kivi_last_error_message());
        return 1;
    }

    /* --- NULL pointers: each returns its status, and the cache stays as it was */
    k = rows(kbuf, 1, KVROW);
    v = rows(vbuf, 1, KVROW);
    q = rows(qbuf, 1, QROW);
    o = rows_mut(obuf, 1, QROW);
    expect("append NULL cache", kivi_append(NULL, 0, 1, &k, &v), KIVI_ERR_NULL_POINTER, "kivi_append");
    expect("append NULL keys", kivi_append(c, 0, 1, NULL, &v), KIVI_ERR_NULL_POINTER, "kivi_append");
    expect("append NULL values", kivi_append(c, 0, 1, &k, NULL), KIVI_ERR_NULL_POINTER, "kivi_append");
    k.data = NULL;
    expect("append NULL keys.data", kivi_append(c, 0, 1, &k, &v), KIVI_ERR_NULL_POINTER, "kivi_append");
    k = rows(kbuf, 1, KVROW);
    expect("append_attend NULL queries", kivi_append_attend(c, 0, 1, &k, &v, NULL, &o, NULL),
           KIVI_ERR_NULL_POINTER, "kivi_append_attend");
    expect("append_attend NULL out", kivi_append_attend(c, 0, 1, &k, &v, &q, NULL, NULL), KIVI_ERR_NULL_POINTER,
           "kivi_append_attend");
    o.data = NULL;
    expect("append_attend NULL out.data", kivi_append_attend(c, 0, 1, &k, &v, &q, &o, NULL),
           KIVI_ERR_NULL_POINTER, "kivi_append_attend");
    o = rows_mut(obuf, 1, QROW);
    expect("attend NULL cache", kivi_attend(NULL, 0, 1, &q, &o, NULL), KIVI_ERR_NULL_POINTER, "kivi_attend");
    expect("decode NULL seqs", kivi_decode(c, 0, NULL, 1, &k, &v, &q, &o, NULL), KIVI_ERR_NULL_POINTER,
           "kivi_decode");
    expect("seq_len NULL out", kivi_seq_len(c, 1, NULL), KIVI_ERR_NULL_POINTER, "kivi_seq_len");
    expect("seq_len NULL cache", kivi_seq_len(NULL, 1, &len), KIVI_ERR_NULL_POINTER, "kivi_seq_len");
    expect("truncate NULL cache", kivi_seq_truncate(NULL, 1, 0), KIVI_ERR_NULL_POINTER, "kivi_seq_truncate");
    expect("remove NULL cache", kivi_seq_remove(NULL, 1), KIVI_ERR_NULL_POINTER, "kivi_seq_remove");
    expect("copy NULL cache", kivi_seq_copy(NULL, 1, 2, 5), KIVI_ERR_NULL_POINTER, "kivi_seq_copy");
    expect("clear NULL cache", kivi_cache_clear(NULL), KIVI_ERR_NULL_POINTER, "kivi_cache_clear");
    expect("state_size NULL out", kivi_state_size(c, NULL), KIVI_ERR_NULL_POINTER, "kivi_state_size");
    expect("state_save NULL buf", kivi_state_save(c, NULL, 10, &n_before), KIVI_ERR_NULL_POINTER,
           "kivi_state_save");
    expect("state_load NULL buf", kivi_state_load(c, NULL, 10), KIVI_ERR_NULL_POINTER, "kivi_state_load");
    expect("stats NULL out", kivi_cache_stats(c, NULL, sizeof(kivi_memory_stats)), KIVI_ERR_NULL_POINTER,
           "kivi_cache_stats");
    expect("seq_ids NULL out_n", kivi_seq_ids(c, NULL, 0, NULL), KIVI_ERR_NULL_POINTER, "kivi_seq_ids");

    /* --- prepare: a CPU cache has no kernels to compile, and checks the query heads */
    expect("prepare a CPU cache", kivi_cache_prepare(c, QH), KIVI_OK, "");
    expect("prepare 0 query heads", kivi_cache_prepare(c, 0), KIVI_ERR_INVALID_ARGUMENT, "kivi_cache_prepare");
    expect("prepare query heads not a multiple of KV heads", kivi_cache_prepare(c, KV + 1),
           KIVI_ERR_INVALID_ARGUMENT, "kivi_cache_prepare");
    expect("prepare NULL cache", kivi_cache_prepare(NULL, QH), KIVI_ERR_NULL_POINTER, "kivi_cache_prepare");

    /* --- streams: a CPU cache has none */
    {
        void *stream = &p;
        expect("set_stream on a CPU cache", kivi_cache_set_stream(c, (void *)1), KIVI_ERR_INVALID_ARGUMENT,
               "kivi_cache_set_stream");
        expect("set_stream NULL cache", kivi_cache_set_stream(NULL, NULL), KIVI_ERR_NULL_POINTER,
               "kivi_cache_set_stream");
        expect("stream NULL out", kivi_cache_stream(c, NULL), KIVI_ERR_NULL_POINTER, "kivi_cache_stream");
        expect("set_stream NULL on a CPU cache", kivi_cache_set_stream(c, NULL), KIVI_OK, "");
        expect("stream of a CPU cache", kivi_cache_stream(c, &stream), KIVI_OK, "");
        checks++;
        if (stream != NULL) fail("stream", "a CPU cache's stream is not NULL");
        unchanged("streams", c, before, n_before);
    }
    unchanged("NULL pointers", c, before, n_before);

    /* --- zero, wrong and oversized dimensions */
    k = rows(kbuf, 0, KVROW);
    v = rows(vbuf, 0, KVROW);
    expect("0 rows", kivi_append(c, 0, 1, &k, &v), KIVI_ERR_SHAPE, "kivi_append");
    k = rows(kbuf, 1, 0);
    v = rows(vbuf, 1, 0);
    expect("row_len 0", kivi_append(c, 0, 1, &k, &v), KIVI_ERR_SHAPE, "kivi_append");
    k = rows(kbuf, 1, KVROW + 8);
    v = rows(vbuf, 1, KVROW + 8);
    expect("row_len not n_kv_heads * head_dim", kivi_append(c, 0, 1, &k, &v), KIVI_ERR_SHAPE, "kivi_append");
    k = rows(kbuf, 2, KVROW);
    v = rows(vbuf, 3, KVROW);
    expect("keys and values of different rows", kivi_append(c, 0, 1, &k, &v), KIVI_ERR_SHAPE, "kivi_append");
    k = rows(kbuf, 2, KVROW);
    v = rows(vbuf, 2, KVROW);
    k.stride = KVROW - 1;
    expect("stride shorter than the row", kivi_append(c, 0, 1, &k, &v), KIVI_ERR_SHAPE, "kivi_append");
    k = rows(kbuf, 0xFFFFFFFFu, KVROW);
    v = rows(vbuf, 0xFFFFFFFFu, KVROW);
    k.stride = v.stride = (size_t)1 << 40;
    expect("rows beyond the address space", kivi_append(c, 0, 1, &k, &v), KIVI_ERR_SHAPE, "kivi_append");
    k = rows(kbuf, 1, KVROW);
    v = rows(vbuf, 1, KVROW);
    q = rows(qbuf, 1, QROW - HD);
    o = rows_mut(obuf, 1, QROW - HD);
    expect("query heads not a multiple of KV heads", kivi_append_attend(c, 0, 1, &k, &v, &q, &o, NULL),
           KIVI_ERR_SHAPE, "kivi_append_attend");
    q = rows(qbuf, 1, QROW);
    o = rows_mut(obuf, 2, QROW);
    expect("out rows differ from queries", kivi_append_attend(c, 0, 1, &k, &v, &q, &o, NULL), KIVI_ERR_SHAPE,
           "kivi_append_attend");
    o = rows_mut(obuf, 1, QROW);
    expect("decode 0 sequences", kivi_decode(c, 0, &seq1, 0, &k, &v, &q, &o, NULL), KIVI_ERR_SHAPE,
           "kivi_decode");
    {
        uint32_t two[2] = {1, 2};
        expect("decode 2 sequences, 1 row", kivi_decode(c, 0, two, 2, &k, &v, &q, &o, NULL), KIVI_ERR_SHAPE,
               "kivi_decode");
        two[1] = 1;
        k = rows(kbuf, 2, KVROW);
        v = rows(vbuf, 2, KVROW);
        q = rows(qbuf, 2, QROW);
        o = rows_mut(obuf, 2, QROW);
        expect("decode the same sequence twice", kivi_decode(c, 0, two, 2, &k, &v, &q, &o, NULL),
               KIVI_ERR_INVALID_ARGUMENT, "kivi_decode");
    }
    unchanged("dimensions", c, before, n_before);

    /* --- other bad arguments */
    k = rows(kbuf, 1, KVROW);
    v = rows(vbuf, 1, KVROW);
    q = rows(qbuf, 1, QROW);
    o = rows_mut(obuf, 1, QROW);
    k.dtype = 9;
    expect("dtype 9", kivi_append(c, 0, 1, &k, &v), KIVI_ERR_INVALID_ARGUMENT, "kivi_append");
    k.dtype = KIVI_DTYPE_F16;
    expect("dtypes differ", kivi_append(c, 0, 1, &k, &v), KIVI_ERR_INVALID_ARGUMENT, "kivi_append");
    k = rows((const float *)((const char *)kbuf + 2), 1, KVROW);
    expect("misaligned keys", kivi_append(c, 0, 1, &k, &v), KIVI_ERR_INVALID_ARGUMENT, "kivi_append");
    k = rows(kbuf, 1, KVROW);
    o = rows_mut((float *)qbuf, 1, QROW);
    expect("out overlaps queries", kivi_append_attend(c, 0, 1, &k, &v, &q, &o, NULL), KIVI_ERR_INVALID_ARGUMENT,
           "kivi_append_attend");
    o = rows_mut(obuf, 1, QROW);
    memset(&opts, 0, sizeof opts);
    opts.struct_size = sizeof opts;
    opts.flags = 0x80;
    expect("unknown option flag", kivi_append_attend(c, 0, 1, &k, &v, &q, &o, &opts), KIVI_ERR_INVALID_ARGUMENT,
           "kivi_append_attend");
    opts.flags = 0;
    opts.scale = (float)NAN;
    expect("NaN scale", kivi_append_attend(c, 0, 1, &k, &v, &q, &o, &opts), KIVI_ERR_INVALID_ARGUMENT,
           "kivi_append_attend");
    opts.scale = 0;
    opts.softcap = -1;
    expect("negative softcap", kivi_append_attend(c, 0, 1, &k, &v, &q, &o, &opts), KIVI_ERR_INVALID_ARGUMENT,
           "kivi_append_attend");
    opts.softcap = 0;
    opts.struct_size = 8;
    expect("options struct too small", kivi_append_attend(c, 0, 1, &k, &v, &q, &o, &opts), KIVI_ERR_STRUCT_SIZE,
           "kivi_append_attend");
    {
        kivi_memory_stats st;
        memset(&st, 0xAB, sizeof st);
        expect("stats struct too small", kivi_cache_stats(c, &st, sizeof st - 4), KIVI_ERR_STRUCT_SIZE,
               "kivi_cache_stats");
        checks++;
        if (st.tokens != 0xABABABABABABABABull) fail("stats", "written by a failed call");
        /* A caller built with the header before table_bytes gets the fields it knows. */
        expect("stats of an older header", kivi_cache_stats(c, &st, offsetof(kivi_memory_stats, table_bytes)),
               KIVI_OK, "");
        checks++;
        if (st.struct_size != offsetof(kivi_memory_stats, table_bytes) || st.tokens == 0xABABABABABABABABull ||
            st.table_bytes != 0xABABABABABABABABull)
            fail("stats of an older header", "wrong fields, or wrote past the older struct");
        expect("stats", kivi_cache_stats(c, &st, sizeof st), KIVI_OK, "");
        checks++;
        if (st.table_bytes == 0 || st.table_bytes == 0xABABABABABABABABull) fail("stats", "table_bytes not written");
    }
    {
        float nan_keys[KVROW];
        memcpy(nan_keys, kbuf, sizeof nan_keys);
        nan_keys[5] = (float)NAN;
        k = rows(nan_keys, 1, KVROW);
        expect("NaN in keys", kivi_append(c, 0, 1, &k, &v), KIVI_ERR_NON_FINITE, "kivi_append");
        nan_keys[5] = 1e6f;
        expect("key beyond the f16 range", kivi_append(c, 0, 1, &k, &v), KIVI_ERR_NON_FINITE, "kivi_append");
        k = rows(kbuf, 1, KVROW);
    }
    unchanged("bad arguments", c, before, n_before);

    /* --- wrong layer, unknown sequence */
    expect("layer 2 of 2", kivi_append(c, LAYERS, 1, &k, &v), KIVI_ERR_LAYER_OUT_OF_RANGE, "kivi_append");
    expect("layer UINT32_MAX", kivi_attend(c, 0xFFFFFFFFu, 1, &q, &o, NULL), KIVI_ERR_LAYER_OUT_OF_RANGE,
           "kivi_attend");
    expect("seq_layer_len bad layer", kivi_seq_layer_len(c, 1, 5, &len), KIVI_ERR_LAYER_OUT_OF_RANGE,
           "kivi_seq_layer_len");
    expect("attend unknown seq", kivi_attend(c, 0, 77, &q, &o, NULL), KIVI_ERR_UNKNOWN_SEQUENCE, "kivi_attend");
    expect("seq_len unknown", kivi_seq_len(c, 77, &len), KIVI_ERR_UNKNOWN_SEQUENCE, "kivi_seq_len");
    expect("truncate unknown", kivi_seq_truncate(c, 77, 1), KIVI_ERR_UNKNOWN_SEQUENCE, "kivi_seq_truncate");
    expect("remove unknown", kivi_seq_remove(c, 77), KIVI_ERR_UNKNOWN_SEQUENCE, "kivi_seq_remove");
    expect("keep unknown", kivi_seq_keep(c, 77), KIVI_ERR_UNKNOWN_SEQUENCE, "kivi_seq_keep");
    expect("copy from unknown", kivi_seq_copy(c, 77, 5, 3), KIVI_ERR_UNKNOWN_SEQUENCE, "kivi_seq_copy");
    expect("copy onto itself", kivi_seq_copy(c, 1, 1, 3), KIVI_ERR_INVALID_ARGUMENT, "kivi_seq_copy");
    expect("seq_state_size unknown", kivi_seq_state_size(c, 77, &n_before), KIVI_ERR_UNKNOWN_SEQUENCE,
           "kivi_seq_state_size");
    {
        uint32_t ids[1] = {999};
        size_t n = 999;
        expect("seq_ids too small", kivi_seq_ids(c, ids, 1, &n), KIVI_ERR_BUFFER_TOO_SMALL, "kivi_seq_ids");
        checks++;
        if (ids[0] != 999 || n != 999) fail("seq_ids", "outputs written by a failed call");
    }
    checks++;
    if (len != 12345) fail("seq_len", "out_len written by a failed call");
    {
        /* 20 queries for a sequence of 9 tokens */
        kivi_rows q20 = rows(qbuf, 20, QROW);
        kivi_rows_mut o20 = rows_mut(obuf, 20, QROW);
        expect("attend more queries than tokens", kivi_attend(c, 0, 2, &q20, &o20, NULL), KIVI_ERR_INVALID_ARGUMENT,
               "kivi_attend");
    }
    unchanged("wrong layer, unknown sequence", c, before, n_before);

    /* --- capacity: 64 quantized tokens per layer, 3 sequence slots */
    k = rows(kbuf, 150, KVROW);
    v = rows(vbuf, 150, KVROW);
    expect("capacity exhausted", kivi_append(c, 0, 1, &k, &v), KIVI_ERR_CAPACITY_EXHAUSTED, "kivi_append");
    k = rows(kbuf, 1, KVROW);
    v = rows(vbuf, 1, KVROW);
    expect("third sequence", kivi_append(c, 0, 3, &k, &v), KIVI_OK, "");
    expect("fourth sequence", kivi_append(c, 0, 4, &k, &v), KIVI_ERR_TOO_MANY_SEQUENCES, "kivi_append");
    expect("fork into no slot", kivi_seq_copy(c, 1, 5, 10), KIVI_ERR_TOO_MANY_SEQUENCES, "kivi_seq_copy");
    expect("remove third", kivi_seq_remove(c, 3), KIVI_OK, "");
    unchanged("capacity", c, before, n_before);
    {
        /* A sequence limit below the pool's: 20 tokens fit, the 21st does not, others still do. */
        kivi_params q = small_params();
        kivi_cache *s = NULL;
        uint8_t *s_before;
        size_t s_n = 0;
        q.max_seq_tokens = 20;
        expect("create with max_seq_tokens", kivi_cache_create(&q, &s), KIVI_OK, "");
        expect("fill to max_seq_tokens", append_all(s, 1, 20), KIVI_OK, "");
        s_before = save(s, &s_n);
        k = rows(kbuf, 1, KVROW);
        v = rows(vbuf, 1, KVROW);
        expect("past max_seq_tokens", kivi_append(s, 0, 1, &k, &v), KIVI_ERR_SEQUENCE_FULL, "kivi_append");
        checks++;
        if (!strstr(kivi_last_error_message(), "sequence 1 is full") ||
            !strstr(kivi_last_error_message(), "max_seq_tokens 20"))
            fail("past max_seq_tokens", "the message does not name the sequence and the limit");
        unchanged("sequence full", s, s_before, s_n);
        free(s_before);
        expect("another sequence", append_all(s, 2, 20), KIVI_OK, "");
        kivi_cache_free(s);
    }

    /* --- state blobs: short buffer, corrupt, truncated, from another cache */
    {
        size_t size = 0, written = 777;
        uint8_t *blob;
        kivi_params q2 = small_params();
        expect("state_size", kivi_state_size(c, &size), KIVI_OK, "");
        blob = malloc(size);
        memset(blob, 0x5A, size);
        expect("save into a short buffer", kivi_state_save(c, blob, size - 1, &written), KIVI_ERR_BUFFER_TOO_SMALL,
               "kivi_state_save");
        checks++;
        if (written != 777 || blob[0] != 0x5A) fail("state_save", "outputs written by a failed call");
        expect("save", kivi_state_save(c, blob, size, &written), KIVI_OK, "");
        blob[size / 2] ^= 0x10;
        expect("corrupt blob", kivi_state_load(c, blob, size), KIVI_ERR_CORRUPT_STATE, "kivi_state_load");
        blob[size / 2] ^= 0x10;
        expect("truncated blob", kivi_state_load(c, blob, size / 3), KIVI_ERR_CORRUPT_STATE, "kivi_state_load");
        expect("empty blob", kivi_state_load(c, blob, 0), KIVI_ERR_CORRUPT_STATE, "kivi_state_load");
        memset(blob, 0, 16);
        expect("not a kivi state", kivi_state_load(c, blob, size), KIVI_ERR_CORRUPT_STATE, "kivi_state_load");
        unchanged("state blobs", c, before, n_before);
        free(blob);

        q2.key_bits = 4;
        expect("create a 4-bit cache", kivi_cache_create(&q2, &other), KIVI_OK, "");
        expect("4-bit cache state", kivi_state_size(other, &size), KIVI_OK, "");
        blob = malloc(size);
        expect("save 4-bit", kivi_state_save(other, blob, size, &written), KIVI_OK, "");
        expect("load a blob of other settings", kivi_state_load(c, blob, written), KIVI_ERR_STATE_MISMATCH,
               "kivi_state_load");
        free(blob);
        expect("seq state size", kivi_seq_state_size(c, 1, &size), KIVI_OK, "");
        blob = malloc(size);
        expect("seq save", kivi_seq_state_save(c, 1, blob, size, &written), KIVI_OK, "");
        expect("seq blob into another cache", kivi_seq_state_load(other, 1, blob, written), KIVI_ERR_STATE_MISMATCH,
               "kivi_seq_state_load");
        kivi_cache_free(other);
        {
            kivi_params q3 = small_params();
            uint32_t n1 = 0;
            expect("seq 1 len", kivi_seq_len(c, 1, &n1), KIVI_OK, "");
            q3.max_seq_tokens = n1 - 1;
            expect("create a cache of shorter sequences", kivi_cache_create(&q3, &other), KIVI_OK, "");
            expect("seq blob longer than max_seq_tokens", kivi_seq_state_load(other, 1, blob, written),
                   KIVI_ERR_STATE_MISMATCH, "kivi_seq_state_load");
            checks++;
            if (!strstr(kivi_last_error_message(), "max_seq_tokens"))
                fail("seq blob longer than max_seq_tokens", "the message does not name max_seq_tokens");
        }
        blob[written - 1] ^= 1;
        expect("corrupt seq blob", kivi_seq_state_load(c, 9, blob, written), KIVI_ERR_CORRUPT_STATE,
               "kivi_seq_state_load");
        free(blob);
        kivi_cache_free(other);
        unchanged("state blobs", c, before, n_before);
    }

    /* --- a whole-cache blob into caches of another page size and capacity */
    {
        kivi_params q = small_params();
        kivi_cache *a = NULL, *b = NULL;
        uint8_t *blob, *b_before;
        size_t size = 0, n_b = 0;
        uint32_t s, la = 0, lb = 0;
        expect("create", kivi_cache_create(&q, &a), KIVI_OK, "");
        for (s = 0; s < 3; s++) expect("append", append_all(a, s, 30 + s), KIVI_OK, "");
        blob = save(a, &size);
        q.page_tokens = 16;
        expect("create a cache of 16-token pages", kivi_cache_create(&q, &b), KIVI_OK, "");
        expect("load into other pages", kivi_state_load(b, blob, size), KIVI_OK, "");
        for (s = 0; s < 3; s++) {
            expect("seq len", kivi_seq_len(a, s, &la), KIVI_OK, "");
            expect("seq len", kivi_seq_len(b, s, &lb), KIVI_OK, "");
            checks++;
            if (la != 30 + s || lb != la) fail("load into other pages", "sequence lengths differ");
        }
        kivi_cache_free(b);
        q.max_seqs = 2;
        expect("create a cache of 2 sequences", kivi_cache_create(&q, &b), KIVI_OK, "");
        expect("append", append_all(b, 1, 5), KIVI_OK, "");
        b_before = save(b, &n_b);
        expect("more sequences than max_seqs", kivi_state_load(b, blob, size), KIVI_ERR_STATE_MISMATCH,
               "kivi_state_load");
        checks++;
        if (!strstr(kivi_last_error_message(), "3 sequences, this cache at most 2 (max_seqs)"))
            fail("more sequences than max_seqs", "the message does not give the numbers");
        unchanged("a blob too large", b, b_before, n_b);
        free(b_before);
        free(blob);
        kivi_cache_free(b);
        kivi_cache_free(a);
    }

    /* --- the last error message is per thread */
    {
        pthread_t t;
        kivi_seq_len(c, 88, &len);
        pthread_create(&t, NULL, other_thread, NULL);
        pthread_join(t, NULL);
        checks++;
        if (strstr(kivi_last_error_message(), "sequence 88") == NULL) fail("last_error", "overwritten by a thread");
    }

    /* --- readers on several threads at once */
    {
        pthread_t t[4];
        struct reader r[4];
        int i;
        for (i = 0; i < 4; i++) {
            r[i].cache = c;
            r[i].bad = 0;
            pthread_create(&t[i], NULL, read_concurrently, &r[i]);
        }
        for (i = 0; i < 4; i++) {
            pthread_join(t[i], NULL);
            checks++;
            if (r[i].bad) fail("concurrent readers", kivi_last_error_message());
        }
        unchanged("concurrent readers", c, before, n_before);
    }

    /* --- writers on two sequences and readers at once: kivi serializes the writers */
    {
        pthread_t t[4];
        struct reader r[2];
        struct writer w[2];
        uint32_t len1 = 0, len2 = 0;
        int i;
        for (i = 0; i < 2; i++) {
            w[i].cache = c;
            w[i].seq = (uint32_t)(i + 1);
            w[i].bad = 0;
            r[i].cache = c;
            r[i].bad = 0;
            pthread_create(&t[i], NULL, write_concurrently, &w[i]);
            pthread_create(&t[2 + i], NULL, read_concurrently, &r[i]);
        }
        for (i = 0; i < 4; i++) pthread_join(t[i], NULL);
        checks++;
        if (w[0].bad || w[1].bad || r[0].bad || r[1].bad) fail("concurrent writers", kivi_last_error_message());
        kivi_seq_len(c, 1, &len1);
        kivi_seq_len(c, 2, &len2);
        checks++;
        if (len1 != 50 || len2 != 19) fail("concurrent writers", "lengths are not 40 + 10 and 9 + 10");
    }

    /* --- the other read and write paths, used rightly */
    {
        kivi_params got;
        uint32_t ids[4] = {0, 0, 0, 0};
        size_t n = 0;
        kivi_params want = small_params();
        expect("cache_params", kivi_cache_params(c, &got, sizeof got), KIVI_OK, "");
        checks++;
        if (memcmp(&got, &want, sizeof got) != 0) fail("cache_params", "differ from the creation parameters");
        expect("seq_ids count", kivi_seq_ids(c, NULL, 0, &n), KIVI_OK, "");
        expect("seq_ids", kivi_seq_ids(c, ids, 4, &n), KIVI_OK, "");
        checks++;
        if (n != 2 || ids[0] + ids[1] != 3) fail("seq_ids", "not sequences 1 and 2");
        expect("seq_keep", kivi_seq_keep(c, 2), KIVI_OK, "");
        expect("seq_ids after keep", kivi_seq_ids(c, ids, 4, &n), KIVI_OK, "");
        checks++;
        if (n != 1 || ids[0] != 2) fail("seq_keep", "did not keep only sequence 2");
        expect("cache_clear", kivi_cache_clear(c), KIVI_OK, "");
        expect("seq_ids after clear", kivi_seq_ids(c, ids, 4, &n), KIVI_OK, "");
        checks++;
        if (n != 0) fail("cache_clear", "sequences left");
    }

    free(before);
    kivi_cache_free(c);
    printf("%d passed, %d failed\n", checks - failures, failures);
    return failures ? 1 : 0;
}
