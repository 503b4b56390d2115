//! The sparse MoE block of Qwen3-MoE: f32 router softmax, top-k, optional renormalisation,
//! then the stacked experts (experts.rs), dropless.

use burn::tensor::{activation::softmax, Device, Tensor, TensorData};

use crate::config::{MoeConfig, Qwen3Config};
use crate::experts::Experts;
use crate::forward_ctx::ForwardCtx;
use crate::layers::logsumexp_rows;
use crate::linear::Linear;
use crate::lora::{LoraAdapter, LoraSlot};
use crate::params::{ParamSource, ParamVisitor, Params};
use crate::routing::RoutingPlan;

#[derive(Debug, Clone)]
pub struct MoeBlock {
    /// The router `mlp.gate` `[E, H]`, no bias.
    gate: Linear,
    experts: Experts,
    top_k: usize,
    norm_topk_prob: bool,
}

/// What one MoE layer reports besides its output.
#[derive(Debug, Clone)]
pub struct RouterStats {
    /// Σ over tokens of the router probabilities, `[E]` (differentiable; feeds the aux loss).
    pub prob_sum: Tensor<1>,
    /// Σ over tokens of logsumexp(router logits)² (differentiable; feeds the z-loss).
    pub z_sum: Tensor<1>,
    /// Tokens routed to each expert (top-k assignments).
    pub expert_counts: Vec<u64>,
    /// Number of tokens routed.
    pub tokens: usize,
    /// Rows the expert matmuls computed, padding included (`tokens · top_k` without padding).
    pub computed_rows: u64,
}

impl MoeBlock {
    pub fn new<S: ParamSource>(
        c: &Qwen3Config,
        m: &MoeConfig,
        prefix: &str,
        src: &mut S,
        device: &Device,
    ) -> Result<Self, S::Error> {
        let (e, h, i) = (m.num_experts, c.hidden_size, m.moe_intermediate_size);
        Ok(Self {
            gate: Linear::load(src, &format!("{prefix}.gate"), e, h, false, device)?,
            experts: Experts::load(src, &format!("{prefix}.experts"), e, h, i, device)?,
            top_k: m.num_experts_per_tok,
            norm_topk_prob: m.norm_topk_prob,
        })
    }

    pub fn num_experts(&self) -> usize {
        self.gate.weight().dims()[0]
    }

    /// `x [tokens, hidden]` (f32) → `[tokens, hidden]` (f32) and the router statistics. The
    /// router runs in f32; the experts' matmuls in `ctx.precision`.
    pub fn forward(&self, x: Tensor<2>, ctx: &ForwardCtx) -> (Tensor<2>, RouterStats) {
        let tokens = x.dims()[0];
        let (experts, k) = (self.num_experts(), self.top_k);
        let logits = self.gate.forward(x.clone(), ctx);
        let z_sum = logsumexp_rows(logits.clone()).square().sum();
        let probs = softmax(logits, 1);

        // Expert choice is not differentiable; the chosen probabilities are, through gather.
        let (_, chosen) = probs.clone().detach().topk_with_indices(k, 1);
        let mut weights = probs.clone().gather(1, chosen.clone());
        if self.norm_topk_prob {
            weights = weights.clone() / weights.sum_dim(1);
        }
        let expert_of = chosen
            .into_data()
            .try_into_vec_as::<i64>()
            .expect("top-k indices are integers");
        let plan = RoutingPlan::new(&expert_of, k, experts);
        let weights = weights.reshape([tokens * k]);
        let y = self.experts.forward(&x, &plan, &weights, ctx);
        let stats = RouterStats {
            prob_sum: probs.sum_dim(0).reshape([experts]),
            z_sum,
            expert_counts: plan.counts,
            tokens,
            computed_rows: plan.computed_rows,
        };
        (y, stats)
    }

    pub(crate) fn lora_slot(&mut self, param: &str) -> Option<LoraSlot<'_>> {
        match self.gate.lora_slot(param) {
            Some(slot) => Some(slot),
            None => self.experts.lora_slot(param),
        }
    }

    /// The adapters of the router, gate_up_proj and down_proj, in that order.
    pub(crate) fn loras_mut(&mut self) -> impl Iterator<Item = &mut LoraAdapter> {
        self.gate
            .adapter_mut()
            .into_iter()
            .chain(self.experts.loras_mut())
    }

    /// Router W ← W + s·B·A; experts W_e ← W_e + s·B_e·A_e. Adapters are dropped.
    pub(crate) fn merge_lora(&mut self) {
        self.gate.merge_lora();
        self.experts.merge_lora();
    }
}

impl Params for MoeBlock {
    fn visit_params<V: ParamVisitor>(&mut self, v: &mut V) {
        self.gate.visit_params(v);
        self.experts.visit_params(v);
    }
}

/// Router z-loss (ST-MoE): mean over the rows of every MoE layer of logsumexp(logits)².
pub fn router_z_loss(stats: &[RouterStats]) -> Option<Tensor<1>> {
    let rows: usize = stats.iter().map(|s| s.tokens).sum();
    let total = stats.iter().map(|s| s.z_sum.clone()).reduce(|a, b| a + b)?;
    Some(total.div_scalar(rows as f32))
}

/// transformers' load-balancing loss over all MoE layers of one forward:
/// `E · Σ_e (assignments_e / rows) · (Σ probs_e / rows)`, rows counted over every layer.
pub fn load_balancing_loss(stats: &[RouterStats]) -> Option<Tensor<1>> {
    let first = stats.first()?;
    let experts = first.expert_counts.len();
    let rows: usize = stats.iter().map(|s| s.tokens).sum();
    let mut counts = vec![0f32; experts];
    for s in stats {
        for (c, &n) in counts.iter_mut().zip(&s.expert_counts) {
            *c += n as f32;
        }
    }
    let rows = rows as f32;
    let fraction: Vec<f32> = counts.iter().map(|c| c / rows).collect();
    let device = first.prob_sum.device();
    let prob_sum = stats
        .iter()
        .map(|s| s.prob_sum.clone())
        .reduce(|a, b| a + b)?;
    let fraction = Tensor::<1>::from_data(TensorData::new(fraction, [experts]), &device);
    Some(
        (fraction * prob_sum.div_scalar(rows))
            .sum()
            .mul_scalar(experts as f32),
    )
}
