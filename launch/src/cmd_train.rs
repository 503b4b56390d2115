use std::path::PathBuf;

use moeru_trainer::recipe;
use moeru_trainer::{Fault, RunOptions, TrainError};

#[derive(clap::Args)]
pub struct TrainArgs {
    /// The YAML recipe (keys: docs/RECIPES.md).
    recipe: PathBuf,
    /// Override a recipe key, e.g. `--set train.steps=50` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// The device: `cpu`, `cuda` (one GPU per local rank) or `cuda:N`; the same as
    /// `--set device=...`.
    #[arg(long)]
    device: Option<String>,
    /// Require a checkpoint to resume from (by default a run resumes when its checkpoint
    /// folder holds a valid checkpoint and `checkpoint.resume` is true).
    #[arg(long)]
    resume: bool,
    /// Stop after this many steps of this invocation, as if interrupted (exercises resume).
    #[arg(long, hide = true)]
    stop_after: Option<u64>,
}

/// The `MOERU_FAULT` test hook, armed only before the launcher's first restart.
pub fn fault_from_env() -> Result<Option<Fault>, TrainError> {
    let restarted = std::env::var("MOERU_RESTART_COUNT").is_ok_and(|v| v != "0");
    match std::env::var("MOERU_FAULT") {
        Ok(text) if !restarted && !text.is_empty() => {
            Fault::parse(&text).map(Some).map_err(TrainError::Setup)
        }
        _ => Ok(None),
    }
}

pub fn run(args: TrainArgs) -> Result<(), TrainError> {
    let mut overrides = args.overrides;
    if let Some(device) = args.device {
        overrides.push(format!("device={device}"));
    }
    let recipe = recipe::load(&args.recipe, &overrides)?;
    let opts = RunOptions {
        require_resume: args.resume,
        stop_after: args.stop_after,
        fault: fault_from_env()?,
        local_rank: None,
    };
    let summary = crate::ranks::run_job(&recipe, &opts)?;
    // Every process of a multi-process job returns a summary; the job's is rank 0's.
    if summary.rank == 0 && summary.end_step >= summary.start_step {
        eprintln!(
            "trained steps {}..{}; last loss {:.4}; checkpoints in {}",
            summary.start_step,
            summary.end_step,
            summary.last_loss,
            recipe.checkpoint.dir.display()
        );
    }
    Ok(())
}
