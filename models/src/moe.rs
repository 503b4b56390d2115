//! The sparse MoE block of Qwen3-MoE: f32 router softmax, top-k, optional renormalisation,
//! then the stacked experts (experts.rs), dropless.

use burn::tensor::{activation::softmax, Device, IndexingUpdateOp, Tensor, TensorData};

use crate::boundaries::Boundaries;

use crate::config::{MoeConfig, Qwen3Config};
use crate::experts::{index, Experts};
use crate::forward_ctx::ForwardCtx;
use crate::layers::logsumexp_rows;
use crate::linear::Linear;
use crate::lora::{LoraAdapter, LoraSlot};
use crate::params::{to_f32_vec, ParamSource, ParamVisitor, Params};
use crate::precision::to_f32;
use crate::route_replay::{replayed_ids, ReplayStats};
use crate::routing::RoutingPlan;

#[derive(Debug, Clone)]
pub struct MoeBlock {
    /// The router `mlp.gate` `[E, H]`, no bias.
    gate: Linear,
    experts: Experts,
    top_k: usize,
    norm_topk_prob: bool,
    /// Its decoder layer's index: the key of its recorded routes (`route_replay.rs`).
    layer: usize,
}

/// Marks the assignments over each expert's capacity ⌈`factor` · assignments / `experts`⌉
/// dropped (−1): per expert, those with the highest router weight stay (ties: earlier
/// assignment first), Megatron's "probs" drop policy.
fn drop_over_capacity(expert_of: &mut [i64], weights: &[f32], experts: usize, factor: f64) {
    let capacity = (factor * expert_of.len() as f64 / experts as f64).ceil() as usize;
    let mut by_expert: Vec<Vec<usize>> = vec![Vec::new(); experts];
    for (a, &e) in expert_of.iter().enumerate() {
        by_expert[e as usize].push(a);
    }
    for list in by_expert.iter_mut().filter(|l| l.len() > capacity) {
        list.sort_by(|&x, &y| weights[y].total_cmp(&weights[x]).then(x.cmp(&y)));
        for &a in &list[capacity..] {
            expert_of[a] = -1;
        }
    }
}

/// What the router decided for each token: its experts (`top_k` per token, token-major;
/// negative where a capacity dropped the assignment) and their weights `[tokens · top_k]`
/// (differentiable).
#[derive(Debug, Clone)]
pub struct Routed {
    pub weights: Tensor<1>,
    pub expert_of: Vec<i64>,
}

/// What one MoE layer reports besides its output.
#[derive(Debug, Clone)]
pub struct RouterStats {
    /// Σ over tokens of the router probabilities, `[E]` (differentiable; feeds the aux loss).
    pub prob_sum: Tensor<1>,
    /// Σ over tokens of logsumexp(router logits)² (differentiable; feeds the z-loss).
    pub z_sum: Tensor<1>,
    /// Tokens routed to each expert (top-k assignments, before any capacity drop).
    pub expert_counts: Vec<u64>,
    /// Each token's experts `[tokens · top_k]` (replayed ones under router replay), before
    /// any capacity drop: what a recording keeps.
    pub expert_ids: Vec<i64>,
    /// Under router replay, how the replayed routes compared with live routing.
    pub replay: Option<ReplayStats>,
    /// Number of tokens routed.
    pub tokens: usize,
    /// Rows the expert matmuls computed, padding included (`tokens · top_k` without padding).
    pub computed_rows: u64,
}

