//! What a training checkpoint holds and how it is restored: model weights (moeru's in-memory
//! names, experts stacked), AdamW moments, config.json and the trainer state.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};
use moeru_checkpoints::{
    latest_valid_checkpoint, load_hf_model, named_tensors, save_checkpoint, CheckpointContents,
    CheckpointError, OwnedTensor, TensorFile,
};
use moeru_data::LoaderState;
use moeru_models::params::to_f32_vec;
use moeru_models::Qwen3Model;
use serde::{Deserialize, Serialize};

use crate::optim::{AdamW, Moments};

pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIM_FILE: &str = "optim.safetensors";
pub const STATE_FILE: &str = "trainer_state.json";

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
}

/// Saves step `state.step` of a run into `run_dir`.
pub fn save(
    run_dir: &Path,
    model: &mut Qwen3Model,
    opt: &AdamW,
    state: &TrainerState,
    mesh: serde_json::Value,
    keep_last: usize,
) -> Result<PathBuf, CheckpointError> {
    let mut optim = Vec::new();
    for (name, m) in &opt.state {
        let n = m.exp_avg.dims()[0];
        optim.push((
            format!("exp_avg.{name}"),
            OwnedTensor::f32(&to_f32_vec(m.exp_avg.clone()), vec![n]),
        ));
        optim.push((
            format!("exp_avg_sq.{name}"),
            OwnedTensor::f32(&to_f32_vec(m.exp_avg_sq.clone()), vec![n]),
        ));
    }
    let contents = CheckpointContents {
        tensors: vec![
            (MODEL_FILE.into(), named_tensors(model)),
            (OPTIM_FILE.into(), optim),
        ],
        json: vec![
            (
                "config.json".into(),
                serde_json::Value::Object(model.config.to_export_json()),
            ),
            (
                STATE_FILE.into(),
                serde_json::to_value(state).expect("state serialises"),
            ),
        ],
    };
    save_checkpoint(run_dir, state.step, mesh, contents, keep_last)
}

/// A verified checkpoint found in a run folder.
pub struct Restored {
    pub dir: PathBuf,
    pub model: Qwen3Model,
    pub moments: std::collections::BTreeMap<String, Moments>,
    pub state: TrainerState,
}

/// The newest checkpoint of `run_dir` whose manifest verifies, loaded onto `device`, and
/// the reasons newer ones were skipped.
pub fn restore_latest(
    run_dir: &Path,
    device: &Device,
) -> Result<(Option<Restored>, Vec<String>), CheckpointError> {
    let latest = latest_valid_checkpoint(run_dir)?;
    let skipped = latest.skipped;
    let Some((_, dir)) = latest.found else {
        return Ok((None, skipped));
    };
    let model = load_hf_model(&dir, device)?;
    let state_path = dir.join(STATE_FILE);
    let text =
        std::fs::read_to_string(&state_path).map_err(|e| CheckpointError::io(&state_path, e))?;
    let state: TrainerState = serde_json::from_str(&text)
        .map_err(|e| CheckpointError::io(&state_path, format!("invalid trainer state: {e}")))?;
    let optim = TensorFile::open(&dir.join(OPTIM_FILE))?;
    let inner = device.clone().inner();
    let mut moments = std::collections::BTreeMap::new();
    let load = |name: &str| -> Result<Tensor<1>, CheckpointError> {
        let (values, shape) = optim.f32(name)?;
        Ok(Tensor::from_data(TensorData::new(values, shape), &inner))
    };
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
