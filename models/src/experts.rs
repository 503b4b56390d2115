//! The stacked experts of a Qwen3-MoE layer and their grouped forward over a [`RoutingPlan`].
//!
//! Routed tokens are laid out per expert in `[experts, capacity, hidden]` buffers, so experts
//! run as batched matmuls; routing.rs decides how experts are grouped into those buffers
//! (one over all experts while loads are even) and padding slots carry weight 0.

use burn::tensor::{Device, IndexingUpdateOp, Int, Tensor, TensorData};

use crate::forward_ctx::ForwardCtx;
use crate::layers::swiglu;
use crate::lora::{LoraAdapter, LoraSlot};
use crate::params::{ParamSource, ParamVisitor, Params};
use crate::precision::to_f32;
use crate::routing::{ExpertGroup, RoutingPlan};

/// `mlp.experts` as transformers 5 holds it: `gate_up_proj [E, 2·I, H]` (gate rows, then up
/// rows) and `down_proj [E, H, I]`, each with an optional LoRA adapter (peft's
/// `target_parameters`). All E experts live here; under expert parallelism this would hold a
/// local range of experts and the plan's slots would arrive through a dispatch.
#[derive(Debug, Clone)]
pub struct Experts {
    /// The module path, `model.layers.{i}.mlp.experts`.
    name: String,
    gate_up_proj: Tensor<3>,
    down_proj: Tensor<3>,
    gate_up_lora: Option<LoraAdapter>,
    down_lora: Option<LoraAdapter>,
}

impl Experts {
    /// Asks `src` for `{name}.gate_up_proj` `[experts, 2·inter, hidden]` and
    /// `{name}.down_proj` `[experts, hidden, inter]`.
    pub fn load<S: ParamSource>(
        src: &mut S,
        name: &str,
        experts: usize,
        hidden: usize,
        inter: usize,
        device: &Device,
    ) -> Result<Self, S::Error> {
        Ok(Self {
            gate_up_proj: src.tensor(&gate_up_name(name), [experts, 2 * inter, hidden], device)?,
            down_proj: src.tensor(&down_name(name), [experts, hidden, inter], device)?,
            name: name.to_string(),
            gate_up_lora: None,
            down_lora: None,
        })
    }

    /// The weighted sum over each token's experts: `x [tokens, hidden]` (f32), `plan` from the
    /// token's top-k choices, `weights [tokens · k]` (assignment-major, as the plan) →
    /// `[tokens, hidden]` (f32). The matmuls run in `ctx.precision`.
    pub fn forward(
        &self,
        x: &Tensor<2>,
        plan: &RoutingPlan,
        weights: &Tensor<1>,
        ctx: &ForwardCtx,
    ) -> Tensor<2> {
        let [tokens, hidden] = x.dims();
        let device = x.device();
        // Cast once (to the dtype of the routed activations): every group gathers from these.
        let gate_up_proj = ctx.precision.mm(self.gate_up_proj.clone());
        let down_proj = ctx.precision.mm(self.down_proj.clone());
        let mut y = Tensor::<2>::zeros([tokens, hidden], &device);
        for group in &plan.groups {
            let slot_token = index(&group.slot_token, &device);
            let out = self.group_forward(
                group,
                x,
                slot_token.clone(),
                weights,
                [&gate_up_proj, &down_proj],
                ctx,
            );
            y = y.select_assign(0, slot_token, out, IndexingUpdateOp::Add);
        }
        y
    }

    /// The weighted expert outputs `[slots, hidden]` (f32) of one group's slots
    /// (`slot_token`: `group.slot_token` on the device).
    fn group_forward(
        &self,
        group: &ExpertGroup,
        x: &Tensor<2>,
        slot_token: Tensor<1, Int>,
        weights: &Tensor<1>,
        [gate_up_proj, down_proj]: [&Tensor<3>; 2],
        ctx: &ForwardCtx,
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
        let routed = ctx
            .precision
            .mm(x.clone().select(0, slot_token).reshape([n, cap, hidden]));
        let mut gate_up = routed.clone().matmul(pick(gate_up_proj).swap_dims(1, 2));
        if let Some(l) = active(&self.gate_up_lora, ctx) {
            gate_up = gate_up + l.apply_experts(routed, members.clone());
        }
        let inter = gate_up.dims()[2] / 2;
        let act = swiglu(
            gate_up.clone().narrow(2, 0, inter),
            gate_up.narrow(2, inter, inter),
        );
        let mut out = act.clone().matmul(pick(down_proj).swap_dims(1, 2));
        if let Some(l) = active(&self.down_lora, ctx) {
            out = out + l.apply_experts(act, members);
        }
        to_f32(out).reshape([slots, hidden]) * slot_weight.unsqueeze_dim::<2>(1)
    }

    /// The adapter slot when `param` names `gate_up_proj` or `down_proj`.
    pub(crate) fn lora_slot(&mut self, param: &str) -> Option<LoraSlot<'_>> {
        let (adapter, w) = if param == gate_up_name(&self.name) {
            (&mut self.gate_up_lora, &self.gate_up_proj)
        } else if param == down_name(&self.name) {
            (&mut self.down_lora, &self.down_proj)
        } else {
            return None;
        };
        Some(LoraSlot {
            dims: w.dims().to_vec(),
            adapter,
        })
    }

    /// The adapters of gate_up_proj and down_proj, in that order.
    pub(crate) fn loras_mut(&mut self) -> impl Iterator<Item = &mut LoraAdapter> {
        [&mut self.gate_up_lora, &mut self.down_lora]
            .into_iter()
            .flatten()
    }

    /// W_e ← W_e + s·B_e·A_e for every expert; the adapters are dropped.
    pub(crate) fn merge_lora(&mut self) {
        if let Some(l) = self.gate_up_lora.take() {
            self.gate_up_proj = self.gate_up_proj.clone() + l.delta_experts();
        }
        if let Some(l) = self.down_lora.take() {
            self.down_proj = self.down_proj.clone() + l.delta_experts();
        }
    }
}

impl Params for Experts {
    fn visit_params<V: ParamVisitor>(&mut self, v: &mut V) {
        v.visit(&gate_up_name(&self.name), &mut self.gate_up_proj);
        v.visit(&down_name(&self.name), &mut self.down_proj);
    }
}

fn gate_up_name(name: &str) -> String {
    format!("{name}.gate_up_proj")
}

fn down_name(name: &str) -> String {
    format!("{name}.down_proj")
}

/// The adapter, unless `ctx` turns adapters off.
fn active<'a>(lora: &'a Option<LoraAdapter>, ctx: &ForwardCtx) -> Option<&'a LoraAdapter> {
    lora.as_ref().filter(|_| ctx.adapters_on())
}

/// An index tensor of `v` on `device`.
pub(crate) fn index(v: &[i64], device: &Device) -> Tensor<1, Int> {
    Tensor::<1, Int>::from_data(TensorData::new(v.to_vec(), [v.len()]), device)
}
