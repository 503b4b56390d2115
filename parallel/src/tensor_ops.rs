//! Differentiable collectives on burn tensors: Megatron's tensor- and sequence-parallel region
//! ops, the row all-to-all of expert dispatch and a detached max, each one op with its own
//! backward (a burn backend extension, as models/src/attention_core.rs is).
//!
//! Owns: moving a tensor through a `ProcessGroup` collective in forward and its adjoint in
//! backward, and turning a `CommError` into an error stored in the op's `CommHandle` plus zeros
//! of the right shape (burn's forward and backward cannot return one). Must not: decide where a
//! model communicates (the boundaries), panic, or wait past the group's timeout: the first
//! error aborts the group so no peer waits on this rank either, and later ops on the handle
//! return zeros without communicating.
//!
//! Every op is `compute_bound`: no checkpoint strategy recomputes it, since a recompute in
//! backward would issue a collective its peers never match. Ranks must call the ops in the same
//! order, and a tracked tensor must never be shared between rank threads (design note §1.2).
//!
//! Every op's data moves through `flat::run`: on the GPU's own memory under NCCL, through the
//! host otherwise; bf16 activations move as bf16 (traffic counts 2 bytes an element), every
//! other dtype as f32. Size-1 groups return the input as it is and are still counted as the op.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
#[cfg(feature = "cuda")]
use burn::backend::Cube;
use burn::backend::{
    backend_extension, Autodiff, AutodiffBackend, Backend, Dispatch, Flex, TensorMetadata,
};
use burn::tensor::{FloatDType, Shape, Tensor};

use crate::comm::ReduceOp;
use crate::error::{CommError, Result};
use crate::flat::{self, Collective};
use crate::group::ProcessGroup;

/// A process group as the tensor ops see it: the group, plus the first error any op on it hit
/// (ops cannot return `Result` inside burn's forward/backward).
#[derive(Clone)]
pub struct CommHandle {
    group: Arc<ProcessGroup>,
    error: Arc<Mutex<Option<CommError>>>,
    /// The op and pass the next collective serves, for its error message: a backward runs its
    /// adjoint op (tp_copy's backward is a tp_reduce), which would otherwise name itself.
    site: Option<&'static str>,
}

impl fmt::Debug for CommHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommHandle")
            .field("group", &self.group.name())
            .field("rank", &self.rank())
            .field("size", &self.size())
            .finish()
    }
}

impl CommHandle {
    pub fn new(group: Arc<ProcessGroup>) -> Self {
        Self {
            group,
            error: Arc::new(Mutex::new(None)),
            site: None,
        }
    }

    pub fn group(&self) -> &ProcessGroup {
        &self.group
    }

    pub fn size(&self) -> usize {
        self.group.size()
    }

    pub fn rank(&self) -> usize {
        self.group.rank()
    }

    /// The first error an op hit since the last call (Ok when none); clears it.
    pub fn take_error(&self) -> Result<()> {
        match self.slot().take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// True while an error is held (from an op, or [`Self::record`]): ops return zeros.
    pub fn failed(&self) -> bool {
        self.slot().is_some()
    }

    /// The value of `result`, or `None` after keeping its error as the ops do (the first one
    /// stays; it aborts the group): for collectives called on [`Self::group`] where no
    /// `Result` can be returned either.
    pub fn record<T>(&self, result: Result<T>) -> Option<T> {
        result.map_err(|e| self.fail(e)).ok()
    }

    fn slot(&self) -> MutexGuard<'_, Option<CommError>> {
        self.error.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores `e` unless an error is already stored; the first one aborts the group so the
    /// peers stop waiting for this rank.
    fn fail(&self, e: CommError) {
        let reason = e.to_string();
        let first = {
            let mut slot = self.slot();
            let first = slot.is_none();
            slot.get_or_insert(e);
            first
        };
        if first {
            self.group.abort(&reason);
        }
    }

    /// This handle, its next collective named `site` in errors.
    fn at(&self, site: &'static str) -> Self {
        Self {
            site: Some(site),
            ..self.clone()
        }
    }

    fn site(&self, default: &'static str) -> &'static str {
        self.site.unwrap_or(default)
    }
}

/// `e` naming `site` (the tensor op, its pass and the collective) instead of the collective.
fn relabel(mut e: CommError, site: &'static str) -> CommError {
    match &mut e {
        CommError::Timeout { op, .. }
        | CommError::PeerGone { op, .. }
        | CommError::Aborted { op, .. }
        | CommError::Mismatch { op, .. }
        | CommError::BadArgument { op, .. } => *op = site,
        CommError::Rendezvous(_) | CommError::Backend { .. } => {}
    }
    e
}

/// Megatron `copy_to_tensor_model_parallel_region`: forward identity, backward all-reduce(sum).
pub fn tp_copy<const D: usize>(x: Tensor<D>, h: &CommHandle) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as CommOps>::tp_copy(x.into_dispatch(), h.clone()))
}

