//! RMSNorm, SwiGLU and the exponential sum of a log-sum-exp as single ops with their own
//! backward, on f32 rows `[rows, d]`.
//!
//! Autodiff through the plain expressions (layers.rs) runs seven tensor ops for an RMSNorm
//! and four for a SwiGLU forward, each allocating and sweeping its operand, and about twice
//! as many in backward. These ops run one pass each way: on the CPU a moeru-kernels loop;
//! on other backends the same formula in burn primitives (the trait's default bodies). Only
//! the inputs are kept for backward. f32 only: bf16 inputs keep the plain expressions, which
//! reproduce transformers' intermediate roundings.

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
#[cfg(feature = "cuda")]
use burn::backend::Cube;
use burn::backend::{backend_extension, Autodiff, Backend, Dispatch, Flex, TensorMetadata};
use burn::tensor::{DType, Shape, Tensor};
use burn_flex::FlexTensor;
use moeru_kernels::Rows;

use crate::backward::register_input_grads;
use crate::flex_buffers::{self, f32_tensor, slice};

/// `rms_norm(x) ⊙ w` over the last dimension of `x [rows, d]` (f32), `w [d]` (f32).
pub fn rms_norm_rows(x: Tensor<2>, w: Tensor<1>, eps: f64) -> Tensor<2> {
    let out = <Dispatch as FusedOps>::fused_rms_norm(x.into_dispatch(), w.into_dispatch(), eps);
    Tensor::from_dispatch(out)
}

/// `silu(gate) ⊙ up` for `gate, up [rows, d]` (f32; views such as column ranges are fine).
pub fn swiglu_rows(gate: Tensor<2>, up: Tensor<2>) -> Tensor<2> {
    let out = <Dispatch as FusedOps>::fused_swiglu(gate.into_dispatch(), up.into_dispatch());
    Tensor::from_dispatch(out)
}

/// `Σ_j exp(x_ij − max_i)` per row of `x [rows, d]` (f32), differentiable in `x` only (`max
/// [rows]` is the detached row max of a log-sum-exp); the exponentials are not kept.
pub fn exp_sum_rows(x: Tensor<2>, max: Tensor<1>) -> Tensor<1> {
    let out = <Dispatch as FusedOps>::fused_exp_sum_rows(x.into_dispatch(), max.into_dispatch());
    Tensor::from_dispatch(out)
}

#[backend_extension(Flex, Cube: cfg(feature = "cuda"), Autodiff)]
pub trait FusedOps: Backend {
    fn fused_exp_sum_rows(x: FloatTensor<Self>, max: FloatTensor<Self>) -> FloatTensor<Self> {
        let rows = max.shape().dims::<1>()[0];
        let sums = Self::float_sum_dim(shifted_exp::<Self>(x, max), 1);
        Self::float_reshape(sums, Shape::new([rows]))
    }

    /// `dx` given the sums' gradient `g [rows]`.
    fn fused_exp_sum_rows_backward(
        x: FloatTensor<Self>,
        max: FloatTensor<Self>,
        g: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let rows = max.shape().dims::<1>()[0];
        let g = Self::float_reshape(g, Shape::new([rows, 1]));
        Self::float_mul(shifted_exp::<Self>(x, max), g)
    }

    fn fused_rms_norm(x: FloatTensor<Self>, w: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        let r = inv_rms::<Self>(&x, eps);
        Self::float_mul(Self::float_mul(x, r), row_vector::<Self>(w))
    }

    /// `(dx, dw)` given the output's gradient `dy`.
    fn fused_rms_norm_backward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        eps: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let [_, d] = x.shape().dims::<2>();
        let r = inv_rms::<Self>(&x, eps);
        let normed = Self::float_mul(x.clone(), r.clone());
        let dw = Self::float_sum_dim(Self::float_mul(dy.clone(), normed), 0);
        let dn = Self::float_mul(dy, row_vector::<Self>(w));
        // d/dx of x·r: r·dn − x·r³·mean(dn ⊙ x).
        let mean = Self::float_mean_dim(Self::float_mul(dn.clone(), x.clone()), 1);
        let r3 = Self::float_mul(Self::float_mul(r.clone(), r.clone()), r.clone());
        let dx = Self::float_sub(
            Self::float_mul(dn, r),
            Self::float_mul(x, Self::float_mul(r3, mean)),
        );
        (dx, Self::float_reshape(dw, Shape::new([d])))
    }

    fn fused_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        let silu = Self::float_mul(gate.clone(), Self::sigmoid(gate));
        Self::float_mul(silu, up)
    }

    /// `(d_gate, d_up)` given the output's gradient `dy`.
    fn fused_swiglu_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        dy: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let s = Self::sigmoid(gate.clone());
        let silu = Self::float_mul(gate.clone(), s.clone());
        let d_up = Self::float_mul(dy.clone(), silu);
        // d silu/dg = σ(g)·(1 + g·(1 − σ(g))).
        let one_minus = Self::float_add_scalar(Self::float_neg(s.clone()), 1.0.into());
        let slope = Self::float_add_scalar(Self::float_mul(gate, one_minus), 1.0.into());
        let d_gate = Self::float_mul(Self::float_mul(dy, up), Self::float_mul(s, slope));
        (d_gate, d_up)
    }
}

