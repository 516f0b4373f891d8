//! kivi-eval: run a real GGUF language model with its attention going through
//! kivi's quantized KV cache, and measure what quantization costs.

pub mod eval;
pub mod gguf;
pub mod kv;
pub mod llama_ref;
pub mod model;
pub mod report;
pub mod stores;
pub mod tokenizer;
