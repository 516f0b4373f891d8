//! Errors: one enum for everything the cache can refuse, each message naming the offending value.

use thiserror::Error;

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in a call. A call that returns an error leaves the cache exactly as
/// it was before the call.
#[derive(Debug, Clone, PartialEq, Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration field is out of range or inconsistent with another one.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// A layer index at or past the number of layers.
    #[error("layer {layer} out of range: the cache has {n_layers} layers (0..{n_layers})")]
    LayerOutOfRange { layer: u32, n_layers: u32 },
    /// A sequence id that the cache does not hold.
    #[error("sequence {0} unknown")]
    UnknownSequence(u32),
    /// The page pool of a layer has no page left for the tokens being added.
    #[error(
        "capacity exhausted at token {token} of sequence {seq} in layer {layer}: \
         {needed} more pages needed, {free} free of {total}"
    )]
    CapacityExhausted { seq: u32, layer: u32, token: u64, needed: u64, free: u64, total: u64 },
    /// A sequence that would grow past [`CacheConfig::max_seq_tokens`](crate::CacheConfig).
    #[error(
        "sequence {seq} is full: it holds {len} tokens in layer {layer}, {adding} more would pass max_seq_tokens {max}"
    )]
    SequenceFull { seq: u32, layer: u32, len: u64, adding: u64, max: u32 },
    /// Every sequence slot is taken.
    #[error("too many sequences: sequence {seq} would be number {} but the cache holds at most {max}", max + 1)]
    TooManySequences { seq: u32, max: u32 },
    /// A shape, length or stride that does not match what the cache expects.
    #[error("shape mismatch in {what}: {detail}")]
    Shape { what: &'static str, detail: String },
    /// A NaN or infinity (or a value too large for the f16 scales) in an input.
    #[error("{kind} in {what} at token {token}, element {index}: {value}")]
    NonFinite { what: &'static str, kind: &'static str, token: usize, index: usize, value: f32 },
    /// Any other argument out of range (the message names it).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A state blob that is truncated, damaged or not a kivi state.
    #[error("corrupt state: {0}")]
    CorruptState(String),
    /// A state blob written by a cache of other dimensions or settings.
    #[error("state does not match this cache: {0}")]
    StateMismatch(String),
    /// A caller buffer smaller than what the operation writes.
    #[error("buffer too small: {needed} bytes needed, {given} given")]
    BufferTooSmall { needed: usize, given: usize },
    /// A backend (e.g. CUDA) that is not available on this machine or build.
    #[error("backend unavailable: {0}")]
    BackendUnavailable(String),
}

impl Error {
    /// A cache whose memory (`bytes` of it for `what`, `total` in all) could not be allocated.
    pub(crate) fn allocation(what: &str, bytes: u128, total: u128) -> Error {
        Error::InvalidConfig(format!(
            "could not allocate {bytes} bytes for {what} (the cache takes {total} bytes in all): \
             lower max_tokens or max_seqs, or set max_seq_tokens {FIT_HINT}"
        ))
    }
}

/// Where a message about memory that is not there points: the calls that size a cache to a budget.
pub(crate) const FIT_HINT: &str =
    "(CacheConfig::max_tokens_within, kivi_params_fit_tokens: the max_tokens that fits a budget)";
