//! `Communicator` for `MpiComm`: each op is one non-blocking MPI call driven by `MpiComm::run`.

use std::os::raw::c_int;
use std::sync::Mutex;
use std::time::Instant;

use ::mpi::ffi::{self, MPI_Request};

use super::{cp, datatype, mp, reduce_op, MpiComm, Pending};
use crate::comm::{
    finish_mean, narrow_to_bf16, widen_bf16, Communicator, DType, GroupInfo, ReduceOp,
};
use crate::error::Result;
use crate::transport::OpCode;

impl Communicator for MpiComm {
    fn info(&self) -> &GroupInfo {
        &self.info
    }

    fn all_reduce(&self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        let code = OpCode::AllReduce;
        self.info.check_all_reduce(buf.len(), dtype)?;
        if dtype == DType::BF16 {
            // MPI has no bf16: reduced as f32 (bf16 halves the wire on the other backends).
            let mut wide = widen_bf16(buf);
            self.all_reduce(&mut wide, DType::F32, op)?;
            narrow_to_bf16(&wide, buf);
            return Ok(());
        }
        let n = self.count(code, buf.len() / dtype.size())?;
        let (comm, ty, mop) = (self.comm, datatype(dtype), reduce_op(op));
        let keep = (buf.to_vec(), vec![0u8; buf.len()]);
        let ((_, recv), _) = self.run(code, None, keep, |(s, r), req| unsafe {
            ffi::MPI_Iallreduce(cp(s), mp(r), n, ty, mop, comm, req)
        })?;
        buf.copy_from_slice(&recv);
        finish_mean(buf, dtype, op, self.info.size());
        Ok(())
    }

    fn all_gather(&self, send: &[u8], recv: &mut [u8]) -> Result<()> {
        self.info.check_all_gather(send.len(), recv.len())?;
        recv.copy_from_slice(&self.gather(OpCode::AllGather, send)?);
        Ok(())
    }

    fn reduce_scatter(
        &self,
        send: &[u8],
        recv: &mut [u8],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        let code = OpCode::ReduceScatter;
        let (n, len) = (self.info.size(), recv.len());
        self.info.check_reduce_scatter(send.len(), len, dtype)?;
        if dtype == DType::BF16 {
            let mut wide = vec![0u8; 2 * len];
            self.reduce_scatter(&widen_bf16(send), &mut wide, DType::F32, op)?;
            narrow_to_bf16(&wide, recv);
            return Ok(());
        }
        let count = self.count(code, len / dtype.size())?;
        let (comm, ty, mop) = (self.comm, datatype(dtype), reduce_op(op));
        let keep = (send.to_vec(), vec![0u8; len]);
        let ((_, out), _) = self.run(code, None, keep, |(s, r), req| unsafe {
            ffi::MPI_Ireduce_scatter_block(cp(s), mp(r), count, ty, mop, comm, req)
        })?;
        recv.copy_from_slice(&out);
        finish_mean(recv, dtype, op, n);
        Ok(())
    }

    /// MPI does not check `recv_sizes` against what the peers send: a larger message fails
    /// with a truncation error, a smaller one leaves the rest of its slot zero.
    fn all_to_all(
        &self,
        send: &[u8],
        send_sizes: &[usize],
        recv_sizes: &[usize],
    ) -> Result<Vec<u8>> {
        let code = OpCode::AllToAll;
        self.info
            .check_all_to_all(send.len(), send_sizes, recv_sizes)?;
        // Counts and displacements (prefix sums) as MPI's ints.
        let layout = |sizes: &[usize]| -> Result<[Vec<c_int>; 2]> {
            let (mut counts, mut displs, mut at) = (Vec::new(), Vec::new(), 0);
            for &s in sizes {
                counts.push(self.count(code, s)?);
                displs.push(self.count(code, at)?);
                at += s;
            }
            Ok([counts, displs])
        };
        let recv = vec![0u8; recv_sizes.iter().sum()];
        let keep = (
            send.to_vec(),
            recv,
            layout(send_sizes)?,
            layout(recv_sizes)?,
        );
        let (comm, ty) = (self.comm, datatype(DType::U8));
        let ((_, recv, ..), _) =
            self.run(code, None, keep, |(s, r, [sc, sd], [rc, rd]), req| {
                let (sc, sd, rc, rd) = (sc.as_ptr(), sd.as_ptr(), rc.as_ptr(), rd.as_ptr());
                unsafe { ffi::MPI_Ialltoallv(cp(s), sc, sd, ty, mp(r), rc, rd, ty, comm, req) }
            })?;
        Ok(recv)
    }

