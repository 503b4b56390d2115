//! `ProcessGroup`: a communicator plus the bytes it moved, with typed slices.

use std::collections::BTreeMap;
use std::sync::Mutex;

use bytemuck::Pod;

use crate::comm::{Communicator, DType, DeviceCollectives, GroupInfo, ReduceOp};
use crate::error::{CommError, Result};
use crate::flat::Collective;

/// Element types with a wire dtype.
pub trait Elem: Pod + Send + Sync {
    const DTYPE: DType;
}
impl Elem for f32 {
    const DTYPE: DType = DType::F32;
}
impl Elem for f64 {
    const DTYPE: DType = DType::F64;
}
impl Elem for i64 {
    const DTYPE: DType = DType::I64;
}
impl Elem for u8 {
    const DTYPE: DType = DType::U8;
}
impl Elem for half::bf16 {
    const DTYPE: DType = DType::BF16;
}

/// Traffic of one op kind on one group.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpTraffic {
    pub calls: u64,
    /// The data the op is about: the reduced buffer (all_reduce), the full input
    /// (reduce_scatter), the full output (all_gather), the buffer (broadcast, send, recv),
    /// the bytes sent (all_to_all).
    pub payload_bytes: u64,
    /// Bytes this rank puts on the wire under the bandwidth-optimal (ring) algorithm NCCL
    /// uses: all_reduce 2(p−1)/p × payload, reduce_scatter and all_gather (p−1)/p × payload,
    /// broadcast payload (root) or 0, all_to_all the bytes sent to other ranks.
    pub wire_bytes: u64,
    /// Nanoseconds this rank spent inside the op's exchange (waiting for peers included).
    pub busy_ns: u64,
    /// Calls that ran on device memory (NCCL on a GPU tensor), without host copies.
    pub device_calls: u64,
}

/// Counters by op name, kept for the life of the group.
pub type Traffic = BTreeMap<&'static str, OpTraffic>;

/// A group of ranks; every rank of the group holds its own `ProcessGroup` value.
pub struct ProcessGroup {
    comm: Box<dyn Communicator>,
    traffic: Mutex<Traffic>,
}

fn bytes<T: Elem>(v: &[T]) -> &[u8] {
    bytemuck::cast_slice(v)
}

fn bytes_mut<T: Elem>(v: &mut [T]) -> &mut [u8] {
    bytemuck::cast_slice_mut(v)
}

impl ProcessGroup {
    pub fn new(comm: Box<dyn Communicator>) -> Self {
        Self {
            comm,
            traffic: Mutex::new(Traffic::new()),
        }
    }

    pub fn info(&self) -> &GroupInfo {
        self.comm.info()
    }

    pub fn rank(&self) -> usize {
        self.comm.info().rank
    }

    pub fn size(&self) -> usize {
        self.comm.info().size()
    }

    pub fn name(&self) -> &str {
        &self.comm.info().name
    }

