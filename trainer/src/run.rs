//! `moeru train` on one rank: open the session and run the recipe's task loop. A
//! single-process run is a world of one rank.

use moeru_parallel::{thread_world, ProcessGroup};

use crate::error::TrainError;
use crate::fault::Fault;
use crate::lora::TrainableSizes;
use crate::pipeline::schedule::Compute;
use crate::recipe::schema::Recipe;
use crate::session::Session;
pub use crate::session::{comm_timeout, mesh_for};
use crate::tasks;

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Fail unless a checkpoint to resume from exists (`moeru train --resume`).
    pub require_resume: bool,
    /// Stop after this many steps in this process, as if interrupted (tests).
    pub stop_after: Option<u64>,
    /// Test hook (see `Fault`).
    pub fault: Option<Fault>,
    /// This process's index among the ranks of its node (picks the GPU for `device: cuda`);
    /// None: the world rank (ranks as threads of one process).
    pub local_rank: Option<usize>,
}

#[derive(Debug, Clone)]
pub struct RunSummary {
    pub start_step: u64,
    pub end_step: u64,
    pub last_loss: f64,
    /// Trainable parameters and optimizer state of this rank.
    pub sizes: TrainableSizes,
    /// World rank of the process or thread that ran it (the CLI reports rank 0's only).
    pub rank: usize,
    /// Under pipeline parallelism, the computes of this rank's last step in the order they
    /// ran.
    pub pipeline_order: Option<Vec<Compute>>,
}

/// Runs (or resumes) the training described by `recipe` in this process, on one rank.
pub fn run_training(recipe: &Recipe, opts: &RunOptions) -> Result<RunSummary, TrainError> {
    let world = thread_world(1, comm_timeout(recipe)).remove(0);
    run_rank(recipe, opts, &world)
}

/// Runs one rank of the job `world`. On failure, tells the other ranks (so they stop instead
/// of waiting out the timeout) and returns the error.
pub fn run_rank(
    recipe: &Recipe,
    opts: &RunOptions,
    world: &ProcessGroup,
) -> Result<RunSummary, TrainError> {
    let result = Session::open(recipe, opts, world).and_then(|s| tasks::run(&s, opts));
    if let Err(e) = &result {
        world.abort(&e.to_string());
    }
    result
}
