//! The `Communicator` trait every backend implements, on raw bytes plus a dtype so it stays
//! object-safe; `ProcessGroup` (group.rs) puts typed slices on top. The argument checks of
//! the collectives live here too, so every backend rejects the same calls alike.

use crate::error::{CommError, Result};
use crate::flat::Collective;

/// Element types the collectives reduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    F64,
    I64,
    U8,
    /// bfloat16, the activations' wire dtype under `precision: bf16`. Reductions add in f32
    /// and round once (NCCL adds bf16 natively, rounding each step of its ring).
    BF16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::BF16 => 2,
            DType::F32 => 4,
            DType::F64 | DType::I64 => 8,
            DType::U8 => 1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    /// Sum divided by the group size (integer division for integers).
    Mean,
    Max,
}

/// Who is in a group: its name (`world`, `dp`, `tp`, …), this rank's index in it and the
/// world ranks of all members, in group-rank order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfo {
    pub name: String,
    pub rank: usize,
    pub members: Vec<usize>,
}

impl GroupInfo {
    pub fn size(&self) -> usize {
        self.members.len()
    }

    /// This rank's world rank.
    pub fn world_rank(&self) -> usize {
        self.members[self.rank]
    }
}

/// The checks every backend runs on a collective's arguments before it moves a byte (so no
/// rank waits on a peer that already failed here), and the error they give: `BadArgument`
/// naming the op, this group and rank, and the sizes that do not fit.
impl GroupInfo {
    pub(crate) fn bad(&self, op: &'static str, detail: String) -> CommError {
        CommError::BadArgument {
            op,
            group: self.name.clone(),
            rank: self.world_rank(),
            detail,
        }
    }

    /// `len` bytes must be whole `dtype` elements.
    pub(crate) fn check_all_reduce(&self, len: usize, dtype: DType) -> Result<()> {
        if len.is_multiple_of(dtype.size()) {
            return Ok(());
        }
        let detail = format!("{len} bytes are no whole number of {dtype:?} elements");
        Err(self.bad("all_reduce", detail))
    }

    pub(crate) fn check_all_gather(&self, send: usize, recv: usize) -> Result<()> {
        let n = self.size();
        if recv == send * n {
            return Ok(());
        }
        let detail = format!("recv has {recv} bytes, expected {n} × {send} (send)");
        Err(self.bad("all_gather", detail))
    }

    /// `send` must be size × `recv` bytes, and `recv` whole `dtype` elements.
    pub(crate) fn check_reduce_scatter(
        &self,
        send: usize,
        recv: usize,
        dtype: DType,
    ) -> Result<()> {
        let n = self.size();
        if send == recv * n && recv.is_multiple_of(dtype.size()) {
            return Ok(());
        }
        let detail = format!("send has {send} bytes, expected {n} × {recv} (recv) of {dtype:?}");
        Err(self.bad("reduce_scatter", detail))
    }

    /// One send and one recv size per rank, the send sizes adding up to `send` bytes.
    pub(crate) fn check_all_to_all(
        &self,
        send: usize,
        send_sizes: &[usize],
        recv_sizes: &[usize],
    ) -> Result<()> {
        let (n, total) = (self.size(), send_sizes.iter().sum::<usize>());
        if send_sizes.len() == n && recv_sizes.len() == n && total == send {
            return Ok(());
        }
        let (s, r) = (send_sizes.len(), recv_sizes.len());
        let detail = format!(
            "{s} send sizes summing to {total} for {send} bytes, {r} recv sizes, group of {n}"
        );
        Err(self.bad("all_to_all", detail))
    }

    /// `rank` (a group rank: the broadcast root, a send's destination, a recv's source, named
    /// by `role`) must be in the group.
    pub(crate) fn check_rank(&self, op: &'static str, role: &str, rank: usize) -> Result<()> {
        let n = self.size();
        if rank < n {
            return Ok(());
        }
        Err(self.bad(op, format!("{role} {rank} is outside the group of {n}")))
    }
}

/// Collectives over one group of ranks. All members call the same collectives in the same
/// order; each call waits at most the backend's timeout and then fails with a `CommError`
/// naming the op, the group, the rank and the ranks it still waited for.
///
/// Buffers are bytes of `dtype` elements (little-endian, native layout); sizes are in bytes.
pub trait Communicator: Send + Sync {
    fn info(&self) -> &GroupInfo;

