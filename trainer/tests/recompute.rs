//! `train.recompute: none | experts | layers` on the 4-layer MoE (a dense layer, three MoE
//! layers with the load-balancing and z losses): 10 steps give bit-identical losses, gradient
//! norms, expert loads and final weights, on one rank and under a pipeline with tensor and
//! expert parallelism. The router losses as logged are sums of per-layer shares under
//! recompute, so they agree to rounding (their gradients, and so the weights, are the same
//! bits).

mod common;

use std::path::Path;

use common::layout::{layout, recipe_for, Layout, ONE, STEPS};
use common::{hf_weights, losses, metrics, Set};
use moeru_trainer::{run_threads, run_training, RunOptions};

fn run(out: &Path, l: Layout, pp: usize, recompute: &str) {
    let sets: [Set; 2] = [("train.recompute", &recompute), ("parallel.pp", &pp)];
    let r = recipe_for(out, l, &sets);
    match l.dp * l.tp * pp {
        1 => run_training(&r, &RunOptions::default()).map(|_| ()),
        ranks => run_threads(&r, &RunOptions::default(), ranks).map(|_| ()),
    }
    .unwrap_or_else(|e| panic!("{recompute} {l:?} pp {pp}: {e}"));
}

/// Per step: the loss, the gradient norm and every expert load, as logged, and the router
/// losses.
fn logged(out: &Path) -> (Vec<String>, Vec<[f64; 2]>) {
    let steps: Vec<_> = metrics(out)
        .into_iter()
        .filter(|m| m["loss"].is_f64())
        .collect();
    let exact = (steps.iter())
        .map(|m| {
            let keep = ["loss", "grad_norm", "expert_load"];
            keep.iter()
                .map(|k| m[*k].to_string())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    let router = (steps.iter())
        .map(|m| {
            [
                m["aux_loss"].as_f64().unwrap(),
                m["z_loss"].as_f64().unwrap(),
            ]
        })
        .collect();
    (exact, router)
}

fn check(l: Layout, pp: usize) {
    let none = tempfile::tempdir().unwrap();
    run(none.path(), l, pp, "none");
    assert_eq!(losses(none.path()).len(), STEPS as usize);
    for mode in ["layers", "experts"] {
        let out = tempfile::tempdir().unwrap();
        run(out.path(), l, pp, mode);
        let what = format!("{mode} {l:?} pp {pp}");
        assert_eq!(losses(out.path()), losses(none.path()), "{what}: losses");
        let ((exact, router), (want, want_router)) = (logged(out.path()), logged(none.path()));
        assert_eq!(exact, want, "{what}: metrics");
        for (a, b) in router.iter().zip(&want_router) {
            assert!(
                (a[0] - b[0]).abs() < 1e-6 && (a[1] - b[1]).abs() < 1e-6,
                "{what}: {a:?} {b:?}"
            );
        }
        let (a, b) = (
            hf_weights(out.path(), STEPS),
            hf_weights(none.path(), STEPS),
        );
        assert!(a == b, "{what}: final weights differ");
    }
}

#[test]
fn recompute_is_bitwise_on_one_rank() {
    check(ONE, 1);
}

#[test]
fn recompute_is_bitwise_under_a_pipeline_with_tp_and_ep() {
    check(layout(1, 2, 2, true, false), 2);
}

/// Under LoRA (the frozen smoke base, a MoE with adapters on attention and the experts) the
/// recomputed runs train the same adapters bit for bit.
#[test]
fn recompute_is_bitwise_under_lora() {
    let run = |out: &Path, mode: &str| {
        let sets: [Set; 3] = [
            ("train.recompute", &mode),
            ("train.steps", &6),
            ("checkpoint.every", &6),
        ];
        let r = common::lora_test_recipe(out, &sets);
        run_training(&r, &RunOptions::default()).unwrap_or_else(|e| panic!("{mode}: {e}"));
        let adapters = common::step_dir(out, 6).join("adapter_model.safetensors");
        (losses(out), common::tensors(&adapters))
    };
    let none = tempfile::tempdir().unwrap();
    let want = run(none.path(), "none");
    for mode in ["layers", "experts"] {
        let out = tempfile::tempdir().unwrap();
        assert!(
            run(out.path(), mode) == want,
            "{mode}: losses or adapters differ"
        );
    }
}
