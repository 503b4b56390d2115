//! How the gradients of a step become the global batch's and how updated parameters reach
//! every replica: one interface over the strategies (none, DP all-reduce, ZeRO-1), whose group
//! and parameter subset are values, so that under expert parallelism one sync serves the
//! dense parameters over DP and another the experts over the expert-data-parallel group.
//!
//! Owns: the flat layout and which pieces this rank updates. Must not: do optimizer math
//! (`optim.rs`) or clipping (`grads.rs`); reduce anything but gradients and parameters.

use burn::tensor::{Device, Tensor};
use moeru_models::params::{param_shapes, ParamVisitor, Params};
use moeru_models::shard::is_expert_param;
use moeru_parallel::zero::cat;
use moeru_parallel::{CommError, FlatLayout, GradSync as BucketedSync, ProcessGroup, Segment};

use super::grads::GradBuffer;
use super::optim::{Piece, ShardPlacement};

/// Which strategy a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncKind {
    /// One replica: the local gradients are the global batch's.
    Local,
    /// Bucketed all-reduce of the gradients; every rank updates every parameter.
    AllReduce,
    /// ZeRO-1: reduce-scatter, each rank updates the flat elements it owns, all-gather.
    Zero1,
}

/// Which parameters a sync owns: all, or under expert parallelism the dense ones (synced over
/// dp) or the experts (over the expert-data-parallel group).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subset {
    All,
    Dense,
    Experts,
}

impl Subset {
    pub fn holds(self, name: &str) -> bool {
        match self {
            Subset::All => true,
            Subset::Dense => !is_expert_param(name),
            Subset::Experts => is_expert_param(name),
        }
    }
}

pub struct GradSync<'g> {
    kind: SyncKind,
    subset: Subset,
    group: &'g ProcessGroup,
    layout: FlatLayout,
    /// ZeRO-1: the flat pieces this rank owns.
    segments: Vec<Segment>,
}

/// Under ZeRO-1, every parameter in one flat tensor: the values the step starts from.
pub struct FlatParams(Option<Tensor<1>>);

impl<'g> GradSync<'g> {
    /// The strategy `kind` over `group` for the parameters of `model` (its trainable view)
    /// that `subset` holds, flat in `bucket_elems` buckets.
    pub fn new<M: Params>(
        kind: SyncKind,
        subset: Subset,
        group: &'g ProcessGroup,
        model: &mut M,
        bucket_elems: usize,
    ) -> Self {
        let params = param_shapes(model)
            .into_iter()
            .filter(|(name, _)| subset.holds(name))
            .map(|(name, shape)| (name, shape.iter().product()))
            .collect();
        let layout = FlatLayout::new(params, group.size(), bucket_elems);
        let segments = match kind {
            SyncKind::Zero1 => layout.segments(&layout.shard(group.rank())),
            _ => Vec::new(),
        };
        Self {
            kind,
            subset,
            group,
            layout,
            segments,
        }
    }

    pub fn kind(&self) -> SyncKind {
        self.kind
    }

