//! Loading a base model with a PEFT LoRA adapter for `moeru eval` and `moeru export`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use burn::tensor::Device;
use moeru_checkpoints::peft_config::ADAPTER_CONFIG;
use moeru_checkpoints::{load_hf_model, load_peft_adapter, PeftAdapterConfig};
use moeru_models::Qwen3Model;

/// Whether `dir` is a PEFT adapter folder (a LoRA checkpoint is one).
pub fn is_adapter(dir: &Path) -> bool {
    dir.join(ADAPTER_CONFIG).is_file()
}

/// The base of `adapter`: `base` when given, else the adapter's `base_model_name_or_path`
/// when that is a folder here.
pub fn base_of(adapter: &Path, base: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(b) = base {
        return Ok(b.to_path_buf());
    }
    let cfg = PeftAdapterConfig::read(adapter)?;
    match cfg.base_model_name_or_path {
        Some(p) if Path::new(&p).is_dir() => Ok(PathBuf::from(p)),
        Some(p) => bail!(
            "{}: base_model_name_or_path {p:?} is not a folder on this machine; pass the base model's Hugging Face folder with --model",
            cfg.file.display()
        ),
        None => bail!(
            "{}: no base_model_name_or_path; pass the base model's Hugging Face folder with --model",
            cfg.file.display()
        ),
    }
}

/// The base model at `base` with the adapter of folder `adapter` attached.
pub fn load_with_adapter(
    base: &Path,
    adapter: &Path,
    device: &Device,
) -> anyhow::Result<Qwen3Model> {
    let mut model = load_hf_model(base, device)?;
    load_peft_adapter(adapter, &mut model).with_context(|| {
        format!(
            "loading adapter {} onto base {}",
            adapter.display(),
            base.display()
        )
    })?;
    Ok(model)
}

/// The model a command runs: `model` with `adapter` attached, or, when `model` is itself an
/// adapter folder (a LoRA checkpoint), that adapter on its base; with the base model folder.
pub fn load_model(
    model: &Path,
    adapter: Option<&Path>,
    device: &Device,
) -> anyhow::Result<(Qwen3Model, PathBuf)> {
    Ok(match adapter {
        Some(adapter) => (load_with_adapter(model, adapter, device)?, model.into()),
        None if is_adapter(model) => {
            let base = base_of(model, None)?;
            (load_with_adapter(&base, model, device)?, base)
        }
        None => (load_hf_model(model, device)?, model.into()),
    })
}
