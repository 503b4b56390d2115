//! glibc malloc tuned for training's allocation pattern: every step allocates and frees the
//! same multi-megabyte tensors. By default glibc serves such blocks with `mmap` and unmaps
//! them on free (or trims the heap back to the OS), so every step page-faults and zeroes its
//! memory afresh: on the smoke MoE 15 % of the CPU time was page faults and unmapping
//! (docs/PERFORMANCE.md). Keeping freed blocks in the process, as PyTorch's caching
//! allocators do, took it from 22 k to 38 k tokens/s.
//!
//! Owns the process's malloc settings and its compute thread pool; both set up once, first
//! thing in `main`.

/// Blocks up to 32 MiB (glibc's largest heap threshold) come from the heap, and the heap is
/// never trimmed; larger blocks still map and unmap.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes malloc's thresholds; it is called before other threads
    // start, and an unsupported value is refused (returns 0) without other effect.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

/// Runs `f` on a worker of a rayon pool with the threads of the global pool it replaces
/// (`RAYON_NUM_THREADS`, else one per core). The command's own thread then joins in the
/// parallel work of every burn, gemm and moeru-kernels op it starts: from a thread outside
/// the pool, each such op hands its work over and sleeps on a latch until it is done, a
/// context switch each way for every op (15 % of the smoke model's CPU time went to thread
/// switches and yields). Threads the command spawns (thread ranks, writers) use the global
/// pool as before. If the pool cannot be built, `f` runs here.
pub fn on_compute_pool<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    // The main thread's stack size: deep recursion (clap, serde, the autodiff graph) must not
    // meet a smaller worker stack.
    match rayon::ThreadPoolBuilder::new().stack_size(8 << 20).build() {
        Ok(pool) => pool.install(f),
        Err(_) => f(),
    }
}
