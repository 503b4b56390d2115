//! The `moeru` binary end to end: forward parity (f32 and bf16), export, `--device`, `bench`,
//! and how bad input is reported.

mod common;

use std::path::{Path, PathBuf};

use common::{assert_clean_failure, moeru, p, workspace, TINY_MOE};
use moeru_checkpoints::{write_tensors, OwnedTensor, TensorFile};

fn reference() -> PathBuf {
    workspace().join("tests/reference")
}

/// `moeru forward` on reference model `name`'s input ids, with `extra` arguments.
fn forward(name: &str, extra: &[&str], tmp: &Path) -> TensorFile {
    let refs = TensorFile::open(&reference().join(format!("outputs/{name}.safetensors"))).unwrap();
    let (ids, shape) = refs.i64("input_ids").unwrap();
    let input = tmp.join("in.safetensors");
    write_tensors(
        &input,
        &[("input_ids".into(), OwnedTensor::i64(&ids, shape))],
    )
    .unwrap();
    let output = tmp.join("out.safetensors");
    let model = reference().join("models").join(name);
    let mut args = vec![
        "forward",
        "--model",
        p(&model),
        "--input",
        p(&input),
        "--out",
        p(&output),
    ];
    args.extend(extra);
    let out = moeru(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    TensorFile::open(&output).unwrap()
}

#[test]
fn forward_matches_transformers() {
    let name = "qwen3-moe-norm-sharded";
    let refs = TensorFile::open(&reference().join(format!("outputs/{name}.safetensors"))).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let ours = forward(name, &[], tmp.path());
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

/// This build has no CUDA (CI's never does): asking for a GPU says so and writes nothing.
#[test]
#[cfg_attr(feature = "cuda", ignore = "the cuda build may find a GPU")]
fn asking_for_a_gpu_without_one_fails_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let (ckpt, logs) = (tmp.path().join("ckpt"), tmp.path().join("logs"));
    let sets = [
        format!("--set=checkpoint.dir={}", p(&ckpt)),
        format!("--set=logging.dir={}", p(&logs)),
    ];
    let train = |device: &str| {
        let mut args = vec!["train", TINY_MOE, "--device", device];
        args.extend(sets.iter().map(String::as_str));
        moeru(&args)
    };
    let out = train("cuda:0");
    let msg = assert_clean_failure(&out);
    assert!(
        msg.contains("device `cuda:0`: this moeru binary was built without CUDA support")
            && msg.contains("--features cuda"),
        "{msg}"
    );
    // The machine, not the recipe, lacks the GPU: no "recipe" prefix.
    assert!(msg.starts_with("error: device `cuda:0`"), "{msg}");
    assert_eq!(out.status.code(), Some(2));
    assert!(!ckpt.exists() && !logs.exists(), "nothing is written");

    let msg = assert_clean_failure(&train("tpu"));
    assert!(
        msg.contains("device=tpu") && msg.contains("`tpu` is not a device"),
        "{msg}"
    );

    let model = workspace().join("tests/reference/models/qwen3-dense-tied");
    let out = moeru(&[
        "forward",
        "--model",
        p(&model),
        "--input",
        "x",
        "--out",
        "y",
        "--device",
        "cuda",
    ]);
    assert!(assert_clean_failure(&out).contains("built without CUDA support"));
    let out = moeru(&["bench", "--shape", "tiny-moe", "--device", "cuda"]);
    assert!(assert_clean_failure(&out).contains("built without CUDA support"));
}

/// `moeru forward --precision bf16` is transformers under autocast (f32 router).
#[test]
fn forward_bf16_matches_autocast() {
    let name = "qwen3-moe-mixed";
    let reference = reference();
    let f32_refs =
        TensorFile::open(&reference.join(format!("outputs/{name}.safetensors"))).unwrap();
    let refs =
        TensorFile::open(&reference.join(format!("outputs-bf16/{name}.safetensors"))).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let ours = forward(name, &["--precision", "bf16"], tmp.path());
    let rel = |name: &str, refs: &TensorFile| {
        let (a, _) = ours.f32(name).unwrap();
        let (b, _) = refs.f32(name).unwrap();
        let d: f64 = a
            .iter()
            .zip(&b)
            .map(|(x, y)| ((x - y) as f64).powi(2))
            .sum();
        let n: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
        (d / n).sqrt()
    };
    let (autocast, f32) = (rel("logits", &refs), rel("logits", &f32_refs));
    assert!(
        autocast <= 1e-3 && f32 > 3.0 * autocast,
        "vs autocast {autocast:e}, vs f32 {f32:e}"
    );
    assert!(rel("loss", &refs) <= 1e-3);
}

#[test]
fn bench_reports_throughput_flops_and_mfu() {
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("bench.json");
    let out = moeru(&[
        "bench",
        "--shape",
        "tiny-moe",
        "--seq-len",
        "32",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--peak-tflops",
        "0.5",
        "--json",
        p(&json),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("tokens/s") && stdout.contains("MFU"),
        "{stdout}"
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let f = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{k}: {r}"));
    let step_seconds: Vec<f64> = r["step_seconds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(step_seconds.len(), 2);
    let tokens_per_s = 2.0 * 32.0 / step_seconds.iter().sum::<f64>();
    assert!((f("tokens_per_s") / tokens_per_s - 1.0).abs() < 1e-9);
    assert!((f("model_tflops") / (tokens_per_s * f("flops_per_token") / 1e12) - 1.0).abs() < 1e-9);
    assert!((f("mfu") - f("model_tflops") / 0.5).abs() < 1e-12);
    assert_eq!(r["losses"].as_array().unwrap().len(), 3);
    assert!(f("peak_memory_bytes") > 0.0);
    // tiny-moe: 1 MoE layer of 4 experts, top-2, 32 tokens a step: at least the 64 routed
    // rows, at most all of them on one expert (4 × 32 rows).
    let padding = f("expert_rows_per_routed_row");
    assert!((1.0..=2.0).contains(&padding), "{padding}");
    assert!(stdout.contains("MoE: the expert matmuls ran"), "{stdout}");

    let msg = assert_clean_failure(&moeru(&["bench", "--shape", "qwen9"]));
    assert!(
        msg.contains("no such shape") && msg.contains("qwen3-0.6b"),
        "{msg}"
    );
}
