//! `moeru generate`'s text mode: prompts (from `--prompt` or a JSONL file, optionally
//! rendered with the Qwen3 chat template) are tokenized, left-padded into batches and
//! generated from; each prompt's completion is decoded, cut at its first stop string, and
//! written as one JSON line (or streamed to stdout when there is a single prompt).

use std::io::{IsTerminal, Write};
use std::path::Path;

use anyhow::{bail, Context};
use moeru_data::chat::{render_generation_prompt, ChatError, Message};
use moeru_data::tokenizer::TextTokenizer;
use moeru_models::generate::{Generated, Prompts};
use moeru_models::sampling::Sampling;
use moeru_models::{ForwardCtx, Qwen3Model};

use crate::adapters::load_model;
use crate::cmd_generate::{generation_config, GenerateArgs};
use crate::generate_watch::{decode, load_decoder, Watch};

/// transformers' default `max_position_embeddings` for Qwen3 and Qwen3-MoE, for a
/// config.json that does not say.
const DEFAULT_MAX_POSITIONS: usize = 32768;

/// One prompt as given: raw text, or a conversation to render.
enum Source {
    Text(String),
    Messages(Vec<Message>),
}

pub fn run(args: &GenerateArgs, sampling: Option<Sampling>) -> anyhow::Result<()> {
    let sources = match &args.prompts {
        Some(file) => read_jsonl(file)?,
        None => args.prompt.iter().cloned().map(Source::Text).collect(),
    };
    let tok_path = args.tokenizer.as_deref().expect("checked by mode()");
    let decoder = load_decoder(tok_path)?;
    let tokenizer = TextTokenizer::from_file(tok_path)?;
    let texts = (sources.iter().enumerate())
        .map(|(i, s)| render(s, args.chat, args.enable_thinking, i))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let device = args.compute.open()?;
    let (model, base) = load_model(&args.model, args.adapter.as_deref(), &device)?;
    let ids = tokenize(&tokenizer, &texts, &model)?;
    let cfg = generation_config(args, &base, sampling)?;
    let stream = ids.len() == 1 && (args.out.is_none() || std::io::stdout().is_terminal());
    let mut sink: Box<dyn Write> = match (&args.out, stream) {
        (Some(out), _) => Box::new(
            std::fs::File::create(out)
                .with_context(|| format!("{}: cannot create the output file", out.display()))?,
        ),
        (None, true) => Box::new(std::io::sink()),
        (None, false) => Box::new(std::io::stdout()),
    };
    let ctx = ForwardCtx::new(args.compute.precision);
    let batch = args.batch_size.unwrap_or(ids.len()).max(1);
    for (b, chunk) in ids.chunks(batch).enumerate() {
        let prompts = left_pad(chunk, cfg.pad_token_id);
        let lens: Vec<usize> = chunk.iter().map(Vec::len).collect();
        let mut watch = Watch::new(Some(&decoder), &args.stop, stream, prompts.batch);
        let g = model.generate_with(&prompts, &cfg, &ctx, &mut watch);
        watch.end_stream();
        if args.timing {
            eprintln!("{}", watch.timing(&prompts));
        }
        for line in completions(&g, &watch, &decoder, prompts.seq, &lens, b * batch) {
            writeln!(sink, "{line}").context("writing the completions")?;
        }
    }
    sink.flush().context("writing the completions")?;
    Ok(())
}

/// The prompts of a JSONL file: each non-blank line `{"prompt": "..."}` or
/// `{"messages": [{"role", "content"}, ...]}`; a bad line is named by file and line.
fn read_jsonl(path: &Path) -> anyhow::Result<Vec<Source>> {
    let shown = path.display();
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{shown}: cannot read the prompts file"))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("{shown}:{}", i + 1);
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{at}: not a JSON object"))?;
        out.push(match (v.get("prompt"), v.get("messages")) {
            (Some(serde_json::Value::String(p)), None) => Source::Text(p.clone()),
            (None, Some(m)) => {
                Source::Messages(serde_json::from_value(m.clone()).with_context(|| {
                    format!("{at}: `messages` is not a list of {{\"role\", \"content\"}} objects")
                })?)
            }
            _ => bail!("{at}: expected {{\"prompt\": \"text\"}} or {{\"messages\": [...]}}"),
        });
    }
    if out.is_empty() {
        bail!("{shown}: no prompts; write one JSON object per line");
    }
    Ok(out)
}