impl MoeBlock {
    pub fn new<S: ParamSource>(
        c: &Qwen3Config,
        m: &MoeConfig,
        layer: usize,
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
            layer,
        })
    }

    pub fn num_experts(&self) -> usize {
        self.gate.weight().dims()[0]
    }

    /// The least rows an expert with any is computed over (grouped_mm.rs `min_rows`).
    fn min_rows(&self) -> usize {
        self.experts.min_rows()
    }

    /// `x [tokens, hidden]` (f32, this rank's tokens) → `[tokens, hidden]` (f32) and the
    /// router statistics. The router runs in f32; the experts' matmuls in `ctx.precision`.
    /// Under expert parallelism this rank holds a contiguous range of the experts, and the
    /// routed rows travel to their experts' ranks and back through `bd` (see
    /// [`MoeBlock::dispatch`]).
    pub fn forward(
        &self,
        x: Tensor<2>,
        ctx: &ForwardCtx,
        bd: &dyn Boundaries,
    ) -> (Tensor<2>, RouterStats) {
        let (routed, mut stats) = self.route(x.clone(), ctx);
        let (y, computed_rows) = self.apply_experts(&x, &routed, ctx, bd);
        stats.computed_rows = computed_rows;
        (y, stats)
    }

    /// The router's half of [`MoeBlock::forward`]: each token's experts and weights, and the
    /// router statistics (`computed_rows` left 0 for [`MoeBlock::apply_experts`] to give).
    pub fn route(&self, x: Tensor<2>, ctx: &ForwardCtx) -> (Routed, RouterStats) {
        let tokens = x.dims()[0];
        let (experts, k) = (self.num_experts(), self.top_k);
        let logits = self.gate.forward(x, ctx);
        let z_sum = logsumexp_rows(logits.clone()).square().sum();
        // One graph node (× 1, exact) after the z-loss's use: the renormalised weights read
        // the logits too, and a tensor with two consumers sums its gradient terms in the same
        // bits whatever order a backward (whole model or pipeline stage) adds them in.
        let logits = logits.mul_scalar(1.0);
        let probs = softmax(logits.clone(), 1);

        // Expert choice is not differentiable; the chosen probabilities are, through gather.
        let (_, live) = probs.clone().detach().topk_with_indices(k, 1);
        let replay = (ctx.routes.as_ref()).and_then(|r| r.layer(self.layer));
        let (chosen, replay) = match replay {
            None => (live, None),
            Some(recorded) => {
                let live = live
                    .into_data()
                    .try_into_vec_as::<i64>()
                    .expect("integer ids");
                let (ids, stats) = replayed_ids(&live, recorded, k, experts);
                let data = TensorData::new(ids, [tokens, k]);
                (Tensor::from_data(data, &probs.device()), Some(stats))
            }
        };
        // Renormalised over the chosen experts, the weights are a softmax of their logits
        // alone: the same values as p / Σ p, but the LM loss then reaches only the chosen
        // experts' gate rows, exactly (the other rows' terms are not rounded to zero but
        // absent), which keeps replayed routes from leaking gradient to unchosen experts.
        let weights = match self.norm_topk_prob {
            true => softmax(logits.gather(1, chosen.clone()), 1),
            false => probs.clone().gather(1, chosen.clone()),
        };
        let mut expert_of = chosen
            .into_data()
            .try_into_vec_as::<i64>()
            .expect("top-k indices are integers");
        let expert_ids = expert_of.clone();
        let weights = weights.reshape([tokens * k]);
        // The load-balancing loss and the loads count the assignments before any drop.
        let mut expert_counts = vec![0u64; experts];
        for &e in &expert_of {
            expert_counts[e as usize] += 1;
        }
        if let Some(factor) = ctx.capacity_factor {
            let w = to_f32_vec(weights.clone());
            drop_over_capacity(&mut expert_of, &w, experts, factor);
        }
        let stats = RouterStats {
            prob_sum: probs.sum_dim(0).reshape([experts]),
            z_sum,
            expert_counts,
            expert_ids,
            replay,
            tokens,
            computed_rows: 0,
        };
        (Routed { weights, expert_of }, stats)
    }

    /// The experts' half of [`MoeBlock::forward`]: the routed rows of `x` through their
    /// experts (on this rank, or through the expert-parallel dispatch), weighted; returns the
    /// output and the rows the expert matmuls computed.
    pub fn apply_experts(
        &self,
        x: &Tensor<2>,
        routed: &Routed,
        ctx: &ForwardCtx,
        bd: &dyn Boundaries,
    ) -> (Tensor<2>, u64) {
        let (experts, k) = (self.num_experts(), self.top_k);
        // One graph node (× 1, exact) between the experts and their inputs: the experts'
        // many gradient terms of `x` and of the weights add up among themselves before they
        // meet the router's, in the same order whether the experts run in this graph or run
        // again in a backward of their own (`train.recompute: experts`).
        let x = &x.clone().mul_scalar(1.0);
        let weights = routed.weights.clone().mul_scalar(1.0);
        if bd.shard().ep == 1 {
            let plan = RoutingPlan::new(&routed.expert_of, k, experts, self.min_rows());
            let y = self.experts.forward(x, &plan, &weights, ctx);
            (y, plan.computed_rows)
        } else {
            self.dispatch(x, &routed.expert_of, weights, ctx, bd)
        }
    }

    /// Dropless expert-parallel dispatch (torchtitan's all-to-all token dispatcher): sort
    /// this rank's assignments by expert, exchange the counts, send each routed row to its
    /// expert's rank, run the local experts over what arrives (one grouped matmul per
    /// projection), send the outputs back, and weight them by the router probabilities here, on the
    /// token's own rank, so the router's gradient never crosses ranks. Dropped assignments
    /// (negative experts) are not sent. Returns the output and the rows its experts computed.
    fn dispatch(
        &self,
        x: &Tensor<2>,
        expert_of: &[i64],
        weights: Tensor<1>,
        ctx: &ForwardCtx,
        bd: &dyn Boundaries,
    ) -> (Tensor<2>, u64) {
        let [tokens, hidden] = x.dims();
        let device = x.device();
        let (experts, ep) = (self.num_experts(), bd.shard().ep);
        let local = experts / ep;
        // A stable sort keeps each expert's rows in token order, as the one-rank plan has them.
        let mut order: Vec<usize> = (0..expert_of.len())
            .filter(|&a| expert_of[a] >= 0)
            .collect();
        order.sort_by_key(|&a| expert_of[a]);
        let mut counts = vec![0u64; experts];
        for &a in &order {
            counts[expert_of[a] as usize] += 1;
        }
        let per_rank = |c: &[u64]| -> Vec<usize> {
            c.chunks(local)
                .map(|r| r.iter().sum::<u64>() as usize)
                .collect()
        };
        let received = bd.exchange_counts(&counts);
        let (send_rows, recv_rows) = (per_rank(&counts), per_rank(&received));
        let token_of = index(
            &order
                .iter()
                .map(|&a| (a / self.top_k) as i64)
                .collect::<Vec<_>>(),
            &device,
        );
        // The experts' input in their matmul dtype, so the exchange moves bf16 under bf16
        // (the experts would make the same cast after it, so their values do not change).
        let rows = bd.exchange_rows(
            ctx.precision.mm(x.clone().select(0, token_of.clone())),
            &send_rows,
            &recv_rows,
        );
        // Rows arrive by source rank, each source's rows sorted by (local) expert.
        let local_expert: Vec<i64> = received
            .chunks(local)
            .flat_map(|c| c.iter().enumerate())
            .flat_map(|(e, &n)| std::iter::repeat_n(e as i64, n as usize))
            .collect();
        let plan = RoutingPlan::new(&local_expert, 1, local, self.min_rows());
        let ones = Tensor::<1>::ones([local_expert.len()], &device);
        let mut out = self.experts.forward(&rows, &plan, &ones, ctx);
        if local_expert.is_empty() {
            // No rows for this rank's experts: keep the (empty) output on the graph, or
            // autodiff would skip both exchanges' backward, which the peers still run.
            // In the experts' output dtype (f32), which the peers' rows coming back have too.
            out = to_f32(rows).mul_scalar(0.0);
        }
        let back = bd.exchange_rows(out, &recv_rows, &send_rows);
        let order = index(
            &order.iter().map(|&a| a as i64).collect::<Vec<_>>(),
            &device,
        );
        let weighted = back * weights.select(0, order).unsqueeze_dim::<2>(1);
        let y = Tensor::<2>::zeros([tokens, hidden], &device).select_assign(
            0,
            token_of,
            weighted,
            IndexingUpdateOp::Add,
        );
        (y, plan.computed_rows)
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
/// With the micro-batch's tokens split over `token_shards` ranks (sequence parallelism) this
/// is the rank's share: the shares sum to the whole micro-batch's loss.
pub fn router_z_loss(stats: &[RouterStats], token_shards: usize) -> Option<Tensor<1>> {
    let rows: usize = stats.iter().map(|s| s.tokens).sum::<usize>() * token_shards;
    router_z_term(stats, rows)
}

/// `Σ z_sum / rows` over the layers of `stats`, `rows` counted over every MoE layer of the
/// forward: a pipeline stage's share of [`router_z_loss`] (the stages' shares add up to it).
pub fn router_z_term(stats: &[RouterStats], rows: usize) -> Option<Tensor<1>> {
    let total = stats.iter().map(|s| s.z_sum.clone()).reduce(|a, b| a + b)?;
    Some(total.div_scalar(rows as f32))
}

/// transformers' load-balancing loss over all MoE layers of one forward:
/// `E · Σ_e (assignments_e / rows) · (Σ probs_e / rows)`, rows counted over every layer.
/// Under sequence parallelism the assignments are the whole micro-batch's
/// (`bd.sum_token_counts`) and the probabilities this rank's, so the ranks' shares sum to the
/// one-rank loss and its gradient (Megatron's tp reduce of the router counts).
pub fn load_balancing_loss(stats: &[RouterStats], bd: &dyn Boundaries) -> Option<Tensor<1>> {
    let rows: usize = stats.iter().map(|s| s.tokens).sum::<usize>() * token_shards(bd);
    let counts = assignment_counts(stats, bd)?;
    balancing_term(stats, &counts, rows)
}

/// The assignments per expert over the layers of `stats`, the whole micro-batch's (summed
/// over the ranks sharing its tokens); `None` without MoE layers.
pub fn assignment_counts(stats: &[RouterStats], bd: &dyn Boundaries) -> Option<Vec<u64>> {
    let mut counts = vec![0u64; stats.first()?.expert_counts.len()];
    for s in stats {
        for (c, &n) in counts.iter_mut().zip(&s.expert_counts) {
            *c += n;
        }
    }
    bd.sum_token_counts(&mut counts);
    Some(counts)
}

/// The layers of `stats`' term of the load-balancing loss, `E · Σ_e (counts_e / rows) ·
/// (Σ_layers probs_e / rows)`, with `counts` and `rows` the whole forward's (every MoE layer):
/// a pipeline stage's share, the shares adding up to [`load_balancing_loss`] with the same
/// gradient for every layer's probabilities.
pub fn balancing_term(stats: &[RouterStats], counts: &[u64], rows: usize) -> Option<Tensor<1>> {
    let first = stats.first()?;
    let experts = counts.len();
    let rows = rows as f32;
    let fraction: Vec<f32> = counts.iter().map(|&c| c as f32 / rows).collect();
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

/// How many ranks split a micro-batch's tokens: tp under sequence parallelism, else 1.
pub fn token_shards(bd: &dyn Boundaries) -> usize {
    let shard = bd.shard();
    if shard.sequence_parallel() {
        shard.tp
    } else {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boundaries::Local;
    use crate::init::RandomInit;

    #[test]
    fn over_capacity_the_lowest_weights_drop() {
        // Capacity ⌈1.0 · 6 / 2⌉ = 3: expert 0 has four assignments and loses its weakest;
        // of two equal weights the later one drops.
        let mut expert_of = vec![0, 0, 0, 1, 0, 1];
        drop_over_capacity(&mut expert_of, &[0.1, 0.9, 0.5, 0.3, 0.5, 0.2], 2, 1.0);
        assert_eq!(expert_of, vec![-1, 0, 0, 1, 0, 1]);
        let mut tie = vec![0, 0, 0, 0];
        drop_over_capacity(&mut tie, &[0.5; 4], 2, 1.0);
        assert_eq!(tie, vec![0, 0, -1, -1]);
    }

    /// With a capacity, a token that lost none of its assignments gets exactly the dropless
    /// output, one that lost some does not, and fewer rows are computed.
    #[test]
    fn dropped_assignments_leave_the_other_tokens_alone() {
        let json = serde_json::json!({
            "model_type": "qwen3_moe", "vocab_size": 16, "hidden_size": 8, "intermediate_size": 8,
            "moe_intermediate_size": 4, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 1, "head_dim": 4, "num_experts": 4, "num_experts_per_tok": 2,
        });
        let serde_json::Value::Object(map) = json else {
            unreachable!()
        };
        let c = Qwen3Config::from_map(map, std::path::Path::new("test")).unwrap();
        let device = Device::flex();
        let mut init = RandomInit { seed: 5, std: 0.8 };
        let m = c.moe.clone().unwrap();
        let block = MoeBlock::new(&c, &m, 0, "mlp", &mut init, &device).unwrap();
        let tokens = 96;
        let x: Vec<f32> = (0..tokens * 8)
            .map(|i| ((i * 37 % 17) as f32 - 8.0) / 4.0)
            .collect();
        let x = Tensor::<2>::from_data(TensorData::new(x, [tokens, 8]), &device);
        let full_ctx = ForwardCtx::default();
        let drop_ctx = full_ctx.clone().with_capacity_factor(Some(0.75));
        let (full, full_stats) = block.forward(x.clone(), &full_ctx, &Local);
        let (dropped, stats) = block.forward(x.clone(), &drop_ctx, &Local);
        assert_eq!(
            stats.expert_counts, full_stats.expert_counts,
            "counts before the drop"
        );
        assert!(stats.computed_rows < full_stats.computed_rows);
        // Which tokens lost an assignment, by the same rule on the same weights.
        let logits = block.gate.forward(x, &full_ctx);
        let probs = softmax(logits, 1);
        let (top, chosen) = probs.topk_with_indices(2, 1);
        let top = to_f32_vec(top.clone() / top.sum_dim(1));
        let mut expert_of = chosen.into_data().try_into_vec_as::<i64>().unwrap();
        drop_over_capacity(&mut expert_of, &top, 4, 0.75);
        let (full, dropped) = (to_f32_vec(full), to_f32_vec(dropped));
        let mut lost = 0;
        for t in 0..tokens {
            let row = |v: &[f32]| v[t * 8..(t + 1) * 8].to_vec();
            let kept = expert_of[2 * t] >= 0 && expert_of[2 * t + 1] >= 0;
            let same = row(&full) == row(&dropped);
            assert_eq!(
                kept, same,
                "token {t}: kept {kept}, output unchanged {same}"
            );
            lost += usize::from(!kept);
        }
        assert!(lost > 0, "the capacity dropped something");
    }
}
