//! Every key of the schema with the kind of value it takes and whether it is required. The
//! loader checks a recipe against this table before deserializing, so that unknown keys and
//! wrong types are reported with the key's full path and position. Tests check that the table
//! matches `schema.rs` exactly (keys, required-ness, types).

/// The kind of value a key takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A mapping of further keys.
    Section,
    /// A mapping of further keys, or null for "off" (the section is optional as a whole).
    OptSection,
    /// A non-negative integer (u64 / usize).
    UInt,
    /// A non-negative integer or null.
    OptUInt,
    /// A finite number.
    Float,
    /// A finite number or null.
    OptFloat,
    Bool,
    /// A path string.
    Path,
    /// A path string or null.
    OptPath,
    /// One of the listed strings.
    Enum(&'static [&'static str]),
    /// A list of exactly two finite numbers.
    FloatPair,
    /// A free-form mapping (config.json fields) or null; any key inside is allowed.
    FreeMap,
    /// A list of strings.
    StrList,
    /// A string (checked further by `validate`).
    Str,
    /// One of the listed names, or a list of them.
    Names(&'static [&'static str]),
    /// A list of finite numbers, or null.
    OptFloatList,
    /// A list of non-negative integers, or null.
    OptUIntList,
    /// A list of mappings (their keys are checked when the list is read).
    MapList,
}

impl Kind {
    /// What the error message says was expected.
    pub fn expected(self) -> String {
        match self {
            Kind::Section => "a mapping of keys".into(),
            Kind::OptSection => "a mapping of keys, or null (off)".into(),
            Kind::UInt => "a non-negative integer".into(),
            Kind::OptUInt => "a non-negative integer or null".into(),
            Kind::Float => "a number".into(),
            Kind::OptFloat => "a number or null".into(),
            Kind::Bool => "a boolean (true or false)".into(),
            Kind::Path => "a path (a string)".into(),
            Kind::OptPath => "a path (a string) or null".into(),
            Kind::Enum(values) => {
                let v: Vec<String> = values.iter().map(|s| format!("`{s}`")).collect();
                format!("one of {}", v.join(", "))
            }
            Kind::FloatPair => "a list of two numbers, e.g. [0.9, 0.95]".into(),
            Kind::FreeMap => "a mapping of config.json fields, or null".into(),
            Kind::StrList => "a list of strings, e.g. [q_proj, v_proj]".into(),
            Kind::Str => "a string".into(),
            Kind::Names(values) => {
                let v: Vec<String> = values.iter().map(|s| format!("`{s}`")).collect();
                format!("one of {} or a list of them", v.join(", "))
            }
            Kind::OptFloatList => "a list of numbers, e.g. [0.7, 0.3], or null".into(),
            Kind::OptUIntList => "a list of non-negative integers, e.g. [14, 14], or null".into(),
            Kind::MapList => {
                "a list of mappings, e.g. [{name: correct, kind: exact_match, field: answer}]"
                    .into()
            }
        }
    }
}

/// One key of the schema.
#[derive(Debug, Clone, Copy)]
pub struct Key {
    pub path: &'static str,
    pub kind: Kind,
    pub required: bool,
    /// A few words for "missing required key" messages.
    pub meaning: &'static str,
}

const fn key(path: &'static str, kind: Kind, required: bool, meaning: &'static str) -> Key {
    Key {
        path,
        kind,
        required,
        meaning,
    }
}

use Kind::*;

