//! The grouped matmul of the experts (`torch._grouped_mm`, Megatron's grouped GEMM): rows
//! sorted by expert, one contiguous row range per expert, each range times its expert's
//! weight. No expert is padded to another's load: the rows computed are the rows routed
//! (an expert with only a few rows is computed over [`min_rows`] of them).
//!
//! A backend-extension op with its own backward: autodiff through per-expert slices would
//! give every slice's gradient as a zero-filled copy of the whole input (one per expert);
//! this backward writes each expert's input gradient once, into one buffer, and forms each
//! expert's weight gradient from its own rows (zeros for an expert with none). Each product is
//! the plain `x_e · w_eᵀ` in the inputs' dtype, as the batched matmul over padded buffers it
//! replaces computed it.

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
#[cfg(feature = "cuda")]
use burn::backend::Cube;
use burn::backend::{backend_extension, Autodiff, Backend, Dispatch, Flex, TensorMetadata};
use burn::tensor::{FloatDType, Shape, Slice, Tensor};
use burn_flex::FlexTensor;

use crate::backward::register_input_grads;
use crate::grouped_mm_cpu as cpu;

/// `x [rows, in]` (rows sorted by expert: expert e owns rows `offsets[e]..offsets[e + 1]`)
/// times `w [experts, out, in]` transposed per expert → `[rows, out]`, in x's dtype (w must
/// have it too). `offsets` has `experts + 1` non-decreasing entries from 0 to `rows`.
pub fn grouped_mm(x: Tensor<2>, w: Tensor<3>, offsets: &[usize]) -> Tensor<2> {
    let [rows, _] = x.dims();
    let experts = w.dims()[0];
    assert!(
        offsets.len() == experts + 1
            && offsets[0] == 0
            && offsets[experts] == rows
            && offsets.windows(2).all(|p| p[0] <= p[1]),
        "grouped_mm: offsets {offsets:?} do not cut {rows} rows into {experts} experts"
    );
    let out = <Dispatch as GroupedMmOps>::grouped_mm(
        x.into_dispatch(),
        w.into_dispatch(),
        offsets.to_vec(),
    );
    Tensor::from_dispatch(out)
}

#[backend_extension(Flex, Cube: cfg(feature = "cuda"), Autodiff)]
pub trait GroupedMmOps: Backend {
    fn grouped_mm(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        offsets: Vec<usize>,
    ) -> FloatTensor<Self> {
        grouped_mm_products::<Self>(x, w, &offsets)
    }

    /// `(dx, dw)` given the output's gradient `grad [rows, out]`.
    fn grouped_mm_backward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        offsets: Vec<usize>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        grouped_mm_backward_products::<Self>([x, w], &offsets, grad)
    }
}

/// The op in backend matmuls, one per expert, concatenated.
fn grouped_mm_products<B: Backend>(
    x: FloatTensor<B>,
    w: FloatTensor<B>,
    offsets: &[usize],
) -> FloatTensor<B> {
    let [_, out_dim, inp] = w.shape().dims::<3>();
    let (floor, dtype) = (min_rows(out_dim), FloatDType::from(x.dtype()));
    let parts: Vec<_> = ranges(offsets)
        .map(|(e, r0, r1)| {
            let mut xe = rows::<B>(&x, r0, r1);
            if r1 - r0 < floor {
                let pad = B::float_zeros(Shape::new([floor - (r1 - r0), inp]), &x.device(), dtype);
                xe = B::float_cat(vec![xe, pad], 0);
            }
            let ye = B::float_matmul(xe, transposed::<B>(&w, e));
            match r1 - r0 < floor {
                true => rows::<B>(&ye, 0, r1 - r0),
                false => ye,
            }
        })
        .collect();
    if parts.is_empty() {
        return B::float_zeros(Shape::new([0, out_dim]), &x.device(), dtype);
    }
    B::float_cat(parts, 0)
}

/// f32 on the CPU writes every expert's product into one buffer (grouped_mm_cpu.rs).
impl GroupedMmOps for Flex {
    fn grouped_mm(x: FlexTensor, w: FlexTensor, offsets: Vec<usize>) -> FlexTensor {
        match cpu::handles(&x, &w) {
            true => cpu::forward(&x, &w, &offsets, min_rows(w.layout().shape()[1])),
            false => grouped_mm_products::<Self>(x, w, &offsets),
        }
    }

    fn grouped_mm_backward(
        x: FlexTensor,
        w: FlexTensor,
        offsets: Vec<usize>,
        grad: FlexTensor,
    ) -> (FlexTensor, FlexTensor) {
        match cpu::handles(&x, &w) && grad.dtype() == x.dtype() {
            true => cpu::backward(&x, &w, &offsets, &grad),
            false => grouped_mm_backward_products::<Self>([x, w], &offsets, grad),
        }
    }
}
#[cfg(feature = "cuda")]
impl GroupedMmOps for Cube {}

