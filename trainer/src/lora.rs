//! LoRA in the training loop: attaching adapters (fresh, or from a PEFT adapter folder), the
//! fingerprint that keeps a resumed run on the same frozen base, and the sizes reported at
//! start. LoRA checkpoints hold the adapters only (PEFT's two files); the base is the recipe's
//! `model.path`, checked against the fingerprint every checkpoint records.

use std::path::Path;

use burn::tensor::Tensor;
use moeru_checkpoints::load_peft_adapter;
use moeru_models::params::{param_count, to_f32_vec, ParamVisitor, Params};
use moeru_models::shard::full_shape;
use moeru_models::{LoraConfig, ModelShard, ParamPlan, Placement, Qwen3Model};
use moeru_parallel::{MeshGroups, ProcessGroup};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::TrainError;
use crate::recipe::schema::LoraSection;

/// The frozen base of a LoRA run: where it was loaded from and a digest of its weights.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseFingerprint {
    /// `base_model_name_or_path` of the adapters written (the base folder, absolute).
    pub path: String,
    /// A digest of every base tensor's name, whole shape and f32 values that does not depend
    /// on the layout (16 hex digits): the wrapping sum over elements of a 64-bit hash of
    /// (name and shape, index in the whole tensor, value), so that each rank adds the
    /// elements it holds and the ranks' sums add up to the one-rank digest.
    pub digest: String,
}

/// The digest of a whole model's base weights (adapters, if any, are not part of it).
pub fn fingerprint(model: &mut Qwen3Model, path: &Path) -> BaseFingerprint {
    let digest = partial_digest(model, &|_| true);
    BaseFingerprint {
        path: absolute(path),
        digest: format!("{digest:016x}"),
    }
}

/// [`fingerprint`] of a model whose parts lie on the ranks of `groups` (collective over
/// `world`): each element is added by one rank, as the checkpoint writes it (an expert by
/// the first rank of its expert-data-parallel group, a dense part on data-parallel rank 0
/// and, when replicated over tp, on tp rank 0).
pub fn sharded_fingerprint(
    model: &mut Qwen3Model,
    path: &Path,
    groups: &MeshGroups,
    world: &ProcessGroup,
) -> Result<BaseFingerprint, TrainError> {
    let (dp, tp, edp) = (groups.dp.rank(), groups.tp.rank(), groups.edp.rank());
    let counts = |plan: &ParamPlan| match plan.placement {
        _ if plan.expert => edp == 0,
        Placement::Split(_) => dp == 0,
        Placement::Replicated => dp == 0 && tp == 0,
    };
    let mine = partial_digest(model, &counts);
    let all = world.all_gather(&[mine as i64])?;
    let digest = all.iter().fold(0u64, |d, &x| d.wrapping_add(x as u64));
    Ok(BaseFingerprint {
        path: absolute(path),
        digest: format!("{digest:016x}"),
    })
}

fn absolute(path: &Path) -> String {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    path.display().to_string()
}

/// The wrapping sum of the element hashes of the base parameters `counts` selects.
fn partial_digest(model: &mut Qwen3Model, counts: &dyn Fn(&ParamPlan) -> bool) -> u64 {
    struct Digester<'a> {
        shard: ModelShard,
        counts: &'a dyn Fn(&ParamPlan) -> bool,
        sum: u64,
    }
    impl ParamVisitor for Digester<'_> {
        fn visit<const D: usize>(&mut self, name: &str, param: &mut Tensor<D>) {
            let plan = self.shard.plan(name);
            if !(self.counts)(&plan) {
                return;
            }
            let local = param.dims().to_vec();
            let whole = full_shape(&local, &plan.placement);
            let mut h = Sha256::new();
            h.update(name.as_bytes());
            whole
                .iter()
                .for_each(|d| h.update((*d as u64).to_le_bytes()));
            let tensor = u64::from_le_bytes(h.finalize()[..8].try_into().expect("8 bytes"));
            let values = to_f32_vec(param.clone());
            for_whole_index(&local, &plan.placement, |i, at| {
                let e = mix(mix(tensor ^ at as u64) ^ values[i].to_bits() as u64);
                self.sum = self.sum.wrapping_add(e);
            });
        }
    }
    let mut d = Digester {
        shard: model.shard(),
        counts,
        sum: 0,
    };
    model.visit_params(&mut d);
    d.sum
}

/// Calls `f(local, whole)` for every element of a part of shape `local` under `placement`:
/// its flat index in the part and in the whole tensor.
fn for_whole_index(local: &[usize], placement: &Placement, mut f: impl FnMut(usize, usize)) {
    let n: usize = local.iter().product();
    let Placement::Split(s) = placement else {
        return (0..n).for_each(|i| f(i, i));
    };
    let rows = local[s.dim];
    let inner: usize = local[s.dim + 1..].iter().product();
    let outer: usize = local[..s.dim].iter().product();
    for o in 0..outer {
        for r in 0..rows {
            let (from, to) = (
                (o * rows + r) * inner,
                ((o * s.parts + s.index) * rows + r) * inner,
            );
            (0..inner).for_each(|c| f(from + c, to + c));
        }
    }
}

/// SplitMix64's finaliser: a bijection of u64 that spreads every input bit.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
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
    if saved.digest != now.digest {
        return Err(TrainError::Resume(format!(
            "{}: its adapters were trained on the base at {} (weights digest {}), but `model.path` {} has other weights (digest {}); point `model.path` at the base the run started from, or start a fresh `checkpoint.dir`",
            dir.display(),
            saved.path,
            saved.digest,
            model_path.display(),
            now.digest
        )));
    }
    Ok(())
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
    fn parts_map_onto_their_whole_indices() {
        use moeru_models::Split;
        let whole = [4, 6, 3];
        for (dim, parts) in [(0, 2), (1, 3), (2, 3)] {
            let mut seen = vec![0u32; 72];
            for index in 0..parts {
                let s = Split { dim, index, parts };
                let local = s.local_shape(whole);
                let ids: Vec<f32> = (0..72).map(|i| i as f32).collect();
                let part = moeru_models::shard::cut_part(&ids, &whole, &s);
                for_whole_index(&local, &Placement::Split(s), |i, at| {
                    assert_eq!(part[i] as usize, at, "dim {dim}");
                    seen[at] += 1;
                });
            }
            assert!(seen.iter().all(|&n| n == 1), "dim {dim}");
        }
    }

    #[test]
    fn sizes_read_plainly() {
        assert_eq!(thousands(1234567), "1,234,567");
        assert_eq!(thousands(999), "999");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 * 1024 * 1024 / 2), "1.50 MiB");
    }
}
