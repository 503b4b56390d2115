//! What a run stands on before it trains: the mesh and its groups, the device, the restored
//! checkpoint, and the starting state built from it or from scratch (model, optimizer state,
//! data loader, progress). The setup half of every task loop.
//!
//! Owns: setup decisions (fresh or resumed, LoRA base checks). Must not: step, log steps or
//! save (the task loops and the engine do).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use burn::tensor::Device;
use moeru_checkpoints::{load_hf_model_sharded, load_peft_adapter};
use moeru_data::pairs::{PairLoader, PairLoaderConfig};
use moeru_data::prompts::{PromptLoader, PromptSet};
use moeru_data::tokenizer::TextTokenizer;
use moeru_data::{DataLoader, LoaderConfig, LoaderState, Manifest, PackMode};
use moeru_models::init::RandomInit;
use moeru_models::{Boundaries, DeviceSpec, Local, ModelShard, Qwen3Config, Qwen3Model};
use moeru_parallel::boundaries::ShardBoundaries;
use moeru_parallel::tensor_ops::CommHandle;
use moeru_parallel::{DeviceMesh, MeshGroups, MeshSizes, ProcessGroup};

use crate::checkpoint::{restore_latest, Restored};
use crate::engine::OptimizerStart;
use crate::error::TrainError;
use crate::lora::{attach, check_base, sharded_fingerprint, BaseFingerprint};
use crate::parallel_sizes::validate_parallel_sizes;
use crate::pipeline::PipelineLayout;
use crate::recipe::schema::{Precision, Recipe, TaskKind};
use crate::run::RunOptions;

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

/// One rank's view of the job.
pub struct Session<'w> {
    pub recipe: &'w Recipe,
    pub world: &'w ProcessGroup,
    pub mesh: DeviceMesh,
    pub groups: MeshGroups,
    /// This rank's device, with autodiff.
    pub device: Device,
    /// Rank 0 of the world: the one that reports.
    pub main: bool,
    /// Under tensor, expert or pipeline parallelism, the collectives joining this rank's
    /// part of the model to the others' (and the layers it holds).
    pub boundaries: Option<ShardBoundaries>,
    /// Under pipeline parallelism (`parallel.pp` > 1), the stages.
    pub pipeline: Option<PipelineLayout>,
    /// A tied embedding under pipeline parallelism: the group of its two copies (the first
    /// and the last pipeline rank; alone on the others), whose gradients are summed.
    pub tied: Option<ProcessGroup>,
}

/// A task's data stream: packed token samples, preference pairs (`data.task: dpo`), or a
/// prompt set (`data.task: grpo`).
pub enum Loader {
    Tokens(DataLoader),
    Pairs(PairLoader),
    Prompts(PromptLoader),
}

impl Loader {
    pub fn state(&self) -> LoaderState {
        match self {
            Loader::Tokens(l) => l.state(),
            Loader::Pairs(l) => l.state(),
            Loader::Prompts(l) => l.state(),
        }
    }

    /// The prepared dataset's manifest (a prompt set has none).
    pub fn manifest(&self) -> Option<&Manifest> {
        match self {
            Loader::Tokens(l) => Some(l.manifest()),
            Loader::Pairs(l) => Some(l.manifest()),
            Loader::Prompts(_) => None,
        }
    }
}

/// Where a run starts: from scratch, or where its newest valid checkpoint stopped.
pub struct Start {
    pub model: Qwen3Model,
    pub optimizer: OptimizerStart,
    pub loader: Loader,
    /// Optimizer steps already taken.
    pub step: u64,
    pub tokens_seen: u64,
    /// LoRA runs on a model folder: the frozen base's digest at start.
    pub lora_base: Option<BaseFingerprint>,
}

impl<'w> Session<'w> {
    /// The mesh, groups and device of this rank of `world`.
    pub fn open(
        recipe: &'w Recipe,
        opts: &RunOptions,
        world: &'w ProcessGroup,
    ) -> Result<Self, TrainError> {
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
        let (mut pipeline, mut tied) = (None, None);
        if recipe.parallel.pp > 1 {
            let config = recipe_config(recipe)?;
            let layout = PipelineLayout::new(&recipe.parallel, recipe.train.grad_accum, &config);
            pipeline = Some(layout.map_err(TrainError::BadRecipe)?);
            if config.tie_word_embeddings {
                let (pp, p) = (recipe.parallel.pp, groups.pp.rank());
                let ends = p == 0 || p + 1 == pp;
                let color = if ends { 0 } else { 1 + p as u32 };
                tied = Some(groups.pp.split(color, "tied-embedding")?);
            }
        }
        let boundaries = shard_boundaries(recipe, &groups, pipeline.as_ref());
        Ok(Self {
            recipe,
            world,
            mesh,
            groups,
            device,
            main,
            boundaries,
            pipeline,
            tied,
        })
    }

