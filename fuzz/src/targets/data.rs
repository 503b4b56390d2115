//! Targets over data inputs: prepared Parquet shards and their manifest, JSONL text / chat /
//! preference / prompt-set records, and tokenizer.json.

use std::path::Path;

use moeru_data::chat::{loss_mask, render};
use moeru_data::input::{Content, InputSpec, PreferenceSpec, RecordReader};
use moeru_data::prompts::PromptSet;
use moeru_data::reader::ShardReader;
use moeru_data::tokenizer::TextTokenizer;
use moeru_data::{DataLoader, LoaderConfig, Manifest};

use super::{put, repo_file, target_of, workspace_root};
use crate::mutate::{pack, unpack};
use crate::runner::Target;

const DATASETS: &[&str] = &[
    "recipes/smoke/data/eval",
    "recipes/smoke/data/chat-eval",
    "recipes/smoke/data/pairs-eval",
    "recipes/smoke/data/pairs-train",
];
const SHARD: &str = "shard-00000.parquet";

/// `parquet_shard`: a prepared dataset (manifest.json, then the shard's bytes, both mutated)
/// read through `Manifest::read` + `ShardReader` (every row group), then a `DataLoader`.
pub fn parquet_shard() -> Target {
    let seeds = DATASETS
        .iter()
        .map(|d| {
            pack(&[
                &repo_file(&format!("{d}/manifest.json")),
                &repo_file(&format!("{d}/{SHARD}")),
            ])
        })
        .collect();
    let mut t = target_of("parquet_shard", seeds, false, Box::new(run_parquet));
    t.max_len = 16 << 10;
    t
}

fn run_parquet(input: &[u8], dir: &Path) -> Result<(), String> {
    let parts = unpack(input, 2);
    put(dir, "manifest.json", parts[0])?;
    put(dir, SHARD, parts[1])?;
    let manifest = Manifest::read(dir).map_err(|e| e.to_string())?;
    let mut reader = ShardReader::new(dir, &manifest);
    for (s, shard) in manifest.shards.iter().enumerate().take(8) {
        for rg in 0..shard.row_groups.len().min(64) {
            let docs = reader.read(s, rg).map_err(|e| e.to_string())?;
            for i in 0..docs.len() {
                let _ = docs.doc(i);
            }
        }
    }
    let mut loader =
        DataLoader::new(LoaderConfig::new(dir, 32, 2, 3)).map_err(|e| e.to_string())?;
    for _ in 0..4 {
        if loader.next_batch().map_err(|e| e.to_string())?.is_none() {
            break;
        }
    }
    Ok(())
}

const JSONL: &[(&str, usize)] = &[
    ("data/tests/fixtures/chat.jsonl", 100),
    ("data/tests/fixtures/preference_chat.jsonl", 100),
    ("data/tests/fixtures/preference_plain.jsonl", 100),
    ("recipes/smoke/chat-eval.jsonl", 6),
    ("recipes/smoke/corpus-eval.jsonl", 6),
    ("recipes/smoke/pairs-eval.jsonl", 6),
    ("recipes/toy-rl/prompts.jsonl", 6),
];

/// The first `lines` lines of a committed JSONL file.
fn head(rel: &str, lines: usize) -> Vec<u8> {
    let text = String::from_utf8(repo_file(rel)).expect("UTF-8 seed");
    let mut out: String = text.lines().take(lines).collect::<Vec<_>>().join("\n");
    out.push('\n');
    out.into_bytes()
}

fn smoke_tokenizer() -> TextTokenizer {
    TextTokenizer::from_file(&workspace_root().join("recipes/smoke/tokenizer.json"))
        .expect("smoke tokenizer")
}

/// `jsonl_chat`: one JSONL file read as plain text, as chat (rendered with the chat template,
/// tokenized, loss-masked), as preference pairs, and as a GRPO prompt set.
pub fn jsonl_chat() -> Target {
    let seeds = JSONL.iter().map(|(p, n)| head(p, *n)).collect();
    let tok = smoke_tokenizer();
    let run = move |input: &[u8], dir: &Path| -> Result<(), String> {
        put(dir, "in.jsonl", input)?;
        let path = dir.join("in.jsonl");
        let specs = [
            InputSpec::default(),
            InputSpec {
                chat: true,
                ..InputSpec::default()
            },
            InputSpec {
                preference: Some(PreferenceSpec::default()),
                ..InputSpec::default()
            },
        ];
        let mut errors = Vec::new();
        for spec in &specs {
            if let Err(e) = read_records(&path, spec, &tok) {
                errors.push(e);
            }
        }
        for thinking in [false, true] {
            if let Err(e) = PromptSet::read(&path, &tok, thinking, 256) {
                errors.push(e.to_string());
            }
        }
        // Accepted when some reading of the file succeeds (no one file is all five kinds).
        match errors.len() < specs.len() + 2 {
            true => Ok(()),
            false => Err(errors.join("; ")),
        }
    };
    target_of("jsonl_chat", seeds, true, Box::new(run))
}

fn read_records(path: &Path, spec: &InputSpec, tok: &TextTokenizer) -> Result<(), String> {
    let reader = RecordReader::open(path, spec).map_err(|e| e.to_string())?;
    for record in reader.take(200) {
        let record = record.map_err(|e| e.to_string())?;
        match record.content {
            Content::Text(t) => {
                tok.encode(&t).map_err(|e| e.to_string())?;
            }
            Content::Messages(m) => {
                let chat = render(&m).map_err(|e| format!("{e:?}"))?;
                let enc = tok.encode(&chat.text).map_err(|e| e.to_string())?;
                let mask = loss_mask(&chat, &enc.offsets);
                if mask.len() != enc.ids.len() {
                    return Err("loss mask length differs from the token count".into());
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// `tokenizer_json`: `TextTokenizer::from_file` on a mutated tokenizer.json (the committed
/// 12 KB smoke BPE tokenizers; the 11 MB Qwen3 one would make an iteration take ~1 s), then
/// encode and decode a short string.
pub fn tokenizer_json() -> Target {
    // recipes/toy-rl/sft/tokenizer.json is the same file.
    let seeds = vec![repo_file("recipes/smoke/tokenizer.json")];
    let run = |input: &[u8], dir: &Path| -> Result<(), String> {
        put(dir, "tokenizer.json", input)?;
        let tok =
            TextTokenizer::from_file(&dir.join("tokenizer.json")).map_err(|e| e.to_string())?;
        let enc = tok
            .encode("<|im_start|>user\n12 + 30 = 42 héllo<|im_end|>\n")
            .map_err(|e| e.to_string())?;
        let _ = tok.decode(&enc.ids);
        let _ = (tok.vocab_size(), tok.token_id("<|im_end|>"));
        Ok(())
    };
    target_of("tokenizer_json", seeds, true, Box::new(run))
}
