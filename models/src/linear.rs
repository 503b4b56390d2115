//! A projection in transformers' `nn.Linear` layout, with its optional bias and LoRA adapter.

use burn::tensor::{Device, Tensor};

use crate::forward_ctx::ForwardCtx;
use crate::layers::linear;
use crate::lora::{LoraAdapter, LoraSlot};
use crate::params::{ParamSource, ParamVisitor};
use crate::precision::like;

/// `y = x·Wᵀ (+ b) (+ s·(dropout(x)·Aᵀ)·Bᵀ)`, named by its module path
/// (`model.layers.0.self_attn.q_proj`): its parameters are `{name}.weight` `[out, in]` and
/// `{name}.bias` `[out]`, the adapter's site is `{name}.weight`.
#[derive(Debug, Clone)]
pub struct Linear {
    name: String,
    weight: Tensor<2>,
    bias: Option<Tensor<1>>,
    lora: Option<LoraAdapter>,
}

impl Linear {
    /// Asks `src` for `{name}.weight` `[out, inp]` and, with `bias`, `{name}.bias` `[out]`.
    pub fn load<S: ParamSource>(
        src: &mut S,
        name: &str,
        out: usize,
        inp: usize,
        bias: bool,
        device: &Device,
    ) -> Result<Self, S::Error> {
        let weight = src.tensor(&weight_name(name), [out, inp], device)?;
        let bias = match bias {
            true => Some(src.tensor(&bias_name(name), [out], device)?),
            false => None,
        };
        Ok(Self {
            name: name.to_string(),
            weight,
            bias,
            lora: None,
        })
    }

    /// The module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `[out, in]`.
    pub fn weight(&self) -> &Tensor<2> {
        &self.weight
    }

    /// The base projection plus the adapter's term, unless there is no adapter or `ctx` turns
    /// adapters off; the adapter's dropout mask comes from `ctx.dropout`. Computed in the
    /// dtype of `x` (the weights are cast to it): callers cast activations with
    /// `ctx.precision`, except the MoE router, which stays f32.
    ///
    /// # Shapes
    ///
    /// - x: `[..., in]`
    /// - output: `[..., out]`
    pub fn forward<const D: usize>(&self, x: Tensor<D>, ctx: &ForwardCtx) -> Tensor<D> {
        match &self.lora {
            Some(l) if ctx.adapters_on() => {
                linear(x.clone(), &self.weight, self.bias.as_ref()) + l.apply(x, ctx.dropout)
            }
            _ => linear(x, &self.weight, self.bias.as_ref()),
        }
    }

    /// `x·Wᵀ` plus the adapter's term, without the bias: a row-parallel projection's partial
    /// sum, whose bias is added once after the ranks' sum ([`Linear::add_bias`]).
    pub fn project<const D: usize>(&self, x: Tensor<D>, ctx: &ForwardCtx) -> Tensor<D> {
        match &self.lora {
            Some(l) if ctx.adapters_on() => {
                linear(x.clone(), &self.weight, None) + l.apply(x, ctx.dropout)
            }
            _ => linear(x, &self.weight, None),
        }
    }

    /// `y + b` in the dtype of `y` (nothing without a bias).
    pub fn add_bias<const D: usize>(&self, y: Tensor<D>) -> Tensor<D> {
        match &self.bias {
            Some(b) => {
                let b = like(b.clone(), &y);
                y + b.unsqueeze::<D>()
            }
            None => y,
        }
    }

    /// The weight, then the bias (see [`Linear::visit_weight`] for modules that visit all
    /// their weights before their biases).
    pub fn visit_params<V: ParamVisitor>(&mut self, v: &mut V) {
        self.visit_weight(v);
        self.visit_bias(v);
    }

    pub fn visit_weight<V: ParamVisitor>(&mut self, v: &mut V) {
        v.visit(&weight_name(&self.name), &mut self.weight);
    }

    /// Nothing without a bias.
    pub fn visit_bias<V: ParamVisitor>(&mut self, v: &mut V) {
        if let Some(b) = &mut self.bias {
            v.visit(&bias_name(&self.name), b);
        }
    }

    /// The adapter slot when `param` names this projection's weight.
    pub(crate) fn lora_slot(&mut self, param: &str) -> Option<LoraSlot<'_>> {
        let rest = param.strip_prefix(self.name.as_str())?;
        (rest == WEIGHT).then(|| LoraSlot {
            dims: self.weight.dims().to_vec(),
            adapter: &mut self.lora,
        })
    }

    pub fn adapter_mut(&mut self) -> Option<&mut LoraAdapter> {
        self.lora.as_mut()
    }

    /// W ← W + s·B·A, and the adapter is dropped.
    pub fn merge_lora(&mut self) {
        if let Some(l) = self.lora.take() {
            self.weight = self.weight.clone() + l.delta();
        }
    }
}

const WEIGHT: &str = ".weight";

fn weight_name(name: &str) -> String {
    format!("{name}{WEIGHT}")
}

fn bias_name(name: &str) -> String {
    format!("{name}.bias")
}