    /// The counters so far.
    pub fn traffic(&self) -> Traffic {
        self.traffic
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// `f` on the counters of `op`.
    fn traffic_of(&self, op: &'static str, f: impl FnOnce(&mut OpTraffic)) {
        let mut t = self.traffic.lock().unwrap_or_else(|e| e.into_inner());
        f(t.entry(op).or_default())
    }

    fn count(&self, op: &'static str, payload: usize, wire: usize) {
        self.traffic_of(op, |e| {
            e.calls += 1;
            e.payload_bytes += payload as u64;
            e.wire_bytes += wire as u64;
        })
    }

    /// Runs one exchange of `op`, adding its wall time to the op's counters.
    fn timed<R>(&self, op: &'static str, exchange: impl FnOnce() -> R) -> R {
        let started = std::time::Instant::now();
        let out = exchange();
        let ns = started.elapsed().as_nanos() as u64;
        self.traffic_of(op, |e| e.busy_ns += ns);
        out
    }

    /// Counts an op of a size-1 group that its caller did without a buffer (the tensor ops
    /// return their input as it is): the counters read as if the op had run, with no wire bytes.
    pub(crate) fn count_local(&self, op: &'static str, payload: usize) {
        debug_assert_eq!(self.size(), 1);
        self.count(op, payload, 0);
    }

    /// Counts one `op` of `in_bytes` input in `elem`-byte elements: (payload, wire bytes) as
    /// `OpTraffic` defines them.
    fn count_collective(&self, op: &Collective, in_bytes: usize, elem: usize) {
        let (p, me) = (self.size(), self.rank());
        let (payload, wire) = match op {
            Collective::AllReduce(_) => (in_bytes, 2 * self.ring(in_bytes)),
            Collective::AllGather => (in_bytes * p, self.ring(in_bytes * p)),
            Collective::ReduceScatter => (in_bytes, self.ring(in_bytes)),
            Collective::AllToAll { send, .. } => {
                let others = send.iter().enumerate().filter(|(j, _)| *j != me);
                (in_bytes, others.map(|(_, n)| n * elem).sum())
            }
        };
        self.count(op.name(), payload, wire);
    }

    /// The collectives on device memory, where the backend has them (NCCL).
    pub fn device(&self) -> Option<&dyn DeviceCollectives> {
        self.comm.device()
    }

    /// `op` on device memory (see `DeviceCollectives::run_on_device`), counted and timed as
    /// the host ops are.
    ///
    /// # Safety
    /// As `DeviceCollectives::run_on_device`.
    pub unsafe fn run_on_device(
        &self,
        device: &dyn DeviceCollectives,
        op: &Collective,
        dtype: DType,
        buffers: (u64, u64),
        send_elems: usize,
    ) -> Result<()> {
        self.count_collective(op, send_elems * dtype.size(), dtype.size());
        self.traffic_of(op.name(), |e| e.device_calls += 1);
        // SAFETY: the caller's guarantee.
        self.timed(op.name(), || unsafe {
            device.run_on_device(op, dtype, buffers, send_elems)
        })
    }

    /// (p−1)/p × `bytes`, the ring share.
    fn ring(&self, bytes: usize) -> usize {
        let p = self.size();
        bytes * (p - 1) / p
    }

    pub fn all_reduce<T: Elem>(&self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        let op_ = Collective::AllReduce(op);
        self.count_collective(&op_, std::mem::size_of_val(buf), T::DTYPE.size());
        if self.size() == 1 {
            return Ok(());
        }
        self.timed("all_reduce", || {
            self.comm.all_reduce(bytes_mut(buf), T::DTYPE, op)
        })
    }

    pub fn all_gather<T: Elem>(&self, send: &[T]) -> Result<Vec<T>> {
        let mut out = vec![T::zeroed(); send.len() * self.size()];
        let n = std::mem::size_of_val(send);
        self.count_collective(&Collective::AllGather, n, T::DTYPE.size());
        if self.size() == 1 {
            out.copy_from_slice(send);
            return Ok(out);
        }
        self.timed("all_gather", || {
            self.comm.all_gather(bytes(send), bytes_mut(&mut out))
        })?;
        Ok(out)
    }

    /// `send.len()` must be a multiple of the group size; returns this rank's chunk.
    pub fn reduce_scatter<T: Elem>(&self, send: &[T], op: ReduceOp) -> Result<Vec<T>> {
        let p = self.size();
        if !send.len().is_multiple_of(p) {
            let detail = format!("{} elements do not split into {p} equal chunks", send.len());
            return Err(self.info().bad("reduce_scatter", detail));
        }
        let n = std::mem::size_of_val(send);
        self.count_collective(&Collective::ReduceScatter, n, T::DTYPE.size());
        let mut out = vec![T::zeroed(); send.len() / p];
        if p == 1 {
            out.copy_from_slice(send);
            return Ok(out);
        }
        self.timed("reduce_scatter", || {
            self.comm
                .reduce_scatter(bytes(send), bytes_mut(&mut out), T::DTYPE, op)
        })?;
        Ok(out)
    }

    /// `send_counts[j]` elements go to rank j; `recv_counts[j]` come from rank j.
    pub fn all_to_all<T: Elem>(
        &self,
        send: &[T],
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> Result<Vec<T>> {
        let size = std::mem::size_of::<T>();
        let sb: Vec<usize> = send_counts.iter().map(|c| c * size).collect();
        let rb: Vec<usize> = recv_counts.iter().map(|c| c * size).collect();
        let op = Collective::AllToAll {
            send: send_counts.to_vec(),
            recv: recv_counts.to_vec(),
        };
        self.count_collective(&op, std::mem::size_of_val(send), size);
        let raw = if self.size() == 1 {
            bytes(send).to_vec()
        } else {
            self.timed("all_to_all", || self.comm.all_to_all(bytes(send), &sb, &rb))?
        };
        Ok(bytemuck::pod_collect_to_vec(&raw))
    }

    pub fn broadcast<T: Elem>(&self, buf: &mut [T], root: usize) -> Result<()> {
        let n = std::mem::size_of_val(buf);
        self.count("broadcast", n, if self.rank() == root { n } else { 0 });
        if self.size() == 1 {
            return Ok(());
        }
        self.timed("broadcast", || self.comm.broadcast(bytes_mut(buf), root))
    }

    pub fn send<T: Elem>(&self, buf: &[T], dst: usize, tag: u32) -> Result<()> {
        let n = std::mem::size_of_val(buf);
        self.count("send", n, n);
        self.timed("send", || self.comm.send(bytes(buf), dst, tag))
    }

    pub fn recv<T: Elem>(&self, buf: &mut [T], src: usize, tag: u32) -> Result<()> {
        self.count("recv", std::mem::size_of_val(buf), 0);
        self.timed("recv", || self.comm.recv(bytes_mut(buf), src, tag))
    }

    /// Sends and receives posted together (see `Communicator::exchange`): `sends` are
    /// (values, destination), `recvs` (buffer, source), all group ranks.
    pub fn exchange<T: Elem>(
        &self,
        sends: &[(&[T], usize)],
        recvs: &mut [(&mut [T], usize)],
        tag: u32,
    ) -> Result<()> {
        let out: usize = sends.iter().map(|(b, _)| std::mem::size_of_val(*b)).sum();
        let inc: usize = recvs.iter().map(|(b, _)| std::mem::size_of_val(&**b)).sum();
        self.count("exchange", out + inc, out);
        let sends: Vec<(&[u8], usize)> = sends.iter().map(|(b, d)| (bytes(b), *d)).collect();
        let mut recvs: Vec<(&mut [u8], usize)> =
            recvs.iter_mut().map(|(b, s)| (bytes_mut(b), *s)).collect();
        self.timed("exchange", || self.comm.exchange(&sends, &mut recvs, tag))
    }

    pub fn barrier(&self) -> Result<()> {
        if self.size() == 1 {
            return Ok(());
        }
        self.comm.barrier()
    }

    /// Collective: ranks with the same `color` form a group named `name`.
    pub fn split(&self, color: u32, name: &str) -> Result<ProcessGroup> {
        Ok(ProcessGroup::new(self.comm.split(color, name)?))
    }

    /// Tells the other ranks this one failed (see `Communicator::abort`).
    pub fn abort(&self, reason: &str) {
        self.comm.abort(reason);
    }

    /// A UTF-8 string from `root` (sizes first, so only the root needs to know it).
    pub fn broadcast_string(&self, s: &str, root: usize) -> Result<String> {
        let mut len = [s.len() as i64];
        self.broadcast(&mut len, root)?;
        let mut buf = if self.rank() == root {
            s.as_bytes().to_vec()
        } else {
            vec![0u8; len[0] as usize]
        };
        self.broadcast(&mut buf, root)?;
        String::from_utf8(buf).map_err(|e| CommError::Backend {
            backend: "broadcast_string",
            detail: e.to_string(),
        })
    }
}
