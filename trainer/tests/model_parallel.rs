//! Tensor and expert parallelism on thread ranks against the one-rank run of the same global
//! batch (10 steps: losses, router losses, expert loads and final weights), resuming their
//! canonical checkpoints at other layouts, and the layout errors a recipe gets.

mod common;

use std::path::Path;

use common::{losses, max_diff, max_loss_diff, metrics, step_dir, tensors, test_recipe, Set};
use moeru_models::Qwen3Config;
use moeru_trainer::recipe::schema::Recipe;
use moeru_trainer::{run_threads, run_threads_summaries, run_training, RunOptions, TrainError};

const STEPS: u64 = 10;
/// Sequences per global batch: micro-batch 2 × grad_accum × dp.
const GLOBAL: usize = 8;

/// A layout: dp × tp ranks, ep folded over them.
#[derive(Debug, Clone, Copy)]
struct Layout {
    dp: usize,
    tp: usize,
    ep: usize,
    sp: bool,
    zero: bool,
}

const fn layout(dp: usize, tp: usize, ep: usize, sp: bool, zero: bool) -> Layout {
    Layout {
        dp,
        tp,
        ep,
        sp,
        zero,
    }
}

const ONE: Layout = layout(1, 1, 1, false, false);

/// The tiny MoE with 4 layers (layer 0 dense, layers 1–3 four experts each), its head untied
/// unless `model` says otherwise, on `l`.
fn recipe_for(out: &Path, l: Layout, model: &[Set]) -> Recipe {
    let sets: [Set; 14] = [
        ("model.architecture.num_hidden_layers", &4),
        // A wrong exchange fails in a minute rather than the default ten.
        ("parallel.timeout_s", &60),
        ("train.steps", &STEPS),
        ("checkpoint.every", &5),
        ("data.seq_len", &64),
        ("train.micro_batch_size", &2),
        ("train.grad_accum", &(GLOBAL / 2 / l.dp)),
        ("parallel.dp", &l.dp),
        ("parallel.tp", &l.tp),
        ("parallel.ep", &l.ep),
        ("parallel.sequence_parallel", &l.sp),
        ("parallel.zero_stage", &(l.zero as u8)),
        ("model.architecture.tie_word_embeddings", &false),
        ("moe.z_loss_coef", &1.0e-3),
    ];
    test_recipe(out, &[&sets[..], model].concat())
}

fn run(out: &Path, l: Layout, model: &[Set], opts: &RunOptions) -> Result<(), TrainError> {
    let r = recipe_for(out, l, model);
    match l.dp * l.tp {
        1 => run_training(&r, opts).map(|_| ()),
        ranks => run_threads(&r, opts, ranks).map(|_| ()),
    }
}

fn weights(out: &Path) -> Vec<(String, Vec<f32>)> {
    tensors(&step_dir(out, STEPS).join("model.safetensors"))
}

/// Per step: the router losses and each MoE layer's expert load (max, mean), as logged.
fn router_metrics(out: &Path) -> Vec<Vec<f64>> {
    metrics(out)
        .iter()
        .filter(|m| m["loss"].is_f64())
        .map(|m| {
            let mut v = vec![
                m["aux_loss"].as_f64().unwrap_or(-1.0),
                m["z_loss"].as_f64().unwrap_or(-1.0),
            ];
            for l in m["expert_load"].as_array().into_iter().flatten() {
                v.extend([l["max"].as_f64().unwrap(), l["mean"].as_f64().unwrap()]);
            }
            v
        })
        .collect()
}

