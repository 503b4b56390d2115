//! `moeru train`: build or load the model, stream the data, step, log, checkpoint, resume.
//! One function runs one rank; a single-process run is a world of one rank.

use std::path::Path;
use std::time::{Duration, Instant};

use burn::tensor::Device;

use moeru_checkpoints::{load_hf_model, load_peft_adapter};
use moeru_data::{DataLoader, LoaderConfig, PackMode};
use moeru_models::init::RandomInit;
use moeru_models::{DeviceSpec, DropoutKey, Qwen3Config, Qwen3Model};
use moeru_parallel::{thread_world, DeviceMesh, MeshSizes, ProcessGroup, Traffic};

use crate::checkpoint::{restore_latest, save, Restored, TrainerState};
use crate::data_parallel::DataParallel;
use crate::error::TrainError;
use crate::eval::evaluate;
use crate::fault::Fault;
use crate::layout::validate_layout;
use crate::lora::{attach, check_base, fingerprint, BaseFingerprint, TrainableSizes};
use crate::metrics::{CommBytes, LayerLoad, MetricsSink, StepMetrics};
use crate::optim::{AdamW, AdamWConfig};
use crate::recipe::recipe_hash;
use crate::recipe::schema::{Precision, Recipe, TaskKind};
use crate::schedule::learning_rate;
use crate::step::{train_step, AuxWeights, MicroBatch};

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Fail unless a checkpoint to resume from exists (`moeru train --resume`).
    pub require_resume: bool,
    /// Stop after this many steps in this process, as if interrupted (tests).
    pub stop_after: Option<u64>,
    /// Test hook (see `Fault`).
    pub fault: Option<Fault>,
    /// This process's index among the ranks of its node (picks the GPU for `device: cuda`);
    /// None: the world rank (ranks as threads of one process).
    pub local_rank: Option<usize>,
}

#[derive(Debug, Clone)]
pub struct RunSummary {
    pub start_step: u64,
    pub end_step: u64,
    pub last_loss: f64,
    /// Trainable parameters and optimizer state of this rank.
    pub sizes: TrainableSizes,
    /// World rank of the process or thread that ran it (the CLI reports rank 0's only).
    pub rank: usize,
}

fn build_model(recipe: &Recipe, device: &Device) -> Result<Qwen3Model, TrainError> {
    match (&recipe.model.path, &recipe.model.architecture) {
        (Some(path), None) => Ok(load_hf_model(path, device)?),
        (None, Some(arch)) => {
            let config =
                Qwen3Config::from_map(arch.clone(), Path::new("recipe model.architecture"))?;
            let mut init = RandomInit {
                seed: recipe.model.init_seed,
                std: config.initializer_range,
            };
            Ok(Qwen3Model::new(config, &mut init, device).unwrap_or_else(|never| match never {}))
        }
        _ => Err(TrainError::BadRecipe(
            "`model`: set exactly one of `path` and `architecture`".into(),
        )),
    }
}

/// The model of checkpoint `r`: its full weights, or for a LoRA checkpoint the recipe's base
/// (checked against the recorded fingerprint) with the checkpoint's adapters.
fn restored_model(
    recipe: &Recipe,
    r: &mut Restored,
    device: &Device,
) -> Result<(Qwen3Model, Option<BaseFingerprint>), TrainError> {
    let dir = r.dir.display();
    match (r.model.take(), &recipe.lora, &recipe.model.path) {
        (Some(model), None, _) => Ok((model, None)),
        (None, Some(_), Some(path)) => {
            let mut model = build_model(recipe, device)?;
            let base = fingerprint(&mut model, path);
            check_base(&r.dir, r.state.lora_base.as_ref(), &base, path)?;
            load_peft_adapter(&r.dir, &mut model)?;
            Ok((model, Some(base)))
        }
        (Some(_), Some(_), _) => Err(TrainError::Invalid(format!(
            "{dir} holds a fully trained model, but the recipe has a `lora` section; remove `lora` to continue that run, or set a fresh `checkpoint.dir` to fine-tune it with LoRA"
        ))),
        (None, None, _) | (None, Some(_), None) => Err(TrainError::Invalid(format!(
            "{dir} holds LoRA adapters (adapter_model.safetensors), but the recipe has no `lora` section and `model.path`; restore the run's `lora` section, or set a fresh `checkpoint.dir`"
        ))),
    }
}

