//! `precision: bf16` against transformers under torch.autocast(bfloat16) with an f32 router
//! (tests/reference/make_bf16_reference.py): logits, losses and every gradient, with f32
//! parameters and f32 gradients.

use std::collections::BTreeMap;

use crate::common::*;
use burn::tensor::DType;
use moeru_checkpoints::load_hf_model;
use moeru_models::params::Params;
use moeru_models::{Batch, ForwardCtx, Precision};

/// On the CPU the forward matches autocast bit for bit (measured: 0 for all four models); the
/// f32 answer is ~1e-2 away. The tolerances leave room for another matmul accumulation order.
const LOGITS_REL_TOL: f64 = 1e-3;
const LOSS_TOL: f32 = 1e-3;
/// Backward matmuls round to bf16, and burn sums bf16 bias gradients in bf16 where torch
/// accumulates in f32 (measured worst: 2.1e-2, a q/k bias; weights ≤ 1.4e-2).
const GRAD_REL_TOL: f64 = 3e-2;

fn check(name: &str) {
    let refs = outputs_bf16(name);
    let f32_refs = outputs(name);
    let device = test_device().autodiff();
    let mut model = load_hf_model(&model_dir(name), &device).unwrap_or_else(|e| panic!("{e}"));
    let ctx = ForwardCtx::new(Precision::Bf16);
    let (ids, shape) = i64s(&f32_refs, "input_ids");
    let batch = Batch::from_ids(&ids, shape[0], shape[1], &device);
    let out = model.forward(&batch, &ctx);

    let logits = model.logits(out.hidden.clone(), &ctx);
    assert_eq!(logits.dtype(), DType::F32);
    let logits = to_f32_vec(logits);
    // Norm-wise: both sides round each logit to bf16, so single logits differ by whole ulps.
    let rel = relative_error(&logits, &f32s(&refs, "logits").0);
    let rel_f32 = relative_error(&logits, &f32s(&f32_refs, "logits").0);
    eprintln!("{name}: logits vs autocast {rel:.2e} relative; vs f32 {rel_f32:.2e}");
    assert!(
        rel <= LOGITS_REL_TOL,
        "{name}: logits off by {rel:e} (relative)"
    );
    // The matmuls really ran in bf16: the answer is autocast's, not the f32 one.
    assert!(
        rel_f32 > 3.0 * rel,
        "{name}: bf16 logits are as close to f32 ({rel_f32:e}) as to autocast ({rel:e})"
    );

    let lm = model.lm_loss(&batch, out.hidden, &ctx);
    assert_eq!(lm.dtype(), DType::F32, "{name}: the loss is not f32");
    let loss = to_f32_vec(lm.clone())[0];
    let ref_loss = f32s(&refs, "loss").0[0];
    assert!(
        (loss - ref_loss).abs() <= LOSS_TOL,
        "{name}: loss {loss} vs {ref_loss}"
    );
    let mut total = lm;
    if let (Some(aux), Some(moe)) = (out.aux_loss, &model.config.moe) {
        assert_eq!(aux.dtype(), DType::F32, "{name}: the aux loss is not f32");
        total = total + aux.mul_scalar(moe.router_aux_loss_coef);
    }
    let ref_total = f32s(&refs, "total_loss").0[0];
    let total_value = to_f32_vec(total.clone())[0];
    assert!(
        (total_value - ref_total).abs() <= LOSS_TOL,
        "{name}: total loss {total_value} vs {ref_total}"
    );

    let grads = total.backward();
    let mut visitor = Grads {
        grads: &grads,
        out: BTreeMap::new(),
    };
    model.visit_params(&mut visitor);
    let mut worst = (0.0f64, String::new());
    for (pname, grad) in &visitor.out {
        let rel = relative_error(grad, &f32s(&refs, &format!("grad.{pname}")).0);
        assert!(
            rel <= GRAD_REL_TOL,
            "{name}: gradient of {pname} off by {rel:e} (relative)"
        );
        if rel > worst.0 {
            worst = (rel, pname.clone());
        }
    }
    eprintln!(
        "{name}: loss {loss} vs {ref_loss}; {} gradients, worst relative error {:.2e} ({})",
        visitor.out.len(),
        worst.0,
        worst.1
    );
}

#[test]
fn dense_tied() {
    check("qwen3-dense-tied");
}

#[test]
fn dense_kv1_bf16() {
    check("qwen3-dense-kv1-bf16");
}

#[test]
fn moe_mixed() {
    check("qwen3-moe-mixed");
}

#[test]
fn moe_norm_sharded() {
    check("qwen3-moe-norm-sharded");
}

/// f32 stays the default, and a bf16 forward leaves the model computing exactly what it did.
#[test]
fn f32_is_the_default_and_unchanged() {
    let name = "qwen3-moe-mixed";
    let device = test_device();
    let model = load_hf_model(&model_dir(name), &device).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ForwardCtx::default().precision, Precision::F32);
    let (ids, shape) = i64s(&outputs(name), "input_ids");
    let batch = Batch::from_ids(&ids, shape[0], shape[1], &device);
    let logits =
        |ctx: ForwardCtx| to_f32_vec(model.logits(model.forward(&batch, &ctx).hidden, &ctx));
    let before = logits(ForwardCtx::default());
    let bf16 = logits(ForwardCtx::new(Precision::Bf16));
    let after = logits(ForwardCtx::new(Precision::F32));
    assert_eq!(before, after);
    assert_ne!(before, bf16);
}
