use std::path::PathBuf;

use anyhow::{anyhow, bail, Context};
use moeru_trainer::bench::{peak_tflops, run_bench, shape, train_flops_per_token, BenchOptions};
use moeru_trainer::recipe::schema::Recompute;

use crate::compute::ComputeArgs;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// A model shape from bench/shapes.json (tiny-moe, mid-moe, mid-dense, qwen3-0.6b, qwen3-1.7b, qwen3-moe-12l, qwen3-moe-16l, qwen3-moe-layer).
    #[arg(long)]
    shape: String,
    #[arg(long, default_value_t = 4096)]
    seq_len: usize,
    #[arg(long, default_value_t = 1)]
    micro_batch_size: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Untimed steps first (kernel compilation, allocator warm-up).
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// The device's dense peak in TFLOP/s for MFU (default: known GPUs by name).
    #[arg(long)]
    peak_tflops: Option<f64>,
    /// Also write the figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Decoder layers, instead of the shape's.
    #[arg(long)]
    layers: Option<usize>,
    /// What a forward keeps for its backward: none, experts or layers (`train.recompute`).
    #[arg(long, default_value = "none")]
    recompute: String,
    /// Train fresh LoRA adapters of this rank on the default targets instead of every weight.
    #[arg(long, default_value_t = 0)]
    lora_rank: usize,
    #[command(flatten)]
    compute: ComputeArgs,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.steps == 0 || args.seq_len < 2 || args.micro_batch_size == 0 {
        bail!("bench: --steps, --micro-batch-size must be at least 1 and --seq-len at least 2");
    }
    let mut config = shape(&args.shape).map_err(|e| anyhow!(e))?;
    if let Some(n) = args.layers {
        if n == 0 {
            bail!("bench: --layers must be at least 1");
        }
        config.num_hidden_layers = n;
    }
    let recompute = match args.recompute.as_str() {
        "none" => Recompute::None,
        "experts" => Recompute::Experts,
        "layers" => Recompute::Layers,
        other => bail!("bench: --recompute {other:?}: use none, experts or layers"),
    };
    let spec = args.compute.spec()?;
    let gpu = spec.gpu_info(0).map_err(|e| anyhow!(e))?;
    let device = args.compute.open()?.autodiff();
    let device_name = gpu
        .as_ref()
        .map_or_else(|| "CPU (flex)".to_string(), |g| g.name.clone());
    let opts = BenchOptions {
        config: config.clone(),
        seq_len: args.seq_len,
        micro_batch_size: args.micro_batch_size,
        steps: args.steps,
        warmup: args.warmup,
        precision: args.compute.precision,
        seed: 0,
        recompute,
        lora_rank: args.lora_rank,
    };
    let r = run_bench(&opts, &device)?;
    let peak = args
        .peak_tflops
        .or_else(|| peak_tflops(&device_name, opts.precision));
    let mfu = peak.map(|p| r.model_tflops / p);
    let mean_step = r.step_seconds.iter().sum::<f64>() / r.step_seconds.len() as f64;
    println!(
        "bench {} on {device_name}: {} parameters, seq {} x batch {}, {}",
        args.shape,
        r.parameters,
        args.seq_len,
        args.micro_batch_size,
        opts.precision.name()
    );
    println!(
        "  {:.1} tokens/s ({:.3} s/step over {} steps), {:.3} model TFLOP/s ({:.3e} FLOPs/token)",
        r.tokens_per_s,
        mean_step,
        r.step_seconds.len(),
        r.model_tflops,
        train_flops_per_token(&config, args.seq_len)
    );
    match (mfu, peak) {
        (Some(m), Some(p)) => println!("  MFU {:.1}% of {p} TFLOP/s", 100.0 * m),
        _ => println!("  MFU: unknown peak for this device (pass --peak-tflops)"),
    }
    if let Some(bytes) = r.peak_memory_bytes {
        println!(
            "  peak memory {:.2} GiB ({})",
            bytes as f64 / (1u64 << 30) as f64,
            r.memory_source
        );
    }
    if let Some(x) = r.expert_rows_per_routed_row {
        println!(
            "  MoE: the expert matmuls ran {x:.3}x the routed rows (above 1: experts with a few rows, computed over grouped_mm's floor)"
        );
    }
    if let Some(path) = &args.json {
        let json = serde_json::json!({
            "impl": "moeru",
            "shape": args.shape,
            "device": device_name,
            "precision": opts.precision.name(),
            "seq_len": args.seq_len,
            "micro_batch_size": args.micro_batch_size,
            "steps": r.step_seconds.len(),
            "parameters": r.parameters,
            "tokens_per_s": r.tokens_per_s,
            "model_tflops": r.model_tflops,
            "flops_per_token": train_flops_per_token(&config, args.seq_len),
            "peak_tflops": peak,
            "mfu": mfu,
            "peak_memory_bytes": r.peak_memory_bytes,
            "memory_source": r.memory_source,
            "step_seconds": r.step_seconds,
            "losses": r.losses,
            "expert_rows_per_routed_row": r.expert_rows_per_routed_row,
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
