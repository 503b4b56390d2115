//! Chat loss masks: every masked-in token belongs to an assistant turn (body or closing
//! `<|im_end|>`), and every assistant token is masked in. Checked on the prepared shards
//! against assistant regions found by scanning the jinja-rendered text independently.

mod common;

use moeru_data::reader::ShardReader;
use moeru_data::tokenizer::TextTokenizer;
use moeru_data::{prepare, Manifest};
use serde_json::Value;

const HEADER: &str = "<|im_start|>assistant\n";
const END: &str = "<|im_end|>";

/// Byte ranges of assistant bodies + closing `<|im_end|>`, by plain string scanning.
fn assistant_regions(text: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(h) = text[from..].find(HEADER) {
        let start = from + h + HEADER.len();
        let end = start + text[start..].find(END).unwrap() + END.len();
        out.push((start, end));
        from = end;
    }
    out
}

fn docs_of(dir: &std::path::Path) -> Vec<(Vec<i32>, Vec<u8>)> {
    let m = Manifest::read(dir).unwrap();
    let mut r = ShardReader::new(dir, &m);
    let mut out = Vec::new();
    for (s, shard) in m.shards.iter().enumerate() {
        for g in 0..shard.row_groups.len() {
            let docs = r.read(s, g).unwrap();
            for i in 0..docs.len() {
                let (ids, mask) = docs.doc(i);
                out.push((ids.to_vec(), mask.to_vec()));
            }
        }
    }
    out
}

fn check_masks(input: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("chat");
    let report = prepare(&common::options(
        vec![common::fixtures().join(input)],
        &out,
        common::chat_spec(),
    ))
    .unwrap();
    let expected: Vec<Value> = serde_json::from_str(
        &std::fs::read_to_string(common::fixtures().join("chat_expected.json")).unwrap(),
    )
    .unwrap();
    let docs = docs_of(&out);
    assert_eq!(docs.len(), expected.len());
    assert_eq!(report.manifest.documents as usize, expected.len());
    let tok = TextTokenizer::from_file(&common::tokenizer_path()).unwrap();
    let im_end = tok.token_id(END).unwrap() as i32;
    let mut assistant_turns = 0;
    for ((ids, mask), want) in docs.iter().zip(&expected) {
        let text = want["text"].as_str().unwrap();
        let want_ids: Vec<i32> = serde_json::from_value(want["ids"].clone()).unwrap();
        assert_eq!(ids, &want_ids, "token ids differ from Python for {text:?}");
        let enc = tok.encode(text).unwrap();
        let regions = assistant_regions(text);
        assistant_turns += regions.len();
        for (t, &(s, e)) in enc.offsets.iter().enumerate() {
            let inside = regions.iter().any(|&(a, b)| s < b && a < e);
            let tok_text = &text[s..e];
            assert_eq!(
                mask[t] == 1,
                inside,
                "token {t} {tok_text:?} in {text:?}: mask {}",
                mask[t]
            );
        }
        // every assistant turn's closing <|im_end|> is masked in, and no other <|im_end|>
        for &(_, b) in &regions {
            let t = enc
                .offsets
                .iter()
                .position(|&(s, e)| (s, e) == (b - END.len(), b))
                .unwrap();
            assert_eq!((ids[t], mask[t]), (im_end, 1));
        }
        let masked_ends = ids
            .iter()
            .zip(mask)
            .filter(|&(&i, &m)| i == im_end && m == 1)
            .count();
        assert_eq!(masked_ends, regions.len());
        // headers and the newline after <|im_end|> are never masked in
        assert_eq!(mask[0], 0);
        assert_eq!(
            *mask.last().unwrap(),
            0,
            "trailing newline after the last <|im_end|>"
        );
    }
    assert!(assistant_turns >= 9);
}

#[test]
fn chat_masks_cover_exactly_assistant_turns_jsonl() {
    check_masks("chat.jsonl");
}

#[test]
fn chat_masks_cover_exactly_assistant_turns_pyarrow_parquet() {
    check_masks("messages.parquet");
}

#[test]
fn empty_assistant_turn_masks_only_its_im_end() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("chat");
    prepare(&common::options(
        vec![common::fixtures().join("chat.jsonl")],
        &out,
        common::chat_spec(),
    ))
    .unwrap();
    // conversation 4 has an empty assistant turn in the middle: only `<|im_end|>` is masked
    let (ids, mask) = &docs_of(&out)[4];
    let tok = TextTokenizer::from_file(&common::tokenizer_path()).unwrap();
    let assistant = tok.token_id("assistant").unwrap() as i32;
    let pos = ids.iter().position(|&i| i == assistant).unwrap();
    // `assistant`, `\n`, `<|im_end|>`
    assert_eq!(&mask[pos..pos + 3], &[0, 0, 1]);
    assert_eq!(ids[pos + 2], tok.token_id(END).unwrap() as i32);
}
