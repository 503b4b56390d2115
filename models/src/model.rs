//! Qwen3ForCausalLM / Qwen3MoeForCausalLM: embeddings, decoder layers, final norm, LM head.

use burn::tensor::{Device, Int, Tensor};

use std::ops::Range;

use std::sync::Arc;

use crate::attention::AttentionContext;
use crate::batch::Batch;
use crate::boundaries::{Boundaries, Local};
use crate::config::Qwen3Config;
use crate::decoder::DecoderLayer;
use crate::forward_ctx::ForwardCtx;
use crate::kv_cache::KvCache;
use crate::layers::{linear, rms_norm};
use crate::lora::LoraConfig;
use crate::loss::{next_token_targets, token_logprobs, token_loss_sum, VocabShard};
use crate::moe::{load_balancing_loss, router_z_loss, token_shards, RouterStats};
use crate::params::{ParamSource, ParamVisitor, Params};
use crate::precision::to_f32;
use crate::rope::{inverse_frequencies, rope_tables};
use crate::shard::{ModelShard, ShardedSource};

#[derive(Debug, Clone)]
pub struct Qwen3Model {
    pub config: Qwen3Config,
    /// Held by the part with layer 0, and by the part with the last layer when tied (its LM
    /// head); `None` on the other pipeline stages.
    embed_tokens: Option<Tensor<2>>,
    /// The decoder layers this part holds, in order of their global indices `layer_ids`.
    pub(crate) layers: Vec<DecoderLayer>,
    pub(crate) layer_ids: Vec<usize>,
    /// With the last layer only.
    norm: Option<Tensor<1>>,
    /// `None` when the LM head is tied to the embeddings or this part lacks the last layer.
    lm_head: Option<Tensor<2>>,
    pub(crate) inv_freq: Vec<f32>,
    /// Set once LoRA adapters are attached (see `lora_model.rs`); the base is then frozen.
    pub(crate) lora: Option<LoraConfig>,
    /// Where this rank's part meets the other ranks' ([`Local`] for the whole model).
    pub(crate) boundaries: Arc<dyn Boundaries>,
}

/// What a forward pass returns besides logits, which are computed on demand.
#[derive(Debug, Clone)]
pub struct ForwardOutput {
    /// Final-norm hidden states `[batch, seq, hidden]`.
    pub hidden: Tensor<3>,
    /// transformers' load-balancing loss (unscaled), for MoE models.
    pub aux_loss: Option<Tensor<1>>,
    /// Router z-loss (unscaled), for MoE models.
    pub z_loss: Option<Tensor<1>>,
    /// Router statistics of each MoE layer, in layer order.
    pub router: Vec<(usize, RouterStats)>,
}

impl Qwen3Model {
    /// Builds the model, asking `src` for every parameter by its Hugging Face name.
    pub fn new<S: ParamSource>(
        config: Qwen3Config,
        src: &mut S,
        device: &Device,
    ) -> Result<Self, S::Error> {
        Self::new_sharded(config, src, Arc::new(Local), device)
    }

    /// This rank's part of the model under `boundaries.shard()`: `src` is asked for the
    /// parts the sharding plan gives this rank (`shard.rs`) of the layers
    /// `boundaries.layers` names, and `boundaries` joins them.
    pub fn new_sharded<S: ParamSource>(
        config: Qwen3Config,
        src: &mut S,
        boundaries: Arc<dyn Boundaries>,
        device: &Device,
    ) -> Result<Self, S::Error> {
        let layers = boundaries.layers(config.num_hidden_layers);
        Self::new_part(config, src, boundaries, &layers, device)
    }

    /// A pipeline stage's part of the model: the decoder layers of `ranges` (global indices,
    /// ascending), the embedding with layer 0 and the final norm and LM head with the last
    /// layer (a tied head: the embedding again). `src` is asked for nothing else.
    pub fn new_part<S: ParamSource>(
        config: Qwen3Config,
        src: &mut S,
        boundaries: Arc<dyn Boundaries>,
        ranges: &[Range<usize>],
        device: &Device,
    ) -> Result<Self, S::Error> {
        let mut src = ShardedSource {
            inner: src,
            shard: boundaries.shard(),
        };
        let src = &mut src;
        let (v, h) = (config.vocab_size, config.hidden_size);
        let layer_ids: Vec<usize> = ranges.iter().flat_map(|r| r.clone()).collect();
        let first = layer_ids.first() == Some(&0);
        let last = layer_ids.last() == Some(&(config.num_hidden_layers - 1));
        let embed_tokens = match first || (last && config.tie_word_embeddings) {
            true => Some(src.tensor("model.embed_tokens.weight", [v, h], device)?),
            false => None,
        };
        let layers = (layer_ids.iter())
            .map(|&i| DecoderLayer::new(&config, i, src, device))
            .collect::<Result<Vec<_>, _>>()?;
        let norm = match last {
            true => Some(src.tensor("model.norm.weight", [h], device)?),
            false => None,
        };
        let lm_head = match last && !config.tie_word_embeddings {
            true => Some(src.tensor("lm_head.weight", [v, h], device)?),
            false => None,
        };
        let inv_freq = inverse_frequencies(config.head_dim, config.rope_theta);
        Ok(Self {
            config,
            embed_tokens,
            layers,
            layer_ids,
            norm,
            lm_head,
            inv_freq,
            lora: None,
            boundaries,
        })
    }

