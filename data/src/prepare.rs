//! `moeru data prepare`: read inputs, tokenize (pretraining text + EOS, chat with the Qwen3
//! template and an assistant loss mask, or preference pairs as TRL does: `preference.rs`), and
//! write Parquet shards plus `manifest.json` into a staging folder that is renamed onto the
//! output only when everything succeeded.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::chat::{self, ChatError};
use crate::error::{DataError, Location, Result};
use crate::fsutil::StagingDir;
use crate::input::{expand_inputs, Content, InputSpec, Record, RecordReader};
use crate::manifest::{Manifest, TokenizerInfo, FORMAT};
use crate::preference;
use crate::shard_writer::{ShardLayout, ShardWriter};
use crate::tokenizer::TextTokenizer;

/// Everything `prepare` needs.
#[derive(Debug, Clone)]
pub struct PrepareOptions {
    pub tokenizer: PathBuf,
    pub inputs: Vec<PathBuf>,
    pub output: PathBuf,
    pub spec: InputSpec,
    pub layout: ShardLayout,
    /// Appended to each pretraining document (not in chat mode, not to pre-tokenized ids), and
    /// to plain chosen / rejected completions in preference mode.
    pub eos_token: String,
    /// Draw a progress bar on stderr (it is hidden anyway when stderr is not a terminal).
    pub progress: bool,
}

/// What `prepare` did.
#[derive(Debug, Clone)]
pub struct PrepareReport {
    pub manifest: Manifest,
    pub output: PathBuf,
    pub skipped_empty: u64,
    pub input_bytes: u64,
    pub seconds: f64,
}

impl PrepareReport {
    /// One-line summary with throughput.
    pub fn summary(&self) -> String {
        let m = &self.manifest;
        let s = self.seconds.max(1e-9);
        format!(
            "prepared {} documents, {} tokens ({} with loss) into {} shard(s) at {} in {:.2}s: \
             {:.0} tokens/s, {:.1} MB/s of input{}",
            m.documents,
            m.tokens,
            m.loss_tokens,
            m.shards.len(),
            self.output.display(),
            self.seconds,
            m.tokens as f64 / s,
            self.input_bytes as f64 / s / 1e6,
            if self.skipped_empty > 0 {
                format!(" ({} empty documents skipped)", self.skipped_empty)
            } else {
                String::new()
            },
        )
    }
}

const CHUNK: usize = 512;

struct Totals {
    documents: u64,
    tokens: u64,
    loss_tokens: u64,
    skipped: u64,
}

/// Run `prepare`. On error nothing is left in (or next to) `output`.
pub fn prepare(opts: &PrepareOptions) -> Result<PrepareReport> {
    let start = Instant::now();
    let tok = TextTokenizer::from_file(&opts.tokenizer)?;
    let files = expand_inputs(&opts.inputs)?;
    let preference = opts.spec.preference.is_some();
    let eos = if !preference && (opts.spec.chat || opts.spec.ids_field.is_some()) {
        None
    } else {
        Some(tok.token_id(&opts.eos_token).ok_or_else(|| {
            DataError::Config(format!(
                "{}: the tokenizer has no token {:?}; pass --eos-token with one it has",
                opts.tokenizer.display(),
                opts.eos_token
            ))
        })?)
    };
    let input_bytes: u64 = files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum();
    let staging = StagingDir::new(&opts.output)?;
    let mut writer = ShardWriter::new(staging.path(), opts.layout)?;
    let bar = progress_bar(opts.progress, files.len() as u64);
    let ctx = Ctx {
        tok: &tok,
        spec: &opts.spec,
        eos,
        eos_text: &opts.eos_token,
    };
    let mut totals = Totals {
        documents: 0,
        tokens: 0,
        loss_tokens: 0,
        skipped: 0,
    };
    for file in &files {
        let mut rows = 0u64;
        let mut chunk: Vec<Record> = Vec::with_capacity(CHUNK);
        for rec in RecordReader::open(file, &opts.spec)? {
            chunk.push(rec?);
            rows += 1;
            if chunk.len() == CHUNK {
                process_chunk(&ctx, file, &mut chunk, &mut writer, &mut totals)?;
                bar.set_message(format!(
                    "{} docs, {} tokens",
                    totals.documents, totals.tokens
                ));
            }
        }
        process_chunk(&ctx, file, &mut chunk, &mut writer, &mut totals)?;
        if rows == 0 {
            return Err(DataError::EmptyInput(file.clone()));
        }
        bar.inc(1);
    }
    let shards = writer.finish()?;
    bar.finish_and_clear();
    if totals.documents == 0 {
        return Err(DataError::EmptyInput(files[0].clone()));
    }
    let manifest = Manifest {
        format: FORMAT.into(),
        created_by: format!("moeru-data {}", env!("CARGO_PKG_VERSION")),
        mode: if preference {
            crate::pairs::PREFERENCE_MODE
        } else if opts.spec.chat {
            "chat"
        } else {
            "pretrain"
        }
        .into(),
        documents: totals.documents,
        tokens: totals.tokens,
        loss_tokens: totals.loss_tokens,
        tokenizer: TokenizerInfo {
            path: opts.tokenizer.display().to_string(),
            sha256: tok.sha256().to_string(),
            vocab_size: tok.vocab_size() as u64,
            eos_id: eos,
        },
        inputs: files.iter().map(|f| f.display().to_string()).collect(),
        shards,
    };
    manifest.write(staging.path())?;
    staging.commit()?;
    Ok(PrepareReport {
        manifest,
        output: opts.output.clone(),
        skipped_empty: totals.skipped,
        input_bytes,
        seconds: start.elapsed().as_secs_f64(),
    })
}

