//! The training engine: the model, the optimizer and the gradient sync, each the one owner of
//! its state, and one step over the micro-batches of a global batch.
//!
//! Owns: the model being trained, the optimizer (moments, step count), the sync strategy.
//! Must not: read data, log, or decide when to evaluate or save (the task loops do).

pub mod grads;
mod micro;
pub mod optim;
pub mod parallel;
pub mod schedule;
pub mod sync;

use std::collections::BTreeMap;
use std::time::Duration;

use burn::tensor::{Device, Tensor};
use moeru_models::params::param_shapes;
use moeru_models::{ForwardCtx, Placement, Precision, Qwen3Model};
use moeru_parallel::{thread_world, CommError, ProcessGroup, ReduceOp};

use grads::NormOrder;
pub use micro::MicroBatch;
use optim::{AdamW, AdamWConfig, Moments, Piece};
pub use parallel::ModelParallel;
use schedule::Schedule;
use sync::{GradSync, Subset, SyncKind};

use crate::fault::{Fault, FaultPoint};
use crate::objective::{Objective, StepReport};
use crate::pipeline::executor::PipelineRun;
use crate::pipeline::schedule::Compute;

/// A world of one rank, for an engine outside a launched job (benchmarks, reference tests):
/// its sync is `SyncKind::Local`, so nothing is ever sent.
pub fn one_rank() -> ProcessGroup {
    thread_world(1, Duration::from_secs(60)).remove(0)
}

/// The settings of an engine that are not state.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    pub adamw: AdamWConfig,
    /// Global-norm clipping threshold (0 = off).
    pub clip: f64,
    /// The dtype matmuls run in (parameters stay f32).
    pub precision: Precision,
    /// ZeRO-1 and plain DP lay gradients out in buckets of this many elements.
    pub bucket_elems: usize,
    /// MoE expert capacity factor (`moe.capacity_factor`); `None`: dropless.
    pub capacity_factor: Option<f64>,
    pub sync: SyncKind,
}

/// Optimizer state to continue from: steps taken and whole moments per parameter.
#[derive(Default)]
pub struct OptimizerStart {
    pub steps: u64,
    pub moments: BTreeMap<String, Moments>,
}

pub struct Engine<'g> {
    pub model: Qwen3Model,
    pub optim: AdamW,
    /// One sync over the DP group, or under expert parallelism the dense parameters' over dp
    /// and the experts' over the expert-data-parallel group.
    syncs: Vec<GradSync<'g>>,
    /// The optimizer's pieces of each sync, in order.
    piece_counts: Vec<usize>,
    schedule: Schedule<'g>,
    /// The data-parallel group: the global batch is its ranks' micro-batches.
    replicas: &'g ProcessGroup,
    parallel: Option<ModelParallel<'g>>,
    /// Under model parallelism, the pieces this rank counts in the global norm and writes
    /// into checkpoints (each element on one rank of the world).
    counted: Vec<bool>,
    /// Under model parallelism, where the counted pieces sit in the world's order (made at
    /// the first step: it is a collective).
    norm_order: Option<NormOrder>,
    config: EngineConfig,
    /// The fault-injection hook armed for the next step, if any.
    fault: Option<Fault>,
}

impl<'g> Engine<'g> {
    /// An engine over `model` whose gradients sync over `replicas` (the DP group) as
    /// `config.sync` says; the optimizer continues from `start`.
    pub fn new(
        model: Qwen3Model,
        config: EngineConfig,
        replicas: &'g ProcessGroup,
        start: OptimizerStart,
    ) -> Self {
        Self::build(model, config, replicas, None, start)
    }

    /// An engine over this rank's part of a tensor- and/or expert-parallel model: dense
    /// gradients sync over `replicas` as `config.sync` says, expert ones over
    /// `parallel.edp`; `start.moments` are this part's (`checkpoint::RestoredMoments`).
    pub fn sharded(
        model: Qwen3Model,
        config: EngineConfig,
        replicas: &'g ProcessGroup,
        parallel: ModelParallel<'g>,
        start: OptimizerStart,
    ) -> Self {
        Self::build(model, config, replicas, Some(parallel), start)
    }

