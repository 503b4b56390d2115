//! The `grpo`, `generation` and `rewards` sections (`data.task: grpo`): TRL 1.16's GRPO
//! settings with its defaults, verl's clip and clamp options, the sampling of rollouts and the
//! reward functions.
//!
//! Owns: the sections' schema and their checks. Must not: compute losses or rewards
//! (`crate::grpo`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::schema::Recipe;
use super::validate::Violation;

/// How per-token losses become a micro-batch's loss (formulas: `crate::grpo::loss`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrpoLossType {
    Grpo,
    Bnpo,
    DrGrpo,
    Dapo,
}

pub const GRPO_LOSS_NAMES: &[&str] = &["grpo", "bnpo", "dr_grpo", "dapo"];

/// What a group's rewards are scaled by (TRL's `scale_rewards`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScaleRewards {
    /// The group's standard deviation.
    Group,
    /// The generation batch's.
    Batch,
    /// None (Dr. GRPO).
    None,
}

/// MoE router replay in GRPO's training forwards (`moe.router_replay`): which routes the
/// policy's forwards over a rollout use instead of routing live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RouterReplay {
    /// The generator's (R3): each token goes to the experts it went to while sampled.
    #[default]
    Rollout,
    /// The old policy's forward over the rollout (R2; with one update per generation batch
    /// the old policy is the live one, so this is live routing).
    Old,
    /// Live routing (not `off`: YAML reads that as a boolean).
    Live,
}

pub const ROUTER_REPLAY_NAMES: &[&str] = &["rollout", "old", "live"];

pub const SCALE_REWARDS_NAMES: &[&str] = &["group", "batch", "none"];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpoSection {
    /// Prompts drawn per generation batch; each is completed `num_generations` times.
    #[serde(default = "default_prompts")]
    pub prompts_per_step: usize,
    #[serde(default = "default_generations")]
    pub num_generations: usize,
    #[serde(default = "default_loss_type")]
    pub loss_type: GrpoLossType,
    /// ε_low of the clipped ratio.
    #[serde(default = "default_epsilon")]
    pub epsilon: f64,
    /// ε_high; null: `epsilon`.
    #[serde(default)]
    pub epsilon_high: Option<f64>,
    /// Weight of the k3 KL to the reference; 0 needs no reference.
    #[serde(default)]
    pub beta: f64,
    /// TRL's `use_bias_correction_kl`: the KL term weighted by the importance ratio.
    #[serde(default = "default_true")]
    pub kl_bias_correction: bool,
    /// TRL's `delta`: an upper bound on the ratio in the unclipped term.
    #[serde(default)]
    pub delta: Option<f64>,
    #[serde(default = "default_scale")]
    pub scale_rewards: ScaleRewards,
    /// Optimizer steps on each generation batch (TRL's μ).
    #[serde(default = "default_one")]
    pub num_iterations: usize,
    /// Completions cut at `generation.max_new_tokens` get no loss (they still count in their
    /// group's mean and standard deviation).
    #[serde(default)]
    pub mask_truncated_completions: bool,
    /// `auto`: adapters off under fresh LoRA, else a frozen copy of the starting weights.
    #[serde(default = "default_reference")]
    pub reference: String,
    /// verl's dual clip constant (3.0 in verl); null: off.
    #[serde(default)]
    pub dual_clip_c: Option<f64>,
    /// verl's ±20 clamp of the log-ratio; null: off.
    #[serde(default)]
    pub logratio_clamp: Option<f64>,
    /// verl's `low_var_kl` clamp of k3 (±10 in verl); null: off.
    #[serde(default)]
    pub kl_clamp: Option<f64>,
    /// Added to the standard deviation before dividing (TRL 1e-4, verl 1e-6).
    #[serde(default = "default_adv_eps")]
    pub adv_eps: f64,
    /// tokenizer.json for prompts and rewards; null: the model folder's.
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    /// Each rank appends its rollouts (prompt row, completion ids and text, rewards) to
    /// `logging.dir/completions-rank<R>.jsonl` (TRL's `log_completions`).
    #[serde(default)]
    pub log_completions: bool,
}

