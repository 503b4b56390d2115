//! Bad inputs give one-line errors naming the file, row and field; nothing is left behind.

mod common;

use std::path::{Path, PathBuf};

use moeru_data::input::InputSpec;
use moeru_data::prepare;

/// Run prepare expecting failure; check the message and that no output or temp folder remains.
fn fails(inputs: Vec<PathBuf>, spec: InputSpec, parent: &Path, needles: &[&str]) -> String {
    let out = parent.join("out");
    let err = prepare(&common::options(inputs, &out, spec))
        .expect_err("prepare should fail")
        .to_string();
    assert!(!err.contains('\n'), "error is not one line: {err}");
    for n in needles {
        assert!(err.contains(n), "error {err:?} lacks {n:?}");
    }
    assert!(!out.exists(), "output folder left behind");
    let leftovers: Vec<_> = std::fs::read_dir(parent)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("tmp") || n == "out")
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
    err
}

#[test]
fn missing_field_in_jsonl() {
    let tmp = tempfile::tempdir().unwrap();
    let f = common::write_file(
        tmp.path(),
        "in.jsonl",
        "{\"text\": \"ok\"}\n{\"body\": \"no text\"}\n",
    );
    fails(
        vec![f],
        InputSpec::default(),
        tmp.path(),
        &[
            "in.jsonl",
            "row 1",
            "field `text`",
            "missing",
            "--text-field",
        ],
    );
}

#[test]
fn missing_column_in_parquet() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = InputSpec {
        text_field: "body".into(),
        ..InputSpec::default()
    };
    fails(
        vec![common::fixtures().join("text.parquet")],
        spec,
        tmp.path(),
        &["text.parquet", "field `body`", "\"text\""],
    );
}

#[test]
fn wrong_type_in_jsonl() {
    let tmp = tempfile::tempdir().unwrap();
    let f = common::write_file(tmp.path(), "in.jsonl", "{\"text\": 5}\n");
    fails(
        vec![f],
        InputSpec::default(),
        tmp.path(),
        &[
            "in.jsonl",
            "row 0",
            "field `text`",
            "expected a string, found a number",
        ],
    );
}

#[test]
fn wrong_type_in_pyarrow_parquet() {
    let tmp = tempfile::tempdir().unwrap();
    fails(
        vec![common::fixtures().join("bad_text_type.parquet")],
        InputSpec::default(),
        tmp.path(),
        &[
            "bad_text_type.parquet",
            "row 0",
            "field `text`",
            "expected string, found Int64",
        ],
    );
}

#[test]
fn wrong_messages_type() {
    let tmp = tempfile::tempdir().unwrap();
    let f = common::write_file(tmp.path(), "c.jsonl", "{\"messages\": \"hello\"}\n");
    fails(
        vec![f],
        common::chat_spec(),
        tmp.path(),
        &["c.jsonl", "row 0", "field `messages`", "a string"],
    );
}

#[test]
fn empty_input_file() {
    let tmp = tempfile::tempdir().unwrap();
    let good = common::write_file(tmp.path(), "good.jsonl", "{\"text\": \"fine\"}\n");
    let empty = common::write_file(tmp.path(), "empty.jsonl", "\n");
    fails(
        vec![good, empty],
        InputSpec::default(),
        tmp.path(),
        &["empty.jsonl", "no documents"],
    );
}

#[test]
fn token_id_out_of_vocab() {
    let tmp = tempfile::tempdir().unwrap();
    let f = common::write_file(
        tmp.path(),
        "ids.jsonl",
        "{\"ids\": [1, 2]}\n{\"ids\": [3, 151669]}\n",
    );
    let spec = InputSpec {
        ids_field: Some("ids".into()),
        ..InputSpec::default()
    };
    fails(
        vec![f],
        spec,
        tmp.path(),
        &[
            "ids.jsonl",
            "row 1",
            "field `ids`",
            "token id 151669",
            "vocabulary of 151669",
        ],
    );
}

#[test]
fn unknown_role() {
    let tmp = tempfile::tempdir().unwrap();
    let f = common::write_file(
        tmp.path(),
        "c.jsonl",
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"robot\", \"content\": \"x\"}]}\n",
    );
    fails(
        vec![f],
        common::chat_spec(),
        tmp.path(),
        &[
            "c.jsonl",
            "row 0",
            "messages[1].role",
            "unknown role \"robot\"",
            "system, user and assistant",
        ],
    );
}

#[test]
fn invalid_json_line() {
    let tmp = tempfile::tempdir().unwrap();
    let f = common::write_file(tmp.path(), "in.jsonl", "{\"text\": \"a\"}\n\n{not json}\n");
    fails(
        vec![f],
        InputSpec::default(),
        tmp.path(),
        &["in.jsonl", "row 2", "invalid JSON"],
    );
}

#[test]
fn error_late_in_a_large_input_leaves_nothing() {
    // enough rows for several row groups and shards to be written before the failure
    let tmp = tempfile::tempdir().unwrap();
    let mut text = String::new();
    for i in 0..3000 {
        text.push_str(&format!(
            "{{\"text\": \"document number {i} with some words\"}}\n"
        ));
    }
    text.push_str("{\"text\": null}\n");
    let f = common::write_file(tmp.path(), "big.jsonl", &text);
    let out = tmp.path().join("out");
    let mut opts = common::options(vec![f], &out, InputSpec::default());
    opts.layout.row_group_tokens = 1000;
    opts.layout.shard_tokens = 4000;
    let err = prepare(&opts).err().unwrap().to_string();
    assert!(
        err.contains("row 3000") && err.contains("found null"),
        "{err}"
    );
    assert!(!out.exists());
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        1,
        "only the input remains"
    );
}

#[test]
fn existing_output_is_not_overwritten() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "x").unwrap();
    let f = common::write_file(tmp.path(), "in.jsonl", "{\"text\": \"a\"}\n");
    let err = prepare(&common::options(vec![f], &out, InputSpec::default()))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("already exists"), "{err}");
    assert!(out.join("keep.txt").exists());
}

#[test]
fn missing_tokenizer_file() {
    let tmp = tempfile::tempdir().unwrap();
    let f = common::write_file(tmp.path(), "in.jsonl", "{\"text\": \"a\"}\n");
    let mut opts = common::options(vec![f], &tmp.path().join("out"), InputSpec::default());
    opts.tokenizer = tmp.path().join("nope.json");
    let err = prepare(&opts).err().unwrap().to_string();
    assert!(err.contains("nope.json"), "{err}");
}
