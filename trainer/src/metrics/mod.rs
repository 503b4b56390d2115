//! Training metrics: `metrics.jsonl`, TensorBoard event files and console progress.
//!
//! Depends only on serde_json, thiserror and indicatif, and uses no `crate::` paths, so it
//! builds both inside `moeru-trainer` and standalone.

mod crc;
mod error;
mod jsonl;
mod progress;
mod record;
mod sink;
mod tfevents;

#[cfg(test)]
mod tests;

pub use crc::{crc32c, masked_crc32c};
pub use error::MetricsError;
pub use jsonl::{read_metrics, METRICS_FILE};
pub use record::{CommBytes, LayerLoad, StepMetrics};
pub use sink::MetricsSink;
