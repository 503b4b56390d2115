//! `config.json` of a Qwen3 / Qwen3-MoE model folder, in the spellings seen in the wild.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

/// A config.json key that is missing, malformed or asks for something moeru does not implement.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read config.json: {reason}")]
    Read { file: PathBuf, reason: String },
    #[error(
        "{file}: required key `{key}` is missing; add it (see the model's original config.json)"
    )]
    Missing { file: PathBuf, key: String },
    #[error("{file}: key `{key}` has value {value}, expected {expected}")]
    Invalid {
        file: PathBuf,
        key: String,
        value: String,
        expected: String,
    },
    #[error("{file}: key `{key}` = {value} is not supported: {fix}")]
    Unsupported {
        file: PathBuf,
        key: String,
        value: String,
        fix: String,
    },
}

/// Architecture of a Qwen3 (dense) or Qwen3-MoE model, as transformers 5.x reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct Qwen3Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Width of the dense MLPs (all layers of a dense model, `mlp_only_layers` of a MoE model).
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub attention_bias: bool,
    pub tie_word_embeddings: bool,
    pub initializer_range: f64,
    /// `None` for a dense Qwen3.
    pub moe: Option<MoeConfig>,
    /// The parsed file, kept so an export writes back every key it was given.
    pub raw: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    pub moe_intermediate_size: usize,
    pub norm_topk_prob: bool,
    pub decoder_sparse_step: usize,
    pub mlp_only_layers: Vec<usize>,
    pub router_aux_loss_coef: f64,
}

impl Qwen3Config {
    /// Reads `<dir>/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, ConfigError> {
        let file = dir.join("config.json");
        let text = std::fs::read_to_string(&file).map_err(|e| ConfigError::Read {
            file: file.clone(),
            reason: e.to_string(),
        })?;
        let value: Value = serde_json::from_str(&text).map_err(|e| ConfigError::Read {
            file: file.clone(),
            reason: format!("invalid JSON: {e}"),
        })?;
        match value {
            Value::Object(map) => Self::from_map(map, &file),
            other => Err(ConfigError::Invalid {
                file,
                key: "(top level)".into(),
                value: short(&other),
                expected: "a JSON object".into(),
            }),
        }
    }

    /// Parses an already loaded config object; `file` is only used in error messages.
    pub fn from_map(raw: Map<String, Value>, file: &Path) -> Result<Self, ConfigError> {
        let r = Reader { map: &raw, file };
        let model_type = r.opt_str("model_type")?.unwrap_or_default();
        if !matches!(model_type.as_str(), "qwen3" | "qwen3_moe") {
            return Err(r.unsupported(
                "model_type",
                &model_type,
                "moeru implements `qwen3` and `qwen3_moe`",
            ));
        }
        r.reject_unsupported()?;

        let hidden_size = r.usize("hidden_size")?;
        let num_attention_heads = r.usize("num_attention_heads")?;
        let num_key_value_heads = r
            .opt_usize("num_key_value_heads")?
            .unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || !num_attention_heads.is_multiple_of(num_key_value_heads) {
            return Err(r.invalid("num_key_value_heads", "a divisor of num_attention_heads"));
        }
        let head_dim = match r.opt_usize("head_dim")? {
            Some(d) => d,
            None => hidden_size / num_attention_heads,
        };
        if !head_dim.is_multiple_of(2) {
            return Err(r.invalid("head_dim", "an even number (RoPE rotates halves)"));
        }
        let rope_theta = match r.opt_f64("rope_theta")? {
            Some(t) => t,
            None => r.rope_parameters_theta()?.unwrap_or(10_000.0),
        };
        let num_hidden_layers = r.usize("num_hidden_layers")?;
        let num_experts = match r.opt_usize("num_experts")? {
            Some(n) => Some(n),
            None => r.opt_usize("num_local_experts")?,
        };
        let moe = match (model_type.as_str(), num_experts) {
            ("qwen3_moe", Some(n)) if n > 0 => Some(MoeConfig {
                num_experts: n,
                num_experts_per_tok: r.usize("num_experts_per_tok")?,
                moe_intermediate_size: r.usize("moe_intermediate_size")?,
                norm_topk_prob: r.opt_bool("norm_topk_prob")?.unwrap_or(false),
                decoder_sparse_step: r.opt_usize("decoder_sparse_step")?.unwrap_or(1),
                mlp_only_layers: r.opt_usize_list("mlp_only_layers")?.unwrap_or_default(),
                router_aux_loss_coef: r.opt_f64("router_aux_loss_coef")?.unwrap_or(0.001),
            }),
            ("qwen3_moe", _) => return Err(r.missing("num_experts (or num_local_experts)")),
            _ => None,
        };
        if let Some(m) = &moe {
            if m.num_experts_per_tok == 0 || m.num_experts_per_tok > m.num_experts {
                return Err(r.invalid("num_experts_per_tok", "between 1 and num_experts"));
            }
            if m.decoder_sparse_step == 0 {
                return Err(r.invalid("decoder_sparse_step", "at least 1"));
            }
        }
        Ok(Self {
            vocab_size: r.usize("vocab_size")?,
            hidden_size,
            intermediate_size: r.usize("intermediate_size")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: r.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            attention_bias: r.opt_bool("attention_bias")?.unwrap_or(false),
            tie_word_embeddings: r.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            initializer_range: r.opt_f64("initializer_range")?.unwrap_or(0.02),
            moe,
            raw,
        })
    }

    /// Whether decoder layer `layer` has a sparse MoE block (transformers' rule).
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        match &self.moe {
            Some(m) => {
                !m.mlp_only_layers.contains(&layer)
                    && (layer + 1).is_multiple_of(m.decoder_sparse_step)
            }
            None => false,
        }
    }

    /// The config.json to write next to exported weights stored in f32.
    pub fn to_export_json(&self) -> Map<String, Value> {
        let mut map = self.raw.clone();
        map.remove("torch_dtype");
        map.insert("dtype".into(), Value::String("float32".into()));
        map
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 60 {
        format!("{}…", &s[..60])
    } else {
        s
    }
}

