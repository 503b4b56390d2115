//! The stateless building blocks: linear maps in the `[out, in]` layout, RMSNorm, SwiGLU.

use burn::tensor::{activation::silu, Tensor};

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
/// (whose f32 weight times the normalised input is f32 under autocast too).
pub fn rms_norm<const D: usize>(x: Tensor<D>, w: &Tensor<1>, eps: f64) -> Tensor<D> {
    let input = x.dtype();
    let x = to_f32(x);
    let variance = x.clone().square().mean_dim(D - 1);
    let x = x * variance.add_scalar(eps).sqrt().recip();
    // transformers rounds the normalised input back to the input dtype before the weight.
    to_f32(round_to(x, input)) * w.clone().unsqueeze::<D>()
}

/// `silu(gate) ⊙ up`, the SwiGLU activation, given the gate and up projections already
/// computed (the down projection is the caller's).
pub fn swiglu<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
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
