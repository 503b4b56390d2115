//! `moeru bench`: training throughput, model FLOP/s, MFU and peak memory of a named model
//! shape (bench/shapes.json, shared with bench/transformers_bench.py) on random tokens.

use crate::lora::attach;
use crate::pipeline::executor::PipelineRun;
use crate::pipeline::{schedule, PipelineLayout};
use crate::recipe::schema::{LoraSection, Recompute};
use std::time::Instant;

use burn::tensor::Device;
use moeru_models::init::RandomInit;
use moeru_models::{Precision, Qwen3Config, Qwen3Model};
use serde_json::{Map, Value};

use crate::engine::optim::AdamWConfig;
use crate::engine::sync::SyncKind;
use crate::engine::{one_rank, Engine, EngineConfig, MicroBatch, OptimizerStart};
use crate::error::TrainError;
use crate::lora::TrainableSizes;
use crate::objective::{AuxWeights, LmObjective};

pub const SHAPES_JSON: &str = include_str!("../../bench/shapes.json");

fn shapes() -> Map<String, Value> {
    let Ok(Value::Object(mut all)) = serde_json::from_str(SHAPES_JSON) else {
        unreachable!("bench/shapes.json is a JSON object (checked by a test)");
    };
    all.retain(|k, _| !k.starts_with('_'));
    all
}

pub fn shape_names() -> Vec<String> {
    shapes().keys().cloned().collect()
}

/// The config of shape `name`.
pub fn shape(name: &str) -> Result<Qwen3Config, String> {
    let all = shapes();
    let Some(Value::Object(map)) = all.get(name) else {
        return Err(format!(
            "--shape {name}: no such shape; bench/shapes.json has {}",
            shape_names().join(", ")
        ));
    };
    let origin = format!("bench/shapes.json `{name}`");
    Qwen3Config::from_map(map.clone(), origin.as_ref()).map_err(|e| e.to_string())
}

/// Matmul parameters one token passes through in a forward: attention and MLP projections,
/// for MoE layers the router and `top_k` experts, and the LM head (the embedding lookup does
/// no multiply).
pub fn active_matmul_params(c: &Qwen3Config) -> f64 {
    let h = c.hidden_size as f64;
    let (q, kv) = (
        (c.num_attention_heads * c.head_dim) as f64,
        (c.num_key_value_heads * c.head_dim) as f64,
    );
    let attention = h * q * 2.0 + h * kv * 2.0;
    let mut total = c.vocab_size as f64 * h;
    for layer in 0..c.num_hidden_layers {
        total += attention;
        total += match &c.moe {
            Some(m) if c.is_moe_layer(layer) => {
                let expert = 3.0 * h * m.moe_intermediate_size as f64;
                h * m.num_experts as f64 + m.num_experts_per_tok as f64 * expert
            }
            _ => 3.0 * h * c.intermediate_size as f64,
        };
    }
    total
}

/// Model FLOPs of one trained token at sequence length `seq`: 6 × the active matmul
/// parameters (forward 2, backward 4) plus 12 · layers · heads · head_dim · seq for the
/// attention scores and values. This is torchtitan's count: the causal mask is not discounted.
pub fn train_flops_per_token(c: &Qwen3Config, seq: usize) -> f64 {
    let attention =
        12.0 * (c.num_hidden_layers * c.num_attention_heads * c.head_dim) as f64 * seq as f64;
    6.0 * active_matmul_params(c) + attention
}

/// Dense peak TFLOP/s of a GPU (by the driver's name) for `precision`: bf16 tensor cores, or
/// TF32 for f32 matmuls. None for an unknown GPU (pass `--peak-tflops`).
pub fn peak_tflops(gpu_name: &str, precision: Precision) -> Option<f64> {
    let n = gpu_name.to_ascii_uppercase();
    let bf16 = if n.contains("H100") && n.contains("PCIE") {
        756.0
    } else if n.contains("H100") || n.contains("H200") || n.contains("H800") || n.contains("GH200")
    {
        989.4
    } else if n.contains("A100") || n.contains("A800") {
        312.0
    } else if n.contains("L40S") {
        362.0
    } else {
        return None;
    };
    Some(match precision {
        Precision::Bf16 => bf16,
        Precision::F32 => bf16 / 2.0,
    })
}

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub config: Qwen3Config,
    pub seq_len: usize,
    pub micro_batch_size: usize,
    /// Timed steps, after `warmup` untimed ones.
    pub steps: usize,
    pub warmup: usize,
    pub precision: Precision,
    pub seed: u64,
    /// What a forward keeps for its backward (`train.recompute`).
    pub recompute: Recompute,
    /// Fresh LoRA adapters of this rank on every default target (0: full training).
    pub lora_rank: usize,
}

