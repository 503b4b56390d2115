use std::path::PathBuf;

use anyhow::bail;
use burn::tensor::Device;
use moeru_checkpoints::{export_hf, latest_valid_checkpoint, load_hf_model, verify_checkpoint};

#[derive(clap::Args)]
pub struct ExportArgs {
    /// Hugging Face model folder to read.
    #[arg(
        long,
        conflicts_with = "checkpoint",
        required_unless_present = "checkpoint"
    )]
    model: Option<PathBuf>,
    /// A training run folder (its newest valid checkpoint is used) or one step-NNNNNN folder.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// New folder to write (must not exist or be empty).
    #[arg(long)]
    out: PathBuf,
    /// Largest shard in bytes; bigger models are split into model-0000x-of-0000N files.
    #[arg(long, default_value_t = 5_000_000_000)]
    max_shard_bytes: u64,
}

pub fn run(args: ExportArgs) -> anyhow::Result<()> {
    let source = match (args.model, args.checkpoint) {
        (Some(model), _) => model,
        (None, Some(ckpt)) if ckpt.join("manifest.json").exists() => {
            if let Err(reason) = verify_checkpoint(&ckpt) {
                bail!("{reason}");
            }
            ckpt
        }
        (None, Some(run)) => {
            let latest = latest_valid_checkpoint(&run)?;
            for reason in latest.skipped {
                eprintln!("warning: skipping checkpoint: {reason}");
            }
            match latest.found {
                Some((_, dir)) => dir,
                None => bail!("{}: no valid checkpoint found (expected step-NNNNNN folders with a manifest.json)", run.display()),
            }
        }
        (None, None) => unreachable!("clap requires --model or --checkpoint"),
    };
    let mut model = load_hf_model(&source, &Device::flex())?;
    export_hf(&mut model, &args.out, args.max_shard_bytes, Some(&source))?;
    eprintln!("exported {} to {}", source.display(), args.out.display());
    Ok(())
}
