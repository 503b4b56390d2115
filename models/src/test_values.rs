//! Deterministic test inputs: `dims`-shaped values uniform in [−1, 1) from a xorshift stream.

use burn::tensor::{Device, Tensor, TensorData};

pub(crate) fn values<const D: usize>(dims: [usize; D], seed: u64, device: &Device) -> Tensor<D> {
    let n = dims.iter().product::<usize>();
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect();
    Tensor::from_data(TensorData::new(v, dims), device)
}
