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
            .map(|g| g.clone().square().sum().sqrt())
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
