//! The grouped matmul on the CPU backend, in f32: every expert's product is written by the
//! gemm crate straight into its row range of one output buffer (no per-expert tensors to
//! concatenate, no zero-filled gradient blocks), and the experts run on rayon's threads side
//! by side, each product on one thread, so the packing that gemm does before a product is
//! spread over the threads too and results do not depend on the thread count.
//!
//! Owns only the f32 loops over contiguous buffers; grouped_mm.rs owns the op's meaning
//! (offsets, the small-product floor) and the other dtypes and backends.

use burn::tensor::{Bytes, DType, Shape};
use burn_flex::{FlexTensor, Layout};
use rayon::prelude::*;

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

fn dense(t: &FlexTensor) -> FlexTensor {
    match t.is_contiguous() {
        true => t.clone(),
        false => t.to_contiguous(),
    }
}

fn f32_tensor(values: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::new(
        Bytes::from_elems(values),
        Layout::contiguous(shape),
        DType::F32,
    )
}

/// Whether this path takes the op: both operands f32.
pub(crate) fn handles(x: &FlexTensor, w: &FlexTensor) -> bool {
    x.dtype() == DType::F32 && w.dtype() == DType::F32
}

/// `x [rows, in] · w_eᵀ` per expert row range → `[rows, out]`; an expert with fewer than
/// `floor` rows is computed over zero rows padded up to `floor` (see grouped_mm::min_rows).
pub(crate) fn forward(
    x: &FlexTensor,
    w: &FlexTensor,
    offsets: &[usize],
    floor: usize,
) -> FlexTensor {
    let [_, out, inp] = w.layout().shape().dims::<3>();
    let rows = offsets[offsets.len() - 1];
    let (x, w) = (dense(x), dense(w));
    let (xs, ws) = (x.storage::<f32>(), w.storage::<f32>());
    let xs = &xs[x.layout().start_offset()..];
    let ws = &ws[w.layout().start_offset()..];
    let mut y = vec![0.0f32; rows * out];
    let counts = offsets.windows(2).map(|p| p[1] - p[0]);
    let blocks = split(&mut y, counts.clone().map(|c| c * out));
    blocks.into_par_iter().enumerate().for_each(|(e, dst)| {
        let (r0, r) = (offsets[e], offsets[e + 1] - offsets[e]);
        if r == 0 {
            return;
        }
        let we = Operand {
            data: &ws[e * out * inp..(e + 1) * out * inp],
            row: 1,
            col: inp,
        };
        if r >= floor {
            let xe = Operand {
                data: &xs[r0 * inp..(r0 + r) * inp],
                row: inp,
                col: 1,
            };
            return gemm(dst, r, out, inp, xe, we);
        }
        let mut padded = vec![0.0f32; floor * inp];
        padded[..r * inp].copy_from_slice(&xs[r0 * inp..(r0 + r) * inp]);
        let mut full = vec![0.0f32; floor * out];
        gemm(
            &mut full,
            floor,
            out,
            inp,
            Operand {
                data: &padded,
                row: inp,
                col: 1,
            },
            we,
        );
        dst.copy_from_slice(&full[..r * out]);
    });
    f32_tensor(y, Shape::new([rows, out]))
}

/// `(dx [rows, in], dw [experts, out, in])` given `grad [rows, out]`: per expert
/// `dx_e = g_e · w_e` and `dw_e = g_eᵀ · x_e` (zero for an expert without rows).
pub(crate) fn backward(
    x: &FlexTensor,
    w: &FlexTensor,
    offsets: &[usize],
    grad: &FlexTensor,
) -> (FlexTensor, FlexTensor) {
    let [experts, out, inp] = w.layout().shape().dims::<3>();
    let rows = offsets[experts];
    let (x, w, grad) = (dense(x), dense(w), dense(grad));
    let xs = &x.storage::<f32>()[x.layout().start_offset()..];
    let ws = &w.storage::<f32>()[w.layout().start_offset()..];
    let gs = &grad.storage::<f32>()[grad.layout().start_offset()..];
    let (mut dx, mut dw) = (vec![0.0f32; rows * inp], vec![0.0f32; experts * out * inp]);
    let counts = offsets.windows(2).map(|p| p[1] - p[0]);
    let dx_blocks = split(&mut dx, counts.map(|c| c * inp));
    let dw_blocks = split(&mut dw, (0..experts).map(|_| out * inp));
    let tasks = dx_blocks.into_par_iter().zip(dw_blocks).enumerate();
    tasks.for_each(|(e, (dxe, dwe))| {
        let (r0, r) = (offsets[e], offsets[e + 1] - offsets[e]);
        if r == 0 {
            return;
        }
        let ge = &gs[r0 * out..(r0 + r) * out];
        let xe = &xs[r0 * inp..(r0 + r) * inp];
        let we = &ws[e * out * inp..(e + 1) * out * inp];
        let g = Operand {
            data: ge,
            row: out,
            col: 1,
        };
        gemm(
            dxe,
            r,
            inp,
            out,
            g,
            Operand {
                data: we,
                row: inp,
                col: 1,
            },
        );
        let g_t = Operand {
            data: ge,
            row: 1,
            col: out,
        };
        gemm(
            dwe,
            out,
            inp,
            r,
            g_t,
            Operand {
                data: xe,
                row: inp,
                col: 1,
            },
        );
    });
    (
        f32_tensor(dx, Shape::new([rows, inp])),
        f32_tensor(dw, Shape::new([experts, out, inp])),
    )
}
