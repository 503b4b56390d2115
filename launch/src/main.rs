//! `moeru`: one binary for training, post-training and running Qwen3 / Qwen3-MoE models.

mod adapters;
mod allocator;
mod cmd_bench;
mod cmd_eval;
mod cmd_export;
mod cmd_forward;
mod cmd_generate;
mod cmd_launch;
mod cmd_train;
mod compute;
mod generate_text;
mod generate_watch;
mod ranks;

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
    /// Train or fine-tune from a YAML recipe (resumes from its newest valid checkpoint).
    Train(cmd_train::TrainArgs),
    /// Run a recipe on N ranks per node (threads, or processes), stop all when one fails,
    /// optionally restart from the newest checkpoint.
    Launch(cmd_launch::LaunchArgs),
    /// Mean loss and perplexity of a model over a prepared dataset.
    Eval(cmd_eval::EvalArgs),
    /// Run a model folder on token ids and write logits and loss (parity checks, debugging).
    Forward(cmd_forward::ForwardArgs),
    /// Continue prompts (token ids in a safetensors file) greedily or by seeded sampling, as
    /// transformers' `generate`, with an optional LoRA adapter.
    Generate(Box<cmd_generate::GenerateArgs>),
    /// Write a Hugging Face folder from a model folder or a training checkpoint (with
    /// --merge-lora: LoRA adapters folded into their base).
    Export(cmd_export::ExportArgs),
    /// Training throughput, model TFLOP/s, MFU and peak memory of a model shape on random
    /// tokens (bench/shapes.json).
    Bench(cmd_bench::BenchArgs),
    /// Prepare and inspect token datasets.
    #[command(subcommand)]
    Data(moeru_data::cli::DataCommand),
}

fn main() -> ExitCode {
    allocator::keep_freed_memory();
    let cli = Cli::parse();
    allocator::on_compute_pool(|| run(cli))
}

fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Train(args) => match cmd_train::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e, e.exit_code()),
        },
        Command::Launch(args) => match cmd_launch::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e, e.exit_code()),
        },
        Command::Eval(args) => report(cmd_eval::run(args)),
        Command::Forward(args) => report(cmd_forward::run(args)),
        Command::Generate(args) => report(cmd_generate::run(*args)),
        Command::Export(args) => report(cmd_export::run(args)),
        Command::Bench(args) => report(cmd_bench::run(args)),
        Command::Data(cmd) => report(moeru_data::cli::run_data_command(cmd).map_err(Into::into)),
    }
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // `{:#}` joins the chain of causes on one line.
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// One line, no backtrace.
fn fail(e: &dyn std::fmt::Display, code: u8) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(code)
}
