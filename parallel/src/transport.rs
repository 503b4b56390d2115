//! Point-to-point message delivery that the threads and TCP backends share: a per-rank
//! mailbox of FIFO queues keyed by (sender, group, tag), with deadlines, peer-gone and
//! job-abort notices, so collectives built on it (p2p.rs) never wait forever.

use std::collections::{HashMap, VecDeque};
use std::sync::{Condvar, Mutex};
use std::time::Instant;

/// Collective ops, carried in every message so ranks that disagree on the next op are caught.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum OpCode {
    AllReduce = 1,
    AllGather = 2,
    ReduceScatter = 3,
    AllToAll = 4,
    Broadcast = 5,
    Send = 6,
    Barrier = 7,
    Split = 8,
}

impl OpCode {
    pub fn name(self) -> &'static str {
        match self {
            OpCode::AllReduce => "all_reduce",
            OpCode::AllGather => "all_gather",
            OpCode::ReduceScatter => "reduce_scatter",
            OpCode::AllToAll => "all_to_all",
            OpCode::Broadcast => "broadcast",
            OpCode::Send => "send/recv",
            OpCode::Barrier => "barrier",
            OpCode::Split => "split",
        }
    }

    pub fn from_u8(v: u8) -> Option<Self> {
        use OpCode::*;
        [
            AllReduce,
            AllGather,
            ReduceScatter,
            AllToAll,
            Broadcast,
            Send,
            Barrier,
            Split,
        ]
        .into_iter()
        .find(|op| *op as u8 == v)
    }
}

/// Channel of a message: the group it belongs to and the user tag (`COLLECTIVE` for
/// collectives, which are matched by order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Channel {
    pub group: u64,
    pub tag: u32,
}

pub const COLLECTIVE: u32 = u32::MAX;

#[derive(Debug)]
pub struct Message {
    pub op: OpCode,
    /// Sequence number of the collective within its group (0 for send/recv).
    pub seq: u64,
    pub payload: Vec<u8>,
}

#[derive(Debug)]
pub enum RecvError {
    Timeout,
    PeerGone(String),
    Aborted(String),
}

/// Moves messages between world ranks.
pub trait Transport: Send + Sync {
    fn world_rank(&self) -> usize;
    fn world_size(&self) -> usize;
    fn send(&self, dst: usize, channel: Channel, msg: Message) -> Result<(), RecvError>;
    fn recv(&self, src: usize, channel: Channel, deadline: Instant) -> Result<Message, RecvError>;
    /// Whether a message from `src` on `channel` is already waiting.
    fn ready(&self, src: usize, channel: Channel) -> bool;
    fn abort(&self, reason: &str);
}

#[derive(Default)]
struct Boxes {
    queues: HashMap<(usize, Channel), VecDeque<Message>>,
    gone: HashMap<usize, String>,
    aborted: Option<String>,
}

/// The incoming messages of one rank.
#[derive(Default)]
pub struct Mailbox {
    boxes: Mutex<Boxes>,
    arrived: Condvar,
}

impl Mailbox {
    pub fn deliver(&self, src: usize, channel: Channel, msg: Message) {
        let mut b = self.boxes.lock().unwrap_or_else(|e| e.into_inner());
        b.queues.entry((src, channel)).or_default().push_back(msg);
        self.arrived.notify_all();
    }

    /// `src` will send nothing more (its connection closed, or it failed).
    pub fn peer_gone(&self, src: usize, reason: String) {
        let mut b = self.boxes.lock().unwrap_or_else(|e| e.into_inner());
        b.gone.entry(src).or_insert(reason);
        self.arrived.notify_all();
    }

    pub fn abort(&self, reason: String) {
        let mut b = self.boxes.lock().unwrap_or_else(|e| e.into_inner());
        b.aborted.get_or_insert(reason);
        self.arrived.notify_all();
    }

    pub fn aborted(&self) -> Option<String> {
        let b = self.boxes.lock().unwrap_or_else(|e| e.into_inner());
        b.aborted.clone()
    }

    pub fn ready(&self, src: usize, channel: Channel) -> bool {
        let b = self.boxes.lock().unwrap_or_else(|e| e.into_inner());
        b.queues.get(&(src, channel)).is_some_and(|q| !q.is_empty())
    }

    /// The next message from `src` on `channel`, waiting until `deadline`. Queued messages
    /// are handed out even after the sender is gone.
    pub fn take(
        &self,
        src: usize,
        channel: Channel,
        deadline: Instant,
    ) -> Result<Message, RecvError> {
        let mut b = self.boxes.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(msg) = b
                .queues
                .get_mut(&(src, channel))
                .and_then(VecDeque::pop_front)
            {
                return Ok(msg);
            }
            if let Some(reason) = &b.aborted {
                return Err(RecvError::Aborted(reason.clone()));
            }
            if let Some(reason) = b.gone.get(&src) {
                return Err(RecvError::PeerGone(reason.clone()));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(RecvError::Timeout);
            }
            b = self
                .arrived
                .wait_timeout(b, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}
