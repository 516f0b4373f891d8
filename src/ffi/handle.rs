//! What a `kivi_cache` handle holds: a cache of either backend (the CPU [`Cache`], or a
//! [`CudaCache`] with the stream its calls queue work on), and the operations that read the same
//! on both. The exports match on [`Backend`] where the backends differ (rows, streams, device
//! synchronisation).

use super::types::kivi_status::*;
use super::{Failure, FfiResult};
use crate::cache::Cache;
use crate::config::CacheConfig;
use crate::cuda::{CudaCache, Stream};
use crate::error::Result;
use crate::stats::MemoryStats;
use cudarc::driver::sys as dsys;

/// The cache behind a handle.
pub(crate) enum Backend {
    Cpu(Cache),
    Cuda(Gpu),
}

/// A CUDA cache and the stream set by `kivi_cache_set_stream()`.
pub(crate) struct Gpu {
    pub cache: CudaCache,
    /// The `CUstream`, as an address (0: the default stream).
    pub stream: usize,
    /// Device pointers are host pointers and the kernels are emulated (unit tests): there is no
    /// driver to synchronise with or to ask about streams.
    #[cfg(test)]
    pub emulated: bool,
}

impl Gpu {
    pub fn new(cache: CudaCache) -> Gpu {
        Gpu {
            cache,
            stream: 0,
            #[cfg(test)]
            emulated: false,
        }
    }

    /// The stream every call queues its work on.
    pub fn stream(&self) -> Stream {
        self.stream as Stream
    }

    fn emulated(&self) -> bool {
        #[cfg(test)]
        return self.emulated;
        #[cfg(not(test))]
        false
    }

    /// The device's primary context, current on this thread (the one the cache's memory and
    /// kernels belong to).
    fn device(&self) -> Result<std::sync::Arc<crate::cuda::Device>> {
        let d = crate::cuda::Device::get(self.cache.device().ordinal)?;
        d.bind()?;
        Ok(d)
    }

    /// Fails unless `stream` can carry the cache's work: NULL, `CU_STREAM_LEGACY`,
    /// `CU_STREAM_PER_THREAD`, or a stream of the device's primary context.
    pub fn check_stream(&self, stream: usize) -> FfiResult {
        // NULL, CU_STREAM_LEGACY (0x1) and CU_STREAM_PER_THREAD (0x2) are valid in any context.
        if stream <= 2 || self.emulated() {
            return Ok(());
        }
        let dev = self.device()?;
        let mut ctx: dsys::CUcontext = std::ptr::null_mut();
        // SAFETY: the caller promised a live CUstream; ctx is a valid out pointer.
        let r = unsafe { dsys::cuStreamGetCtx(stream as dsys::CUstream, &mut ctx) };
        if r != dsys::cudaError_enum::CUDA_SUCCESS {
            return Err(Failure::new(
                KIVI_ERR_INVALID_ARGUMENT,
                format!("stream {stream:#x}: cuStreamGetCtx failed ({r:?}): not a live CUstream"),
            ));
        }
        if ctx != dev.ctx {
            return Err(Failure::new(
                KIVI_ERR_INVALID_ARGUMENT,
                format!(
                    "stream {stream:#x} belongs to another CUDA context than the primary context of device {} (the \
                     CUDA runtime's), which the cache's memory and kernels belong to",
                    self.cache.device().ordinal
                ),
            ));
        }
        Ok(())
    }
}

impl Backend {
    pub fn config(&self) -> &CacheConfig {
        match self {
            Backend::Cpu(c) => c.config(),
            Backend::Cuda(g) => g.cache.config(),
        }
    }

    /// `kivi_params.device` of the cache.
    pub fn device(&self) -> i32 {
        match self {
            Backend::Cpu(_) => super::types::KIVI_DEVICE_CPU,
            Backend::Cuda(g) => g.cache.device().ordinal as i32,
        }
    }

    pub fn seq_len(&self, seq: u32) -> Result<u32> {
        match self {
            Backend::Cpu(c) => c.seq_len(seq),
            Backend::Cuda(g) => g.cache.seq_len(seq),
        }
    }

    pub fn seq_layer_len(&self, seq: u32, layer: u32) -> Result<u32> {
        match self {
            Backend::Cpu(c) => c.seq_layer_len(seq, layer),
            Backend::Cuda(g) => g.cache.seq_layer_len(seq, layer),
        }
    }

    pub fn seq_ids(&self) -> Vec<u32> {
        match self {
            Backend::Cpu(c) => c.seq_ids(),
            Backend::Cuda(g) => g.cache.seq_ids(),
        }
    }

    pub fn seq_remove(&mut self, seq: u32) -> Result<()> {
        match self {
            Backend::Cpu(c) => c.seq_remove(seq),
            Backend::Cuda(g) => g.cache.seq_remove(seq),
        }
    }

    pub fn seq_keep(&mut self, seq: u32) -> Result<()> {
        match self {
            Backend::Cpu(c) => c.seq_keep(seq),
            Backend::Cuda(g) => g.cache.seq_keep(seq),
        }
    }

    pub fn seq_truncate(&mut self, seq: u32, n_tokens: u32) -> Result<()> {
        match self {
            Backend::Cpu(c) => c.seq_truncate(seq, n_tokens),
            Backend::Cuda(g) => g.cache.seq_truncate(seq, n_tokens, g.stream()),
        }
    }

    pub fn seq_copy(&mut self, src: u32, dst: u32, n_tokens: u32) -> Result<()> {
        match self {
            Backend::Cpu(c) => c.seq_copy(src, dst, n_tokens),
            Backend::Cuda(g) => g.cache.seq_copy(src, dst, n_tokens, g.stream()),
        }
    }

    pub fn clear(&mut self) {
        match self {
            Backend::Cpu(c) => c.clear(),
            Backend::Cuda(g) => g.cache.clear(),
        }
    }

    pub fn stats(&self) -> MemoryStats {
        match self {
            Backend::Cpu(c) => c.stats(),
            Backend::Cuda(g) => g.cache.stats(),
        }
    }

    pub fn state_size(&self) -> usize {
        match self {
            Backend::Cpu(c) => c.state_size(),
            Backend::Cuda(g) => g.cache.state_size(),
        }
    }

    pub fn seq_state_size(&self, seq: u32) -> Result<usize> {
        match self {
            Backend::Cpu(c) => c.seq_state_size(seq),
            Backend::Cuda(g) => g.cache.seq_state_size(seq),
        }
    }
}

#[cfg(test)]
impl super::types::kivi_cache {
    /// A handle around an emulated CUDA cache (`CudaCache::emulated`: device pointers are host
    /// pointers, kernels are Rust ports), for driving the CUDA paths of the exports without a GPU.
    /// Free it with `kivi_cache_free`.
    pub(crate) fn emulated(cfg: CacheConfig) -> *mut super::types::kivi_cache {
        let mut g = Gpu::new(CudaCache::emulated(cfg).expect("a valid configuration"));
        g.emulated = true;
        let inner = std::sync::RwLock::new(Backend::Cuda(g));
        Box::into_raw(Box::new(super::types::kivi_cache { inner }))
    }
}
