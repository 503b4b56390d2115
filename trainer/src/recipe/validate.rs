//! Checks across values that types alone cannot express (ranges, exclusive keys, keys that
//! need other keys). Each failure names the key, its value and the fix.

use moeru_models::lora::KNOWN_TARGETS;
use moeru_models::DeviceSpec;

use super::schema::{
    DpoSection, GenerationSection, GrpoSection, LoraSection, MoeSection, Recipe, TaskKind,
};

/// A failed check: the key it is about and the message (without the key).
#[derive(Debug, Clone, PartialEq)]
pub struct Violation {
    pub key: &'static str,
    pub msg: String,
    /// Other keys the check involves (an override of one of them may be the cause).
    pub related: &'static [&'static str],
}

fn at_least(key: &'static str, value: u64, min: u64, why: &str) -> Result<(), Violation> {
    if value >= min {
        return Ok(());
    }
    Err(Violation {
        key,
        msg: format!("is {value}; it must be at least {min}{why}"),
        related: &[],
    })
}

fn validate_moe(m: &MoeSection) -> Result<(), Violation> {
    if let Some(c) = m.aux_loss_coef {
        non_negative("moe.aux_loss_coef", c)?;
    }
    non_negative("moe.z_loss_coef", m.z_loss_coef)?;
    match m.capacity_factor {
        Some(cf) if cf.is_nan() || cf <= 0.0 => Err(Violation {
            key: "moe.capacity_factor",
            msg: format!(
                "is {cf}; it must be greater than 0 (e.g. 1.25), or null for dropless routing"
            ),
            related: &[],
        }),
        _ => Ok(()),
    }
}

fn non_negative(key: &'static str, value: f64) -> Result<(), Violation> {
    if value >= 0.0 {
        return Ok(());
    }
    Err(Violation {
        key,
        msg: format!("is {value}; it must be 0 or more"),
        related: &[],
    })
}

/// The first violated constraint, if any.
pub fn validate(r: &Recipe) -> Result<(), Violation> {
    if let Err(msg) = r.device.parse::<DeviceSpec>() {
        return Err(Violation {
            key: "device",
            msg,
            related: &[],
        });
    }
    match (&r.model.path, &r.model.architecture) {
        (Some(_), Some(_)) | (None, None) => {
            let which = if r.model.path.is_some() {
                "both are set"
            } else {
                "neither is set"
            };
            return Err(Violation {
                key: "model",
                msg: format!(
                    "set exactly one of `model.path` (a Hugging Face folder) and \
                     `model.architecture` (config.json fields, to train from scratch); {which}"
                ),
                related: &["model.path", "model.architecture"],
            });
        }
        _ => {}
    }
    let d = &r.data;
    at_least(
        "data.seq_len",
        d.seq_len as u64,
        2,
        " (an input and a target token)",
    )?;
    let t = &r.train;
    at_least("train.steps", t.steps, 1, "")?;
    at_least("train.micro_batch_size", t.micro_batch_size as u64, 1, "")?;
    at_least(
        "train.grad_accum",
        t.grad_accum as u64,
        1,
        " (1 = no accumulation)",
    )?;
    let p = &r.parallel;
    if p.zero_stage > 1 {
        return Err(Violation {
            key: "parallel.zero_stage",
            msg: format!(
                "is {}; moeru has ZeRO stage 0 (off) and 1 (optimizer state sharded over DP ranks)",
                p.zero_stage
            ),
            related: &[],
        });
    }
    if !(p.bucket_mb > 0.0 && p.bucket_mb.is_finite()) {
        return Err(Violation {
            key: "parallel.bucket_mb",
            msg: format!(
                "is {}; it must be a positive number of MiB, e.g. 25",
                p.bucket_mb
            ),
            related: &[],
        });
    }
    if !(p.timeout_s > 0.0 && p.timeout_s.is_finite()) {
        return Err(Violation {
            key: "parallel.timeout_s",
            msg: format!(
                "is {}; it must be a positive number of seconds, e.g. 600",
                p.timeout_s
            ),
            related: &[],
        });
    }
    at_least("parallel.tp", p.tp as u64, 1, " (1 = no parallelism)")?;
    at_least("parallel.ep", p.ep as u64, 1, " (1 = no parallelism)")?;
    at_least("parallel.pp", p.pp as u64, 1, " (1 = no parallelism)")?;

    let s = &r.schedule;
    if s.warmup_steps > t.steps {
        return Err(Violation {
            key: "schedule.warmup_steps",
            msg: format!(
                "is {} but `train.steps` is {}; set it to at most {}",
                s.warmup_steps, t.steps, t.steps
            ),
            related: &["train.steps"],
        });
    }
    let o = &r.optim;
    // 0 is allowed: a control run whose weights must not move.
    if o.lr.is_nan() || o.lr < 0.0 {
        return Err(Violation {
            key: "optim.lr",
            msg: format!(
                "is {}; it must be 0 or more (0 trains nothing: a control run)",
                o.lr
            ),
            related: &[],
        });
    }
    non_negative("schedule.min_lr", s.min_lr)?;
    if s.min_lr > o.lr {
        return Err(Violation {
            key: "schedule.min_lr",
            msg: format!(
                "is {} but `optim.lr` is {}; the floor must be at most the peak learning rate",
                s.min_lr, o.lr
            ),
            related: &["optim.lr"],
        });
    }
    for (i, beta) in o.betas.iter().enumerate() {
        if !(0.0..1.0).contains(beta) {
            return Err(Violation {
                key: "optim.betas",
                msg: format!("beta{} is {beta}; each beta must be in [0, 1)", i + 1),
                related: &[],
            });
        }
    }
    if o.eps.is_nan() || o.eps <= 0.0 {
        return Err(Violation {
            key: "optim.eps",
            msg: format!("is {}; it must be greater than 0 (e.g. 1e-8)", o.eps),
            related: &[],
        });
    }
    non_negative("optim.weight_decay", o.weight_decay)?;
    non_negative("optim.grad_clip", o.grad_clip)?;
    validate_moe(&r.moe)?;
    if let Some(l) = &r.lora {
        validate_lora(l, r.model.path.is_some())?;
    }
    validate_task(r)?;
    if t.eval_every > 0 && d.eval.is_none() {
        return Err(Violation {
            key: "train.eval_every",
            msg: format!(
                "is {} but `data.eval` is not set; set `data.eval` to a prepared folder, \
                 or `train.eval_every` to 0",
                t.eval_every
            ),
            related: &["data.eval"],
        });
    }
    Ok(())
}

