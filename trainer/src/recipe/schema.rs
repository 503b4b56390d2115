//! The recipe: every key a training run reads, with its default. docs/RECIPES.md documents
//! each one; `recipe::load` parses YAML into this and applies `--set` overrides.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use super::dpo::DpoSection;
pub use super::grpo::{GenerationSection, GrpoSection, RewardSpec};

pub use moeru_models::Precision;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub model: ModelSection,
    pub data: DataSection,
    #[serde(default)]
    pub optim: OptimSection,
    #[serde(default)]
    pub schedule: ScheduleSection,
    pub train: TrainSection,
    pub checkpoint: CheckpointSection,
    pub logging: LoggingSection,
    #[serde(default)]
    pub parallel: ParallelSection,
    #[serde(default)]
    pub moe: MoeSection,
    #[serde(default)]
    pub precision: Precision,
    /// `cpu`, `cuda` (one GPU per local rank) or `cuda:N`.
    #[serde(default = "default_device")]
    pub device: String,
    /// LoRA fine-tuning: a mapping (`lora: {}` for every default) trains adapters on a frozen
    /// base; absent or null, the whole model trains.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraSection>,
    /// DPO settings (`data.task: dpo`).
    #[serde(default, skip_serializing_if = "is_default_dpo")]
    pub dpo: DpoSection,
    /// GRPO settings (`data.task: grpo`).
    #[serde(default, skip_serializing_if = "is_default_grpo")]
    pub grpo: GrpoSection,
    /// How rollouts are sampled (`data.task: grpo`).
    #[serde(default, skip_serializing_if = "is_default_generation")]
    pub generation: GenerationSection,
    /// The reward functions, summed with their weights (`data.task: grpo`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rewards: Vec<RewardSpec>,
}

fn is_default_grpo(g: &GrpoSection) -> bool {
    *g == GrpoSection::default()
}

fn is_default_generation(g: &GenerationSection) -> bool {
    *g == GenerationSection::default()
}

fn is_default_dpo(d: &DpoSection) -> bool {
    *d == DpoSection::default()
}

