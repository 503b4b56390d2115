//! One decoder layer: pre-norm attention and pre-norm MLP (dense SwiGLU or sparse MoE).

use burn::tensor::{Device, Tensor};

use crate::attention::{Attention, AttentionContext};
use crate::config::Qwen3Config;
use crate::layers::{rms_norm, swiglu};
use crate::lora::{lora_linear, LoraAdapter, LoraSlot};
use crate::moe::{MoeBlock, RouterStats};
use crate::params::{ParamSource, ParamVisitor, Params};
use crate::precision::f32;

/// A dense SwiGLU MLP with `[out, in]` projections.
#[derive(Debug, Clone)]
pub struct DenseMlp {
    prefix: String,
    gate_proj: Tensor<2>,
    up_proj: Tensor<2>,
    down_proj: Tensor<2>,
    /// LoRA adapters on gate, up, down.
    lora: [Option<LoraAdapter>; 3],
}

impl DenseMlp {
    pub fn new<S: ParamSource>(
        hidden: usize,
        inter: usize,
        prefix: &str,
        src: &mut S,
        device: &Device,
    ) -> Result<Self, S::Error> {
        Ok(Self {
            gate_proj: src.tensor(
                &format!("{prefix}.gate_proj.weight"),
                [inter, hidden],
                device,
            )?,
            up_proj: src.tensor(&format!("{prefix}.up_proj.weight"), [inter, hidden], device)?,
            down_proj: src.tensor(
                &format!("{prefix}.down_proj.weight"),
                [hidden, inter],
                device,
            )?,
            prefix: prefix.to_string(),
            lora: Default::default(),
        })
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let gate = lora_linear(x.clone(), &self.gate_proj, None, &self.lora[0]);
        let up = lora_linear(x, &self.up_proj, None, &self.lora[1]);
        lora_linear(swiglu(gate, up), &self.down_proj, None, &self.lora[2])
    }

    pub(crate) fn lora_slot(&mut self, param: &str) -> Option<LoraSlot<'_>> {
        let rest = param.strip_prefix(self.prefix.as_str())?;
        let names = [".gate_proj.weight", ".up_proj.weight", ".down_proj.weight"];
        let i = names.iter().position(|n| *n == rest)?;
        let w = [&self.gate_proj, &self.up_proj, &self.down_proj][i];
        Some(LoraSlot {
            dims: w.dims().to_vec(),
            adapter: &mut self.lora[i],
        })
    }

    pub(crate) fn merge_lora(&mut self) {
        let ws = [&mut self.gate_proj, &mut self.up_proj, &mut self.down_proj];
        for (w, lora) in ws.into_iter().zip(&mut self.lora) {
            if let Some(l) = lora.take() {
                *w = w.clone() + l.delta();
            }
        }
    }
}

impl Params for DenseMlp {
    fn visit_params<V: ParamVisitor>(&mut self, v: &mut V) {
        let p = &self.prefix;
        v.visit(&format!("{p}.gate_proj.weight"), &mut self.gate_proj);
        v.visit(&format!("{p}.up_proj.weight"), &mut self.up_proj);
        v.visit(&format!("{p}.down_proj.weight"), &mut self.down_proj);
    }
}

#[derive(Debug, Clone)]
pub enum Mlp {
    Dense(DenseMlp),
    Moe(MoeBlock),
}

#[derive(Debug, Clone)]
pub struct DecoderLayer {
    prefix: String,
    input_layernorm: Tensor<1>,
    self_attn: Attention,
    post_attention_layernorm: Tensor<1>,
    mlp: Mlp,
    eps: f64,
}

impl DecoderLayer {
    pub fn new<S: ParamSource>(
        c: &Qwen3Config,
        index: usize,
        src: &mut S,
        device: &Device,
    ) -> Result<Self, S::Error> {
        let prefix = format!("model.layers.{index}");
        let h = c.hidden_size;
        let input_layernorm =
            src.tensor(&format!("{prefix}.input_layernorm.weight"), [h], device)?;
        let self_attn = Attention::new(c, &format!("{prefix}.self_attn"), src, device)?;
        let post_attention_layernorm = src.tensor(
            &format!("{prefix}.post_attention_layernorm.weight"),
            [h],
            device,
        )?;
        let mlp_prefix = format!("{prefix}.mlp");
        let mlp = match &c.moe {
            Some(m) if c.is_moe_layer(index) => {
                Mlp::Moe(MoeBlock::new(c, m, &mlp_prefix, src, device)?)
            }
            _ => Mlp::Dense(DenseMlp::new(
                h,
                c.intermediate_size,
                &mlp_prefix,
                src,
                device,
            )?),
        };
        Ok(Self {
            prefix,
            input_layernorm,
            self_attn,
            post_attention_layernorm,
            mlp,
            eps: c.rms_norm_eps,
        })
    }

    /// `x [batch, seq, hidden]`; returns the new hidden states and, for MoE layers, router stats.
    pub fn forward(
        &self,
        x: Tensor<3>,
        ctx: &AttentionContext,
    ) -> (Tensor<3>, Option<RouterStats>) {
        let attn = self
            .self_attn
            .forward(rms_norm(x.clone(), &self.input_layernorm, self.eps), ctx);
        // The residual stream stays f32 (as under autocast, where f32 + bf16 is f32).
        let x = x + f32(attn);
        let normed = rms_norm(x.clone(), &self.post_attention_layernorm, self.eps);
        let p = ctx.precision;
        match &self.mlp {
            Mlp::Dense(mlp) => (x + f32(mlp.forward(p.mm(normed))), None),
            Mlp::Moe(moe) => {
                let [b, s, h] = normed.dims();
                let (y, stats) = moe.forward(normed.reshape([b * s, h]), p);
                (x + y.reshape([b, s, h]), Some(stats))
            }
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub(crate) fn lora_slot(&mut self, param: &str) -> Option<LoraSlot<'_>> {
        if param.starts_with(&format!("{}.self_attn.", self.prefix)) {
            return self.self_attn.lora_slot(param);
        }
        match &mut self.mlp {
            Mlp::Dense(m) => m.lora_slot(param),
            Mlp::Moe(m) => m.lora_slot(param),
        }
    }

    /// Every adapter of the layer, in a fixed order (attention q, k, v, o, then the MLP's).
    pub(crate) fn loras_mut(&mut self) -> Vec<&mut LoraAdapter> {
        let mut out: Vec<&mut LoraAdapter> = self.self_attn.loras_mut().collect();
        match &mut self.mlp {
            Mlp::Dense(m) => out.extend(m.lora.iter_mut().flatten()),
            Mlp::Moe(m) => out.extend(m.loras_mut()),
        }
        out
    }

    pub(crate) fn merge_lora(&mut self) {
        self.self_attn.merge_lora();
        match &mut self.mlp {
            Mlp::Dense(m) => m.merge_lora(),
            Mlp::Moe(m) => m.merge_lora(),
        }
    }
}

impl Params for DecoderLayer {
    fn visit_params<V: ParamVisitor>(&mut self, v: &mut V) {
        v.visit(
            &format!("{}.input_layernorm.weight", self.prefix),
            &mut self.input_layernorm,
        );
        self.self_attn.visit_params(v);
        v.visit(
            &format!("{}.post_attention_layernorm.weight", self.prefix),
            &mut self.post_attention_layernorm,
        );
        match &mut self.mlp {
            Mlp::Dense(m) => m.visit_params(v),
            Mlp::Moe(m) => m.visit_params(v),
        }
    }
}