/// `exp(x − max)` with `max [rows]` broadcast over each row.
fn shifted_exp<B: Backend>(x: FloatTensor<B>, max: FloatTensor<B>) -> FloatTensor<B> {
    let rows = max.shape().dims::<1>()[0];
    B::float_exp(B::float_sub(
        x,
        B::float_reshape(max, Shape::new([rows, 1])),
    ))
}

/// `1 / sqrt(mean(x²) + eps)` per row, `[rows, 1]`.
fn inv_rms<B: Backend>(x: &FloatTensor<B>, eps: f64) -> FloatTensor<B> {
    let mean = B::float_mean_dim(B::float_mul(x.clone(), x.clone()), 1);
    B::float_recip(B::float_sqrt(B::float_add_scalar(mean, eps.into())))
}

fn row_vector<B: Backend>(w: FloatTensor<B>) -> FloatTensor<B> {
    let d = w.shape().dims::<1>()[0];
    B::float_reshape(w, Shape::new([1, d]))
}

impl FusedOps for Flex {
    fn fused_exp_sum_rows(x: FlexTensor, max: FlexTensor) -> FlexTensor {
        let (x, max) = (dense(x), dense(max));
        let shape = max.layout().shape().clone();
        let width = x.layout().shape()[1];
        let mut out = vec![0.0f32; shape.num_elements()];
        moeru_kernels::exp_sum_rows(slice(&x), width, slice(&max), &mut out);
        f32_tensor(out, shape)
    }

    fn fused_exp_sum_rows_backward(x: FlexTensor, max: FlexTensor, g: FlexTensor) -> FlexTensor {
        let (x, max, g) = (dense(x), dense(max), dense(g));
        let shape = x.layout().shape().clone();
        let mut dx = vec![0.0f32; shape.num_elements()];
        moeru_kernels::exp_sum_rows_backward(slice(&x), shape[1], slice(&max), slice(&g), &mut dx);
        f32_tensor(dx, shape)
    }

    fn fused_rms_norm(x: FlexTensor, w: FlexTensor, eps: f64) -> FlexTensor {
        let (x, w) = (dense(x), dense(w));
        let mut y = vec![0.0f32; x.layout().num_elements()];
        moeru_kernels::rms_norm(slice(&x), slice(&w), eps as f32, &mut y);
        f32_tensor(y, x.layout().shape().clone())
    }

    fn fused_rms_norm_backward(
        x: FlexTensor,
        w: FlexTensor,
        dy: FlexTensor,
        eps: f64,
    ) -> (FlexTensor, FlexTensor) {
        let (x, w, dy) = (dense(x), dense(w), dense(dy));
        let mut dx = vec![0.0f32; x.layout().num_elements()];
        let mut dw = vec![0.0f32; w.layout().num_elements()];
        let (xs, ws) = (slice(&x), slice(&w));
        moeru_kernels::rms_norm_backward(xs, ws, eps as f32, slice(&dy), &mut dx, &mut dw);
        let (x_shape, w_shape) = (x.layout().shape().clone(), w.layout().shape().clone());
        (f32_tensor(dx, x_shape), f32_tensor(dw, w_shape))
    }

    fn fused_swiglu(gate: FlexTensor, up: FlexTensor) -> FlexTensor {
        let (gate, up) = (row_view(gate), row_view(up));
        let shape = gate.layout().shape().clone();
        let mut y = vec![0.0f32; shape.num_elements()];
        moeru_kernels::swiglu(rows(&gate), rows(&up), &mut y);
        f32_tensor(y, shape)
    }

