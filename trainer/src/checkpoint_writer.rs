//! Writing a checkpoint's snapshot and sealing it: at once (`seal_now`, the step waits), or on
//! a background thread while training goes on (`checkpoint.async`, [`InFlight`]).
//!
//! A [`Snapshot`] is host memory only: every tensor already copied out of the engine
//! (`checkpoint::snapshot`), so the writer never touches the model or the optimizer. In the
//! background each rank's writer writes its files, then a marker (`.rank-NNNNN.done`, or
//! `.failed` with the reason) in the shared temp folder; rank 0's writer waits for every
//! rank's marker, removes them and commits (fsync, sha256 manifest, rename, `latest`). Until
//! that commit the folder is a `.tmp-` one, which resume never reads, so a kill at any point of
//! an asynchronous save leaves the previous checkpoint the one used. At most one save is in
//! flight: the next save, and the run's end, first wait for it ([`InFlight::finish`], a
//! collective at the same point of every rank's loop). This module must not run collectives
//! off the training thread.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use moeru_checkpoints::run_checkpoint::{step_dir_name, write_synced};
use moeru_checkpoints::{commit_checkpoint, write_contents, CheckpointContents};
use moeru_parallel::{ProcessGroup, ReduceOp};

use crate::checkpoint::save_failed;
use crate::error::TrainError;
use crate::fault::{Fault, FaultPoint};

/// One rank's part of checkpoint `step`, copied out of the engine, and where it goes.
pub struct Snapshot {
    pub run_dir: PathBuf,
    /// The shared temp folder (rank 0 created it, or failed to: `begun`).
    pub tmp: PathBuf,
    pub step: u64,
    pub mesh: serde_json::Value,
    pub keep_last: usize,
    pub fault: Option<Fault>,
    pub contents: CheckpointContents,
    /// Rank 0: whether the temp folder could be made.
    pub begun: Result<(), String>,
    pub rank: usize,
    pub world_size: usize,
}

impl Snapshot {
    /// Writes this rank's files into the temp folder (`save-write` fires after the first).
    fn write(&mut self) -> Result<(), String> {
        self.begun.clone()?;
        let fault = self.fault;
        let after_first = || Fault::at(fault.as_ref(), FaultPoint::SaveWrite);
        let contents = std::mem::take(&mut self.contents);
        write_contents(&self.tmp, contents, &after_first).map_err(|e| e.to_string())
    }

    /// Rank 0: seals the written temp folder into `step-NNNNNN`; removes it on failure.
    fn commit(&self) -> Result<PathBuf, String> {
        let after_rename = || Fault::at(self.fault.as_ref(), FaultPoint::SaveCommit);
        let target = (self.step, self.mesh.clone());
        commit_checkpoint(
            &self.run_dir,
            &self.tmp,
            target,
            self.keep_last,
            &after_rename,
        )
        .map_err(|e| {
            self.discard();
            e.to_string()
        })
    }

    fn discard(&self) {
        if self.tmp.exists() {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }

    fn failed(&self, why: &str) -> TrainError {
        save_failed(&self.run_dir, self.step, why)
    }
}

/// Writes and seals `snap` now: every rank writes its part, then rank 0 commits. Collective.
pub fn seal_now(mut snap: Snapshot, world: &ProcessGroup) -> Result<PathBuf, TrainError> {
    let written = snap.write();
    // Every rank's files are in place (or its error is reported) before rank 0 seals them.
    if any_rank_failed(written.is_err(), world)? {
        if snap.rank == 0 {
            snap.discard();
        }
        let why = written
            .err()
            .unwrap_or_else(|| "another rank could not write its part".into());
        return Err(snap.failed(&why));
    }
    let mut dest = snap.run_dir.join(step_dir_name(snap.step));
    if snap.rank == 0 {
        dest = snap.commit().map_err(|why| snap.failed(&why))?;
    }
    world.barrier()?;
    Ok(dest)
}

fn any_rank_failed(failed: bool, world: &ProcessGroup) -> Result<bool, TrainError> {
    let mut any = [if failed { 1.0 } else { 0.0 }];
    world.all_reduce(&mut any, ReduceOp::Max)?;
    Ok(any[0] > 0.0)
}

/// A save being written in the background, owned by the training loop.
#[derive(Default)]
pub struct InFlight {
    pending: Option<Pending>,
}

struct Pending {
    step: u64,
    run_dir: PathBuf,
    started: Instant,
    outcome: mpsc::Receiver<Result<PathBuf, String>>,
}

/// A finished background save: its folder and how long it took to write and seal.
pub struct Finished {
    pub dir: PathBuf,
    pub seconds: f64,
}

impl InFlight {
    /// Starts writing `snap` on a background thread. Rank 0's writer waits up to
    /// `markers_within` for the other ranks' markers before it gives up on the save.
    pub fn start(&mut self, snap: Snapshot, markers_within: Duration) -> Result<(), TrainError> {
        assert!(self.pending.is_none(), "finish the save in flight first");
        let (step, run_dir) = (snap.step, snap.run_dir.clone());
        let (tx, outcome) = mpsc::channel();
        std::thread::Builder::new()
            .name(format!("checkpoint-writer-{}", snap.rank))
            .spawn(move || {
                // The receiver is gone only when the run already ended with an error.
                let _ = tx.send(write_in_background(snap, markers_within));
            })
            .map_err(|e| TrainError::Save(format!("could not start the checkpoint writer: {e}")))?;
        self.pending = Some(Pending {
            step,
            run_dir,
            started: Instant::now(),
            outcome,
        });
        Ok(())
    }

