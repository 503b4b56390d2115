//! The sparse MoE block of Qwen3-MoE: f32 router softmax, top-k, optional renormalisation,
//! stacked experts, dropless.
//!
//! Routed tokens are laid out per expert in `[experts, capacity, hidden]` buffers, so experts
//! run as batched matmuls; routing.rs decides how experts are grouped into those buffers
//! (one over all experts while loads are even) and padding slots carry weight 0.

use burn::tensor::{activation::softmax, Device, IndexingUpdateOp, Int, Tensor, TensorData};

use crate::config::{MoeConfig, Qwen3Config};
use crate::layers::{logsumexp_rows, swiglu};
use crate::lora::{lora_linear, LoraAdapter, LoraSlot};
use crate::params::{ParamSource, ParamVisitor, Params};
use crate::precision::{f32, Precision};
use crate::routing::{ExpertGroup, RoutingPlan};

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
        let weights = weights.reshape([tokens * k]);
        // Cast once (to the dtype of the routed activations): every group gathers from these.
        let gate_up_proj = precision.mm(self.gate_up_proj.clone());
        let down_proj = precision.mm(self.down_proj.clone());
        let mut y = Tensor::<2>::zeros([tokens, hidden], &device);
        for group in &plan.groups {
            let slot_token = index(&group.slot_token, &device);
            let out = self.group_forward(
                group,
                &x,
                slot_token.clone(),
                &weights,
                [&gate_up_proj, &down_proj],
                precision,
            );
            y = y.select_assign(0, slot_token, out, IndexingUpdateOp::Add);
        }
        let stats = RouterStats {
            prob_sum: probs.sum_dim(0).reshape([experts]),
            z_sum,
            expert_counts: plan.counts,
            tokens,
            computed_rows: plan.computed_rows,
        };
        (y, stats)
    }
}

impl MoeBlock {
    /// The weighted expert outputs `[slots, hidden]` (f32) of one group's slots
    /// (`slot_token`: `group.slot_token` on the device).
    fn group_forward(
        &self,
        group: &ExpertGroup,
        x: &Tensor<2>,
        slot_token: Tensor<1, Int>,
        weights: &Tensor<1>,
        [gate_up_proj, down_proj]: [&Tensor<3>; 2],
        precision: Precision,
    ) -> Tensor<2> {
        let device = x.device();
        let hidden = x.dims()[1];
        let (cap, slots) = (group.capacity, group.slot_token.len());
        let n = slots / cap;
        let members = group.experts.as_ref().map(|e| index(e, &device));
        let pick = |w: &Tensor<3>| match &members {
            Some(ids) => w.clone().select(0, ids.clone()),
            None => w.clone(),
        };
        let valid =
            Tensor::<1>::from_data(TensorData::new(group.slot_valid.clone(), [slots]), &device);
        let slot_weight = weights
            .clone()
            .select(0, index(&group.slot_assignment, &device))
            * valid;
        let routed = precision.mm(x.clone().select(0, slot_token).reshape([n, cap, hidden]));
        let mut gate_up = routed.clone().matmul(pick(gate_up_proj).swap_dims(1, 2));
        if let Some(l) = &self.lora[1] {
            gate_up = gate_up + l.apply_experts(routed, members.clone());
        }
        let inter = gate_up.dims()[2] / 2;
        let act = swiglu(
            gate_up.clone().narrow(2, 0, inter),
            gate_up.narrow(2, inter, inter),
        );
        let mut out = act.clone().matmul(pick(down_proj).swap_dims(1, 2));
        if let Some(l) = &self.lora[2] {
            out = out + l.apply_experts(act, members);
        }
        f32(out).reshape([slots, hidden]) * slot_weight.unsqueeze_dim::<2>(1)
    }

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

fn index(v: &[i64], device: &burn::tensor::Device) -> Tensor<1, Int> {
    Tensor::<1, Int>::from_data(TensorData::new(v.to_vec(), [v.len()]), device)
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
