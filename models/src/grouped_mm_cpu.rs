//! The grouped matmul on the CPU backend, in f32: every expert's product is written by the
//! gemm crate straight into its row range of one output buffer (no per-expert tensors to
//! concatenate, no zero-filled gradient blocks), and the experts run on rayon's threads side
//! by side in fixed blocks of rows, each product on one thread, so the packing that gemm does
//! before a product is spread over the threads too and results do not depend on the thread
//! count.
//!
//! Owns only the f32 loops over contiguous buffers; grouped_mm.rs owns the op's meaning
//! (offsets, the small-product floor) and the other dtypes and backends.

use burn::tensor::{DType, Shape};
use burn_flex::FlexTensor;
use rayon::prelude::*;

use crate::flex_buffers::{dense, f32_tensor};

/// A row-major operand: `data[r·row + c·col]`.
#[derive(Clone, Copy)]
struct Operand<'a> {
    data: &'a [f32],
    row: usize,
    col: usize,
}

/// `dst [m, n] = a [m, k] · b [k, n]`, on this thread.
fn gemm(dst: &mut [f32], m: usize, n: usize, k: usize, a: Operand, b: Operand) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(dst.len() >= m * n, "grouped_mm: output block too small");
    let last = |o: Operand, rows: usize, cols: usize| (rows - 1) * o.row + (cols - 1) * o.col;
    assert!(k == 0 || (last(a, m, k) < a.data.len() && last(b, k, n) < b.data.len()));
    // SAFETY: every index gemm reads or writes lies inside the slices, checked just above;
    // `dst` is borrowed mutably, so nothing else reads or writes it meanwhile.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.data.as_ptr(),
            a.col as isize,
            a.row as isize,
            b.data.as_ptr(),
            b.col as isize,
            b.row as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// `buf` cut into consecutive pieces of `lens[i]` elements.
fn split(mut buf: &mut [f32], lens: impl Iterator<Item = usize>) -> Vec<&mut [f32]> {
    let mut parts = Vec::new();
    for len in lens {
        let (head, tail) = buf.split_at_mut(len);
        parts.push(head);
        buf = tail;
    }
    parts
}

/// Whether this path takes the op: both operands f32.
pub(crate) fn handles(x: &FlexTensor, w: &FlexTensor) -> bool {
    x.dtype() == DType::F32 && w.dtype() == DType::F32
}

/// Rows per task: an expert's rows are cut into blocks of this many, so that one busy
/// expert does not keep one thread working while the others wait (the router is uneven).
/// Fixed, so the cut does not depend on the thread count.
const ROW_BLOCK: usize = 128;

/// `(expert, first row, rows)` of every block: each expert's rows cut into [`ROW_BLOCK`]s.
fn row_blocks(offsets: &[usize]) -> Vec<(usize, usize, usize)> {
    let mut blocks = Vec::new();
    for (e, p) in offsets.windows(2).enumerate() {
        let mut r = p[0];
        while r < p[1] {
            let n = ROW_BLOCK.min(p[1] - r);
            blocks.push((e, r, n));
            r += n;
        }
    }
    blocks
}

