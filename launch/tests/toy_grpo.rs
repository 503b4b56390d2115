//! The toy GRPO demo (recipes/toy-grpo.yaml): GRPO teaches the SFT'd smoke model the answer
//! format and the sums. Sampled evaluation reward rises by at least 0.30 over the start and the
//! greedy reward reaches 0.80 within the recipe's steps; the same run with lr 0 stays within
//! ±0.05 of its start (the rise is learning, not evaluation noise).

mod common;

use common::train_recipe;

/// The run's evaluation lines by step: (step, sampled reward, greedy reward).
fn run(extra: &[&str]) -> (Vec<(u64, f64, f64)>, Vec<serde_json::Value>) {
    let tmp = tempfile::tempdir().unwrap();
    let lines = train_recipe(tmp.path(), "recipes/toy-grpo.yaml", extra);
    let evals = (lines.iter())
        .filter_map(|l| {
            let (s, g) = (
                l.get("eval_reward_sampled")?.as_f64()?,
                l["eval_reward_greedy"].as_f64()?,
            );
            Some((l["step"].as_u64()?, s, g))
        })
        .collect();
    (evals, lines)
}

#[test]
fn grpo_learns_the_toy_task_and_lr_zero_does_not() {
    let (evals, lines) = run(&[]);
    eprintln!("toy GRPO evaluations (step, sampled, greedy): {evals:?}");
    assert_eq!(
        evals.first().map(|e| e.0),
        Some(0),
        "the run evaluates before its first step"
    );
    let (start, end) = (evals[0], *evals.last().unwrap());
    assert_eq!(end.0, 60);
    assert!(
        end.1 >= start.1 + 0.30,
        "sampled reward rose only from {} to {}",
        start.1,
        end.1
    );
    assert!(end.2 >= 0.80, "greedy reward reached only {}", end.2);
    let steps: Vec<&serde_json::Value> = lines.iter().filter(|l| l.get("loss").is_some()).collect();
    assert_eq!(steps.len(), 60, "one metrics line per step");
    for key in [
        "reward",
        "reward_std",
        "frac_reward_zero_std",
        "rewards_correct_mean",
        "clip_ratio_region_mean",
        "completions_mean_length",
        "generation_tokens_per_s",
    ] {
        assert!(steps[0][key].as_f64().is_some(), "step lines carry {key}");
    }

    let (control, _) = run(&["--set=optim.lr=0"]);
    eprintln!("lr 0 control (step, sampled, greedy): {control:?}");
    assert_eq!(control[0], start, "the control starts where the run did");
    let last = control.last().unwrap();
    assert!(
        (last.1 - start.1).abs() <= 0.05,
        "with lr 0 the sampled reward moved from {} to {}",
        start.1,
        last.1
    );
}