    fn fused_swiglu_backward(
        gate: FlexTensor,
        up: FlexTensor,
        dy: FlexTensor,
    ) -> (FlexTensor, FlexTensor) {
        let (gate, up, dy) = (row_view(gate), row_view(up), dense(dy));
        let shape = gate.layout().shape().clone();
        let (mut dg, mut du) = (
            vec![0.0f32; shape.num_elements()],
            vec![0.0f32; shape.num_elements()],
        );
        moeru_kernels::swiglu_backward(rows(&gate), rows(&up), slice(&dy), &mut dg, &mut du);
        (f32_tensor(dg, shape.clone()), f32_tensor(du, shape))
    }
}

#[cfg(feature = "cuda")]
impl FusedOps for Cube {}

fn check_f32(t: &FlexTensor) {
    assert_eq!(
        t.dtype(),
        DType::F32,
        "fused ops take f32 tensors (bf16 keeps the plain expressions)"
    );
}

/// `t` contiguous and f32.
fn dense(t: FlexTensor) -> FlexTensor {
    check_f32(&t);
    flex_buffers::dense(t)
}

/// `t [rows, d]` as row views without a copy when its rows are unit-stride (e.g. a column
/// range of a wider matrix), else copied dense.
fn row_view(t: FlexTensor) -> FlexTensor {
    check_f32(&t);
    match t.layout().as_2d_strides() {
        Some((_, _, rs, 1)) if rs >= 0 => t,
        _ => t.to_contiguous(),
    }
}

fn rows(t: &FlexTensor) -> Rows<'_> {
    let (rows, width, stride, _) = t.layout().as_2d_strides().expect("a 2-d tensor");
    Rows {
        data: t.storage::<f32>(),
        offset: t.layout().start_offset(),
        stride: stride as usize,
        width,
        rows,
    }
}

#[derive(Debug)]
struct ExpSumBackward;

impl<B: Backend + FusedOps> Backward<B, 1> for ExpSumBackward {
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (x, max) = ops.state;
        let g = grads.consume::<B>(&ops.node);
        let [parent] = ops.parents;
        if let Some(node) = parent {
            grads.register::<B>(node.id, B::fused_exp_sum_rows_backward(x, max, g));
        }
    }
}

#[derive(Debug)]
struct RmsNormBackward;

impl<B: Backend + FusedOps> Backward<B, 2> for RmsNormBackward {
    type State = (FloatTensor<B>, FloatTensor<B>, f64);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (x, w, eps) = ops.state;
        let dy = grads.consume::<B>(&ops.node);
        let (dx, dw) = B::fused_rms_norm_backward(x, w, dy, eps);
        let parents = ops.parents.map(|p| p.map(|node| node.id));
        register_input_grads::<B, _>(parents, [dx, dw], grads);
    }
}

#[derive(Debug)]
struct SwigluBackward;

impl<B: Backend + FusedOps> Backward<B, 2> for SwigluBackward {
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (gate, up) = ops.state;
        let dy = grads.consume::<B>(&ops.node);
        let (dg, du) = B::fused_swiglu_backward(gate, up, dy);
        let parents = ops.parents.map(|p| p.map(|node| node.id));
        register_input_grads::<B, _>(parents, [dg, du], grads);
    }
}

