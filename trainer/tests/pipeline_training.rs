//! Pipeline parallelism on thread ranks against the one-rank run of the same global batch
//! (10 steps of the tiny 4-layer MoE, or its all-dense variant, untied head): losses, router
//! losses, expert loads and final weights; the computes each rank ran against the schedule
//! function's order; checkpoints written under a pipeline resumed at another layout.

mod common;

use std::path::Path;

use common::layout::{assert_evals_match, layout, recipe_for, router_metrics, Layout, ONE, STEPS};
use common::{assert_runs_match, hf_weights, losses, max_diff, max_loss_diff, Set};
use moeru_trainer::pipeline::schedule::{compute_order, PipelineShape};
use moeru_trainer::{run_threads_summaries, run_training, RunOptions, RunSummary};

/// A layout with `pp` pipeline ranks of `v` chunks each, over `base`'s dp × tp (ep folded).
#[derive(Debug, Clone, Copy)]
struct Pipe {
    base: Layout,
    pp: usize,
    v: usize,
}

const fn pipe(pp: usize, v: usize, base: Layout) -> Pipe {
    Pipe { base, pp, v }
}

/// Every layer dense (a MoE layer would come every fifth layer of four).
const DENSE: [Set; 1] = [("model.architecture.decoder_sparse_step", &5)];

fn run(out: &Path, p: Pipe, model: &[Set], opts: &RunOptions) -> Vec<RunSummary> {
    let pipe: [Set; 2] = [("parallel.pp", &p.pp), ("parallel.pp_virtual", &p.v)];
    let r = recipe_for(out, p.base, &[model, &pipe[..]].concat());
    let ranks = p.base.dp * p.base.tp * p.pp;
    match ranks {
        1 => vec![run_training(&r, opts).unwrap_or_else(|e| panic!("{p:?}: {e}"))],
        _ => run_threads_summaries(&r, opts, ranks).unwrap_or_else(|e| panic!("{p:?}: {e}")),
    }
}

/// `p` against the one-rank run in `reference`: within 1e-5 (`assert_runs_match`), router
/// losses within 1e-6 and expert loads exactly; returns the largest loss and weight
/// differences.
fn check(p: Pipe, model: &[Set], reference: &Path) -> (f64, f32) {
    let out = tempfile::tempdir().unwrap();
    check_in(out.path(), p, model, reference)
}

/// [`check`], the run writing under `out`.
fn check_in(out: &Path, p: Pipe, model: &[Set], reference: &Path) -> (f64, f32) {
    let ranks = run(out, p, model, &RunOptions::default());
    let what = format!("{p:?}");
    assert_runs_match(out, reference, STEPS, &what);
    let (ra, rb) = (router_metrics(out), router_metrics(reference));
    for (step, (x, y)) in ra.iter().zip(&rb).enumerate() {
        assert!((x[0] - y[0]).abs() <= 1e-6, "{what}: aux {x:?} vs {y:?}");
        assert!((x[1] - y[1]).abs() <= 1e-6, "{what}: z {x:?} vs {y:?}");
        assert_eq!(x[2..], y[2..], "{what}: step {} expert loads", step + 1);
    }
    assert_order(p, &ranks);
    let loss = max_loss_diff(&losses(out), &losses(reference));
    let w = max_diff(&hf_weights(out, STEPS), &hf_weights(reference, STEPS));
    (loss, w)
}

/// Every rank ran its computes in the schedule function's order.
fn assert_order(p: Pipe, ranks: &[RunSummary]) {
    let shape = PipelineShape {
        pp: p.pp,
        virtual_chunks: p.v,
        micro_batches: 8 / 2 / p.base.dp,
        group: p.pp,
    };
    for r in ranks {
        let ran = (r.pipeline_order.as_ref()).unwrap_or_else(|| panic!("{p:?}: no order"));
        // World ranks are pp-major (the mesh's order: pp, dp, tp).
        let stage = r.rank / (p.base.dp * p.base.tp);
        assert_eq!(ran, &compute_order(&shape, stage), "{p:?} rank {}", r.rank);
    }
}

