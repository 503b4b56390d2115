//! Errors of the metrics layer: one line each, naming the file and the OS error.

use std::path::PathBuf;

/// An I/O failure or an unreadable `metrics.jsonl` while logging metrics.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// An operation on `path` failed; `op` says which (e.g. "create", "write").
    #[error("metrics: cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A line of an existing `metrics.jsonl` that is not the last one is not a JSON object with
    /// an integer `step` (a damaged last line, from a crash mid-write, is dropped instead).
    #[error("metrics: {}: line {line} is not a JSON object with a \"step\" field", path.display())]
    Corrupt { path: PathBuf, line: usize },
}

impl MetricsError {
    pub(super) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        MetricsError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}
