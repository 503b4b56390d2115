//! The collectives of `NcclComm`: on host bytes, each staged through `NcclComm::run`; on
//! device memory (`DeviceCollectives`), launched on it directly.

use std::ffi::c_int;
use std::sync::TryLockError;
use std::time::Instant;

use super::api::{
    backend, describe, nccl_dtype, nccl_op, Comm, Config, Dst, Src, Stream, IN_PROGRESS, SUCCESS,
    UINT8,
};
use super::NcclComm;
use crate::comm::{Communicator, DType, DeviceCollectives, GroupInfo, ReduceOp};
use crate::error::Result;
use crate::flat::Collective;

impl Communicator for NcclComm {
    fn info(&self) -> &GroupInfo {
        &self.info
    }

    fn all_reduce(&self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        self.info.check_all_reduce(buf.len(), dtype)?;
        self.reduce("all_reduce", buf, dtype, op)
    }

    fn all_gather(&self, send: &[u8], recv: &mut [u8]) -> Result<()> {
        self.info.check_all_gather(send.len(), recv.len())?;
        let (api, len) = (self.api, send.len());
        // SAFETY (closure): `s` holds `len` bytes, `r` n × `len`.
        self.run("all_gather", Some(send), recv, |c, s, r, st| unsafe {
            (api.all_gather)(s, r, len, UINT8, c, st)
        })
    }

    fn reduce_scatter(
        &self,
        send: &[u8],
        recv: &mut [u8],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        self.info
            .check_reduce_scatter(send.len(), recv.len(), dtype)?;
        let (api, count) = (self.api, recv.len() / dtype.size());
        self.run("reduce_scatter", Some(send), recv, |c, s, r, st| {
            // SAFETY: `s` holds n × `count` elements, `r` `count`.
            unsafe { (api.reduce_scatter)(s, r, count, nccl_dtype(dtype), nccl_op(op), c, st) }
        })
    }

    /// Grouped ncclSend/ncclRecv. Sizes are not cross-checked: a rank whose `recv_sizes`
    /// disagree with its peers' `send_sizes` hangs until the timeout.
    fn all_to_all(
        &self,
        send: &[u8],
        send_sizes: &[usize],
        recv_sizes: &[usize],
    ) -> Result<Vec<u8>> {
        self.info
            .check_all_to_all(send.len(), send_sizes, recv_sizes)?;
        let mut out = vec![0u8; recv_sizes.iter().sum()];
        let enqueue = all_to_all(self.api, send_sizes, recv_sizes);
        self.run("all_to_all", Some(send), &mut out, enqueue)?;
        Ok(out)
    }

    fn broadcast(&self, buf: &mut [u8], root: usize) -> Result<()> {
        self.info.check_rank("broadcast", "root", root)?;
        let (api, len) = (self.api, buf.len());
        // SAFETY (closure): `r` holds `len` bytes.
        self.run("broadcast", None, buf, |c, _, r, st| unsafe {
            (api.broadcast)(r, r, len, UINT8, root as c_int, c, st)
        })
    }

    /// NCCL has no tags: `tag` is ignored, and messages between two ranks match in the order
    /// they were posted. Unlike the CPU backends the send completes only once `dst` receives.
    fn send(&self, buf: &[u8], dst: usize, _tag: u32) -> Result<()> {
        self.info.check_rank("send/recv", "destination", dst)?;
        let (api, len) = (self.api, buf.len());
        // SAFETY (closure): `s` holds `len` bytes.
        self.run("send/recv", Some(buf), &mut [], |c, s, _, st| unsafe {
            (api.send)(s, len, UINT8, dst as c_int, c, st)
        })
    }

    /// `tag` is ignored, as for `send`.
    fn recv(&self, buf: &mut [u8], src: usize, _tag: u32) -> Result<()> {
        self.info.check_rank("send/recv", "source", src)?;
        let (api, len) = (self.api, buf.len());
        // SAFETY (closure): `r` holds `len` bytes.
        self.run("send/recv", Some(&[]), buf, |c, _, r, st| unsafe {
            (api.recv)(r, len, UINT8, src as c_int, c, st)
        })
    }

