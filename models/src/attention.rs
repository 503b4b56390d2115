//! Grouped-query self-attention with QK-norm, as Qwen3Attention.

use burn::tensor::{Device, Tensor};

use crate::attention_core::{block_positions, causal_attention};
use crate::boundaries::Boundaries;
use crate::config::Qwen3Config;
use crate::forward_ctx::ForwardCtx;
use crate::kv_cache::LayerKv;
use crate::layers::rms_norm;
use crate::linear::Linear;
use crate::lora::{LoraAdapter, LoraSlot};
use crate::params::{ParamSource, ParamVisitor, Params};
use crate::rope::apply_rope;

#[derive(Debug, Clone)]
pub struct Attention {
    prefix: String,
    /// Biased when `attention_bias` is set.
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: Tensor<1>,
    k_norm: Tensor<1>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f64,
}

/// Per-forward inputs shared by all layers, derived from the batch.
pub struct AttentionContext {
    pub cos: Tensor<3>,
    pub sin: Tensor<3>,
    /// Additive mask `[batch, 1, 1, seq, seq]`: 0 where allowed, -inf where blocked (every row
    /// keeps its own position, so no row is all -inf; exp(-inf) = 0 skips libm's underflow path).
    pub bias: Tensor<5>,
}

impl Attention {
    /// Head counts are read off the projections it is given: under tensor parallelism the
    /// sharded source hands q/k/v this rank's heads and o_proj their columns.
    pub fn new<S: ParamSource>(
        c: &Qwen3Config,
        prefix: &str,
        src: &mut S,
        device: &Device,
    ) -> Result<Self, S::Error> {
        let (h, hd) = (c.hidden_size, c.head_dim);
        let (q, kv) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
        let p = |n: &str| format!("{prefix}.{n}");
        let mut proj =
            |n: &str, out, inp| Linear::load(src, &p(n), out, inp, c.attention_bias, device);
        let q_proj = proj("q_proj", q, h)?;
        let k_proj = proj("k_proj", kv, h)?;
        Ok(Self {
            heads: q_proj.weight().dims()[0] / hd,
            kv_heads: k_proj.weight().dims()[0] / hd,
            q_proj,
            k_proj,
            v_proj: proj("v_proj", kv, h)?,
            o_proj: proj("o_proj", h, q)?,
            q_norm: src.tensor(&p("q_norm.weight"), [hd], device)?,
            k_norm: src.tensor(&p("k_norm.weight"), [hd], device)?,
            prefix: prefix.to_string(),
            head_dim: hd,
            eps: c.rms_norm_eps,
        })
    }

    /// `x [rows, hidden]` (this rank's rows of the residual stream, normed) → this rank's
    /// rows of the attention output `[rows, hidden]`, in the matmul dtype. The heads are this
    /// rank's: `bd.column_in` gives them every row, `bd.row_out` sums o_proj's partial sums.
    /// With `cache` (generation) the keys attended are the cached ones followed by these
    /// rows', which join the cache.
    pub fn forward(
        &self,
        x: Tensor<2>,
        attn: &AttentionContext,
        cache: Option<&mut LayerKv>,
        ctx: &ForwardCtx,
        bd: &dyn Boundaries,
    ) -> Tensor<2> {
        let [b, s, _] = attn.cos.dims();
        let (nh, nkv, hd) = (self.heads, self.kv_heads, self.head_dim);
        let p = ctx.precision;
        // Cast before the boundary: under sequence parallelism the gather moves bf16.
        let x = bd.column_in(p.mm(x));
        let hidden = x.dims()[1];
        let x = x.reshape([b, s, hidden]);
        let heads = |proj: &Linear, n: usize| proj.forward(x.clone(), ctx).reshape([b, s, n, hd]);
        // QK-norm normalises each head over head_dim before the rotation; normed while each
        // head's values are still contiguous rows, then moved to `[b, heads, s, hd]`.
        let q = rms_norm(heads(&self.q_proj, nh), &self.q_norm, self.eps).swap_dims(1, 2);
        let k = rms_norm(heads(&self.k_proj, nkv), &self.k_norm, self.eps).swap_dims(1, 2);
        let v = heads(&self.v_proj, nkv).swap_dims(1, 2);
        let q = apply_rope(q, &attn.cos, &attn.sin);
        let k = apply_rope(k, &attn.cos, &attn.sin);

        // Query heads g·rep..(g+1)·rep share kv head g; grouping them avoids repeating k and v.
        let q = p.mm(q).reshape([b, nkv, nh / nkv, s, hd]);
        let (k, v, bias) = (p.mm(k), p.mm(v), attn.bias.clone());
        let (scale, block) = ((hd as f64).powf(-0.5), block_positions(q.dims()));
        let out = match cache {
            Some(cache) => cache.attend(q, k, v, bias, scale),
            None => causal_attention(q, k, v, bias, scale, block),
        };
        let out = out
            .reshape([b, nh, s, hd])
            .swap_dims(1, 2)
            .reshape([b * s, nh * hd]);
        let partial = self.o_proj.project(out, ctx);
        self.o_proj.add_bias(bd.row_out(partial))
    }

    fn projections(&mut self) -> [&mut Linear; 4] {
        [
            &mut self.q_proj,
            &mut self.k_proj,
            &mut self.v_proj,
            &mut self.o_proj,
        ]
    }

    pub(crate) fn lora_slot(&mut self, param: &str) -> Option<LoraSlot<'_>> {
        self.projections()
            .into_iter()
            .find_map(|proj| proj.lora_slot(param))
    }

    /// The adapters of q, k, v, o, in that order.
    pub(crate) fn loras_mut(&mut self) -> impl Iterator<Item = &mut LoraAdapter> {
        self.projections()
            .into_iter()
            .filter_map(|proj| proj.adapter_mut())
    }

    /// W ← W + s·B·A for every adapter, which is then dropped.
    pub(crate) fn merge_lora(&mut self) {
        self.projections().into_iter().for_each(Linear::merge_lora);
    }
}

/// Weights q, k, v, o, then biases q, k, v, o, then the QK-norms: the order checkpoints and
/// the optimizer's flat layout were written in.
impl Params for Attention {
    fn visit_params<V: ParamVisitor>(&mut self, v: &mut V) {
        for proj in self.projections() {
            proj.visit_weight(v);
        }
        for proj in self.projections() {
            proj.visit_bias(v);
        }
        let p = &self.prefix;
        v.visit(&format!("{p}.q_norm.weight"), &mut self.q_norm);
        v.visit(&format!("{p}.k_norm.weight"), &mut self.k_norm);
    }
}
