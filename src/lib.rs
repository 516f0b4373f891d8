//! # kivi
//!
//! A key/value cache for LLM inference engines that stores keys and values in 2 bits (or 4, or 8)
//! with the KIVI method (Liu et al., ICML 2024), and computes attention straight from the packed
//! codes.
//!
//! - Keys are quantized **per channel** (a group is `group_size` consecutive tokens of one
//!   channel), values **per token** (a group is `value_group` consecutive channels of one token),
//!   with asymmetric min/max rounding and an f16 scale and zero per group.
//! - The most recent `residual` tokens stay at full precision; keys leave that window one whole
//!   group at a time (values leave with them).
//! - Attention sinks: the first `sinks` tokens (by default one, the first token, on which
//!   attention puts much of its weight) stay at full precision for ever.
//!
//! The data path, one module each: [`config`] (what a cache is), [`quant`] (the formats),
//! `layout` and `pool` (where bytes live), `seq` (sequences and their pages), [`cache`] (appends
//! and sequence operations), [`attention`] (fused attention per backend, and the reference),
//! [`state`] (save and restore), [`stats`] (memory).
//!
//! ```
//! use kivi::{AttnOptions, Cache, CacheConfig, Rows, RowsMut};
//! let mut cfg = CacheConfig::new(2, 2, 64); // 2 layers, 2 KV heads, head_dim 64
//! cfg.max_tokens = 1024;
//! let mut cache = Cache::new(cfg)?;
//! let (k, v) = (vec![0.5f32; 3 * 2 * 64], vec![0.25f32; 3 * 2 * 64]); // 3 tokens
//! let q = vec![0.1f32; 3 * 4 * 64]; // 4 query heads (GQA 2)
//! let mut out = vec![0f32; q.len()];
//! cache.append_attend(0, 7, Rows::new(&k, 3)?, Rows::new(&v, 3)?, Rows::new(&q, 3)?,
//!                     RowsMut::new(&mut out, 3)?, &AttnOptions::default())?;
//! assert_eq!(cache.seq_layer_len(7, 0)?, 3);
//! # Ok::<(), kivi::Error>(())
//! ```

pub mod attention;
pub mod cache;
pub mod config;
pub mod cuda;
pub mod error;
pub mod ffi;
mod layout;
mod pool;
pub mod quant;
pub mod rows;
mod seq;
pub mod state;
pub mod stats;
#[cfg(test)]
mod testing;
mod threads;

pub use attention::reference::Dequantized;
pub use attention::AttnOptions;
pub use cache::Cache;
pub use config::{CacheConfig, DType, KeyMode, Rounding};
pub use error::{Error, Result};
pub use half::{bf16, f16};
pub use rows::{Element, Rows, RowsMut};
pub use stats::{MemoryPlan, MemoryStats};