    pub fn group(&self) -> &'g ProcessGroup {
        self.group
    }

    /// The pieces this rank updates and, under ZeRO-1, where they sit in the flat layout.
    pub fn pieces(&self) -> (Vec<Piece>, Option<ShardPlacement>) {
        let slots = &self.layout.params;
        if self.kind != SyncKind::Zero1 {
            let whole = slots.iter().map(|s| Piece::whole(&s.name, s.len)).collect();
            return (whole, None);
        }
        let pieces = self
            .segments
            .iter()
            .map(|s| Piece {
                name: slots[s.param].name.clone(),
                offset: s.param_offset,
                len: s.len,
                param_len: slots[s.param].len,
            })
            .collect();
        let placement = ShardPlacement {
            rank: self.group.rank(),
            size: self.group.size(),
            ranges: self.layout.shard(self.group.rank()),
            params: slots.iter().map(|s| (s.name.clone(), s.len)).collect(),
        };
        (pieces, Some(placement))
    }

    /// The group whose ranks hold disjoint pieces (their squared norms add up), if any.
    pub fn shard_group(&self) -> Option<&ProcessGroup> {
        (self.kind == SyncKind::Zero1).then_some(self.group)
    }

    /// The gradient of each piece, summed over the group, taken out of `grads`. A parameter
    /// without an accumulated gradient counts as zeros.
    pub fn reduce(
        &self,
        grads: &mut GradBuffer,
        device: &Device,
    ) -> Result<Vec<Tensor<1>>, CommError> {
        let slots = &self.layout.params;
        if self.kind == SyncKind::Local {
            let mut out = Vec::with_capacity(slots.len());
            for s in slots {
                let g = grads.grads.remove(&s.name);
                out.push(g.unwrap_or_else(|| Tensor::zeros([s.len], device)));
            }
            return Ok(out);
        }
        // One flat tensor on the gradients' device: under NCCL the buckets never leave it.
        let parts = slots
            .iter()
            .map(|slot| match grads.grads.remove(&slot.name) {
                Some(g) => g,
                None => Tensor::zeros([slot.len], device),
            });
        let flat = cat(parts.collect(), device);
        let sync = self.bucketed();
        if self.kind == SyncKind::AllReduce {
            let summed = sync.all_reduce(flat)?;
            let part = |s: &moeru_parallel::zero::ParamSlot| {
                summed.clone().slice(s.offset..s.offset + s.len)
            };
            return Ok(slots.iter().map(part).collect());
        }
        let shard = sync.reduce_scatter(flat)?;
        let mut at = 0;
        let mut out = Vec::with_capacity(self.segments.len());
        for s in &self.segments {
            out.push(shard.clone().slice(at..at + s.len));
            at += s.len;
        }
        Ok(out)
    }

    /// The current values of this rank's pieces (and what `publish` needs back).
    pub fn current<M: Params>(
        &self,
        model: &mut M,
        device: &Device,
    ) -> (Vec<Tensor<1>>, FlatParams) {
        if self.kind != SyncKind::Zero1 {
            struct Collect(Subset, Vec<Tensor<1>>);
            impl ParamVisitor for Collect {
                fn visit<const D: usize>(&mut self, name: &str, param: &mut Tensor<D>) {
                    if self.0.holds(name) {
                        let n = param.shape().num_elements();
                        self.1.push(param.clone().inner().reshape([n]));
                    }
                }
            }
            let mut c = Collect(self.subset, Vec::with_capacity(self.layout.params.len()));
            model.visit_params(&mut c);
            return (c.1, FlatParams(None));
        }
        let flat = flat_params(model, self.subset, device);
        let pieces = self
            .segments
            .iter()
            .map(|s| flat.clone().slice(s.flat_start..s.flat_start + s.len))
            .collect();
        (pieces, FlatParams(Some(flat)))
    }

    /// Writes the updated pieces back into `model` on every rank (ZeRO-1: all-gathered).
    pub fn publish<M: Params>(
        &self,
        model: &mut M,
        flat: FlatParams,
        updated: Vec<Tensor<1>>,
    ) -> Result<(), CommError> {
        let Some(flat) = flat.0 else {
            let mut set = SetWhole(self.subset, updated.into_iter());
            model.visit_params(&mut set);
            return Ok(());
        };
        let shard = cat(updated, &flat.device());
        let flat = self.bucketed().all_gather(shard)?;
        model.visit_params(&mut SetFlat {
            subset: self.subset,
            flat: &flat,
            at: 0,
        });
        Ok(())
    }

    fn bucketed(&self) -> BucketedSync<'_> {
        BucketedSync {
            group: self.group,
            layout: &self.layout,
        }
    }
}

/// Every parameter `subset` holds in visiting order, as one flat tensor on `device`.
fn flat_params<M: Params>(model: &mut M, subset: Subset, device: &Device) -> Tensor<1> {
    struct Collect(Subset, Vec<Tensor<1>>);
    impl ParamVisitor for Collect {
        fn visit<const D: usize>(&mut self, name: &str, param: &mut Tensor<D>) {
            if self.0.holds(name) {
                let n = param.shape().num_elements();
                self.1.push(param.clone().inner().reshape([n]));
            }
        }
    }
    let mut c = Collect(subset, Vec::new());
    model.visit_params(&mut c);
    cat(c.1, device)
}

/// Replaces each parameter `.0` holds, in visiting order, by the next whole flat value.
struct SetWhole<I>(Subset, I);

impl<I: Iterator<Item = Tensor<1>>> ParamVisitor for SetWhole<I> {
    fn visit<const D: usize>(&mut self, name: &str, param: &mut Tensor<D>) {
        if !self.0.holds(name) {
            return;
        }
        let p = self.1.next().expect("one updated value per parameter");
        *param = Tensor::from_inner(p.reshape(param.dims())).require_grad();
    }
}

/// Replaces each parameter `subset` holds, in visiting order, by its run of `flat`.
struct SetFlat<'a> {
    subset: Subset,
    flat: &'a Tensor<1>,
    at: usize,
}

impl ParamVisitor for SetFlat<'_> {
    fn visit<const D: usize>(&mut self, name: &str, param: &mut Tensor<D>) {
        if !self.subset.holds(name) {
            return;
        }
        let n = param.shape().num_elements();
        let values = self.flat.clone().slice(self.at..self.at + n);
        self.at += n;
        *param = Tensor::from_inner(values.reshape(param.dims())).require_grad();
    }
}
