// Chunked-prefill attention: a chunk of query rows of one sequence against everything the
// sequence stores plus the chunk itself (causal unless told otherwise). Item i holds `qt` query
// rows, so each block reads the stored pages once for qt rows times the heads of one GQA group.
// The same split-K body and combine as decode (attn.cuh).
#include "attn.cuh"

extern "C" __global__ void __launch_bounds__(KV_THREADS) kv_prefill_attn(const AttnParams P) { attn_block(P); }

extern "C" __global__ void __launch_bounds__(128) kv_prefill_combine(const AttnParams P) { combine_block(P); }
