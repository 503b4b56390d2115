//! Collectives built from point-to-point messages, for the threads and TCP backends. Every
//! rank sends its contribution to every other rank and reduces the contributions in
//! group-rank order, so all ranks get bitwise the same result, whatever the arrival order.
//! That costs (size − 1) × the buffer per rank, which is fine for CPU jobs and tests; NCCL
//! and MPI bring their own ring and tree algorithms.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::comm::{reduce_parts, Communicator, DType, GroupInfo, ReduceOp};
use crate::error::{CommError, Result};
use crate::transport::{Channel, Message, OpCode, RecvError, Transport, COLLECTIVE};

pub struct P2pComm {
    transport: Arc<dyn Transport>,
    info: GroupInfo,
    id: u64,
    timeout: Duration,
    seq: AtomicU64,
}

/// FNV-1a, to derive group ids every member computes alike.
fn fnv(parts: &[u64]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x100_0000_01b3);
        }
    }
    h
}

impl P2pComm {
    /// The world group over `transport`.
    pub fn world(transport: Arc<dyn Transport>, timeout: Duration) -> Self {
        let info = GroupInfo {
            name: "world".into(),
            rank: transport.world_rank(),
            members: (0..transport.world_size()).collect(),
        };
        Self {
            transport,
            info,
            id: 0,
            timeout,
            seq: AtomicU64::new(0),
        }
    }

    fn channel(&self, tag: u32) -> Channel {
        Channel {
            group: self.id,
            tag,
        }
    }

    fn fail(&self, op: OpCode, peer: usize, e: RecvError, missing: Vec<usize>) -> CommError {
        let (op, group, rank) = (op.name(), self.info.name.clone(), self.info.world_rank());
        match e {
            RecvError::Timeout => CommError::Timeout {
                op,
                group,
                rank,
                members: self.info.members.clone(),
                missing,
                timeout: self.timeout,
            },
            RecvError::PeerGone(reason) => CommError::PeerGone {
                op,
                group,
                rank,
                peer,
                reason,
            },
            RecvError::Aborted(reason) => CommError::Aborted {
                op,
                group,
                rank,
                reason,
            },
        }
    }

    fn bad(&self, op: OpCode, detail: String) -> CommError {
        self.info.bad(op.name(), detail)
    }

    fn send_to(&self, op: OpCode, j: usize, seq: u64, tag: u32, payload: Vec<u8>) -> Result<()> {
        let peer = self.info.members[j];
        let msg = Message { op, seq, payload };
        self.transport
            .send(peer, self.channel(tag), msg)
            .map_err(|e| self.fail(op, peer, e, vec![peer]))
    }

    /// Sends `payload_for(j)` to every other member j and returns what each member sent
    /// here (own entry: `own`), in group-rank order.
    fn exchange(
        &self,
        op: OpCode,
        own: Vec<u8>,
        payload_for: impl Fn(usize) -> Vec<u8>,
    ) -> Result<Vec<Vec<u8>>> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let me = self.info.rank;
        let n = self.info.size();
        for j in (0..n).filter(|&j| j != me) {
            self.send_to(op, j, seq, COLLECTIVE, payload_for(j))?;
        }
        let deadline = Instant::now() + self.timeout;
        let mut got: Vec<Option<Vec<u8>>> = (0..n).map(|_| None).collect();
        got[me] = Some(own);
        for j in (0..n).filter(|&j| j != me) {
            let peer = self.info.members[j];
            let ch = self.channel(COLLECTIVE);
            let msg = self.transport.recv(peer, ch, deadline).map_err(|e| {
                let missing = (j..n)
                    .filter(|&k| {
                        k != me && (k == j || !self.transport.ready(self.info.members[k], ch))
                    })
                    .map(|k| self.info.members[k])
                    .collect();
                self.fail(op, peer, e, missing)
            })?;
            if msg.op != op || msg.seq != seq {
                return Err(CommError::Mismatch {
                    op: op.name(),
                    group: self.info.name.clone(),
                    rank: self.info.world_rank(),
                    detail: format!(
                        "this rank is at {} #{seq}, rank {peer} sent {} #{}",
                        op.name(),
                        msg.op.name(),
                        msg.seq
                    ),
                });
            }
            got[j] = Some(msg.payload);
        }
        Ok(got.into_iter().map(Option::unwrap_or_default).collect())
    }

    fn check_len(&self, op: OpCode, parts: &[Vec<u8>], len: usize) -> Result<()> {
        match parts.iter().position(|p| p.len() != len) {
            Some(j) => Err(self.bad(
                op,
                format!(
                    "rank {} contributed {} bytes, this rank {len}",
                    self.info.members[j],
                    parts[j].len()
                ),
            )),
            None => Ok(()),
        }
    }
}

impl Communicator for P2pComm {
    fn info(&self) -> &GroupInfo {
        &self.info
    }

    fn all_reduce(&self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        let code = OpCode::AllReduce;
        self.info.check_all_reduce(buf.len(), dtype)?;
        let parts = self.exchange(code, buf.to_vec(), |_| buf.to_vec())?;
        self.check_len(code, &parts, buf.len())?;
        reduce_parts(buf, &parts, dtype, op);
        Ok(())
    }

