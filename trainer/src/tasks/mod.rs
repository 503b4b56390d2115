//! The training loop, shared by every task, reading top to bottom: batches → engine step →
//! log / eval / save. A [`Task`] says where a step's micro-batches come from, what loss they
//! train and how it is evaluated; setup is the session's; the step is the engine's.

pub mod dpo;
pub mod grpo;
pub mod lm;
pub mod report;
pub mod setup;

use std::path::PathBuf;
use std::time::Instant;

use moeru_checkpoints::run_checkpoint::step_dir_name;
use moeru_data::LoaderState;
use moeru_models::DeviceSpec;

use crate::checkpoint::{save, snapshot, SaveTarget, TrainerState};
use crate::checkpoint_writer::{Finished, InFlight};
use crate::engine::{Engine, MicroBatch};
use crate::error::TrainError;
use crate::fault::{Fault, FaultPoint};
use crate::lora::BaseFingerprint;
use crate::metrics::MetricsSink;
use crate::objective::{LmObjective, Objective};
use crate::recipe::recipe_hash;
use crate::run::{RunOptions, RunSummary};
use crate::schedule::learning_rate;
use crate::session::{comm_timeout, Loader, Session, Start};
use report::{step_metrics, TrafficMark};
use setup::{aux_weights, build_engine, report_sizes};

/// What one task trains on and how it is evaluated.
pub trait Task {
    fn objective(&self) -> &dyn Objective;

    /// This rank's `train.grad_accum` micro-batches of step `step` (0-based).
    fn micro_batches(
        &mut self,
        session: &Session,
        engine: &Engine,
        step: u64,
    ) -> Result<Vec<MicroBatch>, TrainError>;

    /// The evaluation after step `done`, when one is due.
    fn evaluate(
        &self,
        session: &Session,
        engine: &Engine,
        done: u64,
    ) -> Result<Option<Eval>, TrainError>;

    /// The data stream's position, for a checkpoint.
    fn loader_state(&self) -> LoaderState;

    /// The task's own metrics of the step just taken that its objective does not report
    /// (GRPO: the rollouts'), global values.
    fn step_metrics(&mut self) -> Vec<(String, f64)> {
        Vec::new()
    }
}

/// An evaluation result: the held-out LM loss, or a task's named values.
pub enum Eval {
    Loss(f64),
    Values(Vec<(String, f64)>),
}

/// Trains (or resumes) `session`'s recipe on this rank.
pub fn run(session: &Session, opts: &RunOptions) -> Result<RunSummary, TrainError> {
    let recipe = session.recipe;
    let Start {
        model,
        optimizer,
        loader,
        step: start_step,
        tokens_seen,
        lora_base,
    } = session.start(opts.require_resume)?;
    let mut engine = build_engine(session, model, optimizer);
    let sizes = report_sizes(session, &mut engine);
    let mut task = task_for(session, &engine, loader)?;
    let t = &recipe.train;
    let mut metrics = match session.main {
        true => Some(MetricsSink::open(
            &recipe.logging.dir,
            recipe.logging.tensorboard,
            recipe.logging.progress,
            t.steps,
            start_step,
        )?),
        false => None,
    };
    let mut state = LoopState {
        tokens_seen,
        lora_base,
        in_flight: InFlight::default(),
    };
    let end = opts
        .stop_after
        .map_or(t.steps, |n| (start_step + n).min(t.steps));
    let mut last_loss = f64::NAN;
    if t.eval_on_start && start_step == 0 {
        log_eval(session, &engine, task.as_ref(), metrics.as_mut(), 0)?;
    }
    for step in start_step..end {
        let fault = Fault::armed(opts.fault, session.world.rank(), step + 1);
        Fault::at(fault.as_ref(), FaultPoint::Start);
        engine.arm_fault(fault);
        let lr = learning_rate(recipe.optim.lr, &recipe.schedule, step, t.steps);
        let began = Instant::now();
        let micro = task.micro_batches(session, &engine, step)?;
        let traffic = TrafficMark::take(session);
        let report = engine.step(task.objective(), &micro, lr)?;
        let comm = traffic.delta(session);
        state.tokens_seen += report.tokens;
        last_loss = report.loss;
        let done = step + 1;
        if let Some(metrics) = &mut metrics {
            let elapsed = began.elapsed().as_secs_f64().max(1e-9);
            let ep = session.mesh.sizes.ep;
            let mut line = step_metrics(done, lr, &report, elapsed, comm, ep);
            line.task.extend(task.step_metrics());
            metrics.log_step(&line)?;
        }
        log_eval(session, &engine, task.as_ref(), metrics.as_mut(), done)?;
        let paused = Instant::now();
        let saves = save_if_due(
            session,
            &mut engine,
            task.as_ref(),
            &mut state,
            (done, lr),
            fault,
        )?;
        if let Some(metrics) = &mut metrics {
            saves.print(metrics, paused.elapsed().as_secs_f64());
        }
    }
    // The final save is waited for.
    let paused = Instant::now();
    let last = SaveNotes {
        finished: state.in_flight.finish(session.world)?,
        ..Default::default()
    };
    if let Some(mut metrics) = metrics {
        last.print(&mut metrics, paused.elapsed().as_secs_f64());
        metrics.finish()?;
    }
    Ok(RunSummary {
        start_step,
        end_step: end,
        last_loss,
        sizes,
        rank: session.world.rank(),
        pipeline_order: engine.pipeline_order().map(<[_]>::to_vec),
    })
}

