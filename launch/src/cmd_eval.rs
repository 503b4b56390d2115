use std::path::PathBuf;

use burn::tensor::Device;
use moeru_checkpoints::load_hf_model;
use moeru_trainer::eval::evaluate;

#[derive(clap::Args)]
pub struct EvalArgs {
    /// Hugging Face model folder or a moeru checkpoint (step-NNNNNN folder).
    #[arg(long)]
    model: PathBuf,
    /// A folder written by `moeru data prepare`.
    #[arg(long)]
    data: PathBuf,
    #[arg(long, default_value_t = 2048)]
    seq_len: usize,
    #[arg(long, default_value_t = 1)]
    micro_batch_size: usize,
    /// Stop after this many micro-batches (0 = the whole dataset).
    #[arg(long, default_value_t = 0)]
    max_batches: u64,
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    let model = load_hf_model(&args.model, &Device::flex())?;
    let r = evaluate(
        &model,
        &args.data,
        args.seq_len,
        args.micro_batch_size,
        args.max_batches,
    )?;
    println!(
        "loss {:.6}  perplexity {:.4}  ({} target tokens)",
        r.loss, r.perplexity, r.target_tokens
    );
    Ok(())
}
