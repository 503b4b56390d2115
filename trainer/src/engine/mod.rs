//! The training engine: the model, the optimizer and the gradient sync, each the one owner of
//! its state, and one step over the micro-batches of a global batch.
//!
//! Owns: the model being trained, the optimizer (moments, step count), the sync strategy.
//! Must not: read data, log, or decide when to evaluate or save (the task loops do).

pub mod grads;
mod micro;
pub mod optim;
pub mod schedule;
pub mod sync;

use std::collections::BTreeMap;
use std::time::Duration;

use moeru_models::{Precision, Qwen3Model};
use moeru_parallel::{thread_world, CommError, ProcessGroup, ReduceOp};

pub use micro::MicroBatch;
use optim::{AdamW, AdamWConfig, Moments};
use schedule::Schedule;
use sync::{GradSync, SyncKind};

use crate::objective::{Objective, StepReport};

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
    sync: GradSync<'g>,
    schedule: Schedule,
    /// The data-parallel group: the global batch is its ranks' micro-batches.
    replicas: &'g ProcessGroup,
    config: EngineConfig,
}

impl<'g> Engine<'g> {
    /// An engine over `model` whose gradients sync over `replicas` (the DP group) as
    /// `config.sync` says; the optimizer continues from `start`.
    pub fn new(
        mut model: Qwen3Model,
        config: EngineConfig,
        replicas: &'g ProcessGroup,
        start: OptimizerStart,
    ) -> Self {
        let sync = GradSync::new(
            config.sync,
            replicas,
            &mut model.trainable(),
            config.bucket_elems,
        );
        let (pieces, placement) = sync.pieces();
        let device = model.device().inner();
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
            sync,
            schedule: Schedule::Local,
            replicas,
            config,
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
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
        let precision = self.config.precision;
        let grads = self.schedule.run(
            &mut self.model,
            objective,
            micro,
            precision,
            &counts,
            &mut report,
        );
        let device = self.model.device().inner();
        let mut grads = self.sync.reduce(grads, &device)?;
        report.grad_norm = grads::clip_global_norm(
            self.optim.pieces(),
            &mut grads,
            self.config.clip,
            self.sync.shard_group(),
        )?;
        let (params, flat) = self.sync.current(&mut self.model.trainable(), &device);
        let updated = self.optim.step(lr, params, grads);
        self.sync
            .publish(&mut self.model.trainable(), flat, updated)?;
        let mut summed = report.summable();
        self.sum_over_replicas(&mut summed)?;
        report.set_summed(&summed);
        Ok(report)
    }

    fn sum_over_replicas(&self, values: &mut [f64]) -> Result<(), CommError> {
        if self.replicas.size() > 1 {
            self.replicas.all_reduce(values, ReduceOp::Sum)?;
        }
        Ok(())
    }
}
