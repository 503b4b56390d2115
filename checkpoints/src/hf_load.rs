//! Loading a Hugging Face model folder: `config.json` plus one `model.safetensors` or shards
//! listed in `model.safetensors.index.json`. Per-expert tensors are stacked on load.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::tensor::{Device, Tensor, TensorData};
use moeru_models::params::{param_from_data, ParamSource};
use moeru_models::shard::narrow_param;
use moeru_models::Split;
use moeru_models::{Boundaries, Local, Qwen3Config, Qwen3Model};

use crate::error::CheckpointError;
use crate::tensor_file::TensorFile;

pub const INDEX_FILE: &str = "model.safetensors.index.json";
pub const SINGLE_FILE: &str = "model.safetensors";

/// Loads `config.json` and the weights of `dir` onto `device`.
pub fn load_hf_model(dir: &Path, device: &Device) -> Result<Qwen3Model, CheckpointError> {
    load_hf_model_sharded(dir, Arc::new(Local), device)
}

/// Loads this rank's part of the model in `dir` under `boundaries.shard()` (the whole model
/// with [`Local`]): each parameter is read and narrowed to the rank's slice.
pub fn load_hf_model_sharded(
    dir: &Path,
    boundaries: Arc<dyn Boundaries>,
    device: &Device,
) -> Result<Qwen3Model, CheckpointError> {
    let config = Qwen3Config::from_dir(dir)?;
    let mut folder = HfFolder::open(dir)?;
    let model = Qwen3Model::new_sharded(config.clone(), &mut folder, boundaries, device)?;
    let held: BTreeSet<usize> = model.layer_ids().iter().copied().collect();
    let elsewhere = |name: &str| !model.is_whole() && other_stage(name, &held);
    folder.finish(config.tie_word_embeddings, &elsewhere)?;
    Ok(model)
}

/// Whether `name` belongs to another pipeline stage than the one holding layers `held`: a
/// layer outside them, or the embedding, final norm or head (which stage holds these is the
/// model's to say; each stage's load checks what it asks for).
fn other_stage(name: &str, held: &BTreeSet<usize>) -> bool {
    let top = [
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
    ];
    let layer = (name.strip_prefix("model.layers."))
        .and_then(|rest| rest.split_once('.'))
        .and_then(|(i, _)| i.parse::<usize>().ok());
    match layer {
        Some(i) => !held.contains(&i),
        None => top.contains(&name),
    }
}

/// The weight files of a folder, with every tensor name mapped to its file.
pub struct HfFolder {
    dir: PathBuf,
    files: Vec<TensorFile>,
    /// Tensor name → (file index, shape).
    tensors: BTreeMap<String, (usize, Vec<usize>)>,
    used: BTreeSet<String>,
}

impl HfFolder {
    pub fn open(dir: &Path) -> Result<Self, CheckpointError> {
        let index = dir.join(INDEX_FILE);
        let single = dir.join(SINGLE_FILE);
        let names: Vec<String> = if index.exists() {
            shard_names(&index)?
        } else if single.exists() {
            vec![SINGLE_FILE.to_string()]
        } else {
            return Err(CheckpointError::NoWeights { dir: dir.into() });
        };
        let mut files = Vec::new();
        let mut tensors = BTreeMap::new();
        for name in names {
            let path = dir.join(&name);
            if !path.exists() {
                return Err(CheckpointError::MissingShard { index, shard: name });
            }
            let file = TensorFile::open(&path)?;
            for (tensor, shape) in file.shapes() {
                tensors.insert(tensor, (files.len(), shape));
            }
            files.push(file);
        }
        Ok(Self {
            dir: dir.into(),
            files,
            tensors,
            used: BTreeSet::new(),
        })
    }

    /// Every tensor name in the folder.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Reads one stored tensor as f32, checking its shape.
    pub fn read(&mut self, name: &str, expected: &[usize]) -> Result<Vec<f32>, CheckpointError> {
        let file = self.check(name, expected)?;
        let (values, _) = self.files[file].f32(name)?;
        self.used.insert(name.to_string());
        Ok(values)
    }

    /// Rows `rows` (dim 0) of one stored tensor whose whole shape must be `expected`.
    fn read_rows(
        &mut self,
        name: &str,
        expected: &[usize],
        rows: std::ops::Range<usize>,
    ) -> Result<Vec<f32>, CheckpointError> {
        let file = self.check(name, expected)?;
        let (values, _) = self.files[file].f32_rows(name, rows)?;
        self.used.insert(name.to_string());
        Ok(values)
    }

    /// The file of tensor `name`, after checking its shape against `expected`.
    fn check(&self, name: &str, expected: &[usize]) -> Result<usize, CheckpointError> {
        let Some((file, shape)) = self.tensors.get(name) else {
            return Err(CheckpointError::MissingTensor {
                dir: self.dir.clone(),
                name: name.into(),
                expected: expected.to_vec(),
            });
        };
        if shape != expected {
            return Err(CheckpointError::ShapeMismatch {
                file: self.files[*file].path.clone(),
                name: name.into(),
                found: shape.clone(),
                expected: expected.to_vec(),
            });
        }
        Ok(*file)
    }

