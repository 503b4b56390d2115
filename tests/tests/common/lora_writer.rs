//! Adapters written by moeru, for the peft interop check (tests/interop/check_peft.py).
//!
//! The example `write_lora` writes them (with merged exports) into any folder; a copy without
//! the merged exports is committed in tests/reference/lora/moeru-written/, and tests/lora.rs
//! checks that the copy is what this code writes today.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};
use moeru_checkpoints::{
    export_merged_hf, load_hf_model, save_peft_adapter, write_tensors, OwnedTensor,
};
use moeru_models::init::SplitMix64;
use moeru_models::params::{param_from_data, to_f32_vec, ParamVisitor, Params};
use moeru_models::{Batch, ForwardCtx, LoraConfig, Qwen3Model};

pub struct MoeruCase {
    pub name: &'static str,
    pub model: &'static str,
    pub config: LoraConfig,
    pub seed: u64,
}

const ALL: &[&str] = &[
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

pub fn moeru_cases() -> Vec<MoeruCase> {
    let targets = |extra: &[&str]| ALL.iter().chain(extra).map(|s| s.to_string()).collect();
    vec![
        MoeruCase {
            name: "moeru-dense-tied",
            model: "qwen3-dense-tied",
            config: LoraConfig {
                rank: 4,
                alpha: 16.0,
                dropout: 0.1,
                target_modules: targets(&[]),
                use_rslora: false,
            },
            seed: 11,
        },
        MoeruCase {
            name: "moeru-moe-mixed",
            model: "qwen3-moe-mixed",
            config: LoraConfig {
                rank: 2,
                alpha: 8.0,
                dropout: 0.0,
                target_modules: targets(&["gate"]),
                use_rslora: true,
            },
            seed: 12,
        },
    ]
}

pub fn reference_models() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("reference/models")
}

/// The base model with the case's adapter attached: A as attached (kaiming-uniform), B
/// replaced by seeded normals (σ = 0.2), so the adapter changes the output.
pub fn build(case: &MoeruCase, device: &Device) -> Qwen3Model {
    let mut model = load_hf_model(&reference_models().join(case.model), device)
        .unwrap_or_else(|e| panic!("{e}"));
    model
        .attach_lora(&case.config, case.seed)
        .unwrap_or_else(|e| panic!("{e}"));
    struct RandomB(SplitMix64);
    impl ParamVisitor for RandomB {
        fn visit<const D: usize>(&mut self, name: &str, param: &mut Tensor<D>) {
            if name.contains(".lora_B.") {
                let n = param.shape().num_elements();
                let v: Vec<f32> = (0..n)
                    .map(|_| (0.2 * self.0.next_normal()) as f32)
                    .collect();
                *param = param_from_data(TensorData::new(v, param.dims()), &param.device());
            }
        }
    }
    model
        .trainable()
        .visit_params(&mut RandomB(SplitMix64::new(case.seed)));
    model
}

/// Fixed input ids `[2, 7]` for the case.
pub fn input_ids(case: &MoeruCase, vocab: usize) -> Vec<i64> {
    let mut rng = SplitMix64::new(case.seed ^ 0xA5A5);
    (0..14)
        .map(|_| (rng.next_u64() % vocab as u64) as i64)
        .collect()
}

/// Writes `<out>/<case>/` with adapter_config.json, adapter_model.safetensors and
/// moeru.safetensors (input_ids, moeru's logits); with `merged`, also `merged/` (an HF folder).
pub fn write_case(case: &MoeruCase, out: &Path, merged: bool) -> PathBuf {
    let device = Device::flex();
    let mut model = build(case, &device);
    let dir = out.join(case.name);
    let base = format!("tests/reference/models/{}", case.model);
    save_peft_adapter(&dir, &mut model, &base).unwrap_or_else(|e| panic!("{e}"));
    let ids = input_ids(case, model.config.vocab_size);
    let batch = Batch::from_ids(&ids, 2, 7, &device);
    let ctx = ForwardCtx::default();
    let logits = model.logits(model.forward(&batch, &ctx).hidden, &ctx);
    let shape = logits.dims().to_vec();
    let tensors = vec![
        ("input_ids".to_string(), OwnedTensor::i64(&ids, vec![2, 7])),
        (
            "logits".to_string(),
            OwnedTensor::f32(&to_f32_vec(logits), shape),
        ),
    ];
    write_tensors(&dir.join("moeru.safetensors"), &tensors).unwrap_or_else(|e| panic!("{e}"));
    if merged {
        let side = reference_models().join(case.model);
        export_merged_hf(&model, &dir.join("merged"), u64::MAX, Some(&side))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    dir
}
