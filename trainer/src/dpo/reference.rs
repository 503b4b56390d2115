//! The reference a DPO policy is scored against, and its log-probs of a pair.
//!
//! A pair's reference log-probs come from a forward of that pair alone (its two rows padded to
//! the longer), never of the micro-batch it trains in: so they are a function of the pair and
//! the reference only, the same live or precomputed, at any batch size, order or DP layout.

use burn::tensor::Device;
use moeru_data::pairs::PreferencePair;
use moeru_models::params::to_f32_vec;
use moeru_models::{ForwardCtx, Qwen3Model};

use super::batch::pair_micro_batch;
use super::objective::sequence_logps;
use super::precomputed::PrecomputedLogps;
use crate::engine::MicroBatch;

/// Where the reference log-probs come from.
pub enum Reference {
    /// Reference-free (`dpo.reference: none`): log-probs of 0.
    Free,
    /// The policy with its adapters off: the base, which fresh adapters (B = 0) start from.
    AdaptersOff,
    /// A frozen model: the starting weights or adapters, or `dpo.reference`'s folder.
    Frozen(Box<Qwen3Model>),
    /// Computed once per pair before training (`dpo.precompute_reference`).
    Stored(PrecomputedLogps),
}

impl Reference {
    /// A short description for logs and the precomputed file's record.
    pub fn describe(&self) -> &'static str {
        match self {
            Reference::Free => "none",
            Reference::AdaptersOff => "the base model (adapters off)",
            Reference::Frozen(_) => "a frozen model",
            Reference::Stored(_) => "precomputed log-probs",
        }
    }

    /// Sets the reference log-probs of `mb`, built from `pairs`, with `policy` the model
    /// being trained and `ctx` the training forward's settings (its dropout is not used).
    pub fn score(
        &self,
        policy: &Qwen3Model,
        pairs: &[PreferencePair],
        mb: &mut MicroBatch,
        ctx: &ForwardCtx,
    ) {
        let values = match self {
            Reference::Free => None,
            Reference::Stored(s) => Some(s.rows(pairs)),
            live => {
                let each: Vec<[f64; 2]> = pairs
                    .iter()
                    .map(|p| live.pair_logps(policy, p, ctx))
                    .collect();
                Some(rows_of(&each))
            }
        };
        if let Some(rows) = mb.pairs.as_mut() {
            rows.reference = values;
        }
    }

    /// `[chosen, rejected]` log-probs of `pair` under a live reference (0 when free).
    pub fn pair_logps(
        &self,
        policy: &Qwen3Model,
        pair: &PreferencePair,
        ctx: &ForwardCtx,
    ) -> [f64; 2] {
        let ctx = ForwardCtx {
            dropout: None,
            ..ctx.clone()
        };
        let (model, ctx) = match self {
            Reference::Free => return [0.0; 2],
            Reference::Stored(s) => return s.pair(pair.id),
            Reference::AdaptersOff => (policy, ctx.without_adapters()),
            Reference::Frozen(m) => (m.as_ref(), ctx),
        };
        pair_logps(model, pair, &ctx)
    }
}

/// `[chosen, rejected]` completion log-probs of `pair` alone under `model` and `ctx`.
pub fn pair_logps(model: &Qwen3Model, pair: &PreferencePair, ctx: &ForwardCtx) -> [f64; 2] {
    let device: Device = model.device();
    let mb = pair_micro_batch(std::slice::from_ref(pair), &device);
    let (logps, _) = sequence_logps(model, &mb, ctx);
    let v = to_f32_vec(logps.detach());
    [v[0] as f64, v[1] as f64]
}

/// Per-pair `[chosen, rejected]` as rows: every chosen value, then every rejected one.
pub fn rows_of(each: &[[f64; 2]]) -> Vec<f64> {
    each.iter()
        .map(|p| p[0])
        .chain(each.iter().map(|p| p[1]))
        .collect()
}
