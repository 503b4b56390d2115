//! LoRA in the training loop, on the tests' tiny recipe (trainer/tests/recipes/lora-sft.yaml:
//! rank-8 adapters on the smoke-pretrained MoE): only adapters train and get optimizer state,
//! checkpoints hold PEFT files, resume is bit-exact (dropout included), accumulation and data
//! parallelism equal the one-rank big batch, and mismatched checkpoints are refused.

mod common;

use std::collections::BTreeSet;
use std::fmt::Display;
use std::path::Path;

use burn::tensor::Device;
use common::{
    full_logits, lora_test_recipe, losses, max_diff, max_loss_diff, smoke, smoke_base as base_dir,
    step_dir, tensors, workspace, Set,
};
use moeru_checkpoints::{load_hf_model, load_peft_adapter, write_tensors, TensorFile};
use moeru_models::params::param_count;
use moeru_trainer::lora::fingerprint;
use moeru_trainer::recipe::schema::Recipe;
use moeru_trainer::{run_threads, run_training, RunOptions, RunSummary};
use serde_json::Value;

fn recipe_for(out: &Path, extra: &[Set]) -> Recipe {
    let sets: [Set; 4] = [
        ("data.seq_len", &64),
        ("train.steps", &6),
        ("schedule.warmup_steps", &1),
        ("checkpoint.every", &3),
    ];
    lora_test_recipe(out, &[&sets[..], extra].concat())
}

fn train(out: &Path, extra: &[Set]) -> RunSummary {
    run_training(&recipe_for(out, extra), &RunOptions::default()).unwrap_or_else(|e| panic!("{e}"))
}

fn config(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

/// Adapter parameters of rank `r` on q/k/v/o of every layer and on the experts of MoE layers
/// (gate_up_proj at rank 2r, down_proj at r), from the shapes in config.json.
fn expected_trainable(c: &Value, r: u64) -> u64 {
    let g = |k: &str| c[k].as_u64().unwrap();
    let (h, heads, kv, hd) = (
        g("hidden_size"),
        g("num_attention_heads"),
        g("num_key_value_heads"),
        g("head_dim"),
    );
    let (experts, inter) = (g("num_experts"), g("moe_intermediate_size"));
    let dense: Vec<u64> = c["mlp_only_layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let mut n = 0;
    for layer in 0..g("num_hidden_layers") {
        n += r * (h + heads * hd) * 2 + r * (h + kv * hd) * 2;
        if !dense.contains(&layer) {
            n += 2 * r * experts * (h + 2 * inter) + r * experts * (inter + h);
        }
    }
    n
}

#[test]
fn only_adapters_train_and_checkpoints_hold_peft_files() {
    let out = tempfile::tempdir().unwrap();
    let summary = train(out.path(), &[]);
    let base_params = param_count(&mut load_hf_model(&base_dir(), &Device::flex()).unwrap()) as u64;
    let expected = expected_trainable(&config(&base_dir()), 8);
    assert_eq!(summary.sizes.trainable, expected);
    assert_eq!(summary.sizes.total, base_params + expected);
    assert_eq!(summary.sizes.optimizer_state_bytes, 8 * expected);

    let mut base = load_hf_model(&base_dir(), &Device::flex()).unwrap();
    let digest = fingerprint(&mut base, &base_dir()).digest;
    for step in [3, 6] {
        let dir = step_dir(out.path(), step);
        let files: BTreeSet<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        let want = [
            "adapter_config.json",
            "adapter_model.safetensors",
            "manifest.json",
            "optim.safetensors",
            "trainer_state.json",
        ];
        assert_eq!(
            files,
            want.iter().map(|s| s.to_string()).collect(),
            "{step}"
        );
        // The base in memory at this step is bit for bit the base folder.
        let state: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("trainer_state.json")).unwrap())
                .unwrap();
        assert_eq!(state["lora_base"]["digest"], digest.as_str(), "step {step}");
        // Optimizer state exists for the adapters only, one pair per adapter tensor.
        let adapters = tensors(&dir.join("adapter_model.safetensors"));
        let optim = tensors(&dir.join("optim.safetensors"));
        assert_eq!(optim.len(), 2 * adapters.len());
        assert!(optim.iter().all(|(n, _)| n.contains(".lora_")), "{optim:?}");
        let elems: usize = optim.iter().map(|(_, v)| v.len()).sum();
        assert_eq!(elems as u64, 2 * expected);
        // B starts at zero; every B has moved.
        for (name, v) in adapters.iter().filter(|(n, _)| n.contains("lora_B")) {
            assert!(v.iter().any(|&x| x != 0.0), "{name} never trained");
        }
    }
    // The last adapter loads onto the base like any PEFT adapter.
    load_peft_adapter(&step_dir(out.path(), 6), &mut base).unwrap();
    let l = losses(out.path());
    assert!(l[5] < l[0], "LoRA did not lower the loss: {l:?}");
}