    /// Reduces `buf` elementwise over the group; every rank gets the result.
    fn all_reduce(&self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()>;

    /// `recv` (size × `send.len()`) gets every rank's `send`, in group-rank order.
    fn all_gather(&self, send: &[u8], recv: &mut [u8]) -> Result<()>;

    /// `send` is size equal chunks; rank r gets the reduction of every rank's chunk r.
    fn reduce_scatter(
        &self,
        send: &[u8],
        recv: &mut [u8],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()>;

    /// `send` is split by `send_sizes` (bytes for rank 0, 1, …); returns the concatenation of
    /// what each rank sent here, whose sizes are `recv_sizes`.
    fn all_to_all(
        &self,
        send: &[u8],
        send_sizes: &[usize],
        recv_sizes: &[usize],
    ) -> Result<Vec<u8>>;

    /// `buf` of group rank `root` is copied to every rank.
    fn broadcast(&self, buf: &mut [u8], root: usize) -> Result<()>;

    fn send(&self, buf: &[u8], dst: usize, tag: u32) -> Result<()>;

    fn recv(&self, buf: &mut [u8], src: usize, tag: u32) -> Result<()>;

    /// Point-to-point transfers posted together, as one NCCL group: every send of `sends`
    /// (bytes, destination) and receive of `recvs` (buffer, source) progresses at once and
    /// the call returns when all have completed. Two neighbours that both send first cannot
    /// deadlock. The default suits backends whose sends never wait for the receiver (threads,
    /// TCP, MPI's `Isend`): all sends, then all receives. Messages between two ranks match in
    /// the order they were posted.
    fn exchange(
        &self,
        sends: &[(&[u8], usize)],
        recvs: &mut [(&mut [u8], usize)],
        tag: u32,
    ) -> Result<()> {
        for (buf, dst) in sends {
            self.send(buf, *dst, tag)?;
        }
        for (buf, src) in recvs.iter_mut() {
            self.recv(buf, *src, tag)?;
        }
        Ok(())
    }

    fn barrier(&self) -> Result<()>;

    /// Collective over this group, like `MPI_Comm_split`: ranks passing the same `color` form
    /// a new group named `name`, ordered by their rank here.
    fn split(&self, color: u32, name: &str) -> Result<Box<dyn Communicator>>;

    /// Tells the other ranks this one failed, so they stop waiting for it instead of timing
    /// out. Best effort; backends that cannot do this return without effect.
    fn abort(&self, reason: &str);

    /// The collectives on device memory, where this backend has them (NCCL).
    fn device(&self) -> Option<&dyn DeviceCollectives> {
        None
    }
}

/// Collectives on the memory of the communicator's own GPU, by address: no host copy. The
/// same calls as the host ops, in the same order on every rank.
pub trait DeviceCollectives {
    /// The CUDA ordinal of the GPU the communicator runs on.
    fn device_ordinal(&self) -> usize;

    /// `op` from `send` (`send_elems` elements of `dtype`) into `recv`
    /// (`op.output_len(send_elems, size)` elements), returning once it completed.
    ///
    /// # Safety
    /// Both addresses are this GPU's and hold that many elements, and nothing reads or writes
    /// them until the call returns.
    unsafe fn run_on_device(
        &self,
        op: &Collective,
        dtype: DType,
        buffers: (u64, u64),
        send_elems: usize,
    ) -> Result<()>;
}

/// `out` = the reduction of every rank's `parts` in rank order, `Mean` divided by their
/// count: the CPU backends' all-reduce and reduce-scatter. bf16 is widened, reduced in f32
/// and rounded once, so a bf16 wire gives what an f32 wire of the same values gives.
pub(crate) fn reduce_parts(out: &mut [u8], parts: &[Vec<u8>], dtype: DType, op: ReduceOp) {
    if dtype == DType::BF16 {
        let wide: Vec<Vec<u8>> = parts.iter().map(|p| widen_bf16(p)).collect();
        let mut acc = vec![0u8; 2 * out.len()];
        reduce_parts(&mut acc, &wide, DType::F32, op);
        narrow_to_bf16(&acc, out);
        return;
    }
    out.copy_from_slice(&parts[0]);
    for p in &parts[1..] {
        reduce_into(out, p, dtype, op);
    }
    finish_mean(out, dtype, op, parts.len());
}

/// Little-endian bf16 values as little-endian f32 (exact).
pub(crate) fn widen_bf16(bf16: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 * bf16.len());
    for b in bf16.chunks_exact(2) {
        out.extend_from_slice(&[0, 0, b[0], b[1]]);
    }
    out
}

/// Little-endian f32 values rounded to nearest-even bf16 into `out`.
pub(crate) fn narrow_to_bf16(f32s: &[u8], out: &mut [u8]) {
    for (o, f) in out.chunks_exact_mut(2).zip(f32s.chunks_exact(4)) {
        let x = f32::from_le_bytes(f.try_into().unwrap());
        o.copy_from_slice(&half::bf16::from_f32(x).to_le_bytes());
    }
}

/// Elementwise reduction of little-endian `dtype` values of `src` into `acc` (bf16: each
/// step rounded, as NCCL's ring does; `reduce_parts` rounds once instead).
pub(crate) fn reduce_into(acc: &mut [u8], src: &[u8], dtype: DType, op: ReduceOp) {
    macro_rules! fold {
        ($t:ty, $n:expr) => {
            for (a, s) in acc.chunks_exact_mut($n).zip(src.chunks_exact($n)) {
                let x = <$t>::from_le_bytes(a.try_into().unwrap());
                let y = <$t>::from_le_bytes(s.try_into().unwrap());
                let r = match op {
                    ReduceOp::Sum | ReduceOp::Mean => x + y,
                    ReduceOp::Max => {
                        if y > x {
                            y
                        } else {
                            x
                        }
                    }
                };
                a.copy_from_slice(&r.to_le_bytes());
            }
        };
    }
    match dtype {
        DType::F32 => fold!(f32, 4),
        DType::F64 => fold!(f64, 8),
        DType::I64 => fold!(i64, 8),
        DType::U8 => fold!(u8, 1),
        DType::BF16 => {
            let mut wide = widen_bf16(acc);
            reduce_into(&mut wide, &widen_bf16(src), DType::F32, op);
            narrow_to_bf16(&wide, acc);
        }
    }
}

/// The `Mean` epilogue of a sum over `n` ranks: divides every element by `n` when `op` is
/// `Mean` (backends without a native mean reduce those with a sum).
pub(crate) fn finish_mean(buf: &mut [u8], dtype: DType, op: ReduceOp, n: usize) {
    if op != ReduceOp::Mean {
        return;
    }
    macro_rules! div {
        ($t:ty, $w:expr, $d:expr) => {
            for a in buf.chunks_exact_mut($w) {
                let x = <$t>::from_le_bytes(a.try_into().unwrap());
                a.copy_from_slice(&(x / $d).to_le_bytes());
            }
        };
    }
    match dtype {
        DType::F32 => div!(f32, 4, n as f32),
        DType::F64 => div!(f64, 8, n as f64),
        DType::I64 => div!(i64, 8, n as i64),
        DType::U8 => div!(u8, 1, n as u8),
        DType::BF16 => {
            let mut wide = widen_bf16(buf);
            finish_mean(&mut wide, DType::F32, op, n);
            narrow_to_bf16(&wide, buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argument_checks_name_the_op_and_the_sizes() {
        let info = GroupInfo {
            name: "dp".into(),
            rank: 1,
            members: vec![4, 6, 8],
        };
        let msg = |r: Result<()>| r.unwrap_err().to_string();
        assert!(info.check_all_reduce(8, DType::F64).is_ok());
        assert_eq!(
            msg(info.check_all_reduce(6, DType::F32)),
            "all_reduce on group `dp` on rank 6: 6 bytes are no whole number of F32 elements"
        );
        assert!(info.check_all_gather(4, 12).is_ok());
        assert!(msg(info.check_all_gather(4, 8)).contains("recv has 8 bytes, expected 3 × 4"));
        assert!(info.check_reduce_scatter(24, 8, DType::F32).is_ok());
        assert!(msg(info.check_reduce_scatter(12, 4, DType::F64)).contains("of F64"));
        assert!(info.check_all_to_all(6, &[1, 2, 3], &[0, 0, 0]).is_ok());
        assert!(msg(info.check_all_to_all(6, &[1, 2], &[0, 0, 0]))
            .contains("2 send sizes summing to 3 for 6 bytes, 3 recv sizes, group of 3"));
        assert!(info.check_rank("broadcast", "root", 2).is_ok());
        assert_eq!(
            msg(info.check_rank("broadcast", "root", 3)),
            "broadcast on group `dp` on rank 6: root 3 is outside the group of 3"
        );
    }
}