    /// The boundaries the model is built with: the shard's, or [`Local`] for the whole model.
    fn model_boundaries(&self) -> Arc<dyn Boundaries> {
        match &self.boundaries {
            Some(b) => Arc::new(b.clone()),
            None => Arc::new(Local),
        }
    }

    /// The recipe's layout against its model, before any part of the model is built.
    fn check_layout(&self) -> Result<(), TrainError> {
        let recipe = self.recipe;
        let config = recipe_config(recipe)?;
        validate_parallel_sizes(&recipe.parallel, &config).map_err(TrainError::BadRecipe)?;
        match recipe.parallel.pp > 1 {
            true => pipeline_support(recipe).map_err(TrainError::BadRecipe),
            false => Ok(()),
        }
    }

    /// The starting state: restored from the newest valid checkpoint when the recipe (or
    /// `--resume`) asks to resume and one exists, else fresh.
    pub fn start(&self, require_resume: bool) -> Result<Start, TrainError> {
        let recipe = self.recipe;
        self.check_layout()?;
        let run_dir = &recipe.checkpoint.dir;
        let restored = if recipe.checkpoint.resume || require_resume {
            let (restored, skipped) =
                restore_latest(run_dir, &self.device, self.model_boundaries())?;
            for reason in skipped.iter().filter(|_| self.main) {
                eprintln!("warning: skipping checkpoint: {reason}");
            }
            restored
        } else {
            None
        };
        let start = match restored {
            Some(r) => self.resumed(r)?,
            None if require_resume => {
                return Err(TrainError::Resume(format!(
                    "{}: --resume given but there is no valid checkpoint in it",
                    run_dir.display()
                )))
            }
            None => self.fresh()?,
        };
        check_data(recipe, &start.loader, &start.model)?;
        Ok(start)
    }

    /// The data stream from its start, or from `state` (a checkpoint's).
    fn loader(&self, state: Option<&LoaderState>) -> Result<Loader, TrainError> {
        let (recipe, dp) = (self.recipe, &self.groups.dp);
        let d = &recipe.data;
        let (mbs, seed) = (recipe.train.micro_batch_size, recipe.train.seed);
        if d.task == TaskKind::Grpo {
            return Ok(Loader::Prompts(prompt_loader(recipe, state)?));
        }
        if d.task == TaskKind::Dpo {
            let mut cfg = PairLoaderConfig::new(&d.train, d.seq_len, mbs, seed);
            cfg.shuffle = d.shuffle;
            let cfg = cfg.with_rank(dp.rank(), dp.size());
            return Ok(Loader::Pairs(match state {
                Some(s) => PairLoader::from_state(cfg, s)?,
                None => PairLoader::new(cfg)?,
            }));
        }
        let mut cfg = LoaderConfig::new(&d.train, d.seq_len, mbs, seed);
        cfg.mode = if d.pad { PackMode::Pad } else { PackMode::Pack };
        cfg.shuffle = d.shuffle;
        let cfg = cfg.with_rank(dp.rank(), dp.size());
        Ok(Loader::Tokens(match state {
            Some(s) => DataLoader::from_state(cfg, s)?,
            None => DataLoader::new(cfg)?,
        }))
    }

    /// The model a fresh run starts from: the recipe's weights (this rank's part), with
    /// fresh or `lora.adapter`'s adapters under LoRA.
    pub fn initial_model(&self) -> Result<Qwen3Model, TrainError> {
        let recipe = self.recipe;
        let mut model = build_model(recipe, &self.device, self.model_boundaries())?;
        if let (Some(l), Some(_)) = (&recipe.lora, &recipe.model.path) {
            attach(l, &mut model, recipe.model.init_seed)?;
        }
        Ok(model)
    }

    /// A Hugging Face folder as this rank's part of a model.
    pub fn load_folder(&self, path: &Path) -> Result<Qwen3Model, TrainError> {
        Ok(load_hf_model_sharded(
            path,
            self.model_boundaries(),
            &self.device,
        )?)
    }

    fn fresh(&self) -> Result<Start, TrainError> {
        let recipe = self.recipe;
        let mut model = build_model(recipe, &self.device, self.model_boundaries())?;
        let lora_base = match (&recipe.lora, &recipe.model.path) {
            (Some(l), Some(path)) => {
                let base = self.base_fingerprint(&mut model, path)?;
                attach(l, &mut model, recipe.model.init_seed)?;
                Some(base)
            }
            _ => None,
        };
        Ok(Start {
            model,
            optimizer: OptimizerStart::default(),
            loader: self.loader(None)?,
            step: 0,
            tokens_seen: 0,
            lora_base,
        })
    }