    fn all_gather(&self, send: &[u8], recv: &mut [u8]) -> Result<()> {
        let code = OpCode::AllGather;
        self.info.check_all_gather(send.len(), recv.len())?;
        let parts = self.exchange(code, send.to_vec(), |_| send.to_vec())?;
        self.check_len(code, &parts, send.len())?;
        for (chunk, p) in recv.chunks_exact_mut(send.len().max(1)).zip(&parts) {
            chunk.copy_from_slice(p);
        }
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
        let len = recv.len();
        self.info.check_reduce_scatter(send.len(), len, dtype)?;
        let chunk = |j: usize| send[j * len..(j + 1) * len].to_vec();
        let parts = self.exchange(code, chunk(self.info.rank), chunk)?;
        self.check_len(code, &parts, len)?;
        reduce_parts(recv, &parts, dtype, op);
        Ok(())
    }

    fn all_to_all(
        &self,
        send: &[u8],
        send_sizes: &[usize],
        recv_sizes: &[usize],
    ) -> Result<Vec<u8>> {
        let code = OpCode::AllToAll;
        self.info
            .check_all_to_all(send.len(), send_sizes, recv_sizes)?;
        let offsets: Vec<usize> = send_sizes
            .iter()
            .scan(0, |o, &s| {
                *o += s;
                Some(*o - s)
            })
            .collect();
        let slice = |j: usize| send[offsets[j]..offsets[j] + send_sizes[j]].to_vec();
        let parts = self.exchange(code, slice(self.info.rank), slice)?;
        for (j, p) in parts.iter().enumerate() {
            if p.len() != recv_sizes[j] {
                return Err(self.bad(
                    code,
                    format!(
                        "rank {} sent {} bytes here, recv_sizes says {}",
                        self.info.members[j],
                        p.len(),
                        recv_sizes[j]
                    ),
                ));
            }
        }
        Ok(parts.concat())
    }

    fn broadcast(&self, buf: &mut [u8], root: usize) -> Result<()> {
        let code = OpCode::Broadcast;
        let n = self.info.size();
        self.info.check_rank(code.name(), "root", root)?;
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        if self.info.rank == root {
            for j in (0..n).filter(|&j| j != root) {
                self.send_to(code, j, seq, COLLECTIVE, buf.to_vec())?;
            }
            return Ok(());
        }
        let peer = self.info.members[root];
        let deadline = Instant::now() + self.timeout;
        let msg = self
            .transport
            .recv(peer, self.channel(COLLECTIVE), deadline)
            .map_err(|e| self.fail(code, peer, e, vec![peer]))?;
        if msg.op != code || msg.seq != seq || msg.payload.len() != buf.len() {
            return Err(self.bad(
                code,
                format!(
                    "root rank {peer} sent {} #{} of {} bytes; this rank expected broadcast #{seq} of {}",
                    msg.op.name(),
                    msg.seq,
                    msg.payload.len(),
                    buf.len()
                ),
            ));
        }
        buf.copy_from_slice(&msg.payload);
        Ok(())
    }

    fn send(&self, buf: &[u8], dst: usize, tag: u32) -> Result<()> {
        self.info
            .check_rank(OpCode::Send.name(), "destination", dst)?;
        if tag == COLLECTIVE {
            return Err(self.bad(OpCode::Send, format!("tag {tag} is reserved")));
        }
        self.send_to(OpCode::Send, dst, 0, tag, buf.to_vec())
    }

    fn recv(&self, buf: &mut [u8], src: usize, tag: u32) -> Result<()> {
        let code = OpCode::Send;
        self.info.check_rank(code.name(), "source", src)?;
        if tag == COLLECTIVE {
            return Err(self.bad(code, format!("tag {tag} is reserved")));
        }
        let peer = self.info.members[src];
        let deadline = Instant::now() + self.timeout;
        let msg = self
            .transport
            .recv(peer, self.channel(tag), deadline)
            .map_err(|e| self.fail(code, peer, e, vec![peer]))?;
        if msg.payload.len() != buf.len() {
            return Err(self.bad(
                code,
                format!(
                    "rank {peer} sent {} bytes, this rank expected {}",
                    msg.payload.len(),
                    buf.len()
                ),
            ));
        }
        buf.copy_from_slice(&msg.payload);
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        self.exchange(OpCode::Barrier, Vec::new(), |_| Vec::new())
            .map(|_| ())
    }

    fn split(&self, color: u32, name: &str) -> Result<Box<dyn Communicator>> {
        let seq = self.seq.load(Ordering::Relaxed);
        let mine = color.to_le_bytes().to_vec();
        let colors = self.exchange(OpCode::Split, mine.clone(), |_| mine.clone())?;
        self.check_len(OpCode::Split, &colors, 4)?;
        let members: Vec<usize> = colors
            .iter()
            .enumerate()
            .filter(|(_, c)| c.as_slice() == mine.as_slice())
            .map(|(j, _)| self.info.members[j])
            .collect();
        let world_rank = self.info.world_rank();
        let rank = members.iter().position(|&m| m == world_rank).unwrap_or(0);
        Ok(Box::new(P2pComm {
            transport: self.transport.clone(),
            info: GroupInfo {
                name: name.to_string(),
                rank,
                members,
            },
            id: fnv(&[self.id, seq, color as u64]),
            timeout: self.timeout,
            seq: AtomicU64::new(0),
        }))
    }

    fn abort(&self, reason: &str) {
        self.transport.abort(reason);
    }
}
