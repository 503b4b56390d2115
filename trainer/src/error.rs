use moeru_checkpoints::CheckpointError;
use moeru_data::DataError;
use moeru_models::ConfigError;

use crate::metrics::MetricsError;
use crate::recipe::RecipeError;

/// Why a run could not start or continue; reported once by the CLI as one line.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Recipe(#[from] RecipeError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// A recipe that parses but cannot run as asked (layout, precision, model section).
    #[error("recipe {0}")]
    BadRecipe(String),
    /// A checkpoint folder that cannot continue this run (LoRA vs full weights, another
    /// base, `--resume` without a checkpoint); the message names the folder and the fix.
    #[error("{0}")]
    Resume(String),
    /// A dataset that cannot serve this run (vocabulary, task, too few samples); the message
    /// names the dataset folder and the fix.
    #[error("{0}")]
    Dataset(String),
    /// Another rank failed, or a rank could not start or report (threads, processes).
    #[error("{0}")]
    Rank(String),
    /// A reward function failed (a `command` that failed, hung or wrote malformed scores);
    /// the step is not taken and the last checkpoint stays as it was.
    #[error("{0}")]
    Reward(String),
    /// A checkpoint could not be written (full disk, lost mount); the message says the partial
    /// files are gone and which checkpoint a resume uses.
    #[error("{0}")]
    Save(String),
    /// An invariant of moeru itself broke; the message asks for a report.
    #[error("{0}")]
    Bug(String),
    /// The run cannot start as the command line, the launcher's environment or the machine
    /// stands (launch flags, RANK/MASTER_ADDR, a device this machine lacks); not the recipe's
    /// fault, so no "recipe" prefix. The message names the flag, variable or device and the fix.
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Comm(#[from] moeru_parallel::CommError),
    #[error(transparent)]
    Peft(#[from] moeru_checkpoints::PeftError),
    /// LoRA targets the model cannot take (the message names `lora.target_modules`).
    #[error("recipe {0}")]
    Lora(#[from] moeru_models::LoraError),
}

impl TrainError {
    /// 2 for a bad recipe or command line (a device this machine lacks included), 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            TrainError::Recipe(e) => e.exit_code(),
            TrainError::BadRecipe(_) | TrainError::Lora(_) | TrainError::Setup(_) => 2,
            _ => 1,
        }
    }
}
