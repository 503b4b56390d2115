//! `moeru generate`: token ids in, `sequences` out, laid out exactly as transformers'
//! `generate` returns them (oracle mode, `--input`); or text prompts in, completions out
//! (text mode, `--tokenizer` with `--prompt` / `--prompts`, see `generate_text.rs`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use moeru_checkpoints::{write_tensors, OwnedTensor, StopIds, TensorFile};
use moeru_models::generate::{GenerationConfig, Prompts};
use moeru_models::sampling::Sampling;
use moeru_models::{ForwardCtx, Qwen3Model};

use crate::adapters::load_model;
use crate::generate_watch::{load_decoder, Watch};

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// Hugging Face model folder, or a LoRA checkpoint / PEFT adapter folder (its base from
    /// adapter_config.json).
    #[arg(long)]
    pub(crate) model: PathBuf,
    /// A PEFT LoRA adapter folder (peft's or a moeru LoRA checkpoint), applied unmerged.
    #[arg(long)]
    pub(crate) adapter: Option<PathBuf>,
    /// Oracle mode: safetensors with `input_ids` and `attention_mask` (I64 or I32, [batch,
    /// seq]; left padding as transformers takes it, right padding accepted; no mask: all
    /// tokens real).
    #[arg(long)]
    pub(crate) input: Option<PathBuf>,
    /// Oracle mode: output safetensors, `sequences` I64 [batch, seq + steps]. Text mode:
    /// JSONL, one line per prompt (default: stdout).
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
    /// Text mode: a Hugging Face tokenizer.json (also needed for --stop in oracle mode).
    #[arg(long)]
    pub(crate) tokenizer: Option<PathBuf>,
    /// Text mode: a prompt (repeatable).
    #[arg(long)]
    pub(crate) prompt: Vec<String>,
    /// Text mode: JSONL of prompts, each line `{"prompt": "..."}` or `{"messages": [...]}`.
    #[arg(long)]
    pub(crate) prompts: Option<PathBuf>,
    /// Text mode: render each prompt with the Qwen3 chat template and the generation prompt
    /// (a plain prompt becomes one user message; `messages` lines always are rendered).
    #[arg(long)]
    pub(crate) chat: bool,
    /// With the chat template: `false` adds the empty think block (answer directly).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub(crate) enable_thinking: bool,
    /// Text mode: prompts per batch (default: all of them).
    #[arg(long)]
    pub(crate) batch_size: Option<usize>,
    /// A row stops once its decoded completion contains this (repeatable; needs --tokenizer).
    #[arg(long)]
    pub(crate) stop: Vec<String>,
    /// Print prefill and decode times and tokens/s to stderr, one JSON line per batch.
    #[arg(long)]
    pub(crate) timing: bool,
    #[arg(long)]
    pub(crate) max_new_tokens: usize,
    /// 0 (the default): greedy; above 0: sampling.
    #[arg(long, default_value_t = 0.0)]
    pub(crate) temperature: f64,
    /// Sampling: keep the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    pub(crate) top_k: usize,
    /// Sampling: keep the most likely tokens whose probability reaches p (1: all).
    #[arg(long, default_value_t = 1.0)]
    pub(crate) top_p: f64,
    /// Sampling: drop tokens below min-p times the most likely one's probability (0: none).
    #[arg(long, default_value_t = 0.0)]
    pub(crate) min_p: f64,
    /// Sampling: the seed; a prompt draws the same tokens in any batch.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Stop ids (repeatable), instead of the model's generation_config.json / config.json.
    #[arg(long = "eos-token-id")]
    pub(crate) eos_token_ids: Vec<i64>,
    /// What finished rows are padded with (default: the model's pad_token_id, else its first
    /// EOS id).
    #[arg(long)]
    pub(crate) pad_token_id: Option<i64>,
    #[command(flatten)]
    pub(crate) compute: crate::compute::ComputeArgs,
}

/// Which inputs the arguments name.
enum Mode {
    Oracle { input: PathBuf, out: PathBuf },
    Text,
}

