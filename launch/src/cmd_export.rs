use std::path::{Path, PathBuf};

use anyhow::bail;
use burn::tensor::Device;
use moeru_checkpoints::{
    export_hf, export_merged_hf, latest_valid_checkpoint, load_hf_model, verify_checkpoint,
};

use crate::adapters::{base_of, is_adapter, load_with_adapter};

#[derive(clap::Args)]
pub struct ExportArgs {
    /// Hugging Face model folder to read; with LoRA adapters, their base.
    #[arg(long, required_unless_present_any = ["checkpoint", "adapter"])]
    model: Option<PathBuf>,
    /// A training run folder (its newest valid checkpoint is used) or one step-NNNNNN folder.
    #[arg(long, conflicts_with = "adapter")]
    checkpoint: Option<PathBuf>,
    /// A PEFT LoRA adapter folder to merge into --model (or into its base_model_name_or_path).
    #[arg(long, requires = "merge_lora")]
    adapter: Option<PathBuf>,
    /// Fold LoRA adapters into their base weights (W + (alpha/r)·B·A) and write a plain
    /// Hugging Face folder.
    #[arg(long)]
    merge_lora: bool,
    /// New folder to write (must not exist or be empty).
    #[arg(long)]
    out: PathBuf,
    /// Largest shard in bytes; bigger models are split into model-0000x-of-0000N files.
    #[arg(long, default_value_t = 5_000_000_000)]
    max_shard_bytes: u64,
}

/// The checkpoint folder `ckpt` names: itself, or its run's newest valid one.
fn resolve_checkpoint(ckpt: PathBuf) -> anyhow::Result<PathBuf> {
    if ckpt.join("manifest.json").exists() {
        if let Err(reason) = verify_checkpoint(&ckpt) {
            bail!("{reason}");
        }
        return Ok(ckpt);
    }
    let latest = latest_valid_checkpoint(&ckpt)?;
    for reason in latest.skipped {
        eprintln!("warning: skipping checkpoint: {reason}");
    }
    match latest.found {
        Some((_, dir)) => Ok(dir),
        None => bail!(
            "{}: no valid checkpoint found (expected step-NNNNNN folders with a manifest.json)",
            ckpt.display()
        ),
    }
}

pub fn run(args: ExportArgs) -> anyhow::Result<()> {
    let checkpoint = args.checkpoint.map(resolve_checkpoint).transpose()?;
    let adapter = match (args.adapter, &checkpoint) {
        (Some(a), _) => Some(a),
        (None, Some(c)) if is_adapter(c) => Some(c.clone()),
        _ => None,
    };
    match (adapter, args.merge_lora) {
        (Some(adapter), true) => {
            let base = base_of(&adapter, args.model.as_deref())?;
            let model = load_with_adapter(&base, &adapter, &Device::flex())?;
            export_merged_hf(&model, &args.out, args.max_shard_bytes, Some(&base))?;
            eprintln!(
                "exported {} merged into {} to {}",
                adapter.display(),
                base.display(),
                args.out.display()
            );
        }
        (Some(adapter), false) => bail!(
            "{} holds LoRA adapters (PEFT's layout, loadable with PeftModel.from_pretrained); pass --merge-lora to fold them into the base and write a plain Hugging Face folder",
            adapter.display()
        ),
        (None, true) => bail!(
            "--merge-lora needs LoRA adapters: pass --adapter DIR with --model BASE, or --checkpoint with a LoRA run"
        ),
        (None, false) => {
            let source = match (checkpoint, args.model) {
                (Some(_), Some(m)) => bail!(
                    "--model {} and --checkpoint both name a model to export; pass one (--model goes with --checkpoint only as the base of LoRA adapters)",
                    m.display()
                ),
                (Some(c), None) => c,
                (None, Some(m)) => m,
                (None, None) => unreachable!("clap requires --model, --checkpoint or --adapter"),
            };
            export_plain(&source, &args.out, args.max_shard_bytes)?;
        }
    }
    Ok(())
}

fn export_plain(source: &Path, out: &Path, max_shard_bytes: u64) -> anyhow::Result<()> {
    let mut model = load_hf_model(source, &Device::flex())?;
    export_hf(&mut model, out, max_shard_bytes, Some(source))?;
    eprintln!("exported {} to {}", source.display(), out.display());
    Ok(())
}
