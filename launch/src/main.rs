//! `moeru`: one binary for training, post-training and running Qwen3 / Qwen3-MoE models.

mod cmd_export;
mod cmd_forward;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "moeru",
    version,
    about = "Train and post-train Qwen3 / Qwen3-MoE models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a model folder on token ids and write logits and loss (parity checks, debugging).
    Forward(cmd_forward::ForwardArgs),
    /// Load a model folder and write it back as a Hugging Face folder.
    Export(cmd_export::ExportArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Forward(args) => cmd_forward::run(args),
        Command::Export(args) => cmd_export::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line: the chain of causes, no backtrace.
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
