//! What one micro-batch contributes to a step's loss, per task. The language-model objective
//! (pretraining and SFT) is here; DPO and GRPO add their own beside it.
//!
//! Owns: the loss formula and what it reports. Must not: run backward, touch gradients or
//! communicate (the engine sums the counts it asks for over the data-parallel group).

use burn::tensor::Tensor;
use moeru_models::moe::RouterStats;
use moeru_models::params::to_f32_vec;
use moeru_models::{ForwardCtx, ForwardOutput, Qwen3Model};

use crate::engine::MicroBatch;

/// Coefficients of the auxiliary router losses.
#[derive(Debug, Clone, Copy, Default)]
pub struct AuxWeights {
    pub load_balancing: f64,
    pub z_loss: f64,
}

/// What a step reports: the global batch's values once the engine has summed them.
#[derive(Debug, Clone, Default)]
pub struct StepReport {
    /// LM loss: Σ token losses / target tokens of the global batch.
    pub loss: f64,
    pub aux_loss: Option<f64>,
    pub z_loss: Option<f64>,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens routed to each expert, per MoE layer, summed over micro-batches.
    pub expert_counts: Vec<(usize, Vec<u64>)>,
    /// Rows this rank's expert matmuls computed, padding included, over all MoE layers.
    pub expert_rows_computed: u64,
    pub tokens: u64,
    /// A task's own metrics (DPO's rewards and log-probs), each already its share of the
    /// global batch's mean, so the sum over ranks is the mean; in the order first added.
    pub task: Vec<(&'static str, f64)>,
}

impl StepReport {
    /// The values that add up over data-parallel ranks, flat (see [`StepReport::set_summed`]).
    pub fn summable(&self) -> Vec<f64> {
        let mut v = vec![
            self.loss,
            self.aux_loss.unwrap_or(0.0),
            self.z_loss.unwrap_or(0.0),
            self.tokens as f64,
        ];
        v.extend(
            self.expert_counts
                .iter()
                .flat_map(|(_, c)| c.iter().map(|&x| x as f64)),
        );
        v.extend(self.task.iter().map(|(_, x)| x));
        v
    }

    /// Adds `value` to the task metric `name`.
    pub fn add_task(&mut self, name: &'static str, value: f64) {
        match self.task.iter_mut().find(|(n, _)| *n == name) {
            Some((_, x)) => *x += value,
            None => self.task.push((name, value)),
        }
    }

    /// Takes back the values of [`StepReport::summable`] after they were summed.
    pub fn set_summed(&mut self, v: &[f64]) {
        self.loss = v[0];
        self.aux_loss = self.aux_loss.map(|_| v[1]);
        self.z_loss = self.z_loss.map(|_| v[2]);
        self.tokens = v[3] as u64;
        let mut it = v[4..].iter();
        for (_, counts) in &mut self.expert_counts {
            for c in counts.iter_mut() {
                *c = *it.next().unwrap_or(&0.0) as u64;
            }
        }
        for (_, x) in &mut self.task {
            *x = *it.next().unwrap_or(&0.0);
        }
    }

    fn add_router(&mut self, router: &[(usize, RouterStats)]) {
        if self.expert_counts.is_empty() {
            self.expert_counts.extend(
                router
                    .iter()
                    .map(|(l, s)| (*l, vec![0; s.expert_counts.len()])),
            );
        }
        for ((_, acc), (_, s)) in self.expert_counts.iter_mut().zip(router) {
            for (a, c) in acc.iter_mut().zip(&s.expert_counts) {
                *a += c;
            }
        }
        self.expert_rows_computed += router.iter().map(|(_, s)| s.computed_rows).sum::<u64>();
    }
}

/// A task's loss, one micro-batch at a time.
pub trait Objective {
    /// Counts of this rank's micro-batches that normalise the step; the engine sums them over
    /// the data-parallel group before any micro-batch runs.
    fn counts(&self, micro: &[MicroBatch]) -> Vec<f64>;

    /// The differentiable loss of `mb` as its share of the global batch's loss (`counts`:
    /// the global counts), adding what it reports to `report`.
    fn micro_loss(
        &self,
        model: &Qwen3Model,
        mb: &MicroBatch,
        ctx: &ForwardCtx,
        counts: &[f64],
        report: &mut StepReport,
    ) -> Tensor<1>;
}

/// Next-token cross-entropy (pretraining and SFT) plus the router losses.
///
/// The LM loss is token-weighted over the whole global batch (each micro-batch contributes
/// its token-loss sum / all target tokens), so accumulation equals one big batch; the router
/// losses are averaged over micro-batches.
pub struct LmObjective {
    pub weights: AuxWeights,
}

impl Objective for LmObjective {
    /// Target tokens, micro-batches.
    fn counts(&self, micro: &[MicroBatch]) -> Vec<f64> {
        vec![
            micro.iter().map(|m| m.target_count).sum::<usize>() as f64,
            micro.len() as f64,
        ]
    }

    fn micro_loss(
        &self,
        model: &Qwen3Model,
        mb: &MicroBatch,
        ctx: &ForwardCtx,
        counts: &[f64],
        report: &mut StepReport,
    ) -> Tensor<1> {
        let (denom, n) = (counts[0].max(1.0) as f32, counts[1]);
        let (hidden, router) = RouterOut::split(model.forward(&mb.batch, ctx));
        let lm = model
            .token_loss_sum(hidden, mb.targets.clone(), mb.mask.clone(), ctx)
            .div_scalar(denom);
        report.loss += to_f32_vec(lm.clone())[0] as f64;
        report.tokens += mb.tokens as u64;
        router.add_to(lm, &self.weights, n, report)
    }
}

/// What a forward reports besides its hidden states: the router losses and statistics.
pub struct RouterOut {
    pub aux_loss: Option<Tensor<1>>,
    pub z_loss: Option<Tensor<1>>,
    pub router: Vec<(usize, RouterStats)>,
}

impl RouterOut {
    /// A forward's hidden states and the rest of what it returned.
    pub fn split(out: ForwardOutput) -> (Tensor<3>, Self) {
        let router = Self {
            aux_loss: out.aux_loss,
            z_loss: out.z_loss,
            router: out.router,
        };
        (out.hidden, router)
    }

    /// `loss` plus the router losses with their weights, averaged over the step's `n`
    /// micro-batches; reports them and the expert loads.
    pub fn add_to(
        self,
        mut loss: Tensor<1>,
        weights: &AuxWeights,
        n: f64,
        report: &mut StepReport,
    ) -> Tensor<1> {
        if let Some(aux) = self.aux_loss {
            *report.aux_loss.get_or_insert(0.0) += to_f32_vec(aux.clone())[0] as f64 / n;
            loss = loss + aux.mul_scalar(weights.load_balancing / n);
        }
        if let Some(z) = self.z_loss {
            *report.z_loss.get_or_insert(0.0) += to_f32_vec(z.clone())[0] as f64 / n;
            if weights.z_loss > 0.0 {
                loss = loss + z.mul_scalar(weights.z_loss / n);
            }
        }
        report.add_router(&self.router);
        loss
    }
}
