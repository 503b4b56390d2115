//! `moeru data …` subcommands (clap definitions live here; the binary only wires them in).

use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::error::{DataError, Result};
use crate::input::{InputSpec, PreferenceSpec};
use crate::loader::{DataLoader, LoaderConfig};
use crate::manifest::Manifest;
use crate::pairs::{PairLoader, PairLoaderConfig, PREFERENCE_MODE};
use crate::prepare::{prepare, PrepareOptions};
use crate::sample::PackMode;
use crate::shard_writer::ShardLayout;

#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Tokenize JSONL / Parquet / text inputs into Parquet token shards with a manifest.
    Prepare(Box<PrepareArgs>),
    /// Check a prepared dataset (manifest, sha256 of every shard) and print packed samples
    /// (preference pairs for a `--preference` dataset).
    Inspect(InspectArgs),
}

#[derive(Debug, Args)]
pub struct PrepareArgs {
    /// Hugging Face tokenizer.json.
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// Input files or directories (.jsonl/.json, .parquet, anything else is plain text).
    #[arg(long, num_args = 1.., required = true)]
    pub input: Vec<PathBuf>,
    /// Output directory (must not exist or be empty).
    #[arg(long)]
    pub output: PathBuf,
    /// Chat mode: render `messages` with the Qwen3 template and mask all but assistant turns.
    #[arg(long)]
    pub chat: bool,
    /// Preference (DPO) mode: tokenize prompt / chosen / rejected as TRL's DPOTrainer does and
    /// store one document per pair (plain strings or conversational message lists).
    #[arg(long, conflicts_with_all = ["chat", "ids_field"])]
    pub preference: bool,
    /// Field holding the prompt (preference mode).
    #[arg(long, default_value = "prompt")]
    pub prompt_field: String,
    /// Field holding the chosen completion (preference mode).
    #[arg(long, default_value = "chosen")]
    pub chosen_field: String,
    /// Field holding the rejected completion (preference mode).
    #[arg(long, default_value = "rejected")]
    pub rejected_field: String,
    /// Preference mode: fail on a prompt of this many tokens or more (the training seq_len).
    #[arg(long, requires = "preference")]
    pub seq_len: Option<usize>,
    /// Field holding the document text (pretraining mode).
    #[arg(long, default_value = "text")]
    pub text_field: String,
    /// Field holding the OpenAI-style messages (chat mode).
    #[arg(long, default_value = "messages")]
    pub messages_field: String,
    /// Read pre-tokenized ids from this field instead of tokenizing text.
    #[arg(long)]
    pub ids_field: Option<String>,
    /// Start a new shard after this many tokens.
    #[arg(long, default_value_t = 256 << 20)]
    pub shard_tokens: u64,
    /// Close a Parquet row group after this many tokens (the loader's read unit).
    #[arg(long, default_value_t = 1 << 20)]
    pub row_group_tokens: u64,
    /// Token appended to every pretraining document (and to plain preference completions).
    #[arg(long, default_value = "<|endoftext|>")]
    pub eos_token: String,
    /// Do not draw a progress bar.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A prepared dataset directory.
    pub dir: PathBuf,
    /// Print this many packed samples (token ids, masks, positions), or preference pairs.
    #[arg(long, default_value_t = 0)]
    pub samples: usize,
    #[arg(long, default_value_t = 4096)]
    pub seq_len: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Pad instead of pack.
    #[arg(long)]
    pub pad: bool,
}

impl PrepareArgs {
    pub fn options(&self) -> PrepareOptions {
        PrepareOptions {
            tokenizer: self.tokenizer.clone(),
            inputs: self.input.clone(),
            output: self.output.clone(),
            spec: InputSpec {
                chat: self.chat,
                text_field: self.text_field.clone(),
                messages_field: self.messages_field.clone(),
                ids_field: self.ids_field.clone(),
                preference: self.preference.then(|| PreferenceSpec {
                    prompt_field: self.prompt_field.clone(),
                    chosen_field: self.chosen_field.clone(),
                    rejected_field: self.rejected_field.clone(),
                    seq_len: self.seq_len,
                }),
            },
            layout: ShardLayout {
                shard_tokens: self.shard_tokens,
                row_group_tokens: self.row_group_tokens,
                ..ShardLayout::default()
            },
            eos_token: self.eos_token.clone(),
            progress: !self.quiet,
        }
    }
}

/// Run one `moeru data` subcommand, printing its report to stdout.
pub fn run_data_command(cmd: DataCommand) -> Result<(), DataError> {
    match cmd {
        DataCommand::Prepare(args) => {
            let report = prepare(&args.options())?;
            println!("{}", report.summary());
            Ok(())
        }
        DataCommand::Inspect(args) => inspect(&args),
    }
}

fn inspect(args: &InspectArgs) -> Result<()> {
    let m = Manifest::read(&args.dir)?;
    for s in &m.shards {
        let path = args.dir.join(&s.file);
        let sha = crate::fsutil::sha256_file(&path)?;
        if sha != s.sha256 {
            return Err(DataError::Manifest {
                path,
                msg: format!("sha256 is {sha} but the manifest says {}; the shard is corrupt, re-run prepare", s.sha256),
            });
        }
    }
    println!(
        "{}: {} {} documents, {} tokens ({} with loss), {} shard(s), tokenizer sha256 {} (vocab {}); all shard checksums OK",
        args.dir.display(),
        m.mode,
        m.documents,
        m.tokens,
        m.loss_tokens,
        m.shards.len(),
        m.tokenizer.sha256,
        m.tokenizer.vocab_size
    );
    if args.samples > 0 && m.mode == PREFERENCE_MODE {
        return print_pairs(args);
    }
    if args.samples > 0 {
        let mut cfg = LoaderConfig::new(&args.dir, args.seq_len, 1, args.seed);
        cfg.mode = if args.pad {
            PackMode::Pad
        } else {
            PackMode::Pack
        };
        let mut loader = DataLoader::new(cfg)?;
        for i in 0..args.samples {
            let Some(batch) = loader.next_batch()? else {
                break;
            };
            for s in batch {
                let json = serde_json::to_string(&s).unwrap_or_default();
                println!("sample {i}: {json}");
            }
        }
    }
    Ok(())
}

/// `inspect --samples N` on a preference dataset: the first N pairs of the shuffled stream.
fn print_pairs(args: &InspectArgs) -> Result<()> {
    let mut cfg = PairLoaderConfig::new(&args.dir, args.seq_len, 1, args.seed);
    cfg.epochs = Some(1);
    let mut loader = PairLoader::new(cfg)?;
    for i in 0..args.samples {
        let Some(batch) = loader.next_batch()? else {
            break;
        };
        for p in batch {
            let json = serde_json::to_string(&p).unwrap_or_default();
            println!("pair {i}: {json}");
        }
    }
    Ok(())
}
