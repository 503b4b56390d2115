//! Grouped-query self-attention with QK-norm, as Qwen3Attention.

use burn::tensor::{Device, Tensor};

use crate::attention_core::{block_positions, causal_attention};
use crate::config::Qwen3Config;
use crate::layers::rms_norm;
use crate::lora::{lora_linear, LoraAdapter, LoraSlot};
use crate::params::{ParamSource, ParamVisitor, Params};
use crate::precision::Precision;
use crate::rope::apply_rope;

#[derive(Debug, Clone)]
pub struct Attention {
    prefix: String,
    q_proj: Tensor<2>,
    k_proj: Tensor<2>,
    v_proj: Tensor<2>,
    o_proj: Tensor<2>,
    /// q, k, v, o biases when `attention_bias` is set.
    biases: Option<[Tensor<1>; 4]>,
    q_norm: Tensor<1>,
    k_norm: Tensor<1>,
    /// LoRA adapters on q, k, v, o.
    lora: [Option<LoraAdapter>; 4],
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f64,
}

/// Per-forward inputs shared by all layers.
pub struct AttentionContext {
    pub cos: Tensor<3>,
    pub sin: Tensor<3>,
    /// Additive mask `[batch, 1, 1, seq, seq]`: 0 where allowed, -inf where blocked (every row
    /// keeps its own position, so no row is all -inf; exp(-inf) = 0 skips libm's underflow path).
    pub bias: Tensor<5>,
    /// The dtype matmuls run in.
    pub precision: Precision,
}

impl Attention {
    pub fn new<S: ParamSource>(
        c: &Qwen3Config,
        prefix: &str,
        src: &mut S,
        device: &Device,
    ) -> Result<Self, S::Error> {
        let (h, hd) = (c.hidden_size, c.head_dim);
        let (q, kv) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
        let p = |n: &str| format!("{prefix}.{n}");
        let biases = if c.attention_bias {
            Some([
                src.tensor(&p("q_proj.bias"), [q], device)?,
                src.tensor(&p("k_proj.bias"), [kv], device)?,
                src.tensor(&p("v_proj.bias"), [kv], device)?,
                src.tensor(&p("o_proj.bias"), [h], device)?,
            ])
        } else {
            None
        };
        Ok(Self {
            q_proj: src.tensor(&p("q_proj.weight"), [q, h], device)?,
            k_proj: src.tensor(&p("k_proj.weight"), [kv, h], device)?,
            v_proj: src.tensor(&p("v_proj.weight"), [kv, h], device)?,
            o_proj: src.tensor(&p("o_proj.weight"), [h, q], device)?,
            biases,
            q_norm: src.tensor(&p("q_norm.weight"), [hd], device)?,
            k_norm: src.tensor(&p("k_norm.weight"), [hd], device)?,
            prefix: prefix.to_string(),
            lora: Default::default(),
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: hd,
            eps: c.rms_norm_eps,
        })
    }

    /// `x [batch, seq, hidden]` → `[batch, seq, hidden]`.
    pub fn forward(&self, x: Tensor<3>, ctx: &AttentionContext) -> Tensor<3> {
        let [b, s, _] = x.dims();
        let (nh, nkv, hd) = (self.heads, self.kv_heads, self.head_dim);
        let p = ctx.precision;
        let x = p.mm(x);
        let bias = |i: usize| self.biases.as_ref().map(|bs| &bs[i]);
        let heads = |w: &Tensor<2>, i: usize, n: usize| {
            lora_linear(x.clone(), w, bias(i), &self.lora[i])
                .reshape([b, s, n, hd])
                .swap_dims(1, 2)
        };
        // QK-norm normalises each head over head_dim before the rotation.
        let q = rms_norm(heads(&self.q_proj, 0, nh), &self.q_norm, self.eps);
        let k = rms_norm(heads(&self.k_proj, 1, nkv), &self.k_norm, self.eps);
        let v = heads(&self.v_proj, 2, nkv);
        let q = apply_rope(q, &ctx.cos, &ctx.sin);
        let k = apply_rope(k, &ctx.cos, &ctx.sin);

        // Query heads g·rep..(g+1)·rep share kv head g; grouping them avoids repeating k and v.
        let q = p.mm(q).reshape([b, nkv, nh / nkv, s, hd]);
        let block = block_positions(q.dims());
        let scale = (hd as f64).powf(-0.5);
        let out = causal_attention(q, p.mm(k), p.mm(v), ctx.bias.clone(), scale, block)
            .reshape([b, nh, s, hd])
            .swap_dims(1, 2)
            .reshape([b, s, nh * hd]);
        lora_linear(out, &self.o_proj, bias(3), &self.lora[3])
    }

    pub(crate) fn lora_slot(&mut self, param: &str) -> Option<LoraSlot<'_>> {
        let rest = param.strip_prefix(self.prefix.as_str())?;
        let names = [
            ".q_proj.weight",
            ".k_proj.weight",
            ".v_proj.weight",
            ".o_proj.weight",
        ];
        let i = names.iter().position(|n| *n == rest)?;
        let w = [&self.q_proj, &self.k_proj, &self.v_proj, &self.o_proj][i];
        Some(LoraSlot {
            dims: w.dims().to_vec(),
            adapter: &mut self.lora[i],
        })
    }

    pub(crate) fn loras_mut(&mut self) -> impl Iterator<Item = &mut LoraAdapter> {
        self.lora.iter_mut().flatten()
    }

    /// W ← W + s·B·A for every adapter, which is then dropped.
    pub(crate) fn merge_lora(&mut self) {
        let ws = [
            &mut self.q_proj,
            &mut self.k_proj,
            &mut self.v_proj,
            &mut self.o_proj,
        ];
        for (w, lora) in ws.into_iter().zip(&mut self.lora) {
            if let Some(l) = lora.take() {
                *w = w.clone() + l.delta();
            }
        }
    }
}

impl Params for Attention {
    fn visit_params<V: ParamVisitor>(&mut self, v: &mut V) {
        let p = &self.prefix;
        v.visit(&format!("{p}.q_proj.weight"), &mut self.q_proj);
        v.visit(&format!("{p}.k_proj.weight"), &mut self.k_proj);
        v.visit(&format!("{p}.v_proj.weight"), &mut self.v_proj);
        v.visit(&format!("{p}.o_proj.weight"), &mut self.o_proj);
        if let Some([qb, kb, vb, ob]) = &mut self.biases {
            v.visit(&format!("{p}.q_proj.bias"), qb);
            v.visit(&format!("{p}.k_proj.bias"), kb);
            v.visit(&format!("{p}.v_proj.bias"), vb);
            v.visit(&format!("{p}.o_proj.bias"), ob);
        }
        v.visit(&format!("{p}.q_norm.weight"), &mut self.q_norm);
        v.visit(&format!("{p}.k_norm.weight"), &mut self.k_norm);
    }
}
