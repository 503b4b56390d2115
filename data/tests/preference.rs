//! Preference (DPO) data: `prepare --preference` tokenizes plain and conversational rows to
//! exactly TRL 1.16's ids (committed fixtures from tests/fixtures/make_preference_reference.py),
//! and the pair loader's stream is the same at any DP size, resumes exactly, keeps pair ids
//! stable and truncates as TRL's `keep_start`. Bad rows: tests/preference_errors.rs.

mod common;

use common::run;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, StringArray};
use moeru_data::input::{InputSpec, PreferenceSpec};
use moeru_data::pairs::split_document;
use moeru_data::reader::ShardReader;
use moeru_data::shard_writer::ShardLayout;
use moeru_data::{
    prepare, DataLoader, LoaderConfig, LoaderState, Manifest, PairLoader, PairLoaderConfig,
    PreferencePair,
};
use serde_json::Value;

fn pref_spec(seq_len: Option<usize>) -> InputSpec {
    InputSpec {
        preference: Some(PreferenceSpec {
            seq_len,
            ..PreferenceSpec::default()
        }),
        ..InputSpec::default()
    }
}

/// Prepare `inputs` in preference mode with the EOS TRL uses for this tokenizer.
fn prepare_pref(inputs: Vec<PathBuf>, out: &Path, layout: ShardLayout) -> Manifest {
    let mut opts = common::options(inputs, out, pref_spec(None));
    opts.eos_token = "<|im_end|>".into();
    opts.layout = layout;
    prepare(&opts).unwrap().manifest
}

/// Every stored pair, in manifest order, split by the part codes.
fn stored_pairs(dir: &Path) -> Vec<[Vec<i32>; 3]> {
    let m = Manifest::read(dir).unwrap();
    let mut r = ShardReader::new(dir, &m);
    let mut out = Vec::new();
    for (s, shard) in m.shards.iter().enumerate() {
        for g in 0..shard.row_groups.len() {
            let docs = r.read(s, g).unwrap();
            for i in 0..docs.len() {
                let (ids, mask) = docs.doc(i);
                let parts = split_document(ids, mask).expect("part codes 0.., 1.., 2..");
                out.push(parts.map(<[i32]>::to_vec));
            }
        }
    }
    out
}

fn expected(file: &str) -> Vec<[Vec<i32>; 3]> {
    let all: Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixtures().join("preference_expected.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(all["trl"], "1.16.0");
    assert_eq!(all["eos_token"], "<|im_end|>");
    let ids = |v: &Value| -> Vec<i32> { serde_json::from_value(v.clone()).unwrap() };
    all[file]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            [
                ids(&r["prompt_ids"]),
                ids(&r["chosen_ids"]),
                ids(&r["rejected_ids"]),
            ]
        })
        .collect()
}

#[test]
fn plain_and_conversational_rows_match_trl() {
    let tmp = tempfile::tempdir().unwrap();
    let files = ["preference_plain.jsonl", "preference_chat.jsonl"];
    let out = tmp.path().join("pref");
    let inputs = files.iter().map(|f| common::fixtures().join(f)).collect();
    let m = prepare_pref(inputs, &out, ShardLayout::default());
    let want: Vec<[Vec<i32>; 3]> = files.iter().flat_map(|f| expected(f)).collect();
    assert_eq!(stored_pairs(&out), want);
    assert_eq!((m.mode.as_str(), m.documents), ("preference", 8));
    let completions: usize = want.iter().map(|p| p[1].len() + p[2].len()).sum();
    let all: usize = want
        .iter()
        .map(|p| p[0].len() + p[1].len() + p[2].len())
        .sum();
    assert_eq!((m.loss_tokens, m.tokens), (completions as u64, all as u64));
    // the pair loader gives the same pairs, ids in manifest order
    let pairs = PairLoader::all_pairs(&out, 4096).unwrap();
    for (i, (p, w)) in pairs.iter().zip(&want).enumerate() {
        assert_eq!(p.id, i as u64);
        assert_eq!([&p.prompt, &p.chosen, &p.rejected], [&w[0], &w[1], &w[2]]);
    }
}