fn loader_config(recipe: &Recipe) -> LoaderConfig {
    let d = &recipe.data;
    let mut cfg = LoaderConfig::new(
        &d.train,
        d.seq_len,
        recipe.train.micro_batch_size,
        recipe.train.seed,
    );
    cfg.mode = if d.pad { PackMode::Pad } else { PackMode::Pack };
    cfg.shuffle = d.shuffle;
    cfg
}

fn check_data(recipe: &Recipe, loader: &DataLoader, model: &Qwen3Model) -> Result<(), TrainError> {
    let m = loader.manifest();
    let dir = recipe.data.train.display();
    if m.tokenizer.vocab_size > model.config.vocab_size as u64 {
        return Err(TrainError::Invalid(format!(
            "{dir}: the dataset's tokenizer has {} tokens but the model's vocab_size is {}; use a model with a vocabulary at least that large",
            m.tokenizer.vocab_size, model.config.vocab_size
        )));
    }
    let chat = m.mode == "chat";
    match recipe.data.task {
        TaskKind::Sft if !chat => Err(TrainError::Invalid(format!(
            "{dir}: `data.task: sft` needs chat data (prepare with --chat); this dataset is `{}`",
            m.mode
        ))),
        _ => Ok(()),
    }
}

/// The mesh sizes of `recipe` on `world_size` ranks (`dp: 0` fills what tp × pp leave).
pub fn mesh_for(recipe: &Recipe, world_size: usize) -> Result<DeviceMesh, TrainError> {
    let p = &recipe.parallel;
    let dp = if p.dp == 0 {
        (world_size / (p.tp * p.pp)).max(1)
    } else {
        p.dp
    };
    let sizes = MeshSizes {
        dp,
        pp: p.pp,
        tp: p.tp,
        ep: p.ep,
    };
    DeviceMesh::new(sizes, world_size).map_err(TrainError::BadRecipe)
}

/// The collective timeout of `recipe`.
pub fn comm_timeout(recipe: &Recipe) -> Duration {
    Duration::from_secs_f64(recipe.parallel.timeout_s)
}

/// Runs (or resumes) the training described by `recipe` in this process, on one rank.
pub fn run_training(recipe: &Recipe, opts: &RunOptions) -> Result<RunSummary, TrainError> {
    let world = thread_world(1, comm_timeout(recipe)).remove(0);
    run_rank(recipe, opts, &world)
}

/// Runs one rank of the job `world`. On failure, tells the other ranks (so they stop instead
/// of waiting out the timeout) and returns the error.
pub fn run_rank(
    recipe: &Recipe,
    opts: &RunOptions,
    world: &ProcessGroup,
) -> Result<RunSummary, TrainError> {
    let result = run_rank_inner(recipe, opts, world);
    if let Err(e) = &result {
        world.abort(&e.to_string());
    }
    result
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
            });
        }
    }
}

