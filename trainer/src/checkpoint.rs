//! What a training checkpoint holds and how it is restored: model weights (moeru's in-memory
//! names, experts stacked) and config.json, or for a LoRA run the adapters in PEFT's layout
//! (adapter_model.safetensors, adapter_config.json); AdamW moments; the trainer state.
//!
//! Moments are saved whole (`optim.safetensors`, one tensor pair per parameter) or, under
//! ZeRO-1, as one file per DP rank (`optim-dpRRR-of-NNN.safetensors`: that rank's flat shard
//! and its flat ranges) plus `optim_layout.json` (parameter names and sizes in flat order).
//! Restoring assembles the whole moments from either form, so a checkpoint loads onto any DP
//! size, with or without ZeRO-1. A tensor- or expert-parallel run's ranks write the parts
//! they own (`checkpoint_sharded.rs`); every form loads onto any layout, the model in the
//! part the restoring rank holds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::tensor::{Device, Tensor, TensorData};
use moeru_checkpoints::peft_config::{ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use moeru_checkpoints::run_checkpoint::step_dir_name;
use moeru_checkpoints::{
    begin_checkpoint, held_named_tensors, latest_valid_checkpoint, load_hf_model_sharded,
    peft_adapter_files, CheckpointContents, CheckpointError, HeldTensors, OwnedTensor, TensorFile,
};
use moeru_data::LoaderState;
use moeru_models::params::{param_shapes, to_f32_vec};
use moeru_models::shard::{cut_part, full_shape};
use moeru_models::Placement;
use moeru_models::{Boundaries, Qwen3Config, Qwen3Model};
use moeru_parallel::ProcessGroup;
use serde::{Deserialize, Serialize};

use crate::checkpoint_sharded::{is_sliced, sharded_contents, SlicedMoments};
use crate::checkpoint_writer::{seal_now, Snapshot};
use crate::engine::optim::{flat_tensor, AdamW, Moments, SavedMoments};
use crate::engine::Engine;
use crate::error::TrainError;
use crate::fault::Fault;
use crate::lora::BaseFingerprint;

pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIM_FILE: &str = "optim.safetensors";
pub const OPTIM_LAYOUT_FILE: &str = "optim_layout.json";
pub const STATE_FILE: &str = "trainer_state.json";

fn shard_file(rank: usize, size: usize) -> String {
    format!("optim-dp{rank:03}-of-{size:03}.safetensors")
}

/// Everything besides tensors needed to continue exactly where a run stopped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: u64,
    pub tokens_seen: u64,
    /// Where the data loader stands.
    pub loader: LoaderState,
    /// sha256 of the recipe that wrote the checkpoint.
    pub recipe_hash: String,
    pub seed: u64,
    /// Learning rate of the last step taken.
    pub lr: f64,
    /// LoRA runs: the frozen base the adapters belong to (the checkpoint holds no base).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora_base: Option<BaseFingerprint>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OptimLayout {
    dp: usize,
    /// (name, elements) in flat order.
    params: Vec<(String, usize)>,
}

/// Where and how a run's checkpoints are kept.
pub struct SaveTarget<'a> {
    pub run_dir: &'a Path,
    /// Checkpoints kept (older ones are removed once a new one is committed).
    pub keep_last: usize,
    /// The mesh that wrote them (recorded in the manifest).
    pub mesh: serde_json::Value,
    /// The test hook armed for this step (`save-write`, `save-commit`).
    pub fault: Option<Fault>,
    /// Copy the tensors to host memory in the snapshot itself (a GPU run's background save:
    /// it must not hold device memory), instead of when each file is written.
    pub host_copy_now: bool,
}

/// Saves step `state.step` of `engine` into `target.run_dir`, by component: the model (or its
/// adapters), the optimizer's moments in the layout it holds them, the trainer state.
/// Collective over `world`: rank 0 writes the model and state and commits; under ZeRO-1 every
/// DP rank writes its optimizer shard.
pub fn save(
    target: &SaveTarget,
    engine: &mut Engine,
    state: &TrainerState,
    world: &ProcessGroup,
) -> Result<PathBuf, TrainError> {
    seal_now(snapshot(target, engine, state, world)?, world)
}

