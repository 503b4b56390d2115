//! `moeru generate` end to end: greedy output equals transformers' (the fixtures of
//! tests/reference/make_generation_reference.py) with the stop ids read from the model folder,
//! right padding realigned, a LoRA checkpoint used directly; sampling is seeded; bad input
//! is a clean error.

mod common;

use std::path::{Path, PathBuf};

use common::{assert_clean_failure, moeru, p, workspace};
use moeru_checkpoints::{write_tensors, OwnedTensor, TensorFile};

fn fixture(name: &str) -> TensorFile {
    TensorFile::open(&workspace().join(format!("tests/reference/generation/{name}.safetensors")))
        .unwrap()
}

fn write_input(path: &Path, ids: &[i64], mask: &[i64], shape: &[usize]) {
    let t = |v: &[i64]| OwnedTensor::i64(v, shape.to_vec());
    let tensors = [
        ("input_ids".into(), t(ids)),
        ("attention_mask".into(), t(mask)),
    ];
    write_tensors(path, &tensors).unwrap();
}

/// A fixture's prompts written as `moeru generate` input in a fresh folder.
struct Case {
    tmp: tempfile::TempDir,
    refs: TensorFile,
    ids: Vec<i64>,
    mask: Vec<i64>,
    shape: Vec<usize>,
    input: PathBuf,
    out: PathBuf,
}

fn case(name: &str) -> Case {
    let tmp = tempfile::tempdir().unwrap();
    let refs = fixture(name);
    let (ids, shape) = refs.i64("input_ids").unwrap();
    let (mask, _) = refs.i64("attention_mask").unwrap();
    let (input, out) = (
        tmp.path().join("in.safetensors"),
        tmp.path().join("out.safetensors"),
    );
    write_input(&input, &ids, &mask, &shape);
    Case {
        tmp,
        refs,
        ids,
        mask,
        shape,
        input,
        out,
    }
}

/// `sequences` of `moeru generate ARGS --input IN --out OUT`.
fn generate(args: &[&str], input: &Path, out: &Path) -> (Vec<i64>, Vec<usize>) {
    let mut all = vec!["generate", "--input", p(input), "--out", p(out)];
    all.extend(args);
    let run = moeru(&all);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "moeru {all:?}: {stderr}");
    TensorFile::open(out).unwrap().i64("sequences").unwrap()
}

/// Each row's real tokens moved to its start.
fn right_padded(ids: &[i64], mask: &[i64], seq: usize) -> (Vec<i64>, Vec<i64>) {
    let (mut out_ids, mut out_mask) = (Vec::new(), Vec::new());
    for r in 0..ids.len() / seq {
        let real: Vec<i64> = (r * seq..(r + 1) * seq)
            .filter(|&i| mask[i] == 1)
            .map(|i| ids[i])
            .collect();
        let pad = seq - real.len();
        out_mask.extend(std::iter::repeat_n(1, real.len()).chain(std::iter::repeat_n(0, pad)));
        out_ids.extend(real.into_iter().chain(std::iter::repeat_n(0, pad)));
    }
    (out_ids, out_mask)
}

#[test]
fn greedy_equals_transformers_with_the_folders_stop_ids() {
    let Case {
        tmp,
        refs,
        ids,
        mask,
        shape,
        input,
        out,
    } = case("qwen3-moe-mixed");
    let (want, want_shape) = refs.i64("sequences").unwrap();
    let eos = refs.i64("eos").unwrap().0[0];
    // The model folder with a generation_config.json naming two stop ids (one never made).
    let model = tmp.path().join("model");
    std::fs::create_dir(&model).unwrap();
    let src = workspace().join("tests/reference/models/qwen3-moe-mixed");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), model.join(f)).unwrap();
    }
    let unused = (1..).find(|t| !want.contains(t)).unwrap();
    let gen_cfg = format!(r#"{{"eos_token_id": [{unused}, {eos}], "pad_token_id": 0}}"#);
    std::fs::write(model.join("generation_config.json"), gen_cfg).unwrap();
    let args = ["--model", p(&model), "--max-new-tokens", "10"];
    assert_eq!(
        generate(&args, &input, &out),
        (want.clone(), want_shape.clone())
    );
    let (rids, rmask) = right_padded(&ids, &mask, shape[1]);
    write_input(&input, &rids, &rmask, &shape);
    assert_eq!(
        generate(&args, &input, &out),
        (want, want_shape),
        "right padding"
    );
}

#[test]
fn a_lora_checkpoint_generates_as_peft() {
    // `_tmp` keeps the folder alive (a field left to `..` would be dropped here).
    let Case {
        tmp: _tmp,
        refs,
        input,
        out,
        ..
    } = case("lora-moe-mixed-experts-router");
    let want = refs.i64("sequences").unwrap();
    let eos = refs.i64("eos").unwrap().0[0].to_string();
    let stop = [
        "--max-new-tokens",
        "10",
        "--eos-token-id",
        &eos,
        "--pad-token-id",
        "0",
    ];
    let adapter = "tests/reference/lora/moe-mixed-experts-router";
    let mut direct = vec!["--model", adapter];
    direct.extend(stop);
    assert_eq!(
        generate(&direct, &input, &out),
        want,
        "the adapter folder alone"
    );
    let mut on_base = vec!["--model", "tests/reference/models/qwen3-moe-mixed"];
    on_base.extend(["--adapter", adapter]);
    on_base.extend(stop);
    assert_eq!(
        generate(&on_base, &input, &out),
        want,
        "--adapter on its base"
    );
}

#[test]
fn sampling_is_seeded_and_bad_input_is_a_clean_error() {
    let Case {
        tmp,
        ids,
        mask,
        shape,
        input,
        out,
        ..
    } = case("qwen3-dense-tied");
    let model = "tests/reference/models/qwen3-dense-tied";
    let sample = |seed: &str| {
        let args = [
            "--model",
            model,
            "--max-new-tokens",
            "8",
            "--temperature",
            "1.5",
        ];
        let mut args = args.to_vec();
        args.extend(["--top-k", "40", "--top-p", "0.95", "--seed", seed]);
        generate(&args, &input, &out)
    };
    let (a, b) = (sample("3"), sample("3"));
    assert_eq!(a, b, "same seed, same tokens");
    assert_ne!(a, sample("4"), "another seed, other tokens");
    let base = [
        "generate",
        "--model",
        model,
        "--out",
        p(&out),
        "--max-new-tokens",
        "4",
    ];
    let with = |extra: &[&str]| {
        let mut args = base.to_vec();
        args.extend(extra);
        assert_clean_failure(&moeru(&args))
    };
    let e = with(&["--input", p(&input), "--top-p", "0"]);
    assert!(e.contains("--top-p 0"), "{e}");
    let mut holes = mask.clone();
    let first_real = holes.iter().position(|&m| m == 1).unwrap();
    holes[first_real + 1] = 0;
    let bad = tmp.path().join("bad.safetensors");
    write_input(&bad, &ids, &holes, &shape);
    let e = with(&["--input", p(&bad)]);
    assert!(
        e.contains("bad.safetensors") && e.contains("attention_mask"),
        "{e}"
    );
}