    /// Where this rank sits in the model-parallel layout.
    pub fn shard(&self) -> ModelShard {
        self.boundaries.shard()
    }

    pub fn device(&self) -> Device {
        match (&self.embed_tokens, self.layers.first()) {
            (Some(e), _) => e.device(),
            (None, Some(l)) => l.device(),
            (None, None) => unreachable!("a model part holds a layer"),
        }
    }

    /// The global indices of the decoder layers this part holds (all of them unless the
    /// model is a pipeline stage's part).
    pub fn layer_ids(&self) -> &[usize] {
        &self.layer_ids
    }

    /// Whether this part holds every layer (not a pipeline stage's part).
    pub fn is_whole(&self) -> bool {
        self.layers.len() == self.config.num_hidden_layers
    }

    /// The held decoder layer of global index `i`.
    pub(crate) fn layer(&self, i: usize) -> &DecoderLayer {
        let at = (self.layer_ids.binary_search(&i))
            .unwrap_or_else(|_| panic!("layer {i} is not in this model part"));
        &self.layers[at]
    }

    /// Runs the decoder stack over `batch` with the matmul dtype, LoRA dropout and adapters
    /// of `ctx`. The hidden states returned are every position's, whatever the layout: they
    /// are what the LM head sees.
    pub fn forward(&self, batch: &Batch, ctx: &ForwardCtx) -> ForwardOutput {
        let [b, s] = batch.dims();
        let bias = Tensor::<3>::zeros([b, s, s], &self.device())
            .mask_fill(batch.attention_block_mask(), f32::NEG_INFINITY)
            .reshape([b, 1, 1, s, s]);
        let (x, router) = self.stack(&batch.input_ids, &batch.position_ids, bias, None, ctx);
        let bd = &*self.boundaries;
        let hidden = bd.column_in(x).reshape([b, s, self.config.hidden_size]);
        let stats: Vec<RouterStats> = router.iter().map(|(_, s)| s.clone()).collect();
        ForwardOutput {
            hidden,
            aux_loss: load_balancing_loss(&stats, bd),
            z_loss: router_z_loss(&stats, token_shards(bd)),
            router,
        }
    }

    /// Embedding, decoder layers and final norm over `ids [b, s]` at `positions` with the
    /// additive attention mask `bias [b, 1, 1, s, keys]`: this rank's rows of the normed
    /// hidden states and each MoE layer's router stats. With `cache` (generation) the keys
    /// are the cached positions followed by these.
    pub(crate) fn stack(
        &self,
        ids: &Tensor<2, Int>,
        positions: &Tensor<2, Int>,
        bias: Tensor<5>,
        cache: Option<&mut KvCache>,
        ctx: &ForwardCtx,
    ) -> (Tensor<2>, Vec<(usize, RouterStats)>) {
        let [b, s] = ids.dims();
        let x = self
            .boundaries
            .row_out(self.embed(ids.clone().reshape([b * s])));
        let (cos, sin) = rope_tables(positions, &self.inv_freq, &self.device());
        let attn = AttentionContext { cos, sin, bias };
        let layers = 0..self.layers.len();
        let (x, router) = self.run_layers(x, layers, &attn, cache, ctx);
        (self.final_norm(x), router)
    }

    /// Decoder layers `layers` (global indices) over the rows `x`, with their router stats.
    pub(crate) fn run_layers(
        &self,
        mut x: Tensor<2>,
        layers: Range<usize>,
        attn: &AttentionContext,
        mut cache: Option<&mut KvCache>,
        ctx: &ForwardCtx,
    ) -> (Tensor<2>, Vec<(usize, RouterStats)>) {
        let bd = &*self.boundaries;
        let mut router = Vec::new();
        for i in layers {
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let (next, stats) = self.layer(i).forward(x, attn, layer_cache, ctx, bd);
            x = next;
            if let Some(stats) = stats {
                router.push((i, stats));
            }
        }
        (x, router)
    }

