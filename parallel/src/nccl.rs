//! NCCL backend (feature `cuda`): one process per GPU, the NCCL unique id passed through the
//! rendezvous store. The `Communicator` trait hands over host bytes, which its ops stage
//! through device buffers (copy in, NCCL op, copy out); tensors on the GPU skip the staging:
//! `DeviceCollectives` (ops.rs) runs NCCL on their own memory, which `device.rs` takes from
//! burn's CUDA tensors.
//!
//! Loading (and why NCCL is not opened through cudarc): see `api.rs`.
//!
//! Timeouts: communicators are nonblocking (`config.blocking = 0`), so no NCCL call blocks the
//! thread; each op polls `ncclCommGetAsyncError` and a CUDA event with short sleeps until the
//! deadline, then aborts the communicator (`ncclCommAbort`), which is unusable afterwards.

mod api;
pub(crate) mod device;
mod ops;
#[cfg(test)]
mod tests;

use std::ffi::{c_char, c_int};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DriverError};

use crate::comm::{DType, GroupInfo, ReduceOp};
use crate::error::{CommError, Result};
use crate::group::ProcessGroup;
use crate::store::StoreClient;
pub use api::probe;
use api::{
    api, backend, describe, nccl_dtype, nccl_op, Api, Comm, Config, Dst, Src, Stream, UniqueId,
    IN_PROGRESS, SUCCESS,
};

/// The handle and the staging buffers, behind one lock: calls on one NCCL communicator must
/// not interleave.
struct State {
    /// Null once aborted (or after a failure, which NCCL requires to abort).
    comm: Comm,
    dead: String,
    send: Option<CudaSlice<u8>>,
    recv: Option<CudaSlice<u8>>,
}

// SAFETY: the handle is only used under the lock; NCCL allows calls from any thread.
unsafe impl Send for State {}

pub struct NcclComm {
    api: &'static Api,
    info: GroupInfo,
    ctx: Arc<CudaContext>,
    /// One stream per communicator, so ops of different groups cannot queue behind each other.
    stream: Arc<CudaStream>,
    timeout: Duration,
    state: Mutex<State>,
    abort_request: Mutex<Option<String>>,
}

/// A device buffer of at least `len` bytes, grown to powers of two.
fn grow<'a>(
    stream: &Arc<CudaStream>,
    buf: &'a mut Option<CudaSlice<u8>>,
    len: usize,
) -> Result<&'a mut CudaSlice<u8>, DriverError> {
    let want = len.max(1);
    if buf.as_ref().is_none_or(|b| b.len() < want) {
        *buf = None;
        *buf = Some(stream.alloc_zeros::<u8>(want.next_power_of_two())?);
    }
    Ok(buf.as_mut().expect("just allocated"))
}

impl NcclComm {
    fn new(
        api: &'static Api,
        info: GroupInfo,
        ctx: Arc<CudaContext>,
        stream: Arc<CudaStream>,
        timeout: Duration,
        comm: Comm,
    ) -> Self {
        let state = State {
            comm,
            dead: String::new(),
            send: None,
            recv: None,
        };
        Self {
            api,
            info,
            ctx,
            stream,
            timeout,
            state: Mutex::new(state),
            abort_request: Mutex::new(None),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn here(&self, op: &str) -> String {
        format!(
            "{op} on group `{}` on rank {}",
            self.info.name,
            self.info.world_rank()
        )
    }

    fn cuda(&self, op: &'static str) -> impl Fn(DriverError) -> CommError + '_ {
        move |e| backend(format!("{}: CUDA: {e}", self.here(op)))
    }

    fn aborted(&self, op: &'static str, reason: String) -> CommError {
        let (group, rank) = (self.info.name.clone(), self.info.world_rank());
        CommError::Aborted {
            op,
            group,
            rank,
            reason,
        }
    }

    /// Aborts the NCCL communicator (freeing it); later calls fail with `why`.
    fn kill(&self, st: &mut State, why: String) {
        if !st.comm.is_null() {
            // SAFETY: the handle is live and no call on it is pending in another thread.
            unsafe { (self.api.abort)(st.comm) };
            st.comm = std::ptr::null_mut();
            st.dead = why;
        }
    }

    /// Polls until the communicator's pending NCCL call finished and `done()` holds; fails on
    /// an NCCL error, an abort request or the deadline, aborting the communicator.
    fn wait(
        &self,
        st: &mut State,
        op: &'static str,
        deadline: Instant,
        mut done: impl FnMut() -> Result<bool>,
    ) -> Result<()> {
        let mut spins = 0u32;
        loop {
            let request = self
                .abort_request
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            if let Some(reason) = request {
                self.kill(st, format!("aborted on this rank: {reason}"));
                return Err(self.aborted(op, reason));
            }
            let mut state = SUCCESS;
            // SAFETY: the handle is live (checked by the callers under the lock).
            let rc = match unsafe { (self.api.async_error)(st.comm, &mut state) } {
                SUCCESS => state,
                rc => rc,
            };
            if rc != SUCCESS && rc != IN_PROGRESS {
                let detail = format!("{}: {}", self.here(op), describe(self.api, rc, st.comm));
                self.kill(st, detail.clone());
                return Err(backend(detail));
            }
            if rc == SUCCESS && done()? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill(st, format!("{op} timed out"));
                let me = self.info.world_rank();
                return Err(CommError::Timeout {
                    op,
                    group: self.info.name.clone(),
                    rank: me,
                    members: self.info.members.clone(),
                    // NCCL cannot tell which peers are behind.
                    missing: self
                        .info
                        .members
                        .iter()
                        .copied()
                        .filter(|&m| m != me)
                        .collect(),
                    timeout: self.timeout,
                });
            }
            // Spin briefly for small ops' latency, then sleep so a long op costs no core.
            spins = spins.saturating_add(1);
            if spins < 200 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(100));
            }
        }
    }

