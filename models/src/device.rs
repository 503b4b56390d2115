//! Which device a run computes on: `cpu`, `cuda` or `cuda:N` (recipe `device:`, `--device`).
//! A CUDA device is probed through the driver first, so a machine without one gets a message
//! instead of a panic from deep inside the backend.

use std::fmt;
use std::str::FromStr;

use burn::tensor::Device;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    /// `cuda` (`None`: the rank's local index) or `cuda:N`.
    Cuda(Option<usize>),
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad =
            || format!("`{s}` is not a device; use `cpu`, `cuda` or `cuda:N` (N a GPU index)");
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(None)),
            _ => match s.strip_prefix("cuda:") {
                Some(n) => n.parse().map(|n| Self::Cuda(Some(n))).map_err(|_| bad()),
                None => Err(bad()),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(None) => write!(f, "cuda"),
            Self::Cuda(Some(n)) => write!(f, "cuda:{n}"),
        }
    }
}

/// A GPU as the driver describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuInfo {
    pub index: usize,
    pub name: String,
    pub memory_bytes: u64,
}

impl DeviceSpec {
    pub fn is_cuda(self) -> bool {
        matches!(self, Self::Cuda(_))
    }

    /// The GPU index this spec names for a rank with local index `local_rank` (`cuda` means
    /// one GPU per local rank).
    pub fn gpu_index(self, local_rank: usize) -> Option<usize> {
        match self {
            Self::Cpu => None,
            Self::Cuda(n) => Some(n.unwrap_or(local_rank)),
        }
    }

    /// The device for the rank with local index `local_rank`.
    pub fn open(self, local_rank: usize) -> Result<Device, String> {
        match self.gpu_index(local_rank) {
            None => Ok(Device::flex()),
            Some(index) => open_cuda(index, self),
        }
    }

    /// The driver's description of the GPU this spec names (None on the CPU).
    pub fn gpu_info(self, local_rank: usize) -> Result<Option<GpuInfo>, String> {
        match self.gpu_index(local_rank) {
            None => Ok(None),
            Some(index) => gpu_info(index, self).map(Some),
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn no_cuda_build(spec: DeviceSpec) -> String {
    format!(
        "device `{spec}`: this moeru binary was built without CUDA support; build it with `cargo build --release --features cuda` (README, \"GPU build\"), or run on the CPU (`device: cpu`, `--device cpu`)"
    )
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(_index: usize, spec: DeviceSpec) -> Result<Device, String> {
    Err(no_cuda_build(spec))
}

#[cfg(not(feature = "cuda"))]
fn gpu_info(_index: usize, spec: DeviceSpec) -> Result<GpuInfo, String> {
    Err(no_cuda_build(spec))
}

#[cfg(feature = "cuda")]
fn open_cuda(index: usize, spec: DeviceSpec) -> Result<Device, String> {
    gpu_info(index, spec)?;
    Ok(Device::cuda(index))
}

#[cfg(feature = "cuda")]
fn gpu_info(index: usize, spec: DeviceSpec) -> Result<GpuInfo, String> {
    use cudarc::driver::result::{device, init};
    // cudarc panics on a missing library unless asked first.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(format!(
            "device `{spec}`: CUDA is missing: libcuda.so.1 (the NVIDIA driver) was not found; run on a machine with an NVIDIA GPU and its driver, or on the CPU (`device: cpu`, `--device cpu`)"
        ));
    }
    // burn compiles its kernels at run time with NVRTC, which cudarc would also panic on.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(format!(
            "device `{spec}`: NVRTC (libnvrtc.so, CUDA's run-time compiler, which builds moeru's GPU kernels) was not found; install the CUDA toolkit or pip's nvidia-cuda-nvrtc and put the folder holding libnvrtc.so.* on LD_LIBRARY_PATH, or run on the CPU (`device: cpu`, `--device cpu`)"
        ));
    }
    let driver =
        |e: cudarc::driver::DriverError| format!("device `{spec}`: the CUDA driver failed: {e}");
    init().map_err(driver)?;
    let count = device::get_count().map_err(driver)? as usize;
    if index >= count {
        let visible = std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "unset".into());
        return Err(format!(
            "device `{spec}`: GPU {index} asked for, but {count} GPU(s) are visible (CUDA_VISIBLE_DEVICES={visible}); use an index below {count}"
        ));
    }
    let dev = device::get(index as i32).map_err(driver)?;
    let name = device::get_name(dev).map_err(driver)?;
    let memory_bytes = unsafe { device::total_mem(dev) }.map_err(driver)? as u64;
    Ok(GpuInfo {
        index,
        name,
        memory_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        for (text, spec) in [
            ("cpu", DeviceSpec::Cpu),
            ("cuda", DeviceSpec::Cuda(None)),
            ("cuda:3", DeviceSpec::Cuda(Some(3))),
        ] {
            assert_eq!(text.parse::<DeviceSpec>(), Ok(spec));
            assert_eq!(spec.to_string(), text);
        }
        for bad in ["", "CPU", "cuda:", "cuda:x", "cuda:-1", "tpu"] {
            let err = bad.parse::<DeviceSpec>().unwrap_err();
            assert!(
                err.contains(&format!("`{bad}`")) && err.contains("cuda:N"),
                "{err}"
            );
        }
    }

    #[test]
    fn cuda_index_follows_the_local_rank_unless_named() {
        assert_eq!(DeviceSpec::Cuda(None).gpu_index(2), Some(2));
        assert_eq!(DeviceSpec::Cuda(Some(1)).gpu_index(2), Some(1));
        assert_eq!(DeviceSpec::Cpu.gpu_index(2), None);
    }

    /// Without a GPU (CI, and any CPU build) asking for one is an error naming the fix.
    #[test]
    fn cuda_without_a_gpu_is_an_error() {
        if cfg!(feature = "cuda") && unsafe_cuda_present() {
            return;
        }
        let err = DeviceSpec::Cuda(Some(0)).open(0).unwrap_err();
        assert!(err.contains("device `cuda:0`"), "{err}");
        assert!(err.contains("device: cpu"), "{err}");
    }

    fn unsafe_cuda_present() -> bool {
        #[cfg(feature = "cuda")]
        return unsafe { cudarc::driver::sys::is_culib_present() };
        #[cfg(not(feature = "cuda"))]
        false
    }
}