struct Reader<'a> {
    map: &'a Map<String, Value>,
    file: &'a Path,
}

impl Reader<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }
    fn missing(&self, key: &str) -> ConfigError {
        ConfigError::Missing {
            file: self.file.into(),
            key: key.into(),
        }
    }
    fn invalid(&self, key: &str, expected: &str) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.into(),
            key: key.into(),
            value: self.get(key).map(short).unwrap_or_else(|| "null".into()),
            expected: expected.into(),
        }
    }
    fn unsupported(&self, key: &str, value: &str, fix: &str) -> ConfigError {
        ConfigError::Unsupported {
            file: self.file.into(),
            key: key.into(),
            value: value.into(),
            fix: fix.into(),
        }
    }
    fn usize(&self, key: &str) -> Result<usize, ConfigError> {
        self.opt_usize(key)?.ok_or_else(|| self.missing(key))
    }
    fn opt_usize(&self, key: &str) -> Result<Option<usize>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.invalid(key, "a non-negative integer")),
        }
    }
    fn opt_f64(&self, key: &str) -> Result<Option<f64>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.invalid(key, "a number")),
        }
    }
    fn opt_bool(&self, key: &str) -> Result<Option<bool>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.invalid(key, "true or false")),
        }
    }
    fn opt_str(&self, key: &str) -> Result<Option<String>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(|s| Some(s.to_string()))
                .ok_or_else(|| self.invalid(key, "a string")),
        }
    }
    fn opt_usize_list(&self, key: &str) -> Result<Option<Vec<usize>>, ConfigError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let items = v
            .as_array()
            .ok_or_else(|| self.invalid(key, "a list of layer indices"))?;
        items
            .iter()
            .map(|i| i.as_u64().map(|n| n as usize))
            .collect::<Option<Vec<_>>>()
            .map(Some)
            .ok_or_else(|| self.invalid(key, "a list of layer indices"))
    }

    /// `rope_parameters.rope_theta` (transformers 5 spelling); rejects any RoPE type but default.
    fn rope_parameters_theta(&self) -> Result<Option<f64>, ConfigError> {
        let Some(params) = self.get("rope_parameters") else {
            return Ok(None);
        };
        let key = "rope_parameters";
        let obj = params
            .as_object()
            .ok_or_else(|| self.invalid(key, "an object"))?;
        if let Some(kind) = obj.get("rope_type").and_then(Value::as_str) {
            if kind != "default" {
                return Err(self.unsupported(
                    "rope_parameters.rope_type",
                    kind,
                    "only the default RoPE is implemented; remove the key or set it to \"default\"",
                ));
            }
        }
        match obj.get("rope_theta") {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| ConfigError::Invalid {
                file: self.file.into(),
                key: "rope_parameters.rope_theta".into(),
                value: short(v),
                expected: "a number".into(),
            }),
        }
    }

    /// Settings transformers honours but moeru does not implement: refuse them by name.
    fn reject_unsupported(&self) -> Result<(), ConfigError> {
        if let Some(v) = self.get("rope_scaling") {
            let kind = v
                .get("rope_type")
                .or_else(|| v.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("?");
            if kind != "default" {
                return Err(self.unsupported(
                    "rope_scaling",
                    &short(v),
                    "RoPE scaling is not implemented; remove `rope_scaling` to use plain RoPE",
                ));
            }
        }
        if self.opt_bool("use_sliding_window")? == Some(true) {
            return Err(self.unsupported(
                "use_sliding_window",
                "true",
                "sliding-window attention is not implemented; set it to false",
            ));
        }
        if let Some(act) = self.opt_str("hidden_act")? {
            if act != "silu" {
                return Err(self.unsupported(
                    "hidden_act",
                    &act,
                    "Qwen3 uses \"silu\"; other activations are not implemented",
                ));
            }
        }
        Ok(())
    }
}