/// `reduce_from_tensor_model_parallel_region`: forward all-reduce(sum), backward identity.
pub fn tp_reduce<const D: usize>(x: Tensor<D>, h: &CommHandle) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as CommOps>::tp_reduce(
        x.into_dispatch(),
        h.clone(),
    ))
}

/// Sequence-parallel gather: `x [rows, cols]` -> `[size·rows, cols]` (group-rank order);
/// backward reduce-scatter(sum) of rows.
pub fn sp_gather(x: Tensor<2>, h: &CommHandle) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as CommOps>::sp_gather(
        x.into_dispatch(),
        h.clone(),
    ))
}

/// Sequence-parallel reduce-scatter: `x [size·rows, cols]` -> this rank's summed chunk
/// `[rows, cols]`; backward all-gather of rows. Rows not divisible by the group size: a
/// `BadArgument` error is recorded and zeros are returned.
pub fn sp_reduce_scatter(x: Tensor<2>, h: &CommHandle) -> Tensor<2> {
    let out = <Dispatch as CommOps>::sp_reduce_scatter(x.into_dispatch(), h.clone());
    Tensor::from_dispatch(out)
}

/// All-to-all of rows: `x [Σ send_rows, cols]`; `send_rows[j]` rows go to group rank j,
/// `recv_rows[j]` rows come from j; returns `[Σ recv_rows, cols]` (source-rank order).
/// Backward: the reverse exchange (sizes swapped).
pub fn all_to_all_rows(
    x: Tensor<2>,
    send_rows: &[usize],
    recv_rows: &[usize],
    h: &CommHandle,
) -> Tensor<2> {
    let (send, recv) = (send_rows.to_vec(), recv_rows.to_vec());
    let out = <Dispatch as CommOps>::all_to_all_rows(x.into_dispatch(), send, recv, h.clone());
    Tensor::from_dispatch(out)
}

/// Elementwise max over the group, not differentiable (returns a detached tensor): the
/// vocab-parallel cross-entropy's row max, which only shifts the log-sum-exp.
pub fn all_reduce_max<const D: usize>(x: Tensor<D>, h: &CommHandle) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as CommOps>::all_reduce_max(
        x.into_dispatch(),
        h.clone(),
    ))
}

/// The ops on backend primitives. The default bodies go through the host (any backend); the
/// `Autodiff` impl adds each op's adjoint, run on the inner backend in backward.
#[backend_extension(Flex, Cube: cfg(feature = "cuda"), Autodiff)]
pub trait CommOps: Backend {
    fn tp_copy(x: FloatTensor<Self>, h: CommHandle) -> FloatTensor<Self> {
        match h.failed() {
            true => zeros::<Self>(&x, x.shape()),
            false => x,
        }
    }

    fn tp_reduce(x: FloatTensor<Self>, h: CommHandle) -> FloatTensor<Self> {
        let site = h.site("tp_reduce (all_reduce)");
        all_reduce::<Self>(x, &h, site, ReduceOp::Sum)
    }

    fn sp_gather(x: FloatTensor<Self>, h: CommHandle) -> FloatTensor<Self> {
        gather_rows::<Self>(x, &h, h.site("sp_gather (all_gather)"))
    }

    fn sp_reduce_scatter(x: FloatTensor<Self>, h: CommHandle) -> FloatTensor<Self> {
        scatter_rows::<Self>(x, &h, h.site("sp_reduce_scatter (reduce_scatter)"))
    }

    fn all_to_all_rows(
        x: FloatTensor<Self>,
        send_rows: Vec<usize>,
        recv_rows: Vec<usize>,
        h: CommHandle,
    ) -> FloatTensor<Self> {
        let site = h.site("all_to_all_rows (all_to_all)");
        exchange_rows::<Self>(x, &send_rows, &recv_rows, &h, site)
    }

