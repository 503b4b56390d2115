//! LoRA against Python peft (tests/reference/make_lora_reference.py): adapters made by peft
//! load and give peft's logits and gradients; the base stays frozen; merging equals peft's
//! merge; adapters written by moeru load back identically.

mod common;
#[path = "common/lora_writer.rs"]
mod lora_writer;

use std::collections::BTreeMap;
use std::path::PathBuf;

use burn::tensor::{Device, Tensor};
use common::*;
use moeru_checkpoints::{
    export_merged_hf, load_hf_model, load_peft_adapter, named_tensors, save_peft_adapter,
    TensorFile,
};
use moeru_models::lora::{expert_b_ranks, peft_b_shape};
use moeru_models::params::{ParamVisitor, Params};
use moeru_models::{Batch, DropoutKey, ForwardCtx, LoraConfig, Qwen3Model};

const LOGITS_TOL: f32 = 1e-4;
const LOSS_TOL: f32 = 1e-5;
const GRAD_REL_TOL: f64 = 1e-4;
const MERGE_TOL: f32 = 1e-6;

/// (fixture, base model) made by peft.
const CASES: &[(&str, &str)] = &[
    ("dense-tied-rslora", "qwen3-dense-tied"),
    ("dense-kv1-patterns", "qwen3-dense-kv1-bf16"),
    ("moe-mixed-experts-router", "qwen3-moe-mixed"),
    ("moe-sharded-down", "qwen3-moe-norm-sharded"),
];

fn case_dir(case: &str) -> PathBuf {
    reference_dir().join("lora").join(case)
}

fn reference(case: &str) -> TensorFile {
    TensorFile::open(&case_dir(case).join("reference.safetensors")).unwrap()
}

fn with_adapter(case: &str, base: &str, device: &Device) -> Qwen3Model {
    let mut model = load_hf_model(&model_dir(base), device).unwrap();
    load_peft_adapter(&case_dir(case), &mut model).unwrap_or_else(|e| panic!("{e}"));
    model
}

fn input(refs: &TensorFile, device: &Device) -> Batch {
    let (ids, shape) = i64s(refs, "input_ids");
    Batch::from_ids(&ids, shape[0], shape[1], device)
}

fn logits(model: &Qwen3Model, batch: &Batch) -> Vec<f32> {
    logits_with(model, batch, &ForwardCtx::default())
}

fn logits_with(model: &Qwen3Model, batch: &Batch, ctx: &ForwardCtx) -> Vec<f32> {
    to_f32_vec(model.logits(model.forward(batch, ctx).hidden, ctx))
}

/// LM loss plus the aux loss at its coefficient, as transformers' `loss` for MoE models.
fn total_loss(model: &Qwen3Model, batch: &Batch) -> Tensor<1> {
    let ctx = ForwardCtx::default();
    let out = model.forward(batch, &ctx);
    let mut loss = model.lm_loss(batch, out.hidden, &ctx);
    if let (Some(aux), Some(moe)) = (out.aux_loss, &model.config.moe) {
        loss = loss + aux.mul_scalar(moe.router_aux_loss_coef);
    }
    loss
}

#[test]
fn peft_adapters_give_peft_logits() {
    for (case, base) in CASES {
        let refs = reference(case);
        let device = Device::flex();
        let model = with_adapter(case, base, &device);
        let batch = input(&refs, &device);
        let diff = max_abs_diff(&logits(&model, &batch), &f32s(&refs, "logits").0);
        let plain = load_hf_model(&model_dir(base), &device).unwrap();
        let effect = max_abs_diff(&logits(&plain, &batch), &f32s(&refs, "logits").0);
        eprintln!(
            "{case}: max |logits diff| {diff:.2e} (the adapter moves logits by {effect:.2e})"
        );
        assert!(diff <= LOGITS_TOL, "{case}: max |logits diff| = {diff:e}");
        assert!(
            effect > 1e-2,
            "{case}: the adapter should change the logits"
        );
    }
}

/// Collects the gradient of every visited parameter; `None` where there is none.
struct Grads<'a>(
    &'a burn::tensor::Gradients,
    BTreeMap<String, Option<Vec<f32>>>,
);

impl ParamVisitor for Grads<'_> {
    fn visit<const D: usize>(&mut self, name: &str, param: &mut Tensor<D>) {
        let g = param.grad(self.0).map(to_f32_vec);
        self.1.insert(name.to_string(), g);
    }
}