/// Copies this rank's part of checkpoint `state.step` out of `engine` into host memory, and
/// (rank 0) creates the temp folder every rank writes into. Collective over `world`; what
/// remains (writing, sealing) needs no engine, so it may run in the background.
pub fn snapshot(
    target: &SaveTarget,
    engine: &mut Engine,
    state: &TrainerState,
    world: &ProcessGroup,
) -> Result<Snapshot, TrainError> {
    let main = world.rank() == 0;
    let run_dir = target.run_dir;
    // One temp folder for all ranks: rank 0 names it.
    let tag = world.broadcast_string(&std::process::id().to_string(), 0)?;
    let tmp = run_dir.join(format!("{}.tmp-{tag}", step_dir_name(state.step)));
    let mut begun = Ok(());
    if main {
        begun = begin_checkpoint(run_dir, state.step, &tag)
            .map(|_| ())
            .map_err(|e| e.to_string());
    }
    world.barrier()?;
    let mut contents = CheckpointContents::default();
    if engine.parallel().is_some() {
        // Model parallelism: every owner writes its parts (`checkpoint_sharded.rs`).
        sharded_contents(engine, state.lora_base.as_ref(), &mut contents)?;
        match (main, &state.lora_base) {
            (false, _) => {}
            (true, None) => config_and_state(&engine.model.config, state, &mut contents),
            (true, Some(_)) => state_json(state, &mut contents),
        }
    } else {
        if main {
            model_contents(&mut engine.model, state, &mut contents)?;
        }
        optim_contents(&engine.optim, main, &mut contents);
    }
    if target.host_copy_now {
        contents.materialize();
    }
    Ok(Snapshot {
        run_dir: run_dir.to_path_buf(),
        tmp,
        step: state.step,
        mesh: target.mesh.clone(),
        keep_last: target.keep_last,
        fault: target.fault,
        contents,
        begun,
        rank: world.rank(),
        world_size: world.size(),
    })
}

/// The error of a save that could not complete (a full disk, a lost mount): what failed, that
/// its partial files are gone, which checkpoint `latest` still names, and what to do.
pub fn save_failed(run_dir: &Path, step: u64, why: &str) -> TrainError {
    let previous = std::fs::read_to_string(run_dir.join(moeru_checkpoints::run_checkpoint::LATEST))
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty() && run_dir.join(t).is_dir());
    let kept = match previous {
        Some(name) => format!(
            "the previous checkpoint {} is intact and is what a resume uses",
            run_dir.join(name).display()
        ),
        None => "no earlier checkpoint exists".to_string(),
    };
    TrainError::Save(format!(
        "could not save checkpoint {} in {}: {why}; its partial files were removed and {kept}; free space there (or point checkpoint.dir at a larger disk) and resume with --set checkpoint.resume=true",
        step_dir_name(step),
        run_dir.display()
    ))
}

/// The model component (full weights and config.json, or a LoRA run's PEFT adapter files)
/// and the trainer state.
fn model_contents(
    model: &mut Qwen3Model,
    state: &TrainerState,
    contents: &mut CheckpointContents,
) -> Result<(), TrainError> {
    match &state.lora_base {
        // LoRA: PEFT's adapter folder layout; the frozen base stays where it was loaded.
        Some(base) => {
            let (tensors, config) = peft_adapter_files(model, &base.path)?;
            contents.tensors.push((ADAPTER_WEIGHTS.into(), tensors));
            contents.json.push((ADAPTER_CONFIG.into(), config));
        }
        None => {
            contents
                .held
                .push((MODEL_FILE.into(), held_named_tensors(model)));
            config_and_state(&model.config, state, contents);
            return Ok(());
        }
    }
    state_json(state, contents);
    Ok(())
}

fn state_json(state: &TrainerState, contents: &mut CheckpointContents) {
    contents.json.push((
        STATE_FILE.into(),
        serde_json::to_value(state).expect("state serialises"),
    ));
}

/// config.json and the trainer state.
fn config_and_state(config: &Qwen3Config, state: &TrainerState, contents: &mut CheckpointContents) {
    contents.json.push((
        "config.json".into(),
        serde_json::Value::Object(config.to_export_json()),
    ));
    state_json(state, contents);
}

