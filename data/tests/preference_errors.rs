//! Bad preference rows (JSONL through the CLI, Parquet through `prepare`) give one-line errors
//! naming the input file, the row and the field, and leave no output behind.

mod common;

use common::run;

use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, StringArray};
use moeru_data::input::{InputSpec, PreferenceSpec};
use moeru_data::prepare;

/// Prepare one bad JSONL row (after a good one) via the CLI; check the one-line error and that
/// nothing is left behind.
fn bad_row(line: &str, extra: &[&str], needles: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let good = r#"{"prompt": "Hi", "chosen": " a", "rejected": " b"}"#;
    let input = common::write_file(tmp.path(), "in.jsonl", &format!("{good}\n{line}\n"));
    let out = tmp.path().join("out");
    let tok = common::tokenizer_path();
    let mut args = vec![
        "prepare",
        "--preference",
        "--quiet",
        "--tokenizer",
        tok.to_str().unwrap(),
    ];
    args.extend([
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    args.extend(extra);
    let err = run(&args).expect_err("prepare should fail").to_string();
    assert!(!err.contains('\n'), "error is not one line: {err}");
    for n in ["in.jsonl", "row 1"].iter().chain(needles) {
        assert!(err.contains(n), "error {err:?} lacks {n:?}");
    }
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "in.jsonl")
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn bad_rows_name_file_row_and_field() {
    bad_row(
        r#"{"prompt": "Hi", "chosen": " a"}"#,
        &[],
        &["field `rejected`", "missing", "--rejected-field"],
    );
    bad_row(
        r#"{"chosen": " a", "rejected": " b"}"#,
        &[],
        &["field `prompt`", "missing", "--prompt-field"],
    );
    bad_row(
        r#"{"prompt": "Hi", "chosen": 3, "rejected": " b"}"#,
        &[],
        &["field `chosen`", "a number"],
    );
    bad_row(
        r#"{"prompt": 3, "chosen": " a", "rejected": " b"}"#,
        &[],
        &["field `prompt`", "a number"],
    );
    bad_row(
        r#"{"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]}"#,
        &[],
        &["field `chosen`", "a list of messages", "a string"],
    );
    bad_row(
        r#"{"prompt": [{"role": "user", "content": "q"}], "chosen": [], "rejected": [{"role": "assistant", "content": "b"}]}"#,
        &[],
        &["field `chosen`", "empty"],
    );
    bad_row(
        r#"{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "robot", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}"#,
        &[],
        &["field `chosen[0].role`", "robot"],
    );
    bad_row(
        r#"{"prompt": "one two three four five six seven eight nine ten", "chosen": " a", "rejected": " b"}"#,
        &["--seq-len", "8"],
        &[
            "field `prompt`",
            "prompt is 10 tokens; --seq-len is 8",
            "raise --seq-len",
        ],
    );
}

#[test]
fn bad_parquet_columns_name_file_row_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    let write = |name: &str, cols: Vec<(&'static str, ArrayRef)>| {
        let batch = RecordBatch::try_from_iter(cols).unwrap();
        let path = tmp.path().join(name);
        let f = std::fs::File::create(&path).unwrap();
        let mut w = parquet::arrow::ArrowWriter::try_new(f, batch.schema(), None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        path
    };
    let s = |v: Vec<Option<&str>>| Arc::new(StringArray::from(v)) as ArrayRef;
    let ints = Arc::new(arrow::array::Int64Array::from(vec![1, 2])) as ArrayRef;
    let cases = [
        (
            write(
                "missing.parquet",
                vec![
                    ("prompt", s(vec![Some("a"), Some("b")])),
                    ("chosen", s(vec![Some("c"), Some("d")])),
                ],
            ),
            vec!["missing.parquet", "field `rejected`", "missing", "columns"],
        ),
        (
            write(
                "ints.parquet",
                vec![
                    ("prompt", s(vec![Some("a"), Some("b")])),
                    ("chosen", ints),
                    ("rejected", s(vec![Some("c"), Some("d")])),
                ],
            ),
            vec!["ints.parquet", "row 0", "field `chosen`", "Int64"],
        ),
        (
            write(
                "null.parquet",
                vec![
                    ("prompt", s(vec![Some("a"), Some("b")])),
                    ("chosen", s(vec![Some("c"), Some("d")])),
                    ("rejected", s(vec![Some("e"), None])),
                ],
            ),
            vec!["null.parquet", "row 1", "field `rejected`", "null"],
        ),
    ];
    for (path, needles) in cases {
        let out = tmp.path().join("out");
        let spec = InputSpec {
            preference: Some(PreferenceSpec::default()),
            ..InputSpec::default()
        };
        let err = prepare(&common::options(vec![path], &out, spec))
            .expect_err("prepare should fail")
            .to_string();
        for n in needles {
            assert!(err.contains(n), "error {err:?} lacks {n:?}");
        }
        assert!(!out.exists());
    }
}
