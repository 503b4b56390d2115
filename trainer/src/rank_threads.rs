//! A job's ranks as threads of this process: the CPU default of `moeru launch` and the
//! harness for many-rank tests.

use std::sync::mpsc;

use crate::error::TrainError;
use crate::recipe::schema::Recipe;
use crate::run::{comm_timeout, mesh_for, run_rank, RunOptions, RunSummary};

/// `ranks` ranks as threads of this process; returns rank 0's summary, or the first error.
pub fn run_threads(
    recipe: &Recipe,
    opts: &RunOptions,
    ranks: usize,
) -> Result<RunSummary, TrainError> {
    let mut all = run_threads_summaries(recipe, opts, ranks)?;
    Ok(all.swap_remove(0))
}

/// `ranks` ranks as threads of this process; returns every rank's summary in rank order, or
/// the first error.
pub fn run_threads_summaries(
    recipe: &Recipe,
    opts: &RunOptions,
    ranks: usize,
) -> Result<Vec<RunSummary>, TrainError> {
    mesh_for(recipe, ranks)?;
    let (tx, rx) = mpsc::channel();
    for (rank, world) in moeru_parallel::thread_world(ranks, comm_timeout(recipe))
        .into_iter()
        .enumerate()
    {
        let (recipe, opts, tx) = (recipe.clone(), opts.clone(), tx.clone());
        std::thread::Builder::new()
            .name(format!("rank-{rank}"))
            .spawn(move || {
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run_rank(&recipe, &opts, &world)
                }))
                .unwrap_or_else(|_| {
                    let msg = format!("rank {rank} panicked");
                    world.abort(&msg);
                    Err(TrainError::Rank(msg))
                });
                let _ = tx.send((rank, result));
            })
            .map_err(|e| TrainError::Rank(format!("cannot start rank {rank}: {e}")))?;
    }
    drop(tx);
    let mut summaries: Vec<Option<RunSummary>> = vec![None; ranks];
    // The first error ends the job; a rank that hangs is not waited for (the process exits).
    for (rank, result) in rx {
        summaries[rank] = Some(result?);
    }
    summaries
        .into_iter()
        .enumerate()
        .map(|(rank, s)| {
            s.ok_or_else(|| {
                TrainError::Bug(format!(
                    "rank {rank} did not report; this is a bug in moeru, please report it"
                ))
            })
        })
        .collect()
}
