//! Broken model folders are refused with a message naming the file, key or tensor.

mod common;

use std::path::Path;

use burn::tensor::Device;
use common::*;
use moeru_checkpoints::{load_hf_model, write_tensors, OwnedTensor, TensorFile};

fn load_error(dir: &Path) -> String {
    match load_hf_model(dir, &Device::flex()) {
        Ok(_) => panic!("{} loaded although it is broken", dir.display()),
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.contains('\n'), "error is not one line: {msg}");
            msg
        }
    }
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let path = dir.join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(json.as_object_mut().unwrap());
    std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
}

/// Rewrites model.safetensors of `dir`, letting `edit` change the list of tensors.
fn edit_weights(dir: &Path, edit: impl FnOnce(&mut Vec<(String, OwnedTensor)>)) {
    let path = dir.join("model.safetensors");
    let file = TensorFile::open(&path).unwrap();
    let mut tensors: Vec<(String, OwnedTensor)> = file
        .shapes()
        .into_iter()
        .map(|(n, s)| {
            let values = file.f32(&n).unwrap().0;
            (n, OwnedTensor::f32(&values, s))
        })
        .collect();
    drop(file);
    edit(&mut tensors);
    write_tensors(&path, &tensors).unwrap();
}

#[test]
fn missing_config_key_is_named() {
    let tmp = copy_model("qwen3-dense-tied");
    edit_config(tmp.path(), |c| {
        c.remove("hidden_size");
    });
    let msg = load_error(tmp.path());
    assert!(
        msg.contains("config.json") && msg.contains("`hidden_size`"),
        "{msg}"
    );
}

#[test]
fn wrongly_typed_config_key_is_named() {
    let tmp = copy_model("qwen3-dense-tied");
    edit_config(tmp.path(), |c| {
        c.insert("num_attention_heads".into(), "four".into());
    });
    let msg = load_error(tmp.path());
    assert!(
        msg.contains("`num_attention_heads`") && msg.contains("\"four\""),
        "{msg}"
    );
}

#[test]
fn unsupported_settings_are_named() {
    let tmp = copy_model("qwen3-dense-tied");
    edit_config(tmp.path(), |c| {
        c.insert(
            "rope_scaling".into(),
            serde_json::json!({"rope_type": "yarn", "factor": 4.0}),
        );
    });
    let msg = load_error(tmp.path());
    assert!(
        msg.contains("`rope_scaling`") && msg.contains("yarn"),
        "{msg}"
    );

    let tmp = copy_model("qwen3-dense-tied");
    edit_config(tmp.path(), |c| {
        c.insert("use_sliding_window".into(), true.into());
    });
    let msg = load_error(tmp.path());
    assert!(msg.contains("`use_sliding_window`"), "{msg}");
}

#[test]
fn wrong_tensor_shape_names_tensor_and_both_shapes() {
    let tmp = copy_model("qwen3-dense-tied");
    let name = "model.layers.1.self_attn.q_proj.weight";
    edit_weights(tmp.path(), |ts| {
        let t = ts.iter_mut().find(|(n, _)| n == name).unwrap();
        t.1 = OwnedTensor::f32(&vec![0.0; 60 * 32], vec![60, 32]);
    });
    let msg = load_error(tmp.path());
    assert!(
        msg.contains(name) && msg.contains("[60, 32]") && msg.contains("[64, 32]"),
        "{msg}"
    );
}

#[test]
fn missing_and_unexpected_tensors_are_named() {
    let tmp = copy_model("qwen3-dense-tied");
    let name = "model.layers.0.mlp.up_proj.weight";
    edit_weights(tmp.path(), |ts| ts.retain(|(n, _)| n != name));
    let msg = load_error(tmp.path());
    assert!(msg.contains("missing") && msg.contains(name), "{msg}");

    let tmp = copy_model("qwen3-dense-tied");
    edit_weights(tmp.path(), |ts| {
        ts.push((
            "model.layers.7.extra.weight".into(),
            OwnedTensor::f32(&[1.0], vec![1]),
        ))
    });
    let msg = load_error(tmp.path());
    assert!(
        msg.contains("unexpected") && msg.contains("model.layers.7.extra.weight"),
        "{msg}"
    );
}

#[test]
fn missing_expert_is_named() {
    let tmp = copy_model("qwen3-moe-mixed");
    let name = "model.layers.2.mlp.experts.3.up_proj.weight";
    edit_weights(tmp.path(), |ts| ts.retain(|(n, _)| n != name));
    let msg = load_error(tmp.path());
    assert!(msg.contains(name), "{msg}");
}

#[test]
fn missing_shard_is_named() {
    let tmp = copy_model("qwen3-moe-norm-sharded");
    std::fs::remove_file(tmp.path().join("model-00002-of-00004.safetensors")).unwrap();
    let msg = load_error(tmp.path());
    assert!(
        msg.contains("model-00002-of-00004.safetensors") && msg.contains("index.json"),
        "{msg}"
    );
}

#[test]
fn truncated_safetensors_is_reported() {
    let tmp = copy_model("qwen3-dense-tied");
    let path = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let msg = load_error(tmp.path());
    assert!(
        msg.contains("model.safetensors") && msg.contains("truncated"),
        "{msg}"
    );
}

#[test]
fn folder_without_weights_is_reported() {
    let tmp = copy_model("qwen3-dense-tied");
    std::fs::remove_file(tmp.path().join("model.safetensors")).unwrap();
    let msg = load_error(tmp.path());
    assert!(msg.contains("no weights found"), "{msg}");

    let empty = tempfile::tempdir().unwrap();
    let msg = load_error(empty.path());
    assert!(msg.contains("config.json"), "{msg}");
}