#[test]
fn parquet_inputs_equal_jsonl() {
    let tmp = tempfile::tempdir().unwrap();
    // HF datasets' conversational Parquet (committed) and a plain Parquet written here
    let chat = prepare_pref(
        vec![common::fixtures().join("preference_chat.parquet")],
        &tmp.path().join("chat"),
        ShardLayout::default(),
    );
    assert_eq!(chat.documents, 3);
    assert_eq!(
        stored_pairs(&tmp.path().join("chat")),
        expected("preference_chat.jsonl")
    );
    let rows: Vec<Value> =
        std::fs::read_to_string(common::fixtures().join("preference_plain.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    let col = |k: &'static str| -> (&'static str, ArrayRef) {
        let v: Vec<&str> = rows.iter().map(|r| r[k].as_str().unwrap()).collect();
        (k, Arc::new(StringArray::from(v)) as ArrayRef)
    };
    let cols = ["rejected", "prompt", "chosen"].map(col);
    let batch = RecordBatch::try_from_iter(cols).unwrap();
    let path = tmp.path().join("plain.parquet");
    let f = std::fs::File::create(&path).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(f, batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    prepare_pref(
        vec![path],
        &tmp.path().join("plain"),
        ShardLayout::default(),
    );
    assert_eq!(
        stored_pairs(&tmp.path().join("plain")),
        expected("preference_plain.jsonl")
    );
}

/// A synthetic plain preference dataset of `n` pairs in many row groups and shards.
fn synthetic(dir: &Path, n: usize) -> PathBuf {
    let input = dir.join("pairs.jsonl");
    let mut f = std::fs::File::create(&input).unwrap();
    for i in 0..n {
        let words = |k: usize| {
            (0..k)
                .map(|j| format!(" w{}", (i * 7 + j) % 23))
                .collect::<String>()
        };
        let row = serde_json::json!({
            "prompt": format!("Question {i}:{}", words(1 + i % 5)),
            "chosen": words(2 + i % 4),
            "rejected": words(1 + i % 6),
        });
        writeln!(f, "{row}").unwrap();
    }
    drop(f);
    let out = dir.join("ds");
    let layout = ShardLayout {
        shard_tokens: 400,
        row_group_tokens: 60,
        zstd_level: 1,
    };
    let m = prepare_pref(vec![input], &out, layout);
    assert!(m.shards.len() > 1 && m.shards[0].row_groups.len() > 1);
    out
}

fn cfg(dir: &Path, micro: usize, rank: usize, size: usize) -> PairLoaderConfig {
    let mut c = PairLoaderConfig::new(dir, 4096, micro, 11).with_rank(rank, size);
    c.window_row_groups = 2;
    c.epochs = Some(2);
    c
}

/// Global batches of the stream at `dp_size` ranks: ranks' blocks concatenated per step.
fn global_batches(
    dir: &Path,
    micro: usize,
    size: usize,
    state: Option<&LoaderState>,
) -> Vec<Vec<PreferencePair>> {
    let mut loaders: Vec<PairLoader> = (0..size)
        .map(|r| match state {
            Some(s) => PairLoader::from_state(cfg(dir, micro, r, size), s).unwrap(),
            None => PairLoader::new(cfg(dir, micro, r, size)).unwrap(),
        })
        .collect();
    let mut out = Vec::new();
    loop {
        let batches: Vec<Option<Vec<PreferencePair>>> = loaders
            .iter_mut()
            .map(|l| l.next_batch().unwrap())
            .collect();
        if batches.iter().any(Option::is_none) {
            assert!(
                batches.iter().all(Option::is_none),
                "ranks disagree on the end"
            );
            return out;
        }
        let states: Vec<LoaderState> = loaders.iter().map(PairLoader::state).collect();
        assert!(
            states.windows(2).all(|w| w[0] == w[1]),
            "ranks hold different states"
        );
        out.push(batches.into_iter().flatten().flatten().collect());
    }
}

#[test]
fn pair_stream_is_the_same_at_any_dp_size_and_ids_are_stable() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = synthetic(tmp.path(), 45);
    let dp1 = global_batches(&dir, 4, 1, None);
    let dp2 = global_batches(&dir, 2, 2, None);
    assert_eq!(dp1, dp2);
    assert_eq!(dp1.len(), 90 / 4);
    let all = PairLoader::all_pairs(&dir, 4096).unwrap();
    assert_eq!(all.len(), 45);
    let flat: Vec<&PreferencePair> = dp1.iter().flatten().collect();
    for p in &flat {
        assert_eq!(
            *p, &all[p.id as usize],
            "pair {} differs from its stored row",
            p.id
        );
    }
    let mut first_epoch: Vec<u64> = flat[..45].iter().map(|p| p.id).collect();
    assert_ne!(
        first_epoch,
        (0..45).collect::<Vec<_>>(),
        "the stream is not shuffled"
    );
    first_epoch.sort();
    assert_eq!(first_epoch, (0..45).collect::<Vec<_>>());
    let second: Vec<u64> = flat[45..].iter().map(|p| p.id).collect();
    assert_ne!(
        second,
        flat[..second.len()]
            .iter()
            .map(|p| p.id)
            .collect::<Vec<_>>()
    );
}

#[test]
fn resume_mid_epoch_gives_the_rest_exactly_at_any_dp_size() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = synthetic(tmp.path(), 45);
    let full = global_batches(&dir, 2, 2, None);
    let mut l = PairLoader::new(cfg(&dir, 4, 0, 1)).unwrap();
    for _ in 0..5 {
        l.next_batch().unwrap().unwrap();
    }
    let state = LoaderState::from_json(&l.state().to_json()).unwrap();
    assert_eq!(state.samples, 20);
    let rest_dp2 = global_batches(&dir, 2, 2, Some(&state));
    assert_eq!(rest_dp2, full[5..]);
    let rest_dp1 = global_batches(&dir, 4, 1, Some(&state));
    assert_eq!(rest_dp1, full[5..]);
    // a state of the packed-sample loader is refused (and vice versa)
    let err = PairLoader::new(cfg(&dir, 4, 0, 1))
        .unwrap()
        .resume(
            &LoaderState {
                stream: moeru_data::StreamKind::Samples,
                ..state.clone()
            },
            0,
            1,
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("`stream`"), "{err}");
    let err = DataLoader::new(LoaderConfig::new(&dir, 64, 1, 0))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("preference"), "{err}");
}

