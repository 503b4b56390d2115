//! The DPO objective: the policy's per-sequence log-probs of a pair micro-batch against the
//! reference log-probs it carries, through [`dpo_loss`], plus the router losses as for the
//! language-model objective.

use burn::tensor::Tensor;
use moeru_models::params::to_f32_vec;
use moeru_models::{ForwardCtx, Qwen3Model};

use super::batch::PairRows;
use super::loss::{dpo_loss, DpoSettings, DPO_METRICS};
use crate::engine::MicroBatch;
use crate::objective::{AuxWeights, Objective, RouterOut, StepReport};

pub struct DpoObjective {
    pub settings: DpoSettings,
    pub weights: AuxWeights,
}

/// `Σ_t mask · log p(target)` per row `[rows]`: each sequence's completion log-prob.
pub fn sequence_logps(
    model: &Qwen3Model,
    mb: &MicroBatch,
    ctx: &ForwardCtx,
) -> (Tensor<1>, RouterOut) {
    let (hidden, router) = RouterOut::split(model.forward(&mb.batch, ctx));
    (hidden_logps(model, mb, hidden, ctx), router)
}

/// [`sequence_logps`] from the final-norm hidden states.
fn hidden_logps(
    model: &Qwen3Model,
    mb: &MicroBatch,
    hidden: Tensor<3>,
    ctx: &ForwardCtx,
) -> Tensor<1> {
    let rows = mb.mask.dims()[0];
    let lp = model.token_logprobs(hidden, mb.targets.clone(), ctx);
    (lp * mb.mask.clone()).sum_dim(1).reshape([rows])
}

impl Objective for DpoObjective {
    /// Pairs, micro-batches.
    fn counts(&self, micro: &[MicroBatch]) -> Vec<f64> {
        let pairs = micro.iter().map(|m| rows_of(m).ids.len()).sum::<usize>();
        vec![pairs as f64, micro.len() as f64]
    }

    fn aux_weights(&self) -> AuxWeights {
        self.weights
    }

    fn head_loss(
        &self,
        model: &Qwen3Model,
        mb: &MicroBatch,
        hidden: Tensor<3>,
        ctx: &ForwardCtx,
        counts: &[f64],
        report: &mut StepReport,
    ) -> Tensor<1> {
        let pairs = counts[0].max(1.0);
        let rows = rows_of(mb);
        let logps = hidden_logps(model, mb, hidden, ctx);
        let l = dpo_loss(
            logps,
            rows.reference.as_deref(),
            &rows.completion_tokens,
            &self.settings,
        );
        let loss = l.per_pair.clone().sum().div_scalar(pairs);
        report.loss += to_f32_vec(loss.clone())[0] as f64;
        for (name, sum) in DPO_METRICS.iter().zip(l.metric_sums()) {
            report.add_task(name, sum / pairs);
        }
        report.tokens += mb.tokens as u64;
        loss
    }
}

fn rows_of(mb: &MicroBatch) -> &PairRows {
    mb.pairs
        .as_ref()
        .expect("the DPO loop builds every micro-batch from pairs")
}
