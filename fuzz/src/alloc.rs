//! An allocator that refuses any single allocation above a cap, so an input that makes a
//! parser allocate without bound is found instead of swapping the machine.
//!
//! Install it in a fuzz test binary:
//! `#[global_allocator] static A: CappedAlloc = CappedAlloc::new(1 << 30);`
//! A refused allocation returns null, and Rust then aborts the whole process ("memory
//! allocation of N bytes failed"): the test fails, but no `catch_unwind` can attribute it
//! to an input. Rerun with `MOERU_FUZZ_TRACE=1`, which writes each input to
//! `target/fuzz-current-<target>.bin` before running it; after an abort that file is the
//! culprit.

use std::alloc::{GlobalAlloc, Layout, System};

/// [`System`], refusing single allocations of more than `cap` bytes.
pub struct CappedAlloc {
    cap: usize,
}

impl CappedAlloc {
    pub const fn new(cap: usize) -> Self {
        Self { cap }
    }
}

// SAFETY: every call forwards to `System` unchanged, or returns null (allowed by the
// `GlobalAlloc` contract for a failed allocation).
unsafe impl GlobalAlloc for CappedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > self.cap {
            return std::ptr::null_mut();
        }
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > self.cap {
            return std::ptr::null_mut();
        }
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > self.cap {
            return std::ptr::null_mut();
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}
