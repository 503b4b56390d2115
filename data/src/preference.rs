//! Tokenizing preference (DPO) rows for `moeru data prepare --preference`, exactly as TRL 1.16's
//! `DPOTrainer._prepare_dataset` does, into one stored document per pair (layout:
//! [`crate::pairs`]). Owns the tokenization rule and the per-row checks; it must not read files
//! (`input*.rs`) or write shards (`prepare.rs`).
//!
//! What TRL 1.16 does, and so what is done here:
//!
//! - **Plain rows** (`prompt`, `chosen`, `rejected` strings). `add_eos` appends the tokenizer's
//!   EOS *text* to `chosen` and to `rejected` unless the string already ends with it (here the
//!   EOS is `--eos-token`, default `<|endoftext|>`; TRL uses `tokenizer.eos_token`, which is
//!   `<|im_end|>` for Qwen3 instruct tokenizers — pass `--eos-token '<|im_end|>'` to match
//!   those). Then `tokenize_fn` tokenizes three strings: `prompt`, `prompt + chosen` and
//!   `prompt + rejected` (string concatenation, so tokens may merge across the boundary).
//! - **Conversational rows** (`prompt` a list of messages, `chosen` / `rejected` lists of
//!   assistant messages). No EOS is added. The three tokenized texts are
//!   `apply_chat_template(prompt, add_generation_prompt=True)` ([`chat::render_generation_prompt`]
//!   with thinking enabled, the template's default: it ends in `<|im_start|>assistant\n`),
//!   and `apply_chat_template(prompt + chosen)` / `(prompt + rejected)` ([`chat::render`]).
//!   With the Qwen3 template the final assistant turn carries `<think>\n\n</think>\n\n`, so the
//!   completion starts with it and ends with `<|im_end|>\n`.
//! - **The split** (both formats): `prompt_len = min(common_prefix_length(prompt_ids,
//!   prompt_chosen_ids), common_prefix_length(prompt_ids, prompt_rejected_ids))`; the pair is
//!   `prompt_ids[..prompt_len]`, `prompt_chosen_ids[prompt_len..]`,
//!   `prompt_rejected_ids[prompt_len..]`.
//!
//! Text is encoded without special tokens added by the tokenizer's post-processor; TRL's
//! `tokenizer(text)` adds them, which for Qwen tokenizers (no BOS, no post-processor tokens) is
//! the same. Where TRL differs on purpose: TRL silently drops rows whose prompt alone is
//! `>= max_length` tokens; here, with `--seq-len`, such a row is an error, and so is a row whose
//! prompt, chosen or rejected part is empty after the split. TRL's implicit-prompt format
//! (no `prompt` field, prompt extracted from `chosen`), `tools` and `chat_template_kwargs` are
//! not supported.

use std::path::Path;

use crate::chat::{self, ChatError, Message};
use crate::error::{DataError, Location, Result};
use crate::input::{Content, Part, PreferenceRow, PreferenceSpec, Record};
use crate::pairs::pair_document;
use crate::tokenizer::TextTokenizer;

/// Length of the longest common prefix of `a` and `b` (TRL's `common_prefix_length`).
pub fn common_prefix_len<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// One tokenized pair, as stored: ids `prompt ++ chosen ++ rejected` and their part codes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PairDoc {
    pub ids: Vec<i32>,
    pub mask: Vec<u8>,
}

/// Where a row's problem is: the file, the row, and (when given) a field.
struct RowAt<'a> {
    file: &'a Path,
    row: u64,
}

impl RowAt<'_> {
    fn field(&self, field: impl Into<String>) -> Location {
        Location::field(self.file, self.row, field)
    }
    fn role_error(&self, field: &str, offset: usize, e: ChatError) -> DataError {
        match e {
            ChatError::UnknownRole { index, role } => DataError::UnknownRole(
                self.field(format!("{field}[{}].role", index - offset)),
                role,
            ),
        }
    }
}

