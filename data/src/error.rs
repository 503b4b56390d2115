//! The crate's one error type. Every variant's Display is a single line naming the file, the
//! row and field where there is one, the offending value, and the fix.

use std::path::{Path, PathBuf};

/// Where in an input a problem was found: file, 0-based row (document) and field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    pub row: Option<u64>,
    pub field: Option<String>,
}

impl Location {
    pub fn file(file: &Path) -> Self {
        Self {
            file: file.to_path_buf(),
            row: None,
            field: None,
        }
    }
    pub fn row(file: &Path, row: u64) -> Self {
        Self {
            file: file.to_path_buf(),
            row: Some(row),
            field: None,
        }
    }
    pub fn field(file: &Path, row: u64, field: impl Into<String>) -> Self {
        Self {
            file: file.to_path_buf(),
            row: Some(row),
            field: Some(field.into()),
        }
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(row) = self.row {
            write!(f, ", row {row}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ", field `{field}`")?;
        }
        Ok(())
    }
}

/// Errors of the data pipeline.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {action} failed: {source}; check that the path exists and is accessible")]
    Io {
        path: PathBuf,
        action: &'static str,
        source: std::io::Error,
    },

    #[error("{0}: the field is missing; {1}")]
    MissingField(Location, String),

    #[error("{loc}: expected {expected}, found {found}; {fix}")]
    WrongType {
        loc: Box<Location>,
        expected: String,
        found: String,
        fix: String,
    },

    #[error("{0}: invalid JSON ({1}); each line of a .jsonl file must be one JSON object")]
    BadJson(Location, String),

    #[error("{0}: unknown role {1:?}; supported roles are system, user and assistant")]
    UnknownRole(Location, String),

    #[error(
        "{loc}: token id {id} is outside the tokenizer's vocabulary of {vocab_size}; \
         re-tokenize the data with the tokenizer the manifest names"
    )]
    TokenOutOfVocab {
        loc: Location,
        id: i64,
        vocab_size: usize,
    },

    #[error("{0}: {1}")]
    Invalid(Location, String),

    #[error("{0}: the input holds no documents; pass at least one non-empty input file")]
    EmptyInput(PathBuf),

    #[error("no input files given; pass --input PATH (JSONL, Parquet or text)")]
    NoInputs,

    #[error("{path}: cannot read Parquet: {msg}; check that the file is a complete Parquet file")]
    Parquet { path: PathBuf, msg: String },

    #[error("{path}: cannot load tokenizer: {msg}; pass a Hugging Face tokenizer.json")]
    Tokenizer { path: PathBuf, msg: String },

    #[error("{path}: {msg}")]
    Manifest { path: PathBuf, msg: String },

    #[error(
        "{path}: output already exists and is not empty; remove it or choose another --output"
    )]
    OutputExists { path: PathBuf },

    #[error("loader state does not match: {0}")]
    StateMismatch(String),

    #[error("invalid loader configuration: {0}")]
    Config(String),
}

impl DataError {
    pub fn io(path: &Path, action: &'static str, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.to_path_buf(),
            action,
            source,
        }
    }
    pub fn parquet(path: &Path, err: impl std::fmt::Display) -> Self {
        DataError::Parquet {
            path: path.to_path_buf(),
            msg: one_line(&err.to_string()),
        }
    }
    pub fn wrong_type(
        loc: Location,
        expected: impl Into<String>,
        found: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        DataError::WrongType {
            loc: Box::new(loc),
            expected: expected.into(),
            found: found.into(),
            fix: fix.into(),
        }
    }
}

/// Collapse a possibly multi-line message from a dependency onto one line.
pub(crate) fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

pub type Result<T, E = DataError> = std::result::Result<T, E>;
