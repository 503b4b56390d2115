//! In-process backend: the ranks are threads of one process and messages move through shared
//! mailboxes. The default for CPU runs and the harness for many-rank tests.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::group::ProcessGroup;
use crate::p2p::P2pComm;
use crate::transport::{Channel, Mailbox, Message, RecvError, Transport};

struct ThreadTransport {
    rank: usize,
    boxes: Arc<Vec<Mailbox>>,
}

impl Transport for ThreadTransport {
    fn world_rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.boxes.len()
    }

    fn send(&self, dst: usize, channel: Channel, msg: Message) -> Result<(), RecvError> {
        if let Some(reason) = self.boxes[self.rank].aborted() {
            return Err(RecvError::Aborted(reason));
        }
        self.boxes[dst].deliver(self.rank, channel, msg);
        Ok(())
    }

    fn recv(&self, src: usize, channel: Channel, deadline: Instant) -> Result<Message, RecvError> {
        self.boxes[self.rank].take(src, channel, deadline)
    }

    fn ready(&self, src: usize, channel: Channel) -> bool {
        self.boxes[self.rank].ready(src, channel)
    }

    fn abort(&self, reason: &str) {
        let reason = format!("rank {} failed: {reason}", self.rank);
        for b in self.boxes.iter() {
            b.abort(reason.clone());
        }
    }
}

/// World groups for `n` thread ranks (element r is rank r's), each collective waiting at most
/// `timeout`. Move each into its rank's thread.
pub fn thread_world(n: usize, timeout: Duration) -> Vec<ProcessGroup> {
    let boxes: Arc<Vec<Mailbox>> = Arc::new((0..n).map(|_| Mailbox::default()).collect());
    (0..n)
        .map(|rank| {
            let t = ThreadTransport {
                rank,
                boxes: boxes.clone(),
            };
            ProcessGroup::new(Box::new(P2pComm::world(Arc::new(t), timeout)))
        })
        .collect()
}
