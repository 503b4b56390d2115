//! The points where a sharded model meets its peers, as hooks the single-device code calls.
//! Every default is the identity, so a model built with [`Local`] is the one-rank model,
//! bit for bit; moeru-parallel implements the hooks with differentiable collectives.
//!
//! Owns: the list of boundaries and what each must compute. Must not: hold parameters, or
//! be called anywhere but on the residual chain (every rank must issue the same collectives
//! in the same order, forward and backward).

use std::fmt::Debug;
use std::ops::Range;

use burn::tensor::Tensor;

use crate::shard::ModelShard;

/// Rows are flattened tokens `[rows, hidden]`, b-major. Under sequence parallelism a rank's
/// residual stream holds `rows / tp` consecutive rows; otherwise every tensor-parallel rank
/// holds all rows.
pub trait Boundaries: Debug + Send + Sync {
    /// Where this rank sits in the layout.
    fn shard(&self) -> ModelShard {
        ModelShard::single()
    }

    /// The decoder layers this rank holds, as ascending ranges of global indices: every layer,
    /// or under pipeline parallelism its stages' (one range per model chunk).
    // One range of all the layers, not the layers' indices.
    #[allow(clippy::single_range_in_vec_init)]
    fn layers(&self, num_layers: usize) -> Vec<Range<usize>> {
        vec![0..num_layers]
    }

    /// Rows entering a column-parallel region (q/k/v, gate/up, the LM head): every rank
    /// needs all rows (gathered under sequence parallelism); backward sums the ranks'
    /// partial input gradients.
    fn column_in(&self, x: Tensor<2>) -> Tensor<2> {
        x
    }

    /// The partial sums leaving a row-parallel region (o_proj, down_proj, the
    /// vocabulary-parallel embedding), summed over the tensor-parallel ranks (and cut to this
    /// rank's rows under sequence parallelism). Any dtype; summed in f32.
    fn row_out(&self, x: Tensor<2>) -> Tensor<2> {
        x
    }

    /// Σ over the vocabulary shards, forward; backward the identity (each shard's gradient
    /// is its own part): the cross-entropy's Σ exp and picked logit.
    fn vocab_sum(&self, x: Tensor<1>) -> Tensor<1> {
        x
    }

    /// Elementwise max over the vocabulary shards, detached (the softmax's shift).
    fn vocab_max(&self, x: Tensor<1>) -> Tensor<1> {
        x
    }

    /// Sums per-rank router counts over the ranks that share this forward's tokens (the
    /// tensor-parallel group under sequence parallelism), so the load-balancing loss sees
    /// the whole micro-batch's counts. Not differentiable.
    fn sum_token_counts(&self, _counts: &mut [u64]) {}

    /// Expert parallelism: this rank's assignments per expert `[experts]` go out; returns,
    /// for every source rank of the expert-parallel group in order, its counts for this
    /// rank's experts (`[ep × local experts]`). Not differentiable.
    fn exchange_counts(&self, counts: &[u64]) -> Vec<u64> {
        counts.to_vec()
    }

    /// Expert parallelism: `send_rows[j]` rows of `x` go to rank j of the expert-parallel
    /// group; returns the `recv_rows[j]` rows from each rank j, in rank order. Backward is
    /// the reverse exchange.
    fn exchange_rows(&self, x: Tensor<2>, _send_rows: &[usize], _recv_rows: &[usize]) -> Tensor<2> {
        x
    }
}

/// The whole model on one rank: every boundary is the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct Local;

impl Boundaries for Local {}
