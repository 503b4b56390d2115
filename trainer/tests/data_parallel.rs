//! Data parallelism on thread ranks against the one-rank run of the same global batch:
//! DP 2 and 4, with and without ZeRO-1; resuming a DP=2 ZeRO-1 checkpoint at DP 4 and 1;
//! the counted communication against its analytic value; a silent rank's timeout.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use moeru_checkpoints::TensorFile;
use moeru_models::params::param_count;
use moeru_trainer::metrics::read_metrics;
use moeru_trainer::recipe::{self, schema::Recipe};
use moeru_trainer::{run_threads, run_training, Fault, FaultKind, RunOptions};

const STEPS: u64 = 10;
/// Sequences per global batch: micro-batch 2 × grad_accum × dp.
const GLOBAL: usize = 8;

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn recipe_for(out: &Path, dp: usize, zero: bool, extra: &[String]) -> Recipe {
    let ws = workspace();
    let data = ws.join("recipes/smoke/data");
    let mut overrides = vec![
        format!("train.steps={STEPS}"),
        "checkpoint.every=5".into(),
        "checkpoint.keep_last=0".into(),
        format!("checkpoint.dir={}", out.join("ckpt").display()),
        format!("logging.dir={}", out.join("logs").display()),
        "logging.progress=false".into(),
        "logging.tensorboard=false".into(),
        format!("data.train={}", data.join("train").display()),
        "data.eval=null".into(),
        "train.eval_every=0".into(),
        "data.seq_len=64".into(),
        "train.micro_batch_size=2".into(),
        format!("train.grad_accum={}", GLOBAL / 2 / dp),
        format!("parallel.dp={dp}"),
        format!("parallel.zero_stage={}", zero as u8),
    ];
    overrides.extend_from_slice(extra);
    recipe::load(&ws.join("recipes/smoke-tiny-moe.yaml"), &overrides)
        .unwrap_or_else(|e| panic!("{e}"))
}

fn run(out: &Path, dp: usize, zero: bool, extra: &[String], opts: &RunOptions) {
    let r = recipe_for(out, dp, zero, extra);
    if dp == 1 {
        run_training(&r, opts).unwrap_or_else(|e| panic!("{e}"));
    } else {
        run_threads(&r, opts, dp).unwrap_or_else(|e| panic!("{e}"));
    }
}

fn metrics(out: &Path) -> Vec<serde_json::Value> {
    read_metrics(&out.join("logs/metrics.jsonl")).unwrap()
}

fn losses(out: &Path) -> Vec<f64> {
    metrics(out)
        .iter()
        .filter_map(|m| m["loss"].as_f64())
        .collect()
}

fn weights(out: &Path) -> Vec<(String, Vec<f32>)> {
    let f = TensorFile::open(&out.join(format!("ckpt/step-{STEPS:06}/model.safetensors"))).unwrap();
    let mut names: Vec<String> = f.shapes().into_iter().map(|(n, _)| n).collect();
    names.sort();
    names
        .into_iter()
        .map(|n| (n.clone(), f.f32(&n).unwrap().0))
        .collect()
}

/// Per-step loss and final-weight differences of `out` against `reference`; both ≤ 1e-5.
fn assert_matches(out: &Path, reference: &Path, what: &str) {
    let (a, b) = (losses(out), losses(reference));
    assert_eq!(a.len(), STEPS as usize, "{what}: steps logged");
    assert_eq!(a.len(), b.len(), "{what}");
    let loss_diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    let (wa, wb) = (weights(out), weights(reference));
    assert_eq!(wa.len(), wb.len());
    let mut weight_diff = 0f32;
    for ((na, va), (nb, vb)) in wa.iter().zip(&wb) {
        assert_eq!(na, nb);
        for (x, y) in va.iter().zip(vb) {
            weight_diff = weight_diff.max((x - y).abs());
        }
    }
    eprintln!("{what}: max loss diff {loss_diff:.2e}, max weight diff {weight_diff:.2e}");
    assert!(loss_diff <= 1e-5, "{what}: loss differs by {loss_diff}");
    assert!(
        weight_diff <= 1e-5,
        "{what}: weights differ by {weight_diff}"
    );
    // The run must have learned something, or matching would prove little.
    assert!(
        a[a.len() - 1] < a[0] - 0.1,
        "{what}: loss {} -> {}",
        a[0],
        a[a.len() - 1]
    );
}

#[test]
fn dp_runs_match_the_single_rank_run() {
    let reference = tempfile::tempdir().unwrap();
    run(reference.path(), 1, false, &[], &RunOptions::default());
    for (dp, zero) in [(2, false), (4, false), (2, true), (4, true)] {
        let out = tempfile::tempdir().unwrap();
        run(out.path(), dp, zero, &[], &RunOptions::default());
        assert_matches(
            out.path(),
            reference.path(),
            &format!("dp {dp} zero-1 {zero}"),
        );
    }
}

