//! DPO against TRL 1.16 (`DPOTrainer._compute_loss`, tests/reference/make_dpo_reference.py)
//! on a perturbed copy of qwen3-moe-mixed with the committed model as the reference: the
//! reference log-probs, the loss, the logged metrics and every parameter gradient of the
//! policy, for sigmoid, hinge, ipo, robust and a weighted mix; cDPO label smoothing and the
//! reference-free loss against their formulas (computed in the same script).

mod common;

use std::collections::BTreeMap;

use common::*;
use moeru_checkpoints::{load_hf_model, TensorFile};
use moeru_models::params::Params;
use moeru_models::{ForwardCtx, Qwen3Model};
use moeru_trainer::dpo::{pair_micro_batch, DpoObjective, DpoSettings, PreferencePair, Reference};
use moeru_trainer::objective::{AuxWeights, Objective, StepReport};
use moeru_trainer::recipe::dpo::DpoLossType::{self, Hinge, Ipo, Robust, Sigmoid};

const BETA: f64 = 0.1;

fn fixture() -> TensorFile {
    TensorFile::open(&reference_dir().join("dpo/dpo.safetensors")).unwrap_or_else(|e| panic!("{e}"))
}

/// The fixture's pairs: `part` ids cut by `part.lens`.
fn pairs(f: &TensorFile) -> Vec<PreferencePair> {
    let split = |part: &str| -> Vec<Vec<i32>> {
        let (ids, _) = i64s(f, part);
        let (lens, _) = i64s(f, &format!("{part}.lens"));
        let mut at = 0;
        lens.iter()
            .map(|&n| {
                let v = ids[at..at + n as usize].iter().map(|&x| x as i32).collect();
                at += n as usize;
                v
            })
            .collect()
    };
    let (p, c, r) = (
        split("prompt_ids"),
        split("chosen_ids"),
        split("rejected_ids"),
    );
    (0..p.len())
        .map(|i| PreferencePair {
            id: i as u64,
            prompt: p[i].clone(),
            chosen: c[i].clone(),
            rejected: r[i].clone(),
        })
        .collect()
}

fn load(dir: &std::path::Path) -> Qwen3Model {
    load_hf_model(dir, &test_device().autodiff()).unwrap_or_else(|e| panic!("{e}"))
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * b.abs().max(1e-3)
}

/// The reference log-probs moeru scores, chosen rows then rejected rows.
fn reference_rows(f: &TensorFile, pairs: &[PreferencePair]) -> Vec<f64> {
    let reference = Reference::Frozen(Box::new(load(&model_dir("qwen3-moe-mixed")).frozen()));
    let policy = load(&reference_dir().join("dpo/policy"));
    let mut mb = pair_micro_batch(pairs, &policy.device());
    reference.score(&policy, pairs, &mut mb, &ForwardCtx::default());
    let ours = mb.pairs.unwrap().reference.unwrap();
    let theirs: Vec<f32> = [
        f32s(f, "ref_chosen_logps").0,
        f32s(f, "ref_rejected_logps").0,
    ]
    .concat();
    for (a, b) in ours.iter().zip(&theirs) {
        assert!(
            close(*a, *b as f64, 1e-5),
            "reference log-prob {a} vs TRL's {b}"
        );
    }
    ours
}

/// moeru's loss, metrics and gradients for one case against the fixture's.
fn check(tag: &str, losses: &[(DpoLossType, f64)], smoothing: f64, free: bool) {
    let f = fixture();
    let pairs = pairs(&f);
    let reference = reference_rows(&f, &pairs);
    let mut policy = load(&reference_dir().join("dpo/policy"));
    let mut mb = pair_micro_batch(&pairs, &policy.device());
    mb.pairs.as_mut().unwrap().reference = (!free).then_some(reference);
    let objective = DpoObjective {
        settings: DpoSettings {
            beta: BETA,
            losses: losses.to_vec(),
            label_smoothing: smoothing,
        },
        weights: AuxWeights::default(),
    };
    let micro = [mb];
    let counts = objective.counts(&micro);
    let mut report = StepReport::default();
    let loss = objective.micro_loss(
        &policy,
        &micro[0],
        &ForwardCtx::default(),
        &counts,
        &mut report,
    );
    let want = f32s(&f, &format!("loss.{tag}")).0[0] as f64;
    assert!(
        close(report.loss, want, 1e-5),
        "{tag}: loss {} vs TRL's {want}",
        report.loss
    );
    if f.shapes()
        .iter()
        .any(|(n, _)| n.starts_with(&format!("metric.{tag}.")))
    {
        for (name, value) in &report.task {
            // TRL's names: rewards/accuracies, rewards/margins; the others as ours.
            let trl = name
                .replace("accuracy", "accuracies")
                .replace("margin", "margins");
            let theirs = f32s(&f, &format!("metric.{tag}.{trl}")).0[0] as f64;
            assert!(
                close(*value, theirs, 1e-5),
                "{tag}: {name} {value} vs TRL's {theirs}"
            );
        }
        assert_eq!(report.task.len(), 6, "{tag}: metrics logged");
    }
    let grads = loss.backward();
    let mut visitor = Grads {
        grads: &grads,
        out: BTreeMap::new(),
    };
    policy.visit_params(&mut visitor);
    let mut worst = (0.0f64, String::new());
    for (name, g) in &visitor.out {
        let theirs = f32s(&f, &format!("grad.{tag}.{name}")).0;
        let rel = relative_error(g, &theirs);
        assert!(
            rel <= tol(1e-4, 1e-3),
            "{tag}: gradient of {name} off by {rel:e} (relative)"
        );
        if rel > worst.0 {
            worst = (rel, name.clone());
        }
    }
    assert!(
        visitor.out.len() > 30,
        "{tag}: every parameter has a gradient"
    );
    eprintln!(
        "{tag}: loss {} (TRL {want}), {} gradients, worst relative error {:.1e} ({})",
        report.loss,
        visitor.out.len(),
        worst.0,
        worst.1
    );
}

#[test]
fn sigmoid_matches_trl() {
    check("sigmoid", &[(Sigmoid, 1.0)], 0.0, false);
}

#[test]
fn hinge_matches_trl() {
    check("hinge", &[(Hinge, 1.0)], 0.0, false);
}

#[test]
fn ipo_matches_trl() {
    check("ipo", &[(Ipo, 1.0)], 0.0, false);
}

#[test]
fn robust_matches_trl() {
    check("robust", &[(Robust, 1.0)], 0.1, false);
}

#[test]
fn weighted_losses_match_trl() {
    check("sigmoid_ipo", &[(Sigmoid, 0.7), (Ipo, 0.3)], 0.0, false);
}

#[test]
fn label_smoothing_matches_cdpo() {
    check("sigmoid_smooth", &[(Sigmoid, 1.0)], 0.1, false);
}

#[test]
fn reference_free_matches_its_formula() {
    check("reference_free", &[(Sigmoid, 1.0)], 0.0, true);
}
