//! `adapter_config.json` of a PEFT LoRA adapter: reading (with the options moeru cannot honour
//! refused by name), peft's target and rank/alpha pattern matching, and writing.

use std::path::{Path, PathBuf};

use moeru_models::{LoraConfig, LoraError, Qwen3Config};
use regex::Regex;
use serde_json::{Map, Value};

use crate::error::CheckpointError;

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// Every tensor name in a PEFT file starts with this.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// What can be wrong with a PEFT adapter folder, phrased with the file, key or tensor.
#[derive(Debug, thiserror::Error)]
pub enum PeftError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("{0}")]
    Lora(#[from] LoraError),
    #[error("{file}: {source}")]
    InAdapter { file: PathBuf, source: LoraError },
    #[error("{file}: `{key}` = {value} is not supported by moeru: {fix}")]
    Unsupported {
        file: PathBuf,
        key: String,
        value: String,
        fix: String,
    },
    #[error("{file}: {reason}")]
    BadConfig { file: PathBuf, reason: String },
    #[error("{dir}: no {ADAPTER_WEIGHTS}{hint}")]
    NoWeights { dir: PathBuf, hint: String },
    #[error("{file}: tensor `{name}` {shape:?} cannot be loaded: {why}")]
    UnknownTensor {
        file: PathBuf,
        name: String,
        shape: Vec<usize>,
        why: String,
    },
    #[error("{file}: tensor `{name}` adapts `{key}`, which {config} does not target, so peft would not load it; add it to target_modules / target_parameters or drop the tensor")]
    Untargeted {
        file: PathBuf,
        name: String,
        key: String,
        config: PathBuf,
    },
    #[error("{file}: tensor `{name}` is missing: {why}")]
    MissingTensor {
        file: PathBuf,
        name: String,
        why: String,
    },
    #[error("{file}: tensor `{name}` has shape {found:?}, but the base model and the adapter's rank imply {expected:?} (an adapter for another model?)")]
    Shape {
        file: PathBuf,
        name: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    /// `detail` says what the config gives the site, and by which rule.
    #[error("{file}: `{name}` {detail}; the files do not belong together")]
    RankMismatch {
        file: PathBuf,
        name: String,
        detail: String,
    },
    #[error("cannot save a PEFT adapter: {0}")]
    Unrepresentable(String),
}

/// `target_modules` as peft accepts it: a list of names (exact or `.`-suffix match) or a regex.
#[derive(Debug, Clone, PartialEq)]
pub enum Targets {
    List(Vec<String>),
    Regex(String),
}

/// The parts of adapter_config.json that decide the model moeru builds.
#[derive(Debug, Clone)]
pub struct PeftAdapterConfig {
    pub file: PathBuf,
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub use_rslora: bool,
    pub target_modules: Option<Targets>,
    pub target_parameters: Vec<String>,
    pub exclude_modules: Option<Targets>,
    pub layers_to_transform: Option<Vec<usize>>,
    pub rank_pattern: Vec<(String, usize)>,
    pub alpha_pattern: Vec<(String, f64)>,
    pub base_model_name_or_path: Option<String>,
}

/// Options whose `true` changes what the adapter computes.
const FLAGS: &[(&str, &str)] = &[
    ("use_dora", "DoRA adapters are not implemented"),
    (
        "fan_in_fan_out",
        "Qwen3 has no Conv1D layers; re-create the adapter with fan_in_fan_out false",
    ),
    (
        "lora_bias",
        "adapters with a bias on lora_B are not implemented",
    ),
    ("use_qalora", "QALoRA is not implemented"),
    ("use_bdlora", "block-diagonal LoRA is not implemented"),
];

/// Options whose presence (non-null, non-empty) changes what the adapter holds or computes.
const EXTRAS: &[(&str, &str)] = &[
    (
        "modules_to_save",
        "fully trained extra modules are not implemented; only LoRA A/B tensors load",
    ),
    (
        "trainable_token_indices",
        "trainable token embeddings are not implemented",
    ),
    ("layer_replication", "layer replication is not implemented"),
    (
        "alora_invocation_tokens",
        "activated LoRA (aLoRA) is not implemented",
    ),
    (
        "megatron_config",
        "Megatron-parallel LoRA layers are not implemented",
    ),
    ("velora_config", "VeLoRA is not implemented"),
    ("kasa_config", "KaSA is not implemented"),
    ("arrow_config", "Arrow routing is not implemented"),
    ("monteclora_config", "MonteCLoRA is not implemented"),
];

impl PeftAdapterConfig {
    /// Reads and checks `<dir>/adapter_config.json`.
    pub fn read(dir: &Path) -> Result<Self, PeftError> {
        let file = dir.join(ADAPTER_CONFIG);
        let text = std::fs::read_to_string(&file).map_err(|e| CheckpointError::io(&file, e))?;
        let bad = |reason: String| PeftError::BadConfig {
            file: file.clone(),
            reason,
        };
        let json: Map<String, Value> =
            serde_json::from_str(&text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        let unsupported = |key: &str, value: &Value, fix: &str| PeftError::Unsupported {
            file: file.clone(),
            key: key.into(),
            value: value.to_string(),
            fix: fix.into(),
        };
        let peft_type = json.get("peft_type").cloned().unwrap_or(Value::Null);
        if peft_type != "LORA" {
            return Err(unsupported(
                "peft_type",
                &peft_type,
                "only LoRA adapters load",
            ));
        }
        if let Some(v) = json.get("bias").filter(|v| **v != "none") {
            return Err(unsupported(
                "bias",
                v,
                "adapters that train biases are not implemented; use bias \"none\"",
            ));
        }
        for (key, fix) in FLAGS {
            if let Some(v) = json.get(*key).filter(|v| **v == true) {
                return Err(unsupported(key, v, fix));
            }
        }
        for (key, fix) in EXTRAS {
            let present = match json.get(*key) {
                None | Some(Value::Null) => false,
                Some(Value::Array(a)) => !a.is_empty(),
                Some(Value::Object(o)) => !o.is_empty(),
                Some(_) => true,
            };
            if present {
                return Err(unsupported(key, &json[*key], fix));
            }
        }
        let number = |key: &str, default: Option<f64>| -> Result<f64, PeftError> {
            match (json.get(key), default) {
                (Some(v), _) if v.is_number() => Ok(v.as_f64().expect("a number")),
                (None | Some(Value::Null), Some(d)) => Ok(d),
                (v, _) => Err(bad(format!("`{key}` must be a number, found {v:?}"))),
            }
        };
        let r = number("r", None)?;
        if r < 1.0 || r.fract() != 0.0 {
            return Err(bad(format!("`r` must be a positive integer, found {r}")));
        }
        let targets = |key: &str| -> Result<Option<Targets>, PeftError> {
            match json.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(Targets::Regex(s.clone()))),
                Some(Value::Array(a)) => Ok(Some(Targets::List(strings(a, key).map_err(bad)?))),
                Some(v) => Err(bad(format!(
                    "`{key}` must be a list or a string, found {v}"
                ))),
            }
        };
        let target_parameters = match json.get("target_parameters") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => strings(a, "target_parameters").map_err(bad)?,
            Some(v) => {
                return Err(bad(format!(
                    "`target_parameters` must be a list, found {v}"
                )))
            }
        };
        let layers_to_transform = match json.get("layers_to_transform") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => n.as_u64().map(|n| vec![n as usize]),
            Some(Value::Array(a)) => Some(
                a.iter()
                    .filter_map(|v| v.as_u64())
                    .map(|n| n as usize)
                    .collect(),
            ),
            Some(v) => {
                return Err(bad(format!(
                    "`layers_to_transform` must be an integer or a list, found {v}"
                )))
            }
        };
        if let Some(p) = json.get("layers_pattern").filter(|v| !v.is_null()) {
            if *p != "layers" && *p != serde_json::json!(["layers"]) {
                return Err(unsupported(
                    "layers_pattern",
                    p,
                    "Qwen3's layers are `model.layers.N`; use null or \"layers\"",
                ));
            }
        }
        let pattern = |key: &str| -> Result<Vec<(String, f64)>, PeftError> {
            let Some(Value::Object(m)) = json.get(key) else {
                return Ok(Vec::new());
            };
            m.iter()
                .map(|(k, v)| {
                    Regex::new(&format!("^(?:{k})$"))
                        .map_err(|e| bad(format!("`{key}` key `{k}` is not a regex: {e}")))?;
                    v.as_f64()
                        .map(|v| (k.clone(), v))
                        .ok_or_else(|| bad(format!("`{key}[{k}]` must be a number")))
                })
                .collect()
        };
        Ok(Self {
            r: r as usize,
            lora_alpha: number("lora_alpha", Some(8.0))?,
            lora_dropout: number("lora_dropout", Some(0.0))?,
            use_rslora: json.get("use_rslora") == Some(&Value::Bool(true)),
            target_modules: targets("target_modules")?,
            target_parameters,
            exclude_modules: targets("exclude_modules")?,
            layers_to_transform,
            rank_pattern: pattern("rank_pattern")?
                .into_iter()
                .map(|(k, v)| (k, v as usize))
                .collect(),
            alpha_pattern: pattern("alpha_pattern")?,
            base_model_name_or_path: json
                .get("base_model_name_or_path")
                .and_then(|v| v.as_str())
                .map(str::to_string),
            file,
        })
    }

    /// The rank peft gives the site with key `key`, and the rule that gave it.
    pub fn rank_for(&self, key: &str) -> Result<(usize, String), PeftError> {
        let found = self.lookup(&self.rank_pattern, key, "rank_pattern")?;
        Ok(found.map_or((self.r, format!("r = {}", self.r)), |(p, v)| {
            (v, format!("rank_pattern `{p}`"))
        }))
    }

    /// The alpha peft gives the site with key `key`.
    pub fn alpha_for(&self, key: &str) -> Result<f64, PeftError> {
        Ok(self
            .lookup(&self.alpha_pattern, key, "alpha_pattern")?
            .map_or(self.lora_alpha, |(_, v)| v))
    }

    /// peft's `get_pattern_key`: the first pattern `p` with `re.match(r"(.*\.)?(p)$", key)`.
    /// JSON objects are read sorted here, so several matching patterns must agree.
    fn lookup<T: Copy + PartialEq>(
        &self,
        patterns: &[(String, T)],
        key: &str,
        what: &str,
    ) -> Result<Option<(String, T)>, PeftError> {
        let hits: Vec<&(String, T)> = patterns
            .iter()
            .filter(|(p, _)| {
                Regex::new(&format!(r"^(?:.*\.)?(?:{p})$")).is_ok_and(|re| re.is_match(key))
            })
            .collect();
        match hits.as_slice() {
            [] => Ok(None),
            [first, rest @ ..] if rest.iter().all(|h| h.1 == first.1) => Ok(Some((first.0.clone(), first.1))),
            _ => Err(PeftError::BadConfig {
                file: self.file.clone(),
                reason: format!("several `{what}` patterns with different values match `{key}`; moeru cannot tell which peft picks, keep one"),
            }),
        }
    }

    /// The moeru settings: global rank, alpha, dropout, rsLoRA, and the targets as recorded.
    pub fn lora_config(&self) -> LoraConfig {
        let mut target_modules = match &self.target_modules {
            Some(Targets::List(l)) => l.clone(),
            Some(Targets::Regex(r)) => vec![r.clone()],
            None => Vec::new(),
        };
        target_modules.extend(self.target_parameters.iter().cloned());
        LoraConfig {
            rank: self.r,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            target_modules,
            use_rslora: self.use_rslora,
        }
    }

    /// Whether peft would put an adapter on the linear module `key`
    /// (`model.layers.0.self_attn.q_proj`); `None` where moeru cannot tell.
    pub fn targets_module(&self, key: &str, model: &Qwen3Config) -> Option<bool> {
        if let Some(ex) = &self.exclude_modules {
            if matches(ex, key)? {
                return Some(false);
            }
        }
        let Some(t) = &self.target_modules else {
            return Some(false);
        };
        if model.moe.is_some() && is_mlp_leaf(key) {
            // peft moves the MLP names of a MoE model to its experts; for a regex it resolves
            // leaf names against the model first, which is not reproduced here.
            return match t {
                Targets::List(_) => Some(false),
                Targets::Regex(_) => None,
            };
        }
        match t {
            Targets::Regex(_) => matches(t, key),
            Targets::List(_) => Some(matches(t, key)? && self.in_layers(key)),
        }
    }

    /// Whether peft would adapt the parameter `key` (`model.layers.1.mlp.experts.down_proj`):
    /// named in `target_parameters`, or by peft's transformers-5 rewrite of a MoE model's
    /// `target_modules` (`gate_proj`+`up_proj` → `gate_up_proj`, `down_proj`, `gate` → router).
    /// `None` where moeru cannot tell (a regex `target_modules`).
    pub fn targets_parameter(&self, key: &str, model: &Qwen3Config) -> Option<bool> {
        let suffix = |t: &String| key == t || key.ends_with(&format!(".{t}"));
        if self.target_parameters.iter().any(suffix) {
            return Some(true);
        }
        let list = match &self.target_modules {
            None => return Some(false),
            Some(Targets::Regex(_)) => return None,
            Some(Targets::List(list)) => list,
        };
        let named = |old: &str| {
            list.iter()
                .any(|t| t == old || t.ends_with(&format!(".{old}")))
        };
        Some(
            model.moe.is_some()
                && ((key.ends_with(".experts.gate_up_proj") && named("gate_proj"))
                    || (key.ends_with(".experts.down_proj") && named("down_proj"))
                    || (key.ends_with(".mlp.gate.weight") && named("gate"))),
        )
    }

    fn in_layers(&self, key: &str) -> bool {
        let Some(layers) = &self.layers_to_transform else {
            return true;
        };
        key.strip_prefix("model.layers.")
            .and_then(|r| r.split('.').next())
            .and_then(|i| i.parse::<usize>().ok())
            .is_some_and(|i| layers.contains(&i))
    }
}

