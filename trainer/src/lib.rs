//! Training: recipes, the session (setup), the engine (model, optimizer, gradient sync, one
//! step), objectives, the task loops, schedules, checkpoints and resume, metrics and
//! evaluation. Model math lives in `moeru-models`; files in `moeru-checkpoints`; data in
//! `moeru-data`; communication in `moeru-parallel`.

pub mod bench;
pub mod checkpoint;
pub mod checkpoint_sharded;
pub mod checkpoint_writer;
pub mod dpo;
pub mod engine;
pub mod error;
pub mod eval;
pub mod fault;
pub mod grpo;
pub mod lora;
pub mod metrics;
pub mod objective;
pub mod parallel_sizes;
pub mod pipeline;
pub mod rank_threads;
pub mod recipe;
pub mod run;
pub mod schedule;
pub mod session;
pub mod tasks;

pub use error::TrainError;
pub use fault::{Fault, FaultKind, FaultPoint};
pub use rank_threads::{run_threads, run_threads_summaries};
pub use run::{run_rank, run_training, RunOptions, RunSummary};
