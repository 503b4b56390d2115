//! Prompt sets for on-policy training (GRPO): a JSONL file of rows, each with a `prompt`
//! (a string used as is, or a list of chat messages rendered with the generation prompt) and
//! any other fields (`answer`, `metadata`, …), which are passed through to the rewards.
//!
//! The order prompts are drawn in is a pure function of the seed and the position in the
//! stream (an epoch permutation per pass over the set), so a resumed run draws the same
//! prompts from the step alone.
//!
//! Owns: reading, rendering and tokenizing prompts, and their order. Must not: generate or
//! score (the trainer does).

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::chat::{render_generation_prompt, ChatError, Message};
use crate::error::{DataError, Location, Result};
use crate::loader::{LoaderState, StreamKind, STATE_VERSION};
use crate::rng::{derive, permutation};
use crate::sample::PackMode;
use crate::stream::Position;
use crate::tokenizer::{hex, TextTokenizer};

/// One prompt: its token ids, the text they encode and the row's fields.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptRow {
    pub ids: Vec<i32>,
    pub text: String,
    /// Every field of the row, `prompt` included.
    pub fields: Map<String, Value>,
}

/// The rows of a prompt file, in file order.
#[derive(Debug, Clone)]
pub struct PromptSet {
    pub path: PathBuf,
    pub rows: Vec<PromptRow>,
    /// sha256 of the file's bytes and of the tokenizer: what a checkpoint's stream names.
    pub fingerprint: String,
}

impl PromptSet {
    /// Reads `path`; chat prompts are rendered with the generation prompt (and the empty think
    /// block unless `enable_thinking`). A prompt longer than `max_tokens` is an error naming
    /// its row.
    pub fn read(
        path: &Path,
        tokenizer: &TextTokenizer,
        enable_thinking: bool,
        max_tokens: usize,
    ) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            action: "reading the prompt set",
            source,
        })?;
        let text = String::from_utf8(bytes.clone()).map_err(|_| {
            DataError::Invalid(
                Location::file(path),
                "is not UTF-8 text; a prompt set is a JSONL file".into(),
            )
        })?;
        let mut rows = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let row = i as u64;
            let fields: Map<String, Value> = serde_json::from_str(line)
                .map_err(|e| DataError::BadJson(Location::row(path, row), e.to_string()))?;
            let text = prompt_text(path, row, &fields, enable_thinking)?;
            let ids: Vec<i32> = tokenizer
                .encode_ids(&text)?
                .into_iter()
                .map(|t| t as i32)
                .collect();
            if ids.is_empty() || ids.len() > max_tokens {
                return Err(DataError::Invalid(
                    Location::field(path, row, "prompt"),
                    format!("has {} tokens; a prompt needs 1 to {max_tokens} (`data.seq_len` − `generation.max_new_tokens`); shorten it or raise `data.seq_len`", ids.len()),
                ));
            }
            rows.push(PromptRow { ids, text, fields });
        }
        if rows.is_empty() {
            return Err(DataError::EmptyInput(path.to_path_buf()));
        }
        let mut h = Sha256::new();
        h.update(&bytes);
        h.update(tokenizer.sha256().as_bytes());
        h.update([u8::from(enable_thinking)]);
        Ok(Self {
            path: path.to_path_buf(),
            rows,
            fingerprint: hex(&h.finalize()),
        })
    }

    /// The row index at global position `position` of the endless stream: pass `e` over the
    /// set visits it in the permutation seeded by (`seed`, `e`), or in file order when not
    /// `shuffle`.
    pub fn at(&self, seed: u64, shuffle: bool, position: u64) -> usize {
        let n = self.rows.len() as u64;
        let (epoch, offset) = (position / n, (position % n) as usize);
        match shuffle {
            true => permutation(n as usize, derive(seed, &[0x7072_6f6d, epoch]))[offset] as usize,
            false => offset,
        }
    }
}

/// A prompt set as a stream: where it stands (prompts drawn so far) and what orders it.
#[derive(Debug, Clone)]
pub struct PromptLoader {
    pub set: PromptSet,
    pub seed: u64,
    pub shuffle: bool,
    pub seq_len: usize,
    /// Prompts drawn so far over all ranks.
    pub consumed: u64,
}

impl PromptLoader {
    /// The stream's state, for a checkpoint.
    pub fn state(&self) -> LoaderState {
        LoaderState {
            version: STATE_VERSION,
            dataset: self.set.fingerprint.clone(),
            seed: self.seed,
            seq_len: self.seq_len,
            mode: PackMode::Pad,
            shuffle: self.shuffle,
            window_row_groups: 0,
            stream: StreamKind::Prompts,
            position: Position::default(),
            samples: self.consumed,
            source: None,
        }
    }

