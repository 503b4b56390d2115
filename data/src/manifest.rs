//! `manifest.json` of a prepared dataset: totals, the tokenizer's hash, and per shard its row
//! groups, sizes and sha256. The loader plans from the manifest without opening every shard.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};

pub const MANIFEST_FILE: &str = "manifest.json";
pub const FORMAT: &str = "moeru-data/1";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizerInfo {
    /// The path given at prepare time (informational).
    pub path: String,
    /// sha256 of the tokenizer.json bytes.
    pub sha256: String,
    /// Every token id in the shards is `< vocab_size`.
    pub vocab_size: u64,
    /// The token appended to each pretraining document (or, in `preference` mode, to plain
    /// chosen / rejected completions), if any.
    pub eos_id: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowGroupInfo {
    pub rows: u64,
    pub tokens: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// File name relative to the dataset directory.
    pub file: String,
    pub documents: u64,
    pub tokens: u64,
    pub bytes: u64,
    pub sha256: String,
    pub row_groups: Vec<RowGroupInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub created_by: String,
    /// `chat`, `pretrain` or `preference` (one document per pair, see [`crate::pairs`]).
    pub mode: String,
    /// Documents (in `preference` mode: pairs).
    pub documents: u64,
    pub tokens: u64,
    /// Tokens whose loss mask is 1 (in `preference` mode: chosen + rejected tokens).
    pub loss_tokens: u64,
    pub tokenizer: TokenizerInfo,
    pub inputs: Vec<String>,
    pub shards: Vec<ShardInfo>,
}

impl Manifest {
    pub fn read(dir: &Path) -> Result<Manifest> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            DataError::io(
                &path,
                "reading manifest (is this a `moeru data prepare` output?)",
                e,
            )
        })?;
        let m: Manifest = serde_json::from_str(&text).map_err(|e| DataError::Manifest {
            path: path.clone(),
            msg: format!("invalid manifest ({e}); re-run `moeru data prepare`"),
        })?;
        if m.format != FORMAT {
            return Err(DataError::Manifest {
                path,
                msg: format!(
                    "format {:?} is not {FORMAT:?}; re-run `moeru data prepare`",
                    m.format
                ),
            });
        }
        Ok(m)
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(MANIFEST_FILE);
        let text = serde_json::to_string_pretty(self).map_err(|e| DataError::Manifest {
            path: path.clone(),
            msg: format!("cannot serialize manifest: {e}"),
        })?;
        crate::fsutil::write_synced(&path, text.as_bytes())
    }

    /// A short fingerprint of the dataset content (sha256 over the shard hashes), used to check
    /// that a loader state is resumed on the same data.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for s in &self.shards {
            h.update(s.sha256.as_bytes());
            h.update(b"\n");
        }
        crate::tokenizer::hex(&h.finalize()[..8])
    }
}
