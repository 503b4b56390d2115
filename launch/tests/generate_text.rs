//! `moeru generate` text mode on the committed smoke model and its tokenizer: completions
//! equal oracle mode's on the same tokenized prompts, the chat template is applied, stop
//! strings cut the text, a single prompt streams, and bad input is a clean error.

mod common;

use std::path::Path;

use common::{assert_clean_failure, moeru, p, workspace};
use moeru_checkpoints::{write_tensors, OwnedTensor, TensorFile};
use moeru_data::chat::{render_generation_prompt, Message};
use moeru_data::tokenizer::TextTokenizer;
use serde_json::Value;

const MODEL: &str = "recipes/smoke/base";
const TOKENIZER: &str = "recipes/smoke/base/tokenizer.json";
const PROMPTS: [&str; 3] = ["Once upon a time", "The", "Hello world, this is"];

fn ids_of(text: &str) -> Vec<i64> {
    let tok = TextTokenizer::from_file(&workspace().join(TOKENIZER)).unwrap();
    tok.encode_ids(text)
        .unwrap()
        .into_iter()
        .map(i64::from)
        .collect()
}

/// `moeru generate` succeeding: its stdout.
fn run_ok(args: &[&str]) -> String {
    let mut all = vec!["generate", "--model", MODEL];
    all.extend(args);
    let out = moeru(&all);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "moeru {all:?}: {stderr}");
    String::from_utf8(out.stdout).unwrap()
}

/// Text mode's JSON lines, by prompt index.
fn text_mode(args: &[&str], out: &Path) -> Vec<Value> {
    let mut all = vec!["--tokenizer", TOKENIZER, "--out", p(out)];
    all.extend(args);
    run_ok(&all);
    let lines: Vec<Value> = std::fs::read_to_string(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["prompt_index"], i, "{l}");
    }
    lines
}

fn ids(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

/// Oracle mode on `rows` left-padded with 0: each row's generated tokens.
fn oracle(rows: &[Vec<i64>], args: &[&str], dir: &Path) -> Vec<Vec<i64>> {
    let seq = rows.iter().map(Vec::len).max().unwrap();
    let (mut ids, mut mask) = (Vec::new(), Vec::new());
    for r in rows {
        ids.extend(std::iter::repeat_n(0, seq - r.len()).chain(r.iter().copied()));
        mask.extend(std::iter::repeat_n(0, seq - r.len()).chain(std::iter::repeat_n(1, r.len())));
    }
    let (input, out) = (dir.join("in.safetensors"), dir.join("out.safetensors"));
    let t = |v: &[i64]| OwnedTensor::i64(v, vec![rows.len(), seq]);
    write_tensors(
        &input,
        &[
            ("input_ids".into(), t(&ids)),
            ("attention_mask".into(), t(&mask)),
        ],
    )
    .unwrap();
    let mut all = vec!["--input", p(&input), "--out", p(&out)];
    all.extend(args);
    run_ok(&all);
    let (seqs, shape) = TensorFile::open(&out).unwrap().i64("sequences").unwrap();
    seqs.chunks(shape[1])
        .map(|row| row[seq..].to_vec())
        .collect()
}

#[test]
fn text_mode_equals_oracle_mode_in_any_batch_size() {
    let tmp = tempfile::tempdir().unwrap();
    let rows: Vec<Vec<i64>> = PROMPTS.iter().map(|t| ids_of(t)).collect();
    let free = oracle(&rows, &["--max-new-tokens", "6"], tmp.path());
    // An EOS that row 0 makes at its second step, so rows stop at different steps.
    let eos = free[0][1].to_string();
    let limits = [
        "--max-new-tokens",
        "6",
        "--eos-token-id",
        &eos,
        "--pad-token-id",
        "0",
    ];
    let want = oracle(&rows, &limits, tmp.path());
    let prompt_args: Vec<&str> = PROMPTS.iter().flat_map(|t| ["--prompt", *t]).collect();
    for batch in ["3", "2", "1"] {
        let mut args = limits.to_vec();
        args.extend(["--batch-size", batch]);
        args.extend(&prompt_args);
        let lines = text_mode(&args, &tmp.path().join("out.jsonl"));
        assert_eq!(lines.len(), 3);
        for (r, line) in lines.iter().enumerate() {
            assert_eq!(ids(&line["prompt_ids"]), rows[r], "batch {batch} row {r}");
            let got = ids(&line["completion_ids"]);
            let stop = want[r].iter().position(|t| t.to_string() == eos);
            let n = stop.map_or(want[r].len(), |i| i + 1);
            assert_eq!(
                got,
                want[r][..n.min(want[r].len())],
                "batch {batch} row {r}"
            );
            let reason = if stop.is_some() { "stop" } else { "length" };
            assert_eq!(line["finish_reason"], reason, "batch {batch} row {r}");
            assert!(want[r][n.min(want[r].len())..].iter().all(|&t| t == 0));
        }
    }
}

#[test]
fn chat_prompts_are_the_rendered_template() {
    let tmp = tempfile::tempdir().unwrap();
    let user = |c: &str| Message {
        role: "user".into(),
        content: c.into(),
        reasoning_content: None,
    };
    for thinking in [true, false] {
        let flag = if thinking { "true" } else { "false" };
        let base = ["--max-new-tokens", "3", "--chat", "--enable-thinking", flag];
        let mut args = base.to_vec();
        args.extend(["--prompt", "Hello"]);
        let line = &text_mode(&args, &tmp.path().join("a.jsonl"))[0];
        let rendered = render_generation_prompt(&[user("Hello")], thinking).unwrap();
        assert_eq!(
            ids(&line["prompt_ids"]),
            ids_of(&rendered),
            "thinking {thinking}"
        );
        // The same conversation as a JSONL `messages` line.
        let file = tmp.path().join("prompts.jsonl");
        let messages = r#"{"messages": [{"role": "user", "content": "Hello"}]}"#;
        std::fs::write(&file, format!("{messages}\n\n{{\"prompt\": \"Hello\"}}\n")).unwrap();
        let mut args = base.to_vec();
        args.extend(["--prompts", p(&file)]);
        let lines = text_mode(&args, &tmp.path().join("b.jsonl"));
        assert_eq!(lines.len(), 2);
        for l in &lines {
            assert_eq!(l["prompt_ids"], line["prompt_ids"]);
            assert_eq!(l["completion_ids"], line["completion_ids"]);
        }
    }
}

#[test]
fn stop_strings_cut_the_text_and_pad_the_row() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.jsonl");
    let base = ["--max-new-tokens", "8", "--prompt", PROMPTS[0]];
    let free = text_mode(&base, &out)[0].clone();
    let text = free["text"].as_str().unwrap().to_string();
    assert!(text.len() > 6, "{text}");
    // A stop string that ends inside the second half of the completion.
    let stop = &text[text.len() / 2..text.len() / 2 + 3];
    let end = text.find(stop).unwrap() + stop.len();
    let mut args = base.to_vec();
    args.extend(["--stop", stop, "--stop", "never seen"]);
    let cut = text_mode(&args, &out)[0].clone();
    assert_eq!(cut["text"], text[..end], "stop {stop:?}");
    assert_eq!(cut["finish_reason"], "stop");
    let (got, all) = (ids(&cut["completion_ids"]), ids(&free["completion_ids"]));
    assert!(
        got.len() < all.len() && all.starts_with(&got),
        "{got:?} {all:?}"
    );
    // Oracle mode with the tokenizer: the same tokens, then pads.
    let rows = vec![ids_of(PROMPTS[0])];
    let mut args = vec!["--max-new-tokens", "8", "--pad-token-id", "3"];
    args.extend(["--tokenizer", TOKENIZER, "--stop", stop]);
    let seq = &oracle(&rows, &args, tmp.path())[0];
    assert_eq!(seq[..got.len()], got[..]);
    assert!(seq[got.len()..].iter().all(|&t| t == 3), "{seq:?}");
}