    fn build(
        mut model: Qwen3Model,
        config: EngineConfig,
        replicas: &'g ProcessGroup,
        parallel: Option<ModelParallel<'g>>,
        start: OptimizerStart,
    ) -> Self {
        let device = model.device().inner();
        let buckets = config.bucket_elems;
        let mut trainable = model.trainable();
        let has_experts = param_shapes(&mut trainable)
            .iter()
            .any(|(n, _)| Subset::Experts.holds(n));
        let syncs = match &parallel {
            Some(p) if has_experts => vec![
                GradSync::new(
                    config.sync,
                    Subset::Dense,
                    replicas,
                    &mut trainable,
                    buckets,
                ),
                GradSync::new(
                    p.expert_sync_kind(config.sync),
                    Subset::Experts,
                    p.edp,
                    &mut trainable,
                    buckets,
                ),
            ],
            _ => vec![GradSync::new(
                config.sync,
                Subset::All,
                replicas,
                &mut trainable,
                buckets,
            )],
        };
        let (mut pieces, mut piece_counts, mut placement) = (Vec::new(), Vec::new(), None);
        for sync in &syncs {
            let (p, place) = sync.pieces();
            piece_counts.push(p.len());
            pieces.extend(p);
            placement = place;
        }
        // Under model parallelism a checkpoint gathers the moments whole (`parallel.rs`).
        let placement = placement.filter(|_| parallel.is_none());
        let counted = match &parallel {
            Some(p) => p.counted(&syncs, &piece_counts, &pieces),
            None => Vec::new(),
        };
        let optim = AdamW::new(
            config.adamw,
            pieces,
            placement,
            start.steps,
            &start.moments,
            &device,
        );
        Self {
            model,
            optim,
            syncs,
            piece_counts,
            schedule: Schedule::Local,
            replicas,
            parallel,
            counted,
            norm_order: None,
            config,
            fault: None,
        }
    }

    /// The world's order of the counted pieces (see [`NormOrder`]).
    fn world_norm_order(&mut self) -> Result<Option<&NormOrder>, CommError> {
        let Some(p) = &self.parallel else {
            return Ok(None);
        };
        if self.norm_order.is_none() {
            let pieces = self.optim.pieces();
            let mut keys: Vec<(String, usize, usize)> = (pieces.iter().zip(&self.counted))
                .filter(|(_, &c)| c)
                .map(|(piece, _)| {
                    let part = match p.shard.plan(&piece.name).placement {
                        Placement::Split(s) => s.index,
                        Placement::Replicated => 0,
                    };
                    (piece.name.clone(), part, piece.offset)
                })
                .collect();
            keys.sort_by(|a, b| (&a.0, a.2).cmp(&(&b.0, b.2)));
            self.norm_order = Some(NormOrder::new(p.world, &keys)?);
        }
        Ok(self.norm_order.as_ref())
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// The same engine running `run`'s pipeline stages: `self.model` must hold exactly the
    /// layers of its rank's stages.
    pub fn with_pipeline(mut self, run: PipelineRun<'g>) -> Self {
        self.schedule = Schedule::Pipeline(run, Vec::new());
        self
    }

    /// This rank's pipeline stages, under pipeline parallelism.
    pub fn pipeline(&self) -> Option<&PipelineRun<'g>> {
        match &self.schedule {
            Schedule::Pipeline(run, _) => Some(run),
            Schedule::Local => None,
        }
    }

    /// Under pipeline parallelism, the computes of the last step in the order they ran.
    pub fn pipeline_order(&self) -> Option<&[Compute]> {
        match &self.schedule {
            Schedule::Pipeline(_, ran) => Some(ran),
            Schedule::Local => None,
        }
    }

    /// Arms the test hook `fault` (`MOERU_FAULT`) for the next step (`None` disarms it).
    pub fn arm_fault(&mut self, fault: Option<Fault>) {
        self.fault = fault;
    }

