//! The pretraining / SFT loop: the language-model objective over packed (or padded) token
//! batches, with evaluation and checkpoints.

use std::path::PathBuf;
use std::time::Instant;

use moeru_data::DataLoader;
use moeru_models::{DropoutKey, Qwen3Config, Qwen3Model};
use moeru_parallel::{ProcessGroup, Traffic};

use crate::checkpoint::{save, SaveTarget, TrainerState};
use crate::engine::optim::AdamWConfig;
use crate::engine::sync::SyncKind;
use crate::engine::{Engine, EngineConfig, MicroBatch, ModelParallel, OptimizerStart};
use crate::error::TrainError;
use crate::eval::evaluate;
use crate::lora::{fingerprint, BaseFingerprint, TrainableSizes};
use crate::metrics::{CommBytes, LayerLoad, MetricsSink, StepMetrics};
use crate::objective::{AuxWeights, LmObjective, StepReport};
use crate::recipe::recipe_hash;
use crate::recipe::schema::Recipe;
use crate::run::{RunOptions, RunSummary};
use crate::schedule::learning_rate;
use crate::session::{Session, Start};

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
    let objective = LmObjective {
        weights: aux_weights(recipe, &engine.model.config),
    };
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
        loader,
        tokens_seen,
        lora_base,
    };
    let end = opts
        .stop_after
        .map_or(t.steps, |n| (start_step + n).min(t.steps));
    let mut last_loss = f64::NAN;
    for step in start_step..end {
        if let Some(f) = opts
            .fault
            .filter(|f| f.rank == session.world.rank() && f.step == step + 1)
        {
            f.fire();
        }
        let lr = learning_rate(recipe.optim.lr, &recipe.schedule, step, t.steps);
        let began = Instant::now();
        let micro = micro_batches(session, &mut state.loader, step)?;
        let traffic = TrafficMark::take(session);
        let report = engine.step(&objective, &micro, lr)?;
        let comm = traffic.delta(session);
        state.tokens_seen += report.tokens;
        last_loss = report.loss;
        let done = step + 1;
        if let Some(metrics) = &mut metrics {
            let elapsed = began.elapsed().as_secs_f64().max(1e-9);
            let ep = session.mesh.sizes.ep;
            metrics.log_step(&step_metrics(done, lr, &report, elapsed, comm, ep))?;
        }
        // A sharded model evaluates on every rank (its collectives need them all).
        if session.main || engine.parallel().is_some() {
            if let (Some(loss), Some(metrics)) =
                (evaluate_if_due(recipe, &engine, done)?, &mut metrics)
            {
                metrics.log_eval(done, loss)?;
            }
        }
        let saved = save_if_due(session, &mut engine, &state, done, lr)?;
        if let (Some(dir), Some(metrics)) = (saved, &mut metrics) {
            metrics.println(&format!("saved {}", dir.display()));
        }
    }
    if let Some(metrics) = metrics {
        metrics.finish()?;
    }
    Ok(RunSummary {
        start_step,
        end_step: end,
        last_loss,
        sizes,
        rank: session.world.rank(),
    })
}

/// The engine over the starting model and optimizer state: sharded under tensor or expert
/// parallelism.
fn build_engine<'s>(
    session: &'s Session,
    model: Qwen3Model,
    optimizer: OptimizerStart,
) -> Engine<'s> {
    let config = engine_config(session.recipe, session.groups.dp.size());
    let dp = &session.groups.dp;
    match &session.boundaries {
        Some(boundaries) => {
            let parallel = ModelParallel {
                shard: model.shard(),
                boundaries: boundaries.clone(),
                tp: &session.groups.tp,
                ep: &session.groups.ep,
                edp: &session.groups.edp,
                world: session.world,
            };
            Engine::sharded(model, config, dp, parallel, optimizer)
        }
        None => Engine::new(model, config, dp, optimizer),
    }
}

/// Prints what trains and, under model parallelism, every rank's bytes.
fn report_sizes(session: &Session, engine: &mut Engine) -> TrainableSizes {
    let sizes = TrainableSizes::of(&mut engine.model, Some(engine.optim.held_elements()));
    if session.main {
        eprintln!("{}", sizes.line(engine.model.lora_config().is_some()));
    }
    if engine.parallel().is_some() {
        let rank = session.world.rank();
        eprintln!("{}", sizes.rank_line(rank, &engine.model.shard()));
    }
    sizes
}

fn engine_config(recipe: &Recipe, dp_size: usize) -> EngineConfig {
    let o = &recipe.optim;
    let sync = match (recipe.parallel.zero_stage == 1, dp_size > 1) {
        (true, _) => SyncKind::Zero1,
        (false, true) => SyncKind::AllReduce,
        (false, false) => SyncKind::Local,
    };
    EngineConfig {
        adamw: AdamWConfig {
            beta1: o.betas[0],
            beta2: o.betas[1],
            eps: o.eps,
            weight_decay: o.weight_decay,
        },
        clip: o.grad_clip,
        precision: recipe.precision,
        bucket_elems: ((recipe.parallel.bucket_mb * 1024.0 * 1024.0) / 4.0).max(1.0) as usize,
        capacity_factor: recipe.moe.capacity_factor,
        sync,
    }
}

fn aux_weights(recipe: &Recipe, config: &Qwen3Config) -> AuxWeights {
    AuxWeights {
        load_balancing: recipe
            .moe
            .aux_loss_coef
            .or(config.moe.as_ref().map(|m| m.router_aux_loss_coef))
            .unwrap_or(0.0),
        z_loss: recipe.moe.z_loss_coef,
    }
}

