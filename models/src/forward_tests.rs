//! The layer seam on tiny random models: per-token log-probs against the plain full-logits
//! expression, the loss built on them, and a forward without adapters.

use burn::tensor::{activation::log_softmax, Device};

use crate::init::RandomInit;
use crate::layers::logsumexp_rows;
use crate::loss::{self, next_token_targets};
use crate::params::to_f32_vec;
use crate::precision::to_f32;
use crate::{Batch, ForwardCtx, LoraConfig, Qwen3Config, Qwen3Model};

fn config(moe: bool, attention_bias: bool) -> Qwen3Config {
    let mut json = serde_json::json!({
        "model_type": "qwen3", "vocab_size": 48, "hidden_size": 16, "intermediate_size": 24,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 8, "attention_bias": attention_bias, "tie_word_embeddings": false
    });
    if moe {
        let extra = serde_json::json!({
            "model_type": "qwen3_moe", "num_experts": 4, "num_experts_per_tok": 2,
            "moe_intermediate_size": 8, "norm_topk_prob": true
        });
        for (k, v) in extra.as_object().unwrap() {
            json[k] = v.clone();
        }
    }
    let serde_json::Value::Object(map) = json else {
        unreachable!()
    };
    Qwen3Config::from_map(map, std::path::Path::new("test")).unwrap()
}

fn model(c: Qwen3Config, device: &Device) -> Qwen3Model {
    let mut init = RandomInit { seed: 11, std: 0.5 };
    Qwen3Model::new(c, &mut init, device).unwrap_or_else(|never| match never {})
}

fn batch(vocab: usize, device: &Device) -> Batch {
    let ids: Vec<i64> = (0..14).map(|i| (i * 7 + 3) % vocab as i64).collect();
    Batch::from_ids(&ids, 2, 7, device)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn token_logprobs_are_the_log_softmax_at_the_targets() {
    let device = Device::flex();
    for moe in [false, true] {
        let model = model(config(moe, true), &device);
        let batch = batch(model.config.vocab_size, &device);
        let ctx = ForwardCtx::default();
        let hidden = model.forward(&batch, &ctx).hidden;
        let (targets, mask) = next_token_targets(&batch.input_ids);

        let plain = log_softmax(model.logits(hidden.clone(), &ctx), 2)
            .gather(2, targets.clone().unsqueeze_dim::<3>(2))
            .reshape([2, 7]);
        let ours = model.token_logprobs(hidden.clone(), targets.clone(), &ctx);
        let d = max_abs_diff(&to_f32_vec(ours.clone()), &to_f32_vec(plain));
        assert!(d <= 1e-6, "moe {moe}: log-probs off by {d:e}");

        // Chunk boundaries inside and between rows give the same values (up to the matmul's
        // blocking, which depends on the row count).
        let w = model.lm_head_weight();
        let chunked = loss::token_logprobs_chunked(
            hidden.clone(),
            w,
            targets.clone(),
            5,
            loss::VocabShard::whole(),
        );
        let d = max_abs_diff(&to_f32_vec(chunked), &to_f32_vec(ours.clone()));
        assert!(d <= 1e-6, "moe {moe}: chunked log-probs off by {d:e}");

        // The loss is −Σ mask · log p, and bit for bit the chunk expression it replaced.
        let sum = model.token_loss_sum(hidden.clone(), targets.clone(), mask.clone(), &ctx);
        let from_lp = -(ours * mask.clone()).sum();
        let d = max_abs_diff(&to_f32_vec(sum.clone()), &to_f32_vec(from_lp));
        assert!(d <= 1e-6, "moe {moe}: loss vs −Σ mask·logprob off by {d:e}");
        let logits = to_f32(hidden.reshape([14, 16]).matmul(w.clone().transpose()));
        let lse = logsumexp_rows(logits.clone());
        let picked = logits.gather(1, targets.reshape([14, 1])).reshape([14]);
        let before = ((lse - picked) * mask.reshape([14])).sum();
        assert_eq!(
            to_f32_vec(sum)[0].to_bits(),
            to_f32_vec(before)[0].to_bits(),
            "moe {moe}: the loss changed bits"
        );
    }
}

#[test]
fn adapters_off_is_the_base_model() {
    let device = Device::flex();
    let cases: [(bool, &[&str]); 2] = [
        (
            false,
            &[
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ],
        ),
        (
            true,
            &[
                "q_proj",
                "v_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
                "gate",
            ],
        ),
    ];
    for (moe, targets) in cases {
        let base = model(config(moe, true), &device);
        let mut adapted = base.clone();
        let cfg = LoraConfig {
            rank: 2,
            alpha: 4.0,
            dropout: 0.0,
            target_modules: targets.iter().map(|t| t.to_string()).collect(),
            use_rslora: false,
        };
        adapted.attach_lora(&cfg, 3).unwrap();
        for l in adapted.lora_adapters() {
            l.b = l.b.clone().ones_like().mul_scalar(0.1);
        }
        let batch = batch(base.config.vocab_size, &device);
        let logits = |m: &Qwen3Model, ctx: ForwardCtx| {
            to_f32_vec(m.logits(m.forward(&batch, &ctx).hidden, &ctx))
        };
        let plain = logits(&base, ForwardCtx::default());
        let off = logits(&adapted, ForwardCtx::default().without_adapters());
        let on = logits(&adapted, ForwardCtx::default());
        assert_eq!(off, plain, "moe {moe}: adapters off is not the base");
        let d = max_abs_diff(&on, &plain);
        assert!(d > 1e-3, "moe {moe}: adapters on change nothing ({d:e})");
    }
}