    /// The model-parallel layout, if any.
    pub fn parallel(&self) -> Option<&ModelParallel<'g>> {
        self.parallel.as_ref()
    }

    /// Forward and backward over `micro` (this rank's part of the global batch), gradient
    /// sync, clipping, and the AdamW update with `lr`. The step equals the single-rank step on
    /// the whole global batch: counts and reported values are summed over the DP group, and
    /// the gradients by the sync strategy.
    pub fn step(
        &mut self,
        objective: &dyn Objective,
        micro: &[MicroBatch],
        lr: f64,
    ) -> Result<StepReport, CommError> {
        let mut counts = objective.counts(micro);
        self.sum_over_replicas(&mut counts)?;
        let mut report = StepReport::default();
        let base = ForwardCtx::new(self.config.precision)
            .with_capacity_factor(self.config.capacity_factor);
        let mut buffer = self.schedule.run(
            &mut self.model,
            objective,
            micro,
            base,
            (&counts, self.fault.as_ref()),
            &mut report,
        )?;
        let device = self.model.device().inner();
        if let Some(run) = self.pipeline() {
            run.sum_tied(&mut buffer)?;
        }
        if let Some(p) = &self.parallel {
            p.boundaries.take_error()?;
            p.complete_partial(&mut buffer, &device)?;
        }
        let mut grads = Vec::new();
        Fault::at(self.fault.as_ref(), FaultPoint::Collective);
        for sync in &self.syncs {
            grads.extend(sync.reduce(&mut buffer, &device)?);
        }
        self.world_norm_order()?;
        let norm_group = match &self.parallel {
            Some(p) => Some(p.world),
            None => self.syncs[0].shard_group(),
        };
        report.grad_norm = grads::clip_global_norm(
            self.optim.pieces(),
            &mut grads,
            self.config.clip,
            norm_group,
            &self.counted,
            self.norm_order.as_ref(),
        )?;
        self.update(lr, grads, &device)?;
        if let Schedule::Pipeline(..) = self.schedule {
            // Every stage's report has the same layout, so the sum over stages adds up.
            let c = &self.model.config;
            let moe: Vec<usize> = (0..c.num_hidden_layers)
                .filter(|&i| c.is_moe_layer(i))
                .collect();
            let experts = c.moe.as_ref().map_or(0, |m| m.num_experts);
            report.cover_layers(&moe, experts);
        }
        let mut summed = report.summable();
        self.sum_over_replicas(&mut summed)?;
        if let Some(p) = &self.parallel {
            p.sum_token_shares(&mut summed)?;
        }
        if let Schedule::Pipeline(run, _) = &self.schedule {
            // The loss is the last stage's, the router losses and loads each stage's layers'.
            run.group.all_reduce(&mut summed, ReduceOp::Sum)?;
        }
        report.set_summed(&summed);
        Ok(report)
    }

    /// The AdamW update of every sync's pieces, published to the model.
    fn update(&mut self, lr: f64, grads: Vec<Tensor<1>>, device: &Device) -> Result<(), CommError> {
        let mut params = Vec::with_capacity(grads.len());
        let mut flats = Vec::with_capacity(self.syncs.len());
        for sync in &self.syncs {
            let (p, flat) = sync.current(&mut self.model.trainable(), device);
            params.extend(p);
            flats.push(flat);
        }
        let mut updated = self.optim.step(lr, params, grads).into_iter();
        for ((sync, flat), &n) in self.syncs.iter().zip(flats).zip(&self.piece_counts) {
            let mine: Vec<Tensor<1>> = updated.by_ref().take(n).collect();
            sync.publish(&mut self.model.trainable(), flat, mine)?;
        }
        Ok(())
    }

    /// The data-parallel group.
    pub fn replicas(&self) -> &'g ProcessGroup {
        self.replicas
    }

    /// (name, local shape, values) of every trainable parameter, in visiting order.
    pub fn local_params(&mut self) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        parallel::local_params(&mut self.model.trainable())
    }

    /// Under model parallelism, the optimizer pieces whose moments this rank writes into a
    /// checkpoint: each element once over the world, as the global norm counts them.
    pub fn owned_pieces(&self) -> Vec<(&Piece, &Moments)> {
        let pieces = self.optim.pieces().iter().zip(self.optim.moments());
        (pieces.zip(&self.counted))
            .filter(|(_, &counted)| counted)
            .map(|(p, _)| p)
            .collect()
    }

    fn sum_over_replicas(&self, values: &mut [f64]) -> Result<(), CommError> {
        if self.replicas.size() > 1 {
            self.replicas.all_reduce(values, ReduceOp::Sum)?;
        }
        Ok(())
    }
}
