//! AdamW exactly as `torch.optim.AdamW` computes it (decoupled decay, bias correction),
//! with no weight decay on norms and biases.

use std::collections::BTreeMap;

use burn::tensor::Tensor;
use moeru_models::params::{ParamVisitor, Params};

use crate::grads::GradBuffer;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// First and second moments of one parameter, flat, outside the autodiff graph.
#[derive(Debug, Clone)]
pub struct Moments {
    pub exp_avg: Tensor<1>,
    pub exp_avg_sq: Tensor<1>,
}

#[derive(Debug, Clone)]
pub struct AdamW {
    pub config: AdamWConfig,
    /// Optimizer steps taken (torch's `state["step"]`).
    pub steps: u64,
    pub state: BTreeMap<String, Moments>,
}

/// Norms and biases are not decayed (the usual LLM practice; torch is told the same by groups).
pub fn decays(name: &str) -> bool {
    !(name.ends_with("norm.weight") || name.ends_with(".bias"))
}

impl AdamW {
    pub fn new(config: AdamWConfig) -> Self {
        Self {
            config,
            steps: 0,
            state: BTreeMap::new(),
        }
    }

    /// One update with learning rate `lr`; consumes the gradients.
    pub fn step<M: Params>(&mut self, model: &mut M, grads: &mut GradBuffer, lr: f64) {
        self.steps += 1;
        let mut update = Update {
            opt: self,
            grads,
            lr,
        };
        model.visit_params(&mut update);
    }
}

struct Update<'a> {
    opt: &'a mut AdamW,
    grads: &'a mut GradBuffer,
    lr: f64,
}

impl ParamVisitor for Update<'_> {
    fn visit<const D: usize>(&mut self, name: &str, param: &mut Tensor<D>) {
        let dims = param.dims();
        let n = param.shape().num_elements();
        let p = param.clone().inner().reshape([n]);
        let device = p.device();
        let g = self
            .grads
            .grads
            .remove(name)
            .unwrap_or_else(|| Tensor::zeros([n], &device));
        let moments = self
            .opt
            .state
            .entry(name.to_string())
            .or_insert_with(|| Moments {
                exp_avg: Tensor::zeros([n], &device),
                exp_avg_sq: Tensor::zeros([n], &device),
            });
        let decay = if decays(name) {
            self.opt.config.weight_decay
        } else {
            0.0
        };
        let (p, m) = adamw_update(
            &self.opt.config,
            self.opt.steps,
            self.lr,
            decay,
            p,
            g,
            moments,
        );
        *moments = m;
        *param = Tensor::from_inner(p.reshape(dims)).require_grad();
    }
}

/// One AdamW update of a flat run of elements (a whole parameter, or a piece of one under
/// ZeRO-1: the math is elementwise, so a piece updates exactly as it would in the whole).
/// `steps` counts this step. Returns the new values and moments.
pub fn adamw_update(
    c: &AdamWConfig,
    steps: u64,
    lr: f64,
    decay: f64,
    p: Tensor<1>,
    g: Tensor<1>,
    moments: &Moments,
) -> (Tensor<1>, Moments) {
    let p = p.mul_scalar((1.0 - lr * decay) as f32);
    // exp_avg.lerp_(grad, 1 - beta1)
    let m = moments.exp_avg.clone();
    let m = m.clone() + (g.clone() - m).mul_scalar((1.0 - c.beta1) as f32);
    // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    let v = moments.exp_avg_sq.clone().mul_scalar(c.beta2 as f32)
        + (g.clone() * g).mul_scalar((1.0 - c.beta2) as f32);
    let t = steps as i32;
    let bias1 = 1.0 - c.beta1.powi(t);
    let bias2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
    let step_size = lr / bias1;
    let denom = v
        .clone()
        .sqrt()
        .div_scalar(bias2_sqrt as f32)
        .add_scalar(c.eps as f32);
    let p = p - (m.clone() / denom).mul_scalar(step_size as f32);
    (
        p,
        Moments {
            exp_avg: m,
            exp_avg_sq: v,
        },
    )
}