/// Either a Hugging Face folder (`path`) or an architecture plus `init_seed` for from-scratch
/// training. Exactly one of `path` and `architecture` is set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// config.json fields (`model_type`, `vocab_size`, `hidden_size`, …), as in a HF folder.
    #[serde(default)]
    pub architecture: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    pub init_seed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TaskKind {
    /// Causal LM on packed documents; every token is a target (prepare without --chat).
    #[default]
    Pretrain,
    /// Chat data: loss only on assistant tokens (prepare with --chat).
    Sft,
    /// Preference pairs (prepare with --preference): the `dpo` section's loss.
    Dpo,
    /// On-policy RL: `data.train` is a JSONL prompt set; the `grpo`, `generation` and
    /// `rewards` sections.
    Grpo,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// A folder written by `moeru data prepare`.
    pub train: PathBuf,
    /// Held-out prepared folder for evaluation.
    #[serde(default)]
    pub eval: Option<PathBuf>,
    pub seq_len: usize,
    #[serde(default)]
    pub task: TaskKind,
    /// Pad each document to `seq_len` instead of packing several per sample.
    #[serde(default)]
    pub pad: bool,
    #[serde(default = "default_true")]
    pub shuffle: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimSection {
    #[serde(default = "default_lr")]
    pub lr: f64,
    #[serde(default = "default_betas")]
    pub betas: [f64; 2],
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Decoupled weight decay; never applied to norms and biases.
    #[serde(default)]
    pub weight_decay: f64,
    /// Global-norm gradient clipping; 0 disables.
    #[serde(default = "default_clip")]
    pub grad_clip: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    #[default]
    Cosine,
    Linear,
    Constant,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSection {
    #[serde(default)]
    pub kind: ScheduleKind,
    #[serde(default)]
    pub warmup_steps: u64,
    /// Floor the decay ends at (absolute learning rate).
    #[serde(default)]
    pub min_lr: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    pub steps: u64,
    #[serde(default)]
    pub seed: u64,
    pub micro_batch_size: usize,
    #[serde(default = "default_one")]
    pub grad_accum: usize,
    /// Evaluate every N steps (0 = never); needs `data.eval`.
    #[serde(default)]
    pub eval_every: u64,
    /// Micro-batches per evaluation (0 = the whole eval set, one epoch).
    #[serde(default)]
    pub eval_batches: u64,
    /// Also evaluate before the first step of a fresh run (logged as step 0).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub eval_on_start: bool,
    /// What a forward keeps for its backward (see [`Recompute`]).
    #[serde(default)]
    pub recompute: Recompute,
}

/// `train.recompute`: what runs again during backward instead of being kept from the forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Recompute {
    /// Nothing: the whole forward's graph is kept.
    #[default]
    None,
    /// The MoE experts: each layer keeps its graph up to the experts and their input; the
    /// experts run again.
    Experts,
    /// Every layer: each keeps only its input and runs again.
    Layers,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSection {
    pub dir: PathBuf,
    /// Save every N steps (0 = only at the end).
    #[serde(default)]
    pub every: u64,
    /// Keep the newest K checkpoints (0 = keep all).
    #[serde(default)]
    pub keep_last: usize,
    /// Resume from the newest valid checkpoint in `dir` when there is one.
    #[serde(default = "default_true")]
    pub resume: bool,
    /// Write checkpoints on a background thread from a host snapshot while training goes
    /// on (YAML `async`; left out of the written recipe when off, so older hashes hold).
    #[serde(default, rename = "async", skip_serializing_if = "is_false")]
    pub asynchronous: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggingSection {
    pub dir: PathBuf,
    #[serde(default = "default_true")]
    pub progress: bool,
    #[serde(default = "default_true")]
    pub tensorboard: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParallelSection {
    /// Data-parallel ranks; 0 = every rank that tp × pp leave (the launch's world size).
    #[serde(default)]
    pub dp: usize,
    #[serde(default = "default_one")]
    pub tp: usize,
    #[serde(default = "default_one")]
    pub ep: usize,
    #[serde(default = "default_one")]
    pub pp: usize,
    /// Decoder layers of each virtual pipeline stage, in order (`pp × pp_virtual` counts);
    /// `null`: balanced by cost, the LM head counted on the last stage.
    #[serde(default)]
    pub pp_layers: Option<Vec<usize>>,
    /// Model chunks per pipeline rank: 1 is 1F1B, more the interleaved 1F1B schedule.
    #[serde(default = "default_one")]
    pub pp_virtual: usize,
    /// 0: every DP rank keeps the whole optimizer state; 1: ZeRO-1, sharded over DP ranks.
    #[serde(default)]
    pub zero_stage: u8,
    /// Megatron's sequence parallelism: activations between the tensor-parallel regions are
    /// split by rows over the tp ranks. Required when tp > 1 and the model has MoE layers.
    #[serde(default)]
    pub sequence_parallel: bool,
    /// Gradient bucket size in MiB for the DP all-reduce / reduce-scatter.
    #[serde(default = "default_bucket_mb")]
    pub bucket_mb: f64,
    /// Seconds any collective may wait before every rank fails with a diagnostic.
    #[serde(default = "default_timeout_s")]
    pub timeout_s: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeSection {
    /// Load-balancing loss coefficient; `null` takes `router_aux_loss_coef` from the config.
    #[serde(default)]
    pub aux_loss_coef: Option<f64>,
    /// Router z-loss coefficient (0 = off).
    #[serde(default)]
    pub z_loss_coef: f64,
    /// Expert capacity as a multiple of an even share (`tokens · top_k / experts`) of each
    /// micro-batch's routed rows on a rank; assignments beyond it are dropped (lowest router
    /// probability first). `null`: dropless.
    #[serde(default)]
    pub capacity_factor: Option<f64>,
    /// GRPO on a MoE model: the routes the training forwards replay (`rollout`, `old`, `live`).
    #[serde(default)]
    pub router_replay: super::grpo::RouterReplay,
}

/// Adapters `y = xW + s·(x A) B` on a frozen base, s = alpha / rank (alpha / √rank with
/// rsLoRA). On a MoE model `gate_proj`/`up_proj`/`down_proj` mean the experts and `gate` the
/// router, as in peft with transformers 5.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSection {
    #[serde(default = "default_lora_rank")]
    pub rank: usize,
    #[serde(default = "default_lora_alpha")]
    pub alpha: f64,
    /// Dropout on the adapters' input (attention and dense MLP targets only).
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "default_lora_targets")]
    pub target_modules: Vec<String>,
    #[serde(default)]
    pub use_rslora: bool,
    /// A PEFT adapter folder to start from instead of fresh adapters; its adapter_config.json
    /// then sets ranks, alphas, dropout and targets.
    #[serde(default)]
    pub adapter: Option<PathBuf>,
}

fn default_device() -> String {
    "cpu".into()
}

fn default_true() -> bool {
    true
}
fn default_one() -> usize {
    1
}
fn default_bucket_mb() -> f64 {
    25.0
}
fn default_timeout_s() -> f64 {
    600.0
}
fn default_lora_rank() -> usize {
    8
}
fn default_lora_alpha() -> f64 {
    16.0
}
/// Every projection; the MoE router (`gate`) only when asked for.
fn default_lora_targets() -> Vec<String> {
    moeru_models::lora::KNOWN_TARGETS
        .iter()
        .filter(|t| **t != "gate")
        .map(|t| t.to_string())
        .collect()
}
fn default_lr() -> f64 {
    3e-4
}
fn default_betas() -> [f64; 2] {
    [0.9, 0.95]
}
fn default_eps() -> f64 {
    1e-8
}
fn default_clip() -> f64 {
    1.0
}

impl Default for OptimSection {
    fn default() -> Self {
        Self {
            lr: default_lr(),
            betas: default_betas(),
            eps: default_eps(),
            weight_decay: 0.0,
            grad_clip: default_clip(),
        }
    }
}

impl Default for ScheduleSection {
    fn default() -> Self {
        Self {
            kind: ScheduleKind::Cosine,
            warmup_steps: 0,
            min_lr: 0.0,
        }
    }
}

impl Default for ParallelSection {
    fn default() -> Self {
        Self {
            dp: 0,
            tp: 1,
            ep: 1,
            pp: 1,
            pp_layers: None,
            pp_virtual: 1,
            zero_stage: 0,
            sequence_parallel: false,
            bucket_mb: default_bucket_mb(),
            timeout_s: default_timeout_s(),
        }
    }
}

impl Default for MoeSection {
    fn default() -> Self {
        Self {
            aux_loss_coef: None,
            z_loss_coef: 0.0,
            capacity_factor: None,
            router_replay: super::grpo::RouterReplay::default(),
        }
    }
}

impl Default for LoraSection {
    fn default() -> Self {
        Self {
            rank: default_lora_rank(),
            alpha: default_lora_alpha(),
            dropout: 0.0,
            target_modules: default_lora_targets(),
            use_rslora: false,
            adapter: None,
        }
    }
}