fn progress_bar(enabled: bool, files: u64) -> indicatif::ProgressBar {
    if !enabled {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(files);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] files {pos}/{len} {wide_bar} {msg}",
    ) {
        bar.set_style(style);
    }
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}

/// A document ready for the writer, or a reason to skip.
struct Doc {
    ids: Vec<i32>,
    mask: Vec<u8>,
}

/// What every chunk is tokenized with.
struct Ctx<'a> {
    tok: &'a TextTokenizer,
    spec: &'a InputSpec,
    /// The EOS id (pretraining, preference) and its text (appended to plain completions).
    eos: Option<u32>,
    eos_text: &'a str,
}

fn process_chunk(
    ctx: &Ctx,
    file: &Path,
    chunk: &mut Vec<Record>,
    writer: &mut ShardWriter,
    totals: &mut Totals,
) -> Result<()> {
    let records = std::mem::take(chunk);
    let docs: Vec<Option<Doc>> = match &ctx.spec.preference {
        Some(p) => preference::tokenize_pairs(ctx.tok, file, p, ctx.eos_text, &records)?
            .into_iter()
            .map(|d| {
                Some(Doc {
                    ids: d.ids,
                    mask: d.mask,
                })
            })
            .collect(),
        None => tokenize_records(ctx.tok, file, ctx.spec, ctx.eos, &records)?,
    };
    for doc in docs.into_iter() {
        match doc {
            None => totals.skipped += 1,
            Some(d) => {
                totals.documents += 1;
                totals.tokens += d.ids.len() as u64;
                // chat / pretraining masks are 0/1; preference part codes count chosen+rejected
                totals.loss_tokens += d.mask.iter().filter(|&&m| m != 0).count() as u64;
                writer.push(&d.ids, &d.mask)?;
            }
        }
    }
    Ok(())
}

fn tokenize_records(
    tok: &TextTokenizer,
    file: &Path,
    spec: &InputSpec,
    eos: Option<u32>,
    records: &[Record],
) -> Result<Vec<Option<Doc>>> {
    let mut texts: Vec<String> = Vec::with_capacity(records.len());
    let mut spans: Vec<Option<chat::RenderedChat>> = Vec::with_capacity(records.len());
    let mut out: Vec<Option<Doc>> = Vec::with_capacity(records.len());
    let vocab = tok.vocab_size();
    for rec in records {
        match &rec.content {
            Content::Ids(ids) => {
                let mut v = Vec::with_capacity(ids.len());
                for &id in ids {
                    if id < 0 || id as u64 >= vocab as u64 {
                        return Err(DataError::TokenOutOfVocab {
                            loc: Location::field(file, rec.row, spec.field()),
                            id,
                            vocab_size: vocab,
                        });
                    }
                    v.push(id as i32);
                }
                out.push((!v.is_empty()).then(|| Doc {
                    mask: vec![1; v.len()],
                    ids: v,
                }));
            }
            Content::Text(t) => {
                out.push(None);
                texts.push(t.clone());
                spans.push(None);
            }
            Content::Preference(_) => {
                return Err(DataError::Invalid(
                    Location::row(file, rec.row),
                    "a preference row outside preference mode; pass --preference".into(),
                ))
            }
            Content::Messages(msgs) => {
                let rendered = chat::render(msgs).map_err(|e| match e {
                    ChatError::UnknownRole { index, role } => DataError::UnknownRole(
                        Location::field(
                            file,
                            rec.row,
                            format!("{}[{index}].role", spec.messages_field),
                        ),
                        role,
                    ),
                })?;
                out.push(None);
                texts.push(rendered.text.clone());
                spans.push(Some(rendered));
            }
        }
    }
    if texts.is_empty() {
        return Ok(out);
    }
    let encoded = tok.encode_batch(texts.iter().map(String::as_str).collect())?;
    let mut enc_iter = encoded.into_iter().zip(spans).zip(texts.iter());
    for (slot, rec) in out.iter_mut().zip(records) {
        if matches!(rec.content, Content::Ids(_)) {
            continue;
        }
        let Some(((enc, span), text)) = enc_iter.next() else {
            break;
        };
        if text.is_empty() {
            continue; // empty text or conversation: skipped
        }
        let mut ids: Vec<i32> = enc.ids.iter().map(|&i| i as i32).collect();
        let mask = match span {
            Some(chat) => chat::loss_mask(&chat, &enc.offsets),
            None => {
                if let Some(e) = eos {
                    ids.push(e as i32);
                }
                vec![1; ids.len()]
            }
        };
        *slot = Some(Doc { ids, mask });
    }
    Ok(out)
}
