//! One decoder layer: pre-norm attention and pre-norm MLP (dense SwiGLU or sparse MoE).

use burn::tensor::{Device, Tensor};

use crate::attention::{Attention, AttentionContext};
use crate::boundaries::Boundaries;
use crate::config::Qwen3Config;
use crate::forward_ctx::ForwardCtx;
use crate::kv_cache::LayerKv;
use crate::layers::{rms_norm, swiglu};
use crate::linear::Linear;
use crate::lora::{LoraAdapter, LoraSlot};
use crate::moe::{MoeBlock, Routed, RouterStats};
use crate::params::{ParamSource, ParamVisitor, Params};
use crate::precision::to_f32;

/// A dense SwiGLU MLP: `down(silu(gate(x)) ⊙ up(x))`.
#[derive(Debug, Clone)]
pub struct DenseMlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl DenseMlp {
    pub fn new<S: ParamSource>(
        hidden: usize,
        inter: usize,
        prefix: &str,
        src: &mut S,
        device: &Device,
    ) -> Result<Self, S::Error> {
        let mut proj = |n: &str, out, inp| {
            Linear::load(src, &format!("{prefix}.{n}"), out, inp, false, device)
        };
        Ok(Self {
            gate_proj: proj("gate_proj", inter, hidden)?,
            up_proj: proj("up_proj", inter, hidden)?,
            down_proj: proj("down_proj", hidden, inter)?,
        })
    }

    /// `x [rows, hidden]` (this rank's rows, normed, f32) → `[rows, hidden]` in the matmul
    /// dtype. Under tensor parallelism gate/up hold this rank's intermediate columns and
    /// down_proj its rows: `bd.column_in` gives them every row, `bd.row_out` sums the partials.
    pub fn forward(&self, x: Tensor<2>, ctx: &ForwardCtx, bd: &dyn Boundaries) -> Tensor<2> {
        // Cast before the boundary: under sequence parallelism the gather moves bf16.
        let x = bd.column_in(ctx.precision.mm(x));
        let gate = self.gate_proj.forward(x.clone(), ctx);
        let up = self.up_proj.forward(x, ctx);
        let partial = self.down_proj.project(swiglu(gate, up), ctx);
        self.down_proj.add_bias(bd.row_out(partial))
    }

    fn projections(&mut self) -> [&mut Linear; 3] {
        [&mut self.gate_proj, &mut self.up_proj, &mut self.down_proj]
    }

    pub(crate) fn lora_slot(&mut self, param: &str) -> Option<LoraSlot<'_>> {
        self.projections()
            .into_iter()
            .find_map(|proj| proj.lora_slot(param))
    }

    /// The adapters of gate, up, down, in that order.
    pub(crate) fn loras_mut(&mut self) -> impl Iterator<Item = &mut LoraAdapter> {
        self.projections()
            .into_iter()
            .filter_map(|proj| proj.adapter_mut())
    }

    pub(crate) fn merge_lora(&mut self) {
        self.projections().into_iter().for_each(Linear::merge_lora);
    }
}

impl Params for DenseMlp {
    fn visit_params<V: ParamVisitor>(&mut self, v: &mut V) {
        for proj in self.projections() {
            proj.visit_params(v);
        }
    }
}

/// One per layer, built once: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Mlp {
    Dense(DenseMlp),
    Moe(MoeBlock),
}

/// A layer's forward split before a MoE layer's experts.
#[allow(clippy::large_enum_variant)]
pub enum SplitLayer {
    /// A dense layer's output.
    Dense(Tensor<2>),
    /// A MoE layer: the residual stream after attention, the experts' input, the routing and
    /// the router statistics (`computed_rows` 0 until the experts run).
    Moe {
        residual: Tensor<2>,
        normed: Tensor<2>,
        routed: Routed,
        stats: RouterStats,
    },
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
                Mlp::Moe(MoeBlock::new(c, m, index, &mlp_prefix, src, device)?)
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

    /// This rank's rows of the residual stream `x [rows, hidden]` (f32) → the new rows and,
    /// for MoE layers, router stats; `cache` as in [`Attention::forward`].
    pub fn device(&self) -> Device {
        self.input_layernorm.device()
    }

    pub fn forward(
        &self,
        x: Tensor<2>,
        attn: &AttentionContext,
        cache: Option<&mut LayerKv>,
        ctx: &ForwardCtx,
        bd: &dyn Boundaries,
    ) -> (Tensor<2>, Option<RouterStats>) {
        let normed = rms_norm(x.clone(), &self.input_layernorm, self.eps);
        let attn = self.self_attn.forward(normed, attn, cache, ctx, bd);
        // The residual stream stays f32 (as under autocast, where f32 + bf16 is f32).
        let x = x + to_f32(attn);
        let normed = self.post_attention_norm(&x);
        match &self.mlp {
            Mlp::Dense(mlp) => (x + to_f32(mlp.forward(normed, ctx, bd)), None),
            Mlp::Moe(moe) => {
                let (y, stats) = moe.forward(normed, ctx, bd);
                (x + y, Some(stats))
            }
        }
    }

    /// The MLP's input. Before a MoE block the residual stream passes one graph node (× 1,
    /// exact), so that its gradient has two terms (this norm's and the residual's), whose sum
    /// does not depend on the order the backward adds them in: the experts recomputed in a
    /// backward of their own (`train.recompute: experts`) then give the same bits.
    fn post_attention_norm(&self, x: &Tensor<2>) -> Tensor<2> {
        let x = match &self.mlp {
            Mlp::Moe(_) => x.clone().mul_scalar(1.0),
            Mlp::Dense(_) => x.clone(),
        };
        rms_norm(x, &self.post_attention_layernorm, self.eps)
    }

    /// [`DecoderLayer::forward`] stopped before a MoE layer's experts (a dense layer runs
    /// whole): what [`DecoderLayer::experts`] completes, `residual + experts(normed, routed)`.
    pub fn forward_routed(
        &self,
        x: Tensor<2>,
        attn: &AttentionContext,
        ctx: &ForwardCtx,
        bd: &dyn Boundaries,
    ) -> SplitLayer {
        let normed = rms_norm(x.clone(), &self.input_layernorm, self.eps);
        let attn = self.self_attn.forward(normed, attn, None, ctx, bd);
        let x = x + to_f32(attn);
        let normed = self.post_attention_norm(&x);
        match &self.mlp {
            Mlp::Dense(mlp) => SplitLayer::Dense(x + to_f32(mlp.forward(normed, ctx, bd))),
            Mlp::Moe(moe) => {
                let (routed, stats) = moe.route(normed.clone(), ctx);
                SplitLayer::Moe {
                    residual: x,
                    normed,
                    routed,
                    stats,
                }
            }
        }
    }

    /// A MoE layer's experts over `normed` as `routed` says (see
    /// [`DecoderLayer::forward_routed`]): their weighted output and the rows computed.
    pub fn experts(
        &self,
        normed: &Tensor<2>,
        routed: &Routed,
        ctx: &ForwardCtx,
        bd: &dyn Boundaries,
    ) -> (Tensor<2>, u64) {
        match &self.mlp {
            Mlp::Moe(moe) => moe.apply_experts(normed, routed, ctx, bd),
            Mlp::Dense(_) => unreachable!("{}: a dense layer has no experts", self.prefix),
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
            Mlp::Dense(m) => out.extend(m.loras_mut()),
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
