//! How a step's micro-batches run through the objective: forward, backward, accumulate.
//! Today one local loop; a pipeline schedule (a list of forward / backward actions per stage)
//! takes its place under pipeline parallelism.
//!
//! Owns: the order of forwards and backwards. Must not: sync or apply gradients.

use moeru_models::{ForwardCtx, Qwen3Model};

use super::grads::GradBuffer;
use super::MicroBatch;
use crate::objective::{Objective, StepReport};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Schedule {
    /// Every micro-batch through the whole model on this rank, one after another.
    #[default]
    Local,
}

impl Schedule {
    /// Runs `micro` through `objective` and returns the accumulated gradients of what trains.
    /// Each micro-batch's forward gets `base` (precision, capacity) with its dropout key.
    pub fn run(
        &self,
        model: &mut Qwen3Model,
        objective: &dyn Objective,
        micro: &[MicroBatch],
        base: ForwardCtx,
        counts: &[f64],
        report: &mut StepReport,
    ) -> GradBuffer {
        let mut grads = GradBuffer::default();
        match self {
            Schedule::Local => {
                for mb in micro {
                    let ctx = base.with_dropout(mb.dropout);
                    let loss = objective.micro_loss(model, mb, &ctx, counts, report);
                    let g = loss.backward();
                    // Only what trains gets gradients (LoRA: the adapters).
                    grads.accumulate(&mut model.trainable(), &g);
                }
            }
        }
        grads
    }
}
