//! How a step's micro-batches run through the objective: forward, backward, accumulate.
//! One local loop, or under pipeline parallelism the rank's plan of forward / backward
//! actions and exchanges (`pipeline::executor`).
//!
//! Owns: the order of forwards and backwards. Must not: sync or apply gradients.

use moeru_models::{ForwardCtx, Qwen3Model};
use moeru_parallel::CommError;

use super::grads::GradBuffer;
use super::MicroBatch;
use crate::objective::{Objective, StepReport};
use crate::pipeline::executor::PipelineRun;
use crate::pipeline::schedule::Compute;

#[derive(Default)]
pub enum Schedule<'g> {
    /// Every micro-batch through the whole model on this rank, one after another.
    #[default]
    Local,
    /// This rank's stages of a pipeline, and the computes of its last step in the order
    /// they ran.
    Pipeline(PipelineRun<'g>, Vec<Compute>),
}

impl Schedule<'_> {
    /// Runs `micro` through `objective` and returns the accumulated gradients of what trains.
    /// Each micro-batch's forward gets `base` (precision, capacity) with its dropout key.
    pub fn run(
        &mut self,
        model: &mut Qwen3Model,
        objective: &dyn Objective,
        micro: &[MicroBatch],
        base: ForwardCtx,
        counts: &[f64],
        report: &mut StepReport,
    ) -> Result<GradBuffer, CommError> {
        let mut grads = GradBuffer::default();
        match self {
            Schedule::Pipeline(run, ran) => {
                let (g, order) = run.run(model, objective, micro, base, counts, report)?;
                *ran = order;
                grads = g;
            }
            Schedule::Local => {
                for mb in micro {
                    let ctx = mb.ctx(&base);
                    let loss = objective.micro_loss(model, mb, &ctx, counts, report);
                    let g = loss.backward();
                    // Only what trains gets gradients (LoRA: the adapters).
                    grads.accumulate(&mut model.trainable(), &g);
                }
            }
        }
        grads.fill_missing(&mut model.trainable());
        Ok(grads)
    }
}
