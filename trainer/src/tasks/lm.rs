//! The pretraining / SFT task: the language-model objective over packed (or padded) token
//! batches, evaluated by the held-out loss.

use moeru_data::{DataLoader, LoaderState};
use moeru_models::DropoutKey;

use super::{Eval, Task};
use crate::engine::{Engine, MicroBatch};
use crate::error::TrainError;
use crate::eval::evaluate;
use crate::objective::{LmObjective, Objective};
use crate::recipe::schema::Recipe;
use crate::session::Session;

/// Token batches and the LM objective.
pub struct LmTask {
    pub loader: DataLoader,
    pub objective: LmObjective,
}

impl Task for LmTask {
    fn objective(&self) -> &dyn Objective {
        &self.objective
    }

    fn micro_batches(
        &mut self,
        session: &Session,
        _engine: &Engine,
        step: u64,
    ) -> Result<Vec<MicroBatch>, TrainError> {
        micro_batches(session, &mut self.loader, step)
    }

    fn evaluate(
        &self,
        session: &Session,
        engine: &Engine,
        done: u64,
    ) -> Result<Option<Eval>, TrainError> {
        Ok(evaluate_if_due(session.recipe, engine, done)?.map(Eval::Loss))
    }

    fn loader_state(&self) -> LoaderState {
        self.loader.state()
    }
}

/// This rank's `grad_accum` micro-batches of step `step`, each with its LoRA dropout key.
fn micro_batches(
    session: &Session,
    loader: &mut DataLoader,
    step: u64,
) -> Result<Vec<MicroBatch>, TrainError> {
    let recipe = session.recipe;
    let accum = recipe.train.grad_accum;
    let mut micro = Vec::with_capacity(accum);
    for m in 0..accum {
        let samples = loader.next_batch()?.ok_or_else(|| {
            TrainError::Dataset(format!(
                "{}: the dataset ran out of samples",
                recipe.data.train.display()
            ))
        })?;
        let mut mb = MicroBatch::from_samples(&samples, &session.device);
        mb.dropout = Some(dropout_key(session, step, m));
        micro.push(mb);
    }
    Ok(micro)
}

/// The evaluation loss when one is due after step `done`, on the same samples as a one-rank
/// run: on rank 0 only, or under model parallelism on every rank alike.
fn evaluate_if_due(recipe: &Recipe, engine: &Engine, done: u64) -> Result<Option<f64>, TrainError> {
    let t = &recipe.train;
    let (Some(eval_dir), true) = (
        &recipe.data.eval,
        t.eval_every > 0 && done.is_multiple_of(t.eval_every),
    ) else {
        return Ok(None);
    };
    let r = evaluate(
        &engine.model,
        engine.config().precision,
        eval_dir,
        recipe.data.seq_len,
        t.micro_batch_size,
        t.eval_batches,
        engine.pipeline(),
    )?;
    if let Some(p) = engine.parallel() {
        p.boundaries.take_error()?;
    }
    Ok(Some(r.loss))
}

/// The LoRA dropout key of micro-batch `m` of step `step` on this rank: keyed by the global
/// micro-batch index, so the same sequences get the same mask at any DP size.
pub fn dropout_key(session: &Session, step: u64, m: usize) -> DropoutKey {
    let (recipe, dp) = (session.recipe, &session.groups.dp);
    let accum = recipe.train.grad_accum as u64;
    DropoutKey {
        seed: recipe.train.seed,
        counter: (step * accum + m as u64) * dp.size() as u64 + dp.rank() as u64,
    }
}
