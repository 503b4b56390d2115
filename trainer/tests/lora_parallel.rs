//! LoRA under tensor and expert parallelism on thread ranks, against the one-rank run of the
//! same global batch: per-step losses and the final adapters (PEFT's file, written whole by
//! the sharded run) within 1e-5, the base digest equal whatever the layout, dropout on
//! row-parallel sites included; and LoRA checkpoints resuming at other layouts.

mod common;

use std::path::{Path, PathBuf};

use common::layout::{layout, Layout, GLOBAL, ONE};
use common::{
    lora_test_recipe, losses, max_diff, max_loss_diff, step_dir, tensors, test_recipe, Set,
};
use moeru_trainer::{run_threads, run_training, RunOptions};

const STEPS: u64 = 6;
/// Every target peft allows on the smoke MoE: attention, the experts and the router.
const MOE_TARGETS: &str = "[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, gate]";

/// `opts` of a LoRA run of `base` (the smoke MoE when `None`) on layout `l` writing under `out`.
fn run(out: &Path, l: Layout, base: Option<&Path>, extra: &[Set], opts: &RunOptions) {
    let base = base.map(|b| b.display().to_string());
    let base = base.as_deref().unwrap_or("recipes/smoke/base");
    let sets: [Set; 15] = [
        ("model.path", &base),
        ("data.seq_len", &64),
        ("train.steps", &STEPS),
        ("schedule.warmup_steps", &1),
        ("checkpoint.every", &3),
        ("train.micro_batch_size", &2),
        ("train.grad_accum", &(GLOBAL / 2 / l.dp)),
        ("lora.target_modules", &MOE_TARGETS),
        ("parallel.timeout_s", &60),
        ("parallel.dp", &l.dp),
        ("parallel.tp", &l.tp),
        ("parallel.ep", &l.ep),
        ("parallel.sequence_parallel", &l.sp),
        ("parallel.zero_stage", &(l.zero as u8)),
        ("train.seed", &3),
    ];
    let r = lora_test_recipe(out, &[&sets[..], extra].concat());
    let result = match l.dp * l.tp {
        1 => run_training(&r, opts).map(|_| ()),
        ranks => run_threads(&r, opts, ranks).map(|_| ()),
    };
    result.unwrap_or_else(|e| panic!("{l:?}: {e}"));
}

fn adapter_file(out: &Path, step: u64) -> PathBuf {
    step_dir(out, step).join("adapter_model.safetensors")
}

fn base_digest(out: &Path, step: u64) -> String {
    let path = step_dir(out, step).join("trainer_state.json");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    state["lora_base"]["digest"].as_str().unwrap().to_string()
}

/// Losses and the step-`STEPS` adapters of `out` against `reference` within 1e-5, the same
/// base digest, and adapters that moved (B starts at zero), or matching would prove little.
fn assert_matches(out: &Path, reference: &Path, what: &str) {
    let (a, b) = (losses(out), losses(reference));
    assert_eq!(a.len(), STEPS as usize, "{what}: steps logged");
    let loss_diff = max_loss_diff(&a, &b);
    let (ours, theirs) = (
        tensors(&adapter_file(out, STEPS)),
        tensors(&adapter_file(reference, STEPS)),
    );
    let weight_diff = max_diff(&ours, &theirs);
    eprintln!("{what}: max loss diff {loss_diff:.2e}, max adapter diff {weight_diff:.2e}");
    assert!(loss_diff <= 1e-5, "{what}: loss differs by {loss_diff}");
    assert!(
        weight_diff <= 1e-5,
        "{what}: adapters differ by {weight_diff}"
    );
    let moved = (theirs.iter())
        .filter(|(n, _)| n.contains("lora_B"))
        .map(|(_, v)| v.iter().fold(0f32, |m, x| m.max(x.abs())))
        .fold(f32::INFINITY, f32::min);
    assert!(moved > 1e-4, "{what}: some B barely trained ({moved})");
    assert_eq!(
        base_digest(out, STEPS),
        base_digest(reference, STEPS),
        "{what}"
    );
}

fn check_layouts(base: Option<&Path>, extra: &[Set], layouts: &[Layout]) {
    let reference = tempfile::tempdir().unwrap();
    run(reference.path(), ONE, base, extra, &RunOptions::default());
    for &l in layouts {
        let out = tempfile::tempdir().unwrap();
        run(out.path(), l, base, extra, &RunOptions::default());
        assert_matches(out.path(), reference.path(), &format!("{l:?}"));
    }
}

#[test]
fn lora_on_the_moe_matches_one_rank_under_tp_and_ep() {
    check_layouts(
        None,
        &[],
        &[
            layout(1, 2, 1, true, false),
            layout(2, 1, 2, false, true),
            layout(1, 2, 2, true, false),
            layout(2, 2, 4, true, true),
        ],
    );
}

/// A dense Qwen3 base (the tests' tiny model with every MLP dense), pretrained one step and
/// saved under `out`: its checkpoint folder.
fn dense_base(out: &Path) -> PathBuf {
    let sets: [Set; 4] = [
        ("model.architecture.model_type", &"qwen3"),
        ("train.steps", &1),
        ("schedule.warmup_steps", &0),
        ("checkpoint.every", &1),
    ];
    run_training(&test_recipe(out, &sets), &RunOptions::default()).unwrap();
    step_dir(out, 1)
}

#[test]
fn lora_with_dropout_on_a_dense_model_matches_one_rank_under_tp() {
    let tmp = tempfile::tempdir().unwrap();
    let base = dense_base(tmp.path());
    // The dense MLP's down_proj and o_proj are row-parallel: their dropout masks are cut.
    let extra: [Set; 2] = [
        (
            "lora.target_modules",
            &"[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]",
        ),
        ("lora.dropout", &0.1),
    ];
    check_layouts(
        Some(&base),
        &extra,
        &[layout(1, 2, 1, false, false), layout(2, 2, 1, true, true)],
    );
}

#[test]
fn lora_checkpoints_resume_at_other_layouts() {
    let reference = tempfile::tempdir().unwrap();
    run(reference.path(), ONE, None, &[], &RunOptions::default());
    let half = RunOptions {
        stop_after: Some(STEPS / 2),
        ..RunOptions::default()
    };
    let sharded = layout(1, 2, 2, true, false);
    let cases = [
        (sharded, ONE),
        (ONE, sharded),
        (layout(2, 1, 1, false, true), layout(2, 2, 2, true, true)),
    ];
    for (written, to) in cases {
        let out = tempfile::tempdir().unwrap();
        run(out.path(), written, None, &[], &half);
        // PEFT's two files, whole, whatever wrote them.
        assert!(adapter_file(out.path(), STEPS / 2).exists());
        assert!(!step_dir(out.path(), STEPS / 2)
            .join("model.safetensors.index.json")
            .exists());
        run(out.path(), to, None, &[], &RunOptions::default());
        assert_matches(
            out.path(),
            reference.path(),
            &format!("{written:?} -> {to:?}"),
        );
    }
}
