//! The CPU loops behind moeru's fused ops: RMSNorm, SwiGLU and row softmax, forward and
//! backward, and the AdamW update, each one pass (or two) over plain f32 rows instead of a chain of tensor ops that
//! each allocate and sweep memory. Rows are split over rayon's threads in fixed chunks, so
//! the result does not depend on the thread count.
//!
//! Owns only arithmetic on slices: it must not know about tensors, dtypes, devices or
//! autodiff (models/src/fused.rs wires these loops into burn as backend-extension ops).

#[macro_use]
mod multiversion;
mod adamw;
mod exp;
mod rms_norm;
mod softmax;
mod swiglu;

pub use adamw::{adamw, AdamWStep};
pub use exp::exp;
pub use rms_norm::{rms_norm, rms_norm_backward};
pub use softmax::{
    exp_sum_rows, exp_sum_rows_backward, masked_softmax_rows, softmax_backward_rows, MaskRows,
};
pub use swiglu::{swiglu, swiglu_backward};

/// A row-major matrix view: row `r` is `data[offset + r·stride ..][..width]` (a narrowed
/// column range of a wider matrix has `stride > width`).
#[derive(Clone, Copy, Debug)]
pub struct Rows<'a> {
    pub data: &'a [f32],
    pub offset: usize,
    pub stride: usize,
    pub width: usize,
    pub rows: usize,
}

impl<'a> Rows<'a> {
    /// A contiguous `[rows, width]` matrix.
    pub fn dense(data: &'a [f32], width: usize) -> Self {
        let rows = data.len().checked_div(width).unwrap_or(0);
        Rows {
            data,
            offset: 0,
            stride: width,
            width,
            rows,
        }
    }

    pub fn row(&self, r: usize) -> &'a [f32] {
        let start = self.offset + r * self.stride;
        &self.data[start..start + self.width]
    }
}

/// Rows per parallel chunk: about 16 K elements, so small tensors stay on one thread.
fn chunk_rows(width: usize) -> usize {
    (16 * 1024 / width.max(1)).max(1)
}