fn run_rank_inner(
    recipe: &Recipe,
    opts: &RunOptions,
    world: &ProcessGroup,
) -> Result<RunSummary, TrainError> {
    let mesh = mesh_for(recipe, world.size())?;
    let groups = mesh.groups(world)?;
    let main = world.rank() == 0;
    let spec: DeviceSpec = recipe.device.parse().map_err(TrainError::BadRecipe)?;
    let device = spec
        .open(opts.local_rank.unwrap_or(world.rank()))
        .map_err(TrainError::Setup)?
        .autodiff();
    if main && recipe.precision == Precision::Bf16 && !spec.is_cuda() {
        eprintln!("note: `precision: bf16` on the CPU rounds as a GPU run does but runs slower than f32; it is there to check numerics");
    }
    let hash = recipe_hash(recipe);
    let adamw = AdamWConfig {
        beta1: recipe.optim.betas[0],
        beta2: recipe.optim.betas[1],
        eps: recipe.optim.eps,
        weight_decay: recipe.optim.weight_decay,
    };
    let run_dir = &recipe.checkpoint.dir;
    let restored = if recipe.checkpoint.resume || opts.require_resume {
        let (restored, skipped) = restore_latest(run_dir, &device)?;
        for reason in skipped.iter().filter(|_| main) {
            eprintln!("warning: skipping checkpoint: {reason}");
        }
        restored
    } else {
        None
    };
    if opts.require_resume && restored.is_none() {
        return Err(TrainError::Invalid(format!(
            "{}: --resume given but there is no valid checkpoint in it",
            run_dir.display()
        )));
    }
    let (dp_rank, dp_size) = (groups.dp.rank(), groups.dp.size());
    let loader_cfg = loader_config(recipe).with_rank(dp_rank, dp_size);
    let (mut model, mut opt, moments, mut loader, start, mut tokens_seen, lora_base) =
        match restored {
            Some(mut r) => {
                if r.state.recipe_hash != hash && main {
                    eprintln!("warning: {} was written by a different recipe; continuing with the current one", r.dir.display());
                }
                if main {
                    eprintln!("resuming from {} (step {})", r.dir.display(), r.state.step);
                }
                let (model, lora_base) = restored_model(recipe, &mut r, &device)?;
                let mut opt = AdamW::new(adamw);
                opt.steps = r.state.step;
                let loader = DataLoader::from_state(loader_cfg, &r.state.loader)?;
                (
                    model,
                    opt,
                    r.moments,
                    loader,
                    r.state.step,
                    r.state.tokens_seen,
                    lora_base,
                )
            }
            None => {
                let mut model = build_model(recipe, &device)?;
                let lora_base = match (&recipe.lora, &recipe.model.path) {
                    (Some(l), Some(path)) => {
                        let base = fingerprint(&mut model, path);
                        attach(l, &mut model, recipe.model.init_seed)?;
                        Some(base)
                    }
                    _ => None,
                };
                let loader = DataLoader::new(loader_cfg)?;
                let moments = Default::default();
                (model, AdamW::new(adamw), moments, loader, 0, 0, lora_base)
            }
        };
    model.set_precision(recipe.precision);
    check_data(recipe, &loader, &model)?;
    validate_layout(&recipe.parallel, &model.config).map_err(TrainError::BadRecipe)?;
    let zero = recipe.parallel.zero_stage == 1;
    let mut dp = if dp_size > 1 || zero {
        let bucket = ((recipe.parallel.bucket_mb * 1024.0 * 1024.0) / 4.0).max(1.0) as usize;
        let inner = device.clone().inner();
        let dp = DataParallel::new(
            world,
            &groups.dp,
            &mut model.trainable(),
            zero,
            bucket,
            &moments,
            &inner,
        );
        if !zero {
            opt.state = moments;
        }
        Some(dp)
    } else {
        opt.state = moments;
        None
    };
    let sizes = TrainableSizes::of(
        &mut model,
        dp.as_ref()
            .and_then(|d| d.zero.as_ref())
            .map(|z| z.ranges.iter().map(|r| r.len()).sum()),
    );
    if main {
        eprintln!("{}", sizes.line(model.lora_config().is_some()));
    }
    let t = &recipe.train;
    let weights = AuxWeights {
        load_balancing: recipe
            .moe
            .aux_loss_coef
            .or(model.config.moe.as_ref().map(|m| m.router_aux_loss_coef))
            .unwrap_or(0.0),
        z_loss: recipe.moe.z_loss_coef,
    };
    let s = mesh.sizes;
    let mesh_json = serde_json::json!({
        "dp": s.dp, "tp": s.tp, "ep": s.ep, "pp": s.pp,
        "zero_stage": recipe.parallel.zero_stage,
    });
    let mut metrics = if main {
        Some(MetricsSink::open(
            &recipe.logging.dir,
            recipe.logging.tensorboard,
            recipe.logging.progress,
            t.steps,
            start,
        )?)
    } else {
        None
    };
    let end = opts
        .stop_after
        .map_or(t.steps, |n| (start + n).min(t.steps));
    let mut last_loss = f64::NAN;
    for step in start..end {
        if let Some(f) = opts
            .fault
            .filter(|f| f.rank == world.rank() && f.step == step + 1)
        {
            f.fire();
        }
        let lr = learning_rate(recipe.optim.lr, &recipe.schedule, step, t.steps);
        let began = Instant::now();
        let mut micro = Vec::with_capacity(t.grad_accum);
        for m in 0..t.grad_accum {
            let samples = loader.next_batch()?.ok_or_else(|| {
                TrainError::Invalid(format!(
                    "{}: the dataset ran out of samples",
                    recipe.data.train.display()
                ))
            })?;
            let mut mb = MicroBatch::from_samples(&samples, &device);
            // The global micro-batch index: the same mask for the same sequences at any DP size.
            let index = (step * t.grad_accum as u64 + m as u64) * dp_size as u64 + dp_rank as u64;
            mb.dropout = Some(DropoutKey {
                seed: t.seed,
                counter: index,
            });
            micro.push(mb);
        }
        let traffic_before = (groups.dp.traffic(), world.traffic());
        let result = train_step(
            &mut model,
            &mut opt,
            &micro,
            lr,
            recipe.optim.grad_clip,
            weights,
            dp.as_mut(),
        )?;
        let mut comm = Vec::new();
        if world.size() > 1 {
            traffic_delta(&groups.dp, &traffic_before.0, &mut comm);
            traffic_delta(world, &traffic_before.1, &mut comm);
        }
        tokens_seen += result.tokens;
        last_loss = result.loss;
        let elapsed = began.elapsed().as_secs_f64().max(1e-9);
        let done = step + 1;
        if let Some(metrics) = &mut metrics {
            metrics.log_step(&StepMetrics {
                step: done,
                loss: result.loss,
                lr,
                grad_norm: result.grad_norm,
                tokens: result.tokens,
                tokens_per_s: result.tokens as f64 / elapsed,
                aux_loss: result.aux_loss,
                z_loss: result.z_loss,
                expert_load: result
                    .expert_counts
                    .iter()
                    .map(|(layer, counts)| LayerLoad {
                        layer: *layer,
                        max: counts.iter().copied().max().unwrap_or(0) as f64,
                        mean: counts.iter().sum::<u64>() as f64 / counts.len().max(1) as f64,
                    })
                    .collect(),
                comm,
            })?;
            // Evaluation runs on rank 0 only, on the same samples as a one-rank run.
            if let (Some(eval_dir), true) = (
                &recipe.data.eval,
                t.eval_every > 0 && done.is_multiple_of(t.eval_every),
            ) {
                let r = evaluate(
                    &model,
                    eval_dir,
                    recipe.data.seq_len,
                    t.micro_batch_size,
                    t.eval_batches,
                )?;
                metrics.log_eval(done, r.loss)?;
            }
        }
        let every = recipe.checkpoint.every;
        if done == t.steps || (every > 0 && done.is_multiple_of(every)) {
            // The digest of the base as it is now, so a checkpoint proves the base stayed frozen.
            let lora_base = match (&lora_base, &recipe.model.path) {
                (Some(start), Some(path)) => {
                    let now = fingerprint(&mut model, path);
                    if now != *start {
                        return Err(TrainError::Invalid(format!(
                            "the frozen LoRA base changed during training (weights sha256 {} at start, {} at step {done}); this is a bug in moeru, please report it",
                            start.sha256, now.sha256
                        )));
                    }
                    Some(now)
                }
                _ => None,
            };
            let state = TrainerState {
                step: done,
                tokens_seen,
                loader: loader.state(),
                recipe_hash: hash.clone(),
                seed: t.seed,
                lr,
                lora_base,
            };
            let dir = save(
                run_dir,
                &mut model,
                &opt,
                dp.as_ref(),
                &state,
                mesh_json.clone(),
                recipe.checkpoint.keep_last,
                world,
            )?;
            if let Some(metrics) = &mut metrics {
                metrics.println(&format!("saved {}", dir.display()));
            }
        }
    }
    if let Some(metrics) = metrics {
        metrics.finish()?;
    }
    Ok(RunSummary {
        start_step: start,
        end_step: end,
        last_loss,
        sizes,
        rank: world.rank(),
    })
}
