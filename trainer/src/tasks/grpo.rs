//! The GRPO task: at each generation boundary (every `grpo.num_iterations` steps) this rank
//! draws its whole prompt groups of the step's prompts, completes each `num_generations` times
//! with the policy, scores the completions, and normalises the rewards over the global batch
//! (gathered over the data-parallel group); the steps until the next boundary train on those
//! rollouts. Evaluation completes every held-out prompt once sampled and once greedy.
//!
//! Owns: the rollout buffer and its metrics. Must not: step or save (the loop does).

use std::time::Instant;

use burn::tensor::Tensor;
use moeru_data::prompts::{PromptLoader, PromptSet};
use moeru_data::tokenizer::TextTokenizer;
use moeru_data::LoaderState;
use moeru_models::sampling::Sampling;
use moeru_models::{ForwardCtx, Qwen3Model, RouteReplay};
use std::sync::Arc;

use super::lm::dropout_key;
use super::{Eval, Task};
use crate::engine::{Engine, MicroBatch};
use crate::error::TrainError;
use crate::grpo::advantage::{advantages, combine, nan_mean};
use crate::grpo::global::GlobalBatch;
use crate::grpo::reward::{Completion, Reward};
use crate::grpo::rollout::{generate, log_completions, micro_batch, score, Rollout, RolloutConfig};
use crate::grpo::{GrpoLossSettings, GrpoObjective};
use crate::objective::{AuxWeights, Objective};
use crate::recipe::grpo::RouterReplay;
use crate::recipe::schema::Recipe;
use crate::session::{grpo_tokenizer, recipe_config, Session};

/// The generation index evaluation streams use, so every evaluation draws the same uniforms.
const EVAL_GENERATION: u64 = u64::MAX;

pub struct GrpoTask {
    loader: PromptLoader,
    eval: Option<PromptSet>,
    tokenizer: TextTokenizer,
    rewards: Vec<Reward>,
    objective: GrpoObjective,
    rollout: RolloutConfig,
    reference: Option<ReferenceModel>,
    /// The current generation batch: its index and this rank's micro-batches.
    buffer: Option<(u64, Vec<MicroBatch>)>,
    /// Metrics of the generation the last step trained on (global values).
    metrics: Vec<(String, f64)>,
    /// On a MoE model, the routes training forwards replay (`moe.router_replay`).
    replay: Option<RouterReplay>,
}

/// What the KL term compares against.
enum ReferenceModel {
    /// Fresh LoRA adapters start at the base: the policy with adapters off.
    AdaptersOff,
    /// A frozen copy of the starting weights (or adapters).
    Frozen(Box<Qwen3Model>),
}

impl GrpoTask {
    pub fn new(
        session: &Session,
        loader: PromptLoader,
        weights: AuxWeights,
    ) -> Result<Self, TrainError> {
        let recipe = session.recipe;
        crate::recipe::grpo::rollout_batch(recipe, session.groups.dp.size())
            .map_err(|msg| TrainError::BadRecipe(format!("`grpo.prompts_per_step` {msg}")))?;
        let tokenizer = TextTokenizer::from_file(&grpo_tokenizer(recipe)?)?;
        let rewards = (recipe.rewards.iter().map(Reward::new)).collect::<Result<Vec<_>, _>>()?;
        let eval = match &recipe.data.eval {
            Some(path) => {
                let room = recipe.data.seq_len - recipe.generation.max_new_tokens;
                let think = recipe.generation.enable_thinking;
                Some(PromptSet::read(path, &tokenizer, think, room)?)
            }
            None => None,
        };
        for set in std::iter::once(&loader.set).chain(eval.as_ref()) {
            check_fields(set, &rewards)?;
        }
        let reference = match recipe.grpo.beta > 0.0 {
            false => None,
            true => Some(match &recipe.lora {
                Some(l) if l.adapter.is_none() => ReferenceModel::AdaptersOff,
                _ => ReferenceModel::Frozen(Box::new(session.initial_model()?.frozen())),
            }),
        };
        Ok(Self {
            rollout: rollout_config(recipe, &tokenizer)?,
            objective: GrpoObjective {
                settings: loss_settings(recipe),
                temperature: recipe.generation.temperature,
                weights,
            },
            loader,
            eval,
            tokenizer,
            rewards,
            reference,
            buffer: None,
            metrics: Vec::new(),
            replay: (recipe_config(recipe)?.moe.is_some()).then_some(recipe.moe.router_replay),
        })
    }
}