fn is_mlp_leaf(key: &str) -> bool {
    [".mlp.gate_proj", ".mlp.up_proj", ".mlp.down_proj"]
        .iter()
        .any(|s| key.ends_with(s))
}

/// peft's `check_target_module_exists` for one key: a list matches exactly or by `.`-suffix, a
/// string is a full-match regex. `None` for an invalid regex.
fn matches(t: &Targets, key: &str) -> Option<bool> {
    match t {
        Targets::List(l) => Some(
            l.iter()
                .any(|x| key == x || key.ends_with(&format!(".{x}"))),
        ),
        Targets::Regex(r) => Regex::new(&format!("^(?:{r})$"))
            .ok()
            .map(|re| re.is_match(key)),
    }
}

fn strings(a: &[Value], key: &str) -> Result<Vec<String>, String> {
    a.iter()
        .map(|v| {
            v.as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("`{key}` must hold strings, found {v}"))
        })
        .collect()
}

/// The key peft matches patterns against: the module path for a linear, the parameter name for
/// the experts and the router.
pub fn peft_key(site: &str) -> String {
    if moeru_models::lora::is_parameter_site(site) {
        site.to_string()
    } else {
        site.strip_suffix(".weight").unwrap_or(site).to_string()
    }
}

/// Writes adapter_config.json as peft ≥ 0.17 reads it.
pub fn config_json(
    cfg: &LoraConfig,
    target_modules: Vec<String>,
    target_parameters: Vec<String>,
    rank_pattern: Map<String, Value>,
    alpha_pattern: Map<String, Value>,
    base_model_name_or_path: &str,
) -> Value {
    let mut json = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "use_rslora": cfg.use_rslora,
        "target_modules": target_modules,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "fan_in_fan_out": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "exclude_modules": null,
        "use_dora": false,
        "lora_bias": false,
        "revision": null,
    });
    // Left out when empty, so peft < 0.17 (no target_parameters) still reads dense adapters.
    if !target_parameters.is_empty() {
        json["target_parameters"] = target_parameters.into();
    }
    json
}
