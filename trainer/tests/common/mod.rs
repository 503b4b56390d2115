//! What the trainer's integration tests share: the workspace, the tests' own recipes
//! (`trainer/tests/recipes/`, not the user-facing `recipes/`) loaded through the real `--set`
//! machinery, and reading back what a run wrote (metrics, checkpoint tensors).
//!
//! Each test file is its own crate and uses part of this, so unused items are allowed.
#![allow(dead_code)]

pub mod layout;

use std::fmt::Display;
use std::path::{Path, PathBuf};

use moeru_checkpoints::TensorFile;
use moeru_models::{Batch, ForwardCtx, Qwen3Model};
use moeru_trainer::metrics::read_metrics;
use moeru_trainer::recipe::{self, schema::Recipe};
use serde_json::Value;

/// The tiny Qwen3-MoE trained from scratch on the smoke corpus.
pub const TINY_MOE: &str = "tiny-moe.yaml";
/// Rank-8 LoRA SFT of the committed smoke base on the smoke chat data.
pub const LORA_SFT: &str = "lora-sft.yaml";

/// One `--set KEY.PATH=VALUE` override: `("train.steps", &4)`, `("data.eval", &"null")`.
pub type Set<'a> = (&'a str, &'a dyn Display);

/// The workspace root, against which the recipes' relative paths resolve.
pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A committed smoke asset: `smoke("data/chat-train")` is `recipes/smoke/data/chat-train`.
pub fn smoke(path: &str) -> PathBuf {
    workspace().join("recipes/smoke").join(path)
}

/// The smoke-pretrained MoE the LoRA recipe adapts (`recipes/smoke/base`).
pub fn smoke_base() -> PathBuf {
    smoke("base")
}

/// [`TINY_MOE`] for a run writing under `out`, with `sets` applied (see [`load_test_recipe`]).
pub fn test_recipe(out: &Path, sets: &[Set]) -> Recipe {
    load_test_recipe(TINY_MOE, out, sets)
}

/// [`LORA_SFT`] for a run writing under `out`, with `sets` applied (see [`load_test_recipe`]).
pub fn lora_test_recipe(out: &Path, sets: &[Set]) -> Recipe {
    load_test_recipe(LORA_SFT, out, sets)
}

/// `trainer/tests/recipes/<file>` as `moeru train --set ...` loads it: first the settings of
/// every test run (checkpoints in `out/ckpt`, metrics in `out/logs`, every checkpoint kept, no
/// evaluation, progress bar or TensorBoard), then `sets` in order, so a test can override
/// those too. Relative paths are then taken against the workspace root (tests run in the
/// crate folder, `moeru train` in the workspace). Panics with the recipe error.
pub fn load_test_recipe(file: &str, out: &Path, sets: &[Set]) -> Recipe {
    let (ckpt, logs) = (out.join("ckpt"), out.join("logs"));
    let run: [Set; 7] = [
        ("checkpoint.dir", &ckpt.display()),
        ("checkpoint.keep_last", &0),
        ("logging.dir", &logs.display()),
        ("logging.progress", &false),
        ("logging.tensorboard", &false),
        ("data.eval", &"null"),
        ("train.eval_every", &0),
    ];
    let overrides: Vec<String> = run
        .iter()
        .chain(sets)
        .map(|(key, value)| format!("{key}={value}"))
        .collect();
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/recipes")
        .join(file);
    let mut r = recipe::load(&path, &overrides).unwrap_or_else(|e| panic!("{e}"));
    let ws = workspace();
    let resolve = |p: &mut PathBuf| {
        if p.is_relative() {
            *p = ws.join(&*p);
        }
    };
    resolve(&mut r.data.train);
    r.data.eval.iter_mut().for_each(resolve);
    r.model.path.iter_mut().for_each(resolve);
    if let Some(lora) = &mut r.lora {
        lora.adapter.iter_mut().for_each(resolve);
    }
    r
}

/// Every line of the run's `out/logs/metrics.jsonl`.
pub fn metrics(out: &Path) -> Vec<Value> {
    read_metrics(&out.join("logs/metrics.jsonl")).unwrap()
}

/// The training loss of every step logged under `out`, in order.
pub fn losses(out: &Path) -> Vec<f64> {
    metrics(out)
        .iter()
        .filter_map(|m| m["loss"].as_f64())
        .collect()
}

/// The checkpoint of `step` of the run under `out`.
pub fn step_dir(out: &Path, step: u64) -> PathBuf {
    out.join(format!("ckpt/step-{step:06}"))
}

/// Every tensor of a safetensors file as f32, sorted by name.
pub fn tensors(path: &Path) -> Vec<(String, Vec<f32>)> {
    let f = TensorFile::open(path).unwrap();
    let mut names: Vec<String> = f.shapes().into_iter().map(|(n, _)| n).collect();
    names.sort();
    names
        .into_iter()
        .map(|n| (n.clone(), f.f32(&n).unwrap().0))
        .collect()
}

/// The weights of the checkpoint of `step` under `out`, under Hugging Face names (experts one
/// by one) whichever layout wrote them, sorted by name.
pub fn hf_weights(out: &Path, step: u64) -> Vec<(String, Vec<f32>)> {
    let dir = step_dir(out, step);
    let device = burn::tensor::Device::flex();
    let mut model =
        moeru_checkpoints::load_hf_model(&dir, &device).unwrap_or_else(|e| panic!("{e}"));
    let mut named: Vec<(String, Vec<f32>)> = moeru_checkpoints::hf_tensors(&mut model)
        .into_iter()
        .map(|(n, t)| (n, t.f32_values()))
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

/// Per-step losses and the weights after `steps` of run `out` against `reference`, both
/// within 1e-5, and the run learned something (or matching would prove little).
pub fn assert_runs_match(out: &Path, reference: &Path, steps: u64, what: &str) {
    let (a, b) = (losses(out), losses(reference));
    assert_eq!(a.len(), steps as usize, "{what}: steps logged");
    assert_eq!(a.len(), b.len(), "{what}");
    let loss_diff = max_loss_diff(&a, &b);
    let weight_diff = max_diff(&hf_weights(out, steps), &hf_weights(reference, steps));
    eprintln!("{what}: max loss diff {loss_diff:.2e}, max weight diff {weight_diff:.2e}");
    assert!(loss_diff <= 1e-5, "{what}: loss differs by {loss_diff}");
    assert!(
        weight_diff <= 1e-5,
        "{what}: weights differ by {weight_diff}"
    );
    assert!(a[a.len() - 1] < a[0] - 0.1, "{what}: loss {a:?}");
}

/// The largest element difference of two [`tensors`] lists, which must name the same tensors.
pub fn max_diff(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut d = 0f32;
    for ((na, va), (nb, vb)) in a.iter().zip(b) {
        assert_eq!(na, nb);
        for (x, y) in va.iter().zip(vb) {
            d = d.max((x - y).abs());
        }
    }
    d
}

/// The largest difference of two loss curves, over the steps both have.
pub fn max_loss_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// A plain forward of `model` over `batch` (no dropout): the full f32 logits
/// `[batch, seq, vocab]`, flattened.
pub fn full_logits(model: &Qwen3Model, batch: &Batch) -> Vec<f32> {
    let ctx = ForwardCtx::default();
    moeru_models::params::to_f32_vec(model.logits(model.forward(batch, &ctx).hidden, &ctx))
}
