//! The fault-injection campaign: trials drawn from a recorded seed, each a two-process
//! `moeru launch --max-restarts 1` in one layout (dp2 with ZeRO-1, tp2 with sequence
//! parallelism, pp2) whose one rank is SIGKILLed, or stops calling collectives, at a drawn
//! step and point: the step's start, forward, backward, inside the gradient collective,
//! while checkpoint files are being written, between the checkpoint's rename and `latest`.
//! Every job must resume by itself and end with a final model byte-identical to the
//! uninterrupted run of its layout.
//!
//! A fourth layout saves asynchronously (dp2 with ZeRO-1 and `checkpoint.async`): its save
//! faults fire on the background writer while training goes on.
//!
//! `MOERU_CAMPAIGN_TRIALS` (default 4, what CI runs) and `MOERU_CAMPAIGN_SEED` (default 1)
//! set the campaign; `scripts/fault-campaign.sh` runs a long one and keeps its table.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;

use common::{launch_settings, moeru_command, TINY_MOE};
use moeru_data::rng::SplitMix64;

const STEPS: u64 = 10;
/// Checkpoints every 2 steps (`launch_settings`): the save points are drawn on even steps.
const EVERY: u64 = 2;
const POINTS: [&str; 6] = [
    "start",
    "forward",
    "backward",
    "collective",
    "save-write",
    "save-commit",
];
const LAYOUTS: [(&str, &[&str]); 4] = [
    (
        "dp2-zero1",
        &[
            "parallel.dp=2",
            "parallel.zero_stage=1",
            "train.grad_accum=2",
        ],
    ),
    (
        "tp2-sp",
        &[
            "parallel.tp=2",
            "parallel.sequence_parallel=true",
            "train.grad_accum=4",
        ],
    ),
    ("pp2", &["parallel.pp=2", "train.grad_accum=4"]),
    (
        "dp2-async",
        &[
            "parallel.dp=2",
            "parallel.zero_stage=1",
            "train.grad_accum=2",
            "checkpoint.async=true",
        ],
    ),
];

/// The campaign's draws, reproducible from the seed.
type Draw = SplitMix64;

#[derive(Debug)]
struct Trial {
    layout: usize,
    kind: &'static str,
    rank: u64,
    step: u64,
    point: &'static str,
}

impl Trial {
    fn draw(d: &mut Draw) -> Self {
        let layout = d.below(LAYOUTS.len() as u64) as usize;
        // One trial in five is a hang (the rank stops calling collectives).
        let kind = if d.below(5) == 0 { "stall" } else { "kill" };
        let point = POINTS[d.below(POINTS.len() as u64) as usize];
        let (mut rank, mut step) = (d.below(2), 1 + d.below(STEPS));
        if point.starts_with("save") {
            step = EVERY * (1 + d.below(STEPS / EVERY));
        }
        if point == "save-commit" {
            rank = 0; // rank 0 commits
        }
        Self {
            layout,
            kind,
            rank,
            step,
            point,
        }
    }

    fn fault(&self) -> String {
        format!("{}:{}:{}:{}", self.kind, self.rank, self.step, self.point)
    }
}

fn launch(out: &Path, layout: usize, fault: Option<&str>) -> Output {
    launch_with(out, layout, fault, 1)
}

/// A two-process job of `layout` with `restarts` restarts allowed and `fault` armed.
fn launch_with(out: &Path, layout: usize, fault: Option<&str>, restarts: u32) -> Output {
    let mut c = moeru_command();
    c.args([
        "launch",
        TINY_MOE,
        "--nproc-per-node",
        "2",
        "--spawn",
        "processes",
    ]);
    c.args(["--max-restarts", &restarts.to_string()]);
    c.args(launch_settings(out, STEPS));
    c.args(["--set", "parallel.timeout_s=3"]);
    for s in LAYOUTS[layout].1 {
        c.args(["--set", s]);
    }
    if let Some(f) = fault {
        c.env("MOERU_FAULT", f);
    }
    c.output().unwrap()
}

