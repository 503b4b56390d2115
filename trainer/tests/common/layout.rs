//! Model-parallel layouts for the tests: dp × tp ranks with ep folded over them, the tiny
//! 4-layer MoE recipe they run, one rank's parameter count under tp × ep from config.json's
//! fields alone, and the router and evaluation metrics the layout tests compare.

use std::path::Path;

use moeru_models::Qwen3Config;
use moeru_trainer::recipe::schema::Recipe;

use super::{metrics, test_recipe, Set};

/// Optimizer steps of a layout run.
pub const STEPS: u64 = 10;
/// Sequences per global batch: micro-batch 2 × grad_accum × dp.
pub const GLOBAL: usize = 8;

/// A layout: dp × tp ranks, ep folded over them.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub dp: usize,
    pub tp: usize,
    pub ep: usize,
    pub sp: bool,
    pub zero: bool,
}

pub const fn layout(dp: usize, tp: usize, ep: usize, sp: bool, zero: bool) -> Layout {
    Layout {
        dp,
        tp,
        ep,
        sp,
        zero,
    }
}

pub const ONE: Layout = layout(1, 1, 1, false, false);

/// The tiny MoE with 4 layers (layer 0 dense, layers 1–3 four experts each), its head untied
/// unless `model` says otherwise, on `l`.
pub fn recipe_for(out: &Path, l: Layout, model: &[Set]) -> Recipe {
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

/// Parameters of one rank's part of `c` under tp × ep, from config.json's fields alone.
pub fn part_params(c: &Qwen3Config, tp: usize, ep: usize) -> u64 {
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

/// Per step: the router losses and each MoE layer's expert load (max, mean), as logged.
pub fn router_metrics(out: &Path) -> Vec<Vec<f64>> {
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

/// The evaluation losses logged under `out`, by step.
pub fn eval_losses(out: &Path) -> Vec<(u64, f64)> {
    metrics(out)
        .iter()
        .filter_map(|m| Some((m["step"].as_u64()?, m["eval_loss"].as_f64()?)))
        .collect()
}

/// `n` evaluations logged under `out`, at the steps and within 1e-5 of those of `reference`.
pub fn assert_evals_match(out: &Path, reference: &Path, n: usize) {
    let (a, b) = (eval_losses(out), eval_losses(reference));
    assert_eq!(a.len(), n, "{a:?}");
    assert_eq!(b.len(), n, "{b:?}");
    for ((sa, la), (sb, lb)) in a.iter().zip(&b) {
        assert_eq!(sa, sb);
        assert!((la - lb).abs() <= 1e-5, "eval at step {sa}: {la} vs {lb}");
    }
}
