//! `precision: bf16` training on the CPU: the loss falls as in f32, checkpoints hold f32
//! weights and moments, and an interrupted run resumes bit for bit.

use std::path::{Path, PathBuf};

use moeru_checkpoints::TensorFile;
use moeru_trainer::metrics::read_metrics;
use moeru_trainer::recipe::{self, schema::Recipe};
use moeru_trainer::{run_training, RunOptions};

fn smoke_recipe(out: &Path, precision: &str) -> Recipe {
    let ws = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let overrides = [
        format!("precision={precision}"),
        "train.steps=12".into(),
        "checkpoint.every=4".into(),
        format!("checkpoint.dir={}", out.join("ckpt").display()),
        format!("logging.dir={}", out.join("logs").display()),
        "logging.progress=false".into(),
        format!(
            "data.train={}",
            ws.join("recipes/smoke/data/train").display()
        ),
        "data.eval=null".into(),
        "train.eval_every=0".into(),
        "data.seq_len=64".into(),
        "schedule.warmup_steps=2".into(),
    ];
    recipe::load(&ws.join("recipes/smoke-tiny-moe.yaml"), &overrides)
        .unwrap_or_else(|e| panic!("{e}"))
}

fn losses(out: &Path) -> Vec<(u64, String)> {
    read_metrics(&out.join("logs/metrics.jsonl"))
        .unwrap()
        .iter()
        .filter_map(|m| Some((m.get("step")?.as_u64()?, m.get("loss")?.to_string())))
        .collect()
}

fn loss_values(out: &Path) -> Vec<f64> {
    losses(out)
        .iter()
        .map(|(_, l)| l.parse().unwrap())
        .collect()
}

#[test]
fn bf16_trains_like_f32_and_resumes_exactly() {
    let (f32_run, a, b) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    run_training(&smoke_recipe(f32_run.path(), "f32"), &RunOptions::default()).unwrap();
    run_training(&smoke_recipe(a.path(), "bf16"), &RunOptions::default()).unwrap();
    let (full, bf16) = (loss_values(f32_run.path()), loss_values(a.path()));
    assert_eq!(bf16.len(), 12);
    eprintln!("f32 losses {full:?}\nbf16 losses {bf16:?}");
    assert_ne!(full, bf16, "bf16 computes differently from f32");
    assert!(
        bf16[11] < 0.8 * bf16[0],
        "bf16 loss fell only {} -> {}",
        bf16[0],
        bf16[11]
    );
    for (x, y) in full.iter().zip(&bf16) {
        assert!(
            (x - y).abs() <= 0.02 * x,
            "bf16 loss {y} strays from f32 {x}"
        );
    }

    // Parameters and optimizer moments are saved as f32 (the master copy).
    let ckpt = a.path().join("ckpt/step-000012");
    for file in ["model.safetensors", "optim.safetensors"] {
        let f = TensorFile::open(&ckpt.join(file)).unwrap();
        for (name, _) in f.shapes() {
            assert_eq!(f.dtype(&name).unwrap(), "F32", "{file} {name}");
        }
    }

    // Stopped after step 6 (checkpoint at 4) and resumed: the same losses, bit for bit.
    let r = smoke_recipe(b.path(), "bf16");
    let stop = RunOptions {
        stop_after: Some(6),
        ..RunOptions::default()
    };
    run_training(&r, &stop).unwrap();
    run_training(&r, &RunOptions::default()).unwrap();
    let mut resumed = losses(b.path());
    resumed.retain(|(step, _)| *step > 6 || *step <= 4);
    resumed.dedup();
    let mut uninterrupted = losses(a.path());
    uninterrupted.retain(|(step, _)| *step > 6 || *step <= 4);
    assert_eq!(resumed, uninterrupted);
}