/// Rows an expert's product is computed over at least, for products `out` wide: the CPU gemm
/// (the `gemm` crate) takes a dot-product kernel when rows·out ≤ 256 and a matrix-vector one
/// for a single row, each rounding differently from its blocked kernel. An expert with fewer
/// rows is padded with zero rows up to this, so a token's output does not depend on how many
/// other tokens its experts got (the DPO reference, computed one pair at a time, equals the
/// policy's batched forward bit for bit).
pub fn min_rows(out: usize) -> usize {
    (256 / out.max(1) + 1).max(2)
}

/// (expert, first row, end row) of every expert with rows.
fn ranges(offsets: &[usize]) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
    offsets
        .windows(2)
        .enumerate()
        .filter(|(_, p)| p[1] > p[0])
        .map(|(e, p)| (e, p[0], p[1]))
}

fn rows<B: Backend>(x: &FloatTensor<B>, r0: usize, r1: usize) -> FloatTensor<B> {
    B::float_slice(
        x.clone(),
        &[Slice::new(r0 as isize, Some(r1 as isize), 1), Slice::full()],
    )
}

/// Expert `e`'s weight `[out, in]`.
fn expert<B: Backend>(w: &FloatTensor<B>, e: usize) -> FloatTensor<B> {
    let [_, out, inp] = w.shape().dims::<3>();
    let at = Slice::new(e as isize, Some(e as isize + 1), 1);
    let one = B::float_slice(w.clone(), &[at, Slice::full(), Slice::full()]);
    B::float_reshape(one, Shape::new([out, inp]))
}

fn transposed<B: Backend>(w: &FloatTensor<B>, e: usize) -> FloatTensor<B> {
    B::float_transpose(expert::<B>(w, e))
}

/// The gradients of x and w given the output's gradient `grad [rows, out]`, in backend
/// matmuls.
fn grouped_mm_backward_products<B: Backend>(
    [x, w]: [FloatTensor<B>; 2],
    offsets: &[usize],
    grad: FloatTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let [experts, out, inp] = w.shape().dims::<3>();
    let [rows_total, _] = x.shape().dims::<2>();
    let (device, dtype) = (x.device(), FloatDType::from(x.dtype()));
    let mut dx = Vec::new();
    let mut dw: Vec<Option<FloatTensor<B>>> = (0..experts).map(|_| None).collect();
    for (e, r0, r1) in ranges(offsets) {
        let g = rows::<B>(&grad, r0, r1);
        dx.push(B::float_matmul(g.clone(), expert::<B>(&w, e)));
        let dwe = B::float_matmul(B::float_transpose(g), rows::<B>(&x, r0, r1));
        dw[e] = Some(B::float_reshape(dwe, Shape::new([1, out, inp])));
    }
    // An expert without rows gets a zero gradient.
    let zero = || B::float_zeros(Shape::new([1, out, inp]), &device, dtype);
    let dw = dw.into_iter().map(|d| d.unwrap_or_else(zero)).collect();
    let dx = match dx.is_empty() {
        true => B::float_zeros(Shape::new([rows_total, inp]), &device, dtype),
        false => B::float_cat(dx, 0),
    };
    (dx, B::float_cat(dw, 0))
}

#[derive(Debug)]
struct GroupedMmBackward;

impl<B: Backend + GroupedMmOps> Backward<B, 2> for GroupedMmBackward {
    /// x, w, offsets.
    type State = ([FloatTensor<B>; 2], Vec<usize>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let ([x, w], offsets) = ops.state;
        let grad = grads.consume::<B>(&ops.node);
        let (dx, dw) = B::grouped_mm_backward(x, w, offsets, grad);
        let parents = ops.parents.map(|p| p.map(|node| node.id));
        register_input_grads::<B, _>(parents, [dx, dw], grads);
    }
}

