//! `prepare` reads pyarrow-written Parquet inputs (committed fixtures) and produces the same
//! documents as from the equivalent JSONL.

mod common;

use moeru_data::input::{Content, InputSpec, RecordReader};
use moeru_data::reader::ShardReader;
use moeru_data::{prepare, Manifest};
use serde_json::Value;

fn all_docs(dir: &std::path::Path) -> Vec<Vec<i32>> {
    let m = Manifest::read(dir).unwrap();
    let mut r = ShardReader::new(dir, &m);
    let mut out = Vec::new();
    for (s, shard) in m.shards.iter().enumerate() {
        for g in 0..shard.row_groups.len() {
            let d = r.read(s, g).unwrap();
            out.extend((0..d.len()).map(|i| d.doc(i).0.to_vec()));
        }
    }
    out
}

#[test]
fn pyarrow_text_parquet_tokenizes_like_python() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("text");
    let report = prepare(&common::options(
        vec![common::fixtures().join("text.parquet")],
        &out,
        InputSpec::default(),
    ))
    .unwrap();
    let parity: Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixtures().join("tokenizer_parity.json")).unwrap(),
    )
    .unwrap();
    // empty texts are skipped; every other document is its Python ids + <|endoftext|>
    let want: Vec<Vec<i32>> = parity["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| !c["text"].as_str().unwrap().is_empty())
        .map(|c| {
            let mut ids: Vec<i32> = serde_json::from_value(c["ids"].clone()).unwrap();
            ids.push(151_643);
            ids
        })
        .collect();
    assert_eq!(all_docs(&out), want);
    assert_eq!(report.skipped_empty, 1);
    assert_eq!(report.manifest.tokenizer.eos_id, Some(151_643));
    assert_eq!(report.manifest.tokens, report.manifest.loss_tokens);
}

#[test]
fn pyarrow_messages_parquet_equals_jsonl() {
    let spec = common::chat_spec();
    let a: Vec<Content> = RecordReader::open(&common::fixtures().join("messages.parquet"), &spec)
        .unwrap()
        .map(|r| r.unwrap().content)
        .collect();
    let b: Vec<Content> = RecordReader::open(&common::fixtures().join("chat.jsonl"), &spec)
        .unwrap()
        .map(|r| r.unwrap().content)
        .collect();
    assert_eq!(a.len(), 6);
    assert_eq!(a, b);
}

#[test]
fn directories_and_text_files_are_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let inputs = tmp.path().join("in");
    std::fs::create_dir(&inputs).unwrap();
    std::fs::write(inputs.join("b.txt"), "second file").unwrap();
    std::fs::write(inputs.join("a.txt"), "first file").unwrap();
    let out = tmp.path().join("out");
    let report = prepare(&common::options(vec![inputs], &out, InputSpec::default())).unwrap();
    assert_eq!(report.manifest.documents, 2);
    let docs = all_docs(&out);
    let tok = moeru_data::tokenizer::TextTokenizer::from_file(&common::tokenizer_path()).unwrap();
    let first: Vec<i32> = tok
        .encode_ids("first file")
        .unwrap()
        .iter()
        .map(|&i| i as i32)
        .collect();
    assert_eq!(docs[0][..docs[0].len() - 1], first[..]);
}