fn reference(model: &[Set]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    run(dir.path(), pipe(1, 1, ONE), model, &RunOptions::default());
    dir
}

/// pp2 of the dense and of the MoE model is the one-rank run bit for bit, clipping included
/// (the global norm adds the stages' per-parameter norms in one rank's order, `NormOrder`).
#[test]
fn pp2_is_bitwise_the_one_rank_run() {
    for model in [&DENSE[..], &[]] {
        let one = reference(model);
        let (loss, weights) = check(pipe(2, 1, ONE), model, one.path());
        assert_eq!(
            (loss, weights),
            (0.0, 0.0),
            "pp2 (dense: {})",
            !model.is_empty()
        );
    }
}

#[test]
fn pipelines_of_the_moe_match_one_rank() {
    let one = reference(&[]);
    // One layer a stage, and interleaved: bit for bit too.
    for p in [pipe(4, 1, ONE), pipe(2, 2, ONE)] {
        let (loss, weights) = check(p, &[], one.path());
        assert_eq!((loss, weights), (0.0, 0.0), "{p:?}");
    }
}

#[test]
fn pipelines_compose_with_data_tensor_and_expert_parallelism() {
    let one = reference(&[]);
    for p in [
        pipe(2, 1, layout(2, 1, 1, false, true)),
        pipe(2, 1, layout(1, 2, 1, true, false)),
        pipe(2, 1, layout(2, 1, 2, false, true)),
        pipe(2, 1, layout(2, 2, 4, true, true)),
    ] {
        let (loss, weights) = check(p, &[], one.path());
        eprintln!("{p:?}: loss {loss:.2e}, weights {weights:.2e}");
    }
}

/// The smoke model as it is (2 layers, tied embeddings) over two stages, one layer each: the
/// head's copy of the embedding on the last stage and the input's on the first get summed
/// gradients (each checkpoint checks them equal bit for bit); evaluation runs through the
/// stages.
#[test]
fn tied_embeddings_across_stages_with_evaluation() {
    let model: [Set; 5] = [
        ("model.architecture.num_hidden_layers", &2),
        ("model.architecture.tie_word_embeddings", &true),
        ("data.eval", &"recipes/smoke/data/eval"),
        ("train.eval_every", &5),
        ("train.eval_batches", &2),
    ];
    let one = reference(&model);
    for p in [pipe(2, 1, ONE), pipe(2, 1, layout(1, 2, 2, true, false))] {
        let out = tempfile::tempdir().unwrap();
        let (loss, weights) = check_in(out.path(), p, &model, one.path());
        eprintln!("tied {p:?}: loss {loss:.2e}, weights {weights:.2e}");
        assert_evals_match(out.path(), one.path(), 2);
    }
}

/// A checkpoint written by the owners of a dp2·pp2·tp2·ep4 run (8 ranks) resumes at one rank
/// and at pp2·tp2, and a one-rank checkpoint at interleaved pp2·v2, each continuing within
/// 1e-5 of the uninterrupted run.
#[test]
fn a_pipeline_checkpoint_resumes_at_other_layouts() {
    let one = reference(&[]);
    let half = RunOptions {
        stop_after: Some(STEPS / 2),
        ..RunOptions::default()
    };
    let eight = pipe(2, 1, layout(2, 2, 4, true, true));
    let cases = [
        (eight, pipe(1, 1, ONE)),
        (eight, pipe(2, 1, layout(1, 2, 1, true, false))),
        (pipe(1, 1, ONE), pipe(2, 2, ONE)),
    ];
    for (written, to) in cases {
        let out = tempfile::tempdir().unwrap();
        run(out.path(), written, &[], &half);
        run(out.path(), to, &[], &RunOptions::default());
        assert_runs_match(
            out.path(),
            one.path(),
            STEPS,
            &format!("{written:?} -> {to:?}"),
        );
    }
}
