//! The README's first command: the smoke recipe trains and its loss falls clearly.

mod common;

use common::{moeru_command, train_recipe};

#[test]
fn smoke_recipe_trains_and_loss_halves() {
    let tmp = tempfile::tempdir().unwrap();
    let lines = train_recipe(tmp.path(), "recipes/smoke-tiny-moe.yaml", &[]);
    let losses: Vec<f64> = lines
        .iter()
        .filter_map(|l| l.get("loss")?.as_f64())
        .collect();
    assert_eq!(losses.len(), 60, "one metrics line per step");
    let (first, last) = (losses[0], losses[losses.len() - 1]);
    eprintln!("smoke: loss {first:.4} -> {last:.4}");
    // The threshold stated in recipes/smoke-tiny-moe.yaml.
    assert!(last < 0.5 * first, "loss fell only from {first} to {last}");
    for l in &lines {
        if l.get("loss").is_some() {
            assert!(
                l["aux_loss"].as_f64().is_some()
                    && l["expert_load"].as_array().is_some_and(|a| a.len() == 1)
            );
        }
    }
    assert!(
        lines.iter().any(|l| l.get("eval_loss").is_some()),
        "evaluation ran"
    );
    assert!(tmp.path().join("ckpt/step-000060/manifest.json").exists());
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("ckpt/latest"))
            .unwrap()
            .trim(),
        "step-000060"
    );

    // `moeru eval` on the trained checkpoint: held-out loss well below the untrained one.
    let ckpt = tmp.path().join("ckpt/step-000060");
    let eval = moeru_command()
        .args(["eval", "--model", ckpt.to_str().unwrap()])
        .args([
            "--data",
            "recipes/smoke/data/eval",
            "--seq-len",
            "128",
            "--max-batches",
            "4",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&eval.stdout);
    assert!(
        eval.status.success(),
        "{}",
        String::from_utf8_lossy(&eval.stderr)
    );
    let loss: f64 = stdout.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(
        loss < 0.5 * first,
        "eval loss {loss} vs first training loss {first}"
    );
}

/// Runs `moeru train` on the smoke recipe with one override that makes it invalid; returns
/// stderr after checking the exit code is 2 and the message one line.
fn failing_train(set: &str) -> String {
    let out = moeru_command()
        .args(["train", "recipes/smoke-tiny-moe.yaml", "--set", set])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    stderr
}

#[test]
fn bad_recipe_exits_with_2_naming_file_line_and_key() {
    let stderr = failing_train("train.stesp=5");
    assert!(
        stderr.contains("`train.steps`") && stderr.contains("train.stesp"),
        "{stderr}"
    );

    // Parses, but asks for a layout the model cannot take: also a recipe error.
    let stderr = failing_train("parallel.ep=3");
    assert!(
        stderr.contains("`parallel.ep` = 3") && stderr.contains("dp × tp = 1"),
        "{stderr}"
    );
}
