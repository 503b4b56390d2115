//! Data parallelism on thread ranks against the one-rank run of the same global batch:
//! DP 2 and 4, with and without ZeRO-1; resuming a DP=2 ZeRO-1 checkpoint at DP 4 and 1;
//! the counted communication against its analytic value; a silent rank's timeout.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{assert_runs_match, losses, metrics, test_recipe, Set};
use moeru_models::params::param_count;
use moeru_models::Qwen3Config;
use moeru_trainer::recipe::schema::Recipe;
use moeru_trainer::{run_threads, run_training, Fault, FaultKind, FaultPoint, RunOptions};

const STEPS: u64 = 10;
/// Sequences per global batch: micro-batch 2 × grad_accum × dp.
const GLOBAL: usize = 8;

fn recipe_for(out: &Path, dp: usize, zero: bool, extra: &[Set]) -> Recipe {
    let sets: [Set; 7] = [
        ("train.steps", &STEPS),
        ("checkpoint.every", &5),
        ("data.seq_len", &64),
        ("train.micro_batch_size", &2),
        ("train.grad_accum", &(GLOBAL / 2 / dp)),
        ("parallel.dp", &dp),
        ("parallel.zero_stage", &(zero as u8)),
    ];
    test_recipe(out, &[&sets[..], extra].concat())
}

fn run(out: &Path, dp: usize, zero: bool, extra: &[Set], opts: &RunOptions) {
    let r = recipe_for(out, dp, zero, extra);
    if dp == 1 {
        run_training(&r, opts).unwrap_or_else(|e| panic!("{e}"));
    } else {
        run_threads(&r, opts, dp).unwrap_or_else(|e| panic!("{e}"));
    }
}

/// Per-step losses and final weights of `out` against `reference`; both ≤ 1e-5.
fn assert_matches(out: &Path, reference: &Path, what: &str) {
    assert_runs_match(out, reference, STEPS, what);
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
    let cfg = Qwen3Config::from_map(
        model.model.architecture.clone().unwrap(),
        Path::new("recipe"),
    )
    .unwrap();
    let experts = cfg.moe.as_ref().unwrap().num_experts as u64;
    let moe_layers = (0..cfg.num_hidden_layers)
        .filter(|&l| cfg.is_moe_layer(l))
        .count() as u64;
    assert!(moe_layers > 0, "the test model has MoE layers");
    let params = {
        let mut init = moeru_models::init::RandomInit { seed: 0, std: 0.02 };
        let mut m = moeru_models::Qwen3Model::new(cfg, &mut init, &burn::tensor::Device::flex())
            .unwrap_or_else(|never| match never {});
        param_count(&mut m) as u64
    };
    // Small buckets, so the padding of several buckets is part of the count.
    let bucket_mb = 0.05;
    let bucket = (bucket_mb * 1024.0 * 1024.0 / 4.0) as u64;
    for (dp, zero) in [(2u64, false), (4, false), (2, true), (4, true), (3, true)] {
        let out = tempfile::tempdir().unwrap();
        let r = {
            let mut r = recipe_for(out.path(), 1, zero, &[("parallel.bucket_mb", &bucket_mb)]);
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
            // Sums over the DP group besides the gradients: the target and micro-batch counts
            // before the step, then loss, aux, z, tokens and expert counts after it (f64).
            let reported = 8 * (4 + experts * moe_layers);
            let bookkeeping = 8 * 2 + reported;
            let bookkeeping_wire = 2 * ring(8 * 2) + 2 * ring(reported);
            if zero {
                assert_eq!(
                    get("dp", "reduce_scatter", "payload"),
                    4 * padded,
                    "dp {dp}"
                );
                assert_eq!(get("dp", "all_gather", "payload"), 4 * padded);
                // The global gradient norm: one f64.
                assert_eq!(get("dp", "all_reduce", "payload"), 8 + bookkeeping);
                let buckets = params.div_ceil(bucket);
                let per_bucket: u64 = (0..buckets)
                    .map(|b| ring(4 * (params - b * bucket).min(bucket).div_ceil(dp) * dp))
                    .sum();
                assert_eq!(get("dp", "reduce_scatter", "wire"), per_bucket);
                assert_eq!(get("dp", "all_gather", "wire"), per_bucket);
            } else {
                assert_eq!(
                    get("dp", "all_reduce", "payload"),
                    4 * params + bookkeeping,
                    "dp {dp}"
                );
                assert!(comm["dp"].get("reduce_scatter").is_none());
                let per_bucket: u64 = (0..params.div_ceil(bucket))
                    .map(|b| 2 * ring(4 * (params - b * bucket).min(bucket)))
                    .sum();
                assert_eq!(
                    get("dp", "all_reduce", "wire"),
                    per_bucket + bookkeeping_wire
                );
            }
            // Nothing of a step goes over the world group: it is the DP group here.
            assert!(comm.get("world").is_none(), "{comm}");
        }
    }
}

#[test]
fn a_silent_rank_makes_the_others_fail_within_the_timeout() {
    let out = tempfile::tempdir().unwrap();
    let r = recipe_for(out.path(), 2, false, &[("parallel.timeout_s", &2)]);
    let opts = RunOptions {
        fault: Some(Fault {
            kind: FaultKind::Stall,
            rank: 1,
            step: 3,
            point: FaultPoint::Start,
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
            && e.contains("group `dp`"),
        "{e}"
    );
    assert_eq!(losses(out.path()).len(), 2, "steps 1 and 2 ran");
}
