//! A model's forward in pieces, for pipeline stages and layer recompute: one stage's layer
//! range over received rows, single layers over saved inputs, and a MoE layer split before
//! its experts, each the same ops as [`Qwen3Model::forward`] runs, so that chaining the pieces
//! (and seeding each backward with the next piece's input gradient) is the whole model's
//! forward and backward bit for bit.
//!
//! Owns: where the pieces cut. Must not: communicate or keep state between calls.

use std::ops::Range;

use burn::tensor::Tensor;

use crate::attention::AttentionContext;
use crate::batch::Batch;
use crate::decoder::SplitLayer;
use crate::forward_ctx::ForwardCtx;
use crate::model::Qwen3Model;
use crate::moe::{
    assignment_counts, balancing_term, router_z_term, token_shards, Routed, RouterStats,
};
use crate::rope::rope_tables;

/// What every layer of one micro-batch's forward sees besides the rows: the RoPE tables and
/// the attention mask.
pub struct LayerInputs(AttentionContext);

impl Qwen3Model {
    /// The RoPE tables and attention mask of `batch` (on this model's device).
    pub fn layer_inputs(&self, batch: &Batch) -> LayerInputs {
        let [b, s] = batch.dims();
        let bias = Tensor::<3>::zeros([b, s, s], &self.device())
            .mask_fill(batch.attention_block_mask(), f32::NEG_INFINITY)
            .reshape([b, 1, 1, s, s]);
        let (cos, sin) = rope_tables(&batch.position_ids, &self.inv_freq, &self.device());
        LayerInputs(AttentionContext { cos, sin, bias })
    }

    /// The embedding rows `[batch·seq, hidden]` of `batch` (this rank's rows under sequence
    /// parallelism): the first stage's input.
    pub fn embed_rows(&self, batch: &Batch) -> Tensor<2> {
        let [b, s] = batch.dims();
        let ids = batch.input_ids.clone().reshape([b * s]);
        self.boundaries.row_out(self.embed(ids))
    }

    /// Decoder layer `i` (a global index this part holds) over the rows `x`.
    pub fn layer_forward(
        &self,
        i: usize,
        x: Tensor<2>,
        inputs: &LayerInputs,
        ctx: &ForwardCtx,
    ) -> (Tensor<2>, Option<RouterStats>) {
        self.layer(i)
            .forward(x, &inputs.0, None, ctx, &*self.boundaries)
    }

    /// Layer `i` stopped before a MoE layer's experts (see `DecoderLayer::forward_routed`).
    pub fn layer_forward_routed(
        &self,
        i: usize,
        x: Tensor<2>,
        inputs: &LayerInputs,
        ctx: &ForwardCtx,
    ) -> SplitLayer {
        self.layer(i)
            .forward_routed(x, &inputs.0, ctx, &*self.boundaries)
    }

    /// MoE layer `i`'s experts over `normed` as `routed` says: their weighted output and the
    /// rows computed.
    pub fn layer_experts(
        &self,
        i: usize,
        normed: &Tensor<2>,
        routed: &Routed,
        ctx: &ForwardCtx,
    ) -> (Tensor<2>, u64) {
        self.layer(i)
            .experts(normed, routed, ctx, &*self.boundaries)
    }

    /// The final norm over the last layer's rows, every position's rows (gathered under
    /// sequence parallelism), as the LM head sees them.
    pub fn final_rows(&self, x: Tensor<2>) -> Tensor<2> {
        self.boundaries.column_in(self.final_norm(x))
    }

    /// One pipeline stage's share of [`Qwen3Model::forward`] over `batch`: the embedding when
    /// `input` is `None` (the first stage), else the previous stage's output rows
    /// `[batch·seq, hidden]` (this rank's rows under sequence parallelism); then decoder layers
    /// `layers`; then, when `last`, [`Qwen3Model::final_rows`]. Returns this stage's output
    /// rows and its MoE layers' router stats. Chaining the stages over consecutive ranges is
    /// the whole forward, op for op.
    pub fn stage_forward(
        &self,
        batch: &Batch,
        input: Option<Tensor<2>>,
        layers: Range<usize>,
        last: bool,
        ctx: &ForwardCtx,
    ) -> (Tensor<2>, Vec<(usize, RouterStats)>) {
        let inputs = self.layer_inputs(batch);
        let x = input.unwrap_or_else(|| self.embed_rows(batch));
        let (x, router) = self.run_layers(x, layers, &inputs.0, None, ctx);
        match last {
            true => (self.final_rows(x), router),
            false => (x, router),
        }
    }

    /// A pipeline stage's assignments per expert over its MoE layers `stats` (the whole
    /// micro-batch's under sequence parallelism): summed along the pipeline, the forward's.
    pub fn stage_counts(&self, stats: &[RouterStats]) -> Option<Vec<u64>> {
        assignment_counts(stats, &*self.boundaries)
    }

    /// A pipeline stage's shares of the load-balancing and z losses over its MoE layers
    /// `stats`, given the whole forward's assignment `counts` (every MoE layer's): the
    /// stages' shares add up to the whole forward's losses, with the same gradients.
    pub fn stage_router_losses(
        &self,
        stats: &[RouterStats],
        counts: &[u64],
    ) -> (Option<Tensor<1>>, Option<Tensor<1>>) {
        let Some(first) = stats.first() else {
            return (None, None);
        };
        let c = &self.config;
        let moe_layers = (0..c.num_hidden_layers)
            .filter(|&i| c.is_moe_layer(i))
            .count();
        let rows = first.tokens * token_shards(&*self.boundaries) * moe_layers;
        (
            balancing_term(stats, counts, rows),
            router_z_term(stats, rows),
        )
    }
}
