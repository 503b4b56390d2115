//! Pipeline parallelism: the stage split (which layers each virtual stage runs), the
//! schedules (what each pipeline rank computes and exchanges in one step, as data) and the
//! executor that runs a rank's plan over its stage model.

pub mod executor;
pub mod forward;
pub mod recompute;
pub mod schedule;
pub mod stages;

use std::ops::Range;

use moeru_models::Qwen3Config;

use crate::recipe::schema::ParallelSection;
use schedule::PipelineShape;

/// A run's pipeline: the schedule's shape and each virtual stage's decoder layers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineLayout {
    pub shape: PipelineShape,
    /// Virtual stage `s` (chunk `s / pp` of pipeline rank `s % pp`) runs `stages[s]`.
    pub stages: Vec<Range<usize>>,
}

impl PipelineLayout {
    /// The layout `parallel` asks for with `micro_batches` (`train.grad_accum`) per step:
    /// `parallel.pp_layers` or the cost-balanced split; the message names the key to change.
    pub fn new(
        p: &ParallelSection,
        micro_batches: usize,
        config: &Qwen3Config,
    ) -> Result<Self, String> {
        let shape = PipelineShape {
            pp: p.pp,
            virtual_chunks: p.pp_virtual,
            micro_batches,
            group: p.pp,
        };
        if p.pp_virtual > 1 && !micro_batches.is_multiple_of(p.pp) {
            return Err(format!(
                "`parallel.pp_virtual` = {} (interleaved 1F1B) needs `train.grad_accum` to be a multiple of `parallel.pp` = {}; it is {micro_batches}",
                p.pp_virtual, p.pp
            ));
        }
        shape
            .check()
            .map_err(|e| format!("`parallel.pp` / `parallel.pp_virtual`: {e}"))?;
        let (n, layers) = (shape.stages(), config.num_hidden_layers);
        let stages = match &p.pp_layers {
            Some(counts) => stages::explicit(counts, layers, n)?,
            None => {
                let (costs, head) = stages::layer_costs(config);
                stages::balanced(&costs, head, n).map_err(|e| {
                    format!("`parallel.pp` × `parallel.pp_virtual` = {n}: {e} (num_hidden_layers = {layers})")
                })?
            }
        };
        Ok(Self { shape, stages })
    }

    /// The whole model as one stage, `micro_batches` a step: what runs a recompute without
    /// pipeline parallelism.
    pub fn single(micro_batches: usize, layers: usize) -> Self {
        let shape = PipelineShape {
            pp: 1,
            virtual_chunks: 1,
            micro_batches,
            group: 1,
        };
        // One stage of all the layers.
        #[allow(clippy::single_range_in_vec_init)]
        let stages = vec![0..layers];
        Self { shape, stages }
    }

    /// The layer ranges pipeline rank `p` holds, one per model chunk, ascending.
    pub fn rank_layers(&self, p: usize) -> Vec<Range<usize>> {
        (0..self.shape.virtual_chunks)
            .map(|c| self.stages[c * self.shape.pp + p].clone())
            .collect()
    }
}
