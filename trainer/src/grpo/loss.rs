//! The GRPO objective on per-token log-probs, as TRL 1.16's `GRPOTrainer._compute_loss` has it
//! (`importance_sampling_level: token`), with verl's dual clip and clamps as options.
//!
//! With `ρ = exp(logp − logp_old)` and the row's advantage `A`:
//! `L = −min(ρ'·A, clip(ρ, 1−ε_low, 1+ε_high)·A)` where `ρ' = min(ρ, δ)` when `delta` is set;
//! plus `β · k3 · ρ` (`k3 = e^{ref−logp} − (ref−logp) − 1`; without the `ρ` factor when
//! `kl_bias_correction` is off). Aggregation per micro-batch (`m` the completion mask, `n` the
//! step's micro-batches over all ranks): `grpo` `mean_rows(Σ_t mL / max(1, Σ_t m)) / n`; `bnpo`
//! `Σ mL / max(1, Σ m) / n`; `dr_grpo` `Σ mL / (rows · max_completion_length) / n`; `dapo`
//! `Σ mL / tokens`, with `tokens` the generation batch's completion tokens over all ranks per
//! optimizer step (TRL's `num_items_in_batch · GA / steps_per_generation`).
//!
//! Owns: the arithmetic. Must not: run models, communicate or read the recipe.

use burn::tensor::{Tensor, TensorData};
use moeru_models::params::to_f32_vec;

use crate::recipe::grpo::GrpoLossType;

/// The loss settings of a GRPO run.
#[derive(Debug, Clone, PartialEq)]
pub struct GrpoLossSettings {
    pub loss_type: GrpoLossType,
    pub beta: f64,
    pub epsilon_low: f64,
    pub epsilon_high: f64,
    /// TRL's `use_bias_correction_kl`: the KL term is weighted by `ρ`.
    pub kl_bias_correction: bool,
    /// TRL's `delta`: an upper bound on `ρ` in the unclipped term.
    pub delta: Option<f64>,
    /// verl's dual clip: for `A < 0` the loss is at most `−A · c`.
    pub dual_clip_c: Option<f64>,
    /// verl: `logp − logp_old` clamped to `±c` before the exponential.
    pub logratio_clamp: Option<f64>,
    /// verl's `low_var_kl`: `ref − logp` clamped to ±20 and `k3` to `±c`.
    pub kl_clamp: Option<f64>,
    /// `dr_grpo`'s constant: the recipe's `generation.max_new_tokens`.
    pub max_completion_length: usize,
}

/// How a micro-batch's loss is scaled to its share of the step (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normaliser {
    /// Micro-batches of the step over all data-parallel ranks.
    pub micro_batches: f64,
    /// `dapo`: completion tokens per optimizer step of the generation batch, all ranks.
    pub tokens: f64,
}

/// A micro-batch's per-token loss and what its metrics need.
pub struct TokenLoss {
    /// `[rows, seq]`, differentiable in `logps`; 0 where the mask is 0.
    pub per_token: Tensor<2>,
    /// Host copies `[rows · seq]`: `ρ` (bounded by `delta`) and the KL term (after the `ρ`
    /// factor), for the metrics.
    pub ratio: Vec<f32>,
    pub kl: Option<Vec<f32>>,
}

