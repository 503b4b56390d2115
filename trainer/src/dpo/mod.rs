//! DPO: preference pairs as micro-batches, the per-pair losses of TRL 1.16 (plus cDPO and
//! reference-free), the reference log-probs (live, from a frozen model or the base with
//! adapters off, or precomputed into the run folder), and the objective the engine steps.
//!
//! Owns: what a pair contributes to the loss and how its reference is scored. Must not: step
//! the optimizer, save checkpoints or log (the task loop `tasks::dpo` does).

pub mod batch;
pub mod loss;
pub mod objective;
pub mod precomputed;
pub mod reference;

pub use batch::{completion_tokens, pair_micro_batch, PairRows};
pub use loss::{dpo_loss, DpoLoss, DpoSettings, DPO_METRICS};
pub use moeru_data::pairs::PreferencePair;
pub use objective::DpoObjective;
pub use reference::Reference;