    pub(crate) fn final_norm(&self, x: Tensor<2>) -> Tensor<2> {
        let norm = (self.norm.as_ref()).expect("the final norm is on the part with the last layer");
        rms_norm(x, norm, self.config.rms_norm_eps)
    }

    /// The embedding rows of `ids [rows]` that this rank's vocabulary shard holds, zero for
    /// the others (so the sum over shards, `row_out`, is exact: one term is nonzero).
    pub(crate) fn embed(&self, ids: Tensor<1, Int>) -> Tensor<2> {
        let embed =
            (self.embed_tokens.as_ref()).expect("the embedding is on the part with layer 0");
        let local = embed.dims()[0];
        if local == self.config.vocab_size {
            return embed.clone().select(0, ids);
        }
        let rows = ids.dims()[0];
        let shifted = ids.sub_scalar((self.shard().tp_rank * local) as i64);
        let elsewhere = shifted
            .clone()
            .lower_elem(0)
            .bool_or(shifted.clone().greater_equal_elem(local as i64));
        embed
            .clone()
            .select(0, shifted.clamp(0, local as i64 - 1))
            .mask_fill(elsewhere.reshape([rows, 1]), 0.0)
    }

    /// The vocabulary rows this rank's LM head holds.
    fn vocab(&self) -> VocabShard<'_> {
        VocabShard {
            start: self.shard().tp_rank * self.lm_head_weight().dims()[0],
            bd: &*self.boundaries,
        }
    }

    /// The LM head weight `[vocab, hidden]` (the embedding matrix when tied).
    pub fn lm_head_weight(&self) -> &Tensor<2> {
        (self.lm_head.as_ref().or(self.embed_tokens.as_ref()))
            .filter(|_| self.norm.is_some())
            .expect("the LM head is on the part with the last layer")
    }

    /// f32 logits `[batch, seq, vocab]` (this rank's vocabulary rows under tensor
    /// parallelism); training uses the chunked loss instead.
    pub fn logits(&self, hidden: Tensor<3>, ctx: &ForwardCtx) -> Tensor<3> {
        to_f32(linear(
            ctx.precision.mm(hidden),
            self.lm_head_weight(),
            None,
        ))
    }

    /// `log p(target)` per position `[batch, seq]` (f32, differentiable; see
    /// [`token_logprobs`]), with the LM head matmul in `ctx.precision`.
    pub fn token_logprobs(
        &self,
        hidden: Tensor<3>,
        targets: Tensor<2, Int>,
        ctx: &ForwardCtx,
    ) -> Tensor<2> {
        token_logprobs(
            ctx.precision.mm(hidden),
            self.lm_head_weight(),
            targets,
            self.vocab(),
        )
    }

    /// Σ of the next-token cross-entropy over the positions where `mask` is 1, i.e.
    /// `−Σ mask · token_logprobs` (see [`token_loss_sum`]), with the LM head matmul in
    /// `ctx.precision`.
    pub fn token_loss_sum(
        &self,
        hidden: Tensor<3>,
        targets: Tensor<2, Int>,
        mask: Tensor<2>,
        ctx: &ForwardCtx,
    ) -> Tensor<1> {
        token_loss_sum(
            ctx.precision.mm(hidden),
            self.lm_head_weight(),
            targets,
            mask,
            self.vocab(),
        )
    }

    /// Mean next-token cross-entropy with labels = input ids, as transformers returns for
    /// `labels=input_ids` (one document per row).
    pub fn lm_loss(&self, batch: &Batch, hidden: Tensor<3>, ctx: &ForwardCtx) -> Tensor<1> {
        let (targets, mask) = next_token_targets(&batch.input_ids);
        let count = mask.clone().sum();
        self.token_loss_sum(hidden, targets, mask, ctx) / count
    }
}

/// The base parameters only; adapters are walked by `trainable()` / `all_params()`.
impl Params for Qwen3Model {
    fn visit_params<V: ParamVisitor>(&mut self, v: &mut V) {
        if let Some(embed) = &mut self.embed_tokens {
            v.visit("model.embed_tokens.weight", embed);
        }
        for layer in &mut self.layers {
            layer.visit_params(v);
        }
        if let Some(norm) = &mut self.norm {
            v.visit("model.norm.weight", norm);
        }
        if let Some(head) = &mut self.lm_head {
            v.visit("lm_head.weight", head);
        }
    }
}
