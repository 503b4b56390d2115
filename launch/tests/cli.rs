//! The `moeru` binary end to end: forward parity, export, and how bad input is reported.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use moeru_checkpoints::{write_tensors, OwnedTensor, TensorFile};

fn reference() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/reference")
}

fn moeru(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moeru"))
        .args(args)
        .output()
        .expect("run moeru")
}

/// A failed run: non-zero exit, one `error:` line on stderr, no panic or backtrace.
fn assert_clean_failure(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {stderr}"
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{stderr}"
    );
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "not one line: {stderr}"
    );
    assert!(stderr.starts_with("error:"), "{stderr}");
    stderr
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn forward_matches_transformers() {
    let name = "qwen3-moe-norm-sharded";
    let refs = TensorFile::open(&reference().join(format!("outputs/{name}.safetensors"))).unwrap();
    let (ids, shape) = refs.i64("input_ids").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.safetensors");
    write_tensors(
        &input,
        &[("input_ids".into(), OwnedTensor::i64(&ids, shape))],
    )
    .unwrap();
    let output = tmp.path().join("out.safetensors");
    let model = reference().join("models").join(name);
    let out = moeru(&[
        "forward",
        "--model",
        p(&model),
        "--input",
        p(&input),
        "--out",
        p(&output),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let ours = TensorFile::open(&output).unwrap();
    let (logits, lshape) = ours.f32("logits").unwrap();
    let (ref_logits, ref_shape) = refs.f32("logits").unwrap();
    assert_eq!(lshape, ref_shape);
    let diff = logits
        .iter()
        .zip(&ref_logits)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(diff <= 1e-4, "max |logits diff| {diff:e}");
    let loss = ours.f32("loss").unwrap().0[0];
    let ref_loss = refs.f32("loss").unwrap().0[0];
    assert!((loss - ref_loss).abs() <= 1e-5, "loss {loss} vs {ref_loss}");
    let aux = ours.f32("aux_loss").unwrap().0[0];
    assert!((aux - refs.f32("aux_loss").unwrap().0[0]).abs() <= 1e-5);
}

#[test]
fn export_writes_a_loadable_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("hf");
    let model = reference().join("models/qwen3-moe-mixed");
    let out = moeru(&["export", "--model", p(&model), "--out", p(&dest)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dest.join("config.json").exists() && dest.join("model.safetensors").exists());
    let file = TensorFile::open(&dest.join("model.safetensors")).unwrap();
    assert!(file
        .shapes()
        .iter()
        .any(|(n, s)| n == "model.layers.2.mlp.experts.3.down_proj.weight" && s == &vec![32, 16]));

    // A second export to the same place is refused and leaves the first intact.
    let again = moeru(&["export", "--model", p(&model), "--out", p(&dest)]);
    let msg = assert_clean_failure(&again);
    assert!(msg.contains("already exists"), "{msg}");
    assert!(TensorFile::open(&dest.join("model.safetensors")).is_ok());
}

#[test]
fn bad_inputs_fail_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let model = reference().join("models/qwen3-dense-tied");
    let output = tmp.path().join("out.safetensors");

    let missing = tmp.path().join("no-such-model");
    let input = tmp.path().join("in.safetensors");
    write_tensors(
        &input,
        &[("input_ids".into(), OwnedTensor::i64(&[1, 2, 3], vec![1, 3]))],
    )
    .unwrap();
    let msg = assert_clean_failure(&moeru(&[
        "forward",
        "--model",
        p(&missing),
        "--input",
        p(&input),
        "--out",
        p(&output),
    ]));
    assert!(
        msg.contains("no-such-model") && msg.contains("config.json"),
        "{msg}"
    );

    let bad_ids = tmp.path().join("bad.safetensors");
    write_tensors(
        &bad_ids,
        &[(
            "input_ids".into(),
            OwnedTensor::i64(&[1, 2, 96], vec![1, 3]),
        )],
    )
    .unwrap();
    let msg = assert_clean_failure(&moeru(&[
        "forward",
        "--model",
        p(&model),
        "--input",
        p(&bad_ids),
        "--out",
        p(&output),
    ]));
    assert!(
        msg.contains("96") && msg.contains("0..96") && msg.contains("bad.safetensors"),
        "{msg}"
    );

    let no_ids = tmp.path().join("noids.safetensors");
    write_tensors(
        &no_ids,
        &[("tokens".into(), OwnedTensor::i64(&[1, 2], vec![1, 2]))],
    )
    .unwrap();
    let msg = assert_clean_failure(&moeru(&[
        "forward",
        "--model",
        p(&model),
        "--input",
        p(&no_ids),
        "--out",
        p(&output),
    ]));
    assert!(msg.contains("`input_ids`"), "{msg}");
    assert!(!output.exists(), "no output written on failure");
}

#[test]
fn usage_errors_exit_with_2() {
    let out = moeru(&["forward", "--model"]);
    assert_eq!(out.status.code(), Some(2));
    let out = moeru(&["no-such-command"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn broken_model_folders_fail_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let src = reference().join("models/qwen3-moe-norm-sharded");
    let input = tmp.path().join("in.safetensors");
    write_tensors(
        &input,
        &[("input_ids".into(), OwnedTensor::i64(&[1, 2, 3], vec![1, 3]))],
    )
    .unwrap();
    let output = tmp.path().join("out.safetensors");
    let copy = |name: &str| {
        let dir = tmp.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        for e in std::fs::read_dir(&src).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
        dir
    };
    let run = |dir: &Path| {
        moeru(&[
            "forward",
            "--model",
            p(dir),
            "--input",
            p(&input),
            "--out",
            p(&output),
        ])
    };

    let truncated = copy("truncated");
    let shard = truncated.join("model-00003-of-00004.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 10]).unwrap();
    let msg = assert_clean_failure(&run(&truncated));
    assert!(
        msg.contains("model-00003-of-00004.safetensors") && msg.contains("truncated"),
        "{msg}"
    );

    let missing = copy("missing");
    std::fs::remove_file(missing.join("model-00001-of-00004.safetensors")).unwrap();
    let msg = assert_clean_failure(&run(&missing));
    assert!(msg.contains("model-00001-of-00004.safetensors"), "{msg}");

    let bad_config = copy("bad-config");
    let cfg = std::fs::read_to_string(bad_config.join("config.json")).unwrap();
    std::fs::write(
        bad_config.join("config.json"),
        cfg.replace("\"hidden_size\": 32", "\"hidden_size\": 48"),
    )
    .unwrap();
    let msg = assert_clean_failure(&run(&bad_config));
    assert!(msg.contains("has shape") && msg.contains("48"), "{msg}");
    assert!(!output.exists(), "no output written on failure");
}
