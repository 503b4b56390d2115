//! The sparse MoE block of Qwen3-MoE: f32 router softmax, top-k, optional renormalisation,
//! stacked experts, dropless.
//!
//! Routed tokens are laid out per expert in a `[E, C, H]` buffer (C = the largest expert load),
//! so all experts run as one batched matmul; padding slots carry weight 0.

use burn::tensor::{activation::softmax, Device, IndexingUpdateOp, Int, Tensor, TensorData};

use crate::config::{MoeConfig, Qwen3Config};
use crate::layers::{logsumexp_rows, swiglu};
use crate::lora::{lora_linear, LoraAdapter, LoraSlot};
use crate::params::{ParamSource, ParamVisitor, Params};
use crate::precision::{f32, like, Precision};

#[derive(Debug, Clone)]
pub struct MoeBlock {
    prefix: String,
    /// Router `[E, H]`.
    gate: Tensor<2>,
    /// Fused gate and up projections `[E, 2·I, H]`.
    gate_up_proj: Tensor<3>,
    /// `[E, H, I]`.
    down_proj: Tensor<3>,
    top_k: usize,
    norm_topk_prob: bool,
    /// LoRA adapters on the router, gate_up_proj and down_proj.
    lora: [Option<LoraAdapter>; 3],
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
}

/// Where each routed (token, k) pair sits in the per-expert buffer.
struct RoutingPlan {
    capacity: usize,
    /// Source token of each slot (0 for padding).
    slot_token: Vec<i64>,
    /// Index into the flattened `[T·k]` routing weights (0 for padding).
    slot_assignment: Vec<i64>,
    /// 1 for a real slot, 0 for padding.
    slot_valid: Vec<f32>,
    counts: Vec<u64>,
}

impl RoutingPlan {
    fn new(expert_of: &[i64], top_k: usize, experts: usize) -> Self {
        let mut counts = vec![0u64; experts];
        for &e in expert_of {
            counts[e as usize] += 1;
        }
        let capacity = counts.iter().copied().max().unwrap_or(0).max(1) as usize;
        let slots = experts * capacity;
        let mut plan = Self {
            capacity,
            slot_token: vec![0; slots],
            slot_assignment: vec![0; slots],
            slot_valid: vec![0.0; slots],
            counts,
        };
        let mut fill = vec![0usize; experts];
        for (a, &e) in expert_of.iter().enumerate() {
            let e = e as usize;
            let slot = e * capacity + fill[e];
            fill[e] += 1;
            plan.slot_token[slot] = (a / top_k) as i64;
            plan.slot_assignment[slot] = a as i64;
            plan.slot_valid[slot] = 1.0;
        }
        plan
    }
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
            gate: src.tensor(&format!("{prefix}.gate.weight"), [e, h], device)?,
            gate_up_proj: src.tensor(
                &format!("{prefix}.experts.gate_up_proj"),
                [e, 2 * i, h],
                device,
            )?,
            down_proj: src.tensor(&format!("{prefix}.experts.down_proj"), [e, h, i], device)?,
            prefix: prefix.to_string(),
            top_k: m.num_experts_per_tok,
            norm_topk_prob: m.norm_topk_prob,
            lora: Default::default(),
        })
    }

    pub fn num_experts(&self) -> usize {
        self.gate.dims()[0]
    }

    /// `x [tokens, hidden]` (f32) → `[tokens, hidden]` (f32) and the router statistics. The
    /// router runs in f32; the experts' matmuls in `precision`.
    pub fn forward(&self, x: Tensor<2>, precision: Precision) -> (Tensor<2>, RouterStats) {
        let [tokens, hidden] = x.dims();
        let (experts, k) = (self.num_experts(), self.top_k);
        let device = x.device();
        let logits = lora_linear(x.clone(), &self.gate, None, &self.lora[0]);
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
        let cap = plan.capacity;
        let index =
            |v: Vec<i64>| Tensor::<1, Int>::from_data(TensorData::new(v, [experts * cap]), &device);
        let slot_token = index(plan.slot_token);
        let slot_weight = weights
            .reshape([tokens * k])
            .select(0, index(plan.slot_assignment))
            * Tensor::<1>::from_data(TensorData::new(plan.slot_valid, [experts * cap]), &device);

        let routed = precision.mm(x
            .select(0, slot_token.clone())
            .reshape([experts, cap, hidden]));
        let mut gate_up = routed
            .clone()
            .matmul(like(self.gate_up_proj.clone(), &routed).swap_dims(1, 2));
        if let Some(l) = &self.lora[1] {
            gate_up = gate_up + l.apply_experts(routed);
        }
        let inter = gate_up.dims()[2] / 2;
        let act = swiglu(
            gate_up.clone().narrow(2, 0, inter),
            gate_up.narrow(2, inter, inter),
        );
        let mut out = act
            .clone()
            .matmul(like(self.down_proj.clone(), &act).swap_dims(1, 2));
        if let Some(l) = &self.lora[2] {
            out = out + l.apply_experts(act);
        }
        let out = f32(out).reshape([experts * cap, hidden]) * slot_weight.unsqueeze_dim::<2>(1);
        let y = Tensor::<2>::zeros([tokens, hidden], &device).select_assign(
            0,
            slot_token,
            out,
            IndexingUpdateOp::Add,
        );
        let stats = RouterStats {
            prob_sum: probs.sum_dim(0).reshape([experts]),
            z_sum,
            expert_counts: plan.counts,
            tokens,
        };
        (y, stats)
    }
}

impl MoeBlock {
    pub(crate) fn lora_slot(&mut self, param: &str) -> Option<LoraSlot<'_>> {
        let rest = param.strip_prefix(self.prefix.as_str())?;
        let (i, dims) = match rest {
            ".gate.weight" => (0, self.gate.dims().to_vec()),
            ".experts.gate_up_proj" => (1, self.gate_up_proj.dims().to_vec()),
            ".experts.down_proj" => (2, self.down_proj.dims().to_vec()),
            _ => return None,
        };
        Some(LoraSlot {
            dims,
            adapter: &mut self.lora[i],
        })
    }

    pub(crate) fn loras_mut(&mut self) -> impl Iterator<Item = &mut LoraAdapter> {
        self.lora.iter_mut().flatten()
    }

    /// Router W ← W + s·B·A; experts W_e ← W_e + s·B_e·A_e. Adapters are dropped.
    pub(crate) fn merge_lora(&mut self) {
        if let Some(l) = self.lora[0].take() {
            self.gate = self.gate.clone() + l.delta();
        }
        if let Some(l) = self.lora[1].take() {
            self.gate_up_proj = self.gate_up_proj.clone() + l.delta_experts();
        }
        if let Some(l) = self.lora[2].take() {
            self.down_proj = self.down_proj.clone() + l.delta_experts();
        }
    }
}

impl Params for MoeBlock {
    fn visit_params<V: ParamVisitor>(&mut self, v: &mut V) {
        let p = &self.prefix;
        v.visit(&format!("{p}.gate.weight"), &mut self.gate);
        v.visit(&format!("{p}.experts.gate_up_proj"), &mut self.gate_up_proj);
        v.visit(&format!("{p}.experts.down_proj"), &mut self.down_proj);
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