impl Default for GrpoSection {
    fn default() -> Self {
        serde_json::from_value(serde_json::json!({})).expect("every key has a default")
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationSection {
    #[serde(default = "default_max_new")]
    pub max_new_tokens: usize,
    /// 0: greedy.
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    #[serde(default = "default_top_p")]
    pub top_p: f64,
    #[serde(default)]
    pub top_k: usize,
    #[serde(default)]
    pub min_p: f64,
    /// Chat prompts: render the think block open (true) or empty (false).
    #[serde(default)]
    pub enable_thinking: bool,
    /// Rows generated together; null: every row of the rank's generation batch.
    #[serde(default)]
    pub batch_size: Option<usize>,
}

impl Default for GenerationSection {
    fn default() -> Self {
        serde_json::from_value(serde_json::json!({})).expect("every key has a default")
    }
}

/// What a reward function does with a completion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RewardKind {
    ExactMatch,
    Format,
    Overlong,
    Command,
}

pub const REWARD_KINDS: &[&str] = &["exact_match", "format", "overlong", "command"];

/// Where `exact_match` finds a completion's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Extract {
    /// After the last `#### ` (GSM8K).
    Hash,
    /// The last balanced `\boxed{…}`.
    Boxed,
    /// The last `<answer>…</answer>`.
    AnswerTag,
    /// The last number.
    LastNumber,
}

pub const EXTRACT_NAMES: &[&str] = &["hash", "boxed", "answer_tag", "last_number"];

/// One reward function of the `rewards` list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardSpec {
    /// Logged as `rewards/<name>/mean` and `/std`.
    pub name: String,
    pub kind: RewardKind,
    #[serde(default = "default_weight")]
    pub weight: f64,
    /// exact_match: where the answer is.
    #[serde(default)]
    pub extract: Option<Extract>,
    /// exact_match: the prompt row's field holding the right answer.
    #[serde(default)]
    pub field: Option<String>,
    /// format: a regex the whole completion must match (`.` matches newlines).
    #[serde(default)]
    pub pattern: Option<String>,
    /// overlong: DAPO's soft penalty, from `max_len − cache` tokens to −1 at `max_len`.
    #[serde(default)]
    pub max_len: Option<usize>,
    #[serde(default)]
    pub cache: Option<usize>,
    /// command: the program and its arguments.
    #[serde(default)]
    pub argv: Option<Vec<String>>,
    #[serde(default)]
    pub timeout_s: Option<f64>,
}

impl GrpoSection {
    pub fn epsilon_high(&self) -> f64 {
        self.epsilon_high.unwrap_or(self.epsilon)
    }

