//! What moeru says about adapters it cannot load or LoRA settings it refuses: the file, the
//! tensor or key, what was found, and what to do.

mod common;

use std::path::Path;

use burn::tensor::Device;
use common::*;
use moeru_checkpoints::{
    load_hf_model, load_peft_adapter, save_peft_adapter, write_tensors, OwnedTensor, TensorFile,
};
use moeru_models::{LoraConfig, Qwen3Model};
use serde_json::Value;

const DENSE: (&str, &str) = ("dense-tied-rslora", "qwen3-dense-tied");
const MOE: (&str, &str) = ("moe-mixed-experts-router", "qwen3-moe-mixed");
const Q0: &str = "base_model.model.model.layers.0.self_attn.q_proj";

fn copy_case(case: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        let src = reference_dir().join("lora").join(case).join(f);
        std::fs::copy(src, tmp.path().join(f)).unwrap();
    }
    tmp
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let path = dir.join("adapter_config.json");
    let mut json: serde_json::Map<String, Value> =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut json);
    std::fs::write(&path, serde_json::to_string(&json).unwrap()).unwrap();
}

fn edit_tensors(dir: &Path, edit: impl FnOnce(&mut Vec<(String, OwnedTensor)>)) {
    let path = dir.join("adapter_model.safetensors");
    let file = TensorFile::open(&path).unwrap();
    let mut tensors: Vec<(String, OwnedTensor)> = file
        .shapes()
        .into_iter()
        .map(|(n, s)| {
            let v = file.f32(&n).unwrap().0;
            (n, OwnedTensor::f32(&v, s))
        })
        .collect();
    drop(file);
    edit(&mut tensors);
    write_tensors(&path, &tensors).unwrap();
}

fn base(model: &str) -> Qwen3Model {
    load_hf_model(&model_dir(model), &Device::flex()).unwrap()
}