impl<B: Backend + GroupedMmOps, C: CheckpointStrategy> GroupedMmOps for Autodiff<B, C> {
    fn grouped_mm(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        offsets: Vec<usize>,
    ) -> FloatTensor<Self> {
        let nodes = [x.node(), w.node()];
        let [x, w] = [x, w].map(|t| t.into_primitive());
        match GroupedMmBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let state = ([x.clone(), w.clone()], offsets.clone());
                prep.finish(state, B::grouped_mm(x, w, offsets))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::grouped_mm(x, w, offsets)),
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, FloatDType, Tensor, TensorData};

    use super::grouped_mm;
    use crate::params::to_f32_vec;
    use crate::precision::{cast_to, to_f32};

    fn values<const D: usize>(dims: [usize; D], seed: u64, device: &Device) -> Tensor<D> {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n as u64)
            .map(|i| (((i * 2654435761 + seed * 97) % 1009) as f32 / 1009.0 - 0.5) * 2.0)
            .collect();
        Tensor::from_data(TensorData::new(v, dims), device)
    }

    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// Per-expert products written by the plain ops (autodiff through slices and a cat).
    fn reference(x: Tensor<2>, w: Tensor<3>, offsets: &[usize]) -> Tensor<2> {
        let [e, out, inp] = w.dims();
        let mut parts = Vec::new();
        for i in 0..e {
            let (r0, r1) = (offsets[i], offsets[i + 1]);
            if r1 > r0 {
                let wi = w.clone().narrow(0, i, 1).reshape([out, inp]);
                parts.push(x.clone().narrow(0, r0, r1 - r0).matmul(wi.transpose()));
            }
        }
        Tensor::cat(parts, 0)
    }

    /// Output, gradient of x, gradient of w, for the op or the reference.
    fn run(op: bool, dtype: FloatDType, offsets: &[usize]) -> [Vec<f32>; 3] {
        let device = Device::flex().autodiff();
        let rows = *offsets.last().unwrap();
        let x = values([rows, 6], 1, &device).require_grad();
        let w = values([offsets.len() - 1, 5, 6], 2, &device).require_grad();
        let (xm, wm) = (cast_to(x.clone(), dtype), cast_to(w.clone(), dtype));
        let y = match op {
            true => grouped_mm(xm, wm, offsets),
            false => reference(xm, wm, offsets),
        };
        let y = to_f32(y);
        let loss = (y.clone() * values([rows, 5], 3, &device)).sum();
        let grads = loss.backward();
        [
            to_f32_vec(y),
            to_f32_vec(x.grad(&grads).unwrap()),
            to_f32_vec(w.grad(&grads).unwrap()),
        ]
    }

    #[test]
    fn matches_per_expert_products_with_idle_experts() {
        // Uneven loads; experts 0, 2 and 5 have no rows.
        for offsets in [
            vec![0, 0, 7, 7, 8, 13, 13],
            vec![0, 3, 6, 9],
            vec![0, 0, 11],
        ] {
            let (got, want) = (
                run(true, FloatDType::F32, &offsets),
                run(false, FloatDType::F32, &offsets),
            );
            for (what, (g, w)) in ["output", "dx", "dw"].iter().zip(got.iter().zip(&want)) {
                assert_eq!(g.len(), w.len(), "{what} {offsets:?}");
                let diff = max_abs_diff(g, w);
                assert!(diff < 1e-6, "{what} {offsets:?}: {diff}");
            }
            // An idle expert's weight gradient is exactly zero.
            if offsets[1] == 0 {
                assert!(got[2][..30].iter().all(|&v| v == 0.0), "{offsets:?}");
            }
        }
    }

    #[test]
    fn matches_per_expert_products_in_bf16() {
        let offsets = [0, 4, 4, 10];
        let (got, want) = (
            run(true, FloatDType::BF16, &offsets),
            run(false, FloatDType::BF16, &offsets),
        );
        for (g, w) in got.iter().zip(&want) {
            let diff = max_abs_diff(g, w);
            assert!(diff < 2e-2, "{diff}");
        }
    }

    #[test]
    fn runs_without_autodiff_and_with_no_rows() {
        let device = Device::flex();
        let w = values([3, 5, 6], 2, &device);
        let y = grouped_mm(values([0, 6], 1, &device), w.clone(), &[0, 0, 0, 0]);
        assert_eq!(y.dims(), [0, 5]);
        let x = values([4, 6], 1, &device);
        let y = to_f32_vec(grouped_mm(x.clone(), w.clone(), &[0, 1, 1, 4]));
        let want = to_f32_vec(reference(x, w, &[0, 1, 1, 4]));
        let diff = max_abs_diff(&y, &want);
        assert!(diff < 1e-6, "{diff}");
    }

    /// A row's output is the same bit for bit whether its expert got 1, 2 or 300 rows (the
    /// CPU gemm's small-product kernels round differently; `min_rows` keeps them out).
    #[test]
    fn a_rows_output_does_not_depend_on_its_experts_load() {
        let device = Device::flex();
        for (inp, out) in [(64, 64), (64, 128), (256, 512), (64, 8)] {
            let x = values([300, inp], 1, &device);
            let w = values([2, out, inp], 2, &device);
            let all = to_f32_vec(grouped_mm(x.clone(), w.clone(), &[0, 0, 300]));
            for m in [1, 2, 3, 5, 17] {
                let few = grouped_mm(x.clone().narrow(0, 0, m), w.clone(), &[0, 0, m]);
                assert_eq!(
                    to_f32_vec(few),
                    all[..m * out],
                    "in {inp} out {out}, {m} rows"
                );
            }
        }
    }
}