/// Per-token GRPO loss. `logps`, `old`, `reference` and `mask` are `[rows, seq]`;
/// `advantages` one per row. `old` `None`: `logps` detached (one update per generation),
/// so `ρ ≡ 1` while its gradient is `∇logp`; `reference` `None` requires `beta == 0`.
pub fn token_loss(
    logps: Tensor<2>,
    old: Option<Tensor<2>>,
    reference: Option<Tensor<2>>,
    advantages: &[f32],
    mask: Tensor<2>,
    s: &GrpoLossSettings,
) -> TokenLoss {
    let [rows, seq] = logps.dims();
    let device = logps.device();
    let adv = Tensor::<2>::from_data(TensorData::new(advantages.to_vec(), [rows, 1]), &device);
    let old = old.unwrap_or_else(|| logps.clone().detach());
    let mut log_ratio = logps.clone() - old;
    if let Some(c) = s.logratio_clamp {
        log_ratio = log_ratio.clamp(-c, c);
    }
    let ratio = log_ratio.exp();
    let clipped = ratio
        .clone()
        .clamp(1.0 - s.epsilon_low, 1.0 + s.epsilon_high);
    let first = match s.delta {
        Some(d) => ratio.clone().clamp_max(d),
        None => ratio.clone(),
    };
    let adv = adv.expand([rows, seq]);
    let first_host = first.clone();
    let (pg1, pg2) = (first * adv.clone(), clipped * adv.clone());
    let mut per_token = -pg1.clone().min_pair(pg2);
    if let Some(c) = s.dual_clip_c {
        let bound = adv.clone().neg().mul_scalar(c);
        let dual = per_token.clone().min_pair(bound);
        per_token = per_token.mask_where(adv.lower_elem(0.0), dual);
    }
    let mut kl_host = None;
    if s.beta != 0.0 {
        let reference = reference.expect("a reference is required when beta > 0 (validated)");
        let mut diff = reference - logps;
        if s.kl_clamp.is_some() {
            diff = diff.clamp(-20.0, 20.0);
        }
        let mut kl = diff.clone().exp() - diff - 1.0;
        if let Some(c) = s.kl_clamp {
            kl = kl.clamp(-c, c);
        }
        if s.kl_bias_correction {
            kl = kl * ratio.clone();
        }
        kl_host = Some(to_f32_vec(kl.clone().detach()));
        per_token = per_token + kl.mul_scalar(s.beta);
    }
    TokenLoss {
        per_token: per_token * mask,
        // TRL's clip metrics read the ratio after the `delta` bound (its KL term, before).
        ratio: to_f32_vec(first_host.detach()),
        kl: kl_host,
    }
}

/// The micro-batch's loss from its masked per-token loss (see the module docs).
pub fn aggregate(
    per_token: Tensor<2>,
    mask: &Tensor<2>,
    loss_type: GrpoLossType,
    max_completion_length: usize,
    n: &Normaliser,
) -> Tensor<1> {
    let [rows, _] = per_token.dims();
    match loss_type {
        GrpoLossType::Grpo => {
            let lens = mask.clone().sum_dim(1).clamp_min(1.0);
            let per_row = per_token.sum_dim(1) / lens;
            per_row
                .sum()
                .div_scalar(rows as f64)
                .div_scalar(n.micro_batches)
        }
        GrpoLossType::Bnpo => {
            let tokens = mask.clone().sum().clamp_min(1.0);
            (per_token.sum() / tokens).div_scalar(n.micro_batches)
        }
        GrpoLossType::DrGrpo => per_token
            .sum()
            .div_scalar((rows * max_completion_length) as f64)
            .div_scalar(n.micro_batches),
        GrpoLossType::Dapo => per_token.sum().div_scalar(n.tokens.max(1.0)),
    }
}

/// Masked sums of TRL's clip metrics and the KL over a micro-batch: low (`ρ < 1−ε_low`,
/// `A < 0`), high (`ρ > 1+ε_high`, `A > 0`), region (either), KL; and the masked tokens.
/// A mean is a sum divided by the tokens it covers.
pub fn metric_sums(
    loss: &TokenLoss,
    advantages: &[f32],
    mask: &[f32],
    s: &GrpoLossSettings,
) -> [f64; 5] {
    let seq = mask.len() / advantages.len().max(1);
    let mut sums = [0.0; 5];
    for (i, (&m, &r)) in mask.iter().zip(&loss.ratio).enumerate() {
        if m == 0.0 {
            continue;
        }
        let a = advantages[i / seq];
        let low = (r as f64) < 1.0 - s.epsilon_low && a < 0.0;
        let high = (r as f64) > 1.0 + s.epsilon_high && a > 0.0;
        sums[0] += f64::from(u8::from(low));
        sums[1] += f64::from(u8::from(high));
        sums[2] += f64::from(u8::from(low || high));
        sums[3] += loss.kl.as_ref().map_or(0.0, |k| k[i] as f64);
        sums[4] += 1.0;
    }
    sums
}