/// The task's own sections' checks, and that another task's sections are not set.
fn validate_task(r: &Recipe) -> Result<(), Violation> {
    match r.data.task {
        TaskKind::Dpo => r.dpo.validate()?,
        TaskKind::Grpo => super::grpo::validate_run(r)?,
        _ => {}
    }
    let task = serde_json::to_value(r.data.task)
        .map_or(String::new(), |v| v.as_str().unwrap_or("").to_string());
    let foreign = |key: &'static str, owner: &str| Violation {
        key,
        msg: format!(
            "is set but `data.task` is `{task}`; the section applies to `data.task: {owner}` only"
        ),
        related: &["data.task"],
    };
    if r.data.task != TaskKind::Dpo && r.dpo != DpoSection::default() {
        return Err(foreign("dpo", "dpo"));
    }
    if r.data.task != TaskKind::Grpo {
        if r.grpo != GrpoSection::default() {
            return Err(foreign("grpo", "grpo"));
        }
        if r.generation != GenerationSection::default() {
            return Err(foreign("generation", "grpo"));
        }
        if !r.rewards.is_empty() {
            return Err(foreign("rewards", "grpo"));
        }
    }
    Ok(())
}

fn validate_lora(l: &LoraSection, has_path: bool) -> Result<(), Violation> {
    if !has_path {
        return Err(Violation {
            key: "lora",
            msg: "trains adapters on a pretrained model, but `model.path` is not set; point \
                  `model.path` at the base model's Hugging Face folder (`model.architecture` \
                  builds a random model)"
                .into(),
            related: &["model.path", "model.architecture"],
        });
    }
    at_least("lora.rank", l.rank as u64, 1, "")?;
    if !(l.alpha > 0.0 && l.alpha.is_finite()) {
        return Err(Violation {
            key: "lora.alpha",
            msg: format!(
                "is {}; it must be greater than 0 (e.g. 2 × lora.rank)",
                l.alpha
            ),
            related: &[],
        });
    }
    if !(0.0..1.0).contains(&l.dropout) {
        return Err(Violation {
            key: "lora.dropout",
            msg: format!("is {}; it must be in [0, 1)", l.dropout),
            related: &[],
        });
    }
    if l.target_modules.is_empty() {
        return Err(Violation {
            key: "lora.target_modules",
            msg: format!(
                "is empty; name at least one of {}",
                KNOWN_TARGETS.join(", ")
            ),
            related: &[],
        });
    }
    if let Some(t) = l
        .target_modules
        .iter()
        .find(|t| !KNOWN_TARGETS.contains(&t.as_str()))
    {
        return Err(Violation {
            key: "lora.target_modules",
            msg: format!(
                "names `{t}`; known targets are {} (`gate` is the MoE router)",
                KNOWN_TARGETS.join(", ")
            ),
            related: &[],
        });
    }
    Ok(())
}
