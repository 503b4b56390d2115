//! The GRPO objective: per-token log-probs of a rollout micro-batch at the sampling
//! temperature (`log_softmax(z / T)`, as TRL scores them), the clipped loss against the old and
//! reference log-probs the micro-batch carries, plus the router losses as for the
//! language-model objective.

use burn::tensor::Tensor;
use moeru_models::params::to_f32_vec;
use moeru_models::{ForwardCtx, Qwen3Model};

use super::loss::{aggregate, metric_sums, token_loss, GrpoLossSettings, Normaliser};
use super::rollout::RolloutRows;
use crate::engine::MicroBatch;
use crate::objective::{AuxWeights, Objective, StepReport};

pub struct GrpoObjective {
    pub settings: GrpoLossSettings,
    /// The sampling temperature the log-probs are taken at.
    pub temperature: f64,
    pub weights: AuxWeights,
}

/// The names of [`metric_sums`]' values, as TRL logs them with `/` → `_`: token means.
pub const GRPO_METRICS: [&str; 4] = [
    "clip_ratio_low_mean",
    "clip_ratio_high_mean",
    "clip_ratio_region_mean",
    "kl",
];

/// `log p(target)` `[rows, seq]` at `temperature` from final-norm hidden states: the logits
/// `h·Wᵀ / T` are `(h / T)·Wᵀ`.
pub fn token_logps(
    model: &Qwen3Model,
    mb: &MicroBatch,
    hidden: Tensor<3>,
    temperature: f64,
    ctx: &ForwardCtx,
) -> Tensor<2> {
    let hidden = match temperature == 1.0 {
        true => hidden,
        false => hidden.div_scalar(temperature),
    };
    model.token_logprobs(hidden, mb.targets.clone(), ctx)
}

impl Objective for GrpoObjective {
    /// Completion tokens (the mask), micro-batches.
    fn counts(&self, micro: &[MicroBatch]) -> Vec<f64> {
        let tokens = micro.iter().map(|m| m.target_count).sum::<usize>();
        vec![tokens as f64, micro.len() as f64]
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
        let rows = rows_of(mb);
        let logps = token_logps(model, mb, hidden, self.temperature, ctx);
        let mask = to_f32_vec(mb.mask.clone());
        if let Some(sampled) = &rows.sampled {
            let live = to_f32_vec(logps.clone().detach());
            let sums = mismatch_sums(&live, &to_f32_vec(sampled.clone()), &mask);
            for (name, sum) in MISMATCH_METRICS.iter().zip(sums) {
                report.add_task(name, sum / counts[0].max(1.0));
            }
        }
        let s = &self.settings;
        let l = token_loss(
            logps,
            rows.old.clone(),
            rows.reference.clone(),
            &rows.advantages,
            mb.mask.clone(),
            s,
        );
        let n = Normaliser {
            micro_batches: counts[1],
            tokens: counts[0],
        };
        let sums = metric_sums(&l, &rows.advantages, &mask, s);
        let loss = aggregate(
            l.per_token,
            &mb.mask,
            s.loss_type,
            s.max_completion_length,
            &n,
        );
        report.loss += to_f32_vec(loss.clone())[0] as f64;
        let tokens = counts[0].max(1.0);
        for (i, name) in GRPO_METRICS.iter().enumerate() {
            if i < 3 || s.beta != 0.0 {
                report.add_task(name, sums[i] / tokens);
            }
        }
        report.tokens += mb.tokens as u64;
        loss
    }
}

/// The rollout-vs-training log-prob mismatch (AReaL's), token means over completions of
/// `Δ = logp_train − logp_rollout`: the k3 estimate `e^Δ − 1 − Δ`, `|Δ|`, and the fraction
/// with `|Δ| > ln 2`.
pub const MISMATCH_METRICS: [&str; 3] =
    ["mismatch_k3", "mismatch_abs_mean", "mismatch_extreme_frac"];

/// The sums over `mask`ed tokens of [`MISMATCH_METRICS`].
fn mismatch_sums(live: &[f32], sampled: &[f32], mask: &[f32]) -> [f64; 3] {
    let mut sums = [0.0; 3];
    for ((&l, &s), _) in live.iter().zip(sampled).zip(mask).filter(|(_, &m)| m > 0.0) {
        let d = l as f64 - s as f64;
        sums[0] += d.exp() - 1.0 - d;
        sums[1] += d.abs();
        sums[2] += f64::from(u8::from(d.abs() > std::f64::consts::LN_2));
    }
    sums
}

fn rows_of(mb: &MicroBatch) -> &RolloutRows {
    mb.rollout
        .as_ref()
        .expect("the GRPO loop builds every micro-batch from rollouts")
}
