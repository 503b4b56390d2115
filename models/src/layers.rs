//! The stateless building blocks: linear maps in the `[out, in]` layout, RMSNorm, SwiGLU.

use burn::tensor::{activation::silu, DType, Tensor};

use crate::fused::{rms_norm_rows, swiglu_rows};

use crate::precision::{like, round_to, to_f32};

/// `x · Wᵀ (+ b)` for `x [.., in]` and `w [out, in]` (transformers' `nn.Linear` layout),
/// computed in the dtype of `x` (the weights are cast to it; see `precision`).
pub fn linear<const D: usize>(x: Tensor<D>, w: &Tensor<2>, bias: Option<&Tensor<1>>) -> Tensor<D> {
    let dims = x.dims();
    let rows: usize = dims[..D - 1].iter().product();
    let [out, inp] = w.dims();
    let w = like(w.clone(), &x);
    let y = x.reshape([rows, inp]).matmul(w.transpose());
    let y = match bias {
        Some(b) => {
            let b = like(b.clone(), &y);
            y + b.unsqueeze::<2>()
        }
        None => y,
    };
    let mut shape = dims;
    shape[D - 1] = out;
    y.reshape(shape)
}

/// RMSNorm over the last dimension in f32: `w · x / sqrt(mean(x²) + eps)`, as Qwen3RMSNorm
/// (whose f32 weight times the normalised input is f32 under autocast too). f32 inputs run
/// the fused op (fused.rs); others the plain expression with transformers' roundings.
pub fn rms_norm<const D: usize>(x: Tensor<D>, w: &Tensor<1>, eps: f64) -> Tensor<D> {
    let input = x.dtype();
    if input == DType::F32 && w.dtype() == DType::F32 {
        let dims = x.dims();
        return from_rows(rms_norm_rows(to_rows(x), w.clone(), eps), dims);
    }
    rms_norm_plain(x, w, eps)
}

/// The RMSNorm expression, op by op (the fused op's reference in its tests).
pub fn rms_norm_plain<const D: usize>(x: Tensor<D>, w: &Tensor<1>, eps: f64) -> Tensor<D> {
    let input = x.dtype();
    let x = to_f32(x);
    let variance = x.clone().square().mean_dim(D - 1);
    let x = x * variance.add_scalar(eps).sqrt().recip();
    // transformers rounds the normalised input back to the input dtype before the weight.
    to_f32(round_to(x, input)) * w.clone().unsqueeze::<D>()
}

/// `silu(gate) ⊙ up`, the SwiGLU activation, given the gate and up projections already
/// computed (the down projection is the caller's). f32 runs the fused op.
pub fn swiglu<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    if gate.dtype() == DType::F32 && up.dtype() == DType::F32 {
        let dims = gate.dims();
        return from_rows(swiglu_rows(to_rows(gate), to_rows(up)), dims);
    }
    swiglu_plain(gate, up)
}

/// `x` as `[rows, last dim]`; a 2-d tensor as it is (a reshape would copy a column view).
fn to_rows<const D: usize>(x: Tensor<D>) -> Tensor<2> {
    let dims = x.dims();
    match D {
        2 => Tensor::from_dispatch(x.into_dispatch()),
        _ => x.reshape([dims[..D - 1].iter().product::<usize>(), dims[D - 1]]),
    }
}

fn from_rows<const D: usize>(x: Tensor<2>, dims: [usize; D]) -> Tensor<D> {
    match D {
        2 => Tensor::from_dispatch(x.into_dispatch()),
        _ => x.reshape(dims),
    }
}

/// The SwiGLU expression, op by op.
pub fn swiglu_plain<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    // silu in f32, rounded once to the input dtype (as torch does for bf16 inputs).
    let dtype = gate.dtype();
    round_to(silu(to_f32(gate)), dtype) * up
}

/// `log Σ_j exp(x_ij)` per row of `x [rows, cols]`, stabilised by the (detached) row max.
pub fn logsumexp_rows(x: Tensor<2>) -> Tensor<1> {
    let rows = x.dims()[0];
    let max = x.clone().detach().max_dim(1);
    ((x - max.clone()).exp().sum_dim(1).log() + max).reshape([rows])
}
