//! The CUDA backend: a cache in device memory ([`CudaCache`]) with the same operations as the CPU
//! [`crate::Cache`], its kernels compiled at run time with NVRTC for the device.
//!
//! The CUDA driver and NVRTC are loaded dynamically when first needed, so the crate builds, links
//! and runs on machines without CUDA; there [`available`] and [`CudaCache::new`] return
//! [`Error::BackendUnavailable`] saying what is missing.
//!
//! NVRTC is found by the usual library search (`LD_LIBRARY_PATH`, the system paths) or, first, at
//! the path in the environment variable `KIVI_NVRTC_LIB` (the library file, or the folder holding
//! it, such as the `nvidia/cu13/lib` folder of the `nvidia-cuda-nvrtc` Python package).
//!
//! Kernels are compiled once per process for each (device, cache layout, family) and kept; with
//! `KIVI_CUDA_CACHE_DIR` set, the cubins are also kept in that folder for later processes. Each
//! cache looks up the functions it launches once and keeps their handles, so that a launch on the
//! decode path costs no lookup.

pub mod cache;
pub mod kernels;

use std::collections::HashMap;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{result as drv, sys as dsys};

use crate::error::{Error, Result};
pub use cache::{module_specs, CudaCache, DevRows, Stream};
use kernels::{Family, Spec};

/// What [`available`] found: the device and the libraries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Ordinal of the device described.
    pub ordinal: u32,
    /// Devices visible.
    pub count: u32,
    pub name: String,
    /// Compute capability (major, minor).
    pub capability: (u32, u32),
    pub multiprocessors: u32,
    pub total_memory: u64,
    /// CUDA version the driver supports, as 1000 * major + 10 * minor.
    pub driver_version: u32,
    /// NVRTC's version (major, minor).
    pub nvrtc_version: (u32, u32),
}

fn unavailable(m: impl Into<String>) -> Error {
    Error::BackendUnavailable(m.into())
}

fn drv_err(what: &str, e: impl std::fmt::Debug) -> Error {
    unavailable(format!("CUDA driver: {what} failed: {e:?}"))
}

/// Loads NVRTC (once): `KIVI_NVRTC_LIB` first, then the usual search. Holds the libraries loaded
/// by path for the life of the process so that cudarc's own loading by name finds them.
pub(crate) fn nvrtc_lib() -> Result<()> {
    static LOADED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            if let Some(p) = std::env::var_os("KIVI_NVRTC_LIB") {
                preload_nvrtc(Path::new(&p))?;
            }
            // SAFETY: probing only opens candidate libraries by name.
            let present = std::panic::catch_unwind(|| unsafe { cudarc::nvrtc::sys::is_culib_present() });
            match present {
                Ok(true) => Ok(()),
                _ => Err("NVRTC (libnvrtc) not found: install the CUDA toolkit or the nvidia-cuda-nvrtc Python \
                          package and put its lib folder on LD_LIBRARY_PATH, or set KIVI_NVRTC_LIB to it"
                    .to_string()),
            }
        })
        .clone()
        .map_err(Error::BackendUnavailable)
}

fn preload_nvrtc(p: &Path) -> std::result::Result<(), String> {
    let (dir, file) = if p.is_dir() {
        (p.to_path_buf(), None)
    } else {
        (p.parent().map(Path::to_path_buf).unwrap_or_default(), Some(p.to_path_buf()))
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| format!("KIVI_NVRTC_LIB={}: {e}", p.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|f| {
            f.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libnvrtc") && n.contains(".so"))
        })
        .collect();
    // The builtins library first: NVRTC opens it by name when compiling. Of the main library,
    // prefer the names cudarc asks for (libnvrtc.so.N, libnvrtc.so) to variants such as .alt.
    files.sort_by_key(|f| {
        let n = f.file_name().and_then(|n| n.to_str()).unwrap_or("").to_string();
        let plain =
            n.strip_prefix("libnvrtc.so").is_some_and(|r| r.is_empty() || r[1..].chars().all(|c| c.is_ascii_digit()));
        (!n.contains("builtins"), !plain, n)
    });
    let main = file.or_else(|| files.iter().find(|f| !f.to_string_lossy().contains("builtins")).cloned());
    let Some(main) = main else { return Err(format!("KIVI_NVRTC_LIB={}: no libnvrtc there", p.display())) };
    for f in files.iter().filter(|f| f.to_string_lossy().contains("builtins")).chain(std::iter::once(&main)) {
        // SAFETY: loading NVRTC runs its initialisers, which have no preconditions.
        match unsafe { libloading::Library::new(f) } {
            Ok(lib) => std::mem::forget(lib),
            Err(e) if *f == main => return Err(format!("cannot load {}: {e}", f.display())),
            Err(_) => {}
        }
    }
    Ok(())
}

/// NVRTC's version, loading it if needed.
pub fn nvrtc_version() -> Result<(u32, u32)> {
    nvrtc_lib()?;
    let (mut a, mut b) = (0i32, 0i32);
    // SAFETY: NVRTC is loaded; the pointers are valid.
    let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut a, &mut b) };
    if r != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(unavailable(format!("nvrtcVersion failed: {r:?}")));
    }
    Ok((a as u32, b as u32))
}

