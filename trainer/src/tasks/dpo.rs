//! The DPO task: preference pairs from the pair loader, each micro-batch scored by the
//! reference before the step (live or precomputed), the DPO objective, and evaluation by the
//! loss and rewards on held-out pairs.

use burn::tensor::{Tensor, TensorData};
use moeru_data::pairs::{PairLoader, PreferencePair};
use moeru_data::LoaderState;
use moeru_models::params::to_f32_vec;
use moeru_models::ForwardCtx;

use super::lm::dropout_key;
use super::{Eval, Task};
use crate::dpo::precomputed::{PrecomputedLogps, Record};
use crate::dpo::reference::pair_logps;
use crate::dpo::{
    completion_tokens, dpo_loss, pair_micro_batch, DpoObjective, DpoSettings, Reference,
};
use crate::engine::{Engine, MicroBatch};
use crate::error::TrainError;
use crate::objective::{AuxWeights, Objective};
use crate::recipe::dpo::ReferenceKind;
use crate::session::Session;

pub struct DpoTask {
    loader: PairLoader,
    objective: DpoObjective,
    reference: Reference,
    /// Held-out pairs (`data.eval`), at most `train.eval_batches` micro-batches of them.
    eval_pairs: Vec<PreferencePair>,
}

impl DpoTask {
    /// The task over `loader`'s pairs with the recipe's reference: built (and precomputed
    /// when asked) before the first step.
    pub fn new(
        session: &Session,
        engine: &Engine,
        loader: PairLoader,
        weights: AuxWeights,
    ) -> Result<Self, TrainError> {
        let recipe = session.recipe;
        let live = live_reference(session, engine)?;
        let reference = match recipe.dpo.precompute_reference {
            true => Reference::Stored(precompute(session, engine, &live, &loader)?),
            false => live,
        };
        if session.main {
            eprintln!("dpo: reference is {}", reference.describe());
        }
        let d = &recipe.data;
        let eval_pairs = match &d.eval {
            Some(dir) => {
                let mut pairs = PairLoader::all_pairs(dir, d.seq_len)?;
                let cap = recipe.train.eval_batches as usize * recipe.train.micro_batch_size;
                pairs.truncate(if cap == 0 { pairs.len() } else { cap });
                pairs
            }
            None => Vec::new(),
        };
        Ok(Self {
            loader,
            objective: DpoObjective {
                settings: DpoSettings::from_section(&recipe.dpo),
                weights,
            },
            reference,
            eval_pairs,
        })
    }
}

/// The recipe's reference, scored live: none, the base with adapters off (fresh LoRA), a
/// frozen copy of the starting model (full fine-tuning, or an adapter continued from
/// `lora.adapter`), or a frozen model folder.
fn live_reference(session: &Session, engine: &Engine) -> Result<Reference, TrainError> {
    let recipe = session.recipe;
    Ok(match recipe.dpo.reference_kind() {
        ReferenceKind::None => Reference::Free,
        ReferenceKind::Folder(path) => {
            let model = session.load_folder(&path)?;
            let (ours, theirs) = (engine.model.config.vocab_size, model.config.vocab_size);
            if ours != theirs {
                return Err(TrainError::BadRecipe(format!(
                    "`dpo.reference`: {} has a vocabulary of {theirs} tokens but the policy's is {ours}; use a reference with the policy's tokenizer",
                    path.display()
                )));
            }
            Reference::Frozen(Box::new(model.frozen()))
        }
        ReferenceKind::Auto => match &recipe.lora {
            Some(l) if l.adapter.is_none() => Reference::AdaptersOff,
            _ => Reference::Frozen(Box::new(session.initial_model()?.frozen())),
        },
    })
}

/// The settings of a reference forward: the training forward's, without dropout.
fn reference_ctx(engine: &Engine) -> ForwardCtx {
    let c = engine.config();
    ForwardCtx::new(c.precision).with_capacity_factor(c.capacity_factor)
}

