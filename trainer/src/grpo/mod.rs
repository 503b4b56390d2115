//! GRPO: rollouts generated on the training ranks, scored by reward functions, turned into
//! group-normalised advantages, and trained with TRL 1.16's clipped objective.
//!
//! Owns: the loss, the advantages, the rewards, rollouts as micro-batches, and the objective
//! the engine steps. Must not: step the optimizer, save checkpoints or log (the task loop
//! `tasks::grpo` does).

pub mod advantage;
pub mod global;
pub mod loss;
pub mod objective;
pub mod reward;
pub mod rollout;

pub use advantage::{advantages, combine, Advantages};
pub use loss::{aggregate, token_loss, GrpoLossSettings, Normaliser, TokenLoss};
pub use objective::GrpoObjective;
pub use rollout::RolloutRows;