/// Loads and initialises the driver (once).
fn driver() -> Result<()> {
    static INIT: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    INIT.get_or_init(|| {
        // SAFETY: probing only opens candidate libraries by name.
        let present = std::panic::catch_unwind(|| unsafe { dsys::is_culib_present() });
        if !matches!(present, Ok(true)) {
            return Err("the CUDA driver (libcuda) was not found: no NVIDIA driver on this machine".into());
        }
        match std::panic::catch_unwind(drv::init) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("cuInit failed: {e:?} (no usable GPU?)")),
            Err(_) => Err("the CUDA driver library lacks a required entry point".into()),
        }
    })
    .clone()
    .map_err(Error::BackendUnavailable)
}

/// Whether the CUDA backend can run here: a driver, device `0`, and NVRTC. Returns what was found.
pub fn available() -> Result<DeviceInfo> {
    device_info(0)
}

/// [`available`] for device `ordinal`.
pub fn device_info(ordinal: u32) -> Result<DeviceInfo> {
    driver()?;
    let count = drv::device::get_count().map_err(|e| drv_err("cuDeviceGetCount", e))? as u32;
    if ordinal >= count {
        return Err(unavailable(format!("CUDA device {ordinal} requested, {count} visible")));
    }
    let dev = drv::device::get(ordinal as i32).map_err(|e| drv_err("cuDeviceGet", e))?;
    let attr = |a| unsafe { drv::device::get_attribute(dev, a) }.map_err(|e| drv_err("cuDeviceGetAttribute", e));
    use dsys::CUdevice_attribute as A;
    let major = attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)? as u32;
    let minor = attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)? as u32;
    let sms = attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32;
    let name = drv::device::get_name(dev).map_err(|e| drv_err("cuDeviceGetName", e))?;
    // SAFETY: dev is a valid device.
    let total = unsafe { drv::device::total_mem(dev) }.map_err(|e| drv_err("cuDeviceTotalMem", e))? as u64;
    let mut ver = 0i32;
    // SAFETY: the pointer is valid.
    unsafe { dsys::cuDriverGetVersion(&mut ver) };
    let nvrtc_version = nvrtc_version()?;
    if major < 7 {
        return Err(unavailable(format!("{name} has compute capability {major}.{minor}; kivi needs 7.0 or newer")));
    }
    Ok(DeviceInfo {
        ordinal,
        count,
        name,
        capability: (major, minor),
        multiprocessors: sms,
        total_memory: total,
        driver_version: ver as u32,
        nvrtc_version,
    })
}

/// A device's primary context, retained for the life of the process.
#[derive(Debug)]
pub(crate) struct Device {
    pub info: DeviceInfo,
    pub ctx: dsys::CUcontext,
    /// The modules compiled for this device, each in a slot of its own, so that compiling one
    /// (seconds) holds up only the callers that want the same module.
    modules: Mutex<HashMap<(Family, Spec), ModuleSlot>>,
}

type ModuleSlot = Arc<Mutex<Option<Arc<Module>>>>;

// SAFETY: a CUcontext handle may be used from any thread; the module map is behind a mutex.
unsafe impl Send for Device {}
unsafe impl Sync for Device {}

impl Device {
    /// The device `ordinal`, its primary context retained (once per process).
    pub fn get(ordinal: u32) -> Result<Arc<Device>> {
        static DEVICES: OnceLock<Mutex<HashMap<u32, Arc<Device>>>> = OnceLock::new();
        let map = DEVICES.get_or_init(Default::default);
        let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = map.get(&ordinal) {
            return Ok(d.clone());
        }
        let info = device_info(ordinal)?;
        let dev = drv::device::get(ordinal as i32).map_err(|e| drv_err("cuDeviceGet", e))?;
        // SAFETY: dev is valid; the context stays retained for the life of the process.
        let ctx = unsafe { drv::primary_ctx::retain(dev) }.map_err(|e| drv_err("cuDevicePrimaryCtxRetain", e))?;
        let d = Arc::new(Device { info, ctx, modules: Mutex::new(HashMap::new()) });
        map.insert(ordinal, d.clone());
        Ok(d)
    }

    /// Makes the device's primary context current on this thread (if another one is).
    pub fn bind(&self) -> Result<()> {
        let cur = drv::ctx::get_current().map_err(|e| drv_err("cuCtxGetCurrent", e))?;
        if cur != Some(self.ctx) {
            // SAFETY: ctx is a retained primary context.
            unsafe { drv::ctx::set_current(self.ctx) }.map_err(|e| drv_err("cuCtxSetCurrent", e))?;
        }
        Ok(())
    }