/// Losses, router metrics and step-10 weights of `out` against `reference`, within 1e-5;
/// expert loads (integer counts) exactly.
fn assert_matches(out: &Path, reference: &Path, what: &str) {
    let (a, b) = (losses(out), losses(reference));
    assert_eq!(a.len(), STEPS as usize, "{what}: steps logged");
    assert_eq!(a.len(), b.len(), "{what}");
    let loss_diff = max_loss_diff(&a, &b);
    let weight_diff = max_diff(&weights(out), &weights(reference));
    eprintln!("{what}: max loss diff {loss_diff:.2e}, max weight diff {weight_diff:.2e}");
    assert!(loss_diff <= 1e-5, "{what}: loss differs by {loss_diff}");
    assert!(
        weight_diff <= 1e-5,
        "{what}: weights differ by {weight_diff}"
    );
    let (ra, rb) = (router_metrics(out), router_metrics(reference));
    for (step, (x, y)) in ra.iter().zip(&rb).enumerate() {
        assert_eq!(x.len(), y.len(), "{what}: step {} router metrics", step + 1);
        assert!((x[0] - y[0]).abs() <= 1e-5, "{what}: aux {x:?} vs {y:?}");
        assert!((x[1] - y[1]).abs() <= 1e-5, "{what}: z {x:?} vs {y:?}");
        assert_eq!(x[2..], y[2..], "{what}: step {} expert loads", step + 1);
    }
    // The run must have learned something, or matching would prove little.
    assert!(a[STEPS as usize - 1] < a[0] - 0.1, "{what}: loss {a:?}");
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

/// The evaluation losses logged under `out`, by step.
fn eval_losses(out: &Path) -> Vec<(u64, f64)> {
    metrics(out)
        .iter()
        .filter_map(|m| Some((m["step"].as_u64()?, m["eval_loss"].as_f64()?)))
        .collect()
}

#[test]
fn tied_embeddings_under_tp2_with_evaluation() {
    let model: [Set; 4] = [
        ("model.architecture.tie_word_embeddings", &true),
        ("data.eval", &"recipes/smoke/data/eval"),
        ("train.eval_every", &5),
        ("train.eval_batches", &2),
    ];
    let reference = tempfile::tempdir().unwrap();
    run(reference.path(), ONE, &model, &RunOptions::default()).unwrap();
    let out = tempfile::tempdir().unwrap();
    let l = layout(1, 2, 2, true, false);
    run(out.path(), l, &model, &RunOptions::default()).unwrap();
    assert_matches(out.path(), reference.path(), &format!("tied {l:?}"));
    let (a, b) = (eval_losses(out.path()), eval_losses(reference.path()));
    assert_eq!(a.len(), 2, "{a:?}");
    for ((sa, la), (sb, lb)) in a.iter().zip(&b) {
        assert_eq!(sa, sb);
        assert!((la - lb).abs() <= 1e-5, "eval at step {sa}: {la} vs {lb}");
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
    let written = layout(2, 2, 2, true, true);
    for to in [
        ONE,
        layout(4, 1, 4, false, true),
        layout(1, 2, 1, true, false),
    ] {
        let out = tempfile::tempdir().unwrap();
        run(out.path(), written, &[], &half).unwrap();
        // The canonical layout: whole weights and whole moments, as one rank writes them.
        let ckpt = step_dir(out.path(), STEPS / 2);
        assert!(ckpt.join("optim.safetensors").exists(), "{to:?}");
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
    let cases: [(Layout, &[Set], &str); 4] = [
        (layout(1, 4, 1, true, false), &[], "num_key_value_heads (2)"),
        (layout(1, 2, 1, false, false), &[], "sequence_parallel"),
        (layout(1, 1, 3, false, false), &[], "`parallel.ep` = 3"),
        (
            layout(1, 2, 1, true, false),
            &[("model.architecture.intermediate_size", &127)],
            "intermediate_size (127)",
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

/// Parameters of one rank's part of `c` under tp × ep, from config.json's fields alone.
fn part_params(c: &Qwen3Config, tp: usize, ep: usize) -> u64 {
    let (h, v, hd) = (c.hidden_size, c.vocab_size, c.head_dim);
    let (q, kv) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
    // q, k, v, o split by heads; the two norms and the QK-norms replicated.
    let attention = (2 * q + 2 * kv) * h / tp + 2 * h + 2 * hd;
    let mut n = v * h / tp + h;
    if !c.tie_word_embeddings {
        n += v * h / tp;
    }
    for layer in 0..c.num_hidden_layers {
        n += attention;
        n += match (&c.moe, c.is_moe_layer(layer)) {
            (Some(m), true) => {
                m.num_experts * h + m.num_experts / ep * 3 * m.moe_intermediate_size * h
            }
            _ => 3 * c.intermediate_size * h / tp,
        };
    }
    n as u64
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
