//! What `moeru generate` does while tokens arrive: stop strings on the decoded completions,
//! streaming text to stdout, and the prefill / decode timing of `--timing`.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::anyhow;
use moeru_models::generate::{Prompts, StepObserver};

/// The tokenizer that turns completions back into text. `TextTokenizer` only encodes, so
/// decoding loads the same tokenizer.json with the `tokenizers` crate.
pub fn load_decoder(path: &Path) -> anyhow::Result<tokenizers::Tokenizer> {
    if !path.is_file() {
        anyhow::bail!(
            "{}: no such file; --tokenizer takes a Hugging Face tokenizer.json",
            path.display()
        );
    }
    tokenizers::Tokenizer::from_file(path).map_err(|e| {
        let msg = e.to_string().replace('\n', " ");
        anyhow!(
            "{}: cannot load tokenizer: {msg}; pass a Hugging Face tokenizer.json",
            path.display()
        )
    })
}

/// `ids` as text, special tokens (EOS, chat markers) left out as in transformers'
/// `decode(skip_special_tokens=True)`; ids the tokenizer does not know are skipped.
pub fn decode(tok: &tokenizers::Tokenizer, ids: &[i64]) -> String {
    let ids: Vec<u32> = ids.iter().filter_map(|&t| u32::try_from(t).ok()).collect();
    // Decoding known ids cannot fail; an unknown one is dropped by the tokenizer itself.
    tok.decode(&ids, true).unwrap_or_default()
}

/// One row's completion so far.
#[derive(Default)]
pub struct Row {
    pub ids: Vec<i64>,
    done: bool,
    /// Byte end of the first stop string in the decoded completion, once one appeared.
    pub stop_end: Option<usize>,
    /// Bytes of the completion already streamed.
    printed: usize,
}

/// The [`StepObserver`] of `moeru generate`.
pub struct Watch<'a> {
    decoder: Option<&'a tokenizers::Tokenizer>,
    stops: &'a [String],
    stream: bool,
    pub rows: Vec<Row>,
    started: Instant,
    first_step: Option<Instant>,
    last_step: Instant,
    steps: usize,
}

impl<'a> Watch<'a> {
    /// Starts the clock: build it right before `generate_with`.
    pub fn new(
        decoder: Option<&'a tokenizers::Tokenizer>,
        stops: &'a [String],
        stream: bool,
        batch: usize,
    ) -> Self {
        let now = Instant::now();
        Self {
            decoder,
            stops,
            stream: stream && decoder.is_some(),
            rows: (0..batch).map(|_| Row::default()).collect(),
            started: now,
            first_step: None,
            last_step: now,
            steps: 0,
        }
    }

    /// Decodes row `r` when stop strings or streaming need its text; stops it at the first
    /// stop string and streams what is new.
    fn check(&mut self, r: usize) -> bool {
        let Some(tok) = self.decoder else {
            return false;
        };
        if self.stops.is_empty() && !self.stream {
            return false;
        }
        let text = decode(tok, &self.rows[r].ids);
        let stop_end = (self.stops.iter())
            .filter_map(|s| text.find(s.as_str()).map(|i| i + s.len()))
            .min();
        let row = &mut self.rows[r];
        row.stop_end = stop_end;
        if self.stream {
            // A token may end inside a UTF-8 character (decoded as U+FFFD) or change how the
            // text before it decodes; print only text that is settled.
            let upto = stop_end.unwrap_or(text.len());
            let settled = !text[..upto].ends_with('\u{FFFD}') || stop_end.is_some();
            if settled && upto > row.printed && text.is_char_boundary(row.printed) {
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(&text.as_bytes()[row.printed..upto]);
                let _ = out.flush();
                row.printed = upto;
            }
        }
        stop_end.is_some()
    }

    /// Ends the stream: whatever text was held back (an unfinished character at the very
    /// end), then a newline.
    pub fn end_stream(&mut self) {
        let (Some(tok), true) = (self.decoder, self.stream) else {
            return;
        };
        let mut out = std::io::stdout().lock();
        for row in &mut self.rows {
            let text = decode(tok, &row.ids);
            let upto = row.stop_end.unwrap_or(text.len());
            if upto > row.printed && text.is_char_boundary(row.printed) {
                let _ = out.write_all(&text.as_bytes()[row.printed..upto]);
            }
        }
        let _ = writeln!(out);
        let _ = out.flush();
    }

    /// `{"batch", "prompt_tokens", "prefill_s", "decode_steps", "decode_s", ...}` of the
    /// generation just watched: the prefill is the time to the first token, decoding the
    /// time from the first token to the last (`decode_steps` forwards of the whole batch).
    pub fn timing(&self, p: &Prompts) -> serde_json::Value {
        let first = self.first_step.unwrap_or(self.last_step);
        let prefill = (first - self.started).as_secs_f64();
        let decode = (self.last_step - first).as_secs_f64();
        let prompt_tokens = p.mask.iter().filter(|&&m| m != 0).count();
        let decode_steps = self.steps.saturating_sub(1);
        let per_s = |n: usize, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
        serde_json::json!({
            "batch": p.batch,
            "prompt_tokens": prompt_tokens,
            "prefill_s": prefill,
            "prefill_tokens_per_s": per_s(prompt_tokens, prefill),
            "decode_steps": decode_steps,
            "decode_s": decode,
            "decode_tokens_per_s": per_s(decode_steps * p.batch, decode),
        })
    }
}

impl StepObserver for Watch<'_> {
    fn step(&mut self, step: usize, tokens: &[i64], finished: &mut [bool]) {
        let now = Instant::now();
        self.first_step.get_or_insert(now);
        (self.last_step, self.steps) = (now, step + 1);
        for (r, &token) in tokens.iter().enumerate() {
            if self.rows[r].done {
                continue;
            }
            self.rows[r].ids.push(token);
            if self.check(r) {
                finished[r] = true;
            }
            self.rows[r].done = finished[r];
        }
    }
}