/// Evaluates after step `done` when due, and logs it on the reporting rank.
fn log_eval(
    session: &Session,
    engine: &Engine,
    task: &dyn Task,
    metrics: Option<&mut MetricsSink>,
    done: u64,
) -> Result<(), TrainError> {
    // A sharded model evaluates on every rank (its collectives need them all).
    if !session.main && engine.parallel().is_none() {
        return Ok(());
    }
    match (task.evaluate(session, engine, done)?, metrics) {
        (Some(Eval::Loss(loss)), Some(m)) => m.log_eval(done, loss)?,
        (Some(Eval::Values(values)), Some(m)) => m.log_eval_values(done, &values)?,
        _ => {}
    }
    Ok(())
}

/// The recipe's task over `loader`'s data.
fn task_for(
    session: &Session,
    engine: &Engine,
    loader: Loader,
) -> Result<Box<dyn Task>, TrainError> {
    let weights = aux_weights(session.recipe, &engine.model.config);
    Ok(match loader {
        Loader::Tokens(loader) => Box::new(lm::LmTask {
            loader,
            objective: LmObjective { weights },
        }),
        Loader::Pairs(loader) => Box::new(dpo::DpoTask::new(session, engine, loader, weights)?),
        Loader::Prompts(loader) => Box::new(grpo::GrpoTask::new(session, loader, weights)?),
    })
}

/// What the loop carries from step to step besides the engine and the task.
struct LoopState {
    tokens_seen: u64,
    /// LoRA runs on a model folder: the frozen base's digest at start.
    lora_base: Option<BaseFingerprint>,
    /// `checkpoint.async`: the save being written in the background.
    in_flight: InFlight,
}

/// What a step's saving did, for the log.
#[derive(Default)]
struct SaveNotes {
    /// A checkpoint sealed now.
    saved: Option<PathBuf>,
    /// A background save that finished (it is waited for before the next one starts).
    finished: Option<Finished>,
    /// The step whose background save started.
    started: Option<u64>,
}

impl SaveNotes {
    /// Logs the saves with `paused`, the seconds training waited for them.
    fn print(self, metrics: &mut MetricsSink, paused: f64) {
        if let Some(f) = &self.finished {
            metrics.println(&format!(
                "saved {} (written in the background in {:.3} s)",
                f.dir.display(),
                f.seconds
            ));
        }
        let pause = format!("training paused {paused:.4} s");
        if let Some(dir) = self.saved {
            metrics.println(&format!("saved {} ({pause})", dir.display()));
        } else if let Some(step) = self.started {
            metrics.println(&format!(
                "saving {} in the background ({pause})",
                step_dir_name(step)
            ));
        } else if self.finished.is_some() && paused >= 0.001 {
            metrics.println(&format!("waited for the background save: {pause}"));
        }
    }
}

/// Saves a checkpoint after step `done` when it is due (every `checkpoint.every` steps and
/// at the end): sealed now, or under `checkpoint.async` snapshotted now and written in the
/// background once the save before it has finished.
fn save_if_due(
    session: &Session,
    engine: &mut Engine,
    task: &dyn Task,
    st: &mut LoopState,
    (done, lr): (u64, f64),
    fault: Option<Fault>,
) -> Result<SaveNotes, TrainError> {
    let recipe = session.recipe;
    let every = recipe.checkpoint.every;
    if done != recipe.train.steps && (every == 0 || !done.is_multiple_of(every)) {
        return Ok(SaveNotes::default());
    }
    if let Some(run) = engine.pipeline() {
        if !run.tied_copies_equal(&engine.model)? {
            return Err(TrainError::Bug(format!("the tied embedding's copies on the first and last pipeline stage differ at step {done}; this is a bug in moeru, please report it")));
        }
    }
    let state = TrainerState {
        step: done,
        tokens_seen: st.tokens_seen,
        loader: task.loader_state(),
        recipe_hash: recipe_hash(recipe),
        seed: recipe.train.seed,
        lr,
        lora_base: base_unchanged(session, engine, st.lora_base.as_ref(), done)?,
    };
    let target = SaveTarget {
        fault,
        ..save_target(session)
    };
    if !recipe.checkpoint.asynchronous {
        let saved = Some(save(&target, engine, &state, session.world)?);
        return Ok(SaveNotes {
            saved,
            ..Default::default()
        });
    }
    let finished = st.in_flight.finish(session.world)?;
    let snap = snapshot(&target, engine, &state, session.world)?;
    st.in_flight.start(snap, comm_timeout(recipe))?;
    Ok(SaveNotes {
        finished,
        started: Some(done),
        ..Default::default()
    })
}

/// The digest of the LoRA base as it is now, so a checkpoint proves the base stayed frozen.
fn base_unchanged(
    session: &Session,
    engine: &mut Engine,
    at_start: Option<&BaseFingerprint>,
    done: u64,
) -> Result<Option<BaseFingerprint>, TrainError> {
    let (Some(start), Some(path)) = (at_start, &session.recipe.model.path) else {
        return Ok(None);
    };
    let now = session.base_fingerprint(&mut engine.model, path)?;
    if now != *start {
        return Err(TrainError::Bug(format!(
            "the frozen LoRA base changed during training (weights digest {} at start, {} at step {done}); this is a bug in moeru, please report it",
            start.digest, now.digest
        )));
    }
    Ok(Some(now))
}

fn save_target<'a>(session: &Session<'a>) -> SaveTarget<'a> {
    let (s, recipe) = (session.mesh.sizes, session.recipe);
    SaveTarget {
        run_dir: &recipe.checkpoint.dir,
        keep_last: recipe.checkpoint.keep_last,
        mesh: serde_json::json!({
            "dp": s.dp, "tp": s.tp, "ep": s.ep, "pp": s.pp,
            "zero_stage": recipe.parallel.zero_stage,
        }),
        fault: None,
        host_copy_now: recipe.checkpoint.asynchronous
            && recipe
                .device
                .parse::<DeviceSpec>()
                .is_ok_and(DeviceSpec::is_cuda),
    }
}
