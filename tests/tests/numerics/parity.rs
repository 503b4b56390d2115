//! moeru against transformers on the committed reference models: logits, loss, aux loss,
//! expert loads, packed documents and every parameter gradient.

use std::collections::BTreeMap;

use crate::common::*;
use moeru_checkpoints::load_hf_model;
use moeru_models::params::Params;
use moeru_models::{Batch, ForwardCtx};

/// On a GPU (MOERU_TEST_DEVICE=cuda) the tolerances widen to 1e-3 for TF32 matmuls.
fn logits_tol() -> f32 {
    tol(1e-4, 1e-3)
}
fn loss_tol() -> f32 {
    tol(1e-5, 1e-3)
}
fn grad_rel_tol() -> f64 {
    tol(1e-4, 1e-3)
}

fn check_forward(name: &str) {
    let refs = outputs(name);
    let device = test_device();
    let model = load_hf_model(&model_dir(name), &device).unwrap_or_else(|e| panic!("{e}"));
    let (ids, shape) = i64s(&refs, "input_ids");
    let batch = Batch::from_ids(&ids, shape[0], shape[1], &device);
    let ctx = ForwardCtx::default();
    let out = model.forward(&batch, &ctx);
    let loss = to_f32_vec(model.lm_loss(&batch, out.hidden.clone(), &ctx))[0];
    let logits = to_f32_vec(model.logits(out.hidden, &ctx));

    let diff = max_abs_diff(&logits, &f32s(&refs, "logits").0);
    assert!(diff <= logits_tol(), "{name}: max |logits diff| = {diff:e}");
    let ref_loss = f32s(&refs, "loss").0[0];
    eprintln!(
        "{name}: max |logits diff| {diff:.2e}, |loss diff| {:.2e}",
        (loss - ref_loss).abs()
    );
    assert!(
        (loss - ref_loss).abs() <= loss_tol(),
        "{name}: loss {loss} vs {ref_loss}"
    );

    match out.aux_loss {
        Some(aux) => {
            let aux = to_f32_vec(aux)[0];
            let ref_aux = f32s(&refs, "aux_loss").0[0];
            assert!(
                (aux - ref_aux).abs() <= loss_tol(),
                "{name}: aux {aux} vs {ref_aux}"
            );
            let (counts, cshape) = i64s(&refs, "expert_counts");
            let ours: Vec<i64> = out
                .router
                .iter()
                .flat_map(|(_, s)| s.expert_counts.iter().map(|&c| c as i64))
                .collect();
            assert_eq!(out.router.len(), cshape[0], "{name}: number of MoE layers");
            assert_eq!(ours, counts, "{name}: per-layer expert token counts");
        }
        None => assert!(refs.shapes().iter().all(|(n, _)| n != "aux_loss")),
    }
}

fn check_packed(name: &str) {
    let refs = outputs(name);
    let device = test_device();
    let model = load_hf_model(&model_dir(name), &device).unwrap_or_else(|e| panic!("{e}"));
    let (ids, shape) = i64s(&refs, "packed_input_ids");
    let (pos, _) = i64s(&refs, "packed_position_ids");
    let (docs, _) = i64s(&refs, "packed_document_ids");
    let batch = Batch::packed(&ids, &pos, &docs, shape[0], shape[1], &device);
    let ctx = ForwardCtx::default();
    let logits = to_f32_vec(model.logits(model.forward(&batch, &ctx).hidden, &ctx));
    let diff = max_abs_diff(&logits, &f32s(&refs, "packed_logits").0);
    assert!(
        diff <= logits_tol(),
        "{name}: packed max |logits diff| = {diff:e}"
    );
}

fn check_gradients(name: &str) {
    let refs = outputs(name);
    let device = test_device().autodiff();
    let mut model = load_hf_model(&model_dir(name), &device).unwrap_or_else(|e| panic!("{e}"));
    let (ids, shape) = i64s(&refs, "input_ids");
    let batch = Batch::from_ids(&ids, shape[0], shape[1], &device);
    let ctx = ForwardCtx::default();
    let out = model.forward(&batch, &ctx);
    let mut loss = model.lm_loss(&batch, out.hidden, &ctx);
    if let (Some(aux), Some(moe)) = (out.aux_loss, &model.config.moe) {
        loss = loss + aux.mul_scalar(moe.router_aux_loss_coef);
    }
    let total = to_f32_vec(loss.clone())[0];
    let ref_total = f32s(&refs, "total_loss").0[0];
    assert!(
        (total - ref_total).abs() <= loss_tol(),
        "{name}: total loss {total} vs {ref_total}"
    );

    let grads = loss.backward();
    let mut visitor = Grads {
        grads: &grads,
        out: BTreeMap::new(),
    };
    model.visit_params(&mut visitor);
    let expected: Vec<String> = refs
        .shapes()
        .into_iter()
        .filter_map(|(n, _)| n.strip_prefix("grad.").map(str::to_string))
        .collect();
    let ours: Vec<String> = visitor.out.keys().cloned().collect();
    let mut expected_sorted = expected.clone();
    expected_sorted.sort();
    assert_eq!(
        ours, expected_sorted,
        "{name}: parameter names differ from transformers'"
    );
    let mut worst = (0.0f64, String::new());
    for (pname, grad) in &visitor.out {
        let reference = f32s(&refs, &format!("grad.{pname}")).0;
        let rel = relative_error(grad, &reference);
        assert!(
            rel <= grad_rel_tol(),
            "{name}: gradient of {pname} off by {rel:e} (relative)"
        );
        if rel > worst.0 {
            worst = (rel, pname.clone());
        }
    }
    eprintln!(
        "{name}: {} gradients, worst relative error {:.2e} ({})",
        visitor.out.len(),
        worst.0,
        worst.1
    );
}

macro_rules! parity_tests {
    ($($test:ident => $name:literal),* $(,)?) => {
        mod forward { use super::*; $(#[test] fn $test() { check_forward($name) })* }
        mod packed { use super::*; $(#[test] fn $test() { check_packed($name) })* }
        mod gradients { use super::*; $(#[test] fn $test() { check_gradients($name) })* }
    };
}

parity_tests! {
    dense_tied => "qwen3-dense-tied",
    dense_kv1_bf16 => "qwen3-dense-kv1-bf16",
    moe_mixed => "qwen3-moe-mixed",
    moe_norm_sharded => "qwen3-moe-norm-sharded",
}

/// A fixture added to tests/reference/outputs without a test above fails here.
#[test]
fn every_reference_output_has_parity_tests() {
    let mut found: Vec<String> = std::fs::read_dir(reference_dir().join("outputs"))
        .expect("outputs folder")
        .map(|e| {
            e.expect("entry")
                .file_name()
                .to_string_lossy()
                .replace(".safetensors", "")
        })
        .collect();
    found.sort();
    let mut listed: Vec<String> = REFERENCE_MODELS.iter().map(|s| s.to_string()).collect();
    listed.sort();
    assert_eq!(found, listed);
}