#[test]
fn lora_gradients_match_pytorch() {
    for (case, base) in CASES {
        let refs = reference(case);
        let device = Device::flex().autodiff();
        let mut model = with_adapter(case, base, &device);
        let loss = total_loss(&model, &input(&refs, &device));
        let total = to_f32_vec(loss.clone())[0];
        let expected = f32s(&refs, "total_loss").0[0];
        assert!(
            (total - expected).abs() <= LOSS_TOL,
            "{case}: loss {total} vs {expected}"
        );
        let grads = loss.backward();

        let mut frozen = Grads(&grads, BTreeMap::new());
        model.visit_params(&mut frozen);
        let leaked: Vec<&String> = frozen
            .1
            .iter()
            .filter(|(_, g)| g.is_some())
            .map(|(n, _)| n)
            .collect();
        assert!(
            leaked.is_empty(),
            "{case}: base parameters got gradients: {leaked:?}"
        );

        let mut trained = Grads(&grads, BTreeMap::new());
        model.trainable().visit_params(&mut trained);
        let mut expected: Vec<String> = refs
            .shapes()
            .into_iter()
            .filter_map(|(n, _)| n.strip_prefix("grad.").map(str::to_string))
            .collect();
        expected.sort();
        let ours: Vec<String> = trained.1.keys().cloned().collect();
        assert_eq!(ours, expected, "{case}: trainable names differ from peft's");
        let mut worst = (0.0f64, String::new());
        for (name, grad) in &trained.1 {
            let grad = grad
                .as_ref()
                .unwrap_or_else(|| panic!("{case}: no gradient for {name}"));
            let rel = relative_error(grad, &f32s(&refs, &format!("grad.{name}")).0);
            assert!(
                rel <= GRAD_REL_TOL,
                "{case}: gradient of {name} off by {rel:e}"
            );
            if rel > worst.0 {
                worst = (rel, name.clone());
            }
        }
        eprintln!(
            "{case}: {} LoRA gradients, worst relative error {:.2e} ({})",
            trained.1.len(),
            worst.0,
            worst.1
        );
    }
}

/// A few SGD steps on the adapters leave every base tensor bit for bit as loaded.
#[test]
fn base_stays_frozen_while_adapters_train() {
    for (case, base) in [CASES[0], CASES[2]] {
        let refs = reference(case);
        let device = Device::flex().autodiff();
        let mut model = with_adapter(case, base, &device);
        let before = named_tensors(&mut model);
        let adapters_before = named_tensors(&mut model.trainable());
        let batch = input(&refs, &device);
        let mut losses = Vec::new();
        for _ in 0..3 {
            let loss = total_loss(&model, &batch);
            losses.push(to_f32_vec(loss.clone())[0]);
            let grads = loss.backward();
            struct Sgd<'a>(&'a burn::tensor::Gradients);
            impl ParamVisitor for Sgd<'_> {
                fn visit<const D: usize>(&mut self, name: &str, p: &mut Tensor<D>) {
                    let g = p
                        .grad(self.0)
                        .unwrap_or_else(|| panic!("no gradient for {name}"));
                    let updated = p.clone().inner() - g.mul_scalar(0.05);
                    *p = Tensor::from_inner(updated).require_grad();
                }
            }
            model.trainable().visit_params(&mut Sgd(&grads));
        }
        let after = named_tensors(&mut model);
        assert_eq!(before.len(), after.len());
        for ((name, a), (_, b)) in before.iter().zip(&after) {
            assert!(a.bytes == b.bytes, "{case}: base tensor {name} changed");
        }
        let adapters_after = named_tensors(&mut model.trainable());
        let moved = adapters_before
            .iter()
            .zip(&adapters_after)
            .filter(|((_, a), (_, b))| a.bytes != b.bytes)
            .count();
        assert_eq!(
            moved,
            adapters_after.len(),
            "{case}: every adapter tensor should move"
        );
        eprintln!(
            "{case}: base unchanged after 3 SGD steps on {moved} adapter tensors, loss {losses:?}"
        );
        assert!(
            losses[2] < losses[0],
            "{case}: SGD should lower the loss: {losses:?}"
        );
        // Merged, the model is a plain one again: every base parameter trains.
        let mut merged = model.merged();
        let grads = total_loss(&merged, &batch).backward();
        let mut all = Grads(&grads, BTreeMap::new());
        merged.visit_params(&mut all);
        assert!(
            all.1.values().all(Option::is_some),
            "{case}: merged base is frozen"
        );
    }
}

