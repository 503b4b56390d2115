//! Checkpoints resume bit for bit (in f32 and in bf16 mixed precision), and a torn or corrupt
//! checkpoint is skipped for the previous one. Runs the tests' tiny MoE recipe, shortened.

mod common;

use std::path::Path;

use burn::tensor::Device;
use common::{metrics, test_recipe};
use moeru_checkpoints::TensorFile;
use moeru_trainer::checkpoint::restore_latest;
use moeru_trainer::recipe::schema::Recipe;
use moeru_trainer::{run_training, RunOptions};

fn smoke_recipe(out: &Path, steps: u64, every: u64) -> Recipe {
    smoke_recipe_in(out, steps, every, "f32")
}

fn smoke_recipe_in(out: &Path, steps: u64, every: u64, precision: &str) -> Recipe {
    test_recipe(
        out,
        &[
            ("train.steps", &steps),
            ("checkpoint.every", &every),
            ("data.seq_len", &64),
            ("train.micro_batch_size", &4),
            ("train.grad_accum", &2),
            ("schedule.warmup_steps", &2),
            ("precision", &precision),
        ],
    )
}

/// (step, loss as written) per line: the exact text, so equal means bitwise equal.
fn losses(out: &Path) -> Vec<(u64, String)> {
    metrics(out)
        .iter()
        .filter_map(|m| Some((m.get("step")?.as_u64()?, m.get("loss")?.to_string())))
        .collect()
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = ["model.safetensors", "optim.safetensors"]
        .iter()
        .map(|f| (f.to_string(), std::fs::read(dir.join(f)).unwrap()))
        .collect();
    out.sort();
    out
}

#[test]
fn interrupted_and_resumed_run_is_bitwise_identical() {
    check_resume("f32");
}

#[test]
fn interrupted_and_resumed_bf16_run_is_bitwise_identical() {
    check_resume("bf16");
}

/// bf16 matmuls change the numbers a little, not the training: the loss follows f32's, and
/// checkpoints hold the f32 master weights and moments.
#[test]
fn bf16_trains_like_f32_and_saves_f32() {
    let (f32_run, bf16_run) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let steps = 12;
    run_training(
        &smoke_recipe(f32_run.path(), steps, 4),
        &RunOptions::default(),
    )
    .unwrap();
    let r = smoke_recipe_in(bf16_run.path(), steps, 4, "bf16");
    run_training(&r, &RunOptions::default()).unwrap();
    let value = |out: &Path| -> Vec<f64> {
        losses(out)
            .iter()
            .map(|(_, l)| l.parse().unwrap())
            .collect()
    };
    let (full, bf16) = (value(f32_run.path()), value(bf16_run.path()));
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
            (x - y).abs() <= 0.005 * x,
            "bf16 loss {y} strays from f32 {x}"
        );
    }
    let ckpt = bf16_run.path().join("ckpt/step-000012");
    for file in ["model.safetensors", "optim.safetensors"] {
        let f = TensorFile::open(&ckpt.join(file)).unwrap();
        for (name, _) in f.shapes() {
            assert_eq!(f.dtype(&name).unwrap(), "F32", "{file} {name}");
        }
    }
}

fn check_resume(precision: &str) {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let steps = 6;
    run_training(
        &smoke_recipe_in(a.path(), steps, 2, precision),
        &RunOptions::default(),
    )
    .unwrap();

    // Interrupted after step 3 (its checkpoint is at step 2, so step 3 is redone).
    let first = run_training(
        &smoke_recipe_in(b.path(), steps, 2, precision),
        &RunOptions {
            stop_after: Some(3),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(first.end_step, 3);
    let second = run_training(
        &smoke_recipe_in(b.path(), steps, 2, precision),
        &RunOptions::default(),
    )
    .unwrap();
    assert_eq!((second.start_step, second.end_step), (2, steps));

    let (la, lb) = (losses(a.path()), losses(b.path()));
    assert_eq!(la.len(), steps as usize, "one line per step");
    assert_eq!(la, lb, "losses differ after resume");
    let last = format!("step-{steps:06}");
    assert!(
        files(&a.path().join("ckpt").join(&last)) == files(&b.path().join("ckpt").join(&last)),
        "final checkpoint tensors differ after resume"
    );
}

fn corrupt(how: &str, dir: &Path) {
    let file = dir.join("model.safetensors");
    match how {
        "removed" => std::fs::remove_file(&file).unwrap(),
        "truncated" => {
            let bytes = std::fs::read(&file).unwrap();
            std::fs::write(&file, &bytes[..bytes.len() - 100]).unwrap();
        }
        "bit-flipped" => {
            let mut bytes = std::fs::read(&file).unwrap();
            let i = bytes.len() - 7;
            bytes[i] ^= 0x10;
            std::fs::write(&file, bytes).unwrap();
        }
        _ => unreachable!(),
    }
}

#[test]
fn torn_checkpoint_is_detected_and_the_previous_one_used() {
    for how in ["removed", "truncated", "bit-flipped"] {
        let out = tempfile::tempdir().unwrap();
        run_training(&smoke_recipe(out.path(), 4, 2), &RunOptions::default()).unwrap();
        let ckpt = out.path().join("ckpt");
        corrupt(how, &ckpt.join("step-000004"));

        let local = std::sync::Arc::new(moeru_models::Local);
        let (restored, skipped) = restore_latest(&ckpt, &Device::flex().autodiff(), local).unwrap();
        let restored = restored.expect("the step-2 checkpoint is valid");
        assert_eq!(restored.state.step, 2, "{how}");
        assert_eq!(skipped.len(), 1, "{how}: {skipped:?}");
        assert!(skipped[0].contains("step-000004"), "{how}: {}", skipped[0]);

        // Training continues from step 2 and rewrites step 4; the torn files are replaced.
        let r = run_training(&smoke_recipe(out.path(), 4, 2), &RunOptions::default()).unwrap();
        assert_eq!(r.start_step, 2, "{how}");
        assert!(moeru_checkpoints::verify_checkpoint(&ckpt.join("step-000004")).is_ok());
    }
}