impl<B: Backend + FusedOps, C: CheckpointStrategy> FusedOps for Autodiff<B, C> {
    fn fused_exp_sum_rows(x: FloatTensor<Self>, max: FloatTensor<Self>) -> FloatTensor<Self> {
        // `max` is a constant of the op: the log-sum-exp's max is detached.
        let nodes = [x.node()];
        let (x, max) = (x.into_primitive(), max.into_primitive());
        match ExpSumBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let state = (x.clone(), max.clone());
                prep.finish(state, B::fused_exp_sum_rows(x, max))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fused_exp_sum_rows(x, max)),
        }
    }

    fn fused_rms_norm(x: FloatTensor<Self>, w: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        let nodes = [x.node(), w.node()];
        let [x, w] = [x, w].map(|t| t.into_primitive());
        match RmsNormBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let state = (x.clone(), w.clone(), eps);
                prep.finish(state, B::fused_rms_norm(x, w, eps))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fused_rms_norm(x, w, eps)),
        }
    }

    fn fused_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        let nodes = [gate.node(), up.node()];
        let [gate, up] = [gate, up].map(|t| t.into_primitive());
        match SwigluBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let state = (gate.clone(), up.clone());
                prep.finish(state, B::fused_swiglu(gate, up))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fused_swiglu(gate, up)),
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, Tensor};

    use crate::layers::{rms_norm, rms_norm_plain, swiglu, swiglu_plain};

    /// Values uniform in [−2, 2).
    fn values<const D: usize>(dims: [usize; D], seed: u64, device: &Device) -> Tensor<D> {
        crate::test_values::values(dims, seed, device) * 2.0
    }

    fn vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().try_to_vec::<f32>().unwrap()
    }

    fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            assert!(
                (a - b).abs() <= tol * b.abs().max(1.0),
                "{what}[{i}]: {a} vs {b}"
            );
        }
    }

    /// Output, dx and dw of RMSNorm over `[2, 5, 3, 16]` under a weighted sum.
    fn rms_run(fused: bool) -> [Vec<f32>; 3] {
        let device = Device::flex().autodiff();
        let x = values([2, 5, 3, 16], 1, &device).require_grad();
        let w = values([16], 2, &device).require_grad();
        let y = match fused {
            true => rms_norm(x.clone(), &w, 1e-6),
            false => rms_norm_plain(x.clone(), &w, 1e-6),
        };
        let grads = (y.clone() * values([2, 5, 3, 16], 3, &device))
            .sum()
            .backward();
        [
            vec(y),
            vec(x.grad(&grads).unwrap()),
            vec(w.grad(&grads).unwrap()),
        ]
    }

    #[test]
    fn rms_norm_matches_the_plain_expression_with_gradients() {
        let (got, want) = (rms_run(true), rms_run(false));
        for (i, name) in ["y", "dx", "dw"].iter().enumerate() {
            assert_close(&got[i], &want[i], 1e-5, name);
        }
    }

    /// Output and gradients of SwiGLU over two column ranges of one `[rows, 2·inter]`
    /// product (the experts' layout), through the product's gradient.
    fn swiglu_run(fused: bool) -> [Vec<f32>; 2] {
        let device = Device::flex().autodiff();
        let gate_up = values([23, 2 * 9], 4, &device).require_grad();
        let (g, u) = (
            gate_up.clone().narrow(1, 0, 9),
            gate_up.clone().narrow(1, 9, 9),
        );
        let y = match fused {
            true => swiglu(g, u),
            false => swiglu_plain(g, u),
        };
        let grads = (y.clone() * values([23, 9], 5, &device)).sum().backward();
        [vec(y), vec(gate_up.grad(&grads).unwrap())]
    }

    #[test]
    fn swiglu_matches_the_plain_expression_with_gradients_on_column_views() {
        let (got, want) = (swiglu_run(true), swiglu_run(false));
        assert_close(&got[0], &want[0], 1e-5, "y");
        assert_close(&got[1], &want[1], 1e-5, "d gate_up");
    }

    #[test]
    fn run_without_autodiff_and_on_3d_inputs() {
        let device = Device::flex();
        let (g, u) = (values([2, 4, 6], 6, &device), values([2, 4, 6], 7, &device));
        assert_close(
            &vec(swiglu(g.clone(), u.clone())),
            &vec(swiglu_plain(g, u)),
            1e-5,
            "y",
        );
        let (x, w) = (values([3, 8], 8, &device), values([8], 9, &device));
        let (a, b) = (rms_norm(x.clone(), &w, 1e-5), rms_norm_plain(x, &w, 1e-5));
        assert_close(&vec(a), &vec(b), 1e-5, "rms");
    }

    /// A log-sum-exp over rows built on [`super::exp_sum_rows`] against the plain one, with
    /// the gradient of the logits.
    fn lse_run(fused: bool) -> [Vec<f32>; 2] {
        let device = Device::flex().autodiff();
        let x = values([37, 50], 10, &device).require_grad();
        let max = x.clone().detach().max_dim(1).reshape([37]);
        let sums = match fused {
            true => super::exp_sum_rows(x.clone(), max.clone()),
            false => (x.clone() - max.clone().unsqueeze_dim::<2>(1))
                .exp()
                .sum_dim(1)
                .reshape([37]),
        };
        let lse = sums.log() + max;
        let grads = (lse.clone() * values([37], 11, &device)).sum().backward();
        [vec(lse), vec(x.grad(&grads).unwrap())]
    }

    #[test]
    fn exp_sum_rows_matches_the_plain_expression_with_gradients() {
        let (got, want) = (lse_run(true), lse_run(false));
        assert_close(&got[0], &want[0], 1e-6, "lse");
        assert_close(&got[1], &want[1], 1e-6, "dx");
    }
}
