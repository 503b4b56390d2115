//! Qwen3ForCausalLM / Qwen3MoeForCausalLM: embeddings, decoder layers, final norm, LM head.

use burn::tensor::{Device, Int, Tensor};

use crate::attention::AttentionContext;
use crate::batch::Batch;
use crate::config::Qwen3Config;
use crate::decoder::DecoderLayer;
use crate::forward_ctx::ForwardCtx;
use crate::layers::{linear, rms_norm};
use crate::lora::LoraConfig;
use crate::loss::{next_token_targets, token_logprobs, token_loss_sum};
use crate::moe::{load_balancing_loss, router_z_loss, RouterStats};
use crate::params::{ParamSource, ParamVisitor, Params};
use crate::precision::to_f32;
use crate::rope::{inverse_frequencies, rope_tables};

#[derive(Debug, Clone)]
pub struct Qwen3Model {
    pub config: Qwen3Config,
    embed_tokens: Tensor<2>,
    pub(crate) layers: Vec<DecoderLayer>,
    norm: Tensor<1>,
    /// `None` when the LM head is tied to the embeddings.
    lm_head: Option<Tensor<2>>,
    inv_freq: Vec<f32>,
    /// Set once LoRA adapters are attached (see `lora_model.rs`); the base is then frozen.
    pub(crate) lora: Option<LoraConfig>,
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
        let (v, h) = (config.vocab_size, config.hidden_size);
        let embed_tokens = src.tensor("model.embed_tokens.weight", [v, h], device)?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| DecoderLayer::new(&config, i, src, device))
            .collect::<Result<Vec<_>, _>>()?;
        let norm = src.tensor("model.norm.weight", [h], device)?;
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(src.tensor("lm_head.weight", [v, h], device)?)
        };
        let inv_freq = inverse_frequencies(config.head_dim, config.rope_theta);
        Ok(Self {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            inv_freq,
            lora: None,
        })
    }

    pub fn device(&self) -> Device {
        self.embed_tokens.device()
    }

    /// Runs the decoder stack over `batch` with the matmul dtype, LoRA dropout and adapters
    /// of `ctx`.
    pub fn forward(&self, batch: &Batch, ctx: &ForwardCtx) -> ForwardOutput {
        let [b, s] = batch.dims();
        let device = self.device();
        let ids = batch.input_ids.clone().reshape([b * s]);
        let mut x =
            self.embed_tokens
                .clone()
                .select(0, ids)
                .reshape([b, s, self.config.hidden_size]);
        let (cos, sin) = rope_tables(&batch.position_ids, &self.inv_freq, &device);
        let bias = Tensor::<3>::zeros([b, s, s], &device)
            .mask_fill(batch.attention_block_mask(), f32::NEG_INFINITY)
            .reshape([b, 1, 1, s, s]);
        let attn = AttentionContext { cos, sin, bias };
        let mut router = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            let (next, stats) = layer.forward(x, &attn, ctx);
            x = next;
            if let Some(stats) = stats {
                router.push((i, stats));
            }
        }
        let hidden = rms_norm(x, &self.norm, self.config.rms_norm_eps);
        let stats: Vec<RouterStats> = router.iter().map(|(_, s)| s.clone()).collect();
        ForwardOutput {
            hidden,
            aux_loss: load_balancing_loss(&stats),
            z_loss: router_z_loss(&stats),
            router,
        }
    }

    /// The LM head weight `[vocab, hidden]` (the embedding matrix when tied).
    pub fn lm_head_weight(&self) -> &Tensor<2> {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// Full f32 logits `[batch, seq, vocab]`; training uses the chunked loss instead.
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
        token_logprobs(ctx.precision.mm(hidden), self.lm_head_weight(), targets)
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
        v.visit("model.embed_tokens.weight", &mut self.embed_tokens);
        for layer in &mut self.layers {
            layer.visit_params(v);
        }
        v.visit("model.norm.weight", &mut self.norm);
        if let Some(head) = &mut self.lm_head {
            v.visit("lm_head.weight", head);
        }
    }
}
