//! How a step's micro-batches run through the objective: forward, backward, accumulate.
//! One local loop, or under pipeline parallelism the rank's plan of forward / backward
//! actions and exchanges (`pipeline::executor`).
//!
//! Owns: the order of forwards and backwards. Must not: sync or apply gradients.

use moeru_models::{ForwardCtx, Qwen3Model};
use moeru_parallel::CommError;

use super::grads::GradBuffer;
use super::MicroBatch;
use crate::fault::{Fault, FaultPoint};
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
        (counts, fault): (&[f64], Option<&Fault>),
        report: &mut StepReport,
    ) -> Result<GradBuffer, CommError> {
        let mut grads = GradBuffer::default();
        match self {
            Schedule::Pipeline(run, ran) => {
                Fault::at(fault, FaultPoint::Forward);
                Fault::at(fault, FaultPoint::Backward);
                let (g, order) = run.run(model, objective, micro, base, counts, report)?;
                *ran = order;
                grads = g;
            }
            Schedule::Local => {
                for (i, mb) in micro.iter().enumerate() {
                    // The hooks fire in the last micro-batch, after the first ones ran.
                    let last = (i + 1 == micro.len()).then_some(fault).flatten();
                    let ctx = mb.ctx(&base);
                    Fault::at(last, FaultPoint::Forward);
                    let loss = objective.micro_loss(model, mb, &ctx, counts, report);
                    Fault::at(last, FaultPoint::Backward);
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
