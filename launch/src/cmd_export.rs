use std::path::PathBuf;

use burn::tensor::Device;
use moeru_checkpoints::{export_hf, load_hf_model};

#[derive(clap::Args)]
pub struct ExportArgs {
    /// Hugging Face model folder to read.
    #[arg(long)]
    model: PathBuf,
    /// New folder to write (must not exist or be empty).
    #[arg(long)]
    out: PathBuf,
    /// Largest shard in bytes; bigger models are split into model-0000x-of-0000N files.
    #[arg(long, default_value_t = 5_000_000_000)]
    max_shard_bytes: u64,
}

pub fn run(args: ExportArgs) -> anyhow::Result<()> {
    let device = Device::flex();
    let mut model = load_hf_model(&args.model, &device)?;
    export_hf(
        &mut model,
        &args.out,
        args.max_shard_bytes,
        Some(&args.model),
    )?;
    eprintln!(
        "exported {} to {}",
        args.model.display(),
        args.out.display()
    );
    Ok(())
}
