//! Checkpoints of a tensor- or expert-parallel run, written by the ranks that own each part
//! and restored at any layout one parameter at a time.
//!
//! Weights are whole tensors under Hugging Face names (experts one by one) in one file per
//! writing rank (`model-rRRRRR.safetensors`), with `model.safetensors.index.json` naming each
//! tensor's file: a folder `moeru eval`, `moeru export` and transformers read as it is. An
//! expert is written by the rank holding it that is first in its expert-data-parallel group;
//! a dense tensor by one tp rank of data-parallel rank 0 (tensors dealt round-robin over the
//! tp ranks), after an all-gather over tp when it is split: one tensor at a time, so no rank
//! holds more than its part plus one whole tensor. Moments are written as they are held:
//! every rank that owns optimizer pieces (its ZeRO-1 pieces, or all of its sync group's when
//! it is that group's first rank) writes them to `optim-rRRRRR.safetensors` with a slice map
//! `optim-rRRRRR.json` (parameter, whole shape, the part and the run within it). Restoring
//! assembles each parameter's whole moments from the runs that cover it and cuts the part
//! the restoring rank holds.
//!
//! Owns: the sliced layout. Must not: decide placements (`moeru_models::shard`) or seal a
//! checkpoint (`checkpoint.rs` does, for every layout).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use moeru_checkpoints::peft_config::{ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use moeru_checkpoints::{
    hf_param_tensors, peft_adapter_files_of, CheckpointContents, CheckpointError, OwnedTensor,
    TensorFile, INDEX_FILE,
};
use moeru_models::params::to_f32_vec;
use moeru_models::shard::{full_shape, join_parts};
use moeru_models::{Placement, Split};
use serde::{Deserialize, Serialize};

use crate::engine::Engine;
use crate::error::TrainError;
use crate::lora::BaseFingerprint;

/// One run of a parameter's moments in an optimizer slice file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SliceEntry {
    /// The parameter, under moeru's name.
    pub name: String,
    /// Its whole shape.
    pub shape: Vec<usize>,
    /// The part the run lies in: `[dim, index, parts]`, or none for the whole tensor.
    pub part: Option<[usize; 3]>,
    /// The run: first element and length, flat within that part.
    pub offset: usize,
    pub len: usize,
}

impl SliceEntry {
    fn split(&self) -> Option<Split> {
        self.part
            .map(|[dim, index, parts]| Split { dim, index, parts })
    }
}

fn weights_file(rank: usize) -> String {
    format!("model-r{rank:05}.safetensors")
}

pub fn slices_file(rank: usize) -> String {
    format!("optim-r{rank:05}.json")
}

/// The moments of a slice map's runs: the map's file with a `.safetensors` extension.
fn moments_file(rank: usize) -> String {
    format!("optim-r{rank:05}.safetensors")
}

/// Whether `dir` holds a model-parallel checkpoint's optimizer slices.
pub fn is_sliced(dir: &Path) -> bool {
    dir.join(slices_file(0)).exists()
}

/// This rank's files of a model-parallel checkpoint, and on world rank 0 the index (or, for
/// a LoRA run on the base `lora_base`, the whole adapters in PEFT's files); the caller adds
/// config.json and the trainer state. Collective over the engine's groups.
pub fn sharded_contents(
    engine: &mut Engine,
    lora_base: Option<&BaseFingerprint>,
    contents: &mut CheckpointContents,
) -> Result<(), TrainError> {
    let params = engine.local_params();
    let shapes: BTreeMap<String, Vec<usize>> = (params.iter())
        .map(|(n, dims, _)| (n.clone(), dims.clone()))
        .collect();
    match lora_base {
        Some(base) => adapter_contents(engine, params, &base.path, contents)?,
        None => weight_contents(engine, params, contents)?,
    }
    // Every rank writes its slice map, empty or not, so that a reader finds them all.
    let rank = engine
        .parallel()
        .expect("a model-parallel engine")
        .world
        .rank();
    let (entries, tensors) = owned_moments(engine, &shapes);
    let map = serde_json::to_value(&entries).expect("slice map serialises");
    contents.json.push((slices_file(rank), map));
    if !tensors.is_empty() {
        contents.tensors.push((moments_file(rank), tensors));
    }
    Ok(())
}

/// The weights each rank owns, and the index on world rank 0.
fn weight_contents(
    engine: &Engine,
    params: Vec<(String, Vec<usize>, Vec<f32>)>,
    contents: &mut CheckpointContents,
) -> Result<(), TrainError> {
    let weights = owned_weights(engine, params)?;
    let p = engine.parallel().expect("a model-parallel engine");
    let rank = p.world.rank();
    let names: Vec<&str> = weights.iter().map(|(n, _)| n.as_str()).collect();
    let bytes: usize = weights.iter().map(|(_, t)| t.bytes.len()).sum();
    // Rank 0 learns every rank's tensors (each rank decides what it owns, once).
    let mine = format!("{bytes}\n{}", names.join("\n"));
    let mut weight_map = serde_json::Map::new();
    let mut total = 0u64;
    for r in 0..p.world.size() {
        let listed = p.world.broadcast_string(&mine, r)?;
        let mut lines = listed.lines();
        total += lines
            .next()
            .and_then(|b| b.parse::<u64>().ok())
            .unwrap_or(0);
        for name in lines {
            weight_map.insert(name.to_string(), weights_file(r).into());
        }
    }
    if rank == 0 {
        let index =
            serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        contents.json.push((INDEX_FILE.into(), index));
    }
    if !weights.is_empty() {
        contents.tensors.push((weights_file(rank), weights));
    }
    Ok(())
}

