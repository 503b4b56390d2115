//! `moeru train`: build or load the model, stream the data, step, log, checkpoint, resume.

use std::path::Path;
use std::time::Instant;

use burn::tensor::Device;
use moeru_checkpoints::load_hf_model;
use moeru_data::{DataLoader, LoaderConfig, PackMode};
use moeru_models::init::RandomInit;
use moeru_models::{Qwen3Config, Qwen3Model};

use crate::checkpoint::{restore_latest, save, TrainerState};
use crate::error::TrainError;
use crate::eval::evaluate;
use crate::layout::validate_layout;
use crate::metrics::{LayerLoad, MetricsSink, StepMetrics};
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
}

#[derive(Debug, Clone)]
pub struct RunSummary {
    pub start_step: u64,
    pub end_step: u64,
    pub last_loss: f64,
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

/// Runs (or resumes) the training described by `recipe`.
pub fn run_training(recipe: &Recipe, opts: &RunOptions) -> Result<RunSummary, TrainError> {
    if recipe.precision == Precision::Bf16 {
        return Err(TrainError::BadRecipe(
            "`precision: bf16` needs a GPU build (--features cuda); on the CPU use `precision: f32`"
                .into(),
        ));
    }
    let device = Device::flex().autodiff();
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
        for reason in &skipped {
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
    let (mut model, mut opt, mut loader, start, mut tokens_seen) = match restored {
        Some(r) => {
            if r.state.recipe_hash != hash {
                eprintln!("warning: {} was written by a different recipe; continuing with the current one", r.dir.display());
            }
            eprintln!("resuming from {} (step {})", r.dir.display(), r.state.step);
            let mut opt = AdamW::new(adamw);
            opt.steps = r.state.step;
            opt.state = r.moments;
            let loader = DataLoader::from_state(loader_config(recipe), &r.state.loader)?;
            (r.model, opt, loader, r.state.step, r.state.tokens_seen)
        }
        None => {
            let model = build_model(recipe, &device)?;
            let loader = DataLoader::new(loader_config(recipe))?;
            (model, AdamW::new(adamw), loader, 0, 0)
        }
    };
    check_data(recipe, &loader, &model)?;
    validate_layout(&recipe.parallel, &model.config).map_err(TrainError::BadRecipe)?;
    let t = &recipe.train;
    let weights = AuxWeights {
        load_balancing: recipe
            .moe
            .aux_loss_coef
            .or(model.config.moe.as_ref().map(|m| m.router_aux_loss_coef))
            .unwrap_or(0.0),
        z_loss: recipe.moe.z_loss_coef,
    };
    let mesh = serde_json::json!({"dp": 1, "tp": 1, "ep": 1, "pp": 1});
    let mut metrics = MetricsSink::open(
        &recipe.logging.dir,
        recipe.logging.tensorboard,
        recipe.logging.progress,
        t.steps,
        start,
    )?;
    let end = opts
        .stop_after
        .map_or(t.steps, |n| (start + n).min(t.steps));
    let mut last_loss = f64::NAN;
    for step in start..end {
        let lr = learning_rate(recipe.optim.lr, &recipe.schedule, step, t.steps);
        let began = Instant::now();
        let mut micro = Vec::with_capacity(t.grad_accum);
        for _ in 0..t.grad_accum {
            let samples = loader.next_batch()?.ok_or_else(|| {
                TrainError::Invalid(format!(
                    "{}: the dataset ran out of samples",
                    recipe.data.train.display()
                ))
            })?;
            micro.push(MicroBatch::from_samples(&samples, &device));
        }
        let result = train_step(
            &mut model,
            &mut opt,
            &micro,
            lr,
            recipe.optim.grad_clip,
            weights,
        );
        tokens_seen += result.tokens;
        last_loss = result.loss;
        let elapsed = began.elapsed().as_secs_f64().max(1e-9);
        metrics.log_step(&StepMetrics {
            step: step + 1,
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
        })?;
        let done = step + 1;
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
        let every = recipe.checkpoint.every;
        if done == t.steps || (every > 0 && done.is_multiple_of(every)) {
            let state = TrainerState {
                step: done,
                tokens_seen,
                loader: loader.state(),
                recipe_hash: hash.clone(),
                seed: t.seed,
                lr,
            };
            let dir = save(
                run_dir,
                &mut model,
                &opt,
                &state,
                mesh.clone(),
                recipe.checkpoint.keep_last,
            )?;
            metrics.println(&format!("saved {}", dir.display()));
        }
    }
    metrics.finish()?;
    Ok(RunSummary {
        start_step: start,
        end_step: end,
        last_loss,
    })
}
