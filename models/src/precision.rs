//! Mixed precision as `torch.autocast` does it: matmuls run in the compute dtype (bf16 on a
//! GPU); norms, softmax, the router, the loss and the residual stream stay f32. Parameters and
//! optimizer state stay f32: the casts happen inside forward, so gradients arrive in f32.

use burn::tensor::{DType, FloatDType, Tensor};

/// The dtype matmuls run in (recipe key `precision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    /// bf16 matmul inputs and outputs; f32 everywhere else.
    Bf16,
}

impl Precision {
    pub fn matmul_dtype(self) -> FloatDType {
        match self {
            Precision::F32 => FloatDType::F32,
            Precision::Bf16 => FloatDType::BF16,
        }
    }

    /// `x` as a matmul input (a no-op in f32, so the f32 path is untouched).
    pub fn mm<const D: usize>(self, x: Tensor<D>) -> Tensor<D> {
        cast_to(x, self.matmul_dtype())
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }
}

/// `x` in `dtype`; no cast (and no autodiff node) when it already is.
pub fn cast_to<const D: usize>(x: Tensor<D>, dtype: FloatDType) -> Tensor<D> {
    if x.dtype() == DType::from(dtype) {
        x
    } else {
        x.cast(dtype)
    }
}

/// `x` rounded to the float dtype `dtype` (a no-op for f32 or a non-float dtype).
pub fn round_to<const D: usize>(x: Tensor<D>, dtype: DType) -> Tensor<D> {
    match dtype {
        DType::BF16 => cast_to(x, FloatDType::BF16),
        DType::F16 => cast_to(x, FloatDType::F16),
        _ => x,
    }
}

/// `x` in f32 (norms, softmax, residual adds, loss).
pub fn to_f32<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    cast_to(x, FloatDType::F32)
}

/// `x · s` computed in f32 and rounded once to the dtype of `x`, as torch multiplies a bf16
/// tensor by a Python float (burn would round `s` to bf16 first).
pub fn scale<const D: usize>(x: Tensor<D>, s: f64) -> Tensor<D> {
    let dtype = x.dtype();
    round_to(to_f32(x).mul_scalar(s), dtype)
}

/// `w` in the dtype of the activations `x` it multiplies.
pub fn like<const D: usize, const E: usize>(w: Tensor<E>, x: &Tensor<D>) -> Tensor<E> {
    match x.dtype() {
        DType::BF16 | DType::F16 => round_to(w, x.dtype()),
        _ => cast_to(w, FloatDType::F32),
    }
}