/// All keys, sections before their children.
pub const KEYS: &[Key] = &[
    key(
        "model",
        Section,
        true,
        "the model to train: `path` or `architecture`",
    ),
    key("model.path", OptPath, false, ""),
    key("model.architecture", FreeMap, false, ""),
    key("model.init_seed", UInt, false, ""),
    key("data", Section, true, "the training data"),
    key(
        "data.train",
        Path,
        true,
        "a folder written by `moeru data prepare`",
    ),
    key("data.eval", OptPath, false, ""),
    key("data.seq_len", UInt, true, "tokens per sequence"),
    key(
        "data.task",
        Enum(&["pretrain", "sft", "dpo", "grpo"]),
        false,
        "",
    ),
    key("data.pad", Bool, false, ""),
    key("data.shuffle", Bool, false, ""),
    key("optim", Section, false, ""),
    key("optim.lr", Float, false, ""),
    key("optim.betas", FloatPair, false, ""),
    key("optim.eps", Float, false, ""),
    key("optim.weight_decay", Float, false, ""),
    key("optim.grad_clip", Float, false, ""),
    key("schedule", Section, false, ""),
    key(
        "schedule.kind",
        Enum(&["cosine", "linear", "constant"]),
        false,
        "",
    ),
    key("schedule.warmup_steps", UInt, false, ""),
    key("schedule.min_lr", Float, false, ""),
    key("train", Section, true, "the training loop settings"),
    key("train.steps", UInt, true, "the number of optimizer steps"),
    key("train.seed", UInt, false, ""),
    key(
        "train.micro_batch_size",
        UInt,
        true,
        "sequences per micro-batch",
    ),
    key("train.grad_accum", UInt, false, ""),
    key("train.eval_every", UInt, false, ""),
    key("train.eval_batches", UInt, false, ""),
    key("train.eval_on_start", Bool, false, ""),
    key(
        "train.recompute",
        Enum(&["none", "experts", "layers"]),
        false,
        "",
    ),
    key("checkpoint", Section, true, "where checkpoints go"),
    key("checkpoint.dir", Path, true, "the checkpoint folder"),
    key("checkpoint.every", UInt, false, ""),
    key("checkpoint.keep_last", UInt, false, ""),
    key("checkpoint.resume", Bool, false, ""),
    key("checkpoint.async", Bool, false, ""),
    key("logging", Section, true, "where logs go"),
    key("logging.dir", Path, true, "the log folder"),
    key("logging.progress", Bool, false, ""),
    key("logging.tensorboard", Bool, false, ""),
    key("parallel", Section, false, ""),
    key("parallel.dp", UInt, false, ""),
    key("parallel.tp", UInt, false, ""),
    key("parallel.ep", UInt, false, ""),
    key("parallel.pp", UInt, false, ""),
    key("parallel.pp_layers", OptUIntList, false, ""),
    key("parallel.pp_virtual", UInt, false, ""),
    key("parallel.zero_stage", UInt, false, ""),
    key("parallel.sequence_parallel", Bool, false, ""),
    key("parallel.bucket_mb", Float, false, ""),
    key("parallel.timeout_s", Float, false, ""),
    key("moe", Section, false, ""),
    key("moe.aux_loss_coef", OptFloat, false, ""),
    key("moe.z_loss_coef", Float, false, ""),
    key("moe.capacity_factor", OptFloat, false, ""),
    key(
        "moe.router_replay",
        Enum(super::grpo::ROUTER_REPLAY_NAMES),
        false,
        "",
    ),
    key("precision", Enum(&["f32", "bf16"]), false, ""),
    key("device", Str, false, ""),
    key("lora", OptSection, false, ""),
    key("lora.rank", UInt, false, ""),
    key("lora.alpha", Float, false, ""),
    key("lora.dropout", Float, false, ""),
    key("lora.target_modules", StrList, false, ""),
    key("lora.use_rslora", Bool, false, ""),
    key("lora.adapter", OptPath, false, ""),
    key("dpo", Section, false, ""),
    key("dpo.beta", Float, false, ""),
    key(
        "dpo.loss_type",
        Names(super::dpo::DPO_LOSS_NAMES),
        false,
        "",
    ),
    key("dpo.loss_weights", OptFloatList, false, ""),
    key("dpo.label_smoothing", Float, false, ""),
    key("dpo.reference", Str, false, ""),
    key("dpo.precompute_reference", Bool, false, ""),
    key("grpo", Section, false, ""),
    key("grpo.prompts_per_step", UInt, false, ""),
    key("grpo.num_generations", UInt, false, ""),
    key(
        "grpo.loss_type",
        Enum(super::grpo::GRPO_LOSS_NAMES),
        false,
        "",
    ),
    key("grpo.epsilon", Float, false, ""),
    key("grpo.epsilon_high", OptFloat, false, ""),
    key("grpo.beta", Float, false, ""),
    key("grpo.kl_bias_correction", Bool, false, ""),
    key("grpo.delta", OptFloat, false, ""),
    key(
        "grpo.scale_rewards",
        Enum(super::grpo::SCALE_REWARDS_NAMES),
        false,
        "",
    ),
    key("grpo.num_iterations", UInt, false, ""),
    key("grpo.mask_truncated_completions", Bool, false, ""),
    key("grpo.reference", Str, false, ""),
    key("grpo.dual_clip_c", OptFloat, false, ""),
    key("grpo.logratio_clamp", OptFloat, false, ""),
    key("grpo.kl_clamp", OptFloat, false, ""),
    key("grpo.adv_eps", Float, false, ""),
    key("grpo.tokenizer", OptPath, false, ""),
    key("grpo.log_completions", Bool, false, ""),
    key("generation", Section, false, ""),
    key("generation.max_new_tokens", UInt, false, ""),
    key("generation.temperature", Float, false, ""),
    key("generation.top_p", Float, false, ""),
    key("generation.top_k", UInt, false, ""),
    key("generation.min_p", Float, false, ""),
    key("generation.enable_thinking", Bool, false, ""),
    key("generation.batch_size", OptUInt, false, ""),
    key("rewards", MapList, false, ""),
];

/// The key at `path`, if the schema has one.
pub fn lookup(path: &str) -> Option<&'static Key> {
    KEYS.iter().find(|k| k.path == path)
}

/// The last segments of the keys directly under `prefix` ("" for the top level).
pub fn children(prefix: &str) -> Vec<&'static str> {
    KEYS.iter()
        .filter_map(|k| match k.path.rsplit_once('.') {
            Some((parent, last)) if parent == prefix => Some(last),
            None if prefix.is_empty() => Some(k.path),
            _ => None,
        })
        .collect()
}

/// `prefix.name`, or `name` at the top level.
pub fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// Whether `path` lies inside a free-form map (e.g. `model.architecture.hidden_size`).
pub fn inside_free_map(path: &str) -> bool {
    KEYS.iter()
        .filter(|k| k.kind == FreeMap)
        .any(|k| path.starts_with(k.path) && path[k.path.len()..].starts_with('.'))
}