/// The final checkpoint's weight files (one, or each rank's part of a sharded run), in
/// name order.
fn final_model(out: &Path) -> Vec<(String, Vec<u8>)> {
    let dir = out.join(format!("ckpt/step-{STEPS:06}"));
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut files: Vec<(String, Vec<u8>)> = entries
        .map(|e| e.unwrap())
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with("model") && name.ends_with(".safetensors")
        })
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name, std::fs::read(e.path()).unwrap())
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{}: no weights", dir.display());
    files
}

fn env_u64(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn killed_and_hung_ranks_resume_by_themselves_to_identical_weights() {
    let trials = env_u64("MOERU_CAMPAIGN_TRIALS", 4);
    let seed = env_u64("MOERU_CAMPAIGN_SEED", 1);
    let mut draw = Draw::new(seed);
    let drawn: Vec<Trial> = (0..trials).map(|_| Trial::draw(&mut draw)).collect();
    let mut reference = BTreeMap::new();
    println!(
        "fault campaign: seed {seed}, {trials} trials, {STEPS} steps, checkpoints every {EVERY}"
    );
    let mut survived = 0;
    for (i, t) in drawn.iter().enumerate() {
        let want = reference.entry(t.layout).or_insert_with(|| {
            let dir = tempfile::tempdir().unwrap();
            let o = launch(dir.path(), t.layout, None);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            final_model(dir.path())
        });
        let dir = tempfile::tempdir().unwrap();
        let started = std::time::Instant::now();
        let o = launch(dir.path(), t.layout, Some(&t.fault()));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "trial {i} {t:?} did not finish: {err}");
        assert!(
            err.contains("fault injection"),
            "trial {i} {t:?} never fired: {err}"
        );
        assert!(
            err.contains("restarting every rank"),
            "trial {i} {t:?}: {err}"
        );
        if t.kind == "stall" {
            // The peers gave up on the silent rank with the diagnostic, within the timeout.
            assert!(
                err.contains("timed out after 3.0s"),
                "trial {i} {t:?}: {err}"
            );
        }
        let resumed = err
            .lines()
            .find_map(|l| {
                let dir = l.split("resuming from ").nth(1)?;
                Some(
                    dir.rsplit('/')
                        .next()?
                        .split_whitespace()
                        .next()?
                        .to_string(),
                )
            })
            .unwrap_or_else(|| "the start".into());
        assert!(
            final_model(dir.path()) == *want,
            "trial {i} {t:?}: the final model differs from the uninterrupted run"
        );
        survived += 1;
        println!(
            "trial {i:>2}: {:<9} {:<5} rank {} step {:>2} {:<11} -> resumed from {}, final model identical ({:.1}s)",
            LAYOUTS[t.layout].0,
            t.kind,
            t.rank,
            t.step,
            t.point,
            resumed.trim(),
            started.elapsed().as_secs_f64()
        );
    }
    println!("fault campaign: {survived} of {trials} trials resumed to byte-identical weights");
}

#[test]
fn a_kill_during_an_async_save_leaves_the_previous_checkpoint_valid() {
    let layout = LAYOUTS.iter().position(|l| l.0 == "dp2-async").unwrap();
    for (rank, point) in [(1, "save-write"), (0, "save-write"), (0, "save-commit")] {
        let dir = tempfile::tempdir().unwrap();
        let fault = format!("kill:{rank}:4:{point}");
        let o = launch_with(dir.path(), layout, Some(&fault), 0);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{fault}: the job survived: {err}");
        assert!(err.contains("fault injection"), "{fault}: {err}");
        let ckpt = dir.path().join("ckpt");
        let latest = std::fs::read_to_string(ckpt.join("latest")).unwrap();
        let found = moeru_checkpoints::latest_valid_checkpoint(&ckpt).unwrap();
        let (manifest, _) = found.found.expect("a valid checkpoint");
        if point == "save-commit" {
            // Killed after the rename: step 4 is complete, `latest` still names step 2.
            assert_eq!(
                (latest.trim(), manifest.step),
                ("step-000002", 4),
                "{fault}"
            );
        } else {
            assert_eq!(
                (latest.trim(), manifest.step),
                ("step-000002", 2),
                "{fault}"
            );
            assert!(!ckpt.join("step-000004").exists(), "{fault}");
        }
        assert!(found.skipped.is_empty(), "{fault}: {:?}", found.skipped);
    }
}
