//! Writing a model as a Hugging Face folder that transformers loads: per-expert tensors,
//! `[out, in]` weights, `config.json`, sharded like `save_pretrained` when large.

use std::path::{Path, PathBuf};

use burn::tensor::Tensor;
use moeru_models::params::{to_f32_vec, ParamVisitor, Params};
use moeru_models::Qwen3Model;

use crate::error::CheckpointError;
use crate::hf_load::{INDEX_FILE, SINGLE_FILE};
use crate::run_checkpoint::HeldTensors;
use crate::tensor_file::{write_tensors, OwnedTensor};

/// Files copied along when exporting from a folder that has them.
const SIDE_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
];

/// Every parameter as f32 under moeru's (transformers' in-memory) names, experts stacked.
pub fn named_tensors<M: Params>(model: &mut M) -> Vec<(String, OwnedTensor)> {
    held_named_tensors(model)()
}

/// [`named_tensors`] produced later: the closure holds a handle to each parameter (no copy;
/// burn never changes a buffer another handle holds, so it reads the values of now).
pub fn held_named_tensors<M: Params>(model: &mut M) -> HeldTensors {
    type Read = Box<dyn FnOnce() -> Vec<f32> + Send>;
    struct Collect(Vec<(String, Vec<usize>, Read)>);
    impl ParamVisitor for Collect {
        fn visit<const D: usize>(&mut self, name: &str, param: &mut Tensor<D>) {
            let held = param.clone().detach();
            let read: Read = Box::new(move || to_f32_vec(held));
            self.0.push((name.to_string(), param.dims().to_vec(), read));
        }
    }
    let mut c = Collect(Vec::new());
    model.visit_params(&mut c);
    Box::new(move || {
        c.0.into_iter()
            .map(|(name, shape, read)| (name, OwnedTensor::f32(&read(), shape)))
            .collect()
    })
}

/// The model's parameters under their on-disk names, per-expert tensors split out.
pub fn hf_tensors(model: &mut Qwen3Model) -> Vec<(String, OwnedTensor)> {
    let mut out = Vec::new();
    for (name, tensor) in named_tensors(model) {
        if name.contains(".experts.") {
            let shape = tensor.shape.clone();
            out.extend(hf_param_tensors(&name, &shape, &tensor.f32_values(), 0));
        } else {
            out.push((name, tensor));
        }
    }
    out
}

/// One parameter (moeru's name, shape and f32 values) as its on-disk Hugging Face tensors:
/// stacked experts split per expert and numbered from `first_expert` (the first expert of the
/// part given, under expert parallelism), anything else as it is.
pub fn hf_param_tensors(
    name: &str,
    shape: &[usize],
    values: &[f32],
    first_expert: usize,
) -> Vec<(String, OwnedTensor)> {
    let mut out = Vec::new();
    if let Some(prefix) = name.strip_suffix(".experts.gate_up_proj") {
        let (inter, h) = (shape[1] / 2, shape[2]);
        for (x, expert) in values.chunks(2 * inter * h).enumerate() {
            let (gate, up) = expert.split_at(inter * h);
            let p = format!("{prefix}.experts.{}", first_expert + x);
            out.push((
                format!("{p}.gate_proj.weight"),
                OwnedTensor::f32(gate, vec![inter, h]),
            ));
            out.push((
                format!("{p}.up_proj.weight"),
                OwnedTensor::f32(up, vec![inter, h]),
            ));
        }
    } else if let Some(prefix) = name.strip_suffix(".experts.down_proj") {
        for (x, expert) in values.chunks(shape[1] * shape[2]).enumerate() {
            let key = format!("{prefix}.experts.{}.down_proj.weight", first_expert + x);
            out.push((key, OwnedTensor::f32(expert, shape[1..].to_vec())));
        }
    } else {
        out.push((name.to_string(), OwnedTensor::f32(values, shape.to_vec())));
    }
    out
}

/// Exports `model` into the new folder `out` (refuses an existing non-empty one).
///
/// Shards of at most `max_shard_bytes` are written like `save_pretrained`; the folder appears
/// only once complete. Tokenizer files are copied from `side_files_from` when given.
pub fn export_hf(
    model: &mut Qwen3Model,
    out: &Path,
    max_shard_bytes: u64,
    side_files_from: Option<&Path>,
) -> Result<(), CheckpointError> {
    if out.exists()
        && std::fs::read_dir(out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        return Err(CheckpointError::OutputExists { path: out.into() });
    }
    let tmp = temp_sibling(out);
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| CheckpointError::io(&tmp, e))?;
    let result = write_folder(model, &tmp, max_shard_bytes, side_files_from).and_then(|()| {
        if out.exists() {
            std::fs::remove_dir(out).map_err(|e| CheckpointError::io(out, e))?;
        }
        std::fs::rename(&tmp, out).map_err(|e| CheckpointError::io(out, e))
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

fn temp_sibling(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    out.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

fn write_folder(
    model: &mut Qwen3Model,
    dir: &Path,
    max_shard_bytes: u64,
    side_files_from: Option<&Path>,
) -> Result<(), CheckpointError> {
    let tensors = hf_tensors(model);
    let mut shards: Vec<Vec<(String, OwnedTensor)>> = vec![Vec::new()];
    let mut size = 0u64;
    let mut total = 0u64;
    for (name, t) in tensors {
        let bytes = t.bytes.len() as u64;
        if size > 0 && size + bytes > max_shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        size += bytes;
        total += bytes;
        shards
            .last_mut()
            .expect("at least one shard")
            .push((name, t));
    }
    if shards.len() == 1 {
        write_tensors(&dir.join(SINGLE_FILE), &shards[0])?;
    } else {
        let n = shards.len();
        let mut weight_map = serde_json::Map::new();
        for (i, shard) in shards.iter().enumerate() {
            let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, n);
            for (name, _) in shard {
                weight_map.insert(name.clone(), file.clone().into());
            }
            write_tensors(&dir.join(&file), shard)?;
        }
        let index =
            serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        write_json(&dir.join(INDEX_FILE), &index)?;
    }
    write_json(
        &dir.join("config.json"),
        &serde_json::Value::Object(model.config.to_export_json()),
    )?;
    if let Some(src) = side_files_from {
        for f in SIDE_FILES {
            if src.join(f).exists() {
                std::fs::copy(src.join(f), dir.join(f))
                    .map_err(|e| CheckpointError::io(src.join(f), e))?;
            }
        }
    }
    Ok(())
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), CheckpointError> {
    let text = serde_json::to_string_pretty(value).expect("JSON values serialise");
    std::fs::write(path, text + "\n").map_err(|e| CheckpointError::io(path, e))
}
