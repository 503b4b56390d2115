use std::path::PathBuf;

use anyhow::{bail, Context};
use moeru_checkpoints::{load_hf_model, write_tensors, OwnedTensor, TensorFile};
use moeru_models::params::to_f32_vec;
use moeru_models::{Batch, ForwardCtx};

#[derive(clap::Args)]
pub struct ForwardArgs {
    /// Hugging Face model folder (config.json + safetensors).
    #[arg(long)]
    model: PathBuf,
    /// safetensors file with `input_ids` (I64 or I32, [batch, seq]).
    #[arg(long)]
    input: PathBuf,
    /// Output safetensors: `logits` [batch, seq, vocab], `loss` [1], and for MoE `aux_loss` [1].
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    compute: crate::compute::ComputeArgs,
}

pub fn run(args: ForwardArgs) -> anyhow::Result<()> {
    let device = args.compute.open()?;
    let model = load_hf_model(&args.model, &device)?;
    let ctx = ForwardCtx::new(args.compute.precision);
    let input = TensorFile::open(&args.input)?;
    let in_path = args.input.display();
    if !input.shapes().iter().any(|(n, _)| n == "input_ids") {
        bail!("{in_path}: no tensor `input_ids`; write the token ids as I64 [batch, seq] under that name");
    }
    let (ids, shape) = input.i64("input_ids")?;
    let &[batch, seq] = shape.as_slice() else {
        bail!("{in_path}: `input_ids` has shape {shape:?}; expected [batch, seq]");
    };
    if batch == 0 || seq < 2 {
        bail!("{in_path}: `input_ids` has shape {shape:?}; the loss needs batch >= 1 and seq >= 2");
    }
    let vocab = model.config.vocab_size;
    if let Some((i, id)) = ids
        .iter()
        .enumerate()
        .find(|(_, &id)| id < 0 || id as usize >= vocab)
    {
        bail!(
            "{in_path}: `input_ids` element {i} is {id}, outside the model's vocabulary 0..{vocab}"
        );
    }

    let batch_in = Batch::from_ids(&ids, batch, seq, &device);
    let output = model.forward(&batch_in, &ctx);
    let loss = model.lm_loss(&batch_in, output.hidden.clone(), &ctx);
    let logits = model.logits(output.hidden, &ctx);
    let mut tensors = vec![
        (
            "logits".to_string(),
            OwnedTensor::f32(&to_f32_vec(logits), vec![batch, seq, vocab]),
        ),
        (
            "loss".to_string(),
            OwnedTensor::f32(&to_f32_vec(loss), vec![1]),
        ),
    ];
    if let Some(aux) = output.aux_loss {
        tensors.push((
            "aux_loss".to_string(),
            OwnedTensor::f32(&to_f32_vec(aux), vec![1]),
        ));
    }
    write_tensors(&args.out, &tensors).context("writing the forward output")?;
    Ok(())
}
