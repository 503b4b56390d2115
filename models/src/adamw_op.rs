//! The arithmetic of one AdamW update of one flat piece, as a single op: on the CPU in f32 one
//! moeru-kernels pass over the values, gradient and both moments; elsewhere the tensor
//! expression (the trait's default body), op for op what the CPU loop computes, so the two
//! agree bit for bit. trainer/src/engine/optim.rs owns the optimizer, its moments and step
//! count; this lives here because moeru-models owns the backend-extension ops and their CUDA
//! gating.

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::tensor::FloatTensor;
#[cfg(feature = "cuda")]
use burn::backend::Cube;
use burn::backend::{backend_extension, Autodiff, Backend, Dispatch, Flex};
use burn::tensor::{DType, Tensor};
use burn_flex::FlexTensor;
use moeru_kernels::AdamWStep;

use crate::flex_buffers::{dense, f32_tensor, slice};

/// The step's scalars in f32: `[1 − lr·wd, 1 − β1, β2, 1 − β2, sqrt(1 − β2^t), eps,
/// lr / (1 − β1^t)]` (moeru_kernels::AdamWStep's fields in order).
pub type AdamWScalars = [f32; 7];

/// `(p, exp_avg, exp_avg_sq)` after one AdamW update of `p` by gradient `g`.
pub fn adamw_update(
    p: Tensor<1>,
    g: Tensor<1>,
    m: Tensor<1>,
    v: Tensor<1>,
    s: AdamWScalars,
) -> (Tensor<1>, Tensor<1>, Tensor<1>) {
    let [p, g, m, v] = [p, g, m, v].map(|t| t.into_dispatch());
    let (p, m, v) = <Dispatch as AdamWOps>::adamw_update(p, g, m, v, s.to_vec());
    (
        Tensor::from_dispatch(p),
        Tensor::from_dispatch(m),
        Tensor::from_dispatch(v),
    )
}

#[backend_extension(Flex, Cube: cfg(feature = "cuda"), Autodiff)]
pub trait AdamWOps: Backend {
    /// `s`: the seven [`AdamWScalars`].
    fn adamw_update(
        p: FloatTensor<Self>,
        g: FloatTensor<Self>,
        m: FloatTensor<Self>,
        v: FloatTensor<Self>,
        s: Vec<f32>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        adamw_expression::<Self>(p, g, m, v, &s)
    }
}

/// The update in tensor ops (torch's AdamW, op for op).
fn adamw_expression<B: Backend>(
    p: FloatTensor<B>,
    g: FloatTensor<B>,
    m: FloatTensor<B>,
    v: FloatTensor<B>,
    s: &[f32],
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let c = step(s);
    let mul = |t, k: f32| B::float_mul_scalar(t, (k as f64).into());
    let p = mul(p, c.keep);
    // exp_avg.lerp_(grad, 1 − β1)
    let m = B::float_add(
        m.clone(),
        mul(B::float_sub(g.clone(), m), c.one_minus_beta1),
    );
    // exp_avg_sq.mul_(β2).addcmul_(grad, grad, value = 1 − β2)
    let g2 = B::float_mul(g.clone(), g);
    let v = B::float_add(mul(v, c.beta2), mul(g2, c.one_minus_beta2));
    let denom = B::float_div_scalar(B::float_sqrt(v.clone()), (c.bias2_sqrt as f64).into());
    let denom = B::float_add_scalar(denom, (c.eps as f64).into());
    let p = B::float_sub(p, mul(B::float_div(m.clone(), denom), c.step_size));
    (p, m, v)
}

fn step(s: &[f32]) -> AdamWStep {
    let [keep, one_minus_beta1, beta2, one_minus_beta2, bias2_sqrt, eps, step_size] =
        <[f32; 7]>::try_from(s).expect("seven AdamW scalars");
    AdamWStep {
        keep,
        one_minus_beta1,
        beta2,
        one_minus_beta2,
        bias2_sqrt,
        eps,
        step_size,
    }
}

impl AdamWOps for Flex {
    fn adamw_update(
        p: FlexTensor,
        g: FlexTensor,
        m: FlexTensor,
        v: FlexTensor,
        s: Vec<f32>,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let ts = [&p, &g, &m, &v];
        if ts.iter().any(|t| t.dtype() != DType::F32) {
            return adamw_expression::<Self>(p, g, m, v, &s);
        }
        let shape = p.layout().shape().clone();
        let (p, g) = (dense(p), dense(g));
        let (mut m, mut v) = (owned(m), owned(v));
        let mut p_out = vec![0.0f32; shape.num_elements()];
        let (ms, vs) = (m.storage_mut::<f32>(), v.storage_mut::<f32>());
        moeru_kernels::adamw(&step(&s), slice(&p), slice(&g), ms, vs, &mut p_out);
        let p_out = f32_tensor(p_out, shape);
        (p_out, m, v)
    }
}

/// `t` as a buffer this op may overwrite: itself when no other handle holds it (the
/// optimizer hands over its moments; a checkpoint snapshot may still hold them, and burn
/// never changes a buffer two handles hold), else a copy.
fn owned(t: FlexTensor) -> FlexTensor {
    let whole = t.storage::<f32>().len() == t.layout().num_elements();
    match t.is_unique() && t.is_contiguous() && t.layout().start_offset() == 0 && whole {
        true => t,
        false => FlexTensor::from_data(t.into_data()),
    }
}

#[cfg(feature = "cuda")]
impl AdamWOps for Cube {}

/// The optimizer works outside the autodiff graph; an autodiff tensor gets the expression.
impl<B: Backend + AdamWOps, C: CheckpointStrategy> AdamWOps for Autodiff<B, C> {}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, Tensor};

    use super::*;

    fn values(n: usize, seed: u64, scale: f32, device: &Device) -> Tensor<1> {
        crate::test_values::values([n], seed, device) * scale
    }

    fn bits(t: Tensor<1>) -> Vec<u32> {
        let v = t.into_data().try_to_vec::<f32>().unwrap();
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// The CPU loop (flex) against the trait's default body, the tensor expression the other
    /// backends run (taken here by autodiff tensors), on the same inputs over more elements
    /// than one parallel chunk: equal bit for bit.
    #[test]
    fn the_cpu_loop_equals_the_tensor_expression_bit_for_bit() {
        let s = [0.99f32, 0.1, 0.999, 0.001, 0.0447, 1e-8, 3e-4];
        let run = |device: &Device| {
            let n = 40_000;
            let p = values(n, 1, 1.0, device);
            let g = values(n, 2, 0.1, device);
            let m = values(n, 3, 0.01, device);
            let v = values(n, 4, 0.001, device).abs();
            let (p, m, v) = adamw_update(p, g, m, v, s);
            [bits(p), bits(m), bits(v)]
        };
        let (fused, expression) = (run(&Device::flex()), run(&Device::flex().autodiff()));
        for (i, name) in ["p", "exp_avg", "exp_avg_sq"].iter().enumerate() {
            assert!(fused[i] == expression[i], "{name} differs");
        }
    }
}
