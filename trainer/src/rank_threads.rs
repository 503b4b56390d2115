//! A job's ranks as threads of this process: the CPU default of `moeru launch` and the
//! harness for many-rank tests.

use std::sync::mpsc;
use std::time::Duration;

use moeru_parallel::CommError;

use crate::error::TrainError;
use crate::recipe::schema::Recipe;
use crate::run::{comm_timeout, mesh_for, run_rank, RunOptions, RunSummary};

/// How long an error caused by another rank's failure waits for that rank's own error.
const CAUSE_WAIT: Duration = Duration::from_secs(10);

/// Whether `e` only reports that another rank failed (an abort, a peer gone).
fn is_collateral(e: &TrainError) -> bool {
    matches!(
        e,
        TrainError::Comm(CommError::Aborted { .. } | CommError::PeerGone { .. })
    )
}

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
    // The first error ends the job. An error that only says another rank failed (the abort
    // reached this rank before the failing rank reported) waits a little for that rank's own
    // error, which names the cause; a rank that hangs is not waited for (the process exits).
    let mut collateral = None;
    loop {
        let next = match collateral {
            None => rx.recv().ok(),
            Some(_) => rx.recv_timeout(CAUSE_WAIT).ok(),
        };
        let Some((rank, result)) = next else { break };
        match result {
            Ok(summary) => summaries[rank] = Some(summary),
            Err(e) if is_collateral(&e) => {
                collateral.get_or_insert(e);
            }
            Err(e) => return Err(e),
        }
    }
    if let Some(e) = collateral {
        return Err(e);
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