/// A LoRA run's adapters (`params`), joined whole on world rank 0 (over tp for a split
/// site's factor, over ep for the experts'), as PEFT's two files on that rank. Adapters are
/// small, so one rank writing them all costs little and keeps PEFT's single file.
fn adapter_contents(
    engine: &mut Engine,
    params: Vec<(String, Vec<usize>, Vec<f32>)>,
    base_path: &str,
    contents: &mut CheckpointContents,
) -> Result<(), TrainError> {
    let p = engine.parallel().expect("a model-parallel engine");
    let mut whole = Vec::with_capacity(params.len());
    for (name, dims, values) in params {
        let plan = p.shard.plan(&name);
        let values = match plan.placement {
            Placement::Split(s) => {
                let group = if plan.expert { p.ep } else { p.tp };
                join_parts(&group.all_gather(&values)?, s.parts, &dims, s.dim)
            }
            Placement::Replicated => values,
        };
        let shape = full_shape(&dims, &plan.placement);
        whole.push((name, OwnedTensor::f32(&values, shape)));
    }
    if p.world.rank() == 0 {
        let (tensors, config) = peft_adapter_files_of(&mut engine.model, base_path, whole)?;
        contents.tensors.push((ADAPTER_WEIGHTS.into(), tensors));
        contents.json.push((ADAPTER_CONFIG.into(), config));
    }
    Ok(())
}

/// The whole Hugging Face tensors this rank writes: its experts when it is first in its
/// expert-data-parallel group; on data-parallel rank 0, every `tp`-th dense tensor, joined
/// over tp first when split (all tp ranks take part in each join).
fn owned_weights(
    engine: &Engine,
    params: Vec<(String, Vec<usize>, Vec<f32>)>,
) -> Result<Vec<(String, OwnedTensor)>, TrainError> {
    let first_rank = engine.replicas().rank() == 0;
    let p = engine.parallel().expect("a model-parallel engine");
    let tp = p.tp.size();
    let mut out = Vec::new();
    for (i, (name, dims, values)) in params.into_iter().enumerate() {
        let plan = p.shard.plan(&name);
        if plan.expert {
            if p.edp.rank() == 0 {
                let first = p.shard.ep_rank * dims[0];
                out.extend(hf_param_tensors(&name, &dims, &values, first));
            }
            continue;
        }
        if !first_rank || p.is_head_copy(&name) {
            continue;
        }
        let values = match plan.placement {
            Placement::Split(s) => join_parts(&p.tp.all_gather(&values)?, s.parts, &dims, s.dim),
            Placement::Replicated => values,
        };
        if p.tp.rank() == i % tp {
            let full = full_shape(&dims, &plan.placement);
            out.extend(hf_param_tensors(&name, &full, &values, 0));
        }
    }
    Ok(out)
}

/// The slice map and moment tensors of the optimizer pieces this rank owns (`shapes`: each
/// parameter's local shape).
fn owned_moments(
    engine: &Engine,
    shapes: &BTreeMap<String, Vec<usize>>,
) -> (Vec<SliceEntry>, Vec<(String, OwnedTensor)>) {
    let p = engine.parallel().expect("a model-parallel engine");
    let (mut entries, mut tensors) = (Vec::new(), Vec::new());
    for (k, (piece, m)) in engine.owned_pieces().into_iter().enumerate() {
        let plan = p.shard.plan(&piece.name);
        let dims = &shapes[&piece.name];
        let part = match plan.placement {
            Placement::Split(s) => Some([s.dim, s.index, s.parts]),
            Placement::Replicated => None,
        };
        entries.push(SliceEntry {
            name: piece.name.clone(),
            shape: full_shape(dims, &plan.placement),
            part,
            offset: piece.offset,
            len: piece.len,
        });
        let flat =
            |t: &burn::tensor::Tensor<1>| OwnedTensor::f32(&to_f32_vec(t.clone()), vec![piece.len]);
        tensors.push((format!("exp_avg.{k}"), flat(&m.exp_avg)));
        tensors.push((format!("exp_avg_sq.{k}"), flat(&m.exp_avg_sq)));
    }
    (entries, tensors)
}

/// The optimizer slices of a model-parallel checkpoint, read one parameter at a time.
pub struct SlicedMoments {
    files: Vec<(PathBuf, TensorFile)>,
    /// Parameter → (file, run number in it, the run).
    runs: BTreeMap<String, Vec<(usize, usize, SliceEntry)>>,
}

