//! Tests of `MetricsSink` against real files.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{
    read_metrics, CommBytes, LayerLoad, MetricsError, MetricsSink, StepMetrics, METRICS_FILE,
};

/// Floats whose shortest decimal forms are awkward to parse back exactly.
const AWKWARD: [f64; 6] = [
    0.1 + 0.2,
    1.0 / 3.0,
    2.225_073_858_507_201e-308,
    9_007_199_254_740_993.0,
    5e-324,
    1.797_693_134_862_315_7e308,
];

fn metrics(step: u64, moe: bool) -> StepMetrics {
    let s = step as f64;
    StepMetrics {
        step,
        loss: 10.0 / (s + 0.7) + AWKWARD[step as usize % AWKWARD.len()] * 1e-300,
        lr: 3e-4 * s.sqrt() / 7.0,
        grad_norm: 1.0 / (s * 3.3),
        tokens: 4096,
        tokens_per_s: 12_345.678_9 + s,
        aux_loss: moe.then_some(0.01 + s / 1e9),
        z_loss: moe.then_some(1e-3 / s),
        expert_load: if moe {
            (0..2)
                .map(|layer| LayerLoad {
                    layer,
                    max: 100.0 + s + layer as f64,
                    mean: 64.0 / 3.0,
                })
                .collect()
        } else {
            Vec::new()
        },
        ep_load: if moe {
            vec![300, 212 + step]
        } else {
            Vec::new()
        },
        comm: if moe {
            vec![CommBytes {
                group: "dp".into(),
                op: "all_reduce".into(),
                payload: 4 * step,
                wire: 2 * step,
                seconds: 1.5e-4 * s,
            }]
        } else {
            Vec::new()
        },
        task: Vec::new(),
    }
}

fn steps_in(dir: &Path) -> Vec<u64> {
    read_metrics(&dir.join(METRICS_FILE))
        .unwrap()
        .iter()
        .map(|v| v["step"].as_u64().unwrap())
        .collect()
}

fn write_run(dir: &Path, steps: std::ops::RangeInclusive<u64>, resume: u64) {
    let mut sink = MetricsSink::open(dir, true, false, 6, resume).unwrap();
    for step in steps {
        sink.log_step(&metrics(step, true)).unwrap();
    }
    sink.finish().unwrap();
}

#[test]
fn jsonl_round_trips_floats_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let mut sink = MetricsSink::open(dir.path(), false, false, 4, 0).unwrap();
    let logged: Vec<StepMetrics> = (1..=4).map(|s| metrics(s, s % 2 == 0)).collect();
    for m in &logged {
        sink.log_step(m).unwrap();
    }
    let mut awkward = metrics(5, false);
    for &x in &AWKWARD {
        awkward.loss = x;
        awkward.lr = -x;
        // The written text must denote exactly `x` (checked with Rust's correctly rounded
        // parser; serde_json's default float parser may be off by one ulp on reading).
        let text = awkward.to_json()["loss"].to_string();
        assert_eq!(text.parse::<f64>().unwrap().to_bits(), x.to_bits(), "{x:e}");
    }
    sink.finish().unwrap();

    // Each line is exactly the serialisation of what was logged, and its loss text denotes
    // exactly the logged f64 (Rust's parser is correctly rounded).
    let text = std::fs::read_to_string(dir.path().join(METRICS_FILE)).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), logged.len());
    for (line, m) in lines.iter().zip(&logged) {
        assert_eq!(*line, m.to_json().to_string());
        let loss = m.to_json()["loss"].to_string();
        assert_eq!(loss.parse::<f64>().unwrap().to_bits(), m.loss.to_bits());
    }
    let read = read_metrics(&dir.path().join(METRICS_FILE)).unwrap();
    let back: Vec<StepMetrics> = read.iter().filter_map(StepMetrics::from_json).collect();
    assert_eq!(back.len(), logged.len());
    let dense = &read[0];
    assert!(dense.get("aux_loss").is_none() && dense.get("expert_load").is_none());
    let moe = &read[1];
    assert_eq!(moe["expert_load"][1]["layer"], 1);
    assert!(moe.get("z_loss").is_some());
}

#[test]
fn resume_truncates_and_steps_appear_once() {
    let dir = tempfile::tempdir().unwrap();
    write_run(dir.path(), 1..=5, 0);
    assert_eq!(steps_in(dir.path()), [1, 2, 3, 4, 5]);

    let sink = MetricsSink::open(dir.path(), false, false, 5, 3).unwrap();
    assert_eq!(steps_in(dir.path()), [1, 2, 3]);
    drop(sink);
    write_run(dir.path(), 4..=5, 3);
    assert_eq!(steps_in(dir.path()), [1, 2, 3, 4, 5]);
    assert!(!dir.path().join("metrics.jsonl.tmp").exists());

    // A fresh run truncates.
    write_run(dir.path(), 1..=1, 0);
    assert_eq!(steps_in(dir.path()), [1]);
}