    /// One NCCL group of every send and receive, so they progress together (`tag` ignored).
    fn exchange(
        &self,
        sends: &[(&[u8], usize)],
        recvs: &mut [(&mut [u8], usize)],
        _tag: u32,
    ) -> Result<()> {
        for (_, r) in sends {
            self.info.check_rank("exchange", "destination", *r)?;
        }
        for (_, r) in recvs.iter() {
            self.info.check_rank("exchange", "source", *r)?;
        }
        // One staging buffer each way: the sends packed in order, the receives likewise.
        let send: Vec<u8> = sends.iter().flat_map(|(b, _)| b.iter().copied()).collect();
        let mut recv = vec![0u8; recvs.iter().map(|(b, _)| b.len()).sum()];
        let api = self.api;
        let (send_parts, recv_parts): (Vec<_>, Vec<_>) = (
            sends.iter().map(|(b, d)| (b.len(), *d)).collect(),
            recvs.iter().map(|(b, s)| (b.len(), *s)).collect(),
        );
        self.run(
            "exchange",
            Some(send.as_slice()),
            &mut recv,
            |c, s, r, st| {
                // SAFETY: the offsets stay within `send` and `recv`, sized as the parts' sums; a
                // group brackets the calls so they progress together.
                unsafe {
                    let mut rc = (api.group_start)();
                    let mut off = 0;
                    for &(len, dst) in &send_parts {
                        if rc == SUCCESS && len > 0 {
                            rc = (api.send)(s.byte_add(off), len, UINT8, dst as c_int, c, st);
                        }
                        off += len;
                    }
                    off = 0;
                    for &(len, src) in &recv_parts {
                        if rc == SUCCESS && len > 0 {
                            rc = (api.recv)(r.byte_add(off), len, UINT8, src as c_int, c, st);
                        }
                        off += len;
                    }
                    let end = (api.group_end)();
                    if rc == SUCCESS {
                        end
                    } else {
                        rc
                    }
                }
            },
        )?;
        let mut off = 0;
        for (buf, _) in recvs.iter_mut() {
            buf.copy_from_slice(&recv[off..off + buf.len()]);
            off += buf.len();
        }
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        self.reduce("barrier", &mut [0u8; 4], DType::F32, ReduceOp::Sum)
    }

    fn split(&self, color: u32, name: &str) -> Result<Box<dyn Communicator>> {
        Ok(Box::new(self.split_nccl(color, name)?))
    }

    fn device(&self) -> Option<&dyn DeviceCollectives> {
        Some(self)
    }

    /// Aborts the NCCL communicator at once, or at the next poll of an op in flight. NCCL does
    /// not tell the peers: their pending ops fail with a remote error or time out.
    fn abort(&self, reason: &str) {
        *self.abort_request.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason.to_string());
        let mut st = match self.state.try_lock() {
            Ok(st) => st,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return,
        };
        self.kill(&mut st, format!("aborted on this rank: {reason}"));
    }
}

/// One NCCL group of a send and a receive per peer with bytes to move (byte offsets into the
/// packed send and receive buffers), so they progress together.
fn all_to_all<'a>(
    api: &'static super::api::Api,
    send_sizes: &'a [usize],
    recv_sizes: &'a [usize],
) -> impl FnOnce(Comm, Src, Dst, Stream) -> c_int + 'a {
    move |c, s, r, st| {
        let (mut so, mut ro) = (0, 0);
        // SAFETY: offsets stay within the send and receive buffers, sized as the sizes' sums.
        unsafe {
            let mut rc = (api.group_start)();
            for j in 0..send_sizes.len() {
                if rc == SUCCESS && send_sizes[j] > 0 {
                    rc = (api.send)(s.byte_add(so), send_sizes[j], UINT8, j as c_int, c, st);
                }
                if rc == SUCCESS && recv_sizes[j] > 0 {
                    rc = (api.recv)(r.byte_add(ro), recv_sizes[j], UINT8, j as c_int, c, st);
                }
                (so, ro) = (so + send_sizes[j], ro + recv_sizes[j]);
            }
            let end = (api.group_end)();
            if rc == SUCCESS {
                end
            } else {
                rc
            }
        }
    }
}

impl DeviceCollectives for NcclComm {
    fn device_ordinal(&self) -> usize {
        self.ctx.ordinal()
    }