/// Every row of `set` has the fields the rewards read.
fn check_fields(set: &PromptSet, rewards: &[Reward]) -> Result<(), TrainError> {
    for r in rewards {
        let Some(field) = r.field() else { continue };
        if let Some(i) = set
            .rows
            .iter()
            .position(|row| !row.fields.contains_key(field))
        {
            return Err(TrainError::Dataset(format!(
                "{}: row {i} has no field `{field}`, which reward {:?} compares against; add it to every row",
                set.path.display(),
                r.name
            )));
        }
    }
    Ok(())
}

fn loss_settings(recipe: &Recipe) -> GrpoLossSettings {
    let g = &recipe.grpo;
    GrpoLossSettings {
        loss_type: g.loss_type,
        beta: g.beta,
        epsilon_low: g.epsilon,
        epsilon_high: g.epsilon_high(),
        kl_bias_correction: g.kl_bias_correction,
        delta: g.delta,
        dual_clip_c: g.dual_clip_c,
        logratio_clamp: g.logratio_clamp,
        kl_clamp: g.kl_clamp,
        max_completion_length: recipe.generation.max_new_tokens,
    }
}

/// The stop ids: the model folder's (generation_config.json, then config.json), else the
/// tokenizer's `<|im_end|>` and `<|endoftext|>`.
fn rollout_config(recipe: &Recipe, tokenizer: &TextTokenizer) -> Result<RolloutConfig, TrainError> {
    let from_folder = match &recipe.model.path {
        Some(dir) => moeru_checkpoints::StopIds::read(dir)?,
        None => Default::default(),
    };
    let mut eos = from_folder.eos;
    if eos.is_empty() {
        eos = (["<|im_end|>", "<|endoftext|>"].iter())
            .filter_map(|t| tokenizer.token_id(t).map(i64::from))
            .collect();
    }
    if eos.is_empty() {
        return Err(TrainError::BadRecipe(format!(
            "`data.task: grpo`: the model folder names no `eos_token_id` and the tokenizer {} has neither <|im_end|> nor <|endoftext|>; add `eos_token_id` to the model's generation_config.json",
            tokenizer.path().display()
        )));
    }
    let g = &recipe.generation;
    let rows = recipe.train.micro_batch_size * recipe.train.grad_accum;
    Ok(RolloutConfig {
        max_new_tokens: g.max_new_tokens,
        pad_token_id: from_folder.pad.unwrap_or(eos[0]),
        eos_token_ids: eos,
        sampling: sampling(recipe, recipe.train.seed),
        batch_size: g.batch_size.unwrap_or(rows),
        record: true,
    })
}

/// Each reward function's scores per completion; `None` where it did not score one.
type RewardColumns = Vec<Vec<Option<f64>>>;

fn sampling(recipe: &Recipe, seed: u64) -> Option<Sampling> {
    let g = &recipe.generation;
    (g.temperature > 0.0).then_some(Sampling {
        temperature: g.temperature,
        top_k: g.top_k,
        top_p: g.top_p,
        min_p: g.min_p,
        seed,
    })
}

/// The forward settings of generation and scoring: the training forward's, without dropout.
fn plain_ctx(engine: &Engine) -> ForwardCtx {
    let c = engine.config();
    ForwardCtx::new(c.precision).with_capacity_factor(c.capacity_factor)
}

impl GrpoTask {
    /// This rank's slots of generation `generation`: (slot, prompt row, prompt ids).
    fn slots(&self, session: &Session, generation: u64) -> Vec<(usize, usize, Vec<i32>)> {
        let g = &session.recipe.grpo;
        let (dp, rank) = (session.groups.dp.size(), session.groups.dp.rank());
        let per_rank = g.prompts_per_step / dp;
        let l = &self.loader;
        let mut out = Vec::new();
        for j in rank * per_rank..(rank + 1) * per_rank {
            let position = generation * g.prompts_per_step as u64 + j as u64;
            let row = l.set.at(l.seed, l.shuffle, position);
            for s in 0..g.num_generations {
                out.push((j * g.num_generations + s, row, l.set.rows[row].ids.clone()));
            }
        }
        out
    }