#[test]
fn truncation_keeps_the_start_and_a_long_prompt_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("pref");
    prepare_pref(
        vec![common::fixtures().join("preference_chat.jsonl")],
        &out,
        ShardLayout::default(),
    );
    let full = PairLoader::all_pairs(&out, 4096).unwrap();
    let longest_prompt = full.iter().map(|p| p.prompt.len()).max().unwrap();
    let n = longest_prompt + 3;
    for (p, f) in PairLoader::all_pairs(&out, n).unwrap().iter().zip(&full) {
        assert_eq!(p.prompt, f.prompt);
        assert_eq!(
            p.chosen[..],
            f.chosen[..f.chosen.len().min(n - f.prompt.len())]
        );
        assert_eq!(
            p.rejected[..],
            f.rejected[..f.rejected.len().min(n - f.prompt.len())]
        );
        assert!(p.prompt.len() + p.chosen.len() <= n && p.prompt.len() + p.rejected.len() <= n);
    }
    // the third conversation has the longest prompt: row 2 of the only shard
    let err = PairLoader::all_pairs(&out, longest_prompt)
        .unwrap_err()
        .to_string();
    for needle in [
        "shard-00000.parquet",
        "row 2",
        "field `prompt`",
        &format!("prompt is {longest_prompt} tokens"),
    ] {
        assert!(err.contains(needle), "{err:?} lacks {needle:?}");
    }
}