    /// Waits for everything queued on the stream so far.
    fn drain(&self, st: &mut State, op: &'static str, deadline: Instant) -> Result<()> {
        let event = self.stream.record_event(None).map_err(self.cuda(op))?;
        self.wait(st, op, deadline, || {
            event.try_is_complete().map_err(self.cuda(op))
        })
    }

    fn begin(&self, op: &'static str) -> Result<MutexGuard<'_, State>> {
        let st = self.lock();
        if st.comm.is_null() {
            return Err(self.aborted(op, st.dead.clone()));
        }
        self.ctx.bind_to_thread().map_err(self.cuda(op))?;
        Ok(st)
    }

    /// Copies `input` to the device (`None`: `out` itself, into the receive buffer, for in-place
    /// ops), runs `enqueue(comm, send, recv, stream)`, waits for it and copies `out` back.
    fn run(
        &self,
        op: &'static str,
        input: Option<&[u8]>,
        out: &mut [u8],
        enqueue: impl FnOnce(Comm, Src, Dst, Stream) -> c_int,
    ) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        let mut st = self.begin(op)?;
        let stream = &self.stream;
        let in_place = input.is_none();
        let input: &[u8] = match input {
            Some(input) => input,
            None => out,
        };
        let (send_len, recv_len) = if in_place {
            (0, out.len())
        } else {
            (input.len(), out.len())
        };
        let State { send, recv, .. } = &mut *st;
        let send = grow(stream, send, send_len).map_err(self.cuda(op))?;
        let recv = grow(stream, recv, recv_len).map_err(self.cuda(op))?;
        if !input.is_empty() {
            let dst = if in_place { &mut *recv } else { &mut *send };
            stream
                .memcpy_htod(input, &mut dst.slice_mut(..input.len()))
                .map_err(self.cuda(op))?;
        }
        let (send, recv) = {
            let (r, _r) = recv.device_ptr_mut(stream);
            let (s, _s) = send.device_ptr(stream);
            (if in_place { r } else { s }, r)
        };
        self.launch(&mut st, op, deadline, (send, recv), enqueue)?;
        if !out.is_empty() {
            let recv = st.recv.as_ref().expect("allocated above");
            stream
                .memcpy_dtoh(&recv.slice(..out.len()), out)
                .map_err(self.cuda(op))?;
            self.drain(&mut st, op, deadline)?;
        }
        Ok(())
    }

    /// Enqueues `enqueue(comm, send, recv, stream)` on device addresses and waits until it
    /// completed (the communicator aborted on an error).
    fn launch(
        &self,
        st: &mut State,
        op: &'static str,
        deadline: Instant,
        (send, recv): (u64, u64),
        enqueue: impl FnOnce(Comm, Src, Dst, Stream) -> c_int,
    ) -> Result<()> {
        let comm = st.comm;
        let rc = enqueue(
            comm,
            send as Src,
            recv as Dst,
            self.stream.cu_stream() as Stream,
        );
        if rc != SUCCESS && rc != IN_PROGRESS {
            let detail = format!("{}: {}", self.here(op), describe(self.api, rc, comm));
            self.kill(st, detail.clone());
            return Err(backend(detail));
        }
        self.wait(st, op, deadline, || Ok(true))?;
        self.drain(st, op, deadline)
    }

