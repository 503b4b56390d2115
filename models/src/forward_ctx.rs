//! What a forward pass is run with, passed in rather than set on the model, so one model can
//! serve several forwards at once (micro-batches with their own dropout masks, a policy and
//! its frozen reference).

use std::sync::Arc;

use crate::lora::DropoutKey;
use crate::precision::Precision;
use crate::route_replay::RouteReplay;

/// Whether the LoRA adapters take part in a forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Adapters {
    /// Base plus adapter terms (a model without adapters computes its base either way).
    #[default]
    On,
    /// The adapter terms are skipped: the frozen base, e.g. the reference model of DPO/GRPO,
    /// without a second copy of the weights.
    Off,
}

/// The settings of one forward: the matmul dtype, the LoRA dropout mask and whether adapters
/// apply, the MoE capacity, and routes to replay.
#[derive(Debug, Clone, Default)]
pub struct ForwardCtx {
    /// The dtype matmuls run in; parameters stay f32 either way (see `precision.rs`).
    pub precision: Precision,
    /// Which LoRA dropout mask to draw: `Some` for a training forward (a new counter for
    /// every forward), `None` for evaluation (no dropout).
    pub dropout: Option<DropoutKey>,
    pub adapters: Adapters,
    /// MoE expert capacity as a multiple of an even share of the routed rows; assignments
    /// beyond it are dropped (`moe.rs`). `None`: dropless.
    pub capacity_factor: Option<f64>,
    /// MoE router replay: each token goes to these experts instead of its live top-k
    /// (`route_replay.rs`); `None`: live routing.
    pub routes: Option<Arc<RouteReplay>>,
}

impl ForwardCtx {
    /// A forward in `precision`, without dropout, adapters on.
    pub fn new(precision: Precision) -> Self {
        Self {
            precision,
            ..Self::default()
        }
    }

    pub fn with_dropout(self, key: Option<DropoutKey>) -> Self {
        Self {
            dropout: key,
            ..self
        }
    }

    pub fn with_capacity_factor(self, capacity_factor: Option<f64>) -> Self {
        Self {
            capacity_factor,
            ..self
        }
    }

    pub fn with_routes(self, routes: Option<Arc<RouteReplay>>) -> Self {
        Self { routes, ..self }
    }

    /// The same forward with the LoRA terms skipped: the frozen base model.
    pub fn without_adapters(self) -> Self {
        Self {
            adapters: Adapters::Off,
            ..self
        }
    }

    /// True when LoRA terms are to be added.
    pub fn adapters_on(&self) -> bool {
        self.adapters == Adapters::On
    }
}