/// Every training pair's reference log-probs: read from the run folder when a previous start
/// wrote them for this dataset and reference, else computed now and written by rank 0.
fn precompute(
    session: &Session,
    engine: &Engine,
    live: &Reference,
    loader: &PairLoader,
) -> Result<PrecomputedLogps, TrainError> {
    let recipe = session.recipe;
    let pairs = PairLoader::all_pairs(&recipe.data.train, recipe.data.seq_len)?;
    let record = Record {
        dataset: loader.manifest().fingerprint(),
        reference: recipe.dpo.reference.clone(),
        pairs: pairs.len(),
    };
    let run_dir = &recipe.checkpoint.dir;
    if let Some(stored) = PrecomputedLogps::load(run_dir, &record)? {
        return Ok(stored);
    }
    let ctx = reference_ctx(engine);
    let computed =
        PrecomputedLogps::compute(live, &engine.model, &pairs, &ctx, &session.groups.dp)?;
    if session.main {
        computed.save(run_dir, &record)?;
        eprintln!(
            "dpo: reference log-probs of {} pairs written to {}",
            pairs.len(),
            run_dir.display()
        );
    }
    Ok(computed)
}

impl Task for DpoTask {
    fn objective(&self) -> &dyn Objective {
        &self.objective
    }

    fn micro_batches(
        &mut self,
        session: &Session,
        engine: &Engine,
        step: u64,
    ) -> Result<Vec<MicroBatch>, TrainError> {
        let recipe = session.recipe;
        let ctx = reference_ctx(engine);
        let mut micro = Vec::with_capacity(recipe.train.grad_accum);
        for m in 0..recipe.train.grad_accum {
            let pairs = self.loader.next_batch()?.ok_or_else(|| {
                TrainError::Dataset(format!(
                    "{}: the dataset ran out of pairs",
                    recipe.data.train.display()
                ))
            })?;
            let mut mb = pair_micro_batch(&pairs, &session.device);
            mb.dropout = Some(dropout_key(session, step, m));
            self.reference.score(&engine.model, &pairs, &mut mb, &ctx);
            micro.push(mb);
        }
        Ok(micro)
    }

    fn evaluate(
        &self,
        session: &Session,
        engine: &Engine,
        done: u64,
    ) -> Result<Option<Eval>, TrainError> {
        let every = session.recipe.train.eval_every;
        if self.eval_pairs.is_empty() || every == 0 || !done.is_multiple_of(every) {
            return Ok(None);
        }
        Ok(Some(Eval::Values(self.held_out(engine))))
    }

    fn loader_state(&self) -> LoaderState {
        self.loader.state()
    }
}

impl DpoTask {
    /// The DPO loss and rewards of the held-out pairs under the current policy, each pair
    /// scored alone (no dropout).
    fn held_out(&self, engine: &Engine) -> Vec<(String, f64)> {
        let ctx = reference_ctx(engine);
        let pairs = &self.eval_pairs;
        let policy: Vec<[f64; 2]> = pairs
            .iter()
            .map(|p| pair_logps(&engine.model, p, &ctx))
            .collect();
        let reference: Vec<[f64; 2]> = pairs
            .iter()
            .map(|p| self.reference.pair_logps(&engine.model, p, &ctx))
            .collect();
        let rows = crate::dpo::reference::rows_of;
        let policy: Vec<f32> = rows(&policy).into_iter().map(|x| x as f32).collect();
        let n = policy.len();
        let t = Tensor::<1>::from_data(TensorData::new(policy, [n]), &engine.model.device());
        // A free reference scores 0, which is what `None` means too.
        let reference = rows(&reference);
        let lens = completion_tokens(pairs);
        let l = dpo_loss(t, Some(&reference), &lens, &self.objective.settings);
        let k = pairs.len() as f64;
        let loss = to_f32_vec(l.per_pair.clone().sum())[0] as f64 / k;
        let [chosen, rejected, wins, margin, _, _] = l.metric_sums();
        [
            ("loss", loss),
            ("rewards_accuracy", wins / k),
            ("rewards_margin", margin / k),
            ("rewards_chosen", chosen / k),
            ("rewards_rejected", rejected / k),
        ]
        .map(|(n, v)| (n.to_string(), v))
        .to_vec()
    }
}
