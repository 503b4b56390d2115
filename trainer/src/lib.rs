//! Training: recipes, the pretrain / SFT loop, AdamW, schedules, clipping, checkpoints and
//! resume, metrics and evaluation. Model math lives in `moeru-models`; files in
//! `moeru-checkpoints`; data in `moeru-data`.

pub mod checkpoint;
pub mod data_parallel;
pub mod error;
pub mod eval;
pub mod grads;
pub mod layout;
pub mod metrics;
pub mod optim;
pub mod rank_threads;
pub mod recipe;
pub mod run;
pub mod schedule;
pub mod step;

pub use error::TrainError;
pub use rank_threads::run_threads;
pub use run::{run_rank, run_training, Fault, FaultKind, RunOptions, RunSummary};
