//! Checks the recipe's `parallel` sizes against the model. The device mesh
//! (`moeru_parallel::DeviceMesh`) checks them against the number of ranks.

use moeru_models::Qwen3Config;

use crate::recipe::schema::ParallelSection;

/// Divisibility of the model by the parallel sizes, with the numbers in the message.
pub fn validate_parallel_sizes(p: &ParallelSection, c: &Qwen3Config) -> Result<(), String> {
    let check = |ok: bool, msg: String| if ok { Ok(()) } else { Err(msg) };
    check(
        c.num_attention_heads.is_multiple_of(p.tp) && c.num_key_value_heads.is_multiple_of(p.tp),
        format!(
            "`parallel.tp` = {} must divide num_attention_heads ({}) and num_key_value_heads ({})",
            p.tp, c.num_attention_heads, c.num_key_value_heads
        ),
    )?;
    check(
        c.vocab_size.is_multiple_of(p.tp),
        format!(
            "`parallel.tp` = {} must divide vocab_size ({})",
            p.tp, c.vocab_size
        ),
    )?;
    let experts = c.moe.as_ref().map_or(1, |m| m.num_experts);
    check(
        experts.is_multiple_of(p.ep),
        format!(
            "`parallel.ep` = {} must divide the number of experts ({experts})",
            p.ep
        ),
    )?;
    check(
        !dense_mlp_layers(c) || c.intermediate_size.is_multiple_of(p.tp),
        format!(
            "`parallel.tp` = {} must divide intermediate_size ({}) of the dense MLP layers",
            p.tp, c.intermediate_size
        ),
    )?;
    check(
        p.tp == 1 || !moe_layers(c) || p.sequence_parallel,
        format!(
            "`parallel.tp` = {} on a MoE model needs `parallel.sequence_parallel: true` (each tensor-parallel rank routes its own rows)",
            p.tp
        ),
    )?;
    check(
        p.pp <= c.num_hidden_layers,
        format!(
            "`parallel.pp` = {} exceeds num_hidden_layers ({}); each stage needs a layer",
            p.pp, c.num_hidden_layers
        ),
    )
}

/// Whether any layer of `c` has a dense MLP (all of a dense model's; a MoE model's
/// `mlp_only_layers`, and those off the `decoder_sparse_step`).
fn dense_mlp_layers(c: &Qwen3Config) -> bool {
    (0..c.num_hidden_layers).any(|i| !c.is_moe_layer(i))
}

/// Whether any layer of `c` is a MoE layer.
fn moe_layers(c: &Qwen3Config) -> bool {
    (0..c.num_hidden_layers).any(|i| c.is_moe_layer(i))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(heads: usize, kv: usize, experts: usize) -> Qwen3Config {
        let json = serde_json::json!({
            "model_type": "qwen3_moe", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
            "moe_intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": heads,
            "num_key_value_heads": kv, "num_experts": experts, "num_experts_per_tok": 2
        });
        let serde_json::Value::Object(map) = json else {
            unreachable!()
        };
        Qwen3Config::from_map(map, std::path::Path::new("test")).unwrap()
    }

    fn sizes(dp: usize, tp: usize, ep: usize, pp: usize) -> ParallelSection {
        ParallelSection {
            dp,
            tp,
            ep,
            pp,
            ..ParallelSection::default()
        }
    }

    #[test]
    fn messages_carry_the_numbers() {
        let c = config(4, 2, 6);
        let e = validate_parallel_sizes(&sizes(1, 4, 1, 1), &c).unwrap_err();
        assert!(e.contains("`parallel.tp` = 4") && e.contains("(2)"), "{e}");
        let e = validate_parallel_sizes(&sizes(1, 1, 4, 1), &c).unwrap_err();
        assert!(e.contains("`parallel.ep` = 4") && e.contains("(6)"), "{e}");
        let e = validate_parallel_sizes(&sizes(1, 1, 1, 3), &c).unwrap_err();
        assert!(e.contains("`parallel.pp` = 3") && e.contains("(2)"), "{e}");
        let e = validate_parallel_sizes(&sizes(2, 2, 3, 1), &c).unwrap_err();
        assert!(e.contains("sequence_parallel"), "{e}");
        let mut sp = sizes(2, 2, 3, 1);
        sp.sequence_parallel = true;
        assert!(validate_parallel_sizes(&sp, &c).is_ok());
        assert!(validate_parallel_sizes(&sizes(1, 1, 1, 2), &c).is_ok());
        assert!(validate_parallel_sizes(&sizes(1, 1, 1, 1), &c).is_ok());
        assert!(validate_parallel_sizes(&sizes(4, 1, 1, 1), &c).is_ok());
    }
}
