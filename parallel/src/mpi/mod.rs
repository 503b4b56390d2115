//! MPI backend (Open MPI / MPICH through rsmpi), for jobs started by `mpirun` or `srun`.
//!
//! Every op is a non-blocking MPI call polled with `MPI_Test` until it completes or the
//! group's timeout passes, so a hung rank turns into a `CommError::Timeout` instead of a
//! silent hang. MPI cannot say which rank has not arrived, so a collective's timeout lists
//! all other members as `missing` (send/recv: the peer). After a timeout the op is still
//! pending inside MPI: its buffers and request are leaked and MPI is never finalized
//! (`MPI_Finalize` would wait on it); the process should exit non-zero, which makes `mpirun`
//! stop the other ranks, or call `abort`.
//!
//! MPI runs at `MPI_THREAD_SERIALIZED`; a lock shared by the groups of the process serializes
//! the calls, so groups may be used from any thread. Sizes are in bytes (elements for
//! all_reduce and reduce_scatter) and limited to MPI's `int` counts, 2^31 − 1 per call.

use std::mem::{self, ManuallyDrop};
use std::os::raw::{c_int, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ::mpi::environment::{Threading, Universe};
use ::mpi::ffi::{self, MPI_Comm, MPI_Datatype, MPI_Op, MPI_Request, MPI_Status};

use crate::comm::{DType, GroupInfo, ReduceOp};
use crate::error::{CommError, Result};
use crate::group::ProcessGroup;
use crate::transport::OpCode;

mod ops;

/// What all groups of the process share: MPI itself (finalized when the last group goes)
/// and the lock that serializes MPI calls.
struct Shared {
    universe: ManuallyDrop<Universe>,
    lock: Mutex<()>,
    /// An op timed out and is still pending in MPI: never free or finalize.
    poisoned: AtomicBool,
}

impl Drop for Shared {
    fn drop(&mut self) {
        if !self.poisoned.load(Ordering::Relaxed) {
            // SAFETY: dropped once, here; `Universe::drop` calls MPI_Finalize.
            unsafe { ManuallyDrop::drop(&mut self.universe) };
        }
    }
}

/// A send in flight: MPI reads `buf` until `req` completes.
struct Pending {
    req: MPI_Request,
    buf: Vec<u8>,
    dst: usize,
    started: Instant,
}

pub struct MpiComm {
    shared: Arc<Shared>,
    comm: MPI_Comm,
    info: GroupInfo,
    timeout: Duration,
    /// Sends return once started, like the other backends' buffered sends, so a ring of
    /// send-then-recv does not deadlock on messages too large for MPI's eager protocol.
    pending: Mutex<Vec<Pending>>,
}

// SAFETY: MPI handles are opaque ids valid in every thread, and every call on them goes
// through `shared.lock` (MPI_THREAD_SERIALIZED), except `abort`'s.
unsafe impl Send for MpiComm {}
unsafe impl Sync for MpiComm {}

fn backend(detail: String) -> CommError {
    CommError::Backend {
        backend: "mpi",
        detail,
    }
}

/// Initializes MPI and returns the world group (`world`, a duplicate of `MPI_COMM_WORLD`),
/// each op waiting at most `timeout`. Call once per process; derive other groups by `split`.
pub fn mpi_world(timeout: Duration) -> Result<ProcessGroup> {
    let (universe, level) = ::mpi::initialize_with_threading(Threading::Serialized)
        .ok_or_else(|| backend("MPI is already initialized: call mpi_world once".into()))?;
    let shared = Arc::new(Shared {
        universe: ManuallyDrop::new(universe),
        lock: Mutex::new(()),
        poisoned: AtomicBool::new(false),
    });
    if level < Threading::Serialized {
        let msg = format!("the MPI library offers {level:?} threading, moeru needs Serialized");
        return Err(backend(msg));
    }
    let world = unsafe { ffi::RSMPI_COMM_WORLD };
    let (mut rank, mut size) = (0, 0);
    // SAFETY: queries on the predefined world communicator; nothing else uses MPI yet.
    unsafe {
        ffi::MPI_Comm_rank(world, &mut rank);
        ffi::MPI_Comm_size(world, &mut size);
    }
    let mut comm = MpiComm {
        shared,
        comm: world,
        info: GroupInfo {
            name: "world".into(),
            rank: rank as usize,
            members: (0..size as usize).collect(),
        },
        timeout,
        pending: Mutex::new(Vec::new()),
    };
    // Our own duplicate keeps our traffic apart from other MPI users and carries our error
    // handler; idup rather than dup so a rank that never starts times the others out (the
    // error then reads as a barrier on `world`).
    let (dup, _) = comm.run(OpCode::Barrier, None, Box::new(world), |d, req| unsafe {
        ffi::MPI_Comm_idup(world, &mut **d, req)
    })?;
    comm.comm = *dup;
    comm.set_errors_return()?;
    Ok(ProcessGroup::new(Box::new(comm)))
}

fn datatype(dtype: DType) -> MPI_Datatype {
    // SAFETY: reads of predefined handles.
    unsafe {
        match dtype {
            DType::F32 => ffi::RSMPI_FLOAT,
            DType::F64 => ffi::RSMPI_DOUBLE,
            DType::I64 => ffi::RSMPI_INT64_T,
            DType::U8 => ffi::RSMPI_UINT8_T,
            // Only moved, never reduced (ops.rs widens bf16 reductions to f32).
            DType::BF16 => ffi::RSMPI_UINT16_T,
        }
    }
}

fn reduce_op(op: ReduceOp) -> MPI_Op {
    // SAFETY: reads of predefined handles.
    unsafe {
        match op {
            // Mean is a sum, divided afterwards on every rank alike.
            ReduceOp::Sum | ReduceOp::Mean => ffi::RSMPI_SUM,
            ReduceOp::Max => ffi::RSMPI_MAX,
        }
    }
}

fn cp(v: &[u8]) -> *const c_void {
    v.as_ptr().cast()
}

fn mp(v: &mut [u8]) -> *mut c_void {
    v.as_mut_ptr().cast()
}

/// Spins briefly, then sleeps, so oversubscribed ranks sharing cores still progress.
fn wait_a_little(polls: &mut u32) {
    *polls += 1;
    if *polls < 64 {
        std::thread::yield_now();
    } else {
        std::thread::sleep(Duration::from_micros(50));
    }
}

impl MpiComm {
    /// Runs `f` (MPI calls) holding the process-wide MPI lock.
    fn locked<R>(&self, f: impl FnOnce() -> R) -> R {
        let _g = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
        f()
    }

    fn bad(&self, op: OpCode, detail: String) -> CommError {
        self.info.bad(op.name(), detail)
    }

    fn failed(&self, op: OpCode, rc: c_int) -> CommError {
        let mut text = vec![0u8; ffi::MPI_MAX_ERROR_STRING as usize + 1];
        let mut len: c_int = 0;
        // SAFETY: MPI writes at most MPI_MAX_ERROR_STRING characters.
        self.locked(|| unsafe { ffi::MPI_Error_string(rc, mp(&mut text).cast(), &mut len) });
        text.truncate(len.max(0) as usize);
        let (group, rank) = (&self.info.name, self.info.world_rank());
        backend(format!(
            "{} on group `{group}` failed on rank {rank}: MPI error {rc}: {}",
            op.name(),
            String::from_utf8_lossy(&text)
        ))
    }

    fn check(&self, op: OpCode, rc: c_int) -> Result<()> {
        match rc {
            0 => Ok(()),
            _ => Err(self.failed(op, rc)),
        }
    }

    fn timed_out(&self, op: OpCode, missing: Vec<usize>) -> CommError {
        self.shared.poisoned.store(true, Ordering::Relaxed);
        CommError::Timeout {
            op: op.name(),
            group: self.info.name.clone(),
            rank: self.info.world_rank(),
            members: self.info.members.clone(),
            missing,
            timeout: self.timeout,
        }
    }

    fn count(&self, op: OpCode, n: usize) -> Result<c_int> {
        c_int::try_from(n).map_err(|_| self.bad(op, format!("{n} exceeds MPI's int counts")))
    }

    fn set_errors_return(&self) -> Result<()> {
        // Errors come back as codes (CommError::Backend) instead of killing the job.
        let rc = self.locked(|| unsafe {
            ffi::MPI_Comm_set_errhandler(self.comm, ffi::RSMPI_ERRORS_RETURN)
        });
        self.check(OpCode::Split, rc)
    }

    /// Starts a non-blocking op on the buffers in `keep` and polls it until it completes or
    /// the timeout passes; a timeout names `peer` (a world rank), else all other members.
    /// `keep` owns all MPI touches (heap data, which moving `keep` does not move); on timeout
    /// or error it is leaked, since MPI may still use it.
    fn run<T>(
        &self,
        op: OpCode,
        peer: Option<usize>,
        mut keep: T,
        start: impl FnOnce(&mut T, *mut MPI_Request) -> c_int,
    ) -> Result<(T, MPI_Status)> {
        self.sweep(false)?;
        // SAFETY: a null request and a zeroed C struct for MPI to fill in.
        let mut req: MPI_Request = unsafe { ffi::RSMPI_REQUEST_NULL };
        let mut status: MPI_Status = unsafe { mem::zeroed() };
        let rc = self.locked(|| start(&mut keep, &mut req));
        let deadline = Instant::now() + self.timeout;
        let mut polls = 0u32;
        let mut done: c_int = 0;
        let rc = match rc {
            0 => loop {
                // SAFETY: `req` is the active request of the op started above.
                let rc = self.locked(|| unsafe { ffi::MPI_Test(&mut req, &mut done, &mut status) });
                if rc != 0 || done != 0 || Instant::now() >= deadline {
                    break rc;
                }
                wait_a_little(&mut polls);
            },
            rc => rc,
        };
        if rc == 0 && done != 0 {
            return Ok((keep, status));
        }
        mem::forget(keep);
        if rc != 0 {
            return Err(self.failed(op, rc));
        }
        let me = self.info.world_rank();
        let others = self.info.members.iter().copied().filter(|&m| m != me);
        Err(self.timed_out(op, peer.map_or_else(|| others.collect(), |p| vec![p])))
    }

    /// Retires completed sends; one pending longer than the timeout means its receiver never
    /// posted the receive. With `block`, waits until all are done (or one is late).
    fn sweep(&self, block: bool) -> Result<()> {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let mut polls = 0u32;
        while !pending.is_empty() {
            let mut i = 0;
            while i < pending.len() {
                let (p, mut done) = (&mut pending[i], 0);
                // SAFETY: `p.req` is an active send request whose buffer `p` owns.
                let rc = self.locked(|| unsafe {
                    ffi::MPI_Test(&mut p.req, &mut done, ffi::RSMPI_STATUS_IGNORE)
                });
                if rc != 0 || (done == 0 && p.started.elapsed() >= self.timeout) {
                    let p = pending.swap_remove(i);
                    let dst = p.dst;
                    mem::forget(p.buf);
                    return Err(match rc {
                        0 => self.timed_out(OpCode::Send, vec![dst]),
                        rc => self.failed(OpCode::Send, rc),
                    });
                }
                if done != 0 {
                    pending.swap_remove(i);
                } else {
                    i += 1;
                }
            }
            if !block {
                break;
            }
            wait_a_little(&mut polls);
        }
        Ok(())
    }

    /// Every rank's `send` (equal sizes), in group-rank order.
    fn gather(&self, op: OpCode, send: &[u8]) -> Result<Vec<u8>> {
        let n = self.count(op, send.len())?;
        let keep = (send.to_vec(), vec![0u8; send.len() * self.info.size()]);
        let (comm, ty) = (self.comm, datatype(DType::U8));
        let ((_, recv), _) = self.run(op, None, keep, |(s, r), req| unsafe {
            ffi::MPI_Iallgather(cp(s), n, ty, mp(r), n, ty, comm, req)
        })?;
        Ok(recv)
    }

    /// MPI's rank and tag for group rank `j` and `tag`.
    /// Group rank `j` (the `role` of a send or recv) and `tag` as MPI's ints.
    fn peer(&self, op: OpCode, role: &str, j: usize, tag: u32) -> Result<(c_int, c_int)> {
        self.info.check_rank(op.name(), role, j)?;
        let tag = c_int::try_from(tag)
            .map_err(|_| self.bad(op, format!("tag {tag} exceeds MPI's int range")))?;
        Ok((j as c_int, tag))
    }
}

impl Drop for MpiComm {
    fn drop(&mut self) {
        if let Err(e) = self.sweep(true) {
            eprintln!("rank {}: {e}", self.info.world_rank());
        }
        let mut comm = self.comm;
        if self.shared.poisoned.load(Ordering::Relaxed) || comm == unsafe { ffi::RSMPI_COMM_WORLD }
        {
            return;
        }
        // SAFETY: our own communicator, with no op pending on it.
        self.locked(|| unsafe { ffi::MPI_Comm_free(&mut comm) });
    }
}