/// Loads the adapter in `dir` onto `model` and returns the error message.
fn load_error(dir: &Path, model: &str) -> String {
    match load_peft_adapter(dir, &mut base(model)) {
        Ok(_) => panic!("{}: loaded, but should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(msg: &str, parts: &[&str]) {
    eprintln!("{msg}");
    for p in parts {
        assert!(msg.contains(p), "error should mention `{p}`: {msg}");
    }
}

#[test]
fn unsupported_options_are_refused_by_name() {
    let cases: &[(&str, Value)] = &[
        ("bias", "all".into()),
        ("use_dora", true.into()),
        ("fan_in_fan_out", true.into()),
        ("lora_bias", true.into()),
        ("modules_to_save", serde_json::json!(["lm_head"])),
        ("peft_type", "IA3".into()),
    ];
    for (key, value) in cases {
        let dir = copy_case(DENSE.0);
        edit_config(dir.path(), |j| {
            j.insert(key.to_string(), value.clone());
        });
        let msg = load_error(dir.path(), DENSE.1);
        assert_mentions(
            &msg,
            &["adapter_config.json", &format!("`{key}`"), "not supported"],
        );
    }
}

#[test]
fn rank_mismatch_names_tensor_and_config() {
    let dir = copy_case(DENSE.0);
    edit_config(dir.path(), |j| {
        j.insert("r".into(), 3.into());
    });
    let msg = load_error(dir.path(), DENSE.1);
    assert_mentions(
        &msg,
        &[
            "adapter_model.safetensors",
            "lora_A.weight",
            "rank-4",
            "rank 3",
            "r = 3",
        ],
    );
}

#[test]
fn missing_tensors_are_named() {
    let dir = copy_case(DENSE.0);
    edit_tensors(dir.path(), |t| {
        t.retain(|(n, _)| n != &format!("{Q0}.lora_B.weight"))
    });
    let msg = load_error(dir.path(), DENSE.1);
    assert_mentions(&msg, &[&format!("{Q0}.lora_B.weight"), "missing"]);

    // A whole site the config targets.
    let dir = copy_case(DENSE.0);
    edit_tensors(dir.path(), |t| t.retain(|(n, _)| !n.starts_with(Q0)));
    let msg = load_error(dir.path(), DENSE.1);
    assert_mentions(
        &msg,
        &[
            &format!("{Q0}.lora_A.weight"),
            "missing",
            "targets `model.layers.0.self_attn.q_proj`",
        ],
    );
}

#[test]
fn unknown_tensors_are_named() {
    let extra = |name: &str, shape: Vec<usize>| {
        let n = shape.iter().product();
        (name.to_string(), OwnedTensor::f32(&vec![0.0; n], shape))
    };
    let dir = copy_case(DENSE.0);
    edit_tensors(dir.path(), |t| {
        t.push(extra(&format!("{Q0}.lora_magnitude_vector"), vec![64]))
    });
    assert_mentions(
        &load_error(dir.path(), DENSE.1),
        &["lora_magnitude_vector", "A/B matrices only"],
    );

    let dir = copy_case(DENSE.0);
    edit_tensors(dir.path(), |t| {
        t.push(extra("base_model.model.lm_head.lora_A.weight", vec![4, 32]));
        t.push(extra("base_model.model.lm_head.lora_B.weight", vec![96, 4]));
    });
    assert_mentions(
        &load_error(dir.path(), DENSE.1),
        &[
            "adapter_model.safetensors",
            "lm_head.weight",
            "cannot carry an adapter",
        ],
    );

    // An adapter on a module the config does not target: peft would drop it.
    let dir = copy_case(DENSE.0);
    edit_config(dir.path(), |j| {
        j.insert(
            "target_modules".into(),
            serde_json::json!([
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj"
            ]),
        );
    });
    assert_mentions(
        &load_error(dir.path(), DENSE.1),
        &[
            "q_proj.lora_A.weight",
            "adapts `model.layers.0.self_attn.q_proj`",
            "does not target",
        ],
    );
}

#[test]
fn transformers4_per_expert_adapters_are_explained() {
    let dir = copy_case(MOE.0);
    edit_tensors(dir.path(), |t| {
        for (n, _) in t.iter_mut() {
            *n = n.replace(
                "layers.1.mlp.experts.lora_A",
                "layers.1.mlp.experts.0.down_proj.lora_A",
            );
        }
    });
    assert_mentions(
        &load_error(dir.path(), MOE.1),
        &["experts.0.down_proj.lora_A.weight", "transformers-4"],
    );
}

#[test]
fn pickle_only_and_wrong_model_are_explained() {
    let dir = copy_case(DENSE.0);
    std::fs::rename(
        dir.path().join("adapter_model.safetensors"),
        dir.path().join("adapter_model.bin"),
    )
    .unwrap();
    assert_mentions(
        &load_error(dir.path(), DENSE.1),
        &["no adapter_model.safetensors", "pickle"],
    );

    // The dense-tied adapter on a model with narrower q_proj.
    let dir = copy_case(DENSE.0);
    let msg = load_error(dir.path(), "qwen3-dense-kv1-bf16");
    assert_mentions(
        &msg,
        &["adapter_model.safetensors", "has shape", "another model"],
    );
}

#[test]
fn dropout_with_expert_targets_is_refused() {
    let dir = copy_case(MOE.0);
    edit_config(dir.path(), |j| {
        j.insert("lora_dropout".into(), 0.1.into());
    });
    assert_mentions(
        &load_error(dir.path(), MOE.1),
        &[
            "adapter_model.safetensors",
            "LoRA dropout 0.1",
            "lora_dropout",
        ],
    );
}

#[test]
fn lora_settings_are_checked() {
    let cfg = |targets: &[&str], rank: usize, dropout: f64| LoraConfig {
        rank,
        alpha: 8.0,
        dropout,
        target_modules: targets.iter().map(|s| s.to_string()).collect(),
        use_rslora: false,
    };
    let err = |model: &str, c: LoraConfig| base(model).attach_lora(&c, 0).unwrap_err().to_string();
    assert_mentions(
        &err(DENSE.1, cfg(&["lm_head"], 4, 0.0)),
        &["unknown target `lm_head`"],
    );
    assert_mentions(&err(DENSE.1, cfg(&["gate"], 4, 0.0)), &["`gate`", "dense"]);
    assert_mentions(
        &err(MOE.1, cfg(&["gate_proj"], 4, 0.0)),
        &["`gate_proj` without `up_proj`"],
    );
    assert_mentions(
        &err(MOE.1, cfg(&["down_proj"], 4, 0.1)),
        &["LoRA dropout 0.1", "lora.dropout"],
    );
    assert_mentions(
        &err(DENSE.1, cfg(&["q_proj"], 0, 0.0)),
        &["rank must be at least 1"],
    );
    assert_mentions(
        &err(DENSE.1, cfg(&[], 4, 0.0)),
        &["lora.target_modules is empty"],
    );

    let mut model = base(DENSE.1);
    model.attach_lora(&cfg(&["q_proj"], 4, 0.0), 0).unwrap();
    assert_mentions(
        &model
            .attach_lora(&cfg(&["v_proj"], 4, 0.0), 0)
            .unwrap_err()
            .to_string(),
        &["already attached"],
    );
    let out = tempfile::tempdir().unwrap();
    let msg = save_peft_adapter(out.path(), &mut base(DENSE.1), "x")
        .unwrap_err()
        .to_string();
    assert_mentions(&msg, &["no LoRA adapters attached"]);
}
