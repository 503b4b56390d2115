//! GRPO against TRL 1.16 (tests/reference/make_grpo_reference.py): on fixed per-token
//! log-probs, old and reference log-probs, advantages and a ragged mask, moeru's loss and its
//! gradient equal TRL's `GRPOTrainer._compute_loss` for every loss type with β 0 and > 0,
//! asymmetric and symmetric clipping, `delta`, the KL with and without its bias correction, and
//! gradient accumulation; the advantages equal TRL's for each `scale_rewards` mode; and a tiny
//! MoE chained through the loss gives TRL's gradient in every parameter.

mod common;

use std::collections::BTreeMap;

use burn::tensor::{Tensor, TensorData};
use common::*;
use moeru_checkpoints::{load_hf_model, TensorFile};
use moeru_models::params::{to_f32_vec, Params};
use moeru_models::ForwardCtx;
use moeru_trainer::grpo::rollout::{micro_batch, score, Rollout};
use moeru_trainer::grpo::{
    advantages, aggregate, token_loss, GrpoLossSettings, GrpoObjective, Normaliser,
};
use moeru_trainer::objective::{AuxWeights, Objective, StepReport};
use moeru_trainer::recipe::grpo::GrpoLossType::{self, Bnpo, Dapo, DrGrpo, Grpo};
use moeru_trainer::recipe::grpo::ScaleRewards;

const B: usize = 6;
const T: usize = 5;

fn fixture() -> TensorFile {
    TensorFile::open(&reference_dir().join("grpo/grpo.safetensors"))
        .unwrap_or_else(|e| panic!("{e}"))
}

fn settings(
    loss_type: GrpoLossType,
    beta: f64,
    high: f64,
    bias: bool,
    delta: Option<f64>,
) -> GrpoLossSettings {
    GrpoLossSettings {
        loss_type,
        beta,
        epsilon_low: 0.2,
        epsilon_high: high,
        kl_bias_correction: bias,
        delta,
        dual_clip_c: None,
        logratio_clamp: None,
        kl_clamp: None,
        max_completion_length: T,
    }
}

fn tensor(v: &[f32], rows: usize, device: &burn::tensor::Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(v.to_vec(), [rows, v.len() / rows]), device)
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * b.abs().max(1e-3)
}

/// moeru's loss, d loss / d logps and (unaccumulated) metrics for one case.
fn check(tag: &str, s: GrpoLossSettings, accumulation: usize) {
    let f = fixture();
    let device = test_device().autodiff();
    let (logps, old, reference) = (f32s(&f, "logps").0, f32s(&f, "old").0, f32s(&f, "ref").0);
    let (adv, mask) = (f32s(&f, "adv").0, f32s(&f, "mask").0);
    let leaf = tensor(&logps, B, &device).require_grad();
    let n = Normaliser {
        micro_batches: accumulation as f64,
        tokens: mask.iter().sum::<f32>() as f64,
    };
    let rows = B / accumulation;
    let mut total: Option<Tensor<1>> = None;
    let mut sums = [0.0; 5];
    for part in 0..accumulation {
        let (at, cut) = (part * rows, |v: &[f32]| {
            v[part * rows * T..(part + 1) * rows * T].to_vec()
        });
        let m = tensor(&cut(&mask), rows, &device);
        let l = token_loss(
            leaf.clone().narrow(0, at, rows),
            Some(tensor(&cut(&old), rows, &device)),
            Some(tensor(&cut(&reference), rows, &device)),
            &adv[at..at + rows],
            m.clone(),
            &s,
        );
        let part_sums =
            moeru_trainer::grpo::loss::metric_sums(&l, &adv[at..at + rows], &cut(&mask), &s);
        sums.iter_mut().zip(part_sums).for_each(|(a, b)| *a += b);
        let loss = aggregate(l.per_token, &m, s.loss_type, T, &n);
        total = Some(match total {
            Some(t) => t + loss,
            None => loss,
        });
    }
    let total = total.unwrap();
    let got = to_f32_vec(total.clone())[0] as f64;
    let want = f32s(&f, &format!("case.{tag}.loss")).0[0] as f64;
    assert!(close(got, want, 1e-6), "{tag}: loss {got} vs TRL's {want}");
    let grads = total.backward();
    let grad = to_f32_vec(leaf.grad(&grads).expect("logps reach the loss"));
    let theirs = f32s(&f, &format!("case.{tag}.grad")).0;
    let worst = max_abs_diff(&grad, &theirs);
    assert!(worst <= 1e-6, "{tag}: gradient off by {worst:e}");
    if accumulation == 1 {
        let names = [
            "clip_ratio_low_mean",
            "clip_ratio_high_mean",
            "clip_ratio_region_mean",
            "kl",
        ];
        for (i, name) in names.iter().enumerate() {
            let key = format!("case.{tag}.{name}");
            if !f.shapes().iter().any(|(n, _)| *n == key) {
                continue;
            }
            let theirs = f32s(&f, &key).0[0] as f64;
            let ours = sums[i] / sums[4];
            assert!(
                close(ours, theirs, 1e-5),
                "{tag}: {name} {ours} vs TRL's {theirs}"
            );
        }
    }
}

#[test]
fn each_loss_type_matches_trl() {
    for (tag, t) in [
        ("grpo", Grpo),
        ("bnpo", Bnpo),
        ("dr_grpo", DrGrpo),
        ("dapo", Dapo),
    ] {
        check(tag, settings(t, 0.0, 0.28, true, None), 1);
    }
}

#[test]
fn each_loss_type_with_the_kl_term_matches_trl() {
    for (tag, t) in [
        ("grpo_kl", Grpo),
        ("bnpo_kl", Bnpo),
        ("dr_grpo_kl", DrGrpo),
        ("dapo_kl", Dapo),
    ] {
        check(tag, settings(t, 0.04, 0.28, true, None), 1);
    }
    check("dapo_kl_plain", settings(Dapo, 0.04, 0.28, false, None), 1);
}