/// The optimizer component: whole moments (rank 0), or every rank's ZeRO-1 shard plus the
/// flat layout (rank 0).
fn optim_contents(optim: &AdamW, main: bool, contents: &mut CheckpointContents) {
    match optim.saved_moments() {
        SavedMoments::Whole(moments) if main => contents
            .held
            .push((OPTIM_FILE.into(), whole_moments(&moments))),
        SavedMoments::Whole(_) => {}
        SavedMoments::Shard {
            placement,
            exp_avg,
            exp_avg_sq,
        } => {
            let ranges: Vec<i64> = placement
                .ranges
                .iter()
                .flat_map(|r| [r.start as i64, r.end as i64])
                .collect();
            let k = placement.ranges.len();
            let shard: HeldTensors = Box::new(move || {
                let (exp_avg, exp_avg_sq) = (concat(exp_avg), concat(exp_avg_sq));
                let n = exp_avg.len();
                vec![
                    ("exp_avg".into(), OwnedTensor::f32(&exp_avg, vec![n])),
                    ("exp_avg_sq".into(), OwnedTensor::f32(&exp_avg_sq, vec![n])),
                    ("ranges".into(), OwnedTensor::i64(&ranges, vec![k, 2])),
                ]
            });
            contents
                .held
                .push((shard_file(placement.rank, placement.size), shard));
            if main {
                let layout = OptimLayout {
                    dp: placement.size,
                    params: placement.params.clone(),
                };
                contents.json.push((
                    OPTIM_LAYOUT_FILE.into(),
                    serde_json::to_value(layout).expect("layout serialises"),
                ));
            }
        }
    }
}

/// Flat tensors' values, one after another.
fn concat(parts: Vec<Tensor<1>>) -> Vec<f32> {
    parts.into_iter().flat_map(to_f32_vec).collect()
}

/// The whole moments, read when the file is written.
fn whole_moments(state: &BTreeMap<&str, &Moments>) -> HeldTensors {
    let held: Vec<(String, Tensor<1>, Tensor<1>)> = state
        .iter()
        .map(|(name, m)| (name.to_string(), m.exp_avg.clone(), m.exp_avg_sq.clone()))
        .collect();
    Box::new(move || {
        let mut optim = Vec::new();
        for (name, exp_avg, exp_avg_sq) in held {
            let n = exp_avg.dims()[0];
            optim.push((
                format!("exp_avg.{name}"),
                OwnedTensor::f32(&to_f32_vec(exp_avg), vec![n]),
            ));
            optim.push((
                format!("exp_avg_sq.{name}"),
                OwnedTensor::f32(&to_f32_vec(exp_avg_sq), vec![n]),
            ));
        }
        optim
    })
}

/// A checkpoint's AdamW moments.
pub enum RestoredMoments {
    /// Whole per parameter (a data-parallel checkpoint, with or without ZeRO-1).
    Whole(BTreeMap<String, Moments>),
    /// A model-parallel checkpoint's runs, assembled one parameter at a time.
    Sliced(SlicedMoments),
}

impl RestoredMoments {
    /// The moments of the part of each trainable parameter of `model` that its shard holds
    /// (whole on one rank); parameters without saved moments are left out.
    pub fn for_model(
        self,
        model: &mut Qwen3Model,
        device: &Device,
    ) -> Result<BTreeMap<String, Moments>, CheckpointError> {
        let shard = model.shard();
        let saved = match self {
            RestoredMoments::Whole(map) if shard.is_single() => return Ok(map),
            saved => saved,
        };
        let device = device.clone().inner();
        let mut out = BTreeMap::new();
        for (name, dims) in param_shapes(&mut model.trainable()) {
            let placement = shard.plan(&name).placement;
            let whole = match &saved {
                RestoredMoments::Whole(map) => map.get(&name).map(|m| {
                    [
                        to_f32_vec(m.exp_avg.clone()),
                        to_f32_vec(m.exp_avg_sq.clone()),
                    ]
                }),
                RestoredMoments::Sliced(s) => s.whole(&name)?,
            };
            let Some(whole) = whole else { continue };
            let full = full_shape(&dims, &placement);
            let [exp_avg, exp_avg_sq] = whole.map(|w| {
                let part = match &placement {
                    Placement::Split(split) => cut_part(&w, &full, split),
                    Placement::Replicated => w,
                };
                flat_tensor(part, &device)
            });
            out.insert(
                name,
                Moments {
                    exp_avg,
                    exp_avg_sq,
                },
            );
        }
        Ok(out)
    }
}

/// A verified checkpoint found in a run folder.
pub struct Restored {
    pub dir: PathBuf,
    /// The trained model; `None` for a LoRA checkpoint, whose adapters (PEFT files in `dir`)
    /// go onto the base the recipe loads (see `state.lora_base`).
    pub model: Option<Qwen3Model>,
    /// The moments, whatever layout wrote them.
    pub moments: RestoredMoments,
    pub state: TrainerState,
}