#[derive(Debug, Clone)]
pub struct BenchReport {
    pub tokens_per_step: usize,
    /// Seconds of each timed step.
    pub step_seconds: Vec<f64>,
    pub tokens_per_s: f64,
    /// Model FLOPs per second (see `train_flops_per_token`), in TFLOP/s.
    pub model_tflops: f64,
    pub parameters: u64,
    /// Device memory the allocator reserved (GPU), or the process's peak resident set (CPU).
    pub peak_memory_bytes: Option<u64>,
    pub memory_source: &'static str,
    pub losses: Vec<f64>,
    /// MoE shapes: rows the expert matmuls computed per routed (token, expert) row over the
    /// timed steps.
    pub expert_rows_per_routed_row: Option<f64>,
}

/// Rows the expert matmuls computed per routed (token, expert) row: 1 is no padding (see
/// models/src/routing.rs). `None` without MoE layers.
pub fn expert_rows_per_routed_row(computed: u64, routed: u64) -> Option<f64> {
    (routed > 0).then(|| computed as f64 / routed as f64)
}

/// Peak resident set of this process (Linux), in bytes.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Trains `steps + warmup` AdamW steps on random tokens on `device` (an autodiff device).
pub fn run_bench(opts: &BenchOptions, device: &Device) -> Result<BenchReport, TrainError> {
    let c = &opts.config;
    let mut init = RandomInit {
        seed: opts.seed,
        std: c.initializer_range,
    };
    let mut model =
        Qwen3Model::new(c.clone(), &mut init, device).unwrap_or_else(|never| match never {});
    if opts.lora_rank > 0 {
        let section: LoraSection = serde_json::from_value(serde_json::json!({
            "rank": opts.lora_rank, "alpha": 2 * opts.lora_rank,
        }))
        .expect("a LoRA section of defaults");
        attach(&section, &mut model, opts.seed)?;
    }
    let parameters = TrainableSizes::of(&mut model, None).total;
    let config = EngineConfig {
        adamw: AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        },
        clip: 1.0,
        precision: opts.precision,
        bucket_elems: 1 << 20,
        sync: SyncKind::Local,
        capacity_factor: None,
    };
    let world = one_rank();
    let mut engine = Engine::new(model, config, &world, OptimizerStart::default());
    if opts.recompute != Recompute::None {
        // The whole model as one stage: the stage executor runs the recompute.
        let layout = PipelineLayout::single(1, c.num_hidden_layers);
        let mut plans = schedule::plan(&layout.shape).map_err(TrainError::Bug)?;
        engine = engine.with_pipeline(PipelineRun {
            group: &world,
            shape: layout.shape,
            stages: layout.stages,
            plan: plans.remove(0),
            tied: None,
            recompute: opts.recompute,
        });
    }
    let objective = LmObjective {
        weights: AuxWeights {
            load_balancing: c.moe.as_ref().map_or(0.0, |m| m.router_aux_loss_coef),
            z_loss: 0.0,
        },
    };
    let (b, s) = (opts.micro_batch_size, opts.seq_len);
    let mut state = opts.seed ^ 0x9E37_79B9_7F4A_7C15;
    let mut next_batch = || {
        let ids: Vec<i64> = (0..b * s)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 33) % c.vocab_size as u64) as i64
            })
            .collect();
        MicroBatch::from_ids(&ids, b, s, device)
    };
    let (mut step_seconds, mut losses, mut peak) = (Vec::new(), Vec::new(), None::<u64>);
    let (mut expert_rows, mut routed_rows) = (0u64, 0u64);
    for step in 0..opts.warmup + opts.steps {
        let micro = [next_batch()];
        let _ = device.sync();
        let began = Instant::now();
        let r = engine.step(&objective, &micro, 1e-4)?;
        let _ = device.sync();
        let secs = began.elapsed().as_secs_f64();
        losses.push(r.loss);
        if let Some(u) = device.memory_pool_usage() {
            peak = Some(peak.unwrap_or(0).max(u.bytes_reserved));
        }
        if step >= opts.warmup {
            step_seconds.push(secs);
            expert_rows += r.expert_rows_computed;
            routed_rows += r.expert_counts.iter().flat_map(|(_, c)| c).sum::<u64>();
        }
    }
    let (peak_memory_bytes, memory_source) = match peak {
        Some(p) => (Some(p), "device memory reserved by burn's allocator"),
        None => (peak_rss_bytes(), "peak resident set of the process"),
    };
    let total: f64 = step_seconds.iter().sum();
    let tokens_per_s = (b * s * step_seconds.len()) as f64 / total.max(1e-12);
    Ok(BenchReport {
        tokens_per_step: b * s,
        tokens_per_s,
        model_tflops: tokens_per_s * train_flops_per_token(c, s) / 1e12,
        step_seconds,
        parameters,
        peak_memory_bytes,
        memory_source,
        losses,
        expert_rows_per_routed_row: expert_rows_per_routed_row(expert_rows, routed_rows),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use moeru_models::params::{ParamVisitor, Params};

    /// Counts the parameters of the built model that a token's matmuls touch.
    struct Matmuls {
        total: f64,
        experts_per_token: f64,
        experts: f64,
    }

    impl ParamVisitor for Matmuls {
        fn visit<const D: usize>(&mut self, name: &str, p: &mut burn::tensor::Tensor<D>) {
            let n = p.dims().iter().product::<usize>() as f64;
            if name.contains(".experts.") {
                self.total += n * self.experts_per_token / self.experts;
            } else if D == 2 && name != "model.embed_tokens.weight" {
                self.total += n;
            }
        }
    }

    #[test]
    fn flops_count_the_built_models_matmul_weights() {
        for name in shape_names() {
            let c = shape(&name).unwrap();
            let small = Qwen3Config {
                vocab_size: 64,
                num_hidden_layers: c.num_hidden_layers.min(3),
                ..c.clone()
            };
            let device = Device::flex();
            let mut init = RandomInit { seed: 0, std: 0.02 };
            if small.hidden_size > 256 {
                // The big shapes: the formula's pieces from the config alone (no allocation).
                assert!(active_matmul_params(&c) > 1e7, "{name}");
                continue;
            }
            let mut model = Qwen3Model::new(small.clone(), &mut init, &device).unwrap();
            let (k, e) = small.moe.as_ref().map_or((1.0, 1.0), |m| {
                (m.num_experts_per_tok as f64, m.num_experts as f64)
            });
            let mut count = Matmuls {
                total: 0.0,
                experts_per_token: k,
                experts: e,
            };
            model.visit_params(&mut count);
            let mut expected = count.total;
            if small.tie_word_embeddings {
                expected += (small.vocab_size * small.hidden_size) as f64;
            }
            assert_eq!(active_matmul_params(&small), expected, "{name}");
        }
    }

    #[test]
    fn qwen3_0_6b_flops_per_token() {
        // 28 layers × (attention 2·1024·2048 + 2·1024·1024 + MLP 3·1024·3072) + head 151936·1024,
        // times 6, plus 12 · 28 · 16 · 128 · 4096 for attention.
        let c = shape("qwen3-0.6b").unwrap();
        let params = 28.0 * (2.0 * 1024.0 * 2048.0 + 2.0 * 1024.0 * 1024.0 + 3.0 * 1024.0 * 3072.0)
            + 151936.0 * 1024.0;
        let attention = 12.0 * 28.0 * 16.0 * 128.0 * 4096.0;
        assert_eq!(train_flops_per_token(&c, 4096), 6.0 * params + attention);
    }

    #[test]
    fn peaks_by_name() {
        assert_eq!(
            peak_tflops("NVIDIA H100 80GB HBM3", Precision::Bf16),
            Some(989.4)
        );
        assert_eq!(
            peak_tflops("NVIDIA H100 PCIe", Precision::Bf16),
            Some(756.0)
        );
        assert_eq!(peak_tflops("NVIDIA H200", Precision::F32), Some(494.7));
        assert_eq!(peak_tflops("Some CPU", Precision::Bf16), None);
    }
}