    fn all_reduce_max(x: FloatTensor<Self>, h: CommHandle) -> FloatTensor<Self> {
        let site = h.site("all_reduce_max (all_reduce)");
        all_reduce::<Self>(x, &h, site, ReduceOp::Max)
    }
}

impl CommOps for Flex {}
#[cfg(feature = "cuda")]
impl CommOps for Cube {}

/// Zeros of `shape` in `like`'s dtype on its device: what an op returns in place of its result
/// once its handle holds an error.
fn zeros<B: Backend>(like: &FloatTensor<B>, shape: Shape) -> FloatTensor<B> {
    B::float_zeros(shape, &like.device(), FloatDType::from(like.dtype()))
}

/// One collective (`flat::run`: on the device where the communicator reaches it, else through
/// the host), the result of shape `out` in x's dtype on x's device. Zeros of `out`, without
/// communicating, when the handle already holds an error; zeros and a stored error when this
/// one fails.
fn collective<B: Backend>(
    x: FloatTensor<B>,
    h: &CommHandle,
    site: &'static str,
    out: Shape,
    op: Collective,
) -> FloatTensor<B> {
    let zeros = zeros::<B>(&x, out.clone());
    if h.failed() {
        return zeros;
    }
    match flat::run::<B>(x, &h.group, &op, out) {
        Ok(t) => t,
        Err(e) => {
            h.fail(relabel(e, site));
            zeros
        }
    }
}

/// A size-1 group's op: `x` itself, counted as the group counts `op` (in the wire dtype).
fn local<B: Backend>(x: FloatTensor<B>, h: &CommHandle, op: &'static str) -> FloatTensor<B> {
    if h.failed() {
        return zeros::<B>(&x, x.shape());
    }
    let elem = flat::wire_dtype(x.dtype()).size();
    h.group.count_local(op, x.shape().num_elements() * elem);
    x
}

/// Arguments this rank cannot run the collective with: `detail` is stored as a `BadArgument`
/// (aborting the group, whose peers would wait for this rank) and zeros of `out` returned.
fn refuse<B: Backend>(
    x: &FloatTensor<B>,
    h: &CommHandle,
    site: &'static str,
    detail: String,
    out: Shape,
) -> FloatTensor<B> {
    h.fail(h.group.info().bad(site, detail));
    zeros::<B>(x, out)
}

fn all_reduce<B: Backend>(
    x: FloatTensor<B>,
    h: &CommHandle,
    site: &'static str,
    op: ReduceOp,
) -> FloatTensor<B> {
    if h.size() == 1 {
        return local::<B>(x, h, "all_reduce");
    }
    let out = x.shape();
    collective::<B>(x, h, site, out, Collective::AllReduce(op))
}

fn gather_rows<B: Backend>(
    x: FloatTensor<B>,
    h: &CommHandle,
    site: &'static str,
) -> FloatTensor<B> {
    if h.size() == 1 {
        return local::<B>(x, h, "all_gather");
    }
    let [rows, cols] = x.shape().dims::<2>();
    let out = Shape::new([h.size() * rows, cols]);
    collective::<B>(x, h, site, out, Collective::AllGather)
}

fn scatter_rows<B: Backend>(
    x: FloatTensor<B>,
    h: &CommHandle,
    site: &'static str,
) -> FloatTensor<B> {
    let [rows, cols] = x.shape().dims::<2>();
    let p = h.size();
    let out = Shape::new([rows / p, cols]);
    if !rows.is_multiple_of(p) {
        let detail = format!("{rows} rows do not split into {p} equal chunks");
        return refuse::<B>(&x, h, site, detail, out);
    }
    if p == 1 {
        return local::<B>(x, h, "reduce_scatter");
    }
    collective::<B>(x, h, site, out, Collective::ReduceScatter)
}

fn exchange_rows<B: Backend>(
    x: FloatTensor<B>,
    send: &[usize],
    recv: &[usize],
    h: &CommHandle,
    site: &'static str,
) -> FloatTensor<B> {
    let [rows, cols] = x.shape().dims::<2>();
    let (p, sent) = (h.size(), send.iter().sum::<usize>());
    let out = Shape::new([recv.iter().sum::<usize>(), cols]);
    if send.len() != p || recv.len() != p || sent != rows || (p == 1 && send != recv) {
        let detail = format!(
            "send rows {send:?} (for {rows} rows) and recv rows {recv:?} do not fit a group of {p}"
        );
        return refuse::<B>(&x, h, site, detail, out);
    }
    if p == 1 {
        return local::<B>(x, h, "all_to_all");
    }
    let elems = |r: &[usize]| r.iter().map(|r| r * cols).collect::<Vec<_>>();
    let (send, recv) = (elems(send), elems(recv));
    collective::<B>(x, h, site, out, Collective::AllToAll { send, recv })
}

