//! Export writes the Hugging Face layout transformers reads: the same tensors, names, shapes
//! and values as the folder it came from, and a config.json that loads back to the same model.

mod common;

use burn::tensor::Device;
use common::*;
use moeru_checkpoints::{export_hf, load_hf_model, CheckpointError};
use moeru_models::{Batch, ForwardCtx, Qwen3Config};

#[test]
fn export_equals_original_folder_tensor_for_tensor() {
    for name in REFERENCE_MODELS {
        let device = Device::flex();
        let mut model = load_hf_model(&model_dir(name), &device).unwrap();
        let out = tempfile::tempdir().unwrap();
        let dir = out.path().join("exported");
        export_hf(&mut model, &dir, u64::MAX, Some(&model_dir(name))).unwrap();

        let mut original = folder_tensors(&model_dir(name));
        let exported = folder_tensors(&dir);
        if model.config.tie_word_embeddings {
            original.remove("lm_head.weight");
        }
        assert_eq!(
            original.keys().collect::<Vec<_>>(),
            exported.keys().collect::<Vec<_>>(),
            "{name}: tensor names"
        );
        for (tensor, (shape, values)) in &original {
            let (eshape, evalues) = &exported[tensor];
            assert_eq!(shape, eshape, "{name}: shape of {tensor}");
            // bf16 on disk upcasts exactly, so values must be bit-identical.
            assert!(values == evalues, "{name}: values of {tensor}");
        }
        let config = Qwen3Config::from_dir(&dir).unwrap();
        assert_eq!(
            Qwen3Config {
                raw: Default::default(),
                ..config
            },
            Qwen3Config {
                raw: Default::default(),
                ..model.config.clone()
            },
            "{name}: exported config.json describes another model"
        );
    }
}

#[test]
fn sharded_export_reloads_to_the_same_logits() {
    let name = "qwen3-moe-mixed";
    let device = Device::flex();
    let mut model = load_hf_model(&model_dir(name), &device).unwrap();
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("sharded");
    export_hf(&mut model, &dir, 30_000, None).unwrap();
    let shards = std::fs::read_dir(&dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("model-")
        })
        .count();
    assert!(shards > 1, "expected several shards, got {shards}");
    assert!(dir.join("model.safetensors.index.json").exists());

    let reloaded = load_hf_model(&dir, &device).unwrap();
    let (ids, shape) = i64s(&outputs(name), "input_ids");
    let batch = Batch::from_ids(&ids, shape[0], shape[1], &device);
    let ctx = ForwardCtx::default();
    let a = to_f32_vec(model.logits(model.forward(&batch, &ctx).hidden, &ctx));
    let b = to_f32_vec(reloaded.logits(reloaded.forward(&batch, &ctx).hidden, &ctx));
    assert!(a == b, "reloaded model computes different logits");
}

#[test]
fn export_refuses_to_overwrite_a_folder() {
    let device = Device::flex();
    let mut model = load_hf_model(&model_dir("qwen3-dense-tied"), &device).unwrap();
    let out = tempfile::tempdir().unwrap();
    std::fs::write(out.path().join("keep.txt"), "precious").unwrap();
    let err = export_hf(&mut model, out.path(), u64::MAX, None).unwrap_err();
    assert!(matches!(err, CheckpointError::OutputExists { .. }), "{err}");
    assert_eq!(
        std::fs::read_to_string(out.path().join("keep.txt")).unwrap(),
        "precious"
    );
    assert_eq!(
        std::fs::read_dir(out.path()).unwrap().count(),
        1,
        "nothing else written"
    );
}