    /// Continues from a checkpoint's `state`, which must be this set's, ordered the same way.
    pub fn resume(&mut self, state: &LoaderState) -> Result<()> {
        let file = Location::file(&self.set.path);
        let mismatch = |what: String| Err(DataError::Invalid(file.clone(), what));
        if state.stream != StreamKind::Prompts {
            return mismatch("the checkpoint was written by a run that did not train on a prompt set (`data.task` changed); resume it with its own recipe or start a new checkpoint folder".into());
        }
        if state.dataset != self.set.fingerprint {
            return mismatch(format!("the prompt set (or its tokenizer) changed since the checkpoint was written (fingerprint {} there, {} now); restore the file or start a new checkpoint folder", state.dataset, self.set.fingerprint));
        }
        if state.seed != self.seed || state.shuffle != self.shuffle {
            return mismatch(format!("the checkpoint drew prompts with seed {} shuffle {}, the recipe says seed {} shuffle {}; set `train.seed` and `data.shuffle` back", state.seed, state.shuffle, self.seed, self.shuffle));
        }
        self.consumed = state.samples;
        Ok(())
    }
}

/// The text a row's `prompt` stands for.
fn prompt_text(
    path: &Path,
    row: u64,
    fields: &Map<String, Value>,
    enable_thinking: bool,
) -> Result<String> {
    match fields.get("prompt") {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(_)) => {
            let messages: Vec<Message> =
                serde_json::from_value(fields["prompt"].clone()).map_err(|e| {
                    DataError::WrongType {
                        loc: Box::new(Location::field(path, row, "prompt")),
                        expected: "a list of {\"role\", \"content\"} messages".into(),
                        found: e.to_string(),
                        fix: "write each message as {\"role\": \"user\", \"content\": \"...\"}"
                            .into(),
                    }
                })?;
            render_generation_prompt(&messages, enable_thinking).map_err(|e| match e {
                ChatError::UnknownRole { index, role } => DataError::UnknownRole(
                    Location::field(path, row, format!("prompt[{index}].role")),
                    role,
                ),
            })
        }
        Some(other) => Err(DataError::WrongType {
            loc: Box::new(Location::field(path, row, "prompt")),
            expected: "a string or a list of messages".into(),
            found: kind(other).into(),
            fix: "give each row a `prompt`: text, or chat messages".into(),
        }),
        None => Err(DataError::MissingField(
            Location::field(path, row, "prompt"),
            "each row of a prompt set needs a `prompt` (text or chat messages)".into(),
        )),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> TextTokenizer {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen3");
        TextTokenizer::from_file(&dir.join("tokenizer.json")).unwrap()
    }

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prompts.jsonl");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn reads_text_and_chat_prompts_with_their_fields() {
        let (_d, path) = write(concat!(
            "{\"prompt\": \"hello\", \"answer\": \"7\"}\n\n",
            "{\"prompt\": [{\"role\": \"user\", \"content\": \"hi\"}], \"answer\": 3}\n"
        ));
        let set = PromptSet::read(&path, &tokenizer(), false, 64).unwrap();
        assert_eq!(set.rows.len(), 2);
        assert_eq!(set.rows[0].text, "hello");
        assert_eq!(set.rows[0].fields["answer"], "7");
        assert_eq!(
            set.rows[1].text,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
        );
        let t = tokenizer();
        let ids: Vec<i32> = (t.encode_ids(&set.rows[1].text).unwrap().iter())
            .map(|&x| x as i32)
            .collect();
        assert_eq!(set.rows[1].ids, ids);
    }

    #[test]
    fn bad_rows_are_named() {
        let t = tokenizer();
        for (text, needle) in [
            (
                "{\"answer\": 1}\n",
                "row 0, field `prompt`: the field is missing",
            ),
            (
                "{\"prompt\": 5}\n",
                "expected a string or a list of messages",
            ),
            ("not json\n", "row 0: invalid JSON"),
            ("{\"prompt\": \"a b c d e f g h\"}\n", "has 8 tokens"),
        ] {
            let (_d, path) = write(text);
            let err = PromptSet::read(&path, &t, false, 4)
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn each_pass_visits_every_prompt_once_in_a_seeded_order() {
        let (_d, path) = write(&"{\"prompt\": \"x\"}\n".repeat(7));
        let set = PromptSet::read(&path, &tokenizer(), false, 8).unwrap();
        for epoch in 0..3u64 {
            let mut seen: Vec<usize> = (0..7).map(|i| set.at(5, true, epoch * 7 + i)).collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..7).collect::<Vec<_>>());
        }
        let pass = |e: u64| {
            (0..7)
                .map(|i| set.at(5, true, e * 7 + i))
                .collect::<Vec<_>>()
        };
        assert_ne!(pass(0), pass(1));
        assert_eq!(
            (0..7).map(|i| set.at(5, false, i)).collect::<Vec<_>>(),
            (0..7).collect::<Vec<_>>()
        );
    }
}
