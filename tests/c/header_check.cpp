// header_check.cpp: kivi.h compiles as C++ (extern "C", enums with a fixed underlying type) and
// links; run by tests/c_abi.rs with g++ -std=c++11 -Wall -Wextra -Werror -pedantic.
#include <cstdio>
#include <cstring>
#include <type_traits>

#include "kivi.h"

static_assert(sizeof(kivi_status) == 4, "kivi_status is 32 bits");
static_assert(std::is_same<std::underlying_type<kivi_status>::type, int32_t>::value, "int32_t status");
static_assert(KIVI_OK == 0 && KIVI_ERR_INTERNAL == 99, "status numbers are ABI");
static_assert(KIVI_DEVICE_CPU == -1, "CPU device");

int main() {
    kivi_params p;
    if (kivi_params_init(&p, sizeof p) != KIVI_OK) return 1;
    p.n_layers = 1;
    p.n_kv_heads = 1;
    p.head_dim = 64;
    kivi_cache *cache = nullptr;
    if (kivi_cache_create(&p, &cache) != KIVI_OK) return 1;
    float k[64] = {}, v[64] = {}, q[128] = {}, out[128];
    for (int i = 0; i < 64; i++) k[i] = v[i] = q[i] = q[64 + i] = 0.01f * static_cast<float>(i);
    kivi_rows kr = {k, KIVI_DTYPE_F32, 1, 64, 0};
    kivi_rows vr = {v, KIVI_DTYPE_F32, 1, 64, 0};
    kivi_rows qr = {q, KIVI_DTYPE_F32, 1, 128, 0};
    kivi_rows_mut o = {out, KIVI_DTYPE_F32, 1, 128, 0};
    kivi_status s = kivi_append_attend(cache, 0, 0, &kr, &vr, &qr, &o, nullptr);
    if (s != KIVI_OK) {
        std::fprintf(stderr, "%s\n", kivi_last_error_message());
        return 1;
    }
    // One token: attention returns its value exactly (within float rounding).
    for (int i = 0; i < 64; i++) {
        if (out[i] - v[i] > 1e-6f || v[i] - out[i] > 1e-6f) return 1;
    }
    switch (kivi_seq_remove(cache, 5)) {
        case KIVI_ERR_UNKNOWN_SEQUENCE:
            break;
        default:
            return 1;
    }
    kivi_cache_free(cache);
    std::printf("C++: kivi %s, header %s: ok\n", kivi_version(), KIVI_VERSION_STRING);
    return std::strcmp(kivi_version(), KIVI_VERSION_STRING) == 0 ? 0 : 1;
}