#[test]
fn pair_loader_refuses_a_dataset_that_is_not_preference() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("chat");
    prepare(&common::options(
        vec![common::fixtures().join("chat.jsonl")],
        &out,
        common::chat_spec(),
    ))
    .unwrap();
    let err = PairLoader::new(PairLoaderConfig::new(&out, 64, 1, 0))
        .err()
        .unwrap()
        .to_string();
    for needle in ["chat", "\"chat\"", "--preference", out.to_str().unwrap()] {
        assert!(err.contains(needle), "{err:?} lacks {needle:?}");
    }
}

#[test]
fn cli_prepare_and_inspect_preference() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("pref");
    let tok = common::tokenizer_path();
    let input = common::fixtures().join("preference_plain.jsonl");
    let (tok, input, out_s) = (
        tok.to_str().unwrap(),
        input.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    let base = [
        "prepare",
        "--tokenizer",
        tok,
        "--input",
        input,
        "--output",
        out_s,
        "--quiet",
    ];
    let with = |extra: &[&'static str]| [&base[..], extra].concat();
    run(&with(&[
        "--preference",
        "--eos-token",
        "<|im_end|>",
        "--seq-len",
        "64",
    ]))
    .unwrap();
    assert_eq!(stored_pairs(&out), expected("preference_plain.jsonl"));
    run(&["inspect", out_s, "--samples", "3", "--seq-len", "32"]).unwrap();
    // the default EOS is <|endoftext|>, appended as TRL appends tokenizer.eos_token
    let out2 = tmp.path().join("pref2");
    let base2 = [
        "prepare",
        "--tokenizer",
        tok,
        "--input",
        input,
        "--output",
        out2.to_str().unwrap(),
        "--quiet",
        "--preference",
    ];
    run(&base2).unwrap();
    for (i, (got, want)) in stored_pairs(&out2)
        .iter()
        .zip(expected("preference_plain.jsonl"))
        .enumerate()
    {
        // row 2's chosen already ends in `<|im_end|>` (then TRL appends no second EOS)
        let keep = want[1].len() - usize::from(i != 2);
        assert_eq!(got[1], [&want[1][..keep], &[151_643]].concat(), "row {i}");
    }
    for bad in [
        &["--preference", "--chat"][..],
        &["--preference", "--ids-field", "x"],
        &["--seq-len", "8"],
    ] {
        let args: Vec<&str> = with(bad);
        assert!(!common::parses(&args), "{bad:?} should be refused");
    }
}

#[test]
fn cli_prepare_reads_renamed_fields() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = common::tokenizer_path();
    let input = common::fixtures().join("preference_plain.jsonl");
    let renamed: String = std::fs::read_to_string(&input)
        .unwrap()
        .replace("\"prompt\":", "\"q\":")
        .replace("\"chosen\":", "\"good\":")
        .replace("\"rejected\":", "\"bad\":");
    let input = common::write_file(tmp.path(), "renamed.jsonl", &renamed);
    let out = tmp.path().join("pref");
    let names = [
        "--prompt-field",
        "q",
        "--chosen-field",
        "good",
        "--rejected-field",
        "bad",
    ];
    let mut args = vec![
        "prepare",
        "--preference",
        "--quiet",
        "--eos-token",
        "<|im_end|>",
    ];
    args.extend([
        "--tokenizer",
        tok.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
    ]);
    args.extend(["--output", out.to_str().unwrap()]);
    args.extend(names);
    run(&args).unwrap();
    assert_eq!(stored_pairs(&out), expected("preference_plain.jsonl"));
}
