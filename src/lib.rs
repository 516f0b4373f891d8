//! kivi: a KIVI-quantized KV cache.