    /// The module of `family` for `spec`, compiled for this device on first use. Threads that
    /// want other modules meanwhile are not held up; a failed compilation is tried again by the
    /// next caller.
    pub fn module(&self, family: Family, spec: &Spec) -> Result<Arc<Module>> {
        let slot = {
            let mut map = self.modules.lock().unwrap_or_else(|e| e.into_inner());
            map.entry((family, spec.clone())).or_default().clone()
        };
        let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = &*slot {
            return Ok(m.clone());
        }
        self.bind()?;
        let (ma, mi) = self.info.capability;
        let image = kernels::compile_cached(family, spec, &format!("sm_{ma}{mi}"))?;
        let mut bytes = image.bytes().to_vec();
        bytes.push(0);
        // SAFETY: bytes is a complete cubin (or NUL-terminated PTX) that outlives the call.
        let module = unsafe { drv::module::load_data(bytes.as_ptr() as *const _) }
            .map_err(|e| drv_err(&format!("cuModuleLoadData of {}", family.file()), e))?;
        let m = Arc::new(Module { module });
        *slot = Some(m.clone());
        Ok(m)
    }
}

/// A loaded module (never unloaded: its functions stay valid for the life of the process).
#[derive(Debug)]
pub(crate) struct Module {
    module: dsys::CUmodule,
}

// SAFETY: module and function handles may be used from any thread.
unsafe impl Send for Module {}
unsafe impl Sync for Module {}

impl Module {
    /// The function `name` of the module, looked up by the driver each time: callers keep the
    /// handle (a cache keeps those it launches, `CudaCache::attn_fns`).
    pub fn function(&self, name: &'static str) -> Result<dsys::CUfunction> {
        let c = CString::new(name).unwrap();
        // SAFETY: the module is loaded and never unloaded.
        unsafe { drv::module::get_function(self.module, c) }.map_err(|e| drv_err(name, e))
    }
}

/// How many blocks of `block` threads of `func`, each with `smem` bytes of dynamic shared memory,
/// fit on one multiprocessor at once (its registers and shared memory decide), as the driver
/// reports it; at least 1. A driver call each time: the caller keeps the answer
/// (`CudaCache::mma_slots`, once per cache).
pub(crate) fn blocks_per_sm(func: dsys::CUfunction, block: u32, smem: u32) -> Result<u32> {
    // SAFETY: func is a function of a loaded module.
    let n = unsafe { drv::occupancy::max_active_block_per_multiprocessor(func, block as i32, smem as usize) }
        .map_err(|e| drv_err("cuOccupancyMaxActiveBlocksPerMultiprocessor", e))?;
    Ok(n.max(1) as u32)
}

/// Lets `func`'s launches take `bytes` of dynamic shared memory, more than the 48 KB a launch
/// may take without asking (once per function; every device of compute capability 8.0 and newer
/// allows the 99 KB `kv_decode_mma` asks for at most).
pub(crate) fn allow_dynamic_smem(func: dsys::CUfunction, bytes: u32) -> Result<()> {
    let attr = dsys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
    // SAFETY: func is a function of a loaded module (never unloaded).
    unsafe { drv::function::set_function_attribute(func, attr, bytes as i32) }
        .map_err(|e| drv_err(&format!("cuFuncSetAttribute (dynamic shared memory of {bytes} bytes)"), e))
}

/// Launches `func` with one by-value parameter struct `params` on `stream`.
///
/// # Safety
/// `P` must match the kernel's parameter struct exactly (`#[repr(C)]`, same fields), and every
/// device pointer in it must be valid for what the kernel does with it.
pub(crate) unsafe fn launch<P>(
    func: dsys::CUfunction,
    grid: (u32, u32, u32),
    block: u32,
    stream: dsys::CUstream,
    params: &P,
) -> Result<()> {
    launch_smem(func, grid, block, 0, stream, params)
}

/// [`launch`] with `smem` bytes of dynamic shared memory per block.
///
/// # Safety
/// As [`launch`]; above 48 KB, `func` must have been allowed that much ([`allow_dynamic_smem`]).
pub(crate) unsafe fn launch_smem<P>(
    func: dsys::CUfunction,
    grid: (u32, u32, u32),
    block: u32,
    smem: u32,
    stream: dsys::CUstream,
    params: &P,
) -> Result<()> {
    if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
        return Ok(());
    }
    let mut args = [params as *const P as *mut std::ffi::c_void];
    drv::launch_kernel(func, grid, (block, 1, 1), smem, stream, &mut args).map_err(|e| drv_err("cuLaunchKernel", e))
}
