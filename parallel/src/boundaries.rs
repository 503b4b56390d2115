//! The model's parallel boundaries (`moeru_models::Boundaries`) as differentiable collectives
//! over this rank's tensor- and expert-parallel groups: Megatron's column/row regions with
//! optional sequence parallelism, the vocabulary-parallel softmax, and the all-to-all expert
//! dispatch.
//!
//! Owns: which collective each boundary is under which layout. Must not: decide placements
//! (`moeru_models::shard`) or sync gradients (the trainer's engine).

use std::ops::Range;

use burn::tensor::Tensor;
use moeru_models::{Boundaries, ModelShard};

use crate::comm::ReduceOp;
use crate::tensor_ops::{
    all_reduce_max, all_to_all_rows, sp_gather, sp_reduce_scatter, tp_copy, tp_reduce, CommHandle,
};

/// The boundaries of one rank: `tp` and `ep` are its tensor- and expert-parallel groups.
#[derive(Debug, Clone)]
pub struct ShardBoundaries {
    shard: ModelShard,
    tp: CommHandle,
    ep: CommHandle,
    /// Under pipeline parallelism, the layer ranges of this rank's stages.
    layers: Option<Vec<Range<usize>>>,
}

impl ShardBoundaries {
    /// `shard` must agree with the groups: `tp` of size `shard.tp` with this rank at
    /// `shard.tp_rank`, and likewise `ep`.
    pub fn new(shard: ModelShard, tp: CommHandle, ep: CommHandle) -> Self {
        debug_assert_eq!((tp.size(), tp.rank()), (shard.tp, shard.tp_rank));
        debug_assert_eq!((ep.size(), ep.rank()), (shard.ep, shard.ep_rank));
        Self {
            shard,
            tp,
            ep,
            layers: None,
        }
    }

    /// The same boundaries on a rank holding only the decoder layers `ranges` (its
    /// pipeline stages').
    pub fn with_layers(mut self, ranges: Vec<Range<usize>>) -> Self {
        self.layers = Some(ranges);
        self
    }

    /// The first error a collective hit since the last call, on either group (the hooks
    /// cannot return one: they run inside burn's forward and backward).
    pub fn take_error(&self) -> crate::Result<()> {
        self.tp.take_error()?;
        self.ep.take_error()
    }

    fn tensor_parallel(&self) -> bool {
        self.shard.tp > 1
    }
}

impl Boundaries for ShardBoundaries {
    fn shard(&self) -> ModelShard {
        self.shard
    }

    // One range of all the layers, not the layers' indices.
    #[allow(clippy::single_range_in_vec_init)]
    fn layers(&self, num_layers: usize) -> Vec<Range<usize>> {
        (self.layers.clone()).unwrap_or_else(|| vec![0..num_layers])
    }

    fn column_in(&self, x: Tensor<2>) -> Tensor<2> {
        match (self.tensor_parallel(), self.shard.sequence_parallel()) {
            (false, _) => x,
            (true, true) => sp_gather(x, &self.tp),
            (true, false) => tp_copy(x, &self.tp),
        }
    }

    fn row_out(&self, x: Tensor<2>) -> Tensor<2> {
        match (self.tensor_parallel(), self.shard.sequence_parallel()) {
            (false, _) => x,
            (true, true) => sp_reduce_scatter(x, &self.tp),
            (true, false) => tp_reduce(x, &self.tp),
        }
    }

    fn vocab_sum(&self, x: Tensor<1>) -> Tensor<1> {
        match self.tensor_parallel() {
            true => tp_reduce(x, &self.tp),
            false => x,
        }
    }

    fn vocab_max(&self, x: Tensor<1>) -> Tensor<1> {
        match self.tensor_parallel() {
            true => all_reduce_max(x, &self.tp),
            false => x,
        }
    }

    fn sum_token_counts(&self, counts: &mut [u64]) {
        if !self.shard.sequence_parallel() {
            return;
        }
        let mut wide: Vec<i64> = counts.iter().map(|&c| c as i64).collect();
        if self.tp.failed() {
            return;
        }
        let summed = self.tp.group().all_reduce(&mut wide, ReduceOp::Sum);
        if self.tp.record(summed).is_some() {
            for (c, w) in counts.iter_mut().zip(wide) {
                *c = w as u64;
            }
        }
    }

    fn exchange_counts(&self, counts: &[u64]) -> Vec<u64> {
        let ep = self.shard.ep;
        let local = counts.len() / ep;
        let send: Vec<i64> = counts.iter().map(|&c| c as i64).collect();
        let sizes = vec![local; ep];
        if self.ep.failed() {
            return vec![0; local * ep];
        }
        let got = self.ep.group().all_to_all(&send, &sizes, &sizes);
        match self.ep.record(got) {
            Some(v) => v.into_iter().map(|c| c as u64).collect(),
            None => vec![0; local * ep],
        }
    }

    fn exchange_rows(&self, x: Tensor<2>, send_rows: &[usize], recv_rows: &[usize]) -> Tensor<2> {
        all_to_all_rows(x, send_rows, recv_rows, &self.ep)
    }
}
