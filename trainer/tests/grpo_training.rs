//! GRPO in the training loop on the tests' tiny recipe (trainer/tests/recipes/grpo.yaml: the
//! toy a + b task, 4 prompts × 4 completions, two updates per generation batch, a KL term):
//! dp2 generates the same rollouts bit for bit as one rank and trains to the same losses and
//! weights (1e-6), and an interrupted run resumes to the same rollouts and final weights bit
//! for bit; for full fine-tuning (a frozen reference) and for LoRA (adapters off).

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{load_test_recipe, losses, max_diff, max_loss_diff, step_dir, tensors, Set};
use moeru_trainer::recipe::schema::Recipe;
use moeru_trainer::{run_threads, run_training, RunOptions};

const STEPS: u64 = 6;

fn recipe(out: &Path, sets: &[Set]) -> Recipe {
    load_test_recipe("grpo.yaml", out, sets)
}

const LORA: [Set; 3] = [
    ("lora.rank", &8),
    ("lora.alpha", &16),
    (
        "lora.target_modules",
        &"[q_proj, v_proj, gate_proj, up_proj, down_proj]",
    ),
];

/// The variants each test runs: full fine-tuning, and LoRA.
fn variants() -> [(&'static str, &'static [Set<'static>]); 2] {
    [("full", &[]), ("lora", &LORA)]
}

/// The trained tensors of the step-`step` checkpoint: adapters under LoRA, else weights.
fn trained(out: &Path, step: u64) -> Vec<(String, Vec<f32>)> {
    let dir = step_dir(out, step);
    match dir.join("adapter_model.safetensors").exists() {
        true => tensors(&dir.join("adapter_model.safetensors")),
        false => tensors(&dir.join("model.safetensors")),
    }
}

/// Every rollout the run logged, by (generation, slot): its completion ids and reward. Of a
/// generation logged twice (redone after a resume) the later lines win.
fn rollouts(out: &Path) -> BTreeMap<(u64, u64), (Vec<i64>, f64)> {
    let mut all = BTreeMap::new();
    let mut files: Vec<_> = std::fs::read_dir(out.join("logs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains("completions-rank"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no completions logged under {out:?}");
    for f in files {
        for line in std::fs::read_to_string(f).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let ids = (v["completion_ids"].as_array().unwrap().iter())
                .map(|t| t.as_i64().unwrap())
                .collect();
            let key = (
                v["generation"].as_u64().unwrap(),
                v["slot"].as_u64().unwrap(),
            );
            all.insert(key, (ids, v["reward"].as_f64().unwrap()));
        }
    }
    all
}

/// A run's rollouts cover every slot of every generation, and not every reward is equal (or
/// the advantages, and so the updates, would all be zero).
fn check_rollouts(r: &BTreeMap<(u64, u64), (Vec<i64>, f64)>) {
    assert_eq!(
        r.len(),
        (STEPS / 2 * 16) as usize,
        "16 rollouts per generation"
    );
    let rewards: Vec<f64> = r.values().map(|v| v.1).collect();
    assert!(rewards.iter().any(|&x| x != rewards[0]), "{rewards:?}");
}

#[test]
fn data_parallel_equals_one_rank() {
    for (what, variant) in variants() {
        let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        run_training(&recipe(one.path(), variant), &RunOptions::default())
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let sets = [variant, &[("train.grad_accum", &1)]].concat();
        run_threads(&recipe(two.path(), &sets), &RunOptions::default(), 2)
            .unwrap_or_else(|e| panic!("{what} dp2: {e}"));
        let (a, b) = (rollouts(one.path()), rollouts(two.path()));
        check_rollouts(&a);
        assert!(a == b, "{what}: dp2's rollouts differ from one rank's");
        let loss_diff = max_loss_diff(&losses(one.path()), &losses(two.path()));
        let weight_diff = max_diff(&trained(one.path(), STEPS), &trained(two.path(), STEPS));
        eprintln!("{what} dp2: max loss diff {loss_diff:.1e}, max weight diff {weight_diff:.1e}");
        assert!(loss_diff <= 1e-6, "{what}: losses differ by {loss_diff}");
        assert!(
            weight_diff <= 1e-6,
            "{what}: weights differ by {weight_diff}"
        );
        let moved = max_diff(&trained(one.path(), 2), &trained(one.path(), STEPS));
        assert!(
            moved > 1e-4,
            "{what}: training moved the weights by {moved} only"
        );
    }
}

#[test]
fn stop_and_resume_is_bit_exact() {
    for (what, variant) in variants() {
        let (whole, cut) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        run_training(&recipe(whole.path(), variant), &RunOptions::default())
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        // Stopped in the middle of generation 1 (steps 2 and 3); its checkpoint is at step 2,
        // so generation 1 is generated again from the restored sampler position.
        let stop = RunOptions {
            stop_after: Some(3),
            ..Default::default()
        };
        let first = run_training(&recipe(cut.path(), variant), &stop).unwrap();
        assert_eq!(first.end_step, 3);
        let second = run_training(&recipe(cut.path(), variant), &RunOptions::default())
            .unwrap_or_else(|e| panic!("{what} resumed: {e}"));
        assert_eq!((second.start_step, second.end_step), (2, STEPS));
        let (a, b) = (rollouts(whole.path()), rollouts(cut.path()));
        check_rollouts(&a);
        assert!(a == b, "{what}: the resumed run's rollouts differ");
        assert_eq!(losses(whole.path()), losses(cut.path()), "{what}: losses");
        let diff = max_diff(&trained(whole.path(), STEPS), &trained(cut.path(), STEPS));
        assert_eq!(
            diff, 0.0,
            "{what}: final weights differ by {diff} after resume"
        );
    }
}

/// Router replay's metrics on the toy task's MoE layer: under `rollout` (R3) the training
/// forwards replay the generator's routes; under `old` (R2) the first update on a generation
/// batch replays the old policy's own routes, so its live routing agrees exactly.
#[test]
fn router_replay_modes_report_their_mismatch() {
    for (mode, first_exact) in [("rollout", false), ("old", true), ("live", false)] {
        let out = tempfile::tempdir().unwrap();
        let sets: [Set; 1] = [("moe.router_replay", &mode)];
        run_training(&recipe(out.path(), &sets), &RunOptions::default())
            .unwrap_or_else(|e| panic!("{mode}: {e}"));
        let m = common::metrics(out.path());
        let any: Vec<Option<f64>> = (m.iter())
            .filter(|l| l.get("loss").is_some())
            .map(|l| l["router_replay_mismatch_frac_any_layer"].as_f64())
            .collect();
        eprintln!("{mode}: any-layer mismatch per step {any:?}");
        match mode {
            "live" => assert!(any.iter().all(Option::is_none), "{mode}: {any:?}"),
            _ => assert!(any
                .iter()
                .all(|a| a.is_some_and(|x| (0.0..=1.0).contains(&x)))),
        }
        if first_exact {
            assert_eq!(
                any[0],
                Some(0.0),
                "{mode}: the first update replays its own routes"
            );
        }
        let k3: Vec<f64> = m.iter().filter_map(|l| l["mismatch_k3"].as_f64()).collect();
        assert_eq!(k3.len(), STEPS as usize, "{mode}: mismatch_k3 every step");
    }
}