#[test]
fn merge_equals_base_plus_scaled_ba_and_peft_merge() {
    for (case, base) in CASES {
        let refs = reference(case);
        let device = Device::flex();
        let mut model = with_adapter(case, base, &device);
        let merged_model = model.merged();
        let mut merged: BTreeMap<String, Vec<f32>> = named_tensors(&mut merged_model.clone())
            .into_iter()
            .map(|(n, t)| (n, t.f32_values()))
            .collect();
        let base_values: BTreeMap<String, Vec<f32>> = named_tensors(&mut model)
            .into_iter()
            .map(|(n, t)| (n, t.f32_values()))
            .collect();
        let (mut worst_formula, mut worst_peft) = (0f32, 0f32);
        for l in model.lora_adapters() {
            // base + s·B·A in f64 on the host, expert by expert.
            let (a, b) = (to_f32_vec(l.a.clone()), to_f32_vec(l.b.clone()));
            let (r, e) = (l.rank, l.experts);
            // Experts' B is held as `[out·r, E]`: the same flat order as PEFT's `[out, r·E]`.
            let ([_, inp], [rows, _]) = (l.a.dims(), l.b.dims());
            let out = if e > 1 { rows / r } else { rows };
            let w = &base_values[&l.site];
            let expected: Vec<f32> = (0..e * out * inp)
                .map(|idx| {
                    let (x, o, i) = (idx / (out * inp), idx / inp % out, idx % inp);
                    let ba: f64 = (0..r)
                        .map(|j| b[o * r * e + j * e + x] as f64 * a[(x * r + j) * inp + i] as f64)
                        .sum();
                    (w[idx] as f64 + l.scale * ba) as f32
                })
                .collect();
            let ours = merged.remove(&l.site).unwrap();
            worst_formula = worst_formula.max(max_abs_diff(&ours, &expected));
            worst_peft = worst_peft.max(max_abs_diff(
                &ours,
                &f32s(&refs, &format!("merged.{}", l.site)).0,
            ));
        }
        eprintln!(
            "{case}: merged vs base + s·B·A {worst_formula:.2e}, vs peft's merge {worst_peft:.2e}"
        );
        assert!(
            worst_formula <= MERGE_TOL && worst_peft <= MERGE_TOL,
            "{case}: merge off"
        );
        for (name, values) in &merged {
            assert!(
                *values == base_values[name],
                "{case}: unadapted {name} changed in the merge"
            );
        }
        let peft_merged = refs
            .shapes()
            .iter()
            .filter(|(n, _)| n.starts_with("merged."))
            .count();
        assert_eq!(
            peft_merged,
            model.lora_adapters().len(),
            "{case}: adapted tensors"
        );

        let batch = input(&refs, &device);
        let ours = logits(&model, &batch);
        let diff = max_abs_diff(&logits(&merged_model, &batch), &ours);
        let tmp = tempfile::tempdir().unwrap();
        export_merged_hf(&model, &tmp.path().join("merged"), u64::MAX, None).unwrap();
        let exported = load_hf_model(&tmp.path().join("merged"), &device).unwrap();
        let reloaded = logits(&exported, &batch);
        eprintln!("{case}: merged vs adapter logits {diff:.2e}");
        assert!(diff <= 1e-5, "{case}: merged logits differ by {diff:e}");
        assert!(
            reloaded == logits(&merged_model, &batch),
            "{case}: export changed the merged model"
        );
        assert!(
            model.lora_config().is_some(),
            "merged() must leave the adapters in place"
        );
    }
}

/// Loading, saving and loading again gives the same tensors, sites and logits; the config
/// written keeps rank, alpha, dropout, rsLoRA and per-site patterns.
#[test]
fn moeru_written_adapters_reload_identically() {
    for (case, base) in CASES {
        let device = Device::flex();
        let mut model = with_adapter(case, base, &device);
        let tmp = tempfile::tempdir().unwrap();
        save_peft_adapter(tmp.path(), &mut model, "base").unwrap();
        let mut again = load_hf_model(&model_dir(base), &device).unwrap();
        load_peft_adapter(tmp.path(), &mut again).unwrap_or_else(|e| panic!("{case}: {e}"));
        assert_eq!(model.lora_sites(), again.lora_sites(), "{case}: sites");
        let (a, b) = (
            named_tensors(&mut model.trainable()),
            named_tensors(&mut again.trainable()),
        );
        assert_eq!(a.len(), b.len());
        for ((n1, t1), (n2, t2)) in a.iter().zip(&b) {
            assert!(
                n1 == n2 && t1.bytes == t2.bytes,
                "{case}: {n1} differs after the round trip"
            );
        }
        let mut original = TensorFile::open(&case_dir(case).join("adapter_model.safetensors"))
            .unwrap()
            .shapes();
        let mut written = TensorFile::open(&tmp.path().join("adapter_model.safetensors"))
            .unwrap()
            .shapes();
        original.sort();
        written.sort();
        assert_eq!(original, written, "{case}: PEFT tensor names and shapes");
        let (c1, c2) = (model.lora_config().unwrap(), again.lora_config().unwrap());
        assert_eq!(
            (c1.rank, c1.alpha, c1.dropout, c1.use_rslora),
            (c2.rank, c2.alpha, c2.dropout, c2.use_rslora)
        );
        let batch = input(&reference(case), &device);
        assert!(
            logits(&model, &batch) == logits(&again, &batch),
            "{case}: logits after reload"
        );
    }
}

