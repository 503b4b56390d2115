//! Training: recipes, the pretrain / SFT loop, AdamW, schedules, clipping, checkpoints and
//! resume, metrics and evaluation. Model math lives in `moeru-models`; files in
//! `moeru-checkpoints`; data in `moeru-data`.

pub mod bench;
pub mod checkpoint;
pub mod data_parallel;
pub mod error;
pub mod eval;
pub mod fault;
pub mod grads;
pub mod layout;
pub mod lora;
pub mod metrics;
pub mod optim;
pub mod rank_threads;
pub mod recipe;
pub mod run;
pub mod schedule;
pub mod step;

pub use error::TrainError;
pub use fault::{Fault, FaultKind};
pub use rank_threads::run_threads;
pub use run::{run_rank, run_training, RunOptions, RunSummary};
