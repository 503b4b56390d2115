//! Which decoder layers each pipeline stage runs: `pp · virtual` virtual stages of contiguous
//! layers (virtual stage `s` is chunk `s / pp` of rank `s % pp`), the embedding on the first
//! and the final norm, LM head and loss on the last. Balanced automatically, the head counted
//! by its cost as torchtitan's `output_weight` and Megatron's
//! `account_for_loss_in_pipeline_split` do, or set explicitly (`parallel.pp_layers`).
//!
//! Owns: the split. Must not: build models or communicate.

use std::ops::Range;

use moeru_models::Qwen3Config;

/// The matmul FLOPs per token of each decoder layer's active weights (attention
/// projections, the dense MLP or `top_k` experts plus the router) and of the LM head, in
/// multiply-adds; attention scores, norms and the embedding lookup are left out.
pub fn layer_costs(c: &Qwen3Config) -> (Vec<f64>, f64) {
    let (h, hd) = (c.hidden_size as f64, c.head_dim as f64);
    let attention = 2.0 * h * hd * (c.num_attention_heads + c.num_key_value_heads) as f64;
    let layers = (0..c.num_hidden_layers)
        .map(|i| {
            let mlp = match (&c.moe, c.is_moe_layer(i)) {
                (Some(m), true) => {
                    let experts =
                        3.0 * h * (m.moe_intermediate_size * m.num_experts_per_tok) as f64;
                    experts + h * m.num_experts as f64
                }
                _ => 3.0 * h * c.intermediate_size as f64,
            };
            attention + mlp
        })
        .collect();
    (layers, h * c.vocab_size as f64)
}

/// Contiguous layer ranges for `stages` stages minimising the largest stage cost, the last
/// stage also paying `head`; every stage gets at least one layer. Of equal splits, the one
/// whose earlier stages end first.
pub fn balanced(costs: &[f64], head: f64, stages: usize) -> Result<Vec<Range<usize>>, String> {
    let n = costs.len();
    if stages == 0 || stages > n {
        return Err(format!(
            "{stages} pipeline stages for {n} layers; every stage needs a layer"
        ));
    }
    let mut prefix = vec![0.0; n + 1];
    for (i, c) in costs.iter().enumerate() {
        prefix[i + 1] = prefix[i] + c;
    }
    let span = |a: usize, b: usize| prefix[b] - prefix[a];
    // best[s][i]: the least largest cost of the first s stages over layers 0..i; cut: where
    // stage s − 1 starts.
    let mut best = vec![vec![f64::INFINITY; n + 1]; stages + 1];
    let mut cut = vec![vec![0usize; n + 1]; stages + 1];
    best[0][0] = 0.0;
    for s in 1..=stages {
        let extra = if s == stages { head } else { 0.0 };
        for i in s..=n {
            for j in (s - 1)..i {
                let cost = best[s - 1][j].max(span(j, i) + extra);
                if cost < best[s][i] {
                    (best[s][i], cut[s][i]) = (cost, j);
                }
            }
        }
    }
    let mut ranges = vec![0..0; stages];
    let mut end = n;
    for s in (1..=stages).rev() {
        let start = cut[s][end];
        ranges[s - 1] = start..end;
        end = start;
    }
    Ok(ranges)
}

/// `counts[s]` layers for virtual stage `s`, in order.
pub fn explicit(
    counts: &[usize],
    layers: usize,
    stages: usize,
) -> Result<Vec<Range<usize>>, String> {
    if counts.len() != stages {
        return Err(format!(
            "`parallel.pp_layers` lists {} stages but pp × pp_virtual is {stages}; give one layer count per virtual stage",
            counts.len()
        ));
    }
    if let Some(s) = counts.iter().position(|&c| c == 0) {
        return Err(format!(
            "`parallel.pp_layers` gives stage {s} no layer; every stage needs one"
        ));
    }
    let total: usize = counts.iter().sum();
    if total != layers {
        return Err(format!(
            "`parallel.pp_layers` sums to {total} layers but the model has {layers} (num_hidden_layers)"
        ));
    }
    let mut start = 0;
    Ok(counts
        .iter()
        .map(|&c| {
            start += c;
            start - c..start
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_layers_split_evenly_and_the_head_takes_layers_off_the_last_stage() {
        assert_eq!(
            balanced(&[1.0; 8], 0.0, 4).unwrap(),
            [0..2, 2..4, 4..6, 6..8]
        );
        // A head worth two layers: the last stage keeps fewer.
        assert_eq!(
            balanced(&[1.0; 10], 2.0, 4).unwrap(),
            [0..3, 3..6, 6..9, 9..10]
        );
        assert_eq!(balanced(&[1.0; 3], 0.0, 3).unwrap(), [0..1, 1..2, 2..3]);
    }

    #[test]
    fn uneven_layers_minimise_the_largest_stage() {
        // One heavy layer: it stands alone.
        let r = balanced(&[1.0, 1.0, 6.0, 1.0, 1.0, 1.0], 0.0, 3).unwrap();
        assert_eq!(r, [0..2, 2..3, 3..6]);
        assert!(balanced(&[1.0; 2], 0.0, 3)
            .unwrap_err()
            .contains("every stage needs a layer"));
    }

    #[test]
    fn qwen3_30b_a3b_head_counts_as_several_layers() {
        let json = serde_json::json!({
            "model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 2048,
            "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
            "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
            "num_experts": 128, "num_experts_per_tok": 8
        });
        let serde_json::Value::Object(map) = json else {
            unreachable!()
        };
        let c = Qwen3Config::from_map(map, std::path::Path::new("test")).unwrap();
        let (layers, head) = layer_costs(&c);
        let ratio = head / layers[0];
        assert!((5.0..6.0).contains(&ratio), "head / layer = {ratio}");
        let r = balanced(&layers, head, 2).unwrap();
        assert_eq!(
            r,
            [0..27, 27..48],
            "the last stage's 21 layers + head ≈ the first's 27"
        );
    }

    #[test]
    fn explicit_counts_are_checked() {
        assert_eq!(explicit(&[3, 1], 4, 2).unwrap(), [0..3, 3..4]);
        assert!(explicit(&[3], 4, 2)
            .unwrap_err()
            .contains("pp × pp_virtual is 2"));
        assert!(explicit(&[4, 0], 4, 2)
            .unwrap_err()
            .contains("stage 1 no layer"));
        assert!(explicit(&[2, 1], 4, 2).unwrap_err().contains("sums to 3"));
    }
}