/// The text of prompt `i`: as given, or rendered with the chat template and the generation
/// prompt (always for `messages`, for plain text under `--chat`).
fn render(s: &Source, chat: bool, thinking: bool, i: usize) -> anyhow::Result<String> {
    let messages = match s {
        Source::Text(t) if !chat => return Ok(t.clone()),
        Source::Text(t) => vec![Message {
            role: "user".into(),
            content: t.clone(),
            reasoning_content: None,
        }],
        Source::Messages(m) => m.clone(),
    };
    render_generation_prompt(&messages, thinking).map_err(|e| match e {
        ChatError::UnknownRole { index, role } => anyhow::anyhow!(
            "prompt {i}: message {index} has role `{role}`; use system, user, assistant or tool"
        ),
    })
}

/// Each text's ids, checked against the model: not empty, inside its vocabulary and its
/// positions.
fn tokenize(
    tok: &TextTokenizer,
    texts: &[String],
    model: &Qwen3Model,
) -> anyhow::Result<Vec<Vec<i64>>> {
    let vocab = model.config.vocab_size as i64;
    let max_positions = (model.config.raw.get("max_position_embeddings"))
        .and_then(|v| v.as_u64())
        .map_or(DEFAULT_MAX_POSITIONS, |n| n as usize);
    let encoded = tok.encode_batch(texts.iter().map(String::as_str).collect())?;
    let mut out = Vec::with_capacity(texts.len());
    for (i, e) in encoded.into_iter().enumerate() {
        let ids: Vec<i64> = e.ids.iter().map(|&t| t as i64).collect();
        if ids.is_empty() {
            bail!("prompt {i} is empty after tokenization; generation needs at least one token");
        }
        if let Some(t) = ids.iter().find(|&&t| t >= vocab) {
            bail!("prompt {i}: token id {t} is outside the model's vocabulary 0..{vocab}; is --tokenizer this model's?");
        }
        if ids.len() > max_positions {
            bail!(
                "prompt {i} has {} tokens, more than the model's {max_positions} positions (max_position_embeddings); shorten it",
                ids.len()
            );
        }
        out.push(ids);
    }
    Ok(out)
}

/// `rows` left-padded with `pad` to the longest.
fn left_pad(rows: &[Vec<i64>], pad: i64) -> Prompts {
    let seq = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut p = Prompts {
        ids: Vec::with_capacity(rows.len() * seq),
        mask: Vec::with_capacity(rows.len() * seq),
        batch: rows.len(),
        seq,
    };
    for row in rows {
        let n = seq - row.len();
        p.ids
            .extend(std::iter::repeat_n(pad, n).chain(row.iter().copied()));
        p.mask
            .extend(std::iter::repeat_n(0, n).chain(std::iter::repeat_n(1, row.len())));
    }
    p
}

/// Per row of `g`: `{"prompt_index", "prompt_ids", "completion_ids", "text",
/// "finish_reason"}`. The completion runs to the token that finished the row (EOS or the end
/// of a stop string) or to the limit; the text is cut right after the first stop string.
fn completions(
    g: &Generated,
    watch: &Watch,
    tok: &tokenizers::Tokenizer,
    seq: usize,
    prompt_lens: &[usize],
    first_index: usize,
) -> Vec<serde_json::Value> {
    (0..g.batch)
        .map(|r| {
            let steps = g.len - seq;
            let n = g.stopped_at[r].map_or(steps, |s| s + 1).min(steps);
            let row = &g.sequences[r * g.len..(r + 1) * g.len];
            let ids = &row[seq..seq + n];
            let prompt = &row[..seq][seq - prompt_lens[r]..];
            let mut text = decode(tok, ids);
            if let Some(end) = watch.rows[r].stop_end {
                text.truncate(end);
            }
            let reason = match g.stopped_at[r] {
                Some(_) => "stop",
                None => "length",
            };
            serde_json::json!({
                "prompt_index": first_index + r,
                "prompt_ids": prompt,
                "completion_ids": ids,
                "text": text,
                "finish_reason": reason,
            })
        })
        .collect()
}
