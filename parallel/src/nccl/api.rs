//! Finding and opening NCCL. The CUDA driver comes through cudarc, after its
//! `is_culib_present()` probe (cudarc panics on a missing library). NCCL's entry points are
//! opened here with libloading instead of cudarc's `nccl::sys`: cudarc tries fixed names only
//! (`libnccl.so`, `libnccl.so.12`, …, never `libnccl.so.2`), and the dynamic loader reads
//! LD_LIBRARY_PATH once at process start, so neither an environment variable set at run time
//! nor a symlink in a temporary directory could make cudarc find pip's `libnccl.so.2`. Tried
//! in order: `$MOERU_NCCL_LIB`, `libnccl.so.2` and `libnccl.so` on the loader's path, then pip
//! wheels (`nvidia/nccl/lib`) of the active virtualenv or conda env, `~/.local` and the system
//! Pythons.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::PathBuf;
use std::sync::OnceLock;

use crate::comm::{DType, ReduceOp};
use crate::error::{CommError, Result};

pub(super) type Comm = *mut c_void;
pub(super) type Stream = *mut c_void;
pub(super) const SUCCESS: c_int = 0;
pub(super) const IN_PROGRESS: c_int = 7;
pub(super) const UINT8: c_int = 1;
/// ncclCommSplit (2.18) is the newest entry point used.
pub(super) const MIN_VERSION: c_int = 21800;

#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct UniqueId(pub(super) [c_char; 128]);

/// `ncclConfig_t` up to `splitShare` (NCCL 2.18). NCCL copies `size` bytes and keeps its
/// defaults for later fields, so newer libraries accept it too.
#[repr(C)]
pub(super) struct Config {
    size: usize,
    magic: u32,
    version: u32,
    blocking: c_int,
    cga_cluster_size: c_int,
    min_ctas: c_int,
    max_ctas: c_int,
    net_name: *const c_char,
    split_share: c_int,
}

impl Config {
    pub(super) fn nonblocking() -> Self {
        const UNDEF: c_int = c_int::MIN; // NCCL_CONFIG_UNDEF_INT: "use the default"
        Config {
            size: std::mem::size_of::<Config>(),
            magic: 0xcafe_beef,
            version: MIN_VERSION as u32,
            blocking: 0,
            cga_cluster_size: UNDEF,
            min_ctas: UNDEF,
            max_ctas: UNDEF,
            net_name: std::ptr::null(),
            split_share: UNDEF,
        }
    }
}

pub(super) type Src = *const c_void;
pub(super) type Dst = *mut c_void;

/// The NCCL entry points used, resolved once per process (the library stays loaded).
pub(super) struct Api {
    pub(super) get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> c_int,
    pub(super) init_rank_config:
        unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int, *mut Config) -> c_int,
    pub(super) split: unsafe extern "C" fn(Comm, c_int, c_int, *mut Comm, *mut Config) -> c_int,
    pub(super) async_error: unsafe extern "C" fn(Comm, *mut c_int) -> c_int,
    pub(super) abort: unsafe extern "C" fn(Comm) -> c_int,
    pub(super) finalize: unsafe extern "C" fn(Comm) -> c_int,
    pub(super) destroy: unsafe extern "C" fn(Comm) -> c_int,
    pub(super) error_string: unsafe extern "C" fn(c_int) -> *const c_char,
    pub(super) last_error: unsafe extern "C" fn(Comm) -> *const c_char,
    pub(super) all_reduce:
        unsafe extern "C" fn(Src, Dst, usize, c_int, c_int, Comm, Stream) -> c_int,
    pub(super) all_gather: unsafe extern "C" fn(Src, Dst, usize, c_int, Comm, Stream) -> c_int,
    pub(super) reduce_scatter:
        unsafe extern "C" fn(Src, Dst, usize, c_int, c_int, Comm, Stream) -> c_int,
    pub(super) broadcast:
        unsafe extern "C" fn(Src, Dst, usize, c_int, c_int, Comm, Stream) -> c_int,
    pub(super) send: unsafe extern "C" fn(Src, usize, c_int, c_int, Comm, Stream) -> c_int,
    pub(super) recv: unsafe extern "C" fn(Dst, usize, c_int, c_int, Comm, Stream) -> c_int,
    pub(super) group_start: unsafe extern "C" fn() -> c_int,
    pub(super) group_end: unsafe extern "C" fn() -> c_int,
    pub(super) _lib: libloading::Library,
}

pub(super) fn backend(detail: String) -> CommError {
    CommError::Backend {
        backend: "nccl",
        detail,
    }
}

/// Where NCCL may be, best first; absolute paths only when the file exists.
pub(super) fn candidates() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::env::var_os("MOERU_NCCL_LIB")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    out.extend(["libnccl.so.2", "libnccl.so"].map(PathBuf::from));
    let env = |v: &str| std::env::var_os(v).map(PathBuf::from);
    let mut roots: Vec<PathBuf> = [env("VIRTUAL_ENV"), env("CONDA_PREFIX")]
        .into_iter()
        .flatten()
        .map(|p| p.join("lib"))
        .collect();
    roots.extend(env("HOME").map(|h| h.join(".local/lib")));
    roots.extend(["/usr/local/lib", "/usr/lib"].map(PathBuf::from));
    for root in roots {
        out.push(root.join("libnccl.so.2")); // conda's nccl package
        for py in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            if py.file_name().to_string_lossy().starts_with("python3") {
                for sp in ["site-packages", "dist-packages"] {
                    out.push(py.path().join(sp).join("nvidia/nccl/lib/libnccl.so.2"));
                }
            }
        }
    }
    out.retain(|p| !p.is_absolute() || p.is_file());
    out
}