    /// The first violated constraint, if any.
    pub fn validate(&self) -> Result<(), Violation> {
        let bad = |key, msg: String| {
            Err(Violation {
                key,
                msg,
                related: &[],
            })
        };
        if self.prompts_per_step == 0 {
            return bad(
                "grpo.prompts_per_step",
                "is 0; draw at least 1 prompt".into(),
            );
        }
        if self.num_generations < 2 {
            return bad(
                "grpo.num_generations",
                format!(
                    "is {}; a group needs at least 2 completions to compare (TRL's default is 8)",
                    self.num_generations
                ),
            );
        }
        if self.num_iterations == 0 {
            return bad("grpo.num_iterations", "is 0; use 1 or more".into());
        }
        for (key, v) in [
            ("grpo.epsilon", Some(self.epsilon)),
            ("grpo.epsilon_high", self.epsilon_high),
        ] {
            if let Some(v) = v.filter(|v| !(v.is_finite() && *v >= 0.0)) {
                return bad(key, format!("is {v}; it must be 0 or more"));
            }
        }
        if !(self.beta.is_finite() && self.beta >= 0.0) {
            return bad(
                "grpo.beta",
                format!("is {}; it must be 0 or more", self.beta),
            );
        }
        for (key, v) in [
            ("grpo.delta", self.delta),
            ("grpo.dual_clip_c", self.dual_clip_c),
            ("grpo.logratio_clamp", self.logratio_clamp),
            ("grpo.kl_clamp", self.kl_clamp),
        ] {
            if let Some(v) = v.filter(|v| !(v.is_finite() && *v > 0.0)) {
                return bad(key, format!("is {v}; it must be greater than 0, or null"));
            }
        }
        if let Some(c) = self.dual_clip_c.filter(|c| *c <= 1.0) {
            return bad(
                "grpo.dual_clip_c",
                format!("is {c}; the dual clip bound must be greater than 1 (verl uses 3.0)"),
            );
        }
        if !(self.adv_eps.is_finite() && self.adv_eps >= 0.0) {
            return bad(
                "grpo.adv_eps",
                format!("is {}; it must be 0 or more", self.adv_eps),
            );
        }
        if !matches!(self.reference.as_str(), "auto" | "none") {
            return bad(
                "grpo.reference",
                format!("is {:?}; use `auto` or `none`", self.reference),
            );
        }
        if self.beta > 0.0 && self.reference == "none" {
            return Err(Violation {
                key: "grpo.reference",
                msg: format!("is `none` but `grpo.beta` is {}; the KL term needs a reference: set `grpo.reference: auto` or `grpo.beta: 0`", self.beta),
                related: &["grpo.beta"],
            });
        }
        Ok(())
    }
}

impl GenerationSection {
    pub fn validate(&self) -> Result<(), Violation> {
        let bad = |key, msg: String| {
            Err(Violation {
                key,
                msg,
                related: &[],
            })
        };
        if self.max_new_tokens == 0 {
            return bad(
                "generation.max_new_tokens",
                "is 0; generate at least 1 token".into(),
            );
        }
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad(
                "generation.temperature",
                format!("is {}; use 0 (greedy) or more", self.temperature),
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(
                "generation.top_p",
                format!("is {}; it must be in (0, 1]", self.top_p),
            );
        }
        if !(0.0..1.0).contains(&self.min_p) {
            return bad(
                "generation.min_p",
                format!("is {}; it must be in [0, 1)", self.min_p),
            );
        }
        if self.batch_size == Some(0) {
            return bad(
                "generation.batch_size",
                "is 0; use 1 or more, or null".into(),
            );
        }
        Ok(())
    }
}

/// The `rewards` list's checks: each kind has the keys it needs, names are unique.
pub fn validate_rewards(rewards: &[RewardSpec]) -> Result<(), Violation> {
    let bad = |msg: String| {
        Err(Violation {
            key: "rewards",
            msg,
            related: &[],
        })
    };
    if rewards.is_empty() {
        return bad("is empty; `data.task: grpo` needs at least one reward function, e.g. [{name: correct, kind: exact_match, extract: hash, field: answer}]".into());
    }
    for (i, r) in rewards.iter().enumerate() {
        let name = &r.name;
        if rewards[..i].iter().any(|o| o.name == *name) {
            return bad(format!(
                "names {name:?} twice; give each reward function its own name"
            ));
        }
        if !r.weight.is_finite() {
            return bad(format!("{name:?}: weight {} is not a number", r.weight));
        }
        let need = |what: &str, ok: bool| match ok {
            true => Ok(()),
            false => bad(format!("{name:?} (kind {:?}) needs `{what}`", r.kind)),
        };
        match r.kind {
            RewardKind::ExactMatch => need("field", r.field.is_some())?,
            RewardKind::Format => need("pattern", r.pattern.is_some())?,
            RewardKind::Overlong => {
                need("max_len", r.max_len.is_some())?;
                need(
                    "cache",
                    r.cache
                        .is_some_and(|c| c > 0 && c <= r.max_len.unwrap_or(0)),
                )?;
            }
            RewardKind::Command => need("argv", r.argv.as_ref().is_some_and(|a| !a.is_empty()))?,
        }
    }
    Ok(())
}

