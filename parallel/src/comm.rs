//! The `Communicator` trait every backend implements, on raw bytes plus a dtype so it stays
//! object-safe; `ProcessGroup` (group.rs) puts typed slices and burn tensors on top.

use crate::error::Result;

/// Element types the collectives reduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    F64,
    I64,
    U8,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
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

    fn barrier(&self) -> Result<()>;

    /// Collective over this group, like `MPI_Comm_split`: ranks passing the same `color` form
    /// a new group named `name`, ordered by their rank here.
    fn split(&self, color: u32, name: &str) -> Result<Box<dyn Communicator>>;

    /// Tells the other ranks this one failed, so they stop waiting for it instead of timing
    /// out. Best effort; backends that cannot do this return without effect.
    fn abort(&self, reason: &str);
}

/// Elementwise reduction of little-endian `dtype` values of `src` into `acc`.
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
    }
}

/// Divides every element by `n` (the `Mean` epilogue).
pub(crate) fn divide(buf: &mut [u8], dtype: DType, n: usize) {
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
    }
}
