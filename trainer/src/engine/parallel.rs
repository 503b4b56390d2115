//! The model-parallel side of an engine: this rank's shard and the groups its gradients and
//! reported values complete over.
//!
//! Owns: which group completes which gradient or value, and which pieces this rank counts in
//! the global norm. Must not: decide placements (`moeru_models::shard` does) or do optimizer
//! math.

use burn::tensor::{Device, Tensor};
use moeru_models::params::{to_f32_vec, ParamVisitor, Params};
use moeru_models::{ModelShard, Placement};
use moeru_parallel::boundaries::ShardBoundaries;
use moeru_parallel::zero::cat;
use moeru_parallel::{all_reduce_flat, CommError, ProcessGroup, ReduceOp};

use super::grads::GradBuffer;
use super::optim::Piece;
use super::sync::{GradSync, SyncKind};
use crate::pipeline::executor::TIED;

/// A rank of a tensor- and/or expert-parallel layout.
pub struct ModelParallel<'g> {
    pub shard: ModelShard,
    /// The model's boundaries: their collectives' first error is checked after each pass.
    pub boundaries: ShardBoundaries,
    pub tp: &'g ProcessGroup,
    pub ep: &'g ProcessGroup,
    /// The ranks holding the same experts: their expert gradients are summed.
    pub edp: &'g ProcessGroup,
    /// Every rank: the global norm's squares and the checkpoint's gathers end here.
    pub world: &'g ProcessGroup,
    /// This rank's tied embedding is the last pipeline stage's copy (its LM head): the first
    /// stage's counts in the norm and is written into checkpoints.
    pub head_copy: bool,
}

impl ModelParallel<'_> {
    /// The sync of the expert parameters: over the expert-data-parallel group, ZeRO-1 when
    /// the dense sync is; none when that group is this rank alone (ep = dp × tp), where a
    /// ZeRO-1 shard would be the whole and its collectives mere copies.
    pub fn expert_sync_kind(&self, dense: SyncKind) -> SyncKind {
        match (dense, self.edp.size() > 1) {
            (_, false) => SyncKind::Local,
            (SyncKind::Zero1, true) => SyncKind::Zero1,
            (_, true) => SyncKind::AllReduce,
        }
    }

    /// Sums over the tensor-parallel group the gradients each of its ranks computed only part
    /// of (see `ParamPlan::tp_partial`), in one flat all-reduce.
    pub fn complete_partial(
        &self,
        grads: &mut GradBuffer,
        device: &Device,
    ) -> Result<(), CommError> {
        let names: Vec<String> = (grads.grads.keys())
            .filter(|n| self.shard.plan(n).tp_partial)
            .cloned()
            .collect();
        if names.is_empty() {
            return Ok(());
        }
        let parts = names.iter().map(|n| grads.grads[n].clone()).collect();
        let flat = all_reduce_flat(cat(parts, device), self.tp, ReduceOp::Sum)?;
        let mut at = 0;
        for n in names {
            let len = grads.grads[&n].dims()[0];
            grads.grads.insert(n, flat.clone().slice(at..at + len));
            at += len;
        }
        Ok(())
    }

    /// Which of `pieces` (those of `syncs`, in order; `counts[u]` of sync `u`) this rank
    /// counts in the global norm: each element once over the world. A piece counts where its
    /// sync's group holds it once (ZeRO-1) or on that group's rank 0; a dense parameter
    /// replicated over tp only on tp rank 0.
    pub fn counted(&self, syncs: &[GradSync], counts: &[usize], pieces: &[Piece]) -> Vec<bool> {
        let mut out = Vec::with_capacity(pieces.len());
        let mut it = pieces.iter();
        for (sync, &n) in syncs.iter().zip(counts) {
            let once = sync.kind() == SyncKind::Zero1 || sync.group().rank() == 0;
            for p in it.by_ref().take(n) {
                let plan = self.shard.plan(&p.name);
                let split = matches!(plan.placement, Placement::Split(_));
                let copy = self.is_head_copy(&p.name);
                out.push(once && !copy && (plan.expert || split || self.tp.rank() == 0));
            }
        }
        out
    }

    /// Whether `name` is the last stage's copy of the tied embedding.
    pub fn is_head_copy(&self, name: &str) -> bool {
        self.head_copy && name == TIED
    }

    /// Completes the reported values (`StepReport::summable`, already summed over dp): under
    /// sequence parallelism each tensor-parallel rank routed its own rows, so the router
    /// losses (1, 2) and the expert counts (4..) add up over tp; the LM loss and tokens are
    /// every tp rank's alike.
    pub fn sum_token_shares(&self, summed: &mut [f64]) -> Result<(), CommError> {
        if !self.shard.sequence_parallel() {
            return Ok(());
        }
        let mut shares: Vec<f64> = [summed[1], summed[2]]
            .into_iter()
            .chain(summed[4..].iter().copied())
            .collect();
        self.tp.all_reduce(&mut shares, ReduceOp::Sum)?;
        summed[1] = shares[0];
        summed[2] = shares[1];
        summed[4..].copy_from_slice(&shares[2..]);
        Ok(())
    }
}

/// (name, local shape, values) of every parameter of `model`, in visiting order.
pub fn local_params<M: Params>(model: &mut M) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    struct Collect(Vec<(String, Vec<usize>, Vec<f32>)>);
    impl ParamVisitor for Collect {
        fn visit<const D: usize>(&mut self, name: &str, param: &mut Tensor<D>) {
            let values = to_f32_vec(param.clone().inner());
            self.0
                .push((name.to_string(), param.dims().to_vec(), values));
        }
    }
    let mut c = Collect(Vec::new());
    model.visit_params(&mut c);
    c.0
}