#[test]
fn symmetric_clipping_and_delta_match_trl() {
    check("dapo_symmetric", settings(Dapo, 0.0, 0.2, true, None), 1);
    check("dapo_delta", settings(Dapo, 0.0, 0.28, true, Some(1.1)), 1);
}

#[test]
fn gradient_accumulation_matches_trl() {
    for (tag, t) in [
        ("grpo_accum", Grpo),
        ("bnpo_accum", Bnpo),
        ("dr_grpo_accum", DrGrpo),
        ("dapo_accum", Dapo),
    ] {
        check(tag, settings(t, 0.04, 0.28, true, None), 2);
    }
}

#[test]
fn advantages_match_trl_for_each_scaling() {
    let f = fixture();
    let rewards: Vec<f64> = f32s(&f, "adv.rewards")
        .0
        .iter()
        .map(|&x| x as f64)
        .collect();
    for (tag, mode) in [
        ("group", ScaleRewards::Group),
        ("batch", ScaleRewards::Batch),
        ("none", ScaleRewards::None),
    ] {
        let a = advantages(&rewards, 4, mode, 1e-4);
        let theirs = f32s(&f, &format!("adv.{tag}")).0;
        for (i, (ours, t)) in a.values.iter().zip(&theirs).enumerate() {
            assert!(
                close(*ours, *t as f64, 1e-5),
                "{tag} row {i}: {ours} vs TRL's {t}"
            );
        }
        let zero: Vec<bool> = f32s(&f, &format!("adv.{tag}.zero_std"))
            .0
            .iter()
            .map(|&z| z > 0.5)
            .collect();
        assert_eq!(a.zero_std, zero, "{tag}: zero-std rows");
    }
}

/// The fixture's [rows, completion] per-token values at our [rows, seq] target positions.
fn at_targets(v: &[f32], prompt: usize, seq: usize) -> Vec<f32> {
    let width = v.len() / 4;
    let mut out = vec![0.0; 4 * seq];
    for r in 0..4 {
        for k in 0..width {
            out[r * seq + prompt - 1 + k] = v[r * width + k];
        }
    }
    out
}

#[test]
fn a_model_chained_through_the_loss_matches_trl_in_every_gradient() {
    let f = fixture();
    let device = test_device().autodiff();
    let mut model =
        load_hf_model(&model_dir("qwen3-moe-mixed"), &device).unwrap_or_else(|e| panic!("{e}"));
    let (prompt, completion, mask) = (
        i64s(&f, "model.prompt").0,
        i64s(&f, "model.completion").0,
        i64s(&f, "model.mask").0,
    );
    let rollouts: Vec<Rollout> = (0..4)
        .map(|r| {
            let len = mask[r * 4..(r + 1) * 4].iter().sum::<i64>() as usize;
            Rollout {
                slot: r,
                prompt: r / 2,
                prompt_ids: prompt[r * 3..(r + 1) * 3]
                    .iter()
                    .map(|&t| t as i32)
                    .collect(),
                completion: completion[r * 4..r * 4 + len].to_vec(),
                stopped: true,
                routes: Default::default(),
                sampled_logps: Vec::new(),
            }
        })
        .collect();
    let adv = f32s(&f, "model.adv").0;
    let refs: Vec<&Rollout> = rollouts.iter().collect();
    let mut mb = micro_batch(&refs, &adv, false, false, &device);
    let seq = mb.mask.dims()[1];
    let temperature = f32s(&f, "model.temperature").0[0] as f64;
    let ctx = ForwardCtx::default();
    // The log-probs moeru scores equal TRL's fused head's at the completion tokens.
    let ours = to_f32_vec(score(&model, &mb, temperature, &ctx).0);
    let theirs = at_targets(&f32s(&f, "model.logps").0, 3, seq);
    let m = to_f32_vec(mb.mask.clone());
    for i in (0..ours.len()).filter(|&i| m[i] > 0.0) {
        assert!(
            (ours[i] - theirs[i]).abs() < 1e-5,
            "log-prob {i}: {} vs TRL's {}",
            ours[i],
            theirs[i]
        );
    }
    let rows = mb.rollout.as_mut().unwrap();
    rows.old = Some(tensor(
        &at_targets(&f32s(&f, "model.old").0, 3, seq),
        4,
        &device,
    ));
    rows.reference = Some(tensor(
        &at_targets(&f32s(&f, "model.ref").0, 3, seq),
        4,
        &device,
    ));
    let objective = GrpoObjective {
        settings: GrpoLossSettings {
            max_completion_length: 4,
            ..settings(Dapo, 0.04, 0.28, true, None)
        },
        temperature,
        weights: AuxWeights::default(),
    };
    let micro = [mb];
    let counts = objective.counts(&micro);
    let mut report = StepReport::default();
    let loss = objective.micro_loss(&model, &micro[0], &ctx, &counts, &mut report);
    let want = f32s(&f, "model.loss").0[0] as f64;
    assert!(
        close(report.loss, want, 1e-5),
        "loss {} vs TRL's {want}",
        report.loss
    );
    let grads = loss.backward();
    let mut visitor = Grads {
        grads: &grads,
        out: BTreeMap::new(),
    };
    model.visit_params(&mut visitor);
    assert!(visitor.out.len() > 30, "every parameter has a gradient");
    for (name, g) in &visitor.out {
        let rel = relative_error(g, &f32s(&f, &format!("model.grad.{name}")).0);
        assert!(
            rel <= tol(1e-4, 1e-3),
            "gradient of {name} off by {rel:e} (relative)"
        );
    }
}
