//! A model folder's stop and pad ids, read as transformers' `generate` takes them:
//! `generation_config.json` first, then `config.json`; `eos_token_id` may be one id or a list.
//!
//! Owns: reading those keys. Must not: decide how generation uses them.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::CheckpointError;

pub const GENERATION_CONFIG: &str = "generation_config.json";

/// The ids `generate` stops at and pads finished rows with.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopIds {
    /// Empty: rows run to `max_new_tokens`.
    pub eos: Vec<i64>,
    pub pad: Option<i64>,
}

impl StopIds {
    /// The ids of the folder `dir`: each key from the first of generation_config.json and
    /// config.json that sets it (not null).
    pub fn read(dir: &Path) -> Result<StopIds, CheckpointError> {
        let files = [dir.join(GENERATION_CONFIG), dir.join("config.json")];
        let mut ids = StopIds::default();
        let (mut eos_set, mut pad_set) = (false, false);
        for file in files.iter().filter(|f| f.is_file()) {
            let json = read_json(file)?;
            if !eos_set {
                if let Some(v) = json.get("eos_token_id").filter(|v| !v.is_null()) {
                    ids.eos = id_list(v).ok_or_else(|| bad(file, "eos_token_id", v))?;
                    eos_set = true;
                }
            }
            if !pad_set {
                if let Some(v) = json.get("pad_token_id").filter(|v| !v.is_null()) {
                    ids.pad = Some(v.as_i64().ok_or_else(|| bad(file, "pad_token_id", v))?);
                    pad_set = true;
                }
            }
        }
        Ok(ids)
    }
}

fn read_json(file: &Path) -> Result<Value, CheckpointError> {
    let text = std::fs::read_to_string(file).map_err(|e| CheckpointError::io(file, e))?;
    serde_json::from_str(&text)
        .map_err(|e| CheckpointError::io(file, format!("not valid JSON: {e}")))
}

/// One id or a list of ids.
fn id_list(v: &Value) -> Option<Vec<i64>> {
    match v {
        Value::Array(items) => items.iter().map(Value::as_i64).collect(),
        other => other.as_i64().map(|id| vec![id]),
    }
}

fn bad(file: &Path, key: &str, v: &Value) -> CheckpointError {
    CheckpointError::Io {
        path: PathBuf::from(file),
        reason: format!(
            "`{key}` is {v}; expected a token id (an integer) or, for eos_token_id, a list of them"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_config_wins_key_by_key_and_bad_values_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let write = |f: &str, text: &str| std::fs::write(dir.path().join(f), text).unwrap();
        write("config.json", r#"{"eos_token_id": 7, "pad_token_id": 3}"#);
        assert_eq!(
            StopIds::read(dir.path()).unwrap(),
            StopIds {
                eos: vec![7],
                pad: Some(3)
            }
        );
        write(
            GENERATION_CONFIG,
            r#"{"eos_token_id": [9, 11], "pad_token_id": null}"#,
        );
        assert_eq!(
            StopIds::read(dir.path()).unwrap(),
            StopIds {
                eos: vec![9, 11],
                pad: Some(3)
            }
        );
        write(GENERATION_CONFIG, r#"{"eos_token_id": "</s>"}"#);
        let e = StopIds::read(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains(GENERATION_CONFIG) && e.contains("eos_token_id"),
            "{e}"
        );
    }
}