    /// Waits for the save in flight, if any. Collective: every rank learns whether any rank's
    /// part failed, and all return the same error.
    pub fn finish(&mut self, world: &ProcessGroup) -> Result<Option<Finished>, TrainError> {
        let Some(p) = self.pending.take() else {
            return Ok(None);
        };
        let outcome = p
            .outcome
            .recv()
            .unwrap_or_else(|_| Err("the background checkpoint writer stopped".into()));
        let seconds = p.started.elapsed().as_secs_f64();
        let failed = |why: &str| save_failed(&p.run_dir, p.step, why);
        match (any_rank_failed(outcome.is_err(), world)?, outcome) {
            (false, Ok(dir)) => Ok(Some(Finished { dir, seconds })),
            (_, Err(why)) => Err(failed(&why)),
            (true, Ok(_)) => Err(failed("another rank could not write its part")),
        }
    }
}

fn marker(tmp: &Path, rank: usize, done: bool) -> PathBuf {
    let kind = if done { "done" } else { "failed" };
    tmp.join(format!(".rank-{rank:05}.{kind}"))
}

/// The writer thread: this rank's files, then its marker; rank 0 then waits for every marker
/// and commits. Returns the committed folder (rank 0) or where it will be (other ranks).
fn write_in_background(mut snap: Snapshot, markers_within: Duration) -> Result<PathBuf, String> {
    let written = snap.write();
    if snap.rank != 0 {
        // Written and synced before the marker, so rank 0 seals only complete files.
        let (done, text) = match &written {
            Ok(()) => (true, String::new()),
            Err(why) => (false, why.clone()),
        };
        let _ = write_synced(&marker(&snap.tmp, snap.rank, done), &text);
        return written.map(|()| snap.run_dir.join(step_dir_name(snap.step)));
    }
    // Rank 0 waits for the others even after its own failure, so no rank still writes into
    // the folder it removes.
    let others = wait_for_markers(&snap, markers_within);
    match written.and(others) {
        Ok(()) => snap.commit(),
        Err(why) => {
            snap.discard();
            Err(why)
        }
    }
}

/// Rank 0: waits until every other rank has left its marker, then removes them (they are not
/// part of the checkpoint). The first failure reported wins.
fn wait_for_markers(snap: &Snapshot, within: Duration) -> Result<(), String> {
    if snap.begun.is_err() {
        return Ok(()); // no folder: the others' writes failed at once
    }
    let deadline = Instant::now() + within;
    let mut failure = None;
    for rank in 1..snap.world_size {
        let (done, failed) = (
            marker(&snap.tmp, rank, true),
            marker(&snap.tmp, rank, false),
        );
        loop {
            if done.exists() {
                let _ = std::fs::remove_file(&done);
                break;
            }
            if failed.exists() {
                let why = std::fs::read_to_string(&failed).unwrap_or_default();
                failure.get_or_insert(format!("rank {rank}: {why}"));
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "rank {rank} did not finish writing its part within {:.1}s",
                    within.as_secs_f64()
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    failure.map_or(Ok(()), Err)
}
