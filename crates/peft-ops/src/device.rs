//! Device selection (`cpu`, `cuda`, `cuda:N`) and GPU memory accounting.
//!
//! On CUDA, candle allocates through the driver's stream-ordered pool (`cuMemAllocAsync`).
//! The pool's default release threshold of 0 hands freed memory back to the driver at every
//! synchronisation, so each training step would pay for fresh allocations: we raise it so the
//! pool keeps and reuses its memory, the way PyTorch's caching allocator does.

use candle_core::{Device, Result};

/// Parses `cpu`, `cuda` or `cuda:N` and opens that device.
pub fn open_device(name: &str) -> Result<Device> {
    let name = name.trim().to_ascii_lowercase();
    if name == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match name.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| {
                candle_core::Error::Msg(format!("bad device {name:?} (cpu, cuda or cuda:N)"))
            })?,
        None => candle_core::bail!("unknown device {name:?} (cpu, cuda or cuda:N)"),
    };
    open_cuda(ordinal)
}

#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> Result<Device> {
    crate::cuda_kernels_off().map_err(candle_core::Error::Msg)?;
    let device = Device::new_cuda(ordinal)?;
    // SAFETY: candle runs all work on one stream (the per-thread default stream; nothing
    // creates another, so cudarc never enters its multi-stream mode), where cudarc's event
    // tracking never waits on or records the two events it creates (and later destroys)
    // with every allocation: turning it off only saves those driver calls, four per tensor.
    unsafe { device.as_cuda_device()?.disable_event_tracking() };
    pool::keep_freed_memory(ordinal)?;
    Ok(device)
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(_ordinal: usize) -> Result<Device> {
    candle_core::bail!(
        "this peft was built without CUDA support (rebuild with `--features cuda`, see docs/gpu.md)"
    )
}

/// Peak bytes allocated on `device` since the start or the last [`reset_peak_memory`]
/// (PyTorch's `max_memory_allocated`); `None` on the CPU.
pub fn peak_memory(device: &Device) -> Result<Option<u64>> {
    match device.location() {
        #[cfg(feature = "cuda")]
        candle_core::DeviceLocation::Cuda { gpu_id } => pool::used_high(gpu_id).map(Some),
        _ => Ok(None),
    }
}

/// Hands the device memory that is reserved but unused back to the driver (what was kept
/// for reuse: after kernel tuning, the reserve of its most memory-hungry path).
pub fn release_unused_memory(device: &Device) -> Result<()> {
    match device.location() {
        #[cfg(feature = "cuda")]
        candle_core::DeviceLocation::Cuda { gpu_id } => {
            device.synchronize()?;
            pool::trim(gpu_id)
        }
        _ => Ok(()),
    }
}

/// Starts a new peak-memory window at the memory in use now.
pub fn reset_peak_memory(device: &Device) -> Result<()> {
    match device.location() {
        #[cfg(feature = "cuda")]
        candle_core::DeviceLocation::Cuda { gpu_id } => pool::reset_used_high(gpu_id),
        _ => Ok(()),
    }
}

#[cfg(feature = "cuda")]
mod pool {
    use candle_core::cuda_backend::cudarc::driver::sys;
    use candle_core::Result;

    fn check(what: &str, r: sys::CUresult) -> Result<()> {
        if r == sys::CUresult::CUDA_SUCCESS {
            Ok(())
        } else {
            candle_core::bail!("{what} failed: {r:?}")
        }
    }

    fn default_pool(ordinal: usize) -> Result<sys::CUmemoryPool> {
        let mut dev: sys::CUdevice = 0;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: plain driver queries writing into the locals above; the context exists
        // (candle created it before we are called).
        unsafe {
            check("cuDeviceGet", sys::cuDeviceGet(&mut dev, ordinal as i32))?;
            check(
                "cuDeviceGetDefaultMemPool",
                sys::cuDeviceGetDefaultMemPool(&mut pool, dev),
            )?;
        }
        Ok(pool)
    }

    fn set_u64(ordinal: usize, attr: sys::CUmemPool_attribute, value: u64) -> Result<()> {
        let pool = default_pool(ordinal)?;
        let mut v = value;
        // SAFETY: the attribute takes a cuuint64_t, which `v` is.
        unsafe {
            check(
                "cuMemPoolSetAttribute",
                sys::cuMemPoolSetAttribute(pool, attr, &mut v as *mut u64 as *mut _),
            )
        }
    }

    pub fn keep_freed_memory(ordinal: usize) -> Result<()> {
        set_u64(
            ordinal,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            u64::MAX,
        )
    }

    pub fn used_high(ordinal: usize) -> Result<u64> {
        let pool = default_pool(ordinal)?;
        let mut v: u64 = 0;
        // SAFETY: the attribute is a cuuint64_t written into `v`.
        unsafe {
            check(
                "cuMemPoolGetAttribute",
                sys::cuMemPoolGetAttribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                    &mut v as *mut u64 as *mut _,
                ),
            )?;
        }
        Ok(v)
    }

    pub fn trim(ordinal: usize) -> Result<()> {
        let pool = default_pool(ordinal)?;
        // SAFETY: a plain driver call on the device's default pool.
        unsafe { check("cuMemPoolTrimTo", sys::cuMemPoolTrimTo(pool, 0)) }
    }

    pub fn reset_used_high(ordinal: usize) -> Result<()> {
        // Only 0 may be written: the watermark restarts at the current usage.
        set_u64(
            ordinal,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            0,
        )
    }
}
