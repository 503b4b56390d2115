//! `moeru launch` with real processes: ranks over TCP match the one-rank run; a rank killed
//! with SIGKILL stops the job, or with `--max-restarts 1` the job finishes from the last
//! checkpoint with the same weights as an uninterrupted run; a silent rank makes every rank
//! exit within the timeout plus a few seconds, with the diagnostic.

mod common;

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use common::{launch_settings, moeru_command, TINY_MOE};

const STEPS: u64 = 10;

/// Global batch 8 = micro-batch 2 × grad_accum × dp.
fn settings(out: &Path, dp: usize) -> Vec<String> {
    let mut s = launch_settings(out, STEPS);
    s.extend(["--set".into(), format!("train.grad_accum={}", 4 / dp)]);
    s
}

fn moeru(args: &[String], envs: &[(&str, &str)]) -> (Output, Duration) {
    let started = Instant::now();
    let out = moeru_command()
        .args(args)
        .envs(envs.iter().copied())
        .output()
        .unwrap();
    (out, started.elapsed())
}

fn launch(out: &Path, extra: &[&str], envs: &[(&str, &str)]) -> (Output, Duration) {
    let mut args: Vec<String> = [
        "launch",
        TINY_MOE,
        "--nproc-per-node",
        "2",
        "--spawn",
        "processes",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(settings(out, 2));
    moeru(&args, envs)
}

fn final_model(out: &Path) -> Vec<u8> {
    std::fs::read(out.join(format!("ckpt/step-{STEPS:06}/model.safetensors"))).unwrap()
}

fn losses(out: &Path) -> Vec<f64> {
    std::fs::read_to_string(out.join("logs/metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["loss"].as_f64())
        .collect()
}

#[test]
fn processes_match_one_rank_and_a_killed_rank_restarts_to_the_same_weights() {
    let one = tempfile::tempdir().unwrap();
    let mut args = vec!["train".to_string(), TINY_MOE.into()];
    args.extend(settings(one.path(), 1));
    let (o, _) = moeru(&args, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let plain = tempfile::tempdir().unwrap();
    let (o, _) = launch(plain.path(), &[], &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("[rank 0]") && err.contains("[launch] rank 1: pid"),
        "{err}"
    );
    // The job's result is reported once, by rank 0.
    let reports: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("trained steps"))
        .collect();
    assert!(
        reports.len() == 1 && reports[0].starts_with("[rank 0]"),
        "{reports:?}"
    );
    let (a, b) = (losses(plain.path()), losses(one.path()));
    assert_eq!(a.len(), STEPS as usize);
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    assert!(
        diff <= 1e-5,
        "TCP processes vs one rank: loss differs by {diff}"
    );

    // Rank 1 SIGKILLs itself before step 6; the newest checkpoint is step 4.
    let killed = tempfile::tempdir().unwrap();
    let (o, _) = launch(
        killed.path(),
        &["--max-restarts", "1"],
        &[("MOERU_FAULT", "kill:1:6")],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("was killed by signal 9 (SIGKILL)"), "{err}");
    assert!(
        err.contains("restarting every rank from the newest valid checkpoint"),
        "{err}"
    );
    assert!(
        err.contains("resuming from") && err.contains("step-000004"),
        "{err}"
    );
    assert!(
        final_model(killed.path()) == final_model(plain.path()),
        "the restarted job's final weights differ from the uninterrupted job's"
    );
}

#[test]
fn a_killed_rank_without_restarts_stops_the_job() {
    let out = tempfile::tempdir().unwrap();
    let (o, took) = launch(out.path(), &[], &[("MOERU_FAULT", "kill:1:3")]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("error: launch: rank 1 (pid") && err.contains("SIGKILL"),
        "{err}"
    );
    assert!(took < Duration::from_secs(60), "took {took:?}");
    assert!(!out.path().join(format!("ckpt/step-{STEPS:06}")).exists());
}

#[test]
fn a_silent_process_rank_makes_every_rank_exit_with_the_diagnostic() {
    let out = tempfile::tempdir().unwrap();
    let timeout = 3;
    let (o, took) = launch(
        out.path(),
        &["--set", &format!("parallel.timeout_s={timeout}")],
        &[("MOERU_FAULT", "stall:1:3")],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("[rank 0] error: all_reduce on group `dp` timed out after 3.0s on rank 0")
            && err.contains("still waiting for [1]"),
        "{err}"
    );
    assert!(err.contains("stopping the other ranks"), "{err}");
    // Start-up and two steps take a few seconds; the stall costs the timeout, then ≤ 5 s.
    assert!(
        took < Duration::from_secs(timeout + 5 + 20),
        "took {took:?}"
    );
}

#[test]
fn a_train_rank_without_a_store_address_says_what_to_set() {
    let (o, _) = moeru(
        &["train".into(), TINY_MOE.into()],
        &[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", "0"),
            ("LOCAL_WORLD_SIZE", "2"),
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("MASTER_ADDR and MASTER_PORT are not set"),
        "{err}"
    );
    // The environment, not the recipe, is at fault.
    assert!(err.starts_with("error: launch environment:"), "{err}");
}

#[test]
fn bad_launch_flags_name_the_flags_not_the_recipe() {
    let args = ["launch", TINY_MOE, "--nproc-per-node", "0"];
    let (o, _) = moeru(&args.map(String::from), &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.starts_with("error: launch: --nproc-per-node 0 --nnodes 1 --node-rank 0:"),
        "{err}"
    );
}

#[test]
fn sizes_that_do_not_fit_the_world_or_the_model_are_recipe_errors() {
    let cases: [(&[&str], &str); 3] = [
        (
            &["--nproc-per-node", "3", "--set", "parallel.dp=2"],
            "dp 2 × pp 1 × tp 1 = 2 ranks, but the job has 3",
        ),
        (
            &["--nproc-per-node", "2", "--set", "parallel.ep=4"],
            "`parallel.ep` = 4 must divide dp × tp = 2",
        ),
        (
            &["--nproc-per-node", "3", "--set", "parallel.tp=3"],
            "`parallel.tp` = 3 must divide num_attention_heads (4)",
        ),
    ];
    for (extra, want) in cases {
        let mut args = vec!["launch".to_string(), TINY_MOE.into()];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend(["--set".into(), "logging.progress=false".into()]);
        let tmp = tempfile::tempdir().unwrap();
        args.extend(settings(tmp.path(), 1));
        let (o, _) = moeru(&args, &[]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains(want), "expected {want:?} in {err}");
    }
}