    fn resumed(&self, mut r: Restored) -> Result<Start, TrainError> {
        let recipe = self.recipe;
        if self.main {
            if r.state.recipe_hash != crate::recipe::recipe_hash(recipe) {
                eprintln!("warning: {} was written by a different recipe; continuing with the current one", r.dir.display());
            }
            eprintln!("resuming from {} (step {})", r.dir.display(), r.state.step);
        }
        let (mut model, lora_base) = self.restored_model(&mut r)?;
        let moments = r.moments.for_model(&mut model, &self.device)?;
        Ok(Start {
            model,
            optimizer: OptimizerStart {
                steps: r.state.step,
                moments,
            },
            loader: self.loader(Some(&r.state.loader))?,
            step: r.state.step,
            tokens_seen: r.state.tokens_seen,
            lora_base,
        })
    }

    /// The digest of the LoRA base `model` (this rank's part of it) loaded from `path`.
    pub fn base_fingerprint(
        &self,
        model: &mut Qwen3Model,
        path: &Path,
    ) -> Result<BaseFingerprint, TrainError> {
        sharded_fingerprint(model, path, &self.groups, self.world)
    }

    /// The model of checkpoint `r`: its full weights, or for a LoRA checkpoint the recipe's
    /// base (checked against the recorded fingerprint) with the checkpoint's adapters; in the
    /// part this rank holds.
    fn restored_model(
        &self,
        r: &mut Restored,
    ) -> Result<(Qwen3Model, Option<BaseFingerprint>), TrainError> {
        let recipe = self.recipe;
        let dir = r.dir.display();
        match (r.model.take(), &recipe.lora, &recipe.model.path) {
            (Some(model), None, _) => Ok((model, None)),
            (None, Some(_), Some(path)) => {
                let mut model = build_model(recipe, &self.device, self.model_boundaries())?;
                let base = self.base_fingerprint(&mut model, path)?;
                check_base(&r.dir, r.state.lora_base.as_ref(), &base, path)?;
                load_peft_adapter(&r.dir, &mut model)?;
                Ok((model, Some(base)))
            }
            (Some(_), Some(_), _) => Err(TrainError::Resume(format!(
                "{dir} holds a fully trained model, but the recipe has a `lora` section; remove `lora` to continue that run, or set a fresh `checkpoint.dir` to fine-tune it with LoRA"
            ))),
            (None, None, _) | (None, Some(_), None) => Err(TrainError::Resume(format!(
                "{dir} holds LoRA adapters (adapter_model.safetensors), but the recipe has no `lora` section and `model.path`; restore the run's `lora` section, or set a fresh `checkpoint.dir`"
            ))),
        }
    }
}

/// The model's config.json as the recipe gives it (a folder's, or `model.architecture`).
pub(crate) fn recipe_config(recipe: &Recipe) -> Result<Qwen3Config, TrainError> {
    match (&recipe.model.path, &recipe.model.architecture) {
        (Some(path), None) => Ok(Qwen3Config::from_dir(path)?),
        (None, Some(arch)) => Ok(Qwen3Config::from_map(
            arch.clone(),
            Path::new("recipe model.architecture"),
        )?),
        _ => Err(TrainError::BadRecipe(
            "`model`: set exactly one of `path` and `architecture`".into(),
        )),
    }
}

/// What pipeline parallelism does not combine with yet, named with the key to change.
fn pipeline_support(recipe: &Recipe) -> Result<(), String> {
    let pp = recipe.parallel.pp;
    let refuse = |what: &str| {
        Err(format!(
            "`parallel.pp` = {pp} with {what} is not supported yet; set `parallel.pp: 1`"
        ))
    };
    if recipe.lora.is_some() {
        return refuse("a `lora` section");
    }
    if recipe.data.task == TaskKind::Dpo {
        return refuse("`data.task: dpo`");
    }
    Ok(())
}

/// This rank's boundaries under the recipe's tensor and expert parallelism, holding only its
/// stages' layers under `pipeline`; `None` when this rank holds the whole model.
fn shard_boundaries(
    recipe: &Recipe,
    groups: &MeshGroups,
    pipeline: Option<&PipelineLayout>,
) -> Option<ShardBoundaries> {
    let (tp, ep) = (&groups.tp, &groups.ep);
    let shard = ModelShard {
        tp: tp.size(),
        tp_rank: tp.rank(),
        sequence_parallel: recipe.parallel.sequence_parallel,
        ep: ep.size(),
        ep_rank: ep.rank(),
    };
    if shard.is_single() && pipeline.is_none() {
        return None;
    }
    let b = ShardBoundaries::new(
        shard,
        CommHandle::new(tp.clone()),
        CommHandle::new(ep.clone()),
    );
    Some(match pipeline {
        Some(layout) => b.with_layers(layout.rank_layers(groups.pp.rank())),
        None => b,
    })
}