/// Dropout on attention adapters, so resume must also continue the dropout masks.
fn with_dropout() -> Vec<Set<'static>> {
    vec![
        ("lora.target_modules", &"[q_proj, k_proj, v_proj, o_proj]"),
        ("lora.dropout", &0.1),
    ]
}

#[test]
fn resume_is_bit_exact_with_dropout() {
    let full = tempfile::tempdir().unwrap();
    train(full.path(), &with_dropout());
    let part = tempfile::tempdir().unwrap();
    let r = recipe_for(part.path(), &with_dropout());
    let half = RunOptions {
        stop_after: Some(3),
        ..RunOptions::default()
    };
    run_training(&r, &half).unwrap();
    let resumed = run_training(&r, &RunOptions::default()).unwrap();
    assert_eq!(resumed.start_step, 3);
    for file in ["adapter_model.safetensors", "optim.safetensors"] {
        let a = std::fs::read(step_dir(full.path(), 6).join(file)).unwrap();
        let b = std::fs::read(step_dir(part.path(), 6).join(file)).unwrap();
        assert!(a == b, "{file} differs after resume");
    }
    assert_eq!(losses(full.path()), losses(part.path()));
    // Dropout is in effect: without it the same run ends elsewhere.
    let plain = tempfile::tempdir().unwrap();
    let mut no_drop = with_dropout();
    no_drop[1] = ("lora.dropout", &0.0);
    train(plain.path(), &no_drop);
    let adapters = |o: &Path| tensors(&step_dir(o, 6).join("adapter_model.safetensors"));
    assert!(max_diff(&adapters(full.path()), &adapters(plain.path())) > 1e-6);
}

#[test]
fn accumulation_and_data_parallel_equal_the_big_batch() {
    let run = |out: &Path, extra: &[Set], ranks: usize| {
        let mut o = with_dropout();
        o.extend_from_slice(extra);
        let r = recipe_for(out, &o);
        if ranks == 1 {
            run_training(&r, &RunOptions::default()).unwrap();
        } else {
            run_threads(&r, &RunOptions::default(), ranks).unwrap();
        }
    };
    let adapters = |o: &Path| tensors(&step_dir(o, 6).join("adapter_model.safetensors"));
    // One rank, 2 micro-batches of 4: the reference.
    let reference = tempfile::tempdir().unwrap();
    run(
        reference.path(),
        &[("train.micro_batch_size", &4), ("train.grad_accum", &2)],
        1,
    );
    for (what, extra) in [
        ("dp 2", [("parallel.zero_stage", &0 as &dyn Display)]),
        ("dp 2 zero-1", [("parallel.zero_stage", &1)]),
    ] {
        let out = tempfile::tempdir().unwrap();
        let mut e: Vec<Set> = vec![("train.micro_batch_size", &4), ("train.grad_accum", &1)];
        e.extend(extra);
        run(out.path(), &e, 2);
        let d = max_diff(&adapters(out.path()), &adapters(reference.path()));
        let ld = max_loss_diff(&losses(out.path()), &losses(reference.path()));
        eprintln!("{what}: max adapter diff {d:.2e}, max loss diff {ld:.2e}");
        assert!(d <= 1e-5 && ld <= 1e-5, "{what}: {d} {ld}");
    }
    // Without dropout (masks follow the micro-batch shape) and the load-balancing loss (a
    // per-micro-batch mean), 2 × 4 equals 1 × 8.
    let no_drop: [Set; 2] = [("lora.dropout", &0.0), ("moe.aux_loss_coef", &0)];
    let (big, acc) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let [a, b] = no_drop;
    run(big.path(), &[a, b, ("train.micro_batch_size", &8)], 1);
    run(
        acc.path(),
        &[
            a,
            b,
            ("train.micro_batch_size", &4),
            ("train.grad_accum", &2),
        ],
        1,
    );
    let d = max_diff(&adapters(big.path()), &adapters(acc.path()));
    eprintln!("accumulation: max adapter diff {d:.2e}");
    assert!(d <= 1e-5, "{d}");
}

