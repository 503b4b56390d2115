//! Generation on tiny random models (dense and MoE): the KV-cache logits equal a full forward
//! over the final sequences, a row generated alone equals its row in the batch, and right
//! padding gives what left padding gives.

use burn::tensor::Device;

use crate::generate::{Generated, GenerationConfig, Prompts};
use crate::init::RandomInit;
use crate::params::to_f32_vec;
use crate::{Batch, ForwardCtx, Qwen3Config, Qwen3Model};

fn model(moe: bool) -> Qwen3Model {
    let mut json = serde_json::json!({
        "model_type": "qwen3", "vocab_size": 48, "hidden_size": 16, "intermediate_size": 24,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 8, "tie_word_embeddings": false
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
    let c = Qwen3Config::from_map(map, std::path::Path::new("test")).unwrap();
    let mut init = RandomInit { seed: 5, std: 0.5 };
    Qwen3Model::new(c, &mut init, &Device::flex()).unwrap_or_else(|never| match never {})
}

/// Prompts of 5, 3 and 7 tokens, left-padded with 0 to 7.
fn prompts() -> Prompts {
    let rows: [&[i64]; 3] = [&[3, 17, 9, 40, 2], &[11, 5, 30], &[7, 7, 21, 44, 1, 6, 13]];
    prompts_of(&rows, 7, true)
}

fn prompts_of(rows: &[&[i64]], seq: usize, left: bool) -> Prompts {
    let mut p = Prompts {
        ids: Vec::new(),
        mask: Vec::new(),
        batch: rows.len(),
        seq,
    };
    for row in rows {
        let pad = seq - row.len();
        let (ids, mask): (Vec<i64>, Vec<i64>) = match left {
            true => (
                vec![0; pad]
                    .into_iter()
                    .chain(row.iter().copied())
                    .collect(),
                vec![0; pad].into_iter().chain(vec![1; row.len()]).collect(),
            ),
            false => (
                row.iter().copied().chain(vec![0; pad]).collect(),
                vec![1; row.len()].into_iter().chain(vec![0; pad]).collect(),
            ),
        };
        p.ids.extend(ids);
        p.mask.extend(mask);
    }
    p
}

fn cfg(eos: Vec<i64>) -> GenerationConfig {
    GenerationConfig {
        max_new_tokens: 8,
        eos_token_ids: eos,
        pad_token_id: 0,
        sampling: None,
    }
}

/// Full-forward logits of row `r` of `g` at every position, over its real tokens only (the
/// prompt's left pads removed), `[len, vocab]` flat.
fn full_logits(model: &Qwen3Model, g: &Generated, pads: usize, r: usize) -> Vec<f32> {
    let row = &g.sequences[r * g.len + pads..(r + 1) * g.len];
    let batch = Batch::from_ids(row, 1, row.len(), &model.device());
    let ctx = ForwardCtx::default();
    to_f32_vec(model.logits(model.forward(&batch, &ctx).hidden, &ctx))
}

#[test]
fn cached_logits_equal_a_full_forward() {
    for moe in [false, true] {
        let model = model(moe);
        let p = prompts();
        let g = model.generate(&p, &cfg(vec![]), &ForwardCtx::default());
        assert_eq!(g.len, 7 + 8);
        let vocab = model.config.vocab_size;
        for r in 0..3 {
            let pads = p.mask[r * 7..(r + 1) * 7]
                .iter()
                .filter(|&&m| m == 0)
                .count();
            let full = full_logits(&model, &g, pads, r);
            let real = 7 - pads;
            for (step, scores) in g.scores.iter().enumerate() {
                let at = (real - 1 + step) * vocab;
                let (ours, want) = (&scores[r * vocab..(r + 1) * vocab], &full[at..at + vocab]);
                let d = ours
                    .iter()
                    .zip(want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(d <= 1e-5, "moe {moe} row {r} step {step}: {d}");
            }
        }
    }
}

#[test]
fn a_row_alone_equals_its_row_in_the_batch_and_right_padding_is_realigned() {
    for moe in [false, true] {
        let model = model(moe);
        let ctx = ForwardCtx::default();
        let p = prompts();
        // Stop on the token row 0 generates second, so rows stop at different steps.
        let free = model.generate(&p, &cfg(vec![]), &ctx);
        let eos = free.sequences[7 + 1];
        let g = model.generate(&p, &cfg(vec![eos]), &ctx);
        assert!(
            g.len < free.len || g.sequences[g.len - 1] == 0,
            "moe {moe}: {g:?}"
        );
        let rows: [&[i64]; 3] = [&[3, 17, 9, 40, 2], &[11, 5, 30], &[7, 7, 21, 44, 1, 6, 13]];
        for (r, row) in rows.iter().enumerate() {
            let alone = model.generate(&prompts_of(&[row], row.len(), true), &cfg(vec![eos]), &ctx);
            let new = &alone.sequences[row.len()..];
            let in_batch = &g.sequences[r * g.len + 7..(r + 1) * g.len];
            assert_eq!(
                &in_batch[..new.len().min(in_batch.len())],
                &new[..new.len().min(in_batch.len())],
                "moe {moe} row {r}"
            );
            assert!(
                in_batch[new.len().min(in_batch.len())..]
                    .iter()
                    .all(|&t| t == 0),
                "moe {moe} row {r}: pads after the stop"
            );
        }
        let right = model.generate(&prompts_of(&rows, 7, false), &cfg(vec![eos]), &ctx);
        assert_eq!(right.sequences, g.sequences, "moe {moe}");
    }
}

fn sampling_cfg(seed: u64) -> GenerationConfig {
    GenerationConfig {
        sampling: Some(crate::sampling::Sampling {
            temperature: 1.3,
            top_k: 30,
            top_p: 0.95,
            min_p: 0.01,
            seed,
        }),
        ..cfg(vec![])
    }
}

/// Each row's new tokens, its pads left out.
fn new_tokens(g: &Generated, seq: usize) -> Vec<Vec<i64>> {
    (0..g.batch)
        .map(|r| g.sequences[r * g.len + seq..(r + 1) * g.len].to_vec())
        .collect()
}

#[test]
fn sampled_tokens_do_not_depend_on_batch_size_or_row_order() {
    let rows: Vec<Vec<i64>> = (0..8)
        .map(|r| {
            (0..(2 + r % 5))
                .map(|i| ((r * 7 + i * 5) % 47) as i64 + 1)
                .collect()
        })
        .collect();
    let slices: Vec<&[i64]> = rows.iter().map(|r| r.as_slice()).collect();
    for moe in [false, true] {
        let model = model(moe);
        let ctx = ForwardCtx::default();
        let batch = model.generate(&prompts_of(&slices, 6, true), &sampling_cfg(3), &ctx);
        let batch = new_tokens(&batch, 6);
        let reversed: Vec<&[i64]> = slices.iter().rev().copied().collect();
        let back = model.generate(&prompts_of(&reversed, 6, false), &sampling_cfg(3), &ctx);
        let back: Vec<_> = new_tokens(&back, 6).into_iter().rev().collect();
        assert_eq!(back, batch, "moe {moe}: reversed rows");
        for (r, row) in slices.iter().enumerate() {
            let alone =
                model.generate(&prompts_of(&[row], row.len(), true), &sampling_cfg(3), &ctx);
            assert_eq!(
                new_tokens(&alone, row.len())[0],
                batch[r],
                "moe {moe} row {r} alone"
            );
        }
        let other = model.generate(&prompts_of(&slices, 6, true), &sampling_cfg(4), &ctx);
        assert_ne!(
            new_tokens(&other, 6),
            batch,
            "moe {moe}: another seed, other tokens"
        );
        let greedy = model.generate(&prompts_of(&slices, 6, true), &cfg(vec![]), &ctx);
        assert_ne!(
            new_tokens(&greedy, 6),
            batch,
            "moe {moe}: sampling is not argmax"
        );
    }
}

#[test]
fn repeated_prompts_draw_independent_samples() {
    let model = model(true);
    let row: &[i64] = &[5, 9, 2];
    let g = model.generate(
        &prompts_of(&[row, row, row, row], 3, true),
        &sampling_cfg(1),
        &ForwardCtx::default(),
    );
    let t = new_tokens(&g, 3);
    assert!(
        t.iter().any(|x| *x != t[0]),
        "four samples of one prompt: {t:?}"
    );
}

/// Stops row 1 after its third token, like a stop string would.
struct StopRowOne {
    seen: Vec<Vec<i64>>,
}

impl crate::generate::StepObserver for StopRowOne {
    fn step(&mut self, step: usize, tokens: &[i64], finished: &mut [bool]) {
        self.seen.push(tokens.to_vec());
        if step == 2 {
            finished[1] = true;
        }
    }
}

#[test]
fn an_observer_sees_every_step_and_stopped_rows_are_padded() {
    let model = model(true);
    let ctx = ForwardCtx::default();
    let p = prompts();
    let free = model.generate(&p, &cfg(vec![]), &ctx);
    let mut obs = StopRowOne { seen: Vec::new() };
    let g = model.generate_with(&p, &cfg(vec![]), &ctx, &mut obs);
    assert!(g.scores.is_empty(), "scores kept only on request");
    assert_eq!(g.stopped_at, vec![None, Some(2), None]);
    assert_eq!(obs.seen.len(), 8);
    for r in 0..3 {
        let (ours, want) = (&g.sequences[r * g.len..], &free.sequences[r * free.len..]);
        for i in 0..g.len {
            let expect = if r == 1 && i > 7 + 2 { 0 } else { want[i] };
            assert_eq!(ours[i], expect, "row {r} position {i}");
            if i >= 7 {
                assert_eq!(
                    obs.seen[i - 7][r],
                    ours[i],
                    "observed row {r} step {}",
                    i - 7
                );
            }
        }
    }
}

#[test]
fn the_cache_is_allocated_once_for_prompt_and_new_tokens() {
    let model = model(false);
    let p = prompts();
    let mut cache = crate::kv_cache::KvCache::new(model.layers.len(), 7 + 8);
    assert!(cache.is_empty());
    let g = model.generate(&p, &cfg(vec![]), &ForwardCtx::default());
    assert_eq!(g.stopped_at, vec![None; 3]);
    // The prefill fills 7 of the 15 positions; capacity stays.
    model.prefill(&p.left_padded(), &mut cache, &ForwardCtx::default());
    assert_eq!((cache.len(), cache.capacity()), (7, 15));
}