    /// All-reduce of whole `dtype` elements (checked by the caller).
    fn reduce(&self, op: &'static str, buf: &mut [u8], dtype: DType, red: ReduceOp) -> Result<()> {
        let (api, count) = (self.api, buf.len() / dtype.size());
        self.run(op, None, buf, |c, s, r, st| {
            // SAFETY: `s`/`r` hold `count` elements on this communicator's device.
            unsafe { (api.all_reduce)(s, r, count, nccl_dtype(dtype), nccl_op(red), c, st) }
        })
    }
}

impl Drop for NcclComm {
    /// Finalizes then destroys. Finalize completes once the communicator is "globally
    /// quiescent" (nccl.h), so this waits for the peers to drop theirs too, at most the
    /// timeout, and aborts after that (a failed communicator was aborted already).
    fn drop(&mut self) {
        let (api, deadline) = (self.api, Instant::now() + self.timeout);
        let _ = self.ctx.bind_to_thread();
        let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        if st.comm.is_null() {
            return;
        }
        // SAFETY: the handle is live and no other reference to `self` exists.
        unsafe {
            // Nonblocking: finalize returns at once, the async error turns SUCCESS when done.
            let mut rc = (api.finalize)(st.comm);
            while rc == IN_PROGRESS || rc == SUCCESS {
                let mut state = IN_PROGRESS;
                if (api.async_error)(st.comm, &mut state) != SUCCESS {
                    rc = -1;
                    break;
                }
                rc = state;
                if rc != IN_PROGRESS || Instant::now() >= deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            if rc == SUCCESS {
                (api.destroy)(st.comm);
            } else {
                (api.abort)(st.comm);
            }
        }
    }
}

/// The world group over NCCL: rank 0 creates the unique id and publishes it at
/// `{prefix}/nccl_id` in the store, the others read it; every rank uses GPU `device_ordinal`.
pub fn nccl_world(
    store: &StoreClient,
    prefix: &str,
    rank: usize,
    size: usize,
    device_ordinal: usize,
    timeout: Duration,
) -> Result<ProcessGroup> {
    Ok(ProcessGroup::new(Box::new(nccl_comm(
        store,
        prefix,
        rank,
        size,
        device_ordinal,
        timeout,
    )?)))
}

fn nccl_comm(
    store: &StoreClient,
    prefix: &str,
    rank: usize,
    size: usize,
    device_ordinal: usize,
    timeout: Duration,
) -> Result<NcclComm> {
    let api = api()?;
    if rank >= size {
        return Err(CommError::Rendezvous(format!(
            "rank {rank} is outside a world of {size}"
        )));
    }
    let cuda = |e: DriverError| backend(format!("rank {rank}: CUDA device {device_ordinal}: {e}"));
    let ctx = CudaContext::new(device_ordinal).map_err(cuda)?;
    ctx.bind_to_thread().map_err(cuda)?;
    let stream = ctx.new_stream().map_err(cuda)?;
    let key = format!("{prefix}/nccl_id");
    let mut id = UniqueId([0; 128]);
    if rank == 0 {
        // SAFETY: writes the 128-byte id.
        let rc = unsafe { (api.get_unique_id)(&mut id) };
        if rc != SUCCESS {
            return Err(backend(format!(
                "rank 0: ncclGetUniqueId: {}",
                describe(api, rc, std::ptr::null_mut())
            )));
        }
        store.set(&key, &id.0.map(|c| c as u8))?;
    } else {
        let bytes = store.get(&key)?;
        let bytes: [u8; 128] = bytes.as_slice().try_into().map_err(|_| {
            CommError::Rendezvous(format!(
                "`{key}` holds {} bytes, not an NCCL id of 128",
                bytes.len()
            ))
        })?;
        id = UniqueId(bytes.map(|b| b as c_char));
    }
    let (mut comm, mut cfg) = (std::ptr::null_mut(), Config::nonblocking());
    // SAFETY: `comm` and `cfg` outlive the call; the id came from ncclGetUniqueId.
    let rc =
        unsafe { (api.init_rank_config)(&mut comm, size as c_int, id, rank as c_int, &mut cfg) };
    if (rc != SUCCESS && rc != IN_PROGRESS) || comm.is_null() {
        let detail = describe(api, rc, std::ptr::null_mut());
        if !comm.is_null() {
            // SAFETY: a failed init must be aborted to free it.
            unsafe { (api.abort)(comm) };
        }
        return Err(backend(format!(
            "rank {rank} of {size}: ncclCommInitRankConfig: {detail}"
        )));
    }
    let info = GroupInfo {
        name: "world".into(),
        rank,
        members: (0..size).collect(),
    };
    let nc = NcclComm::new(api, info, ctx, stream, timeout, comm);
    nc.wait(
        &mut nc.lock(),
        "nccl_init",
        Instant::now() + timeout,
        || Ok(true),
    )?;
    Ok(nc)
}