/// This rank's `grad_accum` micro-batches of step `step`, each with its LoRA dropout key.
fn micro_batches(
    session: &Session,
    loader: &mut DataLoader,
    step: u64,
) -> Result<Vec<MicroBatch>, TrainError> {
    let (recipe, dp) = (session.recipe, &session.groups.dp);
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
        // The global micro-batch index: the same mask for the same sequences at any DP size.
        let index = (step * accum as u64 + m as u64) * dp.size() as u64 + dp.rank() as u64;
        mb.dropout = Some(DropoutKey {
            seed: recipe.train.seed,
            counter: index,
        });
        micro.push(mb);
    }
    Ok(micro)
}

/// Traffic counters of the mesh's groups (dp, tp, ep, edp) and the world before a step.
struct TrafficMark(Vec<Traffic>);

impl TrafficMark {
    fn groups<'s>(session: &'s Session) -> [&'s ProcessGroup; 5] {
        let g = &session.groups;
        [&g.dp, &g.tp, &g.ep, &g.edp, session.world]
    }

    fn take(session: &Session) -> Self {
        Self(Self::groups(session).map(|g| g.traffic()).into())
    }

    /// What each group's collectives moved since the mark (nothing on a world of one).
    fn delta(&self, session: &Session) -> Vec<CommBytes> {
        let mut comm = Vec::new();
        if session.world.size() > 1 {
            for (group, before) in Self::groups(session).into_iter().zip(&self.0) {
                traffic_delta(group, before, &mut comm);
            }
        }
        comm
    }
}

fn traffic_delta(group: &ProcessGroup, before: &Traffic, out: &mut Vec<CommBytes>) {
    for (op, t) in group.traffic() {
        let b = before.get(op).copied().unwrap_or_default();
        if t.payload_bytes > b.payload_bytes || t.calls > b.calls {
            out.push(CommBytes {
                group: group.name().to_string(),
                op: op.to_string(),
                payload: t.payload_bytes - b.payload_bytes,
                wire: t.wire_bytes - b.wire_bytes,
                seconds: (t.busy_ns - b.busy_ns) as f64 * 1e-9,
            });
        }
    }
}

fn step_metrics(
    done: u64,
    lr: f64,
    r: &StepReport,
    elapsed: f64,
    comm: Vec<CommBytes>,
    ep: usize,
) -> StepMetrics {
    StepMetrics {
        step: done,
        loss: r.loss,
        lr,
        grad_norm: r.grad_norm,
        tokens: r.tokens,
        tokens_per_s: r.tokens as f64 / elapsed,
        aux_loss: r.aux_loss,
        z_loss: r.z_loss,
        expert_load: r
            .expert_counts
            .iter()
            .map(|(layer, counts)| LayerLoad {
                layer: *layer,
                max: counts.iter().copied().max().unwrap_or(0) as f64,
                mean: counts.iter().sum::<u64>() as f64 / counts.len().max(1) as f64,
            })
            .collect(),
        ep_load: ep_load(&r.expert_counts, ep),
        comm,
    }
}

/// Rows routed to each of `ep` ranks' experts (contiguous ranges), over every MoE layer of
/// `counts` (global per-expert counts); empty when `ep` is 1.
fn ep_load(counts: &[(usize, Vec<u64>)], ep: usize) -> Vec<u64> {
    let mut load = vec![0; if ep > 1 { ep } else { 0 }];
    for (_, c) in counts.iter().filter(|_| ep > 1) {
        let local = c.len() / ep;
        for (r, chunk) in c.chunks(local.max(1)).enumerate().take(ep) {
            load[r] += chunk.iter().sum::<u64>();
        }
    }
    load
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
    )?;
    if let Some(p) = engine.parallel() {
        p.boundaries.take_error()?;
    }
    Ok(Some(r.loss))
}

/// What the loop carries from step to step besides the engine.
struct LoopState {
    loader: DataLoader,
    tokens_seen: u64,
    /// LoRA runs on a model folder: the frozen base's digest at start.
    lora_base: Option<BaseFingerprint>,
}

/// Saves a checkpoint after step `done` when it is due (every `checkpoint.every` steps and
/// at the end); returns its folder.
fn save_if_due(
    session: &Session,
    engine: &mut Engine,
    st: &LoopState,
    done: u64,
    lr: f64,
) -> Result<Option<PathBuf>, TrainError> {
    let recipe = session.recipe;
    let every = recipe.checkpoint.every;
    if done != recipe.train.steps && (every == 0 || !done.is_multiple_of(every)) {
        return Ok(None);
    }
    let state = TrainerState {
        step: done,
        tokens_seen: st.tokens_seen,
        loader: st.loader.state(),
        recipe_hash: recipe_hash(recipe),
        seed: recipe.train.seed,
        lr,
        lora_base: base_unchanged(recipe, engine, st.lora_base.as_ref(), done)?,
    };
    let target = save_target(session);
    Ok(Some(save(&target, engine, &state, session.world)?))
}

/// The digest of the LoRA base as it is now, so a checkpoint proves the base stayed frozen.
fn base_unchanged(
    recipe: &Recipe,
    engine: &mut Engine,
    at_start: Option<&BaseFingerprint>,
    done: u64,
) -> Result<Option<BaseFingerprint>, TrainError> {
    let (Some(start), Some(path)) = (at_start, &recipe.model.path) else {
        return Ok(None);
    };
    let now = fingerprint(&mut engine.model, path);
    if now != *start {
        return Err(TrainError::Bug(format!(
            "the frozen LoRA base changed during training (weights sha256 {} at start, {} at step {done}); this is a bug in moeru, please report it",
            start.sha256, now.sha256
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
    }
}
