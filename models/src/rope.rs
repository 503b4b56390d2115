//! Rotary position embedding as transformers applies it: rotate-half, explicit position ids.
//!
//! burn's `RotaryEncoding` rotates interleaved pairs and takes no position ids, so it cannot
//! reproduce Hugging Face checkpoints; this is the rotate-half form.

use burn::tensor::{Device, Int, Tensor};

/// Inverse frequencies `1 / theta^(2i/d)`, computed in f32 like transformers.
pub fn inverse_frequencies(head_dim: usize, theta: f64) -> Vec<f32> {
    let theta = theta as f32;
    (0..head_dim)
        .step_by(2)
        .map(|i| 1.0f32 / theta.powf(i as f32 / head_dim as f32))
        .collect()
}

/// `cos` and `sin` tables `[batch, seq, head_dim]` for the given position ids `[batch, seq]`.
pub fn rope_tables(
    position_ids: &Tensor<2, Int>,
    inv_freq: &[f32],
    device: &Device,
) -> (Tensor<3>, Tensor<3>) {
    let inv = Tensor::<1>::from_floats(inv_freq, device).unsqueeze::<3>();
    let freqs = position_ids.clone().float().unsqueeze_dim::<3>(2) * inv;
    let emb = Tensor::cat(vec![freqs.clone(), freqs], 2);
    (emb.clone().cos(), emb.sin())
}

/// Applies the rotation to `x [batch, heads, seq, head_dim]`.
pub fn apply_rope(x: Tensor<4>, cos: &Tensor<3>, sin: &Tensor<3>) -> Tensor<4> {
    let half = x.dims()[3] / 2;
    let x1 = x.clone().narrow(3, 0, half);
    let x2 = x.clone().narrow(3, half, half);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos.clone().unsqueeze_dim::<4>(1) + rotated * sin.clone().unsqueeze_dim::<4>(1)
}
