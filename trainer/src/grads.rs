//! Gradients accumulated over micro-batches, flat per parameter, outside the autodiff graph.

use std::collections::BTreeMap;

use burn::tensor::{Gradients, Tensor};
use moeru_models::params::{to_f32_vec, ParamVisitor, Params};

/// Flat `[n]` gradient per parameter name.
#[derive(Default)]
pub struct GradBuffer {
    pub grads: BTreeMap<String, Tensor<1>>,
}

impl GradBuffer {
    /// Adds the gradients of one backward pass. A parameter the loss did not reach gets zeros.
    pub fn accumulate<M: Params>(&mut self, model: &mut M, grads: &Gradients) {
        struct Add<'a> {
            grads: &'a Gradients,
            into: &'a mut BTreeMap<String, Tensor<1>>,
        }
        impl ParamVisitor for Add<'_> {
            fn visit<const D: usize>(&mut self, name: &str, param: &mut Tensor<D>) {
                let n = param.shape().num_elements();
                let g = match param.grad(self.grads) {
                    Some(g) => g.reshape([n]),
                    None => Tensor::zeros([n], &param.clone().inner().device()),
                };
                let sum = match self.into.remove(name) {
                    Some(acc) => acc + g,
                    None => g,
                };
                self.into.insert(name.to_string(), sum);
            }
        }
        model.visit_params(&mut Add {
            grads,
            into: &mut self.grads,
        });
    }

    /// Global L2 norm, as `torch.nn.utils.clip_grad_norm_`: the norm of per-tensor norms.
    pub fn global_norm(&self) -> f64 {
        let norms: Vec<Tensor<1>> = self
            .grads
            .values()
            .map(|g| deterministic_sum(g.clone().square()).sqrt())
            .collect();
        if norms.is_empty() {
            return 0.0;
        }
        let total = Tensor::cat(norms, 0).square().sum().sqrt();
        to_f32_vec(total)[0] as f64
    }

    /// Scales every gradient by `min(1, max_norm / (norm + 1e-6))`, like torch; returns `norm`.
    pub fn clip(&mut self, max_norm: f64) -> f64 {
        let norm = self.global_norm();
        if max_norm > 0.0 {
            let coef = (max_norm / (norm + 1e-6)).min(1.0);
            for g in self.grads.values_mut() {
                *g = g.clone().mul_scalar(coef as f32);
            }
        }
        norm
    }
}

/// Elements summed per block: below burn-flex's parallel threshold for a full sum (4 Mi).
const SUM_BLOCK: usize = 1 << 16;

/// Σ of a flat tensor with a fixed summation order. burn-flex sums ≥ 4 Mi contiguous elements
/// with rayon's adaptive reduce, whose combining order may vary run to run; summing fixed
/// blocks first (zero-padded, which adds exact zeros) keeps CPU runs bit-reproducible.
fn deterministic_sum(x: Tensor<1>) -> Tensor<1> {
    let n = x.dims()[0];
    if n <= SUM_BLOCK {
        return x.sum();
    }
    let rows = n.div_ceil(SUM_BLOCK);
    let pad = rows * SUM_BLOCK - n;
    let x = if pad > 0 {
        let device = x.device();
        Tensor::cat(vec![x, Tensor::zeros([pad], &device)], 0)
    } else {
        x
    };
    x.reshape([rows, SUM_BLOCK])
        .sum_dim(1)
        .reshape([rows])
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    #[test]
    fn block_sum_equals_plain_sum_and_repeats_bitwise() {
        let device = Device::flex();
        let n = 5 * SUM_BLOCK + 123;
        let values: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 * 1e-3).collect();
        let exact: f64 = values.iter().map(|&v| v as f64).sum();
        let x = Tensor::<1>::from_data(TensorData::new(values, [n]), &device);
        let a = to_f32_vec(deterministic_sum(x.clone()))[0];
        let b = to_f32_vec(deterministic_sum(x))[0];
        assert_eq!(a.to_bits(), b.to_bits());
        assert!(((a as f64) - exact).abs() / exact < 1e-6, "{a} vs {exact}");
    }
}
