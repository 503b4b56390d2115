//! How the gradients of a step become the global batch's and how updated parameters reach
//! every replica: one interface over the strategies (none, DP all-reduce, ZeRO-1), whose group
//! and parameter subset are values, so that under expert parallelism one sync serves the
//! dense parameters over DP and another the experts over the expert-data-parallel group.
//!
//! Owns: the flat layout and which pieces this rank updates. Must not: do optimizer math
//! (`optim.rs`) or clipping (`grads.rs`); reduce anything but gradients and parameters.

use burn::tensor::{Device, Tensor, TensorData};
use moeru_models::params::{param_shapes, to_f32_vec, ParamVisitor, Params};
use moeru_models::shard::is_expert_param;
use moeru_parallel::{CommError, FlatLayout, GradSync as BucketedSync, ProcessGroup, Segment};

use super::grads::GradBuffer;
use super::optim::{flat_tensor, Piece, ShardPlacement};

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

/// Under ZeRO-1, every parameter flat on the host: what the all-gather fills.
pub struct FlatParams(Option<Vec<f32>>);

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
        let mut flat = Vec::with_capacity(self.layout.total);
        for slot in slots {
            match grads.grads.remove(&slot.name) {
                Some(g) => flat.extend(to_f32_vec(g)),
                None => flat.resize(flat.len() + slot.len, 0.0),
            }
        }
        let sync = self.bucketed();
        if self.kind == SyncKind::AllReduce {
            sync.all_reduce(&mut flat)?;
            let part = |offset: usize, len: usize| {
                flat_tensor(flat[offset..offset + len].to_vec(), device)
            };
            return Ok(slots.iter().map(|s| part(s.offset, s.len)).collect());
        }
        let shard = sync.reduce_scatter(&flat)?;
        drop(flat);
        let mut at = 0;
        let mut out = Vec::with_capacity(self.segments.len());
        for s in &self.segments {
            out.push(flat_tensor(shard[at..at + s.len].to_vec(), device));
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
        let flat = flat_params(model, self.subset, self.layout.total);
        let pieces = self
            .segments
            .iter()
            .map(|s| flat_tensor(flat[s.flat_start..s.flat_start + s.len].to_vec(), device))
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
        let Some(mut flat) = flat.0 else {
            let mut set = SetWhole(self.subset, updated.into_iter());
            model.visit_params(&mut set);
            return Ok(());
        };
        let shard: Vec<f32> = updated.into_iter().flat_map(to_f32_vec).collect();
        self.bucketed().all_gather(&shard, &mut flat)?;
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

/// Every parameter `subset` holds in visiting order, flat on the host.
fn flat_params<M: Params>(model: &mut M, subset: Subset, total: usize) -> Vec<f32> {
    struct Collect(Subset, Vec<f32>);
    impl ParamVisitor for Collect {
        fn visit<const D: usize>(&mut self, name: &str, param: &mut Tensor<D>) {
            if self.0.holds(name) {
                self.1.extend(to_f32_vec(param.clone().inner()));
            }
        }
    }
    let mut c = Collect(subset, Vec::with_capacity(total));
    model.visit_params(&mut c);
    c.1
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
    flat: &'a [f32],
    at: usize,
}

impl ParamVisitor for SetFlat<'_> {
    fn visit<const D: usize>(&mut self, name: &str, param: &mut Tensor<D>) {
        if !self.subset.holds(name) {
            return;
        }
        let dims = param.dims();
        let n = param.shape().num_elements();
        let device = param.clone().inner().device();
        let values = self.flat[self.at..self.at + n].to_vec();
        self.at += n;
        *param = Tensor::from_inner(Tensor::from_data(TensorData::new(values, dims), &device))
            .require_grad();
    }
}