/// Which op's backward runs: each calls the op's adjoint on the inner backend (tp_copy and
/// tp_reduce are each other's, as are sp_gather and sp_reduce_scatter; the all-to-all is its
/// own with the sizes swapped).
#[derive(Debug, Clone, Copy)]
enum Adjoint {
    TpCopy,
    TpReduce,
    SpGather,
    SpReduceScatter,
    AllToAllRows,
}

/// The handle, and the forward's send and recv row counts (empty but for the all-to-all).
type AdjointState = (CommHandle, Vec<usize>, Vec<usize>);

impl<B: Backend + CommOps> Backward<B, 1> for Adjoint {
    type State = AdjointState;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (h, send, recv) = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |g| match self {
            Adjoint::TpCopy => B::tp_reduce(g, h.at("tp_copy backward (all_reduce)")),
            Adjoint::TpReduce => B::tp_copy(g, h),
            Adjoint::SpGather => {
                B::sp_reduce_scatter(g, h.at("sp_gather backward (reduce_scatter)"))
            }
            Adjoint::SpReduceScatter => {
                B::sp_gather(g, h.at("sp_reduce_scatter backward (all_gather)"))
            }
            Adjoint::AllToAllRows => {
                let h = h.at("all_to_all_rows backward (all_to_all)");
                B::all_to_all_rows(g, recv, send, h)
            }
        });
    }
}

/// `forward` on the inner backend, tracked with `adjoint` as its backward. Compute-bound, so
/// a checkpoint strategy keeps the output instead of running the collective again.
fn tracked<B: Backend + CommOps, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
    adjoint: Adjoint,
    state: AdjointState,
    forward: impl FnOnce(FloatTensor<B>) -> FloatTensor<B>,
) -> FloatTensor<Autodiff<B, C>> {
    let (x, node) = x.into_parts();
    let out = forward(x);
    match adjoint.prepare::<C>([node]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(state, out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

impl<B: Backend + CommOps, C: CheckpointStrategy> CommOps for Autodiff<B, C> {
    fn tp_copy(x: FloatTensor<Self>, h: CommHandle) -> FloatTensor<Self> {
        let state = (h.clone(), Vec::new(), Vec::new());
        tracked::<B, C>(x, Adjoint::TpCopy, state, |x| B::tp_copy(x, h))
    }

    fn tp_reduce(x: FloatTensor<Self>, h: CommHandle) -> FloatTensor<Self> {
        let state = (h.clone(), Vec::new(), Vec::new());
        tracked::<B, C>(x, Adjoint::TpReduce, state, |x| B::tp_reduce(x, h))
    }

    fn sp_gather(x: FloatTensor<Self>, h: CommHandle) -> FloatTensor<Self> {
        let state = (h.clone(), Vec::new(), Vec::new());
        tracked::<B, C>(x, Adjoint::SpGather, state, |x| B::sp_gather(x, h))
    }

    fn sp_reduce_scatter(x: FloatTensor<Self>, h: CommHandle) -> FloatTensor<Self> {
        let state = (h.clone(), Vec::new(), Vec::new());
        tracked::<B, C>(x, Adjoint::SpReduceScatter, state, |x| {
            B::sp_reduce_scatter(x, h)
        })
    }

    fn all_to_all_rows(
        x: FloatTensor<Self>,
        send_rows: Vec<usize>,
        recv_rows: Vec<usize>,
        h: CommHandle,
    ) -> FloatTensor<Self> {
        let state = (h.clone(), send_rows.clone(), recv_rows.clone());
        tracked::<B, C>(x, Adjoint::AllToAllRows, state, |x| {
            B::all_to_all_rows(x, send_rows, recv_rows, h)
        })
    }

    /// Not differentiable: the result is a new leaf that does not require a gradient.
    fn all_reduce_max(x: FloatTensor<Self>, h: CommHandle) -> FloatTensor<Self> {
        Self::from_inner(B::all_reduce_max(x.into_primitive(), h))
    }
}
