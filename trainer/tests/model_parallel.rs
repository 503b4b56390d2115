//! Tensor and expert parallelism on thread ranks against the one-rank run of the same global
//! batch (10 steps: losses, router losses, expert loads and final weights), resuming their
//! canonical checkpoints at other layouts, and the layout errors a recipe gets. The traffic
//! each layout moves is `parallel_traffic.rs`'s.

mod common;

use std::path::Path;

use common::layout::{
    assert_evals_match, layout, part_params, recipe_for, router_metrics, Layout, ONE, STEPS,
};
use common::{assert_runs_match, losses, max_loss_diff, step_dir, Set};
use moeru_models::Qwen3Config;
use moeru_trainer::parallel_sizes::validate_parallel_sizes;
use moeru_trainer::pipeline::PipelineLayout;
use moeru_trainer::recipe::schema::Recompute;
use moeru_trainer::run::mesh_for;
use moeru_trainer::{run_threads, run_threads_summaries, run_training, RunOptions, TrainError};

fn run(out: &Path, l: Layout, model: &[Set], opts: &RunOptions) -> Result<(), TrainError> {
    let r = recipe_for(out, l, model);
    match l.dp * l.tp {
        1 => run_training(&r, opts).map(|_| ()),
        ranks => run_threads(&r, opts, ranks).map(|_| ()),
    }
}

/// Losses, router metrics and step-10 weights of `out` against `reference`, within 1e-5;
/// expert loads (integer counts) exactly.
fn assert_matches(out: &Path, reference: &Path, what: &str) {
    assert_runs_match(out, reference, STEPS, what);
    let (ra, rb) = (router_metrics(out), router_metrics(reference));
    assert_eq!(ra.len(), rb.len(), "{what}");
    for (step, (x, y)) in ra.iter().zip(&rb).enumerate() {
        assert_eq!(x.len(), y.len(), "{what}: step {} router metrics", step + 1);
        assert!((x[0] - y[0]).abs() <= 1e-5, "{what}: aux {x:?} vs {y:?}");
        assert!((x[1] - y[1]).abs() <= 1e-5, "{what}: z {x:?} vs {y:?}");
        assert_eq!(x[2..], y[2..], "{what}: step {} expert loads", step + 1);
    }
}

/// Each layout in `layouts` of the model `model` against its one-rank run.
fn check_layouts(model: &[Set], layouts: &[Layout]) {
    let reference = tempfile::tempdir().unwrap();
    run(reference.path(), ONE, model, &RunOptions::default()).unwrap();
    for &l in layouts {
        let out = tempfile::tempdir().unwrap();
        run(out.path(), l, model, &RunOptions::default()).unwrap_or_else(|e| panic!("{l:?}: {e}"));
        let sets: Vec<String> = model.iter().map(|(k, v)| format!("{k}={v}")).collect();
        assert_matches(out.path(), reference.path(), &format!("{sets:?} {l:?}"));
    }
}

/// Every layer dense (a MoE layer would come every fifth layer of four).
const DENSE: [Set; 1] = [("model.architecture.decoder_sparse_step", &5)];

#[test]
fn tp2_dense_with_and_without_sequence_parallelism() {
    check_layouts(
        &DENSE,
        &[layout(1, 2, 1, false, false), layout(2, 2, 1, true, true)],
    );
}

#[test]
fn tp_and_ep_layouts_of_the_moe_match_one_rank() {
    check_layouts(
        &[],
        &[
            layout(1, 2, 1, true, false),
            layout(2, 1, 2, false, false),
            layout(4, 1, 4, false, true),
            layout(1, 2, 2, true, false),
            layout(2, 2, 4, true, true),
        ],
    );
}

#[test]
fn tied_embeddings_under_tp2_with_evaluation() {
    // The smoke model as it is: 2 layers, tied embeddings.
    let model: [Set; 5] = [
        ("model.architecture.num_hidden_layers", &2),
        ("model.architecture.tie_word_embeddings", &true),
        ("data.eval", &"recipes/smoke/data/eval"),
        ("train.eval_every", &5),
        ("train.eval_batches", &2),
    ];
    let reference = tempfile::tempdir().unwrap();
    run(reference.path(), ONE, &model, &RunOptions::default()).unwrap();
    for l in [layout(1, 2, 1, true, false), layout(1, 2, 2, true, false)] {
        let out = tempfile::tempdir().unwrap();
        run(out.path(), l, &model, &RunOptions::default()).unwrap();
        assert_matches(out.path(), reference.path(), &format!("tied {l:?}"));
        assert_evals_match(out.path(), reference.path(), 2);
    }
}

