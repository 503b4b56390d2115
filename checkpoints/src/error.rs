use std::path::PathBuf;

use moeru_models::ConfigError;

/// Everything that can be wrong with a model folder or checkpoint, phrased for the user:
/// which file, which tensor, what was found, what was expected.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error("{dir}: no weights found: expected model.safetensors or model.safetensors.index.json (moeru never reads pickled `.bin` / `.pt` weights: save them with `save_pretrained(..., safe_serialization=True)`)")]
    NoWeights { dir: PathBuf },
    #[error("{index}: lists shard `{shard}`, which does not exist in the folder; restore the missing file")]
    MissingShard { index: PathBuf, shard: String },
    #[error("{file}: not a valid safetensors file ({reason}); the file is truncated or corrupt, re-download or re-export it")]
    Corrupt { file: PathBuf, reason: String },
    #[error("{dir}: tensor `{name}` is missing (config.json implies shape {expected:?}); the weights do not match config.json")]
    MissingTensor {
        dir: PathBuf,
        name: String,
        expected: Vec<usize>,
    },
    #[error("{file}: tensor `{name}` has shape {found:?}, but config.json implies {expected:?}")]
    ShapeMismatch {
        file: PathBuf,
        name: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("{file}: unexpected tensor `{name}` with shape {shape:?}; config.json describes no such parameter (wrong config.json, or weights of another architecture)")]
    UnexpectedTensor {
        file: PathBuf,
        name: String,
        shape: Vec<usize>,
    },
    #[error("{file}: tensor `{name}` has dtype {dtype}; supported are F32, BF16, F16")]
    UnsupportedDtype {
        file: PathBuf,
        name: String,
        dtype: String,
    },
    #[error(
        "{path}: already exists and is not empty; choose a new output folder (nothing was written)"
    )]
    OutputExists { path: PathBuf },
}

impl CheckpointError {
    pub fn io(path: impl Into<PathBuf>, err: impl std::fmt::Display) -> Self {
        Self::Io {
            path: path.into(),
            reason: err.to_string(),
        }
    }
}
