//! `--device` and `--precision` for the commands that run a model outside a recipe.

use anyhow::anyhow;
use burn::tensor::Device;
use moeru_models::{DeviceSpec, Precision};

#[derive(clap::Args, Debug, Clone)]
pub struct ComputeArgs {
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Matmul precision: `f32`, or `bf16` (bf16 matmuls, f32 parameters, norms, router, loss).
    #[arg(long, default_value = "f32", value_parser = parse_precision)]
    pub precision: Precision,
}

fn parse_precision(s: &str) -> Result<Precision, String> {
    match s {
        "f32" => Ok(Precision::F32),
        "bf16" => Ok(Precision::Bf16),
        _ => Err(format!("`{s}`: use `f32` or `bf16`")),
    }
}

impl ComputeArgs {
    pub fn spec(&self) -> anyhow::Result<DeviceSpec> {
        self.device
            .parse()
            .map_err(|e: String| anyhow!("--device: {e}"))
    }

    /// The device to compute on (a CUDA device is probed first).
    pub fn open(&self) -> anyhow::Result<Device> {
        self.spec()?.open(0).map_err(|e| anyhow!(e))
    }
}