#[test]
fn a_tp_ep_checkpoint_resumes_at_other_layouts() {
    let reference = tempfile::tempdir().unwrap();
    run(reference.path(), ONE, &[], &RunOptions::default()).unwrap();
    let half = RunOptions {
        stop_after: Some(STEPS / 2),
        ..RunOptions::default()
    };
    let sharded = layout(2, 2, 2, true, true);
    let cases = [
        (sharded, ONE),
        (sharded, layout(4, 1, 4, false, true)),
        (sharded, layout(1, 2, 1, true, false)),
        (ONE, sharded),
    ];
    for (written, to) in cases {
        let out = tempfile::tempdir().unwrap();
        run(out.path(), written, &[], &half).unwrap();
        let ckpt = step_dir(out.path(), STEPS / 2);
        if written.tp > 1 {
            // Written by the owners, in the layout transformers reads.
            assert!(ckpt.join("model.safetensors.index.json").exists());
            assert!(!ckpt.join("model.safetensors").exists());
        }
        run(out.path(), to, &[], &RunOptions::default()).unwrap_or_else(|e| panic!("{to:?}: {e}"));
        assert_matches(
            out.path(),
            reference.path(),
            &format!("{written:?} -> {to:?}"),
        );
    }
}

#[test]
fn layouts_the_model_does_not_divide_are_refused() {
    let out = tempfile::tempdir().unwrap();
    let cases: [(Layout, &[Set], &str); 5] = [
        (layout(1, 4, 1, true, false), &[], "num_key_value_heads (2)"),
        (layout(1, 2, 1, false, false), &[], "sequence_parallel"),
        (layout(1, 1, 3, false, false), &[], "`parallel.ep` = 3"),
        (
            layout(1, 2, 1, true, false),
            &[("model.architecture.intermediate_size", &127)],
            "intermediate_size (127)",
        ),
        (
            layout(1, 2, 1, true, false),
            &[("model.architecture.vocab_size", &385)],
            "vocab_size (385)",
        ),
    ];
    for (l, model, want) in cases {
        let e = run(out.path(), l, model, &RunOptions::default()).unwrap_err();
        assert!(matches!(e, TrainError::BadRecipe(_)), "{l:?}: {e}");
        assert_eq!(e.exit_code(), 2, "{l:?}: {e}");
        assert!(e.to_string().contains(want), "{l:?}: {e}");
    }
    assert!(!out.path().join("ckpt").exists(), "nothing was written");
}

#[test]
fn per_rank_bytes_fall_as_one_over_tp_and_ep() {
    let out = tempfile::tempdir().unwrap();
    let one = recipe_for(out.path(), ONE, &[]);
    let c = Qwen3Config::from_map(one.model.architecture.clone().unwrap(), Path::new("recipe"))
        .unwrap();
    let whole = part_params(&c, 1, 1);
    let one_step: [Set; 3] = [
        ("train.steps", &1),
        ("checkpoint.every", &1),
        ("schedule.warmup_steps", &0),
    ];
    for l in [
        layout(1, 2, 1, true, false),
        layout(2, 1, 2, false, false),
        layout(1, 2, 2, true, false),
    ] {
        let out = tempfile::tempdir().unwrap();
        let r = recipe_for(out.path(), l, &one_step);
        let summaries = run_threads_summaries(&r, &RunOptions::default(), l.dp * l.tp).unwrap();
        let want = part_params(&c, l.tp, l.ep);
        assert!(want < whole, "{l:?}: {want} of {whole}");
        for s in summaries {
            let got = s.sizes;
            assert_eq!(got.total, want, "{l:?} rank {}", s.rank);
            assert_eq!(got.trainable, want, "{l:?} rank {}", s.rank);
            assert_eq!(got.optimizer_state_bytes, 8 * want, "{l:?} rank {}", s.rank);
        }
    }
    let r = run_training(
        &recipe_for(out.path(), ONE, &one_step),
        &RunOptions::default(),
    )
    .unwrap();
    assert_eq!(r.sizes.total, whole, "the formula counts the whole model");
}

/// Qwen3-30B-A3B's config.json fields.
fn qwen3_30b_a3b() -> Qwen3Config {
    let json = serde_json::json!({
        "model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 2048,
        "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
        "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
        "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": true,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "tie_word_embeddings": false,
    });
    let serde_json::Value::Object(map) = json else {
        unreachable!()
    };
    Qwen3Config::from_map(map, Path::new("Qwen3-30B-A3B")).unwrap()
}

