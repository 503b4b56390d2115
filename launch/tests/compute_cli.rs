//! `--device`, `--precision` and `moeru bench` from the command line.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use moeru_checkpoints::{write_tensors, OwnedTensor, TensorFile};

fn ws() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn moeru(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moeru"))
        .current_dir(ws())
        .args(args)
        .output()
        .expect("run moeru")
}

/// Non-zero exit, one `error:` line, no panic.
fn clean_failure(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "expected failure: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error:"), "{stderr}");
    stderr
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
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
        let mut args = vec!["train", "recipes/smoke-tiny-moe.yaml", "--device", device];
        args.extend(sets.iter().map(String::as_str));
        moeru(&args)
    };
    let out = train("cuda:0");
    let msg = clean_failure(&out);
    assert!(
        msg.contains("device `cuda:0`: this moeru binary was built without CUDA support")
            && msg.contains("--features cuda"),
        "{msg}"
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(!ckpt.exists() && !logs.exists(), "nothing is written");

    let msg = clean_failure(&train("tpu"));
    assert!(
        msg.contains("device=tpu") && msg.contains("`tpu` is not a device"),
        "{msg}"
    );

    let model = ws().join("tests/reference/models/qwen3-dense-tied");
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
    assert!(clean_failure(&out).contains("built without CUDA support"));
    let out = moeru(&["bench", "--shape", "tiny-moe", "--device", "cuda"]);
    assert!(clean_failure(&out).contains("built without CUDA support"));
}

/// `moeru forward --precision bf16` is transformers under autocast (f32 router).
#[test]
fn forward_bf16_matches_autocast() {
    let name = "qwen3-moe-mixed";
    let reference = ws().join("tests/reference");
    let f32_refs =
        TensorFile::open(&reference.join(format!("outputs/{name}.safetensors"))).unwrap();
    let refs =
        TensorFile::open(&reference.join(format!("outputs-bf16/{name}.safetensors"))).unwrap();
    let (ids, shape) = f32_refs.i64("input_ids").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.safetensors");
    write_tensors(
        &input,
        &[("input_ids".into(), OwnedTensor::i64(&ids, shape))],
    )
    .unwrap();
    let output = tmp.path().join("out.safetensors");
    let model = reference.join("models").join(name);
    let out = moeru(&[
        "forward",
        "--model",
        p(&model),
        "--input",
        p(&input),
        "--out",
        p(&output),
        "--precision",
        "bf16",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ours = TensorFile::open(&output).unwrap();
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

    let msg = clean_failure(&moeru(&["bench", "--shape", "qwen9"]));
    assert!(
        msg.contains("no such shape") && msg.contains("qwen3-0.6b"),
        "{msg}"
    );
}