    /// Stacks `{prefix}.{e}.{suffix}` for the experts `experts` of `all`, each
    /// `per_expert`-shaped; the others are checked (they are other ranks' parts) but not read.
    fn stack_experts(
        &mut self,
        prefix: &str,
        suffixes: &[&str],
        (all, experts): (usize, std::ops::Range<usize>),
        per_expert: &[usize],
    ) -> Result<Vec<f32>, CheckpointError> {
        let mut out = Vec::new();
        for e in 0..all {
            for suffix in suffixes {
                let name = format!("{prefix}.{e}.{suffix}");
                if experts.contains(&e) {
                    out.extend(self.read(&name, per_expert)?);
                } else {
                    self.check(&name, per_expert)?;
                    self.used.insert(name);
                }
            }
        }
        Ok(out)
    }

    /// A parameter read whole (`rows`: all of dim 0) or in rows `rows` of dim 0: a fused
    /// tensor, or transformers' per-expert tensors stacked.
    fn rows_of(
        &mut self,
        name: &str,
        shape: &[usize],
        rows: std::ops::Range<usize>,
    ) -> Result<Vec<f32>, CheckpointError> {
        // transformers keeps experts fused in memory but per expert on disk: accept both.
        if self.tensors.contains_key(name) {
            return match rows.len() == shape[0] {
                true => self.read(name, shape),
                false => self.read_rows(name, shape, rows),
            };
        }
        let experts = (shape[0], rows);
        if let (Some(prefix), 3) = (name.strip_suffix(".gate_up_proj"), shape.len()) {
            let per_expert = [shape[1] / 2, shape[2]];
            let suffixes = ["gate_proj.weight", "up_proj.weight"];
            self.stack_experts(prefix, &suffixes, experts, &per_expert)
        } else if let (Some(prefix), 3) = (name.strip_suffix(".down_proj"), shape.len()) {
            self.stack_experts(prefix, &["down_proj.weight"], experts, &shape[1..])
        } else {
            self.read(name, shape)
        }
    }

    /// Fails on any tensor that no parameter asked for, except those `elsewhere` says another
    /// part of the model holds.
    pub fn finish(
        &self,
        tied: bool,
        elsewhere: &dyn Fn(&str) -> bool,
    ) -> Result<(), CheckpointError> {
        for (name, (file, shape)) in &self.tensors {
            // transformers ignores these too: a tied head saved anyway, and RoPE buffers.
            let ignorable = (tied && name == "lm_head.weight")
                || name.ends_with("rotary_emb.inv_freq")
                || elsewhere(name);
            if !self.used.contains(name) && !ignorable {
                return Err(CheckpointError::UnexpectedTensor {
                    file: self.files[*file].path.clone(),
                    name: name.clone(),
                    shape: shape.clone(),
                });
            }
        }
        Ok(())
    }
}

impl ParamSource for HfFolder {
    type Error = CheckpointError;

    fn tensor<const D: usize>(
        &mut self,
        name: &str,
        shape: [usize; D],
        device: &Device,
    ) -> Result<Tensor<D>, CheckpointError> {
        let values = self.rows_of(name, &shape, 0..shape[0])?;
        Ok(param_from_data(TensorData::new(values, shape), device))
    }

    /// A part along dim 0 (heads, vocabulary rows, experts) reads only its rows or experts;
    /// a part along another dim reads the tensor whole and narrows it.
    fn tensor_part<const D: usize>(
        &mut self,
        name: &str,
        full: [usize; D],
        split: &Split,
        device: &Device,
    ) -> Result<Tensor<D>, CheckpointError> {
        if split.dim != 0 {
            return Ok(narrow_param(self.tensor(name, full, device)?, split));
        }
        let values = self.rows_of(name, &full, split.range(full[0]))?;
        let local = split.local_shape(full);
        Ok(param_from_data(TensorData::new(values, local), device))
    }
}

fn shard_names(index: &Path) -> Result<Vec<String>, CheckpointError> {
    let text = std::fs::read_to_string(index).map_err(|e| CheckpointError::io(index, e))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| CheckpointError::io(index, format!("invalid JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| CheckpointError::io(index, "missing object `weight_map`"))?;
    let files: BTreeSet<String> = map
        .values()
        .map(|v| v.as_str().map(str::to_string))
        .collect::<Option<_>>()
        .ok_or_else(|| CheckpointError::io(index, "`weight_map` values must be file names"))?;
    // Shards live beside the index: a name with a folder, `..` or an absolute path would make
    // loading read a file elsewhere.
    if let Some(bad) = files
        .iter()
        .find(|f| f.contains(['/', '\\']) || f.starts_with('.') || !f.ends_with(".safetensors"))
    {
        return Err(CheckpointError::io(
            index,
            format!("`weight_map` names {bad:?}, not a `.safetensors` file name in the index's folder; fix the index"),
        ));
    }
    Ok(files.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_shard_names_outside_the_folder_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let inner = dir.path().join("model");
        std::fs::create_dir(&inner).unwrap();
        // A real (empty) safetensors file one folder up: the escaping name would open it.
        crate::tensor_file::write_tensors(&dir.path().join("x.safetensors"), &[]).unwrap();
        let outside = dir.path().join("x.safetensors").display().to_string();
        for name in [
            "../x.safetensors",
            outside.as_str(),
            "sub/x.safetensors",
            "x.bin",
        ] {
            let index = serde_json::json!({"weight_map": {"w": name}});
            std::fs::write(inner.join(INDEX_FILE), index.to_string()).unwrap();
            let e = HfFolder::open(&inner).err().expect("refused").to_string();
            assert!(e.contains("not a `.safetensors` file name"), "{name}: {e}");
            assert!(e.contains(INDEX_FILE), "{name}: {e}");
        }
    }
}