#[test]
fn a_single_prompt_streams_its_text() {
    let tmp = tempfile::tempdir().unwrap();
    let args = ["--max-new-tokens", "6", "--prompt", PROMPTS[2]];
    let line = text_mode(&args, &tmp.path().join("out.jsonl"))[0].clone();
    let mut all = vec!["--tokenizer", TOKENIZER];
    all.extend(args);
    let stdout = run_ok(&all);
    assert_eq!(stdout, format!("{}\n", line["text"].as_str().unwrap()));
    // Two prompts without --out: JSON lines on stdout.
    all.extend(["--prompt", PROMPTS[0]]);
    let stdout = run_ok(&all);
    let first: Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
    assert_eq!(first["completion_ids"], line["completion_ids"]);
}

#[test]
fn bad_text_input_is_a_clean_error() {
    let tmp = tempfile::tempdir().unwrap();
    let fail = |extra: &[&str]| {
        let mut args = vec!["generate", "--model", MODEL, "--max-new-tokens", "2"];
        args.extend(extra);
        assert_clean_failure(&moeru(&args))
    };
    let jsonl = tmp.path().join("prompts.jsonl");
    std::fs::write(&jsonl, "{\"prompt\": \"a\"}\n\n{\"text\": \"b\"}\n").unwrap();
    let e = fail(&["--tokenizer", TOKENIZER, "--prompts", p(&jsonl)]);
    assert!(e.contains("prompts.jsonl:3"), "{e}");
    std::fs::write(&jsonl, "{\"prompt\": \"a\"}\nnot json\n").unwrap();
    let e = fail(&["--tokenizer", TOKENIZER, "--prompts", p(&jsonl)]);
    assert!(e.contains("prompts.jsonl:2"), "{e}");
    let e = fail(&["--tokenizer", "no/tokenizer.json", "--prompt", "a"]);
    assert!(e.contains("no/tokenizer.json"), "{e}");
    let e = fail(&["--prompt", "a"]);
    assert!(e.contains("--tokenizer"), "{e}");
    let e = fail(&[
        "--tokenizer",
        TOKENIZER,
        "--prompt",
        "a",
        "--input",
        "x.safetensors",
    ]);
    assert!(e.contains("--input"), "{e}");
    let e = fail(&[
        "--input",
        "x.safetensors",
        "--out",
        "y.safetensors",
        "--stop",
        "a",
    ]);
    assert!(e.contains("--stop needs --tokenizer"), "{e}");
    // A model whose positions end before the prompt does.
    let model = tmp.path().join("model");
    std::fs::create_dir(&model).unwrap();
    let src = workspace().join(MODEL);
    std::fs::copy(
        src.join("model.safetensors"),
        model.join("model.safetensors"),
    )
    .unwrap();
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    config["max_position_embeddings"] = 3.into();
    std::fs::write(model.join("config.json"), config.to_string()).unwrap();
    let args = ["generate", "--model", p(&model), "--max-new-tokens", "2"];
    let mut args = args.to_vec();
    args.extend(["--tokenizer", TOKENIZER, "--prompt", PROMPTS[2]]);
    let e = assert_clean_failure(&moeru(&args));
    assert!(
        e.contains("prompt 0") && e.contains("max_position_embeddings"),
        "{e}"
    );
}
