//! The stacked experts of a Qwen3-MoE layer and their grouped forward over a [`RoutingPlan`].
//!
//! Routed tokens are gathered in expert order (routing.rs) and each projection is one grouped
//! matmul over those rows (grouped_mm.rs): every computed row is a routed one.

use burn::tensor::{Device, IndexingUpdateOp, Int, Tensor, TensorData};

use crate::grouped_mm::{grouped_mm, min_rows};

use crate::forward_ctx::ForwardCtx;
use crate::layers::swiglu;
use crate::lora::{LoraAdapter, LoraSlot};
use crate::params::{ParamSource, ParamVisitor, Params};
use crate::precision::to_f32;
use crate::routing::RoutingPlan;

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
    /// `[tokens, hidden]` (f32). The matmuls run in `ctx.precision`, one grouped matmul over
    /// the rows sorted by expert per projection (no padding).
    pub fn forward(
        &self,
        x: &Tensor<2>,
        plan: &RoutingPlan,
        weights: &Tensor<1>,
        ctx: &ForwardCtx,
    ) -> Tensor<2> {
        let [tokens, hidden] = x.dims();
        let device = x.device();
        let y = Tensor::<2>::zeros([tokens, hidden], &device);
        if plan.computed_rows == 0 {
            return y;
        }
        let offsets = &plan.offsets;
        let row_token = index(&plan.sorted_token, &device);
        let routed = ctx.precision.mm(x.clone().select(0, row_token.clone()));
        let gate_up_proj = ctx.precision.mm(self.gate_up_proj.clone());
        let mut gate_up = grouped_mm(routed.clone(), gate_up_proj, offsets);
        if let Some(l) = active(&self.gate_up_lora, ctx) {
            gate_up = gate_up + l.apply_experts(routed, offsets);
        }
        let inter = gate_up.dims()[1] / 2;
        let act = swiglu(
            gate_up.clone().narrow(1, 0, inter),
            gate_up.narrow(1, inter, inter),
        );
        let mut out = grouped_mm(
            act.clone(),
            ctx.precision.mm(self.down_proj.clone()),
            offsets,
        );
        if let Some(l) = active(&self.down_lora, ctx) {
            out = out + l.apply_experts(act, offsets);
        }
        let row_weight = weights
            .clone()
            .select(0, index(&plan.sorted_assignment, &device));
        let weighted = to_f32(out) * row_weight.unsqueeze_dim::<2>(1);
        y.select_assign(0, row_token, weighted, IndexingUpdateOp::Add)
    }

    /// The least rows an expert with any is computed over: its gate/up product's floor.
    pub fn min_rows(&self) -> usize {
        min_rows(self.gate_up_proj.dims()[1])
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