#[test]
fn mismatched_checkpoints_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    std::fs::create_dir(&base).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(base_dir().join(f), base.join(f)).unwrap();
    }
    let out = tmp.path().join("run");
    let on_copy: [Set; 1] = [("model.path", &base.display())];
    let r = recipe_for(&out, &on_copy);
    let stop = RunOptions {
        stop_after: Some(3),
        ..RunOptions::default()
    };
    run_training(&r, &stop).unwrap();
    let err = |r: &Recipe| {
        run_training(r, &RunOptions::default())
            .unwrap_err()
            .to_string()
    };

    // The recipe lost its `lora` section.
    let mut plain = r.clone();
    plain.lora = None;
    let e = err(&plain);
    assert!(
        e.contains("holds LoRA adapters") && e.contains("`lora`"),
        "{e}"
    );

    // The base changed under the run: one weight nudged.
    let path = base.join("model.safetensors");
    let file = TensorFile::open(&path).unwrap();
    let mut owned: Vec<_> = file
        .shapes()
        .into_iter()
        .map(|(n, shape)| {
            let (v, _) = file.f32(&n).unwrap();
            (n, v, shape)
        })
        .collect();
    owned[0].1[0] += 1e-3;
    let owned: Vec<_> = owned
        .into_iter()
        .map(|(n, v, s)| (n, moeru_checkpoints::OwnedTensor::f32(&v, s)))
        .collect();
    drop(file);
    write_tensors(&path, &owned).unwrap();
    let e = err(&r);
    assert!(e.contains("digest") && e.contains("model.path"), "{e}");
    // Nothing saved was touched.
    assert!(moeru_checkpoints::verify_checkpoint(&out.join("ckpt/step-000003")).is_ok());
}

/// An adapter made by Python peft on the smoke base (tests/reference/lora/smoke-base-peft):
/// moeru gives peft's logits with it, and `lora.adapter` continues training from it.
#[test]
fn a_peft_adapter_gives_peft_logits_and_continues_training() {
    let fixture = workspace().join("tests/reference/lora/smoke-base-peft");
    let device = Device::flex();
    let mut model = load_hf_model(&base_dir(), &device).unwrap();
    load_peft_adapter(&fixture, &mut model).unwrap();
    let refs = TensorFile::open(&fixture.join("reference.safetensors")).unwrap();
    let (ids, shape) = refs.i64("input_ids").unwrap();
    let batch = moeru_models::Batch::from_ids(&ids, shape[0], shape[1], &device);
    let ours = full_logits(&model, &batch);
    let (theirs, _) = refs.f32("logits").unwrap();
    let d = ours
        .iter()
        .zip(&theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    eprintln!("peft adapter on the smoke base: max |logits diff| {d:.2e}");
    assert!(d <= 1e-4, "{d}");

    let out = tempfile::tempdir().unwrap();
    let steps = 2;
    let lr = 1e-3;
    train(
        out.path(),
        &[
            ("lora.adapter", &fixture.display()),
            ("train.steps", &steps),
            ("checkpoint.every", &0),
            ("optim.lr", &lr),
            ("schedule.kind", &"constant"),
            ("schedule.min_lr", &0),
        ],
    );
    let dir = step_dir(out.path(), steps);
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["r"], 4, "the adapter's own rank, not the recipe's 8");
    // Each Adam step moves an element by at most about lr: the run started from peft's values.
    let start = tensors(&fixture.join("adapter_model.safetensors"));
    let end = tensors(&dir.join("adapter_model.safetensors"));
    let moved = max_diff(&start, &end);
    eprintln!("after {steps} steps from the peft adapter: max change {moved:.2e}");
    assert!(
        moved > 0.0 && moved <= steps as f32 * lr as f32 * 1.01,
        "{moved}"
    );
}

#[test]
fn lora_pretraining_on_plain_text_lowers_the_loss() {
    let out = tempfile::tempdir().unwrap();
    let text = smoke("data/train");
    train(
        out.path(),
        &[
            ("data.task", &"pretrain"),
            ("data.train", &text.display()),
            ("lora.target_modules", &"[q_proj, v_proj]"),
            ("train.steps", &8),
            ("checkpoint.every", &0),
        ],
    );
    let l = losses(out.path());
    assert!(l[7] < l[0], "{l:?}");
    assert!(step_dir(out.path(), 8)
        .join("adapter_model.safetensors")
        .exists());
}