/// `x [rows, in] · w_eᵀ` per expert row range → `[rows, out]`; a block of fewer than
/// `floor` rows is computed over zero rows padded up to `floor` (see grouped_mm::min_rows).
pub(crate) fn forward(
    x: &FlexTensor,
    w: &FlexTensor,
    offsets: &[usize],
    floor: usize,
) -> FlexTensor {
    let [_, out, inp] = w.layout().shape().dims::<3>();
    let rows = offsets[offsets.len() - 1];
    let (x, w) = (dense(x.clone()), dense(w.clone()));
    let xs = &x.storage::<f32>()[x.layout().start_offset()..];
    let ws = &w.storage::<f32>()[w.layout().start_offset()..];
    let mut y = vec![0.0f32; rows * out];
    let blocks = row_blocks(offsets);
    let dsts = split(&mut y, blocks.iter().map(|b| b.2 * out));
    dsts.into_par_iter()
        .zip(blocks)
        .for_each(|(dst, (e, r0, r))| {
            let we = Operand {
                data: &ws[e * out * inp..(e + 1) * out * inp],
                row: 1,
                col: inp,
            };
            let xb = &xs[r0 * inp..(r0 + r) * inp];
            if r >= floor {
                return gemm(
                    dst,
                    r,
                    out,
                    inp,
                    Operand {
                        data: xb,
                        row: inp,
                        col: 1,
                    },
                    we,
                );
            }
            let mut padded = vec![0.0f32; floor * inp];
            padded[..r * inp].copy_from_slice(xb);
            let mut full = vec![0.0f32; floor * out];
            let xp = Operand {
                data: &padded,
                row: inp,
                col: 1,
            };
            gemm(&mut full, floor, out, inp, xp, we);
            dst.copy_from_slice(&full[..r * out]);
        });
    f32_tensor(y, Shape::new([rows, out]))
}

/// `(dx [rows, in], dw [experts, out, in])` given `grad [rows, out]`: per expert
/// `dx_e = g_e · w_e` (by row blocks) and `dw_e = g_eᵀ · x_e` (by blocks of its `out` rows,
/// each summing over all the expert's rows; zero for an expert without rows).
pub(crate) fn backward(
    x: &FlexTensor,
    w: &FlexTensor,
    offsets: &[usize],
    grad: &FlexTensor,
) -> (FlexTensor, FlexTensor) {
    let [experts, out, inp] = w.layout().shape().dims::<3>();
    let rows = offsets[experts];
    let (x, w, grad) = (dense(x.clone()), dense(w.clone()), dense(grad.clone()));
    let xs = &x.storage::<f32>()[x.layout().start_offset()..];
    let ws = &w.storage::<f32>()[w.layout().start_offset()..];
    let gs = &grad.storage::<f32>()[grad.layout().start_offset()..];
    let (mut dx, mut dw) = (vec![0.0f32; rows * inp], vec![0.0f32; experts * out * inp]);
    let blocks = row_blocks(offsets);
    let dx_dsts = split(&mut dx, blocks.iter().map(|b| b.2 * inp));
    dx_dsts
        .into_par_iter()
        .zip(blocks)
        .for_each(|(dst, (e, r0, r))| {
            let g = Operand {
                data: &gs[r0 * out..(r0 + r) * out],
                row: out,
                col: 1,
            };
            let we = Operand {
                data: &ws[e * out * inp..(e + 1) * out * inp],
                row: inp,
                col: 1,
            };
            gemm(dst, r, inp, out, g, we);
        });
    // dw_e rows o0..o0+n = (g_e columns o0..o0+n)ᵀ · x_e.
    let out_block = ROW_BLOCK.min(out.max(1));
    let dw_tasks: Vec<(usize, usize, usize)> = (0..experts)
        .flat_map(|e| {
            (0..out)
                .step_by(out_block)
                .map(move |o0| (e, o0, out_block.min(out - o0)))
        })
        .collect();
    let dw_dsts = split(&mut dw, dw_tasks.iter().map(|t| t.2 * inp));
    dw_dsts
        .into_par_iter()
        .zip(dw_tasks)
        .for_each(|(dst, (e, o0, n))| {
            let (r0, r) = (offsets[e], offsets[e + 1] - offsets[e]);
            if r == 0 {
                return;
            }
            let g_t = Operand {
                data: &gs[r0 * out + o0..(r0 + r) * out],
                row: 1,
                col: out,
            };
            let xe = Operand {
                data: &xs[r0 * inp..(r0 + r) * inp],
                row: inp,
                col: 1,
            };
            gemm(dst, n, inp, r, g_t, xe);
        });
    (
        f32_tensor(dx, Shape::new([rows, inp])),
        f32_tensor(dw, Shape::new([experts, out, inp])),
    )
}