    fn broadcast(&self, buf: &mut [u8], root: usize) -> Result<()> {
        let code = OpCode::Broadcast;
        self.info.check_rank(code.name(), "root", root)?;
        let count = self.count(code, buf.len())?;
        let (comm, ty) = (self.comm, datatype(DType::U8));
        let (out, _) = self.run(code, None, buf.to_vec(), |b, req| unsafe {
            ffi::MPI_Ibcast(mp(b), count, ty, root as c_int, comm, req)
        })?;
        buf.copy_from_slice(&out);
        Ok(())
    }

    fn send(&self, buf: &[u8], dst: usize, tag: u32) -> Result<()> {
        let code = OpCode::Send;
        let (peer, tag) = self.peer(code, "destination", dst, tag)?;
        let count = self.count(code, buf.len())?;
        self.sweep(false)?;
        let (buf, ty) = (buf.to_vec(), datatype(DType::U8));
        // SAFETY: `buf` stays in `pending` until the request completes (or is leaked).
        let mut req: MPI_Request = unsafe { ffi::RSMPI_REQUEST_NULL };
        let rc = self.locked(|| unsafe {
            ffi::MPI_Isend(cp(&buf), count, ty, peer, tag, self.comm, &mut req)
        });
        self.check(code, rc)?;
        let (dst, started) = (self.info.members[dst], Instant::now());
        let p = Pending {
            req,
            buf,
            dst,
            started,
        };
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(p);
        Ok(())
    }

    fn recv(&self, buf: &mut [u8], src: usize, tag: u32) -> Result<()> {
        let code = OpCode::Send;
        let (peer, tag) = self.peer(code, "source", src, tag)?;
        let count = self.count(code, buf.len())?;
        let (comm, ty, from) = (self.comm, datatype(DType::U8), self.info.members[src]);
        let (out, status) = self.run(code, Some(from), vec![0u8; buf.len()], |b, req| unsafe {
            ffi::MPI_Irecv(mp(b), count, ty, peer, tag, comm, req)
        })?;
        let mut got: c_int = 0;
        self.locked(|| unsafe { ffi::MPI_Get_count(&status, ty, &mut got) });
        if got != count {
            let detail = format!("rank {from} sent {got} bytes, this rank expected {count}");
            return Err(self.bad(code, detail));
        }
        buf.copy_from_slice(&out);
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        let comm = self.comm;
        let start = |_: &mut (), req| unsafe { ffi::MPI_Ibarrier(comm, req) };
        self.run(OpCode::Barrier, None, (), start).map(|_| ())
    }

    fn split(&self, color: u32, name: &str) -> Result<Box<dyn Communicator>> {
        let code = OpCode::Split;
        let c = c_int::try_from(color)
            .map_err(|_| self.bad(code, format!("color {color} exceeds MPI's int range")))?;
        // The gather (which honours the timeout) brings every rank here first, so the
        // blocking MPI_Comm_split after it does not wait on an absent rank. Its colors give
        // the members: MPI orders them by key, this group's rank.
        let mine = color.to_le_bytes();
        let colors = self.gather(code, &mine)?;
        let members: Vec<usize> = (colors.chunks_exact(4).zip(&self.info.members))
            .filter(|(col, _)| *col == mine)
            .map(|(_, &m)| m)
            .collect();
        let me = self.info.world_rank();
        let rank = members.iter().position(|&m| m == me).unwrap_or(0);
        let (mut comm, key) = (unsafe { ffi::RSMPI_COMM_NULL }, self.info.rank as c_int);
        let rc = self.locked(|| unsafe { ffi::MPI_Comm_split(self.comm, c, key, &mut comm) });
        self.check(code, rc)?;
        let sub = MpiComm {
            shared: self.shared.clone(),
            comm,
            info: GroupInfo {
                name: name.to_string(),
                rank,
                members,
            },
            timeout: self.timeout,
            pending: Mutex::new(Vec::new()),
        };
        sub.set_errors_return()?;
        Ok(Box::new(sub))
    }

    fn abort(&self, reason: &str) {
        let rank = self.info.world_rank();
        eprintln!("rank {rank}: aborting the MPI job: {reason}");
        // No lock: abort must work even while another thread is stuck inside an op.
        unsafe { ffi::MPI_Abort(ffi::RSMPI_COMM_WORLD, 1) };
    }
}
