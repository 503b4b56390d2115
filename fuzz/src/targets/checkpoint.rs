//! Targets over a training checkpoint: its manifest.json and its trainer_state.json.
//!
//! The trainer reads `trainer_state.json` inside `moeru_trainer::checkpoint::restore_latest`,
//! which needs a device and the model's boundaries; the fuzz target does what it does with
//! the file (`serde_json::from_str::<TrainerState>`), then resumes a real data loader from
//! the state's loader position, as a resumed run does.

use std::path::{Path, PathBuf};

use moeru_checkpoints::{
    begin_checkpoint, commit_checkpoint, verify_checkpoint, write_tensors, OwnedTensor,
};
use moeru_data::{DataLoader, LoaderConfig};
use moeru_trainer::checkpoint::TrainerState;

use super::{put, target_of, workspace_root};
use crate::runner::Target;

const DATA: &str = "recipes/smoke/data/train";

fn loader() -> Result<DataLoader, String> {
    DataLoader::new(LoaderConfig::new(workspace_root().join(DATA), 64, 2, 1))
        .map_err(|e| e.to_string())
}

/// A real trainer state (the loader position after two batches).
fn real_state() -> TrainerState {
    let mut l = loader().expect("smoke data loads");
    for _ in 0..2 {
        l.next_batch().expect("smoke batch");
    }
    TrainerState {
        step: 2,
        tokens_seen: 256,
        loader: l.state(),
        recipe_hash: "0".repeat(64),
        seed: 1,
        lr: 1e-3,
        lora_base: None,
    }
}

/// A committed checkpoint written by moeru's own writer: (run folder, step folder).
fn real_checkpoint() -> (tempfile::TempDir, PathBuf) {
    let run = tempfile::tempdir().expect("temp dir");
    let tmp = begin_checkpoint(run.path(), 2, "fuzz").expect("begin checkpoint");
    // The files as the trainer writes them (write_tensors, pretty JSON), sealed by
    // moeru's own commit.
    let weights = vec![(
        "w".to_string(),
        OwnedTensor::f32(&[1.0, 2.0, 3.0, 4.0], vec![2, 2]),
    )];
    write_tensors(&tmp.join("model.safetensors"), &weights).expect("write tensors");
    let state = serde_json::to_string_pretty(&real_state()).expect("state to JSON");
    std::fs::write(tmp.join("trainer_state.json"), state + "\n").expect("write state");
    let mesh = serde_json::json!({"dp": 1, "tp": 1, "ep": 1, "pp": 1});
    let dir = commit_checkpoint(run.path(), &tmp, (2, mesh), 0, &|| {}).expect("commit");
    (run, dir)
}

/// `checkpoint_manifest`: `verify_checkpoint` on a real checkpoint whose manifest.json is
/// mutated (the files it lists are left as written).
pub fn manifest() -> Target {
    let (run, dir) = real_checkpoint();
    let seeds = vec![std::fs::read(dir.join("manifest.json")).expect("manifest")];
    let f = move |input: &[u8], _scratch: &Path| -> Result<(), String> {
        put(&dir, "manifest.json", input)?;
        verify_checkpoint(&dir).map(|_| ())
    };
    let mut t = target_of("checkpoint_manifest", seeds, true, Box::new(f));
    t._keep.push(Box::new(run));
    t
}

/// `trainer_state`: parse as resume does, then resume the smoke data loader at its position.
pub fn trainer_state() -> Target {
    let state = real_state();
    let seeds = vec![
        serde_json::to_vec_pretty(&state).expect("state to JSON"),
        serde_json::to_vec(&state).expect("state to JSON"),
    ];
    let f = |input: &[u8], _scratch: &Path| -> Result<(), String> {
        let text = std::str::from_utf8(input).map_err(|e| format!("trainer_state.json: {e}"))?;
        let state: TrainerState = serde_json::from_str(text)
            .map_err(|e| format!("trainer_state.json: invalid trainer state: {e}"))?;
        let mut l = loader()?;
        l.resume(&state.loader, 0, 1).map_err(|e| e.to_string())?;
        l.next_batch().map_err(|e| e.to_string())?;
        Ok(())
    };
    target_of("trainer_state", seeds, true, Box::new(f))
}
