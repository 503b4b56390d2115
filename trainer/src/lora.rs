//! LoRA in the training loop: attaching adapters (fresh, or from a PEFT adapter folder), the
//! fingerprint that keeps a resumed run on the same frozen base, and the sizes reported at
//! start. LoRA checkpoints hold the adapters only (PEFT's two files); the base is the recipe's
//! `model.path`, checked against the fingerprint every checkpoint records.

use std::path::Path;

use burn::tensor::Tensor;
use moeru_checkpoints::load_peft_adapter;
use moeru_models::params::{param_count, to_f32_vec, ParamVisitor, Params};
use moeru_models::{LoraConfig, ModelShard, Qwen3Model};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::TrainError;
use crate::recipe::schema::LoraSection;

/// The frozen base of a LoRA run: where it was loaded from and a digest of its weights.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseFingerprint {
    /// `base_model_name_or_path` of the adapters written (the base folder, absolute).
    pub path: String,
    /// sha256 over every base tensor's name, shape and f32 values.
    pub sha256: String,
}

/// The digest of `model`'s base weights (adapters, if any, are not part of it).
pub fn fingerprint(model: &mut Qwen3Model, path: &Path) -> BaseFingerprint {
    struct Digester(Sha256);
    impl ParamVisitor for Digester {
        fn visit<const D: usize>(&mut self, name: &str, param: &mut Tensor<D>) {
            self.0.update(name.as_bytes());
            for d in param.dims() {
                self.0.update((d as u64).to_le_bytes());
            }
            for v in to_f32_vec(param.clone()) {
                self.0.update(v.to_le_bytes());
            }
        }
    }
    let mut d = Digester(Sha256::new());
    model.visit_params(&mut d);
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    BaseFingerprint {
        path: path.display().to_string(),
        sha256: d.0.finalize().iter().map(|b| format!("{b:02x}")).collect(),
    }
}

/// The model-side settings of a recipe's `lora` section.
pub fn lora_config(l: &LoraSection) -> LoraConfig {
    LoraConfig {
        rank: l.rank,
        alpha: l.alpha,
        dropout: l.dropout,
        target_modules: l.target_modules.clone(),
        use_rslora: l.use_rslora,
    }
}

/// Attaches the recipe's adapters to a freshly built base: loaded from `lora.adapter` when it
/// is set (its adapter_config.json rules), else new ones (A from `seed`, B zero).
pub fn attach(l: &LoraSection, model: &mut Qwen3Model, seed: u64) -> Result<(), TrainError> {
    match &l.adapter {
        Some(dir) => {
            load_peft_adapter(dir, model)?;
        }
        None => model.attach_lora(&lora_config(l), seed)?,
    }
    Ok(())
}

/// Checks that a resumed LoRA run found the base its checkpoint `dir` was trained on.
pub fn check_base(
    dir: &Path,
    saved: Option<&BaseFingerprint>,
    now: &BaseFingerprint,
    model_path: &Path,
) -> Result<(), TrainError> {
    let Some(saved) = saved else {
        return Err(TrainError::Resume(format!(
            "{}: a LoRA checkpoint without `lora_base` in trainer_state.json; it cannot be checked against `model.path`",
            dir.display()
        )));
    };
    if saved.sha256 != now.sha256 {
        return Err(TrainError::Resume(format!(
            "{}: its adapters were trained on the base at {} (weights sha256 {}), but `model.path` {} has other weights (sha256 {}); point `model.path` at the base the run started from, or start a fresh `checkpoint.dir`",
            dir.display(),
            saved.path,
            short(&saved.sha256),
            model_path.display(),
            short(&now.sha256)
        )));
    }
    Ok(())
}

fn short(hex: &str) -> &str {
    &hex[..hex.len().min(12)]
}

/// What a run trains and what that costs, reported at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TrainableSizes {
    /// Parameters the optimizer updates.
    pub trainable: u64,
    /// Every parameter, base and adapters.
    pub total: u64,
    /// AdamW's two f32 moments on this rank (its shard under ZeRO-1).
    pub optimizer_state_bytes: u64,
}

impl TrainableSizes {
    /// `zero_shard`: the elements this rank's ZeRO-1 shard holds, when sharded.
    pub fn of(model: &mut Qwen3Model, zero_shard: Option<usize>) -> Self {
        let trainable = param_count(&mut model.trainable()) as u64;
        let total = param_count(&mut model.all_params()) as u64;
        let held = zero_shard.map_or(trainable, |n| n as u64);
        Self {
            trainable,
            total,
            optimizer_state_bytes: 2 * 4 * held,
        }
    }

    /// One rank's part under model parallelism: its parameter, gradient and optimizer bytes
    /// (all f32: parameters; accumulated gradients of what trains; two AdamW moments).
    pub fn rank_line(&self, rank: usize, shard: &ModelShard) -> String {
        format!(
            "rank {rank} (tp {}/{}, ep {}/{}): parameters {} ({}), gradients {}, optimizer state {}",
            shard.tp_rank,
            shard.tp,
            shard.ep_rank,
            shard.ep,
            thousands(self.total),
            bytes(4 * self.total),
            bytes(4 * self.trainable),
            bytes(self.optimizer_state_bytes)
        )
    }

    pub fn line(&self, lora: bool) -> String {
        let pct = 100.0 * self.trainable as f64 / self.total.max(1) as f64;
        let what = if lora {
            "LoRA adapters; base frozen"
        } else {
            "full fine-tuning"
        };
        format!(
            "trainable parameters {} of {} ({pct:.3}%, {what}); optimizer state {} per rank (AdamW moments, f32)",
            thousands(self.trainable),
            thousands(self.total),
            bytes(self.optimizer_state_bytes)
        )
    }
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut x = n as f64;
    let mut unit = 0;
    while x >= 1024.0 && unit + 1 < UNITS.len() {
        x /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{x:.2} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_plainly() {
        assert_eq!(thousands(1234567), "1,234,567");
        assert_eq!(thousands(999), "999");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 * 1024 * 1024 / 2), "1.50 MiB");
    }
}
