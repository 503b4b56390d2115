use std::path::PathBuf;

use moeru_trainer::eval::evaluate;

use crate::adapters::load_model;

#[derive(clap::Args)]
pub struct EvalArgs {
    /// Hugging Face model folder or a moeru checkpoint (step-NNNNNN folder); a LoRA
    /// checkpoint is evaluated on its base (from its adapter_config.json).
    #[arg(long)]
    model: PathBuf,
    /// A PEFT LoRA adapter folder (peft's or moeru's) to evaluate on top of --model.
    #[arg(long)]
    adapter: Option<PathBuf>,
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
    #[command(flatten)]
    compute: crate::compute::ComputeArgs,
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    let device = args.compute.open()?;
    let (model, _) = load_model(&args.model, args.adapter.as_deref(), &device)?;
    let r = evaluate(
        &model,
        args.compute.precision,
        &args.data,
        args.seq_len,
        args.micro_batch_size,
        args.max_batches,
        None,
    )?;
    println!(
        "loss {:.6}  perplexity {:.4}  ({} target tokens)",
        r.loss, r.perplexity, r.target_tokens
    );
    Ok(())
}