/// moeru's own config selects the same sites, names and shapes as peft given the same targets.
#[test]
fn attach_lora_matches_peft_layout_and_init() {
    let cases = [
        (
            "moe-mixed-experts-router",
            "qwen3-moe-mixed",
            2,
            4.0,
            false,
            &["gate"][..],
        ),
        (
            "dense-tied-rslora",
            "qwen3-dense-tied",
            4,
            8.0,
            true,
            &[][..],
        ),
    ];
    for (case, base, rank, alpha, use_rslora, extra) in cases {
        let device = Device::flex();
        let mut target_modules: Vec<String> = [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect();
        target_modules.sort();
        let cfg = LoraConfig {
            rank,
            alpha,
            dropout: 0.0,
            target_modules,
            use_rslora,
        };
        let mut model = load_hf_model(&model_dir(base), &device).unwrap();
        let plain = logits(&model, &input(&reference(case), &device));
        model.attach_lora(&cfg, 7).unwrap();
        let peft = with_adapter(case, base, &device).lora_sites();
        assert_eq!(
            model.lora_sites(),
            peft,
            "{case}: sites, ranks and alphas as peft makes them"
        );
        let ours = named_tensors(&mut model.trainable());
        let expert_b = expert_b_ranks(&model.lora_sites());
        let mut shapes: Vec<(String, Vec<usize>)> = ours
            .iter()
            .map(|(n, t)| {
                let shape = match expert_b.get(n) {
                    Some(&rank) => peft_b_shape(&t.shape, rank),
                    None => t.shape.clone(),
                };
                (format!("base_model.model.{n}"), shape)
            })
            .collect();
        let mut file = TensorFile::open(&case_dir(case).join("adapter_model.safetensors"))
            .unwrap()
            .shapes();
        shapes.sort();
        file.sort();
        assert_eq!(shapes, file, "{case}: adapter names and shapes");
        for (name, t) in &ours {
            let v = t.f32_values();
            if name.contains("lora_B") {
                assert!(v.iter().all(|x| *x == 0.0), "{name}: B starts at zero");
            } else {
                let bound = 1.0 / (t.shape[1] as f32).sqrt();
                let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
                assert!(
                    max <= bound && max > 0.5 * bound,
                    "{name}: kaiming-uniform bound {bound}, max {max}"
                );
            }
        }
        // B = 0: the output is the base model's, exactly.
        assert!(
            logits(&model, &input(&reference(case), &device)) == plain,
            "{case}: zero B changes logits"
        );
        let mut same = load_hf_model(&model_dir(base), &device).unwrap();
        same.attach_lora(&cfg, 7).unwrap();
        let again = named_tensors(&mut same.trainable());
        assert!(
            ours.iter().zip(&again).all(|(a, b)| a.1.bytes == b.1.bytes),
            "same seed, same A"
        );
    }
}

#[test]
fn dropout_is_seeded_and_off_without_a_key() {
    let device = Device::flex();
    let case = &lora_writer::moeru_cases()[0]; // dense, dropout 0.1
    let model = lora_writer::build(case, &device);
    let batch = Batch::from_ids(&lora_writer::input_ids(case, 96), 2, 7, &device);
    let eval = logits(&model, &batch);
    let key = |counter| ForwardCtx::default().with_dropout(Some(DropoutKey { seed: 5, counter }));
    let (first, again) = (
        logits_with(&model, &batch, &key(1)),
        logits_with(&model, &batch, &key(1)),
    );
    let other = logits_with(&model, &batch, &key(2));
    assert!(first == again, "same key, same mask");
    assert!(
        max_abs_diff(&first, &eval) > 1e-4 && max_abs_diff(&first, &other) > 1e-4,
        "masks differ"
    );
    assert!(logits(&model, &batch) == eval, "no key, no dropout");
}

/// tests/reference/lora/moeru-written/ is what lora_writer.rs writes today.
#[test]
fn committed_moeru_written_adapters_are_current() {
    let committed = reference_dir().join("lora/moeru-written");
    let tmp = tempfile::tempdir().unwrap();
    for case in lora_writer::moeru_cases() {
        let fresh = lora_writer::write_case(&case, tmp.path(), false);
        let old = committed.join(case.name);
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            let same = std::fs::read(fresh.join(f)).unwrap()
                == std::fs::read(old.join(f)).unwrap_or_default();
            assert!(same, "{}/{f} is stale: run `cargo run -p moeru-tests --example write_lora -- tests/reference/lora/moeru-written` and delete its merged/ folders", old.display());
        }
        let logits = |d: &PathBuf| {
            f32s(
                &TensorFile::open(&d.join("moeru.safetensors")).unwrap(),
                "logits",
            )
            .0
        };
        assert!(
            max_abs_diff(&logits(&fresh), &logits(&old)) <= 1e-5,
            "{}: logits are stale",
            case.name
        );
    }
}