/// The three texts TRL tokenizes for `row`: prompt, prompt+chosen, prompt+rejected.
fn texts(row: &PreferenceRow, eos: &str, spec: &PreferenceSpec, at: &RowAt) -> Result<[String; 3]> {
    let [pf, cf, rf] = spec.fields();
    match (&row.prompt, &row.chosen, &row.rejected) {
        (Part::Text(p), Part::Text(c), Part::Text(r)) => {
            let with_eos = |s: &str| {
                if s.ends_with(eos) {
                    s.to_string()
                } else {
                    format!("{s}{eos}")
                }
            };
            Ok([
                p.clone(),
                format!("{p}{}", with_eos(c)),
                format!("{p}{}", with_eos(r)),
            ])
        }
        (Part::Messages(p), Part::Messages(c), Part::Messages(r)) => {
            let prompt =
                chat::render_generation_prompt(p, true).map_err(|e| at.role_error(pf, 0, e))?;
            let joined = |tail: &[Message], field: &str| -> Result<String> {
                let all: Vec<Message> = p.iter().chain(tail).cloned().collect();
                chat::render(&all)
                    .map(|r| r.text)
                    .map_err(|e| at.role_error(field, p.len(), e))
            };
            Ok([prompt, joined(c, cf)?, joined(r, rf)?])
        }
        // input_pref.rs only builds rows whose three parts share one format
        _ => Err(DataError::Invalid(
            at.field(cf),
            "prompt, chosen and rejected mix plain and conversational formats".into(),
        )),
    }
}

/// Tokenize a chunk of preference records of `file` (see the module docs for the rule).
pub(crate) fn tokenize_pairs(
    tok: &TextTokenizer,
    file: &Path,
    spec: &PreferenceSpec,
    eos: &str,
    records: &[Record],
) -> Result<Vec<PairDoc>> {
    let mut all = Vec::with_capacity(records.len() * 3);
    for rec in records {
        let Content::Preference(row) = &rec.content else {
            return Err(DataError::Invalid(
                Location::row(file, rec.row),
                "not a preference row".into(),
            ));
        };
        let at = RowAt { file, row: rec.row };
        all.extend(texts(row, eos, spec, &at)?);
    }
    let encoded = tok.encode_batch(all.iter().map(String::as_str).collect())?;
    let mut out = Vec::with_capacity(records.len());
    for (rec, enc) in records.iter().zip(encoded.chunks(3)) {
        let [p, c, r] = [&enc[0].ids, &enc[1].ids, &enc[2].ids];
        let split = common_prefix_len(p, c).min(common_prefix_len(p, r));
        let parts = [&p[..split], &c[split..], &r[split..]];
        for (part, field) in parts.iter().zip(spec.fields()) {
            if part.is_empty() {
                return Err(DataError::Invalid(
                    Location::field(file, rec.row, field),
                    format!(
                        "the {field} is empty after tokenization (TRL splits the pair where the \
                         tokenized prompt and prompt+completion diverge); give every row a \
                         non-empty prompt and completions that add tokens to it"
                    ),
                ));
            }
        }
        if let Some(n) = spec.seq_len.filter(|&n| split >= n) {
            return Err(DataError::Invalid(
                Location::field(file, rec.row, spec.prompt_field.as_str()),
                format!(
                    "prompt is {split} tokens; --seq-len is {n}; shorten it or raise --seq-len"
                ),
            ));
        }
        let to_i32 = |s: &[u32]| s.iter().map(|&i| i as i32).collect::<Vec<_>>();
        let (ids, mask) = pair_document(&to_i32(parts[0]), &to_i32(parts[1]), &to_i32(parts[2]));
        out.push(PairDoc { ids, mask });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_prefix() {
        assert_eq!(common_prefix_len(&[1, 2, 3], &[1, 2, 4, 5]), 2);
        assert_eq!(common_prefix_len(&[1, 2], &[1, 2, 3]), 2);
        assert_eq!(common_prefix_len::<u32>(&[], &[1]), 0);
    }

    #[test]
    fn plain_texts_append_eos_once() {
        let row = PreferenceRow {
            prompt: Part::Text("Q".into()),
            chosen: Part::Text(" a<e>".into()),
            rejected: Part::Text(" b".into()),
        };
        let at = RowAt {
            file: Path::new("f"),
            row: 0,
        };
        let t = texts(&row, "<e>", &PreferenceSpec::default(), &at).unwrap();
        assert_eq!(t, ["Q".to_string(), "Q a<e>".into(), "Q b<e>".into()]);
    }
}
