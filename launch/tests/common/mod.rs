//! What the `moeru` binary's end-to-end tests share: the workspace they run in, running the
//! binary there, and the trainer tests' own recipes (for tests of commands, not of the
//! user-facing recipes in `recipes/`).
//!
//! Each test file is its own crate and uses part of this, so unused items are allowed.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The trainer tests' tiny Qwen3-MoE (today the same as `recipes/smoke-tiny-moe.yaml`),
/// relative to the workspace root, where `moeru` runs.
pub const TINY_MOE: &str = "trainer/tests/recipes/tiny-moe.yaml";
/// The trainer tests' tiny LoRA SFT (today the same as `recipes/smoke-lora-sft.yaml`).
pub const LORA_SFT: &str = "trainer/tests/recipes/lora-sft.yaml";

/// The workspace root, against which the recipes' relative paths resolve.
pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `moeru ARGS` run in the workspace root.
pub fn moeru(args: &[&str]) -> Output {
    moeru_command().args(args).output().expect("run moeru")
}

/// The `moeru` binary as a command in the workspace root, for arguments and environment.
pub fn moeru_command() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_moeru"));
    c.current_dir(workspace());
    c
}

/// A path as an argument (the tests' paths are UTF-8).
pub fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A failed run: non-zero exit, one `error:` line on stderr, no panic or backtrace.
pub fn assert_clean_failure(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {stderr}"
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{stderr}"
    );
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "not one line: {stderr}"
    );
    assert!(stderr.starts_with("error:"), "{stderr}");
    stderr
}

/// Runs `moeru train recipe` with its checkpoints and logs under `dir` (`ckpt`, `logs`) and
/// `extra` arguments; asserts success and returns every line of its metrics.jsonl.
pub fn train_recipe(dir: &Path, recipe: &str, extra: &[&str]) -> Vec<serde_json::Value> {
    let out = moeru_command()
        .args(["train", recipe])
        .arg(format!(
            "--set=checkpoint.dir={}",
            dir.join("ckpt").display()
        ))
        .arg(format!("--set=logging.dir={}", dir.join("logs").display()))
        .args(extra)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let text = std::fs::read_to_string(dir.join("logs/metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The `--set` pairs of the multi-process launch tests' tiny-MoE runs: `steps` steps,
/// checkpoints every 2 (all kept) and logs under `out`, no evaluation or progress bar,
/// sequences of 64, micro-batches of 2. The caller adds the layout and its grad_accum.
pub fn launch_settings(out: &Path, steps: u64) -> Vec<String> {
    [
        format!("train.steps={steps}"),
        "checkpoint.every=2".into(),
        "checkpoint.keep_last=0".into(),
        format!("checkpoint.dir={}", out.join("ckpt").display()),
        format!("logging.dir={}", out.join("logs").display()),
        "logging.progress=false".into(),
        "logging.tensorboard=false".into(),
        "data.eval=null".into(),
        "train.eval_every=0".into(),
        "data.seq_len=64".into(),
        "train.micro_batch_size=2".into(),
    ]
    .into_iter()
    .flat_map(|s| ["--set".to_string(), s])
    .collect()
}