fn default_prompts() -> usize {
    16
}
fn default_generations() -> usize {
    8
}
fn default_loss_type() -> GrpoLossType {
    GrpoLossType::Dapo
}
fn default_epsilon() -> f64 {
    0.2
}
fn default_true() -> bool {
    true
}
fn default_scale() -> ScaleRewards {
    ScaleRewards::Group
}
fn default_one() -> usize {
    1
}
fn default_reference() -> String {
    "auto".into()
}
fn default_adv_eps() -> f64 {
    1e-4
}
fn default_max_new() -> usize {
    512
}
fn default_temperature() -> f64 {
    1.0
}
fn default_top_p() -> f64 {
    1.0
}
fn default_weight() -> f64 {
    1.0
}

/// The GRPO run's checks across sections: its own sections, the rollout batch against the
/// training batch (when `parallel.dp` is given; the task checks again with the world's),
/// prompt room in `data.seq_len`, and steps at generation boundaries.
pub fn validate_run(r: &Recipe) -> Result<(), Violation> {
    r.grpo.validate()?;
    r.generation.validate()?;
    validate_rewards(&r.rewards)?;
    let (g, p) = (&r.grpo, &r.parallel);
    if p.tp > 1 || p.ep > 1 || p.pp > 1 {
        return Err(Violation {
            key: "data.task",
            msg: format!("is `grpo` with tp {} · ep {} · pp {}; GRPO runs data-parallel only for now: set `parallel.tp`, `parallel.ep` and `parallel.pp` to 1", p.tp, p.ep, p.pp),
            related: &["parallel.tp", "parallel.ep", "parallel.pp"],
        });
    }
    if p.dp > 0 {
        rollout_batch(r, p.dp).map_err(|msg| Violation {
            key: "grpo.prompts_per_step",
            msg,
            related: &[
                "grpo.num_generations",
                "train.micro_batch_size",
                "train.grad_accum",
                "parallel.dp",
            ],
        })?;
    }
    if r.generation.temperature == 0.0 {
        return Err(Violation {
            key: "generation.temperature",
            msg: "is 0 (greedy) under `data.task: grpo`; a group of identical completions has no signal: sample (TRL's default is 1.0)".into(),
            related: &["data.task"],
        });
    }
    if r.generation.max_new_tokens >= r.data.seq_len {
        return Err(Violation {
            key: "generation.max_new_tokens",
            msg: format!("is {} but `data.seq_len` is {}; prompt and completion must fit in `data.seq_len`: raise it or generate fewer tokens", r.generation.max_new_tokens, r.data.seq_len),
            related: &["data.seq_len"],
        });
    }
    let mu = g.num_iterations as u64;
    for (key, v) in [
        ("train.steps", r.train.steps),
        ("checkpoint.every", r.checkpoint.every),
    ] {
        if v % mu != 0 {
            return Err(Violation {
                key,
                msg: format!("is {v}, not a multiple of `grpo.num_iterations` ({mu}); checkpoints fall on generation boundaries, so make it one"),
                related: &["grpo.num_iterations"],
            });
        }
    }
    Ok(())
}

/// Checks that one generation batch (`prompts_per_step × num_generations` completions) is
/// one optimizer step's rows over `dp` ranks, each rank holding whole groups.
pub fn rollout_batch(r: &Recipe, dp: usize) -> Result<(), String> {
    let g = &r.grpo;
    let rows = g.prompts_per_step * g.num_generations;
    let step = r.train.micro_batch_size * r.train.grad_accum * dp;
    if rows != step {
        return Err(format!("× `grpo.num_generations` is {} × {} = {rows} completions, but a step trains `train.micro_batch_size` × `train.grad_accum` × dp = {step} rows; make them equal", g.prompts_per_step, g.num_generations));
    }
    if !g.prompts_per_step.is_multiple_of(dp) {
        return Err(format!("is {}, not a multiple of the {dp} data-parallel ranks; each rank generates whole groups", g.prompts_per_step));
    }
    Ok(())
}
