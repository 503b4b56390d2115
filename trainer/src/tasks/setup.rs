//! What every task loop builds before its first step: the engine over the starting model, and
//! the report of what trains.

use moeru_models::{Qwen3Config, Qwen3Model};

use crate::engine::optim::AdamWConfig;
use crate::engine::sync::SyncKind;
use crate::engine::{Engine, EngineConfig, ModelParallel, OptimizerStart};
use crate::lora::TrainableSizes;
use crate::objective::AuxWeights;
use crate::pipeline::executor::PipelineRun;
use crate::pipeline::{schedule, PipelineLayout};
use crate::recipe::schema::{Recipe, Recompute};
use crate::session::Session;

/// The engine over the starting model and optimizer state: sharded under tensor or expert
/// parallelism, running its pipeline stages under pipeline parallelism, or the whole model as
/// one stage under `train.recompute` (the recompute is the stage executor's).
pub fn build_engine<'s>(
    session: &'s Session,
    model: Qwen3Model,
    optimizer: OptimizerStart,
) -> Engine<'s> {
    let recipe = session.recipe;
    let config = engine_config(recipe, session.groups.dp.size());
    let dp = &session.groups.dp;
    let layers = model.config.num_hidden_layers;
    let engine = match &session.boundaries {
        Some(boundaries) => {
            let parallel = ModelParallel {
                shard: model.shard(),
                boundaries: boundaries.clone(),
                tp: &session.groups.tp,
                ep: &session.groups.ep,
                edp: &session.groups.edp,
                world: session.world,
                head_copy: session.tied.is_some() && session.groups.pp.rank() > 0,
            };
            Engine::sharded(model, config, dp, parallel, optimizer)
        }
        None => Engine::new(model, config, dp, optimizer),
    };
    match (&session.pipeline, recipe.train.recompute) {
        (Some(layout), _) => engine.with_pipeline(pipeline_run(session, layout)),
        (None, Recompute::None) => engine,
        (None, _) => {
            let whole = PipelineLayout::single(recipe.train.grad_accum, layers);
            engine.with_pipeline(pipeline_run(session, &whole))
        }
    }
}

/// This rank's share of the pipeline `layout`: its plan of the schedule.
fn pipeline_run<'s>(session: &'s Session, layout: &PipelineLayout) -> PipelineRun<'s> {
    let group = &*session.groups.pp;
    let mut plans = schedule::plan(&layout.shape).expect("the layout was checked at session open");
    PipelineRun {
        group,
        shape: layout.shape,
        stages: layout.stages.clone(),
        plan: plans.swap_remove(group.rank()),
        tied: session.tied.as_ref(),
        recompute: session.recipe.train.recompute,
    }
}

/// Prints what trains and, under model parallelism, every rank's bytes.
pub fn report_sizes(session: &Session, engine: &mut Engine) -> TrainableSizes {
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

pub fn aux_weights(recipe: &Recipe, config: &Qwen3Config) -> AuxWeights {
    AuxWeights {
        load_balancing: recipe
            .moe
            .aux_loss_coef
            .or(config.moe.as_ref().map(|m| m.router_aux_loss_coef))
            .unwrap_or(0.0),
        z_loss: recipe.moe.z_loss_coef,
    }
}
