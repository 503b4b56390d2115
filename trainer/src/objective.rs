//! What one micro-batch contributes to a step's loss, per task. The language-model objective
//! (pretraining and SFT) is here; DPO and GRPO add their own beside it.
//!
//! Owns: the loss formula and what it reports. Must not: run backward, touch gradients or
//! communicate (the engine sums the counts it asks for over the data-parallel group).

use burn::tensor::Tensor;
use moeru_models::moe::RouterStats;
use moeru_models::params::to_f32_vec;
use moeru_models::{ForwardCtx, ForwardOutput, Qwen3Model, ReplayStats};

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
    pub task: Vec<(String, f64)>,
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
    pub fn add_task(&mut self, name: &str, value: f64) {
        match self.task.iter_mut().find(|(n, _)| *n == name) {
            Some((_, x)) => *x += value,
            None => self.task.push((name.to_string(), value)),
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

    /// Adds the expert loads and computed rows of `router`'s MoE layers (kept in layer
    /// order, so that a pipeline stage's layers and the whole model's line up).
    pub fn add_router(&mut self, router: &[(usize, RouterStats)]) {
        for (layer, s) in router {
            let at = match self.expert_counts.binary_search_by_key(layer, |(l, _)| *l) {
                Ok(at) => at,
                Err(at) => {
                    let zeros = vec![0; s.expert_counts.len()];
                    self.expert_counts.insert(at, (*layer, zeros));
                    at
                }
            };
            for (a, c) in self.expert_counts[at].1.iter_mut().zip(&s.expert_counts) {
                *a += c;
            }
        }
        self.expert_rows_computed += router.iter().map(|(_, s)| s.computed_rows).sum::<u64>();
        self.add_replay(router);
    }

    /// Under router replay, counts (summed over micro-batches and ranks; `tasks::report`
    /// turns them into fractions): the replayed tokens, and those whose live top-k differs
    /// from the replayed one in each layer and in any layer.
    fn add_replay(&mut self, router: &[(usize, RouterStats)]) {
        let replayed: Vec<(usize, &ReplayStats, usize)> = (router.iter())
            .filter_map(|(l, s)| s.replay.as_ref().map(|r| (*l, r, s.tokens)))
            .collect();
        let Some(&(_, first, tokens)) = replayed.first() else {
            return;
        };
        self.add_task(REPLAY_TOKENS, (tokens - first.fallback) as f64);
        let mut any = vec![false; first.mismatched.len()];
        for (layer, r, _) in &replayed {
            let n = r.mismatched.iter().filter(|&&m| m).count();
            self.add_task(&format!("{REPLAY_MISMATCH}_layer{layer}"), n as f64);
            any.iter_mut()
                .zip(&r.mismatched)
                .for_each(|(a, &m)| *a |= m);
        }
        let n = any.iter().filter(|&&m| m).count();
        self.add_task(&format!("{REPLAY_MISMATCH}_any_layer"), n as f64);
    }

    /// Gives every MoE layer of `layers` an expert-load entry (zeros where none was added)
    /// and the router losses a value, so that every pipeline stage's report has the same
    /// summable layout.
    pub fn cover_layers(&mut self, layers: &[usize], experts: usize) {
        if !layers.is_empty() {
            self.aux_loss.get_or_insert(0.0);
            self.z_loss.get_or_insert(0.0);
        }
        for &layer in layers {
            if let Err(at) = self.expert_counts.binary_search_by_key(&layer, |(l, _)| *l) {
                self.expert_counts.insert(at, (layer, vec![0; experts]));
            }
        }
    }
}

/// The count of replayed tokens under router replay (a denominator, not logged).
pub const REPLAY_TOKENS: &str = "router_replay_tokens";
/// The prefix of the router-replay mismatch fractions.
pub const REPLAY_MISMATCH: &str = "router_replay_mismatch_frac";

/// A task's loss, one micro-batch at a time.
pub trait Objective {
    /// Counts of this rank's micro-batches that normalise the step; the engine sums them over
    /// the data-parallel group before any micro-batch runs. `counts[1]` is the number of
    /// micro-batches (the router losses are averaged over them).
    fn counts(&self, micro: &[MicroBatch]) -> Vec<f64>;

    /// The weights of the router losses.
    fn aux_weights(&self) -> AuxWeights;

    /// The task's loss of `mb` from the final-norm hidden states `[batch, seq, hidden]`, as
    /// its share of the global batch's loss (`counts`: the global counts), adding what it
    /// reports to `report`; without the router losses (the last pipeline stage calls this).
    fn head_loss(
        &self,
        model: &Qwen3Model,
        mb: &MicroBatch,
        hidden: Tensor<3>,
        ctx: &ForwardCtx,
        counts: &[f64],
        report: &mut StepReport,
    ) -> Tensor<1>;

    /// The differentiable loss of `mb` through the whole model: the task's loss plus the
    /// router losses.
    fn micro_loss(
        &self,
        model: &Qwen3Model,
        mb: &MicroBatch,
        ctx: &ForwardCtx,
        counts: &[f64],
        report: &mut StepReport,
    ) -> Tensor<1> {
        let (hidden, router) = RouterOut::split(model.forward(&mb.batch, ctx));
        let loss = self.head_loss(model, mb, hidden, ctx, counts, report);
        router.add_to(loss, &self.aux_weights(), counts[1], report)
    }
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
        let denom = counts[0].max(1.0) as f32;
        let lm = model
            .token_loss_sum(hidden, mb.targets.clone(), mb.mask.clone(), ctx)
            .div_scalar(denom);
        report.loss += to_f32_vec(lm.clone())[0] as f64;
        report.tokens += mb.tokens as u64;
        lm
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