    /// `r`'s completion as text: without its stop token and special tokens.
    fn text(&self, r: &Rollout) -> String {
        let eos = &self.rollout.eos_token_ids;
        let body = match r.stopped {
            true => &r.completion[..r.completion.len() - 1],
            false => &r.completion[..],
        };
        let ids: Vec<u32> = (body.iter().filter(|t| !eos.contains(t)))
            .map(|&t| t as u32)
            .collect();
        self.tokenizer.decode(&ids)
    }

    /// The rewards of `rollouts`, each function's scores (`None`: unscored) then the sum.
    fn score(
        &self,
        set: &PromptSet,
        rollouts: &[Rollout],
    ) -> Result<(RewardColumns, Vec<f64>), TrainError> {
        let completions: Vec<Completion> = rollouts
            .iter()
            .map(|r| Completion {
                prompt: &set.rows[r.prompt],
                text: self.text(r),
                ids: r.completion.clone(),
                stopped: r.stopped,
            })
            .collect();
        let scores =
            (self.rewards.iter().map(|f| f.score(&completions))).collect::<Result<Vec<_>, _>>()?;
        let weights: Vec<f64> = self.rewards.iter().map(|f| f.weight).collect();
        let total = combine(&scores, &weights, rollouts.len());
        Ok((scores, total))
    }

    /// Generates, scores and lays out generation `generation` (see the module docs).
    fn roll_out(
        &mut self,
        session: &Session,
        engine: &Engine,
        generation: u64,
        step: u64,
    ) -> Result<Vec<MicroBatch>, TrainError> {
        let recipe = session.recipe;
        let (g, ctx) = (&recipe.grpo, plain_ctx(engine));
        let policy = engine.model.frozen();
        let began = Instant::now();
        let slots = self.slots(session, generation);
        let rollouts = generate(&policy, &slots, generation, &self.rollout, &ctx);
        let seconds = began.elapsed().as_secs_f64();
        let (scores, total) = self.score(&self.loader.set, &rollouts)?;
        if g.log_completions {
            let path = (recipe.logging.dir)
                .join(format!("completions-rank{}.jsonl", session.world.rank()));
            let texts: Vec<String> = rollouts.iter().map(|r| self.text(r)).collect();
            let names: Vec<String> = self.rewards.iter().map(|f| f.name.clone()).collect();
            log_completions(
                &path,
                generation,
                &rollouts,
                &texts,
                (&names, &scores, &total),
            )?;
        }
        let global = GlobalBatch::gather(session, &rollouts, &scores, &total)?;
        let adv = advantages(
            &global.rewards,
            g.num_generations,
            g.scale_rewards,
            g.adv_eps,
        );
        self.metrics = global.metrics(&self.rewards, &adv.zero_std);
        let generated: usize = rollouts.iter().map(|r| r.completion.len()).sum();
        self.metrics.push((
            "generation_tokens_per_s".into(),
            generated as f64 / seconds.max(1e-9),
        ));
        let mbs = recipe.train.micro_batch_size;
        let mut micro = Vec::new();
        for (m, chunk) in rollouts.chunks(mbs).enumerate() {
            let a: Vec<f32> = chunk.iter().map(|r| adv.values[r.slot] as f32).collect();
            let refs: Vec<&Rollout> = chunk.iter().collect();
            let replay = self.replay == Some(RouterReplay::Rollout);
            let mask = g.mask_truncated_completions;
            let mut mb = micro_batch(&refs, &a, mask, replay, &session.device);
            let (old, reference) = self.scored(&policy, &mut mb, g.num_iterations > 1, &ctx);
            let rows = mb.rollout.as_mut().expect("set by micro_batch");
            (rows.old, rows.reference) = (old, reference);
            mb.dropout = Some(dropout_key(session, step, m));
            micro.push(mb);
        }
        self.loader.consumed = (generation + 1) * g.prompts_per_step as u64;
        Ok(micro)
    }