/// recipes/qwen3-30b-a3b-sft.yaml's layout divides Qwen3-30B-A3B on 16 ranks, and its
/// per-GPU parameter count is the one its memory arithmetic uses.
#[test]
fn the_qwen3_30b_a3b_recipe_divides_its_model() {
    let c = qwen3_30b_a3b();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../recipes/qwen3-30b-a3b-sft.yaml");
    let r = moeru_trainer::recipe::load(&path, &[]).unwrap();
    validate_parallel_sizes(&r.parallel, &c).unwrap();
    let mesh = mesh_for(&r, 16).unwrap();
    assert_eq!((mesh.sizes.dp, mesh.sizes.tp, mesh.sizes.ep), (8, 2, 16));
    assert_eq!(
        part_params(&c, 1, 1),
        30_532_122_624,
        "Qwen3-30B-A3B's parameter count"
    );
    let per_gpu = part_params(&c, r.parallel.tp, r.parallel.ep) as f64 / 1e9;
    assert!(
        (per_gpu - 2.59).abs() < 0.005,
        "{per_gpu} B parameters per GPU"
    );
}

/// recipes/qwen3-30b-a3b-sft-8gpu.yaml's TP4·PP2·EP4 layout divides the model on 8 ranks,
/// its stages are 24 layers each, and the stage with the head holds the 3.82 B parameters its
/// memory arithmetic uses.
#[test]
fn the_qwen3_30b_a3b_8_gpu_recipe_divides_its_model() {
    let c = qwen3_30b_a3b();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../recipes/qwen3-30b-a3b-sft-8gpu.yaml");
    let r = moeru_trainer::recipe::load(&path, &[]).unwrap();
    validate_parallel_sizes(&r.parallel, &c).unwrap();
    let mesh = mesh_for(&r, 8).unwrap();
    let s = mesh.sizes;
    assert_eq!((s.dp, s.tp, s.pp, s.ep), (1, 4, 2, 4));
    let layout = PipelineLayout::new(&r.parallel, r.train.grad_accum, &c).unwrap();
    assert_eq!(layout.stages, [0..24, 24..48]);
    assert_eq!(r.train.recompute, Recompute::Layers);
    // The last stage: half the layers' part under tp 4 / ep 4, the head and final norm.
    let (h, v) = (c.hidden_size as u64, c.vocab_size as u64);
    let whole_layers = part_params(&c, 4, 4) - 2 * v * h / 4 - h;
    let last_stage = whole_layers / 2 + v * h / 4 + h;
    let per_gpu = last_stage as f64 / 1e9;
    assert!(
        (per_gpu - 3.82).abs() < 0.005,
        "{per_gpu} B parameters per GPU"
    );
}

/// `moe.capacity_factor` drops alike at any dp and ep (capacity is per micro-batch): losses
/// within 1e-5 and expert loads equal over 10 steps. Final weights are not compared: a drop
/// is a discontinuous function of the router weights, and once DP's all-reduce order makes
/// weights differ in the last bits a near-tie may keep a different row (measured: 1.2e-5
/// after 10 steps at dp2). It must drop something: the losses leave the dropless run's.
#[test]
fn capacity_drops_alike_under_dp_and_ep() {
    let capacity: [Set; 1] = [("moe.capacity_factor", &0.75)];
    let reference = tempfile::tempdir().unwrap();
    run(reference.path(), ONE, &capacity, &RunOptions::default()).unwrap();
    for l in [layout(2, 1, 2, false, false), layout(4, 1, 4, false, true)] {
        let out = tempfile::tempdir().unwrap();
        run(out.path(), l, &capacity, &RunOptions::default()).unwrap();
        let diff = max_loss_diff(&losses(out.path()), &losses(reference.path()));
        assert!(diff <= 1e-5, "{l:?}: loss differs by {diff}");
        let (ra, rb) = (router_metrics(out.path()), router_metrics(reference.path()));
        for (x, y) in ra.iter().zip(&rb) {
            assert_eq!(x[2..], y[2..], "{l:?}: expert loads");
        }
    }
    let dropless = tempfile::tempdir().unwrap();
    run(dropless.path(), ONE, &[], &RunOptions::default()).unwrap();
    let diff = max_loss_diff(&losses(dropless.path()), &losses(reference.path()));
    assert!(
        diff > 1e-4,
        "capacity 0.75 changed the losses by only {diff}"
    );
}
