//! Greedy generation against transformers' `generate(do_sample=False)` on the tiny reference
//! models (tests/reference/make_generation_reference.py): the same `sequences`, token for
//! token (early stop and pads included), and each step's logits within 1e-4 of transformers'
//! `scores` on the rows still generating (5e-3 on a GPU, whose f32 matmuls may run as TF32);
//! every reference model, and two with peft's LoRA adapters applied unmerged.

mod common;

use common::*;
use moeru_checkpoints::{load_hf_model, load_peft_adapter, TensorFile};
use moeru_models::generate::{GenerationConfig, Prompts};
use moeru_models::ForwardCtx;

#[test]
fn greedy_generation_equals_transformers() {
    let cases = [
        ("qwen3-dense-tied", "qwen3-dense-tied", None),
        ("qwen3-dense-kv1-bf16", "qwen3-dense-kv1-bf16", None),
        ("qwen3-moe-mixed", "qwen3-moe-mixed", None),
        ("qwen3-moe-norm-sharded", "qwen3-moe-norm-sharded", None),
        // peft's adapters, applied unmerged.
        (
            "lora-dense-tied-rslora",
            "qwen3-dense-tied",
            Some("dense-tied-rslora"),
        ),
        (
            "lora-moe-mixed-experts-router",
            "qwen3-moe-mixed",
            Some("moe-mixed-experts-router"),
        ),
    ];
    for (name, base, adapter) in cases {
        let file =
            TensorFile::open(&reference_dir().join(format!("generation/{name}.safetensors")))
                .unwrap();
        let (ids, shape) = i64s(&file, "input_ids");
        let (mask, _) = i64s(&file, "attention_mask");
        let (want, want_shape) = i64s(&file, "sequences");
        let (scores, score_shape) = f32s(&file, "scores");
        let eos = i64s(&file, "eos").0;
        let mut model = load_hf_model(&model_dir(base), &test_device()).unwrap();
        if let Some(a) = adapter {
            load_peft_adapter(&reference_dir().join("lora").join(a), &mut model).unwrap();
        }
        let prompts = Prompts {
            ids,
            mask,
            batch: shape[0],
            seq: shape[1],
        };
        let cfg = GenerationConfig {
            max_new_tokens: 10,
            eos_token_ids: eos.clone(),
            pad_token_id: 0,
            sampling: None,
        };
        let g = model.generate(&prompts, &cfg, &ForwardCtx::default());
        assert_eq!([g.batch, g.len], [want_shape[0], want_shape[1]], "{name}");
        assert_eq!(g.sequences, want, "{name}");
        let (steps, b, vocab) = (score_shape[0], score_shape[1], score_shape[2]);
        let mut worst = 0f32;
        assert!(g.len < shape[1] + 10 || steps == 10, "{name}");
        for t in 0..steps {
            for r in 0..b {
                let done = (0..t).any(|u| eos.contains(&want[r * g.len + shape[1] + u]));
                if done {
                    continue;
                }
                let at = (t * b + r) * vocab;
                let d = max_abs_diff(
                    &g.scores[t][r * vocab..(r + 1) * vocab],
                    &scores[at..at + vocab],
                );
                worst = worst.max(d);
                assert!(
                    d <= tol(1e-4, 5e-3),
                    "{name}: step {t} row {r}: logits differ by {d}"
                );
            }
        }
        eprintln!("{name}: {steps} steps, tokens equal, logits within {worst:.2e}");
    }
}