/// The newest checkpoint of `run_dir` whose manifest verifies, loaded onto `device` (the
/// model as `boundaries` shard it; the moments whole), and the reasons newer ones were
/// skipped.
pub fn restore_latest(
    run_dir: &Path,
    device: &Device,
    boundaries: Arc<dyn Boundaries>,
) -> Result<(Option<Restored>, Vec<String>), CheckpointError> {
    let latest = latest_valid_checkpoint(run_dir)?;
    let skipped = latest.skipped;
    let Some((_, dir)) = latest.found else {
        return Ok((None, skipped));
    };
    let model = if dir.join(ADAPTER_CONFIG).exists() {
        None
    } else {
        Some(load_hf_model_sharded(&dir, boundaries, device)?)
    };
    let state_path = dir.join(STATE_FILE);
    let text =
        std::fs::read_to_string(&state_path).map_err(|e| CheckpointError::io(&state_path, e))?;
    let state: TrainerState = serde_json::from_str(&text)
        .map_err(|e| CheckpointError::io(&state_path, format!("invalid trainer state: {e}")))?;
    let inner = device.clone().inner();
    let moments = if dir.join(OPTIM_FILE).exists() {
        RestoredMoments::Whole(load_whole(&dir.join(OPTIM_FILE), &inner)?)
    } else if is_sliced(&dir) {
        RestoredMoments::Sliced(SlicedMoments::open(&dir)?)
    } else {
        RestoredMoments::Whole(load_shards(&dir, &inner)?)
    };
    Ok((
        Some(Restored {
            dir,
            model,
            moments,
            state,
        }),
        skipped,
    ))
}

fn load_whole(path: &Path, device: &Device) -> Result<BTreeMap<String, Moments>, CheckpointError> {
    let optim = TensorFile::open(path)?;
    let load = |name: &str| -> Result<Tensor<1>, CheckpointError> {
        let (values, shape) = optim.f32(name)?;
        Ok(Tensor::from_data(TensorData::new(values, shape), device))
    };
    let mut moments = BTreeMap::new();
    for (name, _) in optim.shapes() {
        if let Some(param) = name.strip_prefix("exp_avg.") {
            moments.insert(
                param.to_string(),
                Moments {
                    exp_avg: load(&name)?,
                    exp_avg_sq: load(&format!("exp_avg_sq.{param}"))?,
                },
            );
        }
    }
    Ok(moments)
}

/// Whole moments from the ZeRO-1 shard files of checkpoint `dir`.
fn load_shards(dir: &Path, device: &Device) -> Result<BTreeMap<String, Moments>, CheckpointError> {
    let layout_path = dir.join(OPTIM_LAYOUT_FILE);
    let text =
        std::fs::read_to_string(&layout_path).map_err(|e| CheckpointError::io(&layout_path, e))?;
    let layout: OptimLayout = serde_json::from_str(&text)
        .map_err(|e| CheckpointError::io(&layout_path, format!("invalid optimizer layout: {e}")))?;
    let total: usize = layout.params.iter().map(|(_, n)| n).sum();
    let mut m = vec![0f32; total];
    let mut v = vec![0f32; total];
    let mut covered = 0;
    for r in 0..layout.dp {
        let path = dir.join(shard_file(r, layout.dp));
        let f = TensorFile::open(&path)?;
        let (em, _) = f.f32("exp_avg")?;
        let (ev, _) = f.f32("exp_avg_sq")?;
        let (ranges, _) = f.i64("ranges")?;
        let mut at = 0;
        for pair in ranges.chunks_exact(2) {
            let (lo, hi) = (pair[0] as usize, pair[1] as usize);
            if hi > total || lo > hi || at + (hi - lo) > em.len() || em.len() != ev.len() {
                return Err(CheckpointError::io(
                    &path,
                    format!("shard range {lo}..{hi} does not fit the {total} optimizer elements of {OPTIM_LAYOUT_FILE}"),
                ));
            }
            m[lo..hi].copy_from_slice(&em[at..at + hi - lo]);
            v[lo..hi].copy_from_slice(&ev[at..at + hi - lo]);
            at += hi - lo;
            covered += hi - lo;
        }
    }
    if covered != total {
        return Err(CheckpointError::io(
            dir,
            format!("the optimizer shards cover {covered} of {total} elements"),
        ));
    }
    let mut moments = BTreeMap::new();
    let mut at = 0;
    for (name, n) in layout.params {
        let t = |x: &[f32]| Tensor::<1>::from_data(TensorData::new(x.to_vec(), [n]), device);
        moments.insert(
            name,
            Moments {
                exp_avg: t(&m[at..at + n]),
                exp_avg_sq: t(&v[at..at + n]),
            },
        );
        at += n;
    }
    Ok(moments)
}