    unsafe fn run_on_device(
        &self,
        op: &Collective,
        dtype: DType,
        (send, recv): (u64, u64),
        send_elems: usize,
    ) -> Result<()> {
        let (name, api, p) = (op.name(), self.api, self.info.size());
        let (ty, elem) = (nccl_dtype(dtype), dtype.size());
        let bytes = |v: &[usize]| v.iter().map(|n| n * elem).collect::<Vec<_>>();
        let sizes = match op {
            Collective::AllToAll { send, recv } => (bytes(send), bytes(recv)),
            _ => (Vec::new(), Vec::new()),
        };
        match op {
            Collective::AllToAll { .. } => {
                let total = sizes.0.iter().sum();
                self.info.check_all_to_all(total, &sizes.0, &sizes.1)?
            }
            Collective::ReduceScatter => {
                let out = send_elems / p * elem;
                self.info
                    .check_reduce_scatter(send_elems * elem, out, dtype)?
            }
            _ => {}
        }
        let deadline = Instant::now() + self.timeout;
        let mut st = self.begin(name)?;
        let ptrs = (send, recv);
        // SAFETY (closures): the caller guarantees both buffers hold the op's input and output.
        match op {
            Collective::AllReduce(red) => {
                self.launch(&mut st, name, deadline, ptrs, |c, s, r, q| unsafe {
                    (api.all_reduce)(s, r, send_elems, ty, nccl_op(*red), c, q)
                })
            }
            Collective::AllGather => {
                self.launch(&mut st, name, deadline, ptrs, |c, s, r, q| unsafe {
                    (api.all_gather)(s, r, send_elems, ty, c, q)
                })
            }
            Collective::ReduceScatter => {
                let (count, sum) = (send_elems / p, nccl_op(ReduceOp::Sum));
                self.launch(&mut st, name, deadline, ptrs, |c, s, r, q| unsafe {
                    (api.reduce_scatter)(s, r, count, ty, sum, c, q)
                })
            }
            Collective::AllToAll { .. } => {
                let enqueue = all_to_all(api, &sizes.0, &sizes.1);
                self.launch(&mut st, name, deadline, ptrs, enqueue)
            }
        }
    }
}

impl NcclComm {
    /// ncclCommSplit keyed by this rank, after an all_gather of the colors to learn the members.
    pub(super) fn split_nccl(&self, color: u32, name: &str) -> Result<NcclComm> {
        let op = "split";
        let key = c_int::try_from(color).map_err(|_| {
            self.info
                .bad(op, format!("color {color} is over {}", c_int::MAX))
        })?;
        let mut colors = vec![0u8; 4 * self.info.size()];
        self.all_gather(&color.to_le_bytes(), &mut colors)?;
        let members: Vec<usize> = colors
            .chunks_exact(4)
            .zip(&self.info.members)
            .filter(|(c, _)| *c == color.to_le_bytes())
            .map(|(_, &m)| m)
            .collect();
        let me = self.info.world_rank();
        let info = GroupInfo {
            name: name.to_string(),
            rank: members.iter().position(|&m| m == me).unwrap_or(0),
            members,
        };
        let deadline = Instant::now() + self.timeout;
        let stream = self.ctx.new_stream().map_err(self.cuda(op))?;
        let mut st = self.begin(op)?;
        let (mut new, mut cfg) = (std::ptr::null_mut(), Config::nonblocking());
        // SAFETY: the parent handle is live; `new` and `cfg` outlive the call.
        let rc =
            unsafe { (self.api.split)(st.comm, key, self.info.rank as c_int, &mut new, &mut cfg) };
        if (rc != SUCCESS && rc != IN_PROGRESS) || new.is_null() {
            let detail = format!("{}: {}", self.here(op), describe(self.api, rc, st.comm));
            self.kill(&mut st, detail.clone());
            return Err(backend(detail));
        }
        let child = NcclComm::new(self.api, info, self.ctx.clone(), stream, self.timeout, new);
        if let Err(e) = self.wait(&mut st, op, deadline, || Ok(true)) {
            child.kill(&mut child.lock(), e.to_string());
            return Err(e);
        }
        drop(st);
        child.wait(&mut child.lock(), op, deadline, || Ok(true))?;
        Ok(child)
    }
}
