// Decode attention: one new token for each of many sequences of different lengths in one launch.
// Item i is sequence i of the step: its query row i attends to everything the sequence stores
// plus its own new key/value row i (the chunk of one), which the append that follows stores.
// Split-K over the context (flash decoding) and a final combine; see attn.cuh. Where the layout
// allows, the quantized groups go to tensor cores instead (decode_mma.cuh). This module's
// tensor-core kernels also serve chunks of queries: kv_decode_mma their quantized groups,
// kv_prefill_fp (prefill_mma.cuh) their full-precision tokens.
#include "attn.cuh"
#include "decode_mma.cuh"
#include "prefill_mma.cuh"

extern "C" __global__ void __launch_bounds__(KV_THREADS) kv_decode_attn(const AttnParams P) { attn_block(P); }

extern "C" __global__ void __launch_bounds__(128) kv_decode_combine(const AttnParams P) { combine_block(P); }