pub(super) fn sym<T: Copy>(lib: &libloading::Library, path: &str, name: &str) -> Result<T, String> {
    // SAFETY: every `T` used is the prototype nccl.h gives `name`.
    unsafe { lib.get::<T>(name.as_bytes()) }
        .map(|s| *s)
        .map_err(|e| format!("{path} lacks {name} ({e}); NCCL 2.18 or newer is needed"))
}

pub(super) fn load_nccl() -> Result<Api, String> {
    let mut failures = Vec::new();
    for path in &candidates() {
        // SAFETY: loading NCCL only runs its initialisers, which have no preconditions.
        let lib = match unsafe { libloading::Library::new(path) } {
            Ok(lib) => lib,
            Err(e) if path.is_absolute() => {
                failures.push(e.to_string());
                continue;
            }
            Err(_) => continue,
        };
        let p = &path.display().to_string();
        let get_version: unsafe extern "C" fn(*mut c_int) -> c_int =
            sym(&lib, p, "ncclGetVersion")?;
        let mut version = 0;
        // SAFETY: writes one int.
        unsafe { get_version(&mut version) };
        if version < MIN_VERSION {
            return Err(format!("{p} is NCCL {version}; moeru needs 2.18 or newer (pip install -U nvidia-nccl-cu12)"));
        }
        return Ok(Api {
            get_unique_id: sym(&lib, p, "ncclGetUniqueId")?,
            init_rank_config: sym(&lib, p, "ncclCommInitRankConfig")?,
            split: sym(&lib, p, "ncclCommSplit")?,
            async_error: sym(&lib, p, "ncclCommGetAsyncError")?,
            abort: sym(&lib, p, "ncclCommAbort")?,
            finalize: sym(&lib, p, "ncclCommFinalize")?,
            destroy: sym(&lib, p, "ncclCommDestroy")?,
            error_string: sym(&lib, p, "ncclGetErrorString")?,
            last_error: sym(&lib, p, "ncclGetLastError")?,
            all_reduce: sym(&lib, p, "ncclAllReduce")?,
            all_gather: sym(&lib, p, "ncclAllGather")?,
            reduce_scatter: sym(&lib, p, "ncclReduceScatter")?,
            broadcast: sym(&lib, p, "ncclBroadcast")?,
            send: sym(&lib, p, "ncclSend")?,
            recv: sym(&lib, p, "ncclRecv")?,
            group_start: sym(&lib, p, "ncclGroupStart")?,
            group_end: sym(&lib, p, "ncclGroupEnd")?,
            _lib: lib,
        });
    }
    Err(format!(
        "libnccl.so.2 not found (tried $MOERU_NCCL_LIB, libnccl.so.2 and libnccl.so on the loader's path, and pip's nvidia/nccl/lib in $VIRTUAL_ENV, $CONDA_PREFIX, ~/.local and the system Pythons{}); install NVIDIA NCCL (e.g. pip install nvidia-nccl-cu12, or the libnccl2 package) or set LD_LIBRARY_PATH to the directory holding libnccl.so.2 (or MOERU_NCCL_LIB to the file)",
        failures.iter().map(|f| format!("; {f}")).collect::<String>()
    ))
}

pub(super) fn api() -> Result<&'static Api> {
    static API: OnceLock<Result<Api, String>> = OnceLock::new();
    let api = API.get_or_init(|| {
        // SAFETY: only tries to open the driver library under cudarc's names.
        let cuda = unsafe { cudarc::driver::sys::is_culib_present() };
        match (cuda, load_nccl()) {
            (true, Ok(api)) => Ok(api),
            (cuda, nccl) => {
                let mut missing: Vec<String> = nccl.err().into_iter().collect();
                if !cuda {
                    missing.push("libcuda.so.1 (the NVIDIA driver) not found: NCCL needs an NVIDIA GPU with its driver".into());
                }
                Err(format!("cannot use NCCL: {}", missing.join("; ")))
            }
        }
    });
    api.as_ref().map_err(|d| backend(d.clone()))
}

/// Checks that the CUDA driver and NCCL (2.18+) can be loaded; the error says what is missing
/// and how to install it. Nothing here panics when a library is absent.
pub fn probe() -> Result<()> {
    api().map(|_| ())
}

pub(super) fn describe(api: &Api, rc: c_int, comm: Comm) -> String {
    let text = |p: *const c_char| {
        // SAFETY: NCCL returns static or comm-owned NUL-terminated strings, or null.
        (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    };
    // SAFETY: both take any value; the comm is live (callers pass null otherwise).
    let what = text(unsafe { (api.error_string)(rc) }).unwrap_or_default();
    let last = if comm.is_null() {
        None
    } else {
        text(unsafe { (api.last_error)(comm) })
    };
    match last.filter(|l| !l.is_empty()) {
        Some(l) => format!("NCCL error {rc} ({what}): {l}"),
        None => format!("NCCL error {rc} ({what})"),
    }
}

pub(super) fn nccl_dtype(d: DType) -> c_int {
    match d {
        DType::U8 => UINT8,
        DType::I64 => 4,
        DType::F32 => 7,
        DType::F64 => 8,
        // ncclBfloat16 (NCCL 2.10 and later).
        DType::BF16 => 9,
    }
}

/// Mean is ncclAvg: integer types sum then divide (as the CPU backends); floats scale each
/// contribution by 1/size before summing, so results may differ in the last bit.
pub(super) fn nccl_op(op: ReduceOp) -> c_int {
    match op {
        ReduceOp::Sum => 0,
        ReduceOp::Max => 2,
        ReduceOp::Mean => 4,
    }
}