#[test]
fn a_zero1_checkpoint_resumes_at_other_dp_sizes() {
    let reference = tempfile::tempdir().unwrap();
    run(reference.path(), 1, false, &[], &RunOptions::default());
    let half = RunOptions {
        stop_after: Some(STEPS / 2),
        ..RunOptions::default()
    };
    for (dp, zero) in [(4, true), (1, false), (4, false), (2, true)] {
        let out = tempfile::tempdir().unwrap();
        run(out.path(), 2, true, &[], &half);
        let shards: Vec<String> = std::fs::read_dir(out.path().join("ckpt/step-000005"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("optim-"))
            .collect();
        assert_eq!(
            shards.len(),
            2,
            "one optimizer shard per DP rank: {shards:?}"
        );
        run(out.path(), dp, zero, &[], &RunOptions::default());
        assert_matches(
            out.path(),
            reference.path(),
            &format!("dp 2 zero-1 -> dp {dp} zero-1 {zero}"),
        );
    }
}

#[test]
fn counted_communication_equals_the_analytic_volume() {
    let tmp = tempfile::tempdir().unwrap();
    let mut model = recipe_for(tmp.path(), 1, false, &[]);
    model.train.steps = 1;
    let params = {
        let cfg = moeru_models::Qwen3Config::from_map(
            model.model.architecture.clone().unwrap(),
            Path::new("recipe"),
        )
        .unwrap();
        let mut init = moeru_models::init::RandomInit { seed: 0, std: 0.02 };
        let mut m = moeru_models::Qwen3Model::new(cfg, &mut init, &burn::tensor::Device::flex())
            .unwrap_or_else(|never| match never {});
        param_count(&mut m) as u64
    };
    let moe = model.model.architecture.as_ref().unwrap();
    let experts = moe["num_experts"].as_u64().unwrap();
    let moe_layers = 1; // the smoke model: 2 layers, layer 0 in mlp_only_layers
                        // Small buckets, so the padding of several buckets is part of the count.
    let bucket_mb = 0.05;
    let bucket = (bucket_mb * 1024.0 * 1024.0 / 4.0) as u64;
    for (dp, zero) in [(2u64, false), (4, false), (2, true), (4, true), (3, true)] {
        let out = tempfile::tempdir().unwrap();
        let r = {
            let mut r = recipe_for(
                out.path(),
                1,
                zero,
                &[format!("parallel.bucket_mb={bucket_mb}")],
            );
            r.parallel.dp = dp as usize;
            r.train.grad_accum = 1;
            r.train.steps = 2;
            r
        };
        run_threads(&r, &RunOptions::default(), dp as usize).unwrap();
        let padded: u64 = (0..params)
            .step_by(bucket as usize)
            .map(|s| (params - s).min(bucket).div_ceil(dp) * dp)
            .sum();
        for m in metrics(out.path()) {
            let comm = &m["comm"];
            let get = |g: &str, op: &str, k: &str| comm[g][op][k].as_u64().unwrap_or(0);
            let ring = |bytes: u64| bytes * (dp - 1) / dp;
            if zero {
                assert_eq!(
                    get("dp", "reduce_scatter", "payload"),
                    4 * padded,
                    "dp {dp}"
                );
                assert_eq!(get("dp", "all_gather", "payload"), 4 * padded);
                // The global gradient norm: one f64.
                assert_eq!(get("dp", "all_reduce", "payload"), 8);
                let buckets = params.div_ceil(bucket);
                let per_bucket: u64 = (0..buckets)
                    .map(|b| ring(4 * (params - b * bucket).min(bucket).div_ceil(dp) * dp))
                    .sum();
                assert_eq!(get("dp", "reduce_scatter", "wire"), per_bucket);
                assert_eq!(get("dp", "all_gather", "wire"), per_bucket);
            } else {
                assert_eq!(get("dp", "all_reduce", "payload"), 4 * params, "dp {dp}");
                assert!(comm["dp"].get("reduce_scatter").is_none());
                let per_bucket: u64 = (0..params.div_ceil(bucket))
                    .map(|b| 2 * ring(4 * (params - b * bucket).min(bucket)))
                    .sum();
                assert_eq!(get("dp", "all_reduce", "wire"), per_bucket);
            }
            // Target and micro-batch counts, then loss, aux, z, tokens and expert counts (f64).
            assert_eq!(
                get("world", "all_reduce", "payload"),
                8 * (2 + 4 + experts * moe_layers)
            );
        }
    }
}

#[test]
fn a_silent_rank_makes_the_others_fail_within_the_timeout() {
    let out = tempfile::tempdir().unwrap();
    let r = recipe_for(out.path(), 2, false, &["parallel.timeout_s=2".into()]);
    let opts = RunOptions {
        fault: Some(Fault {
            kind: FaultKind::Stall,
            rank: 1,
            step: 3,
        }),
        ..RunOptions::default()
    };
    let started = Instant::now();
    let e = run_threads(&r, &opts, 2).unwrap_err().to_string();
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(2 + 5), "took {waited:?}");
    assert!(
        e.contains("timed out after 2.0s on rank 0")
            && e.contains("still waiting for [1]")
            && e.contains("group `world`"),
        "{e}"
    );
    assert_eq!(losses(out.path()).len(), 2, "steps 1 and 2 ran");
}
