//! Asynchronous checkpoints (`checkpoint.async`) hold byte for byte the files a synchronous
//! save writes (one rank, DP 2 with ZeRO-1, TP 2 with sequence parallelism: every rank's part sealed by rank 0), leave
//! no markers or temp folders behind, and a run resumed from one ends bit-exact.

mod common;

use std::path::Path;

use common::{metrics, test_recipe, Set};
use moeru_trainer::recipe::schema::Recipe;
use moeru_trainer::{run_threads, run_training, RunOptions};

const STEPS: u64 = 6;

fn recipe(out: &Path, asynchronous: bool, layout: &[Set]) -> Recipe {
    let sets: [Set; 7] = [
        ("train.steps", &STEPS),
        ("checkpoint.every", &2),
        ("checkpoint.async", &asynchronous),
        ("data.seq_len", &64),
        ("train.micro_batch_size", &2),
        ("train.grad_accum", &2),
        ("schedule.warmup_steps", &2),
    ];
    test_recipe(out, &[&sets[..], layout].concat())
}

fn train(r: &Recipe, ranks: usize, opts: &RunOptions) {
    let ran = match ranks {
        1 => run_training(r, opts).map(|_| ()),
        n => run_threads(r, opts, n).map(|_| ()),
    };
    ran.unwrap_or_else(|e| panic!("{e}"));
}

/// Every entry of the checkpoint folder: step folders with each file's bytes, `latest`, and
/// anything else (a temp folder or marker would show up here).
fn folder(ckpt: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(ckpt).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.path().is_dir() {
            for file in std::fs::read_dir(entry.path()).unwrap() {
                let file = file.unwrap();
                let inner = file.file_name().to_string_lossy().into_owned();
                out.push((
                    format!("{name}/{inner}"),
                    std::fs::read(file.path()).unwrap(),
                ));
            }
        } else {
            out.push((name, std::fs::read(entry.path()).unwrap()));
        }
    }
    out.sort();
    out
}

fn names(files: &[(String, Vec<u8>)]) -> Vec<&str> {
    files.iter().map(|(n, _)| n.as_str()).collect()
}

#[test]
fn async_checkpoints_hold_the_files_of_synchronous_ones() {
    let layouts: [(&str, usize, &[Set]); 3] = [
        ("one rank", 1, &[]),
        (
            "dp2 zero-1",
            2,
            &[("parallel.dp", &2), ("parallel.zero_stage", &1)],
        ),
        (
            "tp2 sp",
            2,
            &[("parallel.tp", &2), ("parallel.sequence_parallel", &true)],
        ),
    ];
    for (what, ranks, layout) in layouts {
        // Both runs write into the same folder (its path is part of the recipe hash that
        // trainer_state.json records), the synchronous one moved aside first.
        let out = tempfile::tempdir().unwrap();
        let (ckpt, kept) = (out.path().join("ckpt"), out.path().join("sync-ckpt"));
        train(
            &recipe(out.path(), false, layout),
            ranks,
            &Default::default(),
        );
        std::fs::rename(&ckpt, &kept).unwrap();
        std::fs::remove_dir_all(out.path().join("logs")).unwrap();
        train(
            &recipe(out.path(), true, layout),
            ranks,
            &Default::default(),
        );
        let (want, got) = (folder(&kept), folder(&ckpt));
        assert_eq!(names(&got), names(&want), "{what}: different entries");
        assert!(
            names(&want).iter().any(|n| n.starts_with("step-000006/")),
            "{what}: the final save is missing: {:?}",
            names(&want)
        );
        for ((name, a), (_, b)) in want.iter().zip(&got) {
            assert!(
                a == b,
                "{what}: {name} differs between sync and async saves"
            );
        }
    }
}

/// (step, loss as written): equal text means bitwise-equal losses.
fn losses(out: &Path) -> Vec<(u64, String)> {
    metrics(out)
        .iter()
        .filter_map(|m| Some((m.get("step")?.as_u64()?, m.get("loss")?.to_string())))
        .collect()
}

#[test]
fn a_run_resumed_from_an_async_checkpoint_is_bit_exact() {
    let layout: &[Set] = &[("parallel.dp", &2), ("parallel.zero_stage", &1)];
    let (whole, resumed) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    train(&recipe(whole.path(), false, layout), 2, &Default::default());
    // Stopped after step 3: the async save of step 2 was waited for at the end.
    let stop = RunOptions {
        stop_after: Some(3),
        ..Default::default()
    };
    train(&recipe(resumed.path(), true, layout), 2, &stop);
    let latest = std::fs::read_to_string(resumed.path().join("ckpt/latest")).unwrap();
    assert_eq!(latest.trim(), "step-000002");
    train(
        &recipe(resumed.path(), true, layout),
        2,
        &Default::default(),
    );
    assert_eq!(losses(resumed.path()), losses(whole.path()));
    let last = |out: &Path| {
        folder(&out.join("ckpt"))
            .into_iter()
            .filter(|(n, _)| n.starts_with("step-000006/") && n.ends_with(".safetensors"))
            .collect::<Vec<_>>()
    };
    let want = last(whole.path());
    assert!(!want.is_empty());
    assert!(
        last(resumed.path()) == want,
        "final weights and moments differ"
    );
}