#[test]
fn resume_drops_torn_last_line_but_rejects_corrupt_middle() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(METRICS_FILE);
    fs::write(
        &path,
        "{\"step\":1,\"loss\":2.5}\n{\"step\":2,\"loss\":2.4}\n{\"step\":3,\"lo",
    )
    .unwrap();
    MetricsSink::open(dir.path(), false, false, 5, 5).unwrap();
    assert_eq!(steps_in(dir.path()), [1, 2]);

    fs::write(&path, "{\"step\":1}\ngarbage\n{\"step\":2}\n").unwrap();
    let err = MetricsSink::open(dir.path(), false, false, 5, 5)
        .err()
        .unwrap();
    assert!(
        matches!(err, MetricsError::Corrupt { line: 2, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("metrics.jsonl"), "{err}");
}

#[test]
fn eval_lines_and_resume_keep_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut sink = MetricsSink::open(dir.path(), true, false, 4, 0).unwrap();
    for step in 1..=4 {
        sink.log_step(&metrics(step, false)).unwrap();
        if step % 2 == 0 {
            sink.log_eval(step, 2.0).unwrap();
        }
    }
    sink.finish().unwrap();
    let lines = read_metrics(&dir.path().join(METRICS_FILE)).unwrap();
    let evals: Vec<&Value> = lines
        .iter()
        .filter(|v| v.get("eval_loss").is_some())
        .collect();
    assert_eq!(evals.len(), 2);
    assert_eq!(evals[0]["step"], 2);
    assert_eq!(evals[0]["eval_ppl"].as_f64().unwrap(), 2.0f64.exp());

    MetricsSink::open(dir.path(), false, false, 4, 2).unwrap();
    assert_eq!(steps_in(dir.path()), [1, 2, 2]);
}

#[test]
fn event_file_is_named_and_framed() {
    let dir = tempfile::tempdir().unwrap();
    let mut sink = MetricsSink::open(dir.path(), true, false, 2, 0).unwrap();
    let path = sink.event_file().unwrap().to_path_buf();
    sink.log_step(&metrics(1, true)).unwrap();
    sink.finish().unwrap();
    let name = path.file_name().unwrap().to_str().unwrap().to_string();
    let parts: Vec<&str> = name.split('.').collect();
    assert!(name.starts_with("events.out.tfevents."), "{name}");
    assert!(parts[3].parse::<u64>().is_ok(), "{name}");
    assert_eq!(parts[parts.len() - 2], std::process::id().to_string());

    // Walk the TFRecord framing: header event, then one scalar event.
    let bytes = fs::read(&path).unwrap();
    let mut records = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
        let data = &bytes[at + 12..at + 12 + len];
        let crc = u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap());
        assert_eq!(crc, super::masked_crc32c(data));
        records.push(data.to_vec());
        at += 16 + len;
    }
    assert_eq!(records.len(), 2);
    assert!(records[0].ends_with(b"brain.Event:2"));
    let tag = b"moe/layer1/load_mean";
    assert!(records[1].windows(tag.len()).any(|w| w == tag));
}

#[test]
fn io_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("not_a_dir");
    fs::write(&blocker, "x").unwrap();
    let err = MetricsSink::open(&blocker.join("run"), true, false, 1, 0)
        .err()
        .unwrap();
    let msg = err.to_string();
    assert!(msg.contains("not_a_dir") && !msg.contains('\n'), "{msg}");
}

/// Writes a fresh run and a resumed one (steps 4..=5 re-logged with different losses) for
/// `tests/interop/check_tensorboard.py`; set MOERU_METRICS_KEEP_DIR to keep them there.
#[test]
fn writes_runs_for_tensorboard_check() {
    let tmp = tempfile::tempdir().unwrap();
    let base: PathBuf = std::env::var_os("MOERU_METRICS_KEEP_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| tmp.path().to_path_buf());
    let fresh = base.join("fresh");
    write_run(&fresh, 1..=6, 0);
    assert_eq!(steps_in(&fresh), [1, 2, 3, 4, 5, 6]);

    let resumed = base.join("resumed");
    write_run(&resumed, 1..=5, 0);
    let mut sink = MetricsSink::open(&resumed, true, false, 6, 3).unwrap();
    for step in 4..=6 {
        let mut m = metrics(step, true);
        m.loss += 0.5; // differs from the first attempt, so stale events would be caught
        sink.log_step(&m).unwrap();
    }
    sink.log_eval(6, 1.25).unwrap();
    sink.finish().unwrap();
    assert_eq!(steps_in(&resumed), [1, 2, 3, 4, 5, 6, 6]);
}

#[test]
fn task_metrics_reach_jsonl_and_tensorboard_and_eval_lines() {
    let mut m = metrics(3, false);
    m.task = vec![
        ("rewards_accuracy".into(), 0.75),
        ("rewards_margin".into(), -0.125),
    ];
    let json = m.to_json();
    assert_eq!(json["rewards_accuracy"], 0.75);
    assert_eq!(json["rewards_margin"], -0.125);
    let scalars = m.scalars();
    assert!(scalars.contains(&("train/rewards_accuracy".to_string(), 0.75)));
    assert!(scalars.contains(&("train/rewards_margin".to_string(), -0.125)));
    let eval = super::record::eval_values_json(
        20,
        &[("loss".into(), 0.5), ("rewards_accuracy".into(), 1.0)],
    );
    assert_eq!(
        eval,
        serde_json::json!({"step": 20, "eval_loss": 0.5, "eval_rewards_accuracy": 1.0})
    );
}
