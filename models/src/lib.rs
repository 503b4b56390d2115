//! Qwen3 and Qwen3-MoE, written as single-device code on burn.
//!
//! Numerics follow transformers 5.x exactly (see docs/ARCHITECTURE.md): rotate-half RoPE with
//! explicit position ids, QK-norm, grouped-query attention, f32 router softmax, and the
//! transformers load-balancing loss. Nothing here communicates: a sharded model calls the
//! hooks of `boundaries.rs`, which moeru-parallel implements, and `shard.rs` says which part of
//! each parameter a rank holds.

pub mod adamw_op;
pub mod attention;
pub mod attention_core;
mod backward;
pub mod batch;
pub mod boundaries;
pub mod config;
pub mod decoder;
pub mod device;
pub mod experts;
mod flex_buffers;
pub mod forward_ctx;
#[cfg(test)]
mod forward_tests;
pub mod fused;
pub mod generate;
#[cfg(test)]
mod generate_tests;
pub mod grouped_mm;
mod grouped_mm_cpu;
pub mod init;
pub mod kv_cache;
pub mod layers;
pub mod linear;
pub mod lora;
mod lora_model;
pub mod loss;
pub mod model;
pub mod moe;
pub mod params;
pub mod precision;
pub mod rope;
pub mod route_replay;
pub mod routing;
pub mod sampling;
pub mod shard;
pub mod stage;
#[cfg(test)]
mod test_values;

pub use batch::Batch;
pub use boundaries::{Boundaries, Local};
pub use config::{ConfigError, MoeConfig, Qwen3Config};
pub use device::{DeviceSpec, GpuInfo};
pub use experts::Experts;
pub use forward_ctx::{Adapters, ForwardCtx};
pub use linear::Linear;
pub use lora::{DropoutKey, LoraAdapter, LoraConfig, LoraError, LoraSite};
pub use lora_model::{AllParams, Trainable};
pub use model::{ForwardOutput, Qwen3Model};
pub use params::{ParamSource, ParamVisitor, Params};
pub use precision::Precision;
pub use route_replay::{ReplayStats, RouteReplay};
pub use shard::{ModelShard, ParamPlan, Placement, ShardedSource, Split};
pub use stage::LayerInputs;
