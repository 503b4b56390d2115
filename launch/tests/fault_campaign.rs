//! The fault-injection campaign: trials drawn from a recorded seed, each a two-process
//! `moeru launch --max-restarts 1` in one layout (dp2 with ZeRO-1, tp2 with sequence
//! parallelism, pp2) whose one rank is SIGKILLed, or stops calling collectives, at a drawn
//! step and point: the step's start, forward, backward, inside the gradient collective,
//! while checkpoint files are being written, between the checkpoint's rename and `latest`.
//! Every job must resume by itself and end with a final model byte-identical to the
//! uninterrupted run of its layout.
//!
//! `MOERU_CAMPAIGN_TRIALS` (default 4, what CI runs) and `MOERU_CAMPAIGN_SEED` (default 1)
//! set the campaign; `scripts/fault-campaign.sh` runs a long one and keeps its table.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;

use common::{moeru_command, TINY_MOE};

const STEPS: u64 = 10;
/// Checkpoints every 2 steps: the save points are drawn on even steps.
const EVERY: u64 = 2;
const POINTS: [&str; 6] = [
    "start",
    "forward",
    "backward",
    "collective",
    "save-write",
    "save-commit",
];
const LAYOUTS: [(&str, &[&str]); 3] = [
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
];

/// splitmix64: the campaign's draws, reproducible from the seed.
struct Draw(u64);

impl Draw {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

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
    let mut c = moeru_command();
    c.args([
        "launch",
        TINY_MOE,
        "--nproc-per-node",
        "2",
        "--spawn",
        "processes",
    ]);
    c.args(["--max-restarts", "1"]);
    let settings = [
        format!("train.steps={STEPS}"),
        format!("checkpoint.every={EVERY}"),
        "checkpoint.keep_last=0".into(),
        format!("checkpoint.dir={}", out.join("ckpt").display()),
        format!("logging.dir={}", out.join("logs").display()),
        "logging.progress=false".into(),
        "logging.tensorboard=false".into(),
        "data.eval=null".into(),
        "train.eval_every=0".into(),
        "data.seq_len=64".into(),
        "train.micro_batch_size=2".into(),
        "parallel.timeout_s=3".into(),
    ];
    let layout_keys = LAYOUTS[layout].1.iter().map(|s| s.to_string());
    for s in settings.into_iter().chain(layout_keys) {
        c.arg("--set").arg(s);
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
    let mut draw = Draw(seed);
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
