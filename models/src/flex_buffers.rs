//! f32 buffers of the CPU backend (burn-flex) for moeru's own ops: inputs made contiguous only
//! when they are not, outputs built from typed vectors. (burn-flex's `FlexTensor::empty`
//! zero-fills a byte vector and copies it once more to realign it; these do neither.)

use burn::tensor::{Bytes, DType, Shape};
use burn_flex::{FlexTensor, Layout};

/// `t` contiguous (a copy only when it is not).
pub(crate) fn dense(t: FlexTensor) -> FlexTensor {
    match t.is_contiguous() {
        true => t,
        false => t.to_contiguous(),
    }
}

/// The values of a contiguous f32 tensor.
pub(crate) fn slice(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("a contiguous f32 tensor")
}

/// A contiguous f32 tensor of `shape` holding `values`.
pub(crate) fn f32_tensor(values: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::new(
        Bytes::from_elems(values),
        Layout::contiguous(shape),
        DType::F32,
    )
}