    /// `mb`'s old log-probs (when the policy will move before its last update on them) and
    /// reference log-probs (when the KL term is on). The old policy's forward replays the
    /// rollout's routes as training will, or under `router_replay: old` records the routes
    /// training replays; the reference routes live (it is another policy).
    fn scored(
        &self,
        policy: &Qwen3Model,
        mb: &mut MicroBatch,
        old: bool,
        ctx: &ForwardCtx,
    ) -> (Option<Tensor<2>>, Option<Tensor<2>>) {
        let t = self.objective.temperature;
        let old = old.then(|| {
            let (logps, router) = score(policy, mb, t, &mb.ctx(ctx));
            if self.replay == Some(RouterReplay::Old) {
                let k = policy
                    .config
                    .moe
                    .as_ref()
                    .map_or(0, |m| m.num_experts_per_tok);
                mb.routes = Some(Arc::new(RouteReplay::from_router(&router, k)));
            }
            logps
        });
        let reference = match &self.reference {
            None => None,
            Some(ReferenceModel::AdaptersOff) => {
                Some(score(policy, mb, t, &ctx.clone().without_adapters()).0)
            }
            Some(ReferenceModel::Frozen(model)) => Some(score(model, mb, t, ctx).0),
        };
        (old, reference)
    }
}

impl Task for GrpoTask {
    fn objective(&self) -> &dyn Objective {
        &self.objective
    }

    fn micro_batches(
        &mut self,
        session: &Session,
        engine: &Engine,
        step: u64,
    ) -> Result<Vec<MicroBatch>, TrainError> {
        let generation = step / session.recipe.grpo.num_iterations as u64;
        if self.buffer.as_ref().map(|(g, _)| *g) != Some(generation) {
            let micro = self.roll_out(session, engine, generation, step)?;
            self.buffer = Some((generation, micro));
        }
        let (_, micro) = self.buffer.as_ref().expect("filled above");
        Ok(micro.clone())
    }

    fn evaluate(
        &self,
        session: &Session,
        engine: &Engine,
        done: u64,
    ) -> Result<Option<Eval>, TrainError> {
        let every = session.recipe.train.eval_every;
        let Some(set) = &self.eval else {
            return Ok(None);
        };
        if every == 0 || !done.is_multiple_of(every) {
            return Ok(None);
        }
        Ok(Some(Eval::Values(self.held_out(engine, set)?)))
    }

    fn loader_state(&self) -> LoaderState {
        self.loader.state()
    }

    fn step_metrics(&mut self) -> Vec<(String, f64)> {
        self.metrics.clone()
    }
}

impl GrpoTask {
    /// The mean reward (and each function's) of one sampled and one greedy completion of
    /// every held-out prompt; the sampled ones draw the same uniforms at every evaluation.
    pub fn held_out(
        &self,
        engine: &Engine,
        set: &PromptSet,
    ) -> Result<Vec<(String, f64)>, TrainError> {
        let (ctx, policy) = (plain_ctx(engine), engine.model.frozen());
        let rows: Vec<(usize, usize, Vec<i32>)> = (set.rows.iter().enumerate())
            .map(|(i, r)| (i, i, r.ids.clone()))
            .collect();
        let mut out = Vec::new();
        for (tag, sampling) in [("sampled", self.rollout.sampling.clone()), ("greedy", None)] {
            let cfg = RolloutConfig {
                sampling,
                record: false,
                ..self.rollout.clone()
            };
            let rollouts = generate(&policy, &rows, EVAL_GENERATION, &cfg, &ctx);
            let (scores, total) = self.score(set, &rollouts)?;
            out.push((format!("reward_{tag}"), nan_mean(&total)));
            for (f, s) in self.rewards.iter().zip(&scores) {
                let v: Vec<f64> = s.iter().map(|x| x.unwrap_or(f64::NAN)).collect();
                out.push((format!("{}_{tag}", f.name), nan_mean(&v)));
            }
        }
        Ok(out)
    }
}