impl SlicedMoments {
    pub fn open(dir: &Path) -> Result<Self, CheckpointError> {
        let mut maps: Vec<String> = std::fs::read_dir(dir)
            .map_err(|e| CheckpointError::io(dir, e))?
            .filter_map(|e| Some(e.ok()?.file_name().to_str()?.to_string()))
            .filter(|n| n.starts_with("optim-r") && n.ends_with(".json"))
            .collect();
        maps.sort();
        let mut files = Vec::new();
        let mut runs: BTreeMap<String, Vec<_>> = BTreeMap::new();
        for map_name in maps {
            let map_path = dir.join(&map_name);
            let text = std::fs::read_to_string(&map_path)
                .map_err(|e| CheckpointError::io(&map_path, e))?;
            let entries: Vec<SliceEntry> = serde_json::from_str(&text).map_err(|e| {
                CheckpointError::io(&map_path, format!("invalid optimizer slice map: {e}"))
            })?;
            if entries.is_empty() {
                continue;
            }
            let path = map_path.with_extension("safetensors");
            let file = TensorFile::open(&path)?;
            for (k, e) in entries.into_iter().enumerate() {
                runs.entry(e.name.clone())
                    .or_default()
                    .push((files.len(), k, e));
            }
            files.push((path, file));
        }
        Ok(Self { files, runs })
    }

    /// The whole moments (exp_avg, exp_avg_sq) of `name`, or `None` when the checkpoint has
    /// none for it; an error when its runs do not cover it exactly.
    pub fn whole(&self, name: &str) -> Result<Option<[Vec<f32>; 2]>, CheckpointError> {
        let Some(runs) = self.runs.get(name) else {
            return Ok(None);
        };
        let shape = runs[0].2.shape.clone();
        let n: usize = shape.iter().product();
        let mut whole = [vec![0f32; n], vec![0f32; n]];
        let mut covered = 0;
        for (f, k, e) in runs {
            let (path, file) = &self.files[*f];
            let bad = |why: String| {
                CheckpointError::io(path, format!("optimizer run {k} of `{name}`: {why}"))
            };
            if e.shape != shape {
                return Err(bad(format!(
                    "shape {:?}, another run says {shape:?}",
                    e.shape
                )));
            }
            let part_len = e.split().map_or(n, |s| n / s.parts);
            if e.offset + e.len > part_len {
                return Err(bad(format!(
                    "elements {}..{} exceed its part of {part_len}",
                    e.offset,
                    e.offset + e.len
                )));
            }
            for (w, kind) in whole.iter_mut().zip(["exp_avg", "exp_avg_sq"]) {
                let (values, _) = file.f32(&format!("{kind}.{k}"))?;
                if values.len() != e.len {
                    return Err(bad(format!(
                        "{kind} has {} elements, the map says {}",
                        values.len(),
                        e.len
                    )));
                }
                place_run(w, &shape, e.split(), e.offset, &values);
            }
            covered += e.len;
        }
        if covered != n {
            let path = &self.files[runs[0].0].0;
            return Err(CheckpointError::io(
                path,
                format!("the optimizer runs of `{name}` cover {covered} of its {n} elements"),
            ));
        }
        Ok(Some(whole))
    }
}

/// Writes `values`, the run at `offset` of the part `split` of a tensor of shape `full`
/// (flat within the part), into `whole`.
fn place_run(
    whole: &mut [f32],
    full: &[usize],
    split: Option<Split>,
    offset: usize,
    values: &[f32],
) {
    let Some(s) = split else {
        whole[offset..offset + values.len()].copy_from_slice(values);
        return;
    };
    let rows = full[s.dim] / s.parts;
    let inner: usize = full[s.dim + 1..].iter().product();
    let mut done = 0;
    while done < values.len() {
        let i = offset + done;
        let (outer, rem) = (i / (rows * inner), i % (rows * inner));
        let (row, col) = (rem / inner, rem % inner);
        let at = (outer * full[s.dim] + s.index * rows + row) * inner + col;
        let len = (inner - col).min(values.len() - done);
        whole[at..at + len].copy_from_slice(&values[done..done + len]);
        done += len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moeru_models::shard::cut_part;

    #[test]
    fn runs_of_parts_reassemble_the_whole() {
        let full = [4, 6, 3];
        let whole: Vec<f32> = (0..72).map(|i| i as f32).collect();
        for dim in 0..3 {
            let parts = [2, 3, 3][dim];
            let mut back = vec![-1f32; 72];
            for index in 0..parts {
                let s = Split { dim, index, parts };
                let part = cut_part(&whole, &full, &s);
                // Uneven runs, as ZeRO-1 cuts a part at bucket boundaries.
                let cut = part.len() / 3 + 1;
                place_run(&mut back, &full, Some(s), 0, &part[..cut]);
                place_run(&mut back, &full, Some(s), cut, &part[cut..]);
            }
            assert_eq!(back, whole, "dim {dim}");
        }
    }
}