/// The mode, or the one-line reason the arguments do not make one; checked before any
/// file is read.
fn mode(a: &GenerateArgs) -> anyhow::Result<Mode> {
    let text = !a.prompt.is_empty() || a.prompts.is_some();
    if !a.prompt.is_empty() && a.prompts.is_some() {
        bail!("--prompt and --prompts both given; put every prompt in the JSONL file, or pass them all as --prompt");
    }
    if !a.stop.is_empty() && a.tokenizer.is_none() {
        bail!("--stop needs --tokenizer: stop strings are matched on decoded text");
    }
    match (&a.input, text) {
        (Some(_), true) => bail!(
            "--input (token ids) and --prompt / --prompts (text) both given; use one of them"
        ),
        (None, false) => bail!(
            "nothing to generate from: give --input IN.safetensors, or --tokenizer with --prompt TEXT / --prompts FILE.jsonl"
        ),
        (Some(input), false) => {
            if a.chat {
                bail!("--chat renders text prompts; it does not apply to --input token ids");
            }
            let Some(out) = a.out.clone() else {
                bail!("--input needs --out OUT.safetensors for the generated `sequences`");
            };
            Ok(Mode::Oracle {
                input: input.clone(),
                out,
            })
        }
        (None, true) => {
            if a.tokenizer.is_none() {
                bail!("--prompt / --prompts need --tokenizer tokenizer.json to turn text into ids");
            }
            if a.batch_size == Some(0) {
                bail!("--batch-size 0: use at least 1 (default: all prompts in one batch)");
            }
            Ok(Mode::Text)
        }
    }
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let mode = mode(&args)?;
    let sampling = sampling(&args)?;
    if args.max_new_tokens == 0 {
        bail!("--max-new-tokens is 0; ask for at least one token");
    }
    let (input, out) = match mode {
        Mode::Text => return crate::generate_text::run(&args, sampling),
        Mode::Oracle { input, out } => (input, out),
    };
    let decoder = args.tokenizer.as_deref().map(load_decoder).transpose()?;
    let device = args.compute.open()?;
    let (model, base) = load_model(&args.model, args.adapter.as_deref(), &device)?;
    let prompts = read_prompts(&input, &model)?;
    let cfg = generation_config(&args, &base, sampling)?;
    let mut watch = Watch::new(decoder.as_ref(), &args.stop, false, prompts.batch);
    let ctx = ForwardCtx::new(args.compute.precision);
    let g = model.generate_with(&prompts, &cfg, &ctx, &mut watch);
    if args.timing {
        eprintln!("{}", watch.timing(&prompts));
    }
    let sequences = OwnedTensor::i64(&g.sequences, vec![g.batch, g.len]);
    write_tensors(&out, &[("sequences".into(), sequences)])
        .context("writing the generated sequences")?;
    Ok(())
}

/// Stop and pad ids (the flags, else the model folder's), the length and the sampling.
pub(crate) fn generation_config(
    args: &GenerateArgs,
    base: &Path,
    sampling: Option<Sampling>,
) -> anyhow::Result<GenerationConfig> {
    let stop = StopIds::read(base)?;
    let eos = match args.eos_token_ids.is_empty() {
        true => stop.eos,
        false => args.eos_token_ids.clone(),
    };
    let pad = (args.pad_token_id.or(stop.pad))
        .or(eos.first().copied())
        .unwrap_or(0);
    Ok(GenerationConfig {
        max_new_tokens: args.max_new_tokens,
        eos_token_ids: eos,
        pad_token_id: pad,
        sampling,
    })
}

/// The sampling settings, `None` for greedy; out-of-range values named with their fix.
fn sampling(a: &GenerateArgs) -> anyhow::Result<Option<Sampling>> {
    if !(a.temperature >= 0.0 && a.temperature.is_finite()) {
        bail!(
            "--temperature {}: use 0 for greedy or a positive value",
            a.temperature
        );
    }
    if !(a.top_p > 0.0 && a.top_p <= 1.0) {
        bail!(
            "--top-p {}: use a value in (0, 1] (1 keeps every token)",
            a.top_p
        );
    }
    if !(0.0..=1.0).contains(&a.min_p) {
        bail!(
            "--min-p {}: use a value in [0, 1] (0 keeps every token)",
            a.min_p
        );
    }
    Ok((a.temperature > 0.0).then_some(Sampling {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        seed: a.seed,
    }))
}

/// `input_ids` and `attention_mask` of `path`, checked against the model's vocabulary.
fn read_prompts(path: &Path, model: &Qwen3Model) -> anyhow::Result<Prompts> {
    let file = TensorFile::open(path)?;
    let shown = path.display();
    let has = |n: &str| file.shapes().iter().any(|(name, _)| name == n);
    if !has("input_ids") {
        bail!(
            "{shown}: no tensor `input_ids`; write the prompts as I64 [batch, seq] under that name"
        );
    }
    let (ids, shape) = file.i64("input_ids")?;
    let &[batch, seq] = shape.as_slice() else {
        bail!("{shown}: `input_ids` has shape {shape:?}; expected [batch, seq]");
    };
    let mask = match has("attention_mask") {
        true => {
            let (mask, mask_shape) = file.i64("attention_mask")?;
            if mask_shape != shape {
                bail!("{shown}: `attention_mask` has shape {mask_shape:?}, `input_ids` {shape:?}; they must match");
            }
            mask
        }
        false => vec![1; ids.len()],
    };
    if let Some(i) = mask.iter().position(|&m| m != 0 && m != 1) {
        bail!(
            "{shown}: `attention_mask` element {i} is {}; use 1 for a token, 0 for padding",
            mask[i]
        );
    }
    let vocab = model.config.vocab_size as i64;
    if let Some(i) = (0..ids.len()).find(|&i| mask[i] == 1 && !(0..vocab).contains(&ids[i])) {
        bail!(
            "{shown}: `input_ids` element {i} is {}, outside the model's vocabulary 0..{vocab}",
            ids[i]
        );
    }
    for r in 0..batch {
        let row = &mask[r * seq..(r + 1) * seq];
        let real: Vec<usize> = (0..seq).filter(|&i| row[i] == 1).collect();
        let contiguous = real.windows(2).all(|w| w[1] == w[0] + 1);
        if real.is_empty() || !contiguous {
            bail!("{shown}: row {r} of `attention_mask` is {row:?}; each row needs its tokens in one run, padded on the left or the right");
        }
    }
    Ok(Prompts {
        ids,
        mask,
        batch,
        seq,
    })
}
