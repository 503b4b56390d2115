//! The clap subcommands, driven through `run_data_command` as `moeru data …` will be.

mod common;

use common::run;

use moeru_data::Manifest;

#[test]
fn prepare_then_inspect() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("chat");
    let tok = common::tokenizer_path();
    let input = common::fixtures().join("chat.jsonl");
    run(&[
        "prepare",
        "--tokenizer",
        tok.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--chat",
        "--quiet",
    ])
    .unwrap();
    let m = Manifest::read(&out).unwrap();
    assert_eq!((m.mode.as_str(), m.documents), ("chat", 6));
    assert_eq!(m.tokenizer.sha256.len(), 64);
    run(&[
        "inspect",
        out.to_str().unwrap(),
        "--samples",
        "2",
        "--seq-len",
        "32",
    ])
    .unwrap();
}

#[test]
fn inspect_detects_a_corrupt_shard() {
    let tmp = tempfile::tempdir().unwrap();
    common::prepare_ids(
        tmp.path(),
        &common::synthetic_docs(20, 50, 2),
        1000,
        100_000,
    );
    let shard = tmp.path().join("ds/shard-00000.parquet");
    let mut bytes = std::fs::read(&shard).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&shard, bytes).unwrap();
    let err = run(&["inspect", tmp.path().join("ds").to_str().unwrap()])
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("shard-00000.parquet") && err.contains("sha256"),
        "{err}"
    );
}