/// The recipe's model as `boundaries` shard it (random init: each rank draws exactly the
/// values the one-rank init gives its part).
fn build_model(
    recipe: &Recipe,
    device: &Device,
    boundaries: Arc<dyn Boundaries>,
) -> Result<Qwen3Model, TrainError> {
    match (&recipe.model.path, &recipe.model.architecture) {
        (Some(path), None) => Ok(load_hf_model_sharded(path, boundaries, device)?),
        (None, Some(arch)) => {
            let config =
                Qwen3Config::from_map(arch.clone(), Path::new("recipe model.architecture"))?;
            let mut init = RandomInit {
                seed: recipe.model.init_seed,
                std: config.initializer_range,
            };
            Ok(
                Qwen3Model::new_sharded(config, &mut init, boundaries, device)
                    .unwrap_or_else(|never| match never {}),
            )
        }
        _ => Err(TrainError::BadRecipe(
            "`model`: set exactly one of `path` and `architecture`".into(),
        )),
    }
}

/// The recipe's prompt set (`data.train`), read with its tokenizer, from `state` when resuming.
fn prompt_loader(recipe: &Recipe, state: Option<&LoaderState>) -> Result<PromptLoader, TrainError> {
    let tokenizer = TextTokenizer::from_file(&grpo_tokenizer(recipe)?)?;
    let d = &recipe.data;
    let room = d.seq_len - recipe.generation.max_new_tokens.min(d.seq_len);
    let set = PromptSet::read(
        &d.train,
        &tokenizer,
        recipe.generation.enable_thinking,
        room,
    )?;
    let mut loader = PromptLoader {
        set,
        seed: recipe.train.seed,
        shuffle: d.shuffle,
        seq_len: d.seq_len,
        consumed: 0,
    };
    if let Some(state) = state {
        loader.resume(state)?;
    }
    Ok(loader)
}

/// The tokenizer.json of a GRPO run: `grpo.tokenizer`, else the model folder's.
pub fn grpo_tokenizer(recipe: &Recipe) -> Result<PathBuf, TrainError> {
    match (&recipe.grpo.tokenizer, &recipe.model.path) {
        (Some(t), _) => Ok(t.clone()),
        (None, Some(dir)) => Ok(dir.join("tokenizer.json")),
        (None, None) => Err(TrainError::BadRecipe(
            "`grpo.tokenizer` is not set and the model has no folder (`model.architecture`); point `grpo.tokenizer` at a tokenizer.json".into(),
        )),
    }
}

fn check_data(recipe: &Recipe, loader: &Loader, model: &Qwen3Model) -> Result<(), TrainError> {
    let dir = recipe.data.train.display();
    let Some(m) = loader.manifest() else {
        let vocab = model.config.vocab_size;
        let Loader::Prompts(p) = loader else {
            return Ok(());
        };
        let top = p
            .set
            .rows
            .iter()
            .flat_map(|r| r.ids.iter())
            .max()
            .copied()
            .unwrap_or(0);
        if top as usize >= vocab {
            return Err(TrainError::Dataset(format!(
                "{dir}: a prompt holds token id {top} but the model's vocab_size is {vocab}; use the model's tokenizer (`grpo.tokenizer`)"
            )));
        }
        return Ok(());
    };
    if m.tokenizer.vocab_size > model.config.vocab_size as u64 {
        return Err(TrainError::Dataset(format!(
            "{dir}: the dataset's tokenizer has {} tokens but the model's vocab_size is {}; use a model with a vocabulary at least that large",
            m.tokenizer.vocab_size, model.config.vocab_size
        )));
    }
    let (chat, pairs) = (m.mode == "chat", m.mode == "preference");
    match recipe.data.task {
        TaskKind::Sft if !chat => Err(TrainError::Dataset(format!(
            "{dir}: `data.task: sft` needs chat data (prepare with --chat); this dataset is `{}`",
            m.mode
        ))),
        TaskKind::Pretrain | TaskKind::Sft if pairs => Err(TrainError::Dataset(format!(
            "{dir}: this dataset holds preference pairs (prepared with --preference); train it with `data.task: dpo`, or prepare the data without --preference"
        ))),
        _ => Ok(()),
    }
}
